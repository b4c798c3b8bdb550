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
            #"{"name": "g", "memoryMiB": 32, "accel": "tcg", "disks": [{"target": "vda", "backend": "lvm", "locator": "\#(vg)/\#(lv)"}]}"#
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
        let own = try await BackupChainProbe.newestOwnBytes(dir)
        #expect(own >= 131072 && own <= 262144, "the incremental holds the two changed chunks, not the disk: \(own)")
        let out = cli.root + "/restored"
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        try await cli.ok("backup", "restore", dir, "--to", out)
        let same = try await BackupChainProbe.compareRaw(device, with: out + "/g-vda.qcow2")
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

    /// A running domain (QEMU with no guest OS; writes through its own block layer): the
    /// incremental from a checkpoint of the shut-off volume holds the chunk QEMU wrote and had not
    /// flushed (the job's bridge flushes before the pool counts), the new checkpoint is a thin
    /// snapshot of the open volume, and the chain restores the volume.
    @Test func runningDomainIncrementalFromThePool() async throws {
        try await withDomain { cli, disk, device in
            let dir = cli.root + "/b"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            try await cli.ok("backup", "begin", "g", "--target", dir, "--checkpoint", "c1")
            try await cli.ok("domain", "start", "g")
            do {
                try await BlockLayerProbe.hmp(cli, "g", "qemu-io drive-vda \"write -P 5 12M 64k\"")
                try await cli.ok("backup", "begin", "g", "--target", dir, "--incremental", "c1", "--checkpoint", "c2")
            } catch {
                _ = try? await cli.run(["domain", "stop", "g", "--force"])
                throw error
            }
            try await cli.ok("domain", "stop", "g", "--force")
            #expect(try await snapshots(cli, disk).contains("vmsnap-checkpoint-c2"))
            let own = try await BackupChainProbe.newestOwnBytes(dir)
            #expect(own == 65536, "the incremental holds the one chunk QEMU wrote: \(own)")
            let out = cli.root + "/restored"
            try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
            try await cli.ok("backup", "restore", dir, "--to", out)
            let same = try await BackupChainProbe.compareRaw(device, with: out + "/g-vda.qcow2")
            #expect(same.status == 0, "the chain restores the volume byte for byte: \(same.standardOutput)")
            try await cli.ok("checkpoint", "delete", "g", "c1")
            try await cli.ok("checkpoint", "delete", "g", "c2")
            #expect(try await snapshots(cli, disk).isEmpty)
        }
    }

    /// A classic volume cannot count its changes: a checkpoint that names no disks leaves it out,
    /// saying why (shut off and running), and removes the snapshot it tried; one that names it
    /// is refused.
    @Test func classicVolumeLeftOutOfCheckpoints() async throws {
        let cli = try CLI()
        let lv = "vmsnap-tc-\(UUID().uuidString.prefix(6).lowercased())"
        try await cli.sh("lvcreate", "-q", "-L", "16m", "-n", lv, vg)
        let disk = "\(vg)/\(lv)"
        do {
            try await cli.sh("qemu-img", "create", "-q", "-f", "qcow2", cli.root + "/vdb.qcow2", "16M")
            let file = cli.root + "/g.json"
            try
                #"{"name": "g", "memoryMiB": 32, "accel": "tcg", "disks": [{"target": "vda", "backend": "lvm", "locator": "\#(disk)"}, {"target": "vdb", "backend": "qcow2", "locator": "\#(cli.root)/vdb.qcow2"}]}"#
                .write(toFile: file, atomically: true, encoding: .utf8)
            try await cli.ok("domain", "define", file)
            let named = try await cli.run(["checkpoint", "create", "g", "c0", "--disks", "vda"])
            #expect(named.status != 0 && named.err.contains("cannot be in a checkpoint"), "\(named.err)")
            for (name, running) in [("c1", false), ("c2", true)] {
                if running { try await cli.ok("domain", "start", "g") }
                let made = try await cli.run(["checkpoint", "create", "g", name])
                if running { _ = try? await cli.run(["domain", "stop", "g", "--force"]) }
                #expect(made.status == 0 && made.err.contains("leaves disk vda out"), "\(name): \(made.err)")
                let info = try await cli.ok("checkpoint", "info", "g", name, "--json")
                let disks =
                    ((try JSONSerialization.jsonObject(with: Data(info.utf8)) as? [String: Any])?["disks"]
                    as? [[String: Any]])?.compactMap { $0["target"] as? String }
                #expect(disks == ["vdb"], "\(name): \(info)")
                #expect(try await snapshots(cli, disk).isEmpty, "\(name): the classic snapshot it tried is gone")
            }
        } catch {
            _ = try? await SubprocessRunner().execute(["lvremove", "-q", "-y", "-S", "origin=\(lv)"])
            _ = try? await SubprocessRunner().execute(["lvremove", "-q", "-y", disk])
            throw error
        }
        _ = try? await SubprocessRunner().execute(["lvremove", "-q", "-y", "-S", "origin=\(lv)"])
        _ = try? await SubprocessRunner().execute(["lvremove", "-q", "-y", disk])
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
