import Foundation
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// Talks to a running disk server's control socket (``DiskServer``).
public enum DiskServerControl {
    /// Sends `command` and returns what follows "ok"; an "error" answer, or no server, throws.
    @discardableResult
    public static func send(_ command: String, to socketPath: String, timeout: Int = 30) throws -> String {
        guard let fd = try UnixSocket.connect(socketPath) else {
            throw SnapshotError(
                .notFound,
                "vmsnap's disk server does not answer on \(socketPath): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var limit = timeval(tv_sec: timeout, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        let io = SocketIO(fd: fd)
        try io.write(Array((command + "\n").utf8))
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while line.count < 8192, read(fd, &byte, 1) == 1, byte != 10 { line.append(byte) }
        let answer = String(decoding: line, as: UTF8.self)
        if answer == "ok" { return "" }
        if answer.hasPrefix("ok ") { return String(answer.dropFirst(3)) }
        throw SnapshotError(
            .commandFailed,
            "vmsnap's disk server on \(socketPath) refused '\(command)': "
                + (answer.hasPrefix("error ") ? String(answer.dropFirst(6)) : answer.isEmpty ? "no answer" : answer))
    }
}
