import Foundation
import SnapshotCore

/// A backend that lives in a plug-in executable: every protocol requirement is one call over the
/// plug-in's stdin and stdout (docs/plugin-protocol.md). One process serves a whole command; a
/// process that dies is started again for the next call (a few times at most), so a rollback
/// can still reach a plug-in that crashed in the middle of a plan.
///
/// Everything the plug-in answers is checked before it is used: a plan for another disk, a step
/// with a relative path, a create that does not make the snapshot it was asked for, are refused
/// with an error that names the plug-in and the call, before anything runs.
public final class PluginBackend: DiskSnapshotBackend, @unchecked Sendable {
    public let executable: String
    public let descriptor: BackendDescriptor
    /// The API version both sides agreed on.
    public let agreedVersion: Int
    /// The plug-in's own version string, if it gave one.
    public let pluginVersion: String?
    let description: DescribeResult
    let settings: [String: String]
    private var callTimeout: Double
    /// Seconds a call may take without an answer or a progress line.
    public var timeout: Double {
        get { lock.withLock { callTimeout } }
        set { lock.withLock { callTimeout = newValue } }
    }
    private let lock = NSLock()
    private var process: PluginProcess?
    private var restarts = 0
    private var nextID = 1
    private var calls = 0

    /// Calls made to the plug-in so far (benchmarks count them per command).
    public var callCount: Int { lock.withLock { calls } }

    /// Starts the plug-in, agrees on a version, reads its description and hands it its settings.
    public init(executable: String, settings: [String: String] = [:], timeout: Double = PluginBackend.defaultTimeout)
        throws
    {
        self.executable = executable
        callTimeout = timeout
        let process = try Self.launch(executable)
        let kindFromName = Self.kind(ofExecutable: executable)
        let hello: HelloResult = try Self.call(
            process, id: 0, .hello,
            HelloParams(
                host: "vmsnap", apiVersion: PluginAPIVersion.current.apiVersion, apiAge: PluginAPIVersion.current.apiAge
            ),
            kind: kindFromName, timeout: timeout)
        let theirs = PluginAPIVersion(apiVersion: hello.apiVersion, apiAge: hello.apiAge)
        guard let agreed = PluginAPIVersion.current.agreed(with: theirs) else {
            process.stop()
            throw SnapshotError(
                .incompatibleBackend,
                "backend plug-in '\(kindFromName)' (\(executable)) speaks plug-in API \(theirs); this vmsnap speaks \(PluginAPIVersion.current). Install a plug-in built for API \(PluginAPIVersion.current.apiVersion), or a vmsnap that speaks \(theirs)"
            )
        }
        let described: DescribeResult = try Self.call(
            process, id: 1, .describe, Empty(), kind: kindFromName, timeout: timeout)
        guard described.kind == kindFromName, hello.kind == kindFromName else {
            process.stop()
            throw SnapshotError(
                .pluginFailed,
                "backend plug-in \(executable) calls itself '\(described.kind)', but its file name says '\(kindFromName)'; rename the file or fix the plug-in"
            )
        }
        let schema = described.settings ?? []
        let own = settings.filter { key, _ in schema.contains { $0.name == key } }
        try BackendSettings.validate(
            own, against: [described.kind: schema], source: "settings for plug-in '\(described.kind)'")
        let _: Empty = try Self.call(
            process, id: 2, .configure, SettingsParams(settings: own), kind: kindFromName, timeout: timeout)
        self.process = process
        self.settings = own
        self.description = described
        agreedVersion = agreed
        pluginVersion = hello.version
        nextID = 3
        descriptor = BackendDescriptor(
            kind: described.kind, apiVersion: agreed, summary: described.summary, capabilities: described.capabilities,
            settings: schema, liveSnapshots: described.liveSnapshots ?? .none,
            imageFormat: described.driveFormat ?? "raw", sourceType: described.sourceType ?? .file,
            tools: described.tools ?? [], sharedMetadata: agreed >= 2 && described.sharedMetadata == true,
            reportsChanges: described.reportsChanges == true)
    }

    deinit { process?.stop() }

    /// Ends the plug-in process now (it gets end of input and a second to exit).
    public func stop() { lock.withLock { process }?.stop() }

    /// Seconds a call may take without an answer or a progress line (`VMSNAP_PLUGIN_TIMEOUT`).
    public static var defaultTimeout: Double {
        ProcessInfo.processInfo.environment["VMSNAP_PLUGIN_TIMEOUT"].flatMap(Double.init).map { max($0, 0.1) } ?? 30
    }

    /// `vmsnap-backend-raw` -> `raw`.
    public static func kind(ofExecutable path: String) -> BackendKind {
        let name = (path as NSString).lastPathComponent
        return BackendKind(
            rawValue: name.hasPrefix(PluginDiscovery.prefix)
                ? String(name.dropFirst(PluginDiscovery.prefix.count)) : name)
    }

    // MARK: - Calls

    private static func launch(_ executable: String) throws -> PluginProcess {
        // ETXTBSY: a file just written can still be open for writing in a child another thread
        // forked meanwhile (it closes on exec); a short retry outlasts that.
        for _ in 0..<50 {
            do { return try PluginProcess(executable: executable) } catch PluginProcessFailure.spawnFailed(
                errno: ETXTBSY)
            { usleep(10_000) } catch { break }
        }
        do { return try PluginProcess(executable: executable) } catch {
            let why: String
            switch error {
            case .spawnFailed(let code): why = String(cString: strerror(code))
            default: why = "\(error)"
            }
            throw SnapshotError(.pluginFailed, "backend plug-in \(executable) could not be started: \(why)")
        }
    }

    /// One request and its answer on `process`, every failure as the layer's error naming the
    /// plug-in, its path and the call.
    private static func call<P: Encodable, R: Decodable>(
        _ process: PluginProcess, id: Int, _ method: PluginMethod, _ params: P, kind: BackendKind, timeout: Double
    ) throws -> R {
        let who = "backend plug-in '\(kind)' (\(process.executable))"
        let line: [UInt8]
        do {
            line = Array(try PluginCoding.encoder.encode(PluginRequest(id: id, method: method, params: params)))
        } catch {
            throw SnapshotError(.invalidArgument, "cannot encode the '\(method.rawValue)' request for \(who): \(error)")
        }
        let answer: [UInt8]
        do {
            answer = try process.exchange(line, timeout: timeout) { candidate in
                let head = try Self.head(candidate, who: who, method: method)
                guard head.id == id || (head.id == nil && head.error != nil) else {
                    throw SnapshotError(
                        .pluginFailed,
                        "\(who) answered '\(method.rawValue)' with the id \(head.id.map(String.init) ?? "null") of another request; nothing was changed"
                    )
                }
                return !head.isProgress
            }
        } catch let failure as PluginProcessFailure {
            let tail = process.lastErrorOutput
            let said = tail.isEmpty ? "" : "; its last error output: \(tail)"
            switch failure {
            case .timedOut(let seconds):
                throw SnapshotError(
                    .pluginFailed,
                    "\(who) did not answer '\(method.rawValue)' within \(Int(seconds)) s and was stopped\(said). Nothing was changed by this call; raise VMSNAP_PLUGIN_TIMEOUT if the plug-in is only slow"
                )
            case .exited(let status):
                throw SnapshotError(
                    .pluginFailed,
                    "\(who) exited (status \(status)) during '\(method.rawValue)'\(said). Nothing was changed by this call"
                )
            case .spawnFailed(let code):
                throw SnapshotError(.pluginFailed, "\(who) could not be started: \(String(cString: strerror(code)))")
            }
        }
        let head = try Self.head(answer, who: who, method: method)
        if let error = head.error {
            let code = SnapshotError.Code(rawValue: error.code) ?? .pluginFailed
            throw SnapshotError(code, "\(who), '\(method.rawValue)': \(error.message)")
        }
        guard head.hasResult else {
            throw SnapshotError(
                .pluginFailed,
                "\(who) answered '\(method.rawValue)' with neither a result nor an error: \(Self.excerpt(answer)); nothing was changed"
            )
        }
        do { return try PluginCoding.decoder.decode(PluginAnswer<R>.self, from: Data(answer)).result } catch {
            throw SnapshotError(
                .pluginFailed,
                "\(who) answered '\(method.rawValue)' with a result vmsnap cannot read (\(Self.decodingProblem(error))): \(Self.excerpt(answer)); nothing was changed"
            )
        }
    }

    private static func head(_ line: [UInt8], who: String, method: PluginMethod) throws -> PluginAnswerHead {
        do { return try PluginCoding.decoder.decode(PluginAnswerHead.self, from: Data(line)) } catch {
            throw SnapshotError(
                .pluginFailed,
                "\(who) answered '\(method.rawValue)' with something that is not protocol JSON: \(excerpt(line)); nothing was changed. Plug-ins write only answer lines to stdout (logs go to stderr)"
            )
        }
    }

    static func excerpt(_ line: [UInt8]) -> String {
        let text = String(decoding: line.prefix(160), as: UTF8.self).replacingOccurrences(of: "\n", with: " ")
        return "'" + text + (line.count > 160 ? "...'" : "'")
    }

    static func decodingProblem(_ error: any Error) -> String {
        guard let error = error as? DecodingError else { return "\(error)" }
        switch error {
        case .keyNotFound(let key, let context):
            return "missing \((context.codingPath + [key]).map(\.stringValue).joined(separator: "."))"
        case .typeMismatch(_, let context), .valueNotFound(_, let context), .dataCorrupted(let context):
            return "\(context.codingPath.map(\.stringValue).joined(separator: ".")): \(context.debugDescription)"
        @unknown default: return "\(error)"
        }
    }

    /// A call on the live process, starting the plug-in again if it died (at most three times
    /// for one backend), so undo and recovery still reach it.
    func call<P: Encodable, R: Decodable>(_ method: PluginMethod, _ params: P) throws -> R {
        let (live, id, timeout) = try lock.withLock { () throws -> (PluginProcess, Int, Double) in
            calls += 1
            if let process, process.isRunning {
                nextID += 1
                return (process, nextID, callTimeout)
            }
            guard restarts < 3 else {
                throw SnapshotError(
                    .pluginFailed,
                    "backend plug-in '\(kind)' (\(executable)) has died \(restarts + 1) times in this command; not starting it again. Its last error output: \(self.process?.lastErrorOutput ?? "none")"
                )
            }
            restarts += 1
            let fresh = try Self.launch(executable)
            let _: HelloResult = try Self.call(
                fresh, id: 0, .hello,
                HelloParams(
                    host: "vmsnap", apiVersion: PluginAPIVersion.current.apiVersion,
                    apiAge: PluginAPIVersion.current.apiAge), kind: kind, timeout: callTimeout)
            let _: Empty = try Self.call(
                fresh, id: 1, .configure, SettingsParams(settings: settings), kind: kind, timeout: callTimeout)
            process = fresh
            nextID = 2
            return (fresh, nextID, callTimeout)
        }
        defer { Trace.mark("plug-in \(kind) call \(method.rawValue)") }
        return try Self.call(live, id: id, method, params, kind: kind, timeout: timeout)
    }

    /// The same, off the cooperative thread pool: the call blocks on the plug-in's pipe.
    func callAsync<P: Encodable & Sendable, R: Decodable & Sendable>(_ method: PluginMethod, _ params: P) async throws
        -> R
    {
        try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global().async {
                continuation.resume(with: Result { try self.call(method, params) })
            }
        }
    }

    // MARK: - DiskSnapshotBackend

    public func normalize(locator: String) -> String {
        description.locators == .name ? locator : URL(fileURLWithPath: locator).standardizedFileURL.path
    }

    public func recognizes(locator: String) async -> Bool {
        let answer: RecognizedResult? = try? await callAsync(
            .recognizes, LocatorParams(locator: normalize(locator: locator)))
        return answer?.recognized ?? false
    }

    public func inspect(locator: String) async throws -> DiskInfo {
        try await callAsync(.inspect, LocatorParams(locator: normalize(locator: locator)))
    }

    public func adopt(locator: String) async throws -> DiskLayout {
        let id = normalize(locator: locator)
        let layout: DiskLayout = try await callAsync(.adopt, LocatorParams(locator: id))
        try PlanCheck(plugin: self, method: .adopt).layout(layout, of: id)
        return layout
    }

    public func state(of layout: DiskLayout) async throws -> DiskState {
        let answer: StateResult = try await callAsync(.state, LayoutParams(layout: layout))
        return answer.state
    }

    public func planCreate(_ request: SnapshotRequest, layout: DiskLayout) async throws -> Plan {
        let plan: Plan = try await callAsync(.planCreate, CreateParams(request: request, layout: layout))
        try PlanCheck(plugin: self, method: .planCreate).create(plan, request: request, before: layout)
        return plan
    }

    public func planRevert(to snapshot: String, layout: DiskLayout) async throws -> Plan {
        let plan: Plan = try await callAsync(.planRevert, SnapshotParams(snapshot: snapshot, layout: layout))
        try PlanCheck(plugin: self, method: .planRevert).revert(plan, to: snapshot, before: layout)
        return plan
    }

    public func planDelete(_ snapshot: String, mode: DeleteMode, layout: DiskLayout) async throws -> Plan {
        let plan: Plan = try await callAsync(.planDelete, DeleteParams(snapshot: snapshot, mode: mode, layout: layout))
        try PlanCheck(plugin: self, method: .planDelete).delete(plan, snapshot: snapshot, mode: mode, before: layout)
        return plan
    }

    public func rollbackBlockers(to snapshot: String, layout: DiskLayout) async throws -> [RollbackBlocker] {
        do {
            let answer: BlockersResult = try await callAsync(
                .rollbackBlockers, SnapshotParams(snapshot: snapshot, layout: layout))
            return answer.blockers
        } catch let e as SnapshotError where e.code == .unsupported { return [] }
    }

    public func changes(_ layout: DiskLayout, from snapshot: String, to view: DataView) async throws -> DiskChanges {
        guard descriptor.reportsChanges else {
            throw SnapshotError(
                .unsupported, "backend plug-in '\(kind)' does not report which blocks changed between snapshots")
        }
        let answer: ChangesResult = try await callAsync(
            .changes, ChangesParams(from: snapshot, to: ViewParam(view), layout: layout))
        var to: String?
        if case .snapshot(let name) = view { to = name }
        return DiskChanges(
            disk: layout.disk.id, from: snapshot, to: to, virtualSize: answer.virtualSize, method: answer.method,
            granularity: answer.granularity, extents: answer.extents)
    }

    public func perform(_ name: String, arguments: [String: String]) async throws {
        let _: Empty = try await callAsync(.perform, PerformParams(name: name, arguments: arguments))
    }

    public func verify(layout: DiskLayout) async throws -> [String] {
        do {
            let answer: ProblemsResult = try await callAsync(.verify, LayoutParams(layout: layout))
            return answer.problems
        } catch let e as SnapshotError where e.code == .unsupported { return [] }
    }

    public func maintain(layout: DiskLayout) async throws -> [String] {
        do {
            let answer: ActionsResult = try await callAsync(.maintain, LayoutParams(layout: layout))
            return answer.actions
        } catch let e as SnapshotError where e.code == .unsupported { return [] }
    }

    public func hypervisorDrive(_ layout: DiskLayout) throws -> HypervisorDrive {
        let answer: DriveResult = try call(.hypervisorDrive, LayoutParams(layout: layout))
        // Files and block devices are absolute paths; a network volume is the hypervisor's own
        // spelling (`rbd:pool/image:...`).
        guard answer.sourceType == .network || answer.path.hasPrefix("/") else {
            throw SnapshotError(
                .pluginFailed,
                "backend plug-in '\(kind)' (\(executable)) gave the hypervisor a relative path '\(answer.path)' for \(layout.disk.id)"
            )
        }
        return HypervisorDrive(
            path: answer.path, format: answer.format, liveSnapshots: false, sourceType: answer.sourceType ?? .file)
    }

    public func createDisk(named name: String, size: UInt64, in pool: BackendPool) async throws -> String {
        let answer: LocatorResult = try await callAsync(
            .createDisk, CreateDiskParams(name: name, size: size, pool: pool))
        return answer.locator
    }

    public func destroyDisk(layout: DiskLayout) async throws {
        let _: Empty = try await callAsync(.destroyDisk, LayoutParams(layout: layout))
    }

    public func write(_ bytes: [UInt8], at offset: UInt64, layout: DiskLayout) async throws {
        let _: Empty = try await callAsync(.write, WriteParams(bytes: Data(bytes), offset: offset, layout: layout))
    }

    public func read(_ view: DataView, at offset: UInt64, length: Int, layout: DiskLayout) async throws -> [UInt8] {
        let answer: BytesResult = try await callAsync(
            .read, ReadParams(view: ViewParam(view), offset: offset, length: length, layout: layout))
        guard answer.bytes.count == length else {
            throw SnapshotError(
                .pluginFailed,
                "backend plug-in '\(kind)' (\(executable)) answered a read of \(length) bytes with \(answer.bytes.count)"
            )
        }
        return Array(answer.bytes)
    }

    public func lockShared(disk: String, holder: String, wait: TimeInterval) async throws -> SharedLockGrant {
        try await callAsync(.lockShared, SharedLockParams(disk: disk, holder: holder, wait: wait))
    }

    public func unlockShared(disk: String) async throws {
        let _: Empty = try await callAsync(.unlockShared, DiskParams(disk: disk))
    }

    public func readShared(disk: String) async throws -> String? {
        let answer: SharedDocumentResult = try await callAsync(.readShared, DiskParams(disk: disk))
        return answer.document
    }

    public func writeShared(disk: String, document: String) async throws {
        let _: Empty = try await callAsync(.writeShared, SharedWriteParams(disk: disk, document: document))
    }

    public func poolInventory(_ pool: BackendPool) async throws -> [String] {
        let answer: ItemsResult = try await callAsync(.poolInventory, PoolParams(pool: pool))
        return answer.items
    }
}
