import Foundation
import SnapshotCore

/// On-disk structures of the VHD format (Microsoft's "Virtual Hard Disk Image Format
/// Specification" 1.0): the footer, the dynamic disk header and its parent locators. All fields
/// are big-endian; checksums are the one's complement of the byte sum with the checksum zeroed.
public enum VHD {
    public static let sectorSize = 512
    public static let footerCookie = Array("conectix".utf8)
    public static let headerCookie = Array("cxsparse".utf8)
    /// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
    public static let epochOffset: TimeInterval = 946_684_800
    public static let unusedBlock: UInt32 = 0xFFFF_FFFF
    public static let defaultBlockSize: UInt32 = 2 << 20

    public enum DiskType: UInt32, Sendable, CustomStringConvertible {
        case fixed = 2, dynamic = 3, differencing = 4
        public var description: String {
            switch self {
            case .fixed: "fixed"
            case .dynamic: "dynamic"
            case .differencing: "differencing"
            }
        }
    }

    /// Parent locator platform codes vhd-util writes (and reads).
    public enum PlatformCode: UInt32, Sendable, CaseIterable {
        case none = 0
        /// Windows relative path, UTF-16LE.
        case w2ru = 0x5732_7275
        /// Windows absolute path, UTF-16LE.
        case w2ku = 0x5732_6B75
        /// Mac OS X: a `file://` URL, UTF-8.
        case macx = 0x4D61_6358
    }

    /// Checks a structure's length, cookie and checksum (a 32-bit field at `checksumAt`), the
    /// checks footer and dynamic header share; `bad` names the field and the problem.
    static func checkFrame(
        _ b: [UInt8], length: Int, cookie: [UInt8], checksumAt: Int, bad: (String, String) -> SnapshotError
    ) throws {
        guard b.count == length else { throw bad("", "truncated: \(b.count) of \(length) bytes") }
        guard Array(b[0..<8]) == cookie else {
            throw bad(
                "cookie (offset +0)",
                "expected '\(String(decoding: cookie, as: UTF8.self))', found \(printable(b[0..<8]))")
        }
        let stored = b.be32(checksumAt), computed = checksum(b[0..<length], skipping: checksumAt..<(checksumAt + 4))
        guard stored == computed else {
            throw bad(
                "checksum (offset +\(checksumAt))", String(format: "stored 0x%08x, computed 0x%08x", stored, computed))
        }
    }

    static func checksum(_ bytes: ArraySlice<UInt8>, skipping range: Range<Int>) -> UInt32 {
        var sum: UInt32 = 0
        for (i, b) in zip(bytes.indices, bytes) where !range.contains(i - bytes.startIndex) { sum &+= UInt32(b) }
        return ~sum
    }

    /// Cylinders, heads and sectors per track for a disk size (the algorithm of the spec's appendix).
    public static func geometry(forSize size: UInt64) -> (cylinders: UInt16, heads: UInt8, sectors: UInt8) {
        var totalSectors = size / 512
        if totalSectors > 65535 * 16 * 255 { totalSectors = 65535 * 16 * 255 }
        var sectorsPerTrack: UInt64, heads: UInt64, cylinderTimesHeads: UInt64
        if totalSectors >= 65535 * 16 * 63 {
            sectorsPerTrack = 255
            heads = 16
            cylinderTimesHeads = totalSectors / sectorsPerTrack
        } else {
            sectorsPerTrack = 17
            cylinderTimesHeads = totalSectors / sectorsPerTrack
            heads = max((cylinderTimesHeads + 1023) / 1024, 4)
            if cylinderTimesHeads >= heads * 1024 || heads > 16 {
                sectorsPerTrack = 31
                heads = 16
                cylinderTimesHeads = totalSectors / sectorsPerTrack
            }
            if cylinderTimesHeads >= heads * 1024 {
                sectorsPerTrack = 63
                heads = 16
                cylinderTimesHeads = totalSectors / sectorsPerTrack
            }
        }
        return (UInt16(min(cylinderTimesHeads / heads, 65535)), UInt8(heads), UInt8(sectorsPerTrack))
    }

    public static func timestamp(_ date: Date) -> UInt32 {
        UInt32(clamping: Int64(max(0, date.timeIntervalSince1970 - epochOffset)))
    }
}

/// The 512-byte footer (at the end of every VHD, copied at offset 0 of dynamic and differencing disks).
extension VHD {
    /// `bytes` with the footer checksums (at both ends) and the dynamic header's recomputed: how
    /// the fuzz harness and the hostile-corpus tests reach the fields behind the checksums, as a
    /// crafted file would.
    static func withRepairedChecksums(_ bytes: [UInt8]) -> [UInt8] {
        var b = bytes
        guard b.count >= 512 else { return b }
        for at in [0, (b.count - 512) / 512 * 512] where Array(b[at..<at + 8]) == footerCookie {
            var frame = Array(b[at..<at + 512])
            frame.put32(checksum(frame[0..<512], skipping: 64..<68), at: 64)
            b.replaceSubrange(at..<at + 512, with: frame)
        }
        let dataOffset = Array(b[0..<512]).be64(16)
        if dataOffset <= UInt64(b.count), UInt64(b.count) - dataOffset >= 1024 {
            let at = Int(dataOffset)
            var frame = Array(b[at..<at + 1024])
            frame.put32(checksum(frame[0..<1024], skipping: 36..<40), at: 36)
            b.replaceSubrange(at..<at + 1024, with: frame)
        }
        return b
    }
}

public struct VHDFooter: Sendable, Hashable {
    public var features: UInt32 = 2
    public var formatVersion: UInt32 = 0x0001_0000
    public var dataOffset: UInt64
    public var timestamp: UInt32
    /// vhd-util's creator ("tap"): QEMU then takes the size from `currentSize`, not the geometry.
    public var creatorApplication: [UInt8] = [0x74, 0x61, 0x70, 0x00]
    public var creatorVersion: UInt32 = 0x0001_0003
    public var creatorHostOS: UInt32 = 0x5769_326B
    public var originalSize: UInt64
    public var currentSize: UInt64
    public var cylinders: UInt16
    public var heads: UInt8
    public var sectorsPerTrack: UInt8
    public var diskType: VHD.DiskType
    public var uuid: [UInt8]
    public var savedState: UInt8 = 0

    public init(size: UInt64, type: VHD.DiskType, uuid: [UInt8], timestamp: UInt32, dataOffset: UInt64) {
        let g = VHD.geometry(forSize: size)
        self.dataOffset = dataOffset
        self.timestamp = timestamp
        originalSize = size
        currentSize = size
        cylinders = g.cylinders
        heads = g.heads
        sectorsPerTrack = g.sectors
        diskType = type
        self.uuid = uuid
    }

    /// Parses and checks a footer; `where` names the file and offset for error messages.
    public init(parsing b: [UInt8], where location: String) throws {
        func bad(_ field: String, _ why: String) -> SnapshotError {
            SnapshotError(.invalidImage, "\(location): footer \(field): \(why)")
        }
        try VHD.checkFrame(b, length: 512, cookie: VHD.footerCookie, checksumAt: 64, bad: bad)
        guard let type = VHD.DiskType(rawValue: b.be32(60)) else {
            throw bad("disk type (offset +60)", "\(b.be32(60)) is not fixed (2), dynamic (3) or differencing (4)")
        }
        features = b.be32(8)
        formatVersion = b.be32(12)
        guard formatVersion >> 16 == 1 else {
            throw bad("file format version (offset +12)", String(format: "0x%08x is not 1.x", formatVersion))
        }
        dataOffset = b.be64(16)
        timestamp = b.be32(24)
        creatorApplication = Array(b[28..<32])
        creatorVersion = b.be32(32)
        creatorHostOS = b.be32(36)
        originalSize = b.be64(40)
        currentSize = b.be64(48)
        cylinders = UInt16(b[56]) << 8 | UInt16(b[57])
        heads = b[58]
        sectorsPerTrack = b[59]
        diskType = type
        uuid = Array(b[68..<84])
        savedState = b[84]
        guard currentSize % 512 == 0, currentSize > 0 else {
            throw bad("current size (offset +48)", "\(currentSize) is not a positive multiple of 512")
        }
        if type != .fixed, dataOffset == UInt64.max || dataOffset % 512 != 0 {
            throw bad("data offset (offset +16)", "\(dataOffset) does not point at a dynamic header")
        }
    }

    public func serialized() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 512)
        b.replaceSubrange(0..<8, with: VHD.footerCookie)
        b.put32(features, at: 8)
        b.put32(formatVersion, at: 12)
        b.put64(dataOffset, at: 16)
        b.put32(timestamp, at: 24)
        b.replaceSubrange(28..<32, with: creatorApplication.prefix(4))
        b.put32(creatorVersion, at: 32)
        b.put32(creatorHostOS, at: 36)
        b.put64(originalSize, at: 40)
        b.put64(currentSize, at: 48)
        b[56] = UInt8(cylinders >> 8)
        b[57] = UInt8(cylinders & 0xff)
        b[58] = heads
        b[59] = sectorsPerTrack
        b.put32(diskType.rawValue, at: 60)
        b.replaceSubrange(68..<84, with: uuid.prefix(16))
        b[84] = savedState
        b.put32(VHD.checksum(b[0..<512], skipping: 64..<68), at: 64)
        return b
    }
}

/// One of the eight parent locator entries of a dynamic disk header.
public struct VHDParentLocator: Sendable, Hashable {
    public var code: UInt32
    /// Space reserved for the locator data. vhd-util (and Windows) write bytes here although the
    /// spec says sectors; readers accept both.
    public var dataSpace: UInt32
    public var dataLength: UInt32
    public var dataOffset: UInt64

    public static let empty = VHDParentLocator(code: 0, dataSpace: 0, dataLength: 0, dataOffset: 0)

    /// The bytes the locator may occupy: `dataSpace` as bytes when it is large enough, else as sectors.
    public var reservedBytes: UInt64 {
        UInt64(dataSpace) >= UInt64(dataLength) && dataSpace >= 512 ? UInt64(dataSpace) : UInt64(dataSpace) * 512
    }
}

/// The 1,024-byte dynamic disk header.
public struct VHDHeader: Sendable, Hashable {
    public var tableOffset: UInt64
    public var headerVersion: UInt32 = 0x0001_0000
    public var maxTableEntries: UInt32
    public var blockSize: UInt32
    public var parentUUID: [UInt8] = [UInt8](repeating: 0, count: 16)
    public var parentTimestamp: UInt32 = 0
    /// The parent's file name, UTF-16BE in the file.
    public var parentName: String = ""
    public var locators: [VHDParentLocator] = Array(repeating: .empty, count: 8)

    public init(tableOffset: UInt64, maxTableEntries: UInt32, blockSize: UInt32) {
        self.tableOffset = tableOffset
        self.maxTableEntries = maxTableEntries
        self.blockSize = blockSize
    }

    public init(parsing b: [UInt8], where location: String) throws {
        func bad(_ field: String, _ why: String) -> SnapshotError {
            SnapshotError(.invalidImage, "\(location): dynamic header \(field): \(why)")
        }
        try VHD.checkFrame(b, length: 1024, cookie: VHD.headerCookie, checksumAt: 36, bad: bad)
        tableOffset = b.be64(16)
        headerVersion = b.be32(24)
        maxTableEntries = b.be32(28)
        blockSize = b.be32(32)
        guard blockSize >= 512, blockSize <= 256 << 20, blockSize & (blockSize - 1) == 0 else {
            throw bad("block size (offset +32)", "\(blockSize) is not a power of two between 512 bytes and 256 MiB")
        }
        guard tableOffset % 512 == 0 else {
            throw bad("table offset (offset +16)", "\(tableOffset) is not sector-aligned")
        }
        parentUUID = Array(b[40..<56])
        parentTimestamp = b.be32(56)
        var units: [UInt16] = []
        for i in stride(from: 64, to: 576, by: 2) {
            let u = UInt16(b[i]) << 8 | UInt16(b[i + 1])
            if u == 0 { break }
            units.append(u)
        }
        parentName = String(decoding: units, as: UTF16.self)
        locators = (0..<8).map { i in
            let o = 576 + i * 24
            return VHDParentLocator(
                code: b.be32(o), dataSpace: b.be32(o + 4), dataLength: b.be32(o + 8), dataOffset: b.be64(o + 16))
        }
    }

    public func serialized() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 1024)
        b.replaceSubrange(0..<8, with: VHD.headerCookie)
        b.put64(UInt64.max, at: 8)
        b.put64(tableOffset, at: 16)
        b.put32(headerVersion, at: 24)
        b.put32(maxTableEntries, at: 28)
        b.put32(blockSize, at: 32)
        b.replaceSubrange(40..<56, with: parentUUID.prefix(16))
        b.put32(parentTimestamp, at: 56)
        for (i, u) in parentName.utf16.prefix(256).enumerated() {
            b[64 + 2 * i] = UInt8(u >> 8)
            b[65 + 2 * i] = UInt8(u & 0xff)
        }
        for (i, l) in locators.prefix(8).enumerated() {
            let o = 576 + i * 24
            b.put32(l.code, at: o)
            b.put32(l.dataSpace, at: o + 4)
            b.put32(l.dataLength, at: o + 8)
            b.put64(l.dataOffset, at: o + 16)
        }
        b.put32(VHD.checksum(b[0..<1024], skipping: 36..<40), at: 36)
        return b
    }
}

func printable(_ bytes: ArraySlice<UInt8>) -> String {
    "'" + bytes.map { (0x20..<0x7f).contains($0) ? String(UnicodeScalar($0)) : String(format: "\\x%02x", $0) }.joined()
        + "'"
}

extension Array where Element == UInt8 {
    func be32(_ i: Int) -> UInt32 { (0..<4).reduce(UInt32(0)) { $0 << 8 | UInt32(self[i + $1]) } }
    func be64(_ i: Int) -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 << 8 | UInt64(self[i + $1]) } }
    mutating func put32(_ v: UInt32, at i: Int) {
        for k in 0..<4 { self[i + k] = UInt8(truncatingIfNeeded: v >> (24 - 8 * k)) }
    }
    mutating func put64(_ v: UInt64, at i: Int) {
        for k in 0..<8 { self[i + k] = UInt8(truncatingIfNeeded: v >> (56 - 8 * k)) }
    }
}

/// A random version-4 UUID as 16 bytes.
func newUUID() -> [UInt8] {
    let u = UUID().uuid
    return [u.0, u.1, u.2, u.3, u.4, u.5, u.6, u.7, u.8, u.9, u.10, u.11, u.12, u.13, u.14, u.15]
}

func uuidString(_ b: [UInt8]) -> String {
    guard b.count == 16 else { return "?" }
    return UUID(
        uuid: (b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15])
    ).uuidString.lowercased()
}

/// blktap's batmap ("tdbatmap"): a sector of header right after the BAT, then one bit per block,
/// set when the block is known to be fully allocated. vhd-util and tapdisk expect it in files whose
/// creator is "tap" 1.2 or later; vmsnap writes it empty (every bit clear is valid: readers then
/// consult each block's sector bitmap).
struct VHDBatmap {
    static let version: UInt32 = 0x0001_0002
    let headerOffset: UInt64
    /// Map sectors: one bit per BAT entry, and at least what libvhd's checksum reads for the size.
    let mapSectors: Int

    init(entries: UInt32, virtualSize: UInt64, at offset: UInt64) {
        headerOffset = offset
        let forEntries = (Int(entries) + 8 * 512 - 1) / (8 * 512)
        let forSize = (Int(virtualSize >> 24) + 511) / 512
        mapSectors = max(1, forEntries, forSize)
    }

    /// Header sector plus map.
    var regionBytes: Int { 512 + mapSectors * 512 }

    /// The header (big-endian) followed by an all-clear map.
    func serialized() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: regionBytes)
        b.replaceSubrange(0..<8, with: Array("tdbatmap".utf8))
        b.put64(headerOffset + 512, at: 8)
        b.put32(UInt32(mapSectors), at: 16)
        b.put32(Self.version, at: 20)
        // One's complement of the byte sum of the map: all zero bytes sum to 0.
        b.put32(~UInt32(0), at: 24)
        return b
    }
}
