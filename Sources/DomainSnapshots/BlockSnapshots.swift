import Foundation
import GRDB
import HypervisorDriver
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// One disk's part in a temporary block snapshot.
public struct BlockSnapshotDisk: Codable, Sendable, Hashable {
    public var target: String
    /// The scratch image copy-before-write keeps the overwritten blocks in.
    public var source: String
    /// The view's id in the hypervisor (`bs<N>-<target>`).
    public var id: String
    /// The NBD export's name while exported (`<snapshot>-<target>`).
    public var exportName: String
    /// The bitmaps frozen with the view ("changed since `changesSince`"), for its export.
    public var changedSince: [LayerBitmap]
}

/// A temporary block snapshot: an independent point-in-time view of chosen disks of a domain
/// (not a revert point, not in a tree), optionally exported over NBD.
public struct BlockSnapshotRecord: Codable, Sendable, Hashable {
    public var domain: String
    public var name: String
    public var createdAt: Date
    /// The checkpoint whose changes the view publishes (`qemu:dirty-bitmap:<it>`).
    public var changesSince: String?
    /// The checkpoint taken at the view's instant.
    public var checkpoint: String?
    public var disks: [BlockSnapshotDisk]
    /// The domain was shut off: a storage daemon holds its disks.
    public var storageDaemon: Bool
    /// Where its export listens, while it is exported.
    public var exportListener: ExportListener?

    /// Each disk's NBD URI while exported.
    public var uris: [String: String] {
        guard let l = exportListener else { return [:] }
        return Dictionary(uniqueKeysWithValues: disks.map { ($0.target, l.uri(export: $0.exportName)) })
    }

    func parts() -> [BlockSnapshotPart] {
        disks.map {
            BlockSnapshotPart(
                target: $0.target, scratch: $0.source, changedSince: $0.changedSince, changedSinceName: changesSince,
                id: $0.id, exportName: $0.exportName)
        }
    }
}

extension MetadataStore {
    public func blockSnapshots(of domain: String) throws -> [BlockSnapshotRecord] {
        try wrap {
            try dbQueue.read { db in
                try Row.fetchAll(
                    db, sql: "SELECT record_json FROM domain_blocksnapshots WHERE domain = ? ORDER BY name",
                    arguments: [domain]
                ).map { try Self.recordDecoder.decode(BlockSnapshotRecord.self, from: $0["record_json"] as Data) }
            }
        }
    }

    public func setBlockSnapshot(_ record: BlockSnapshotRecord?, domain: String, name: String) throws {
        try wrap {
            try dbQueue.write { db in
                if let record {
                    try db.execute(
                        sql:
                            "INSERT OR REPLACE INTO domain_blocksnapshots (domain, name, record_json) VALUES (?, ?, ?)",
                        arguments: [domain, name, try Self.recordEncoder.encode(record)])
                } else {
                    try db.execute(
                        sql: "DELETE FROM domain_blocksnapshots WHERE domain = ? AND name = ?",
                        arguments: [domain, name])
                }
            }
        }
    }
}

/// What `vmsnap blocksnapshot create` asks for.
public struct BlockSnapshotRequest: Sendable, Hashable {
    public var name: String?
    public var targets: [String]?
    /// Publish the changes since this checkpoint with the view.
    public var changesSince: String?
    /// Take this checkpoint at the view's instant.
    public var checkpoint: String?

    public init(name: String? = nil, targets: [String]? = nil, changesSince: String? = nil, checkpoint: String? = nil) {
        self.name = name
        self.targets = targets
        self.changesSince = changesSince
        self.checkpoint = checkpoint
    }
}

extension DomainService {
    /// Takes a temporary block snapshot: a copy-before-write view of each chosen disk at one
    /// instant (the guest is not paused; its I/O is drained for the instant), journaled.
    @discardableResult
    public func createBlockSnapshot(domain: String, _ request: BlockSnapshotRequest) async throws
        -> BlockSnapshotRecord
    {
        let lock = try domainLock(domain)
        defer { withExtendedLifetime(lock) {} }
        try await recover(domain: domain)
        let (definition, _) = try definition(domain)
        let driver = try drivers.driver(for: definition)
        let existing = try store.blockSnapshots(of: domain)
        let name = request.name ?? Self.generatedName(existing: Set(existing.map(\.name)), prefix: "view")
        try SnapshotName.validate(name)
        guard !existing.contains(where: { $0.name == name }) else {
            throw SnapshotError(
                .alreadyExists, "domain '\(domain)' already has a block snapshot named \(SnapshotName.quoted(name))")
        }
        let targets = try backupTargets(definition, request.targets)
        try requireFreeForViews(domain, targets: targets, driver: driver)
        let changed = try await incrementalBase(
            from: request.changesSince, fallbackFull: false, definition: definition, targets: targets
        ).changed
        var newRecord: CheckpointRecord?
        if let c = request.checkpoint {
            try checkCheckpointName(c, domain: domain)
            newRecord = try newCheckpointRecord(
                domain: domain, name: c, description: "taken with block snapshot \(name)",
                tracked: try await trackedDisks(definition, targets: request.targets))
        }
        let used = Set(existing.flatMap { $0.disks.map(\.id) })
        let seq = (1...).first { n in targets.allSatisfy { !used.contains("bs\(n)-\($0)") } }!
        let dir = (store.directory as NSString).appendingPathComponent("blocksnapshots/\(domain)")
        let record = BlockSnapshotRecord(
            domain: domain, name: name, createdAt: Date(timeIntervalSince1970: floor(Date().timeIntervalSince1970)),
            changesSince: request.changesSince, checkpoint: request.checkpoint,
            disks: targets.map { t in
                BlockSnapshotDisk(
                    target: t,
                    source: (dir as NSString).appendingPathComponent("bs\(seq)-\(t).\(driver.backupImages.format)"),
                    id: "bs\(seq)-\(t)",
                    exportName: "\(name)-\(t)", changedSince: changed[t] ?? [])
            }, storageDaemon: !driver.isRunning(domain), exportListener: nil)
        var j = BlockJournal(operation: .blockSnapshotCreate, checkpoint: newRecord, view: record)
        let id = try beginBlockJournal(domain: domain, j)
        let layer = try await driver.blockLayer(definition, drives: try await drives(definition))
        do {
            try FileManager.default.createDirectory(
                atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            for disk in record.disks {
                j.planned.append(disk.source)
                try blockJournal(id, j)
                try NewFile.create(disk.source, like: disk.source, resume: false)
                j.created.append(disk.source)
                try blockJournal(id, j)
                try await driver.backupImages.create(
                    disk.source, size: try await layer.virtualSize(target: disk.target), backing: nil)
            }
            try await startBridges(record.disks.map { ($0.target, $0.changedSince) }, layer: layer)
            try await writeChangesFiles(
                record.disks.map { ($0.target, $0.changedSince) }, definition: definition,
                tools: driver.backupImages, size: { try await layer.virtualSize(target: $0) }, journalID: id,
                journal: &j)
            try await layer.startBlockSnapshots(
                record.parts(), newBitmap: newRecord.map { NewBitmap(name: $0.name, targets: $0.bitmapTargets) })
            Self.removeChangesFiles(record.disks.map(\.changedSince))
            try blockPhase(id, &j, "started", domain: domain)
            if let newRecord { try store.updateCheckpoints(domain: domain, upsert: [newRecord]) }
            try store.setBlockSnapshot(record, domain: domain, name: name)
            try store.finishDomainJournal(id, state: "done")
        } catch {
            try? await undoBlockSnapshot(record, journal: j, layer: layer)
            try? store.finishDomainJournal(id, state: "rolled-back")
            await layer.close(keepDaemon: try holdsDaemon(domain))
            throw error
        }
        await layer.close(keepDaemon: true)
        return record
    }

    /// True while something of the domain's needs its storage daemon (a block snapshot or a
    /// backup job).
    func holdsDaemon(_ domain: String) throws -> Bool {
        try !store.blockSnapshots(of: domain).isEmpty || store.backupJob(of: domain) != nil
    }

    public func blockSnapshots(domain: String) throws -> [BlockSnapshotRecord] {
        _ = try definition(domain)
        return try store.blockSnapshots(of: domain)
    }

    public func blockSnapshot(domain: String, _ name: String) throws -> BlockSnapshotRecord {
        guard let r = try blockSnapshots(domain: domain).first(where: { $0.name == name }) else {
            throw SnapshotError(
                .notFound,
                "domain '\(domain)' has no block snapshot named \(SnapshotName.quoted(name)); `vmsnap blocksnapshot list \(domain)` shows them"
            )
        }
        return r
    }

    /// Deletes a block snapshot: its export, its views and their scratch images.
    public func deleteBlockSnapshot(domain: String, _ name: String) async throws {
        let lock = try domainLock(domain)
        defer { withExtendedLifetime(lock) {} }
        try await recover(domain: domain)
        let record = try blockSnapshot(domain: domain, name)
        var j = BlockJournal(operation: .blockSnapshotDelete, view: record)
        let id = try beginBlockJournal(domain: domain, j)
        try await finishBlockSnapshotDelete(record)
        try blockPhase(id, &j, "deleted", domain: domain)
        try store.finishDomainJournal(id, state: "done")
    }

    func finishBlockSnapshotDelete(_ record: BlockSnapshotRecord) async throws {
        let (definition, _) = try definition(record.domain)
        if let layer = try await aliveLayer(definition, storageDaemon: record.storageDaemon) {
            do {
                try await layer.stopExports(ids: record.disks.map(\.id))
                for d in record.disks { try await layer.stopBlockSnapshot(id: d.id) }
            } catch {
                await layer.close(keepDaemon: true)
                throw error
            }
            try store.setBlockSnapshot(nil, domain: record.domain, name: record.name)
            await layer.close(keepDaemon: try holdsDaemon(record.domain))
        }
        for d in record.disks { unlink(d.source) }
        try store.setBlockSnapshot(nil, domain: record.domain, name: record.name)
    }

    /// Undoes a create that failed or was interrupted.
    func undoBlockSnapshot(_ record: BlockSnapshotRecord, journal j: BlockJournal, layer: (any BlockLayer)?)
        async throws
    {
        if let layer {
            try? await layer.stopExports(ids: record.disks.map(\.id))
            for d in record.disks { try? await layer.stopBlockSnapshot(id: d.id) }
            if let c = j.checkpoint { try? await layer.removeBitmaps(c.name, targets: c.bitmapTargets) }
            await stopBridges(record.disks.map { ($0.target, $0.changedSince) }, layer: layer)
        } else {
            await releaseCounts(record.disks.map { ($0.target, $0.changedSince) }, domain: record.domain)
            try await finishBlockSnapshotDelete(record)
            if let c = j.checkpoint {
                try await withBitmapAccess(try definition(record.domain).definition) {
                    try await $0.remove(c.name, targets: c.bitmapTargets)
                }
            }
        }
        j.removeFiles()
        if let c = j.checkpoint { try store.updateCheckpoints(domain: record.domain, remove: [c.name]) }
        try store.setBlockSnapshot(nil, domain: record.domain, name: record.name)
    }

    // MARK: - Exports

    /// Exports a block snapshot's views read-only over NBD: a Unix socket readable only by the
    /// owner by default, TCP on request (127.0.0.1 unless another host is given).
    @discardableResult
    public func startExport(domain: String, _ name: String, listener given: ExportListener? = nil) async throws
        -> BlockSnapshotRecord
    {
        let lock = try domainLock(domain)
        defer { withExtendedLifetime(lock) {} }
        try await recover(domain: domain)
        var record = try blockSnapshot(domain: domain, name)
        if let l = record.exportListener {
            throw SnapshotError(
                .conflict, "block snapshot \(SnapshotName.quoted(name)) is exported already (\(l)); stop it first")
        }
        let (definition, _) = try definition(domain)
        let driver = try drivers.driver(for: definition)
        let listener: ExportListener =
            given ?? .unix(path: (store.directory as NSString).appendingPathComponent("run/\(domain)/nbd.sock"))
        let layer = try await driver.blockLayer(definition, drives: try await drives(definition))
        do { try await layer.startExports(record.parts(), listener: listener) } catch {
            await layer.close(keepDaemon: true)
            throw error
        }
        await layer.close(keepDaemon: true)
        record.exportListener = listener
        try store.setBlockSnapshot(record, domain: domain, name: name)
        return record
    }

    /// Stops a block snapshot's export (the view stays).
    public func stopExport(domain: String, _ name: String) async throws {
        let lock = try domainLock(domain)
        defer { withExtendedLifetime(lock) {} }
        var record = try blockSnapshot(domain: domain, name)
        let (definition, _) = try definition(domain)
        if let layer = try await aliveLayer(definition, storageDaemon: record.storageDaemon) {
            do { try await layer.stopExports(ids: record.disks.map(\.id)) } catch {
                await layer.close(keepDaemon: true)
                throw error
            }
            await layer.close(keepDaemon: true)
        }
        record.exportListener = nil
        try store.setBlockSnapshot(record, domain: domain, name: name)
    }

    /// `<domainblocksnapshot>`: the disks and where each view's blocks are kept (no export address:
    /// that comes from `vmsnap export address`).
    public func blockSnapshotXML(domain: String, _ name: String) throws -> String {
        let r = try blockSnapshot(domain: domain, name)
        let e = SnapshotXML.escape
        var x = "<domainblocksnapshot>\n  <name>\(e(r.name))</name>\n"
        x += "  <creationTime>\(Int64(r.createdAt.timeIntervalSince1970))</creationTime>\n"
        if let c = r.checkpoint { x += "  <checkpoint>\(e(c))</checkpoint>\n" }
        for d in r.disks {
            x += "  <disk name='\(e(d.target))' type='file'>\n    <source file='\(e(d.source))'/>\n  </disk>\n"
        }
        return x + "</domainblocksnapshot>\n"
    }
}
