import Foundation
import HypervisorDriver
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// What `vmsnap snapshot create` asks for.
public struct DomainSnapshotRequest: Sendable, Hashable {
    public var name: String?
    public var description: String?
    /// No memory, even when the domain runs.
    public var diskOnly = false
    /// Targets to include; nil includes every disk.
    public var targets: [String]?
    /// Disk snapshot kind; nil: each backend's default (internal where it has it).
    public var kind: SnapshotKind?
    /// Where the memory image goes (external memory); nil: `<store>/memory/<domain>/<name>.vmstate`.
    public var memoryFile: String?
    /// Memory inside the qcow2 images (QEMU's snapshot-save job; every disk must be qcow2).
    public var internalMemory = false
    /// Keep the guest paused for the whole memory save instead of saving it live.
    public var pausedSave = false
    /// Freeze guest filesystems through the QEMU guest agent first.
    public var quiesce = false
    /// Take this checkpoint at the snapshot's instant.
    public var checkpoint: String?

    public init(
        name: String? = nil, description: String? = nil, diskOnly: Bool = false, targets: [String]? = nil,
        kind: SnapshotKind? = nil,
        memoryFile: String? = nil, internalMemory: Bool = false, pausedSave: Bool = false, quiesce: Bool = false,
        checkpoint: String? = nil
    ) {
        self.checkpoint = checkpoint
        self.name = name
        self.description = description
        self.diskOnly = diskOnly
        self.targets = targets
        self.kind = kind
        self.memoryFile = memoryFile
        self.internalMemory = internalMemory
        self.pausedSave = pausedSave
        self.quiesce = quiesce
    }
}

/// What a domain operation journals: enough to finish or roll it back after a crash.
struct DomainJournal: Codable, Sendable {
    enum Operation: String, Codable, Sendable { case create, revert, delete }
    var operation: Operation
    var snapshot: String
    var record: DomainSnapshotRecord?
    /// Phases passed, in order.
    var phases: [String] = []
    /// Disk targets whose part is done.
    var disksDone: [String] = []
    /// Layouts before live (hypervisor-made) disk snapshots, by target.
    var liveBefore: [String: DiskLayout] = [:]
    /// Layouts after them, by target.
    var liveAfter: [String: DiskLayout] = [:]
    /// The domain was running and vmsnap paused it.
    var pausedByUs = false
    /// The checkpoint taken with the snapshot (create), removed again by a rollback.
    var checkpoint: CheckpointRecord?
    /// Held disks (create): target -> the temporary overlay that takes the guest's writes from the
    /// pause until the storage snapshot is taken; a rollback merges it back into the disk.
    var held: [String: String]?
    /// Held disks switched back to their disk (journaled before the guest runs again): their
    /// overlays are stale and never merged again.
    var heldSwitched: [String]?
    /// Held disks: target -> the path the hypervisor reads the disk by (the overlay's backing).
    var heldBacking: [String: String]?
    /// Revert: the run state to end in. Delete: the snapshots to remove and the mode.
    var targetState: DomainRunState?
    var removing: [String] = []
    var mode: DeleteMode?
}

/// Measured during a live snapshot, for benchmarks and `--json`.
public struct CreateReport: Codable, Sendable, Hashable {
    public var snapshot: DomainSnapshotRecord
    /// Guest pause from QMP STOP to RESUME events, in milliseconds (running domains).
    public var pauseMs: Double?
    /// vmsnap's share of the pause: from the guest stopped to the memory save let go (the disk
    /// snapshots; the rest is the hypervisor's: its last memory round or its save's setup, and
    /// the resume).
    public var ownPauseMs: Double?
    /// The pause step by step, as the hypervisor stamped it.
    public var pausePhases: [PausePhase]?
    /// Held disks: how long the guest stopped, after the snapshot, for their switches back from
    /// the temporary overlays (milliseconds, all held disks together).
    public var switchPauseMs: Double?
    /// Served disks: how long the guest's requests to them waited (the disk server held from
    /// inside the pause until its storage snapshot was taken, after the resume), milliseconds.
    public var servedWaitMs: Double?
    /// Downtime the hypervisor reported for the memory save.
    public var qemuDowntimeMs: Double?
    /// How the hypervisor saved the memory of a running guest, in its words.
    public var memorySaveMethod: String?
    /// Wall time of the memory save, in seconds.
    public var memorySeconds: Double?
    /// Filesystems the guest agent froze (`--quiesce`).
    public var frozenFilesystems: Int?
}

extension DomainService {
    func journal(_ id: Int64, _ j: DomainJournal) throws {
        try store.updateDomainJournal(id, payload: try JSONEncoder().encode(j))
    }

    func phase(_ id: Int64, _ j: inout DomainJournal, _ name: String) throws {
        j.phases.append(name)
        try journal(id, j)
        DomainFault.point(
            "\(j.operation.rawValue):\(name)", hypervisor: j.record.flatMap { hypervisorProcess($0.domain) })
    }

    /// One disk's part in a snapshot being taken.
    struct DiskPart: Sendable {
        var disk: DomainDisk
        var backend: any DiskSnapshotBackend
        var layout: DiskLayout
        var kind: SnapshotKind
        /// The hypervisor takes this disk's snapshot: the layout it will have.
        var live: Plan?
        var drive: HypervisorDrive?
        /// The storage takes this disk's snapshot after the guest resumed: the hypervisor holds
        /// the disk's point in time (a temporary overlay takes the writes) until it is taken.
        var held = false
        /// vmsnap's disk server serves this disk to the hypervisor: the backend takes the
        /// snapshot offline while the server is held (DiskServers.swift).
        var served = false

        /// What the hypervisor is asked to take.
        func liveSnapshot(_ name: String) -> LiveDiskSnapshot {
            LiveDiskSnapshot(
                target: disk.target, name: name, kind: kind,
                overlay: kind == .external ? live?.result.disk.active : nil, format: drive?.format ?? "")
        }
    }

    /// Takes a domain snapshot: checks the request, plans every disk and reserves the memory
    /// image before anything changes, then journals and takes it (offline, or live with the
    /// guest paused only for the disk snapshots).
    @discardableResult
    public func createSnapshot(domain: String, _ request: DomainSnapshotRequest) async throws -> CreateReport {
        let lock = try domainLock(domain)
        defer { withExtendedLifetime(lock) {} }
        try await recover(domain: domain)
        try requireNoViews(domain, doing: "take a snapshot")
        let (definition, current) = try definition(domain)
        let driver = try drivers.driver(for: definition)
        let existing = try store.domainSnapshots(of: domain)
        let name = request.name ?? Self.generatedName(existing: Set(existing.map(\.name)))
        let state = try await driver.runState(domain)
        try checkRequest(request, name: name, domain: domain, definition: definition, existing: existing, state: state)
        if request.quiesce, !driver.capabilities.quiesce {
            throw SnapshotError(
                .unsupported, "--quiesce: the \(driver.name) driver cannot freeze a guest's filesystems")
        }
        let withMemory = !request.diskOnly && state != .shutoff
        try checkDeviceStateCopy(definition, snapshot: name, internalMemory: withMemory && request.internalMemory)
        let (parts, excluded) = try await planDisks(
            request, name: name, definition: definition, driver: driver, state: state)

        // The memory image: reserve its space first, so a full filesystem fails before anything changes.
        var memory: MemoryImage?
        var memoryFD: Int32 = -1
        if withMemory {
            if request.internalMemory {
                memory = MemoryImage(location: .internal, path: parts[0].disk.target)
            } else {
                let path =
                    request.memoryFile.map { URL(fileURLWithPath: $0).standardizedFileURL.path }
                    ?? (store.directory as NSString).appendingPathComponent("memory/\(domain)/\(name).vmstate")
                memoryFD = try Self.reserveMemoryFile(path, bytes: UInt64(definition.memoryMiB) << 20)
                memory = MemoryImage(location: .external, path: path)
            }
        }
        defer { if memoryFD >= 0 { close(memoryFD) } }

        var record = DomainSnapshotRecord(
            domain: domain, name: name, parent: current, description: request.description,
            createdAt: Date(timeIntervalSince1970: Date().timeIntervalSince1970.rounded(.down)), state: state,
            memory: memory,
            disks: parts.map {
                DomainSnapshotDisk(
                    target: $0.disk.target, diskID: $0.layout.disk.id, backend: $0.backend.kind, kind: $0.kind,
                    source: $0.layout.disk.active)
            } + excluded,
            definition: definition)
        record.disks.sort { $0.target < $1.target }
        var checkpoint: CheckpointRecord?
        if let c = request.checkpoint {
            try checkCheckpointName(c, domain: domain)
            checkpoint = try newCheckpointRecord(
                domain: domain, name: c, description: "taken with snapshot \(name)",
                tracked: try await trackedDisks(definition, targets: request.targets))
        }
        var j = DomainJournal(operation: .create, snapshot: name, record: record)
        j.checkpoint = checkpoint
        let journalID = try store.beginDomainJournal(
            domain: domain, operation: "create snapshot '\(name)'", payload: try JSONEncoder().encode(j))
        var report = CreateReport(snapshot: record)
        do {
            if state == .shutoff {
                try saveDeviceState(definition, snapshot: name)
                try await takeThroughBackends(parts, name: name, request: request, journalID: journalID, j: &j)
                if let checkpoint {
                    try await withBitmapAccess(definition) {
                        try await $0.add(checkpoint.name, targets: checkpoint.bitmapTargets)
                    }
                }
            } else {
                let live = try await driver.connect(domain)
                var frozen = false
                var held: [(DiskPart, LiveDiskSnapshot)] = []
                do {
                    if request.quiesce {
                        report.frozenFilesystems = try await quiesce(live)
                        frozen = true
                    }
                    let mark = await live.mark()
                    if request.internalMemory {
                        try await takeInternal(
                            live, name: name, parts: parts, checkpoint: checkpoint, journalID: journalID, j: &j)
                    } else {
                        held = try await takeLive(
                            live, request: request, name: name, parts: parts, state: state, withMemory: withMemory,
                            liveSave: driver.capabilities.liveMemorySave, heldFormat: driver.backupImages.format,
                            memoryFD: memoryFD, guestBytes: UInt64(definition.memoryMiB) << 20,
                            record: &record, report: &report, journalID: journalID, j: &j)
                    }
                    report.pauseMs = await live.pauseWindow(since: mark)
                    if report.pauseMs != nil { report.pausePhases = await live.pausePhases(since: mark) }
                    if frozen {
                        frozen = false
                        try await live.thawFilesystems()
                    }
                    // Thawed first: the storage snapshots and merges take seconds.
                    if !held.isEmpty {
                        report.switchPauseMs = try await completeHeld(
                            live, held, name: name, request: request, journalID: journalID, j: &j)
                    }
                    await live.close()
                } catch {
                    // The agent runs in the guest: it can thaw only once the vCPUs run again.
                    if frozen {
                        if (try? await live.isRunning()) == false { try? await live.resume() }
                        try? await live.thawFilesystems()
                    }
                    await live.close()
                    throw error
                }
            }
            try phase(journalID, &j, "commit")
            if var checkpoint {
                // It began in each disk's active layer after the snapshot (a new overlay for an
                // external one).
                for i in checkpoint.disks.indices {
                    checkpoint.disks[i].image =
                        try store.layout(diskID: checkpoint.disks[i].diskID)?.disk.active ?? checkpoint.disks[i].image
                }
                try store.updateCheckpoints(domain: domain, upsert: [checkpoint])
            }
            try store.updateDomainSnapshots(domain: domain, upsert: [record], current: .some(name))
            try store.finishDomainJournal(journalID, state: "done")
        } catch {
            let cause = error
            do { try await rollBackCreate(domain: domain, journalID: journalID, j) } catch {
                notify("rolling back snapshot '\(name)' failed too: \(error); run `vmsnap recover`")
                throw cause
            }
            try? store.finishDomainJournal(journalID, state: "rolled-back")
            throw cause
        }
        report.snapshot = record
        return report
    }

    /// Freezes the guest's filesystems through its agent; a freeze that fails or times out is
    /// thawed (it may still land late) and refused with the reason, before anything changed.
    func quiesce(_ live: any LiveDomain) async throws -> Int {
        do { return try await live.freezeFilesystems() } catch {
            try? await live.thawFilesystems()
            let why = (error as? SnapshotError)?.message ?? "\(error)"
            throw SnapshotError(
                (error as? SnapshotError)?.code ?? .commandFailed,
                "--quiesce: \(why). Nothing was changed; the guest keeps running. Install and start qemu-guest-agent in the guest, or snapshot without --quiesce (crash-consistent)"
            )
        }
    }

    /// Refuses what cannot be done, before anything is planned.
    func checkRequest(
        _ request: DomainSnapshotRequest, name: String, domain: String, definition: DomainDefinition,
        existing: [DomainSnapshotRecord], state: DomainRunState
    ) throws {
        try SnapshotName.validate(name)
        if existing.contains(where: { $0.name == name }) {
            throw SnapshotError(
                .alreadyExists,
                "domain '\(domain)' already has a snapshot named \(SnapshotName.quoted(name)); pick another name or delete that one first"
            )
        }
        if let d = request.description, d.utf8.count > 4096 {
            throw SnapshotError(.invalidArgument, "the description is \(d.utf8.count) bytes; the limit is 4096")
        }
        if request.diskOnly, request.memoryFile != nil || request.internalMemory || request.pausedSave {
            throw SnapshotError(
                .invalidArgument, "--disk-only takes no memory: drop --memory-file / --memory internal / --paused-save")
        }
        if request.memoryFile != nil, request.internalMemory {
            throw SnapshotError(
                .invalidArgument,
                "--memory-file names an external memory image; --memory internal keeps memory inside the disk images: pick one"
            )
        }
        if request.quiesce, state == .shutoff {
            throw SnapshotError(
                .invalidArgument, "--quiesce needs a running domain with a guest agent; '\(domain)' is shut off")
        }
        if request.quiesce, !request.diskOnly {
            throw SnapshotError(
                .invalidArgument,
                "--quiesce needs --disk-only (as in libvirt): a memory image taken while the guest's filesystems are frozen would resume frozen"
            )
        }
        let withMemory = !request.diskOnly && state != .shutoff
        if state == .shutoff, request.memoryFile != nil || request.internalMemory {
            throw SnapshotError(
                .invalidArgument,
                "domain '\(domain)' is shut off: there is no memory to save; drop the memory options (the snapshot is disk-only)"
            )
        }
        if let targets = request.targets {
            for t in targets where !definition.disks.contains(where: { $0.target == t }) {
                throw SnapshotError(
                    .notFound,
                    "domain '\(domain)' has no disk \(t) (it has \(definition.disks.map(\.target).joined(separator: ", ")))"
                )
            }
            if withMemory, Set(targets) != Set(definition.disks.map(\.target)) {
                throw SnapshotError(
                    .invalidArgument,
                    "a snapshot with memory must include every disk (the memory refers to all of them); drop --disks or add --disk-only"
                )
            }
        }
    }

    /// Plans every disk before anything changes: which kind, and who takes it (the hypervisor,
    /// where both it and the backend say so, else the backend while the guest is paused).
    func planDisks(
        _ request: DomainSnapshotRequest, name: String, definition: DomainDefinition, driver: any HypervisorDriver,
        state: DomainRunState
    ) async throws -> ([DiskPart], [DomainSnapshotDisk]) {
        var parts: [DiskPart] = []
        var excluded: [DomainSnapshotDisk] = []
        let tracked = Set(try store.checkpoints(of: definition.name).flatMap { $0.bitmapTargets })
        // Room the store must keep: the memory image (when it goes there), then each held overlay.
        let memoryInStore =
            state != .shutoff && !request.diskOnly && !request.internalMemory && request.memoryFile == nil
        var storeNeeds: UInt64 = memoryInStore ? UInt64(definition.memoryMiB) << 20 : 0
        for disk in definition.disks {
            let (backend, layout) = try await disks.manage(disk.locator, kind: disk.backend)
            guard request.targets?.contains(disk.target) ?? true else {
                excluded.append(
                    DomainSnapshotDisk(
                        target: disk.target, diskID: layout.disk.id, backend: backend.kind, kind: nil,
                        source: layout.disk.active))
                continue
            }
            let caps = backend.descriptor.capabilities
            let kind =
                request.kind
                ?? (request.internalMemory || caps.supports(.create, .internal, .offline) ? .internal : .external)
            if layout.snapshot(named: name) != nil {
                throw SnapshotError(
                    .alreadyExists,
                    "disk \(disk.target) (\(layout.disk.id)) already has a disk snapshot named \(SnapshotName.quoted(name)); pick another name"
                )
            }
            var part = DiskPart(disk: disk, backend: backend, layout: layout, kind: kind)
            if state != .shutoff {
                let drive = try backend.hypervisorDrive(layout)
                part.drive = drive
                if drive.liveSnapshots, driver.capabilities.snapshotsLive(format: drive.format, kind: kind) {
                    part.live = try await backend.planLiveCreate(
                        SnapshotRequest(name: name, kind: kind, description: request.description), layout: layout)
                } else if drive.served, driver.capabilities.servedDisks {
                    try caps.require(Capability(.create, kind, .offline), backend: backend.kind)
                    part.served = true
                } else if !caps.supports(.create, kind, .live)
                    || !driver.capabilities.pausedStorageSnapshotSources.contains(drive.sourceType)
                {
                    throw SnapshotError(
                        .unsupported,
                        "disk \(disk.target): backend '\(backend.kind)' cannot take \(kind) snapshots while the domain runs, and the \(driver.name) driver cannot take them for it; stop the domain, or leave the disk out with --disks"
                    )
                } else {
                    // A disk checkpoints track keeps its bitmaps in its active layer: no temporary
                    // overlay above it (the bitmap would go with the overlay).
                    part.held =
                        state == .running && driver.capabilities.heldStorageSnapshots && request.checkpoint == nil
                        && !tracked.contains(disk.target)
                        && holdRoom(for: disk.target, path: drive.path, besides: &storeNeeds)
                }
            } else {
                try caps.require(Capability(.create, kind, .offline), backend: backend.kind)
            }
            parts.append(part)
        }
        if request.internalMemory {
            guard driver.capabilities.internalMemory,
                parts.allSatisfy({ $0.drive?.holdsInternalMemory == true && $0.kind == .internal && $0.live != nil }),
                excluded.isEmpty
            else {
                throw SnapshotError(
                    .unsupported,
                    "--memory internal keeps the memory inside the disk images: every disk must be an image that can hold it (qcow2) with an internal snapshot, under a hypervisor that writes it; use an external memory file (the default) for mixed domains"
                )
            }
        }
        guard !parts.isEmpty else { throw SnapshotError(.invalidArgument, "the snapshot would include no disk") }
        return (parts, excluded)
    }

    /// Disks without a hypervisor path, each through its backend's own journaled plan; a served
    /// disk's server (held by the caller) then serves its new active layer.
    func takeThroughBackends(
        _ chosen: [DiskPart], name: String, request: DomainSnapshotRequest, journalID: Int64, j: inout DomainJournal
    ) async throws {
        for part in chosen {
            try await disks.create(
                SnapshotRequest(name: name, kind: part.kind, description: request.description),
                disk: part.layout.disk.id, kind: part.backend.kind)
            if part.served {
                DomainFault.point("\(j.operation.rawValue):served-\(part.disk.target)")
                try reopenServed(j.record?.domain ?? "", targets: [part.disk.target])
                Trace.mark("served \(part.disk.target) reopened")
            }
            j.disksDone.append(part.disk.target)
            try phase(journalID, &j, "disk-\(part.disk.target)")
        }
    }

    /// Each backend whose snapshot is taken inside the pause looks at its disk once before it:
    /// a backend's first look may start a library or scan devices (LVM's in-process reports:
    /// about a second in a PV dom0 under TCG, against 0.1 s for the next one), which the pause
    /// would otherwise hold. Read-only; the snapshot checks the state again inside the pause.
    func warmUp(_ parts: [DiskPart]) async throws {
        for part in parts { _ = try await part.backend.state(of: part.layout) }
        if !parts.isEmpty { Trace.mark("storage looked at before the pause") }
    }

    /// A live snapshot: everything that can happen before the pause does (the journal knows the
    /// overlays and that vmsnap pauses the guest, the hypervisor has the memory file); then
    /// pause, storage-side snapshots that cannot be held, the hypervisor's snapshots and the
    /// held disks' temporary overlays at one instant, the memory save started (the guest resumes
    /// with a live save), the disks recorded, the save finished; last, after the resume, the held
    /// disks' storage snapshots (the disks unwritten since the pause), their overlays merged back.
    func takeLive(
        _ live: any LiveDomain, request: DomainSnapshotRequest, name: String, parts: [DiskPart], state: DomainRunState,
        withMemory: Bool, liveSave: Bool, heldFormat: String,
        memoryFD: Int32, guestBytes: UInt64, record: inout DomainSnapshotRecord, report: inout CreateReport,
        journalID: Int64, j: inout DomainJournal
    ) async throws -> [(DiskPart, LiveDiskSnapshot)] {
        let byHypervisor = parts.filter { $0.live != nil }
        let held = parts.filter(\.held)
        let holds = try held.map {
            let overlay = heldOverlay(record.domain, journalID: journalID, target: $0.disk.target)
            var st = stat()
            guard lstat(overlay, &st) != 0 else {
                throw SnapshotError(
                    .conflict,
                    "\(overlay) exists already, where vmsnap would hold disk \($0.disk.target) with a temporary overlay; nothing was changed. Run `vmsnap recover`, then remove the file if it is left"
                )
            }
            return LiveDiskSnapshot(
                target: $0.disk.target, name: name, kind: .external, overlay: overlay, format: heldFormat)
        }
        if !holds.isEmpty {
            j.held = Dictionary(uniqueKeysWithValues: holds.map { ($0.target, $0.overlay!) })
            j.heldBacking = Dictionary(
                uniqueKeysWithValues: held.compactMap { p in p.drive.map { (p.disk.target, $0.path) } })
        }
        for part in byHypervisor {
            j.liveBefore[part.disk.target] = part.layout
            j.liveAfter[part.disk.target] = part.live!.result
        }
        // Saved live where the hypervisor can (the guest runs during the save), else with the
        // guest stopped for it (Xen's suspend).
        let liveMemory = withMemory && state == .running && !request.pausedSave && liveSave
        // Checkpoints' bitmaps follow external snapshots into the new overlays (a round trip
        // inside the pause, only when the domain has checkpoints).
        let tracking =
            try !store.checkpoints(of: record.domain).isEmpty && byHypervisor.contains { $0.kind == .external }
        if withMemory {
            try await live.prepareMemorySave(to: memoryFD, live: liveMemory, guestBytes: guestBytes, progress: progress)
        }
        j.pausedByUs = state == .running
        try phase(journalID, &j, "prepared")
        // The journal knows the overlays: they may now exist (a rollback removes them).
        if !holds.isEmpty {
            try FileManager.default.createDirectory(
                atPath: (holds[0].overlay! as NSString).deletingLastPathComponent, withIntermediateDirectories: true,
                attributes: [.posixPermissions: 0o700])
        }
        let atOnce = byHypervisor.map { $0.liveSnapshot(name) } + holds
        if !atOnce.isEmpty { try await live.prepareDiskSnapshots(atOnce) }
        let insidePause = parts.filter { $0.live == nil && !$0.held && !$0.served }
        try await warmUp(insidePause)
        let saveStarted = ContinuousClock.now
        Trace.mark("pause prepared")
        if state == .running { try await live.pause() }
        // vmsnap's share of the pause runs from here to the memory save let go.
        let t0 = ContinuousClock.now
        Trace.mark("stop")
        DomainFault.point("create:paused", hypervisor: hypervisorProcess(record.domain))
        // The vCPUs are stopped and the hypervisor has flushed: the firmware's variables and the
        // TPM's state are still.
        try saveDeviceState(record.definition, snapshot: name, sync: false)
        // Served disks' point in time: their servers hold (flushed; the guest's requests to them
        // wait) until their storage snapshots, taken once the guest runs again.
        let served = parts.filter(\.served)
        for part in served { try holdServed(record.domain, target: part.disk.target) }
        if !served.isEmpty { Trace.mark("served disks held") }
        let servedHeld = ContinuousClock.now
        // Storage-side snapshots while the vCPUs are stopped and the hypervisor has flushed.
        try await takeThroughBackends(
            insidePause, name: name, request: request,
            journalID: journalID, j: &j)
        if !atOnce.isEmpty { try await live.snapshotDisks(atOnce) }
        if let c = j.checkpoint {
            try await live.addDirtyBitmaps(c.name, targets: c.bitmapTargets)
        }
        if tracking {
            // Still paused: the new overlays record from the snapshot's instant on.
            try await live.carryDirtyBitmaps(
                Dictionary(
                    uniqueKeysWithValues: byHypervisor.filter { $0.kind == .external }.map {
                        ($0.disk.target, $0.layout.disk.active)
                    }))
        }
        Trace.mark("transaction")
        DomainFault.point("create:transaction", hypervisor: hypervisorProcess(record.domain))
        if state == .running { report.ownPauseMs = (ContinuousClock.now - t0).seconds * 1000 }
        let memoryMark = await live.mark()
        if withMemory { try await live.startMemorySave() }
        Trace.mark("memory save started")
        // (With memory the save goes on while they are taken: it never waits for a held disk,
        // whose server answers flushes while it holds.)
        func completeServed() async throws {
            guard !served.isEmpty else { return }
            try await takeThroughBackends(served, name: name, request: request, journalID: journalID, j: &j)
            report.servedWaitMs = (ContinuousClock.now - servedHeld).seconds * 1000
        }
        if withMemory { try await completeServed() }
        for part in byHypervisor {
            try await disks.record(part.live!.result, replacing: part.layout)
            j.disksDone.append(part.disk.target)
        }
        try phase(journalID, &j, "disks-recorded")
        if withMemory {
            let (size, downtime) = try await finishMemory(live, fd: memoryFD, guestBytes: guestBytes, since: memoryMark)
            // The whole save (a pre-copy streams most of the memory before the pause).
            report.memorySeconds = (ContinuousClock.now - saveStarted).seconds
            report.qemuDowntimeMs = downtime
            report.memorySaveMethod = liveMemory ? await live.memorySaveMethod() : nil
            record.memory?.size = size
            j.record = record
            try phase(journalID, &j, "memory-saved")
        }
        if state == .running, try await !live.isRunning() { try await live.resume() }
        j.pausedByUs = false
        if !withMemory { try await completeServed() }
        try syncDeviceState(record.definition, snapshot: name)
        if !held.isEmpty { try phase(journalID, &j, "resumed") }
        return Array(zip(held, holds))
    }

    static func generatedName(existing: Set<String>, prefix: String = "snap") -> String {
        let f = DateFormatter()
        f.locale = Locale(identifier: "en_US_POSIX")
        f.timeZone = TimeZone(identifier: "UTC")
        f.dateFormat = "'\(prefix)-'yyyyMMdd'-'HHmmss"
        let base = f.string(from: Date())
        var name = base
        var n = 1
        while existing.contains(name) {
            n += 1
            name = "\(base)-\(n)"
        }
        return name
    }

    /// Creates the memory file (0600, new) and reserves room for a guest's memory, so a full
    /// filesystem is found before the guest is touched.
    static func reserveMemoryFile(_ path: String, bytes: UInt64) throws -> Int32 {
        let dir = (path as NSString).deletingLastPathComponent
        try FileManager.default.createDirectory(
            atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else {
            let why =
                errno == EEXIST
                ? "it exists already; pick another --memory-file or remove it" : String(cString: strerror(errno))
            throw SnapshotError(errno == EEXIST ? .alreadyExists : .io, "cannot create memory image \(path): \(why)")
        }
        // Guest RAM plus device state and stream overhead.
        let reserve = off_t(bytes + bytes / 32 + (16 << 20))
        let rc = posix_fallocate(fd, 0, reserve)
        if rc != 0 {
            close(fd)
            unlink(path)
            let free = (try? FileManager.default.attributesOfFileSystem(forPath: dir)[.systemFreeSize] as? NSNumber)?
                .uint64Value
            throw SnapshotError(
                .io,
                "no room for the memory image in \(dir): it needs about \(reserve >> 20) MiB\(free.map { ", the filesystem has \($0 >> 20) MiB free" } ?? "") (\(String(cString: strerror(rc)))). Nothing was changed; free space or give --memory-file on another filesystem"
            )
        }
        return fd
    }

    /// Waits for the memory save to finish, then cuts the file to what was written and syncs it.
    func finishMemory(_ live: any LiveDomain, fd: Int32, guestBytes: UInt64, since mark: Int) async throws -> (
        UInt64, Double?
    ) {
        let downtime = try await live.finishMemorySave(fd: fd, guestBytes: guestBytes, since: mark, progress: progress)
        let size = lseek(fd, 0, SEEK_CUR)
        guard size > 0, ftruncate(fd, size) == 0, fsync(fd) == 0 else {
            throw SnapshotError(.io, "finishing the memory image failed: \(String(cString: strerror(errno)))")
        }
        return (UInt64(size), downtime)
    }

    /// Memory and every disk inside the images (QEMU's snapshot-save: the guest stays paused
    /// while it runs, as savevm does).
    func takeInternal(
        _ live: any LiveDomain, name: String, parts: [DiskPart], checkpoint: CheckpointRecord?, journalID: Int64,
        j: inout DomainJournal
    ) async throws {
        for part in parts {
            j.liveBefore[part.disk.target] = part.layout
            j.liveAfter[part.disk.target] = part.live!.result
        }
        // A checkpoint at the same instant: the guest paused before its bitmaps go in, and kept
        // paused through the save (snapshot-save leaves a paused guest paused).
        var resume = false
        if checkpoint != nil { resume = try await live.isRunning() }
        if resume {
            j.pausedByUs = true
            try phase(journalID, &j, "paused")
            try await live.pause()
        }
        if let checkpoint { try await live.addDirtyBitmaps(checkpoint.name, targets: checkpoint.bitmapTargets) }
        try phase(journalID, &j, "transaction")
        try await live.saveInternal(name: name, targets: parts.map(\.disk.target))
        if resume {
            try await live.resume()
            j.pausedByUs = false
        }
        for part in parts {
            try await disks.record(part.live!.result, replacing: part.layout)
            j.disksDone.append(part.disk.target)
        }
        try phase(journalID, &j, "disks-recorded")
    }

    /// Undoes whatever part of a create happened: disk snapshots (through the hypervisor while
    /// it runs, else offline through the backend), the memory file; resumes a guest vmsnap paused.
    func rollBackCreate(domain: String, journalID: Int64, _ j: DomainJournal) async throws {
        guard let record = j.record else { return }
        let driver = try drivers.driver(for: record.definition)
        // A hypervisor that runs is asked (it knows which image is open); the offline rules are
        // only for one that is gone.
        var live: (any LiveDomain)?
        if driver.isRunning(domain) {
            do { live = try await driver.connect(domain) } catch {
                throw SnapshotError(
                    .busy,
                    "domain '\(domain)' runs but its hypervisor does not answer (\(error)); nothing was rolled back. Retry `vmsnap recover` once it answers, or stop it"
                )
            }
        }
        do {
            var j = j
            try await undoCreate(record, journalID: journalID, &j, live: live)
            await live?.close()
        } catch {
            await live?.close()
            throw error
        }
        // The checkpoint taken with it goes too (through a new connection: QEMU serves one).
        if let c = j.checkpoint, try !store.checkpoints(of: domain).contains(where: { $0.name == c.name }) {
            try await withBitmapAccess(record.definition) {
                try await $0.remove(c.name, targets: c.bitmapTargets)
            }
        }
    }

    private func undoCreate(
        _ record: DomainSnapshotRecord, journalID: Int64, _ j: inout DomainJournal, live: (any LiveDomain)?
    ) async throws {
        let connected: (any LiveDomain)? = if let live, await live.isConnected() { live } else { nil }
        // A memory save that is still streaming finishes (into the file removed below).
        await connected?.drainMemorySave()
        // Held disks first: the guest's writes since the pause go back into the disk.
        for target in (j.held ?? [:]).keys.sorted() {
            guard let disk = record.disks.first(where: { $0.target == target }) else {
                throw SnapshotError(
                    .storeCorrupt,
                    "the journal of snapshot '\(record.name)' holds disk \(target), which the domain's snapshot does not have; nothing was changed. The store may be damaged"
                )
            }
            let overlay = heldOverlay(record.domain, journalID: journalID, target: target)
            if let connected {
                try await mergeHeld(
                    connected,
                    LiveDiskSnapshot(target: target, name: record.name, kind: .external, overlay: overlay, format: ""),
                    journalID: journalID, j: &j)
            } else {
                try await mergeHeldOffline(record, disk: disk, overlay: overlay, j)
            }
        }
        // Served disks change offline: held first, served again (at the record's layer) below.
        let served = servedControls(record.domain).map(\.target)
        for target in served { try holdServed(record.domain, target: target) }
        for disk in record.disks where disk.kind != nil {
            if let before = j.liveBefore[disk.target] {
                let after = j.liveAfter[disk.target]
                if let connected {
                    try await connected.undoDiskSnapshot(
                        LiveDiskSnapshot(
                            target: disk.target, name: record.name, kind: disk.kind!,
                            overlay: disk.kind == .external ? after?.disk.active : nil, format: ""))
                    if let stored = try store.layout(diskID: before.disk.id), stored.snapshot(named: record.name) != nil
                    {
                        try store.update(from: stored, to: before)
                    }
                } else if let stored = try store.layout(diskID: disk.diskID), stored.snapshot(named: record.name) != nil
                {
                    // The hypervisor is gone: the snapshot, if it took it, is in the image; undo it offline.
                    try await disks.delete(disk: disk.diskID, snapshot: record.name, mode: .merge, kind: disk.backend)
                } else {
                    let (backend, _) = try await disks.manage(disk.diskID, kind: disk.backend)
                    try await backend.undoUnrecordedLiveSnapshot(
                        record.name, kind: disk.kind!, before: before, after: after)
                }
            } else if let stored = try store.layout(diskID: disk.diskID), stored.snapshot(named: record.name) != nil {
                try await disks.delete(disk: disk.diskID, snapshot: record.name, mode: .merge, kind: disk.backend)
            }
        }
        if connected == nil {
            // The hypervisor died (or was killed) with the images open: let each backend repair
            // what that leaves (qcow2: leaked clusters).
            for disk in record.disks {
                if let layout = try store.layout(diskID: disk.diskID) {
                    let (backend, _) = try await disks.manage(disk.diskID, kind: disk.backend)
                    try? await backend.repairAfterHypervisorCrash(layout)
                }
            }
        }
        if !served.isEmpty { try reopenServed(record.domain, targets: served) }
        if let memory = record.memory, memory.location == .external { unlink(memory.path) }
        removeDeviceState(record.domain, snapshot: record.name)
        if let connected, j.pausedByUs, await connected.isConnected() { try? await connected.resume() }
    }
}
