import Foundation
import QEMUDriver
import SnapshotCore
import Testing

/// A domain with an LVM disk, a qcow2 disk and a VHD disk, run by a QEMU with no guest OS that
/// writes through its own block layer (HMP `qemu-io`): live full-system snapshot (the LV
/// snapshotted while the vCPUs are paused, the qcow2 disk in a QMP transaction, the VHD by its
/// backend with vmsnap's disk server held), revert (LVM merge once QEMU is stopped, memory
/// restored), delete while running. The VHD chain is read with libvhdi. Needs a real device-mapper, so it runs in
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
        let vhd = cli.pool + "/dom-vdc.vhd"
        try await cli.sh("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", vhd, "16M")
        let file = cli.root + "/dom.json"
        let definition =
            #"{"name": "lvdom", "memoryMiB": 32, "accel": "tcg", "disks": [{"target": "vda", "backend": "lvm", "locator": "\#(vg)/\#(lv)"}, {"target": "vdb", "backend": "qcow2", "locator": "\#(qcow)"}, {"target": "vdc", "backend": "vhd", "locator": "\#(vhd)"}]}"#
        try definition.write(toFile: file, atomically: true, encoding: .utf8)
        try await cli.ok("domain", "define", file)
        try await cli.ok("domain", "start", "lvdom")
        do {
            let device = "/dev/\(vg)/\(lv)"
            let drives = ["drive-vda", "drive-vdb", "drive-vdc"]
            for drive in drives { try await BlockLayerProbe.write(cli, "lvdom", drive, 17) }
            #expect(try await BlockLayerProbe.holds(device, format: "raw", 17))
            #expect(try await BlockLayerProbe.holds(qcow, format: "qcow2", 17))
            #expect(try ServedDiskTests.vhdHolds(vhd, 17))
            try await cli.ok("snapshot", "create", "lvdom", "--name", "s1")
            let lvs = try await SubprocessRunner().run(["lvs", "--noheadings", "-o", "lv_name,origin", vg])
                .standardOutput
            #expect(lvs.contains(lv), "a snapshot LV of \(lv): \(lvs)")
            for drive in drives { try await BlockLayerProbe.write(cli, "lvdom", drive, 34) }
            #expect(try await BlockLayerProbe.holds(device, format: "raw", 34))
            #expect(try ServedDiskTests.vhdHolds(try await cli.list(vhd).active, 34))
            #expect(try ServedDiskTests.vhdHolds(vhd, 17), "the snapshot's VHD layer is unchanged")

            try await cli.ok("snapshot", "revert", "lvdom", "s1")
            #expect(
                try await BlockLayerProbe.holds(device, format: "raw", 17), "the LV holds the snapshot's data again")
            #expect(
                try await BlockLayerProbe.holds(try await cli.list(qcow).active, format: "qcow2", 17),
                "the qcow2 disk holds the snapshot's data again")
            #expect(try ServedDiskTests.vhdHolds(try await cli.list(vhd).active, 17), "so does the VHD")
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
            // The VHD merged while the domain ran: one layer again, and it takes writes.
            #expect(try await cli.list(vhd).snapshots.isEmpty)
            try await BlockLayerProbe.write(cli, "lvdom", "drive-vdc", 68)
            #expect(try ServedDiskTests.vhdHolds(try await cli.list(vhd).active, 68))
        } catch {
            _ = try? await cli.run(["domain", "stop", "lvdom", "--force"])
            _ = try? await cli.sh("lvremove", "-q", "-y", "\(vg)/\(lv)")
            throw error
        }
        _ = try? await cli.run(["domain", "stop", "lvdom", "--force"])
        try? await removeLVs(lv)
    }

    /// An RBD disk beside an LVM volume and a qcow2 file in one running domain (issue 16): the
    /// host's Ceph cluster, reached from scripts/lvm-guest over its user-mode network. Two
    /// full-system snapshots (the LV and the RBD image snapshotted by their storage while the vCPUs
    /// are paused, the qcow2 disk in QEMU's transaction), a revert to the older one and one to the
    /// newer (each disk holds what the guest wrote before that snapshot), then deletes while it
    /// runs that leave no snapshot in any storage and the disks as they were.
    @Test(.enabled(if: ProcessInfo.processInfo.environment["CEPH_CONF"] != nil, "no Ceph cluster (lvm-guest's relay)"))
    func rbdBesideLVMAndQcow2() async throws {
        let cli = try CLI()
        let environment = ProcessInfo.processInfo.environment
        let conf = environment["CEPH_CONF"] ?? ""
        let env = [
            "VMSNAP_BACKEND_PATH": [rbdPluginDirectory, environment["VMSNAP_BACKEND_PATH"]].compactMap { $0 }
                .joined(separator: ":")
        ]
        let lv = "vmsnap-rbdlv-\(UUID().uuidString.prefix(6).lowercased())"
        let image = "\(environment["CEPH_POOL"] ?? "vmsnap")/mix-\(UUID().uuidString.prefix(6).lowercased())"
        let rbdPath = "rbd:\(image):id=admin:conf=\(conf)"
        let device = "/dev/\(vg)/\(lv)"
        try await cli.sh("lvcreate", "-q", "-y", "-L", "16m", "-n", lv, vg)
        try await cli.sh("rbd", "create", image, "--size", "16M")
        let qcow = try await cli.disk("mix-vdb")
        func ok(_ args: String...) async throws {
            let r = try await cli.run(args, environment: env)
            guard r.status == 0 else {
                throw CLIFailure("vmsnap \(args.joined(separator: " ")) exited \(r.status): \(r.err)")
            }
        }
        func rbdSnapshots() async throws -> String {
            try await SubprocessRunner().run(["rbd", "snap", "ls", image]).standardOutput
        }
        func lvmSnapshots() async throws -> String {
            try await SubprocessRunner().run(["lvs", "--noheadings", "-o", "lv_name,origin", vg]).standardOutput
                .split(separator: "\n").filter {
                    let fields = $0.split(separator: " ")
                    return fields.count == 2 && fields[1] == lv
                }
                .joined(separator: "\n")
        }
        func allHold(_ value: UInt8, _ why: String) async throws {
            #expect(try await BlockLayerProbe.holds(device, format: "raw", value), "the LV \(why)")
            #expect(try await BlockLayerProbe.holds(rbdPath, format: "raw", value), "the RBD image \(why)")
            #expect(
                try await BlockLayerProbe.holds(try await cli.list(qcow).active, format: "qcow2", value),
                "the qcow2 disk \(why)")
        }
        try
            #"{"name": "mixdom", "memoryMiB": 32, "accel": "tcg", "disks": [{"target": "vda", "backend": "lvm", "locator": "\#(vg)/\#(lv)"}, {"target": "vdb", "backend": "qcow2", "locator": "\#(qcow)"}, {"target": "vdc", "backend": "rbd", "locator": "\#(image)"}]}"#
            .write(toFile: cli.root + "/mix.json", atomically: true, encoding: .utf8)
        let drives = ["drive-vda", "drive-vdb", "drive-vdc"]
        do {
            try await ok("domain", "define", cli.root + "/mix.json")
            try await ok("domain", "start", "mixdom")
            for drive in drives { try await BlockLayerProbe.write(cli, "mixdom", drive, 17) }
            try await ok("snapshot", "create", "mixdom", "--name", "s1")
            for drive in drives { try await BlockLayerProbe.write(cli, "mixdom", drive, 34) }
            try await ok("snapshot", "create", "mixdom", "--name", "s2")
            #expect(try await rbdSnapshots().contains("s2"), "an RBD snapshot per domain snapshot")
            let taken = try await lvmSnapshots()
            #expect(taken.split(separator: "\n").count == 2, "a snapshot LV per domain snapshot: \(taken)")
            for drive in drives { try await BlockLayerProbe.write(cli, "mixdom", drive, 51) }

            try await ok("snapshot", "revert", "mixdom", "s1")
            try await allHold(17, "holds s1's data after the revert to s1")
            try await ok("snapshot", "revert", "mixdom", "s2")
            try await allHold(34, "holds s2's data after the revert to s2")
            let status = try await cli.run(["domain", "status", "mixdom"], environment: env)
            #expect(status.out.contains("running"), "\(status.out)")

            // Deleted while the domain runs, one at a time (QEMU merges the qcow2 overlays live).
            try await ok("snapshot", "delete", "mixdom", "s2")
            #expect(!(try await rbdSnapshots().contains("s2")), "s2's RBD snapshot is gone")
            try await ok("snapshot", "delete", "mixdom", "s1")
            let rbdLeft = try await rbdSnapshots()
            #expect(!rbdLeft.contains("s1") && !rbdLeft.contains("s2"), "no RBD snapshot left: \(rbdLeft)")
            #expect(try await lvmSnapshots().isEmpty, "no snapshot LV left")
            try await allHold(34, "keeps the current data after the delete")
        } catch {
            _ = try? await cli.run(["domain", "stop", "mixdom", "--force"], environment: env)
            try? await removeLVs(lv)
            _ = try? await SubprocessRunner().run(["rbd", "snap", "purge", image])
            _ = try? await SubprocessRunner().run(["rbd", "rm", image])
            throw error
        }
        _ = try? await cli.run(["domain", "stop", "mixdom", "--force"], environment: env)
        _ = try? await SubprocessRunner().run(["rbd", "rm", image])
        try? await removeLVs(lv)
    }

    /// Removes volume `lv` and every volume named after it (its snapshots).
    func removeLVs(_ lv: String) async throws {
        let cli = try CLI()
        for extra in (try? await SubprocessRunner().run(["lvs", "--noheadings", "-o", "lv_name", vg]).standardOutput)?
            .split(whereSeparator: \.isWhitespace) ?? []
        where extra.hasPrefix(lv) { _ = try? await cli.sh("lvremove", "-q", "-y", "\(vg)/\(extra)") }
    }
}
