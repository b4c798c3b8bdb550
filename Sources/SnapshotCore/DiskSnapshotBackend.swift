import Foundation

/// The version of the backend protocol this core speaks. A backend declares the version it was
/// written against; the registry refuses one it cannot drive.
public let diskSnapshotBackendAPIVersion = 1

/// Who a backend is and what it can do.
public struct BackendDescriptor: Codable, Sendable, Hashable {
    public var kind: BackendKind
    public var apiVersion: Int
    /// One line for `vmsnap backend list`.
    public var summary: String
    public var capabilities: CapabilityTable
    /// The settings the backend reads, with their types, defaults and help.
    public var settings: [SettingSpec]
    /// Who takes a snapshot while a running guest has the disk open.
    public var liveSnapshots: LiveSnapshotTaker
    /// The image format hypervisors and libvirt name the disk with (`qcow2`, `vpc`, `raw`).
    public var imageFormat: String
    /// How a domain definition names the disk: a file, a block device, a network volume.
    public var sourceType: DiskSourceType
    /// The programs its plans run (`.run` steps). Recovery runs a journaled command only if it
    /// starts with one of them, so a tampered journal cannot make vmsnap run anything else.
    public var tools: [String]
    /// The storage keeps vmsnap's record of each disk (layout, open journals) and a lock for
    /// every host that reaches it (cluster storage): see SharedMetadata.swift. False: the record
    /// lives in this host's store only.
    public var sharedMetadata: Bool
    /// The storage reports, from its own metadata, which extents differ between a snapshot and
    /// a newer view of the disk (``DiskSnapshotBackend/changes(_:from:to:)``, SnapshotChanges.swift).
    public var reportsChanges: Bool

    public init(
        kind: BackendKind, apiVersion: Int = diskSnapshotBackendAPIVersion, summary: String,
        capabilities: CapabilityTable,
        settings: [SettingSpec] = [], liveSnapshots: LiveSnapshotTaker = .none, imageFormat: String,
        sourceType: DiskSourceType = .file, tools: [String] = [], sharedMetadata: Bool = false,
        reportsChanges: Bool = false
    ) {
        self.tools = tools
        self.reportsChanges = reportsChanges
        self.sharedMetadata = sharedMetadata
        self.kind = kind
        self.apiVersion = apiVersion
        self.summary = summary
        self.capabilities = capabilities
        self.settings = settings
        self.liveSnapshots = liveSnapshots
        self.imageFormat = imageFormat
        self.sourceType = sourceType
    }

    enum CodingKeys: String, CodingKey {
        case kind, apiVersion, summary, capabilities, settings, liveSnapshots, imageFormat, sourceType, tools
        case sharedMetadata, reportsChanges
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        kind = try c.decode(BackendKind.self, forKey: .kind)
        apiVersion = try c.decodeIfPresent(Int.self, forKey: .apiVersion) ?? diskSnapshotBackendAPIVersion
        summary = try c.decode(String.self, forKey: .summary)
        capabilities = try c.decode(CapabilityTable.self, forKey: .capabilities)
        settings = try c.decodeIfPresent([SettingSpec].self, forKey: .settings) ?? []
        liveSnapshots = try c.decodeIfPresent(LiveSnapshotTaker.self, forKey: .liveSnapshots) ?? .none
        imageFormat = try c.decode(String.self, forKey: .imageFormat)
        sourceType = try c.decodeIfPresent(DiskSourceType.self, forKey: .sourceType) ?? .file
        tools = try c.decodeIfPresent([String].self, forKey: .tools) ?? []
        sharedMetadata = try c.decodeIfPresent(Bool.self, forKey: .sharedMetadata) ?? false
        reportsChanges = try c.decodeIfPresent(Bool.self, forKey: .reportsChanges) ?? false
    }
}

/// Who takes a disk snapshot while a running guest has the disk open.
public enum LiveSnapshotTaker: String, Codable, Sendable, Hashable, CaseIterable {
    /// The hypervisor, inside its block layer (a QMP transaction for qcow2).
    case hypervisor
    /// The storage, while the hypervisor holds the guest paused and flushed (LVM, copies).
    case storage
    /// Either, depending on the snapshot kind or the hypervisor.
    case both
    /// Not while a guest runs.
    case none
}

/// A request to take a disk snapshot.
public struct SnapshotRequest: Codable, Sendable, Hashable {
    public var name: String
    public var kind: SnapshotKind
    public var description: String?
    /// Where the new active layer goes (file backends); nil keeps it beside the active image.
    public var overlayDirectory: String?

    public init(name: String, kind: SnapshotKind, description: String? = nil, overlayDirectory: String? = nil) {
        self.name = name
        self.kind = kind
        self.description = description
        self.overlayDirectory = overlayDirectory
    }
}

/// How to delete a snapshot.
public enum DeleteMode: String, Codable, Sendable, CaseIterable {
    /// Remove the snapshot and merge its changes into its children so they stay valid.
    case merge
    /// Remove the snapshot and its whole subtree.
    case children
    /// Remove the subtree below the snapshot, keep the snapshot.
    case childrenOnly = "children-only"
}

/// Which view of a disk to read or write in the data-access calls.
public enum DataView: Sendable, Hashable {
    /// What the VM sees now.
    case active
    /// The disk as it was at a snapshot (read only).
    case snapshot(String)
}

/// A storage backend: inspects disks and plans snapshot operations that the core journals and runs.
///
/// Backends plan; they do not keep metadata. Every change comes back as a ``Plan`` of idempotent
/// steps and the ``DiskLayout`` that results, so the core can journal it, run it, and recover
/// it after a crash. Validation (names, locks, formats, capabilities) happens while planning,
/// before anything changes.
public protocol DiskSnapshotBackend: Sendable {
    /// Kind, API version, summary and capability table.
    var descriptor: BackendDescriptor { get }

    /// The canonical form of a locator (an absolute path for file backends); the default keeps it.
    func normalize(locator: String) -> String

    /// True if `locator` looks like a disk of this backend (cheap: a magic number, a name form).
    func recognizes(locator: String) async -> Bool

    /// The disk as its storage describes it.
    func inspect(locator: String) async throws -> DiskInfo

    /// The layout of a disk vmsnap starts to manage: snapshots already in the storage are imported.
    func adopt(locator: String) async throws -> DiskLayout

    /// Whether the disk is open by a running VM now.
    func state(of layout: DiskLayout) async throws -> DiskState

    /// Plan a snapshot of the disk. `request.name` has passed ``SnapshotName/validate(_:)``.
    func planCreate(_ request: SnapshotRequest, layout: DiskLayout) async throws -> Plan

    /// Plan a revert of the disk to `snapshot`.
    func planRevert(to snapshot: String, layout: DiskLayout) async throws -> Plan

    /// Plan the deletion of `snapshot`.
    func planDelete(_ snapshot: String, mode: DeleteMode, layout: DiskLayout) async throws -> Plan

    /// Perform a `.backend` step action (native engines). Must be idempotent.
    func perform(_ name: String, arguments: [String: String]) async throws

    /// Check every layer of the disk with the format's own checker; returns the problems found.
    func verify(layout: DiskLayout) async throws -> [String]

    /// Upkeep that keeps snapshots valid without changing guest data (`vmsnap disk check
    /// --repair`), such as growing a copy-on-write area or a thin pool that is filling up. Returns
    /// one line per action taken; the default takes none.
    func maintain(layout: DiskLayout) async throws -> [String]

    // MARK: Data access (the conformance suite and the demo read and write guest bytes)

    /// Create a new empty disk of `size` bytes named `name` in `pool`, returning its locator.
    func createDisk(named name: String, size: UInt64, in pool: BackendPool) async throws -> String

    /// Remove a disk made by ``createDisk(named:size:in:)`` and every layer vmsnap made for it.
    func destroyDisk(layout: DiskLayout) async throws

    /// Write `bytes` at `offset` of the disk's active view.
    func write(_ bytes: [UInt8], at offset: UInt64, layout: DiskLayout) async throws

    /// Read `length` bytes at `offset` of a view of the disk.
    func read(_ view: DataView, at offset: UInt64, length: Int, layout: DiskLayout) async throws -> [UInt8]

    /// Things in the pool that a failed operation could have left behind (files, volumes), so a
    /// test can check that nothing was created.
    func poolInventory(_ pool: BackendPool) async throws -> [String]

    // MARK: Hypervisor integration (defaults: not openable, no live snapshots)

    /// How a hypervisor opens the disk's active layer: a path and its image format.
    /// Throws `unsupported` with the reason when the hypervisor cannot open the layering.
    func hypervisorDrive(_ layout: DiskLayout) throws -> HypervisorDrive

    /// The disk's data through the backend's own engine, for vmsnap's disk server to serve to a
    /// hypervisor that cannot open the format (``HypervisorDrive/served``): opened at the active
    /// layer, writable. The default throws `unsupported`.
    func openServed(_ layout: DiskLayout) throws -> any ServedImage

    /// Plans a snapshot that the hypervisor takes while the disk is open (a QMP transaction
    /// action): the plan's `result` is the layout afterwards and `steps` stay empty; the caller
    /// performs the live action and records the result. Throws `unsupported` where only the
    /// backend's own (offline) path works.
    func planLiveCreate(_ request: SnapshotRequest, layout: DiskLayout) async throws -> Plan

    /// What a revert to `snapshot` would discard or what stands in its way (newer snapshots,
    /// clones), asked before anything changes; the default finds nothing.
    func rollbackBlockers(to snapshot: String, layout: DiskLayout) async throws -> [RollbackBlocker]

    /// Undoes, offline, a snapshot a hypervisor took (``planLiveCreate``) that vmsnap never
    /// recorded because the hypervisor died first: `before` is the layout then, `after` the one
    /// the live plan promised. Idempotent; the default has nothing to undo.
    func undoUnrecordedLiveSnapshot(_ name: String, kind: SnapshotKind, before: DiskLayout, after: DiskLayout?)
        async throws

    /// Repairs what a hypervisor that died with the disk open can leave behind (leaked
    /// clusters), without changing guest data; the default has nothing to repair.
    func repairAfterHypervisorCrash(_ layout: DiskLayout) async throws

    // MARK: Changed-block tracking (defaults: none; ChangeTracking.swift)

    /// How this backend tracks changed blocks for checkpoints and incremental backups.
    var changeTracking: ChangeTracking { get }
    /// The dirty bitmaps of one layer of the disk (`layer` nil: the active one) while no guest
    /// has it open. After an external snapshot a checkpoint's bitmap has a part in each layer
    /// from the one it was taken in up to the active one.
    func bitmaps(_ layout: DiskLayout, layer: String?) async throws -> [DirtyBitmap]
    /// Adds a persistent, recording bitmap to the active layer (offline). Idempotent.
    func addBitmap(_ name: String, layout: DiskLayout) async throws
    /// Removes a bitmap from the active layer (offline); nothing if it is not there.
    func removeBitmap(_ name: String, layout: DiskLayout) async throws

    /// The extents that differ between `snapshot` and a newer view of the disk (another
    /// snapshot, or the disk now), from the storage's metadata; for a backend that declares
    /// ``BackendDescriptor/reportsChanges`` (default: refused).
    func changes(_ layout: DiskLayout, from snapshot: String, to view: DataView) async throws -> DiskChanges

    // MARK: Metadata shared through the storage (defaults: none; SharedMetadata.swift)

    /// Takes the storage's lock on the disk's shared record for `holder` (a lease the backend
    /// keeps renewing until ``unlockShared(disk:)``), waiting up to `wait` seconds for another
    /// holder; `busy`, naming the holder, when the wait runs out. A holder whose lease ran out is
    /// fenced from the storage before the lock is taken over.
    func lockShared(disk: String, holder: String, wait: TimeInterval) async throws -> SharedLockGrant
    /// Releases the lock; nothing if it is not held.
    func unlockShared(disk: String) async throws
    /// The disk's shared record (a JSON document vmsnap wrote), or nil if there is none.
    func readShared(disk: String) async throws -> String?
    /// Replaces the disk's shared record; refused (`conflict`) unless this backend holds the lock.
    func writeShared(disk: String, document: String) async throws
}

/// Something a revert would discard (shown to the operator) or that stands in its way (a
/// blocking one refuses the revert before anything changes).
public struct RollbackBlocker: Codable, Sendable, Hashable, CustomStringConvertible {
    /// `newer-snapshot`, `clone`, `unsaved-changes`, ...
    public var kind: String
    public var detail: String
    public var blocking: Bool

    public init(kind: String, detail: String, blocking: Bool) {
        self.kind = kind
        self.detail = detail
        self.blocking = blocking
    }

    enum CodingKeys: String, CodingKey { case kind, detail, blocking }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        kind = try c.decode(String.self, forKey: .kind)
        detail = try c.decode(String.self, forKey: .detail)
        blocking = try c.decodeIfPresent(Bool.self, forKey: .blocking) ?? false
    }

    public var description: String { "\(kind): \(detail)" }
}

/// How a domain definition names a disk's source (libvirt's `<disk type=...>`).
public enum DiskSourceType: String, Codable, Sendable, Hashable {
    case file, block, network
}

/// A disk as a hypervisor opens it.
public struct HypervisorDrive: Sendable, Hashable {
    public var path: String
    /// The image format a hypervisor opens it with (libvirt's driver type): qcow2,
    /// vpc, raw.
    public var format: String
    /// True when the hypervisor can take this disk's snapshots live (QMP); else vmsnap takes
    /// them through the backend while the vCPUs are paused.
    public var liveSnapshots: Bool
    /// A file, a block device or a network volume.
    public var sourceType: DiskSourceType
    /// The hypervisor can keep a full-system snapshot's memory inside this image (qcow2's
    /// vmstate area).
    public var holdsInternalMemory: Bool
    /// The hypervisor cannot open this image's layering (a differencing VHD under QEMU): vmsnap's
    /// disk server serves the disk's data (``DiskSnapshotBackend/openServed(_:)``) and the
    /// hypervisor opens that export instead of `path`.
    public var served: Bool
    /// Set by the domain layer for a served disk: the Unix socket of the disk server's NBD export.
    public var nbdSocket: String?

    public init(
        path: String, format: String, liveSnapshots: Bool = false, sourceType: DiskSourceType = .file,
        holdsInternalMemory: Bool = false, served: Bool = false
    ) {
        self.served = served
        self.path = path
        self.format = format
        self.liveSnapshots = liveSnapshots
        self.sourceType = sourceType
        self.holdsInternalMemory = holdsInternalMemory
    }
}

extension DiskSnapshotBackend {
    public var kind: BackendKind { descriptor.kind }

    public func perform(_ name: String, arguments: [String: String]) async throws {
        throw SnapshotError(.unsupported, "backend '\(kind)' has no native step '\(name)'")
    }

    public func state(of layout: DiskLayout) async throws -> DiskState { .offline }

    public func normalize(locator: String) -> String { locator }

    public func verify(layout: DiskLayout) async throws -> [String] { [] }

    public func maintain(layout: DiskLayout) async throws -> [String] { [] }

    public func hypervisorDrive(_ layout: DiskLayout) throws -> HypervisorDrive {
        throw SnapshotError(.unsupported, "backend '\(kind)' does not say how a hypervisor opens its disks")
    }

    public func openServed(_ layout: DiskLayout) throws -> any ServedImage {
        throw SnapshotError(.unsupported, "backend '\(kind)' cannot serve its disks' data itself")
    }

    public func planLiveCreate(_ request: SnapshotRequest, layout: DiskLayout) async throws -> Plan {
        throw SnapshotError(.unsupported, "backend '\(kind)' takes no snapshots through the hypervisor")
    }

    public func rollbackBlockers(to snapshot: String, layout: DiskLayout) async throws -> [RollbackBlocker] { [] }

    public func undoUnrecordedLiveSnapshot(_ name: String, kind: SnapshotKind, before: DiskLayout, after: DiskLayout?)
        async throws
    {}

    public func repairAfterHypervisorCrash(_ layout: DiskLayout) async throws {}

    public func lockShared(disk: String, holder: String, wait: TimeInterval) async throws -> SharedLockGrant {
        throw SnapshotError(.unsupported, "backend '\(kind)' keeps no metadata in its storage")
    }
    public func unlockShared(disk: String) async throws {}
    public func readShared(disk: String) async throws -> String? { nil }
    public func writeShared(disk: String, document: String) async throws {
        throw SnapshotError(.unsupported, "backend '\(kind)' keeps no metadata in its storage")
    }
}

/// Where a backend may create scratch disks: a directory for file formats, a volume group for
/// LVM, with backend-specific options.
public struct BackendPool: Codable, Sendable, Hashable {
    /// A directory for file-based backends (and for scratch files of any backend).
    public var directory: String
    /// Backend-specific settings (`vg`, `thin-pool`, `cow-size`, ...).
    public var options: [String: String]

    public init(directory: String, options: [String: String] = [:]) {
        self.directory = directory
        self.options = options
    }
}
