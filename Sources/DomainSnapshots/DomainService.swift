import Foundation
import HypervisorDriver
import SnapshotCore

/// A domain and what it is doing now.
public struct DomainStatus: Codable, Sendable, Hashable {
    public var name: String
    public var uuid: UUID
    public var state: DomainRunState
    public var pid: Int32?
    public var currentSnapshot: String?
    public var snapshotCount: Int
    public var accelerator: String
}

/// `VMSNAP_DOMAIN_FAULT=<operation>:<phase>`: the process kills itself when a domain operation
/// reaches that phase; `qemu@<operation>:<phase>` (the prefix is the hypervisor's name) kills the
/// domain's hypervisor process there instead; `delay<seconds>@<operation>:<phase>` waits there
/// (slow storage, as seen from the guest). Several, comma-separated. Tests use it to check
/// recovery from each step and from a hypervisor that dies mid-operation.
enum DomainFault {
    static let specs = ProcessInfo.processInfo.environment["VMSNAP_DOMAIN_FAULT"]?.split(separator: ",").map {
        $0.trimmingCharacters(in: .whitespaces)
    }
    static func point(_ phase: String, hypervisor: (name: String, pid: Int32?)? = nil) {
        for spec in specs ?? [] {
            if spec == phase {
                FileHandle.standardError.write(
                    Data("vmsnap: fault injection: killing myself at domain phase \(phase)\n".utf8))
                kill(getpid(), SIGKILL)
            } else if let hypervisor, spec == hypervisor.name + "@" + phase, let pid = hypervisor.pid {
                FileHandle.standardError.write(
                    Data(
                        "vmsnap: fault injection: killing the hypervisor (pid \(pid)) at domain phase \(phase)\n".utf8))
                kill(pid, SIGKILL)
            } else if spec.hasPrefix("delay"), spec.hasSuffix("@" + phase),
                let seconds = Double(spec.dropFirst(5).dropLast(phase.count + 1))
            {
                FileHandle.standardError.write(
                    Data("vmsnap: fault injection: waiting \(seconds) s at domain phase \(phase)\n".utf8))
                Thread.sleep(forTimeInterval: seconds)
            }
        }
    }
}

/// Domains and their snapshots: composes the disk backends, the hypervisor drivers and the store.
public struct DomainService: Sendable {
    public let disks: DiskSnapshotService
    public let drivers: HypervisorDrivers
    public var progress: ProgressHandler?
    /// The command that starts vmsnap's disk server (`vmsnap disk serve` with the store), for
    /// disks a hypervisor cannot open (DiskServers.swift); nil: such disks cannot run.
    public var diskServerCommand: [String]?

    public var store: MetadataStore { disks.store }
    var notify: @Sendable (String) -> Void { disks.notify }

    public init(
        disks: DiskSnapshotService, drivers: HypervisorDrivers, progress: ProgressHandler? = nil,
        diskServerCommand: [String]? = nil
    ) {
        self.diskServerCommand = diskServerCommand
        self.disks = disks
        self.drivers = drivers
        self.progress = progress
    }

    /// The driver of a defined domain's hypervisor.
    func driver(_ domain: String) throws -> any HypervisorDriver {
        try drivers.driver(for: try definition(domain).definition)
    }

    /// For fault injection: the hypervisor's name and process.
    func hypervisorProcess(_ domain: String) -> (name: String, pid: Int32?)? {
        (try? driver(domain)).map { ($0.name, $0.pid(domain)) }
    }

    // MARK: - Domains

    /// Records a domain from its definition after checking that every disk exists and a
    /// backend manages it.
    public func define(_ definition: DomainDefinition) async throws {
        try definition.validate()
        let driver = try drivers.driver(for: definition)
        try driver.validate(definition)
        let others = try store.domains().filter { $0.name != definition.name }
        for disk in definition.disks {
            do {
                let (_, layout) = try await disks.manage(disk.locator, kind: disk.backend)
                for other in others {
                    for theirs in other.disks {
                        guard let id = try? await disks.layout(of: theirs.locator, kind: theirs.backend).1.disk.id,
                            id == layout.disk.id
                        else { continue }
                        throw SnapshotError(
                            .conflict,
                            "domain '\(definition.name)', disk \(disk.target): \(disk.locator) is disk \(theirs.target) of domain '\(other.name)' already; one disk belongs to one domain (two guests writing it would corrupt it)"
                        )
                    }
                }
            } catch let e as SnapshotError {
                throw SnapshotError(e.code, "domain '\(definition.name)', disk \(disk.target): \(e.message)")
            }
        }
        if let kernel = definition.boot.kernel, !FileManager.default.isReadableFile(atPath: kernel) {
            throw SnapshotError(.notFound, "domain '\(definition.name)': kernel \(kernel) is missing or unreadable")
        }
        if let initrd = definition.boot.initrd, !FileManager.default.isReadableFile(atPath: initrd) {
            throw SnapshotError(.notFound, "domain '\(definition.name)': initrd \(initrd) is missing or unreadable")
        }
        try Self.checkDeviceStateOwnership(definition, others: others)
        try Self.prepareDeviceState(definition)
        if let (old, _) = try store.domain(named: definition.name), driver.isRunning(old.name),
            old.disks != definition.disks || old.firmware != definition.firmware || old.tpm != definition.tpm
        {
            throw SnapshotError(
                .inUse, "domain '\(definition.name)' is running; stop it before changing its disks, firmware or TPM")
        }
        try store.define(definition)
    }

    public func definition(_ name: String) throws -> (definition: DomainDefinition, current: String?) {
        guard let found = try store.domain(named: name) else {
            let known = (try? store.domains().map(\.name).prefix(10).joined(separator: ", ")) ?? ""
            throw SnapshotError(
                .notFound,
                "no domain named '\(name)' (defined: \(known.isEmpty ? "none" : known)); define it with `vmsnap domain define FILE`"
            )
        }
        return found
    }

    /// The run state, as the domain's hypervisor reports it.
    public func runState(_ name: String) async throws -> DomainRunState {
        try await driver(name).runState(name)
    }

    public func status(_ name: String) async throws -> DomainStatus {
        let (definition, current) = try definition(name)
        let driver = try drivers.driver(for: definition)
        return DomainStatus(
            name: name, uuid: definition.uuid, state: try await driver.runState(name), pid: driver.pid(name),
            currentSnapshot: current, snapshotCount: try store.domainSnapshots(of: name).count,
            accelerator: driver.accelerator(definition))
    }

    public func list() async throws -> [DomainStatus] {
        var out: [DomainStatus] = []
        for d in try store.domains() { out.append(try await status(d.name)) }
        return out
    }

    /// The drives the hypervisor opens: each disk's active layer as its backend says to open it.
    func drives(_ definition: DomainDefinition) async throws -> [DomainDrive] {
        var drives: [DomainDrive] = []
        for disk in definition.disks {
            let (backend, layout) = try await disks.manage(disk.locator, kind: disk.backend)
            let drive: HypervisorDrive
            do { drive = try backend.hypervisorDrive(layout) } catch let e as SnapshotError {
                throw SnapshotError(e.code, "domain '\(definition.name)', disk \(disk.target): \(e.message)")
            }
            drives.append(DomainDrive(target: disk.target, drive: drive))
        }
        return drives
    }

    /// Boots the domain (paused with `paused`).
    public func start(_ name: String, paused: Bool = false) async throws {
        let lock = try domainLock(name)
        defer { withExtendedLifetime(lock) {} }
        try await recover(domain: name)
        let (definition, _) = try definition(name)
        let driver = try drivers.driver(for: definition)
        guard !driver.isRunning(name) else { throw SnapshotError(.conflict, "domain '\(name)' is running already") }
        if driver.storageDaemonRuns(name) {
            throw SnapshotError(
                .busy,
                "a backup or block snapshot of shut-off domain '\(name)' holds its disks; end it first (`vmsnap backup end \(name)`, `vmsnap blocksnapshot delete \(name) NAME`)"
            )
        }
        let drives = try await startDrives(definition, driver: driver)
        do {
            try await driver.start(definition, drives: drives, mode: .boot(paused: paused), progress: progress)
        } catch {
            stopDiskServers(name)
            throw error
        }
    }

    /// Stops the domain: with `force` at once (like pulling the plug), else by asking the guest to
    /// power off and waiting up to `timeout`.
    public func stop(_ name: String, force: Bool, timeout: Duration = .seconds(60)) async throws {
        // Interrupted work first, while the hypervisor still runs and knows which image each
        // disk has open. `--force` does not wait for another vmsnap, and stops even when the
        // recovery fails (the journal stays for `vmsnap recover`).
        let lock: DiskLock?
        do { lock = try DiskLock(store: store, diskID: "domain:" + name, timeout: force ? 0 : 30) } catch  where force {
            notify("another vmsnap works on domain '\(name)' (\(error)); stopping it without recovering first")
            lock = nil
        }
        defer { withExtendedLifetime(lock) {} }
        let driver = try driver(name)
        guard driver.isRunning(name) else { throw SnapshotError(.conflict, "domain '\(name)' is not running") }
        if lock != nil {
            do { try await recover(domain: name) } catch  where force {
                notify(
                    "recovering domain '\(name)' failed: \(error); stopping it anyway; `vmsnap recover` finishes offline"
                )
            }
        }
        if force {
            try await driver.destroy(name)
            stopDiskServers(name)
            return
        }
        defer { if !driver.isRunning(name) { stopDiskServers(name) } }
        guard try await driver.shutdown(name, timeout: timeout) else {
            throw SnapshotError(
                .busy,
                "domain '\(name)' did not power off within \(timeout); its guest may ignore ACPI. Use `vmsnap domain stop --force` to stop it at once"
            )
        }
    }

    /// Pauses or resumes the vCPUs.
    public func setPaused(_ name: String, _ paused: Bool) async throws {
        // Interrupted work first: a guest a killed vmsnap stopped for a held disk's switch back
        // must not run on before the journal knows the switch happened.
        let lock = try domainLock(name)
        defer { withExtendedLifetime(lock) {} }
        try await recover(domain: name)
        let driver = try driver(name)
        if paused { try await driver.pause(name) } else { try await driver.resume(name) }
    }

    /// Forgets a domain. Refused while it runs, and while it has snapshots unless
    /// `dropSnapshotMetadata` (the disk snapshots stay on the disks).
    public func undefine(_ name: String, dropSnapshotMetadata: Bool) async throws {
        guard try !driver(name).isRunning(name) else {
            throw SnapshotError(.inUse, "domain '\(name)' is running; stop it first")
        }
        let snapshots = try store.domainSnapshots(of: name)
        if !snapshots.isEmpty, !dropSnapshotMetadata {
            throw SnapshotError(
                .conflict,
                "domain '\(name)' has \(snapshots.count) snapshot(s); delete them first, or pass --snapshots-metadata to forget their records (the disk snapshots stay on the disks)"
            )
        }
        try store.undefine(domain: name)
    }

    func domainLock(_ name: String) throws -> DiskLock {
        try DiskLock(store: store, diskID: "domain:" + name)
    }

    /// The guest's console log (appended across launches).
    public func serialLog(_ name: String) throws -> String { try driver(name).consoleLog(name) }
}
