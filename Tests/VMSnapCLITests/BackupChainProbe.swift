import Foundation
import SnapshotCore
import Testing

/// Reads a push backup directory from outside, as the backup tests check it: what the newest
/// backup of a disk holds itself (qemu-img map), and whether a restored chain reads as the source
/// (qemu-img compare).
enum BackupChainProbe {
    /// Bytes the newest backup of `target` in `dir` (its manifest, vmsnap-backups.json) holds
    /// itself, not through its backing file.
    static func newestOwnBytes(_ dir: String, target: String = "vda") async throws -> Int {
        let manifest =
            try JSONSerialization.jsonObject(
                with: try Data(contentsOf: URL(fileURLWithPath: dir + "/vmsnap-backups.json")))
            as? [String: Any]
        let newest = try #require(
            ((manifest?["backups"] as? [[String: Any]])?.last?["files"] as? [String: String])?[target])
        return try await ownBytes(dir + "/" + newest)
    }

    /// Bytes `image` holds itself (not through its backing file).
    static func ownBytes(_ image: String) async throws -> Int {
        let out = try await SubprocessRunner().run(["qemu-img", "map", "--output=json", image]).standardOutput
        let rows = try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [[String: Any]] ?? []
        return rows.filter { ($0["depth"] as? Int) == 0 && ($0["data"] as? Bool) == true }
            .reduce(0) { $0 + (($1["length"] as? Int) ?? 0) }
    }

    /// `qemu-img compare` of a raw source (a file, a device, an rbd: spelling) with a restored qcow2.
    static func compareRaw(_ source: String, with restored: String) async throws -> CommandOutput {
        try await SubprocessRunner().execute(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", source, restored])
    }
}
