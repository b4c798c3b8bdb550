import Foundation

/// `VMSNAP_TRACE=1`: phase timings on stderr (milliseconds since the previous mark), for profiling.
public enum Trace {
    static let enabled = ProcessInfo.processInfo.environment["VMSNAP_TRACE"] != nil
    nonisolated(unsafe) static var last = DispatchTime.now().uptimeNanoseconds
    /// `what` is built only when tracing is on: marks sit on hot paths (every command vmsnap runs).
    public static func mark(_ what: @autoclosure () -> String) {
        guard enabled else { return }
        let previous = last
        let now = DispatchTime.now().uptimeNanoseconds
        FileHandle.standardError.write(
            Data(String(format: "trace %7.2f ms  %@\n", Double(now &- previous) / 1e6, what()).utf8))
        last = now
    }
}

/// Disk-level snapshot operations over any registered backend: resolves a disk, checks names and
/// capabilities, takes the disk's lock, recovers interrupted work, then journals and runs the
/// backend's plan. The CLI's `vmsnap disk ...` commands and the conformance suite go through it.
public struct DiskSnapshotService: Sendable {
    public let store: MetadataStore
    public let registry: BackendRegistry
    public let environment: BackendEnvironment
    /// Receives notes for the operator (recovered work, kept layers); stderr by default.
    public var notify: @Sendable (String) -> Void
    /// Where plans stop as if vmsnap were killed (the conformance suite's crash checks).
    public var crashPoint: CrashPoint?
    /// Seconds to wait for another host's lock on a disk whose metadata its storage shares
    /// (`VMSNAP_LOCK_WAIT`, default 60).
    public var sharedLockWait: TimeInterval =
        ProcessInfo.processInfo.environment["VMSNAP_LOCK_WAIT"].flatMap(TimeInterval.init) ?? 60

    public init(
        store: MetadataStore, registry: BackendRegistry, environment: BackendEnvironment = BackendEnvironment(),
        notify: @escaping @Sendable (String) -> Void = { FileHandle.standardError.write(Data("vmsnap: \($0)\n".utf8)) }
    ) {
        self.store = store
        self.registry = registry
        self.environment = environment
        self.notify = notify
    }

    var executor: PlanExecutor { PlanExecutor(store: store, runner: environment.runner, crashPoint: crashPoint) }

    // MARK: - Resolving disks

    /// The backend for a disk and its layout: the stored layout if vmsnap manages the disk, else
    /// what the backend reads off the storage (not stored yet). The backend is the one named, the
    /// one that manages the disk, or the first that recognizes it.
    public func layout(of locator: String, kind: BackendKind? = nil) async throws -> (
        any DiskSnapshotBackend, DiskLayout
    ) {
        let (backend, id, managed) = try await resolve(locator, kind: kind)
        // A disk whose storage keeps the record: the storage's word, which every host shares.
        if backend.descriptor.sharedMetadata,
            let layout = try await SharedDiskSession.read(backend, diskID: id)?.content.layout
        {
            return (backend, layout)
        }
        if managed, let stored = try store.layout(diskID: id) { return (backend, stored) }
        return (backend, try await backend.adopt(locator: id))
    }

    /// The backend and identity of a disk, and whether vmsnap manages it already. Cheap: an
    /// indexed lookup, or the backends' format probes.
    func resolve(_ locator: String, kind: BackendKind?) async throws -> (any DiskSnapshotBackend, String, Bool) {
        // Checked before any backend opens it: a FIFO would block the open forever.
        var st = stat()
        if stat(locator, &st) == 0, ![S_IFREG, S_IFBLK].contains(st.st_mode & S_IFMT) {
            throw SnapshotError(
                .invalidArgument,
                "\(locator) is \(RegularFile.typeName(st.st_mode)); a disk is an image file or a block device. Nothing was changed"
            )
        }
        let candidates =
            try kind.map { [try registry.backend($0, environment: environment)] }
            ?? registry.allBackends(environment: environment)
        for backend in candidates {
            if let (id, owner) = try store.diskID(locator: backend.normalize(locator: locator)) {
                if let kind, owner != kind {
                    throw SnapshotError(.conflict, "\(locator) is managed by backend '\(owner)', not '\(kind)'")
                }
                return (
                    owner == backend.kind ? backend : try registry.backend(owner, environment: environment), id, true
                )
            }
        }
        // Another spelling of a managed disk (a symbolic link, a hard link, /dev/mapper/vg-lv for
        // vg/lv) is that disk, never a second one.
        if let (id, owner) = try sameFile(as: locator) {
            if let kind, owner != kind {
                throw SnapshotError(.conflict, "\(locator) is managed by backend '\(owner)' (as \(id)), not '\(kind)'")
            }
            return (try registry.backend(owner, environment: environment), id, true)
        }
        if kind != nil { return (candidates[0], candidates[0].normalize(locator: locator), false) }
        for backend in candidates where await backend.recognizes(locator: locator) {
            return (backend, backend.normalize(locator: locator), false)
        }
        throw SnapshotError(
            .invalidImage,
            "no backend recognizes \(locator): it is missing or not in a format vmsnap knows (\(registry.kinds.map(\.rawValue).joined(separator: ", "))); pass --backend KIND to say which it is"
        )
    }

    /// The managed disk whose identity, active layer or a layer is the same file as `locator`
    /// (device and inode; for block devices the device number), if any.
    func sameFile(as locator: String) throws -> (String, BackendKind)? {
        guard let wanted = FileIdentity(locator) else { return nil }
        for (id, kind, image) in try store.managedImages() where FileIdentity(image) == wanted {
            return (id, kind)
        }
        return nil
    }

    /// Runs `body` with the disk's lock held, after recovering interrupted work on it, and with
    /// the disk recorded in the store. For a disk whose storage shares its record with other
    /// hosts, the storage's lock is held too, the record is brought in first and written back
    /// after every journal change and at the end.
    private func withManagedDisk<T: Sendable>(
        _ locator: String, kind: BackendKind?,
        _ body: (any DiskSnapshotBackend, DiskLayout) async throws -> T
    ) async throws -> T {
        Trace.mark("start")
        let (backend, id, _) = try await resolve(locator, kind: kind)
        let lock = try DiskLock(store: store, diskID: id)
        defer { withExtendedLifetime(lock) {} }
        guard
            let session = try await SharedDiskSession.open(
                backend, diskID: id, store: store, wait: sharedLockWait, notify: notify)
        else { return try await underLock(backend, id, body) }
        let result: T
        do {
            result = try await SharedDiskSession.$current.withValue(session) {
                try await underLock(backend, id, body)
            }
        } catch {
            try? await session.close(publishing: true, notify: notify)
            throw error
        }
        try await session.close(publishing: true, notify: notify)
        return result
    }

    /// Finishes or rolls back the disk's open operations; `pending` stops here.
    private func recoverOpen(_ id: String, backend: any DiskSnapshotBackend) async throws {
        for entry in try store.openJournals(diskID: id) {
            let report = try await executor.recover(entry, backend: backend)
            if report.outcome == .pending {
                throw SnapshotError(
                    .pending,
                    "disk \(id): '\(report.operation)' is still pending, and nothing else can change the disk until it finishes: \(report.detail ?? "")"
                )
            }
            notify(
                "recovered an interrupted or pending '\(report.operation)' on \(report.diskID): \(report.outcome.rawValue)"
            )
        }
    }

    /// The part of ``withManagedDisk`` that runs with every lock held.
    private func underLock<T: Sendable>(
        _ backend: any DiskSnapshotBackend, _ id: String,
        _ body: (any DiskSnapshotBackend, DiskLayout) async throws -> T
    ) async throws -> T {
        try await recoverOpen(id, backend: backend)
        Trace.mark("resolve + lock + journal check")
        // Read under the lock: nobody else changes the disk while the operation runs.
        if let layout = try store.layout(diskID: id) {
            Trace.mark("layout")
            return try await body(backend, layout)
        }
        let adopted = try await backend.adopt(locator: id)
        try store.insert(adopted)
        do { return try await body(backend, adopted) } catch {
            // A command that fails leaves the store as it was: a disk it started to manage is
            // forgotten again, unless an operation on it is still open (recovery needs the record).
            if (try? store.openJournals(diskID: id).isEmpty) == true, (try? store.layout(diskID: id)) == adopted {
                try? store.removeDisk(id: id)
            }
            throw error
        }
    }

    /// The backend and stored layout of a disk, recording it in the store first if vmsnap did
    /// not manage it yet (after recovering interrupted work on it).
    public func manage(_ locator: String, kind: BackendKind? = nil) async throws -> (
        any DiskSnapshotBackend, DiskLayout
    ) {
        try await withManagedDisk(locator, kind: kind) { ($0, $1) }
    }

    /// An external snapshot another tool took (libvirt's backing chains): its name and the image
    /// it froze, which is a layer below the disk's active image.
    public struct ImportedExternalSnapshot: Sendable, Hashable {
        public var name: String
        public var frozenImage: String
        public var parent: String?
        public var createdAt: Date
        public var description: String?

        public init(name: String, frozenImage: String, parent: String?, createdAt: Date, description: String? = nil) {
            self.name = name
            self.frozenImage = frozenImage
            self.parent = parent
            self.createdAt = createdAt
            self.description = description
        }
    }

    /// Starts managing a disk whose active image sits on a backing chain another tool built with
    /// external snapshots: every image down to the deepest frozen one becomes a layer (what lies
    /// below stays an unmanaged backing), each named snapshot is recorded on the image it froze,
    /// and internal snapshots already inside the layers are imported as well. Nothing on storage
    /// changes.
    public func adoptChain(_ locator: String, kind: BackendKind, external: [ImportedExternalSnapshot], current: String?)
        async throws -> DiskLayout
    {
        let backend = try registry.backend(kind, environment: environment)
        let top = backend.normalize(locator: locator)
        if backend.descriptor.sharedMetadata {
            guard external.isEmpty else {
                throw SnapshotError(
                    .unsupported,
                    "backend '\(kind)' keeps no backing chains, so external snapshots of \(top) cannot be adopted; nothing was changed"
                )
            }
            // The storage's shared record first: another host may manage the disk already.
            return try await withManagedDisk(top, kind: kind) { _, layout in
                var after = layout
                if let current, after.snapshot(named: current) != nil { after.disk.current = current }
                if after != layout { try store.update(from: layout, to: after) }
                return after
            }
        }
        if let (id, _) = try store.diskID(locator: top), let stored = try store.layout(diskID: id) { return stored }
        let lock = try DiskLock(store: store, diskID: top)
        defer { withExtendedLifetime(lock) {} }
        if external.isEmpty {
            // No chain to rebuild: the backend's own adoption knows its snapshots best.
            var adopted = try await backend.adopt(locator: top)
            if let current, adopted.snapshot(named: current) != nil { adopted.disk.current = current }
            try store.insert(adopted)
            return adopted
        }
        let info = try await backend.inspect(locator: top)
        let chain = [top] + info.backingChain
        for snapshot in external where !chain.contains(snapshot.frozenImage) {
            throw SnapshotError(
                .notFound,
                "external snapshot '\(snapshot.name)' froze \(snapshot.frozenImage), which is not in the backing chain of \(top) (\(chain.joined(separator: " <- "))); nothing was changed"
            )
        }
        let deepest = external.compactMap { chain.firstIndex(of: $0.frozenImage) }.max() ?? 0
        var layout = DiskLayout(disk: DiskRecord(id: top, kind: backend.kind, active: top, current: current))
        for (i, image) in chain.prefix(deepest + 1).enumerated() {
            layout.layers.append(DiskLayer(image: image, backing: i + 1 < chain.count ? chain[i + 1] : nil))
            // A layer recorded as another format than the backend's (the raw image a chain starts
            // on) holds none of its snapshots, and is not read as its format.
            let formats = info.backingFormats ?? []
            let recorded = i > 0 && i - 1 < formats.count ? formats[i - 1] : ""
            let foreign = !recorded.isEmpty && recorded != backend.descriptor.imageFormat
            let stored = i == 0 ? info : foreign ? nil : try await backend.inspect(locator: image)
            for s in stored?.snapshots ?? [] where !external.contains(where: { $0.name == s.name }) {
                layout.snapshots.append(
                    DiskSnapshot(
                        name: s.name, kind: .internal, image: image, backendID: s.id, createdAt: s.createdAt,
                        virtualSize: s.virtualSize))
            }
        }
        for s in external {
            layout.snapshots.append(
                DiskSnapshot(
                    name: s.name, kind: .external, image: s.frozenImage, parent: s.parent, createdAt: s.createdAt,
                    description: s.description, virtualSize: info.virtualSize))
        }
        let names = Set(layout.snapshots.map(\.name))
        for i in layout.snapshots.indices where layout.snapshots[i].parent.map({ !names.contains($0) }) == true {
            layout.snapshots[i].parent = nil
        }
        if let c = layout.disk.current, !names.contains(c) { layout.disk.current = nil }
        try store.insert(layout)
        return layout
    }

    /// Sets the parents and current snapshot of a managed disk's snapshots (metadata only), as a
    /// tree imported from another tool says.
    public func setTree(disk id: String, parents: [String: String?], current: String??) async throws {
        guard let (_, kind) = try store.diskID(locator: id) else {
            throw SnapshotError(.notFound, "disk \(id) is not managed")
        }
        try await withManagedDisk(id, kind: kind) { _, before in
            try Self.setTree(before, parents: parents, current: current, store: store)
        }
    }

    private static func setTree(
        _ before: DiskLayout, parents: [String: String?], current: String??, store: MetadataStore
    )
        throws
    {
        var after = before
        for i in after.snapshots.indices {
            if let p = parents[after.snapshots[i].name] { after.snapshots[i].parent = p }
        }
        if let current { after.disk.current = current }
        try store.update(from: before, to: after)
    }

    /// Records a change made outside a backend plan (a snapshot the hypervisor took live), under
    /// the disk's lock, if the stored layout is still `before`.
    public func record(_ after: DiskLayout, replacing before: DiskLayout) async throws {
        if try registry.backend(before.disk.kind, environment: environment).descriptor.sharedMetadata {
            try await withManagedDisk(before.disk.id, kind: before.disk.kind) { _, stored in
                try Self.record(after, replacing: before, stored: stored, store: store)
            }
            return
        }
        let lock = try DiskLock(store: store, diskID: before.disk.id)
        defer { withExtendedLifetime(lock) {} }
        try Self.record(after, replacing: before, stored: try store.layout(diskID: before.disk.id), store: store)
    }

    private static func record(
        _ after: DiskLayout, replacing before: DiskLayout, stored: DiskLayout?, store: MetadataStore
    )
        throws
    {
        guard let stored, stored.disk.active == before.disk.active,
            Set(stored.snapshots.map(\.name)) == Set(before.snapshots.map(\.name))
        else {
            throw SnapshotError(
                .conflict,
                "disk \(before.disk.id) changed while the hypervisor worked on it; run `vmsnap disk check` on it")
        }
        try store.update(from: stored, to: after)
    }

    // MARK: - Operations

    /// Takes a snapshot of the disk at `locator`.
    @discardableResult
    public func create(_ request: SnapshotRequest, disk locator: String, kind: BackendKind? = nil) async throws
        -> DiskSnapshot
    {
        try SnapshotName.validate(request.name)
        if let description = request.description, description.utf8.count > 4096 {
            throw SnapshotError(
                .invalidArgument, "the description is \(description.utf8.count) bytes; the limit is 4096")
        }
        return try await withManagedDisk(locator, kind: kind) { backend, layout in
            if layout.snapshot(named: request.name) != nil {
                throw SnapshotError(
                    .alreadyExists,
                    "disk \(layout.disk.id) already has a snapshot named \(SnapshotName.quoted(request.name)); pick another name or delete that one first"
                )
            }
            let state = try await backend.state(of: layout)
            try backend.descriptor.capabilities.require(Capability(.create, request.kind, state), backend: backend.kind)
            Trace.mark("state")
            let plan = try await backend.planCreate(request, layout: layout)
            Trace.mark("plan")
            let result = try await executor.execute(plan, before: layout, backend: backend)
            Trace.mark("execute")
            plan.notes.forEach(notify)
            guard let made = result.snapshot(named: request.name) else {
                throw SnapshotError(
                    .conflict,
                    "backend '\(backend.kind)' finished but recorded no snapshot named \(SnapshotName.quoted(request.name))"
                )
            }
            return made
        }
    }

    /// Reverts the disk to `name`.
    @discardableResult
    public func revert(disk locator: String, to name: String, kind: BackendKind? = nil) async throws -> DiskLayout {
        try await withManagedDisk(locator, kind: kind) { backend, layout in
            let snapshot = try Self.require(name, in: layout)
            let state = try await backend.state(of: layout)
            try backend.descriptor.capabilities.require(
                Capability(.revert, snapshot.kind, state), backend: backend.kind)
            try checkBlockers(
                try await backend.rollbackBlockers(to: name, layout: layout), disk: layout.disk.id, snapshot: name)
            let plan = try await backend.planRevert(to: name, layout: layout)
            // Checkpoints taken before this point no longer describe the disk's changes.
            try store.advanceContentEpoch(diskID: layout.disk.id)
            let result = try await executor.execute(plan, before: layout, backend: backend)
            plan.notes.forEach(notify)
            return result
        }
    }

    /// Shows what a revert discards; refuses it, before anything changes, if something blocks it.
    private func checkBlockers(_ blockers: [RollbackBlocker], disk: String, snapshot: String) throws {
        let blocking = blockers.filter(\.blocking)
        guard blocking.isEmpty else {
            throw SnapshotError(
                .conflict,
                "reverting disk \(disk) to \(SnapshotName.quoted(snapshot)) is blocked: \(blocking.map(\.description).joined(separator: "; ")). Nothing was changed"
            )
        }
        for b in blockers { notify("revert of \(disk) to \(SnapshotName.quoted(snapshot)) discards \(b)") }
    }

    /// Deletes `name` (merging into its children), its subtree, or only its subtree; with
    /// `metadataOnly`, forgets the snapshots but leaves storage as it is.
    @discardableResult
    ///
    /// `offTheRunningChain`: the caller knows that the images this delete touches are not among
    /// those a running hypervisor has open (a branch the guest does not run), so the backend's
    /// offline abilities apply; its plan still refuses any image found in use.
    public func delete(
        disk locator: String, snapshot name: String, mode: DeleteMode, metadataOnly: Bool = false,
        kind: BackendKind? = nil, offTheRunningChain: Bool = false
    ) async throws -> DiskLayout {
        try await withManagedDisk(locator, kind: kind) { backend, layout in
            let snapshot = try Self.require(name, in: layout)
            if metadataOnly { return try forget(name, mode: mode, layout: layout) }
            let state = offTheRunningChain ? DiskState.offline : try await backend.state(of: layout)
            let tree = layout.tree
            let affected =
                mode == .merge ? [snapshot] : (mode == .children ? [snapshot] : []) + tree.descendants(of: name)
            for s in affected {
                try backend.descriptor.capabilities.require(
                    Capability(mode == .merge ? .delete : .deleteSubtree, s.kind, state), backend: backend.kind)
            }
            if mode == .childrenOnly && affected.isEmpty { return layout }
            Trace.mark("capabilities")
            let plan = try await backend.planDelete(name, mode: mode, layout: layout)
            Trace.mark("plan")
            let result = try await executor.execute(plan, before: layout, backend: backend)
            plan.notes.forEach(notify)
            return result
        }
    }

    /// Finishes or rolls back the disk's interrupted operations, those another host left in a
    /// shared record included (taking the disk into the store if it was not there).
    public func recover(disk locator: String, kind: BackendKind? = nil) async throws {
        try await withManagedDisk(locator, kind: kind) { _, _ in }
    }

    /// Operations started on the disk and not finished: the shared record's for a disk whose
    /// storage shares it (with the host that left each), else this store's.
    public func unfinishedOperations(_ layout: DiskLayout, backend: any DiskSnapshotBackend) async throws -> [String] {
        if backend.descriptor.sharedMetadata,
            let document = try await SharedDiskSession.read(backend, diskID: layout.disk.id)
        {
            return document.content.journals.map { "\($0.operation), left open by \($0.host)" }
        }
        return try store.openJournals(diskID: layout.disk.id).map(\.operation)
    }

    /// Runs the backend's upkeep on the disk (growing nearly full copy-on-write areas) under its
    /// lock; returns what was done.
    public func maintain(disk locator: String, kind: BackendKind? = nil) async throws -> [String] {
        try await withManagedDisk(locator, kind: kind) { backend, layout in try await backend.maintain(layout: layout) }
    }

    /// The extents that differ between snapshot `from` and `to` (another snapshot, or the disk
    /// now), as the disk's storage reports them, under the disk's lock so no operation changes
    /// the layout meanwhile. Refused for a backend that does not report changes, and for names
    /// the disk does not have; what the backend answers is checked against the disk's size.
    public func changes(disk locator: String, kind: BackendKind? = nil, from: String, to: DataView) async throws
        -> DiskChanges
    {
        try await withManagedDisk(locator, kind: kind) { backend, layout in
            guard backend.descriptor.reportsChanges else {
                throw SnapshotError(
                    .unsupported,
                    "backend '\(backend.kind)' does not report which blocks changed between snapshots of \(layout.disk.id); back the disk up in full, or compare the two views' data"
                )
            }
            let base = try Self.require(from, in: layout)
            var limit = base.virtualSize
            if case .snapshot(let name) = to {
                let newer = try Self.require(name, in: layout)
                guard name != from else {
                    throw SnapshotError(
                        .invalidArgument, "--from and --to both name \(SnapshotName.quoted(name)): nothing to compare")
                }
                limit = max(limit, newer.virtualSize)
            } else {
                limit = max(limit, try await backend.inspect(locator: layout.disk.active).virtualSize)
            }
            let reported = try await backend.changes(layout, from: from, to: to)
            return try reported.normalized(limit: limit, who: "backend '\(backend.kind)'")
        }
    }

    /// Removes snapshot records only; children are reparented, storage is untouched.
    private func forget(_ name: String, mode: DeleteMode, layout: DiskLayout) throws -> DiskLayout {
        var after = layout
        let tree = layout.tree
        let parent = tree[name]?.parent
        var removed = Set(tree.descendants(of: name).map(\.name))
        if mode != .childrenOnly { removed.insert(name) }
        if mode == .merge { removed = [name] }
        after.snapshots.removeAll { removed.contains($0.name) }
        for i in after.snapshots.indices where after.snapshots[i].parent.map(removed.contains) == true {
            after.snapshots[i].parent = parent
        }
        if let current = after.disk.current, removed.contains(current) {
            after.disk.current = mode == .childrenOnly ? name : parent
        }
        try store.update(from: layout, to: after)
        return after
    }

    static func require(_ name: String, in layout: DiskLayout) throws -> DiskSnapshot {
        guard let snapshot = layout.snapshot(named: name) else {
            let known = layout.snapshots.map(\.name).prefix(10).joined(separator: ", ")
            throw SnapshotError(
                .notFound,
                "disk \(layout.disk.id) has no snapshot named \(SnapshotName.quoted(name)) (it has: \(known.isEmpty ? "none" : known))"
            )
        }
        return snapshot
    }

    /// Finishes or rolls back every interrupted operation whose disk is not locked by a live vmsnap.
    public func recoverAll() async throws -> [RecoveryReport] {
        var reports: [RecoveryReport] = []
        var shared: [String: any DiskSnapshotBackend] = [:]
        for entry in try store.openJournals() {
            let backend = try registry.backend(entry.kind, environment: environment)
            if backend.descriptor.sharedMetadata {
                shared[entry.diskID] = backend
                continue
            }
            let lock: DiskLock
            do { lock = try DiskLock(store: store, diskID: entry.diskID, timeout: 0) } catch {
                reports.append(
                    RecoveryReport(
                        diskID: entry.diskID, operation: entry.operation, outcome: .skipped, stepsDone: entry.stepsDone,
                        stepCount: entry.steps.count, detail: "another vmsnap holds the disk"))
                continue
            }
            reports.append(try await executor.recover(entry, backend: backend))
            withExtendedLifetime(lock) {}
        }
        for (id, backend) in shared.sorted(by: { $0.key < $1.key }) {
            // One disk whose lock is held elsewhere, or whose record is unreadable, does not
            // keep the others from recovering.
            do { reports += try await recoverShared(id, backend: backend) } catch {
                reports.append(
                    RecoveryReport(
                        diskID: id, operation: "(shared record)", outcome: .skipped, stepsDone: 0, stepCount: 0,
                        detail: (error as? SnapshotError)?.message ?? "\(error)"))
            }
        }
        return reports
    }

    /// Gives up on interrupted operation `id` (`vmsnap recover --abandon`): its journal is marked
    /// abandoned, so nothing runs it again; the disk's metadata stays as it was before the
    /// operation and its storage as the steps left it. For a disk whose storage shares its record
    /// with other hosts this happens under the storage's lock, after bringing the record in (the
    /// operation is found there again by what it is: local ids differ per store, and another host
    /// may have finished it since), and the record is written back, so no host runs it again.
    public func abandon(_ id: Int64) async throws -> JournalEntry {
        guard let entry = try store.openJournals().first(where: { $0.id == id }) else { throw try noOpenJournal(id) }
        let lock = try DiskLock(store: store, diskID: entry.diskID, timeout: 0)
        defer { withExtendedLifetime(lock) {} }
        let backend = try registry.backend(entry.kind, environment: environment)
        guard
            let session = try await SharedDiskSession.open(
                backend, diskID: entry.diskID, store: store, wait: sharedLockWait, notify: notify)
        else {
            // Finished by a `recover` between the look-up and the lock: nothing to give up.
            guard try store.abandonJournal(id) != nil else { throw try noOpenJournal(id) }
            return entry
        }
        func same(_ other: JournalEntry) -> Bool {
            other.operation == entry.operation && other.startedAt == entry.startedAt && other.pid == entry.pid
        }
        let abandoned: JournalEntry
        do {
            guard let found = try store.openJournals(diskID: entry.diskID).first(where: same),
                try store.abandonJournal(found.id) != nil
            else {
                throw SnapshotError(
                    .notFound,
                    "operation \(id) ('\(entry.operation)') is no longer open in the shared record of disk \(entry.diskID): another host finished or gave it up. Nothing was changed; see `vmsnap disk check \(entry.diskID)`"
                )
            }
            abandoned = found
        } catch {
            try? await session.close(publishing: false, notify: notify)
            throw error
        }
        do { try await session.close(publishing: true, notify: notify) } catch {
            // The close put this host's copy back to the record, where the operation is open.
            let reopened = try? store.openJournals(diskID: entry.diskID).first(where: same)
            throw SnapshotError(
                (error as? SnapshotError)?.code ?? .io,
                "operation '\(entry.operation)' on disk \(entry.diskID) was not given up: its shared record could not be written (\((error as? SnapshotError)?.message ?? "\(error)")). Nothing was changed; the operation is open again\(reopened.map { " as journal \($0.id)" } ?? ""): run `vmsnap recover --abandon` with that id once the storage answers",
                cause: error)
        }
        return abandoned
    }

    /// The error for an id that names no open operation, listing the open ones.
    private func noOpenJournal(_ id: Int64) throws -> SnapshotError {
        let open = try store.openJournals()
        return SnapshotError(
            .notFound,
            "no interrupted operation has id \(id); open ones: \(open.isEmpty ? "none" : open.map { "\($0.id) (\($0.operation))" }.joined(separator: ", "))"
        )
    }

    /// Recovery of a disk whose record its storage shares: under both locks, after bringing the
    /// record in, so an operation another host has finished since is not run again here.
    private func recoverShared(_ id: String, backend: any DiskSnapshotBackend) async throws -> [RecoveryReport] {
        let lock: DiskLock
        do { lock = try DiskLock(store: store, diskID: id, timeout: 0) } catch {
            return [
                RecoveryReport(
                    diskID: id, operation: "(shared record)", outcome: .skipped, stepsDone: 0, stepCount: 0,
                    detail: "another vmsnap holds the disk")
            ]
        }
        defer { withExtendedLifetime(lock) {} }
        guard
            let session = try await SharedDiskSession.open(
                backend, diskID: id, store: store, wait: sharedLockWait, notify: notify)
        else { return [] }
        var reports: [RecoveryReport] = []
        do {
            try await SharedDiskSession.$current.withValue(session) {
                for entry in try store.openJournals(diskID: id) {
                    reports.append(try await executor.recover(entry, backend: backend))
                }
            }
        } catch {
            try? await session.close(publishing: true, notify: notify)
            throw error
        }
        try await session.close(publishing: true, notify: notify)
        return reports
    }
}
