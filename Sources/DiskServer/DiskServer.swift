import Foundation
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// vmsnap's disk server: one disk's data, through its backend's engine, as an NBD export on a
/// Unix socket for a hypervisor that cannot open the format, plus a control socket vmsnap uses
/// around storage changes (``DiskServerControl``):
/// - `status`: `ok <active path> serving|held`
/// - `hold`: flush, drop the image lock, make reads and writes wait (flushes are answered at
///   once: nothing is dirty): `ok`
/// - `reopen`: serve the layer the record names active now: `ok <path>` (held until it works)
/// - `stop`: flush and exit: `ok`
///
/// It exits on `stop`, on SIGTERM, or (with `linger`) once its last client has been gone that
/// many seconds (the hypervisor exited), or no client came within a minute (a start that failed
/// half way). Both sockets are created owner-only.
public final class DiskServer: @unchecked Sendable {
    let dataSocket: String
    let controlSocket: String
    let exportName: String
    let linger: Double?
    let disk: ServedDisk
    let log: @Sendable (String) -> Void
    private let state = NSLock()
    private var clients = 0
    private var lastLeft: Double?
    private let started = DiskServer.now()
    /// With `linger`: how long to wait for the first client (the hypervisor starting).
    static let firstClientWait = 60.0

    public init(
        dataSocket: String, controlSocket: String, exportName: String, linger: Double?,
        log: @escaping @Sendable (String) -> Void, open: @escaping () throws -> any ServedImage
    ) throws {
        self.dataSocket = dataSocket
        self.controlSocket = controlSocket
        self.exportName = exportName
        self.linger = linger
        self.log = log
        disk = try ServedDisk(open: open)
    }

    /// Listens and serves until told to stop; returns when the server should exit.
    public func run() throws {
        signal(SIGPIPE, SIG_IGN)
        let data = try Self.listen(dataSocket)
        defer { close(data) }
        let control = try Self.listen(controlSocket)
        defer { close(control) }
        defer {
            disk.finish()
            unlink(dataSocket)
            unlink(controlSocket)
        }
        while true {
            var fds = [
                pollfd(fd: data, events: Int16(POLLIN), revents: 0),
                pollfd(fd: control, events: Int16(POLLIN), revents: 0),
            ]
            let n = poll(&fds, 2, 250)
            if n < 0 && errno != EINTR { throw SnapshotError(.io, "poll: \(String(cString: strerror(errno)))") }
            if fds[0].revents & Int16(POLLIN) != 0 { acceptClient(data) }
            if fds[1].revents & Int16(POLLIN) != 0, !answerControl(control) { return }
            if lingeredOut() { return }
        }
    }

    private func lingeredOut() -> Bool {
        guard let linger else { return false }
        state.lock()
        defer { state.unlock() }
        guard clients == 0 else { return false }
        guard let left = lastLeft else { return Self.now() - started >= Self.firstClientWait }
        return Self.now() - left >= linger
    }

    static func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

    private func acceptClient(_ listener: Int32) {
        let fd = accept(listener, nil, nil)
        guard fd >= 0 else { return }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        state.lock()
        clients += 1
        state.unlock()
        let session = NBDSession(io: SocketIO(fd: fd), disk: disk, exportName: exportName, log: log)
        let thread = Thread { [self] in
            session.run()
            close(fd)
            state.lock()
            clients -= 1
            lastLeft = Self.now()
            state.unlock()
        }
        thread.start()
    }

    /// One control request; false when the server should exit.
    private func answerControl(_ listener: Int32) -> Bool {
        let fd = accept(listener, nil, nil)
        guard fd >= 0 else { return true }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        defer { close(fd) }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while line.count < 64, read(fd, &byte, 1) == 1, byte != 10 { line.append(byte) }
        let command = String(decoding: line, as: UTF8.self)
        var keepGoing = true
        let answer: String
        do {
            switch command {
            case "status":
                let s = disk.status
                answer = "ok \(s.path) \(s.held ? "held" : "serving")"
            case "hold":
                try disk.hold()
                answer = "ok"
            case "reopen":
                answer = "ok " + (try disk.reopen())
            case "stop":
                keepGoing = false
                answer = "ok"
            default:
                answer = "error unknown command '\(command)' (status, hold, reopen, stop)"
            }
        } catch let e as SnapshotError {
            answer = "error " + e.message
        } catch {
            answer = "error \(error)"
        }
        log("control: \(command): \(answer)")
        _ = try? SocketIO(fd: fd).write(Array((answer + "\n").utf8))
        return keepGoing
    }

    /// A listening Unix socket at `path`, owner-only; a stale socket there is replaced, any
    /// other file is refused.
    static func listen(_ path: String) throws -> Int32 {
        var st = stat()
        if lstat(path, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFSOCK else {
                throw SnapshotError(.conflict, "\(path) exists and is not a socket; remove it first")
            }
            unlink(path)
        }
        let fd = try UnixSocket.bind(path)
        guard Glibc.listen(fd, 8) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw SnapshotError(.io, "cannot listen on \(path): \(reason)")
        }
        return fd
    }
}
