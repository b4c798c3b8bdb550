import Foundation
import SnapshotCore

/// A dirty bitmap in one layer of a disk: `layer` nil is the active layer, else the image of a
/// layer below it (after an external snapshot, a checkpoint's bitmap has a part in each layer).
public struct LayerBitmap: Codable, Sendable, Hashable {
    public var layer: String?
    public var name: String
    /// A bitmap file outside the disk's chain instead (``BackupImageTool/writeChangesBitmap``):
    /// the changes the disk's storage reported, opened read-only only to be merged.
    public var file: String?
    /// Removed in the same instant it is merged (true): a bitmap that bridges a storage's count
    /// to the job's instant (``BlockLayer/startRecording(_:targets:)``).
    public var mergedAway: Bool?

    public init(layer: String? = nil, name: String, file: String? = nil, mergedAway: Bool? = nil) {
        self.layer = layer
        self.name = name
        self.file = file
        self.mergedAway = mergedAway
    }
}

/// One disk's temporary block snapshot: a point-in-time view of a disk in use, kept by
/// copy-before-write (the old contents of each block the guest overwrites go to `scratch` first).
public struct BlockSnapshotPart: Codable, Sendable, Hashable {
    public var target: String
    /// Names the view's nodes, job and export in the hypervisor: short, letters, digits and
    /// dashes; unique among the domain's views (the target for a backup job's view).
    public var id: String
    /// The NBD export's name (the target for a backup job's view).
    public var exportName: String
    /// A new, empty image the hypervisor fills with the blocks the guest overwrites.
    public var scratch: String
    /// Bitmaps of the disk whose union is "changed since the checkpoint"; empty for none.
    public var changedSince: [LayerBitmap]
    /// The name the union is published under with the view (the checkpoint's name).
    public var changedSinceName: String?

    public init(
        target: String, scratch: String, changedSince: [LayerBitmap] = [], changedSinceName: String? = nil,
        id: String? = nil, exportName: String? = nil
    ) {
        self.target = target
        self.id = id ?? target
        self.exportName = exportName ?? target
        self.scratch = scratch
        self.changedSince = changedSince
        self.changedSinceName = changedSinceName
    }
}

/// One disk's push backup: the hypervisor copies the disk, as it was when the job started, into
/// `destination` (all of it, or only the blocks in `changedSince`).
public struct BackupPart: Codable, Sendable, Hashable {
    public var target: String
    /// An image made by the caller: for an incremental, one whose backing file is the previous
    /// backup, so unchanged blocks read through it.
    public var destination: String
    public var destinationFormat: String
    /// Empty: a full backup. Else the bitmaps whose union is copied.
    public var changedSince: [LayerBitmap]

    public init(
        target: String, destination: String, destinationFormat: String = "qcow2", changedSince: [LayerBitmap] = []
    ) {
        self.target = target
        self.destination = destination
        self.destinationFormat = destinationFormat
        self.changedSince = changedSince
    }
}

/// A checkpoint's bitmap added with a job, at its instant, to the disks the checkpoint tracks.
public struct NewBitmap: Codable, Sendable, Hashable {
    public var name: String
    public var targets: [String]

    public init(name: String, targets: [String]) {
        self.name = name
        self.targets = targets
    }
}

/// Where block exports listen.
public enum ExportListener: Codable, Sendable, Hashable {
    /// A Unix socket (the default), created readable and writable only by its owner.
    case unix(path: String)
    /// TCP; `host` is 127.0.0.1 unless the operator gives another address; with
    /// `tlsDirectory` (ca-cert.pem, server-cert.pem, server-key.pem) clients must speak TLS.
    case tcp(host: String, port: Int, tlsDirectory: String? = nil)

    /// The NBD URI of export `name` (libnbd's syntax, which nbdinfo and nbdcopy take).
    public func uri(export name: String) -> String {
        switch self {
        case .unix(let path): return "nbd+unix:///\(Self.escape(name))?socket=\(Self.escape(path, keeping: "/"))"
        case .tcp(let host, let port, let tls):
            let h = host.contains(":") ? "[\(host)]" : host
            return "\(tls == nil ? "nbd" : "nbds")://\(h):\(port)/\(Self.escape(name))"
        }
    }
}

extension ExportListener {
    /// Checks a TLS directory before anything starts: the three files QEMU's x509 credentials
    /// read, and a private key nobody else can read.
    public static func checkTLSDirectory(_ dir: String) throws {
        for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
            var st = stat()
            let path = (dir as NSString).appendingPathComponent(f)
            guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else {
                throw SnapshotError(
                    .notFound,
                    "TLS directory \(dir) has no \(f); it needs ca-cert.pem, server-cert.pem and server-key.pem")
            }
            if f == "server-key.pem", st.st_mode & 0o077 != 0 {
                throw SnapshotError(
                    .invalidArgument,
                    "\(path) can be read by others (mode \(String(st.st_mode & 0o777, radix: 8))); a private key must be the owner's only: chmod 600 it"
                )
            }
        }
    }

    /// Percent-encodes what is not unreserved in a URI (RFC 3986), and `keeping`.
    static func escape(_ text: String, keeping: String = "") -> String {
        var allowed = CharacterSet(charactersIn: "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
        allowed.insert(charactersIn: keeping)
        return text.addingPercentEncoding(withAllowedCharacters: allowed) ?? text
    }
}

/// A block job's progress (push backup, copy into a view).
public struct BlockJobProgress: Codable, Sendable, Hashable {
    public var target: String
    public var status: String
    public var done: UInt64
    public var total: UInt64
    public var error: String?

    public init(target: String, status: String, done: UInt64, total: UInt64, error: String? = nil) {
        self.target = target
        self.status = status
        self.done = done
        self.total = total
        self.error = error
    }
}

/// A hypervisor's block layer as checkpoints and backups need it: dirty bitmaps, temporary
/// block snapshots, exports and push backups, on the disks of a running domain (its hypervisor
/// process) or of a shut-off one (a storage daemon the driver starts over the same drives).
/// Every call is idempotent where it undoes something, so recovery can repeat it.
public protocol BlockLayer: Sendable {
    /// True when this handle started its own process for a shut-off domain.
    var isStorageDaemon: Bool { get }
    /// The bitmaps of one layer of a disk (`layer` nil: the active one).
    func bitmaps(target: String, layer: String?) async throws -> [DirtyBitmap]
    /// The disk's size as the guest sees it.
    func virtualSize(target: String) async throws -> UInt64
    /// Adds a persistent, recording bitmap `name` to each target at one instant.
    func addBitmaps(_ name: String, targets: [String]) async throws
    /// Removes bitmap `name` from each target that has it.
    func removeBitmaps(_ name: String, targets: [String]) async throws
    /// Starts bitmap `name` on each target of a running guest: it records the guest's writes from
    /// now on, in the hypervisor only (never stored in an image; one of that name is replaced).
    /// Then every write the guest finished before it is made to reach the storage (a flush; one
    /// the hypervisor reports as failed throws). A storage's count of changes taken after this
    /// call plus this bitmap cover every write, however long the count takes
    /// (StorageCheckpoints.swift: the bridge).
    func startRecording(_ name: String, targets: [String]) async throws
    /// Closes what a killed job left open over bitmap files (`LayerBitmap.file`); recovery's part.
    func closeBitmapFiles(_ paths: [String]) async
    /// Starts views of `parts` at one instant, adding bitmap `newBitmap` (a new checkpoint) to its
    /// same disks at the same instant when given.
    func startBlockSnapshots(_ parts: [BlockSnapshotPart], newBitmap: NewBitmap?) async throws
    /// Ends a view (`id`: its part's id; the scratch image is then the caller's to delete);
    /// nothing if it is gone.
    func stopBlockSnapshot(id: String) async throws
    /// Exports each view read-only over NBD under its target's name, with its changed-since
    /// bitmap as `qemu:dirty-bitmap:<name>`.
    func startExports(_ parts: [BlockSnapshotPart], listener: ExportListener) async throws
    /// Stops the exports of these views (by id), and the NBD server when no export is left;
    /// nothing if they are gone.
    func stopExports(ids: [String]) async throws
    /// Starts push backups of `parts` at one instant (and bitmap `newBitmap` with them).
    func startBackups(_ parts: [BackupPart], newBitmap: NewBitmap?) async throws
    /// Progress of the push backups of these targets (absent: finished and gone).
    func backupProgress(targets: [String]) async throws -> [BlockJobProgress]
    /// Waits for the push backups to finish; throws with the first failure.
    func waitForBackups(targets: [String], progress: ProgressHandler?) async throws
    /// Cancels push backups still running; nothing if none.
    func cancelBackups(targets: [String]) async throws
    /// Ends the handle; a storage daemon keeps running while it holds views or exports
    /// (`keepDaemon`), else it stops.
    func close(keepDaemon: Bool) async
}

/// The images backups are made of (qcow2, whatever the disk's own format): created, checked,
/// compared and converted with the hypervisor's own tools.
public protocol BackupImageTool: Sendable {
    /// The image format backups are written in (`qcow2`).
    var format: String { get }
    /// Writes an empty image at `path` (an empty file the caller made), reading through
    /// `backing` (a file name relative to the image's directory) when given.
    func create(_ path: String, size: UInt64, backing: String?) async throws
    /// Problems `path`'s metadata has; empty when it is sound.
    func check(_ path: String) async throws -> [String]
    /// True when the two images read the same bytes (each through its backing chain).
    func sameContent(_ a: String, _ b: String) async throws -> Bool
    /// Writes what `image` reads (through its chain) into a standalone `destination` of `format`.
    func flatten(_ image: String, into destination: String, format: String, progress: ProgressHandler?)
        async throws
    /// Writes the blocks `image` holds itself into its backing file (a temporary overlay no
    /// hypervisor has open any more); the image stays, for the caller to remove. An empty file
    /// (made, never formatted) holds nothing.
    func mergeIntoBacking(_ image: String) async throws
    /// The file `image` (of ``format``) reads through, as its metadata names it (nil: none);
    /// throws when `image` is not a sound image of that format.
    func backingFile(of image: String) async throws -> String?
    /// Makes `image` name `backing` as its backing file, changing nothing else (its data, and what
    /// it reads, stay the caller's business): undoes a header a crash left half-merged.
    func setBackingFile(of image: String, to backing: String) async throws
    /// Writes at `path` (an empty file the caller made) an image of `size` bytes holding no data
    /// and one bitmap, `name`, with exactly the bits of `extents` set: the changes a disk's
    /// storage reported, in the form the hypervisor's backup jobs take.
    func writeChangesBitmap(_ path: String, size: UInt64, name: String, extents: [ChangedExtent]) async throws
}

extension BackupImageTool {
    public func writeChangesBitmap(_ path: String, size: UInt64, name: String, extents: [ChangedExtent])
        async throws
    {
        throw SnapshotError(.unsupported, "this hypervisor's image tool cannot write a bitmap of changed extents")
    }

    public func mergeIntoBacking(_ image: String) async throws {
        throw SnapshotError(.unsupported, "this hypervisor's image tool cannot merge \(image) into its backing file")
    }

    public func backingFile(of image: String) async throws -> String? {
        throw SnapshotError(.unsupported, "this hypervisor's image tool cannot read the backing file of \(image)")
    }

    public func setBackingFile(of image: String, to backing: String) async throws {
        throw SnapshotError(.unsupported, "this hypervisor's image tool cannot change the backing file of \(image)")
    }
}
