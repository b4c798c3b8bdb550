import Foundation
import SnapshotCore

/// qcow2 disks, offline, through qemu-img: internal snapshots (inside the image) and external
/// snapshots (the active image becomes a read-only base under a new overlay), in trees.
///
/// Mixed internal and external snapshots on one disk are handled where the data stays right and
/// refused, with the reason, where an operation would change what another snapshot reads.
public struct Qcow2Backend: DiskSnapshotBackend {
    public static let kind: BackendKind = "qcow2"

    /// Registers the backend under `qcow2`.
    public static let factory = BackendFactory(kind: kind, settings: settingsSchema) { env in
        Qcow2Backend(runner: env.runner, settings: env.settings)
    }

    /// The settings the backend reads.
    public static let settingsSchema: [SettingSpec] = [
        SettingSpec("overlay-dir", .path, help: "where new overlays go (default: beside the active image)"),
        SettingSpec(
            "unusual-images", .choice, default: "refuse", choices: ["refuse", "allow"],
            help:
                "images whose backing is not a plain file (json: or protocol specs) or that keep data in an external data_file: refused unless allow"
        ),
    ]

    let runner: any CommandRunning
    /// `overlay-dir`: where new overlays go by default (else beside the active image).
    let settings: [String: String]

    public init(runner: any CommandRunning = SubprocessRunner(), settings: [String: String] = [:]) {
        self.runner = runner
        self.settings = settings
    }

    public var descriptor: BackendDescriptor {
        BackendDescriptor(
            kind: Self.kind,
            summary: "qcow2 images through qemu-img: internal and external snapshots, offline",
            capabilities: .all(
                kinds: [.internal, .external], states: [.offline],
                notes: [
                    "live disks (open by a running QEMU) go through the QEMU driver's QMP path, not this backend",
                    "snapshot names made only of digits are refused: qemu-img would read them as snapshot IDs",
                    "a revert to an internal snapshot inside an image that external snapshots build on copies its state into a new branch image",
                ]),
            settings: Self.settingsSchema, liveSnapshots: .hypervisor, imageFormat: "qcow2", sourceType: .file,
            tools: [Qcow2Commands.qemuImg])
    }

    public func normalize(locator: String) -> String {
        URL(fileURLWithPath: locator).standardizedFileURL.path
    }

    public func recognizes(locator: String) async -> Bool { Qcow2Image.hasMagic(normalize(locator: locator)) }

    // MARK: - Reading

    func image(_ path: String) throws -> Qcow2Image {
        guard FileManager.default.fileExists(atPath: path) else {
            throw SnapshotError(.notFound, "disk image \(path) does not exist; check the path")
        }
        let img = try Qcow2Image(path: path)
        if settings["unusual-images"] != "allow" {
            if let why = img.backingSpecProblem {
                throw SnapshotError(
                    .unsupported,
                    "\(path): \(why); vmsnap would follow it wherever it points. Nothing was changed; rebase the image onto a file (`qemu-img rebase`), or pass --set unusual-images=allow if you trust it"
                )
            }
            if let data = img.dataFile {
                throw SnapshotError(
                    .unsupported,
                    "\(path) keeps its data in an external data file (\(data)); snapshots of it would not cover that file. Nothing was changed; pass --set unusual-images=allow if you know what you are doing"
                )
            }
        }
        if img.isCorrupt {
            throw SnapshotError(
                .invalidImage,
                "\(path) is marked corrupt by QEMU; repair it with `qemu-img check -r all \(path)` (after a backup) before snapshotting"
            )
        }
        return img
    }

    /// True for the raw image a chain starts on (a raw file, or a block device such as an LVM
    /// volume another tool's external snapshot froze): the deepest layer of the disk, recorded as
    /// raw in the header of the qcow2 layer built on it. That header was written by whoever made
    /// the layer; the raw image's own bytes are the guest's, so they decide nothing (a guest can
    /// write a qcow2 header into its disk).
    static func isRawBase(_ image: String, in layout: DiskLayout) -> Bool {
        guard let layer = layout.layer(image), layer.backing == nil else { return false }
        return layout.layers.contains {
            $0.backing == image && (try? Qcow2Image(path: $0.image))?.backingFormat == "raw"
        }
    }

    public func inspect(locator: String) async throws -> DiskInfo {
        let path = normalize(locator: locator)
        let img = try image(path)
        var chain: [String] = []
        var formats: [String] = []
        var above = img
        while let backing = above.resolvedBackingFile, chain.count < 256, !chain.contains(backing) {
            chain.append(backing)
            formats.append(above.backingFormat ?? "")
            // An image the layer above reads as raw is raw, whatever its bytes say.
            guard above.readsBacking(backing) == "qcow2", let below = try? Qcow2Image(path: backing) else { break }
            above = below
        }
        let allocated = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? UInt64) ?? nil
        return DiskInfo(
            format: "qcow2", virtualSize: img.virtualSize, allocatedSize: allocated, backingChain: chain,
            snapshots: img.snapshots.map {
                StoredSnapshot(
                    id: $0.id, name: $0.name, createdAt: $0.date, virtualSize: $0.diskSize ?? img.virtualSize,
                    stateSize: $0.vmStateSize)
            }, backingFormats: formats)
    }

    public func adopt(locator: String) async throws -> DiskLayout {
        let path = normalize(locator: locator)
        let img = try image(path)
        let snapshots = img.snapshots.map {
            DiskSnapshot(
                name: $0.name, kind: .internal, image: path, backendID: $0.id, createdAt: $0.date,
                virtualSize: $0.diskSize ?? img.virtualSize)
        }
        return DiskLayout(
            disk: DiskRecord(id: path, kind: Self.kind, active: path), snapshots: snapshots,
            layers: [DiskLayer(image: path, backing: img.resolvedBackingFile)])
    }

    public func state(of layout: DiskLayout) async throws -> DiskState {
        QemuImageLock.isHeld(layout.disk.active) ? .live : .offline
    }

    /// Refuses to touch an image that a QEMU process holds.
    static func requireNotInUse(_ images: [String]) throws {
        for image in Set(images) where QemuImageLock.isHeld(image) {
            throw SnapshotError(
                .inUse,
                "\(image) is in use by a running QEMU (it holds the image lock); shut the VM down, or snapshot it through `vmsnap snapshot` while it runs"
            )
        }
    }

    func requireBackendName(_ name: String) throws {
        if !name.isEmpty, name.allSatisfy(\.isASCII), name.allSatisfy(\.isNumber) {
            throw SnapshotError(
                .invalidName,
                "invalid snapshot name '\(name)': qcow2 names made only of digits clash with snapshot IDs; add a letter (for example 's\(name)')"
            )
        }
    }

    // MARK: - Planning

    /// The shared chain logic, with qcow2's actions.
    var chain: LayerChainPlanner { chain(overRawBase: nil) }

    /// The chain logic; `rawBase` names the raw image the chain starts on (see isRawBase) and the
    /// layer whose mode and owner a new overlay on it takes: its bytes are the guest's, so
    /// nothing is read from it, and the overlay records it as raw.
    func chain(overRawBase rawBase: (image: String, like: String)?) -> LayerChainPlanner {
        LayerChainPlanner(
            actions: .init(
                createOverlay: { overlay, base in
                    if let rawBase, base == rawBase.image {
                        return .backend(
                            name: "create-overlay",
                            arguments: [
                                "overlay": overlay, "backing": base, "backing-format": "raw", "like": rawBase.like,
                            ])
                    }
                    if try Qcow2Image(path: base).isEncrypted {
                        throw SnapshotError(
                            .unsupported,
                            "\(base) is encrypted: an overlay would keep the guest's writes after the snapshot unencrypted, and vmsnap does not yet pass the image's secret to qemu-img. Nothing was changed; take an internal snapshot (it stays inside the encrypted image)"
                        )
                    }
                    return .backend(name: "create-overlay", arguments: ["overlay": overlay, "backing": base])
                },
                commitAndMove: { child, base in
                    [
                        PlanStep("merge \(child) into \(base)", .run(Qcow2Commands.commit(child, into: base))),
                        // qemu-img commit moves data, not bitmaps: the child's go down with it.
                        PlanStep(
                            "merge the dirty bitmaps of \(child) into \(base)",
                            .backend(name: "merge-bitmaps-into", arguments: ["from": child, "into": base])),
                        PlanStep("move \(base) to \(child)", .rename(from: base, to: child)),
                    ]
                },
                rebase: { child, oldBase, newBase in
                    // As oldBase reads its backing (newBase).
                    let above = try? Qcow2Image(path: oldBase)
                    let format = newBase.map { b in above?.readsBacking(b) ?? (Qcow2Image.hasMagic(b) ? "qcow2" : "raw")
                    }
                    return .run(Qcow2Commands.rebase(child, onto: newBase, backingFormat: format))
                },
                deleteInternal: { image, name in
                    .backend(name: "delete-internal-if-present", arguments: ["image": image, "name": name])
                },
                requireNotInUse: { images in try Qcow2Backend.requireNotInUse(images) }),
            fileExtension: "qcow2", knownExtensions: [".qcow2", ".qcow", ".img"])
    }

    public func planCreate(_ request: SnapshotRequest, layout: DiskLayout) async throws -> Plan {
        try planCreate(request, layout: layout, live: false)
    }

    /// The create plan; `live` when QEMU has the image open and takes the snapshot itself.
    func planCreate(_ request: SnapshotRequest, layout: DiskLayout, live: Bool) throws -> Plan {
        try requireBackendName(request.name)
        let active = layout.disk.active
        let img = try image(active)
        if img.snapshots.contains(where: { $0.name == request.name }) {
            throw SnapshotError(
                .alreadyExists,
                "\(active) already holds an internal snapshot named '\(request.name)' (made outside vmsnap); pick another name"
            )
        }
        switch request.kind {
        case .external:
            var planner = chain
            if live { planner.actions.requireNotInUse = { _ in } }
            return try planner.planCreateExternal(
                request, layout: layout, virtualSize: img.virtualSize,
                overlayDirectory: request.overlayDirectory ?? settings["overlay-dir"])
        case .internal:
            if request.overlayDirectory != nil {
                throw SnapshotError(
                    .invalidArgument,
                    "--overlay-dir applies to external snapshots only; an internal snapshot stays inside \(active)")
            }
            if !live { try Self.requireNotInUse([active]) }
            var result = layout
            result.snapshots.append(
                DiskSnapshot(
                    name: request.name, kind: .internal, image: active, parent: layout.disk.current,
                    description: request.description, virtualSize: img.virtualSize))
            result.disk.current = request.name
            let step = PlanStep(
                "create internal snapshot '\(request.name)' in \(active)",
                .run(Qcow2Commands.createInternal(request.name, image: active)),
                undo: .backend(name: "delete-internal-if-present", arguments: ["image": active, "name": request.name]))
            return Plan(
                operation: "create internal snapshot '\(request.name)' of \(layout.disk.id)", steps: [step],
                result: result)
        }
    }

    public func planRevert(to name: String, layout: DiskLayout) async throws -> Plan {
        guard let target = layout.snapshot(named: name) else {
            throw SnapshotError(.notFound, "no snapshot '\(name)' on \(layout.disk.id)")
        }
        let rawBase = target.kind == .external && Self.isRawBase(target.image, in: layout)
        if !rawBase { _ = try image(target.image) }
        if target.kind == .external {
            return try chain(overRawBase: rawBase ? (target.image, layout.disk.active) : nil)
                .planRevertExternal(to: target, layout: layout, overlayDirectory: settings["overlay-dir"])
        }
        // Internal: apply it in the image that holds it; where other layers read that image (an
        // external snapshot froze it), revert as a branch instead.
        let holder = target.image
        try Self.requireNotInUse([holder, layout.disk.active])
        // The snapshot must still be in the image: one deleted outside vmsnap would fail the
        // revert past its point of no return.
        guard try image(holder).snapshots.contains(where: { $0.name == target.backendID ?? name || $0.name == name })
        else {
            throw SnapshotError(
                .notFound,
                "internal snapshot '\(name)' is in vmsnap's records but no longer in \(holder) (deleted outside vmsnap?); nothing was changed. Forget it with `vmsnap disk snapshot delete \(layout.disk.id) '\(name)' --metadata-only`, and see `vmsnap disk check`"
            )
        }
        if layout.externalSnapshot(frozenAt: holder) != nil || !layout.children(ofLayer: holder).isEmpty {
            return try planRevertBranch(to: target, holder: holder, layout: layout)
        }
        var result = layout
        result.disk.current = name
        result.disk.active = holder
        // QEMU applies no internal snapshot to an image with dirty bitmaps ("Device has active
        // dirty bitmaps"), and after the revert they would describe changes to other data: they go
        // first, each removal idempotent so recovery can repeat it.
        let bitmaps = try await imageBitmaps(holder)
        var steps = bitmaps.map { b in
            PlanStep(
                "remove dirty bitmap '\(b.name)' from \(holder)",
                .backend(name: "remove-bitmap-if-present", arguments: ["image": holder, "name": b.name]))
        }
        steps.append(
            PlanStep(
                "apply internal snapshot '\(name)' to \(holder)", .run(Qcow2Commands.applyInternal(name, image: holder))
            ))
        var notes = chain.discardingOldActive(layout.disk.active, result: &result, steps: &steps)
        if !bitmaps.isEmpty {
            notes.append(
                "removed the dirty bitmaps \(bitmaps.map(\.name).joined(separator: ", ")) of \(holder): changes tracked before a revert say nothing about the reverted data (their checkpoints need a full backup next)"
            )
        }
        return Plan(
            operation: "revert \(layout.disk.id) to '\(name)'", steps: steps, pointOfNoReturn: 0, result: result,
            notes: notes)
    }

    /// Revert to an internal snapshot inside an image other layers read through: the snapshot's
    /// state is copied out (only the clusters the image itself holds at the snapshot) into a new
    /// image on the same backing, which becomes the active layer: a branch. The image, its
    /// snapshot and every layer built on it stay as they are.
    func planRevertBranch(to target: DiskSnapshot, holder: String, layout: DiskLayout) throws -> Plan {
        let branch = try chain.overlayPath(for: target.name, layout: layout, directory: settings["overlay-dir"])
        let backing = layout.layer(holder)?.backing
        var result = layout
        result.disk.current = target.name
        result.layers.append(DiskLayer(image: branch, backing: backing))
        result.disk.active = branch
        var args = ["image": holder, "name": target.name, "into": branch]
        if let backing { args["backing"] = backing }
        var steps = [
            PlanStep(
                "copy internal snapshot '\(target.name)' of \(holder) into a new branch \(branch)",
                .backend(name: "copy-out-internal", arguments: args), undo: .removeFile(branch))
        ]
        var notes = chain.discardingOldActive(layout.disk.active, result: &result, steps: &steps)
        notes.append(
            "reverted to '\(target.name)' as a branch: \(holder) is read by other layers, so its snapshot's state was copied into \(branch) (only what \(holder) itself held then\(backing.map { "; it reads \($0) below" } ?? ""))"
        )
        return Plan(
            operation: "revert \(layout.disk.id) to '\(target.name)' as a branch", steps: steps, pointOfNoReturn: 1,
            result: result, notes: notes)
    }

    /// Writes `image` as it was at internal snapshot `name` into `into` (an empty file made here,
    /// with the image's mode): the clusters the image held then, reading through `backing` for
    /// the rest. Repeatable: a partial copy is written again.
    func copyOutInternal(image: String, name: String, into: String, backing: String?) async throws {
        try NewFile.create(into, like: image)
        var argv = [Qcow2Commands.qemuImg, "convert", "-q", "-f", "qcow2", "-l", "snapshot.name=\(name)"]
        if let backing {
            argv += ["-B", backing, "-F", try Qcow2Image(path: image).readsBacking(backing)]
        }
        try await runner.run(argv + ["-O", "qcow2", image, into])
    }

    public func planDelete(_ name: String, mode: DeleteMode, layout: DiskLayout) async throws -> Plan {
        guard let target = layout.snapshot(named: name) else {
            throw SnapshotError(.notFound, "no snapshot '\(name)' on \(layout.disk.id)")
        }
        switch (mode, target.kind) {
        case (.merge, .internal): return try chain.planDeleteInternal(target, layout: layout)
        case (.merge, .external) where Self.isRawBase(target.image, in: layout):
            return keepRawBase(target, layout: layout)
        case (.merge, .external): return try chain.planMergeExternal(target, layout: layout)
        case (.children, _), (.childrenOnly, _):
            return try chain.planSubtree(target, includeSelf: mode == .children, layout: layout)
        }
    }

    /// An external snapshot that froze the raw image the chain starts from (an LVM volume or a raw
    /// file another tool snapshotted): merging would commit the layer above into the raw image
    /// and move the raw image into that layer's place, which a block device cannot take and a raw
    /// file must not (the disk would stop being qcow2). The record goes; the image stays the base.
    func keepRawBase(_ target: DiskSnapshot, layout: DiskLayout) -> Plan {
        Plan(
            operation: "delete snapshot '\(target.name)' of \(layout.disk.id)", steps: [], pointOfNoReturn: 0,
            result: chain.removingRecord(target.name, from: layout),
            notes: [
                "kept \(target.image) as the base of the chain: it is a raw image, and only qcow2 layers are merged away"
            ])
    }

    // MARK: - Hypervisor

    public func hypervisorDrive(_ layout: DiskLayout) throws -> HypervisorDrive {
        HypervisorDrive(path: layout.disk.active, format: "qcow2", liveSnapshots: true, holdsInternalMemory: true)
    }

    /// The layout after QEMU takes the snapshot (`blockdev-snapshot-sync` to the overlay path
    /// the offline path would use, or `blockdev-snapshot-internal-sync`); the image is open by
    /// QEMU, so the offline lock check does not apply.
    public func planLiveCreate(_ request: SnapshotRequest, layout: DiskLayout) async throws -> Plan {
        var plan = try planCreate(request, layout: layout, live: true)
        plan.steps = []
        return plan
    }

    /// QEMU died after taking a snapshot vmsnap never recorded: an internal one is deleted from
    /// the image; an overlay has what the guest wrote since merged back into its base, then goes.
    public func undoUnrecordedLiveSnapshot(_ name: String, kind: SnapshotKind, before: DiskLayout, after: DiskLayout?)
        async throws
    {
        switch kind {
        case .internal:
            try await perform("delete-internal-if-present", arguments: ["image": before.disk.active, "name": name])
        case .external:
            guard let overlay = after?.disk.active, overlay != before.disk.active,
                FileManager.default.fileExists(atPath: overlay)
            else { return }
            // Made before the pause and never switched in (empty, or formatted with nothing
            // written): nothing of the guest's is in it.
            guard let image = try? Qcow2Image(path: overlay), image.resolvedBackingFile != nil else {
                unlink(overlay)
                return
            }
            try await runner.run(Qcow2Commands.commit(overlay))
            unlink(overlay)
        }
    }

    /// A QEMU killed with the image open leaves leaked clusters (`qemu-img check` exit 3).
    public func repairAfterHypervisorCrash(_ layout: DiskLayout) async throws {
        _ = try await runner.execute(["qemu-img", "check", "-q", "-r", "leaks", layout.disk.active])
    }

    // MARK: - Native steps and checks

    /// The overlay file is made first, exclusively and with the base's mode and owner, then
    /// qemu-img writes the qcow2 structure into it (keeping both). Idempotent: an overlay already
    /// on `backing` is done, an empty one (a crash between the two) is filled.
    /// `backingFormat` "raw" puts the overlay on the raw image a chain starts on: it keeps no
    /// bitmaps, and it may be a device node (root:disk 0660), so the overlay takes the mode and
    /// owner of `like` (the layer it replaces) instead.
    func createOverlay(_ overlay: String, backing: String, backingFormat: String = "qcow2", like: String? = nil)
        async throws
    {
        guard ["qcow2", "raw"].contains(backingFormat) else {
            throw SnapshotError(.invalidArgument, "backing format '\(backingFormat)' is not qcow2 or raw")
        }
        let raw = backingFormat == "raw"
        var st = stat()
        if lstat(overlay, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG, let existing = try? Qcow2Image(path: overlay),
            existing.resolvedBackingFile == backing, (existing.backingFormat ?? "qcow2") == backingFormat
        {
            return raw ? () : try await carryBitmaps(from: backing, to: overlay)
        }
        try NewFile.create(overlay, like: like ?? backing)
        try await runner.run(Qcow2Commands.createOverlay(overlay, backing: backing, backingFormat: backingFormat))
        if !raw { try await carryBitmaps(from: backing, to: overlay) }
    }

    public func perform(_ name: String, arguments: [String: String]) async throws {
        switch name {
        case "create-overlay":
            guard let overlay = arguments["overlay"], let backing = arguments["backing"] else { break }
            try await createOverlay(
                overlay, backing: backing, backingFormat: arguments["backing-format"] ?? "qcow2",
                like: arguments["like"])
            return
        case "copy-out-internal":
            guard let image = arguments["image"], let snapshot = arguments["name"], let into = arguments["into"] else {
                break
            }
            try await copyOutInternal(image: image, name: snapshot, into: into, backing: arguments["backing"])
            return
        case "merge-bitmaps-into":
            guard let from = arguments["from"], let into = arguments["into"] else { break }
            guard FileManager.default.fileExists(atPath: from), FileManager.default.fileExists(atPath: into) else {
                return
            }
            try await mergeBitmaps(from: from, into: into)
            return
        case "remove-bitmap-if-present":
            guard let image = arguments["image"], let bitmap = arguments["name"] else { break }
            guard FileManager.default.fileExists(atPath: image) else { return }
            try await removeBitmap(bitmap, image: image)
            return
        case "delete-internal-if-present":
            guard let image = arguments["image"], let snapshot = arguments["name"] else { break }
            guard FileManager.default.fileExists(atPath: image) else { return }
            if try Qcow2Image(path: image).snapshots.contains(where: { $0.name == snapshot }) {
                try await runner.run(Qcow2Commands.deleteInternal(snapshot, image: image))
            }
            return
        default: break
        }
        throw SnapshotError(.unsupported, "backend 'qcow2' has no native step '\(name)'")
    }

    public func verify(layout: DiskLayout) async throws -> [String] {
        var problems: [String] = []
        for layer in layout.layers {
            guard FileManager.default.fileExists(atPath: layer.image) else {
                problems.append("\(layer.image): missing")
                continue
            }
            // A raw base (the volume or file a chain starts on) has no structure to check.
            if Self.isRawBase(layer.image, in: layout) { continue }
            let out = try await runner.execute(Qcow2Commands.check(layer.image))
            if out.status != 0 {
                problems.append(
                    "\(layer.image): qemu-img check exited \(out.status): \(out.standardError)\(out.standardOutput)")
            }
            if let img = try? Qcow2Image(path: layer.image), img.resolvedBackingFile != layer.backing {
                problems.append(
                    "\(layer.image): backing file is \(img.resolvedBackingFile ?? "none"), metadata says \(layer.backing ?? "none")"
                )
            }
        }
        for snap in layout.snapshots where snap.kind == .internal {
            if let img = try? Qcow2Image(path: snap.image), !img.snapshots.contains(where: { $0.name == snap.name }) {
                problems.append("internal snapshot '\(snap.name)' is not in \(snap.image)")
            }
        }
        problems += drift(layout)
        return problems
    }

    /// What the images hold that vmsnap's records do not: internal snapshots made outside vmsnap,
    /// backing specs that are not plain files or lie outside the disk's folders, external data files.
    func drift(_ layout: DiskLayout) -> [String] {
        var problems: [String] = []
        // The disk's own folder and the overlay folder vmsnap was told to use.
        var folders: Set<String> = [(layout.disk.id as NSString).deletingLastPathComponent]
        if let dir = settings["overlay-dir"] { folders.insert(URL(fileURLWithPath: dir).standardizedFileURL.path) }
        for layer in layout.layers where !Self.isRawBase(layer.image, in: layout) {
            guard let img = try? Qcow2Image(path: layer.image) else { continue }
            let known = Set(layout.internalSnapshots(in: layer.image).map(\.name))
            for stored in img.snapshots where !known.contains(stored.name) {
                problems.append(
                    "\(layer.image) holds internal snapshot '\(stored.name)' (id \(stored.id)) that vmsnap did not make and does not list; it is kept. Delete it with `qemu-img snapshot -d`, or leave it"
                )
            }
            if let why = img.backingSpecProblem { problems.append("\(layer.image): \(why)") }
            // A backing that is a layer of the disk was recorded on purpose (an imported chain
            // that starts on a block device); one that is not lies where vmsnap was never told.
            if let backing = img.resolvedBackingFile, img.backingSpecProblem == nil, layout.layer(backing) == nil,
                !folders.contains((backing as NSString).deletingLastPathComponent)
            {
                problems.append(
                    "\(layer.image): its backing file \(backing) lies outside the disk's folders (\(folders.sorted().joined(separator: ", ")))"
                )
            }
            if let data = img.dataFile {
                problems.append("\(layer.image): keeps its data in an external data file (\(data))")
            }
        }
        return problems
    }

    // MARK: - Data access

    public func createDisk(named name: String, size: UInt64, in pool: BackendPool) async throws -> String {
        try SnapshotName.validate(name)
        let path = (pool.directory as NSString).appendingPathComponent("\(name).qcow2")
        guard !FileManager.default.fileExists(atPath: path) else {
            throw SnapshotError(.alreadyExists, "\(path) already exists")
        }
        try await runner.run(Qcow2Commands.createImage(path, size: size))
        return path
    }

    public func destroyDisk(layout: DiskLayout) async throws {
        // Files only: a raw base may be a block device, which is not the test's to remove.
        for image in Set(layout.layers.map(\.image) + [layout.disk.id]) where !Self.isRawBase(image, in: layout) {
            unlink(image)
        }
    }

    public func write(_ bytes: [UInt8], at offset: UInt64, layout: DiskLayout) async throws {
        let source = try ScratchFile(contents: bytes)
        try await runner.run(
            Qcow2Commands.write(from: source.path, at: offset, length: bytes.count, image: layout.disk.active))
    }

    public func read(_ view: DataView, at offset: UInt64, length: Int, layout: DiskLayout) async throws -> [UInt8] {
        var image = layout.disk.active
        var snapshotName: String?
        if case .snapshot(let name) = view {
            guard let snap = layout.snapshot(named: name) else {
                throw SnapshotError(.notFound, "no snapshot '\(name)'")
            }
            image = snap.image
            if snap.kind == .internal { snapshotName = name }
        }
        let raw = try ScratchFile(contents: [])
        try await runner.run(Qcow2Commands.exportRaw(image, snapshot: snapshotName, to: raw.path))
        return try raw.read(at: offset, length: length)
    }

    public func poolInventory(_ pool: BackendPool) async throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: pool.directory).sorted()
    }
}

/// A temporary file removed when the value goes away.
final class ScratchFile {
    let path: String

    init(contents: [UInt8]) throws {
        var template = Array(
            (NSTemporaryDirectory() as NSString).appendingPathComponent("vmsnap-io-XXXXXX").utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else {
            throw SnapshotError(.io, "cannot create a temporary file: \(String(cString: strerror(errno)))")
        }
        path = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let written = contents.withUnsafeBytes { Foundation.write(fd, $0.baseAddress, $0.count) }
        close(fd)
        guard written == contents.count else { throw SnapshotError(.io, "short write to \(path)") }
    }

    func read(at offset: UInt64, length: Int) throws -> [UInt8] {
        let file = try ReadOnlyFile(path)
        var bytes = try file.read(at: offset, count: length)
        if bytes.count < length { bytes += [UInt8](repeating: 0, count: length - bytes.count) }
        return bytes
    }

    deinit { unlink(path) }
}
