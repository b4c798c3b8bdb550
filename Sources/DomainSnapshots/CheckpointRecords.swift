import Foundation
import GRDB
import HypervisorDriver
import SnapshotCore

/// One disk's part in a checkpoint: the bitmap that records its writes from the checkpoint on.
public struct CheckpointDisk: Codable, Sendable, Hashable {
    public var target: String
    public var diskID: String
    public var backend: BackendKind
    /// The bitmap's name in the disk's active layer (the checkpoint's name).
    public var bitmap: String
    /// The disk's active layer when the checkpoint was taken.
    public var image: String
    /// The disk's content epoch then: a later revert moves it on, and the bitmap no longer
    /// describes what changed since.
    public var epoch: Int64
    /// Tracked by the disk's storage instead of a bitmap: the disk snapshot taken at the
    /// checkpoint; "changed since" is what the storage reports between it and the disk now
    /// (StorageCheckpoints.swift). Nil: a bitmap.
    public var snapshot: String?

    public init(
        target: String, diskID: String, backend: BackendKind, bitmap: String, image: String, epoch: Int64,
        snapshot: String? = nil
    ) {
        self.snapshot = snapshot
        self.target = target
        self.diskID = diskID
        self.backend = backend
        self.bitmap = bitmap
        self.image = image
        self.epoch = epoch
    }
}

/// A reference point for incremental backup (changed-block tracking), not a revert point.
public struct CheckpointRecord: Codable, Sendable, Hashable {
    public var domain: String
    public var name: String
    /// The checkpoint taken just before this one (a chain, like libvirt's).
    public var parent: String?
    public var description: String?
    /// UTC, whole seconds.
    public var createdAt: Date
    public var disks: [CheckpointDisk]

    /// The disks tracked by a dirty bitmap (the others by their storage's snapshots).
    public var bitmapTargets: [String] { disks.filter { $0.snapshot == nil }.map(\.target) }

    public init(
        domain: String, name: String, parent: String?, description: String?, createdAt: Date, disks: [CheckpointDisk]
    ) {
        self.domain = domain
        self.name = name
        self.parent = parent
        self.description = description
        self.createdAt = createdAt
        self.disks = disks
    }
}

/// What `checkpoint info` shows for one disk: whether its bitmap can serve an incremental, and
/// how much changed since.
public struct CheckpointDiskState: Codable, Sendable, Hashable {
    public var target: String
    public var bitmap: String
    public var usable: Bool
    /// Why the bitmap cannot be used, and what to do.
    public var problem: String?
    /// Bytes written since the checkpoint, when the reporter knows (a running hypervisor does).
    public var changedBytes: UInt64?
}

extension MetadataStore {
    /// A domain's checkpoints, oldest first.
    public func checkpoints(of domain: String) throws -> [CheckpointRecord] {
        try wrap {
            try dbQueue.read { db in
                try Row.fetchAll(
                    db, sql: "SELECT record_json FROM domain_checkpoints WHERE domain = ? ORDER BY seq",
                    arguments: [domain]
                ).map { try Self.recordDecoder.decode(CheckpointRecord.self, from: $0["record_json"] as Data) }
            }
        }
    }

    /// Records checkpoints and removes others, in one transaction.
    public func updateCheckpoints(domain: String, upsert: [CheckpointRecord] = [], remove: [String] = []) throws {
        try wrap {
            try dbQueue.write { db in
                for name in remove {
                    try db.execute(
                        sql: "DELETE FROM domain_checkpoints WHERE domain = ? AND name = ?", arguments: [domain, name])
                }
                for record in upsert {
                    let seq =
                        try Int64.fetchOne(
                            db, sql: "SELECT seq FROM domain_checkpoints WHERE domain = ? AND name = ?",
                            arguments: [domain, record.name])
                        ?? ((try Int64.fetchOne(
                            db, sql: "SELECT MAX(seq) FROM domain_checkpoints WHERE domain = ?", arguments: [domain])
                            ?? 0) + 1)
                    try db.execute(
                        sql:
                            "INSERT OR REPLACE INTO domain_checkpoints (domain, name, record_json, seq) VALUES (?, ?, ?, ?)",
                        arguments: [domain, record.name, try Self.recordEncoder.encode(record), seq])
                }
            }
        }
    }

    /// The backup job of a domain, if one runs (one per domain, like libvirt).
    public func backupJob(of domain: String) throws -> BackupJob? {
        try wrap {
            try dbQueue.read { db in
                try Data.fetchOne(db, sql: "SELECT job_json FROM domain_backups WHERE domain = ?", arguments: [domain])
                    .map { try Self.recordDecoder.decode(BackupJob.self, from: $0) }
            }
        }
    }

    public func setBackupJob(_ job: BackupJob?, domain: String) throws {
        try wrap {
            try dbQueue.write { db in
                if let job {
                    try db.execute(
                        sql: "INSERT OR REPLACE INTO domain_backups (domain, job_json) VALUES (?, ?)",
                        arguments: [domain, try Self.recordEncoder.encode(job)])
                } else {
                    try db.execute(sql: "DELETE FROM domain_backups WHERE domain = ?", arguments: [domain])
                }
            }
        }
    }
}
