import Foundation
#if canImport(Glibc)
    import Glibc
#endif

/// An exclusive lock on one disk across processes (flock on a file in the store's locks/ folder),
/// so two vmsnap processes never work on the same disk at once.
public final class DiskLock: @unchecked Sendable {
    private let fd: Int32
    public let path: String

    /// Takes the lock for `diskID`, waiting up to `timeout` seconds for another vmsnap to finish.
    public init(store: MetadataStore, diskID: String, timeout: TimeInterval = 30) throws {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in diskID.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
        path = (store.directory as NSString).appendingPathComponent("locks/\(String(hash, radix: 16)).lock")
        // The descriptor stays local until the lock is held: once every stored property is set, a
        // throw runs deinit, and a close here as well would close whatever took the number since.
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else {
            throw SnapshotError(.io, "cannot open lock file \(path): \(String(cString: strerror(errno)))")
        }
        let deadline = Date().addingTimeInterval(timeout)
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            guard errno == EWOULDBLOCK || errno == EINTR, Date() < deadline else {
                close(fd)
                throw SnapshotError(
                    .busy, "another vmsnap is working on disk \(diskID) (lock \(path)); try again when it has finished")
            }
            usleep(20_000)
        }
        self.fd = fd
    }

    deinit {
        flock(fd, LOCK_UN)
        close(fd)
    }
}
