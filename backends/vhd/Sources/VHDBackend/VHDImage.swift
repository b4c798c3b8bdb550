import Foundation
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// One VHD file, opened and checked: footer, header, BAT, and (for differencing disks) its
/// parent, opened on demand. Reads go through the chain; writes go to this file only.
public final class VHDImage {
    public let path: String
    public private(set) var footer: VHDFooter
    public private(set) var header: VHDHeader?
    /// Block allocation table: the sector where each block's bitmap starts, or `VHD.unusedBlock`.
    public private(set) var bat: [UInt32]
    /// Where the trailing footer sits: the end of the data.
    public private(set) var footerOffset: UInt64
    /// The open file, closed exactly once when the image goes (also when `init` throws after
    /// every property is set, where Swift runs no deinit body of ours before releasing them).
    private let descriptor: OwnedDescriptor
    var fd: Int32 { descriptor.fd }
    let writable: Bool
    private var bitmaps: [Int: [UInt8]] = [:]
    private var parentImage: VHDImage?
    private var parentResolved = false
    /// Real paths of the images below this one, to refuse loops.
    private let below: Set<String>

    public var virtualSize: UInt64 { footer.currentSize }
    public var type: VHD.DiskType { footer.diskType }
    public var blockSize: Int { Int(header?.blockSize ?? 0) }
    var sectorsPerBlock: Int { blockSize / 512 }
    var bitmapBytes: Int { ((sectorsPerBlock + 7) / 8 + 511) / 512 * 512 }

    // MARK: - Opening

    /// Opens `path` and checks its structure. The parent is opened only when a read needs it.
    public init(path: String, writable: Bool = false, below: Set<String> = []) throws {
        self.path = path
        self.writable = writable
        self.below = below
        // O_NONBLOCK: a FIFO at the path (or a parent locator pointing at one) must not block the open.
        let fd = Glibc.open(path, (writable ? O_RDWR : O_RDONLY) | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else {
            throw SnapshotError(
                errno == ENOENT ? .notFound : .io, "\(path): cannot open: \(String(cString: strerror(errno)))")
        }
        descriptor = OwnedDescriptor(fd)
        do {
            var st = stat()
            guard fstat(fd, &st) == 0 else { throw SnapshotError(.io, "\(path): cannot stat") }
            guard (st.st_mode & S_IFMT) == S_IFREG else {
                throw SnapshotError(.invalidImage, "\(path) is not a regular file; a VHD is a file")
            }
            let size = UInt64(st.st_size)
            guard size >= 512, size % 512 == 0 || size >= 1024 else {
                throw SnapshotError(.invalidImage, "\(path): truncated: \(size) bytes, shorter than a VHD footer (512)")
            }
            footerOffset = (size - 512) / 512 * 512
            let tail = try Self.pread(fd, at: footerOffset, count: 512, path: path)
            do {
                footer = try VHDFooter(parsing: tail, where: "\(path) (offset \(footerOffset))")
            } catch let endError {
                // A dynamic disk keeps a copy at offset 0; a damaged end is still reported.
                let head = try Self.pread(fd, at: 0, count: 512, path: path)
                guard (try? VHDFooter(parsing: head, where: path)) != nil else { throw endError }
                throw SnapshotError(
                    .invalidImage,
                    "\(endError); the copy at offset 0 is intact: the file was probably truncated or cut off while growing"
                )
            }
            header = nil
            bat = []
            if footer.diskType != .fixed {
                let copy = try VHDFooter(
                    parsing: try Self.pread(fd, at: 0, count: 512, path: path), where: "\(path) (offset 0)")
                guard copy == footer else {
                    throw SnapshotError(
                        .invalidImage, "\(path): the footer at offset 0 differs from the one at offset \(footerOffset)")
                }
                guard footer.dataOffset <= footerOffset, footerOffset - footer.dataOffset >= 1024 else {
                    throw SnapshotError(
                        .invalidImage,
                        "\(path): footer data offset \(footer.dataOffset) points past the end of the data (\(footerOffset))"
                    )
                }
                let h = try VHDHeader(
                    parsing: try Self.pread(fd, at: footer.dataOffset, count: 1024, path: path),
                    where: "\(path) (offset \(footer.dataOffset))")
                guard h.blockSize >= 512 else {
                    throw SnapshotError(
                        .invalidImage, "\(path): dynamic header block size \(h.blockSize) is below 512 bytes")
                }
                let blockSize = UInt64(h.blockSize)
                let needed = footer.currentSize / blockSize + (footer.currentSize % blockSize == 0 ? 0 : 1)
                guard UInt64(h.maxTableEntries) >= needed else {
                    throw SnapshotError(
                        .invalidImage,
                        "\(path): dynamic header max table entries (offset \(footer.dataOffset + 28)) is \(h.maxTableEntries), but \(needed) blocks are needed for \(footer.currentSize) bytes"
                    )
                }
                let batBytes = UInt64(h.maxTableEntries) * 4
                let (tableEnd, wraps) = h.tableOffset.addingReportingOverflow(batBytes)
                guard !wraps, h.tableOffset >= footer.dataOffset + 1024 || tableEnd <= footer.dataOffset,
                    h.tableOffset >= 512,
                    tableEnd <= footerOffset
                else {
                    throw SnapshotError(
                        .invalidImage,
                        "\(path): the block allocation table (offset \(h.tableOffset), \(batBytes) bytes) overlaps the headers or runs past the end of the data (\(footerOffset))"
                    )
                }
                let raw = try Self.pread(fd, at: h.tableOffset, count: Int(batBytes), path: path)
                bat = (0..<Int(h.maxTableEntries)).map { raw.be32($0 * 4) }
                header = h
                try checkBlocks()
            } else if footer.currentSize > UInt64(size) - 512 {
                throw SnapshotError(
                    .invalidImage, "\(path): fixed disk of \(footer.currentSize) bytes in a file of \(size) bytes")
            }
        }
    }

    /// The metadata regions (header, BAT, parent locator data) as byte ranges.
    var metadataRegions: [(String, Range<UInt64>)] {
        guard let h = header else { return [] }
        var regions: [(String, Range<UInt64>)] = [
            ("the footer copy", 0..<512),
            ("the dynamic header", footer.dataOffset..<footer.dataOffset + 1024),
            (
                "the block allocation table",
                h.tableOffset..<h.tableOffset + (UInt64(h.maxTableEntries) * 4 + 511) / 512 * 512
            ),
        ]
        for (i, l) in h.locators.enumerated() where l.code != 0 && l.dataLength > 0 {
            let (end, wraps) = l.dataOffset.addingReportingOverflow(max(UInt64(l.dataLength), 1))
            regions.append(("parent locator \(i)", l.dataOffset..<(wraps ? UInt64.max : end)))
        }
        return regions
    }

    /// Every used BAT entry must point at a block that lies before the footer, overlaps no
    /// metadata and no other block.
    private func checkBlocks() throws {
        guard let h = header else { return }
        let span = UInt64(bitmapBytes) + UInt64(h.blockSize)
        let regions = metadataRegions
        var used: [(UInt64, Int)] = []
        for (i, entry) in bat.enumerated() where entry != VHD.unusedBlock {
            let at = UInt64(entry) * 512
            let entryOffset = h.tableOffset + UInt64(i) * 4
            if at + span > footerOffset {
                throw SnapshotError(
                    .invalidImage,
                    "\(path): BAT entry \(i) (offset \(entryOffset)) points at \(at), past the end of the data (\(footerOffset))"
                )
            }
            if let (name, range) = regions.first(where: { $0.1.overlaps(at..<at + span) }) {
                throw SnapshotError(
                    .invalidImage,
                    "\(path): BAT entry \(i) (offset \(entryOffset)) points at \(at), inside the metadata (\(name), bytes \(range.lowerBound)-\(range.upperBound))"
                )
            }
            used.append((at, i))
        }
        used.sort { $0.0 < $1.0 }
        for (a, b) in zip(used, used.dropFirst()) where a.0 + span > b.0 {
            throw SnapshotError(
                .invalidImage, "\(path): BAT entries \(a.1) and \(b.1) point at overlapping blocks (\(a.0) and \(b.0))")
        }
    }

    static func pread(_ fd: Int32, at offset: UInt64, count: Int, path: String) throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: count)
        try pread(fd, at: offset, count: count, into: &buffer, at: 0, path: path)
        return buffer
    }

    /// Reads `count` bytes at file offset `offset` straight into `buffer` at `start`.
    static func pread(
        _ fd: Int32, at offset: UInt64, count: Int, into buffer: inout [UInt8], at start: Int, path: String
    ) throws {
        // Offsets come from the file: one past what a file offset can hold is a bad file, not a trap.
        guard count >= 0, offset <= UInt64(Int64.max) - UInt64(count), start >= 0, start + count <= buffer.count
        else {
            throw SnapshotError(.invalidImage, "\(path): offset \(offset) (+\(count) bytes) is beyond any file")
        }
        var done = 0
        while done < count {
            let got = buffer.withUnsafeMutableBytes {
                Glibc.pread(fd, $0.baseAddress! + start + done, count - done, off_t(offset) + off_t(done))
            }
            if got < 0 { throw SnapshotError(.io, "\(path): read at \(offset): \(String(cString: strerror(errno)))") }
            if got == 0 {
                throw SnapshotError(.invalidImage, "\(path): truncated: wanted \(count) bytes at offset \(offset)")
            }
            done += got
        }
    }

    func pwrite(_ bytes: [UInt8], at offset: UInt64) throws {
        var done = 0
        while done < bytes.count {
            let put = bytes.withUnsafeBytes {
                Glibc.pwrite(fd, $0.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
            }
            if put < 0 { throw SnapshotError(.io, "\(path): write at \(offset): \(String(cString: strerror(errno)))") }
            done += put
        }
    }

    // MARK: - The parent

    /// The parent's path, from the parent locators (MACX, W2RU, W2KU), relative to this file's folder.
    public func parentPath() throws -> String {
        guard type == .differencing, let h = header else {
            throw SnapshotError(.invalidArgument, "\(path) is not a differencing disk")
        }
        var tried: [String] = []
        let order: [VHD.PlatformCode] = [.macx, .w2ru, .w2ku]
        for code in order {
            for l in h.locators where l.code == code.rawValue && l.dataLength > 0 {
                guard l.dataLength <= 4096, l.dataOffset <= footerOffset,
                    UInt64(l.dataLength) <= footerOffset - l.dataOffset
                else {
                    throw SnapshotError(
                        .invalidImage,
                        "\(path): parent locator data (offset \(l.dataOffset), \(l.dataLength) bytes) lies outside the file"
                    )
                }
                let raw = try Self.pread(fd, at: l.dataOffset, count: Int(l.dataLength), path: path)
                var name: String
                if code == .macx {
                    name = String(decoding: raw, as: UTF8.self)
                    guard name.hasPrefix("file://") else { continue }
                    name.removeFirst(7)
                } else {
                    let units = stride(from: 0, to: raw.count - 1, by: 2).map {
                        UInt16(raw[$0]) | UInt16(raw[$0 + 1]) << 8
                    }
                    name = String(decoding: units, as: UTF16.self).replacingOccurrences(of: "\\", with: "/")
                    if name.lowercased().hasPrefix("c:") { name.removeFirst(2) }
                }
                let full =
                    name.hasPrefix("/")
                    ? name : ((path as NSString).deletingLastPathComponent as NSString).appendingPathComponent(name)
                let resolved = URL(fileURLWithPath: full).standardizedFileURL.path
                if FileManager.default.fileExists(atPath: resolved) { return resolved }
                tried.append(resolved)
            }
        }
        throw SnapshotError(
            .notFound,
            "\(path): parent \(h.parentName.isEmpty ? "" : "'\(h.parentName)' ")not found (looked for \(tried.isEmpty ? "no usable locator" : tried.joined(separator: ", ")))"
        )
    }

    /// The parent image, opened and checked against this disk's parent UUID.
    public func parent() throws -> VHDImage? {
        guard type == .differencing else { return nil }
        if parentResolved { return parentImage }
        let p = try parentPath()
        let real = URL(fileURLWithPath: p).resolvingSymlinksInPath().path
        let me = URL(fileURLWithPath: path).resolvingSymlinksInPath().path
        guard !below.contains(real), real != me, below.count < 255 else {
            throw SnapshotError(.invalidImage, "\(path): the parent chain loops back to \(p)")
        }
        let image = try VHDImage(path: p, below: below.union([me]))
        guard image.footer.uuid == header!.parentUUID else {
            throw SnapshotError(
                .invalidImage,
                "\(path): parent \(p) has UUID \(uuidString(image.footer.uuid)), but this disk expects \(uuidString(header!.parentUUID))"
            )
        }
        guard image.virtualSize == virtualSize else {
            throw SnapshotError(
                .invalidImage, "\(path): parent \(p) is \(image.virtualSize) bytes, this disk \(virtualSize)")
        }
        parentImage = image
        parentResolved = true
        return image
    }

    // MARK: - Reading

    func bitmap(_ block: Int) throws -> [UInt8] {
        if let cached = bitmaps[block] { return cached }
        let b = try Self.pread(fd, at: UInt64(bat[block]) * 512, count: bitmapBytes, path: path)
        bitmaps[block] = b
        return b
    }

    /// `count` bytes of the virtual disk at `offset`, read through the chain.
    public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        guard offset + UInt64(count) <= virtualSize else {
            throw SnapshotError(
                .invalidArgument,
                "\(path): read of \(count) bytes at \(offset) goes past the disk's \(virtualSize) bytes")
        }
        let first = offset / 512, last = (offset + UInt64(count) + 511) / 512
        var sectors = [UInt8](repeating: 0, count: Int(last - first) * 512)
        try readSectors(first, Int(last - first), into: &sectors, at: 0)
        let skip = Int(offset - first * 512)
        return skip == 0 && sectors.count == count ? sectors : Array(sectors[skip..<skip + count])
    }

    /// Reads whole sectors into `buffer` at `at`, from this layer where it holds them, else below.
    func readSectors(_ first: UInt64, _ count: Int, into buffer: inout [UInt8], at base: Int) throws {
        if type == .fixed {
            try Self.pread(fd, at: first * 512, count: count * 512, into: &buffer, at: base, path: path)
            return
        }
        var sector = first
        let end = first + UInt64(count)
        while sector < end {
            let block = Int(sector / UInt64(sectorsPerBlock))
            let blockEnd = min(end, UInt64(block + 1) * UInt64(sectorsPerBlock))
            let out = base + Int(sector - first) * 512
            if bat[block] == VHD.unusedBlock {
                try fromBelow(sector, Int(blockEnd - sector), &buffer, out)
            } else {
                let map = try bitmap(block)
                var s = sector
                while s < blockEnd {
                    let present = Self.bit(map, Int(s % UInt64(sectorsPerBlock)))
                    var e = s + 1
                    while e < blockEnd, Self.bit(map, Int(e % UInt64(sectorsPerBlock))) == present { e += 1 }
                    let at = base + Int(s - first) * 512
                    if present {
                        let fileOffset =
                            UInt64(bat[block]) * 512 + UInt64(bitmapBytes) + (s % UInt64(sectorsPerBlock)) * 512
                        try Self.pread(fd, at: fileOffset, count: Int(e - s) * 512, into: &buffer, at: at, path: path)
                    } else {
                        try fromBelow(s, Int(e - s), &buffer, at)
                    }
                    s = e
                }
            }
            sector = blockEnd
        }
    }

    private func fromBelow(_ sector: UInt64, _ count: Int, _ buffer: inout [UInt8], _ at: Int) throws {
        if let parent = try parent() {
            try parent.readSectors(sector, count, into: &buffer, at: at)
        } else {
            buffer.withUnsafeMutableBytes { _ = memset($0.baseAddress! + at, 0, count * 512) }
        }
    }

    static func bit(_ map: [UInt8], _ i: Int) -> Bool { map[i >> 3] & (0x80 >> UInt8(i & 7)) != 0 }

    /// The sectors this layer itself holds, as runs (first sector, count): read from the BAT and
    /// the sector bitmaps only, never the data.
    public func ownedRuns() throws -> [(first: UInt64, count: UInt64)] {
        if type == .fixed { return [(0, virtualSize / 512)] }
        var runs: [(first: UInt64, count: UInt64)] = []
        let totalSectors = virtualSize / 512
        for (block, entry) in bat.enumerated() where entry != VHD.unusedBlock {
            let map = try bitmap(block)
            let base = UInt64(block) * UInt64(sectorsPerBlock)
            for i in 0..<sectorsPerBlock where base + UInt64(i) < totalSectors && Self.bit(map, i) {
                let s = base + UInt64(i)
                if let last = runs.last, last.first + last.count == s {
                    runs[runs.count - 1].count += 1
                } else {
                    runs.append((s, 1))
                }
            }
        }
        return runs
    }

    // MARK: - Writing

    /// Writes `bytes` at `offset` of the virtual disk into this layer, allocating blocks as needed.
    public func write(_ bytes: [UInt8], at offset: UInt64) throws {
        guard writable else { throw SnapshotError(.invalidArgument, "\(path) is open read-only") }
        guard offset + UInt64(bytes.count) <= virtualSize else {
            throw SnapshotError(
                .invalidArgument,
                "\(path): write of \(bytes.count) bytes at \(offset) goes past the disk's \(virtualSize) bytes")
        }
        guard !bytes.isEmpty else { return }
        let first = offset / 512, last = (offset + UInt64(bytes.count) + 511) / 512
        var sectors: [UInt8]
        let head = Int(offset % 512)
        if head != 0 || bytes.count % 512 != 0 {
            sectors = try read(at: first * 512, count: Int(last - first) * 512)
            sectors.replaceSubrange(head..<head + bytes.count, with: bytes)
        } else {
            sectors = bytes
        }
        try writeSectors(first, sectors)
    }

    func writeSectors(_ first: UInt64, _ data: [UInt8]) throws {
        if type == .fixed { return try pwrite(data, at: first * 512) }
        let count = UInt64(data.count / 512)
        var sector = first
        while sector < first + count {
            let block = Int(sector / UInt64(sectorsPerBlock))
            let blockEnd = min(first + count, UInt64(block + 1) * UInt64(sectorsPerBlock))
            if bat[block] == VHD.unusedBlock { try allocate(block) }
            let inBlock = sector % UInt64(sectorsPerBlock)
            let slice = Array(data[Int(sector - first) * 512..<Int(blockEnd - first) * 512])
            try pwrite(slice, at: UInt64(bat[block]) * 512 + UInt64(bitmapBytes) + inBlock * 512)
            var map = try bitmap(block)
            for i in Int(inBlock)..<Int(inBlock + blockEnd - sector) { map[i >> 3] |= 0x80 >> UInt8(i & 7) }
            try pwrite(map, at: UInt64(bat[block]) * 512)
            bitmaps[block] = map
            sector = blockEnd
        }
    }

    /// Appends a block: the new footer goes out first, so the file ends with a valid footer at
    /// every moment; then the empty bitmap; then the BAT entry that makes the block visible.
    private func allocate(_ block: Int) throws {
        guard let h = header else { return }
        let at = footerOffset
        let newFooter = at + UInt64(bitmapBytes) + UInt64(h.blockSize)
        try pwrite(footer.serialized(), at: newFooter)
        try pwrite([UInt8](repeating: 0, count: bitmapBytes), at: at)
        var entry = [UInt8](repeating: 0, count: 4)
        entry.put32(UInt32(at / 512), at: 0)
        try pwrite(entry, at: h.tableOffset + UInt64(block) * 4)
        bat[block] = UInt32(at / 512)
        bitmaps[block] = [UInt8](repeating: 0, count: bitmapBytes)
        footerOffset = newFooter
    }

    /// Flushes to stable storage.
    public func sync() throws {
        guard fsync(fd) == 0 else { throw SnapshotError(.io, "\(path): fsync: \(String(cString: strerror(errno)))") }
    }

    // MARK: - Metadata changes

    /// Rewrites both footer copies with a new unique id.
    public func setUUID(_ uuid: [UInt8]) throws {
        footer.uuid = uuid
        try writeFooters()
    }

    func writeFooters() throws {
        let bytes = footer.serialized()
        if type != .fixed { try pwrite(bytes, at: 0) }
        try pwrite(bytes, at: footerOffset)
    }

    /// Points this disk at a new parent (locators, parent UUID, name, timestamp), or makes it a
    /// standalone dynamic disk when `newParent` is nil.
    public func setParent(_ newParent: String?) throws {
        guard var h = header else { throw SnapshotError(.invalidArgument, "\(path) is a fixed disk: it has no parent") }
        guard let newParent else {
            h.parentUUID = [UInt8](repeating: 0, count: 16)
            h.parentTimestamp = 0
            h.parentName = ""
            h.locators = Array(repeating: .empty, count: 8)
            footer.diskType = .dynamic
            try pwrite(h.serialized(), at: footer.dataOffset)
            header = h
            try writeFooters()
            parentImage = nil
            parentResolved = true
            return
        }
        let parent = try VHDImage(path: newParent)
        let entries = Self.locatorData(child: path, parent: newParent)
        var next = footerOffset
        var locators = Array(repeating: VHDParentLocator.empty, count: 8)
        var relocated: [(UInt64, [UInt8])] = []
        for (i, (code, data)) in entries.enumerated() {
            let space = UInt64(max(512, (data.count + 511) / 512 * 512))
            let old = h.locators.first { $0.code == code.rawValue }
            let offset: UInt64
            if let old, old.reservedBytes >= UInt64(data.count), old.dataOffset >= footer.dataOffset + 1024 {
                offset = old.dataOffset
            } else {
                offset = next
                next += space
            }
            locators[i] = VHDParentLocator(
                code: code.rawValue, dataSpace: UInt32(max(space, old?.reservedBytes ?? 0)),
                dataLength: UInt32(data.count), dataOffset: offset)
            relocated.append((offset, data + [UInt8](repeating: 0, count: Int(space) - data.count)))
        }
        if next > footerOffset {
            // Locators that no longer fit move past the data: the footer goes out first.
            try pwrite(footer.serialized(), at: next)
            footerOffset = next
        }
        for (offset, bytes) in relocated {
            try pwrite(Array(bytes.prefix(Int(min(UInt64(bytes.count), 4096)))), at: offset)
        }
        h.locators = locators
        h.parentUUID = parent.footer.uuid
        h.parentTimestamp = Self.modificationStamp(newParent)
        h.parentName = (newParent as NSString).lastPathComponent
        footer.diskType = .differencing
        try pwrite(h.serialized(), at: footer.dataOffset)
        header = h
        try writeFooters()
        parentImage = nil
        parentResolved = false
    }

    static func modificationStamp(_ path: String) -> UInt32 {
        let date = (try? FileManager.default.attributesOfItem(atPath: path)[.modificationDate] as? Date) ?? Date()
        return VHD.timestamp(date)
    }

    /// The three locators vhd-util writes: MACX (file:// URL, UTF-8) and W2RU with the path relative
    /// to the child's folder, W2KU with the absolute path (UTF-16LE).
    static func locatorData(child: String, parent: String) -> [(VHD.PlatformCode, [UInt8])] {
        let relative = relativePath(from: (child as NSString).deletingLastPathComponent, to: parent)
        func utf16le(_ s: String) -> [UInt8] { s.utf16.flatMap { [UInt8($0 & 0xff), UInt8($0 >> 8)] } }
        return [(.macx, Array("file://\(relative)".utf8)), (.w2ru, utf16le(relative)), (.w2ku, utf16le(parent))]
    }

    static func relativePath(from directory: String, to file: String) -> String {
        let from = URL(fileURLWithPath: directory).standardizedFileURL.pathComponents
        let to = URL(fileURLWithPath: file).standardizedFileURL.pathComponents
        var common = 0
        while common < min(from.count, to.count - 1), from[common] == to[common] { common += 1 }
        let ups = Array(repeating: "..", count: from.count - common)
        let rest = Array(to[common...])
        return ups.isEmpty ? "./" + rest.joined(separator: "/") : (ups + rest).joined(separator: "/")
    }
}

/// A file descriptor closed once, when its owner releases it.
final class OwnedDescriptor {
    let fd: Int32
    init(_ fd: Int32) { self.fd = fd }
    deinit { Glibc.close(fd) }
}
