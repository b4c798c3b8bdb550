import Foundation

import Synchronization

/// How a backend is made, given the runner and settings of the process that uses it.
public struct BackendFactory: Sendable {
    public var kind: BackendKind
    public var apiVersion: Int
    /// Where the backend comes from: compiled in, or a plug-in executable.
    public var origin: BackendOrigin
    /// The settings it declares, when known without making it (built-in backends); plug-ins
    /// declare theirs when asked (`describe`).
    public var settings: [SettingSpec]?
    public var make: @Sendable (BackendEnvironment) throws -> any DiskSnapshotBackend

    public init(
        kind: BackendKind, apiVersion: Int = diskSnapshotBackendAPIVersion, origin: BackendOrigin = .builtIn,
        settings: [SettingSpec]? = nil,
        make: @escaping @Sendable (BackendEnvironment) throws -> any DiskSnapshotBackend
    ) {
        self.kind = kind
        self.apiVersion = apiVersion
        self.origin = origin
        self.settings = settings
        self.make = make
    }
}

/// Where a backend comes from, for `vmsnap backend list`.
public struct BackendOrigin: Codable, Sendable, Hashable, CustomStringConvertible {
    /// `built-in` or `plug-in`.
    public var kind: String
    /// The plug-in executable.
    public var path: String?

    public static let builtIn = BackendOrigin(kind: "built-in", path: nil)
    public static func plugin(_ path: String) -> BackendOrigin { BackendOrigin(kind: "plug-in", path: path) }

    public var isPlugin: Bool { path != nil }
    public var description: String { path.map { "plug-in \($0)" } ?? kind }
}

/// What every backend is constructed with.
public struct BackendEnvironment: Sendable {
    public var runner: any CommandRunning
    /// Settings from configuration (`cow-size`, `overlay-dir`, ...), by key.
    public var settings: [String: String]

    public init(runner: any CommandRunning = SubprocessRunner(), settings: [String: String] = [:]) {
        self.runner = runner
        self.settings = settings
    }
}

/// Backends by kind name. Thread-safe; a process usually fills it once at start.
public final class BackendRegistry: Sendable {
    private let factories = Mutex<[BackendKind: BackendFactory]>([:])

    public init() {}

    /// Adds a backend. Refuses a kind that is already registered or an API version this core cannot drive.
    public func register(_ factory: BackendFactory) throws {
        guard factory.origin.isPlugin || factory.apiVersion == diskSnapshotBackendAPIVersion else {
            throw SnapshotError(
                .incompatibleBackend,
                "backend '\(factory.kind)' was written for backend API version \(factory.apiVersion); this vmsnap speaks version \(diskSnapshotBackendAPIVersion)"
            )
        }
        try factories.withLock { table in
            guard table[factory.kind] == nil else {
                throw SnapshotError(.alreadyExists, "a backend named '\(factory.kind)' is already registered")
            }
            table[factory.kind] = factory
        }
    }

    /// The registered kinds, sorted.
    public var kinds: [BackendKind] { factories.withLock { Array($0.keys) }.sorted() }

    /// Makes the backend registered as `kind`.
    public func backend(_ kind: BackendKind, environment: BackendEnvironment = BackendEnvironment()) throws
        -> any DiskSnapshotBackend
    {
        guard let factory = factories.withLock({ $0[kind] }) else {
            let known = kinds.map(\.rawValue).joined(separator: ", ")
            throw SnapshotError(
                .notFound, "no backend named '\(kind)'; registered backends: \(known.isEmpty ? "none" : known)")
        }
        return try factory.make(environment)
    }

    /// The factory registered as `kind`, if any.
    public func factory(_ kind: BackendKind) -> BackendFactory? { factories.withLock { $0[kind] } }

    /// Checks settings against the schemas of the registered backends (built-in schemas first;
    /// plug-ins are asked only for keys no built-in backend declares).
    public func validate(
        _ settings: [String: String], source: String, environment: BackendEnvironment = BackendEnvironment()
    ) throws {
        guard !settings.isEmpty else { return }
        var schemas: [BackendKind: [SettingSpec]] = [:]
        for kind in kinds { if let known = factory(kind)?.settings { schemas[kind] = known } }
        let declared = Set(schemas.values.flatMap { $0.map(\.name) })
        if !Set(settings.keys).isSubset(of: declared) {
            for kind in kinds where schemas[kind] == nil {
                let bare = BackendEnvironment(runner: environment.runner, settings: [:])
                schemas[kind] = try backend(kind, environment: bare).descriptor.settings
            }
        }
        try BackendSettings.validate(settings, against: schemas, source: source)
    }

    /// Makes every registered backend.
    public func allBackends(environment: BackendEnvironment = BackendEnvironment()) throws -> [any DiskSnapshotBackend]
    {
        try kinds.map { try backend($0, environment: environment) }
    }
}
