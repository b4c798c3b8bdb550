import ArgumentParser
import DomainSnapshots
import Foundation
import HypervisorDriver
import SnapshotCore

/// `vmsnap blocksnapshot ...`: temporary point-in-time views of a domain's disks.
struct BlockSnapshotCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blocksnapshot",
        abstract:
            "Temporary block snapshots: independent point-in-time views of disks (copy-before-write), not revert points.",
        subcommands: [Create.self, List.self, Info.self, DumpXML.self, Delete.self]
    )

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "create",
            abstract: "Take a view of the chosen disks at one instant; the guest keeps running.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Argument(help: "The block snapshot's name (default: view-<UTC date>-<time>).") var name: String?
        @Option(name: .long, parsing: .upToNextOption, help: "Only these disk targets.") var disks: [String] = []
        @Option(name: .long, help: "Publish the blocks changed since this checkpoint with the view.")
        var changesSince: String?
        @Option(name: .long, help: "Take this checkpoint at the view's instant.") var checkpoint: String?
        @Flag(name: .long, help: "Print JSON.") var json = false

        func run() async throws {
            try await guarded {
                let r = try await storeOptions.domains().createBlockSnapshot(
                    domain: domain,
                    BlockSnapshotRequest(
                        name: name, targets: disks.isEmpty ? nil : disks, changesSince: changesSince,
                        checkpoint: checkpoint))
                if json { return try printJSON(r) }
                print(
                    "created block snapshot '\(r.name)' of domain '\(domain)' (disks \(r.disks.map(\.target).joined(separator: ", ")))"
                )
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "list", abstract: "List a domain's block snapshots.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Flag(name: .long, help: "Print JSON.") var json = false

        func run() async throws {
            try await guarded {
                let all = try storeOptions.domains().blockSnapshots(domain: domain)
                if json { return try printJSON(all) }
                for r in all {
                    print(
                        "\(r.name)  \(ISO8601DateFormatter().string(from: r.createdAt))  \(r.disks.map(\.target).joined(separator: ","))\(r.exportListener == nil ? "" : "  exported")"
                    )
                }
            }
        }
    }

    struct Info: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "info", abstract: "Show a block snapshot.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Argument(help: "The block snapshot.") var name: String
        @Flag(name: .long, help: "Print JSON.") var json = false

        func run() async throws {
            try await guarded {
                let r = try storeOptions.domains().blockSnapshot(domain: domain, name)
                if json { return try printJSON(r) }
                print("Name:     \(r.name)")
                print("Created:  \(ISO8601DateFormatter().string(from: r.createdAt))")
                if let c = r.changesSince { print("Changes since checkpoint: \(c)") }
                if let c = r.checkpoint { print("Checkpoint taken with it: \(c)") }
                for d in r.disks { print("Disk \(d.target): blocks kept in \(d.source)") }
                print("Exported: \(r.exportListener == nil ? "no" : "yes (vmsnap export address \(domain) \(r.name))")")
            }
        }
    }

    struct DumpXML: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "dumpxml", abstract: "Print a block snapshot as <domainblocksnapshot> XML.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Argument(help: "The block snapshot.") var name: String

        func run() async throws {
            try await guarded {
                print(try storeOptions.domains().blockSnapshotXML(domain: domain, name), terminator: "")
            }
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "delete",
            abstract: "Delete a block snapshot: its export, views and kept blocks go.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Argument(help: "The block snapshot.") var name: String

        func run() async throws {
            try await guarded {
                try await storeOptions.domains().deleteBlockSnapshot(domain: domain, name)
                print("deleted block snapshot '\(name)' of domain '\(domain)'")
            }
        }
    }
}

/// `vmsnap export ...`: block snapshots over NBD.
struct ExportCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Export block snapshots read-only over NBD (a Unix socket by default).",
        subcommands: [Start.self, Stop.self, Address.self]
    )

    struct Start: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "start", abstract: "Export a block snapshot's disks over NBD.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Argument(help: "The block snapshot.") var name: String
        @OptionGroup var listen: ListenerOptions

        func run() async throws {
            try await guarded {
                let r = try await storeOptions.domains().startExport(
                    domain: domain, name, listener: try listen.listener())
                for (t, uri) in r.uris.sorted(by: { $0.key < $1.key }) { print("\(t): \(uri)") }
            }
        }
    }

    struct Stop: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "stop", abstract: "Stop a block snapshot's export (the view stays).")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Argument(help: "The block snapshot.") var name: String

        func run() async throws {
            try await guarded {
                try await storeOptions.domains().stopExport(domain: domain, name)
                print("stopped the export of '\(name)'")
            }
        }
    }

    struct Address: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "address",
            abstract: "Print the NBD URI of each exported disk (all the domain's exports, or one block snapshot's).")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Argument(help: "The block snapshot.") var name: String?
        @Flag(name: .long, help: "Print JSON.") var json = false

        func run() async throws {
            try await guarded {
                let service = try storeOptions.domains()
                var all = try service.blockSnapshots(domain: domain).filter { $0.exportListener != nil }
                if let name { all = [try service.blockSnapshot(domain: domain, name)] }
                var out: [String: [String: String]] = [:]
                for r in all { out[r.name] = r.uris }
                if let job = try service.store.backupJob(of: domain), job.mode == .pull {
                    out[job.name] = Dictionary(
                        uniqueKeysWithValues: job.disks.compactMap { d in d.uri.map { (d.target, $0) } })
                }
                if json { return try printJSON(out) }
                for (n, uris) in out.sorted(by: { $0.key < $1.key }) {
                    for (t, uri) in uris.sorted(by: { $0.key < $1.key }) { print("\(n) \(t): \(uri)") }
                }
            }
        }
    }
}
