import Foundation
import HypervisorDriver
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

extension DomainService {
    func requireSnapshot(_ domain: String, _ name: String) throws -> DomainSnapshotRecord {
        let all = try store.domainSnapshots(of: domain)
        guard let rec = all.first(where: { $0.name == name }) else {
            let known = all.map(\.name).prefix(10).joined(separator: ", ")
            throw SnapshotError(
                .notFound,
                "domain '\(domain)' has no snapshot named \(SnapshotName.quoted(name)) (it has: \(known.isEmpty ? "none" : known))"
            )
        }
        return rec
    }

    // MARK: - Revert

    /// Makes the domain what it was at `name`: disks, memory and run state (or `runState`).
    /// Newer disk states are kept as branches of the snapshot tree, never lost.
    public func revertSnapshot(
        domain: String, to name: String, runState override: DomainRunState? = nil, force: Bool = false
    ) async throws {
        let lock = try domainLock(domain)
        defer { withExtendedLifetime(lock) {} }
        try await recover(domain: domain)
        _ = try definition(domain)
        try requireNoViews(domain, doing: "revert a snapshot")
        let record = try requireSnapshot(domain, name)
        let target = override ?? record.state
        if record.isDiskOnly, target != .shutoff, !force {
            throw SnapshotError(
                .conflict,
                "snapshot '\(name)' has no memory: reverting to it \(override == nil ? "(it was taken while the domain ran) " : "")boots the domain from crash-consistent disks, like a reset after a power cut. Pass --force to do that"
            )
        }
        if let memory = record.memory, memory.location == .external,
            !FileManager.default.isReadableFile(atPath: memory.path)
        {
            throw SnapshotError(
                .notFound,
                "the memory image \(memory.path) of snapshot '\(name)' is missing; nothing was changed. Restore the file, or revert with --force to boot from the disks alone"
            )
        }
        for disk in record.disks where disk.kind != nil {
            let (backend, layout) = try await disks.manage(disk.diskID, kind: disk.backend)
            guard layout.snapshot(named: name) != nil else {
                throw SnapshotError(
                    .notFound,
                    "disk \(disk.target) (\(disk.diskID)) no longer has the disk snapshot '\(name)'; nothing was changed"
                )
            }
            // Plan each disk's revert now, so a refusal comes before the domain is touched. The
            // running hypervisor holds the images; that one refusal goes away once it is stopped.
            do { _ = try await backend.planRevert(to: name, layout: layout) } catch let e as SnapshotError
                where e.code == .inUse
            {} catch let e as SnapshotError {
                throw SnapshotError(e.code, "disk \(disk.target): \(e.message). Nothing was changed")
            }
        }
        try checkDeviceStateRestorable(record, force: force)
        // The snapshot's definition may name state another domain has taken since.
        try Self.checkDeviceStateOwnership(
            record.definition, others: try store.domains().filter { $0.name != domain })
        var j = DomainJournal(operation: .revert, snapshot: name, record: record)
        j.targetState = target
        let journalID = try store.beginDomainJournal(
            domain: domain, operation: "revert to '\(name)'", payload: try JSONEncoder().encode(j))
        do {
            try await finishRevert(domain: domain, journalID: journalID, j, force: force)
        } catch {
            // Not a crash: the reason is known and retrying would meet it again.
            try? store.finishDomainJournal(journalID, state: "failed")
            let state = (try? await runState(domain))?.rawValue ?? "unknown"
            throw SnapshotError(
                (error as? SnapshotError)?.code ?? .commandFailed,
                "reverting domain '\(domain)' to '\(name)' failed part way: \(error). The domain is \(state) now; disks already reverted stay reverted (`vmsnap disk snapshot list` shows each)"
            )
        }
    }

    /// Asks the kernel to read a file ahead into the page cache, on a thread of its own (the
    /// request itself can take tens of milliseconds for a large file). A hint: errors are ignored.
    static func prefetch(_ path: String) {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { return }
        Thread.detachNewThread {
            _ = posix_fadvise(fd, 0, 0, POSIX_FADV_WILLNEED)
            close(fd)
        }
    }

    /// Runs (or, after a crash, resumes) a journaled revert. Every phase can run again.
    func finishRevert(domain: String, journalID: Int64, _ j0: DomainJournal, force: Bool) async throws {
        var j = j0
        guard let record = j.record, let target = j.targetState else { return }
        let driver = try drivers.driver(for: record.definition)
        // The memory image is read from storage while the domain stops and its disks revert, so
        // the hypervisor loads it from the page cache.
        if let memory = record.memory, memory.location == .external { Self.prefetch(memory.path) }
        if !j.phases.contains("stopped") {
            Trace.mark("revert: begin")
            try await driver.destroy(domain)
            Trace.mark("revert: domain stopped")
            try phase(journalID, &j, "stopped")
        }
        // Served disks' servers go with the hypervisor (each flushes first).
        stopDiskServers(domain)
        // With the hypervisor gone every disk must be closed: an LVM merge into a volume someone else
        // holds would wait for its next activation while the domain ran on the old data.
        for disk in record.disks where disk.kind != nil && !j.disksDone.contains(disk.target) {
            let (backend, layout) = try await disks.manage(disk.diskID, kind: disk.backend)
            if try await backend.state(of: layout) == .live {
                throw SnapshotError(
                    .inUse,
                    "disk \(disk.target) (\(disk.diskID)) is still open by another process after the domain stopped; close it, then revert again (no further disk was reverted)"
                )
            }
        }
        for disk in record.disks where disk.kind != nil && !j.disksDone.contains(disk.target) {
            try await disks.revert(disk: disk.diskID, to: record.name, kind: disk.backend)
            Trace.mark("revert: disk \(disk.target) reverted")
            j.disksDone.append(disk.target)
            try phase(journalID, &j, "disk-\(disk.target)")
        }
        if !j.phases.contains("devices"), NewFile.exists(deviceStateCopy(domain, snapshot: record.name)) {
            try restoreDeviceState(record)
            try phase(journalID, &j, "devices")
        }
        if !j.phases.contains("defined") {
            try store.define(record.definition)
            try phase(journalID, &j, "defined")
        }
        if target != .shutoff, !j.phases.contains("started") {
            try await driver.destroy(domain)  // a half-started hypervisor from an interrupted run
            let drives = try await startDrives(record.definition, driver: driver)
            let mode: StartMode =
                switch record.memory?.location {
                case .external?: .restoreMemory(path: record.memory!.path, running: target == .running)
                case .internal?: .loadInternal(name: record.name, running: target == .running)
                case nil: .boot(paused: target == .paused)
                }
            try await driver.start(record.definition, drives: drives, mode: mode, progress: progress)
            Trace.mark("revert: domain started")
            try phase(journalID, &j, "started")
        }
        try store.updateDomainSnapshots(domain: domain, current: .some(record.name))
        try store.finishDomainJournal(journalID, state: "done")
    }

    // MARK: - Delete

    /// Deletes `name` (its disk changes merge into its children), its subtree, or only its
    /// subtree; `metadataOnly` forgets the records and leaves storage alone.
    public func deleteSnapshot(domain: String, _ name: String, mode: DeleteMode, metadataOnly: Bool = false)
        async throws
    {
        let lock = try domainLock(domain)
        defer { withExtendedLifetime(lock) {} }
        try await recover(domain: domain)
        _ = try definition(domain)
        try requireNoViews(domain, doing: "delete a snapshot")
        let record = try requireSnapshot(domain, name)
        let all = try store.domainSnapshots(of: domain)
        let below = Self.descendants(of: name, in: all)
        let removing = mode == .merge ? [name] : (mode == .children ? [name] : []) + below.map(\.name)
        if removing.isEmpty { return }
        let running = try await runState(domain) != .shutoff
        if !metadataOnly, running {
            for disk in record.disks where disk.kind != nil {
                let (backend, layout) = try await disks.manage(disk.diskID, kind: disk.backend)
                let drive = try backend.hypervisorDrive(layout)
                if try hypervisorDeletes(drive, kind: disk.kind!, domain: domain) {
                    guard mode == .merge else {
                        throw SnapshotError(
                            .unsupported,
                            "deleting a subtree while domain '\(domain)' runs is not supported for its \(drive.format) disk \(disk.target); stop the domain first, or delete the snapshots one at a time"
                        )
                    }
                    if try await keptByBackend(layout: layout, name: name, kind: backend.kind) != nil {
                        continue  // only the record goes
                    }
                    if case .storage = try liveDeleteResult(layout: layout, name: name, target: disk.target).1 {
                        // Nothing of it is open: the backend's own refusal, if any, comes now.
                        _ = try await backend.planDelete(name, mode: mode, layout: layout)
                    }
                } else if drive.served, try driver(domain).capabilities.servedDisks {
                    // Deleted offline with its server held (the guest's requests to it wait).
                    try backend.descriptor.capabilities.require(
                        Capability(.delete, disk.kind!, .offline), backend: backend.kind)
                } else if !backend.descriptor.capabilities.supports(.delete, disk.kind!, .live) {
                    throw SnapshotError(
                        .unsupported,
                        "disk \(disk.target): backend '\(backend.kind)' cannot delete snapshots while the domain runs; stop it first"
                    )
                } else if try !driver(domain).capabilities.pausedStorageSnapshotSources.contains(drive.sourceType) {
                    throw SnapshotError(
                        .unsupported,
                        "disk \(disk.target): the domain's hypervisor holds this \(drive.sourceType.rawValue) open and locked while it runs, so backend '\(backend.kind)' cannot change its snapshots; stop the domain first"
                    )
                }
            }
        }
        var j = DomainJournal(operation: .delete, snapshot: name, record: record)
        j.removing = removing
        j.mode = mode
        if metadataOnly { j.phases.append("storage-skipped") }
        let journalID = try store.beginDomainJournal(
            domain: domain, operation: "delete '\(name)'", payload: try JSONEncoder().encode(j))
        try await finishDelete(domain: domain, journalID: journalID, j)
    }

    func finishDelete(domain: String, journalID: Int64, _ j0: DomainJournal) async throws {
        var j = j0
        guard let record = j.record, let mode = j.mode else { return }
        if !j.phases.contains("storage-skipped") {
            let running = try driver(domain).isRunning(domain)
            for disk in record.disks where disk.kind != nil && !j.disksDone.contains(disk.target) {
                let (backend, layout) = try await disks.manage(disk.diskID, kind: disk.backend)
                let hasIt =
                    layout.snapshot(named: record.name) != nil
                    || (mode == .childrenOnly && !layout.tree.descendants(of: record.name).isEmpty)
                let (streaming, streamed) = ("streaming-\(disk.target)", "streamed-\(disk.target)")
                if j.phases.contains(streaming),
                    try await recoverStream(domain: domain, target: disk.target, j, running: running, current: layout)
                {
                    // A merge QEMU confirmed before the crash: recorded now, not planned again.
                } else if hasIt {
                    if running, let drive = try? backend.hypervisorDrive(layout),
                        try hypervisorDeletes(drive, kind: disk.kind!, domain: domain)
                    {
                        try await liveDelete(
                            domain: domain, target: disk.target, layout: layout, name: record.name, mode: mode,
                            kind: disk.backend,
                            beforeStream: { after in
                                // QEMU is about to rewrite a layer's backing file: from here on, a
                                // recovery looks at the images before it plans anything.
                                j.liveBefore[disk.target] = layout
                                j.liveAfter[disk.target] = after
                                try phase(journalID, &j, streaming)
                            },
                            afterStream: { try phase(journalID, &j, streamed) })
                    } else if running, (try? backend.hypervisorDrive(layout))?.served == true {
                        // A served disk changes offline, its server held (the guest's requests
                        // to it wait for the merge), then serves the record's active layer.
                        try holdServed(domain, target: disk.target)
                        do {
                            try await disks.delete(
                                disk: disk.diskID, snapshot: record.name, mode: mode, kind: disk.backend)
                        } catch {
                            try? reopenServed(domain, targets: [disk.target])
                            throw error
                        }
                        try reopenServed(domain, targets: [disk.target])
                    } else {
                        try await disks.delete(disk: disk.diskID, snapshot: record.name, mode: mode, kind: disk.backend)
                    }
                }
                j.disksDone.append(disk.target)
                try phase(journalID, &j, "disk-\(disk.target)")
            }
            let all = try store.domainSnapshots(of: domain)
            for gone in all where j.removing.contains(gone.name) {
                if let memory = gone.memory, memory.location == .external { unlink(memory.path) }
                removeDeviceState(domain, snapshot: gone.name)
            }
            try phase(journalID, &j, "memory-removed")
        }
        let all = try store.domainSnapshots(of: domain)
        var reparented: [DomainSnapshotRecord] = []
        if mode == .merge {
            for var child in all where child.parent == record.name {
                child.parent = record.parent
                reparented.append(child)
            }
        }
        let current = try store.domain(named: domain)?.current
        var newCurrent: String?? = nil
        if let current, j.removing.contains(current) {
            newCurrent = .some(mode == .childrenOnly ? record.name : record.parent)
        }
        try store.updateDomainSnapshots(domain: domain, upsert: reparented, remove: j.removing, current: newCurrent)
        try store.finishDomainJournal(journalID, state: "done")
    }

    public static func descendantNames(of name: String, in all: [DomainSnapshotRecord]) -> Set<String> {
        Set(descendants(of: name, in: all).map(\.name))
    }

    static func descendants(of name: String, in all: [DomainSnapshotRecord]) -> [DomainSnapshotRecord] {
        var out: [DomainSnapshotRecord] = []
        var frontier = [name]
        while let next = frontier.popLast() {
            for child in all where child.parent == next {
                out.append(child)
                frontier.append(child.name)
            }
        }
        return out
    }

    /// How a snapshot of a disk the hypervisor has open goes while the domain runs.
    enum LiveDeleteWay {
        /// Only the record: the image stays a layer (other snapshots live in it or read through it).
        case recordOnly
        /// Nothing of it is open: the backend deletes it as it would offline.
        case storage
        /// An internal snapshot of the running image, deleted by the hypervisor.
        case internalInPlace
        /// The image merged into the layer built on it (nil: the running one), which then reads
        /// through `base`; the image is removed.
        case merge(into: String?, base: String?)
    }

    /// The images the running domain has open: the active one and its backing chain.
    static func runningChain(_ layout: DiskLayout) -> Set<String> {
        var chain: Set<String> = []
        var next: String? = layout.disk.active
        while let image = next, chain.insert(image).inserted { next = layout.layer(image)?.backing }
        return chain
    }

    /// How to delete `name` from a disk the hypervisor has open, and the layout after it, or why it
    /// cannot be done live: an internal snapshot inside a read-only layer of the running chain, or
    /// an external one on that chain with other layers built on its image.
    func liveDeleteResult(layout: DiskLayout, name: String, target: String) throws -> (DiskLayout, LiveDeleteWay) {
        guard let snap = layout.snapshot(named: name) else { return (layout, .recordOnly) }
        var after = layout
        after.snapshots.removeAll { $0.name == name }
        for i in after.snapshots.indices where after.snapshots[i].parent == name {
            after.snapshots[i].parent = snap.parent
        }
        if after.disk.current == name { after.disk.current = snap.parent }
        guard Self.runningChain(layout).contains(snap.image) else { return (layout, .storage) }
        switch snap.kind {
        case .internal:
            guard snap.image == layout.disk.active else {
                throw SnapshotError(
                    .unsupported,
                    "disk \(target): internal snapshot '\(name)' is inside \(snap.image), a read-only layer of the running domain; stop the domain to delete it"
                )
            }
            return (after, .internalInPlace)
        case .external:
            let users = layout.layers.filter { $0.backing == snap.image }
            if LayerChainPlanner.mustStayALayer(snap.image, children: users, layout: layout) != nil
                || layout.snapshots.contains(where: { $0.name != name && $0.image == snap.image })
            {
                // Other snapshots live in the image or read through it: only the record goes, the
                // image stays a layer of the running chain (as the backends do offline).
                return (after, .recordOnly)
            }
            guard users.count == 1, let child = users.first else {
                throw SnapshotError(
                    .unsupported,
                    "disk \(target): external snapshot '\(name)' has \(users.count) layers built on its image \(snap.image), one of them running; stop the domain to delete it"
                )
            }
            let baseBacking = layout.layers.first { $0.image == snap.image }?.backing
            after.layers.removeAll { $0.image == snap.image }
            for i in after.layers.indices where after.layers[i].image == child.image {
                after.layers[i].backing = baseBacking
            }
            return (after, .merge(into: child.image == layout.disk.active ? nil : child.image, base: baseBacking))
        }
    }

    /// Whether the domain's hypervisor deletes this disk's snapshots while it runs (where it
    /// took them: its formats, and the backend lets it), rather than the backend.
    func hypervisorDeletes(_ drive: HypervisorDrive, kind: SnapshotKind, domain: String) throws -> Bool {
        let caps = try driver(domain).capabilities
        return drive.liveSnapshots && caps.liveMerge && caps.snapshotsLive(format: drive.format, kind: kind)
    }

    /// Deletes a disk snapshot of a running domain: through the hypervisor where it has the
    /// images open (internal in place; external by merging its image into the layer built on it,
    /// the running one or one further down, then removing the image), through the backend where
    /// it does not.
    func liveDelete(
        domain: String, target: String, layout: DiskLayout, name: String, mode: DeleteMode, kind: BackendKind,
        beforeStream: (DiskLayout) throws -> Void, afterStream: () throws -> Void
    ) async throws {
        if mode == .merge, let kept = try await keptByBackend(layout: layout, name: name, kind: kind) {
            try await disks.record(kept, replacing: layout)
            return
        }
        let (after, way) = try liveDeleteResult(layout: layout, name: name, target: target)
        guard let snap = layout.snapshot(named: name) else { return }
        switch way {
        case .storage:
            try await disks.delete(
                disk: layout.disk.id, snapshot: name, mode: mode, kind: kind, offTheRunningChain: true)
            return
        case .recordOnly:
            try await disks.record(after, replacing: layout)
            return
        case .internalInPlace, .merge:
            break
        }
        if case .merge = way { try beforeStream(after) }
        let live = try await driver(domain).connect(domain)
        do {
            switch way {
            case .merge(nil, let base):
                try await live.mergeIntoActive(target: target, base: base, progress: progress)
            case .merge(let layer?, let base):
                try await live.mergeIntoLayer(target: target, layer: layer, base: base, progress: progress)
            default:
                try await live.deleteInternalSnapshot(target: target, name: name)
            }
            await live.close()
        } catch {
            await live.close()
            throw error
        }
        DomainFault.point("delete:stream-done-\(target)", hypervisor: hypervisorProcess(domain))
        if case .merge = way { try afterStream() }
        DomainFault.point("delete:confirmed-\(target)", hypervisor: hypervisorProcess(domain))
        try await disks.record(after, replacing: layout)
        if snap.kind == .external { Self.removeMergedImage(snap.image) }
    }

    /// The layout after deleting external snapshot `name` when the backend's own delete of it only
    /// forgets the record and keeps its image as a layer (the raw image a chain starts on, which
    /// the layer above merely reads), or nil. The hypervisor's merge would pull that image into
    /// the layer above and remove it, so a live delete does what the backend does.
    func keptByBackend(layout: DiskLayout, name: String, kind: BackendKind) async throws -> DiskLayout? {
        guard let snap = layout.snapshot(named: name), snap.kind == .external else { return nil }
        let backend = try disks.registry.backend(kind, environment: disks.environment)
        // The backend refuses to plan for images the hypervisor holds; then the hypervisor merges.
        guard let plan = try? await backend.planDelete(name, mode: .merge, layout: layout), plan.steps.isEmpty,
            plan.result.layer(snap.image) != nil
        else { return nil }
        return plan.result
    }

    /// Removes an image a live merge emptied: a regular file only (never a device node, whatever
    /// the records say).
    static func removeMergedImage(_ image: String) {
        var st = stat()
        guard lstat(image, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { return }
        unlink(image)
    }

    /// After a crash during a live delete's merge (`streaming-<target>` journaled), from what the
    /// journal and the images say. Returns true when the disk's part is done.
    /// - Confirmed (`streamed-<target>`: QEMU finished and flushed): the new layout is recorded if
    ///   it is not yet, and the merged image removed.
    /// - Not confirmed, QEMU running: false; the delete runs again and QEMU settles its own job.
    /// - Not confirmed, QEMU gone: the layer's header may already name the image's own backing
    ///   file while QEMU's new cluster mappings never reached the file. The stream only copied what
    ///   the layer read through the image, so pointing the header back at the image (still there)
    ///   gives exactly the disk as it was; the delete is then planned again, offline. (That holds
    ///   for a killed process; after a power cut a mapping may reach the disk before its data.)
    func recoverStream(domain: String, target: String, _ j: DomainJournal, running: Bool, current: DiskLayout)
        async throws -> Bool
    {
        guard let before = j.liveBefore[target], let after = j.liveAfter[target],
            let image = before.snapshot(named: j.snapshot)?.image
        else { return false }
        if j.phases.contains("streamed-\(target)") {
            guard current == before || current == after else { return false }
            if current == before { try await disks.record(after, replacing: before) }
            if !after.layers.contains(where: { $0.image == image || $0.backing == image }) {
                Self.removeMergedImage(image)
            }
            return true
        }
        guard !running, current == before,
            case let (_, .merge(into, base))? = try? liveDeleteResult(layout: before, name: j.snapshot, target: target)
        else { return false }
        let layer = into ?? before.disk.active
        let tool = try drivers.driver(for: try definition(domain).definition).backupImages
        let named = try await tool.backingFile(of: layer)
        func same(_ a: String?, _ b: String?) -> Bool {
            guard let a, let b else { return a == nil && b == nil }
            return a == b || (FileIdentity(a).map { $0 == FileIdentity(b) } ?? false)
        }
        if same(named, image) { return false }
        guard same(named, base) else {
            throw SnapshotError(
                .conflict,
                "disk \(target): \(layer) names \(named ?? "no backing file"), neither \(image) nor \(base ?? "none"), after an interrupted merge; nothing was changed. Inspect it with `qemu-img info`, then `vmsnap recover --abandon`"
            )
        }
        try await tool.setBackingFile(of: layer, to: image)
        notify(
            "disk \(target): the merge of \(image) into \(layer) was interrupted; \(layer) reads through \(image) again"
        )
        return false
    }

    // MARK: - Inspect

    public func snapshots(of domain: String) throws -> (all: [DomainSnapshotRecord], current: String?) {
        let (_, current) = try definition(domain)
        return (try store.domainSnapshots(of: domain), current)
    }

    public func info(domain: String, _ name: String) throws -> DomainSnapshotRecord {
        _ = try definition(domain)
        return try requireSnapshot(domain, name)
    }

    /// Sets the current snapshot (metadata only), as `virsh snapshot-current NAME` does.
    public func setCurrent(domain: String, _ name: String) throws {
        let lock = try domainLock(domain)
        defer { withExtendedLifetime(lock) {} }
        _ = try requireSnapshot(domain, name)
        try store.updateDomainSnapshots(domain: domain, current: .some(name))
    }

    // MARK: - Recovery

    /// Finishes or rolls back interrupted domain operations (the caller holds the domain lock,
    /// or `recoverAll` takes it).
    public func recover(domain: String) async throws {
        let entries = try store.openDomainJournals(domain: domain)
        // Whatever happened, a served disk then serves the layer its record names active.
        defer { if !entries.isEmpty { try? reopenServed(domain) } }
        for entry in entries {
            if entry.pid != getpid(), kill(entry.pid, 0) == 0, entry.pid > 0,
                (try? String(contentsOfFile: "/proc/\(entry.pid)/comm", encoding: .utf8))?.hasPrefix("vmsnap") == true
            {
                throw SnapshotError(
                    .busy, "vmsnap process \(entry.pid) is still working on domain '\(domain)' (\(entry.operation))")
            }
            if BlockJournal.Operation(rawValue: entry.operation) != nil {
                try await recoverBlockJournal(entry)
                continue
            }
            let j = try JSONDecoder().decode(DomainJournal.self, from: entry.payload)
            switch j.operation {
            case .create:
                if try store.domainSnapshots(of: domain).contains(where: { $0.name == j.snapshot }) {
                    try store.finishDomainJournal(entry.id, state: "done")  // committed just before the crash
                    continue
                }
                try await rollBackCreate(domain: domain, journalID: entry.id, j)
                try store.finishDomainJournal(entry.id, state: "rolled-back")
                notify("recovered an interrupted '\(entry.operation)' on domain '\(domain)': rolled back")
            case .revert:
                try await finishRevert(domain: domain, journalID: entry.id, j, force: true)
                notify("recovered an interrupted '\(entry.operation)' on domain '\(domain)': finished")
            case .delete:
                try await finishDelete(domain: domain, journalID: entry.id, j)
                notify("recovered an interrupted '\(entry.operation)' on domain '\(domain)': finished")
            }
        }
        _ = try await reviveDiskServers(domain)
    }

    /// Recovers every domain with interrupted work, and starts again the disk servers that are
    /// gone from running domains (a domain some other vmsnap works on is left to it).
    public func recoverAll() async throws -> [String] {
        var done: [String] = []
        let journaled = Set(try store.openDomainJournals().map(\.domain))
        for domain in journaled.sorted() {
            let lock = try DiskLock(store: store, diskID: "domain:" + domain, timeout: 0)
            try await recover(domain: domain)
            withExtendedLifetime(lock) {}
            done.append(domain)
        }
        for domain in domainsWithServedDisks() where !journaled.contains(domain) {
            guard let lock = try? DiskLock(store: store, diskID: "domain:" + domain, timeout: 0) else { continue }
            if try await !reviveDiskServers(domain).isEmpty { done.append(domain) }
            withExtendedLifetime(lock) {}
        }
        return done
    }
}
