import ArgumentParser
import DomainSnapshots
import Foundation
import SnapshotCore

/// `vmsnap domain adopt`: a domain the hypervisor runs that an operator created with its own tools.
struct DomainAdopt: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "adopt",
        abstract: "Bring a running domain made with the hypervisor's own tools (xl create) under vmsnap.",
        discussion: """
            The driver reads the domain's configuration back (Xen: through libxl); each disk goes to the backend \
            that declares its format and source type. What vmsnap does not model (network interfaces, other \
            devices) is listed by name: a revert recreates the domain without it. Nothing on storage changes.
            """)
    @OptionGroup var storeOptions: StoreOptions
    @Argument(help: "The domain, by the hypervisor's name for it.") var domain: String
    @Option(name: .long, help: "The hypervisor driver that runs it.") var hypervisor = "xen"
    @Flag(name: .long, help: "Print JSON.") var json = false

    func run() async throws {
        try await guarded {
            let report = try await storeOptions.domains(json: json).adoptDomain(domain, hypervisor: hypervisor)
            if json { return try printJSON(report) }
            print(
                "adopted \(report.hypervisor) domain '\(report.domain)': disks \(report.disks.sorted { $0.key < $1.key }.map { "\($0.key) (\($0.value))" }.joined(separator: ", "))"
            )
            for item in report.kept { print("kept as the hypervisor has it: \(item)") }
            for item in report.notAdopted { print("not adopted: \(item)") }
        }
    }
}

/// `vmsnap domain import`: a libvirt domain with its whole snapshot tree.
struct DomainImport: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import",
        abstract:
            "Import a libvirt domain and its snapshot tree (internal snapshots, backing chains of external ones).",
        discussion: """
            Either from a running libvirtd (--libvirt NAME: vmsnap reads the domain and every snapshot through virsh), \
            or from files: the domain's `virsh dumpxml` and each snapshot's `virsh snapshot-dumpxml` (--snapshot, any \
            order). Disks go to the backend that declares their driver and source types; what vmsnap does not model is \
            listed by name. Nothing on storage changes.
            """)
    @OptionGroup var storeOptions: StoreOptions
    @Argument(help: "The domain XML file (virsh dumpxml output); not with --libvirt.") var file: String?
    @Option(name: .long, help: "A snapshot XML file (repeatable).") var snapshot: [String] = []
    @Option(name: .long, help: "The snapshot that is current.") var current: String?
    @Option(name: .long, help: "Read the domain NAME from libvirtd.") var libvirt: String?
    @Option(name: .long, help: "libvirt connection URI (default: virsh's).") var connect: String?
    @Flag(name: .long, help: "Print JSON.") var json = false

    func validate() throws {
        guard (file == nil) != (libvirt == nil) else {
            throw ValidationError("give the domain XML file or --libvirt NAME (one of them)")
        }
        if libvirt != nil, !snapshot.isEmpty || current != nil {
            throw ValidationError(
                "--libvirt reads the snapshots and the current one from libvirtd; drop --snapshot / --current")
        }
    }

    func run() async throws {
        try await guarded {
            var domainXML: String, snapshotXMLs: [String], current = self.current
            var checkpointXMLs: [String] = []
            if let libvirt {
                (domainXML, snapshotXMLs, current) = try await Self.readFromLibvirt(libvirt, connect: connect)
                checkpointXMLs = try await Self.checkpointsFromLibvirt(libvirt, connect: connect)
            } else {
                domainXML = String(
                    decoding: try RegularFile.read(file!, what: "domain XML", limit: 16 << 20), as: UTF8.self)
                snapshotXMLs = try snapshot.map {
                    String(decoding: try RegularFile.read($0, what: "snapshot XML", limit: 16 << 20), as: UTF8.self)
                }
            }
            let report = try await storeOptions.domains(json: json).importDomain(
                domainXML: domainXML, snapshotXMLs: snapshotXMLs, current: current, checkpointXMLs: checkpointXMLs)
            if json { return try printJSON(report) }
            print(
                "imported domain '\(report.domain)': disks \(report.disks.sorted { $0.key < $1.key }.map { "\($0.key) (\($0.value))" }.joined(separator: ", "))"
            )
            print(
                "snapshots: \(report.snapshots.isEmpty ? "none" : report.snapshots.joined(separator: ", "))\(report.current.map { "; current \($0)" } ?? "")"
            )
            if !report.checkpoints.isEmpty { print("checkpoints: \(report.checkpoints.joined(separator: ", "))") }
            for item in report.notImported { print("not imported: \(item)") }
        }
    }

    /// The domain's checkpoints' XML, parents first, through virsh (none where libvirt has none).
    static func checkpointsFromLibvirt(_ name: String, connect: String?) async throws -> [String] {
        let runner = SubprocessRunner()
        let base = ["virsh", "-q"] + (connect.map { ["-c", $0] } ?? [])
        let list = try await runner.execute(base + ["checkpoint-list", "--name", "--topological", "--", name])
        guard list.status == 0 else { return [] }
        var xmls: [String] = []
        for n in list.standardOutput.split(whereSeparator: \.isNewline).map({ $0.trimmingCharacters(in: .whitespaces) })
        where !n.isEmpty {
            xmls.append(
                try await runner.run(base + ["checkpoint-dumpxml", "--no-domain", "--", name, n]).standardOutput)
        }
        return xmls
    }

    /// The domain's XML, its snapshots' XML (parents first) and the current snapshot, through virsh.
    static func readFromLibvirt(_ name: String, connect: String?) async throws -> (String, [String], String?) {
        let runner = SubprocessRunner()
        let base = ["virsh", "-q"] + (connect.map { ["-c", $0] } ?? [])
        func virsh(_ args: String...) async throws -> String {
            do { return try await runner.run(base + args).standardOutput } catch let e as CommandError {
                throw SnapshotError(.notFound, "libvirt: \(e.description)")
            }
        }
        let domain = try await virsh("dumpxml", "--inactive", "--", name)
        let names = try await virsh("snapshot-list", "--name", "--topological", "--", name)
            .split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        var xmls: [String] = []
        for n in names { xmls.append(try await virsh("snapshot-dumpxml", "--", name, n)) }
        let current =
            names.isEmpty
            ? nil
            : (try? await virsh("snapshot-current", "--name", "--", name))?.trimmingCharacters(
                in: .whitespacesAndNewlines)
        return (domain, xmls, current?.isEmpty == false ? current : nil)
    }
}

/// `vmsnap domain export`: the domain and its snapshots as libvirt reads them back.
struct DomainExportCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract:
            "Write a domain's libvirt XML, its snapshots' and its checkpoints' XML (parents first) into a directory, for virsh define, snapshot-create --redefine and checkpoint-create --redefine."
    )
    @OptionGroup var storeOptions: StoreOptions
    @Argument(help: "The domain.") var domain: String
    @Option(name: .long, help: "The directory to write into (created; must be empty if it exists).") var to: String

    func run() async throws {
        try await guarded {
            let export = try await storeOptions.domains().exportDomain(domain)
            let fm = FileManager.default
            if fm.fileExists(atPath: to), !((try? fm.contentsOfDirectory(atPath: to)) ?? []).isEmpty {
                throw SnapshotError(.alreadyExists, "\(to) is not empty; give a new or empty directory")
            }
            try fm.createDirectory(
                atPath: to + "/snapshots", withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            try export.domainXML.write(toFile: to + "/domain.xml", atomically: true, encoding: .utf8)
            var commands = ["virsh define \(to)/domain.xml"]
            for (i, s) in export.snapshots.enumerated() {
                let file = "\(to)/snapshots/\(String(format: "%03d", i + 1)).xml"
                try s.xml.write(toFile: file, atomically: true, encoding: .utf8)
                commands.append(
                    "virsh snapshot-create \(domain) \(file) --redefine\(s.name == export.current ? " --current" : "")")
            }
            if !export.checkpoints.isEmpty {
                try fm.createDirectory(
                    atPath: to + "/checkpoints", withIntermediateDirectories: true,
                    attributes: [.posixPermissions: 0o700])
            }
            for (i, c) in export.checkpoints.enumerated() {
                let file = "\(to)/checkpoints/\(String(format: "%03d", i + 1)).xml"
                try c.xml.write(toFile: file, atomically: true, encoding: .utf8)
                commands.append("virsh checkpoint-create \(domain) \(file) --redefine")
            }
            print(
                "exported domain '\(domain)', \(export.snapshots.count) snapshot(s) and \(export.checkpoints.count) checkpoint(s) to \(to); to define them in libvirt, in this order:"
            )
            commands.forEach { print("  \($0)") }
        }
    }
}
