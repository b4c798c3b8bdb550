import Foundation
import HypervisorDriver
import SnapshotCore

/// One disk's part in a backup job.
public struct BackupJobDisk: Codable, Sendable, Hashable {
    public var target: String
    /// Pull: the scratch image that keeps the view's old blocks.
    public var scratch: String?
    /// Push: the backup image being written.
    public var destination: String?
    /// Push incremental: the previous backup's image (a file name in the same directory) the new
    /// one reads through.
    public var backing: String?
    /// The checkpoint bitmaps whose union is copied or published; empty for a full backup.
    public var changedSince: [LayerBitmap]
    /// Pull: the NBD URI a client reads the disk from.
    public var uri: String?
}

/// A backup in progress: push (vmsnap writes backup images) or pull (a client reads NBD
/// exports of a point-in-time view). One per domain, like libvirt.
public struct BackupJob: Codable, Sendable, Hashable {
    public enum Mode: String, Codable, Sendable { case push, pull }
    public var domain: String
    public var name: String
    public var mode: Mode
    public var startedAt: Date
    /// The checkpoint the backup is incremental from; nil for a full backup.
    public var incrementalFrom: String?
    /// The checkpoint taken at the backup's instant, if asked for.
    public var newCheckpoint: String?
    public var disks: [BackupJobDisk]
    /// Pull: where the exports listen.
    public var listener: ExportListener?
    /// The domain was shut off: a storage daemon holds its disks for the job.
    public var storageDaemon: Bool
    /// Push: the backup directory.
    public var directory: String?
    /// Why an incremental was asked for and a full one taken (`--fallback-full`).
    public var fullBecause: String?
}

/// The backups in a push directory, oldest first: `vmsnap-backups.json` beside the images, so
/// the directory restores anywhere, without vmsnap's store.
public struct BackupManifest: Codable, Sendable, Hashable {
    public static let fileName = "vmsnap-backups.json"

    public struct Entry: Codable, Sendable, Hashable {
        public var name: String
        public var createdAt: Date
        /// The checkpoint taken at this backup's instant: the next incremental builds on it.
        public var checkpoint: String?
        /// The checkpoint this one is incremental from (nil: full).
        public var incrementalFrom: String?
        /// Image file names (in the directory) by disk target.
        public var files: [String: String]
        /// Bytes written into each image file, by target.
        public var bytes: [String: UInt64]
    }

    public var version = 1
    public var domain: String
    /// The domain definition at the newest backup, for `backup restore --define`.
    public var definition: DomainDefinition
    public var backups: [Entry] = []

    /// Reads the manifest in `directory`, or nil where there is none yet.
    public static func load(_ directory: String) throws -> BackupManifest? {
        let path = (directory as NSString).appendingPathComponent(fileName)
        guard NewFile.exists(path) else { return nil }
        let data = try RegularFile.read(path, what: "backup manifest", limit: 16 << 20)
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        do { return try decoder.decode(BackupManifest.self, from: data) } catch {
            throw SnapshotError(
                .storeCorrupt,
                "\(path) is not a backup manifest vmsnap can read (\(error)); restore it from a copy, or back up into a new directory"
            )
        }
    }

    /// Writes the manifest: a new file beside it (with the mode and owner of `like`, a backup
    /// image), synced, renamed over the old one.
    public func save(_ directory: String, like: String) throws {
        let path = (directory as NSString).appendingPathComponent(Self.fileName)
        let temp = path + ".new-\(getpid())"
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        let data = try encoder.encode(self)
        unlink(temp)
        try NewFile.create(temp, like: like, resume: false)
        let fd = open(temp, O_WRONLY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { throw SnapshotError(.io, "cannot write \(temp): \(String(cString: strerror(errno)))") }
        let ok = data.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) == $0.count } && fsync(fd) == 0
        close(fd)
        guard ok, rename(temp, path) == 0 else {
            unlink(temp)
            throw SnapshotError(.io, "cannot write \(path): \(String(cString: strerror(errno)))")
        }
    }

    /// The chain of entries that make up backup `name` for `target`, oldest first: its full
    /// backup, then each incremental up to it.
    public func chain(to name: String, target: String) throws -> [Entry] {
        guard var at = backups.firstIndex(where: { $0.name == name }) else {
            throw SnapshotError(
                .notFound,
                "no backup named \(name) (backups: \(backups.map(\.name).joined(separator: ", ")))")
        }
        var out: [Entry] = []
        while true {
            let e = backups[at]
            guard e.files[target] != nil else {
                throw SnapshotError(.notFound, "backup \(e.name) holds no disk \(target)")
            }
            out.insert(e, at: 0)
            guard let from = e.incrementalFrom else { return out }
            guard let parent = backups[..<at].lastIndex(where: { $0.checkpoint == from && $0.files[target] != nil })
            else {
                throw SnapshotError(
                    .storeCorrupt,
                    "backup \(e.name) is incremental from checkpoint \(from), but no earlier backup here was taken at it"
                )
            }
            at = parent
        }
    }
}
