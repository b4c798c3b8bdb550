import Foundation
import HypervisorDriver
import SnapshotCore

/// What `vmsnap checkpoint create` asks for.
public struct CheckpointRequest: Sendable, Hashable {
    public var name: String?
    public var description: String?
    /// Disk targets to track; nil: every disk whose backend tracks changed blocks.
    public var targets: [String]?

    public init(name: String? = nil, description: String? = nil, targets: [String]? = nil) {
        self.name = name
        self.description = description
        self.targets = targets
    }
}

/// Which checkpoints a delete removes.
public enum CheckpointDeleteMode: String, Codable, Sendable, CaseIterable {
    /// The checkpoint; its children take its parent.
    case only
    /// The checkpoint and every checkpoint after it.
    case children
    /// Every checkpoint after it, keeping it.
    case childrenOnly = "children-only"
}

/// What a checkpoint or backup operation journals: enough to roll it back or finish it.
struct BlockJournal: Codable, Sendable {
    enum Operation: String, Codable, Sendable, CaseIterable {
        case checkpointCreate = "checkpoint-create"
        case checkpointDelete = "checkpoint-delete"
        case backupBegin = "backup-begin"
        case backupEnd = "backup-end"
        case blockSnapshotCreate = "blocksnapshot-create"
        case blockSnapshotDelete = "blocksnapshot-delete"
    }
    var operation: Operation
    /// checkpoint-create: the checkpoint being made (also a backup's new checkpoint).
    var checkpoint: CheckpointRecord?
    /// checkpoint-delete: the checkpoints being removed.
    var removing: [CheckpointRecord] = []
    /// backup-begin / backup-end: the job.
    var job: BackupJob?
    /// blocksnapshot-create / -delete: the block snapshot.
    var view: BlockSnapshotRecord?
    /// Files this operation is about to create, and those it created (O_EXCL): a rollback
    /// removes the created ones, and planned ones only while empty.
    var planned: [String] = []
    var created: [String] = []
    var phases: [String] = []

    /// A rollback's file cleanup: the files made, and planned ones still empty (made just before
    /// a crash), never a file that was there before.
    func removeFiles() {
        for f in created { unlink(f) }
        for f in planned where !created.contains(f) {
            var st = stat()
            if lstat(f, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG, st.st_size == 0 { unlink(f) }
        }
    }
}

/// How checkpoints' bitmaps are reached now: through the hypervisor's block layer while a
/// hypervisor (or a storage daemon) has the disks open, else through each disk's backend.
struct BitmapAccess: Sendable {
    let layer: (any BlockLayer)?
    let offline: [String: (backend: any DiskSnapshotBackend, layout: DiskLayout)]

    /// The bitmaps of one layer of a disk (`image` nil: the active one).
    func bitmaps(_ target: String, layer image: String? = nil) async throws -> [DirtyBitmap] {
        if let layer { return try await layer.bitmaps(target: target, layer: image) }
        guard let disk = offline[target] else { return [] }
        return try await disk.backend.bitmaps(disk.layout, layer: image)
    }

    func add(_ name: String, targets: [String]) async throws {
        if let layer { return try await layer.addBitmaps(name, targets: targets) }
        for t in targets { if let d = offline[t] { try await d.backend.addBitmap(name, layout: d.layout) } }
    }

    func remove(_ name: String, targets: [String]) async throws {
        if let layer { return try await layer.removeBitmaps(name, targets: targets) }
        for t in targets { if let d = offline[t] { try await d.backend.removeBitmap(name, layout: d.layout) } }
    }

    func close() async { await layer?.close(keepDaemon: true) }
}

extension DomainService {
    // MARK: - Access

    /// Opens the bitmaps of the domain's disks: through the running hypervisor, a storage daemon
    /// a pull backup keeps, or (shut off) the backends.
    func bitmapAccess(_ definition: DomainDefinition) async throws -> BitmapAccess {
        let driver = try drivers.driver(for: definition)
        if driver.isRunning(definition.name) || driver.storageDaemonRuns(definition.name) {
            return BitmapAccess(
                layer: try await driver.blockLayer(definition, drives: try await drives(definition)), offline: [:])
        }
        var offline: [String: (backend: any DiskSnapshotBackend, layout: DiskLayout)] = [:]
        for disk in definition.disks {
            let (backend, layout) = try await disks.manage(disk.locator, kind: disk.backend)
            offline[disk.target] = (backend, layout)
        }
        return BitmapAccess(layer: nil, offline: offline)
    }

    /// Runs `body` with the domain's bitmaps, closing the access before returning or throwing
    /// (QEMU serves one QMP client: the next connection must find this one gone).
    func withBitmapAccess<T>(_ definition: DomainDefinition, _ body: (BitmapAccess) async throws -> T)
        async throws -> T
    {
        let access = try await bitmapAccess(definition)
        do {
            let result = try await body(access)
            await access.close()
            return result
        } catch {
            await access.close()
            throw error
        }
    }

    /// The block layer still holding a job's or view's state (the running hypervisor, or the
    /// storage daemon a shut-off domain's job started), or nil when that process is gone. Never
    /// starts a storage daemon.
    func aliveLayer(_ definition: DomainDefinition, storageDaemon: Bool) async throws -> (any BlockLayer)? {
        let driver = try drivers.driver(for: definition)
        let alive = storageDaemon ? driver.storageDaemonRuns(definition.name) : driver.isRunning(definition.name)
        guard alive else { return nil }
        return try await driver.blockLayer(definition, drives: try await drives(definition))
    }

    /// The disks a checkpoint tracks: the ones asked for, each checked for changed-block
    /// tracking in its backend and (while the domain runs) in its hypervisor. A disk whose
    /// storage reports changes between snapshots is tracked by a snapshot of its own when
    /// `storageSnapshots` (`checkpoint create` and `backup begin` of a shut-off domain).
    func trackedDisks(_ definition: DomainDefinition, targets: [String]?, storageSnapshots: Bool = false)
        async throws -> [CheckpointDisk]
    {
        let driver = try drivers.driver(for: definition)
        let running = driver.isRunning(definition.name)
        if let targets {
            for t in targets where !definition.disks.contains(where: { $0.target == t }) {
                throw SnapshotError(
                    .notFound,
                    "domain '\(definition.name)' has no disk \(t) (disks: \(definition.disks.map(\.target).joined(separator: ", ")))"
                )
            }
        }
        var out: [CheckpointDisk] = []
        var untracked: [String] = []
        for disk in definition.disks where targets?.contains(disk.target) ?? true {
            let (backend, layout) = try await disks.manage(disk.locator, kind: disk.backend)
            var why: String?
            var snapshot: String?
            if case .unavailable(let reason) = backend.changeTracking {
                why = reason
                if backend.descriptor.reportsChanges {
                    let live = backend.descriptor.capabilities.supports(
                        .create, backend.descriptor.capabilities.defaultKind, .live)
                    if running && !live {
                        why =
                            "backend '\(backend.kind)' reports changes between snapshots, but takes no snapshot of a disk a running guest has open, which a checkpoint of a running domain needs"
                    } else if running && !driver.capabilities.dirtyBitmaps {
                        why =
                            "the \(driver.name) hypervisor records no writes in bitmaps, which a running domain's storage-tracked disks need between the storage's count and the backup's instant"
                    } else if !storageSnapshots {
                        why =
                            "backend '\(backend.kind)' reports changes between snapshots, which only `checkpoint create` and `backup begin` use"
                    } else if let problem = try await checkpointSnapshotProblem(backend, layout) {
                        why = problem
                    } else {
                        why = nil
                        snapshot = ""
                    }
                }
            } else if running {
                let format = try backend.hypervisorDrive(layout).format
                if !driver.capabilities.dirtyBitmapFormats.contains(format) {
                    why = "the \(driver.name) hypervisor keeps no dirty bitmaps in \(format) images"
                }
            }
            if let why {
                guard targets == nil else {
                    throw SnapshotError(
                        .unsupported,
                        "disk \(disk.target) of domain '\(definition.name)' cannot be in a checkpoint: \(why). Leave it out (--disks), or back it up in full"
                    )
                }
                untracked.append("\(disk.target) (\(why))")
                continue
            }
            out.append(
                CheckpointDisk(
                    target: disk.target, diskID: layout.disk.id, backend: backend.kind, bitmap: "",
                    image: layout.disk.active, epoch: try store.contentEpoch(diskID: layout.disk.id), snapshot: snapshot
                ))
        }
        guard !out.isEmpty else {
            throw SnapshotError(
                .unsupported,
                "no disk of domain '\(definition.name)' tracks changed blocks: \(untracked.joined(separator: "; ")); a checkpoint needs at least one"
            )
        }
        for u in untracked { notify("checkpoint leaves out disk \(u)") }
        return out
    }

    func checkCheckpointName(_ name: String, domain: String) throws {
        try SnapshotName.validate(name)
        if name.hasPrefix("vmsnap-") {
            throw SnapshotError(
                .invalidName, "checkpoint names starting with 'vmsnap-' are vmsnap's own bitmaps; pick another name")
        }
        // The snapshot a storage-tracked disk keeps for it must be a valid name too.
        if let why = SnapshotName.problem(Self.checkpointSnapshotName(name)) {
            throw SnapshotError(.invalidName, "checkpoint name \(SnapshotName.quoted(name)) is too long or odd: \(why)")
        }
        if try store.checkpoints(of: domain).contains(where: { $0.name == name }) {
            throw SnapshotError(
                .alreadyExists,
                "domain '\(domain)' already has a checkpoint named \(SnapshotName.quoted(name)); pick another name or delete that one first"
            )
        }
    }

    func blockJournal(_ id: Int64, _ j: BlockJournal) throws {
        try store.updateDomainJournal(id, payload: try JSONEncoder().encode(j))
    }

    func blockPhase(_ id: Int64, _ j: inout BlockJournal, _ name: String, domain: String) throws {
        j.phases.append(name)
        try blockJournal(id, j)
        DomainFault.point("\(j.operation.rawValue):\(name)", hypervisor: hypervisorProcess(domain))
    }

    func beginBlockJournal(domain: String, _ j: BlockJournal) throws -> Int64 {
        try store.beginDomainJournal(domain: domain, operation: j.operation.rawValue, payload: JSONEncoder().encode(j))
    }

    /// The record of a new checkpoint over `tracked` disks, its parent the newest checkpoint.
    func newCheckpointRecord(
        domain: String, name: String, description: String?, tracked: [CheckpointDisk]
    ) throws -> CheckpointRecord {
        CheckpointRecord(
            domain: domain, name: name, parent: try store.checkpoints(of: domain).last?.name,
            description: description,
            createdAt: Date(timeIntervalSince1970: floor(Date().timeIntervalSince1970)),
            disks: tracked.map {
                var d = $0
                d.bitmap = name
                if d.snapshot != nil { d.snapshot = Self.checkpointSnapshotName(name) }
                return d
            })
    }

    // MARK: - Create

    /// Takes a checkpoint: a bitmap named after it in each tracked disk, added at one instant
    /// (a QMP transaction while the domain runs; `qemu-img bitmap` per disk while it is shut off).
    @discardableResult
    public func createCheckpoint(domain: String, _ request: CheckpointRequest) async throws -> CheckpointRecord {
        let lock = try domainLock(domain)
        defer { withExtendedLifetime(lock) {} }
        try await recover(domain: domain)
        try requireNoBackupJob(domain, doing: "take a checkpoint")
        let (definition, _) = try definition(domain)
        let name =
            try request.name
            ?? Self.generatedName(
                existing: Set(try store.checkpoints(of: domain).map(\.name)), prefix: "checkpoint")
        try checkCheckpointName(name, domain: domain)
        if let d = request.description, d.utf8.count > 4096 {
            throw SnapshotError(.invalidArgument, "the description is \(d.utf8.count) bytes; the limit is 4096")
        }
        let tracked = try await trackedDisks(definition, targets: request.targets, storageSnapshots: true)
        var record = try newCheckpointRecord(
            domain: domain, name: name, description: request.description, tracked: tracked)
        try await requireFreeCheckpointSnapshots(record, definition: definition)
        var j = BlockJournal(operation: .checkpointCreate, checkpoint: record)
        let id = try beginBlockJournal(domain: domain, j)
        let access = try await bitmapAccess(definition)
        do {
            try await access.add(name, targets: record.bitmapTargets)
            try blockPhase(id, &j, "bitmaps-added", domain: domain)
            record = try await takeCheckpointSnapshots(
                record, definition: definition, leaveOut: request.targets == nil)
            try blockPhase(id, &j, "snapshots-taken", domain: domain)
            try store.updateCheckpoints(domain: domain, upsert: [record])
            try store.finishDomainJournal(id, state: "done")
        } catch {
            try? await access.remove(name, targets: record.bitmapTargets)
            await access.close()
            await removeCheckpointSnapshots([record], definition: definition)
            try? store.finishDomainJournal(id, state: "rolled-back")
            throw error
        }
        await access.close()
        return record
    }

    // MARK: - Read

    public func checkpoints(domain: String) throws -> [CheckpointRecord] {
        _ = try definition(domain)
        return try store.checkpoints(of: domain)
    }

    public func checkpoint(domain: String, _ name: String) throws -> CheckpointRecord {
        guard let found = try checkpoints(domain: domain).first(where: { $0.name == name }) else {
            throw SnapshotError(
                .notFound,
                "domain '\(domain)' has no checkpoint named \(SnapshotName.quoted(name)); `vmsnap checkpoint list \(domain)` shows them"
            )
        }
        return found
    }

    /// Each disk of a checkpoint: can its bitmap serve an incremental backup now, and how much
    /// changed since.
    public func checkpointState(domain: String, _ name: String) async throws -> [CheckpointDiskState] {
        let record = try checkpoint(domain: domain, name)
        let (definition, _) = try definition(domain)
        return try await withBitmapAccess(definition) {
            try await checkpointState(record, definition: definition, access: $0)
        }
    }

    func checkpointState(_ record: CheckpointRecord, definition: DomainDefinition, access: BitmapAccess)
        async throws -> [CheckpointDiskState]
    {
        var out: [CheckpointDiskState] = []
        for disk in record.disks {
            let (problem, bitmap) = try await checkpointProblem(disk, definition: definition, access: access)
            out.append(
                CheckpointDiskState(
                    target: disk.target, bitmap: disk.bitmap, usable: problem == nil, problem: problem,
                    changedBytes: bitmap?.dirtyBytes))
        }
        return out
    }

    /// Why a disk's bitmap cannot serve an incremental (nil: it can), and the bitmap of the
    /// active layer.
    func checkpointProblem(_ disk: CheckpointDisk, definition: DomainDefinition, access: BitmapAccess)
        async throws -> (String?, DirtyBitmap?)
    {
        if let snapshot = disk.snapshot {
            let (problem, changes) = try await storageCheckpointProblem(
                disk, snapshot: snapshot, definition: definition)
            // What the storage counted, in the shape `checkpoint info` shows for a bitmap.
            return (
                problem,
                changes.map {
                    DirtyBitmap(name: snapshot, granularity: $0.granularity, dirtyBytes: $0.changedBytes)
                }
            )
        }
        guard let now = definition.disks.first(where: { $0.target == disk.target }),
            let layout = try? await disks.layout(of: now.locator, kind: now.backend).1, layout.disk.id == disk.diskID
        else {
            return ("disk \(disk.target) is no longer the disk the checkpoint tracked", nil)
        }
        if try store.contentEpoch(diskID: disk.diskID) != disk.epoch {
            return (
                "disk \(disk.target) was reverted after the checkpoint, so bitmap \(disk.bitmap) no longer describes what changed since",
                nil
            )
        }
        guard let chain = Self.layerChain(layout, downTo: disk.image) else {
            return (
                "the layer the checkpoint started in (\(disk.image)) is no longer under disk \(disk.target)'s active image \(layout.disk.active)",
                nil
            )
        }
        var active: DirtyBitmap?
        for image in chain {
            let isActive = image == layout.disk.active
            guard
                let bitmap = try await access.bitmaps(disk.target, layer: isActive ? nil : image).first(where: {
                    $0.name == disk.bitmap
                })
            else {
                return (
                    "bitmap \(disk.bitmap) is missing from disk \(disk.target)'s \(isActive ? "active image" : "layer") \(image); the QEMU that had it open ended without storing it (killed or crashed), or it was removed outside vmsnap",
                    nil
                )
            }
            if bitmap.inconsistent {
                return (
                    "bitmap \(disk.bitmap) of disk \(disk.target) (\(image)) is marked inconsistent: a QEMU that had the image open stopped without storing it",
                    bitmap
                )
            }
            if isActive {
                if !bitmap.recording {
                    return (
                        "bitmap \(disk.bitmap) of disk \(disk.target) is disabled: it stopped recording writes", bitmap
                    )
                }
                active = bitmap
            }
        }
        return (nil, active)
    }

    /// The layers from the active one down to `image`, or nil when `image` is not below it.
    static func layerChain(_ layout: DiskLayout, downTo image: String) -> [String]? {
        var chain: [String] = []
        var current: String? = layout.disk.active
        while let c = current, !chain.contains(c) {
            chain.append(c)
            if c == image { return chain }
            current = layout.layer(c)?.backing
        }
        return nil
    }

    /// The bitmaps whose union is what changed on a disk since a checkpoint: its name in each
    /// layer from the active one down to where the checkpoint was taken.
    func changedSince(_ disk: CheckpointDisk, definition: DomainDefinition) async throws -> [LayerBitmap] {
        guard let now = definition.disks.first(where: { $0.target == disk.target }) else { return [] }
        if let snapshot = disk.snapshot {
            // A bitmap file the job writes from the storage's changes (writeChangesFiles), and
            // for a running guest the bridge (StorageCheckpoints.swift).
            let file = (store.directory as NSString).appendingPathComponent(
                "backup/\(definition.name)/\(disk.target).\(UUID().uuidString.prefix(8)).changes.qcow2")
            let running = try drivers.driver(for: definition).isRunning(definition.name)
            return [LayerBitmap(name: snapshot, file: file)]
                + (running ? [LayerBitmap(name: Self.bridgeBitmap, mergedAway: true)] : [])
        }
        let layout = try await disks.layout(of: now.locator, kind: now.backend).1
        return (Self.layerChain(layout, downTo: disk.image) ?? [layout.disk.active]).map {
            LayerBitmap(layer: $0 == layout.disk.active ? nil : $0, name: disk.bitmap)
        }
    }

    // MARK: - Delete

    /// Deletes checkpoints. Every checkpoint's bitmap records all writes from its own checkpoint
    /// on, so a parent's bitmap already holds what its child's does: removing a checkpoint keeps
    /// its parent's tracking whole (libvirt's "merge into the parent" has nothing left to merge).
    public func deleteCheckpoint(
        domain: String, _ name: String, mode: CheckpointDeleteMode = .only, metadataOnly: Bool = false
    ) async throws -> [String] {
        let lock = try domainLock(domain)
        defer { withExtendedLifetime(lock) {} }
        try await recover(domain: domain)
        try requireNoBackupJob(domain, doing: "delete a checkpoint")
        let all = try store.checkpoints(of: domain)
        let record = try checkpoint(domain: domain, name)
        let removing = Self.checkpointsToDelete(record, mode: mode, all: all)
        guard !removing.isEmpty else { return [] }
        var j = BlockJournal(operation: .checkpointDelete, removing: removing)
        let id = try beginBlockJournal(domain: domain, j)
        if !metadataOnly {
            let (definition, _) = try definition(domain)
            try await withBitmapAccess(definition) { access in
                for r in removing { try await access.remove(r.name, targets: r.bitmapTargets) }
            }
            await removeCheckpointSnapshots(removing, definition: definition)
        }
        try blockPhase(id, &j, "bitmaps-removed", domain: domain)
        try finishCheckpointDelete(domain: domain, removing: removing)
        try store.finishDomainJournal(id, state: "done")
        return removing.map(\.name)
    }

    static func checkpointsToDelete(_ record: CheckpointRecord, mode: CheckpointDeleteMode, all: [CheckpointRecord])
        -> [CheckpointRecord]
    {
        var below: [CheckpointRecord] = []
        var frontier = [record.name]
        while let next = frontier.popLast() {
            for child in all where child.parent == next {
                below.append(child)
                frontier.append(child.name)
            }
        }
        switch mode {
        case .only: return [record]
        case .children: return [record] + below
        case .childrenOnly: return below
        }
    }

    /// Removes the records and gives the survivors whose parent went the nearest surviving one.
    func finishCheckpointDelete(domain: String, removing: [CheckpointRecord]) throws {
        let gone = Set(removing.map(\.name))
        let all = try store.checkpoints(of: domain)
        let parents = Dictionary(uniqueKeysWithValues: all.map { ($0.name, $0.parent) })
        var reparented: [CheckpointRecord] = []
        for var r in all where !gone.contains(r.name) {
            var p = r.parent
            while let q = p, gone.contains(q) { p = parents[q] ?? nil }
            if p != r.parent {
                r.parent = p
                reparented.append(r)
            }
        }
        try store.updateCheckpoints(domain: domain, upsert: reparented, remove: Array(gone))
    }

    // MARK: - Recovery

    /// Rolls back or finishes an interrupted checkpoint or backup operation.
    func recoverBlockJournal(_ entry: DomainJournalEntry) async throws {
        let j = try JSONDecoder().decode(BlockJournal.self, from: entry.payload)
        let domain = entry.domain
        switch j.operation {
        case .checkpointCreate:
            guard let record = j.checkpoint else { break }
            if try store.checkpoints(of: domain).contains(where: { $0.name == record.name }) {
                try store.finishDomainJournal(entry.id, state: "done")
                return
            }
            let (definition, _) = try definition(domain)
            try await withBitmapAccess(definition) {
                try await $0.remove(record.name, targets: record.bitmapTargets)
            }
            await removeCheckpointSnapshots([record], definition: definition)
            try store.finishDomainJournal(entry.id, state: "rolled-back")
            notify("recovered an interrupted checkpoint create on domain '\(domain)': rolled back")
            return
        case .checkpointDelete:
            let (definition, _) = try definition(domain)
            try await withBitmapAccess(definition) { access in
                for r in j.removing { try await access.remove(r.name, targets: r.bitmapTargets) }
            }
            await removeCheckpointSnapshots(j.removing, definition: definition)
            try finishCheckpointDelete(domain: domain, removing: j.removing)
            try store.finishDomainJournal(entry.id, state: "done")
            notify("recovered an interrupted checkpoint delete on domain '\(domain)': finished")
            return
        case .backupBegin, .backupEnd:
            try await recoverBackup(entry, j)
            return
        case .blockSnapshotCreate, .blockSnapshotDelete:
            guard let view = j.view else { break }
            if j.operation == .blockSnapshotCreate,
                try store.blockSnapshots(of: domain).contains(where: { $0.name == view.name })
            {
                try store.finishDomainJournal(entry.id, state: "done")
                return
            }
            if j.operation == .blockSnapshotCreate {
                try await undoBlockSnapshot(view, journal: j, layer: nil)
            } else {
                try await finishBlockSnapshotDelete(view)
            }
            try store.finishDomainJournal(entry.id, state: j.operation == .blockSnapshotCreate ? "rolled-back" : "done")
            notify("recovered an interrupted \(j.operation.rawValue) on domain '\(domain)'")
            return
        }
        try store.finishDomainJournal(entry.id, state: "done")
    }
}
