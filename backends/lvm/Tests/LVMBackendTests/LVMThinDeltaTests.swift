import Foundation
import SnapshotCore
import Testing

@testable import LVMBackend

/// thin_delta's report, produced by the real tool: thin_restore writes pool metadata from a
/// thin_dump XML into a file, and thin_delta compares two devices in it, as it does on a pool's
/// metadata snapshot. (The whole path, with a real pool, runs in the LVM guest: conformance check
/// changes.between-views on thin volumes.)
@Suite("LVM thin changes")
struct LVMThinDeltaTests {
    static let tools = ["thin_restore", "thin_delta"].allSatisfy { tool in
        ["/usr/sbin", "/sbin", "/usr/bin"].contains { FileManager.default.isExecutableFile(atPath: "\($0)/\(tool)") }
    }

    @Test(
        "thin_delta's report of two devices is read into runs of changed, new and dropped blocks",
        .enabled(if: tools, "thin-provisioning-tools not installed"))
    func readsTheToolsReport() async throws {
        let dir = (NSTemporaryDirectory() as NSString).appendingPathComponent(
            "vmsnap-thin-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // thin_restore writes with O_DIRECT, which a tmpfs refuses (the LVM guest's temporary
        // directory; there the conformance check runs the same report off a real pool).
        let probe = open(dir + "/probe", O_CREAT | O_RDWR | 0o40000, 0o600)  // O_DIRECT (not exported to Swift)
        guard probe >= 0 else { return }
        close(probe)
        // Device 1 (the older snapshot) and device 2 (the newer view): blocks 0-1 shared, block 10
        // remapped (a write after the snapshot), block 20 new in 2, block 30 dropped from 2.
        let xml = """
            <superblock uuid="" time="1" transaction="1" flags="0" version="2" data_block_size="128" nr_data_blocks="1024">
              <device dev_id="1" mapped_blocks="4" transaction="0" creation_time="0" snap_time="0">
                <range_mapping origin_begin="0" data_begin="0" length="2" time="0"/>
                <single_mapping origin_block="10" data_block="5" time="0"/>
                <single_mapping origin_block="30" data_block="6" time="0"/>
              </device>
              <device dev_id="2" mapped_blocks="4" transaction="0" creation_time="1" snap_time="1">
                <range_mapping origin_begin="0" data_begin="0" length="2" time="0"/>
                <single_mapping origin_block="10" data_block="7" time="1"/>
                <range_mapping origin_begin="20" data_begin="8" length="3" time="1"/>
              </device>
            </superblock>
            """
        try Data(xml.utf8).write(to: URL(fileURLWithPath: dir + "/m.xml"))
        let run = SubprocessRunner()
        try await run.run(["truncate", "-s", "8M", dir + "/meta"])
        try await run.run(["thin_restore", "-i", dir + "/m.xml", "-o", dir + "/meta"])
        let argv = LVMCommands.thinDelta("1", "2", metadata: dir + "/meta").filter { $0 != "-m" }
        let report = try await run.run(argv).standardOutput
        let delta = try ThinDelta(xml: report)
        #expect(delta.blockSectors == 128)
        #expect(
            delta.runs.map { "\($0.kind.rawValue) \($0.begin)+\($0.length)" } == [
                "different 10+1", "right_only 20+3", "left_only 30+1",
            ], "\(report)")
        // The other way round, new blocks become dropped ones.
        let back = try ThinDelta(
            xml: try await run.run(["thin_delta", "--snap1", "2", "--snap2", "1", dir + "/meta"]).standardOutput)
        #expect(back.runs.map(\.kind) == [.different, .leftOnly, .rightOnly])
    }

    @Test("a report without its block size, with an unknown element or a run without bounds is refused")
    func refusesOddReports() {
        let bad = [
            "<superblock uuid=\"\">\n<diff left=\"1\" right=\"2\">\n</diff>\n</superblock>",
            "<superblock data_block_size=\"128\">\n<diff left=\"1\" right=\"2\">\n<moved begin=\"1\" length=\"1\"/>\n</diff>",
            "<superblock data_block_size=\"128\">\n<diff left=\"1\" right=\"2\">\n<different begin=\"1\"/>\n</diff>",
            "<superblock data_block_size=\"128\">\n</superblock>",
        ]
        for xml in bad { #expect(throws: SnapshotError.self, "\(xml)") { _ = try ThinDelta(xml: xml) } }
    }

    @Test("device-mapper names double the dashes inside VG and LV names; the pool layer's suffix is kept")
    func deviceMapperNames() {
        #expect(LVMBackend.dmPath("vg0", "pool_tmeta") == "/dev/mapper/vg0-pool_tmeta")
        #expect(LVMBackend.dmPath("my-vg", "thin-pool-tpool") == "/dev/mapper/my--vg-thin--pool-tpool")
        #expect(
            LVMCommands.poolMessage("/dev/mapper/a-p-tpool", "reserve_metadata_snap") == [
                "dmsetup", "message", "/dev/mapper/a-p-tpool", "0", "reserve_metadata_snap",
            ])
    }
}
