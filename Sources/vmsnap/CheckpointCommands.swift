import ArgumentParser
import DomainSnapshots
import Foundation
import SnapshotCore

extension CheckpointDeleteMode: ExpressibleByArgument {}

/// `vmsnap checkpoint ...`: reference points for incremental backup (changed-block tracking).
struct CheckpointCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "checkpoint",
        abstract:
            "Checkpoints: points from which each chosen disk tracks changed blocks, for incremental backups (not revert points).",
        subcommands: [Create.self, List.self, Info.self, DumpXML.self, Delete.self, Redefine.self]
    )

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "create",
            abstract: "Take a checkpoint: a bitmap in each tracked disk, all at one instant.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Argument(help: "The checkpoint's name (default: checkpoint-<UTC date>-<time>).") var name: String?
        @Option(name: .long, help: "A description kept with the checkpoint.") var description: String?
        @Option(
            name: .long, parsing: .upToNextOption,
            help: "Only these disk targets (default: every disk whose backend tracks changed blocks).")
        var disks: [String] = []
        @Flag(name: .long, help: "Print the checkpoint as JSON.") var json = false

        func run() async throws {
            try await guarded {
                let record = try await storeOptions.domains(json: json).createCheckpoint(
                    domain: domain,
                    CheckpointRequest(name: name, description: description, targets: disks.isEmpty ? nil : disks))
                if json { return try printJSON(record) }
                print(
                    "created checkpoint '\(record.name)' of domain '\(domain)' (disks \(record.disks.map(\.target).joined(separator: ", ")))"
                )
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "list", abstract: "List a domain's checkpoints, oldest first.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Flag(name: .long, help: "Print JSON.") var json = false

        func run() async throws {
            try await guarded {
                let all = try storeOptions.domains().checkpoints(domain: domain)
                if json { return try printJSON(all) }
                let f = ISO8601DateFormatter()
                print(
                    "Name".padding(toLength: 28, withPad: " ", startingAt: 0) + " Created               Parent   Disks")
                for c in all {
                    print(
                        c.name.padding(toLength: 28, withPad: " ", startingAt: 0)
                            + " \(f.string(from: c.createdAt)) \((c.parent ?? "-").padding(toLength: 8, withPad: " ", startingAt: 0)) \(c.disks.map(\.target).joined(separator: ","))"
                    )
                }
            }
        }
    }

    struct Info: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "info",
            abstract:
                "Show a checkpoint: each disk's bitmap, whether an incremental can use it, and bytes changed since.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Argument(help: "The checkpoint.") var name: String
        @Flag(name: .long, help: "Print JSON.") var json = false

        struct Output: Encodable {
            var checkpoint: CheckpointRecord
            var disks: [CheckpointDiskState]
        }

        func run() async throws {
            try await guarded {
                let service = try storeOptions.domains()
                let record = try service.checkpoint(domain: domain, name)
                let states = try await service.checkpointState(domain: domain, name)
                if json { return try printJSON(Output(checkpoint: record, disks: states)) }
                print("Name:        \(record.name)")
                print("Domain:      \(domain)")
                print("Parent:      \(record.parent ?? "-")")
                print("Created:     \(ISO8601DateFormatter().string(from: record.createdAt))")
                if let d = record.description { print("Description: \(d)") }
                for s in states {
                    let changed = s.changedBytes.map { ", \($0) bytes changed since" } ?? ""
                    print(
                        "Disk \(s.target): bitmap \(s.bitmap), \(s.usable ? "usable" : "NOT usable: \(s.problem ?? "")")\(changed)"
                    )
                }
            }
        }
    }

    struct DumpXML: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "dumpxml", abstract: "Print a checkpoint as libvirt <domaincheckpoint> XML.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Argument(help: "The checkpoint.") var name: String
        @Flag(name: .long, help: "Include each disk's bytes changed since (size=), as virsh --size.") var size = false

        func run() async throws {
            try await guarded {
                print(
                    try await storeOptions.domains().checkpointXML(domain: domain, name, withSizes: size),
                    terminator: "")
            }
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "delete",
            abstract:
                "Delete a checkpoint and its bitmaps; its parent's tracking already covers its changes, so incrementals from the parent stay whole."
        )
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Argument(help: "The checkpoint.") var name: String
        @Flag(name: .long, help: "Also delete every checkpoint after it.") var children = false
        @Flag(name: .long, help: "Delete only the checkpoints after it.") var childrenOnly = false
        @Flag(name: .long, help: "Forget the records only; leave the bitmaps in the images.") var metadata = false

        func validate() throws {
            if children && childrenOnly { throw ValidationError("--children and --children-only exclude each other") }
        }

        func run() async throws {
            try await guarded {
                let gone = try await storeOptions.domains().deleteCheckpoint(
                    domain: domain, name, mode: children ? .children : childrenOnly ? .childrenOnly : .only,
                    metadataOnly: metadata)
                print("deleted checkpoint(s) \(gone.joined(separator: ", ")) of domain '\(domain)'")
            }
        }
    }

    struct Redefine: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "redefine",
            abstract: "Record a checkpoint from <domaincheckpoint> XML whose bitmaps the disks already hold.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Argument(help: "The XML file.") var file: String

        func run() async throws {
            try await guarded {
                let data = try RegularFile.read(file, what: "checkpoint XML", limit: 16 << 20)
                let record = try await storeOptions.domains().redefineCheckpoint(
                    domain: domain, xml: String(decoding: data, as: UTF8.self))
                print("redefined checkpoint '\(record.name)' of domain '\(domain)'")
            }
        }
    }
}
