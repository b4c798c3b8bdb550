import Foundation
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// A read-only view of a qcow2 header and snapshot table, parsed natively: listing 1,000
/// snapshots or checking a name costs a few reads, not a process.
public struct Qcow2Image: Sendable, Hashable {
    /// One entry of the internal snapshot table.
    public struct Snapshot: Sendable, Hashable {
        public var id: String
        public var name: String
        public var date: Date
        public var vmStateSize: UInt64
        public var diskSize: UInt64?
    }

    public var path: String
    public var version: UInt32
    public var virtualSize: UInt64
    public var clusterBits: UInt32
    /// The backing file as written in the header (may be relative to the image's folder).
    public var backingFile: String?
    /// The backing format from the header extension, if recorded.
    public var backingFormat: String?
    /// An external data file (header extension 0x44415441): the guest's data lives there.
    public var dataFile: String?
    /// Persistent dirty bitmaps the header's bitmaps extension (0x23852875) counts; 0 without one.
    public var bitmapCount: UInt32 = 0
    public var snapshots: [Snapshot]
    /// Incompatible feature bits: bit 0 dirty, bit 1 corrupt.
    public var incompatibleFeatures: UInt64
    /// `crypt_method`: 0 none, 1 AES, 2 LUKS.
    public var cryptMethod: UInt32
    public var isEncrypted: Bool { cryptMethod != 0 }

    public var isCorrupt: Bool { incompatibleFeatures & 2 != 0 }

    /// The backing file as an absolute path.
    /// Why the backing spec is not a plain file name (a `json:` spec, a protocol such as
    /// `nbd:` or `http:`), or nil.
    public var backingSpecProblem: String? {
        guard let backingFile, !backingFile.isEmpty else { return nil }
        if backingFile.hasPrefix("json:") {
            return "its backing spec is a json: block-layer description, not a file name"
        }
        if let colon = backingFile.firstIndex(of: ":"), !backingFile.hasPrefix("/"),
            !backingFile[..<colon].contains("/")
        {
            return
                "its backing spec '\(backingFile.prefix(80))' names a protocol (\(backingFile[..<colon])), not a file"
        }
        return nil
    }

    public var resolvedBackingFile: String? {
        guard let backingFile, !backingFile.isEmpty else { return nil }
        if backingFile.hasPrefix("/") || backingFile.hasPrefix("json:") { return backingFile }
        let dir = (path as NSString).deletingLastPathComponent
        return URL(fileURLWithPath: (dir as NSString).appendingPathComponent(backingFile)).standardizedFileURL.path
    }

    static let magic: UInt32 = 0x5146_49fb

    /// True if the file starts with the qcow2 magic.
    public static func hasMagic(_ path: String) -> Bool {
        guard let file = try? ReadOnlyFile(path) else { return false }
        guard let bytes = try? file.read(at: 0, count: 4), bytes.count == 4 else { return false }
        return bytes.bigEndianUInt32(at: 0) == magic
    }

    /// The format this image reads `backing` as: the one its header records (written by whoever
    /// made the image), probed from the backing's bytes only where nothing is recorded (a raw
    /// base's bytes are the guest's).
    public func readsBacking(_ backing: String) -> String {
        backingFormat ?? (Self.hasMagic(backing) ? "qcow2" : "raw")
    }

    /// Parses the header and snapshot table of `path`.
    public init(path: String) throws {
        self.path = path
        let file: ReadOnlyFile
        do { file = try ReadOnlyFile(path) } catch {
            throw SnapshotError(.notFound, "cannot open \(path): \(error)")
        }
        let header = try file.read(at: 0, count: 112)
        func bad(_ why: String) -> SnapshotError {
            SnapshotError(.invalidImage, "\(path) is not a usable qcow2 image: \(why)")
        }
        guard header.count >= 72 else {
            throw bad("the file is only \(header.count) bytes long, shorter than a qcow2 header")
        }
        guard header.bigEndianUInt32(at: 0) == Self.magic else {
            let start = header.prefix(4).map { String(format: "%02x", $0) }.joined(separator: " ")
            throw bad(
                "it does not start with the qcow2 magic 'QFI\\xfb' (it starts with \(start)); convert it with `qemu-img convert -O qcow2`"
            )
        }
        version = header.bigEndianUInt32(at: 4)
        guard version == 2 || version == 3 else { throw bad("unsupported qcow2 version \(version)") }
        let backingOffset = header.bigEndianUInt64(at: 8)
        let backingSize = header.bigEndianUInt32(at: 16)
        clusterBits = header.bigEndianUInt32(at: 20)
        guard (9...21).contains(clusterBits) else {
            throw bad("cluster_bits \(clusterBits) is out of range (9-21) at offset 20")
        }
        virtualSize = header.bigEndianUInt64(at: 24)
        cryptMethod = header.bigEndianUInt32(at: 32)
        let snapshotCount = header.bigEndianUInt32(at: 60)
        let snapshotsOffset = header.bigEndianUInt64(at: 64)
        var headerLength: UInt64 = 72
        incompatibleFeatures = 0
        if version == 3 {
            guard header.count >= 104 else { throw bad("the version 3 header is truncated") }
            incompatibleFeatures = header.bigEndianUInt64(at: 72)
            headerLength = UInt64(header.bigEndianUInt32(at: 100))
        }
        let fileSize = file.size
        if backingOffset != 0 {
            guard backingSize <= 1023, backingOffset <= fileSize, UInt64(backingSize) <= fileSize - backingOffset else {
                throw bad("the backing file name (offset \(backingOffset), \(backingSize) bytes) lies outside the file")
            }
            backingFile = String(decoding: try file.read(at: backingOffset, count: Int(backingSize)), as: UTF8.self)
        }
        // Header extensions: the backing format (0xe2792aca).
        var extOffset = headerLength
        let clusterSize = UInt64(1) << clusterBits
        while extOffset + 8 <= min(clusterSize, fileSize) {
            let ext = try file.read(at: extOffset, count: 8)
            let type = ext.bigEndianUInt32(at: 0), length = UInt64(ext.bigEndianUInt32(at: 4))
            if type == 0 { break }
            if type == 0xe279_2aca, length < 256 {
                backingFormat = String(decoding: try file.read(at: extOffset + 8, count: Int(length)), as: UTF8.self)
            }
            if type == 0x2385_2875, length >= 4 {
                bitmapCount = try file.read(at: extOffset + 8, count: 4).bigEndianUInt32(at: 0)
            }
            if type == 0x4441_5441, length < 4096 {
                dataFile = String(decoding: try file.read(at: extOffset + 8, count: Int(length)), as: UTF8.self)
            }
            extOffset += 8 + (length + 7) / 8 * 8
        }
        // Snapshot table.
        guard snapshotCount <= 65536 else { throw bad("nb_snapshots \(snapshotCount) exceeds qcow2's limit of 65536") }
        var snaps: [Snapshot] = []
        if snapshotCount > 0 {
            guard snapshotsOffset < fileSize else {
                throw bad("the snapshot table offset \(snapshotsOffset) lies past the end of the file")
            }
            let table = try file.read(
                at: snapshotsOffset, count: Int(min(fileSize - snapshotsOffset, UInt64(snapshotCount) * 1200 + 4096)))
            var pos = 0
            snaps.reserveCapacity(Int(snapshotCount))
            for index in 0..<Int(snapshotCount) {
                guard pos + 40 <= table.count else {
                    throw bad("snapshot table entry \(index) at offset \(snapshotsOffset + UInt64(pos)) is truncated")
                }
                let idSize = Int(table.bigEndianUInt16(at: pos + 12)),
                    nameSize = Int(table.bigEndianUInt16(at: pos + 14))
                let seconds = table.bigEndianUInt32(at: pos + 16)
                var vmState = UInt64(table.bigEndianUInt32(at: pos + 32))
                let extraSize = Int(table.bigEndianUInt32(at: pos + 36))
                guard extraSize <= 1024, pos + 40 + extraSize + idSize + nameSize <= table.count else {
                    throw bad(
                        "snapshot table entry \(index) at offset \(snapshotsOffset + UInt64(pos)) runs past the table")
                }
                var diskSize: UInt64?
                if extraSize >= 8 { vmState = max(vmState, table.bigEndianUInt64(at: pos + 40)) }
                if extraSize >= 16 { diskSize = table.bigEndianUInt64(at: pos + 48) }
                let idStart = pos + 40 + extraSize
                let id = String(decoding: table[idStart..<idStart + idSize], as: UTF8.self)
                let name = String(decoding: table[idStart + idSize..<idStart + idSize + nameSize], as: UTF8.self)
                snaps.append(
                    Snapshot(
                        id: id, name: name, date: Date(timeIntervalSince1970: TimeInterval(seconds)),
                        vmStateSize: vmState, diskSize: diskSize))
                pos = (idStart + idSize + nameSize + 7) / 8 * 8
            }
        }
        snapshots = snaps
    }
}

// MARK: - QEMU's image locks

/// Whether a QEMU process holds an image open (it locks bytes 100-299 of every image it opens).
public enum QemuImageLock {
    public static func isHeld(_ path: String) -> Bool {
        FileLockProbe.isLocked(path, range: FileLockProbe.imageLockBytes)
    }
}

// MARK: - Small file helpers

struct ReadOnlyFile: ~Copyable {
    let fd: Int32
    let size: UInt64

    init(_ path: String) throws {
        fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)  // a FIFO must not block the open
        guard fd >= 0 else { throw SnapshotError(.notFound, String(cString: strerror(errno))) }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            close(fd)
            throw SnapshotError(.io, String(cString: strerror(errno)))
        }
        guard (st.st_mode & S_IFMT) == S_IFREG || (st.st_mode & S_IFMT) == S_IFBLK else {
            close(fd)
            throw SnapshotError(.invalidImage, "not a regular file")
        }
        size = UInt64(st.st_size)
    }

    func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        guard count >= 0, offset <= UInt64(Int64.max) - UInt64(count) else {
            throw SnapshotError(.invalidImage, "offset \(offset) (+\(count) bytes) is beyond any file")
        }
        var buffer = [UInt8](repeating: 0, count: count)
        let got = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
        guard got >= 0 else { throw SnapshotError(.io, String(cString: strerror(errno))) }
        buffer.removeLast(count - got)
        return buffer
    }

    deinit { close(fd) }
}

extension Array where Element == UInt8 {
    func bigEndianUInt16(at i: Int) -> UInt16 { i + 2 <= count ? UInt16(self[i]) << 8 | UInt16(self[i + 1]) : 0 }
    func bigEndianUInt32(at i: Int) -> UInt32 {
        i + 4 <= count ? (0..<4).reduce(UInt32(0)) { $0 << 8 | UInt32(self[i + $1]) } : 0
    }
    func bigEndianUInt64(at i: Int) -> UInt64 {
        i + 8 <= count ? (0..<8).reduce(UInt64(0)) { $0 << 8 | UInt64(self[i + $1]) } : 0
    }
}
