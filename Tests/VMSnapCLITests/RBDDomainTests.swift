import Foundation
import QEMUDriver
import SnapshotCore
import Testing

/// The rbd plug-in's folder, for `VMSNAP_BACKEND_PATH`.
let rbdPluginDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().appendingPathComponent("backends/rbd").path

/// A running domain with an RBD disk (QEMU's rbd driver, through the rbd plug-in) beside a qcow2
/// disk, on a one-node Ceph cluster (scripts/ceph-cluster, started here and stopped after if this
/// test started it): a live full-system snapshot (the RBD snapshot taken by the storage while the
/// vCPUs are paused), revert (rollback once QEMU is stopped, memory restored), delete.
@Suite("RBD disk in a running domain", .serialized, .enabled(if: getuid() == 0 && hasQemuIO, "needs root and qemu-io"))
struct RBDDomainTests {
    let cluster = GuestImage.repository + "/scripts/ceph-cluster"

    /// Starts the one-node cluster (unless it runs): whether it ran before, vmsnap's environment
    /// for the rbd plug-in and the cluster, and the cluster's conf.
    func startCluster() async throws -> (Bool, [String: String], String) {
        let wasRunning = try await SubprocessRunner().execute([cluster, "status"]).status == 0
        let started = try await SubprocessRunner().run([cluster, "start"]).standardOutput
        var env: [String: String] = ["VMSNAP_BACKEND_PATH": rbdPluginDirectory]
        for line in started.split(whereSeparator: \.isNewline) where line.hasPrefix("export ") {
            let pair = line.dropFirst(7).split(separator: "=", maxSplits: 1).map(String.init)
            if pair.count == 2 { env[pair[0]] = pair[1] }
        }
        return (wasRunning, env, try #require(env["CEPH_CONF"]))
    }

    @Test func rbdAndQcow2DisksTogether() async throws {
        let (wasRunning, env, conf) = try await startCluster()
        let cli = try CLI()
        let image = "vmsnap/dom-\(UUID().uuidString.prefix(6).lowercased())"
        try await SubprocessRunner().run(["env", "CEPH_CONF=\(conf)", "rbd", "create", image, "--size", "16M"])
        let rbdPath = "rbd:\(image):id=admin:conf=\(conf)"
        let qcow = try await cli.disk("dom-vdb")
        try
            #"{"name": "rbddom", "memoryMiB": 32, "accel": "tcg", "disks": [{"target": "vda", "backend": "rbd", "locator": "\#(image)"}, {"target": "vdb", "backend": "qcow2", "locator": "\#(qcow)"}]}"#
            .write(toFile: cli.root + "/dom.json", atomically: true, encoding: .utf8)
        func ok(_ args: String...) async throws -> String {
            let r = try await cli.run(args, environment: env)
            guard r.status == 0 else {
                throw CLIFailure("vmsnap \(args.joined(separator: " ")) exited \(r.status): \(r.err)")
            }
            return r.out
        }
        do {
            _ = try await ok("domain", "define", cli.root + "/dom.json")
            _ = try await ok("domain", "start", "rbddom")
            for drive in ["drive-vda", "drive-vdb"] { try await BlockLayerProbe.write(cli, "rbddom", drive, 17) }
            _ = try await ok("snapshot", "create", "rbddom", "--name", "s1")
            let snaps = try await SubprocessRunner().run(["env", "CEPH_CONF=\(conf)", "rbd", "snap", "ls", image])
                .standardOutput
            #expect(snaps.contains("s1"), "an RBD snapshot of \(image): \(snaps)")
            for drive in ["drive-vda", "drive-vdb"] { try await BlockLayerProbe.write(cli, "rbddom", drive, 34) }
            _ = try await ok("snapshot", "revert", "rbddom", "s1")
            #expect(
                try await BlockLayerProbe.holds(rbdPath, format: "raw", 17),
                "the RBD image holds the snapshot's data again")
            #expect(
                try await BlockLayerProbe.holds(try await cli.list(qcow).active, format: "qcow2", 17),
                "so does the qcow2 disk")
            #expect(try await ok("domain", "status", "rbddom").contains("running"))
            _ = try await ok("snapshot", "delete", "rbddom", "s1")
            let after = try await SubprocessRunner().run(["env", "CEPH_CONF=\(conf)", "rbd", "snap", "ls", image])
                .standardOutput
            #expect(!after.contains("s1"), "the RBD snapshot is gone: \(after)")
        } catch {
            _ = try? await cli.run(["domain", "stop", "rbddom", "--force"], environment: env)
            if !wasRunning { _ = try? await SubprocessRunner().run([cluster, "stop"]) }
            throw error
        }
        _ = try? await cli.run(["domain", "stop", "rbddom", "--force"], environment: env)
        if !wasRunning { _ = try? await SubprocessRunner().run([cluster, "stop"]) }
    }

    /// An RBD disk's checkpoints are RBD snapshots, and an incremental holds what the storage's
    /// diff reports since one: shut off (the storage daemon opens the image through QEMU's rbd
    /// driver), pull and push, restored byte for byte; the XML out and in; then running (the
    /// job's bridge bitmap and flush, a kill with the bridge started, recovery); deleting a
    /// checkpoint removes its snapshot.
    @Test func storageTrackedCheckpoints() async throws {
        let (wasRunning, env, conf) = try await startCluster()
        do { try await checkpointsFromTheStoragesDiff(env, conf) } catch {
            if !wasRunning { _ = try? await SubprocessRunner().run([cluster, "stop"]) }
            throw error
        }
        if !wasRunning { _ = try? await SubprocessRunner().run([cluster, "stop"]) }
    }

    func checkpointsFromTheStoragesDiff(_ env: [String: String], _ conf: String) async throws {
        let cli = try CLI()
        let image = "vmsnap/bk-\(UUID().uuidString.prefix(6).lowercased())"
        let rbd = ["env", "CEPH_CONF=\(conf)", "rbd"]
        try await SubprocessRunner().run(rbd + ["create", image, "--size", "16M"])
        let rbdPath = "rbd:\(image):id=admin:conf=\(conf)"
        func write(_ value: UInt8, at offset: Int, length: Int = 65536) async throws {
            try await SubprocessRunner().run([
                "qemu-io", "-f", "raw", "-c", "write -P \(value) \(offset) \(length)", rbdPath,
            ])
        }
        func ok(_ args: String...) async throws -> String {
            let r = try await cli.run(args, environment: env)
            guard r.status == 0 else {
                throw CLIFailure("vmsnap \(args.joined(separator: " ")) exited \(r.status): \(r.err)")
            }
            return r.out
        }
        func snaps() async throws -> String {
            try await SubprocessRunner().run(rbd + ["snap", "ls", image]).standardOutput
        }
        try await write(1, at: 0, length: 16 << 20)
        try
            #"{"name": "g", "memoryMiB": 32, "accel": "tcg", "disks": [{"target": "vda", "backend": "rbd", "locator": "\#(image)"}]}"#
            .write(toFile: cli.root + "/g.json", atomically: true, encoding: .utf8)
        _ = try await ok("domain", "define", cli.root + "/g.json")
        let dir = cli.root + "/b"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        _ = try await ok("backup", "begin", "g", "--target", dir, "--checkpoint", "c1")
        #expect(try await snaps().contains("vmsnap-checkpoint-c1"))

        // One 64 KiB write: the object map counts its whole 4 MiB object.
        try await write(2, at: 4 << 20)
        let info = try await ok("checkpoint", "info", "g", "c1", "--json")
        let states =
            (try JSONSerialization.jsonObject(with: Data(info.utf8)) as? [String: Any])?["disks"] as? [[String: Any]]
        #expect(
            states?.first?["changedBytes"] as? Int == 4 << 20 && states?.first?["usable"] as? Bool == true, "\(info)")
        _ = try await ok("backup", "begin", "g", "--target", dir, "--incremental", "c1", "--checkpoint", "c2")
        let own = try await BackupChainProbe.newestOwnBytes(dir)
        #expect(own == 4 << 20, "the incremental holds the one changed object, not the 16 MiB disk: \(own)")
        let out = cli.root + "/restored"
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        _ = try await ok("backup", "restore", dir, "--to", out)
        let same = try await BackupChainProbe.compareRaw(rbdPath, with: out + "/g-vda.qcow2")
        #expect(same.status == 0, "the chain restores the image byte for byte: \(same.standardOutput)")

        // Pull: the export's dirty-bitmap context names the object written since c2.
        try await write(3, at: 12 << 20)
        let pull = try await ok("backup", "begin", "g", "--incremental", "c2")
        let uri = try #require(
            pull.split(whereSeparator: { $0 == " " || $0 == "\n" }).map(String.init).first { $0.hasPrefix("nbd+unix") })
        let dirtyMap = try await SubprocessRunner().run(["nbdinfo", "--map=qemu:dirty-bitmap:c2", uri]).standardOutput
        _ = try await ok("backup", "end", "g")
        let dirty = dirtyMap.split(separator: "\n").filter { $0.contains("dirty") }.map {
            $0.split(separator: " ", omittingEmptySubsequences: true).prefix(2).compactMap { UInt64($0) }
        }
        #expect(dirty == [[12 << 20, 4 << 20]], "\(dirtyMap)")

        // The checkpoint's XML is libvirt's, a bitmap disk's line; forgotten (metadata only) and
        // redefined from it, the checkpoint counts from the storage's snapshot again.
        let xml = try await ok("checkpoint", "dumpxml", "g", "c2")
        #expect(xml.contains("<disk name='vda' checkpoint='bitmap' bitmap='c2'/>"), "\(xml)")
        _ = try await ok("checkpoint", "delete", "g", "c2", "--metadata")
        #expect(try await snaps().contains("vmsnap-checkpoint-c2"), "--metadata leaves the storage's snapshot")
        let file = cli.root + "/c2.xml"
        try xml.write(toFile: file, atomically: true, encoding: .utf8)
        _ = try await ok("checkpoint", "redefine", "g", file)
        #expect(try await ok("checkpoint", "dumpxml", "g", "c2") == xml, "the XML reads back as written")
        let recounted = try await ok("checkpoint", "info", "g", "c2", "--json")
        let again =
            (try JSONSerialization.jsonObject(with: Data(recounted.utf8)) as? [String: Any])?["disks"]
            as? [[String: Any]]
        #expect(
            again?.first?["changedBytes"] as? Int == 4 << 20 && again?.first?["usable"] as? Bool == true,
            "the object written since c2: \(recounted)")
        try xml.replacingOccurrences(of: "c2", with: "c9").write(toFile: file, atomically: true, encoding: .utf8)
        let gone = try await cli.run(["checkpoint", "redefine", "g", file], environment: env)
        #expect(
            gone.status != 0
                && gone.err.contains(
                    "has no snapshot vmsnap-checkpoint-c9, which a checkpoint of its storage counts from"),
            "redefined only over its snapshot: \(gone.err)")

        // While the domain runs: an incremental from c2 holds what went through QEMU since c2
        // too. The write below is not flushed (it may sit in librbd's cache): the job starts its
        // bridge bitmap and has QEMU flush before the storage counts. The new checkpoint c3 is an
        // RBD snapshot of the image QEMU has open.
        _ = try await ok("domain", "start", "g")
        func blockNodes() async throws -> String {
            let client = try await QMPClient.connect(path: cli.store + "/run/g/qmp.sock")
            let nodes = "\(try await client.execute("query-named-block-nodes", [:]))"
            await client.close()
            return nodes
        }
        var nodes = "", beginErr = ""
        do {
            try await BlockLayerProbe.hmp(cli, "g", "qemu-io drive-vda \"write -P 9 8M 64k\"")
            // Killed once the bridge runs and the storage counted: recovery removes the bridge.
            let killed = try await cli.run(
                ["backup", "begin", "g", "--target", dir, "--incremental", "c2", "--checkpoint", "c3"],
                environment: env.merging(["VMSNAP_DOMAIN_FAULT": "backup-begin:files-created"]) { $1 })
            #expect(killed.status != 0 && killed.err.contains("fault injection"), "\(killed.err)")
            #expect(try await blockNodes().contains("vmsnap-bridge"), "the kill left the bridge in QEMU")
            let recovered = try await cli.run(["recover"], environment: env)
            #expect(recovered.status == 0 && recovered.out.contains("recovered domain"), "\(recovered.err)")
            #expect(try await !blockNodes().contains("vmsnap-bridge"), "recovery removed the bridge")
            #expect(try await !snaps().contains("vmsnap-checkpoint-c3"))
            let begun = try await cli.run(
                ["backup", "begin", "g", "--target", dir, "--incremental", "c2", "--checkpoint", "c3"], environment: env
            )
            #expect(begun.status == 0, "\(begun.err)")
            beginErr = begun.err
            nodes = try await blockNodes()
        } catch {
            _ = try? await cli.run(["domain", "stop", "g", "--force"], environment: env)
            throw error
        }
        _ = try await ok("domain", "stop", "g", "--force")
        #expect(nodes.contains("node-name") && !nodes.contains("vmsnap-bridge"), "no bridge left: \(beginErr) \(nodes)")
        #expect(try await snaps().contains("vmsnap-checkpoint-c3"))
        let liveOwn = try await BackupChainProbe.newestOwnBytes(dir)
        #expect(liveOwn == 8 << 20, "the objects written since c2 (at 8 and 12 MiB), no more: \(liveOwn)")
        let out2 = cli.root + "/restored-live"
        try FileManager.default.createDirectory(atPath: out2, withIntermediateDirectories: true)
        _ = try await ok("backup", "restore", dir, "--to", out2)
        let sameLive = try await BackupChainProbe.compareRaw(rbdPath, with: out2 + "/g-vda.qcow2")
        #expect(
            sameLive.status == 0, "the chain with the live incremental restores the image: \(sameLive.standardOutput)")

        // A snapshot already named as a new checkpoint's would be: refused, and left alone.
        _ = try await ok("disk", "snapshot", "create", image, "vmsnap-checkpoint-c5", "--backend", "rbd")
        let taken = try await cli.run(["checkpoint", "create", "g", "c5"], environment: env)
        #expect(taken.status != 0 && taken.err.contains("already has a snapshot named"), "\(taken.err)")
        #expect(try await snaps().contains("vmsnap-checkpoint-c5"))

        _ = try await ok("checkpoint", "delete", "g", "c1")
        let left = try await snaps()
        #expect(!left.contains("vmsnap-checkpoint-c1") && left.contains("vmsnap-checkpoint-c2"), "\(left)")
        _ = try await ok("checkpoint", "delete", "g", "c2")
        let last = try await snaps()
        #expect(!last.contains("vmsnap-checkpoint-c1") && !last.contains("vmsnap-checkpoint-c2"), "\(last)")
    }
}
