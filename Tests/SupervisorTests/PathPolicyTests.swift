import Foundation
import Shared
import SystemPackage
import Testing

@testable import Supervisor

/// Data roots (issue 8): a clip must resolve, symlinks and `..` followed, inside a root; passed
/// fds are checked through their real path. Refusals are `permission` skips with the client's
/// pid and uid in the skip log.
@Suite(.serialized, .timeLimit(.minutes(3)))
final class PathPolicyTests {
    let area = TemporaryDirectory("roots")
    var root: String { area.file("data") }
    var outside: String { area.file("elsewhere") }

    init() throws {
        for directory in [root, outside, area.file("data/sub")] {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        }
        try Fixtures.clip(at: "\(root)/sub/inside.mp4", seconds: 1)
        try FileManager.default.copyItem(atPath: "\(root)/sub/inside.mp4", toPath: "\(outside)/secret.mp4")
        // A link inside the root to a file outside it, and one inside to inside.
        try FileManager.default.createSymbolicLink(atPath: "\(root)/escape.mp4", withDestinationPath: "\(outside)/secret.mp4")
        try FileManager.default.createSymbolicLink(atPath: "\(root)/alias.mp4", withDestinationPath: "\(root)/sub/inside.mp4")
    }

    @Test func clipsOutsideTheRootsArePermissionSkips() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1", "--root", root])
        let client = try supervisor.client()
        #expect(try client.decode("\(root)/sub/inside.mp4", ["frames": 2]).0["ok"]?.boolValue == true)
        #expect(try client.decode("\(root)/alias.mp4", ["frames": 2]).0["ok"]?.boolValue == true, "a link that stays inside is fine")

        let refused = [
            "\(outside)/secret.mp4",  // plainly outside
            "\(root)/escape.mp4",  // a symlink out
            "\(root)/sub/../../elsewhere/secret.mp4",  // `..` out
            "\(root)/../elsewhere/secret.mp4",  // `..` right after the root
        ]
        for path in refused {
            let (answer, block) = try client.decode(path, ["frames": 2])
            #expect(answer.errorReason == "permission", "\(path): \(answer.jsonString)")
            #expect(block == nil)
            #expect(answer["error"]?["message"]?.stringValue?.contains("outside the data roots") == true)
        }
        let records = supervisor.skipRecords().filter { $0["reason"]?.stringValue == "permission" }
        #expect(records.count == refused.count)
        #expect(records.allSatisfy { $0["client_pid"]?.intValue == Int(getpid()) && $0["client_uid"]?.intValue == Int(getuid()) })
    }

    @Test func passedFDsAreCheckedThroughTheirRealPath() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1", "--root", root])
        let client = try supervisor.client()
        let outsideFD = try FileDescriptor.open("\(outside)/secret.mp4", .readOnly)
        defer { try? outsideFD.close() }
        // The name claims to be inside; the fd says otherwise.
        let (refused, _) = try client.call(
            ["op": "decode", "fd": true, "path": .string("\(root)/sub/inside.mp4"), "frames": 2], passing: outsideFD, timeoutMs: 30_000)
        #expect(refused.errorReason == "permission", "\(refused.jsonString)")

        let insideFD = try FileDescriptor.open("\(root)/sub/inside.mp4", .readOnly)
        defer { try? insideFD.close() }
        let (accepted, block) = try client.call(
            ["op": "decode", "fd": true, "path": "inside.mp4", "frames": 2], passing: insideFD, timeoutMs: 30_000)
        try? block?.close()
        #expect(accepted["ok"]?.boolValue == true, "\(accepted.jsonString)")
    }

    @Test func withoutRootsEverythingReadableIsDecoded() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1"])
        #expect(try supervisor.client().decode("\(outside)/secret.mp4", ["frames": 2]).0["ok"]?.boolValue == true)
    }
}
