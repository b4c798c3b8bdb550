import Foundation
import GRDB
import HypervisorDriver
import SnapshotCore

// MARK: - Domain snapshots

/// Where a full-system snapshot keeps the guest's memory.
public struct MemoryImage: Codable, Sendable, Hashable {
    public enum Location: String, Codable, Sendable { case external, `internal` }
    public var location: Location
    /// The memory file (external), or the disk target whose qcow2 holds the vmstate (internal).
    public var path: String
    public var size: UInt64?

    public init(location: Location, path: String, size: UInt64? = nil) {
        self.location = location
        self.path = path
        self.size = size
    }
}

/// One disk's part in a domain snapshot.
public struct DomainSnapshotDisk: Codable, Sendable, Hashable {
    public var target: String
    /// The disk's identity in the store.
    public var diskID: String
    public var backend: BackendKind
    /// Nil when the disk was left out of the snapshot (`--disks`).
    public var kind: SnapshotKind?
    /// The image the domain had open for this disk when the snapshot was taken (libvirt's
    /// `<domain>` inside the snapshot names it); nil in records made before it was kept.
    public var source: String?
    /// How libvirt named that image when it differs from the disk's backend (a chain imported
    /// from libvirt that starts on a raw block device); nil where the backend's types hold.
    public var sourceType: DiskSourceType?
    public var sourceFormat: String?

    public init(
        target: String, diskID: String, backend: BackendKind, kind: SnapshotKind?, source: String? = nil,
        sourceType: DiskSourceType? = nil, sourceFormat: String? = nil
    ) {
        self.target = target
        self.diskID = diskID
        self.backend = backend
        self.kind = kind
        self.source = source
        self.sourceType = sourceType
        self.sourceFormat = sourceFormat
    }
}

/// One named point in time of a domain.
public struct DomainSnapshotRecord: Codable, Sendable, Hashable {
    public var domain: String
    public var name: String
    public var parent: String?
    public var description: String?
    /// UTC, whole seconds.
    public var createdAt: Date
    /// The domain's run state when the snapshot was taken.
    public var state: DomainRunState
    /// Nil for a disk-only snapshot.
    public var memory: MemoryImage?
    public var disks: [DomainSnapshotDisk]
    /// The domain definition then, so a revert restores memory size and devices too.
    public var definition: DomainDefinition

    public init(
        domain: String, name: String, parent: String?, description: String?, createdAt: Date, state: DomainRunState,
        memory: MemoryImage?, disks: [DomainSnapshotDisk], definition: DomainDefinition
    ) {
        self.domain = domain
        self.name = name
        self.parent = parent
        self.description = description
        self.createdAt = createdAt
        self.state = state
        self.memory = memory
        self.disks = disks
        self.definition = definition
    }

    public var isDiskOnly: Bool { memory == nil }
    /// Internal when every included disk snapshot (and the memory) lives inside its image.
    public var isInternal: Bool {
        disks.allSatisfy { $0.kind != .external } && memory?.location != .external
    }
}

/// An interrupted domain operation: what it meant to do and how far it got.
public struct DomainJournalEntry: Sendable {
    public var id: Int64
    public var domain: String
    public var operation: String
    public var payload: Data
    public var startedAt: Date
    public var pid: Int32
}

// MARK: - Store

extension MetadataStore {
    /// The domain layer's records as JSON in the store: sorted keys, dates as seconds.
    static let recordEncoder: JSONEncoder = {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        e.dateEncodingStrategy = .secondsSince1970
        return e
    }()
    static let recordDecoder: JSONDecoder = {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .secondsSince1970
        return d
    }()

    /// Adds a domain, or replaces the definition of one with the same name and UUID.
    public func define(_ domain: DomainDefinition) throws {
        let json = try Self.recordEncoder.encode(domain)
        try wrap {
            try dbQueue.write { db in
                if let row = try Row.fetchOne(
                    db, sql: "SELECT name, uuid FROM domains WHERE name = ? OR uuid = ?",
                    arguments: [domain.name, domain.uuid.uuidString])
                {
                    let (name, uuid): (String, String) = (row["name"], row["uuid"])
                    guard name == domain.name, uuid == domain.uuid.uuidString else {
                        throw SnapshotError(
                            .alreadyExists,
                            "a domain named '\(name)' with UUID \(uuid) exists already; a definition may keep a name and UUID or change neither"
                        )
                    }
                    try db.execute(
                        sql: "UPDATE domains SET definition_json = ? WHERE name = ?", arguments: [json, domain.name])
                } else {
                    try db.execute(
                        sql: "INSERT INTO domains (name, uuid, definition_json, created_at) VALUES (?, ?, ?, ?)",
                        arguments: [domain.name, domain.uuid.uuidString, json, Int64(Date().timeIntervalSince1970)])
                }
            }
        }
    }

    public func domain(named name: String) throws -> (definition: DomainDefinition, current: String?)? {
        try wrap {
            try dbQueue.read { db in
                guard
                    let row = try Row.fetchOne(
                        db, sql: "SELECT definition_json, current_snapshot FROM domains WHERE name = ?",
                        arguments: [name])
                else { return nil }
                return (
                    try Self.recordDecoder.decode(DomainDefinition.self, from: row["definition_json"] as Data),
                    row["current_snapshot"]
                )
            }
        }
    }

    public func domains() throws -> [DomainDefinition] {
        try wrap {
            try dbQueue.read { db in
                try Row.fetchAll(db, sql: "SELECT definition_json FROM domains ORDER BY name").map {
                    try Self.recordDecoder.decode(DomainDefinition.self, from: $0["definition_json"] as Data)
                }
            }
        }
    }

    /// Forgets a domain and its snapshot records (storage is not touched).
    public func undefine(domain name: String) throws {
        try wrap {
            try dbQueue.write { db in try db.execute(sql: "DELETE FROM domains WHERE name = ?", arguments: [name]) }
        }
    }

    public func domainSnapshots(of domain: String) throws -> [DomainSnapshotRecord] {
        try wrap {
            try dbQueue.read { db in
                try Row.fetchAll(
                    db, sql: "SELECT record_json FROM domain_snapshots WHERE domain = ? ORDER BY seq",
                    arguments: [domain]
                ).map {
                    try Self.recordDecoder.decode(DomainSnapshotRecord.self, from: $0["record_json"] as Data)
                }
            }
        }
    }

    /// Records snapshots, removes others and sets the current snapshot, in one transaction.
    public func updateDomainSnapshots(
        domain: String, upsert: [DomainSnapshotRecord] = [], remove: [String] = [], current: String??
    ) throws {
        try wrap {
            try dbQueue.write { db in
                for name in remove {
                    try db.execute(
                        sql: "DELETE FROM domain_snapshots WHERE domain = ? AND name = ?", arguments: [domain, name])
                }
                for record in upsert {
                    let json = try Self.recordEncoder.encode(record)
                    let seq =
                        try Int64.fetchOne(
                            db, sql: "SELECT seq FROM domain_snapshots WHERE domain = ? AND name = ?",
                            arguments: [domain, record.name])
                        ?? ((try Int64.fetchOne(
                            db, sql: "SELECT MAX(seq) FROM domain_snapshots WHERE domain = ?", arguments: [domain]) ?? 0)
                            + 1)
                    try db.execute(
                        sql:
                            "INSERT OR REPLACE INTO domain_snapshots (domain, name, record_json, created_at, seq) VALUES (?, ?, ?, ?, ?)",
                        arguments: [domain, record.name, json, Int64(record.createdAt.timeIntervalSince1970), seq])
                }
                if let current {
                    try db.execute(
                        sql: "UPDATE domains SET current_snapshot = ? WHERE name = ?", arguments: [current, domain])
                }
            }
        }
    }

    // MARK: Domain journal

    public func beginDomainJournal(domain: String, operation: String, payload: Data) throws -> Int64 {
        try wrap {
            try dbQueue.write { db in
                try db.execute(
                    sql:
                        "INSERT INTO domain_journal (domain, operation, payload_json, started_at, pid) VALUES (?, ?, ?, ?, ?)",
                    arguments: [domain, operation, payload, Int64(Date().timeIntervalSince1970), Int64(getpid())])
                return db.lastInsertedRowID
            }
        }
    }

    public func updateDomainJournal(_ id: Int64, payload: Data) throws {
        try wrap {
            try dbQueue.write { db in
                try db.execute(
                    sql: "UPDATE domain_journal SET payload_json = ? WHERE id = ?", arguments: [payload, id])
            }
        }
    }

    /// Closes a journal entry as `done` or `rolled-back`.
    public func finishDomainJournal(_ id: Int64, state: String) throws {
        try wrap {
            try dbQueue.write { db in
                try db.execute(
                    sql: "UPDATE domain_journal SET state = ?, finished_at = ? WHERE id = ?",
                    arguments: [state, Int64(Date().timeIntervalSince1970), id])
            }
        }
    }

    public func openDomainJournals(domain: String? = nil) throws -> [DomainJournalEntry] {
        try wrap {
            try dbQueue.read { db in
                let rows =
                    try domain.map {
                        try Row.fetchAll(
                            db, sql: "SELECT * FROM domain_journal WHERE state = 'open' AND domain = ? ORDER BY id",
                            arguments: [$0])
                    } ?? Row.fetchAll(db, sql: "SELECT * FROM domain_journal WHERE state = 'open' ORDER BY id")
                return rows.map {
                    DomainJournalEntry(
                        id: $0["id"], domain: $0["domain"], operation: $0["operation"], payload: $0["payload_json"],
                        startedAt: Date(timeIntervalSince1970: TimeInterval($0["started_at"] as Int64)),
                        pid: Int32($0["pid"] as Int64))
                }
            }
        }
    }
}
