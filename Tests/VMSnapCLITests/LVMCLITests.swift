import Foundation
import SnapshotCore
import Testing

/// The LVM backend through the CLI, as an operator meets it: a revert of an open volume ends
/// pending (exit status 75) and finishes once the volume is closed; settings come from the store's
/// settings.conf and `--set`; `disk check --repair` grows a filling copy-on-write area. Needs a real
/// device-mapper: runs in scripts/lvm-guest, or on a host with a volume group to spare.
@Suite(
    "LVM through the CLI", .serialized,
    .enabled(
        if: ProcessInfo.processInfo.environment["VMSNAP_LVM_VG"] != nil, "set VMSNAP_LVM_VG (scripts/lvm-guest does)"))
struct LVMCLITests {
    let vg = ProcessInfo.processInfo.environment["VMSNAP_LVM_VG"] ?? ""

    /// Writes `value` over the first `length` bytes of the device, synchronously.
    func fill(_ device: String, _ value: UInt8, length: Int = 1 << 20) throws {
        let fd = open(device, O_WRONLY)
        guard fd >= 0 else { throw CLIFailure("cannot open \(device)") }
        defer { close(fd) }
        let bytes = [UInt8](repeating: value, count: length)
        guard bytes.withUnsafeBytes({ pwrite(fd, $0.baseAddress, length, 0) }) == length, fsync(fd) == 0 else {
            throw CLIFailure("write to \(device)")
        }
    }

    func holds(_ device: String, _ value: UInt8, length: Int = 1 << 20) throws -> Bool {
        guard let h = FileHandle(forReadingAtPath: device) else { return false }
        defer { try? h.close() }
        return try h.read(upToCount: length) == Data(repeating: value, count: length)
    }

    @Test func pendingRevertSettingsAndRepair() async throws {
        let cli = try CLI()
        let lv = "vmsnap-cli-\(UUID().uuidString.prefix(6).lowercased())"
        let disk = "\(vg)/\(lv)"
        try await cli.sh("lvcreate", "-q", "-y", "-L", "32m", "-n", lv, vg)
        do { try await pendingRevert(cli, disk: disk) } catch {
            await removeVolumes(prefix: lv)
            throw error
        }
        await removeVolumes(prefix: lv)
    }

    /// Removes the test's volumes (the origin and the snapshots named after it).
    func removeVolumes(prefix: String) async {
        let names =
            (try? await SubprocessRunner().run([
                "lvs", "--noheadings", "-o", "lv_full_name", "-S", "lv_name=~^\(prefix)",
            ]).standardOutput) ?? ""
        for name in names.split(whereSeparator: \.isWhitespace) {
            _ = try? await SubprocessRunner().execute(["lvremove", "-q", "-y", String(name)])
        }
    }

    func pendingRevert(_ cli: CLI, disk: String) async throws {
        let device = "/dev/\(disk)"
        // A policy in the store: 8 MiB copy-on-write areas.
        try FileManager.default.createDirectory(atPath: cli.store, withIntermediateDirectories: true)
        try "cow-size = 8m\n".write(toFile: cli.store + "/settings.conf", atomically: true, encoding: .utf8)

        try fill(device, 0x11)
        try await cli.ok("disk", "snapshot", "create", disk, "s1")
        let image = try #require(try await cli.list(disk).snapshots.first?.image)
        let size = try await SubprocessRunner().run([
            "lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "lv_size", image,
        ]).standardOutput
        #expect(
            size.trimmingCharacters(in: .whitespacesAndNewlines) == "\(8 << 20)", "settings.conf's cow-size: \(size)")

        // A bad setting is refused before anything runs.
        let bad = try await cli.run(["disk", "snapshot", "create", disk, "s2", "--set", "cow-size=lots"])
        #expect(bad.status == 1 && bad.err.contains("cow-size=lots"), "\(bad.err)")

        // Fill the area past 50% and let --repair grow it by 100%.
        try fill(device, 0x22, length: 5 << 20)
        let warn = try await cli.run(["disk", "check", disk, "--set", "warn-percent=50"])
        #expect(warn.status == 1 && warn.out.contains("copy-on-write area"), "\(warn.out)")
        let repaired = try await cli.run([
            "disk", "check", disk, "--repair", "--set", "warn-percent=50", "--set", "extend-percent=100",
        ])
        #expect(
            repaired.status == 0 && repaired.out.contains("repaired: grew the copy-on-write area"),
            "\(repaired.out)\(repaired.err)")

        // Revert while another process holds the volume: pending, 75.
        let holder = open(device, O_RDONLY)
        try #require(holder >= 0)
        let pending = try await cli.run(["disk", "snapshot", "revert", disk, "s1"])
        #expect(
            pending.status == 75 && pending.err.contains("pending:") && pending.err.contains("vmsnap recover"),
            "\(pending.status) \(pending.err)")
        #expect(try holds(device, 0x22, length: 5 << 20), "the volume keeps its data until the merge")
        let listing = try await cli.run(["disk", "snapshot", "list", disk, "--json"])
        #expect(listing.out.contains("revert"), "unfinished operations listed: \(listing.out)")
        let waiting = try await cli.run(["recover"])
        #expect(waiting.status == 75 && waiting.out.contains("pending"), "\(waiting.status) \(waiting.out)")
        close(holder)
        let finished = try await cli.run(["recover"])
        #expect(finished.status == 0 && finished.out.contains("completed"), "\(finished.out)\(finished.err)")
        #expect(try holds(device, 0x11), "the snapshot's bytes")
        #expect(try await cli.list(disk).current == "s1")
        #expect(try await cli.list(disk).snapshots.map(\.name) == ["s1"], "still there: taken again")
        try await cli.ok("disk", "snapshot", "delete", disk, "s1")
    }

    /// vmsnap killed between the steps of a revert, then `vmsnap recover`: a classic revert
    /// (merge, take again) always goes forward; a thin revert (set the volume aside, re-make it
    /// from the snapshot, remove the old one) rolls back until the volume is re-made, forward after.
    /// Either way the volume holds one whole state, the snapshot survives and nothing is left over.
    @Test(arguments: [
        (false, "before-step:0", true), (false, "after-step:0", true), (false, "after-step:1", true),
        (true, "after-step:0", false), (true, "after-step:1", true),
    ])
    func revertKilledAtEachStep(thin: Bool, fault: String, reverted: Bool) async throws {
        if thin && ProcessInfo.processInfo.environment["VMSNAP_LVM_THIN_POOL"] == nil { return }
        let cli = try CLI()
        let lv = "vmsnap-crash-\(UUID().uuidString.prefix(6).lowercased())"
        let disk = "\(vg)/\(lv)"
        if thin {
            try await cli.sh(
                "lvcreate", "-q", "-V", "16m", "--thinpool",
                ProcessInfo.processInfo.environment["VMSNAP_LVM_THIN_POOL"]!, "-n", lv, vg)
        } else {
            try await cli.sh("lvcreate", "-q", "-y", "-L", "16m", "-n", lv, vg)
        }
        do {
            let device = "/dev/\(disk)"
            try fill(device, 0x31)
            try await cli.ok("disk", "snapshot", "create", disk, "s1", "--set", "cow-size=8m")
            try fill(device, 0x32)
            let killed = try await cli.run(["disk", "snapshot", "revert", disk, "s1"], fault: fault)
            #expect(killed.status == 128 + 9, "killed at \(fault): \(killed.status) \(killed.err)")
            let recovered = try await cli.run(["recover"])
            #expect(
                recovered.status == 0 && recovered.out.contains(reverted ? "completed" : "rolled-back"),
                "\(fault): \(recovered.out)\(recovered.err)")
            #expect(try holds(device, reverted ? 0x31 : 0x32), "\(fault): one whole state")
            let listing = try await cli.list(disk)
            #expect(listing.snapshots.map(\.name) == ["s1"])
            let check = try await cli.run(["disk", "check", disk])
            #expect(check.status == 0, "\(fault): \(check.out)")
            let names = try await SubprocessRunner().run([
                "lvs", "--noheadings", "-o", "lv_name", "-S", "lv_name=~^\(lv)", vg,
            ]).standardOutput
            #expect(
                names.split(whereSeparator: \.isWhitespace).count == 2,
                "\(fault): the volume and its snapshot, nothing set aside: \(names)")
            // The snapshot still reverts.
            try fill(device, 0x33)
            try await cli.ok("disk", "snapshot", "revert", disk, "s1")
            #expect(try holds(device, 0x31))
        } catch {
            await removeVolumes(prefix: lv)
            throw error
        }
        await removeVolumes(prefix: lv)
    }
}
