import Foundation
import SnapshotCore

/// A failed expectation inside a conformance check. A plain error, so the kit works from any
/// test framework and from the CLI.
public struct ConformanceFailure: Error, CustomStringConvertible, Sendable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// A check that finds, once it runs, that the scratch disk's storage does not offer what it
/// tests (an LVM volume group without a thin pool has no thin mappings to compare): skipped,
/// with the reason.
public struct ConformanceSkip: Error, CustomStringConvertible, Sendable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// One check of the contract.
public struct ConformanceCheck: Sendable {
    /// Stable identifier, for filters and reports (`internal.revert`).
    public var name: String
    /// What the check proves, in a sentence.
    public var summary: String
    /// Capabilities the backend must advertise for the check to run; otherwise it is skipped.
    public var requires: [Capability]
    /// Why the check does not apply to a backend (skipped), or nil when it does.
    public var applies: @Sendable (BackendDescriptor) -> String?
    public var body: @Sendable (ConformanceContext) async throws -> Void

    public init(
        _ name: String, _ summary: String, requires: [Capability] = [],
        applies: @escaping @Sendable (BackendDescriptor) -> String? = { _ in nil },
        body: @escaping @Sendable (ConformanceContext) async throws -> Void
    ) {
        self.name = name
        self.summary = summary
        self.requires = requires
        self.applies = applies
        self.body = body
    }
}

/// The outcome of one check.
public struct ConformanceResult: Codable, Sendable, Hashable {
    public enum Outcome: String, Codable, Sendable { case passed, failed, skipped }
    public var check: String
    public var summary: String
    public var outcome: Outcome
    /// Why it failed or was skipped.
    public var detail: String?
    public var seconds: Double
}

/// Runs the contract every backend must pass against one backend and a scratch pool.
///
/// Each check gets a fresh disk in the pool and a fresh metadata store, writes real data into
/// the virtual disk, snapshots, overwrites, reverts and deletes, and compares bytes. A check is
/// skipped only when the backend does not advertise a capability it needs; advertising a
/// capability and then failing it is a failure.
public struct ConformanceSuite: Sendable {
    public let backend: any DiskSnapshotBackend
    public let pool: BackendPool
    /// Virtual size of each scratch disk.
    public var diskSize: UInt64

    public init(backend: any DiskSnapshotBackend, pool: BackendPool, diskSize: UInt64 = 16 << 20) {
        self.backend = backend
        self.pool = pool
        self.diskSize = diskSize
    }

    /// Every check, in the order they run.
    public static var checks: [ConformanceCheck] { ConformanceChecks.all }

    /// The checks, with the crash checks (a crash simulated at every step, then recovery) when asked.
    public static func checks(includingCrash: Bool) -> [ConformanceCheck] {
        checks + (includingCrash ? CrashChecks.all : [])
    }

    /// Runs the checks whose name starts with one of `filter` (all when empty), reporting each as
    /// it ends. Crash checks run with `includingCrash`, or when `filter` names them.
    public func run(
        filter: [String] = [], includingCrash: Bool = false, onResult: @Sendable (ConformanceResult) -> Void = { _ in }
    ) async -> [ConformanceResult] {
        var results: [ConformanceResult] = []
        let table = backend.descriptor.capabilities
        let crashNamed = filter.contains { $0.hasPrefix("crash") }
        for check in Self.checks(includingCrash: includingCrash || crashNamed)
        where filter.isEmpty || filter.contains(where: { check.name.hasPrefix($0) }) {
            let start = Date()
            var result = ConformanceResult(
                check: check.name, summary: check.summary, outcome: .passed, detail: nil, seconds: 0)
            if let missing = check.requires.first(where: { !table.supports($0) }) {
                result.outcome = .skipped
                result.detail = "backend does not advertise \(missing)"
            } else if let why = check.applies(backend.descriptor) {
                result.outcome = .skipped
                result.detail = why
            } else {
                do {
                    let context = try await ConformanceContext(
                        backend: backend, pool: pool, diskSize: diskSize, checkName: check.name)
                    do {
                        try await check.body(context)
                        try await context.verifyAll()
                    } catch {
                        await context.cleanUp()
                        throw error
                    }
                    await context.cleanUp()
                } catch let skip as ConformanceSkip {
                    result.outcome = .skipped
                    result.detail = skip.message
                } catch {
                    result.outcome = .failed
                    result.detail = String(describing: error)
                }
            }
            result.seconds = Date().timeIntervalSince(start)
            onResult(result)
            results.append(result)
        }
        return results
    }
}

/// What a check works with: one scratch disk, a service over a private store, and helpers that
/// write, read and compare guest bytes.
public final class ConformanceContext: Sendable {
    public let backend: any DiskSnapshotBackend
    public let pool: BackendPool
    public let service: DiskSnapshotService
    /// The scratch disk's locator.
    public let disk: String
    let storeDirectory: String
    let diskSize: UInt64

    init(backend: any DiskSnapshotBackend, pool: BackendPool, diskSize: UInt64, checkName: String) async throws {
        self.backend = backend
        self.pool = pool
        self.diskSize = diskSize
        storeDirectory = (NSTemporaryDirectory() as NSString).appendingPathComponent(
            "vmsnap-conformance-\(UUID().uuidString.prefix(8))")
        let store = try MetadataStore(directory: storeDirectory)
        let registry = BackendRegistry()
        let instance = backend
        try registry.register(BackendFactory(kind: backend.kind) { _ in instance })
        service = DiskSnapshotService(store: store, registry: registry, notify: { _ in })
        let diskName =
            "ct-" + checkName.map { $0.isLetter || $0.isNumber ? $0 : "-" } + "-" + UUID().uuidString.prefix(6)
        disk = try await backend.createDisk(named: String(diskName), size: diskSize, in: pool)
    }

    /// The disk's layout now (stored, or read from storage before the first change).
    public func layout() async throws -> DiskLayout { try await service.layout(of: disk, kind: backend.kind).1 }

    // MARK: Data

    /// Deterministic pseudo-random bytes for `seed`: real data, different for every seed.
    public static func pattern(seed: UInt64, length: Int) -> [UInt8] {
        var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        return (0..<length).map { _ in
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            return UInt8(truncatingIfNeeded: state)
        }
    }

    /// Writes the pattern for `seed` at `offset` of the active disk and returns it.
    @discardableResult
    public func write(seed: UInt64, at offset: UInt64 = 0, length: Int = 64 << 10) async throws -> [UInt8] {
        let bytes = Self.pattern(seed: seed, length: length)
        try await backend.write(bytes, at: offset, layout: layout())
        return bytes
    }

    /// Throws unless `view` holds `expected` at `offset`; the message names the first differing byte.
    public func expect(_ view: DataView, at offset: UInt64 = 0, equals expected: [UInt8], _ what: String) async throws {
        let got = try await backend.read(view, at: offset, length: expected.count, layout: layout())
        if got != expected {
            let index =
                (0..<min(got.count, expected.count)).first { got[$0] != expected[$0] } ?? min(got.count, expected.count)
            throw ConformanceFailure(
                "\(what): bytes differ at offset \(offset + UInt64(index)) (read \(got.count) bytes, expected \(expected.count))"
            )
        }
    }

    // MARK: Expectations

    public func require(_ condition: Bool, _ message: @autoclosure () -> String) throws {
        if !condition { throw ConformanceFailure(message()) }
    }

    /// Runs `body`, which must fail with a `SnapshotError` of one of `codes` and change nothing:
    /// neither the pool's contents nor the disk's metadata.
    public func expectRefusal(_ codes: Set<SnapshotError.Code>, _ what: String, _ body: () async throws -> Void)
        async throws
    {
        let inventoryBefore = try await backend.poolInventory(pool)
        let layoutBefore = try await layout()
        do {
            try await body()
            throw ConformanceFailure(
                "\(what): expected an error (\(codes.map(\.rawValue).sorted().joined(separator: " or "))), but it succeeded"
            )
        } catch let error as SnapshotError {
            guard codes.contains(error.code) else {
                throw ConformanceFailure(
                    "\(what): expected \(codes.map(\.rawValue).sorted().joined(separator: " or ")), got \(error.code.rawValue): \(error.message)"
                )
            }
            guard error.message.count >= 20 else {
                throw ConformanceFailure("\(what): the error message is too terse to act on: '\(error.message)'")
            }
        }
        let inventoryAfter = try await backend.poolInventory(pool)
        try require(
            inventoryBefore == inventoryAfter,
            "\(what): the pool changed although the operation failed: before \(inventoryBefore), after \(inventoryAfter)"
        )
        let layoutAfter = try await layout()
        try require(layoutBefore == layoutAfter, "\(what): the disk's metadata changed although the operation failed")
    }

    /// Runs the backend's own image checks on every layer.
    public func verifyAll() async throws {
        let problems = try await backend.verify(layout: layout())
        try require(problems.isEmpty, "image check failed: \(problems.joined(separator: "; "))")
    }

    func cleanUp() async {
        if let layout = try? await layout() { try? await backend.destroyDisk(layout: layout) }
        try? FileManager.default.removeItem(atPath: storeDirectory)
        try? FileManager.default.removeItem(atPath: storeDirectory + "-host-b")
    }

    /// A second vmsnap installation with a store of its own over the same backend: "host B"
    /// of the shared-metadata checks.
    public func secondHost() throws -> DiskSnapshotService {
        let registry = BackendRegistry()
        let instance = backend
        try registry.register(BackendFactory(kind: backend.kind) { _ in instance })
        return DiskSnapshotService(
            store: try MetadataStore(directory: storeDirectory + "-host-b"), registry: registry, notify: { _ in })
    }

    // MARK: Operations

    @discardableResult
    public func snapshot(_ name: String, _ kind: SnapshotKind) async throws -> DiskSnapshot {
        try await service.create(SnapshotRequest(name: name, kind: kind), disk: disk, kind: backend.kind)
    }

    public func revert(_ name: String) async throws {
        try await service.revert(disk: disk, to: name, kind: backend.kind)
    }

    public func delete(_ name: String, _ mode: DeleteMode = .merge) async throws {
        try await service.delete(disk: disk, snapshot: name, mode: mode, kind: backend.kind)
    }
}
