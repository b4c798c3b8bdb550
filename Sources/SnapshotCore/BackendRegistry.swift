import Foundation

import Synchronization

/// How a backend is made, given the runner and settings of the process that uses it.
public struct BackendFactory: Sendable {
    public var kind: BackendKind
    public var apiVersion: Int
    public var make: @Sendable (BackendEnvironment) throws -> any DiskSnapshotBackend

    public init(kind: BackendKind, apiVersion: Int = diskSnapshotBackendAPIVersion, make: @escaping @Sendable (BackendEnvironment) throws -> any DiskSnapshotBackend) {
        self.kind = kind
        self.apiVersion = apiVersion
        self.make = make
    }
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
        guard factory.apiVersion == diskSnapshotBackendAPIVersion else {
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
    public func backend(_ kind: BackendKind, environment: BackendEnvironment = BackendEnvironment()) throws -> any DiskSnapshotBackend {
        guard let factory = factories.withLock({ $0[kind] }) else {
            let known = kinds.map(\.rawValue).joined(separator: ", ")
            throw SnapshotError(.notFound, "no backend named '\(kind)'; registered backends: \(known.isEmpty ? "none" : known)")
        }
        return try factory.make(environment)
    }

    /// Makes every registered backend.
    public func allBackends(environment: BackendEnvironment = BackendEnvironment()) throws -> [any DiskSnapshotBackend] {
        try kinds.map { try backend($0, environment: environment) }
    }
}

/// Backend settings (`cow-size`, `warn-percent`, ...): `KEY=VALUE` pairs from `--set`, over the
/// lines of `<store>/settings.conf` (`key = value`, `#` comments), so a policy set once applies
/// to every command that uses the store.
public enum BackendSettings {
    public static let fileName = "settings.conf"

    /// Parses `--set` pairs.
    public static func parse(pairs: [String]) throws -> [String: String] {
        var out: [String: String] = [:]
        for pair in pairs {
            guard let eq = pair.firstIndex(of: "="), eq != pair.startIndex else {
                throw SnapshotError(.invalidArgument, "--set expects KEY=VALUE (for example --set cow-size=256m), got '\(pair)'")
            }
            out[String(pair[..<eq])] = String(pair[pair.index(after: eq)...])
        }
        return out
    }

    /// Reads the store's settings file; a missing file is no settings.
    public static func load(storeDirectory: String) throws -> [String: String] {
        let path = (storeDirectory as NSString).appendingPathComponent(fileName)
        guard let data = FileManager.default.contents(atPath: path) else { return [:] }
        var out: [String: String] = [:]
        for (n, raw) in String(decoding: data, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init)?.trimmingCharacters(in: .whitespaces) ?? ""
            if line.isEmpty { continue }
            guard let eq = line.firstIndex(of: "="), eq != line.startIndex else {
                throw SnapshotError(.invalidArgument, "\(path) line \(n + 1): expected `key = value`, got '\(line)'; fix or remove the line")
            }
            out[line[..<eq].trimmingCharacters(in: .whitespaces)] = line[line.index(after: eq)...].trimmingCharacters(in: .whitespaces)
        }
        return out
    }
}
