import ArgumentParser
import BackendConformance
import Foundation
import SnapshotCore

/// `vmsnap backend ...`: what backends there are, and the conformance suite.
struct BackendCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backend",
        abstract: "List backends and their capabilities; run the conformance suite against one.",
        subcommands: [List.self, Test.self]
    )

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Backends and their capability tables.")
        @Flag(name: .long, help: "Print JSON.") var json = false

        func run() async throws {
            try await guarded {
                let descriptors = try Backends.registry().allBackends().map(\.descriptor)
                if json { return try printJSON(descriptors) }
                for d in descriptors {
                    print("\(d.kind)  (backend API \(d.apiVersion)): \(d.summary)")
                    var rows: [[String]] = []
                    for state in DiskState.allCases {
                        for kind in SnapshotKind.allCases {
                            rows.append([state.rawValue, kind.rawValue] + SnapshotOperation.allCases.map {
                                d.capabilities.defers(Capability($0, kind, state)) ? "deferred" : d.capabilities.supports($0, kind, state) ? "yes" : "-"
                            })
                        }
                    }
                    printTable(["  DISK", "KIND"] + SnapshotOperation.allCases.map(\.rawValue), rows.map { ["  " + $0[0]] + $0.dropFirst() })
                    for note in d.capabilities.notes { print("  note: \(note)") }
                    print("")
                }
            }
        }
    }

    struct Test: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run the conformance suite against a backend on a scratch pool.",
            discussion: "Creates scratch disks in the pool, writes data, snapshots, reverts and deletes, and compares bytes. Prints a line per check and a summary; exits non-zero if any check fails."
        )
        @Argument(help: "The backend kind, as `vmsnap backend list` shows it.") var kind: BackendKind
        @Option(name: .long, help: "Scratch directory for test disks (default: a new temporary directory, removed afterwards).") var pool: String?
        @Option(name: .long, parsing: .upToNextOption, help: "Run only checks whose name starts with one of these.") var only: [String] = []
        @Option(name: .long, help: "Backend setting KEY=VALUE (repeatable).") var set: [String] = []
        @Flag(name: .long, help: "Print one JSON object per check, then a summary object.") var json = false

        func run() async throws {
            try await guarded {
                let options = try BackendSettings.parse(pairs: set)
                let backend = try Backends.registry().backend(kind, environment: BackendEnvironment(settings: options))
                let directory: String
                var temporary = false
                if let pool {
                    var isDir: ObjCBool = false
                    guard FileManager.default.fileExists(atPath: pool, isDirectory: &isDir), isDir.boolValue else {
                        throw SnapshotError(.invalidArgument, "pool directory \(pool) does not exist; create it or omit --pool")
                    }
                    directory = URL(fileURLWithPath: pool).standardizedFileURL.path
                } else {
                    directory = (NSTemporaryDirectory() as NSString).appendingPathComponent("vmsnap-pool-\(UUID().uuidString.prefix(8))")
                    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
                    temporary = true
                }
                defer { if temporary { try? FileManager.default.removeItem(atPath: directory) } }
                let suite = ConformanceSuite(backend: backend, pool: BackendPool(directory: directory, options: options))
                if !json { printNow("conformance suite for backend '\(kind)' in \(directory)") }
                let emitJSON = json
                let results = await suite.run(filter: only) { r in
                    if emitJSON {
                        printNow((try? jsonLine(r)) ?? "{}")
                    } else {
                        let mark = switch r.outcome { case .passed: "PASS"; case .failed: "FAIL"; case .skipped: "SKIP" }
                        printNow("\(mark)  \(r.check.padding(toLength: 34, withPad: " ", startingAt: 0)) \(String(format: "%6.2fs", r.seconds))  \(r.outcome == .passed ? r.summary : (r.detail ?? ""))")
                    }
                }
                let passed = results.filter { $0.outcome == .passed }.count
                let failed = results.filter { $0.outcome == .failed }.count
                let skipped = results.filter { $0.outcome == .skipped }.count
                if json {
                    printNow(try jsonLine(["backend": kind.rawValue, "passed": "\(passed)", "failed": "\(failed)", "skipped": "\(skipped)"]))
                } else {
                    printNow("\(passed) passed, \(failed) failed, \(skipped) skipped")
                }
                if failed > 0 || results.isEmpty { throw ExitCode(1) }
            }
        }
    }
}
