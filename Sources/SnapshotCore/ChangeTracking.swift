import Foundation

/// How a backend tracks which blocks of a disk changed since a checkpoint, as data: the domain
/// layer reads it before it plans a checkpoint or an incremental backup, never the backend's kind.
public enum ChangeTracking: Codable, Sendable, Hashable {
    /// The image format keeps persistent dirty bitmaps (one per checkpoint) in the disk's active
    /// layer. While a guest runs, the hypervisor's block layer keeps them; while it is shut off,
    /// the backend adds, lists and removes them (``DiskSnapshotBackend/bitmaps(_:layer:)``). A new
    /// overlay gets a bitmap of each name its backing records, so after an external snapshot
    /// "changed since a checkpoint" is the union of that name down the chain.
    case imageBitmaps
    /// No changed-block tracking; the reason says why, and what would give it.
    case unavailable(reason: String)

    public var isAvailable: Bool {
        if case .imageBitmaps = self { return true }
        return false
    }

    /// One line for `backend list` and refusals.
    public var summary: String {
        switch self {
        case .imageBitmaps: return "persistent dirty bitmaps in the image"
        case .unavailable(let reason): return "none (\(reason))"
        }
    }
}

/// One dirty bitmap of a disk's active layer, as the image (or the hypervisor) reports it.
public struct DirtyBitmap: Codable, Sendable, Hashable {
    public var name: String
    /// Bytes each bit stands for.
    public var granularity: UInt64
    /// Kept in the image across restarts.
    public var persistent: Bool
    /// Records new writes now.
    public var recording: Bool
    /// The image says the bitmap may be wrong: a hypervisor that had it open died before it
    /// stored it (qcow2's `in-use` flag), or it failed to load. Never used for an incremental.
    public var inconsistent: Bool
    /// Bytes marked changed, when the reporter knows (a running hypervisor does).
    public var dirtyBytes: UInt64?

    public init(
        name: String, granularity: UInt64, persistent: Bool = true, recording: Bool = true,
        inconsistent: Bool = false, dirtyBytes: UInt64? = nil
    ) {
        self.name = name
        self.granularity = granularity
        self.persistent = persistent
        self.recording = recording
        self.inconsistent = inconsistent
        self.dirtyBytes = dirtyBytes
    }
}

/// Offline changed-block tracking: what a backend whose ``ChangeTracking`` is `.imageBitmaps`
/// does to a disk no guest has open. Every other backend keeps the defaults, which refuse.
extension DiskSnapshotBackend {
    public var changeTracking: ChangeTracking {
        .unavailable(reason: "backend '\(kind)' does not track changed blocks")
    }

    public func bitmaps(_ layout: DiskLayout, layer: String?) async throws -> [DirtyBitmap] {
        throw SnapshotError(.unsupported, "backend '\(kind)' has no dirty bitmaps")
    }

    public func addBitmap(_ name: String, layout: DiskLayout) async throws {
        throw SnapshotError(.unsupported, "backend '\(kind)' has no dirty bitmaps")
    }

    public func removeBitmap(_ name: String, layout: DiskLayout) async throws {
        throw SnapshotError(.unsupported, "backend '\(kind)' has no dirty bitmaps")
    }
}
