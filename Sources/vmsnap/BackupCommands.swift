import ArgumentParser
import DomainSnapshots
import Foundation
import HypervisorDriver
import SnapshotCore

/// `vmsnap backup ...`: full and incremental backups, pushed into a directory or pulled over NBD.
struct BackupCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backup",
        abstract: "Back up a domain's disks: push (vmsnap writes qcow2 images) or pull (clients read NBD exports).",
        subcommands: [Begin.self, Status.self, End.self, Verify.self, Restore.self]
    )

    struct Begin: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "begin",
            abstract:
                "Begin a backup. With --target DIR: push, waits until every disk is copied and checked. Without: pull, prints each disk's NBD URI and keeps the exports until `backup end`."
        )
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain (running or shut off).") var domain: String
        @Option(name: .long, help: "Push into this directory (its vmsnap-backups.json records the chain).")
        var target: String?
        @Option(name: .long, help: "Copy only the blocks changed since this checkpoint.") var incremental: String?
        @Option(name: .long, help: "Take this checkpoint at the backup's instant (the next incremental's base).")
        var checkpoint: String?
        @Option(name: .long, parsing: .upToNextOption, help: "Only these disk targets.") var disks: [String] = []
        @Flag(name: .long, help: "When the checkpoint cannot be trusted, take a full backup (saying why).")
        var fallbackFull = false
        @OptionGroup var listen: ListenerOptions
        @Flag(name: .long, help: "Print the job as JSON (progress as JSON lines).") var json = false

        func validate() throws {
            if listen.tcp != nil, target != nil {
                throw ValidationError("--tcp is for pull backups; drop --target or --tcp")
            }
        }

        func run() async throws {
            try await guarded {
                let job = try await storeOptions.domains(json: json).beginBackup(
                    domain: domain,
                    BackupRequest(
                        directory: target, incremental: incremental, newCheckpoint: checkpoint,
                        targets: disks.isEmpty ? nil : disks, fallbackFull: fallbackFull,
                        listener: try listen.listener()
                    ))
                if json { return try printJSON(job) }
                let kind = job.incrementalFrom.map { "incremental from \($0)" } ?? "full"
                switch job.mode {
                case .push:
                    print("backed up domain '\(domain)' (\(kind)) into \(job.directory ?? ""): backup \(job.name)")
                    for d in job.disks { print("  \(d.target): \(d.destination ?? "")") }
                case .pull:
                    print(
                        "pull backup \(job.name) of domain '\(domain)' (\(kind)) is exported; `vmsnap backup end \(domain)` when done"
                    )
                    for d in job.disks {
                        let bitmap = job.incrementalFrom.map { "  (changed blocks: qemu:dirty-bitmap:\($0))" } ?? ""
                        print("  \(d.target): \(d.uri ?? "")\(bitmap)")
                    }
                }
                if let why = job.fullBecause { print("full, not incremental: \(why)") }
            }
        }
    }

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "status",
            abstract: "Show the domain's backup job, with bytes done and left.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String
        @Flag(name: .long, help: "Print JSON.") var json = false

        func run() async throws {
            try await guarded {
                guard let status = try await storeOptions.domains().backupStatus(domain: domain) else {
                    if json { return print("null") }
                    return print("domain '\(domain)' has no backup job")
                }
                if json { return try printJSON(status) }
                let job = status.job
                print(
                    "Backup:   \(job.name) (\(job.mode.rawValue), \(job.incrementalFrom.map { "incremental from \($0)" } ?? "full"))"
                )
                print("Started:  \(ISO8601DateFormatter().string(from: job.startedAt))")
                if let done = status.done, let total = status.total {
                    print("Progress: \(done) of \(total) bytes, \(total > done ? total - done : 0) left")
                }
                for d in job.disks { print("Disk \(d.target): \(d.uri ?? d.destination ?? "")") }
                if let p = status.problem { print("Problem:  \(p)") }
            }
        }
    }

    struct End: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "end",
            abstract: "End the domain's backup job: exports, views and scratch images go.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The domain.") var domain: String

        func run() async throws {
            try await guarded {
                let job = try await storeOptions.domains().endBackup(domain: domain)
                print("ended backup \(job.name) of domain '\(domain)'")
            }
        }
    }

    struct Verify: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "verify",
            abstract: "Check every image of a backup's chains in a push directory; changes nothing.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The backup directory.") var directory: String
        @Option(name: .long, help: "The backup (default: the newest).") var backup: String?
        @Flag(name: .long, help: "Print JSON.") var json = false

        func run() async throws {
            try await guarded {
                let report = try await storeOptions.domains().verifyBackup(directory: directory, backup: backup)
                if json { return try printJSON(report) }
                print("backup \(report.backup) is sound")
                for (t, chain) in report.chains.sorted(by: { $0.key < $1.key }) {
                    print("  \(t): \(chain.map { ($0 as NSString).lastPathComponent }.joined(separator: " <- "))")
                }
            }
        }
    }

    struct Restore: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "restore",
            abstract:
                "Rebuild disks from a backup chain into standalone images (checked and compared with the chain), optionally as a new domain."
        )
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The backup directory.") var directory: String
        @Option(name: .long, help: "The backup (default: the newest).") var backup: String?
        @Option(name: .long, help: "Where the restored images go.") var to: String
        @Option(name: .long, parsing: .upToNextOption, help: "Only these disk targets.") var disks: [String] = []
        @Option(name: .long, help: "Image format: qcow2 (default) or raw.") var format = "qcow2"
        @Option(name: .long, help: "Define a new domain with this name on the restored disks.") var define: String?
        @Flag(name: .long, help: "Print JSON.") var json = false

        func run() async throws {
            try await guarded {
                let report = try await storeOptions.domains(json: json).restoreBackup(
                    directory: directory, backup: backup, targets: disks.isEmpty ? nil : disks, outputDirectory: to,
                    format: format, define: define)
                if json { return try printJSON(report) }
                print("restored backup \(report.backup)")
                for (t, path) in report.disks.sorted(by: { $0.key < $1.key }) { print("  \(t): \(path)") }
                if let d = report.defined { print("defined domain '\(d)' on the restored disks") }
            }
        }
    }
}

/// Where NBD exports listen: the domain's Unix socket unless `--tcp` is given.
struct ListenerOptions: ParsableArguments {
    @Option(
        name: .long,
        help: ArgumentHelp(
            "Listen on TCP at [HOST:]PORT instead of the Unix socket (HOST defaults to 127.0.0.1).",
            valueName: "host:port"))
    var tcp: String?
    @Option(
        name: .long,
        help: ArgumentHelp(
            "With --tcp: require TLS with the x509 files in DIR (ca-cert.pem, server-cert.pem, server-key.pem).",
            valueName: "dir"))
    var tlsDir: String?

    func validate() throws {
        if let tcp, Self.parse(tcp) == nil {
            throw ValidationError("--tcp takes [HOST:]PORT with a port from 1 to 65535, not '\(tcp)'")
        }
        if tlsDir != nil, tcp == nil { throw ValidationError("--tls-dir needs --tcp (a Unix socket needs no TLS)") }
    }

    static func parse(_ text: String) -> (host: String, port: Int)? {
        var host = "127.0.0.1"
        var portText = text
        if let colon = text.lastIndex(of: ":") {
            host = String(text[..<colon]).trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
            portText = String(text[text.index(after: colon)...])
        }
        guard let port = Int(portText), (1...65535).contains(port), !host.isEmpty else { return nil }
        return (host, port)
    }

    /// The listener asked for (nil: the default Unix socket); a TLS directory is checked first.
    func listener() throws -> ExportListener? {
        guard let tcp, let (host, port) = Self.parse(tcp) else { return nil }
        let dir = tlsDir.map { URL(fileURLWithPath: $0).standardizedFileURL.path }
        if let dir { try ExportListener.checkTLSDirectory(dir) }
        return .tcp(host: host, port: port, tlsDirectory: dir)
    }
}
