import Foundation
import HypervisorDriver
import SnapshotCore
import Synchronization
#if canImport(Glibc)
    import Glibc
#endif

/// A running QEMU domain behind the driver protocol's typed handle: every QMP detail (the
/// transaction, background-snapshot migration, snapshot-save jobs, block-stream, block-commit)
/// stays here.
public struct QEMULiveDomain: LiveDomain {
    public let client: QMPClient
    /// The guest agent's channel, when the domain was started with one.
    public let agentSocket: String?
    /// How this QEMU names the guest's disks.
    public let addressing: any QEMUDiskAddressing
    /// What this handle prepared for a snapshot: the memory save's stage, the overlays opened.
    let save = SnapshotSession()

    /// QEMU's process, when it runs on this host: its guest RAM is read through before a
    /// background copy's pause (``GuestMemoryPrefault``).
    public let pid: pid_t?

    public init(
        client: QMPClient, agentSocket: String? = nil, addressing: any QEMUDiskAddressing = QEMUDriveIDs(),
        pid: pid_t? = nil
    ) {
        self.client = client
        self.pid = pid
        self.agentSocket = agentSocket
        self.addressing = addressing
    }

    public func mark() async -> Int { await client.eventMark }

    public func pauseWindow(since mark: Int) async -> Double? {
        let events = await client.events(since: mark)
        guard let stop = events.first(where: { $0.name == "STOP" }),
            let resume = events.last(where: { $0.name == "RESUME" })
        else { return nil }
        return (resume.timestamp - stop.timestamp) * 1000
    }

    /// From QEMU's event stamps: the vCPUs stopped (STOP) to the save waiting for vmsnap
    /// (pre-switchover), vmsnap's disk snapshots until it let the save go on (device), the last
    /// memory round and device state (completed), then the images reopened and the vCPUs
    /// started (RESUME). A background copy (``LiveSave/writeProtect``): the disk snapshots until
    /// vmsnap started the save (setup), QEMU's setup (active), the device state and the
    /// write-protection (RESUME). A plain stop has only STOP and RESUME.
    public func pausePhases(since mark: Int) async -> [PausePhase] {
        let events = await client.events(since: mark)
        guard let stop = events.first(where: { $0.name == "STOP" }) else { return [] }
        let background = save.method == .writeProtect
        var stopped = false
        if case .stopped = save.method { stopped = true }
        var marks: [(String, Double)] = []
        for e in events where e.timestamp >= stop.timestamp {
            switch (e.name, e.data["status"]?.string) {
            case ("MIGRATION", "setup") where background || stopped:
                marks.append(("disk snapshots (vmsnap)", e.timestamp))
            case ("MIGRATION", "active") where background:
                marks.append(("save set up (bitmaps, pages read for write-protection)", e.timestamp))
            case ("MIGRATION", "pre-switchover"): marks.append(("vCPUs stopped, memory synced", e.timestamp))
            case ("MIGRATION", "device"): marks.append(("disk snapshots (vmsnap)", e.timestamp))
            case ("MIGRATION", "completed") where stopped:
                marks.append(("memory and device state saved, the guest stopped", e.timestamp))
            case ("MIGRATION", "completed"): marks.append(("last memory round and device state", e.timestamp))
            case ("RESUME", _):
                marks.append(
                    (resumeStep(after: marks.last?.0), e.timestamp))
            default: continue
            }
            if e.name == "RESUME" { break }
        }
        var last = stop.timestamp
        var phases: [PausePhase] = []
        for (name, at) in marks {
            phases.append(PausePhase(name: name, ms: (at - last) * 1000))
            last = at
        }
        return phases
    }

    /// The name of the last step before the RESUME event, by what came before it.
    private func resumeStep(after previous: String?) -> String {
        switch previous {
        case nil: "stopped for the disk snapshots"
        case "save set up (bitmaps, pages read for write-protection)": "device state saved, memory write-protected"
        default: "images reopened, vCPUs resumed"
        }
    }

    public func isRunning() async throws -> Bool { try await layer { try await client.status().running } }
    public func pause() async throws {
        try await layer {
            switch save.stage {
            case .precopyPrepared(let fd, let total, let progress):
                try await runPrecopyToSwitchover(fd: fd, total: total, progress: progress)
                save.stage = .atSwitchover
            default:
                // Every guest page read once while the guest still runs: QEMU reads them again
                // in the pause to set the background copy up, and then finds them at hand.
                if save.method == .writeProtect, let pid, let bytes = save.guestBytes {
                    // Off the cooperative pool: 4 GiB take 115-165 ms.
                    let pages = try? await Self.offPool { GuestMemoryPrefault.touch(pid: pid, guestBytes: bytes) }
                    Trace.mark("guest memory read through (\(pages ?? 0) pages)")
                }
                try await client.stop()
            }
        }
    }
    /// Runs the guest again, whatever stopped it: a plain stop, or a pre-copy save that holds
    /// it at its switchover (cancelled) or that has completed (the images are reopened).
    public func resume() async throws {
        try await layer {
            await releaseSave()
            if try await !client.status().running { try await client.cont() }
        }
    }
    public func isConnected() async -> Bool { await !client.isClosed }
    public func close() async { await client.close() }

    /// QMP refusals become the layer's error type.
    func layer<T>(_ body: () async throws -> T) async throws -> T {
        do { return try await body() } catch { throw QEMUDriver.layerError(error) }
    }

    // MARK: - Memory

    /// A live save keeps the memory of the pause's instant in one of two ways (``LiveSave``):
    /// a pre-copy migration into the file (memory streams while the guest runs, and `pause()`
    /// returns when QEMU stops the guest for the last round, `pause-before-switchover`, so the
    /// disks are snapshotted at the instant the memory stands for; `startMemorySave()` lets the
    /// last round run and resumes the guest), or a background snapshot (`pause()` stops the
    /// guest; `startMemorySave()` starts the save, QEMU write-protects the guest's memory and
    /// resumes it, then copies each page before the guest's first write to it). A save that is
    /// not live runs with the guest stopped by `pause()`.
    public func prepareMemorySave(to fd: Int32, live: Bool, guestBytes: UInt64, progress: ProgressHandler?)
        async throws
    {
        try await layer {
            var method = live ? try await liveSaveMethod() : nil
            if method == .writeProtect {
                method = try await enableWriteProtection()
            }
            if method != .writeProtect {
                try await client.setMigrationCapabilities(Self.capabilities(for: method))
            }
            // QEMU rate-limits migration (128 MiB/s by default); a save to a local file should not be.
            try await client.run(
                QMP.MigrateSetParameters(
                    maxBandwidth: 1 << 40,
                    downtimeLimitMs: method == .precopy ? PrecopyPolicy.downtimeLimitsMs[0] : nil))
            try await client.passFile(fd, name: QEMUDriver.memoryFDName)
            save.method = method
            save.guestBytes = guestBytes
            save.stage =
                method == .precopy ? .precopyPrepared(fd: fd, total: guestBytes, progress: progress) : .prepared
        }
    }

    /// Turns QEMU's background snapshot on, or says why not: QEMU refuses it when it cannot
    /// write-protect the guest's memory (no userfaultfd for its user: an unprivileged QEMU, as
    /// with `-runas`, where vm.unprivileged_userfaultfd is 0; memory it cannot protect). The save
    /// is then made with the guest stopped throughout (``LiveSave/stopped(because:)``): the
    /// only other way under TCG, whose pre-copy loses writes (``liveSaveMethod()``). The
    /// capabilities go in as one set, so one an earlier pre-copy left on (pause-before-switchover,
    /// auto-converge: QEMU refuses them beside a background snapshot) never reads as a refusal;
    /// any other refusal is an error, not a reason to stop the guest.
    func enableWriteProtection() async throws -> LiveSave {
        do {
            try await client.setMigrationCapabilities(Self.capabilities(for: .writeProtect))
            return .writeProtect
        } catch let e as QMPError where Self.refusesWriteProtection(e.reason) {
            return .stopped(because: e.reason)
        }
    }

    /// The migration capabilities a save by `method` runs with, every one vmsnap sets named, so
    /// one call leaves none from an earlier save. auto-converge: QEMU itself slows a guest that
    /// dirties memory faster than a pre-copy writes it, so the save ends (and the file stops
    /// growing) even if vmsnap dies.
    static func capabilities(for method: LiveSave?) -> [String: Bool] {
        [
            "background-snapshot": method == .writeProtect, "pause-before-switchover": method == .precopy,
            "auto-converge": method == .precopy, "events": true,
        ]
    }

    /// Whether QEMU's words refuse the background snapshot because it cannot write-protect this
    /// guest's memory (QEMU 7.2: "Background-snapshot is not supported by host kernel", "... is
    /// not compatible with guest memory configuration"), as opposed to a capability set wrong.
    static func refusesWriteProtection(_ reason: String) -> Bool {
        let r = reason.lowercased()
        return r.contains("background-snapshot")
            && (r.contains("host kernel") || r.contains("guest memory") || r.contains("userfault"))
    }

    /// How live saves of this domain keep their point in time. A pre-copy trusts the
    /// accelerator's dirty tracking for the pages the guest writes during the save. KVM's is
    /// sound. TCG's is not in QEMU before 9.0: the dirty bitmap's word-at-a-time sync clears
    /// bits without making TCG's TLB track the pages again (fixed upstream by commit
    /// 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG memory access"), so
    /// the guest's later stores to them are never sent and the image holds those pages stale.
    /// Measured here (QEMU 7.2.22, TCG): a guest process sweeping 32 MiB came back from a
    /// pre-copy image with 638-6,500 of its 8,192 pages stale, in every run; and a stale kernel
    /// page crashed a restored guest in CI. Under TCG the save write-protects memory instead:
    /// userfaultfd copies each page before the guest's first write to it, whatever the TLB
    /// holds (no stale page in the same check). The method QEMU 9.0+ makes safe under TCG is
    /// not used there either: vmsnap has only checked it on 7.2.
    public func liveSaveMethod() async throws -> LiveSave {
        if let forced = save.forcedMethod { return forced }
        return try await client.run(QMP.QueryKVM()) ? .precopy : .writeProtect
    }

    /// Makes this handle's live saves use `method` whatever the accelerator: the package's
    /// tests check each method's steps (stops, kills, drains) on the one accelerator this
    /// machine has. A pre-copy forced under TCG saves stale pages (``liveSaveMethod()``).
    package func forceLiveSaveMethod(_ method: LiveSave) { save.forcedMethod = method }

    /// What the last prepared save does, in words (for the snapshot's report).
    public func memorySaveMethod() async -> String? { save.method?.description }

    public func startMemorySave() async throws {
        try await layer {
            guard case .atSwitchover = save.stage else {
                // A background snapshot resumes the guest by itself once memory is write-protected.
                // (QEMU 7.2 checks write-protection when the capability is set, in
                // enableWriteProtection(); one that fails later fails the migration, which
                // finishMemorySave reports and the snapshot rolls back.)
                try await client.run(QMP.Migrate(uri: "fd:\(QEMUDriver.memoryFDName)"))
                return
            }
            // The last round, then the guest runs again at once: the disks are recorded and the
            // file synced after it resumed.
            let mark = await client.eventMark
            try await client.run(QMP.MigrateContinue())
            let end = try await client.waitForEvent("MIGRATION", since: mark, timeout: .seconds(600)) {
                ["completed", "failed", "cancelled"].contains($0.data["status"]?.string ?? "")
            }
            _ = try await settledRunState()
            try await client.cont()
            save.stage = .none
            if end.data["status"]?.string != "completed" {
                throw SnapshotError(
                    .io,
                    "saving the guest's memory failed in its last round (\(end.data["status"]?.string ?? "?")); the snapshot is rolled back and the guest keeps running"
                )
            }
        }
    }

    /// Starts the pre-copy and waits until QEMU stops the guest for the switchover. A guest that
    /// dirties memory faster than it is saved never gets under the planned stop: past its
    /// budget the allowed stop grows step by step (``PrecopyPolicy``), so the save always ends.
    func runPrecopyToSwitchover(fd: Int32, total: UInt64, progress: ProgressHandler?) async throws {
        let mark = await client.eventMark
        let watch = FileProgress.watch(fd: fd, phase: "memory save", total: total, progress: progress)
        defer { watch.stop() }
        try await client.run(QMP.Migrate(uri: "fd:\(QEMUDriver.memoryFDName)"))
        let started = ContinuousClock.now
        var step = 0
        while true {
            let event = try? await client.waitForEvent("MIGRATION", since: mark, timeout: .milliseconds(250)) {
                ["pre-switchover", "completed", "failed", "cancelled"].contains($0.data["status"]?.string ?? "")
            }
            var status = event?.data["status"]?.string ?? ""
            if event == nil { status = try await client.migrationInfo().status }
            switch status {
            case "pre-switchover": return
            case "failed", "cancelled", "completed":
                let info = try? await client.migrationInfo()
                throw SnapshotError(
                    .io,
                    "saving the guest's memory failed: \(info?.errorDescription ?? status); the snapshot is rolled back and the guest keeps running"
                )
            default:
                let next = PrecopyPolicy.step(after: ContinuousClock.now - started, guestBytes: total)
                if next > step, next < PrecopyPolicy.downtimeLimitsMs.count {
                    step = next
                    try await client.run(
                        QMP.MigrateSetParameters(downtimeLimitMs: PrecopyPolicy.downtimeLimitsMs[step]))
                }
            }
        }
    }

    public func finishMemorySave(fd: Int32, guestBytes: UInt64, since mark: Int, progress: ProgressHandler?)
        async throws -> Double?
    {
        let last = try await Self.followMigration(
            client: client, fd: fd, total: guestBytes, since: mark, phase: "memory save", progress: progress
        ) { status, info in
            SnapshotError(
                .io,
                "saving the guest's memory failed: \(info?.errorDescription ?? status); the snapshot is rolled back and the guest keeps running"
            )
        }
        // A live save QEMU made with the guest stopped: the guest runs again as soon as its
        // memory is in the file, not after the caller has recorded the disks and synced it.
        if case .stopped = save.method {
            try await layer {
                if try await settledRunState() != "running" { try await client.cont() }
            }
        }
        return last.downtimeMs
    }

    /// A pre-copy still streaming is cancelled (it leaves the guest as it was; one stopped at
    /// its switchover runs again); a background copy is let finish; a completed save has its
    /// images reopened (`cont`), so an undo can write into them. The guest is resumed by the
    /// caller if vmsnap paused it.
    public func drainMemorySave() async { await releaseSave() }

    /// Ends whatever migration this QEMU has going and gives the images back (also after a
    /// killed vmsnap: it asks QEMU, not this handle's state). A pre-copy is cancelled. A
    /// background snapshot is let finish: cancelling one leaves QEMU 7.2's guest hung on its
    /// write-protected pages.
    func releaseSave() async {
        save.stage = .none
        // Marked before the status is read: an end that comes in between is not missed.
        let mark = await client.eventMark
        guard let info = try? await client.migrationInfo() else { return }
        if ["active", "setup", "device", "pre-switchover"].contains(info.status) {
            // Only a pre-copy stops at its switchover; otherwise cancel only when QEMU said the
            // migration is no background snapshot (an unanswered question is not a no).
            var precopy = ["device", "pre-switchover"].contains(info.status)
            if !precopy, let on = try? await client.run(QMP.QueryMigrateCapabilities()) {
                precopy = !on.contains("background-snapshot")
            }
            if precopy { _ = try? await client.run(QMP.MigrateCancel()) }
            _ = try? await client.waitForEvent("MIGRATION", since: mark, timeout: .seconds(precopy ? 30 : 1800)) {
                ["completed", "failed", "cancelled"].contains($0.data["status"]?.string ?? "")
            }
        }
        // A completed save leaves the images inactive until `cont`.
        if (try? await settledRunState()) == "postmigrate" { _ = try? await client.cont() }
    }

    /// QEMU's run state once a migration thread has finished: QEMU sends "completed" before the
    /// thread leaves finish-migrate, and refuses `cont` until then (a millisecond or two).
    func settledRunState() async throws -> String {
        let deadline = ContinuousClock.now + .seconds(10)
        var status = try await client.status().status
        while status == "finish-migrate", ContinuousClock.now < deadline {
            try await Task.sleep(for: .microseconds(500))
            status = try await client.status().status
        }
        return status
    }

    /// Waits for a migration to or from `fd` (save or restore) to complete, showing progress
    /// from the file position QEMU's copy of `fd` has reached; throws `failure` if it fails.
    static func followMigration(
        client: QMPClient, fd: Int32, total: UInt64, since mark: Int, phase: String, progress: ProgressHandler?,
        failure: (String, MigrationInfo?) -> SnapshotError
    ) async throws -> MigrationInfo {
        let started = ContinuousClock.now
        while true {
            let info = try await client.migrationInfo()
            if info.status == "completed" { return info }
            if info.status == "failed" || info.status == "cancelled" { throw failure(info.status, info) }
            let elapsed = ContinuousClock.now - started
            if elapsed > .seconds(1), let progress {
                let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
                progress(.measured(phase, done: UInt64(max(lseek(fd, 0, SEEK_CUR), 0)), total: total, seconds: seconds))
            }
            _ = try? await client.waitForEvent("MIGRATION", since: mark, timeout: .milliseconds(500)) {
                ["completed", "failed", "cancelled"].contains($0.data["status"]?.string ?? "")
            }
        }
    }

    // MARK: - Disks

    /// Creates each new qcow2 overlay before the pause (new file, O_EXCL, with the mode and
    /// owner of the image it goes on; formatted by QEMU's `blockdev-create`) and opens it as a
    /// node without its backing, so that inside the pause QEMU only puts it on top of the disk
    /// (`blockdev-snapshot`): about 0.6 ms a disk, against 1.2-1.4 ms when QEMU opens the file
    /// there (`blockdev-snapshot-sync` of an existing image) and 5-14 ms when it creates it.
    /// A node the monitor opened stays open when a later commit or merge takes it out of the
    /// chain: those close it (``closeOverlayNodes(_:)``, ``closeDetachedOverlays()``).
    public func prepareDiskSnapshots(_ snapshots: [LiveDiskSnapshot]) async throws {
        try await layer {
            // A node an earlier operation could not close (a QMP error after its switch) would
            // hold its file, and its name if the same overlay path comes again.
            await closeDetachedOverlays()
            let devices = try await client.blockDevices()
            for s in snapshots where s.kind == .external && s.format == "qcow2" {
                guard let overlay = s.overlay else { continue }
                let disk = try await addressing.address(s.target, client: client)
                guard let open = disk.find(in: devices), let base = open.file, let format = open.format,
                    let size = open.virtualSize
                else {
                    throw SnapshotError(.notFound, "disk \(s.target) is not open in the running QEMU")
                }
                // An image QEMU names by options (`json:{...}`) has no file to take the mode of:
                // QEMU then makes the overlay inside the pause, as before.
                guard base.hasPrefix("/") else { continue }
                try await formatOverlay(overlay, target: s.target, base: base, format: format, size: size)
                let node = Self.overlayNode(overlay)
                do { try await client.run(QMP.AddOverlayNode(nodeName: node, path: overlay)) } catch {
                    unlink(overlay)
                    throw error
                }
                save.preparedOverlays[overlay] = node
            }
        }
    }

    /// The names of the overlay nodes vmsnap opens before a pause.
    static let overlayNodePrefix = "vmsnap-ov-"

    /// The node an overlay is opened as, named from its path so that a later process (a
    /// recovery) finds it: QEMU shows an overlay opened without its backing under a `json:`
    /// filename until it joins a chain. FNV-1a, 64 bits: node names have at most 31 characters.
    static func overlayNode(_ path: String) -> String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in path.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
        return overlayNodePrefix + String(hash, radix: 16)
    }

    /// Makes the file and formats it through a protocol node that is closed again.
    func formatOverlay(_ overlay: String, target: String, base: String, format: String, size: UInt64) async throws {
        let node = "vmsnap-" + UUID().uuidString.prefix(8).lowercased() + "-file"
        try NewFile.create(overlay, like: base, resume: false)
        do {
            try await client.run(QMP.AddFileNode(nodeName: node, path: overlay))
            let job = "vmsnap-create-" + node.dropFirst("vmsnap-".count).prefix(8)
            try await client.run(
                QMP.CreateQcow2(jobID: job, file: node, size: size, backing: base, backingFormat: format))
            try await client.waitForJob(job, timeout: .seconds(60), progress: nil)
            try await client.run(QMP.DeleteNode(nodeName: node))
        } catch {
            _ = try? await client.run(QMP.DeleteNode(nodeName: node))
            unlink(overlay)
            throw error
        }
    }

    public func snapshotDisks(_ snapshots: [LiveDiskSnapshot]) async throws {
        try await layer {
            var actions: [QMP.TransactionAction] = []
            let prepared = save.preparedOverlays
            for s in snapshots {
                let disk = try await addressing.address(s.target, client: client)
                switch s.kind {
                case .internal: actions.append(.internalSnapshot(device: disk.name, name: s.name))
                case .external:
                    let overlay = s.overlay ?? ""
                    if let node = prepared[overlay] {
                        actions.append(.attachOverlay(disk: disk, overlay: node))
                    } else {
                        actions.append(.externalSnapshot(disk: disk, overlay: overlay, format: s.format))
                    }
                }
            }
            try await client.transaction(actions)
            save.preparedOverlays = [:]
        }
    }

    public func carryDirtyBitmaps(_ previous: [String: String]) async throws {
        let block = QEMUBlockLayer(client: client, daemon: nil)
        try await layer {
            // One read of the graph for every disk: this runs while the guest is paused.
            let g = try await block.graph()
            var actions: [QMP.BlockAction] = []
            for (target, base) in previous.sorted(by: { $0.key < $1.key }) {
                let active = try g.node(target)
                let have = Set(try g.bitmaps(target).map(\.name))
                for b in try g.bitmaps(target, layer: base)
                where b.persistent && !b.inconsistent && !have.contains(b.name) {
                    actions.append(.addBitmap(node: active, name: b.name, persistent: true, disabled: false))
                }
            }
            if !actions.isEmpty { try await client.run(QMP.BlockTransaction(actions: actions)) }
        }
    }

    public func addDirtyBitmaps(_ name: String, targets: [String]) async throws {
        try await QEMUBlockLayer(client: client, daemon: nil).addBitmaps(name, targets: targets)
    }

    public func saveInternal(name: String, targets: [String]) async throws {
        try await layer {
            let devices = try await client.blockDevices()
            var nodes: [String] = []
            for target in targets {
                guard let node = devices.first(where: { $0.device == QEMUDriver.driveID(target) })?.nodeName else {
                    throw SnapshotError(.conflict, "QEMU has no block device for disk \(target)")
                }
                nodes.append(node)
            }
            let job = "vmsnap-save-\(name)"
            // Off after an earlier live save's background copy: QEMU's RAM saving polls for
            // write faults while the capability is on.
            try await client.setMigrationCapabilities(["background-snapshot": false])
            try await client.run(QMP.SnapshotSave(jobID: job, tag: name, vmstate: nodes[0], devices: nodes))
            try await client.waitForJob(job, progress: nil)
        }
    }

    public func deleteInternalSnapshot(target: String, name: String) async throws {
        try await layer {
            let disk = try await addressing.address(target, client: client)
            // Idempotent: only a snapshot the open image holds is deleted.
            guard disk.find(in: try await client.blockDevices())?.internalSnapshots.contains(name) == true else {
                return
            }
            try await client.run(QMP.DeleteInternalSnapshot(device: disk.name, name: name))
        }
    }

    public func undoDiskSnapshot(_ snapshot: LiveDiskSnapshot) async throws {
        try await layer {
            let device = try await addressing.address(snapshot.target, client: client).name
            switch snapshot.kind {
            case .internal:
                try await deleteInternalSnapshot(target: snapshot.target, name: snapshot.name)
            case .external:
                guard let overlay = snapshot.overlay else { return }
                try await commitOverlay(overlay, target: snapshot.target, device: device) {}
                unlink(overlay)
            }
        }
    }

    public func mergeHeldOverlay(_ snapshot: LiveDiskSnapshot, synced: () async throws -> Void) async throws {
        guard let overlay = snapshot.overlay else { return }
        try await layer {
            let device = try await addressing.address(snapshot.target, client: client).name
            try await commitOverlay(overlay, target: snapshot.target, device: device, synced: synced)
        }
    }

    /// Commits the guest's writes since an external snapshot back into the image it was taken
    /// on (the overlay's backing, not the chain's bottom) and switches the guest back to that
    /// image (the caller removes the overlay). A commit a killed vmsnap left behind is settled
    /// first (a paused one resumed, one finishing waited for); an overlay no longer open (the
    /// switch happened, or the snapshot never did) is only closed. `synced` runs once the image
    /// below has caught up with the overlay, just before the switch; when this returns the
    /// switch is done.
    func commitOverlay(_ overlay: String, target: String, device: String, synced: () async throws -> Void)
        async throws
    {
        let job = "vmsnap-undo-\(target)"
        var ready = try await settleJob(job)
        if !ready {
            let open = try await client.blockDevices().first { $0.device == device || $0.nodeName == device }
            guard open?.file == overlay else {
                try await closeUnusedOverlay(overlay)
                return
            }
            let nodes = try await client.run(QMP.QueryNamedBlockNodes())
            guard let backing = open?.backing,
                let base = nodes.first(where: { $0.file == backing && !QEMUBlockLayer.isProtocol($0.driver) })
            else {
                throw SnapshotError(
                    .conflict,
                    "cannot merge \(overlay) back into the disk of \(target): the running QEMU shows no open image under it; the overlay was kept. Check the domain with `vmsnap domain status`"
                )
            }
            let mark = await client.eventMark
            try await client.run(QMP.BlockCommit(device: device, jobID: job, baseNode: base.nodeName))
            ready = try await settleJob(job)
            guard ready else {
                let failed = await client.events(since: mark).last {
                    $0.name == "BLOCK_JOB_COMPLETED" && $0.data["device"]?.string == job
                }
                throw SnapshotError(
                    .commandFailed,
                    "merging \(overlay) back into the disk of \(target) failed: \(failed?.data["error"]?.string ?? "the job ended before it was ready"); the overlay was kept"
                )
            }
        }
        try await synced()
        let switched = await client.eventMark
        try await client.run(QMP.BlockJobComplete(device: job))
        let done = try await client.waitForEvent("BLOCK_JOB_COMPLETED", since: switched, timeout: .seconds(600)) {
            $0.data["device"]?.string == job
        }
        if let error = done.data["error"]?.string {
            throw SnapshotError(
                .commandFailed,
                "merging \(overlay) back into the disk of \(target) failed: \(error); the overlay was kept")
        }
        // Out of the chain now; a node vmsnap opened before the pause is still open. Closed at
        // once (one command: a held disk's guest is still stopped for the switch), and only as
        // well as it goes: the switch happened, so nothing here may fail the merge. A node left
        // open is closed before the next snapshot (``closeDetachedOverlays()``).
        _ = try? await client.run(QMP.DeleteNode(nodeName: Self.overlayNode(overlay)))
    }

    /// Brings job `id` to a state to act on: true once it is ready to switch, false once it is
    /// gone (it never existed, or ended). A paused job is resumed; one concluded is dismissed;
    /// one running, waiting, pending or aborting is waited for (up to 10 minutes).
    func settleJob(_ id: String) async throws -> Bool {
        let deadline = ContinuousClock.now + .seconds(600)
        while ContinuousClock.now < deadline {
            guard let job = try await client.run(QMP.QueryJobs()).first(where: { $0.id == id }) else { return false }
            switch job.status {
            case "ready": return true
            case "paused", "standby":
                // QEMU refuses to resume a job paused by a drain rather than a user: wait then.
                _ = try? await client.run(QMP.JobResume(id: id))
                try await Task.sleep(for: .milliseconds(20))
            case "concluded", "null", "undefined":
                _ = try? await client.run(QMP.JobDismiss(id: id))
                return false
            default: try await Task.sleep(for: .milliseconds(20))
            }
        }
        throw SnapshotError(.busy, "QEMU's job \(id) did not become ready within 10 minutes; it was left running")
    }

    /// An overlay made before the pause whose snapshot did not happen: a vmsnap killed while
    /// formatting it may have left its protocol node open, one killed before the pause its
    /// overlay node.
    func closeUnusedOverlay(_ overlay: String) async throws {
        for job in try await client.run(QMP.QueryJobs())
        where job.id.hasPrefix("vmsnap-create-") && job.status == "concluded" {
            _ = try? await client.run(QMP.JobDismiss(id: job.id))
        }
        try await closeOverlayNodes(overlay)
        save.preparedOverlays[overlay] = nil
    }

    /// Closes the nodes vmsnap opened on `overlay` (its overlay node, then a protocol node left
    /// from formatting it). QEMU refuses to close a node still in a chain: that error is thrown,
    /// so the caller keeps the file.
    func closeOverlayNodes(_ overlay: String) async throws {
        let nodes = try await client.run(QMP.QueryNamedBlockNodes())
        if nodes.contains(where: { $0.nodeName == Self.overlayNode(overlay) }) {
            try await client.run(QMP.DeleteNode(nodeName: Self.overlayNode(overlay)))
        }
        for node in nodes where node.file == overlay && node.driver == "file" && node.nodeName.hasPrefix("vmsnap-") {
            try await client.run(QMP.DeleteNode(nodeName: node.nodeName))
        }
    }

    /// Closes the overlay nodes vmsnap opened that no disk's chain holds any more (a stream took
    /// them out; one opened by a vmsnap killed before its pause shows a `json:` filename). A node
    /// something else still uses (a job, an export) QEMU refuses to close: it is left. Best
    /// effort: the work before it is done, and a node left is closed by the next call.
    func closeDetachedOverlays() async {
        guard let devices = try? await client.blockDevices(),
            let nodes = try? await client.run(QMP.QueryNamedBlockNodes())
        else { return }
        let inChains = Set(devices.flatMap(\.chain))
        for node in nodes where node.nodeName.hasPrefix(Self.overlayNodePrefix) && !inChains.contains(node.file) {
            _ = try? await client.run(QMP.DeleteNode(nodeName: node.nodeName))
        }
    }

    public func mergeIntoActive(target: String, base: String?, progress: ProgressHandler?) async throws {
        try await stream(target: target, into: nil, base: base, progress: progress)
    }

    public func mergeIntoLayer(target: String, layer: String, base: String?, progress: ProgressHandler?) async throws {
        try await stream(target: target, into: layer, base: base, progress: progress)
    }

    /// Makes everything QEMU wrote reach the images: the stream rewrote a header while the new
    /// cluster mappings may sit in QEMU's metadata cache. `stop` flushes every disk (also when the
    /// guest is paused already); a running guest is let go at once.
    func flushAll() async throws {
        let running = try await client.status().running
        try await client.stop()
        guard running else { return }
        do { try await client.cont() } catch {
            // Once more: a guest stopped here must not stay stopped by a passing QMP error.
            do { try await client.cont() } catch {
                throw SnapshotError(
                    .commandFailed,
                    "QEMU flushed the disks but did not resume the guest (\(error)); it is paused: run `vmsnap domain resume`"
                )
            }
        }
    }

    /// A `block-stream` job into the running layer of `target` (`layer` nil) or into the
    /// read-only layer that is image `layer`, from its backing image down to `base`; waits for it.
    func stream(target: String, into layer: String?, base: String?, progress: ProgressHandler?) async throws {
        let job = "vmsnap-stream-\(target)"
        try await self.layer {
            _ = try await settleJob(job)  // one a killed vmsnap left: waited for, or dismissed
            let mark = await client.eventMark
            let nodes = try await client.run(QMP.QueryNamedBlockNodes())
            let device: String
            if let layer {
                guard let node = nodes.first(where: { $0.file == layer && !QEMUBlockLayer.isProtocol($0.driver) })
                else {
                    throw SnapshotError(
                        .conflict,
                        "disk \(target): the running QEMU has no image \(layer) open; nothing was merged. Check the disk with `vmsnap disk check`"
                    )
                }
                device = node.nodeName
            } else {
                device = try await addressing.address(target, client: client).name
            }
            // A stream that finished for a vmsnap killed before it recorded so: nothing left to do.
            let backing: String??
            if layer == nil {
                backing = try await client.blockDevices().first { $0.device == device || $0.nodeName == device }
                    .map { $0.backing }
            } else {
                backing = nodes.first { $0.nodeName == device }.map { $0.backingFile }
            }
            if let backing, backing == base, !(try await client.run(QMP.QueryJobs()).contains { $0.id == job }) {
                try await flushAll()
                await closeDetachedOverlays()
                return
            }
            try await client.run(QMP.BlockStream(device: device, jobID: job, base: base))
            let started = ContinuousClock.now
            while true {
                if let done = try? await client.waitForEvent(
                    "BLOCK_JOB_COMPLETED", since: mark, timeout: .milliseconds(500),
                    where: { $0.data["device"]?.string == job })
                {
                    if let error = done.data["error"]?.string {
                        throw SnapshotError(
                            .commandFailed, "merging into the running layer of \(target) failed: \(error)")
                    }
                    try await flushAll()
                    await closeDetachedOverlays()
                    return
                }
                let elapsed = ContinuousClock.now - started
                if elapsed > .seconds(1), let progress,
                    let info = try await client.run(QMP.QueryBlockJobs()).first(where: { $0.device == job })
                {
                    let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
                    progress(.measured("merge \(target)", done: info.offset, total: info.length, seconds: seconds))
                }
            }
        }
    }
}

/// What a snapshot prepared through a handle stands at between the domain layer's calls (a
/// handle serves one snapshot).
final class SnapshotSession: Sendable {
    enum Stage: Sendable {
        case none
        /// The guest will be stopped for the save (`pause()` is a plain stop).
        case prepared
        /// A pre-copy will start at `pause()`.
        case precopyPrepared(fd: Int32, total: UInt64, progress: ProgressHandler?)
        /// QEMU stopped the guest before the pre-copy's last round.
        case atSwitchover
    }
    private let state = Mutex(Stage.none)
    private let liveMethod = Mutex<LiveSave?>(nil)
    private let forced = Mutex<LiveSave?>(nil)
    /// The method a test forced on this handle (``QEMULiveDomain/forceLiveSaveMethod(_:)``).
    var forcedMethod: LiveSave? {
        get { forced.withLock { $0 } }
        set { forced.withLock { $0 = newValue } }
    }
    /// How the prepared live save keeps its point in time (nil: not live, or none prepared).
    var method: LiveSave? {
        get { liveMethod.withLock { $0 } }
        set { liveMethod.withLock { $0 = newValue } }
    }
    var stage: Stage {
        get { state.withLock { $0 } }
        set { state.withLock { $0 = newValue } }
    }
    private let bytes = Mutex<UInt64?>(nil)
    /// The guest's RAM size of the save prepared.
    var guestBytes: UInt64? {
        get { bytes.withLock { $0 } }
        set { bytes.withLock { $0 = newValue } }
    }
    /// The overlays made and opened before the pause: their node names by path.
    private let overlays = Mutex([String: String]())
    var preparedOverlays: [String: String] {
        get { overlays.withLock { $0 } }
        set { overlays.withLock { $0 = newValue } }
    }
}

/// How a live memory save keeps the memory of the pause's instant
/// (``QEMULiveDomain/liveSaveMethod()``).
public enum LiveSave: Sendable, Equatable, CustomStringConvertible {
    /// Memory streams while the guest runs; the last round runs in the pause (KVM).
    case precopy
    /// Memory is write-protected in the pause; each page is copied before the guest's first
    /// write to it (QEMU's background snapshot; TCG).
    case writeProtect
    /// The guest stays stopped until all of its memory is saved: QEMU refused the background
    /// copy (`because`: its words), and under TCG the pre-copy is no option.
    case stopped(because: String)

    public var description: String {
        switch self {
        case .precopy: "pre-copy (memory streamed while the guest ran; the last round in the pause)"
        case .writeProtect:
            "background copy (memory write-protected in the pause, each page saved before the guest's first write to it)"
        case .stopped(let why):
            "stopped save (the guest paused until all of its memory was saved: QEMU refused the background copy: \(why))"
        }
    }
}

/// How long a pre-copy save may run before the guest's final stop may grow, and by how much:
/// 10 ms at first (the pause floor measured in ../shared/notes/qemu-pause-floor.md is 5-16 ms);
/// once the save has had time for two passes over the guest's memory at 200 MiB/s (the slowest
/// rate measured here) plus 2 s, each further second doubles the allowed stop. The last step
/// is longer than any save of a guest this size takes, so the save ends.
enum PrecopyPolicy {
    static let downtimeLimitsMs = [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 10000]

    static func step(after elapsed: Duration, guestBytes: UInt64) -> Int {
        let budget = 2.0 + 2.0 * Double(guestBytes) / Double(200 << 20)
        let over = elapsed.seconds - budget
        return over < 0 ? 0 : min(1 + Int(over), downtimeLimitsMs.count - 1)
    }
}
