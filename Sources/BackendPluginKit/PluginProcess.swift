import Foundation
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// Why a plug-in process stopped answering: the connection-level failures every call can meet.
enum PluginProcessFailure: Error, Sendable {
    /// No answer before the deadline; the process was killed.
    case timedOut(seconds: Double)
    /// The process ended (its exit status, or 128 + signal).
    case exited(status: Int32)
    /// It could not be started.
    case spawnFailed(errno: Int32)
}

/// One running plug-in executable: its pipes, a line reader with deadlines, and the tail of its
/// standard error. Calls are serialized; every blocking wait is bounded by a deadline, after
/// which the process is killed.
final class PluginProcess: @unchecked Sendable {
    let executable: String
    private let pid: pid_t
    private let input: Int32
    private let output: Int32
    private let errors: Int32
    private let lock = NSLock()
    private var pending: [UInt8] = []
    private var errorTail: [UInt8] = []
    private var exitStatus: Int32?
    private var pipesClosed = false

    /// Starts `executable` with no arguments, its stdin, stdout and stderr on pipes.
    init(executable: String) throws(PluginProcessFailure) {
        Self.ignoreBrokenPipes
        var toChild: [Int32] = [-1, -1], fromChild: [Int32] = [-1, -1], errChild: [Int32] = [-1, -1]
        guard pipe(&toChild) == 0, pipe(&fromChild) == 0, pipe(&errChild) == 0 else { throw .spawnFailed(errno: errno) }
        for fd in toChild + fromChild + errChild { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, toChild[0], 0)
        posix_spawn_file_actions_adddup2(&actions, fromChild[1], 1)
        posix_spawn_file_actions_adddup2(&actions, errChild[1], 2)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // The child starts with default signal handling: vmsnap ignores SIGPIPE, the plug-in must not inherit that.
        var defaults = sigset_t()
        sigemptyset(&defaults)
        sigaddset(&defaults, SIGPIPE)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attributes, &empty)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
        var child: pid_t = 0
        let argv: [UnsafeMutablePointer<CChar>?] = [strdup(executable), nil]
        defer { argv.forEach { free($0) } }
        let rc = posix_spawn(&child, executable, &actions, &attributes, argv, environ)
        close(toChild[0])
        close(fromChild[1])
        close(errChild[1])
        guard rc == 0 else {
            close(toChild[1])
            close(fromChild[0])
            close(errChild[0])
            throw .spawnFailed(errno: rc)
        }
        self.executable = executable
        pid = child
        input = toChild[1]
        output = fromChild[0]
        errors = errChild[0]
    }

    deinit { stop() }

    private static let ignoreBrokenPipes: Void = { signal(SIGPIPE, SIG_IGN) }()

    /// The last lines the plug-in wrote to stderr, joined for a message.
    var lastErrorOutput: String {
        lock.withLock {
            let lines = String(decoding: errorTail, as: UTF8.self).split(whereSeparator: \.isNewline).map {
                $0.trimmingCharacters(in: .whitespaces)
            }
            return lines.filter { !$0.isEmpty }.suffix(6).joined(separator: "; ")
        }
    }

    var isRunning: Bool { lock.withLock { exitStatus == nil } }

    /// Writes `line` and returns answer lines one by one until `accept` returns true for one (a
    /// progress line, for which it returns false, restarts the deadline).
    func exchange(_ line: [UInt8], timeout: Double, accept: ([UInt8]) throws -> Bool) throws -> [UInt8] {
        try lock.withLock {
            if let status = exitStatus { throw PluginProcessFailure.exited(status: status) }
            do {
                try writeAll(line + [UInt8(ascii: "\n")])
                var deadline = Self.now + timeout
                while true {
                    let answer = try readLine(until: deadline, timeout: timeout)
                    if try accept(answer) { return answer }
                    deadline = Self.now + timeout
                }
            } catch let failure as PluginProcessFailure {
                if case .timedOut = failure { kill(pid, SIGKILL) }
                reapLocked(wait: true)
                throw failure
            } catch {
                // Out of protocol: the answer stream can no longer be trusted to line up.
                kill(pid, SIGKILL)
                reapLocked(wait: true)
                throw error
            }
        }
    }

    /// Closes the plug-in's input (it exits on end of input), waits briefly, then kills it.
    func stop() {
        lock.withLock {
            guard !pipesClosed else { return }
            pipesClosed = true
            close(input)
            let deadline = Self.now + 1
            while exitStatus == nil, Self.now < deadline {
                reapLocked(wait: false)
                if exitStatus == nil { usleep(2_000) }
            }
            if exitStatus == nil {
                kill(pid, SIGKILL)
                reapLocked(wait: true)
            }
            close(output)
            close(errors)
        }
    }

    // MARK: - Pipes

    private static var now: Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    private func writeAll(_ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { Glibc.write(input, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw PluginProcessFailure.exited(status: -1)  // EPIPE: the plug-in is gone
            }
            offset += n
        }
    }

    /// Reads up to the next newline on stdout, collecting stderr meanwhile.
    private func readLine(until deadline: Double, timeout: Double) throws -> [UInt8] {
        var chunk = [UInt8](repeating: 0, count: 65536)
        var stdoutOpen = true
        while true {
            if let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Array(pending[..<newline])
                pending.removeSubrange(...newline)
                return line
            }
            guard stdoutOpen else { throw PluginProcessFailure.exited(status: reapLocked(wait: true)) }
            let left = deadline - Self.now
            guard left > 0 else { throw PluginProcessFailure.timedOut(seconds: timeout) }
            var fds = [
                pollfd(fd: output, events: Int16(POLLIN), revents: 0),
                pollfd(fd: errors, events: Int16(POLLIN), revents: 0),
            ]
            let ready = poll(&fds, 2, Int32(min(left * 1000, 60_000).rounded(.up)))
            if ready < 0 {
                if errno == EINTR { continue }
                throw PluginProcessFailure.exited(status: -1)
            }
            if fds[1].revents != 0 {
                let n = read(errors, &chunk, chunk.count)
                if n > 0 {
                    errorTail += chunk[..<n]
                    if errorTail.count > 8192 { errorTail.removeFirst(errorTail.count - 8192) }
                }
            }
            if fds[0].revents != 0 {
                let n = read(output, &chunk, chunk.count)
                if n > 0 {
                    pending += chunk[..<n]
                    if pending.count > 256 << 20 { throw PluginProcessFailure.exited(status: -1) }
                } else if n == 0 {
                    stdoutOpen = false
                    drainErrors()
                }
            }
        }
    }

    /// Whatever the plug-in wrote to stderr before it died.
    private func drainErrors() {
        var chunk = [UInt8](repeating: 0, count: 8192)
        var fds = [pollfd(fd: errors, events: Int16(POLLIN), revents: 0)]
        while poll(&fds, 1, 200) > 0 {
            let n = read(errors, &chunk, chunk.count)
            guard n > 0 else { break }
            errorTail += chunk[..<n]
        }
        if errorTail.count > 8192 { errorTail.removeFirst(errorTail.count - 8192) }
    }

    @discardableResult
    private func reapLocked(wait: Bool) -> Int32 {
        if let exitStatus { return exitStatus }
        var status: Int32 = 0
        let rc = waitpid(pid, &status, wait ? 0 : WNOHANG)
        guard rc == pid else { return -1 }
        let signal = status & 0x7f
        let code = signal == 0 ? (status >> 8) & 0xff : 128 + signal
        exitStatus = code
        return code
    }
}
