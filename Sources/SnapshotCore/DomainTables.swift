import Foundation
import GRDB

// The tables of the domain layer (DomainSnapshots owns their records and queries): created with
// the store, so every store has one schema and one migration history.
extension MetadataStore {
    static func registerDomainMigrations(_ migrator: inout DatabaseMigrator) {
        migrator.registerMigration("v2-domains") { db in
            try db.execute(
                sql: """
                    CREATE TABLE domains (
                        name TEXT PRIMARY KEY NOT NULL,
                        uuid TEXT NOT NULL UNIQUE,
                        definition_json BLOB NOT NULL,
                        current_snapshot TEXT,
                        created_at INTEGER NOT NULL
                    );
                    CREATE TABLE domain_snapshots (
                        domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
                        name TEXT NOT NULL,
                        record_json BLOB NOT NULL,
                        created_at INTEGER NOT NULL,
                        seq INTEGER NOT NULL,
                        PRIMARY KEY (domain, name)
                    );
                    CREATE TABLE domain_journal (
                        id INTEGER PRIMARY KEY AUTOINCREMENT,
                        domain TEXT NOT NULL,
                        operation TEXT NOT NULL,
                        payload_json BLOB NOT NULL,
                        state TEXT NOT NULL DEFAULT 'open',
                        started_at INTEGER NOT NULL,
                        finished_at INTEGER,
                        pid INTEGER NOT NULL
                    );
                    CREATE INDEX domain_journal_open ON domain_journal(state, domain);
                    """)
        }
        migrator.registerMigration("v3-checkpoints") { db in
            try db.execute(
                sql: """
                    CREATE TABLE domain_checkpoints (
                        domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
                        name TEXT NOT NULL,
                        record_json BLOB NOT NULL,
                        seq INTEGER NOT NULL,
                        PRIMARY KEY (domain, name)
                    );
                    CREATE TABLE domain_backups (
                        domain TEXT PRIMARY KEY NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
                        job_json BLOB NOT NULL
                    );
                    CREATE TABLE disk_epochs (
                        disk_id TEXT PRIMARY KEY NOT NULL,
                        epoch INTEGER NOT NULL
                    );
                    """)
        }
        migrator.registerMigration("v4-blocksnapshots") { db in
            try db.execute(
                sql: """
                    CREATE TABLE domain_blocksnapshots (
                        domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
                        name TEXT NOT NULL,
                        record_json BLOB NOT NULL,
                        PRIMARY KEY (domain, name)
                    );
                    """)
        }
    }
}

// MARK: - Content epochs

extension MetadataStore {
    /// A counter that grows each time vmsnap starts an operation that puts a disk's content back
    /// to an earlier point (a revert). A checkpoint records it; one taken before the last such
    /// operation no longer describes what changed since, and is never used for an incremental.
    public func contentEpoch(diskID: String) throws -> Int64 {
        try wrap {
            try dbQueue.read { db in
                try Int64.fetchOne(db, sql: "SELECT epoch FROM disk_epochs WHERE disk_id = ?", arguments: [diskID])
                    ?? 0
            }
        }
    }

    /// Moves the disk's content epoch on; durable before the operation's first step runs.
    public func advanceContentEpoch(diskID: String) throws {
        try wrap {
            try dbQueue.write { db in
                try db.execute(
                    sql:
                        "INSERT INTO disk_epochs (disk_id, epoch) VALUES (?, 1) ON CONFLICT(disk_id) DO UPDATE SET epoch = epoch + 1",
                    arguments: [diskID])
            }
        }
    }
}
