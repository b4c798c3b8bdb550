import Foundation
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// The image a disk server serves, with the two states vmsnap switches between: serving (the
/// active file locked the way hypervisors lock images, so the backend sees the disk in use) and
/// held (every write so far flushed, the lock dropped, requests waiting), during which vmsnap
/// changes the storage offline; a reopen then serves the layer the record names active.
final class ServedDisk: @unchecked Sendable {
    private let condition = NSCondition()
    private var image: any ServedImage
    private var held = false
    private var lockFD: Int32 = -1
    /// Opens the disk's active layer as its record names it now.
    private let open: () throws -> any ServedImage
    let size: UInt64

    init(open: @escaping () throws -> any ServedImage) throws {
        self.open = open
        let image = try open()
        self.image = image
        size = image.size
        try lock(image.activePath)
    }

    /// Runs one request against the image, after any hold ends.
    func perform<T>(_ body: (any ServedImage) throws -> T) throws -> T {
        condition.lock()
        defer { condition.unlock() }
        while held { condition.wait() }
        return try body(image)
    }

    /// A flush: while held there is nothing to flush (the hold flushed, and no write has been
    /// taken since), so it is answered at once; a hypervisor flushing its disks while vmsnap
    /// holds one (QEMU's memory save does) never waits for the hold.
    func flush() throws {
        condition.lock()
        defer { condition.unlock() }
        if !held { try image.flush() }
    }

    var status: (path: String, held: Bool) {
        condition.lock()
        defer { condition.unlock() }
        return (image.activePath, held)
    }

    /// Flushes, drops the lock and makes requests wait. Held already: nothing to do.
    func hold() throws {
        condition.lock()
        defer { condition.unlock() }
        try holdLocked()
    }

    private func holdLocked() throws {
        guard !held else { return }
        try image.flush()
        unlock()
        held = true
    }

    /// Serves the active layer the record names now (held first if it was not). A layer that
    /// cannot be opened leaves the disk held: requests wait rather than reach a stale file.
    func reopen() throws -> String {
        condition.lock()
        defer { condition.unlock() }
        try holdLocked()
        let next = try open()
        guard next.size == size else {
            throw SnapshotError(
                .conflict,
                "\(next.activePath) is \(next.size) bytes and the served disk \(size); the disk stays held")
        }
        try lock(next.activePath)
        image = next
        held = false
        condition.broadcast()
        return next.activePath
    }

    /// Flushes before the server exits.
    func finish() {
        condition.lock()
        defer { condition.unlock() }
        if !held { try? image.flush() }
        unlock()
    }

    // MARK: - The image lock

    /// A shared lock on the bytes hypervisors lock (FileLockProbe.imageLockBytes): any probe
    /// for a write lock there sees the disk in use. Refused when another process holds one for
    /// longer than a second: a lock seen for a moment only is waited out, since a process that
    /// has just closed the image (the backend that made the layer) may have a child between
    /// fork and exec that still shares the descriptor, and with it the lock, until the exec.
    private func lock(_ path: String) throws {
        var waited = 0
        while FileLockProbe.isLocked(path, range: FileLockProbe.imageLockBytes) {
            guard waited < 100 else {
                throw SnapshotError(
                    .inUse, "\(path) is in use by another process (it holds the image lock); it cannot be served")
            }
            waited += 1
            usleep(10_000)
        }
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { throw SnapshotError(.io, "\(path): cannot open: \(String(cString: strerror(errno)))") }
        var l = flock()
        l.l_type = Int16(F_RDLCK)
        l.l_whence = Int16(SEEK_SET)
        l.l_start = off_t(FileLockProbe.imageLockBytes.lowerBound)
        l.l_len = off_t(FileLockProbe.imageLockBytes.count)
        let F_OFD_SETLK: Int32 = 37  // <fcntl.h>, Linux-specific
        guard fcntl(fd, F_OFD_SETLK, &l) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw SnapshotError(.inUse, "\(path): cannot take the image lock: \(reason)")
        }
        unlock()
        lockFD = fd
    }

    private func unlock() {
        if lockFD >= 0 { close(lockFD) }
        lockFD = -1
    }
}
