import Foundation
import SnapshotCore

/// Changed blocks from the differencing layers themselves: two views of a VHD disk read through
/// chains that share their lower part, so they can differ only in the sectors the layers they do
/// not share hold. Those sectors are read from each such layer's BAT and sector bitmaps, never
/// from the data: exact to the sector, whatever the guest wrote.
extension VHDBackend {
    public func changes(_ layout: DiskLayout, from snapshot: String, to view: DataView) async throws -> DiskChanges {
        let (base, top, toName) = try layout.changesViews(from: snapshot, to: view)
        let older = try chain(from: base.image)
        let newer = try chain(from: top)
        let olderIDs = Set(older.map(\.identity))
        let newerIDs = Set(newer.map(\.identity))
        let unshared =
            newer.filter { !olderIDs.contains($0.identity) } + older.filter { !newerIDs.contains($0.identity) }
        var extents: [ChangedExtent] = []
        for layer in unshared {
            extents += try layer.image.ownedRuns().map { ChangedExtent(offset: $0.first * 512, length: $0.count * 512) }
        }
        return DiskChanges(
            disk: layout.disk.id, from: snapshot, to: toName, virtualSize: newer[0].image.virtualSize,
            method: "vhd-bitmaps", granularity: 512, extents: extents)
    }

    /// One image of a chain, with the file's identity (the same file may be named two ways).
    struct ChainLayer {
        var image: VHDImage
        var identity: String
    }

    /// `path` and every image below it, top first.
    func chain(from path: String) throws -> [ChainLayer] {
        var out: [ChainLayer] = []
        var next: VHDImage? = try open(path)
        while let image = next {
            var st = stat()
            guard stat(image.path, &st) == 0 else {
                throw SnapshotError(.notFound, "layer \(image.path) of the disk is gone; run `vmsnap disk check`")
            }
            out.append(ChainLayer(image: image, identity: "\(st.st_dev):\(st.st_ino)"))
            next = try image.parent()
        }
        return out
    }
}
