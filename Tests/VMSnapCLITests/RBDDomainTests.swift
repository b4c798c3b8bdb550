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

    @Test func rbdAndQcow2DisksTogether() async throws {
        let wasRunning = try await SubprocessRunner().execute([cluster, "status"]).status == 0
        let started = try await SubprocessRunner().run([cluster, "start"]).standardOutput
        var env: [String: String] = ["VMSNAP_BACKEND_PATH": rbdPluginDirectory]
        for line in started.split(whereSeparator: \.isNewline) where line.hasPrefix("export ") {
            let pair = line.dropFirst(7).split(separator: "=", maxSplits: 1).map(String.init)
            if pair.count == 2 { env[pair[0]] = pair[1] }
        }
        let conf = try #require(env["CEPH_CONF"])
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
}
