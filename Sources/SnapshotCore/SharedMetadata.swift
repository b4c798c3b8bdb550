import Foundation
import GRDB
import Synchronization

/// vmsnap's record of one disk as the storage keeps it for every host that reaches the disk
/// (cluster storage): the layout (snapshot tree, current snapshot, layers) and the operations
/// still open on it. A backend that declares `sharedMetadata` stores this document beside the
/// disk and guards it with a lock of the storage's own (a lease), so two vmsnap installations
/// with separate local stores see one truth and never change the disk at once.
///
/// The local store stays the working copy: a command takes the disk's local lock, then the
/// storage's lock, brings the local copy up to the document (``SharedDiskSession/open``), works
/// as for any disk, and writes the document back after every journal change, so a host killed
/// in the middle leaves its journal where another host finds it.
public struct SharedDiskDocument: Codable, Sendable, Hashable {
    /// The document's format; a newer one is refused rather than misread.
    public static let currentFormat = 1
    public var format: Int
    /// Raised by one at every write: a host whose local copy was synced at another
    /// generation takes the document's word over its own.
    public var generation: Int
    /// New at every write (a random id): a record restored from an old copy can carry a
    /// generation a host has synced for a different record; the pair tells them apart. Nil in
    /// records written before it existed.
    public var revision: String?
    /// Who wrote it (host, store, process), for the operator.
    public var writtenBy: String
    public var writtenAt: Date
    public var content: Content

    /// What the document says about the disk.
    public struct Content: Codable, Sendable, Hashable {
        /// Nil once the disk is no longer managed.
        public var layout: DiskLayout?
        public var journals: [SharedJournal]
    }
}

/// An open journal entry as it travels between hosts (local ids differ per store).
public struct SharedJournal: Codable, Sendable, Hashable {
    public var kind: BackendKind
    public var operation: String
    public var steps: [PlanStep]
    public var pointOfNoReturn: Int
    public var change: LayoutChange
    public var stepsDone: Int
    public var startedAt: Date
    public var pid: Int32
    public var host: String

    init(_ entry: JournalEntry, host: String) {
        kind = entry.kind
        operation = entry.operation
        steps = entry.steps
        pointOfNoReturn = entry.pointOfNoReturn
        change = entry.change
        stepsDone = entry.stepsDone
        startedAt = entry.startedAt
        pid = entry.pid
        self.host = host
    }
}

/// What taking a storage lock cost and whom it fenced.
public struct SharedLockGrant: Codable, Sendable, Hashable {
    /// Seconds spent waiting for another holder.
    public var waited: Double
    /// A holder whose lease had run out without releasing the lock: the backend took the lock
    /// over and fenced that holder from the storage (it can no longer write there).
    public var tookOverFrom: String?
    /// The holder that made us wait, if any.
    public var waitedFor: String?

    public init(waited: Double = 0, tookOverFrom: String? = nil, waitedFor: String? = nil) {
        self.waited = waited
        self.tookOverFrom = tookOverFrom
        self.waitedFor = waitedFor
    }
}

/// Who this vmsnap is, as other hosts see it in lock holders and documents.
public enum HostIdentity {
    public static func describe(store: MetadataStore) -> String {
        var name = [UInt8](repeating: 0, count: 256)
        let host =
            gethostname(&name, name.count - 1) == 0
            ? String(decoding: name.prefix { $0 != 0 }, as: UTF8.self) : "unknown-host"
        return "host \(host), store \(store.directory), pid \(getpid())"
    }
}

/// One command's hold on a shared disk: the storage's lock is held and the local copy is in step
/// with the document from ``open`` until ``close``.
public struct SharedDiskSession: Sendable {
    public let backend: any DiskSnapshotBackend
    public let diskID: String
    let store: MetadataStore
    let holder: String
    /// The record as this session last read or wrote it.
    let known = KnownDocument()

    final class KnownDocument: Sendable {
        let value = Mutex<SharedDiskDocument?>(nil)
    }

    /// The session of the operation running in this task, so the plan executor publishes each
    /// journal change without every caller passing it along.
    @TaskLocal public static var current: SharedDiskSession?

    /// Takes the storage's lock on the disk (waiting up to `wait` seconds) and brings the local
    /// copy up to the shared document. Nil for a backend whose metadata is host-local.
    static func open(
        _ backend: any DiskSnapshotBackend, diskID: String, store: MetadataStore, wait: TimeInterval,
        notify: @Sendable (String) -> Void
    ) async throws -> SharedDiskSession? {
        guard backend.descriptor.sharedMetadata else { return nil }
        let holder = HostIdentity.describe(store: store)
        let grant = try await backend.lockShared(disk: diskID, holder: holder, wait: wait)
        let session = SharedDiskSession(backend: backend, diskID: diskID, store: store, holder: holder)
        if grant.waitedFor != nil || grant.waited >= 0.5 {
            notify(
                String(
                    format: "waited %.3f s for the cluster lock on disk %@%@", grant.waited, diskID,
                    grant.waitedFor.map { " (held by \($0))" } ?? ""))
        }
        if let gone = grant.tookOverFrom {
            notify(
                "took over the cluster lock on disk \(diskID) from \(gone), whose lease had run out; that holder is fenced from the cluster, and its open operations are finished or rolled back here"
            )
        }
        do { try await session.pull(notify: notify) } catch {
            try? await backend.unlockShared(disk: diskID)
            throw error
        }
        return session
    }

    /// The document as the storage holds it, or nil before any host wrote one.
    static func read(_ backend: any DiskSnapshotBackend, diskID: String) async throws -> SharedDiskDocument? {
        guard let text = try await backend.readShared(disk: diskID) else { return nil }
        let document: SharedDiskDocument
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .secondsSince1970
        do { document = try decoder.decode(SharedDiskDocument.self, from: Data(text.utf8)) } catch {
            throw SnapshotError(
                .storeCorrupt,
                "the shared record of disk \(diskID) in its storage is not a vmsnap document (\(error)); nothing was changed. Inspect it with the backend's tools (`vmsnap backend info \(backend.kind)` says where it lives), restore it, or remove it to let this host's record take its place"
            )
        }
        guard document.format <= SharedDiskDocument.currentFormat else {
            throw SnapshotError(
                .incompatibleBackend,
                "the shared record of disk \(diskID) has format \(document.format), written by a newer vmsnap (\(document.writtenBy)); this one reads format \(SharedDiskDocument.currentFormat). Upgrade vmsnap on this host"
            )
        }
        return document
    }

    /// Brings the local copy up to the document: a document written since this store last
    /// synced wins (its open journals replace this store's for the disk); otherwise this store's
    /// copy is at least as new and is written out.
    func pull(notify: @Sendable (String) -> Void) async throws {
        let document = try await Self.read(backend, diskID: diskID)
        known.value.withLock { $0 = document }
        let synced = try store.sharedSync(diskID: diskID)
        let local = try localContent()
        // A record written since this store last synced wins (another generation, or the same
        // generation of another write: an old copy restored, then written again); so does one
        // that has the disk when this store's copy lost it (a local copy never erases the record).
        if let document,
            document.generation != synced?.generation || document.revision != synced?.revision
                || (local.layout == nil && document.content.layout != nil)
        {
            try await check(document)
            try store.adoptShared(document, diskID: diskID)
            for j in document.content.journals where j.host != holder {
                notify("disk \(diskID): '\(j.operation)' was left open by \(j.host); finishing or rolling it back here")
            }
            return
        }
        if let document, document.content == local { return }
        if document != nil || local.layout != nil { try await publish() }
    }

    /// The record comes from the storage, where anyone with write access to it can change it, so
    /// it is checked before this host takes its word: it must describe this disk and this backend,
    /// its active image must be one this host trusts to be the disk's (this store's copy, or what
    /// the backend's `adopt` finds in the storage), and its journals may hold only the backend's
    /// own steps (no commands, no file removals or renames: nothing a host would run on its own
    /// filesystem). Which images a native step may touch is the backend's to check when it runs
    /// the step (for example only the disk whose lock it holds, and images it made for that disk):
    /// a journal can name images that do not exist yet.
    func check(_ document: SharedDiskDocument) async throws {
        func refuse(_ why: String) -> SnapshotError {
            SnapshotError(
                .storeCorrupt,
                "the shared record of disk \(diskID) (written by \(document.writtenBy)) \(why); vmsnap would not have written it, so it was changed by someone else. Nothing was run or changed: inspect the record with the backend's tools and restore or remove it"
            )
        }
        var active: Set<String> = [diskID]
        for trusted in [try store.layout(diskID: diskID), try? await backend.adopt(locator: diskID)].compactMap({ $0 })
        {
            active.insert(trusted.disk.active)
        }
        if let layout = document.content.layout {
            guard layout.disk.id == diskID, layout.disk.kind == backend.kind else {
                throw refuse("describes disk \(layout.disk.id) of backend '\(layout.disk.kind)'")
            }
            guard active.contains(layout.disk.active) else {
                throw refuse("names \(layout.disk.active) as the disk's active image")
            }
        }
        for journal in document.content.journals {
            guard journal.kind == backend.kind, journal.change.disk.id == diskID else {
                throw refuse("holds an operation for disk \(journal.change.disk.id) of backend '\(journal.kind)'")
            }
            guard active.contains(journal.change.disk.active) else {
                throw refuse("holds an operation making \(journal.change.disk.active) the disk's active image")
            }
            for step in journal.steps {
                for action in [step.action] + (step.undo.map { [$0] } ?? []) {
                    guard case .backend = action else {
                        throw refuse("holds a step that is not the backend's own ('\(step.summary)')")
                    }
                }
            }
        }
    }

    func localContent() throws -> SharedDiskDocument.Content {
        SharedDiskDocument.Content(
            layout: try store.layout(diskID: diskID),
            journals: try store.openJournals(diskID: diskID).map { SharedJournal($0, host: holder) })
    }

    /// Writes the local copy out as the next generation of the document.
    public func publish() async throws {
        let generation = (try store.sharedSync(diskID: diskID)?.generation ?? 0) + 1
        let document = SharedDiskDocument(
            format: SharedDiskDocument.currentFormat, generation: generation, revision: UUID().uuidString,
            writtenBy: holder, writtenAt: Date(), content: try localContent())
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .secondsSince1970
        let text = String(decoding: try encoder.encode(document), as: UTF8.self)
        do { try await backend.writeShared(disk: diskID, document: text) } catch {
            throw SnapshotError(
                (error as? SnapshotError)?.code ?? .io,
                "could not write the shared record of disk \(diskID) to its storage: \((error as? SnapshotError)?.message ?? "\(error)"). This host keeps its own record and writes it out with its next command on the disk; until then other hosts see the disk as the record last said",
                cause: error)
        }
        known.value.withLock { $0 = document }
        try store.setSharedSync(diskID: diskID, generation: generation, revision: document.revision)
    }

    /// Writes the final record (when `publishing` and the local copy differs from it) and
    /// releases the storage's lock. A local copy without the disk (a command that failed on a disk
    /// it had just started to manage) never replaces a record that has it. When the write fails,
    /// this host's copy goes back to the record as it is, so no host holds a change the others
    /// cannot see (every step that ran is in the record already: see PlanExecutor), and the
    /// command fails.
    func close(publishing: Bool, notify: @Sendable (String) -> Void) async throws {
        do {
            let local = try localContent()
            let last = known.value.withLock { $0 }
            let unchanged =
                local == last?.content || (last == nil && local.layout == nil && local.journals.isEmpty)
            let wouldErase = local.layout == nil && last?.content.layout != nil
            if publishing && !unchanged && !wouldErase { try await publish() }
        } catch {
            if let last = known.value.withLock({ $0 }) {
                try? store.adoptShared(last, diskID: diskID)
            } else {
                try? store.removeDisk(id: diskID)
            }
            await release(notify: notify)
            throw error
        }
        await release(notify: notify)
    }

    /// Releases the storage's lock; a release that fails is reported, not thrown: the work is
    /// done and recorded, and the lease runs out by itself.
    func release(notify: @Sendable (String) -> Void) async {
        do { try await backend.unlockShared(disk: diskID) } catch {
            notify(
                "could not release the cluster lock on disk \(diskID): \((error as? SnapshotError)?.message ?? "\(error)"); it runs out with its lease"
            )
        }
    }
}

extension MetadataStore {
    static func registerSharedMigrations(_ migrator: inout DatabaseMigrator) {
        migrator.registerMigration("v5-shared-disks") { db in
            try db.execute(
                sql: """
                    CREATE TABLE shared_sync (
                        disk_id TEXT PRIMARY KEY NOT NULL,
                        generation INTEGER NOT NULL
                    );
                    """)
        }
        migrator.registerMigration("v6-shared-revision") { db in
            try db.execute(sql: "ALTER TABLE shared_sync ADD COLUMN revision TEXT")
        }
    }

    /// The generation and revision of the shared document this store last read or wrote for the
    /// disk.
    public func sharedSync(diskID: String) throws -> (generation: Int, revision: String?)? {
        try wrap {
            try dbQueue.read { db in
                try Row.fetchOne(
                    db, sql: "SELECT generation, revision FROM shared_sync WHERE disk_id = ?", arguments: [diskID]
                ).map { ($0["generation"], $0["revision"]) }
            }
        }
    }

    func setSharedSync(diskID: String, generation: Int, revision: String?) throws {
        try wrap { try dbQueue.write { db in try Self.recordSync(db, diskID: diskID, generation, revision) } }
    }

    private static func recordSync(_ db: Database, diskID: String, _ generation: Int, _ revision: String?) throws {
        try db.execute(
            sql:
                "INSERT INTO shared_sync (disk_id, generation, revision) VALUES (?, ?, ?) ON CONFLICT(disk_id) DO UPDATE SET generation = excluded.generation, revision = excluded.revision",
            arguments: [diskID, generation, revision])
    }

    /// Replaces this store's copy of the disk by the shared document, in one transaction: its
    /// layout, and its open journals (this store's own open entries for the disk are closed as
    /// `moved`: another host has taken them over, finished or rolled them back).
    func adoptShared(_ document: SharedDiskDocument, diskID: String) throws {
        let encoder = JSONEncoder()
        try wrap {
            try dbQueue.write { db in
                try db.execute(sql: "DELETE FROM disks WHERE id = ?", arguments: [diskID])
                if let layout = document.content.layout {
                    try Self.apply(db, LayoutChange.between(nil, layout))
                }
                try db.execute(
                    sql: "UPDATE journal SET state = 'moved', finished_at = ? WHERE disk_id = ? AND state = 'open'",
                    arguments: [Int64(Date().timeIntervalSince1970), diskID])
                for j in document.content.journals {
                    try db.execute(
                        sql:
                            "INSERT INTO journal (disk_id, kind, operation, steps_json, point_of_no_return, change_json, steps_done, started_at, pid) VALUES (?,?,?,?,?,?,?,?,?)",
                        arguments: [
                            diskID, j.kind.rawValue, j.operation, try encoder.encode(j.steps), j.pointOfNoReturn,
                            try encoder.encode(j.change), j.stepsDone, Int64(j.startedAt.timeIntervalSince1970),
                            Int64(j.pid),
                        ])
                }
                try Self.recordSync(db, diskID: diskID, document.generation, document.revision)
            }
        }
    }
}
