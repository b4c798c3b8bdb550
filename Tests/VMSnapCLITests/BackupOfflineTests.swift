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

    @Test("across an external snapshot and its delete, checkpoints keep tracking: each incremental equals the disk")
    func externalSnapshotKeepsTracking() async throws {
        let cli = try CLI()
        let disks = try await Self.domain(cli)
        let dir = cli.root + "/b"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try await cli.ok("backup", "begin", "g", "--target", dir, "--checkpoint", "c1")
        try await Self.write(disks["vda"]!, 2, at: 1 << 20)
        try await cli.ok("snapshot", "create", "g", "--name", "s1", "--kind", "external")
        let overlay = try await cli.list(disks["vda"]!).active
        #expect(overlay != disks["vda"]!)
        #expect(try await Self.bitmaps(overlay) == ["c1"], "the overlay tracks under c1")
        try await Self.write(overlay, 3, at: 3 << 20)
        let info = try await cli.ok("checkpoint", "info", "g", "c1")
        #expect(info.contains("Disk vda: bitmap c1, usable"), "\(info)")

        // The incremental holds the writes before and after the snapshot, and reads as the disk.
        let inc = try await cli.ok("backup", "begin", "g", "--target", dir, "--incremental", "c1", "--checkpoint", "c2")
        let top = try #require(
            inc.split(separator: "\n").first { $0.contains("vda:") }.map { String($0.split(separator: " ").last!) })
        let same = try await SubprocessRunner().execute(["qemu-img", "compare", overlay, top])
        #expect(same.status == 0, "incremental across the snapshot equals the disk: \(same.standardOutput)")

        // Delete s1 (its overlay is committed into the base): the bitmaps stay whole.
        try await cli.ok("snapshot", "delete", "g", "s1")
        let active = try await cli.list(disks["vda"]!).active
        try await Self.write(active, 4, at: 5 << 20)
        let inc2 = try await cli.ok("backup", "begin", "g", "--target", dir, "--incremental", "c2")
        let top2 = try #require(
            inc2.split(separator: "\n").first { $0.contains("vda:") }.map { String($0.split(separator: " ").last!) })
        let same2 = try await SubprocessRunner().execute(["qemu-img", "compare", active, top2])
        #expect(same2.status == 0, "incremental after the delete equals the disk: \(same2.standardOutput)")
        let verify = try await cli.ok("backup", "verify", dir)
        #expect(verify.contains("is sound"))
        // A checkpoint taken with an external snapshot begins in the new overlay.
        try await cli.ok("snapshot", "create", "g", "--name", "s2", "--kind", "external", "--checkpoint", "k2")
        let overlay2 = try await cli.list(disks["vda"]!).active
        #expect(try await Self.bitmaps(overlay2).contains("k2"))
        let k2 = try await cli.ok("checkpoint", "info", "g", "k2")
        #expect(k2.contains("Disk vda: bitmap k2, usable"), "\(k2)")
        // c1 began in the layer the delete merged away: refused, not guessed.
        let old = try await cli.run(["backup", "begin", "g", "--target", dir, "--incremental", "c1"])
        #expect(old.status == 1 && old.err.contains("is no longer under"), "\(old.err)")
    }

    @Test("TCP exports listen on 127.0.0.1 unless told, speak TLS with certificates, and refuse a key others can read")
    func tcpAndTLSExports() async throws {
        let cli = try CLI()
        _ = try await Self.domain(cli, disks: [("vda", "qcow2")])
        let tls = cli.root + "/tls"
        try FileManager.default.createDirectory(atPath: tls, withIntermediateDirectories: true)
        try await Self.makeCertificates(tls)
        let port = try Self.freePort()
        try await cli.ok("blocksnapshot", "create", "g", "v")
        let refused = try await cli.run(["export", "start", "g", "v", "--tls-dir", tls])
        #expect(refused.status != 0 && refused.err.contains("--tls-dir needs --tcp"), "\(refused.err)")
        chmod(tls + "/server-key.pem", 0o644)
        let open = try await cli.run(["export", "start", "g", "v", "--tcp", "\(port)", "--tls-dir", tls])
        #expect(open.status != 0 && open.err.contains("can be read by others"), "\(open.err)")
        chmod(tls + "/server-key.pem", 0o600)

        let out = try await cli.ok("export", "start", "g", "v", "--tcp", "\(port)", "--tls-dir", tls)
        #expect(out.contains("vda: nbds://127.0.0.1:\(port)/v-vda"), "\(out)")
        #expect(Self.listens(on: port) == "127.0.0.1", "bound to localhost only")
        let size = try await SubprocessRunner().run([
            "nbdinfo", "--size", "nbds://127.0.0.1:\(port)/v-vda?tls-certificates=\(tls)",
        ])
        #expect(size.standardOutput.trimmingCharacters(in: .whitespacesAndNewlines) == "\(8 << 20)")
        let plain = try await SubprocessRunner().execute(["nbdinfo", "--size", "nbd://127.0.0.1:\(port)/v-vda"])
        #expect(plain.status != 0 && plain.standardError.contains("TLS"), "\(plain.standardError)")
        try await cli.ok("export", "stop", "g", "v")
        #expect(Self.listens(on: port) == nil, "the server is gone with its last export")
        try await cli.ok("blocksnapshot", "delete", "g", "v")
    }

    /// A CA and a server certificate for 127.0.0.1, made with openssl.
    static func makeCertificates(_ dir: String) async throws {
        let r = SubprocessRunner()
        try await r.run([
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", dir + "/ca-key.pem", "-out",
            dir + "/ca-cert.pem", "-subj", "/CN=vmsnap-test-ca", "-days", "2",
        ])
        try await r.run([
            "openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", dir + "/server-key.pem", "-out",
            dir + "/server.csr", "-subj", "/CN=127.0.0.1",
        ])
        try "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
            .write(toFile: dir + "/ext.cnf", atomically: true, encoding: .utf8)
        try await r.run([
            "openssl", "x509", "-req", "-in", dir + "/server.csr", "-CA", dir + "/ca-cert.pem", "-CAkey",
            dir + "/ca-key.pem", "-CAcreateserial", "-out", dir + "/server-cert.pem", "-days", "2", "-extfile",
            dir + "/ext.cnf",
        ])
        chmod(dir + "/server-key.pem", 0o600)
    }

    /// A TCP port nothing listens on now.
    static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) }
        }
        _ = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        return Int(UInt16(bigEndian: addr.sin_port))
    }

    /// The IPv4 address a listening socket on `port` is bound to (from /proc/net/tcp), if any.
    static func listens(on port: Int) -> String? {
        guard let text = try? String(contentsOfFile: "/proc/net/tcp", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n").dropFirst() {
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.count > 3, f[3] == "0A" else { continue }  // LISTEN
            let local = f[1].split(separator: ":")
            guard local.count == 2, Int(local[1], radix: 16) == port, let ip = UInt32(local[0], radix: 16) else {
                continue
            }
            return "\(ip & 0xff).\((ip >> 8) & 0xff).\((ip >> 16) & 0xff).\(ip >> 24)"
        }
        return nil
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
        // A full backup of both disks with a new checkpoint: the checkpoint covers vda only.
        let full = try await cli.run(["backup", "begin", "g", "--target", dir, "--checkpoint", "k"])
        #expect(full.status == 0 && full.err.contains("leaves out disk vdb"), "\(full.err)")
        let mixed = try await cli.run(["backup", "begin", "g", "--target", dir, "--incremental", "k"])
        #expect(
            mixed.status == 1 && mixed.err.contains("back it up in full on its own with --disks vdb"), "\(mixed.err)")
        try await Self.write(disks["vda"]!, 6, at: 2 << 20)
        try await cli.ok("backup", "begin", "g", "--target", dir, "--incremental", "k", "--disks", "vda")
        let out = cli.root + "/restored"
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        // The newest backup holds vda only; the one before holds vdb.
        let manifest =
            try JSONSerialization.jsonObject(
                with: try Data(contentsOf: URL(fileURLWithPath: dir + "/vmsnap-backups.json"))) as? [String: Any]
        let names = ((manifest?["backups"] as? [[String: Any]]) ?? []).compactMap { $0["name"] as? String }
        try await cli.ok("backup", "restore", dir, "--to", out, "--disks", "vda")
        try await cli.ok("backup", "restore", dir, "--to", out, "--disks", "vdb", "--backup", names[0])
        let vda = try await SubprocessRunner().execute(["qemu-img", "compare", disks["vda"]!, out + "/g-vda.qcow2"])
        #expect(vda.status == 0, "the incremental chain of vda restores byte for byte: \(vda.standardOutput)")
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
            (
                "blocksnapshot-create:started",
                ["blocksnapshot", "create", "g", "v", "--changes-since", "c1", "--checkpoint", "k"]
            ),
            ("blocksnapshot-delete:deleted", ["blocksnapshot", "delete", "g", "v0"]),
            ("create:commit", ["snapshot", "create", "g", "--name", "sk", "--checkpoint", "k"]),
        ])
    func killedAndRecovered(phase: String, command: [String]) async throws {
        let cli = try CLI()
        let disks = try await Self.domain(cli)
        let dir = cli.root + "/b"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try await cli.ok("backup", "begin", "g", "--target", dir, "--checkpoint", "c1")
        try await Self.write(disks["vda"]!, 9, at: 2 << 20)
        if phase.hasPrefix("backup-end") { try await cli.ok("backup", "begin", "g", "--incremental", "c1") }
        if phase.hasPrefix("blocksnapshot-delete") {
            try await cli.ok("blocksnapshot", "create", "g", "v0")
            try await cli.ok("export", "start", "g", "v0")
        }
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
        let scratch =
            ((try? FileManager.default.contentsOfDirectory(atPath: cli.store + "/backup/g")) ?? [])
            + ((try? FileManager.default.contentsOfDirectory(atPath: cli.store + "/blocksnapshots/g")) ?? [])
        #expect(try await cli.ok("blocksnapshot", "list", "g").isEmpty, "\(phase): no block snapshot left")
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
