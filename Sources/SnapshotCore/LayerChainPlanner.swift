import Foundation

/// Plans snapshot operations for file formats whose external snapshots are chains of layers
/// (qcow2 overlays, VHD differencing disks): the active image becomes a read-only base and a new
/// layer reading through it becomes active. The format supplies the few actions that differ;
/// the tree logic (naming, branches on revert, merge by commit or by rebasing every child, subtree
/// removal, what may be discarded) is shared.
public struct LayerChainPlanner: Sendable {
    /// The format-specific actions.
    public struct Actions: Sendable {
        /// A new empty layer `overlay` reading through `base`.
        public var createOverlay: @Sendable (_ overlay: String, _ base: String) throws -> StepAction
        /// Steps that merge `child` into its only base `base` and then put the base where the child
        /// was, so every reference to the child stays valid. Run past the point of no return.
        public var commitAndMove: @Sendable (_ child: String, _ base: String) throws -> [PlanStep]
        /// Make `child` read through `newBase` (nil: standalone) instead of `oldBase`, first copying
        /// into it whatever it read from `oldBase`. Idempotent.
        public var rebase: @Sendable (_ child: String, _ oldBase: String, _ newBase: String?) throws -> StepAction
        /// Delete internal snapshot `name` from `image` if it is there (formats with internal snapshots).
        public var deleteInternal: (@Sendable (_ image: String, _ name: String) -> StepAction)?
        /// Throws `.inUse` if a running VM holds one of the images.
        public var requireNotInUse: @Sendable (_ images: [String]) throws -> Void

        public init(
            createOverlay: @escaping @Sendable (String, String) throws -> StepAction,
            commitAndMove: @escaping @Sendable (String, String) throws -> [PlanStep],
            rebase: @escaping @Sendable (String, String, String?) throws -> StepAction,
            deleteInternal: (@Sendable (String, String) -> StepAction)? = nil,
            requireNotInUse: @escaping @Sendable ([String]) throws -> Void = { _ in }
        ) {
            self.createOverlay = createOverlay
            self.commitAndMove = commitAndMove
            self.rebase = rebase
            self.deleteInternal = deleteInternal
            self.requireNotInUse = requireNotInUse
        }
    }

    public var actions: Actions
    /// The extension of new layer files (`qcow2`, `vhd`).
    public var fileExtension: String
    /// Extensions stripped from the disk's file name to name its layers.
    public var knownExtensions: [String]

    public init(actions: Actions, fileExtension: String, knownExtensions: [String]) {
        self.actions = actions
        self.fileExtension = fileExtension
        self.knownExtensions = knownExtensions
    }

    // MARK: - Naming and bookkeeping

    /// `<dir>/<stem>.<name>.<ext>`, with `.1`, `.2`... when taken: the file that holds the changes
    /// made after snapshot `name` (libvirt's naming).
    public func overlayPath(for name: String, layout: DiskLayout, directory: String?) throws -> String {
        let dir =
            directory.map { URL(fileURLWithPath: $0).standardizedFileURL.path }
            ?? (layout.disk.active as NSString).deletingLastPathComponent
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: dir, isDirectory: &isDir), isDir.boolValue else {
            throw SnapshotError(.invalidArgument, "overlay directory \(dir) does not exist or is not a directory")
        }
        var stem = (layout.disk.id as NSString).lastPathComponent
        for ext in knownExtensions where stem.hasSuffix(ext) { stem.removeLast(ext.count) }
        let taken = Set(layout.layers.map(\.image))
        var candidate = (dir as NSString).appendingPathComponent("\(stem).\(name).\(fileExtension)")
        var n = 1
        while taken.contains(candidate) || NewFile.exists(candidate) {
            candidate = (dir as NSString).appendingPathComponent("\(stem).\(name).\(n).\(fileExtension)")
            n += 1
        }
        guard (candidate as NSString).lastPathComponent.utf8.count <= 255 else {
            throw SnapshotError(
                .invalidName, "the layer file name for snapshot '\(name)' would exceed 255 bytes; use a shorter name")
        }
        return candidate
    }

    /// An image nothing needs any more: not active, no snapshot lives in it or on it, no layer
    /// reads through it, and it is not the disk's original file.
    public func disposable(_ image: String, in layout: DiskLayout) -> Bool {
        image != layout.disk.active && image != layout.disk.id && layout.layer(image) != nil
            && !layout.snapshots.contains { $0.image == image } && layout.children(ofLayer: image).isEmpty
    }

    /// Images the layout needs: the active one, every snapshot's image, and their backing chains.
    public func neededImages(_ layout: DiskLayout) -> Set<String> {
        var needed: Set<String> = []
        var queue = [layout.disk.active] + layout.snapshots.map(\.image)
        while let image = queue.popLast() {
            guard needed.insert(image).inserted else { continue }
            if let backing = layout.layer(image)?.backing { queue.append(backing) }
        }
        return needed
    }

    /// The layout without snapshot `name`, its children reparented to its parent.
    public func removingRecord(_ name: String, from layout: DiskLayout) -> DiskLayout {
        var result = layout
        let parent = layout.snapshot(named: name)?.parent
        result.snapshots.removeAll { $0.name == name }
        for i in result.snapshots.indices where result.snapshots[i].parent == name {
            result.snapshots[i].parent = parent
        }
        if result.disk.current == name { result.disk.current = parent }
        return result
    }

    // MARK: - Create and revert

    /// An external snapshot: the active image is frozen as the snapshot and a new layer on it becomes active.
    public func planCreateExternal(
        _ request: SnapshotRequest, layout: DiskLayout, virtualSize: UInt64, overlayDirectory: String?
    ) throws -> Plan {
        let active = layout.disk.active
        try actions.requireNotInUse([active])
        let overlay = try overlayPath(for: request.name, layout: layout, directory: overlayDirectory)
        var result = layout
        result.snapshots.append(
            DiskSnapshot(
                name: request.name, kind: .external, image: active, parent: layout.disk.current,
                description: request.description, virtualSize: virtualSize))
        result.disk.current = request.name
        result.layers.append(DiskLayer(image: overlay, backing: active))
        result.disk.active = overlay
        let step = PlanStep(
            "create \(overlay) on \(active)", try actions.createOverlay(overlay, active), undo: .removeFile(overlay))
        return Plan(
            operation: "create external snapshot '\(request.name)' of \(layout.disk.id)", steps: [step], result: result)
    }

    /// Revert to an external snapshot: a new layer on the snapshot's image (a branch); the old
    /// active layer is discarded when nothing else needs it.
    public func planRevertExternal(to target: DiskSnapshot, layout: DiskLayout, overlayDirectory: String?) throws
        -> Plan
    {
        try actions.requireNotInUse([target.image, layout.disk.active])
        let overlay = try overlayPath(for: target.name, layout: layout, directory: overlayDirectory)
        var result = layout
        result.disk.current = target.name
        result.layers.append(DiskLayer(image: overlay, backing: target.image))
        result.disk.active = overlay
        var steps = [
            PlanStep(
                "create \(overlay) on \(target.image)", try actions.createOverlay(overlay, target.image),
                undo: .removeFile(overlay))
        ]
        let notes = discardingOldActive(layout.disk.active, result: &result, steps: &steps)
        return Plan(
            operation: "revert \(layout.disk.id) to '\(target.name)'", steps: steps, pointOfNoReturn: 1, result: result,
            notes: notes)
    }

    /// Adds the removal of the previous active layer when nothing needs it; returns notes.
    public func discardingOldActive(_ oldActive: String, result: inout DiskLayout, steps: inout [PlanStep]) -> [String]
    {
        guard oldActive != result.disk.active else { return [] }
        if disposable(oldActive, in: result) {
            steps.append(
                PlanStep("discard the state after the current snapshot (\(oldActive))", .removeFile(oldActive)))
            result.layers.removeAll { $0.image == oldActive }
            return []
        }
        let held = result.internalSnapshots(in: oldActive).map(\.name)
        return held.isEmpty ? [] : ["kept \(oldActive): it holds internal snapshots \(held.joined(separator: ", "))"]
    }

    // MARK: - Delete

    /// Delete external snapshot `target`, merging its image into the layers built on it: with one
    /// child, commit the child into the image and move the image into the child's place; with
    /// several, rebase each child onto the image's own base, copying what it read from the image.
    public func planMergeExternal(_ target: DiskSnapshot, layout: DiskLayout) throws -> Plan {
        var result = removingRecord(target.name, from: layout)
        var steps: [PlanStep] = []
        var notes: [String] = []
        let base = target.image
        let children = layout.children(ofLayer: base)
        let backing = layout.layer(base)?.backing
        if let reason = Self.mustStayALayer(base, children: children, layout: layout) {
            // Only the record goes: the image stays where it is, a layer others read through.
            return Plan(
                operation: "delete snapshot '\(target.name)' of \(layout.disk.id)", steps: [], pointOfNoReturn: 0,
                result: result, notes: ["kept \(base) as a layer: \(reason)"])
        }
        try actions.requireNotInUse([base] + children.map(\.image))
        switch children.count {
        case 0:
            if disposable(base, in: result) {
                steps.append(PlanStep("remove \(base), which nothing uses any more", .removeFile(base)))
                result.layers.removeAll { $0.image == base }
            } else {
                notes.append(
                    "kept \(base): \(layout.internalSnapshots(in: base).isEmpty ? "it is the disk's original image" : "it holds internal snapshots")"
                )
            }
        case 1:
            let child = children[0].image
            steps += try actions.commitAndMove(child, base)
            result.layers.removeAll { $0.image == child }
            if let i = result.layers.firstIndex(where: { $0.image == base }) { result.layers[i].image = child }
            for i in result.snapshots.indices where result.snapshots[i].image == base {
                result.snapshots[i].image = child
            }
        default:
            for child in children {
                steps.append(
                    PlanStep(
                        "copy what \(child.image) reads from \(base) into it",
                        try actions.rebase(child.image, base, backing)))
            }
            steps.append(PlanStep("remove \(base)", .removeFile(base)))
            for i in result.layers.indices where result.layers[i].backing == base { result.layers[i].backing = backing }
            result.layers.removeAll { $0.image == base }
        }
        return Plan(
            operation: "delete snapshot '\(target.name)' of \(layout.disk.id)", steps: steps, pointOfNoReturn: 0,
            result: result, notes: notes)
    }

    /// Why an external snapshot's image cannot be merged away, if it cannot: a child that holds
    /// internal snapshots reads through it (a commit into the image would replace the child's file
    /// and its snapshots, a rebase would change what they read), or the image holds internal
    /// snapshots of its own and has several children (it must stay for them, and for them).
    public static func mustStayALayer(_ base: String, children: [DiskLayer], layout: DiskLayout) -> String? {
        let holders = children.filter { !layout.internalSnapshots(in: $0.image).isEmpty }
        if !holders.isEmpty {
            let names = holders.flatMap { layout.internalSnapshots(in: $0.image).map(\.name) }
            return "internal snapshots (\(names.joined(separator: ", "))) in the layer on it read through it"
        }
        let own = layout.internalSnapshots(in: base)
        if children.count > 1, !own.isEmpty {
            return
                "it holds internal snapshots (\(own.map(\.name).joined(separator: ", "))) and \(children.count) layers read through it"
        }
        return nil
    }

    /// Delete internal snapshot `target` and the image that held it if nothing needs it any more.
    public func planDeleteInternal(_ target: DiskSnapshot, layout: DiskLayout) throws -> Plan {
        guard let deleteInternal = actions.deleteInternal else {
            throw SnapshotError(.unsupported, "this format has no internal snapshots")
        }
        try actions.requireNotInUse([target.image])
        var result = removingRecord(target.name, from: layout)
        var steps = [
            PlanStep(
                "delete internal snapshot '\(target.name)' from \(target.image)",
                deleteInternal(target.image, target.name))
        ]
        if disposable(target.image, in: result) {
            steps.append(PlanStep("remove \(target.image), which nothing uses any more", .removeFile(target.image)))
            result.layers.removeAll { $0.image == target.image }
        }
        return Plan(
            operation: "delete snapshot '\(target.name)' of \(layout.disk.id)", steps: steps, pointOfNoReturn: 0,
            result: result)
    }

    /// Delete `target`'s subtree (with `target` itself when `includeSelf`): internal snapshots are
    /// deleted from images that stay, and layers only the subtree needed are removed, top first.
    public func planSubtree(_ target: DiskSnapshot, includeSelf: Bool, layout: DiskLayout) throws -> Plan {
        var doomed = layout.tree.descendants(of: target.name)
        if includeSelf { doomed.insert(target, at: 0) }
        let doomedNames = Set(doomed.map(\.name))
        var result = layout
        result.snapshots.removeAll { doomedNames.contains($0.name) }
        if let current = layout.disk.current, doomedNames.contains(current) {
            result.disk.current = includeSelf ? target.parent : target.name
        }
        let before = neededImages(layout), after = neededImages(result)
        let freed = before.subtracting(after).filter { layout.layer($0) != nil && $0 != layout.disk.id }
        try actions.requireNotInUse(Array(freed) + doomed.map(\.image))
        var steps: [PlanStep] = []
        for snap in doomed where snap.kind == .internal && !freed.contains(snap.image) {
            guard let deleteInternal = actions.deleteInternal else { continue }
            steps.append(
                PlanStep(
                    "delete internal snapshot '\(snap.name)' from \(snap.image)", deleteInternal(snap.image, snap.name))
            )
        }
        var remaining = freed
        while !remaining.isEmpty {
            let tops = remaining.filter { image in !remaining.contains { layout.layer($0)?.backing == image } }.sorted()
            guard !tops.isEmpty else { break }
            for image in tops {
                steps.append(PlanStep("remove \(image)", .removeFile(image)))
                remaining.remove(image)
            }
        }
        result.layers.removeAll { freed.contains($0.image) }
        var notes: [String] = []
        let anonymous = doomed.filter { $0.kind == .external && after.contains($0.image) }
        if !anonymous.isEmpty {
            notes.append(
                "kept the images of \(anonymous.map { "'\($0.name)'" }.joined(separator: ", ")): the active disk still reads through them"
            )
        }
        let what =
            includeSelf
            ? "snapshot '\(target.name)' and its descendants" : "the descendants of snapshot '\(target.name)'"
        return Plan(
            operation: "delete \(what) of \(layout.disk.id)", steps: steps, pointOfNoReturn: 0, result: result,
            notes: notes)
    }
}
