import Foundation
import SnapshotCore

#if canImport(Glibc)
    import Glibc
#endif

/// The QEMU guest agent on its virtio-serial channel (a unix socket on the host side): JSON
/// commands, one at a time, after a `guest-sync-delimited` that discards whatever an earlier,
/// interrupted exchange left in the channel. Every wait is bounded; an agent that does not
/// answer is an error that says so, never a hang.
struct GuestAgent {
    let socketPath: String
    let timeout: Double

    /// Runs `command` and returns its `return` value.
    func execute(_ command: String, _ arguments: JSONValue? = nil) throws -> JSONValue {
        let fd = try connect()
        defer { close(fd) }
        let id = Int64.random(in: 1...Int64(Int32.max))
        try send(fd, ["execute": "guest-sync-delimited", "arguments": ["id": .int(id)]])
        // The answer to the sync follows a 0xFF byte; anything before it is stale.
        var buffer: [UInt8] = []
        let deadline = Self.now + timeout
        while true {
            let line = try readLine(fd, buffer: &buffer, until: deadline, command: "guest-sync-delimited")
            let text = line.drop { $0 == 0xFF }
            if let reply = try? JSONDecoder().decode(JSONValue.self, from: Data(text)), reply["return"]?.int == id {
                break
            }
        }
        var message: [String: JSONValue] = ["execute": .string(command)]
        if let arguments { message["arguments"] = arguments }
        try send(fd, .object(message))
        let line = try readLine(fd, buffer: &buffer, until: Self.now + timeout, command: command)
        guard let reply = try? JSONDecoder().decode(JSONValue.self, from: Data(line)) else {
            throw SnapshotError(.commandFailed, "the guest agent answered '\(command)' with something that is not JSON")
        }
        if let error = reply["error"] {
            throw SnapshotError(
                .commandFailed, "the guest agent refused '\(command)': \(error["desc"]?.string ?? "\(error)")")
        }
        return reply["return"] ?? .null
    }

    static var now: Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    private func connect() throws -> Int32 {
        guard let fd = try UnixSocket.connect(socketPath) else {
            throw SnapshotError(
                .unsupported,
                "the domain has no guest agent channel (\(socketPath): \(String(cString: strerror(errno)))); start it with this vmsnap"
            )
        }
        return fd
    }

    private func send(_ fd: Int32, _ value: JSONValue) throws {
        let bytes = Array((value.description + "\n").utf8)
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else {
                throw SnapshotError(.io, "cannot write to the guest agent: \(String(cString: strerror(errno)))")
            }
            offset += n
        }
    }

    private func readLine(_ fd: Int32, buffer: inout [UInt8], until deadline: Double, command: String) throws -> [UInt8]
    {
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            if let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Array(buffer[..<newline])
                buffer.removeSubrange(...newline)
                return line
            }
            let left = deadline - Self.now
            guard left > 0 else {
                throw SnapshotError(
                    .busy,
                    "the guest agent did not answer '\(command)' within \(Int(timeout)) s: is qemu-guest-agent running in the guest?"
                )
            }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&pfd, 1, Int32(min(left * 1000, 60_000).rounded(.up)))
            if ready < 0, errno == EINTR { continue }
            guard ready > 0 else { continue }
            let n = read(fd, &chunk, chunk.count)
            guard n > 0 else { throw SnapshotError(.io, "the guest agent channel closed during '\(command)'") }
            buffer += chunk[..<n]
        }
    }
}

extension QEMULiveDomain {
    /// Seconds the guest agent may take to answer (`VMSNAP_AGENT_TIMEOUT`, default 10).
    static var agentTimeout: Double {
        ProcessInfo.processInfo.environment["VMSNAP_AGENT_TIMEOUT"].flatMap(Double.init).map { max($0, 0.1) } ?? 10
    }

    public func freezeFilesystems() async throws -> Int {
        let agent = GuestAgent(socketPath: agentSocket ?? "", timeout: Self.agentTimeout)
        return try await Self.offPool { try agent.execute("guest-fsfreeze-freeze").int.map(Int.init) ?? 0 }
    }

    public func thawFilesystems() async throws {
        let agent = GuestAgent(socketPath: agentSocket ?? "", timeout: Self.agentTimeout)
        _ = try await Self.offPool { try agent.execute("guest-fsfreeze-thaw") }
    }

    /// Blocking agent I/O runs off the cooperative pool.
    static func offPool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global().async { continuation.resume(with: Result { try body() }) }
        }
    }
}
