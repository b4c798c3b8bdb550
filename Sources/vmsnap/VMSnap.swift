import ArgumentParser
import BackendPluginKit
import Foundation
import Qcow2Backend
import LVMBackend
import SnapshotCore
import VHDBackend

@main
struct VMSnap: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vmsnap",
        abstract: "Snapshots of virtual machine disks on mixed storage (qcow2, LVM, VHD).",
        version: "0.1.0",
        subcommands: [
            DomainCommand.self, SnapshotCommand.self, CheckpointCommand.self, BackupCommand.self,
            BlockSnapshotCommand.self, ExportCommand.self, DiskCommand.self,
            BackendCommand.self, RecoverCommand.self,
        ]
    )
}

/// Options every command that touches metadata shares.
struct StoreOptions: ParsableArguments {
    @Option(
        name: .long,
        help: ArgumentHelp("Metadata store directory (default: $VMSNAP_STORE or /var/lib/vmsnap).", valueName: "dir"))
    var store: String?

    @Option(
        name: .customLong("set"),
        help: ArgumentHelp(
            "Backend setting KEY=VALUE (repeatable), over the store's settings.conf; `vmsnap backend describe KIND` lists each backend's settings.",
            valueName: "key=value"))
    var settings: [String] = []

    func openStore() throws -> MetadataStore {
        try MetadataStore(directory: MetadataStore.resolveDirectory(flag: store))
    }

    func service() throws -> DiskSnapshotService {
        let store = try openStore()
        let registry = try Backends.registry()
        let file = try BackendSettings.load(storeDirectory: store.directory)
        try registry.validate(
            file, source: (store.directory as NSString).appendingPathComponent(BackendSettings.fileName))
        let flags = try BackendSettings.parse(pairs: settings)
        try registry.validate(flags, source: "--set")
        return DiskSnapshotService(
            store: store, registry: registry, environment: BackendEnvironment(settings: file.merging(flags) { $1 }))
    }
}

/// The backends this build of vmsnap carries, and the plug-ins it finds.
enum Backends {
    /// The one place built-in backends are registered.
    static let builtIn: [BackendFactory] = [Qcow2Backend.factory, VHDBackend.factory, LVMBackend.factory]

    /// Plug-in processes of this command, shared by every caller.
    static let sessions = PluginSessions()

    static func registry() throws -> BackendRegistry {
        let registry = BackendRegistry()
        for factory in builtIn { try registry.register(factory) }
        for plugin in discovered.found {
            try registry.register(PluginDiscovery.factory(for: plugin, sessions: sessions))
        }
        return registry
    }

    /// Plug-ins found on the search path, and the ones refused with the reason.
    static let discovered = PluginDiscovery.discover(builtIn: Set(builtIn.map(\.kind)))
}

/// Exit status of an operation that was started but finishes later (an LVM merge deferred while
/// the origin is open): 75, sysexits' EX_TEMPFAIL. Not done, not failed.
let pendingExitCode: Int32 = 75

/// Prints an error the way every command does and exits non-zero (75 for a pending operation).
func fail(_ error: any Error) -> ExitCode {
    let text: String
    switch error {
    case let e as SnapshotError where e.code == .pending:
        FileHandle.standardError.write(Data("vmsnap: pending: \(e.description)\n".utf8))
        return ExitCode(pendingExitCode)
    case let e as SnapshotError: text = e.description
    case let e as CommandError: text = e.description
    default: text = String(describing: error)
    }
    FileHandle.standardError.write(Data("vmsnap: error: \(text)\n".utf8))
    return ExitCode(1)
}

/// Runs a command body, turning vmsnap's errors into a message and exit status 1.
func guarded(_ body: () async throws -> Void) async throws {
    // Plug-ins started for this command end with it, each after its end of input.
    defer { Backends.sessions.stopAll() }
    do { try await body() } catch let e as SnapshotError { throw fail(e) } catch let e as CommandError { throw fail(e) }
}

/// JSON the way every `--json` prints it: sorted keys, ISO 8601 UTC dates.
func printJSON<T: Encodable>(_ value: T) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
    encoder.dateEncodingStrategy = .iso8601
    print(String(decoding: try encoder.encode(value), as: UTF8.self))
}

func jsonLine<T: Encodable>(_ value: T) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    encoder.dateEncodingStrategy = .iso8601
    return String(decoding: try encoder.encode(value), as: UTF8.self)
}

extension SnapshotKind: ExpressibleByArgument {}
extension BackendKind: ExpressibleByArgument {
    public init?(argument: String) { self.init(rawValue: argument) }
}

/// A date as `2026-11-21T17:20:00Z`.
func utcString(_ date: Date) -> String {
    date.formatted(Date.ISO8601FormatStyle(timeZone: TimeZone(identifier: "UTC")!))
}

/// Prints a line and flushes at once, so progress shows while checks run.
func printNow(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}
