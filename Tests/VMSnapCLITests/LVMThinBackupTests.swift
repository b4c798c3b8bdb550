import Foundation
import SnapshotCore
import Testing

/// Checkpoints and backups of an LVM thin disk, tracked by the pool's own metadata: the
/// checkpoint is a thin snapshot, an incremental holds the chunks `thin_delta` reports, pull and
/// push, restored byte for byte. Needs a real device-mapper and a thin pool: scripts/lvm-guest.
@Suite(
    "LVM thin disk: checkpoints and incremental backups from the pool's metadata", .serialized,
    .enabled(
        if: ProcessInfo.processInfo.environment["VMSNAP_LVM_THIN_POOL"] != nil,
        "set VMSNAP_LVM_VG and VMSNAP_LVM_THIN_POOL (scripts/lvm-guest does)"))
struct LVMThinBackupTests {
    let vg = ProcessInfo.processInfo.environment["VMSNAP_LVM_VG"] ?? ""
    let pool = ProcessInfo.processInfo.environment["VMSNAP_LVM_THIN_POOL"] ?? ""

    /// A shut-off domain `g` over a new 32 MiB thin volume filled with 1s.
    func domain(_ cli: CLI) async throws -> (disk: String, device: String) {
        let lv = "vmsnap-tb-\(UUID().uuidString.prefix(6).lowercased())"
        try await cli.sh("lvcreate", "-q", "-V", "32m", "--thinpool", pool, "-n", lv, vg)
        let device = "/dev/\(vg)/\(lv)"
        try await write(device, 1, at: 0, length: 32 << 20)
        let file = cli.root + "/g.json"
        try
            #"{"name": "g", "memoryMiB": 32, "disks": [{"target": "vda", "backend": "lvm", "locator": "\#(vg)/\#(lv)"}]}"#
            .write(toFile: file, atomically: true, encoding: .utf8)
        try await cli.ok("domain", "define", file)
        return ("\(vg)/\(lv)", device)
    }

    func write(_ device: String, _ value: UInt8, at offset: Int, length: Int = 65536) async throws {
        try await SubprocessRunner().run([
            "qemu-io", "-f", "raw", "-c", "write -P \(value) \(offset) \(length)", device,
        ])
    }

    func snapshots(_ cli: CLI, _ disk: String) async throws -> [String] {
        try await cli.list(disk).snapshots.map(\.name)
    }

    /// Bytes the image holds itself (not through its backing file).
    func ownBytes(_ image: String) async throws -> UInt64 {
        let out = try await SubprocessRunner().run(["qemu-img", "map", "--output=json", image]).standardOutput
        let rows = try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [[String: Any]] ?? []
        return rows.filter { ($0["depth"] as? Int) == 0 && ($0["data"] as? Bool) == true }
            .reduce(0) { $0 + UInt64(($1["length"] as? Int) ?? 0) }
    }

    /// Runs `body` over a new domain and removes its volume (and the snapshots left) after.
    func withDomain(_ body: (CLI, String, String) async throws -> Void) async throws {
        let cli = try CLI()
        let (disk, device) = try await domain(cli)
        do { try await body(cli, disk, device) } catch {
            _ = try? await SubprocessRunner().execute([
                "lvremove", "-q", "-y", "-S", "origin=\(disk.split(separator: "/")[1])",
            ])
            _ = try? await SubprocessRunner().execute(["lvremove", "-q", "-y", disk])
            throw error
        }
        _ = try? await SubprocessRunner().execute([
            "lvremove", "-q", "-y", "-S", "origin=\(disk.split(separator: "/")[1])",
        ])
        _ = try? await SubprocessRunner().execute(["lvremove", "-q", "-y", disk])
    }

    @Test func thinCheckpointsPushAndPullIncrementals() async throws {
        try await withDomain { cli, disk, device in try await pushAndPull(cli, disk, device) }
    }

    func pushAndPull(_ cli: CLI, _ disk: String, _ device: String) async throws {
        let dir = cli.root + "/b"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        // A full backup and checkpoint c1: a thin snapshot of the volume.
        try await cli.ok("backup", "begin", "g", "--target", dir, "--checkpoint", "c1")
        #expect(try await snapshots(cli, disk).contains("vmsnap-checkpoint-c1"))

        // Two chunks change (the pool's chunks are 64 KiB): exactly that is counted.
        try await write(device, 2, at: 4 << 20)
        try await write(device, 2, at: 20 << 20)
        let info = try await cli.ok("checkpoint", "info", "g", "c1", "--json")
        let states =
            (try JSONSerialization.jsonObject(with: Data(info.utf8)) as? [String: Any])?["disks"] as? [[String: Any]]
        #expect(
            states?.first?["changedBytes"] as? Int == 131072 && states?.first?["usable"] as? Bool == true, "\(info)")

        try await cli.ok("backup", "begin", "g", "--target", dir, "--incremental", "c1", "--checkpoint", "c2")
        let manifest =
            try JSONSerialization.jsonObject(
                with: try Data(contentsOf: URL(fileURLWithPath: dir + "/vmsnap-backups.json")))
            as? [String: Any]
        let backups = manifest?["backups"] as? [[String: Any]] ?? []
        let newest = try #require((backups.last?["files"] as? [String: String])?["vda"])
        let own = try await ownBytes(dir + "/" + newest)
        #expect(own >= 131072 && own <= 262144, "the incremental holds the two changed chunks, not the disk: \(own)")
        let out = cli.root + "/restored"
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        try await cli.ok("backup", "restore", dir, "--to", out)
        let same = try await SubprocessRunner().execute([
            "qemu-img", "compare", "-f", "raw", "-F", "qcow2", device, out + "/g-vda.qcow2",
        ])
        #expect(same.status == 0, "the chain restores the volume byte for byte: \(same.standardOutput)")

        // Pull: the export's dirty-bitmap context names the chunk written since c2.
        try await write(device, 3, at: 8 << 20)
        let pull = try await cli.ok("backup", "begin", "g", "--incremental", "c2")
        let uri = try #require(pull.split(separator: " ").map(String.init).first { $0.hasPrefix("nbd+unix") })
        let map = try await SubprocessRunner().run(["nbdinfo", "--map=qemu:dirty-bitmap:c2", uri]).standardOutput
        try await cli.ok("backup", "end", "g")
        let dirty = map.split(separator: "\n").filter { $0.contains("dirty") }.map {
            $0.split(separator: " ", omittingEmptySubsequences: true).prefix(2).compactMap { UInt64($0) }
        }
        #expect(dirty.map { $0.first ?? 0 } == [8 << 20] && dirty.first?.last == 65536, "\(map)")

        // Deleting a checkpoint removes its thin snapshot; the other one still counts.
        try await cli.ok("checkpoint", "delete", "g", "c1")
        #expect(try await !snapshots(cli, disk).contains("vmsnap-checkpoint-c1"))
        #expect(try await snapshots(cli, disk).contains("vmsnap-checkpoint-c2"))
        try await cli.ok("checkpoint", "delete", "g", "c2")
        #expect(try await snapshots(cli, disk).isEmpty)
    }

    @Test(
        "killed while a checkpoint's thin snapshot is taken, or after: recovery removes it and the checkpoint",
        arguments: ["checkpoint-create:bitmaps-added", "checkpoint-create:snapshots-taken"])
    func killedCheckpointCreate(phase: String) async throws {
        try await withDomain { cli, disk, _ in try await killed(cli, disk, phase) }
    }

    func killed(_ cli: CLI, _ disk: String, _ phase: String) async throws {
        let r = try await cli.run(["checkpoint", "create", "g", "k"], environment: ["VMSNAP_DOMAIN_FAULT": phase])
        #expect(r.status != 0 && r.err.contains("fault injection"), "\(phase): \(r.err)")
        let rec = try await cli.ok("recover")
        #expect(rec.contains("recovered domain"), "\(phase): \(rec)")
        let listed = try await cli.ok("checkpoint", "list", "g", "--json")
        #expect(!listed.contains("\"k\""), "\(phase): the checkpoint was taken back: \(listed)")
        #expect(try await snapshots(cli, disk).isEmpty, "\(phase): the thin snapshot went with the checkpoint")
    }
}
