import ArgumentParser
import BackendPluginKit
import BackendConformance
import Foundation
import SnapshotCore

/// `vmsnap backend ...`: what backends there are, and the conformance suite.
struct BackendCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backend",
        abstract: "List backends and their capabilities; run the conformance suite against one.",
        subcommands: [List.self, Describe.self, Test.self]
    )

    /// One row of `backend list --json`.
    struct Listing: Encodable {
        var kind: BackendKind
        var origin: BackendOrigin
        var apiVersion: Int?
        var descriptor: BackendDescriptor?
        var error: String?
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "list",
            abstract: "Built-in backends and plug-ins: where each comes from, its API version and capability table.")
        @Flag(name: .long, help: "Print JSON.") var json = false

        func run() async throws {
            try await guarded {
                let registry = try Backends.registry()
                var rows: [Listing] = []
                for kind in registry.kinds {
                    guard let factory = registry.factory(kind) else { continue }
                    do {
                        let d = try registry.backend(kind).descriptor
                        rows.append(
                            Listing(kind: kind, origin: factory.origin, apiVersion: d.apiVersion, descriptor: d))
                    } catch {
                        rows.append(Listing(kind: kind, origin: factory.origin, error: String(describing: error)))
                    }
                }
                let refused = Backends.discovered.refused
                if json {
                    struct Output: Encodable {
                        var backends: [Listing]
                        var refusedPlugins: [RefusedPlugin]
                    }
                    return try printJSON(Output(backends: rows, refusedPlugins: refused))
                }
                for row in rows {
                    let api = row.origin.isPlugin ? "plug-in API" : "backend API"
                    print(
                        "\(row.kind)  (\(row.origin), \(api) \(row.apiVersion.map(String.init) ?? "?"))\(row.descriptor.map { ": " + $0.summary } ?? "")"
                    )
                    if let error = row.error {
                        print("  error: \(error)\n")
                        continue
                    }
                    if let d = row.descriptor { printCapabilities(d) }
                    print("")
                }
                for r in refused { print("refused plug-in \(r.path): \(r.reason)") }
            }
        }
    }

    struct Describe: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "describe", abstract: "One backend's capabilities and settings schema.")
        @Argument(help: "The backend kind, as `vmsnap backend list` shows it.") var kind: BackendKind
        @Flag(name: .long, help: "Print JSON.") var json = false

        func run() async throws {
            try await guarded {
                let registry = try Backends.registry()
                let backend = try registry.backend(kind)
                let d = backend.descriptor
                let origin = registry.factory(kind)?.origin ?? .builtIn
                if json {
                    struct Output: Encodable {
                        var origin: BackendOrigin
                        var descriptor: BackendDescriptor
                    }
                    return try printJSON(Output(origin: origin, descriptor: d))
                }
                print("\(d.kind): \(d.summary)")
                print(
                    "  origin: \(origin); API version \(d.apiVersion); live snapshots taken by: \(d.liveSnapshots.rawValue)"
                )
                printCapabilities(d)
                if d.settings.isEmpty { print("  settings: none") }
                for spec in d.settings {
                    print(
                        "  setting \(spec.name): \(spec.valueDescription)\(spec.defaultValue.map { ", default \($0)" } ?? ""); \(spec.help)"
                    )
                }
            }
        }
    }

    struct Test: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "test",
            abstract: "Run the conformance suite against a backend on a scratch pool.",
            discussion:
                "Creates scratch disks in the pool, writes data, snapshots, reverts and deletes, and compares bytes. Prints a line per check and a summary; exits non-zero if any check fails."
        )
        @Argument(help: "The backend kind, as `vmsnap backend list` shows it.") var kind: BackendKind
        @Option(
            name: .long,
            help: "Scratch directory for test disks (default: a new temporary directory, removed afterwards).")
        var pool: String?
        @Option(name: .long, parsing: .upToNextOption, help: "Run only checks whose name starts with one of these.")
        var only: [String] = []
        @Option(name: .long, help: "Backend setting KEY=VALUE (repeatable).") var set: [String] = []
        @Flag(name: .long, help: "Print one JSON object per check, then a summary object.") var json = false
        @Flag(
            name: .long,
            help:
                "Also run the crash checks: a crash simulated before and after every step of every operation, then recovery (slower)."
        ) var crash = false

        func run() async throws {
            try await guarded {
                let options = try BackendSettings.parse(pairs: set)
                let registry = try Backends.registry()
                try registry.validate(options, source: "--set")
                let backend = try registry.backend(kind, environment: BackendEnvironment(settings: options))
                let directory: String
                var temporary = false
                if let pool {
                    var isDir: ObjCBool = false
                    guard FileManager.default.fileExists(atPath: pool, isDirectory: &isDir) else {
                        throw SnapshotError(
                            .invalidArgument, "pool directory \(pool) does not exist; create it or omit --pool")
                    }
                    guard isDir.boolValue else {
                        throw SnapshotError(
                            .invalidArgument,
                            "--pool \(pool) is not a directory; give a directory for the scratch disks")
                    }
                    directory = URL(fileURLWithPath: pool).standardizedFileURL.path
                } else {
                    directory = (NSTemporaryDirectory() as NSString).appendingPathComponent(
                        "vmsnap-pool-\(UUID().uuidString.prefix(8))")
                    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
                    temporary = true
                }
                defer { if temporary { try? FileManager.default.removeItem(atPath: directory) } }
                let suite = ConformanceSuite(
                    backend: backend, pool: BackendPool(directory: directory, options: options))
                if !json { printNow("conformance suite for backend '\(kind)' in \(directory)") }
                let emitJSON = json
                if !only.isEmpty {
                    let names = ConformanceSuite.checks(includingCrash: true).map(\.name)
                    for prefix in only where !names.contains(where: { $0.hasPrefix(prefix) }) {
                        throw SnapshotError(
                            .invalidArgument,
                            "--only \(prefix) matches no check; checks: \(names.joined(separator: ", "))")
                    }
                }
                let results = await suite.run(filter: only, includingCrash: crash) { r in
                    if emitJSON {
                        printNow((try? jsonLine(r)) ?? "{}")
                    } else {
                        let mark =
                            switch r.outcome {
                            case .passed: "PASS"
                            case .failed: "FAIL"
                            case .skipped: "SKIP"
                            }
                        printNow(
                            "\(mark)  \(r.check.padding(toLength: 34, withPad: " ", startingAt: 0)) \(String(format: "%6.2fs", r.seconds))  \(r.outcome == .passed ? r.summary : (r.detail ?? ""))"
                        )
                    }
                }
                let passed = results.filter { $0.outcome == .passed }.count
                let failed = results.filter { $0.outcome == .failed }.count
                let skipped = results.filter { $0.outcome == .skipped }.count
                if json {
                    printNow(
                        try jsonLine([
                            "backend": kind.rawValue, "passed": "\(passed)", "failed": "\(failed)",
                            "skipped": "\(skipped)",
                        ]))
                } else {
                    printNow("\(passed) passed, \(failed) failed, \(skipped) skipped")
                }
                if failed > 0 || results.isEmpty { throw ExitCode(1) }
            }
        }
    }
}

/// The capability table, one row per disk state and snapshot kind.
func printCapabilities(_ d: BackendDescriptor) {
    var rows: [[String]] = []
    for state in DiskState.allCases {
        for kind in SnapshotKind.allCases {
            rows.append(
                ["  " + state.rawValue, kind.rawValue]
                    + SnapshotOperation.allCases.map {
                        d.capabilities.defers(Capability($0, kind, state))
                            ? "deferred" : d.capabilities.supports($0, kind, state) ? "yes" : "-"
                    })
        }
    }
    printTable(["  DISK", "KIND"] + SnapshotOperation.allCases.map(\.rawValue), rows)
    for note in d.capabilities.notes { print("  note: \(note)") }
}
