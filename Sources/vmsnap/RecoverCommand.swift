import ArgumentParser
import Foundation
import SnapshotCore

/// `vmsnap recover`: finish or roll back operations a crash interrupted.
struct RecoverCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "recover",
        abstract: "Finish or roll back snapshot operations that were interrupted (crash, kill, power loss)."
    )
    @OptionGroup var storeOptions: StoreOptions
    @Flag(name: .long, help: "Print JSON.") var json = false
    @Option(
        name: .long,
        help: ArgumentHelp(
            "Give up on interrupted operation N (its journal id, shown by errors and `disk check`) when it cannot be finished: storage is left as the steps left it, the disk's metadata as it was before; vmsnap says what to check.",
            valueName: "N"))
    var abandon: Int64?
    @Option(
        name: .long,
        help: ArgumentHelp(
            "Recover only this disk, including operations another host left in a record its storage shares (RBD).",
            valueName: "disk"))
    var disk: String?
    @Option(name: .long, help: "The disk's backend (with --disk).") var backend: String?

    func run() async throws {
        try await guarded {
            if let abandon { return try await abandonOperation(abandon) }
            if let disk {
                try await storeOptions.service().recover(disk: disk, kind: backend.map(BackendKind.init(rawValue:)))
                if !json { print("\(disk): nothing left to recover") }
                return
            }
            let reports = try await storeOptions.service().recoverAll()
            let domains = try await storeOptions.domains().recoverAll()
            let pending = reports.contains { $0.outcome == .pending }
            if json {
                try printJSON(reports)
                if pending { throw ExitCode(pendingExitCode) }
                return
            }
            if reports.isEmpty && domains.isEmpty { print("nothing to recover") }
            for d in domains { print("recovered domain '\(d)'") }
            for r in reports {
                print(
                    "\(r.outcome.rawValue): \(r.operation) (\(r.stepsDone) of \(r.stepCount) steps had run)\(r.detail.map { "; \($0)" } ?? "")"
                )
            }
            if pending { throw ExitCode(pendingExitCode) }
        }
    }

    /// Marks one wedged operation abandoned and prints what the operator must check. For a disk
    /// whose storage shares its record, the record says so too (under the storage's lock).
    func abandonOperation(_ id: Int64) async throws {
        let entry = try await storeOptions.service().abandon(id)
        print(
            "abandoned: \(entry.operation) on \(entry.diskID) (journal \(entry.id)); \(entry.stepsDone) of \(entry.steps.count) steps had run"
        )
        print("the disk's metadata is as it was before the operation; its storage is as the steps left it. Check:")
        for (n, step) in entry.steps.enumerated() {
            print("  step \(n + 1) \(n < entry.stepsDone ? "done" : "not done"): \(step.summary) [\(step.action)]")
        }
        print(
            "then compare `vmsnap disk check \(entry.diskID)` with the storage, and fix or forget snapshots as it reports"
        )
    }
}
