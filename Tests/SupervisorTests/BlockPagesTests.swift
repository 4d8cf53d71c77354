import Foundation
import Shared
import Testing

@testable import Supervisor

/// The host's shared-memory huge-page setting, as `status` reports it.
struct BlockPagesTests {
    @Test func theBracketedWordIsTheSetting() {
        #expect(BlockPages.parse("always within_size advise [never] deny force\n") == "never")
        #expect(BlockPages.parse("always [within_size] advise never deny force") == "within_size")
        #expect(BlockPages.parse("always within_size advise never") == nil)
        #expect(BlockPages.parse("[]") == nil)
        #expect(BlockPages.hugePages(under: "within_size") && BlockPages.hugePages(under: "always"))
        #expect(!BlockPages.hugePages(under: "advise") && !BlockPages.hugePages(under: "never"))
    }

    @Test func statusSaysWhatTheFileSaysAndWhatToDo() throws {
        let directory = TemporaryDirectory("pages")
        let file = directory.file("shmem_enabled")
        try "always within_size advise [never] deny force\n".write(toFile: file, atomically: true, encoding: .utf8)
        let never = BlockPages.statusJSON(path: file)
        #expect(never["shmem_enabled"] == "never" && never["huge"] == false)
        #expect(BlockPages.line(never)?.contains("within_size makes the hop") == true)
        try "always [within_size] advise never deny force\n".write(toFile: file, atomically: true, encoding: .utf8)
        let huge = BlockPages.statusJSON(path: file)
        #expect(huge["huge"] == true && BlockPages.line(huge) == "blocks: 2 MiB pages (shmem_enabled = within_size)")
        let absent = BlockPages.statusJSON(path: directory.file("missing"))
        #expect(absent["shmem_enabled"] == .null && BlockPages.line(absent) == nil)
    }

    /// The real supervisor reports this machine's setting.
    @Test func theSupervisorReportsTheHostSetting() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1"])
        let pages = try supervisor.status()["memory"]?["block_pages"]
        #expect(pages?["shmem_enabled"]?.stringValue == BlockPages.setting(), "\(pages?.jsonString ?? "")")
    }
}
