import Foundation
import SnapshotCore

/// Disks on LVM logical volumes: classic (copy-on-write) snapshots of thick volumes and thin
/// snapshots of thin volumes. A snapshot is a separate volume while the origin stays active
/// (DESIGN.md's external snapshot); revert merges it into the origin with `lvconvert --merge` and
/// takes it again, so the snapshot stays available. Volumes vmsnap creates carry the tag `vmsnap`
/// and `vmsnap.name=<snapshot name>`, so ownership can be read from the storage alone.
public struct LVMBackend: DiskSnapshotBackend {
    public static let kind: BackendKind = "lvm"
    /// Reports run in-process through liblvm2cmd (`lvm-library=off` runs them as `lvs`/`vgs`
    /// child processes like every other command).
    public static let factory = BackendFactory(kind: kind) { env in
        LVMBackend(runner: env.settings["lvm-library"] == "off" ? env.runner : LVMLibraryRunner(fallback: env.runner), settings: env.settings)
    }

    let runner: any CommandRunning
    /// `cow-size`: size of a classic snapshot's copy-on-write area, `20%ORIGIN` by default, or a
    /// size such as `256m`. `vg`, `thin-pool`: where test disks go. `warn-percent`: CoW fill warning.
    let settings: [String: String]

    public init(runner: any CommandRunning = SubprocessRunner(), settings: [String: String] = [:]) {
        self.runner = runner
        self.settings = settings
    }

    public var descriptor: BackendDescriptor {
        BackendDescriptor(
            kind: Self.kind,
            summary: "LVM logical volumes: classic (CoW) and thin snapshots through lvcreate / lvconvert --merge / lvremove, offline",
            capabilities: Self.capabilities(notes: [
                "snapshots of an open origin (a running VM's disk) are taken while the domain's vCPUs are paused and QEMU has flushed; revert and merge need the origin closed",
                "a classic snapshot cannot itself be snapshotted; snapshots are always of the origin volume",
                "revert merges the snapshot into the origin; while the origin is open LVM defers the merge to its next activation, and vmsnap reports that instead of claiming the revert is done",
                "a classic snapshot whose copy-on-write area overflowed is invalid: reported as lost, never reverted to",
                "copy-on-write size: setting cow-size (default 20%ORIGIN)",
            ]))
    }

    static func capabilities(notes: [String]) -> CapabilityTable {
        var table = CapabilityTable.all(kinds: [.external], states: [.offline], notes: notes)
        // A snapshot volume is taken or removed without touching the open origin.
        for op in [SnapshotOperation.create, .delete, .deleteSubtree] { table.supported.insert(Capability(op, .external, .live)) }
        return table
    }

    /// QEMU opens the origin's device node as a raw disk.
    public func hypervisorDrive(_ layout: DiskLayout) throws -> HypervisorDrive {
        HypervisorDrive(path: "/dev/" + layout.disk.active, format: "raw", liveSnapshots: false)
    }

    // MARK: - Locators and reports

    public func normalize(locator: String) -> String {
        var l = locator
        if l.hasPrefix("/dev/mapper/") { return l }
        if l.hasPrefix("/dev/") { l.removeFirst(5) }
        return l
    }

    static func isVolumeName(_ s: String) -> Bool {
        let parts = s.split(separator: "/", omittingEmptySubsequences: false)
        return parts.count == 2 && parts.allSatisfy { !$0.isEmpty && $0.allSatisfy { $0.isLetter || $0.isNumber || "+_.-".contains($0) } }
    }

    public func recognizes(locator: String) async -> Bool {
        let l = normalize(locator: locator)
        guard Self.isVolumeName(l), !FileManager.default.fileExists(atPath: l) else { return false }
        return (try? await volume(l)) != nil
    }

    /// One row of `lvs`.
    struct Volume: Decodable {
        var lv_name: String
        var vg_name: String
        var lv_attr: String
        var lv_size: String
        var origin: String
        var pool_lv: String
        var data_percent: String
        var lv_tags: String
        var lv_device_open: String
        var lv_merging: String?
        var path: String { "\(vg_name)/\(lv_name)" }
        var isThin: Bool { lv_attr.first == "V" || !pool_lv.isEmpty }
        var isClassicSnapshot: Bool { lv_attr.first == "s" || lv_attr.first == "S" }
        /// `S` in the first column, or `I` in the fifth: an overflowed classic snapshot.
        var isInvalid: Bool { lv_attr.first == "S" || (lv_attr.count > 4 && Array(lv_attr)[4] == "I") }
        var isOpen: Bool { lv_device_open == "open" || (lv_attr.count > 5 && Array(lv_attr)[5] == "o") }
        var fill: Double? { Double(data_percent) }
        var tags: [String] { lv_tags.split(separator: ",").map(String.init) }
        var size: UInt64 { UInt64(lv_size) ?? 0 }
    }
    struct Report: Decodable {
        struct Inner: Decodable { var lv: [Volume]? }
        var report: [Inner]
    }

    func volumes(_ target: String) async throws -> [Volume] {
        let out = try await runner.execute(LVMCommands.lvs(target))
        guard out.status == 0 else {
            let err = out.standardError
            if err.contains("not found") || err.contains("Failed to find") || err.contains("doesn't exist") {
                throw SnapshotError(.notFound, "\(target): no such volume group or logical volume (\(err.trimmingCharacters(in: .whitespacesAndNewlines)))")
            }
            throw CommandError(argv: out.argv, status: out.status, standardError: err.trimmingCharacters(in: .whitespacesAndNewlines))
        }
        return try JSONDecoder().decode(Report.self, from: Data(out.standardOutput.utf8)).report.flatMap { $0.lv ?? [] }
    }

    func volume(_ path: String) async throws -> Volume {
        guard let v = try await volumes(path).first else { throw SnapshotError(.notFound, "logical volume \(path) does not exist") }
        return v
    }

    // MARK: - Names and tags

    /// The LV name for snapshot `name` of origin `lv`: readable where LVM allows, unique always.
    static func snapshotVolumeName(origin lv: String, snapshot name: String) -> String {
        let safe = String(name.map { $0.isASCII && ($0.isLetter || $0.isNumber || "+_.-".contains($0)) ? $0 : "_" }.prefix(40))
        var hash: UInt32 = 2_166_136_261
        for b in "\(lv)/\(name)".utf8 { hash = (hash ^ UInt32(b)) &* 16_777_619 }
        return "\(lv.prefix(60))-vs-\(safe)-\(String(hash, radix: 16))"
    }

    /// Tags for a snapshot volume: `vmsnap`, the origin, and the snapshot name percent-encoded
    /// into the characters LVM tags allow.
    static func tags(origin: String, snapshot name: String) -> [String] {
        ["vmsnap", "vmsnap.origin=\(encode(origin))", "vmsnap.name=\(encode(name))"]
    }

    static func encode(_ s: String) -> String {
        var out = ""
        for b in s.utf8 {
            let c = Character(UnicodeScalar(b))
            if b < 0x80, c.isLetter || c.isNumber || "+_.-".contains(c) { out.append(c) } else { out += String(format: "%%%02X", b) }
        }
        return out
    }

    static func decode(_ s: String) -> String {
        var bytes: [UInt8] = []
        var i = s.startIndex
        while i < s.endIndex {
            if s[i] == "%", let end = s.index(i, offsetBy: 3, limitedBy: s.endIndex), let b = UInt8(s[s.index(after: i)..<end], radix: 16) {
                bytes.append(b); i = end
            } else { bytes += Array(String(s[i]).utf8); i = s.index(after: i) }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    // MARK: - Inspect and adopt

    public func inspect(locator: String) async throws -> DiskInfo {
        let origin = try await volume(normalize(locator: locator))
        let all = try await volumes(origin.vg_name)
        let snaps = all.filter { $0.origin == origin.lv_name }.map {
            StoredSnapshot(id: $0.path, name: $0.tags.first { $0.hasPrefix("vmsnap.name=") }.map { Self.decode(String($0.dropFirst(12))) } ?? $0.lv_name,
                           createdAt: Date(timeIntervalSince1970: 0), virtualSize: origin.size)
        }
        return DiskInfo(format: origin.isThin ? "lvm-thin" : "lvm", virtualSize: origin.size, snapshots: snaps)
    }

    /// Starts managing an origin volume; snapshot volumes vmsnap made earlier (found by their tags)
    /// are imported, so the metadata can be rebuilt from the storage.
    public func adopt(locator: String) async throws -> DiskLayout {
        let path = normalize(locator: locator)
        guard Self.isVolumeName(path) else {
            throw SnapshotError(.invalidArgument, "\(locator) is not a logical volume name; give it as VG/LV (for example vg0/web)")
        }
        let origin = try await volume(path)
        if origin.isClassicSnapshot || !origin.origin.isEmpty && origin.tags.contains("vmsnap") {
            throw SnapshotError(.unsupported, "\(path) is itself a snapshot of \(origin.vg_name)/\(origin.origin); snapshot the origin volume instead")
        }
        let all = try await volumes(origin.vg_name)
        let mine = "vmsnap.origin=\(Self.encode(origin.lv_name))"
        let snapshots = all.filter { ($0.origin == origin.lv_name || $0.tags.contains(mine)) && $0.tags.contains("vmsnap") }.compactMap { v -> DiskSnapshot? in
            guard let tag = v.tags.first(where: { $0.hasPrefix("vmsnap.name=") }) else { return nil }
            return DiskSnapshot(name: Self.decode(String(tag.dropFirst(12))), kind: .external, image: v.path, virtualSize: origin.size)
        }
        return DiskLayout(disk: DiskRecord(id: path, kind: Self.kind, active: path), snapshots: snapshots, layers: [DiskLayer(image: path, backing: nil)])
    }

    public func state(of layout: DiskLayout) async throws -> DiskState {
        try await volume(layout.disk.active).isOpen ? .live : .offline
    }

    // MARK: - Planning

    /// The copy-on-write size for a classic snapshot of `origin`.
    func cowSize(_ origin: Volume) -> String { settings["cow-size"] ?? "20%ORIGIN" }

    func requireNotOpen(_ v: Volume, _ what: String) throws {
        if v.isOpen {
            throw SnapshotError(.inUse, "\(v.path) is open (by a VM or another process); \(what)")
        }
    }

    public func planCreate(_ request: SnapshotRequest, layout: DiskLayout) async throws -> Plan {
        guard request.kind == .external else { throw SnapshotError.unsupported(Self.kind, Capability(.create, .internal, .offline)) }
        if request.overlayDirectory != nil { throw SnapshotError(.invalidArgument, "--overlay-dir does not apply to LVM: snapshot volumes live in the origin's volume group") }
        let all = try await volumes(String(layout.disk.id.split(separator: "/").first ?? ""))
        guard let origin = all.first(where: { $0.path == layout.disk.id }) else { throw SnapshotError(.notFound, "logical volume \(layout.disk.id) does not exist") }
        let lv = Self.snapshotVolumeName(origin: origin.lv_name, snapshot: request.name)
        let target = "\(origin.vg_name)/\(lv)"
        if all.contains(where: { $0.lv_name == lv }) {
            throw SnapshotError(.alreadyExists, "volume \(target) already exists; pick another snapshot name")
        }
        let tags = Self.tags(origin: origin.lv_name, snapshot: request.name)
        let argv = origin.isThin
            ? LVMCommands.createThinSnapshot(lv, of: origin.path, tags: tags)
            : LVMCommands.createClassicSnapshot(lv, of: origin.path, size: cowSize(origin), tags: tags)
        var result = layout
        result.snapshots.append(DiskSnapshot(name: request.name, kind: .external, image: target, parent: layout.disk.current, description: request.description, virtualSize: origin.size))
        result.disk.current = request.name
        let step = PlanStep("create \(origin.isThin ? "thin" : "classic") snapshot \(target) of \(origin.path)", .run(argv),
                            undo: .backend(name: "remove-if-present", arguments: ["lv": target]))
        return Plan(operation: "create snapshot '\(request.name)' of \(layout.disk.id)", steps: [step], result: result)
    }

    public func planRevert(to name: String, layout: DiskLayout) async throws -> Plan {
        guard let target = layout.snapshot(named: name) else { throw SnapshotError(.notFound, "no snapshot '\(name)' on \(layout.disk.id)") }
        let all = try await volumes(String(layout.disk.id.split(separator: "/").first ?? ""))
        guard let origin = all.first(where: { $0.path == layout.disk.id }) else { throw SnapshotError(.notFound, "logical volume \(layout.disk.id) does not exist") }
        guard let snap = all.first(where: { $0.path == target.image }) else {
            throw SnapshotError(.notFound, "snapshot '\(name)': volume \(target.image) is missing (removed outside vmsnap?); forget it with --metadata-only")
        }
        if snap.isInvalid {
            throw SnapshotError(.invalidImage, "snapshot '\(name)' (\(snap.path)) overflowed its copy-on-write area and is invalid: its data is lost; delete it (a larger cow-size avoids this)")
        }
        try requireNotOpen(snap, "close it before reverting")
        try requireNotOpen(origin, "LVM would defer the merge to the origin's next activation; stop the VM (or use `vmsnap snapshot revert` on the domain) first")
        var result = layout
        result.disk.current = name
        let tags = Self.tags(origin: origin.lv_name, snapshot: name)
        if origin.isThin {
            // A thin merge would cut every other thin snapshot off from the origin, so the origin is
            // replaced instead: renamed aside, re-made as a thin snapshot of the snapshot, then removed.
            let aside = "\(origin.vg_name)/\(origin.lv_name.prefix(100))-vs-reverting"
            let steps = [
                PlanStep("set \(origin.path) aside as \(aside)", .backend(name: "rename-if-present", arguments: ["from": origin.path, "to": aside]),
                         undo: .backend(name: "rename-if-present", arguments: ["from": aside, "to": origin.path])),
                PlanStep("make \(origin.path) a thin snapshot of \(snap.path)",
                         .backend(name: "create-if-absent", arguments: ["lv": origin.path, "argv": LVMCommands.createThinSnapshot(origin.lv_name, of: snap.path, tags: []).joined(separator: "\u{1f}")]),
                         undo: .backend(name: "remove-if-present", arguments: ["lv": origin.path])),
                PlanStep("remove the state after the snapshot (\(aside))", .backend(name: "remove-if-present", arguments: ["lv": aside])),
            ]
            return Plan(operation: "revert \(layout.disk.id) to '\(name)'", steps: steps, pointOfNoReturn: 2, result: result)
        }
        let again = LVMCommands.createClassicSnapshot(snap.lv_name, of: origin.path, size: cowSize(origin), tags: tags)
        let steps = [
            PlanStep("merge \(snap.path) into \(origin.path)", .backend(name: "merge", arguments: ["snapshot": snap.path, "origin": origin.path])),
            PlanStep("take \(snap.path) again so the snapshot stays available", .backend(name: "create-if-absent", arguments: ["lv": snap.path, "argv": again.joined(separator: "\u{1f}")])),
        ]
        return Plan(operation: "revert \(layout.disk.id) to '\(name)'", steps: steps, pointOfNoReturn: 0, result: result)
    }

    public func planDelete(_ name: String, mode: DeleteMode, layout: DiskLayout) async throws -> Plan {
        guard let target = layout.snapshot(named: name) else { throw SnapshotError(.notFound, "no snapshot '\(name)' on \(layout.disk.id)") }
        // Snapshots of an origin are independent copies: removing one changes no other's data,
        // so "merging into children" is reparenting them in the tree.
        var doomed = [target]
        if mode != .merge { doomed = (mode == .children ? [target] : []) + layout.tree.descendants(of: name) }
        let all = try await volumes(String(layout.disk.id.split(separator: "/").first ?? ""))
        for s in doomed {
            if let v = all.first(where: { $0.path == s.image }) { try requireNotOpen(v, "close it before deleting the snapshot") }
        }
        var result = layout
        let names = Set(doomed.map(\.name))
        result.snapshots.removeAll { names.contains($0.name) }
        for i in result.snapshots.indices where result.snapshots[i].parent.map(names.contains) == true {
            result.snapshots[i].parent = target.parent
        }
        if let current = layout.disk.current, names.contains(current) { result.disk.current = mode == .childrenOnly ? name : target.parent }
        let steps = doomed.map { PlanStep("remove \($0.image)", .backend(name: "remove-if-present", arguments: ["lv": $0.image])) }
        return Plan(operation: "delete \(mode == .merge ? "snapshot '\(name)'" : "the subtree of '\(name)'") of \(layout.disk.id)", steps: steps, pointOfNoReturn: 0, result: result)
    }

    // MARK: - Native steps (idempotent)

    public func perform(_ name: String, arguments a: [String: String]) async throws {
        switch name {
        case "remove-if-present":
            guard let lv = a["lv"] else { break }
            if (try? await volume(lv)) != nil { try await runner.run(LVMCommands.remove(lv)) }
            return
        case "merge":
            guard let snap = a["snapshot"], let origin = a["origin"] else { break }
            // Gone already: the merge finished (LVM removes the snapshot when it does).
            guard let v = try? await volume(snap), v.origin.isEmpty == false || v.lv_merging != nil else { return }
            let out = try await runner.run(LVMCommands.merge(snap))
            let stillThere = (try? await volume(snap)) != nil
            if (out.standardOutput + out.standardError).contains("Delaying merge") || stillThere {
                throw SnapshotError(.recoveryNeeded, "LVM deferred the merge of \(snap) into \(origin) until \(origin) is next activated (it is open); the revert completes then: deactivate and activate \(origin) (lvchange -an / -ay), then run `vmsnap recover`")
            }
            return
        case "rename-if-present":
            guard let from = a["from"], let to = a["to"] else { break }
            if (try? await volume(from)) != nil, (try? await volume(to)) == nil {
                try await runner.run(["lvrename", "-q", from, String(to.split(separator: "/").last ?? "")])
            }
            return
        case "create-if-absent":
            guard let lv = a["lv"], let argv = a["argv"] else { break }
            if (try? await volume(lv)) == nil { try await runner.run(argv.components(separatedBy: "\u{1f}")) }
            return
        default: break
        }
        throw SnapshotError(.unsupported, "backend 'lvm' has no native step '\(name)'")
    }

    /// Snapshots that overflowed, are missing, or belong to another origin; CoW areas nearly full.
    public func verify(layout: DiskLayout) async throws -> [String] {
        var problems: [String] = []
        let all = try await volumes(String(layout.disk.id.split(separator: "/").first ?? ""))
        guard let origin = all.first(where: { $0.path == layout.disk.id }) else { return ["origin volume \(layout.disk.id) is missing"] }
        let warn = Double(settings["warn-percent"] ?? "80") ?? 80
        for s in layout.snapshots {
            guard let v = all.first(where: { $0.path == s.image }) else { problems.append("snapshot '\(s.name)': volume \(s.image) is missing"); continue }
            if v.isInvalid { problems.append("snapshot '\(s.name)': \(v.path) overflowed its copy-on-write area; its data is lost") }
            // Thin snapshots keep no origin link once the origin is replaced by a revert: their tag says whose they are.
            if v.origin != origin.lv_name && !v.tags.contains("vmsnap.origin=\(Self.encode(origin.lv_name))") {
                problems.append("snapshot '\(s.name)': \(v.path) is not a snapshot of \(origin.path)")
            }
            if !v.isThin, let fill = v.fill, fill >= warn { problems.append("snapshot '\(s.name)': copy-on-write area \(fill)% full; extend it (lvextend -L +SIZE \(v.path)) before it overflows") }
        }
        return problems
    }

    // MARK: - Data access

    public func createDisk(named name: String, size: UInt64, in pool: BackendPool) async throws -> String {
        guard let vg = pool.options["vg"] ?? settings["vg"] else {
            throw SnapshotError(.invalidArgument, "the lvm backend needs a volume group: pass --set vg=NAME (and thin-pool=POOL for thin volumes)")
        }
        let lvName = name.map { $0.isLetter || $0.isNumber || "+_.-".contains($0) ? $0 : "_" }
        let thinPool = pool.options["thin-pool"] ?? settings["thin-pool"]
        try await runner.run(LVMCommands.createVolume(String(lvName), vg: vg, size: size, thinPool: thinPool))
        return "\(vg)/\(String(lvName))"
    }

    public func destroyDisk(layout: DiskLayout) async throws {
        for s in layout.snapshots { try? await perform("remove-if-present", arguments: ["lv": s.image]) }
        try? await perform("remove-if-present", arguments: ["lv": layout.disk.id])
    }

    func devicePath(_ lv: String) -> String { "/dev/\(lv)" }

    public func write(_ bytes: [UInt8], at offset: UInt64, layout: DiskLayout) async throws {
        let fd = open(devicePath(layout.disk.active), O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SnapshotError(.io, "cannot open \(devicePath(layout.disk.active)) for writing: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, bytes.count, off_t(offset)) }
        guard n == bytes.count, fsync(fd) == 0 else { throw SnapshotError(.io, "short write to \(devicePath(layout.disk.active))") }
    }

    public func read(_ view: DataView, at offset: UInt64, length: Int, layout: DiskLayout) async throws -> [UInt8] {
        var lv = layout.disk.active
        if case .snapshot(let name) = view {
            guard let s = layout.snapshot(named: name) else { throw SnapshotError(.notFound, "no snapshot '\(name)'") }
            lv = s.image
        }
        if !FileManager.default.fileExists(atPath: devicePath(lv)) { try await runner.run(LVMCommands.activate(lv)) }
        let fd = open(devicePath(lv), O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SnapshotError(.io, "cannot open \(devicePath(lv)): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: length)
        let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, length, off_t(offset)) }
        guard n == length else { throw SnapshotError(.io, "short read from \(devicePath(lv))") }
        return buffer
    }

    public func poolInventory(_ pool: BackendPool) async throws -> [String] {
        guard let vg = pool.options["vg"] ?? settings["vg"] else { return [] }
        return try await volumes(vg).map(\.lv_name).sorted()
    }
}
