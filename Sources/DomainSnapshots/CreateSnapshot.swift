import Foundation
import QEMUDriver
import SnapshotCore
#if canImport(Glibc)
import Glibc
#endif

/// What `vmsnap snapshot create` asks for.
public struct DomainSnapshotRequest: Sendable, Hashable {
    public var name: String?
    public var description: String?
    /// No memory, even when the domain runs.
    public var diskOnly = false
    /// Targets to include; nil includes every disk.
    public var targets: [String]?
    /// Disk snapshot kind; nil: each backend's default (internal where it has it).
    public var kind: SnapshotKind?
    /// Where the memory image goes (external memory); nil: `<store>/memory/<domain>/<name>.vmstate`.
    public var memoryFile: String?
    /// Memory inside the qcow2 images (QEMU's snapshot-save job; every disk must be qcow2).
    public var internalMemory = false
    /// Keep the guest paused for the whole memory save instead of saving it live.
    public var pausedSave = false
    /// Freeze guest filesystems through the QEMU guest agent first.
    public var quiesce = false

    public init(name: String? = nil, description: String? = nil, diskOnly: Bool = false, targets: [String]? = nil, kind: SnapshotKind? = nil,
                memoryFile: String? = nil, internalMemory: Bool = false, pausedSave: Bool = false, quiesce: Bool = false) {
        self.name = name
        self.description = description
        self.diskOnly = diskOnly
        self.targets = targets
        self.kind = kind
        self.memoryFile = memoryFile
        self.internalMemory = internalMemory
        self.pausedSave = pausedSave
        self.quiesce = quiesce
    }
}

/// What a domain operation journals: enough to finish or roll it back after a crash.
struct DomainJournal: Codable, Sendable {
    enum Operation: String, Codable, Sendable { case create, revert, delete }
    var operation: Operation
    var snapshot: String
    var record: DomainSnapshotRecord?
    /// Phases passed, in order.
    var phases: [String] = []
    /// Disk targets whose part is done.
    var disksDone: [String] = []
    /// Layouts before live (hypervisor-made) disk snapshots, by target.
    var liveBefore: [String: DiskLayout] = [:]
    /// Layouts after them, by target.
    var liveAfter: [String: DiskLayout] = [:]
    /// The domain was running and vmsnap paused it.
    var pausedByUs = false
    /// Revert: the run state to end in. Delete: the snapshots to remove and the mode.
    var targetState: DomainRunState?
    var removing: [String] = []
    var mode: DeleteMode?
}

/// Measured during a live snapshot, for benchmarks and `--json`.
public struct CreateReport: Codable, Sendable, Hashable {
    public var snapshot: DomainSnapshotRecord
    /// Guest pause from QMP STOP to RESUME events, in milliseconds (running domains).
    public var pauseMs: Double?
    /// vmsnap's share of the pause: from `stop` sent to the memory save started (the rest is
    /// QEMU setting up the background snapshot).
    public var ownPauseMs: Double?
    /// Downtime QEMU reported for the memory save.
    public var qemuDowntimeMs: Double?
    /// Wall time of the memory save, in seconds.
    public var memorySeconds: Double?
}

extension DomainService {
    func journal(_ id: Int64, _ j: DomainJournal) throws {
        try store.updateDomainJournal(id, payload: try JSONEncoder().encode(j))
    }

    func phase(_ id: Int64, _ j: inout DomainJournal, _ name: String) throws {
        j.phases.append(name)
        try journal(id, j)
        DomainFault.point("\(j.operation.rawValue):\(name)", qemu: j.record.map { runtime($0.domain) })
    }

    /// Takes a domain snapshot.
    @discardableResult
    public func createSnapshot(domain: String, _ request: DomainSnapshotRequest) async throws -> CreateReport {
        let lock = try domainLock(domain)
        defer { withExtendedLifetime(lock) {} }
        try await recover(domain: domain)
        let (definition, current) = try definition(domain)
        let existing = try store.domainSnapshots(of: domain)
        let name = request.name ?? Self.generatedName(existing: Set(existing.map(\.name)))
        try SnapshotName.validate(name)
        if existing.contains(where: { $0.name == name }) {
            throw SnapshotError(.alreadyExists, "domain '\(domain)' already has a snapshot named \(SnapshotName.quoted(name)); pick another name or delete that one first")
        }
        if let d = request.description, d.utf8.count > 4096 {
            throw SnapshotError(.invalidArgument, "the description is \(d.utf8.count) bytes; the limit is 4096")
        }
        let state = try await runState(domain)
        if request.diskOnly, request.memoryFile != nil || request.internalMemory || request.pausedSave {
            throw SnapshotError(.invalidArgument, "--disk-only takes no memory: drop --memory-file / --memory internal / --paused-save")
        }
        if request.memoryFile != nil, request.internalMemory {
            throw SnapshotError(.invalidArgument, "--memory-file names an external memory image; --memory internal keeps memory inside the qcow2 images: pick one")
        }
        if request.quiesce, state == .shutoff { throw SnapshotError(.invalidArgument, "--quiesce needs a running domain with a guest agent; '\(domain)' is shut off") }
        if request.quiesce { throw SnapshotError(.unsupported, "--quiesce needs a QEMU guest agent channel; this build does not configure one (docs/notes.md)") }
        let withMemory = !request.diskOnly && state != .shutoff
        if state == .shutoff, request.memoryFile != nil || request.internalMemory {
            throw SnapshotError(.invalidArgument, "domain '\(domain)' is shut off: there is no memory to save; drop the memory options (the snapshot is disk-only)")
        }
        if let targets = request.targets {
            for t in targets where !definition.disks.contains(where: { $0.target == t }) {
                throw SnapshotError(.notFound, "domain '\(domain)' has no disk \(t) (it has \(definition.disks.map(\.target).joined(separator: ", ")))")
            }
            if withMemory, Set(targets) != Set(definition.disks.map(\.target)) {
                throw SnapshotError(.invalidArgument, "a snapshot with memory must include every disk (the memory refers to all of them); drop --disks or add --disk-only")
            }
        }

        // Plan every disk before anything changes.
        struct DiskPart { var disk: DomainDisk; var backend: any DiskSnapshotBackend; var layout: DiskLayout; var kind: SnapshotKind; var live: Plan?; var drive: HypervisorDrive? }
        var parts: [DiskPart] = []
        var excluded: [DomainSnapshotDisk] = []
        for disk in definition.disks {
            let (backend, layout) = try await disks.manage(disk.locator, kind: disk.backend)
            guard request.targets?.contains(disk.target) ?? true else {
                excluded.append(DomainSnapshotDisk(target: disk.target, diskID: layout.disk.id, backend: backend.kind, kind: nil))
                continue
            }
            let caps = backend.descriptor.capabilities
            let kind = request.kind ?? (request.internalMemory || caps.supports(.create, .internal, .offline) ? .internal : .external)
            if layout.snapshot(named: name) != nil {
                throw SnapshotError(.alreadyExists, "disk \(disk.target) (\(layout.disk.id)) already has a disk snapshot named \(SnapshotName.quoted(name)); pick another name")
            }
            var part = DiskPart(disk: disk, backend: backend, layout: layout, kind: kind)
            if state != .shutoff {
                let drive = try backend.hypervisorDrive(layout)
                part.drive = drive
                if drive.liveSnapshots {
                    part.live = try await backend.planLiveCreate(SnapshotRequest(name: name, kind: kind, description: request.description), layout: layout)
                } else if !caps.supports(.create, kind, .live) {
                    throw SnapshotError(.unsupported, "disk \(disk.target): backend '\(backend.kind)' cannot take \(kind) snapshots while the domain runs; stop the domain, or leave the disk out with --disks")
                }
            } else {
                try caps.require(Capability(.create, kind, .offline), backend: backend.kind)
            }
            parts.append(part)
        }
        if request.internalMemory {
            guard parts.allSatisfy({ $0.drive?.holdsInternalMemory == true && $0.kind == .internal }), excluded.isEmpty else {
                throw SnapshotError(.unsupported, "--memory internal keeps the memory inside the disk images: every disk must be an image that can hold it (qcow2) with an internal snapshot; use an external memory file (the default) for mixed domains")
            }
        }
        guard !parts.isEmpty else { throw SnapshotError(.invalidArgument, "the snapshot would include no disk") }

        // The memory image: reserve its space first, so a full filesystem fails before anything changes.
        var memory: MemoryImage?
        var memoryFD: Int32 = -1
        if withMemory {
            if request.internalMemory {
                memory = MemoryImage(location: .internal, path: parts[0].disk.target)
            } else {
                let path = request.memoryFile.map { URL(fileURLWithPath: $0).standardizedFileURL.path }
                    ?? (store.directory as NSString).appendingPathComponent("memory/\(domain)/\(name).vmstate")
                memoryFD = try Self.reserveMemoryFile(path, bytes: UInt64(definition.memoryMiB) << 20)
                memory = MemoryImage(location: .external, path: path)
            }
        }
        defer { if memoryFD >= 0 { close(memoryFD) } }

        var record = DomainSnapshotRecord(
            domain: domain, name: name, parent: current, description: request.description,
            createdAt: Date(timeIntervalSince1970: Date().timeIntervalSince1970.rounded(.down)), state: state, memory: memory,
            disks: parts.map { DomainSnapshotDisk(target: $0.disk.target, diskID: $0.layout.disk.id, backend: $0.backend.kind, kind: $0.kind) } + excluded,
            definition: definition)
        record.disks.sort { $0.target < $1.target }
        var j = DomainJournal(operation: .create, snapshot: name, record: record)
        let journalID = try store.beginDomainJournal(domain: domain, operation: "create snapshot '\(name)'", payload: try JSONEncoder().encode(j))
        var report = CreateReport(snapshot: record)
        /// Disks without a hypervisor path, each through its backend's own journaled plan.
        func takeThroughBackends(_ chosen: [DiskPart]) async throws {
            for part in chosen {
                try await disks.create(SnapshotRequest(name: name, kind: part.kind, description: request.description), disk: part.layout.disk.id, kind: part.backend.kind)
                j.disksDone.append(part.disk.target)
                try phase(journalID, &j, "disk-\(part.disk.target)")
            }
        }
        do {
            if state == .shutoff {
                try await takeThroughBackends(parts)
            } else {
                let client = try await driver.connect(runtime(domain), domain: domain)
                defer { Task { await client.close() } }
                let mark = await client.eventMark
                if request.internalMemory {
                    try await internalFullSystem(client: client, name: name, parts: parts.map { ($0.disk.target, $0.layout, $0.live!) }, journalID: journalID, j: &j)
                } else {
                    // Everything that can happen before the pause does: the journal knows the
                    // overlays and that vmsnap pauses the guest, QEMU has the memory file.
                    let live = parts.filter { $0.live != nil }
                    for part in live {
                        j.liveBefore[part.disk.target] = part.layout
                        j.liveAfter[part.disk.target] = part.live!.result
                    }
                    let liveMemory = withMemory && state == .running && !request.pausedSave
                    if withMemory { try await prepareMemory(client: client, fd: memoryFD, live: liveMemory) }
                    j.pausedByUs = state == .running
                    try phase(journalID, &j, "prepared")
                    let t0 = ContinuousClock.now
                    Trace.mark("pause prepared")
                    if state == .running { try await client.stop() }
                    Trace.mark("stop")
                    DomainFault.point("create:paused", qemu: runtime(domain))
                    // Backends without a hypervisor path, while the vCPUs are stopped and QEMU has flushed.
                    try await takeThroughBackends(parts.filter { $0.live == nil })
                    // qcow2 disks: one transaction, all or none.
                    if !live.isEmpty {
                        try await client.transaction(live.map { Self.transactionAction(target: $0.disk.target, name: name, kind: $0.kind, result: $0.live!.result) })
                    }
                    Trace.mark("transaction")
                    DomainFault.point("create:transaction", qemu: runtime(domain))
                    // The memory point in time is fixed now; with background-snapshot QEMU resumes the guest itself.
                    let started = ContinuousClock.now
                    let migrationMark = await client.eventMark
                    if withMemory { try await client.execute("migrate", ["uri": .string("fd:\(Self.memoryFDName)")]) }
                    Trace.mark("memory save started")
                    if state == .running { report.ownPauseMs = (ContinuousClock.now - t0).seconds * 1000 }
                    for part in live {
                        try disks.record(part.live!.result, replacing: part.layout)
                        j.disksDone.append(part.disk.target)
                    }
                    try phase(journalID, &j, "disks-recorded")
                    if withMemory {
                        let (size, downtime) = try await finishMemory(client: client, fd: memoryFD, guestBytes: UInt64(definition.memoryMiB) << 20, since: migrationMark)
                        report.memorySeconds = (ContinuousClock.now - started).seconds
                        report.qemuDowntimeMs = downtime
                        record.memory?.size = size
                        j.record = record
                        try phase(journalID, &j, "memory-saved")
                    }
                    if state == .running, try await !client.status().running { try await client.cont() }
                    j.pausedByUs = false
                }
                let events = await client.events(since: mark)
                if let stop = events.first(where: { $0.name == "STOP" }), let resume = events.last(where: { $0.name == "RESUME" }) {
                    report.pauseMs = (resume.timestamp - stop.timestamp) * 1000
                }
            }
            try phase(journalID, &j, "commit")
            try store.updateDomainSnapshots(domain: domain, upsert: [record], current: .some(name))
            try store.finishDomainJournal(journalID, state: "done")
        } catch {
            let cause = error
            do { try await rollBackCreate(domain: domain, j) } catch {
                notify("rolling back snapshot '\(name)' failed too: \(error); run `vmsnap recover`")
                throw cause
            }
            try? store.finishDomainJournal(journalID, state: "rolled-back")
            if let e = cause as? QMPError { throw e.snapshotError }
            throw cause
        }
        report.snapshot = record
        return report
    }

    static func generatedName(existing: Set<String>) -> String {
        let f = DateFormatter()
        f.locale = Locale(identifier: "en_US_POSIX")
        f.timeZone = TimeZone(identifier: "UTC")
        f.dateFormat = "'snap-'yyyyMMdd'-'HHmmss"
        let base = f.string(from: Date())
        var name = base
        var n = 1
        while existing.contains(name) { n += 1; name = "\(base)-\(n)" }
        return name
    }

    static func transactionAction(target: String, name: String, kind: SnapshotKind, result: DiskLayout) -> JSONValue {
        let device = QEMUDrive.driveID(target)
        switch kind {
        case .internal:
            return ["type": "blockdev-snapshot-internal-sync", "data": ["device": .string(device), "name": .string(name)]]
        case .external:
            return ["type": "blockdev-snapshot-sync", "data": [
                "device": .string(device), "snapshot-file": .string(result.disk.active), "format": "qcow2", "mode": "absolute-paths"]]
        }
    }

    /// Creates the memory file (0600, new) and reserves room for a guest's memory, so a full
    /// filesystem is found before the guest is touched.
    static func reserveMemoryFile(_ path: String, bytes: UInt64) throws -> Int32 {
        let dir = (path as NSString).deletingLastPathComponent
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            let why = errno == EEXIST ? "it exists already; pick another --memory-file or remove it" : String(cString: strerror(errno))
            throw SnapshotError(errno == EEXIST ? .alreadyExists : .io, "cannot create memory image \(path): \(why)")
        }
        // Guest RAM plus device state and stream overhead.
        let reserve = off_t(bytes + bytes / 32 + (16 << 20))
        let rc = posix_fallocate(fd, 0, reserve)
        if rc != 0 {
            close(fd)
            unlink(path)
            let free = (try? FileManager.default.attributesOfFileSystem(forPath: dir)[.systemFreeSize] as? NSNumber)?.uint64Value
            throw SnapshotError(.io, "no room for the memory image in \(dir): it needs about \(reserve >> 20) MiB\(free.map { ", the filesystem has \($0 >> 20) MiB free" } ?? "") (\(String(cString: strerror(rc)))). Nothing was changed; free space or give --memory-file on another filesystem")
        }
        return fd
    }

    // The guest's memory goes into `fd` through QEMU's migration: background-snapshot (the
    // memory point in time is fixed while paused and the guest resumes at once) or a plain
    // migration of a stopped guest.
    static let memoryFDName = "vmsnap-memory"


    /// Sets the migration capabilities and hands QEMU the memory file, before the pause.
    func prepareMemory(client: QMPClient, fd: Int32, live: Bool) async throws {
        try await client.setMigrationCapabilities(["background-snapshot": live, "events": true])
        // QEMU rate-limits migration (128 MiB/s by default); a save to a local file should not be.
        try await client.execute("migrate-set-parameters", ["max-bandwidth": .int(1 << 40)])
        try await client.passFile(fd, name: Self.memoryFDName)
    }

    /// Waits for the memory stream QEMU started into `fd` to finish, showing progress.
    func finishMemory(client: QMPClient, fd: Int32, guestBytes: UInt64, since mark: Int) async throws -> (UInt64, Double?) {
        let last = try await followMigration(client: client, fd: fd, total: guestBytes, since: mark, phase: "memory save") { status, info in
            SnapshotError(.io, "saving the guest's memory failed: \(info?.errorDescription ?? status); the snapshot is rolled back and the guest keeps running")
        }
        let size = lseek(fd, 0, SEEK_CUR)
        guard size > 0, ftruncate(fd, size) == 0, fsync(fd) == 0 else {
            throw SnapshotError(.io, "finishing the memory image failed: \(String(cString: strerror(errno)))")
        }
        return (UInt64(size), last.downtimeMs)
    }

    /// Waits for a migration to or from `fd` (save or restore) to complete, showing progress from
    /// the file position QEMU's copy of `fd` has reached; throws `failure` if it fails.
    func followMigration(client: QMPClient, fd: Int32, total: UInt64, since mark: Int, phase: String,
                         failure: (String, MigrationInfo?) -> SnapshotError) async throws -> MigrationInfo {
        let started = ContinuousClock.now
        while true {
            let info = try await client.migrationInfo()
            if info.status == "completed" { return info }
            if info.status == "failed" || info.status == "cancelled" { throw failure(info.status, info) }
            let elapsed = (ContinuousClock.now - started).seconds
            if elapsed > 1, let progress {
                let done = UInt64(max(lseek(fd, 0, SEEK_CUR), 0))
                let rate = Double(done) / elapsed
                let whole = max(total, done)
                progress(ProgressReport(phase: phase, done: done, total: whole, bytesPerSecond: rate,
                                        secondsLeft: rate > 0 && whole > done ? Double(whole - done) / rate : nil))
            }
            _ = try? await client.waitForEvent("MIGRATION", since: mark, timeout: .milliseconds(500)) {
                ["completed", "failed", "cancelled"].contains($0.data["status"]?.string ?? "")
            }
        }
    }

    /// Memory and every disk inside the qcow2 images through QEMU's snapshot-save job (the guest
    /// stays paused while it runs, as savevm does).
    func internalFullSystem(client: QMPClient, name: String, parts: [(target: String, layout: DiskLayout, plan: Plan)], journalID: Int64, j: inout DomainJournal) async throws {
        let devices = try await client.blockDevices()
        var nodes: [String] = []
        for part in parts {
            guard let node = devices.first(where: { $0.device == QEMUDrive.driveID(part.target) })?.nodeName else {
                throw SnapshotError(.conflict, "QEMU has no block device for disk \(part.target)")
            }
            nodes.append(node)
            j.liveBefore[part.target] = part.layout
            j.liveAfter[part.target] = part.plan.result
        }
        try phase(journalID, &j, "transaction")
        let job = "vmsnap-save-\(name)"
        try await client.execute("snapshot-save", ["job-id": .string(job), "tag": .string(name), "vmstate": .string(nodes[0]), "devices": .array(nodes.map { .string($0) })])
        try await client.waitForJob(job, progress: nil)
        for part in parts {
            try disks.record(part.plan.result, replacing: part.layout)
            j.disksDone.append(part.target)
        }
        try phase(journalID, &j, "disks-recorded")
    }

    /// Undoes whatever part of a create happened: disk snapshots (through QEMU while it runs),
    /// the memory file; resumes a guest vmsnap paused.
    func rollBackCreate(domain: String, _ j: DomainJournal) async throws {
        guard let record = j.record else { return }
        let rt = runtime(domain)
        let client: QMPClient? = rt.pid() != nil ? try? await driver.connect(rt, domain: domain) : nil
        defer { if let client { Task { await client.close() } } }
        if let client, await client.isClosed == false {
            // Let a memory save that is still streaming finish (into the file removed below):
            // cancelling a background-snapshot migration leaves QEMU 7.2's guest hung on its
            // write-protected pages (measured here; docs/notes.md).
            let deadline = ContinuousClock.now + .seconds(1800)
            while let info = try? await client.migrationInfo(), ["active", "setup", "device", "pre-switchover"].contains(info.status), ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(100))
            }
        }
        for disk in record.disks where disk.kind != nil {
            if let before = j.liveBefore[disk.target] {
                if let client {
                    try await undoLive(client: client, target: disk.target, name: record.name, kind: disk.kind!, before: before, after: j.liveAfter[disk.target])
                } else {
                    // QEMU is gone: the snapshot, if QEMU took it, is in the image; undo it offline.
                    if let stored = try store.layout(diskID: disk.diskID), stored.snapshot(named: record.name) != nil {
                        try await disks.delete(disk: disk.diskID, snapshot: record.name, mode: .merge, kind: disk.backend)
                    } else {
                        let (backend, _) = try await disks.manage(disk.diskID, kind: disk.backend)
                        try await backend.undoUnrecordedLiveSnapshot(record.name, kind: disk.kind!, before: before, after: j.liveAfter[disk.target])
                    }
                }
            } else if let stored = try store.layout(diskID: disk.diskID), stored.snapshot(named: record.name) != nil {
                try await disks.delete(disk: disk.diskID, snapshot: record.name, mode: .merge, kind: disk.backend)
            }
        }
        if client == nil {
            // QEMU died (or was killed) with the images open: free the clusters it had allocated
            // but not yet referenced, so `qemu-img check` is clean again.
            for disk in record.disks {
                if let layout = try store.layout(diskID: disk.diskID) {
                    let (backend, _) = try await disks.manage(disk.diskID, kind: disk.backend)
                    try? await backend.repairAfterHypervisorCrash(layout)
                }
            }
        }
        if let memory = record.memory, memory.location == .external { unlink(memory.path) }
        if let client, j.pausedByUs, await client.isClosed == false { try? await client.cont() }
    }

    /// Undoes one disk snapshot QEMU took while it still runs.
    func undoLive(client: QMPClient, target: String, name: String, kind: SnapshotKind, before: DiskLayout, after: DiskLayout?) async throws {
        let device = QEMUDrive.driveID(target)
        switch kind {
        case .internal:
            do {
                try await client.execute("blockdev-snapshot-delete-internal-sync", ["device": .string(device), "name": .string(name)])
            } catch let e as QMPError where e.reason.contains("does not exist") || e.reason.contains("not found") {}
        case .external:
            guard let overlay = after?.disk.active else { break }
            let open = try await client.blockDevices().first { $0.device == device }?.file
            if open == overlay {
                // Commit the guest's writes since the snapshot back into the base, then pivot.
                let job = "vmsnap-undo-\(target)"
                let mark = await client.eventMark
                try await client.execute("block-commit", ["device": .string(device), "job-id": .string(job)])
                _ = try await client.waitForEvent("BLOCK_JOB_READY", since: mark, timeout: .seconds(600)) { $0.data["device"]?.string == job }
                try await client.execute("block-job-complete", ["device": .string(job)])
                let done = try await client.waitForEvent("BLOCK_JOB_COMPLETED", since: mark, timeout: .seconds(600)) { $0.data["device"]?.string == job }
                if let error = done.data["error"]?.string { throw SnapshotError(.commandFailed, "undoing the snapshot of \(target) failed: \(error)") }
            }
            unlink(overlay)
        }
        if let stored = try store.layout(diskID: before.disk.id), stored.snapshot(named: name) != nil {
            try store.update(from: stored, to: before)
        }
    }
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}
