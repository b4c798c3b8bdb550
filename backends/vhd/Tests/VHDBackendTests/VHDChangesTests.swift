import Foundation
import IndependentReaders
import SnapshotCore
import Testing

@testable import VHDBackend

@Suite("VHD changed extents")
struct VHDChangesTests {
    /// Sector-aligned bounds of a write: what the sector bitmaps can say.
    func sectors(_ offset: UInt64, _ length: Int) -> ChangedExtent {
        let first = offset / 512 * 512
        let end = (offset + UInt64(length) + 511) / 512 * 512
        return ChangedExtent(offset: first, length: end - first)
    }

    /// The 512-byte sectors where two views read differently through libvhdi (its own parser).
    func differingSectors(_ a: LibVhdiReader, _ b: LibVhdiReader, size: UInt64) throws -> [UInt64] {
        let x = try a.read(at: 0, length: Int(size))
        let y = try b.read(at: 0, length: Int(size))
        return stride(from: 0, to: Int(size), by: 512).filter { x[$0..<$0 + 512] != y[$0..<$0 + 512] }.map(UInt64.init)
    }

    @Test(
        "changes between VHD views are exactly the sectors their unshared layers hold, across branches too, and cover every sector libvhdi reads differently"
    )
    func exactSectors() async throws {
        let root = try scratch("changes")
        let svc = try service(root)
        let disk = root + "/pool/vm.vhd"
        let size: UInt64 = 24 << 20
        try VHDEngine.createDynamic(disk, size: size)
        let backend = VHDBackend(settings: ["engine": "native"])
        func write(_ seed: UInt64, _ offset: UInt64, _ length: Int) async throws {
            try await backend.write(pattern(seed, length), at: offset, layout: try await svc.layout(of: disk).1)
        }
        func changes(_ from: String, _ to: DataView) async throws -> [ChangedExtent] {
            try await svc.changes(disk: disk, from: from, to: to).extents
        }
        try await write(1, 0, 300 << 10)
        try await svc.create(SnapshotRequest(name: "e1", kind: .external), disk: disk)
        try await write(2, (5 << 20) + 1234, 9999)  // unaligned, across a block boundary
        try await svc.create(SnapshotRequest(name: "e2", kind: .external), disk: disk)
        try await write(3, 20 << 20, 64 << 10)
        let w2 = sectors((5 << 20) + 1234, 9999)
        let w3 = sectors(20 << 20, 64 << 10)
        #expect(try await changes("e1", .snapshot("e2")) == [w2])
        #expect(try await changes("e1", .active) == [w2, w3])
        #expect(try await changes("e2", .active) == [w3])
        let report = try await svc.changes(disk: disk, from: "e1", to: .active)
        #expect(report.method == "vhd-bitmaps" && report.granularity == 512 && report.virtualSize == size)

        // A branch: the views share only the base, so both sides' own sectors differ.
        try await svc.revert(disk: disk, to: "e1")
        try await write(4, 10 << 20, 4096)
        let w4 = sectors(10 << 20, 4096)
        #expect(try await changes("e2", .active) == [w2, w4])
        #expect(try await changes("e1", .active) == [w4])

        // libvhdi, reading the same files through its own parser, sees no difference outside.
        let layout = try await svc.layout(of: disk).1
        func reader(_ image: String) throws -> LibVhdiReader {
            try LibVhdiReader(path: image, parentChain: chain(image, layout))
        }
        for (from, to, image) in [
            ("e2", DataView.active, layout.disk.active), ("e1", .snapshot("e2"), layout.snapshot(named: "e2")!.image),
        ] {
            let extents = try await changes(from, to)
            let differ = try differingSectors(reader(layout.snapshot(named: from)!.image), reader(image), size: size)
            #expect(!differ.isEmpty)
            for s in differ {
                #expect(extents.contains { $0.offset <= s && s < $0.end }, "sector at \(s) differs, not reported")
            }
        }
    }

    @Test(
        "changes are refused for a snapshot the disk lacks, for the same view twice, and with nothing changed on disk")
    func badInput() async throws {
        let root = try scratch("changes-bad")
        let svc = try service(root)
        let disk = root + "/pool/vm.vhd"
        try VHDEngine.createDynamic(disk, size: 8 << 20)
        try await svc.create(SnapshotRequest(name: "e1", kind: .external), disk: disk)
        let before = try await svc.layout(of: disk).1
        await #expect(throws: SnapshotError.self) { _ = try await svc.changes(disk: disk, from: "nope", to: .active) }
        await #expect(throws: SnapshotError.self) {
            _ = try await svc.changes(disk: disk, from: "e1", to: .snapshot("nope"))
        }
        do {
            _ = try await svc.changes(disk: disk, from: "e1", to: .snapshot("e1"))
            Issue.record("the same view twice was accepted")
        } catch let e as SnapshotError {
            #expect(e.code == .invalidArgument && e.message.contains("nothing to compare"))
        }
        #expect(try await svc.layout(of: disk).1 == before)
        #expect(try await svc.changes(disk: disk, from: "e1", to: .active).extents.isEmpty)
    }
}
