import Foundation
import HypervisorDriver
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// What `vmsnap backup begin` asks for.
public struct BackupRequest: Sendable, Hashable {
    /// Push into this directory; nil: pull (NBD exports).
    public var directory: String?
    /// Copy only what changed since this checkpoint.
    public var incremental: String?
    /// Take this checkpoint at the backup's instant.
    public var newCheckpoint: String?
    /// Disk targets; nil: every disk.
    public var targets: [String]?
    /// Take a full backup, with the reason, when the incremental's checkpoint cannot be trusted.
    public var fallbackFull = false
    /// Pull: where the exports listen (nil: the domain's Unix socket).
    public var listener: ExportListener?

    public init(
        directory: String? = nil, incremental: String? = nil, newCheckpoint: String? = nil, targets: [String]? = nil,
        fallbackFull: Bool = false, listener: ExportListener? = nil
    ) {
        self.directory = directory
        self.incremental = incremental
        self.newCheckpoint = newCheckpoint
        self.targets = targets
        self.fallbackFull = fallbackFull
        self.listener = listener
    }

}

/// What `backup status` shows.
public struct BackupStatus: Codable, Sendable, Hashable {
    public var job: BackupJob
    /// Push: bytes copied so far and in all.
    public var done: UInt64?
    public var total: UInt64?
    /// Something wrong with the job (the domain stopped under a pull backup).
    public var problem: String?
}

extension DomainService {
    /// Refuses an operation that would change the disks under a backup job.
    func requireNoBackupJob(_ domain: String, doing what: String) throws {
        if let job = try store.backupJob(of: domain) {
            throw SnapshotError(
                .busy,
                "a \(job.mode.rawValue) backup of domain '\(domain)' (\(job.name)) is in progress; cannot \(what) now. End it with `vmsnap backup end \(domain)`"
            )
        }
    }

    /// Refuses an operation that would change or close the disks under a backup job or a
    /// block snapshot's views.
    func requireNoViews(_ domain: String, doing what: String) throws {
        try requireNoBackupJob(domain, doing: what)
        if let view = try store.blockSnapshots(of: domain).first {
            throw SnapshotError(
                .busy,
                "block snapshot \(SnapshotName.quoted(view.name)) of domain '\(domain)' holds views of its disks; cannot \(what) now. Delete it first with `vmsnap blocksnapshot delete \(domain) \(view.name)`"
            )
        }
    }

    /// Refuses views of disks that have as many as their hypervisor keeps at once.
    func requireFreeForViews(_ domain: String, targets: [String], driver: any HypervisorDriver) throws {
        var held: [String: [String]] = [:]
        for view in try store.blockSnapshots(of: domain) {
            for d in view.disks {
                held[d.target, default: []].append("block snapshot \(SnapshotName.quoted(view.name))")
            }
        }
        if let job = try store.backupJob(of: domain) {
            for d in job.disks { held[d.target, default: []].append("backup \(job.name)") }
        }
        let limit = driver.capabilities.viewsPerDisk
        for t in targets where (held[t]?.count ?? 0) >= limit {
            throw SnapshotError(
                .busy,
                "disk \(t) of domain '\(domain)' already has \(held[t]!.joined(separator: ", ")); the \(driver.name) hypervisor keeps \(limit) point-in-time view(s) of a disk at once. End that first, or leave \(t) out (--disks)"
            )
        }
    }

    // MARK: - Begin

    /// Starts a backup. Pull: a point-in-time view of each disk, exported over NBD, until `backup
    /// end`. Push: the disks copied into `directory` (full, or incremental on the backup taken at
    /// the checkpoint), waiting until done; then the manifest is written and every image checked.
    @discardableResult
    public func beginBackup(domain: String, _ request: BackupRequest) async throws -> BackupJob {
        let lock = try domainLock(domain)
        defer { withExtendedLifetime(lock) {} }
        try await recover(domain: domain)
        try requireNoBackupJob(domain, doing: "begin another")
        let (definition, _) = try definition(domain)
        let driver = try drivers.driver(for: definition)
        let targets = try backupTargets(definition, request.targets)
        try requireFreeForViews(domain, targets: targets, driver: driver)
        var job = BackupJob(
            domain: domain, name: Self.generatedName(existing: [], prefix: "backup"),
            mode: request.directory == nil ? .pull : .push, startedAt: Date(), incrementalFrom: nil,
            newCheckpoint: request.newCheckpoint, disks: [], listener: nil,
            storageDaemon: !driver.isRunning(domain), directory: nil, fullBecause: nil)
        var newRecord: CheckpointRecord?
        if let name = request.newCheckpoint {
            try checkCheckpointName(name, domain: domain)
            newRecord = try newCheckpointRecord(
                domain: domain, name: name, description: "taken with backup \(job.name)",
                tracked: try await trackedDisks(definition, targets: request.targets, storageSnapshots: true))
            try await requireFreeCheckpointSnapshots(newRecord!, definition: definition)
        }
        let base = try await incrementalBase(
            from: request.incremental, fallbackFull: request.fallbackFull, definition: definition, targets: targets)
        job.incrementalFrom = base.from
        job.fullBecause = base.fullBecause
        let changed = base.changed
        var manifest: BackupManifest?
        if let directory = request.directory {
            manifest = try preparePush(
                &job, directory: directory, definition: definition, targets: targets, changed: changed)
            job.name = Self.generatedName(existing: Set(manifest?.backups.map(\.name) ?? []), prefix: "backup")
            preparePushFiles(&job, domain: domain, format: driver.backupImages.format)
        } else {
            preparePull(
                &job, targets: targets, changed: changed, listener: request.listener, format: driver.backupImages.format
            )
        }
        var j = BlockJournal(operation: .backupBegin, checkpoint: newRecord, job: job)
        let id = try beginBlockJournal(domain: domain, j)
        let layer = try await driver.blockLayer(definition, drives: try await drives(definition))
        do {
            try await createJobFiles(job, layer: layer, tools: driver.backupImages, journalID: id, journal: &j)
            try await startBridges(job.disks.map { ($0.target, $0.changedSince) }, layer: layer)
            try await writeChangesFiles(
                job.disks.map { ($0.target, $0.changedSince) }, definition: definition, tools: driver.backupImages,
                size: { try await layer.virtualSize(target: $0) },
                journalID: id, journal: &j)
            try blockPhase(id, &j, "files-created", domain: domain)
            if let record = newRecord {
                newRecord = try await takeCheckpointSnapshots(
                    record, definition: definition, leaveOut: request.targets == nil)
            }
            try await startJob(
                job, layer: layer,
                newBitmap: newRecord.map { NewBitmap(name: $0.name, targets: $0.bitmapTargets) })
            Self.removeChangesFiles(job.disks.map(\.changedSince))
            try blockPhase(id, &j, "started", domain: domain)
            if let newRecord { try store.updateCheckpoints(domain: domain, upsert: [newRecord]) }
            try store.setBackupJob(job, domain: domain)
            try blockPhase(id, &j, "recorded", domain: domain)
            if job.mode == .push {
                try await layer.waitForBackups(targets: targets, progress: progress)
                try blockPhase(id, &j, "copied", domain: domain)
                try await finishPush(job, manifest: manifest!, tools: driver.backupImages)
                try store.setBackupJob(nil, domain: domain)
            }
            try store.finishDomainJournal(id, state: "done")
        } catch {
            try? await rollBackBegin(job, journal: j, layer: layer)
            try? store.finishDomainJournal(id, state: "rolled-back")
            throw error
        }
        await layer.close(keepDaemon: job.mode == .pull)
        return job
    }

    func backupTargets(_ definition: DomainDefinition, _ asked: [String]?) throws -> [String] {
        let all = definition.disks.map(\.target)
        guard let asked else { return all }
        for t in asked where !all.contains(t) {
            throw SnapshotError(
                .notFound, "domain '\(definition.name)' has no disk \(t) (disks: \(all.joined(separator: ", ")))")
        }
        return all.filter { asked.contains($0) }
    }

    /// What an incremental builds on: the checkpoint (nil: a full copy), why a full one was taken
    /// instead, and per disk the bitmaps whose union is "changed since".
    struct IncrementalBase {
        var from: String?
        var fullBecause: String?
        var changed: [String: [LayerBitmap]] = [:]
    }

    /// Checks the checkpoint an incremental builds on, disk by disk; falls back to a full copy
    /// (saying why) only when asked to.
    func incrementalBase(from: String?, fallbackFull: Bool, definition: DomainDefinition, targets: [String])
        async throws -> IncrementalBase
    {
        guard let from else { return IncrementalBase() }
        let record = try checkpoint(domain: definition.name, from)
        var problems: [String] = []
        for t in targets where !record.disks.contains(where: { $0.target == t }) {
            problems.append(
                "disk \(t) is not in checkpoint \(from) (back it up in full on its own with --disks \(t), and the disks \(from) tracks incrementally)"
            )
        }
        problems += try await withBitmapAccess(definition) { access in
            var found: [String] = []
            for disk in record.disks where targets.contains(disk.target) {
                if let p = try await checkpointProblem(disk, definition: definition, access: access).0 {
                    found.append(p)
                }
            }
            return found
        }
        guard problems.isEmpty else {
            let why = problems.joined(separator: "; ")
            guard fallbackFull else {
                throw SnapshotError(
                    .conflict,
                    "an incremental backup from checkpoint \(from) would be wrong: \(why). Nothing was changed; take a full backup (leave out --incremental), or pass --fallback-full to take one and start a new chain"
                )
            }
            notify("taking a full backup instead of an incremental from \(from): \(why)")
            return IncrementalBase(fullBecause: why)
        }
        var base = IncrementalBase(from: from)
        for disk in record.disks where targets.contains(disk.target) {
            base.changed[disk.target] = try await changedSince(disk, definition: definition)
        }
        return base
    }

    /// Push: the directory, the manifest, and each disk's new image (its backing the image of
    /// the backup taken at the incremental's checkpoint).
    func preparePush(
        _ job: inout BackupJob, directory: String, definition: DomainDefinition, targets: [String],
        changed: [String: [LayerBitmap]]
    ) throws -> BackupManifest {
        let dir = URL(fileURLWithPath: directory).standardizedFileURL.path
        var st = stat()
        guard lstat(dir, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else {
            throw SnapshotError(
                .notFound,
                "backup directory \(dir) does not exist or is not a directory (symbolic links are not followed); create it first"
            )
        }
        var manifest =
            try BackupManifest.load(dir) ?? BackupManifest(domain: definition.name, definition: definition)
        guard manifest.domain == definition.name else {
            throw SnapshotError(
                .conflict,
                "\(dir) holds backups of domain '\(manifest.domain)'; back up '\(definition.name)' into its own directory"
            )
        }
        manifest.definition = definition
        var parentFiles: [String: String] = [:]
        if let from = job.incrementalFrom {
            guard let base = manifest.backups.last(where: { $0.checkpoint == from }) else {
                throw SnapshotError(
                    .conflict,
                    "\(dir) has no backup taken at checkpoint \(from), so an incremental from it has nothing to build on. Nothing was changed; take a full backup with --checkpoint to start a chain"
                )
            }
            for t in targets {
                guard let f = base.files[t] else {
                    throw SnapshotError(.conflict, "backup \(base.name) in \(dir) has no disk \(t) to build on")
                }
                // The new image names it as its backing file: only a plain name in the directory.
                guard !f.isEmpty, !f.contains("/"), f != ".", f != ".." else {
                    throw SnapshotError(
                        .storeCorrupt, "the manifest in \(dir) names an image outside it (\(f)); nothing was changed")
                }
                parentFiles[t] = f
            }
        }
        job.directory = dir
        job.disks = targets.map { t in
            BackupJobDisk(
                target: t, scratch: nil, destination: nil, backing: parentFiles[t], changedSince: changed[t] ?? [],
                uri: nil)
        }
        return manifest
    }

    /// Each disk's new image in the push directory, named after the domain, disk and backup.
    func preparePushFiles(_ job: inout BackupJob, domain: String, format: String) {
        for i in job.disks.indices {
            job.disks[i].destination = ((job.directory ?? "") as NSString).appendingPathComponent(
                "\(domain)-\(job.disks[i].target).\(job.name).\(format)")
        }
    }

    /// Pull: a scratch image per disk under the store, and the listener.
    func preparePull(
        _ job: inout BackupJob, targets: [String], changed: [String: [LayerBitmap]],
        listener given: ExportListener?, format: String
    ) {
        let scratchDir = (store.directory as NSString).appendingPathComponent("backup/\(job.domain)")
        let listener: ExportListener =
            given ?? .unix(path: (store.directory as NSString).appendingPathComponent("run/\(job.domain)/nbd.sock"))
        job.listener = listener
        job.disks = targets.map { t in
            BackupJobDisk(
                target: t,
                scratch: (scratchDir as NSString).appendingPathComponent("\(t).\(job.name).scratch.\(format)"),
                destination: nil, backing: nil, changedSince: changed[t] ?? [],
                uri: listener.uri(export: t))
        }
    }

    /// Creates each scratch or destination image, new (O_EXCL), journaled before it exists.
    func createJobFiles(
        _ job: BackupJob, layer: any BlockLayer, tools: any BackupImageTool, journalID: Int64,
        journal j: inout BlockJournal
    ) async throws {
        if job.mode == .pull {
            let dir = (store.directory as NSString).appendingPathComponent("backup/\(job.domain)")
            try FileManager.default.createDirectory(
                atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        }
        for disk in job.disks {
            guard let path = disk.scratch ?? disk.destination else { continue }
            // Journaled as planned before it exists and as created once it does: a rollback
            // removes what was created, and a planned file only while it is still empty (made
            // just before a crash), never a file that was there before.
            j.planned.append(path)
            try blockJournal(journalID, j)
            try NewFile.create(path, like: path, resume: false)
            j.created.append(path)
            try blockJournal(journalID, j)
            try await tools.create(path, size: try await layer.virtualSize(target: disk.target), backing: disk.backing)
        }
    }

    func startJob(_ job: BackupJob, layer: any BlockLayer, newBitmap: NewBitmap?) async throws {
        switch job.mode {
        case .pull:
            let parts = job.disks.map {
                BlockSnapshotPart(
                    target: $0.target, scratch: $0.scratch ?? "", changedSince: $0.changedSince,
                    changedSinceName: job.incrementalFrom)
            }
            try await layer.startBlockSnapshots(parts, newBitmap: newBitmap)
            if let listener = job.listener { try await layer.startExports(parts, listener: listener) }
        case .push:
            try await layer.startBackups(
                job.disks.map {
                    BackupPart(target: $0.target, destination: $0.destination ?? "", changedSince: $0.changedSince)
                }, newBitmap: newBitmap)
        }
    }

    /// Push, copied: every image checked, then the backup entered in the manifest.
    func finishPush(_ job: BackupJob, manifest: BackupManifest, tools: any BackupImageTool) async throws {
        var manifest = manifest
        var files: [String: String] = [:]
        var bytes: [String: UInt64] = [:]
        var problems: [String] = []
        for disk in job.disks {
            guard let path = disk.destination else { continue }
            problems += try await tools.check(path)
            files[disk.target] = (path as NSString).lastPathComponent
            var st = stat()
            if stat(path, &st) == 0 { bytes[disk.target] = UInt64(st.st_blocks) * 512 }
        }
        guard problems.isEmpty else {
            throw SnapshotError(
                .invalidImage, "the backup images failed their check: \(problems.joined(separator: "; "))")
        }
        manifest.backups.append(
            BackupManifest.Entry(
                name: job.name, createdAt: job.startedAt, checkpoint: job.newCheckpoint,
                incrementalFrom: job.incrementalFrom, files: files, bytes: bytes))
        try manifest.save(job.directory ?? "", like: job.disks.first?.destination ?? "")
    }

    // MARK: - Status and end

    public func backupStatus(domain: String) async throws -> BackupStatus? {
        let (definition, _) = try definition(domain)
        guard let job = try store.backupJob(of: domain) else { return nil }
        var status = BackupStatus(job: job)
        guard let layer = try await aliveLayer(definition, storageDaemon: job.storageDaemon) else {
            status.problem =
                job.storageDaemon
                ? "the storage daemon holding the disks is gone"
                : "domain '\(domain)' stopped, and its exports with it; end the job with `vmsnap backup end \(domain)`"
            return status
        }
        if job.mode == .push {
            let progress: [BlockJobProgress]
            do { progress = try await layer.backupProgress(targets: job.disks.map(\.target)) } catch {
                await layer.close(keepDaemon: true)
                throw error
            }
            status.done = progress.reduce(0) { $0 + $1.done }
            status.total = progress.reduce(0) { $0 + $1.total }
        }
        await layer.close(keepDaemon: true)
        return status
    }

    /// Ends a pull backup: the exports and views go, and their scratch images.
    public func endBackup(domain: String) async throws -> BackupJob {
        let lock = try domainLock(domain)
        defer { withExtendedLifetime(lock) {} }
        try await recover(domain: domain)
        guard let job = try store.backupJob(of: domain) else {
            throw SnapshotError(.notFound, "domain '\(domain)' has no backup job to end")
        }
        var j = BlockJournal(operation: .backupEnd, job: job)
        let id = try beginBlockJournal(domain: domain, j)
        try await tearDown(job, removing: job.disks.compactMap(\.scratch))
        try blockPhase(id, &j, "torn-down", domain: domain)
        try store.setBackupJob(nil, domain: domain)
        try store.finishDomainJournal(id, state: "done")
        return job
    }

    /// Stops whatever of `job` still runs (exports, views, copies, the storage daemon), then
    /// removes `files`. Idempotent.
    func tearDown(_ job: BackupJob, removing files: [String]) async throws {
        let (definition, _) = try definition(job.domain)
        if let layer = try await aliveLayer(definition, storageDaemon: job.storageDaemon) {
            let targets = job.disks.map(\.target)
            do {
                try await layer.stopExports(ids: targets)
                for t in targets { try await layer.stopBlockSnapshot(id: t) }
                try await layer.cancelBackups(targets: targets)
            } catch {
                await layer.close(keepDaemon: true)
                throw error
            }
            await layer.close(keepDaemon: false)
        }
        for f in files { unlink(f) }
    }

    /// Undoes a begin that failed or was interrupted: the job, its files, its new checkpoint.
    func rollBackBegin(_ job: BackupJob, journal j: BlockJournal, layer: (any BlockLayer)?) async throws {
        if let layer {
            let targets = job.disks.map(\.target)
            try? await layer.stopExports(ids: targets)
            for t in targets { try? await layer.stopBlockSnapshot(id: t) }
            try? await layer.cancelBackups(targets: targets)
            if let record = j.checkpoint { try? await layer.removeBitmaps(record.name, targets: targets) }
            await stopBridges(job.disks.map { ($0.target, $0.changedSince) }, layer: layer)
            await layer.close(keepDaemon: false)
        } else {
            await releaseCounts(job.disks.map { ($0.target, $0.changedSince) }, domain: job.domain)
            try await tearDown(job, removing: [])
            if let record = j.checkpoint {
                try await withBitmapAccess(try definition(job.domain).definition) {
                    try await $0.remove(record.name, targets: record.bitmapTargets)
                }
            }
        }
        if let record = j.checkpoint {
            await removeCheckpointSnapshots([record], definition: try definition(job.domain).definition)
        }
        j.removeFiles()
        if let record = j.checkpoint { try store.updateCheckpoints(domain: job.domain, remove: [record.name]) }
        try store.setBackupJob(nil, domain: job.domain)
    }

    /// Recovery: an interrupted begin is rolled back (whatever it made goes, the disks are as
    /// they were); an interrupted end is finished.
    func recoverBackup(_ entry: DomainJournalEntry, _ j: BlockJournal) async throws {
        guard let job = j.job else {
            try store.finishDomainJournal(entry.id, state: "done")
            return
        }
        switch j.operation {
        case .backupEnd:
            try await tearDown(job, removing: job.disks.compactMap(\.scratch))
            try store.setBackupJob(nil, domain: entry.domain)
            try store.finishDomainJournal(entry.id, state: "done")
            notify("recovered an interrupted backup end on domain '\(entry.domain)': finished")
        default:
            try await rollBackBegin(job, journal: j, layer: nil)
            try store.finishDomainJournal(entry.id, state: "rolled-back")
            notify("recovered an interrupted backup begin on domain '\(entry.domain)': rolled back")
        }
    }
}
