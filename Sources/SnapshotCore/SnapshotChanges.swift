import Foundation

/// A run of a disk's bytes that differs between two views of it.
public struct ChangedExtent: Codable, Sendable, Hashable {
    public var offset: UInt64
    public var length: UInt64
    /// The newer view reads zeros there: the storage dropped the data (a discard, a hole),
    /// so a copy can write zeros (or punch a hole) instead of reading it.
    public var zero: Bool

    public init(offset: UInt64, length: UInt64, zero: Bool = false) {
        self.offset = offset
        self.length = length
        self.zero = zero
    }

    enum CodingKeys: String, CodingKey { case offset, length, zero }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        offset = try c.decode(UInt64.self, forKey: .offset)
        length = try c.decode(UInt64.self, forKey: .length)
        zero = try c.decodeIfPresent(Bool.self, forKey: .zero) ?? false
    }

    public var end: UInt64 { offset + length }
}

/// What differs between a snapshot of a disk and a newer view of it (another snapshot, or the
/// disk now), as the storage itself knows it: from its own metadata, never by comparing data.
/// Every byte that differs is inside an extent; an extent may hold bytes that did not change
/// (the storage's granularity: an RBD object, a VHD sector run).
public struct DiskChanges: Codable, Sendable, Hashable {
    /// The disk's identity.
    public var disk: String
    /// The snapshot the changes are counted from.
    public var from: String
    /// The snapshot they are counted to; nil: the disk as it is now.
    public var to: String?
    /// The size of the newer view.
    public var virtualSize: UInt64
    /// How the storage found them (`vhd-bitmaps`, `rbd-diff`, `rbd-fast-diff`).
    public var method: String
    /// Bytes the extents are aligned to (a sector, an RBD object).
    public var granularity: UInt64
    /// Sorted, not overlapping, adjacent runs of the same kind merged.
    public var extents: [ChangedExtent]

    public init(
        disk: String, from: String, to: String?, virtualSize: UInt64, method: String, granularity: UInt64,
        extents: [ChangedExtent]
    ) {
        self.disk = disk
        self.from = from
        self.to = to
        self.virtualSize = virtualSize
        self.method = method
        self.granularity = granularity
        self.extents = extents
    }

    /// Bytes inside the extents.
    public var changedBytes: UInt64 { extents.reduce(0) { $0 + $1.length } }

    enum CodingKeys: String, CodingKey {
        case disk, from, to, virtualSize, method, granularity, extents, changedBytes
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        disk = try c.decode(String.self, forKey: .disk)
        from = try c.decode(String.self, forKey: .from)
        to = try c.decodeIfPresent(String.self, forKey: .to)
        virtualSize = try c.decode(UInt64.self, forKey: .virtualSize)
        method = try c.decode(String.self, forKey: .method)
        granularity = try c.decode(UInt64.self, forKey: .granularity)
        extents = try c.decode([ChangedExtent].self, forKey: .extents)
    }

    /// With the total, for scripts (`vmsnap disk changes --json`).
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(disk, forKey: .disk)
        try c.encode(from, forKey: .from)
        try c.encodeIfPresent(to, forKey: .to)
        try c.encode(virtualSize, forKey: .virtualSize)
        try c.encode(method, forKey: .method)
        try c.encode(granularity, forKey: .granularity)
        try c.encode(extents, forKey: .extents)
        try c.encode(changedBytes, forKey: .changedBytes)
    }

    /// The extents sorted and merged, after checking each lies inside the disk: what a backend
    /// (or a plug-in) reported, made safe to act on. `who` names the reporter in the error.
    public func normalized(limit: UInt64, who: String) throws -> DiskChanges {
        for e in extents {
            let (end, overflow) = e.offset.addingReportingOverflow(e.length)
            guard e.length > 0, !overflow, end <= limit else {
                throw SnapshotError(
                    .pluginFailed,
                    "\(who) reported a changed extent (offset \(e.offset), length \(e.length)) that is empty or outside the disk's \(limit) bytes; the report is not used"
                )
            }
        }
        guard granularity > 0 else {
            throw SnapshotError(.pluginFailed, "\(who) reported changes with granularity 0; the report is not used")
        }
        var merged: [ChangedExtent] = []
        for e in extents.sorted(by: { ($0.offset, $0.length) < ($1.offset, $1.length) }) {
            guard let last = merged.last, e.offset <= last.end else {
                merged.append(e)
                continue
            }
            if e.zero == last.zero {
                merged[merged.count - 1].length = max(last.end, e.end) - last.offset
            } else if e.offset == last.end {
                merged.append(e)
            } else {
                throw SnapshotError(
                    .pluginFailed,
                    "\(who) reported bytes \(e.offset)..<\(min(e.end, last.end)) as both changed data and zeros; the report is not used"
                )
            }
        }
        var out = self
        out.extents = merged
        return out
    }
}

extension DiskLayout {
    /// The two views a `changes` question names: the snapshot counted from, and the image of the
    /// newer view with its snapshot's name (nil: the disk now). notFound names a missing one.
    public func changesViews(from snapshot: String, to view: DataView) throws -> (
        base: DiskSnapshot, newerImage: String, newerName: String?
    ) {
        func find(_ name: String) throws -> DiskSnapshot {
            guard let s = self.snapshot(named: name) else {
                throw SnapshotError(.notFound, "disk \(disk.id) has no snapshot '\(name)'")
            }
            return s
        }
        let base = try find(snapshot)
        guard case .snapshot(let name) = view else { return (base, disk.active, nil) }
        return (base, try find(name).image, name)
    }
}

/// Changes between snapshots: what a backend that declares ``BackendDescriptor/reportsChanges``
/// answers. Every other backend keeps the default, which refuses.
extension DiskSnapshotBackend {
    public func changes(_ layout: DiskLayout, from snapshot: String, to view: DataView) async throws -> DiskChanges {
        throw SnapshotError(
            .unsupported,
            "backend '\(kind)' does not report which blocks changed between snapshots")
    }
}
