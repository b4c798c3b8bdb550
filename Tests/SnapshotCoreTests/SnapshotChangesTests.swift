import Foundation
import Testing

@testable import SnapshotCore

@Suite("changed extents a backend reports")
struct SnapshotChangesTests {
    func changes(_ extents: [ChangedExtent], granularity: UInt64 = 512) -> DiskChanges {
        DiskChanges(
            disk: "d", from: "s1", to: nil, virtualSize: 1 << 20, method: "test", granularity: granularity,
            extents: extents)
    }

    @Test("extents come back sorted, overlapping and adjacent runs of one kind merged, data beside zeros kept apart")
    func normalizes() throws {
        let n = try changes([
            ChangedExtent(offset: 8192, length: 512),
            ChangedExtent(offset: 0, length: 1024),
            ChangedExtent(offset: 512, length: 1024),
            ChangedExtent(offset: 1536, length: 512),
            ChangedExtent(offset: 2048, length: 512, zero: true),
            ChangedExtent(offset: 8192, length: 1024),
        ]).normalized(limit: 1 << 20, who: "t")
        #expect(
            n.extents == [
                ChangedExtent(offset: 0, length: 2048), ChangedExtent(offset: 2048, length: 512, zero: true),
                ChangedExtent(offset: 8192, length: 1024),
            ])
        #expect(n.changedBytes == 2048 + 512 + 1024)
    }

    @Test("an extent that is empty, past the disk's end, overflows, or is both data and zeros refuses the report")
    func refusesBadReports() throws {
        let bad: [[ChangedExtent]] = [
            [ChangedExtent(offset: 0, length: 0)],
            [ChangedExtent(offset: (1 << 20) - 512, length: 1024)],
            [ChangedExtent(offset: UInt64.max - 10, length: 20)],
            [ChangedExtent(offset: 0, length: 4096), ChangedExtent(offset: 1024, length: 512, zero: true)],
        ]
        for extents in bad {
            #expect(throws: SnapshotError.self, "\(extents)") {
                _ = try changes(extents).normalized(limit: 1 << 20, who: "plug-in 'x'")
            }
        }
        #expect(throws: SnapshotError.self) { _ = try changes([], granularity: 0).normalized(limit: 1, who: "x") }
        #expect(try changes([]).normalized(limit: 1 << 20, who: "x").extents.isEmpty)
    }

    @Test("a plug-in's JSON may leave out zero; it then means data")
    func decodesWithoutZero() throws {
        let e = try JSONDecoder().decode(ChangedExtent.self, from: Data(#"{"offset": 4096, "length": 512}"#.utf8))
        #expect(e == ChangedExtent(offset: 4096, length: 512, zero: false))
    }
}
