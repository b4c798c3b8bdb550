import Foundation
import SnapshotCore

/// VHD disks as Xen's blktap and XenServer/XCP-ng keep them: dynamic disks with trees of
/// differencing disks. Snapshots are external (VHD has no internal snapshots): the active file
/// becomes a read-only parent and a new differencing child becomes active, as `vhd-util snapshot`
/// does. The native Swift engine does the work; where `vhd-util` is installed, snapshot creation
/// and coalescing can go through it instead (`--set engine=vhd-util`).
public struct VHDBackend: DiskSnapshotBackend {
    public static let kind: BackendKind = "vhd"
    public static let factory = BackendFactory(kind: kind, settings: settingsSchema) { env in
        VHDBackend(runner: env.runner, settings: env.settings)
    }

    /// The settings the backend reads.
    public static let settingsSchema: [SettingSpec] = [
        SettingSpec(
            "engine", .choice, default: "auto", choices: ["auto", "native", "vhd-util"],
            help: "who writes the VHD files: the native Swift engine, blktap's vhd-util, or vhd-util where installed"),
        SettingSpec("overlay-dir", .path, help: "where new differencing disks go (default: beside the active image)"),
    ]

    let runner: any CommandRunning
    let settings: [String: String]

    public init(runner: any CommandRunning = SubprocessRunner(), settings: [String: String] = [:]) {
        self.runner = runner
        self.settings = settings
    }

    /// Which engine performs the steps: `native`, `vhd-util`, or `auto` (vhd-util when installed).
    var useVhdUtil: Bool {
        switch settings["engine"] ?? "auto" {
        case "vhd-util": return true
        case "native": return false
        default: return VHDUtilCommands.installed
        }
    }

    public var descriptor: BackendDescriptor {
        BackendDescriptor(
            kind: Self.kind,
            summary:
                "VHD dynamic and differencing disks (native Swift engine; vhd-util where installed): external snapshots, offline",
            capabilities: .all(
                kinds: [.external], states: [.offline],
                notes: [
                    "VHD has no internal snapshots",
                    "a running QEMU domain's VHD disk is served by vmsnap's disk server (QEMU's vpc driver cannot write differencing VHDs); its snapshots are taken with the server held, so the storage itself is only ever changed offline",
                    "engine: \(useVhdUtil ? "vhd-util" : "native")",
                ]),
            settings: Self.settingsSchema, imageFormat: "vpc", sourceType: .file, tools: ["vhd-util"],
            reportsChanges: true)
    }

    /// QEMU's vpc driver reads dynamic and fixed VHDs but never a differencing one, and is not
    /// safe for writes into one: a running domain's VHD disk is served by vmsnap's disk server
    /// over this engine (``openServed(_:)``), whatever its layering.
    public func hypervisorDrive(_ layout: DiskLayout) throws -> HypervisorDrive {
        HypervisorDrive(path: layout.disk.active, format: "vpc", served: true)
    }

    public func openServed(_ layout: DiskLayout) throws -> any ServedImage {
        try VHDServedImage(path: layout.disk.active)
    }

    public func normalize(locator: String) -> String { URL(fileURLWithPath: locator).standardizedFileURL.path }

    public func recognizes(locator: String) async -> Bool {
        let path = normalize(locator: locator)
        guard let handle = FileHandle(forReadingAtPath: path) else { return false }
        defer { try? handle.close() }
        guard let end = try? handle.seekToEnd(), end >= 512 else { return false }
        try? handle.seek(toOffset: end - 512)
        let tail = (try? handle.read(upToCount: 8)).map(Array.init) ?? []
        try? handle.seek(toOffset: 0)
        let head = (try? handle.read(upToCount: 8)).map(Array.init) ?? []
        return tail == VHD.footerCookie || head == VHD.footerCookie
    }

    func open(_ path: String, writable: Bool = false) throws -> VHDImage {
        guard FileManager.default.fileExists(atPath: path) else {
            throw SnapshotError(.notFound, "disk image \(path) does not exist; check the path")
        }
        return try VHDImage(path: path, writable: writable)
    }

    public func inspect(locator: String) async throws -> DiskInfo {
        let image = try open(normalize(locator: locator))
        var chain: [String] = []
        var next = try image.parent()
        while let p = next {
            chain.append(p.path)
            next = try p.parent()
        }
        let allocated = (try? FileManager.default.attributesOfItem(atPath: image.path)[.size] as? UInt64) ?? nil
        return DiskInfo(
            format: "vpc-\(image.type)", virtualSize: image.virtualSize, allocatedSize: allocated, backingChain: chain)
    }

    public func adopt(locator: String) async throws -> DiskLayout {
        let path = normalize(locator: locator)
        let image = try open(path)
        guard image.type != .fixed else {
            throw SnapshotError(
                .unsupported,
                "\(path) is a fixed VHD; snapshots need a dynamic disk: convert it with `qemu-img convert -O vpc -o subformat=dynamic`"
            )
        }
        let backing = image.type == .differencing ? try image.parentPath() : nil
        if image.type == .differencing { _ = try image.parent() }
        let (snapshots, layers) = try Self.adoptChain(below: image)
        return DiskLayout(
            disk: DiskRecord(id: path, kind: Self.kind, active: path, current: snapshots.last?.name),
            snapshots: snapshots, layers: [DiskLayer(image: path, backing: backing)] + layers)
    }

    /// The differencing chain under an adopted disk (vhd-util's snapshots, or any tool's): each
    /// image below the active one is the frozen image of an external snapshot, named after its
    /// file (without `.vhd`; a name vmsnap cannot use gets the image's UUID), oldest first, each
    /// the parent of the next. vhd-util keeps no names or times of its own: the time is the
    /// footer's timestamp.
    static func adoptChain(below top: VHDImage) throws -> ([DiskSnapshot], [DiskLayer]) {
        var frozen: [VHDImage] = []
        var current = try top.parent()
        while let image = current {
            guard !frozen.contains(where: { $0.path == image.path }) else { break }
            frozen.append(image)
            current = image.type == .differencing ? try image.parent() : nil
        }
        var snapshots: [DiskSnapshot] = []
        var layers: [DiskLayer] = []
        var used = Set<String>()
        for image in frozen.reversed() {
            var name = ((image.path as NSString).lastPathComponent as NSString).deletingPathExtension
            if SnapshotName.problem(name) != nil || used.contains(name) {
                name = image.footer.uuid.map { String(format: "%02x", $0) }.joined()
            }
            used.insert(name)
            snapshots.append(
                DiskSnapshot(
                    name: name, kind: .external, image: image.path, parent: snapshots.last?.name,
                    createdAt: Date(timeIntervalSince1970: VHD.epochOffset + TimeInterval(image.footer.timestamp)),
                    description: "adopted from the existing differencing chain", virtualSize: image.virtualSize))
            layers.append(
                DiskLayer(image: image.path, backing: image.type == .differencing ? try image.parentPath() : nil))
        }
        return (snapshots, layers)
    }

    public func state(of layout: DiskLayout) async throws -> DiskState {
        FileLockProbe.isLocked(layout.disk.active, range: FileLockProbe.imageLockBytes) ? .live : .offline
    }

    static func requireNotInUse(_ images: [String]) throws {
        for image in Set(images) where FileLockProbe.isLocked(image, range: FileLockProbe.imageLockBytes) {
            throw SnapshotError(
                .inUse, "\(image) is in use by a running hypervisor (it holds the image lock); shut the VM down first")
        }
    }

    // MARK: - Planning

    var chain: LayerChainPlanner {
        LayerChainPlanner(
            actions: .init(
                createOverlay: { overlay, base in
                    .backend(name: "create-child", arguments: ["parent": base, "child": overlay])
                },
                commitAndMove: { child, base in
                    let childUUID = try VHDImage(path: child).footer.uuid
                    let grandparent =
                        try VHDImage(path: base).type == .differencing ? try VHDImage(path: base).parentPath() : nil
                    var steps = [
                        PlanStep(
                            "merge \(child) into \(base)",
                            .backend(name: "coalesce", arguments: ["child": child, "parent": base])),
                        PlanStep(
                            "give \(base) the identity of \(child)",
                            .backend(
                                name: "set-uuid",
                                arguments: [
                                    "image": base, "uuid": childUUID.map { String(format: "%02x", $0) }.joined(),
                                ])),
                        PlanStep("move \(base) to \(child)", .rename(from: base, to: child)),
                    ]
                    if let grandparent {
                        steps.append(
                            PlanStep(
                                "point \(child) at \(grandparent) from its new place",
                                .backend(name: "relink", arguments: ["image": child, "parent": grandparent])))
                    }
                    return steps
                },
                rebase: { child, oldBase, newBase in
                    .backend(name: "rebase", arguments: ["child": child, "old": oldBase, "new": newBase ?? ""])
                },
                requireNotInUse: { try VHDBackend.requireNotInUse($0) }),
            fileExtension: "vhd", knownExtensions: [".vhd", ".vpc"])
    }

    public func planCreate(_ request: SnapshotRequest, layout: DiskLayout) async throws -> Plan {
        let image = try open(layout.disk.active)
        guard request.kind == .external else {
            throw SnapshotError.unsupported(Self.kind, Capability(.create, .internal, .offline))
        }
        return try chain.planCreateExternal(
            request, layout: layout, virtualSize: image.virtualSize,
            overlayDirectory: request.overlayDirectory ?? settings["overlay-dir"])
    }

    public func planRevert(to name: String, layout: DiskLayout) async throws -> Plan {
        guard let target = layout.snapshot(named: name) else {
            throw SnapshotError(.notFound, "no snapshot '\(name)' on \(layout.disk.id)")
        }
        _ = try open(target.image)
        return try chain.planRevertExternal(to: target, layout: layout, overlayDirectory: settings["overlay-dir"])
    }

    public func planDelete(_ name: String, mode: DeleteMode, layout: DiskLayout) async throws -> Plan {
        guard let target = layout.snapshot(named: name) else {
            throw SnapshotError(.notFound, "no snapshot '\(name)' on \(layout.disk.id)")
        }
        switch mode {
        case .merge: return try chain.planMergeExternal(target, layout: layout)
        case .children, .childrenOnly:
            return try chain.planSubtree(target, includeSelf: mode == .children, layout: layout)
        }
    }

    // MARK: - Native steps (each idempotent)

    public func perform(_ name: String, arguments a: [String: String]) async throws {
        switch name {
        case "create-child":
            guard let parent = a["parent"], let child = a["child"] else { break }
            if FileManager.default.fileExists(atPath: child) {
                // Done already if it is our child of this parent; anything else is in the way.
                let existing = try VHDImage(path: child)
                if existing.type == .differencing, try existing.parentPath() == parent { return }
                throw SnapshotError(.alreadyExists, "\(child) already exists")
            }
            if useVhdUtil {
                try await runner.run(VHDUtilCommands.snapshot(child: child, parent: parent))
            } else {
                try VHDEngine.createDifferencing(child, parent: parent)
            }
            return
        case "coalesce":
            guard let child = a["child"], let parent = a["parent"] else { break }
            if useVhdUtil {
                try await runner.run(VHDUtilCommands.coalesce(child: child))
            } else {
                try VHDEngine.coalesce(child: child, into: parent)
            }
            return
        case "set-uuid":
            guard let image = a["image"], let hex = a["uuid"], hex.count == 32 else { break }
            guard FileManager.default.fileExists(atPath: image) else { return }
            let bytes = stride(from: 0, to: 32, by: 2).map { i -> UInt8 in
                let s = hex.index(hex.startIndex, offsetBy: i)
                return UInt8(hex[s...hex.index(after: s)], radix: 16) ?? 0
            }
            let vhd = try VHDImage(path: image, writable: true)
            try vhd.setUUID(bytes)
            try vhd.sync()
            return
        case "relink":
            guard let image = a["image"], let parent = a["parent"] else { break }
            let vhd = try VHDImage(path: image, writable: true)
            try vhd.setParent(parent)
            try vhd.sync()
            return
        case "rebase":
            guard let child = a["child"], let old = a["old"], let new = a["new"] else { break }
            try VHDEngine.rebase(child, from: old, to: new.isEmpty ? nil : new)
            return
        default: break
        }
        throw SnapshotError(
            .unsupported, "backend 'vhd' has no native step '\(name)' with arguments \(a.keys.sorted())")
    }

    public func verify(layout: DiskLayout) async throws -> [String] {
        var problems: [String] = []
        for layer in layout.layers {
            guard FileManager.default.fileExists(atPath: layer.image) else {
                problems.append("\(layer.image): missing")
                continue
            }
            problems += VHDEngine.check(layer.image)
            problems += try await vhdUtilCheck(layer.image)
            if let image = try? VHDImage(path: layer.image) {
                let parent = image.type == .differencing ? try? image.parentPath() : nil
                if parent != layer.backing {
                    problems.append(
                        "\(layer.image): parent is \(parent ?? "none"), metadata says \(layer.backing ?? "none")")
                }
            }
        }
        return problems
    }

    /// blktap's own check, where vhd-util is installed (whichever engine wrote the file): what
    /// it finds, with its last lines; nothing where it is not installed.
    func vhdUtilCheck(_ image: String) async throws -> [String] {
        guard VHDUtilCommands.installed else { return [] }
        let out = try await runner.execute(VHDUtilCommands.check(image))
        guard out.status != 0 else { return [] }
        let text = (out.standardOutput + "\n" + out.standardError).split(whereSeparator: \.isNewline)
            .map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }.suffix(3).joined(separator: "; ")
        return ["\(image): vhd-util check failed (status \(out.status)): \(text)"]
    }

    // MARK: - Data access

    public func createDisk(named name: String, size: UInt64, in pool: BackendPool) async throws -> String {
        try SnapshotName.validate(name)
        let path = (pool.directory as NSString).appendingPathComponent("\(name).vhd")
        try VHDEngine.createDynamic(path, size: size)
        return path
    }

    public func destroyDisk(layout: DiskLayout) async throws {
        for image in Set(layout.layers.map(\.image) + [layout.disk.id]) { unlink(image) }
    }

    public func write(_ bytes: [UInt8], at offset: UInt64, layout: DiskLayout) async throws {
        let image = try open(layout.disk.active, writable: true)
        try image.write(bytes, at: offset)
        try image.sync()
    }

    public func read(_ view: DataView, at offset: UInt64, length: Int, layout: DiskLayout) async throws -> [UInt8] {
        var path = layout.disk.active
        if case .snapshot(let name) = view {
            guard let snap = layout.snapshot(named: name) else {
                throw SnapshotError(.notFound, "no snapshot '\(name)'")
            }
            path = snap.image
        }
        return try open(path).read(at: offset, count: length)
    }

    public func poolInventory(_ pool: BackendPool) async throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: pool.directory).sorted()
    }
}

/// Command lines for vhd-util (blktap), used where it is installed.
public enum VHDUtilCommands {
    public static var installed: Bool {
        (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/sbin:/usr/bin").split(separator: ":").contains {
            FileManager.default.isExecutableFile(atPath: "\($0)/vhd-util")
        }
    }

    /// `-e`: link to `parent` itself even when it is an empty differencing disk (vhd-util
    /// otherwise skips empty parents and links to the first non-empty one below, so the child
    /// would read through another image than the snapshot tree says).
    public static func snapshot(child: String, parent: String) -> [String] {
        ["vhd-util", "snapshot", "-e", "-n", child, "-p", parent]
    }
    public static func coalesce(child: String) -> [String] { ["vhd-util", "coalesce", "-n", child] }
    public static func check(_ image: String) -> [String] { ["vhd-util", "check", "-n", image] }
}
