import Foundation
import SnapshotCore
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Checkpoints and backups of shut-off domains (a qemu-storage-daemon holds the disks): what
/// makes a checkpoint untrustworthy, disks that cannot track changes, the XML, and a kill at each
/// journaled step.
@Suite("Checkpoints and backups of a shut-off domain", .serialized)
struct BackupOfflineTests {
    /// A shut-off domain over new disks, `vda` filled with 1s.
    static func domain(_ cli: CLI, disks: [(String, String)] = [("vda", "qcow2"), ("vdb", "qcow2")]) async throws
        -> [String: String]
    {
        var paths: [String: String] = [:]
        var specs: [[String: String]] = []
        for (target, backend) in disks {
            let path = cli.pool + "/\(target).\(backend == "vhd" ? "vhd" : "qcow2")"
            if backend == "vhd" {
                try await cli.sh("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", path, "8M")
            } else {
                try await cli.sh("qemu-img", "create", "-q", "-f", "qcow2", path, "8M")
            }
            paths[target] = path
            specs.append(["target": target, "backend": backend, "locator": path])
        }
        try await write(paths["vda"]!, 1, at: 0, length: 8 << 20, format: disks[0].1 == "vhd" ? "vpc" : "qcow2")
        let file = cli.root + "/g.json"
        try JSONSerialization.data(withJSONObject: ["name": "g", "memoryMiB": 128, "vcpus": 1, "disks": specs])
            .write(to: URL(fileURLWithPath: file))
        try await cli.ok("domain", "define", file)
        return paths
    }

    static func write(_ image: String, _ value: UInt8, at offset: Int, length: Int = 65536, format: String = "qcow2")
        async throws
    {
        try await SubprocessRunner().run([
            "qemu-io", "-f", format, "-c", "write -P \(value) \(offset) \(length)", image,
        ])
    }

    static func bitmaps(_ image: String) async throws -> [String] {
        let out = try await SubprocessRunner().run(["qemu-img", "info", "-U", "--output=json", image]).standardOutput
        let top = try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any]
        let data = (top?["format-specific"] as? [String: Any])?["data"] as? [String: Any]
        return ((data?["bitmaps"] as? [[String: Any]]) ?? []).compactMap { $0["name"] as? String }.sorted()
    }

    @Test("a revert, a removed bitmap: the incremental is refused with the reason; --fallback-full takes a full one")
    func untrustworthyCheckpoints() async throws {
        let cli = try CLI()
        let disks = try await Self.domain(cli)
        let dir = cli.root + "/b"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try await cli.ok("backup", "begin", "g", "--target", dir, "--checkpoint", "c1")
        #expect(try await Self.bitmaps(disks["vda"]!) == ["c1"])

        // Removed outside vmsnap.
        try await cli.sh("qemu-img", "bitmap", "--remove", disks["vdb"]!, "c1")
        let r = try await cli.run(["backup", "begin", "g", "--target", dir, "--incremental", "c1"])
        #expect(r.status == 1 && r.err.contains("bitmap c1 is missing from disk vdb"), "\(r.err)")
        let before = try FileManager.default.contentsOfDirectory(atPath: dir).sorted()
        #expect(before.count == 3, "nothing written by the refusal: \(before)")
        let fb = try await cli.ok(
            "backup", "begin", "g", "--target", dir, "--incremental", "c1", "--fallback-full", "--checkpoint", "c2")
        #expect(fb.contains("(full)") && fb.contains("full, not incremental: bitmap c1 is missing"), "\(fb)")

        // A revert after the checkpoint: its bitmap no longer says what changed since.
        try await cli.ok("snapshot", "create", "g", "--name", "s1")
        try await cli.ok("backup", "begin", "g", "--target", dir, "--incremental", "c2", "--checkpoint", "c3")
        try await Self.write(disks["vda"]!, 7, at: 1 << 20)
        try await cli.ok("snapshot", "revert", "g", "s1")
        let rv = try await cli.run(["backup", "begin", "g", "--target", dir, "--incremental", "c3"])
        #expect(rv.status == 1 && rv.err.contains("disk vda was reverted after the checkpoint"), "\(rv.err)")
        let info = try await cli.ok("checkpoint", "info", "g", "c3", "--json")
        #expect(info.contains("\"usable\" : false"), "\(info)")

        // A chain that is sound restores to what the disks read then.
        try await cli.ok("checkpoint", "delete", "g", "c3")
        let verify = try await cli.ok("backup", "verify", dir)
        #expect(verify.contains("is sound"))
    }

    @Test("a disk whose backend tracks no changes is left out of checkpoints, refused by name, and backed up in full")
    func vhdDiskFullOnly() async throws {
        let cli = try CLI()
        let disks = try await Self.domain(cli, disks: [("vda", "qcow2"), ("vdb", "vhd")])
        try await Self.write(disks["vdb"]!, 5, at: 3 << 20, format: "vpc")
        let refused = try await cli.run(["checkpoint", "create", "g", "c0", "--disks", "vdb"])
        #expect(
            refused.status == 1 && refused.err.contains("disk vdb") && refused.err.contains("'vhd'"), "\(refused.err)")
        let made = try await cli.run(["checkpoint", "create", "g", "c1"])
        #expect(made.status == 0 && made.err.contains("leaves out disk vdb"), "\(made.err)")
        let r = try await cli.run(["backup", "begin", "g", "--target", cli.root, "--incremental", "c1"])
        #expect(r.status == 1 && r.err.contains("disk vdb is not in checkpoint c1"), "\(r.err)")

        let dir = cli.root + "/b"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try await cli.ok("backup", "begin", "g", "--target", dir)
        let out = cli.root + "/restored"
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        try await cli.ok("backup", "restore", dir, "--to", out)
        let same = try await SubprocessRunner().execute([
            "qemu-img", "compare", "-f", "vpc", "-F", "qcow2", disks["vdb"]!, out + "/g-vdb.qcow2",
        ])
        #expect(same.status == 0, "the VHD disk restores byte for byte: \(same.standardOutput)")
    }

    @Test("checkpoint XML out and in, delete with children, and the domain's other operations wait for a backup")
    func checkpointXMLAndDelete() async throws {
        let cli = try CLI()
        let disks = try await Self.domain(cli)
        for c in ["c1", "c2", "c3"] { try await cli.ok("checkpoint", "create", "g", c) }
        let xml = try await cli.ok("checkpoint", "dumpxml", "g", "c2")
        #expect(xml.contains("<name>c2</name>") && xml.contains("<parent>\n    <name>c1</name>"), "\(xml)")
        #expect(xml.contains("<disk name='vda' checkpoint='bitmap' bitmap='c2'/>"), "\(xml)")

        // Forget c2's record only, then bring it back from its XML.
        try await cli.ok("checkpoint", "delete", "g", "c2", "--metadata")
        #expect(try await Self.bitmaps(disks["vda"]!) == ["c1", "c2", "c3"])
        let list = try await cli.ok("checkpoint", "list", "g", "--json")
        #expect(list.contains("\"parent\" : \"c1\"") && !list.contains("\"name\" : \"c2\""), "c3 now follows c1")
        let file = cli.root + "/c2.xml"
        try xml.write(toFile: file, atomically: true, encoding: .utf8)
        try await cli.ok("checkpoint", "redefine", "g", file)
        let again = try await cli.ok("checkpoint", "dumpxml", "g", "c2")
        #expect(again == xml, "the XML reads back as written")
        try await cli.sh("qemu-img", "bitmap", "--remove", disks["vda"]!, "c1")
        try await cli.ok("checkpoint", "delete", "g", "c1", "--metadata")
        try xml.replacingOccurrences(of: "c2", with: "c1").replacingOccurrences(
            of: "  <parent>\n    <name>c1</name>\n  </parent>\n", with: ""
        )
        .write(toFile: file, atomically: true, encoding: .utf8)
        let noBitmap = try await cli.run(["checkpoint", "redefine", "g", file])
        #expect(noBitmap.status != 0 && noBitmap.err.contains("has no bitmap c1"), "\(noBitmap.err)")

        // c2 and c3 now both follow nothing (their parent c1 was forgotten): delete each. Then a
        // chain d1 <- d2 <- d3, and delete with children: d2 and everything after it, bitmaps too.
        try await cli.ok("checkpoint", "delete", "g", "c2")
        try await cli.ok("checkpoint", "delete", "g", "c3")
        for c in ["d1", "d2", "d3"] { try await cli.ok("checkpoint", "create", "g", c) }
        try await cli.ok("checkpoint", "delete", "g", "d2", "--children")
        #expect(try await Self.bitmaps(disks["vda"]!) == ["d1"])
        try await cli.ok("checkpoint", "delete", "g", "d1")
        #expect(try await Self.bitmaps(disks["vda"]!).isEmpty)
        #expect(
            try await cli.ok("checkpoint", "list", "g", "--json").trimmingCharacters(in: .whitespacesAndNewlines)
                == "[\n\n]")

        // A pull backup holds the disks: the domain does not start, snapshots wait.
        try await cli.ok("backup", "begin", "g")
        let start = try await cli.run(["domain", "start", "g"])
        #expect(start.status != 0 && start.err.contains("backup end"), "\(start.err)")
        let snap = try await cli.run(["snapshot", "create", "g"])
        #expect(snap.status != 0 && snap.err.contains("backup end"), "\(snap.err)")
        try await cli.ok("backup", "end", "g")
        try await cli.ok("snapshot", "create", "g", "--name", "after")
    }

    @Test(
        "killed at each step of checkpoint create and delete, backup begin and end: recovery leaves no bitmap, scratch, export or daemon, and the data as it was",
        arguments: [
            ("checkpoint-create:bitmaps-added", ["checkpoint", "create", "g", "k"]),
            ("checkpoint-delete:bitmaps-removed", ["checkpoint", "delete", "g", "c1"]),
            ("backup-begin:files-created", ["backup", "begin", "g", "--incremental", "c1", "--checkpoint", "k"]),
            ("backup-begin:started", ["backup", "begin", "g", "--incremental", "c1", "--checkpoint", "k"]),
            ("backup-begin:recorded", ["backup", "begin", "g", "--incremental", "c1", "--checkpoint", "k"]),
            (
                "backup-begin:started",
                ["backup", "begin", "g", "--target", "DIR", "--incremental", "c1", "--checkpoint", "k"]
            ),
            (
                "backup-begin:copied",
                ["backup", "begin", "g", "--target", "DIR", "--incremental", "c1", "--checkpoint", "k"]
            ),
            ("backup-end:torn-down", ["backup", "end", "g"]),
        ])
    func killedAndRecovered(phase: String, command: [String]) async throws {
        let cli = try CLI()
        let disks = try await Self.domain(cli)
        let dir = cli.root + "/b"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try await cli.ok("backup", "begin", "g", "--target", dir, "--checkpoint", "c1")
        try await Self.write(disks["vda"]!, 9, at: 2 << 20)
        if phase.hasPrefix("backup-end") { try await cli.ok("backup", "begin", "g", "--incremental", "c1") }
        let copy = cli.root + "/vda-before.qcow2"
        try await cli.sh("qemu-img", "convert", "-U", "-O", "qcow2", disks["vda"]!, copy)
        let backupsBefore = try FileManager.default.contentsOfDirectory(atPath: dir).sorted()
        let manifestBefore = FileManager.default.contents(atPath: dir + "/vmsnap-backups.json")

        let argv = command.map { $0 == "DIR" ? dir : $0 }
        let r = try await cli.run(argv, environment: ["VMSNAP_DOMAIN_FAULT": phase])
        #expect(r.status != 0 && r.err.contains("fault injection"), "\(phase): \(r.err)")
        let rec = try await cli.ok("recover")
        #expect(rec.contains("recovered domain"), "\(phase): \(rec)")

        // No daemon, export, scratch image or half-made backup left; the data as it was.
        #expect(!FileManager.default.fileExists(atPath: cli.store + "/run/g/storage.pid"), "\(phase): daemon gone")
        #expect(!FileManager.default.fileExists(atPath: cli.store + "/run/g/nbd.sock"), "\(phase): export gone")
        let scratch = (try? FileManager.default.contentsOfDirectory(atPath: cli.store + "/backup/g")) ?? []
        #expect(scratch.isEmpty, "\(phase): scratch images gone: \(scratch)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).sorted() == backupsBefore, "\(phase)")
        #expect(FileManager.default.contents(atPath: dir + "/vmsnap-backups.json") == manifestBefore, "\(phase)")
        let same = try await SubprocessRunner().execute(["qemu-img", "compare", "-U", disks["vda"]!, copy])
        #expect(same.status == 0, "\(phase): disk data unchanged")
        let status = try await cli.ok("backup", "status", "g")
        #expect(status.contains("has no backup job"), "\(phase): \(status)")

        // Checkpoints and bitmaps agree: an interrupted create or begin took its checkpoint back,
        // an interrupted delete finished.
        let names = try await cli.ok("checkpoint", "list", "g", "--json")
        let bitmaps = try await Self.bitmaps(disks["vda"]!)
        if phase.hasPrefix("checkpoint-delete") {
            #expect(!names.contains("\"c1\"") && bitmaps.isEmpty, "\(phase): \(names) \(bitmaps)")
        } else {
            #expect(
                !names.contains("\"k\"") && names.contains("\"c1\"") && bitmaps == ["c1"],
                "\(phase): \(names) \(bitmaps)")
            // And c1 still serves an incremental.
            let inc = try await cli.run(["backup", "begin", "g", "--target", dir, "--incremental", "c1"])
            #expect(inc.status == 0, "\(phase): \(inc.err)")
        }
        try await cli.sh("qemu-img", "check", "-q", disks["vda"]!)
    }
}
