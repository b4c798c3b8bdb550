import Foundation
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// An asynchronous QMP event: its name, data and QEMU's timestamp (seconds since the epoch).
public struct QMPEvent: Sendable, Hashable {
    public var name: String
    public var data: JSONValue
    public var timestamp: Double
}

/// QEMU refused a command: its error class and description, and the command.
public struct QMPError: Error, Sendable, CustomStringConvertible {
    public var command: String
    /// QEMU's class name as sent.
    public var errorClassName: String
    public var reason: String

    public var errorClass: QMPErrorClass { QMPErrorClass(rawValue: errorClassName) ?? .unknown }

    public var description: String { "QEMU refused `\(command)`: \(reason) (\(errorClassName))" }

    /// The layer's error type: a device QEMU does not have is `notFound`, the rest `commandFailed`.
    public var snapshotError: SnapshotError {
        SnapshotError(errorClass == .deviceNotFound ? .notFound : .commandFailed, description, cause: self)
    }
}

/// The unix socket under a QMP connection: writes (with an optional file descriptor passed
/// through SCM_RIGHTS, for `getfd`) and a reader thread that turns lines into JSON values.
final class QMPSocket: @unchecked Sendable {
    let fd: Int32
    private let writeLock = NSLock()

    init(path: String, timeout: Duration) throws {
        let deadline = ContinuousClock.now + timeout
        var lastError: Int32 = 0
        while true {
            let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard s >= 0 else {
                throw SnapshotError(.io, "cannot create a socket: \(String(cString: strerror(errno)))")
            }
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(path.utf8)
            guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
                close(s)
                throw SnapshotError(
                    .invalidArgument,
                    "QMP socket path \(path) is longer than a unix socket path may be (107 bytes); use a shorter store directory"
                )
            }
            withUnsafeMutableBytes(of: &address.sun_path) { raw in
                raw.copyBytes(from: bytes)
                raw[bytes.count] = 0
            }
            let rc = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                }
            }
            if rc == 0 {
                fd = s
                return
            }
            lastError = errno
            close(s)
            guard ContinuousClock.now < deadline else {
                throw SnapshotError(
                    .io,
                    "cannot connect to QEMU's QMP socket \(path): \(String(cString: strerror(lastError))); is the domain running?"
                )
            }
            usleep(20_000)
        }
    }

    /// Writes all of `bytes`; `passing` rides along with the first byte.
    func send(_ bytes: [UInt8], passing: Int32? = nil) throws {
        try writeLock.withLock {
            var offset = 0
            if let passing {
                let space = MemoryLayout<cmsghdr>.size + 8
                let control = UnsafeMutableRawPointer.allocate(
                    byteCount: space, alignment: MemoryLayout<cmsghdr>.alignment)
                defer { control.deallocate() }
                control.initializeMemory(as: UInt8.self, repeating: 0, count: space)
                let header = control.bindMemory(to: cmsghdr.self, capacity: 1)
                header.pointee.cmsg_len = MemoryLayout<cmsghdr>.size + MemoryLayout<Int32>.size
                header.pointee.cmsg_level = SOL_SOCKET
                header.pointee.cmsg_type = Int32(SCM_RIGHTS)
                (control + MemoryLayout<cmsghdr>.size).storeBytes(of: passing, as: Int32.self)
                let sent = bytes.withUnsafeBytes { buffer -> Int in
                    var iov = iovec(
                        iov_base: UnsafeMutableRawPointer(mutating: buffer.baseAddress), iov_len: buffer.count)
                    return withUnsafeMutablePointer(to: &iov) { iovPointer in
                        var message = msghdr()
                        message.msg_iov = iovPointer
                        message.msg_iovlen = 1
                        message.msg_control = control
                        message.msg_controllen = space
                        return sendmsg(fd, &message, Int32(MSG_NOSIGNAL))
                    }
                }
                guard sent > 0 else {
                    throw SnapshotError(.io, "cannot send to QEMU's QMP socket: \(String(cString: strerror(errno)))")
                }
                offset = sent
            }
            while offset < bytes.count {
                let n = bytes[offset...].withUnsafeBytes {
                    Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL))
                }
                if n < 0, errno == EINTR { continue }
                guard n > 0 else {
                    throw SnapshotError(
                        .io, "cannot send to QEMU's QMP socket: \(String(cString: strerror(errno))); did QEMU exit?")
                }
                offset += n
            }
        }
    }

    /// Starts the reader: every line QEMU sends becomes a value of the stream, which ends when
    /// the connection closes.
    func startReading() -> AsyncStream<JSONValue> {
        let (stream, continuation) = AsyncStream<JSONValue>.makeStream(bufferingPolicy: .unbounded)
        let fd = self.fd
        Thread.detachNewThread {
            var pending: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 1 << 16)
            let decoder = JSONDecoder()
            while true {
                let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n < 0, errno == EINTR { continue }
                guard n > 0 else { break }
                pending.append(contentsOf: chunk[0..<n])
                while let newline = pending.firstIndex(of: 10) {
                    let line = Data(pending[..<newline])
                    pending.removeSubrange(...newline)
                    if let value = try? decoder.decode(JSONValue.self, from: line) { continuation.yield(value) }
                }
            }
            continuation.finish()
        }
        return stream
    }

    func shutdownBoth() { shutdown(fd, Int32(SHUT_RDWR)) }

    deinit { close(fd) }
}

/// A QMP connection: the greeting and capabilities handshake, typed commands with timeouts,
/// replies matched by id, and events kept in order for waiting and streaming.
public actor QMPClient {
    private let socket: QMPSocket
    private var nextID = 0
    private var pending: [String: (command: String, continuation: CheckedContinuation<JSONValue, any Error>)] = [:]
    private var events: [QMPEvent] = []
    private var waiters:
        [Int: (
            since: Int, name: String, predicate: @Sendable (QMPEvent) -> Bool,
            continuation: CheckedContinuation<QMPEvent, any Error>
        )] = [:]
    private var nextWaiter = 0
    /// Timeout timers of commands and event waits, cancelled as soon as they are answered.
    private var commandTimers: [String: Task<Void, Never>] = [:]
    private var waiterTimers: [Int: Task<Void, Never>] = [:]
    private var subscribers: [AsyncStream<QMPEvent>.Continuation] = []
    private var greetingWaiter: CheckedContinuation<JSONValue, any Error>?
    private var closedReason: String?
    /// QEMU's greeting (`{"QMP": {"version": ...}}`).
    public private(set) var greeting: JSONValue = .null

    private init(socket: QMPSocket) { self.socket = socket }

    /// Connects to the QMP socket at `path` (waiting up to `timeout` for QEMU to create it),
    /// reads the greeting and negotiates capabilities.
    public static func connect(path: String, timeout: Duration = .seconds(10)) async throws -> QMPClient {
        let socket = try QMPSocket(path: path, timeout: timeout)
        let client = QMPClient(socket: socket)
        let stream = socket.startReading()
        Task {
            for await message in stream { await client.route(message) }
            await client.connectionClosed()
        }
        let greeting = try await client.awaitGreeting(timeout: timeout)
        guard greeting["QMP"] != nil else {
            throw SnapshotError(
                .commandFailed, "\(path) did not greet like QMP (got \(greeting)); is it QEMU's QMP socket?")
        }
        try await client.run(QMP.Capabilities())
        return client
    }

    private func awaitGreeting(timeout: Duration) async throws -> JSONValue {
        if greeting != .null { return greeting }
        if let closedReason { throw SnapshotError(.commandFailed, closedReason) }
        Task { [weak self] in
            try? await Task.sleep(for: timeout)
            await self?.failGreeting("QEMU sent no QMP greeting within \(timeout)")
        }
        return try await withCheckedThrowingContinuation { greetingWaiter = $0 }
    }

    private func failGreeting(_ why: String) {
        greetingWaiter?.resume(throwing: SnapshotError(.commandFailed, why))
        greetingWaiter = nil
    }

    private func route(_ message: JSONValue) {
        if message["QMP"] != nil {
            greeting = message
            greetingWaiter?.resume(returning: message)
            greetingWaiter = nil
        } else if let name = message["event"]?.string {
            let ts = message["timestamp"]
            let event = QMPEvent(
                name: name, data: message["data"] ?? .null,
                timestamp: (ts?["seconds"]?.double ?? 0) + (ts?["microseconds"]?.double ?? 0) / 1e6)
            events.append(event)
            for s in subscribers { s.yield(event) }
            for (key, waiter) in waiters where waiter.name == event.name && waiter.predicate(event) {
                waiters[key] = nil
                waiterTimers.removeValue(forKey: key)?.cancel()
                waiter.continuation.resume(returning: event)
            }
        } else if let id = message["id"]?.string, let entry = pending.removeValue(forKey: id) {
            commandTimers.removeValue(forKey: id)?.cancel()
            if let error = message["error"] {
                entry.continuation.resume(
                    throwing: QMPError(
                        command: entry.command, errorClassName: error["class"]?.string ?? "GenericError",
                        reason: error["desc"]?.string ?? "\(error)"))
            } else {
                entry.continuation.resume(returning: message["return"] ?? .null)
            }
        }
    }

    private func connectionClosed() {
        let why = "QEMU closed the QMP connection (did it exit?)"
        closedReason = why
        for (_, entry) in pending {
            entry.continuation.resume(
                throwing: SnapshotError(.commandFailed, "\(why) while `\(entry.command)` was waiting for its reply"))
        }
        pending = [:]
        commandTimers.values.forEach { $0.cancel() }
        commandTimers = [:]
        waiterTimers.values.forEach { $0.cancel() }
        waiterTimers = [:]
        for (_, waiter) in waiters {
            waiter.continuation.resume(
                throwing: SnapshotError(.commandFailed, "\(why) while waiting for event \(waiter.name)"))
        }
        waiters = [:]
        for s in subscribers { s.finish() }
        subscribers = []
        failGreeting(why)
    }

    /// True once QEMU has closed the connection.
    public var isClosed: Bool { closedReason != nil }

    /// Runs a command and returns its `return` value; throws `QMPError` with QEMU's error class
    /// and description when QEMU refuses it. `passing` is sent along as a file descriptor.
    @discardableResult
    public func execute(
        _ command: String, _ arguments: JSONValue? = nil, passing fd: Int32? = nil, timeout: Duration = .seconds(60)
    ) async throws -> JSONValue {
        if let closedReason { throw SnapshotError(.commandFailed, "\(closedReason); cannot run `\(command)`") }
        nextID += 1
        let id = "vmsnap-\(nextID)"
        var message: [String: JSONValue] = ["execute": .string(command), "id": .string(id)]
        if let arguments { message["arguments"] = arguments }
        let line = Array((JSONValue.object(message).description + "\n").utf8)
        commandTimers[id] = Task { [weak self] in
            guard (try? await Task.sleep(for: timeout)) != nil else { return }
            await self?.expire(id, after: timeout)
        }
        return try await withCheckedThrowingContinuation { continuation in
            pending[id] = (command, continuation)
            do { try socket.send(line, passing: fd) } catch {
                pending[id] = nil
                continuation.resume(throwing: error)
            }
        }
    }

    private func expire(_ id: String, after timeout: Duration) {
        commandTimers[id] = nil
        guard let entry = pending.removeValue(forKey: id) else { return }
        entry.continuation.resume(
            throwing: SnapshotError(.commandFailed, "QEMU did not answer `\(entry.command)` within \(timeout)"))
    }

    /// How many events have arrived so far: a mark to wait for events after it.
    public var eventMark: Int { events.count }

    /// Every event since `mark`.
    public func events(since mark: Int = 0) -> [QMPEvent] { Array(events[min(mark, events.count)...]) }

    /// Waits for the first event named `name` after `mark` that `predicate` accepts.
    public func waitForEvent(
        _ name: String, since mark: Int, timeout: Duration = .seconds(60),
        where predicate: @escaping @Sendable (QMPEvent) -> Bool = { _ in true }
    ) async throws -> QMPEvent {
        if let hit = events[min(mark, events.count)...].first(where: { $0.name == name && predicate($0) }) {
            return hit
        }
        if let closedReason { throw SnapshotError(.commandFailed, "\(closedReason) while waiting for event \(name)") }
        nextWaiter += 1
        let key = nextWaiter
        waiterTimers[key] = Task { [weak self] in
            guard (try? await Task.sleep(for: timeout)) != nil else { return }
            await self?.expireWaiter(key, timeout: timeout)
        }
        return try await withCheckedThrowingContinuation { continuation in
            waiters[key] = (mark, name, predicate, continuation)
        }
    }

    private func expireWaiter(_ key: Int, timeout: Duration) {
        waiterTimers[key] = nil
        guard let waiter = waiters.removeValue(forKey: key) else { return }
        waiter.continuation.resume(
            throwing: SnapshotError(.commandFailed, "QEMU sent no \(waiter.name) event within \(timeout)"))
    }

    /// Events from now on, as a stream that ends when the connection closes.
    public func eventStream() -> AsyncStream<QMPEvent> {
        let (stream, continuation) = AsyncStream<QMPEvent>.makeStream()
        if closedReason != nil { continuation.finish() } else { subscribers.append(continuation) }
        return stream
    }

    /// Closes the connection.
    public func close() { socket.shutdownBoth() }

    /// Closes the connection from anywhere, at once (for `defer`).
    public nonisolated func closeNow() { socket.shutdownBoth() }
}

// MARK: - Typed commands

/// QEMU's run state (`query-status`).
public struct QEMUStatus: Sendable, Hashable {
    public var running: Bool
    public var status: String
}

/// One block device (`query-block`): the device id, its top node and the file it has open.
public struct QEMUBlockDevice: Sendable, Hashable {
    public var device: String
    public var nodeName: String?
    public var file: String?
    /// The guest device the disk is attached to (a QOM path).
    public var qdev: String?
    /// The active layer's format driver (qcow2, raw) and its size in bytes.
    public var format: String? = nil
    public var virtualSize: UInt64? = nil
    /// The image the active layer reads through, if any.
    public var backing: String? = nil
    /// Names of the internal snapshots in the open image.
    public var internalSnapshots: [String] = []
    /// Every image of the open chain, the active layer first.
    public var chain: [String] = []
}

/// Migration progress (`query-migrate`).
public struct MigrationInfo: Sendable, Hashable {
    public var status: String
    public var transferred: UInt64
    public var total: UInt64
    public var remaining: UInt64
    public var downtimeMs: Double?
    public var errorDescription: String?
}

extension QMPClient {
    public func status() async throws -> QEMUStatus { try await run(QMP.QueryStatus()) }
    public func stop() async throws { try await run(QMP.Stop()) }
    public func cont() async throws { try await run(QMP.Cont()) }
    public func blockDevices() async throws -> [QEMUBlockDevice] { try await run(QMP.QueryBlock()) }

    /// Runs actions as one QMP `transaction`: all happen or none does.
    public func transaction(_ actions: [QMP.TransactionAction]) async throws {
        try await run(QMP.Transaction(actions: actions))
    }

    /// Hands QEMU an open file under `name` (SCM_RIGHTS); QEMU keeps its own copy.
    public func passFile(_ fd: Int32, name: String) async throws { try await run(QMP.GetFD(name: name), passing: fd) }

    public func migrationInfo() async throws -> MigrationInfo { try await run(QMP.QueryMigrate()) }

    public func setMigrationCapabilities(_ capabilities: [String: Bool]) async throws {
        try await run(QMP.MigrateSetCapabilities(capabilities: capabilities))
    }

    /// Waits for a job (`job-id`) to conclude, then dismisses it; throws with the job's error.
    /// Polls `query-jobs` between JOB_STATUS_CHANGE events (or every 500 ms at most).
    public func waitForJob(
        _ id: String, timeout: Duration = .seconds(600), progress: (@Sendable (UInt64, UInt64) -> Void)? = nil
    ) async throws {
        let deadline = ContinuousClock.now + timeout
        while true {
            let mark = eventMark
            guard let job = try await run(QMP.QueryJobs()).first(where: { $0.id == id }) else {
                throw SnapshotError(.commandFailed, "QEMU job \(id) disappeared before it concluded")
            }
            if let done = job.done, let total = job.total { progress?(done, total) }
            if job.status == "concluded" {
                try await run(QMP.JobDismiss(id: id))
                if let error = job.error { throw SnapshotError(.commandFailed, "QEMU job \(id) failed: \(error)") }
                return
            }
            guard ContinuousClock.now < deadline else {
                throw SnapshotError(.commandFailed, "QEMU job \(id) did not finish within \(timeout)")
            }
            _ = try? await waitForEvent("JOB_STATUS_CHANGE", since: mark, timeout: .milliseconds(500)) {
                $0.data["id"]?.string == id
            }
        }
    }
}
