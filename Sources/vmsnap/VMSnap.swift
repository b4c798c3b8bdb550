import ArgumentParser
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
        subcommands: [DomainCommand.self, SnapshotCommand.self, DiskCommand.self, BackendCommand.self, RecoverCommand.self]
    )
}

/// Options every command that touches metadata shares.
struct StoreOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Metadata store directory (default: $VMSNAP_STORE or /var/lib/vmsnap).", valueName: "dir"))
    var store: String?

    @Option(name: .customLong("set"), help: ArgumentHelp("Backend setting KEY=VALUE (repeatable), over the store's settings.conf: cow-size, warn-percent, extend-percent, lvm-library.", valueName: "key=value"))
    var settings: [String] = []

    func openStore() throws -> MetadataStore {
        try MetadataStore(directory: MetadataStore.resolveDirectory(flag: store))
    }

    func service() throws -> DiskSnapshotService {
        let store = try openStore()
        let merged = try BackendSettings.load(storeDirectory: store.directory).merging(BackendSettings.parse(pairs: settings)) { $1 }
        return DiskSnapshotService(store: store, registry: try Backends.registry(), environment: BackendEnvironment(settings: merged))
    }
}

/// The backends this build of vmsnap carries.
enum Backends {
    static func registry() throws -> BackendRegistry {
        let registry = BackendRegistry()
        try registry.register(Qcow2Backend.factory)
        try registry.register(VHDBackend.factory)
        try registry.register(LVMBackend.factory)
        return registry
    }
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
