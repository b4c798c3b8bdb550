import Foundation

// MARK: - Kinds and states

/// The name a backend registers under: `qcow2`, `lvm`, `vhd`, ...
public struct BackendKind: RawRepresentable, Hashable, Codable, Sendable, CustomStringConvertible,
    ExpressibleByStringLiteral, Comparable
{
    public var rawValue: String
    public init(rawValue: String) { self.rawValue = rawValue }
    public init(stringLiteral value: String) { self.rawValue = value }
    public var description: String { rawValue }
    public static func < (lhs: Self, rhs: Self) -> Bool { lhs.rawValue < rhs.rawValue }
}

/// Where a disk snapshot lives (see DESIGN.md, "internal snapshot" / "external snapshot").
public enum SnapshotKind: String, Codable, Sendable, CaseIterable, Hashable {
    /// Inside the same image; the active image stays.
    case `internal`
    /// The old image becomes a read-only base (or a separate copy-on-write volume is made).
    case external
}

/// Whether a disk is at rest or open by a running virtual machine.
public enum DiskState: String, Codable, Sendable, CaseIterable, Hashable {
    /// No process holds the disk; the backend's tools may open it directly.
    case offline
    /// A running VM has the disk open; changes go through the hypervisor.
    case live
}

// MARK: - Disks and disk snapshots

/// One disk under vmsnap's management: its identity, backend and current active layer.
public struct DiskRecord: Codable, Sendable, Hashable {
    /// Stable identity: the locator the disk was first managed under (absolute path or `vg/lv`).
    public var id: String
    /// The backend that owns the disk.
    public var kind: BackendKind
    /// The image or volume a VM opens now. For file formats it moves on external snapshots.
    public var active: String
    /// The snapshot the active layer descends from now; parent of the next snapshot.
    public var current: String?
    /// When vmsnap first managed the disk (UTC, seconds).
    public var createdAt: Date

    public init(id: String, kind: BackendKind, active: String, current: String? = nil, createdAt: Date = .nowSeconds) {
        self.id = id
        self.kind = kind
        self.active = active
        self.current = current
        self.createdAt = createdAt
    }
}

/// A point-in-time copy of one disk, taken by its backend.
public struct DiskSnapshot: Codable, Sendable, Hashable, Identifiable {
    /// The snapshot's name, unique per disk.
    public var name: String
    /// Internal or external.
    public var kind: SnapshotKind
    /// Internal: the image that contains the snapshot. External: the read-only image (or volume)
    /// that holds the disk as it was.
    public var image: String
    /// The backend's own handle when it differs from the name (for example a qcow2 snapshot ID).
    public var backendID: String?
    /// The snapshot this one was taken after, in the disk's snapshot tree.
    public var parent: String?
    /// Creation time (UTC, whole seconds).
    public var createdAt: Date
    /// Free text supplied by the operator.
    public var description: String?
    /// Size of the virtual disk when the snapshot was taken, in bytes.
    public var virtualSize: UInt64

    public var id: String { name }

    public init(
        name: String, kind: SnapshotKind, image: String, backendID: String? = nil, parent: String? = nil,
        createdAt: Date = .nowSeconds, description: String? = nil, virtualSize: UInt64
    ) {
        self.name = name
        self.kind = kind
        self.image = image
        self.backendID = backendID
        self.parent = parent
        self.createdAt = createdAt
        self.description = description
        self.virtualSize = virtualSize
    }
}

/// One stored layer of a disk (an image file or a volume) and the layer it reads through to.
public struct DiskLayer: Codable, Sendable, Hashable {
    /// The image path or volume name.
    public var image: String
    /// The layer below it, or nil for a root. A backing outside the managed set is never modified.
    public var backing: String?

    public init(image: String, backing: String?) {
        self.image = image
        self.backing = backing
    }
}

/// Everything vmsnap knows about one disk: the record, its snapshots and its layers.
/// Backends plan operations from a layout and return the layout that results.
public struct DiskLayout: Codable, Sendable, Hashable {
    public var disk: DiskRecord
    public var snapshots: [DiskSnapshot]
    public var layers: [DiskLayer]

    public init(disk: DiskRecord, snapshots: [DiskSnapshot] = [], layers: [DiskLayer] = []) {
        self.disk = disk
        self.snapshots = snapshots
        self.layers = layers
    }

    /// The snapshot tree of this disk.
    public var tree: SnapshotTree<DiskSnapshot> { SnapshotTree(snapshots) }

    /// The snapshot with this name, if any.
    public func snapshot(named name: String) -> DiskSnapshot? { snapshots.first { $0.name == name } }

    /// The layer record of an image, if the image is managed.
    public func layer(_ image: String) -> DiskLayer? { layers.first { $0.image == image } }

    /// Managed layers that read through `image`.
    public func children(ofLayer image: String) -> [DiskLayer] { layers.filter { $0.backing == image } }

    /// Internal snapshots held inside `image`.
    public func internalSnapshots(in image: String) -> [DiskSnapshot] {
        snapshots.filter { $0.kind == .internal && $0.image == image }
    }

    /// The external snapshot whose frozen image is `image`, if any.
    public func externalSnapshot(frozenAt image: String) -> DiskSnapshot? {
        snapshots.first { $0.kind == .external && $0.image == image }
    }
}

/// What a backend reads off a disk's storage, without vmsnap's metadata.
public struct DiskInfo: Codable, Sendable, Hashable {
    /// The storage format (`qcow2`, `vpc`, `lvm-thin`, ...).
    public var format: String
    /// The size the guest sees, in bytes.
    public var virtualSize: UInt64
    /// Bytes used on the host.
    public var allocatedSize: UInt64?
    /// The chain below this layer, nearest first.
    public var backingChain: [String]
    /// Snapshots the storage itself holds (internal snapshots, snapshot volumes).
    public var snapshots: [StoredSnapshot]
    /// The format each image of `backingChain` is recorded as by the layer above it ("" where
    /// none is recorded); nil when the backend does not say.
    public var backingFormats: [String]?

    public init(
        format: String, virtualSize: UInt64, allocatedSize: UInt64? = nil, backingChain: [String] = [],
        snapshots: [StoredSnapshot] = [], backingFormats: [String]? = nil
    ) {
        self.format = format
        self.virtualSize = virtualSize
        self.allocatedSize = allocatedSize
        self.backingChain = backingChain
        self.snapshots = snapshots
        self.backingFormats = backingFormats
    }
}

/// A snapshot as the storage records it.
public struct StoredSnapshot: Codable, Sendable, Hashable {
    public var id: String
    public var name: String
    public var createdAt: Date
    public var virtualSize: UInt64
    public var stateSize: UInt64

    public init(id: String, name: String, createdAt: Date, virtualSize: UInt64, stateSize: UInt64 = 0) {
        self.id = id
        self.name = name
        self.createdAt = createdAt
        self.virtualSize = virtualSize
        self.stateSize = stateSize
    }
}

extension Date {
    /// Now, truncated to whole seconds (snapshot times are UTC seconds).
    public static var nowSeconds: Date { Date(timeIntervalSince1970: Date().timeIntervalSince1970.rounded(.down)) }
}
