import Foundation

/// Disk-level snapshot operations over any registered backend: resolves a disk, checks names and
/// capabilities, takes the disk's lock, recovers interrupted work, then journals and runs the
/// backend's plan. The CLI's `vmsnap disk ...` commands and the conformance suite go through it.
public struct DiskSnapshotService: Sendable {
    public let store: MetadataStore
    public let registry: BackendRegistry
    public let environment: BackendEnvironment
    /// Receives notes for the operator (recovered work, kept layers); stderr by default.
    public var notify: @Sendable (String) -> Void

    public init(store: MetadataStore, registry: BackendRegistry, environment: BackendEnvironment = BackendEnvironment(),
                notify: @escaping @Sendable (String) -> Void = { FileHandle.standardError.write(Data("vmsnap: \($0)\n".utf8)) }) {
        self.store = store
        self.registry = registry
        self.environment = environment
        self.notify = notify
    }

    var executor: PlanExecutor { PlanExecutor(store: store, runner: environment.runner) }

    // MARK: - Resolving disks

    /// The backend for a disk: the one named, the one that manages it, or the first that recognizes it.
    public func backend(for locator: String, kind: BackendKind?) async throws -> any DiskSnapshotBackend {
        if let kind { return try registry.backend(kind, environment: environment) }
        if let managed = try store.findDisk(locator: locator) { return try registry.backend(managed.disk.kind, environment: environment) }
        for backend in try registry.allBackends(environment: environment) where await backend.recognizes(locator: locator) {
            return backend
        }
        throw SnapshotError(.invalidImage, "no backend recognizes \(locator): it is missing or not in a format vmsnap knows (\(registry.kinds.map(\.rawValue).joined(separator: ", "))); pass --backend KIND to say which it is")
    }

    /// The disk's layout: the stored one if vmsnap manages it, else what the backend reads off the
    /// storage (not stored).
    public func layout(of locator: String, kind: BackendKind? = nil) async throws -> (any DiskSnapshotBackend, DiskLayout) {
        let backend = try await backend(for: locator, kind: kind)
        let normalized = backend.normalize(locator: locator)
        if let layout = try store.findDisk(locator: normalized) {
            guard layout.disk.kind == backend.kind else {
                throw SnapshotError(.conflict, "\(locator) is managed by backend '\(layout.disk.kind)', not '\(backend.kind)'")
            }
            return (backend, layout)
        }
        return (backend, try await backend.adopt(locator: normalized))
    }

    /// Runs `body` with the disk's lock held, after recovering interrupted work on it, and with
    /// the disk recorded in the store.
    private func withManagedDisk<T: Sendable>(
        _ locator: String, kind: BackendKind?,
        _ body: (any DiskSnapshotBackend, DiskLayout) async throws -> T
    ) async throws -> T {
        let (backend, found) = try await layout(of: locator, kind: kind)
        let lock = try DiskLock(store: store, diskID: found.disk.id)
        defer { withExtendedLifetime(lock) {} }
        for entry in try store.openJournals(diskID: found.disk.id) {
            let report = try await executor.recover(entry, backend: backend)
            notify("recovered an interrupted '\(report.operation)' on \(report.diskID): \(report.outcome.rawValue)")
        }
        var layout = try store.layout(diskID: found.disk.id) ?? found
        if try store.layout(diskID: layout.disk.id) == nil {
            layout = found
            try store.insert(layout)
        }
        return try await body(backend, layout)
    }

    // MARK: - Operations

    /// Takes a snapshot of the disk at `locator`.
    @discardableResult
    public func create(_ request: SnapshotRequest, disk locator: String, kind: BackendKind? = nil) async throws -> DiskSnapshot {
        try SnapshotName.validate(request.name)
        if let description = request.description, description.utf8.count > 4096 {
            throw SnapshotError(.invalidArgument, "the description is \(description.utf8.count) bytes; the limit is 4096")
        }
        return try await withManagedDisk(locator, kind: kind) { backend, layout in
            if layout.snapshot(named: request.name) != nil {
                throw SnapshotError(.alreadyExists, "disk \(layout.disk.id) already has a snapshot named \(SnapshotName.quoted(request.name)); pick another name or delete that one first")
            }
            let state = try await backend.state(of: layout)
            try backend.descriptor.capabilities.require(Capability(.create, request.kind, state), backend: backend.kind)
            let plan = try await backend.planCreate(request, layout: layout)
            let result = try await executor.execute(plan, before: layout, backend: backend)
            plan.notes.forEach(notify)
            guard let made = result.snapshot(named: request.name) else {
                throw SnapshotError(.conflict, "backend '\(backend.kind)' finished but recorded no snapshot named \(SnapshotName.quoted(request.name))")
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
            try backend.descriptor.capabilities.require(Capability(.revert, snapshot.kind, state), backend: backend.kind)
            let plan = try await backend.planRevert(to: name, layout: layout)
            let result = try await executor.execute(plan, before: layout, backend: backend)
            plan.notes.forEach(notify)
            return result
        }
    }

    /// Deletes `name` (merging into its children), its subtree, or only its subtree; with
    /// `metadataOnly`, forgets the snapshots but leaves storage as it is.
    @discardableResult
    public func delete(disk locator: String, snapshot name: String, mode: DeleteMode, metadataOnly: Bool = false, kind: BackendKind? = nil) async throws -> DiskLayout {
        try await withManagedDisk(locator, kind: kind) { backend, layout in
            let snapshot = try Self.require(name, in: layout)
            if metadataOnly { return try forget(name, mode: mode, layout: layout) }
            let state = try await backend.state(of: layout)
            let tree = layout.tree
            let affected = mode == .merge ? [snapshot] : (mode == .children ? [snapshot] : []) + tree.descendants(of: name)
            for s in affected {
                try backend.descriptor.capabilities.require(Capability(mode == .merge ? .delete : .deleteSubtree, s.kind, state), backend: backend.kind)
            }
            if mode == .childrenOnly && affected.isEmpty { return layout }
            let plan = try await backend.planDelete(name, mode: mode, layout: layout)
            let result = try await executor.execute(plan, before: layout, backend: backend)
            plan.notes.forEach(notify)
            return result
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
            throw SnapshotError(.notFound, "disk \(layout.disk.id) has no snapshot named \(SnapshotName.quoted(name)) (it has: \(known.isEmpty ? "none" : known))")
        }
        return snapshot
    }

    /// Finishes or rolls back every interrupted operation whose disk is not locked by a live vmsnap.
    public func recoverAll() async throws -> [RecoveryReport] {
        var reports: [RecoveryReport] = []
        for entry in try store.openJournals() {
            let lock: DiskLock
            do { lock = try DiskLock(store: store, diskID: entry.diskID, timeout: 0) } catch {
                reports.append(RecoveryReport(diskID: entry.diskID, operation: entry.plan.operation, outcome: .skipped, stepsDone: entry.stepsDone, stepCount: entry.plan.steps.count, detail: "another vmsnap holds the disk"))
                continue
            }
            let kind = entry.before.disk.kind
            let backend = try registry.backend(kind, environment: environment)
            reports.append(try await executor.recover(entry, backend: backend))
            withExtendedLifetime(lock) {}
        }
        return reports
    }
}

