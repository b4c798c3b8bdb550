import Foundation
import SnapshotCore

/// Serves any `DiskSnapshotBackend` as a plug-in executable: reads requests from stdin, answers
/// on stdout, one JSON object per line (docs/plugin-protocol.md). A plug-in's `main.swift` is
///
/// ```swift
/// try await PluginServer(kind: "mystore") { settings in MyBackend(settings: settings) }.run()
/// ```
///
/// The backend is made once `configure` has delivered the (already validated) settings.
public struct PluginServer: Sendable {
    public let kind: BackendKind
    public let version: String
    let make: @Sendable ([String: String]) throws -> any DiskSnapshotBackend

    public init(
        kind: BackendKind, version: String = "1.0",
        make: @escaping @Sendable ([String: String]) throws -> any DiskSnapshotBackend
    ) {
        self.kind = kind
        self.version = version
        self.make = make
    }

    struct Head: Decodable {
        var id: Int?
        var method: String
    }

    struct Params<P: Decodable>: Decodable { var params: P }

    /// Answers requests until stdin ends.
    public func run() async throws {
        var backend = try make([:])
        var reader = LineReader(fd: 0)
        while let line = reader.next() {
            let answer: Data
            do {
                let head = try PluginCoding.decoder.decode(Head.self, from: line)
                do {
                    guard let method = PluginMethod(rawValue: head.method) else {
                        throw SnapshotError(.unsupported, "this plug-in has no method '\(head.method)'")
                    }
                    if method == .configure {
                        let settings = try Self.params(SettingsParams.self, line).settings
                        backend = try make(settings)
                        answer = try Self.result(head.id, Empty())
                    } else {
                        answer = try await dispatch(method, id: head.id, line: line, backend: backend)
                    }
                } catch {
                    answer = Self.error(head.id, error)
                }
            } catch {
                answer = Self.error(nil, SnapshotError(.invalidArgument, "not a request: \(error)"))
            }
            FileHandle.standardOutput.write(answer + Data([UInt8(ascii: "\n")]))
        }
    }

    private static func params<P: Decodable>(_ type: P.Type, _ line: Data) throws -> P {
        do { return try PluginCoding.decoder.decode(Params<P>.self, from: line).params } catch {
            throw SnapshotError(.invalidArgument, "malformed params: \(PluginBackend.decodingProblem(error))")
        }
    }

    private static func result<R: Encodable>(_ id: Int?, _ value: R) throws -> Data {
        try PluginCoding.encoder.encode(ResultAnswer(id: id, result: value))
    }

    private static func error(_ id: Int?, _ error: any Error) -> Data {
        struct Answer: Encodable {
            var id: Int?
            var error: PluginErrorBody
        }
        let body: PluginErrorBody
        if let e = error as? SnapshotError {
            body = PluginErrorBody(code: e.code.rawValue, message: e.description)
        } else {
            body = PluginErrorBody(code: SnapshotError.Code.commandFailed.rawValue, message: String(describing: error))
        }
        return (try? PluginCoding.encoder.encode(Answer(id: id, error: body)))
            ?? Data("{\"id\":null,\"error\":{\"code\":\"io\",\"message\":\"encoding failed\"}}".utf8)
    }

    private func dispatch(_ method: PluginMethod, id: Int?, line: Data, backend: any DiskSnapshotBackend) async throws
        -> Data
    {
        switch method {
        case .hello:
            let host = try Self.params(HelloParams.self, line)
            let mine = PluginAPIVersion.current
            let theirs = PluginAPIVersion(apiVersion: host.apiVersion, apiAge: host.apiAge)
            guard mine.agreed(with: theirs) != nil else {
                throw SnapshotError(.unsupported, "this plug-in speaks plug-in API \(mine); the host speaks \(theirs)")
            }
            return try Self.result(
                id, HelloResult(kind: kind, apiVersion: mine.apiVersion, apiAge: mine.apiAge, version: version))
        case .describe:
            let d = backend.descriptor
            return try Self.result(
                id,
                DescribeResult(
                    kind: kind, summary: d.summary, capabilities: d.capabilities, settings: d.settings,
                    locators: .path, liveSnapshots: d.liveSnapshots, driveFormat: d.imageFormat,
                    sourceType: d.sourceType, tools: d.tools, sharedMetadata: d.sharedMetadata,
                    reportsChanges: d.reportsChanges))
        case .configure:
            return try Self.result(id, Empty())
        case .recognizes:
            return try Self.result(
                id,
                RecognizedResult(
                    recognized: await backend.recognizes(locator: Self.params(LocatorParams.self, line).locator)))
        case .inspect:
            return try Self.result(
                id, try await backend.inspect(locator: Self.params(LocatorParams.self, line).locator))
        case .adopt:
            var layout = try await backend.adopt(locator: Self.params(LocatorParams.self, line).locator)
            layout.disk.kind = kind
            return try Self.result(id, layout)
        case .state:
            return try Self.result(
                id, StateResult(state: try await backend.state(of: Self.params(LayoutParams.self, line).layout)))
        case .planCreate:
            let p = try Self.params(CreateParams.self, line)
            return try Self.result(id, try await backend.planCreate(p.request, layout: p.layout))
        case .planRevert:
            let p = try Self.params(SnapshotParams.self, line)
            return try Self.result(id, try await backend.planRevert(to: p.snapshot, layout: p.layout))
        case .planDelete:
            let p = try Self.params(DeleteParams.self, line)
            return try Self.result(id, try await backend.planDelete(p.snapshot, mode: p.mode, layout: p.layout))
        case .rollbackBlockers:
            let p = try Self.params(SnapshotParams.self, line)
            return try Self.result(
                id, BlockersResult(blockers: try await backend.rollbackBlockers(to: p.snapshot, layout: p.layout)))
        case .perform:
            let p = try Self.params(PerformParams.self, line)
            try await backend.perform(p.name, arguments: p.arguments)
            return try Self.result(id, Empty())
        case .verify:
            return try Self.result(
                id,
                ProblemsResult(problems: try await backend.verify(layout: Self.params(LayoutParams.self, line).layout)))
        case .maintain:
            return try Self.result(
                id,
                ActionsResult(actions: try await backend.maintain(layout: Self.params(LayoutParams.self, line).layout)))
        case .hypervisorDrive:
            let drive = try backend.hypervisorDrive(Self.params(LayoutParams.self, line).layout)
            return try Self.result(
                id, DriveResult(path: drive.path, format: drive.format, sourceType: drive.sourceType))
        case .createDisk:
            let p = try Self.params(CreateDiskParams.self, line)
            return try Self.result(
                id, LocatorResult(locator: try await backend.createDisk(named: p.name, size: p.size, in: p.pool)))
        case .destroyDisk:
            try await backend.destroyDisk(layout: Self.params(LayoutParams.self, line).layout)
            return try Self.result(id, Empty())
        case .read:
            let p = try Self.params(ReadParams.self, line)
            guard let view = p.view.view else {
                throw SnapshotError(.invalidArgument, "a read needs view {\"active\": true} or {\"snapshot\": NAME}")
            }
            return try Self.result(
                id,
                BytesResult(bytes: Data(try await backend.read(view, at: p.offset, length: p.length, layout: p.layout)))
            )
        case .changes:
            let p = try Self.params(ChangesParams.self, line)
            guard let view = p.to.view else {
                throw SnapshotError(.invalidArgument, "changes need to: {\"active\": true} or {\"snapshot\": NAME}")
            }
            let c = try await backend.changes(p.layout, from: p.from, to: view)
            return try Self.result(
                id,
                ChangesResult(
                    virtualSize: c.virtualSize, method: c.method, granularity: c.granularity, extents: c.extents))
        case .write:
            let p = try Self.params(WriteParams.self, line)
            try await backend.write(Array(p.bytes), at: p.offset, layout: p.layout)
            return try Self.result(id, Empty())
        case .poolInventory:
            return try Self.result(
                id, ItemsResult(items: try await backend.poolInventory(Self.params(PoolParams.self, line).pool)))
        case .lockShared:
            let p = try Self.params(SharedLockParams.self, line)
            return try Self.result(id, try await backend.lockShared(disk: p.disk, holder: p.holder, wait: p.wait))
        case .unlockShared:
            try await backend.unlockShared(disk: Self.params(DiskParams.self, line).disk)
            return try Self.result(id, Empty())
        case .readShared:
            let document = try await backend.readShared(disk: Self.params(DiskParams.self, line).disk)
            return try Self.result(id, SharedDocumentResult(document: document))
        case .writeShared:
            let p = try Self.params(SharedWriteParams.self, line)
            try await backend.writeShared(disk: p.disk, document: p.document)
            return try Self.result(id, Empty())
        }
    }
}

struct ResultAnswer<R: Encodable>: Encodable {
    var id: Int?
    var result: R
}

/// Lines from a file descriptor, without Foundation's buffering surprises on pipes.
struct LineReader {
    let fd: Int32
    var buffer: [UInt8] = []
    var ended = false

    init(fd: Int32) { self.fd = fd }

    mutating func next() -> Data? {
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            if let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Data(buffer[..<newline])
                buffer.removeSubrange(...newline)
                if line.isEmpty { continue }
                return line
            }
            if ended {
                defer { buffer = [] }
                return buffer.isEmpty ? nil : Data(buffer)
            }
            let n = read(fd, &chunk, chunk.count)
            if n > 0 { buffer += chunk[..<n] } else if n < 0, errno == EINTR { continue } else { ended = true }
        }
    }
}
