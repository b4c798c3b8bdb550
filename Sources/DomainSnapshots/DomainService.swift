import Foundation
import QEMUDriver
import SnapshotCore

/// Progress of a long step (memory save or restore, merge), for terminals and `--json`.
public struct ProgressReport: Codable, Sendable, Hashable {
    public var phase: String
    public var done: UInt64
    public var total: UInt64
    public var bytesPerSecond: Double
    public var secondsLeft: Double?
}

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
/// reaches that phase; `qemu@<operation>:<phase>` kills the domain's QEMU there instead. Tests
/// use it to check recovery from each step and from a hypervisor that dies mid-operation.
enum DomainFault {
    static let spec = ProcessInfo.processInfo.environment["VMSNAP_DOMAIN_FAULT"]
    static func point(_ phase: String, qemu: QEMURuntime? = nil) {
        guard let spec else { return }
        if spec == phase {
            FileHandle.standardError.write(Data("vmsnap: fault injection: killing myself at domain phase \(phase)\n".utf8))
            kill(getpid(), SIGKILL)
        } else if spec == "qemu@" + phase, let pid = qemu?.pid() {
            FileHandle.standardError.write(Data("vmsnap: fault injection: killing QEMU (pid \(pid)) at domain phase \(phase)\n".utf8))
            kill(pid, SIGKILL)
        }
    }
}

/// Domains and their snapshots: composes the disk backends, the QEMU driver and the store.
public struct DomainService: Sendable {
    public let disks: DiskSnapshotService
    public let driver: QEMUDriver
    public var progress: (@Sendable (ProgressReport) -> Void)?

    public var store: MetadataStore { disks.store }
    var notify: @Sendable (String) -> Void { disks.notify }

    public init(disks: DiskSnapshotService, driver: QEMUDriver = QEMUDriver(), progress: (@Sendable (ProgressReport) -> Void)? = nil) {
        self.disks = disks
        self.driver = driver
        self.progress = progress
    }

    func runtime(_ domain: String) -> QEMURuntime { QEMURuntime(storeDirectory: store.directory, domain: domain) }

    // MARK: - Domains

    /// Records a domain from its definition after checking that every disk exists and a
    /// backend manages it.
    public func define(_ definition: DomainDefinition) async throws {
        try definition.validate()
        for disk in definition.disks {
            do { _ = try await disks.manage(disk.locator, kind: disk.backend) } catch let e as SnapshotError {
                throw SnapshotError(e.code, "domain '\(definition.name)', disk \(disk.target): \(e.message)")
            }
        }
        if let kernel = definition.boot.kernel, !FileManager.default.isReadableFile(atPath: kernel) {
            throw SnapshotError(.notFound, "domain '\(definition.name)': kernel \(kernel) is missing or unreadable")
        }
        if let initrd = definition.boot.initrd, !FileManager.default.isReadableFile(atPath: initrd) {
            throw SnapshotError(.notFound, "domain '\(definition.name)': initrd \(initrd) is missing or unreadable")
        }
        if let (old, _) = try store.domain(named: definition.name), runtime(old.name).pid() != nil, old.disks != definition.disks {
            throw SnapshotError(.inUse, "domain '\(definition.name)' is running; stop it before changing its disks")
        }
        try store.define(definition)
    }

    public func definition(_ name: String) throws -> (definition: DomainDefinition, current: String?) {
        guard let found = try store.domain(named: name) else {
            let known = (try? store.domains().map(\.name).prefix(10).joined(separator: ", ")) ?? ""
            throw SnapshotError(.notFound, "no domain named '\(name)' (defined: \(known.isEmpty ? "none" : known)); define it with `vmsnap domain define FILE`")
        }
        return found
    }

    /// The run state, from the QEMU process and its QMP status.
    public func runState(_ name: String) async throws -> DomainRunState {
        let rt = runtime(name)
        guard rt.pid() != nil else { return .shutoff }
        let client = try await driver.connect(rt, domain: name)
        defer { Task { await client.close() } }
        return try await client.status().running ? .running : .paused
    }

    public func status(_ name: String) async throws -> DomainStatus {
        let (definition, current) = try definition(name)
        return DomainStatus(name: name, uuid: definition.uuid, state: try await runState(name), pid: runtime(name).pid(),
                            currentSnapshot: current, snapshotCount: try store.domainSnapshots(of: name).count,
                            accelerator: QEMUDriver.chooseAccelerator(definition.accel))
    }

    public func list() async throws -> [DomainStatus] {
        var out: [DomainStatus] = []
        for d in try store.domains() { out.append(try await status(d.name)) }
        return out
    }

    /// The drives QEMU opens: each disk's active layer as its backend says QEMU opens it.
    func drives(_ definition: DomainDefinition) async throws -> [QEMUDrive] {
        var drives: [QEMUDrive] = []
        for disk in definition.disks {
            let (backend, layout) = try await disks.manage(disk.locator, kind: disk.backend)
            let drive: HypervisorDrive
            do { drive = try backend.hypervisorDrive(layout) } catch let e as SnapshotError {
                throw SnapshotError(e.code, "domain '\(definition.name)', disk \(disk.target): \(e.message)")
            }
            drives.append(QEMUDrive(target: disk.target, path: drive.path, format: drive.format))
        }
        return drives
    }

    /// Boots the domain (paused with `paused`).
    public func start(_ name: String, paused: Bool = false) async throws {
        let lock = try domainLock(name)
        defer { withExtendedLifetime(lock) {} }
        try await recover(domain: name)
        let (definition, _) = try definition(name)
        guard runtime(name).pid() == nil else { throw SnapshotError(.conflict, "domain '\(name)' is running already") }
        let client = try await driver.launch(definition, drives: try await drives(definition), runtime: runtime(name), options: QEMULaunchOptions(paused: paused))
        await client.close()
    }

    /// Stops the domain: with `force` at once (like pulling the plug), else by asking the guest to
    /// power off and waiting up to `timeout`.
    public func stop(_ name: String, force: Bool, timeout: Duration = .seconds(60)) async throws {
        _ = try definition(name)
        let rt = runtime(name)
        guard rt.pid() != nil else { throw SnapshotError(.conflict, "domain '\(name)' is not running") }
        if force { try await driver.terminate(rt); return }
        guard try await driver.powerdown(rt, timeout: timeout) else {
            throw SnapshotError(.busy, "domain '\(name)' did not power off within \(timeout); its guest may ignore ACPI. Use `vmsnap domain stop --force` to stop it at once")
        }
    }

    /// Pauses or resumes the vCPUs.
    public func setPaused(_ name: String, _ paused: Bool) async throws {
        _ = try definition(name)
        let client = try await driver.connect(runtime(name), domain: name)
        defer { Task { await client.close() } }
        if paused { try await client.stop() } else { try await client.cont() }
    }

    /// Forgets a domain. Refused while it runs, and while it has snapshots unless
    /// `dropSnapshotMetadata` (the disk snapshots stay on the disks).
    public func undefine(_ name: String, dropSnapshotMetadata: Bool) async throws {
        _ = try definition(name)
        guard runtime(name).pid() == nil else { throw SnapshotError(.inUse, "domain '\(name)' is running; stop it first") }
        let snapshots = try store.domainSnapshots(of: name)
        if !snapshots.isEmpty, !dropSnapshotMetadata {
            throw SnapshotError(.conflict, "domain '\(name)' has \(snapshots.count) snapshot(s); delete them first, or pass --snapshots-metadata to forget their records (the disk snapshots stay on the disks)")
        }
        try store.undefine(domain: name)
    }

    func domainLock(_ name: String) throws -> DiskLock {
        try DiskLock(store: store, diskID: "domain:" + name)
    }

    /// The guest's serial console log (appended across launches).
    public func serialLog(_ name: String) -> String { runtime(name).serialLog }
}
