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
    }
}
