import Foundation
import GRDB
#if canImport(Glibc)
    import Glibc
#endif

/// An operation recorded before its first step runs, with how far it got.
public struct JournalEntry: Sendable, Hashable {
    public var id: Int64
    public var diskID: String
    /// The backend that planned it (recovery needs it for `.backend` steps).
    public var kind: BackendKind
    public var operation: String
    public var steps: [PlanStep]
    public var pointOfNoReturn: Int
    /// The metadata rows the operation changes once its steps have run.
    public var change: LayoutChange
    /// Steps finished so far.
    public var stepsDone: Int
    public var startedAt: Date
    public var pid: Int32
}

/// The rows that differ between two layouts of one disk: what a journal entry records and what
/// completing it writes, so neither grows with the number of snapshots a disk has.
public struct LayoutChange: Codable, Sendable, Hashable {
    public var disk: DiskRecord
    public var upsertSnapshots: [DiskSnapshot] = []
    public var removeSnapshots: [String] = []
    public var upsertLayers: [DiskLayer] = []
    public var removeLayers: [String] = []

    public static func between(_ before: DiskLayout?, _ after: DiskLayout) -> LayoutChange {
        var change = LayoutChange(disk: after.disk)
        let oldSnaps = Dictionary((before?.snapshots ?? []).map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        let newNames = Set(after.snapshots.map(\.name))
        change.removeSnapshots = oldSnaps.keys.filter { !newNames.contains($0) }.sorted()
        change.upsertSnapshots = after.snapshots.filter { oldSnaps[$0.name] != $0 }
        let oldLayers = Dictionary((before?.layers ?? []).map { ($0.image, $0) }, uniquingKeysWith: { a, _ in a })
        let newImages = Set(after.layers.map(\.image))
        change.removeLayers = oldLayers.keys.filter { !newImages.contains($0) }.sorted()
        change.upsertLayers = after.layers.filter { oldLayers[$0.image] != $0 }
        return change
    }
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
    package let dbQueue: DatabaseQueue

    /// The directory from a flag, then `VMSNAP_STORE`, then the default.
    /// An empty `--store` is refused, not read as "the default".
    public static func resolveDirectory(
        flag: String?, environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws -> String {
        if let flag {
            guard !flag.isEmpty else {
                throw SnapshotError(
                    .invalidArgument,
                    "--store is empty; give a directory, or leave the option out to use $VMSNAP_STORE or \(defaultDirectory)"
                )
            }
            return flag
        }
        if let env = environment["VMSNAP_STORE"], !env.isEmpty { return env }
        return defaultDirectory
    }

    /// Why a store path may not be trusted: vmsnap (often root) runs the steps its journal
    /// records, so a store, its database or its settings that someone else can change would let
    /// them choose what runs. Nil when it is a directory (or file) of this user (or root) that
    /// only its owner can write.
    public static func trustProblem(_ path: String, directory: Bool) -> String? {
        var st = stat()
        guard lstat(path, &st) == 0 else { return nil }  // not there yet: created 0700 below
        if (st.st_mode & S_IFMT) == S_IFLNK {
            guard stat(path, &st) == 0 else { return "\(path) is a dangling symbolic link" }
        }
        let type = st.st_mode & S_IFMT
        if directory, type != S_IFDIR { return "\(path) is not a directory" }
        if !directory, type != S_IFREG { return "\(path) is not a regular file" }
        if st.st_uid != geteuid(), st.st_uid != 0 {
            return
                "\(path) is owned by uid \(st.st_uid), not by the user running vmsnap (uid \(geteuid())) or root; chown it"
        }
        if st.st_mode & 0o022 != 0 {
            return
                "\(path) is writable by group or others (mode \(String(st.st_mode & 0o7777, radix: 8))); anyone who can change it could make vmsnap run what they choose. chmod go-w it"
        }
        return nil
    }

    /// Refuses a store directory, database or settings file that others could change.
    static func checkTrust(_ directory: String) throws {
        let checks = [
            (directory, true), ((directory as NSString).appendingPathComponent(databaseName), false),
            ((directory as NSString).appendingPathComponent("settings.conf"), false),
        ]
        for (path, isDirectory) in checks {
            if let problem = trustProblem(path, directory: isDirectory) {
                throw SnapshotError(.storeCorrupt, "refusing the metadata store: \(problem). Nothing was changed")
            }
        }
    }

    /// Opens (creating if needed) the store in `directory`. A file that is not a vmsnap database is
    /// reported as `.storeCorrupt` and left as it is.
    public init(directory: String) throws {
        self.directory = directory
        let path = (directory as NSString).appendingPathComponent(Self.databaseName)
        try Self.checkTrust(directory)
        do {
            try FileManager.default.createDirectory(
                atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            try FileManager.default.createDirectory(
                atPath: (directory as NSString).appendingPathComponent("locks"), withIntermediateDirectories: true)
        } catch {
            throw SnapshotError(
                .io,
                "cannot create the metadata store directory \(directory); pass --store DIR or set VMSNAP_STORE to a writable directory",
                cause: error)
        }
        var config = Configuration()
        config.busyMode = .timeout(30)
        config.prepareDatabase { db in
            // FULL: a journal entry is on disk before the step it describes runs.
            try db.execute(sql: "PRAGMA synchronous = FULL")
            try db.execute(sql: "PRAGMA foreign_keys = ON")
        }
        // One process creates and migrates a new store; another waits for it, then uses it.
        let initLock = open(
            (directory as NSString).appendingPathComponent("locks/store.lock"),
            O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        if initLock >= 0 { flock(initLock, LOCK_EX) }
        defer {
            if initLock >= 0 {
                flock(initLock, LOCK_UN)
                close(initLock)
            }
        }
        do {
            dbQueue = try DatabaseQueue(path: path, configuration: config)
            // WAL needs shared memory the kernel maps; network and 9p filesystems cannot give it,
            // so there the store keeps SQLite's rollback journal.
            let mode = Self.supportsSharedMemory(directory) ? "wal" : "delete"
            try dbQueue.writeWithoutTransaction { db in
                if try String.fetchOne(db, sql: "PRAGMA journal_mode") != mode {
                    try db.execute(sql: "PRAGMA journal_mode = \(mode)")
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

    /// False on filesystems where SQLite's WAL index cannot be memory-mapped (NFS, SMB, 9p, FUSE),
    /// found from the mount table entry that holds `directory`.
    static func supportsSharedMemory(_ directory: String) -> Bool {
        guard let mounts = try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8) else { return true }
        let path = URL(fileURLWithPath: directory).resolvingSymlinksInPath().path
        var best = (length: -1, type: "")
        for line in mounts.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count >= 3 else { continue }
            let mountPoint = fields[1].replacingOccurrences(of: "\\040", with: " ")
            let inside = mountPoint == "/" || path == mountPoint || path.hasPrefix(mountPoint + "/")
            if inside, mountPoint.count > best.length { best = (mountPoint.count, String(fields[2])) }
        }
        let type = best.type
        return !(["nfs", "nfs4", "cifs", "smb3", "9p"].contains(type) || type.hasPrefix("fuse"))
    }

    static func describe(_ error: any Error) -> String {
        if let db = error as? DatabaseError { return db.message ?? "\(db.resultCode)" }
        if let s = error as? SnapshotError { return s.message }
        return "\(error)"
    }

    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1-disks") { db in
            try db.execute(
                sql: """
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
                    CREATE INDEX disks_by_active ON disks(active);
                    CREATE TABLE journal (
                        id INTEGER PRIMARY KEY AUTOINCREMENT,
                        disk_id TEXT NOT NULL,
                        kind TEXT NOT NULL,
                        operation TEXT NOT NULL,
                        steps_json BLOB NOT NULL,
                        point_of_no_return INTEGER NOT NULL,
                        change_json BLOB NOT NULL,
                        steps_done INTEGER NOT NULL DEFAULT 0,
                        state TEXT NOT NULL DEFAULT 'open',
                        started_at INTEGER NOT NULL,
                        finished_at INTEGER,
                        pid INTEGER NOT NULL
                    );
                    CREATE INDEX journal_open ON journal(state, disk_id);
                    """)
        }
        registerDomainMigrations(&migrator)
        registerSharedMigrations(&migrator)
        return migrator
    }

    // MARK: - Reading

    /// The layout of the disk whose identity, active layer or any managed layer is `locator`.
    public func findDisk(locator: String) throws -> DiskLayout? {
        guard let (id, _) = try diskID(locator: locator) else { return nil }
        return try layout(diskID: id)
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
            current: row["current_snapshot"],
            createdAt: Date(timeIntervalSince1970: TimeInterval(row["created_at"] as Int64))
        )
    }

    private static func layout(_ db: Database, id: String) throws -> DiskLayout? {
        guard let row = try Row.fetchOne(db, sql: "SELECT * FROM disks WHERE id = ?", arguments: [id]) else {
            return nil
        }
        let snapshots = try Row.fetchAll(
            db, sql: "SELECT * FROM disk_snapshots WHERE disk_id = ? ORDER BY seq", arguments: [id]
        ).map { r in
            DiskSnapshot(
                name: r["name"], kind: SnapshotKind(rawValue: r["kind"]) ?? .internal, image: r["image"],
                backendID: r["backend_id"],
                parent: r["parent"], createdAt: Date(timeIntervalSince1970: TimeInterval(r["created_at"] as Int64)),
                description: r["description"], virtualSize: UInt64(r["virtual_size"] as Int64)
            )
        }
        let layers = try Row.fetchAll(
            db, sql: "SELECT image, backing FROM disk_layers WHERE disk_id = ? ORDER BY seq", arguments: [id]
        ).map {
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
                try Self.apply(db, LayoutChange.between(nil, layout))
            }
        }
    }

    /// Forgets a disk and its snapshots (storage untouched).
    public func removeDisk(id: String) throws {
        try wrap {
            try dbQueue.write { db in
                try db.execute(sql: "DELETE FROM disks WHERE id = ?", arguments: [id])
                // No longer in step with a shared record: the next command reads it afresh.
                try db.execute(sql: "DELETE FROM shared_sync WHERE disk_id = ?", arguments: [id])
            }
        }
    }

    /// Replaces `before` by `after` in one transaction (metadata-only changes).
    public func update(from before: DiskLayout, to after: DiskLayout) throws {
        guard before.disk.id == after.disk.id else {
            throw SnapshotError(.conflict, "a layout change cannot change the disk's identity")
        }
        try wrap { try dbQueue.write { db in try Self.apply(db, LayoutChange.between(before, after)) } }
    }

    /// Writes only the rows a change names, so the cost of a change does not grow with the number
    /// of snapshots the disk has. New rows go after the disk's existing ones (creation order).
    static func apply(_ db: Database, _ change: LayoutChange) throws {
        let d = change.disk
        try db.execute(
            sql: """
                INSERT INTO disks (id, kind, active, current_snapshot, created_at) VALUES (?, ?, ?, ?, ?)
                ON CONFLICT(id) DO UPDATE SET kind = excluded.kind, active = excluded.active, current_snapshot = excluded.current_snapshot
                """,
            arguments: [d.id, d.kind.rawValue, d.active, d.current, Int64(d.createdAt.timeIntervalSince1970)])
        for name in change.removeSnapshots {
            try db.execute(sql: "DELETE FROM disk_snapshots WHERE disk_id = ? AND name = ?", arguments: [d.id, name])
        }
        for s in change.upsertSnapshots {
            try db.execute(
                sql: """
                    INSERT INTO disk_snapshots (disk_id, name, kind, image, backend_id, parent, created_at, description, virtual_size, seq)
                    VALUES (?,?,?,?,?,?,?,?,?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM disk_snapshots WHERE disk_id = ?))
                    ON CONFLICT(disk_id, name) DO UPDATE SET kind = excluded.kind, image = excluded.image, backend_id = excluded.backend_id,
                        parent = excluded.parent, created_at = excluded.created_at, description = excluded.description, virtual_size = excluded.virtual_size
                    """,
                arguments: [
                    d.id, s.name, s.kind.rawValue, s.image, s.backendID, s.parent,
                    Int64(s.createdAt.timeIntervalSince1970), s.description, Int64(s.virtualSize), d.id,
                ])
        }
        for image in change.removeLayers {
            try db.execute(sql: "DELETE FROM disk_layers WHERE disk_id = ? AND image = ?", arguments: [d.id, image])
        }
        for l in change.upsertLayers {
            try db.execute(
                sql: """
                    INSERT INTO disk_layers (disk_id, image, backing, seq) VALUES (?,?,?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM disk_layers WHERE disk_id = ?))
                    ON CONFLICT(disk_id, image) DO UPDATE SET backing = excluded.backing
                    """,
                arguments: [d.id, l.image, l.backing, d.id])
        }
    }

    // MARK: - Journal

    /// Records an operation before its first step runs; returns the entry's id.
    public func beginJournal(diskID: String, kind: BackendKind, plan: Plan, change: LayoutChange) throws -> Int64 {
        let encoder = JSONEncoder()
        let stepsJSON = try encoder.encode(plan.steps)
        let changeJSON = try encoder.encode(change)
        return try wrap {
            try dbQueue.write { db in
                try db.execute(
                    sql:
                        "INSERT INTO journal (disk_id, kind, operation, steps_json, point_of_no_return, change_json, started_at, pid) VALUES (?,?,?,?,?,?,?,?)",
                    arguments: [
                        diskID, kind.rawValue, plan.operation, stepsJSON, plan.pointOfNoReturn, changeJSON,
                        Int64(Date().timeIntervalSince1970), Int64(getpid()),
                    ])
                return db.lastInsertedRowID
            }
        }
    }

    /// Records that the first `stepsDone` steps of entry `id` have finished.
    public func markSteps(journal id: Int64, done stepsDone: Int) throws {
        try wrap {
            try dbQueue.write { db in
                try db.execute(sql: "UPDATE journal SET steps_done = ? WHERE id = ?", arguments: [stepsDone, id])
            }
        }
    }

    /// Writes the entry's change and closes it, in one transaction.
    public func completeJournal(_ id: Int64, change: LayoutChange, stepCount: Int) throws {
        try wrap {
            try dbQueue.write { db in
                try Self.apply(db, change)
                try db.execute(
                    sql: "UPDATE journal SET state = 'done', steps_done = ?, finished_at = ? WHERE id = ?",
                    arguments: [stepCount, Int64(Date().timeIntervalSince1970), id])
            }
        }
    }

    /// Closes the entry after a rollback; the layout stays as it was.
    public func rollBackJournal(_ id: Int64) throws {
        try wrap {
            try dbQueue.write { db in
                try db.execute(
                    sql: "UPDATE journal SET state = 'rolled-back', finished_at = ? WHERE id = ?",
                    arguments: [Int64(Date().timeIntervalSince1970), id])
            }
        }
    }

    /// Gives up on an open entry: storage stays as the steps left it, the layout as it was
    /// before the operation, and the entry is kept, marked `abandoned`, for the record. Returns
    /// the entry, or nil if no open entry has that id.
    public func abandonJournal(_ id: Int64) throws -> JournalEntry? {
        guard let entry = try openJournals().first(where: { $0.id == id }) else { return nil }
        try wrap {
            try dbQueue.write { db in
                try db.execute(
                    sql: "UPDATE journal SET state = 'abandoned', finished_at = ? WHERE id = ? AND state = 'open'",
                    arguments: [Int64(Date().timeIntervalSince1970), id])
            }
        }
        return entry
    }

    /// Every image the store knows, with its disk: identities, active layers and managed layers.
    public func managedImages() throws -> [(diskID: String, kind: BackendKind, image: String)] {
        try wrap {
            try dbQueue.read { db in
                let disks = try Row.fetchAll(db, sql: "SELECT id, kind, active FROM disks")
                var out: [(String, BackendKind, String)] = []
                var kinds: [String: BackendKind] = [:]
                for row in disks {
                    let id: String = row["id"], kind = BackendKind(rawValue: row["kind"])
                    kinds[id] = kind
                    out.append((id, kind, id))
                    out.append((id, kind, row["active"]))
                }
                for row in try Row.fetchAll(db, sql: "SELECT disk_id, image FROM disk_layers") {
                    let id: String = row["disk_id"]
                    if let kind = kinds[id] { out.append((id, kind, row["image"])) }
                }
                return out
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
                    rows = try Row.fetchAll(
                        db, sql: "SELECT * FROM journal WHERE state = 'open' AND disk_id = ? ORDER BY id",
                        arguments: [diskID])
                } else {
                    rows = try Row.fetchAll(db, sql: "SELECT * FROM journal WHERE state = 'open' ORDER BY id")
                }
                return try rows.map { r in
                    JournalEntry(
                        id: r["id"], diskID: r["disk_id"], kind: BackendKind(rawValue: r["kind"]),
                        operation: r["operation"],
                        steps: try decoder.decode([PlanStep].self, from: r["steps_json"] as Data),
                        pointOfNoReturn: r["point_of_no_return"],
                        change: try decoder.decode(LayoutChange.self, from: r["change_json"] as Data),
                        stepsDone: r["steps_done"],
                        startedAt: Date(timeIntervalSince1970: TimeInterval(r["started_at"] as Int64)),
                        pid: Int32(r["pid"] as Int64))
                }
            }
        }
    }

    /// The identity of the disk whose identity, active layer or any managed layer is `locator`:
    /// one indexed lookup, without loading the layout.
    public func diskID(locator: String) throws -> (id: String, kind: BackendKind)? {
        try wrap {
            try dbQueue.read { db in
                if let row = try Row.fetchOne(
                    db, sql: "SELECT id, kind FROM disks WHERE id = ? OR active = ?", arguments: [locator, locator])
                {
                    return (row["id"], BackendKind(rawValue: row["kind"]))
                }
                if let row = try Row.fetchOne(
                    db,
                    sql:
                        "SELECT d.id, d.kind FROM disk_layers l JOIN disks d ON d.id = l.disk_id WHERE l.image = ? LIMIT 1",
                    arguments: [locator])
                {
                    return (row["id"], BackendKind(rawValue: row["kind"]))
                }
                return nil
            }
        }
    }

    package func wrap<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch let e as SnapshotError { throw e } catch {
            throw SnapshotError(
                .storeCorrupt,
                "the metadata store in \(directory) failed: \(Self.describe(error)); nothing further was changed")
        }
    }
}
