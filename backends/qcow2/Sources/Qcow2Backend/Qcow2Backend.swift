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
    public static let factory = BackendFactory(kind: kind) { env in Qcow2Backend(runner: env.runner, settings: env.settings) }

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
            capabilities: .all(kinds: [.internal, .external], states: [.offline], notes: [
                "live disks (open by a running QEMU) go through the QEMU driver's QMP path, not this backend",
                "snapshot names made only of digits are refused: qemu-img would read them as snapshot IDs",
                "an internal snapshot inside an image that external snapshots now build on cannot be reverted in place",
            ]))
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
        if img.isCorrupt {
            throw SnapshotError(.invalidImage, "\(path) is marked corrupt by QEMU; repair it with `qemu-img check -r all \(path)` (after a backup) before snapshotting")
        }
        return img
    }

    public func inspect(locator: String) async throws -> DiskInfo {
        let path = normalize(locator: locator)
        let img = try image(path)
        var chain: [String] = []
        var next = img.resolvedBackingFile
        while let backing = next, chain.count < 256, !chain.contains(backing) {
            chain.append(backing)
            next = Qcow2Image.hasMagic(backing) ? (try? Qcow2Image(path: backing))?.resolvedBackingFile : nil
        }
        let allocated = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? UInt64) ?? nil
        return DiskInfo(
            format: "qcow2", virtualSize: img.virtualSize, allocatedSize: allocated, backingChain: chain,
            snapshots: img.snapshots.map { StoredSnapshot(id: $0.id, name: $0.name, createdAt: $0.date, virtualSize: $0.diskSize ?? img.virtualSize, stateSize: $0.vmStateSize) })
    }

    public func adopt(locator: String) async throws -> DiskLayout {
        let path = normalize(locator: locator)
        let img = try image(path)
        let snapshots = img.snapshots.map {
            DiskSnapshot(name: $0.name, kind: .internal, image: path, backendID: $0.id, createdAt: $0.date, virtualSize: $0.diskSize ?? img.virtualSize)
        }
        return DiskLayout(disk: DiskRecord(id: path, kind: Self.kind, active: path), snapshots: snapshots, layers: [DiskLayer(image: path, backing: img.resolvedBackingFile)])
    }

    public func state(of layout: DiskLayout) async throws -> DiskState {
        QemuImageLock.isHeld(layout.disk.active) ? .live : .offline
    }

    /// Refuses to touch an image that a QEMU process holds.
    func requireNotInUse(_ images: [String]) throws {
        for image in Set(images) where QemuImageLock.isHeld(image) {
            throw SnapshotError(.inUse, "\(image) is in use by a running QEMU (it holds the image lock); shut the VM down, or snapshot it through `vmsnap snapshot` while it runs")
        }
    }

    func requireBackendName(_ name: String) throws {
        if !name.isEmpty, name.allSatisfy(\.isASCII), name.allSatisfy(\.isNumber) {
            throw SnapshotError(.invalidName, "invalid snapshot name '\(name)': qcow2 names made only of digits clash with snapshot IDs; add a letter (for example 's\(name)')")
        }
    }

    // MARK: - Planning: create

    public func planCreate(_ request: SnapshotRequest, layout: DiskLayout) async throws -> Plan {
        try requireBackendName(request.name)
        let active = layout.disk.active
        let img = try image(active)
        try requireNotInUse([active])
        if img.snapshots.contains(where: { $0.name == request.name }) {
            throw SnapshotError(.alreadyExists, "\(active) already holds an internal snapshot named '\(request.name)' (made outside vmsnap); pick another name")
        }
        var result = layout
        let snapshot = DiskSnapshot(
            name: request.name, kind: request.kind, image: active, parent: layout.disk.current,
            description: request.description, virtualSize: img.virtualSize)
        result.snapshots.append(snapshot)
        result.disk.current = request.name

        switch request.kind {
        case .internal:
            if request.overlayDirectory != nil {
                throw SnapshotError(.invalidArgument, "--overlay-dir applies to external snapshots only; an internal snapshot stays inside \(active)")
            }
            let step = PlanStep(
                "create internal snapshot '\(request.name)' in \(active)", .run(Qcow2Commands.createInternal(request.name, image: active)),
                undo: .backend(name: "delete-internal-if-present", arguments: ["image": active, "name": request.name]))
            return Plan(operation: "create internal snapshot '\(request.name)' of \(layout.disk.id)", steps: [step], result: result)
        case .external:
            let overlay = try overlayPath(for: request.name, layout: layout, directory: request.overlayDirectory ?? settings["overlay-dir"])
            result.layers.append(DiskLayer(image: overlay, backing: active))
            result.disk.active = overlay
            let step = PlanStep(
                "create overlay \(overlay) on \(active)", .run(Qcow2Commands.createOverlay(overlay, backing: active)),
                undo: .removeFile(overlay))
            return Plan(operation: "create external snapshot '\(request.name)' of \(layout.disk.id)", steps: [step], result: result)
        }
    }

    /// `<dir>/<stem>.<name>.qcow2`, with `.1`, `.2`... when taken: the file that holds the
    /// changes made after snapshot `name` (libvirt's naming).
    func overlayPath(for name: String, layout: DiskLayout, directory: String?) throws -> String {
        let dir = directory.map { normalize(locator: $0) } ?? (layout.disk.active as NSString).deletingLastPathComponent
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: dir, isDirectory: &isDir), isDir.boolValue else {
            throw SnapshotError(.invalidArgument, "overlay directory \(dir) does not exist or is not a directory")
        }
        var stem = (layout.disk.id as NSString).lastPathComponent
        for ext in [".qcow2", ".qcow", ".img"] where stem.hasSuffix(ext) { stem.removeLast(ext.count) }
        let taken = Set(layout.layers.map(\.image))
        var candidate = (dir as NSString).appendingPathComponent("\(stem).\(name).qcow2")
        var n = 1
        while taken.contains(candidate) || FileManager.default.fileExists(atPath: candidate) {
            candidate = (dir as NSString).appendingPathComponent("\(stem).\(name).\(n).qcow2")
            n += 1
        }
        guard (candidate as NSString).lastPathComponent.utf8.count <= 255 else {
            throw SnapshotError(.invalidName, "the overlay file name for snapshot '\(name)' would exceed 255 bytes; use a shorter name")
        }
        return candidate
    }

    // MARK: - Planning: revert

    public func planRevert(to name: String, layout: DiskLayout) async throws -> Plan {
        guard let target = layout.snapshot(named: name) else { throw SnapshotError(.notFound, "no snapshot '\(name)' on \(layout.disk.id)") }
        let oldActive = layout.disk.active
        var result = layout
        result.disk.current = name
        var steps: [PlanStep] = []
        let pointOfNoReturn: Int
        switch target.kind {
        case .internal:
            let holder = target.image
            if let frozen = layout.externalSnapshot(frozenAt: holder) {
                throw SnapshotError(.conflict, "cannot revert to internal snapshot '\(name)': it is inside \(holder), which external snapshot '\(frozen.name)' keeps read-only for the layers built on it; applying it there would change what they read. Delete '\(frozen.name)' first (its changes merge into its children), or copy the snapshot out with `qemu-img convert -l snapshot.name=\(name)`")
            }
            if !layout.children(ofLayer: holder).isEmpty {
                throw SnapshotError(.conflict, "cannot revert to internal snapshot '\(name)': other layers read through \(holder)")
            }
            _ = try image(holder)
            try requireNotInUse([holder, oldActive])
            steps.append(PlanStep("apply internal snapshot '\(name)' to \(holder)", .run(Qcow2Commands.applyInternal(name, image: holder))))
            pointOfNoReturn = 0
            result.disk.active = holder
        case .external:
            let base = target.image
            _ = try image(base)
            try requireNotInUse([base, oldActive])
            let overlay = try overlayPath(for: name, layout: layout, directory: settings["overlay-dir"])
            steps.append(PlanStep("create overlay \(overlay) on \(base)", .run(Qcow2Commands.createOverlay(overlay, backing: base)), undo: .removeFile(overlay)))
            pointOfNoReturn = 1
            result.layers.append(DiskLayer(image: overlay, backing: base))
            result.disk.active = overlay
        }
        var notes: [String] = []
        if oldActive != result.disk.active {
            if disposable(oldActive, in: result) {
                steps.append(PlanStep("discard the state after the current snapshot (\(oldActive))", .removeFile(oldActive)))
                result.layers.removeAll { $0.image == oldActive }
            } else if layout.internalSnapshots(in: oldActive).isEmpty == false {
                notes.append("kept \(oldActive): it holds internal snapshots \(layout.internalSnapshots(in: oldActive).map(\.name).joined(separator: ", "))")
            }
        }
        return Plan(operation: "revert \(layout.disk.id) to '\(name)'", steps: steps, pointOfNoReturn: pointOfNoReturn, result: result, notes: notes)
    }

    /// An image nothing needs any more: not active, no snapshot lives in it or on it, no layer
    /// reads through it, and it is not the disk's original file.
    func disposable(_ image: String, in layout: DiskLayout) -> Bool {
        image != layout.disk.active && image != layout.disk.id && layout.layer(image) != nil
            && !layout.snapshots.contains { $0.image == image } && layout.children(ofLayer: image).isEmpty
    }

    // MARK: - Planning: delete

    public func planDelete(_ name: String, mode: DeleteMode, layout: DiskLayout) async throws -> Plan {
        guard let target = layout.snapshot(named: name) else { throw SnapshotError(.notFound, "no snapshot '\(name)' on \(layout.disk.id)") }
        switch mode {
        case .merge: return try planMerge(target, layout: layout)
        case .children, .childrenOnly: return try planSubtree(target, includeSelf: mode == .children, layout: layout)
        }
    }

    /// Removes the record of `name`, reparenting its children.
    func removingRecord(_ name: String, from layout: DiskLayout) -> DiskLayout {
        var result = layout
        let parent = layout.snapshot(named: name)?.parent
        result.snapshots.removeAll { $0.name == name }
        for i in result.snapshots.indices where result.snapshots[i].parent == name { result.snapshots[i].parent = parent }
        if result.disk.current == name { result.disk.current = parent }
        return result
    }

    func planMerge(_ target: DiskSnapshot, layout: DiskLayout) throws -> Plan {
        var result = removingRecord(target.name, from: layout)
        var steps: [PlanStep] = []
        var notes: [String] = []
        let operation = "delete snapshot '\(target.name)' of \(layout.disk.id)"
        switch target.kind {
        case .internal:
            try requireNotInUse([target.image])
            steps.append(PlanStep("delete internal snapshot '\(target.name)' from \(target.image)",
                                  .backend(name: "delete-internal-if-present", arguments: ["image": target.image, "name": target.name])))
            if disposable(target.image, in: result) {
                steps.append(PlanStep("remove \(target.image), which nothing uses any more", .removeFile(target.image)))
                result.layers.removeAll { $0.image == target.image }
            }
        case .external:
            let base = target.image
            let children = layout.children(ofLayer: base)
            let backing = layout.layer(base)?.backing
            for child in children where !layout.internalSnapshots(in: child.image).isEmpty {
                let held = layout.internalSnapshots(in: child.image).map(\.name).joined(separator: ", ")
                throw SnapshotError(.conflict, "cannot merge external snapshot '\(target.name)': \(child.image) holds internal snapshots (\(held)) that read through its image; merging would change what they read. Delete those internal snapshots first")
            }
            try requireNotInUse([base] + children.map(\.image))
            switch children.count {
            case 0:
                if disposable(base, in: result) {
                    steps.append(PlanStep("remove \(base), which nothing uses any more", .removeFile(base)))
                    result.layers.removeAll { $0.image == base }
                } else {
                    notes.append("kept \(base): \(layout.internalSnapshots(in: base).isEmpty ? "it is the disk's original image" : "it holds internal snapshots")")
                }
            case 1:
                // Commit the only child into the base, then move the base into the child's place:
                // every reference to the child (the active disk, layers above it) stays valid.
                let child = children[0].image
                steps.append(PlanStep("merge \(child) into \(base)", .run(Qcow2Commands.commit(child))))
                steps.append(PlanStep("move \(base) to \(child)", .rename(from: base, to: child)))
                result.layers.removeAll { $0.image == child }
                if let i = result.layers.firstIndex(where: { $0.image == base }) { result.layers[i].image = child }
                for i in result.snapshots.indices where result.snapshots[i].image == base { result.snapshots[i].image = child }
            default:
                if !layout.internalSnapshots(in: base).isEmpty {
                    throw SnapshotError(.conflict, "cannot merge external snapshot '\(target.name)': its image \(base) also holds internal snapshots (\(layout.internalSnapshots(in: base).map(\.name).joined(separator: ", "))) and has \(children.count) children; delete the internal snapshots first")
                }
                let backingFormat = try backing.map { b in try Qcow2Image.hasMagic(b) ? "qcow2" : (image(base).backingFormat ?? "raw") }
                for child in children {
                    steps.append(PlanStep("copy what \(child.image) reads from \(base) into it", .run(Qcow2Commands.rebase(child.image, onto: backing, backingFormat: backingFormat))))
                }
                steps.append(PlanStep("remove \(base)", .removeFile(base)))
                for i in result.layers.indices where result.layers[i].backing == base { result.layers[i].backing = backing }
                result.layers.removeAll { $0.image == base }
            }
        }
        return Plan(operation: operation, steps: steps, pointOfNoReturn: 0, result: result, notes: notes)
    }

    /// Images the layout needs: the active one, every snapshot's image, and their backing chains.
    func neededImages(_ layout: DiskLayout) -> Set<String> {
        var needed: Set<String> = []
        var queue = [layout.disk.active] + layout.snapshots.map(\.image)
        while let image = queue.popLast() {
            guard needed.insert(image).inserted else { continue }
            if let backing = layout.layer(image)?.backing { queue.append(backing) }
        }
        return needed
    }

    func planSubtree(_ target: DiskSnapshot, includeSelf: Bool, layout: DiskLayout) throws -> Plan {
        let tree = layout.tree
        var doomed = tree.descendants(of: target.name)
        if includeSelf { doomed.insert(target, at: 0) }
        let doomedNames = Set(doomed.map(\.name))
        var result = layout
        result.snapshots.removeAll { doomedNames.contains($0.name) }
        if let current = layout.disk.current, doomedNames.contains(current) {
            result.disk.current = includeSelf ? target.parent : target.name
        }
        let before = neededImages(layout), after = neededImages(result)
        let freed = before.subtracting(after).filter { layout.layer($0) != nil && $0 != layout.disk.id }
        try requireNotInUse(Array(freed) + doomed.map(\.image))
        var steps: [PlanStep] = []
        for snap in doomed where snap.kind == .internal && !freed.contains(snap.image) {
            steps.append(PlanStep("delete internal snapshot '\(snap.name)' from \(snap.image)",
                                  .backend(name: "delete-internal-if-present", arguments: ["image": snap.image, "name": snap.name])))
        }
        // Remove layers top-down: an image goes before the one it reads through.
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
            notes.append("kept the images of \(anonymous.map { "'\($0.name)'" }.joined(separator: ", ")): the active disk still reads through them")
        }
        let what = includeSelf ? "snapshot '\(target.name)' and its descendants" : "the descendants of snapshot '\(target.name)'"
        return Plan(operation: "delete \(what) of \(layout.disk.id)", steps: steps, pointOfNoReturn: 0, result: result, notes: notes)
    }

    // MARK: - Native steps and checks

    public func perform(_ name: String, arguments: [String: String]) async throws {
        switch name {
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
                problems.append("\(layer.image): missing"); continue
            }
            let out = try await runner.execute(Qcow2Commands.check(layer.image))
            if out.status != 0 { problems.append("\(layer.image): qemu-img check exited \(out.status): \(out.standardError)\(out.standardOutput)") }
            if let img = try? Qcow2Image(path: layer.image), img.resolvedBackingFile != layer.backing {
                problems.append("\(layer.image): backing file is \(img.resolvedBackingFile ?? "none"), metadata says \(layer.backing ?? "none")")
            }
        }
        for snap in layout.snapshots where snap.kind == .internal {
            if let img = try? Qcow2Image(path: snap.image), !img.snapshots.contains(where: { $0.name == snap.name }) {
                problems.append("internal snapshot '\(snap.name)' is not in \(snap.image)")
            }
        }
        return problems
    }

    // MARK: - Data access

    public func createDisk(named name: String, size: UInt64, in pool: BackendPool) async throws -> String {
        try SnapshotName.validate(name)
        let path = (pool.directory as NSString).appendingPathComponent("\(name).qcow2")
        guard !FileManager.default.fileExists(atPath: path) else { throw SnapshotError(.alreadyExists, "\(path) already exists") }
        try await runner.run(Qcow2Commands.createImage(path, size: size))
        return path
    }

    public func destroyDisk(layout: DiskLayout) async throws {
        for image in Set(layout.layers.map(\.image) + [layout.disk.id]) { unlink(image) }
    }

    public func write(_ bytes: [UInt8], at offset: UInt64, layout: DiskLayout) async throws {
        let source = try ScratchFile(contents: bytes)
        try await runner.run(Qcow2Commands.write(from: source.path, at: offset, length: bytes.count, image: layout.disk.active))
    }

    public func read(_ view: DataView, at offset: UInt64, length: Int, layout: DiskLayout) async throws -> [UInt8] {
        var image = layout.disk.active
        var snapshotName: String?
        if case .snapshot(let name) = view {
            guard let snap = layout.snapshot(named: name) else { throw SnapshotError(.notFound, "no snapshot '\(name)'") }
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
        var template = Array((NSTemporaryDirectory() as NSString).appendingPathComponent("vmsnap-io-XXXXXX").utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw SnapshotError(.io, "cannot create a temporary file: \(String(cString: strerror(errno)))") }
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
