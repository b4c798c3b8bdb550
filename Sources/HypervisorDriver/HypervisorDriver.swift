import Foundation
import SnapshotCore

/// What a hypervisor can do for domain snapshots, as data: the domain layer checks it before it
/// plans, never the driver's name.
public struct HypervisorCapabilities: Codable, Sendable, Hashable {
    /// Memory saved while the guest keeps running (QEMU's background snapshot).
    public var liveMemorySave: Bool
    /// Memory saved with the guest paused for the save (`xl save -c`, a stopped migration).
    public var suspendedMemorySave: Bool
    /// Memory kept inside the disk images (QEMU's snapshot-save into qcow2).
    public var internalMemory: Bool
    /// Image formats whose snapshots the hypervisor takes itself while the guest runs, and which
    /// kinds (qcow2 internal and external through a QMP transaction).
    public var liveDiskSnapshotFormats: [String]
    public var liveDiskSnapshotKinds: [SnapshotKind]
    /// Filesystems frozen through a guest agent around a snapshot.
    public var quiesce: Bool
    /// A snapshot merged into the running layer while the guest runs (block-stream).
    public var liveMerge: Bool
    /// Changed-block tracking inside the hypervisor (dirty bitmaps), for disks whose image
    /// format keeps them (`dirtyBitmapFormats`).
    public var dirtyBitmaps: Bool
    public var dirtyBitmapFormats: [String] = []
    /// Point-in-time views (or push backups) one disk can have at once: QEMU 7.2 runs one
    /// backup job per disk, so a second copy-before-write view of a disk waits for the first.
    public var viewsPerDisk: Int = 1
    /// Disks exported to backup clients while the guest runs (NBD).
    public var blockExport: Bool
    /// Disks a backend may snapshot itself while the guest is paused (or suspended) with the
    /// hypervisor still holding them open, by source type: QEMU tolerates any; Xen's qdisk
    /// QEMU keeps image files open and locked, so only blkback's block devices qualify.
    public var pausedStorageSnapshotSources: [DiskSourceType] = [.file, .block, .network]
    /// The hypervisor can hold a running disk's point in time itself, so a storage-side snapshot
    /// leaves the guest's pause: a temporary overlay (of `backupImages.format`) taken in the
    /// pause's transaction takes the guest's writes, the storage snapshots the disk after the
    /// guest resumed (it is unwritten since the pause), and the overlay is merged back into the
    /// disk while the guest runs (``LiveDomain/mergeHeldOverlay(_:synced:)``).
    public var heldStorageSnapshots = false
    /// The hypervisor opens a disk vmsnap's disk server serves over NBD on a Unix socket
    /// (``HypervisorDrive/served``, ``HypervisorDrive/nbdSocket``).
    public var servedDisks = false

    public init(
        liveMemorySave: Bool, suspendedMemorySave: Bool, internalMemory: Bool, liveDiskSnapshotFormats: [String],
        liveDiskSnapshotKinds: [SnapshotKind], quiesce: Bool, liveMerge: Bool, dirtyBitmaps: Bool, blockExport: Bool,
        dirtyBitmapFormats: [String] = []
    ) {
        self.dirtyBitmapFormats = dirtyBitmapFormats
        self.liveMemorySave = liveMemorySave
        self.suspendedMemorySave = suspendedMemorySave
        self.internalMemory = internalMemory
        self.liveDiskSnapshotFormats = liveDiskSnapshotFormats
        self.liveDiskSnapshotKinds = liveDiskSnapshotKinds
        self.quiesce = quiesce
        self.liveMerge = liveMerge
        self.dirtyBitmaps = dirtyBitmaps
        self.blockExport = blockExport
    }

    /// Whether the hypervisor snapshots a disk of this format and kind itself while it runs.
    public func snapshotsLive(format: String, kind: SnapshotKind) -> Bool {
        liveDiskSnapshotFormats.contains(format) && liveDiskSnapshotKinds.contains(kind)
    }
}

/// One disk as a hypervisor opens it: the guest's device name and what its backend says.
public struct DomainDrive: Sendable, Hashable {
    public var target: String
    public var drive: HypervisorDrive

    public init(target: String, drive: HypervisorDrive) {
        self.target = target
        self.drive = drive
    }
}

/// How a domain starts.
public enum StartMode: Sendable, Hashable {
    /// Boot (vCPUs stopped with `paused`).
    case boot(paused: Bool)
    /// Load a memory image saved by ``LiveDomain/startMemorySave()``, then run or stay paused.
    case restoreMemory(path: String, running: Bool)
    /// Load a full-system snapshot kept inside the disk images.
    case loadInternal(name: String, running: Bool)
}

/// Progress of a long step (memory save or restore, merge), for terminals and `--json`.
public struct ProgressReport: Codable, Sendable, Hashable {
    public var phase: String
    public var done: UInt64
    public var total: UInt64
    public var bytesPerSecond: Double
    public var secondsLeft: Double?

    public init(phase: String, done: UInt64, total: UInt64, bytesPerSecond: Double, secondsLeft: Double?) {
        self.phase = phase
        self.done = done
        self.total = total
        self.bytesPerSecond = bytesPerSecond
        self.secondsLeft = secondsLeft
    }

    /// A report from bytes done of `total` after `seconds`.
    public static func measured(_ phase: String, done: UInt64, total: UInt64, seconds: Double) -> ProgressReport {
        let rate = seconds > 0 ? Double(done) / seconds : 0
        let whole = max(total, done)
        return ProgressReport(
            phase: phase, done: done, total: whole, bytesPerSecond: rate,
            secondsLeft: rate > 0 && whole > done ? Double(whole - done) / rate : nil)
    }
}

public typealias ProgressHandler = @Sendable (ProgressReport) -> Void

/// A disk snapshot the hypervisor takes while the guest runs.
public struct LiveDiskSnapshot: Sendable, Hashable {
    public var target: String
    public var name: String
    public var kind: SnapshotKind
    /// External: the new overlay that becomes the active layer.
    public var overlay: String?
    /// The overlay's image format.
    public var format: String

    public init(target: String, name: String, kind: SnapshotKind, overlay: String?, format: String) {
        self.target = target
        self.name = name
        self.kind = kind
        self.overlay = overlay
        self.format = format
    }
}

/// A running domain, as the domain layer drives it during a snapshot: a typed handle, not the
/// hypervisor's own protocol. Scoped: close it when done.
public protocol LiveDomain: Sendable {
    /// A mark in the domain's event history: pause windows and memory saves are measured and
    /// waited for from a mark on.
    func mark() async -> Int
    /// Milliseconds from the first pause to the last resume after `mark`, if both happened.
    func pauseWindow(since mark: Int) async -> Double?
    /// Where the pause after `mark` went, step by step as the hypervisor stamped it: each
    /// step's name and milliseconds, in order (empty where the hypervisor tells nothing).
    func pausePhases(since mark: Int) async -> [PausePhase]
    /// True while the vCPUs run.
    func isRunning() async throws -> Bool
    func pause() async throws
    func resume() async throws
    /// Everything a memory save needs before the pause: the file, the save's mode (live: the
    /// guest runs during the save). A driver may copy memory before the guest stops, inside
    /// ``pause()`` (a pre-copy, reporting progress there), so long as the memory it saves is
    /// the guest as ``pause()`` left it.
    func prepareMemorySave(to fd: Int32, live: Bool, guestBytes: UInt64, progress: ProgressHandler?) async throws
    /// Starts (or lets finish) the prepared save of the memory as the pause left it; a live save
    /// resumes the guest as soon as the memory's state is secured.
    func startMemorySave() async throws
    /// Waits for the save started after `mark` to finish, reporting progress from the file
    /// position; returns the downtime the hypervisor reports, in milliseconds.
    func finishMemorySave(fd: Int32, guestBytes: UInt64, since mark: Int, progress: ProgressHandler?) async throws
        -> Double?
    /// Lets a started memory save run to its end (rollback: cancelling one may hang the guest).
    func drainMemorySave() async
    /// How the last prepared live memory save keeps its point in time, in words for the
    /// snapshot's report (nil: nothing to say).
    func memorySaveMethod() async -> String?
    /// Does before the pause what it can for these disk snapshots (new overlays created and
    /// opened), so the pause holds only the switch; ``undoDiskSnapshot(_:)`` undoes it too.
    func prepareDiskSnapshots(_ snapshots: [LiveDiskSnapshot]) async throws
    /// Takes these disk snapshots at one instant: all or none.
    func snapshotDisks(_ snapshots: [LiveDiskSnapshot]) async throws
    /// Memory and every named disk inside the disk images (the guest stays paused meanwhile).
    func saveInternal(name: String, targets: [String]) async throws
    /// After external snapshots taken with the vCPUs stopped, gives each new active layer a
    /// recording dirty bitmap for each name its backing (`previous[target]`, the old active
    /// image) records, so checkpoints keep tracking across the snapshot with no write missed.
    func carryDirtyBitmaps(_ previous: [String: String]) async throws
    /// Adds a persistent, recording dirty bitmap `name` to each disk's active layer at one
    /// instant (a checkpoint taken with a snapshot, while the vCPUs are stopped).
    func addDirtyBitmaps(_ name: String, targets: [String]) async throws
    /// Undoes a disk snapshot taken by ``snapshotDisks(_:)`` while the domain still runs.
    func undoDiskSnapshot(_ snapshot: LiveDiskSnapshot) async throws
    /// Merges a held disk's temporary overlay (an external ``snapshotDisks(_:)`` made only to
    /// hold the disk still) back into the image under it while the guest runs and switches the
    /// guest back to that image; the caller removes the overlay file. `synced` runs once the
    /// image below has caught up with the overlay, just before the switch (the hypervisor may
    /// still be copying the newest writes: a caller that must know exactly when the overlay went
    /// stale stops the guest there); when this returns the switch is done. Takes over a merge a
    /// killed caller left.
    func mergeHeldOverlay(_ snapshot: LiveDiskSnapshot, synced: () async throws -> Void) async throws
    /// Deletes an internal snapshot from the image the domain has open; nothing if it is gone.
    func deleteInternalSnapshot(target: String, name: String) async throws
    /// Merges the running layer's backing image into it, so the layer reads through `base`
    /// (nil: nothing) instead; the snapshot frozen in the backing image can then go.
    func mergeIntoActive(target: String, base: String?, progress: ProgressHandler?) async throws
    /// Merges the backing image of `layer`, a read-only layer of the running chain below the
    /// running one, into it, so `layer` reads through `base` (nil: nothing) instead; the snapshot
    /// frozen in that backing image can then go while the guest runs.
    func mergeIntoLayer(target: String, layer: String, base: String?, progress: ProgressHandler?) async throws
    /// Freezes the guest's filesystems through its agent; returns how many were frozen. Throws,
    /// having frozen nothing, when there is no agent or it does not answer in time.
    func freezeFilesystems() async throws -> Int
    /// Thaws what ``freezeFilesystems()`` froze.
    func thawFilesystems() async throws
    /// True while the connection to the hypervisor is open.
    func isConnected() async -> Bool
    func close() async
}

extension LiveDomain {
    public func mergeHeldOverlay(_ snapshot: LiveDiskSnapshot, synced: () async throws -> Void) async throws {
        throw SnapshotError(.unsupported, "this hypervisor does not hold disks with temporary overlays")
    }

    public func mergeIntoLayer(target: String, layer: String, base: String?, progress: ProgressHandler?) async throws {
        throw SnapshotError(
            .unsupported,
            "disk \(target): this hypervisor merges only into the running layer; stop the domain to delete a snapshot further down its chain"
        )
    }
}

/// One step of a guest's pause, as the hypervisor's own clock measured it.
public struct PausePhase: Codable, Sendable, Hashable {
    public var name: String
    public var ms: Double
    public init(name: String, ms: Double) {
        self.name = name
        self.ms = ms
    }
}

extension LiveDomain {
    public func pausePhases(since mark: Int) async -> [PausePhase] { [] }
    public func memorySaveMethod() async -> String? { nil }

    /// Nothing to prepare: the disk snapshots happen whole inside the pause.
    public func prepareDiskSnapshots(_ snapshots: [LiveDiskSnapshot]) async throws {}
}

/// A domain the hypervisor runs that vmsnap did not define, as the driver reads it back: the
/// definition without backends (the domain layer finds each disk's backend from its format and
/// source type), and what the driver does not model, by name.
public struct AdoptedDomain: Sendable, Hashable {
    public struct Disk: Sendable, Hashable {
        public var target: String
        public var path: String
        public var format: String
        public var sourceType: DiskSourceType

        public init(target: String, path: String, format: String, sourceType: DiskSourceType) {
            self.target = target
            self.path = path
            self.format = format
            self.sourceType = sourceType
        }
    }

    public var name: String
    public var uuid: UUID
    public var memoryMiB: Int
    public var vcpus: Int
    public var boot: DomainBoot
    public var accel: String
    public var disks: [Disk]
    /// Devices and settings a vmsnap definition does not carry and the driver does not keep: a
    /// revert recreates the domain without them.
    public var notModeled: [String]
    /// The driver's own configuration of what the definition does not model
    /// (``DomainDefinition/hypervisorConfig``), kept so that a revert recreates them.
    public var kept: String?
    /// What `kept` holds, by name (`nics (1)`, a read-only drive).
    public var keptItems: [String]

    public init(
        name: String, uuid: UUID, memoryMiB: Int, vcpus: Int, boot: DomainBoot, accel: String, disks: [Disk],
        notModeled: [String], kept: String? = nil, keptItems: [String] = []
    ) {
        self.kept = kept
        self.keptItems = keptItems
        self.name = name
        self.uuid = uuid
        self.memoryMiB = memoryMiB
        self.vcpus = vcpus
        self.boot = boot
        self.accel = accel
        self.disks = disks
        self.notModeled = notModeled
    }
}

/// A hypervisor as domain snapshots need it: lifecycle, memory save and restore, and the
/// live-disk handle. Conformers: QEMUDriver (QMP), XenDriver (libxl).
public protocol HypervisorDriver: Sendable {
    /// The name a domain definition's `hypervisor` field uses (`qemu`).
    var name: String { get }
    var capabilities: HypervisorCapabilities { get }
    /// Refuses what this hypervisor cannot run (accelerator names, options), before anything changes.
    func validate(_ definition: DomainDefinition) throws
    /// The hypervisor process of the domain, if it runs.
    func pid(_ domain: String) -> Int32?
    /// True while the domain exists (running, paused or suspended).
    func isRunning(_ domain: String) -> Bool
    /// The accelerator the domain runs (or would run) with, for `domain status`.
    func accelerator(_ definition: DomainDefinition) -> String
    func runState(_ domain: String) async throws -> DomainRunState
    func start(_ definition: DomainDefinition, drives: [DomainDrive], mode: StartMode, progress: ProgressHandler?)
        async throws
    /// Ends the domain at once (a pulled plug); nothing if it does not run.
    func destroy(_ domain: String) async throws
    /// Asks the guest to power off; false if it did not within `timeout`.
    func shutdown(_ domain: String, timeout: Duration) async throws -> Bool
    func pause(_ domain: String) async throws
    func resume(_ domain: String) async throws
    /// A handle on the running domain.
    func connect(_ domain: String) async throws -> any LiveDomain
    /// The guest's console log.
    func consoleLog(_ domain: String) -> String
    /// libvirt's `<domain type>` for this domain (`kvm`, `qemu`, `xen`), for snapshot XML.
    func libvirtDomainType(_ definition: DomainDefinition) -> String
    /// The domain's hardware beyond its disks in libvirt's terms, so that libvirt starts the
    /// same machine from vmsnap's XML (and can load its saved state).
    func libvirtHardware(_ definition: DomainDefinition) -> LibvirtHardware
    /// The accelerator setting for a libvirt domain of this `<domain type>`, or nil if this
    /// driver does not run such domains (`domain import`).
    func accelerator(forLibvirtType type: String) -> String?
    /// The block layer over the domain's disks: the running hypervisor's, or for a shut-off
    /// domain a storage daemon over `drives` (started, or found still running from an earlier
    /// command). Formats it cannot track changes in are named in `capabilities`.
    func blockLayer(_ definition: DomainDefinition, drives: [DomainDrive]) async throws -> any BlockLayer
    /// True while a storage daemon holds the shut-off domain's disks (a backup of it runs).
    func storageDaemonRuns(_ domain: String) -> Bool
    /// The tool backup images are made with.
    var backupImages: any BackupImageTool { get }
    /// Reads back a domain this hypervisor runs that an operator created by other means
    /// (`xl create`), for `vmsnap domain adopt`.
    func adopt(_ domain: String) async throws -> AdoptedDomain
}

extension HypervisorDriver {
    public func isRunning(_ domain: String) -> Bool { pid(domain) != nil }

    public func libvirtHardware(_ definition: DomainDefinition) -> LibvirtHardware { LibvirtHardware() }

    public func adopt(_ domain: String) async throws -> AdoptedDomain {
        throw SnapshotError(
            .unsupported,
            "the \(name) driver cannot adopt a domain it did not start (for libvirt's domains: `vmsnap domain import`)")
    }
}

/// A domain's virtual hardware beyond its disks, as libvirt's `<domain>` XML has to say it so that
/// libvirt starts the same machine (and its QEMU can load the device state vmsnap's saved: a
/// migration stream loads only into the same devices in the same places).
public struct LibvirtHardware: Sendable, Hashable {
    /// `<os><type machine=...>`.
    public var machine: String
    /// Elements inside `<features>` (`acpi`).
    public var features: [String]
    /// The PCI slot of the first disk on bus 0; the next disks take the slots after it, in
    /// definition order. nil: libvirt places them.
    public var firstDiskSlot: Int?
    /// A serial port (port 0): the console.
    public var serialConsole: Bool
    /// The PCI slot of a virtio-serial controller carrying the guest agent's channel
    /// (`org.qemu.guest_agent.0`, port 1); nil: no such channel.
    public var agentChannelSlot: Int?
    /// No USB controller and no memory balloon (libvirt adds both unless told not to).
    public var withoutUSBAndBalloon: Bool

    public init(
        machine: String = "pc", features: [String] = [], firstDiskSlot: Int? = nil, serialConsole: Bool = false,
        agentChannelSlot: Int? = nil, withoutUSBAndBalloon: Bool = false
    ) {
        self.machine = machine
        self.features = features
        self.firstDiskSlot = firstDiskSlot
        self.serialConsole = serialConsole
        self.agentChannelSlot = agentChannelSlot
        self.withoutUSBAndBalloon = withoutUSBAndBalloon
    }
}

/// Hypervisor drivers by name: a domain definition names its hypervisor, the registry
/// resolves it.
public struct HypervisorDrivers: Sendable {
    private var drivers: [String: any HypervisorDriver] = [:]

    public init(_ drivers: [any HypervisorDriver] = []) {
        for d in drivers { self.drivers[d.name] = d }
    }

    public var names: [String] { drivers.keys.sorted() }

    /// Every driver, by name.
    public var all: [any HypervisorDriver] { names.compactMap { drivers[$0] } }

    public func driver(_ name: String) throws -> any HypervisorDriver {
        guard let d = drivers[name] else {
            throw SnapshotError(
                .unsupported,
                "no hypervisor driver named '\(name)' in this build (drivers: \(names.joined(separator: ", ")))")
        }
        return d
    }

    public func driver(for definition: DomainDefinition) throws -> any HypervisorDriver {
        do { return try driver(definition.hypervisor) } catch let e as SnapshotError {
            throw SnapshotError(e.code, "domain '\(definition.name)': \(e.message)")
        }
    }
}
