import Foundation
import QEMUDriver
import SnapshotCore
import Testing

/// A domain with an LVM disk and a qcow2 disk, run by a QEMU with no guest OS that writes through
/// its own block layer (HMP `qemu-io`): live full-system snapshot (the LV snapshotted while the
/// vCPUs are paused, the qcow2 disk in a QMP transaction), revert (LVM merge once QEMU is
/// stopped, memory restored), delete while running. Needs a real device-mapper, so it runs in
/// scripts/lvm-guest (VMSNAP_LVM_VG set), or on a host with a volume group to spare.
@Suite(
    "LVM disk in a running domain", .serialized,
    .enabled(
        if: ProcessInfo.processInfo.environment["VMSNAP_LVM_VG"] != nil, "set VMSNAP_LVM_VG (scripts/lvm-guest does)"))
struct LVMDomainTests {
    let vg = ProcessInfo.processInfo.environment["VMSNAP_LVM_VG"] ?? ""

    @Test func lvmAndQcow2DiskLiveSnapshotRevertDelete() async throws {
        let cli = try CLI()
        let lv = "vmsnap-domlv-\(UUID().uuidString.prefix(6).lowercased())"
        try await cli.sh("lvcreate", "-q", "-y", "-L", "16m", "-n", lv, vg)
        let qcow = try await cli.disk("dom-vdb")
        let file = cli.root + "/dom.json"
        let definition =
            #"{"name": "lvdom", "memoryMiB": 32, "accel": "tcg", "disks": [{"target": "vda", "backend": "lvm", "locator": "\#(vg)/\#(lv)"}, {"target": "vdb", "backend": "qcow2", "locator": "\#(qcow)"}]}"#
        try definition.write(toFile: file, atomically: true, encoding: .utf8)
        try await cli.ok("domain", "define", file)
        try await cli.ok("domain", "start", "lvdom")
        do {
            let device = "/dev/\(vg)/\(lv)"
            for drive in ["drive-vda", "drive-vdb"] { try await BlockLayerProbe.write(cli, "lvdom", drive, 17) }
            #expect(try await BlockLayerProbe.holds(device, format: "raw", 17))
            #expect(try await BlockLayerProbe.holds(qcow, format: "qcow2", 17))
            try await cli.ok("snapshot", "create", "lvdom", "--name", "s1")
            let lvs = try await SubprocessRunner().run(["lvs", "--noheadings", "-o", "lv_name,origin", vg])
                .standardOutput
            #expect(lvs.contains(lv), "a snapshot LV of \(lv): \(lvs)")
            for drive in ["drive-vda", "drive-vdb"] { try await BlockLayerProbe.write(cli, "lvdom", drive, 34) }
            #expect(try await BlockLayerProbe.holds(device, format: "raw", 34))

            try await cli.ok("snapshot", "revert", "lvdom", "s1")
            #expect(
                try await BlockLayerProbe.holds(device, format: "raw", 17), "the LV holds the snapshot's data again")
            #expect(
                try await BlockLayerProbe.holds(try await cli.list(qcow).active, format: "qcow2", 17),
                "the qcow2 disk holds the snapshot's data again")
            let status = try await cli.ok("domain", "status", "lvdom")
            #expect(status.contains("running"))

            // Another process holds the LV: once QEMU is stopped the revert refuses before any
            // disk changes (a merge into the held volume would wait while the domain ran on).
            try await BlockLayerProbe.write(cli, "lvdom", "drive-vda", 51)
            let holder = open(device, O_RDONLY)
            try #require(holder >= 0)
            let held = try await cli.run(["snapshot", "revert", "lvdom", "s1"])
            close(holder)
            #expect(
                held.status == 1 && held.err.contains("still open by another process"), "\(held.status) \(held.err)")
            #expect(try await BlockLayerProbe.holds(device, format: "raw", 51), "the LV was not reverted")
            #expect(try await cli.ok("domain", "status", "lvdom").contains("shut"), "left shut off, as the error says")
            let journals = try await SubprocessRunner().run(["lvs", "--noheadings", "-o", "lv_name,lv_merging", vg])
                .standardOutput
            #expect(!journals.contains("merging"), "no merge queued: \(journals)")
            try await cli.ok("snapshot", "revert", "lvdom", "s1")
            #expect(try await BlockLayerProbe.holds(device, format: "raw", 17), "closed again: the revert works")

            try await cli.ok("snapshot", "delete", "lvdom", "s1")
            let after = try await SubprocessRunner().run(["lvs", "--noheadings", "-o", "lv_name,lv_tags", vg])
                .standardOutput
            #expect(!after.contains("vmsnap.origin"), "no snapshot LV left: \(after)")
            #expect(try await BlockLayerProbe.holds(device, format: "raw", 17))
        } catch {
            _ = try? await cli.run(["domain", "stop", "lvdom", "--force"])
            _ = try? await cli.sh("lvremove", "-q", "-y", "\(vg)/\(lv)")
            throw error
        }
        _ = try? await cli.run(["domain", "stop", "lvdom", "--force"])
        for extra in (try? await SubprocessRunner().run(["lvs", "--noheadings", "-o", "lv_name", vg]).standardOutput)?
            .split(whereSeparator: \.isWhitespace) ?? []
        where extra.hasPrefix(lv) { _ = try? await cli.sh("lvremove", "-q", "-y", "\(vg)/\(extra)") }
    }
}
