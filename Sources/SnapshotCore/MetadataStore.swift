import Foundation
import GRDB

/// An operation recorded before its first step runs, with how far it got.
public struct JournalEntry: Sendable, Hashable {
    public var id: Int64
    public var diskID: String
    public var plan: Plan
    /// The layout before the operation, restored if it rolls back.
    public var before: DiskLayout
    /// Steps finished so far.
    public var stepsDone: Int
    public var startedAt: Date
    public var pid: Int32
}

/// vmsnap's metadata: disks, their snapshot trees and layers, and the journal of operations in
/// progress, in one SQLite database (through GRDB) so that every change is a transaction.
///
/// Where it lives is configuration: `--store DIR`, `VMSNAP_STORE`, or /var/lib/vmsnap.
public final class MetadataStore: Sendable {
    /// The default store directory.
    public static let defaultDirectory = "/var/lib/vmsnap"
    /// The database file inside the store directory.
    public static let databaseName = "vmsnap.sqlite"

    public let directory: String
    private let dbQueue: DatabaseQueue

    /// The directory from a flag, then `VMSNAP_STORE`, then the default.
    public static func resolveDirectory(flag: String?, environment: [String: String] = ProcessInfo.processInfo.environment) -> String {
        if let flag, !flag.isEmpty { return flag }
        if let env = environment["VMSNAP_STORE"], !env.isEmpty { return env }
        return defaultDirectory
    }

    /// Opens (creating if needed) the store in `directory`. A file that is not a vmsnap database is
    /// reported as `.storeCorrupt` and left as it is.
    public init(directory: String) throws {
        self.directory = directory
        let path = (directory as NSString).appendingPathComponent(Self.databaseName)
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            try FileManager.default.createDirectory(atPath: (directory as NSString).appendingPathComponent("locks"), withIntermediateDirectories: true)
        } catch {
            throw SnapshotError(.io, "cannot create the metadata store directory \(directory); pass --store DIR or set VMSNAP_STORE to a writable directory", cause: error)
        }
        var config = Configuration()
        config.busyMode = .timeout(30)
        config.prepareDatabase { db in
            // FULL: a journal entry is on disk before the step it describes runs.
            try db.execute(sql: "PRAGMA synchronous = FULL")
            try db.execute(sql: "PRAGMA foreign_keys = ON")
        }
        do {
            dbQueue = try DatabaseQueue(path: path, configuration: config)
            try dbQueue.writeWithoutTransaction { db in
                if try String.fetchOne(db, sql: "PRAGMA journal_mode") != "wal" {
                    try db.execute(sql: "PRAGMA journal_mode = WAL")
                }
            }
            try Self.migrator.migrate(dbQueue)
            try dbQueue.read { db in
                let tables = try String.fetchSet(db, sql: "SELECT name FROM sqlite_master WHERE type = 'table'")
                for required in ["disks", "disk_snapshots", "disk_layers", "journal"] where !tables.contains(required) {
                    throw SnapshotError(.storeCorrupt, "table '\(required)' is missing")
                }
            }
        } catch {
            throw SnapshotError(
                .storeCorrupt,
                "the metadata store \(path) is not a usable vmsnap database (\(Self.describe(error))); nothing was changed. Move it aside and restore it from a backup, or point --store at another directory",
                cause: nil
            )
        }
    }

    static func describe(_ error: any Error) -> String {
        if let db = error as? DatabaseError { return db.message ?? "\(db.resultCode)" }
        if let s = error as? SnapshotError { return s.message }
        return "\(error)"
    }

    private static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1-disks") { db in
            try db.execute(sql: """
                CREATE TABLE disks (
                    id TEXT PRIMARY KEY NOT NULL,
                    kind TEXT NOT NULL,
                    active TEXT NOT NULL,
                    current_snapshot TEXT,
                    created_at INTEGER NOT NULL
                );
                CREATE TABLE disk_snapshots (
                    disk_id TEXT NOT NULL REFERENCES disks(id) ON DELETE CASCADE,
                    name TEXT NOT NULL,
                    kind TEXT NOT NULL,
                    image TEXT NOT NULL,
                    backend_id TEXT,
                    parent TEXT,
                    created_at INTEGER NOT NULL,
                    description TEXT,
                    virtual_size INTEGER NOT NULL,
                    seq INTEGER NOT NULL,
                    PRIMARY KEY (disk_id, name)
                );
                CREATE TABLE disk_layers (
                    disk_id TEXT NOT NULL REFERENCES disks(id) ON DELETE CASCADE,
                    image TEXT NOT NULL,
                    backing TEXT,
                    seq INTEGER NOT NULL,
                    PRIMARY KEY (disk_id, image)
                );
                CREATE INDEX disk_layers_by_image ON disk_layers(image);
                CREATE TABLE journal (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    disk_id TEXT NOT NULL,
                    operation TEXT NOT NULL,
                    plan_json BLOB NOT NULL,
                    before_json BLOB NOT NULL,
                    steps_done INTEGER NOT NULL DEFAULT 0,
                    state TEXT NOT NULL DEFAULT 'open',
                    started_at INTEGER NOT NULL,
                    finished_at INTEGER,
                    pid INTEGER NOT NULL
                );
                CREATE INDEX journal_open ON journal(state, disk_id);
                """)
        }
        return migrator
    }

    // MARK: - Reading

    /// The layout of the disk whose identity, active layer or any managed layer is `locator`.
    public func findDisk(locator: String) throws -> DiskLayout? {
        try wrap {
            try dbQueue.read { db in
                let id = try String.fetchOne(db, sql: "SELECT id FROM disks WHERE id = ? OR active = ?", arguments: [locator, locator])
                    ?? String.fetchOne(db, sql: "SELECT disk_id FROM disk_layers WHERE image = ? LIMIT 1", arguments: [locator])
                guard let id else { return nil }
                return try Self.layout(db, id: id)
            }
        }
    }

    /// The layout of the disk with identity `id`.
    public func layout(diskID id: String) throws -> DiskLayout? {
        try wrap { try dbQueue.read { db in try Self.layout(db, id: id) } }
    }

    /// Every managed disk.
    public func disks() throws -> [DiskRecord] {
        try wrap {
            try dbQueue.read { db in
                try Row.fetchAll(db, sql: "SELECT * FROM disks ORDER BY id").map(Self.diskRecord)
            }
        }
    }

    private static func diskRecord(_ row: Row) -> DiskRecord {
        DiskRecord(
            id: row["id"], kind: BackendKind(rawValue: row["kind"]), active: row["active"],
            current: row["current_snapshot"], createdAt: Date(timeIntervalSince1970: TimeInterval(row["created_at"] as Int64))
        )
    }

    private static func layout(_ db: Database, id: String) throws -> DiskLayout? {
        guard let row = try Row.fetchOne(db, sql: "SELECT * FROM disks WHERE id = ?", arguments: [id]) else { return nil }
        let snapshots = try Row.fetchAll(db, sql: "SELECT * FROM disk_snapshots WHERE disk_id = ? ORDER BY seq", arguments: [id]).map { r in
            DiskSnapshot(
                name: r["name"], kind: SnapshotKind(rawValue: r["kind"]) ?? .internal, image: r["image"], backendID: r["backend_id"],
                parent: r["parent"], createdAt: Date(timeIntervalSince1970: TimeInterval(r["created_at"] as Int64)),
                description: r["description"], virtualSize: UInt64(r["virtual_size"] as Int64)
            )
        }
        let layers = try Row.fetchAll(db, sql: "SELECT image, backing FROM disk_layers WHERE disk_id = ? ORDER BY seq", arguments: [id]).map {
            DiskLayer(image: $0["image"], backing: $0["backing"])
        }
        return DiskLayout(disk: diskRecord(row), snapshots: snapshots, layers: layers)
    }

    // MARK: - Writing

    /// Records a disk vmsnap starts to manage.
    public func insert(_ layout: DiskLayout) throws {
        try wrap {
            try dbQueue.write { db in
                if try Bool.fetchOne(db, sql: "SELECT 1 FROM disks WHERE id = ?", arguments: [layout.disk.id]) == true {
                    throw SnapshotError(.alreadyExists, "disk \(layout.disk.id) is already managed")
                }
                try Self.apply(db, from: nil, to: layout)
            }
        }
    }

    /// Forgets a disk and its snapshots (storage untouched).
    public func removeDisk(id: String) throws {
        try wrap { try dbQueue.write { db in try db.execute(sql: "DELETE FROM disks WHERE id = ?", arguments: [id]) } }
    }

    /// Replaces `before` by `after` in one transaction (metadata-only changes).
    public func update(from before: DiskLayout, to after: DiskLayout) throws {
        try wrap { try dbQueue.write { db in try Self.apply(db, from: before, to: after) } }
    }

    /// Writes only the rows that differ between two layouts, so the cost of a change does not grow
    /// with the number of snapshots the disk has.
    private static func apply(_ db: Database, from before: DiskLayout?, to after: DiskLayout) throws {
        let d = after.disk
        if let before, before.disk.id != d.id { throw SnapshotError(.conflict, "layout changed disk identity") }
        if before?.disk != d {
            try db.execute(
                sql: """
                    INSERT INTO disks (id, kind, active, current_snapshot, created_at) VALUES (?, ?, ?, ?, ?)
                    ON CONFLICT(id) DO UPDATE SET kind = excluded.kind, active = excluded.active, current_snapshot = excluded.current_snapshot
                    """,
                arguments: [d.id, d.kind.rawValue, d.active, d.current, Int64(d.createdAt.timeIntervalSince1970)])
        }
        let oldSnaps = Dictionary((before?.snapshots ?? []).map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        let newNames = Set(after.snapshots.map(\.name))
        for name in oldSnaps.keys where !newNames.contains(name) {
            try db.execute(sql: "DELETE FROM disk_snapshots WHERE disk_id = ? AND name = ?", arguments: [d.id, name])
        }
        var nextSeq: Int64? = nil
        for s in after.snapshots where oldSnaps[s.name] != s {
            if oldSnaps[s.name] == nil {
                let seq = try nextSeq ?? (Int64.fetchOne(db, sql: "SELECT COALESCE(MAX(seq), 0) + 1 FROM disk_snapshots WHERE disk_id = ?", arguments: [d.id]) ?? 1)
                nextSeq = seq + 1
                try db.execute(
                    sql: "INSERT INTO disk_snapshots (disk_id, name, kind, image, backend_id, parent, created_at, description, virtual_size, seq) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    arguments: [d.id, s.name, s.kind.rawValue, s.image, s.backendID, s.parent, Int64(s.createdAt.timeIntervalSince1970), s.description, Int64(s.virtualSize), seq])
            } else {
                try db.execute(
                    sql: "UPDATE disk_snapshots SET kind = ?, image = ?, backend_id = ?, parent = ?, created_at = ?, description = ?, virtual_size = ? WHERE disk_id = ? AND name = ?",
                    arguments: [s.kind.rawValue, s.image, s.backendID, s.parent, Int64(s.createdAt.timeIntervalSince1970), s.description, Int64(s.virtualSize), d.id, s.name])
            }
        }
        let oldLayers = Dictionary((before?.layers ?? []).map { ($0.image, $0) }, uniquingKeysWith: { a, _ in a })
        let newImages = Set(after.layers.map(\.image))
        for image in oldLayers.keys where !newImages.contains(image) {
            try db.execute(sql: "DELETE FROM disk_layers WHERE disk_id = ? AND image = ?", arguments: [d.id, image])
        }
        var nextLayerSeq: Int64? = nil
        for l in after.layers where oldLayers[l.image] != l {
            if oldLayers[l.image] == nil {
                let seq = try nextLayerSeq ?? (Int64.fetchOne(db, sql: "SELECT COALESCE(MAX(seq), 0) + 1 FROM disk_layers WHERE disk_id = ?", arguments: [d.id]) ?? 1)
                nextLayerSeq = seq + 1
                try db.execute(sql: "INSERT INTO disk_layers (disk_id, image, backing, seq) VALUES (?,?,?,?)", arguments: [d.id, l.image, l.backing, seq])
            } else {
                try db.execute(sql: "UPDATE disk_layers SET backing = ? WHERE disk_id = ? AND image = ?", arguments: [l.backing, d.id, l.image])
            }
        }
    }

    // MARK: - Journal

    /// Records an operation before its first step runs; returns the entry's id.
    public func beginJournal(diskID: String, plan: Plan, before: DiskLayout) throws -> Int64 {
        let encoder = JSONEncoder()
        let planJSON = try encoder.encode(plan)
        let beforeJSON = try encoder.encode(before)
        return try wrap {
            try dbQueue.write { db in
                try db.execute(
                    sql: "INSERT INTO journal (disk_id, operation, plan_json, before_json, started_at, pid) VALUES (?,?,?,?,?,?)",
                    arguments: [diskID, plan.operation, planJSON, beforeJSON, Int64(Date().timeIntervalSince1970), Int64(getpid())])
                return db.lastInsertedRowID
            }
        }
    }

    /// Records that the first `stepsDone` steps of entry `id` have finished.
    public func markSteps(journal id: Int64, done stepsDone: Int) throws {
        try wrap { try dbQueue.write { db in try db.execute(sql: "UPDATE journal SET steps_done = ? WHERE id = ?", arguments: [stepsDone, id]) } }
    }

    /// Writes the resulting layout and closes the entry, in one transaction.
    public func completeJournal(_ id: Int64, from before: DiskLayout, to after: DiskLayout) throws {
        try wrap {
            try dbQueue.write { db in
                try Self.apply(db, from: before, to: after)
                try db.execute(sql: "UPDATE journal SET state = 'done', finished_at = ? WHERE id = ?", arguments: [Int64(Date().timeIntervalSince1970), id])
            }
        }
    }

    /// Closes the entry after a rollback; the layout stays as it was.
    public func rollBackJournal(_ id: Int64) throws {
        try wrap {
            try dbQueue.write { db in
                try db.execute(sql: "UPDATE journal SET state = 'rolled-back', finished_at = ? WHERE id = ?", arguments: [Int64(Date().timeIntervalSince1970), id])
            }
        }
    }

    /// Operations that started and neither finished nor rolled back.
    public func openJournals(diskID: String? = nil) throws -> [JournalEntry] {
        let decoder = JSONDecoder()
        return try wrap {
            try dbQueue.read { db in
                let rows: [Row]
                if let diskID {
                    rows = try Row.fetchAll(db, sql: "SELECT * FROM journal WHERE state = 'open' AND disk_id = ? ORDER BY id", arguments: [diskID])
                } else {
                    rows = try Row.fetchAll(db, sql: "SELECT * FROM journal WHERE state = 'open' ORDER BY id")
                }
                return try rows.map { r in
                    JournalEntry(
                        id: r["id"], diskID: r["disk_id"], plan: try decoder.decode(Plan.self, from: r["plan_json"] as Data),
                        before: try decoder.decode(DiskLayout.self, from: r["before_json"] as Data), stepsDone: r["steps_done"],
                        startedAt: Date(timeIntervalSince1970: TimeInterval(r["started_at"] as Int64)), pid: Int32(r["pid"] as Int64))
                }
            }
        }
    }

    private func wrap<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch let e as SnapshotError { throw e } catch {
            throw SnapshotError(.storeCorrupt, "the metadata store in \(directory) failed: \(Self.describe(error)); nothing further was changed")
        }
    }
}
