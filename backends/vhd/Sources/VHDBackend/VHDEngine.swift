import Foundation
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// Whole-file operations of the native engine: create, snapshot, coalesce, rebase, check.
/// Each one that changes an existing file can run again after a crash with the same result.
public enum VHDEngine {
    /// Creates a dynamic disk of `size` bytes (rounded up to whole sectors).
    public static func createDynamic(_ path: String, size: UInt64, blockSize: UInt32 = VHD.defaultBlockSize) throws {
        let size = (size + 511) / 512 * 512
        guard size > 0, size <= 2040 << 30 else {
            throw SnapshotError(.invalidArgument, "a VHD holds 1 byte to 2040 GiB; \(size) bytes asked")
        }
        let entries = UInt32((size + UInt64(blockSize) - 1) / UInt64(blockSize))
        let header = VHDHeader(tableOffset: 1536, maxTableEntries: entries, blockSize: blockSize)
        let footer = VHDFooter(
            size: size, type: .dynamic, uuid: newUUID(), timestamp: VHD.timestamp(Date()), dataOffset: 512)
        try writeNew(path, footer: footer, header: header, locators: [])
    }

    /// Creates `child`, a differencing disk that reads through `parent` (which is not changed).
    public static func createDifferencing(_ child: String, parent: String) throws {
        let p = try VHDImage(path: parent)
        let blockSize = p.header?.blockSize ?? VHD.defaultBlockSize
        let entries = UInt32((p.virtualSize + UInt64(blockSize) - 1) / UInt64(blockSize))
        var header = VHDHeader(tableOffset: 1536, maxTableEntries: entries, blockSize: blockSize)
        header.parentUUID = p.footer.uuid
        header.parentTimestamp = VHDImage.modificationStamp(parent)
        header.parentName = (parent as NSString).lastPathComponent
        let footer = VHDFooter(
            size: p.virtualSize, type: .differencing, uuid: newUUID(), timestamp: VHD.timestamp(Date()), dataOffset: 512
        )
        try writeNew(
            child, footer: footer, header: header, locators: VHDImage.locatorData(child: child, parent: parent),
            like: parent)
    }

    /// Lays out a new file: footer copy, header, BAT, locator data, footer. Written to a temporary
    /// name and renamed, so `path` never exists half-made.
    /// `like`: the image whose mode, owner and group the new file takes.
    static func writeNew(
        _ path: String, footer: VHDFooter, header: VHDHeader, locators: [(VHD.PlatformCode, [UInt8])],
        like: String? = nil
    ) throws {
        guard !NewFile.exists(path) else {
            throw SnapshotError(.alreadyExists, "\(path) already exists")
        }
        var header = header
        let batBytes = (Int(header.maxTableEntries) * 4 + 511) / 512 * 512
        var offset = header.tableOffset + UInt64(batBytes)
        var blob: [(UInt64, [UInt8])] = []
        // The footer says creator "tap" 1.3, which promises blktap's batmap right after the BAT:
        // written empty (no block known full), which is valid, and stays valid (a full block
        // never stops being full).
        let batmap = VHDBatmap(entries: header.maxTableEntries, virtualSize: footer.currentSize, at: offset)
        blob.append((offset, batmap.serialized()))
        offset += UInt64(batmap.regionBytes)
        for (i, (code, data)) in locators.prefix(8).enumerated() {
            let space = max(512, (data.count + 511) / 512 * 512)
            header.locators[i] = VHDParentLocator(
                code: code.rawValue, dataSpace: UInt32(space), dataLength: UInt32(data.count), dataOffset: offset)
            blob.append((offset, data + [UInt8](repeating: 0, count: space - data.count)))
            offset += UInt64(space)
        }
        let temp = path + ".vmsnap-new"
        unlink(temp)
        let fd = Glibc.open(temp, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SnapshotError(.io, "cannot create \(temp): \(String(cString: strerror(errno)))") }
        defer { Glibc.close(fd) }
        if let like {
            do { try NewFile.match(fd, like: like, path: path) } catch {
                unlink(temp)
                throw error
            }
        }
        func put(_ bytes: [UInt8], _ at: UInt64) throws {
            let n = bytes.withUnsafeBytes { Glibc.pwrite(fd, $0.baseAddress, bytes.count, off_t(at)) }
            guard n == bytes.count else {
                unlink(temp)
                throw SnapshotError(.io, "cannot write \(temp): \(String(cString: strerror(errno)))")
            }
        }
        let f = footer.serialized()
        try put(f, 0)
        try put(header.serialized(), footer.dataOffset)
        try put(
            [UInt8](repeating: 0xff, count: Int(header.maxTableEntries) * 4)
                + [UInt8](repeating: 0, count: batBytes - Int(header.maxTableEntries) * 4), header.tableOffset)
        for (at, bytes) in blob { try put(bytes, at) }
        try put(f, offset)
        guard fsync(fd) == 0, Glibc.rename(temp, path) == 0 else {
            unlink(temp)
            throw SnapshotError(.io, "cannot finish \(path): \(String(cString: strerror(errno)))")
        }
    }

    /// Copies every sector `child` itself holds into `parent` (vhd-util coalesce). Running it
    /// again writes the same bytes again.
    public static func coalesce(child: String, into parent: String, progress: ((UInt64) -> Void)? = nil) throws {
        let c = try VHDImage(path: child)
        let p = try VHDImage(path: parent, writable: true)
        guard c.type == .differencing, try c.parentPath() == URL(fileURLWithPath: parent).standardizedFileURL.path
        else {
            throw SnapshotError(.invalidArgument, "\(child) does not read through \(parent)")
        }
        try copyRuns(try c.ownedRuns(), from: c, to: p, progress: progress)
        try p.sync()
    }

    /// Makes `child` read through `newParent` (nil: standalone) instead of `oldParent`, first
    /// copying into it the sectors `oldParent` holds and `child` does not. Idempotent: after the
    /// switch there is nothing left to copy.
    public static func rebase(_ child: String, from oldParent: String, to newParent: String?) throws {
        let c = try VHDImage(path: child, writable: true)
        if c.type == .differencing, try c.parentPath() == URL(fileURLWithPath: oldParent).standardizedFileURL.path {
            let old = try VHDImage(path: oldParent)
            let missing = subtract(try old.ownedRuns(), try c.ownedRuns())
            try copyRuns(missing, from: old, to: c)
        }
        try c.setParent(newParent)
        try c.sync()
    }

    /// Copies runs of sectors the source layer holds (so reads never reach its parents), in pieces
    /// of at most 4 MiB.
    static func copyRuns(
        _ runs: [(first: UInt64, count: UInt64)], from source: VHDImage, to target: VHDImage,
        progress: ((UInt64) -> Void)? = nil
    ) throws {
        let chunk: UInt64 = 8192
        var copied: UInt64 = 0
        for run in runs {
            var s = run.first
            while s < run.first + run.count {
                let n = min(chunk, run.first + run.count - s)
                var buffer = [UInt8](repeating: 0, count: Int(n) * 512)
                try source.readSectors(s, Int(n), into: &buffer, at: 0)
                try target.writeSectors(s, buffer)
                s += n
                copied += n * 512
                progress?(copied)
            }
        }
    }

    /// Runs of `a` not covered by `b` (both sorted, non-overlapping).
    static func subtract(_ a: [(first: UInt64, count: UInt64)], _ b: [(first: UInt64, count: UInt64)]) -> [(
        first: UInt64, count: UInt64
    )] {
        var out: [(first: UInt64, count: UInt64)] = []
        var j = 0
        for run in a {
            var start = run.first
            let end = run.first + run.count
            while j < b.count, b[j].first + b[j].count <= start { j += 1 }
            var k = j
            while start < end {
                guard k < b.count, b[k].first < end else {
                    out.append((start, end - start))
                    break
                }
                if b[k].first > start { out.append((start, b[k].first - start)) }
                start = max(start, b[k].first + b[k].count)
                k += 1
            }
        }
        return out
    }

    /// Checks an image (and its parent chain) the way `vhd-util check` does; returns every defect
    /// found, each naming the file and offset. Empty means the image is sound.
    public static func check(_ path: String) -> [String] {
        var problems: [String] = []
        var current: String? = path
        var seen: Set<String> = []
        while let p = current {
            guard seen.insert(URL(fileURLWithPath: p).resolvingSymlinksInPath().path).inserted, seen.count < 256 else {
                problems.append("\(p): the parent chain loops")
                break
            }
            do {
                let image = try VHDImage(path: p)
                if let h = image.header {
                    for (i, l) in h.locators.enumerated() where l.code != 0 {
                        if VHD.PlatformCode(rawValue: l.code) == nil {
                            problems.append(
                                String(
                                    format: "%@: parent locator %d (offset %llu) has unknown platform code 0x%08x", p,
                                    i, image.footer.dataOffset + 576 + UInt64(i) * 24, l.code))
                        }
                        if l.dataOffset + UInt64(l.dataLength) > image.footerOffset
                            || l.dataOffset < image.footer.dataOffset + 1024
                        {
                            problems.append(
                                "\(p): parent locator \(i) data (offset \(l.dataOffset), \(l.dataLength) bytes) lies outside the file's data area"
                            )
                        }
                    }
                }
                _ = try image.ownedRuns()
                current = image.type == .differencing ? try image.parentPath() : nil
                if image.type == .differencing { _ = try image.parent() }
            } catch {
                problems.append(String(describing: error))
                break
            }
        }
        return problems
    }
}
