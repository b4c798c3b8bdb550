import Foundation
#if canImport(Glibc)
    import Glibc
#endif

/// Unix stream sockets by path (close-on-exec), for the clients and servers vmsnap talks to.
public enum UnixSocket {
    /// A socket connected to `path`, or nil when nothing accepts there (`errno` says why).
    /// Throws for a path too long for a socket address, or no socket at all.
    public static func connect(_ path: String) throws -> Int32? {
        try withSocket(path) { fd, address, length in Glibc.connect(fd, address, length) == 0 }
    }

    /// A socket bound to `path` (the caller listens), created under `umask 077` so that only
    /// its owner may connect. Throws with the reason when the bind fails.
    public static func bind(_ path: String) throws -> Int32 {
        let old = umask(0o077)
        defer { umask(old) }
        guard let fd = try withSocket(path, { fd, address, length in Glibc.bind(fd, address, length) == 0 }) else {
            throw SnapshotError(.io, "cannot bind a socket to \(path): \(String(cString: strerror(errno)))")
        }
        return fd
    }

    private static func withSocket(
        _ path: String, _ body: (Int32, UnsafePointer<sockaddr>, socklen_t) -> Bool
    ) throws -> Int32? {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw SnapshotError(.invalidArgument, "socket path \(path) is too long for a Unix socket")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes + [0]) }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SnapshotError(.io, "cannot create a socket: \(String(cString: strerror(errno)))") }
        let done = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                body(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard done else {
            let saved = errno
            close(fd)
            errno = saved
            return nil
        }
        return fd
    }
}
