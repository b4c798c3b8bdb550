import ArgumentParser
import DomainSnapshots
import Foundation
import HypervisorDriver
import QEMUDriver
import XenDriver
import SnapshotCore

extension StoreOptions {
    /// This program, for the processes it starts of itself (disk servers).
    static var executable: String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }

    func domains(json: Bool = false) throws -> DomainService {
        let show = json || isatty(STDERR_FILENO) == 1
        var reporter: (@Sendable (ProgressReport) -> Void)?
        if show { reporter = { @Sendable (report: ProgressReport) -> Void in showProgress(report, json: json) } }
        let disks = try service()
        return DomainService(
            disks: disks, drivers: Hypervisors.drivers(storeDirectory: disks.store.directory), progress: reporter,
            diskServerCommand: [Self.executable, "disk", "serve", "--store", disks.store.directory])
    }
}

/// The hypervisor drivers this build carries: the one place they are registered.
enum Hypervisors {
    static func drivers(storeDirectory: String) -> HypervisorDrivers {
        HypervisorDrivers([QEMUDriver(storeDirectory: storeDirectory), XenDriver()])
    }
}

/// Progress on a terminal (one line, rewritten) or, with `--json`, as JSON lines; on stderr
/// either way, so that stdout holds only the command's one JSON document.
@Sendable func showProgress(_ report: ProgressReport, json: Bool) {
    if json {
        if let line = try? jsonLine(report) { FileHandle.standardError.write(Data((line + "\n").utf8)) }
        return
    }
    let pct = report.total > 0 ? Double(report.done) * 100 / Double(report.total) : 0
    let eta = report.secondsLeft.map { String(format: ", %.0f s left", $0) } ?? ""
    let mib = Double(1 << 20)
    let text =
        "\r\(report.phase): "
        + String(
            format: "%.0f%% (%.0f of %.0f MiB, %.0f MiB/s", pct, Double(report.done) / mib, Double(report.total) / mib,
            report.bytesPerSecond / mib) + eta + ")   "
    FileHandle.standardError.write(Data(text.utf8))
}

extension DomainRunState: ExpressibleByArgument {}
extension DeleteMode: ExpressibleByArgument {}

/// `vmsnap domain ...`: virtual machines vmsnap launches and snapshots.
struct DomainCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "domain",
        abstract: "Define, start, stop and inspect domains (virtual machines run by QEMU or Xen).",
        subcommands: [
            Define.self, List.self, Start.self, Stop.self, Suspend.self, Resume.self, Status.self, Undefine.self,
            DomainImport.self, DomainAdopt.self, DomainExportCommand.self,
        ]
    )

    struct Define: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "define",
            abstract:
                "Define (or update) a domain from a JSON file: name, uuid, memoryMiB, vcpus, disks [{target, backend, locator}], boot {kernel, initrd, cmdline}, hypervisor (qemu, or xen for a PV guest through libxl), accel, qemuArgs, firmware {code, vars, template} (UEFI), tpm {state, model} (an emulated TPM 2.0 through swtpm), memoryBacking {hugepageMiB: 2 or 1024} (guest RAM in the host's reserved huge pages, taken at start: the shortest pause for a live snapshot under TCG)."
        )
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The definition file (JSON).") var file: String

        func run() async throws {
            try await guarded {
                let data = try RegularFile.read(file, what: "domain definition", limit: 1 << 20)
                let definition: DomainDefinition
                do { definition = try JSONDecoder().decode(DomainDefinition.self, from: data) } catch {
                    throw SnapshotError(
                        .invalidArgument,
                        "\(file) is not a valid domain definition: \(Self.explain(error)); see `vmsnap domain define --help` for the fields"
                    )
                }
                try await storeOptions.domains().define(definition)
                print("defined domain '\(definition.name)' (\(definition.uuid.uuidString.lowercased()))")
            }
        }

        static func explain(_ error: any Error) -> String {
            switch error {
            case DecodingError.keyNotFound(let key, _): return "field '\(key.stringValue)' is missing"
            case DecodingError.typeMismatch(_, let c), DecodingError.valueNotFound(_, let c):
                return "field '\(c.codingPath.map(\.stringValue).joined(separator: "."))' has the wrong type"
            case DecodingError.dataCorrupted(let c):
                if c.codingPath.isEmpty { return c.underlyingError != nil ? "it is not JSON" : c.debugDescription }
                return "field '\(c.codingPath.map(\.stringValue).joined(separator: "."))': \(c.debugDescription)"
            default: return "\(error)"
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List domains and their states.")
        @OptionGroup var storeOptions: StoreOptions
        @Flag(name: .long, help: "Print JSON.") var json = false

        func run() async throws {
            try await guarded {
                let all = try await storeOptions.domains().list()
                if json { return try printJSON(all) }
                for d in all {
                    print(
                        "\(d.name)\t\(d.state.rawValue)\t\(d.snapshotCount) snapshot(s)\tcurrent: \(d.currentSnapshot ?? "-")"
                    )
                }
            }
        }
    }

    struct Start: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "start", abstract: "Start a domain.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Flag(name: .long, help: "Start with the vCPUs paused.") var paused = false

        func run() async throws {
            try await guarded {
                try await storeOptions.domains().start(domain, paused: paused)
                print("started domain '\(domain)'\(paused ? " (paused)" : "")")
            }
        }
    }

    struct Stop: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "stop",
            abstract: "Stop a domain: ask the guest to power off, or with --force stop it at once.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Flag(name: .long, help: "Stop at once, like pulling the plug.") var force = false
        @Option(name: .long, help: "Seconds to wait for the guest to power off.") var timeout: Int = 60

        func run() async throws {
            try await guarded {
                try await storeOptions.domains().stop(domain, force: force, timeout: .seconds(timeout))
                print("stopped domain '\(domain)'")
            }
        }
    }

    struct Suspend: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "suspend", abstract: "Pause a running domain's vCPUs.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        func run() async throws { try await guarded { try await storeOptions.domains().setPaused(domain, true) } }
    }

    struct Resume: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "resume", abstract: "Resume a paused domain.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        func run() async throws { try await guarded { try await storeOptions.domains().setPaused(domain, false) } }
    }

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "status", abstract: "A domain's state, process and current snapshot.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Flag(name: .long, help: "Print JSON.") var json = false

        func run() async throws {
            try await guarded {
                let s = try await storeOptions.domains().status(domain)
                if json { return try printJSON(s) }
                print("domain:    \(s.name) (\(s.uuid.uuidString.lowercased()))")
                print("state:     \(s.state.rawValue) (\(s.pid.map { "pid \($0), " } ?? "")\(s.accelerator))")
                print("current:   \(s.currentSnapshot ?? "-")")
                print("snapshots: \(s.snapshotCount)")
            }
        }
    }

    struct Undefine: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "undefine", abstract: "Forget a shut-off domain (its disks stay).")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Flag(name: .long, help: "Also forget its snapshot records (the disk snapshots stay on the disks).")
        var snapshotsMetadata = false

        func run() async throws {
            try await guarded {
                try await storeOptions.domains().undefine(domain, dropSnapshotMetadata: snapshotsMetadata)
                print("undefined domain '\(domain)'")
            }
        }
    }
}

/// `vmsnap snapshot ...`: domain snapshots (every disk, optionally memory).
struct SnapshotCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Snapshots of whole domains: every chosen disk across backends, optionally the guest's memory.",
        subcommands: [Create.self, Revert.self, Delete.self, List.self, Current.self, Info.self, DumpXML.self]
    )

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "create",
            abstract:
                "Take a snapshot: full-system (live) of a running domain by default, disk-only with --disk-only or when shut off."
        )
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Option(name: .long, help: "The snapshot's name (default: snap-<UTC date>-<time>).") var name: String?
        @Option(name: .long, help: "A description kept with the snapshot.") var description: String?
        @Flag(name: .long, help: "Disks only, no memory (crash-consistent while running).") var diskOnly = false
        @Option(name: .long, parsing: .upToNextOption, help: "Only these disk targets (disk-only snapshots).")
        var disks: [String] = []
        @Option(
            name: .long, help: "Disk snapshot kind: internal or external (default: internal where the backend has it).")
        var kind: SnapshotKind?
        @Option(name: .long, help: "Where the memory image goes (default: <store>/memory/<domain>/<name>.vmstate).")
        var memoryFile: String?
        @Option(
            name: .long,
            help:
                "Memory: external (a file, saved live; default) or internal (inside the qcow2 images, guest paused while saving)."
        ) var memory: String = "external"
        @Flag(name: .long, help: "Keep the guest paused for the whole memory save (not live).") var pausedSave = false
        @Flag(name: .long, help: "Freeze guest filesystems through the QEMU guest agent.") var quiesce = false
        @Option(name: .long, help: "Take this checkpoint (changed-block tracking) at the snapshot's instant.")
        var checkpoint: String?
        @Option(name: .long, help: "Import a snapshot record from libvirt <domainsnapshot> XML instead of taking one.")
        var redefine: String?
        @Flag(name: .long, help: "With --redefine: make it the current snapshot.") var current = false
        @Flag(name: .long, help: "Print the result as JSON (progress as JSON lines).") var json = false

        func validate() throws {
            guard ["external", "internal"].contains(memory) else {
                throw ValidationError("--memory takes external or internal, not '\(memory)'")
            }
            if redefine != nil, diskOnly || !disks.isEmpty || kind != nil || memoryFile != nil || name != nil {
                throw ValidationError(
                    "--redefine imports a snapshot as the XML describes it; drop the other snapshot options")
            }
            if current, redefine == nil { throw ValidationError("--current applies to --redefine only") }
        }

        func run() async throws {
            try await guarded {
                let service = try storeOptions.domains(json: json)
                if let redefine {
                    let data = try RegularFile.read(redefine, what: "snapshot XML", limit: 16 << 20)
                    let record = try await service.redefine(
                        domain: domain, xml: String(decoding: data, as: UTF8.self), makeCurrent: current)
                    if json { return try printJSON(record) }
                    return print("redefined snapshot '\(record.name)' of domain '\(domain)'")
                }
                let report = try await service.createSnapshot(
                    domain: domain,
                    DomainSnapshotRequest(
                        name: name, description: description, diskOnly: diskOnly, targets: disks.isEmpty ? nil : disks,
                        kind: kind,
                        memoryFile: memoryFile, internalMemory: memory == "internal", pausedSave: pausedSave,
                        quiesce: quiesce, checkpoint: checkpoint))
                if json { return try printJSON(report) }
                let s = report.snapshot
                let what = s.memory == nil ? "disk-only" : "full-system (\(s.memory!.location.rawValue) memory)"
                print(
                    "created \(what) snapshot '\(s.name)' of domain '\(domain)'\(report.pauseMs.map { String(format: "; guest paused %.1f ms", $0) } ?? "")\(report.frozenFilesystems.map { "; the guest agent froze \($0) filesystem(s) around it" } ?? "")"
                )
            }
        }
    }

    struct Revert: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "revert",
            abstract: "Make the domain what it was at a snapshot: disks, memory and run state.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Argument(help: "The snapshot.") var name: String
        @Flag(name: .long, help: "End running, whatever the snapshot's state.") var running = false
        @Flag(name: .long, help: "End paused, whatever the snapshot's state.") var paused = false
        @Flag(
            name: .long,
            help: "Allow a revert that boots from crash-consistent disks (a disk-only snapshot of a running domain).")
        var force = false
        @Flag(name: .long, help: "Progress as JSON lines.") var json = false

        func validate() throws {
            if running && paused { throw ValidationError("--running and --paused exclude each other") }
        }

        func run() async throws {
            try await guarded {
                try await storeOptions.domains(json: json).revertSnapshot(
                    domain: domain, to: name, runState: running ? .running : (paused ? .paused : nil), force: force)
                print("reverted domain '\(domain)' to '\(name)'")
            }
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "delete",
            abstract: "Delete a snapshot; its disk changes merge into its children (while the domain runs too).")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Argument(help: "The snapshot.") var name: String
        @OptionGroup var deletion: DeleteOptions
        @Flag(name: .long, help: "Progress as JSON lines.") var json = false

        func run() async throws {
            try await guarded {
                try await storeOptions.domains(json: json).deleteSnapshot(
                    domain: domain, name, mode: deletion.mode, metadataOnly: deletion.metadataOnly)
                print(
                    "deleted \(deletion.children ? "snapshot '\(name)' and its children" : deletion.childrenOnly ? "the children of '\(name)'" : "snapshot '\(name)'") of domain '\(domain)'"
                )
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "list", abstract: "List a domain's snapshots, with libvirt's filters.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Flag(name: .long, help: "Print as a tree.") var tree = false
        @Flag(name: .long, help: "Only snapshots without a parent.") var roots = false
        @Flag(name: .long, help: "Only snapshots without children.") var leaves = false
        @Flag(name: .long, help: "Show each snapshot's parent.") var parent = false
        @Option(name: .long, help: "Only the children of this snapshot (with --descendants: all below it).") var from:
            String?
        @Flag(name: .long, help: "With --from: every descendant, not only children.") var descendants = false
        @Flag(name: .long, help: "Only internal snapshots.") var `internal` = false
        @Flag(name: .long, help: "Only external snapshots.") var external = false
        @Flag(name: .long, help: "Only disk-only snapshots.") var diskOnly = false
        @Flag(name: .long, help: "Only snapshots taken while running or paused, with memory.") var active = false
        @Flag(name: .long, help: "Only snapshots taken while shut off.") var inactive = false
        @Flag(name: .long, help: "Only the names, one per line (virsh's --name).") var name = false
        @Flag(name: .long, help: "Print JSON.") var json = false

        func validate() throws {
            if [tree, name, json].filter({ $0 }).count > 1 {
                throw ValidationError("--tree, --name and --json exclude each other")
            }
            if `internal` && external { throw ValidationError("--internal and --external exclude each other") }
            if [diskOnly, active, inactive].filter({ $0 }).count > 1 {
                throw ValidationError("--disk-only, --active and --inactive exclude each other")
            }
            if roots && from != nil { throw ValidationError("--roots and --from exclude each other") }
            if descendants && from == nil { throw ValidationError("--descendants needs --from") }
        }

        func run() async throws {
            try await guarded {
                let (all, current) = try storeOptions.domains().snapshots(of: domain)
                var chosen = all
                if let from {
                    guard all.contains(where: { $0.name == from }) else {
                        throw SnapshotError(.notFound, "domain '\(domain)' has no snapshot named '\(from)'")
                    }
                    let below =
                        descendants
                        ? DomainService.descendantNames(of: from, in: all)
                        : Set(all.filter { $0.parent == from }.map(\.name))
                    chosen = chosen.filter { below.contains($0.name) }
                }
                if roots { chosen = chosen.filter { $0.parent == nil } }
                if leaves { chosen = chosen.filter { s in !all.contains { $0.parent == s.name } } }
                if `internal` { chosen = chosen.filter(\.isInternal) }
                if external { chosen = chosen.filter { !$0.isInternal } }
                if diskOnly { chosen = chosen.filter { $0.isDiskOnly && $0.state != .shutoff } }
                if active { chosen = chosen.filter { $0.memory != nil } }
                if inactive { chosen = chosen.filter { $0.state == .shutoff } }
                if json {
                    struct Entry: Codable {
                        var name: String
                        var parent: String?
                        var state: String
                        var createdAt: Date
                        var memory: String
                        var current: Bool
                        var description: String?
                    }
                    return try printJSON(
                        chosen.map {
                            Entry(
                                name: $0.name, parent: $0.parent,
                                state: $0.isDiskOnly && $0.state != .shutoff ? "disk-snapshot" : $0.state.rawValue,
                                createdAt: $0.createdAt, memory: $0.memory?.location.rawValue ?? "no",
                                current: $0.name == current, description: $0.description)
                        })
                }
                if name {
                    for s in chosen { print(s.name) }
                    return
                }
                if tree {
                    let names = Set(chosen.map(\.name))
                    func show(_ s: DomainSnapshotRecord, _ depth: Int) {
                        print(String(repeating: "  ", count: depth) + s.name + (s.name == current ? " *" : ""))
                        for c in chosen where c.parent == s.name { show(c, depth + 1) }
                    }
                    for s in chosen where s.parent.map({ !names.contains($0) }) ?? true { show(s, 0) }
                    return
                }
                print(parent ? "Name\tCreation Time\tState\tParent" : "Name\tCreation Time\tState")
                for s in chosen {
                    let state = s.isDiskOnly && s.state != .shutoff ? "disk-snapshot" : s.state.rawValue
                    print(
                        "\(s.name)\(s.name == current ? " *" : "")\t\(utcString(s.createdAt))\t\(state)\(parent ? "\t\(s.parent ?? "")" : "")"
                    )
                }
            }
        }
    }

    struct Current: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "current",
            abstract: "Print the current snapshot, or make NAME current (metadata only).")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Argument(help: "The snapshot to make current.") var name: String?

        func run() async throws {
            try await guarded {
                let service = try storeOptions.domains()
                if let name { return try service.setCurrent(domain: domain, name) }
                guard let current = try service.snapshots(of: domain).current else {
                    throw SnapshotError(.notFound, "domain '\(domain)' has no current snapshot")
                }
                print(current)
            }
        }
    }

    struct Info: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "info", abstract: "Details of one snapshot.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Argument(help: "The snapshot.") var name: String
        @Flag(name: .long, help: "Print JSON.") var json = false

        func run() async throws {
            try await guarded {
                let service = try storeOptions.domains()
                let s = try service.info(domain: domain, name)
                if json { return try printJSON(s) }
                let (all, current) = try service.snapshots(of: domain)
                print("name:        \(s.name)")
                print("domain:      \(s.domain)")
                print("created:     \(utcString(s.createdAt))")
                print("state:       \(s.isDiskOnly && s.state != .shutoff ? "disk-snapshot" : s.state.rawValue)")
                print("current:     \(s.name == current ? "yes" : "no")")
                print("parent:      \(s.parent ?? "-")")
                print("children:    \(all.filter { $0.parent == s.name }.count)")
                print("location:    \(s.isInternal ? "internal" : "external")")
                print(
                    "memory:      \(s.memory.map { "\($0.location.rawValue) \($0.path)\($0.size.map { " (\($0) bytes)" } ?? "")" } ?? "no")"
                )
                for d in s.disks {
                    print("disk \(d.target):    \(d.kind?.rawValue ?? "not included") (\(d.backend), \(d.diskID))")
                }
                if let d = s.description { print("description: \(d)") }
            }
        }
    }

    struct DumpXML: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "dumpxml", abstract: "Print a snapshot as libvirt <domainsnapshot> XML.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Argument(help: "The snapshot.") var name: String

        func run() async throws {
            try await guarded { print(try storeOptions.domains().dumpXML(domain: domain, name), terminator: "") }
        }
    }
}
