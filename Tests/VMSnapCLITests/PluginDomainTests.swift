import Foundation
import QEMUDriver
import SnapshotCore
import Testing

/// A domain with a raw plug-in disk (Python, out of process) beside a qcow2 disk, and an LVM
/// disk where a volume group is given (scripts/lvm-guest): live full-system snapshot (the raw
/// copy and the LV snapshot taken while the vCPUs are paused, the qcow2 disk in the QMP
/// transaction), revert with memory, delete while running. QEMU runs no guest OS and writes
/// through its own block layer (HMP `qemu-io`), as in the LVM domain test.
@Suite("Plug-in disk in a running domain", .serialized, .enabled(if: hasQemuIO, "needs qemu-io"))
struct PluginDomainTests {
    let vg = ProcessInfo.processInfo.environment["VMSNAP_LVM_VG"]
    let plugins = ["VMSNAP_BACKEND_PATH": rawPluginDirectory]

    func ok(_ cli: CLI, _ args: String...) async throws -> String {
        let r = try await cli.run(args, environment: plugins)
        guard r.status == 0 else {
            throw CLIFailure("vmsnap \(args.joined(separator: " ")) exited \(r.status): \(r.err)")
        }
        return r.out
    }

    @Test func rawQcow2AndLVMDisksTogether() async throws {
        let cli = try CLI()
        let raw = cli.pool + "/dom-vda.raw"
        try await cli.sh("truncate", "-s", "16M", raw)
        let qcow = try await cli.disk("dom-vdb")
        struct Disk { var target, backend, locator, path, format: String }
        var disks = [
            Disk(target: "vda", backend: "raw", locator: raw, path: raw, format: "raw"),
            Disk(target: "vdb", backend: "qcow2", locator: qcow, path: qcow, format: "qcow2"),
        ]
        let lv = "vmsnap-plugdom-\(UUID().uuidString.prefix(6).lowercased())"
        if let vg {
            try await cli.sh("lvcreate", "-q", "-y", "-L", "16m", "-n", lv, vg)
            disks.append(
                Disk(target: "vdc", backend: "lvm", locator: "\(vg)/\(lv)", path: "/dev/\(vg)/\(lv)", format: "raw"))
        }
        let list = disks.map {
            #"{"target": "\#($0.target)", "backend": "\#($0.backend)", "locator": "\#($0.locator)"}"#
        }.joined(separator: ", ")
        try #"{"name": "plugdom", "memoryMiB": 32, "accel": "tcg", "disks": [\#(list)]}"#.write(
            toFile: cli.root + "/dom.json", atomically: true, encoding: .utf8)
        _ = try await ok(cli, "domain", "define", cli.root + "/dom.json")
        _ = try await ok(cli, "domain", "start", "plugdom")
        do {
            for d in disks { try await BlockLayerProbe.write(cli, "plugdom", "drive-\(d.target)", 17) }
            _ = try await ok(cli, "snapshot", "create", "plugdom", "--name", "s1")
            #expect(
                try FileManager.default.contentsOfDirectory(atPath: cli.pool).contains {
                    $0.hasPrefix("dom-vda.raw.snap-")
                }, "the raw plug-in made its copy")
            for d in disks { try await BlockLayerProbe.write(cli, "plugdom", "drive-\(d.target)", 34) }
            #expect(try await BlockLayerProbe.holds(raw, format: "raw", 34))

            _ = try await ok(cli, "snapshot", "revert", "plugdom", "s1")
            for d in disks {
                let path = d.backend == "qcow2" ? try await cli.list(qcow).active : d.path
                #expect(
                    try await BlockLayerProbe.holds(path, format: d.format, 17),
                    "\(d.target) (\(d.backend)) holds the snapshot's data again")
            }
            #expect(try await ok(cli, "domain", "status", "plugdom").contains("running"), "memory restored, running")

            _ = try await ok(cli, "snapshot", "delete", "plugdom", "s1")
            let left = try FileManager.default.contentsOfDirectory(atPath: cli.pool).filter {
                $0.hasPrefix("dom-vda.raw.")
            }
            #expect(left.isEmpty, "the raw copy is gone: \(left)")
            #expect(try await BlockLayerProbe.holds(raw, format: "raw", 17))
        } catch {
            _ = try? await cli.run(["domain", "stop", "plugdom", "--force"], environment: plugins)
            if let vg { _ = try? await cli.sh("lvremove", "-q", "-y", "\(vg)/\(lv)") }
            throw error
        }
        _ = try? await cli.run(["domain", "stop", "plugdom", "--force"], environment: plugins)
        if let vg {
            for extra
                in (try? await SubprocessRunner().run(["lvs", "--noheadings", "-o", "lv_name", vg]).standardOutput)?
                .split(whereSeparator: \.isWhitespace) ?? []
            where extra.hasPrefix(lv) { _ = try? await cli.sh("lvremove", "-q", "-y", "\(vg)/\(extra)") }
        }
    }
}
