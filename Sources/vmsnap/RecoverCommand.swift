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

    func run() async throws {
        try await guarded {
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
}
