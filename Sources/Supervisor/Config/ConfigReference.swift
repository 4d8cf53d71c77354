/// The example config file (systemd/clipvisor.toml) and the docs' table of knobs
/// (docs/configuration.md), both made from `ConfigKey.table`; `clipvisor serve
/// --print-example-config` prints the first, and tests check that both committed files are
/// exactly what this makes, so no knob's text is written twice.
enum ConfigReference {
    static let exampleHeader = """
        # /etc/clipvisor/clipvisor.toml — configuration of `clipvisor serve` (the system service).
        # Made by `clipvisor serve --print-example-config` from the knobs' table: edit that, not this text.
        #
        # Every key is the `clipvisor serve` long option of the same name with `-` turned into `_`
        # (`--clips-per-worker` → `clips_per_worker`), except `roots` (`--root`, repeated).
        # Precedence: built-in defaults < this file < flags.
        # An unknown key, a wrong type or a value out of range stops the service at start with this
        # file's name, the line and the key (exit status 78; `journalctl -u clipvisor` shows it).
        # Durations in seconds accept integers or floats; sizes are integers (`_` separators allowed).
        #
        # The values below size the service for 8 workers; systemd/clipvisor.service's MemoryMax=
        # and TasksMax= are computed from them (docs/systemd.md, "Sizing"). Change them together.
        """

    /// The example file: every knob with its text, its default, and the service's value.
    static func exampleFile() -> String {
        var lines = [exampleHeader]
        for key in ConfigKey.table {
            lines.append("")
            lines += wrap("\(key.help) Default: \(key.defaultText).", width: 96, prefix: "# ")
            lines.append("\(key.name) = \(key.example)")
        }
        return lines.joined(separator: "\n") + "\n"
    }

    static let tableBegin = "<!-- knobs: made by ConfigReference.markdownTable(); edit ConfigTable.swift -->"
    static let tableEnd = "<!-- end of knobs -->"

    /// The docs' table: key, flag, default, meaning.
    static func markdownTable() -> String {
        var lines = [tableBegin, "", "| key | flag | default | what it does |", "|---|---|---|---|"]
        for key in ConfigKey.table {
            let help = key.help.split(separator: "|", omittingEmptySubsequences: false).joined(separator: "\\|")
            lines.append("| `\(key.name)` | `\(key.flag)` | \(key.defaultText) | \(help) |")
        }
        lines += ["", tableEnd]
        return lines.joined(separator: "\n")
    }

    /// Words of `text` in lines of at most `width` characters, each starting with `prefix`.
    static func wrap(_ text: String, width: Int, prefix: String) -> [String] {
        var lines: [String] = []
        var line = prefix
        for word in text.split(separator: " ") {
            if line.count > prefix.count, line.count + 1 + word.count > width {
                lines.append(line)
                line = prefix
            }
            line += (line.count > prefix.count ? " " : "") + word
        }
        if line.count > prefix.count { lines.append(line) }
        return lines
    }
}
