import Foundation
import SnapshotCore
import Testing

@Suite("vmsnap disk changes")
struct DiskChangesCLITests {
    struct Report: Decodable {
        var disk: String
        var from: String
        var to: String?
        var method: String
        var granularity: UInt64
        var changedBytes: UInt64
        var virtualSize: UInt64
        var extents: [ChangedExtent]
    }

    @Test(
        "changes print as lines and JSON for a backend that reports them; a backend that does not, and a missing snapshot, are refused with the reason"
    )
    func changesThroughTheCLI() async throws {
        let cli = try CLI()
        let vhd = cli.pool + "/v.vhd"
        try await cli.sh("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", vhd, "8M")
        try await cli.ok("disk", "snapshot", "create", vhd, "v1")
        try await cli.ok("disk", "snapshot", "create", vhd, "v2")
        let json = try await cli.ok("disk", "changes", vhd, "--from", "v1", "--to", "v2", "--json")
        let report = try JSONDecoder().decode(Report.self, from: Data(json.utf8))
        #expect(report.method == "vhd-bitmaps" && report.granularity == 512)
        #expect(report.virtualSize >= 8 << 20, "qemu-img rounds a VHD up to its CHS geometry")
        #expect(report.from == "v1" && report.to == "v2" && report.extents.isEmpty && report.changedBytes == 0)
        let text = try await cli.ok("disk", "changes", vhd, "--from", "v1")
        #expect(
            text.contains("0 extent(s), 0 of \(report.virtualSize) bytes changed since 'v1' (to now; vhd-bitmaps"),
            "\(text)")

        let missing = try await cli.run(["disk", "changes", vhd, "--from", "v9"])
        #expect(missing.status != 0 && missing.err.contains("no snapshot named 'v9'"), "\(missing.err)")
        let qcow = try await cli.disk()
        try await cli.ok("disk", "snapshot", "create", qcow, "q1")
        let refused = try await cli.run(["disk", "changes", qcow, "--from", "q1"])
        #expect(
            refused.status != 0 && refused.err.contains("backend 'qcow2' does not report which blocks changed"),
            "\(refused.err)")
        #expect(try await cli.list(qcow).snapshots.map(\.name) == ["q1"])
    }
}
