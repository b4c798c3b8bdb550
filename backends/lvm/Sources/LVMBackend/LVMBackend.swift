import Foundation
import SnapshotCore
import Synchronization

/// The volume group report `state(of:)` read, handed to the plan that follows it in the same
/// operation (the service asks for the state, then plans, under the disk's lock): one in-process
/// `lvs` instead of two. Taken once, and only if fresh; steps never use it.
final class ReportHandOff: Sendable {
    private let slot = Mutex<(vg: String, at: UInt64, rows: [LVMBackend.Volume])?>(nil)

    func put(_ vg: String, _ rows: [LVMBackend.Volume]) {
        slot.withLock { $0 = (vg, DispatchTime.now().uptimeNanoseconds, rows) }
    }

    func take(_ vg: String) -> [LVMBackend.Volume]? {
        slot.withLock { value in
            defer { value = nil }
            guard let v = value, v.vg == vg, DispatchTime.now().uptimeNanoseconds &- v.at < 2_000_000_000 else {
                return nil
            }
            return v.rows
        }
    }
}

/// Disks on LVM logical volumes: classic (copy-on-write) snapshots of thick volumes and thin
/// snapshots of thin volumes. A snapshot is a separate volume while the origin stays active
/// (DESIGN.md's external snapshot); revert merges it into the origin with `lvconvert --merge` and
/// takes it again, so the snapshot stays available. Volumes vmsnap creates carry the tag `vmsnap`
/// and `vmsnap.name=<snapshot name>`, so ownership can be read from the storage alone.
public struct LVMBackend: DiskSnapshotBackend {
    public static let kind: BackendKind = "lvm"
    /// Reports run in-process through liblvm2cmd (`lvm-library=off` runs them as `lvs`/`vgs`
    /// child processes like every other command).
    public static let factory = BackendFactory(kind: kind, settings: settingsSchema) { env in
        LVMBackend(
            runner: env.settings["lvm-library"] == "off" ? env.runner : LVMLibraryRunner(fallback: env.runner),
            settings: env.settings)
    }

    let runner: any CommandRunning
    /// `cow-size`: size of a classic snapshot's copy-on-write area, `20%ORIGIN` by default, or a
    /// size such as `256m`. `vg`, `thin-pool`: where test disks go. `warn-percent`: CoW fill warning.
    let settings: [String: String]
    let handOff = ReportHandOff()

    public init(runner: any CommandRunning = SubprocessRunner(), settings: [String: String] = [:]) {
        self.runner = runner
        self.settings = settings
    }

    public var descriptor: BackendDescriptor {
        BackendDescriptor(
            kind: Self.kind,
            summary:
                "LVM logical volumes: classic (CoW) and thin snapshots through lvcreate / lvconvert --merge / lvremove, offline",
            capabilities: Self.capabilities(notes: [
                "snapshots of an open origin (a running VM's disk) are taken while the domain's vCPUs are paused and QEMU has flushed",
                "a classic snapshot cannot itself be snapshotted; snapshots are always of the origin volume",
                "revert of a classic volume that is open: LVM defers the merge to the origin's next activation; vmsnap starts it, reports it pending (exit status 75) and finishes it (merge, snapshot taken again) on the first command after the volume is closed",
                "revert of an open thin volume is refused: it replaces the volume, which needs it closed",
                "a classic snapshot whose copy-on-write area overflowed is invalid: reported as lost, never reverted to",
            ]),
            settings: Self.settingsSchema, liveSnapshots: .storage, imageFormat: "raw", sourceType: .block,
            tools: ["lvcreate", "lvconvert", "lvremove", "lvrename", "lvchange", "lvextend", "lvs", "vgs"],
            reportsChanges: true)
    }

    /// The settings the backend reads.
    public static let settingsSchema: [SettingSpec] = [
        SettingSpec(
            "cow-size", .text, default: "20%ORIGIN", pattern: "[0-9]+(\\.[0-9]+)?(%ORIGIN|%VG|%FREE|%PVS|[bskmgtpe])?",
            help:
                "a classic snapshot's copy-on-write area: a percentage of the origin or VG (20%ORIGIN) or a size (256m)"
        ),
        SettingSpec(
            "warn-percent", .integer, default: "80", min: 1, max: 100,
            help: "fill of a copy-on-write area or thin pool that `disk check` reports and `--repair` acts on"),
        SettingSpec(
            "extend-percent", .integer, default: "20", min: 1, max: 1000,
            help: "how much `disk check --repair` grows a filling area, as a percentage of its size"),
        SettingSpec(
            "lvm-library", .choice, default: "on", choices: ["on", "off"],
            help: "read LVM reports in-process through liblvm2cmd (on) or run lvs/vgs (off)"),
        SettingSpec(
            "vg", .text, pattern: "[A-Za-z0-9+_.-]+",
            help: "the volume group scratch disks go into (conformance suite, demo)"),
        SettingSpec(
            "thin-pool", .text, pattern: "[A-Za-z0-9+_.-]+",
            help: "the thin pool scratch disks go into; unset for classic volumes"),
    ]

    static func capabilities(notes: [String]) -> CapabilityTable {
        var table = CapabilityTable.all(kinds: [.external], states: [.offline], notes: notes)
        // A snapshot volume is taken or removed without touching the open origin.
        for op in [SnapshotOperation.create, .delete, .deleteSubtree] {
            table.supported.insert(Capability(op, .external, .live))
        }
        // A merge into an open origin waits for its next activation.
        table.deferred.insert(Capability(.revert, .external, .live))
        table.supported.insert(Capability(.revert, .external, .live))
        return table
    }

    /// QEMU opens the origin's device node as a raw disk.
    public func hypervisorDrive(_ layout: DiskLayout) throws -> HypervisorDrive {
        HypervisorDrive(path: "/dev/" + layout.disk.active, format: "raw", liveSnapshots: false, sourceType: .block)
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
        return parts.count == 2
            && parts.allSatisfy { !$0.isEmpty && $0.allSatisfy { $0.isLetter || $0.isNumber || "+_.-".contains($0) } }
    }

    /// Substrings LVM reserves for its internal volumes.
    static let reservedInfixes = [
        "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_imeta", "_iorig", "_mimage", "_mlog", "_pmspare", "_rimage",
        "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig",
    ]

    /// Why LVM would refuse `VG/LV` as a volume name, or nil if it would not.
    static func volumeNameProblem(_ s: String) -> String? {
        guard isVolumeName(s) else {
            return
                "'\(s)' is not a logical volume name: give it as VG/LV, each part made of letters, digits and + _ . - (for example vg0/web)"
        }
        let parts = s.split(separator: "/").map(String.init)
        for part in parts {
            if part.hasPrefix("-") { return "LVM names cannot start with '-' ('\(part)')" }
            if part == "." || part == ".." { return "'\(part)' is not a name LVM allows" }
        }
        if ["snapshot", "pvmove"].contains(parts[1]) || parts[1].hasPrefix("pvmove") {
            return "LVM reserves the name '\(parts[1])'"
        }
        if let infix = reservedInfixes.first(where: { parts[1].contains($0) }) {
            return
                "'\(parts[1])' contains '\(infix)', which LVM reserves for its internal volumes (a pool's data or metadata, a mirror's log)"
        }
        return nil
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
        var lv_active: String?
        var metadata_percent: String?
        var lv_metadata_size: String?
        var vg_free: String?
        var vg_extent_size: String?
        /// A merging snapshot is hidden: LVM shows it as `[name]`.
        var name: String {
            lv_name.hasPrefix("[") && lv_name.hasSuffix("]") ? String(lv_name.dropFirst().dropLast()) : lv_name
        }
        var path: String { "\(vg_name)/\(name)" }
        var attr: [Character] { Array(lv_attr) + Array(repeating: "-", count: max(0, 10 - lv_attr.count)) }
        var isThin: Bool { attr[0] == "V" || !pool_lv.isEmpty }
        /// `s`, or `S` while it merges.
        var isClassicSnapshot: Bool { attr[0] == "s" || attr[0] == "S" }
        /// State `I` (invalid) or `S` (invalid, suspended): a classic snapshot whose copy-on-write
        /// area overflowed.
        var isInvalid: Bool { attr[4] == "I" || attr[4] == "S" }
        var isOpen: Bool { lv_device_open == "open" || attr[5] == "o" }
        var isActive: Bool { lv_active == "active" || attr[4] == "a" }
        /// An origin with a merge under way or deferred (`O`), or the merging snapshot (`S`).
        var isMerging: Bool { lv_merging == "merging" || attr[0] == "O" || attr[0] == "S" }
        var fill: Double? { Double(data_percent) }
        var metadataFill: Double? { metadata_percent.flatMap(Double.init) }
        var metadataSize: UInt64 { lv_metadata_size.flatMap { UInt64($0) } ?? 0 }
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
                throw SnapshotError(
                    .notFound,
                    "\(target): no such volume group or logical volume (\(err.trimmingCharacters(in: .whitespacesAndNewlines)))"
                )
            }
            throw CommandError(
                argv: out.argv, status: out.status, standardError: err.trimmingCharacters(in: .whitespacesAndNewlines))
        }
        return try JSONDecoder().decode(Report.self, from: Data(out.standardOutput.utf8)).report.flatMap { $0.lv ?? [] }
    }

    /// Free space and extent size of a volume group (`vgs`).
    func volumeGroup(_ vg: String, from row: Volume? = nil) async throws -> (free: UInt64, extentSize: UInt64) {
        // The lvs report carries its VG's columns.
        if let row, let free = row.vg_free.flatMap({ UInt64($0) }),
            let extent = row.vg_extent_size.flatMap({ UInt64($0) })
        {
            return (free, extent)
        }
        struct Row: Decodable {
            var vg_free: String
            var vg_extent_size: String
        }
        struct VGReport: Decodable {
            struct Inner: Decodable { var vg: [Row]? }
            var report: [Inner]
        }
        let out = try await runner.execute(LVMCommands.vgs(vg))
        guard out.status == 0,
            let row = try JSONDecoder().decode(VGReport.self, from: Data(out.standardOutput.utf8)).report.first?.vg?
                .first,
            let free = UInt64(row.vg_free), let extent = UInt64(row.vg_extent_size)
        else {
            throw SnapshotError(
                .notFound,
                "volume group \(vg): vgs gave no report (\(out.standardError.trimmingCharacters(in: .whitespacesAndNewlines)))"
            )
        }
        return (free, extent)
    }

    func volume(_ path: String) async throws -> Volume {
        guard let v = try await volumes(path).first else {
            throw SnapshotError(.notFound, "logical volume \(path) does not exist")
        }
        return v
    }

    // MARK: - Names and tags

    /// The LV name for snapshot `name` of origin `lv`: readable where LVM allows, unique always.
    static func snapshotVolumeName(origin lv: String, snapshot name: String) -> String {
        // No `_` at all: LVM reserves names containing `_tmeta`, `_rimage`, `_mlog` and others.
        let safe = String(
            name.map { $0.isASCII && ($0.isLetter || $0.isNumber || "+.-".contains($0)) ? $0 : "-" }.prefix(40))
        var hash: UInt32 = 2_166_136_261
        for b in "\(lv)/\(name)".utf8 { hash = (hash ^ UInt32(b)) &* 16_777_619 }
        return "\(lv.prefix(60))-vs-\(safe)-\(String(hash, radix: 16))"
    }

    /// Tags for a snapshot volume: `vmsnap`, the origin, and the snapshot name encoded into the
    /// characters LVM tags allow (letters, digits, `+_.-` as they are; any other byte as `:XX`,
    /// since LVM refuses `%` in a tag).
    static func tags(origin: String, snapshot name: String) -> [String] {
        ["vmsnap", "vmsnap.origin=\(encode(origin))", "vmsnap.name=\(encode(name))"]
    }

    static func encode(_ s: String) -> String {
        var out = ""
        for b in s.utf8 {
            let c = Character(UnicodeScalar(b))
            if b < 0x80, c.isLetter || c.isNumber || "+_.-".contains(c) {
                out.append(c)
            } else {
                out += String(format: ":%02X", b)
            }
        }
        return out
    }

    static func decode(_ s: String) -> String {
        var bytes: [UInt8] = []
        var i = s.startIndex
        while i < s.endIndex {
            if s[i] == ":", let end = s.index(i, offsetBy: 3, limitedBy: s.endIndex),
                let b = UInt8(s[s.index(after: i)..<end], radix: 16)
            {
                bytes.append(b)
                i = end
            } else {
                bytes += Array(String(s[i]).utf8)
                i = s.index(after: i)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    // MARK: - Inspect and adopt

    public func inspect(locator: String) async throws -> DiskInfo {
        let origin = try await volume(normalize(locator: locator))
        let all = try await volumes(origin.vg_name)
        let snaps = all.filter { $0.origin == origin.lv_name }.map {
            StoredSnapshot(
                id: $0.path,
                name: $0.tags.first { $0.hasPrefix("vmsnap.name=") }.map { Self.decode(String($0.dropFirst(12))) }
                    ?? $0.lv_name,
                createdAt: Date(timeIntervalSince1970: 0), virtualSize: origin.size)
        }
        return DiskInfo(format: origin.isThin ? "lvm-thin" : "lvm", virtualSize: origin.size, snapshots: snaps)
    }

    /// Starts managing an origin volume; snapshot volumes vmsnap made earlier (found by their tags)
    /// are imported, so the metadata can be rebuilt from the storage.
    public func adopt(locator: String) async throws -> DiskLayout {
        let path = normalize(locator: locator)
        if let problem = Self.volumeNameProblem(path) { throw SnapshotError(.invalidName, problem) }
        let origin = try await volume(path)
        if origin.isClassicSnapshot || !origin.origin.isEmpty && origin.tags.contains("vmsnap") {
            throw SnapshotError(
                .unsupported,
                "\(path) is itself a snapshot of \(origin.vg_name)/\(origin.origin), not an origin; snapshot \(origin.vg_name)/\(origin.origin) instead"
            )
        }
        switch origin.attr[0] {
        case "t":
            throw SnapshotError(
                .unsupported, "\(path) is a thin pool, not a volume a VM uses; snapshot the thin volumes in it")
        case "-", "o", "O", "V", "r", "R", "m", "M", "C": break
        default:
            throw SnapshotError(
                .unsupported,
                "\(path) is an internal or special volume (lv_attr \(origin.lv_attr)), not one vmsnap can snapshot; give the volume the VM uses"
            )
        }
        let all = try await volumes(origin.vg_name)
        let mine = "vmsnap.origin=\(Self.encode(origin.lv_name))"
        let snapshots = all.filter {
            ($0.origin == origin.lv_name || $0.tags.contains(mine)) && $0.tags.contains("vmsnap")
        }.compactMap { v -> DiskSnapshot? in
            guard let tag = v.tags.first(where: { $0.hasPrefix("vmsnap.name=") }) else { return nil }
            return DiskSnapshot(
                name: Self.decode(String(tag.dropFirst(12))), kind: .external, image: v.path, virtualSize: origin.size)
        }
        return DiskLayout(
            disk: DiskRecord(id: path, kind: Self.kind, active: path), snapshots: snapshots,
            layers: [DiskLayer(image: path, backing: nil)])
    }

    public func state(of layout: DiskLayout) async throws -> DiskState {
        let vg = Self.vgName(layout.disk.active)
        let all = try await volumes(vg)
        guard let v = all.first(where: { $0.path == layout.disk.active }) else {
            throw SnapshotError(.notFound, "logical volume \(layout.disk.active) does not exist")
        }
        handOff.put(vg, all)
        return v.isOpen ? .live : .offline
    }

    static func vgName(_ path: String) -> String { String(path.split(separator: "/").first ?? "") }

    /// The VG's volumes for planning: the report `state(of:)` just read, or a new one.
    func planningReport(_ layout: DiskLayout) async throws -> [Volume] {
        let vg = Self.vgName(layout.disk.id)
        if let rows = handOff.take(vg) { return rows }
        return try await volumes(vg)
    }

    // MARK: - Planning

    /// The copy-on-write size for a classic snapshot: `cow-size`, a percentage (`20%ORIGIN`, the
    /// default, or of the VG: `%VG`, `%FREE`, `%PVS`) or a size (`256m`, `2g`, `1048576b`).
    func cowSize() throws -> String {
        let value = settings["cow-size"] ?? "20%ORIGIN"
        guard Self.parseCowSize(value) != nil else {
            throw SnapshotError(
                .invalidArgument,
                "setting cow-size=\(value) is not a size LVM understands: give a percentage of the origin (20%ORIGIN) or a size with a unit (256m, 2g)"
            )
        }
        return value
    }

    /// `cow-size` as (number, unit): unit is a percent suffix (`%ORIGIN`) or a size letter.
    static func parseCowSize(_ s: String) -> (Double, String)? {
        let lower = s.lowercased()
        for suffix in ["%origin", "%vg", "%free", "%pvs"] where lower.hasSuffix(suffix) {
            guard let n = Double(lower.dropLast(suffix.count)), n > 0, n <= 100 else { return nil }
            return (n, suffix)
        }
        let units = "bskmgtpe"
        var number = Substring(lower)
        var unit = "m"  // LVM's default unit
        if let last = lower.last, units.contains(last) {
            unit = String(last)
            number = lower.dropLast()
        }
        guard let n = Double(number), n > 0 else { return nil }
        return (n, unit)
    }

    /// The bytes a classic snapshot of `origin` reserves, where the setting says (nil for VG-relative ones).
    func cowBytes(_ origin: Volume) throws -> UInt64? {
        guard let (n, unit) = Self.parseCowSize(try cowSize()) else { return nil }
        let shifts: [String: Double] = [
            "b": 1, "s": 512, "k": 0x1p10, "m": 0x1p20, "g": 0x1p30, "t": 0x1p40, "p": 0x1p50, "e": 0x1p60,
        ]
        let bytes: Double
        if unit == "%origin" {
            bytes = Double(origin.size) * n / 100
        } else if let m = shifts[unit] {
            bytes = n * m
        } else {
            return nil
        }
        // LVM caps a copy-on-write area near the origin's size.
        return min(UInt64(bytes.rounded(.up)), origin.size)
    }

    /// `warn-percent` (default 80): fill at which copy-on-write areas and thin pools are reported
    /// and `--repair` grows them. `extend-percent` (default 20): how much `--repair` adds, as a
    /// percentage of the current size.
    func percentSetting(_ key: String, default value: Double, range: ClosedRange<Double>) throws -> Double {
        guard let raw = settings[key] else { return value }
        guard let v = Double(raw.hasSuffix("%") ? String(raw.dropLast()) : raw), range.contains(v) else {
            throw SnapshotError(
                .invalidArgument,
                "setting \(key)=\(raw) must be a number from \(Int(range.lowerBound)) to \(Int(range.upperBound))")
        }
        return v
    }
    func warnPercent() throws -> Double { try percentSetting("warn-percent", default: 80, range: 1...100) }
    func extendPercent() throws -> Double { try percentSetting("extend-percent", default: 20, range: 1...1000) }

    static func bytesText(_ n: UInt64) -> String {
        n >= 1 << 30
            ? String(format: "%.1f GiB", Double(n) / Double(1 << 30))
            : n >= 1 << 20 ? String(format: "%.1f MiB", Double(n) / Double(1 << 20)) : "\(n) B"
    }

    /// Refuses to plan against an origin with a merge vmsnap did not start (it completes at the
    /// origin's next activation and blocks new snapshots until then).
    func requireNoForeignMerge(_ origin: Volume) throws {
        if origin.isMerging {
            throw SnapshotError(
                .conflict,
                "a snapshot merge into \(origin.path) is pending (started outside vmsnap); LVM finishes it when \(origin.path) is next activated and allows no new snapshot until then: close it and run lvchange -an then -ay \(origin.path)"
            )
        }
    }

    /// The thin pool row of a thin origin, from the same report.
    func thinPool(of origin: Volume, in all: [Volume]) -> Volume? {
        origin.pool_lv.isEmpty ? nil : all.first { $0.name == origin.pool_lv }
    }

    func requireNotOpen(_ v: Volume, _ what: String) throws {
        if v.isOpen {
            throw SnapshotError(.inUse, "\(v.path) is open (by a VM or another process); \(what)")
        }
    }

    public func planCreate(_ request: SnapshotRequest, layout: DiskLayout) async throws -> Plan {
        guard request.kind == .external else {
            throw SnapshotError.unsupported(Self.kind, Capability(.create, .internal, .offline))
        }
        if request.overlayDirectory != nil {
            throw SnapshotError(
                .invalidArgument,
                "--overlay-dir does not apply to LVM: snapshot volumes live in the origin's volume group")
        }
        let all = try await planningReport(layout)
        guard let origin = all.first(where: { $0.path == layout.disk.id }) else {
            throw SnapshotError(.notFound, "logical volume \(layout.disk.id) does not exist")
        }
        let lv = Self.snapshotVolumeName(origin: origin.lv_name, snapshot: request.name)
        let target = "\(origin.vg_name)/\(lv)"
        if all.contains(where: { $0.lv_name == lv }) {
            throw SnapshotError(.alreadyExists, "volume \(target) already exists; pick another snapshot name")
        }
        try requireNoForeignMerge(origin)
        let tags = Self.tags(origin: origin.lv_name, snapshot: request.name)
        var notes: [String] = []
        let argv: [String]
        if origin.isThin {
            if let pool = thinPool(of: origin, in: all) {
                let data = pool.fill ?? 0, meta = pool.metadataFill ?? 0
                if data >= 100 || meta >= 100 {
                    throw SnapshotError(
                        .noSpace,
                        "thin pool \(pool.path) is full (data \(pool.data_percent)%, metadata \(pool.metadata_percent ?? "?")%): \(origin.path) could not be written after a snapshot. Extend the pool (lvextend -L +SIZE \(pool.path), or `vmsnap disk check --repair \(origin.path)`) or free space in it first"
                    )
                }
                let warn = try warnPercent()
                if max(data, meta) >= warn {
                    notes.append(
                        "thin pool \(pool.path) is \(String(format: "%.0f", max(data, meta)))% full (\(data >= meta ? "data" : "metadata")); extend it before it fills (`vmsnap disk check --repair \(origin.path)`)"
                    )
                }
            }
            argv = LVMCommands.createThinSnapshot(lv, of: origin.path, tags: tags)
        } else {
            let size = try cowSize()
            if let needed = try cowBytes(origin) {
                let vg = try await volumeGroup(origin.vg_name, from: origin)
                // LVM allocates whole extents.
                let extents = (needed + vg.extentSize - 1) / max(vg.extentSize, 1)
                if extents * vg.extentSize > vg.free {
                    throw SnapshotError(
                        .noSpace,
                        "volume group \(origin.vg_name) has \(Self.bytesText(vg.free)) free; the copy-on-write area of this snapshot needs \(Self.bytesText(extents * vg.extentSize)) (cow-size=\(size)). Make free space in the VG (vgextend, or delete snapshots), or pass a smaller --set cow-size=SIZE"
                    )
                }
            }
            argv = LVMCommands.createClassicSnapshot(lv, of: origin.path, size: size, tags: tags)
        }
        var result = layout
        result.snapshots.append(
            DiskSnapshot(
                name: request.name, kind: .external, image: target, parent: layout.disk.current,
                description: request.description, virtualSize: origin.size))
        result.disk.current = request.name
        let step = PlanStep(
            "create \(origin.isThin ? "thin" : "classic") snapshot \(target) of \(origin.path)", .run(argv),
            undo: .backend(name: "remove-if-present", arguments: ["lv": target]))
        return Plan(
            operation: "create snapshot '\(request.name)' of \(layout.disk.id)", steps: [step], result: result,
            notes: notes)
    }

    public func planRevert(to name: String, layout: DiskLayout) async throws -> Plan {
        guard let target = layout.snapshot(named: name) else {
            throw SnapshotError(.notFound, "no snapshot '\(name)' on \(layout.disk.id)")
        }
        let all = try await planningReport(layout)
        guard let origin = all.first(where: { $0.path == layout.disk.id }) else {
            throw SnapshotError(.notFound, "logical volume \(layout.disk.id) does not exist")
        }
        guard let snap = all.first(where: { $0.path == target.image }) else {
            throw SnapshotError(
                .notFound,
                "snapshot '\(name)': volume \(target.image) is missing (removed outside vmsnap?); forget it with --metadata-only"
            )
        }
        if snap.isInvalid {
            throw SnapshotError(
                .invalidImage,
                "snapshot '\(name)' (\(snap.path)) overflowed its copy-on-write area and is invalid: its data is lost; delete it (a larger cow-size avoids this)"
            )
        }
        try requireNotOpen(snap, "close it before reverting")
        try requireNoForeignMerge(origin)
        var result = layout
        result.disk.current = name
        let tags = Self.tags(origin: origin.lv_name, snapshot: name)
        if origin.isThin {
            try requireNotOpen(
                origin,
                "a thin revert replaces the volume, which needs it closed: stop the VM (or revert the domain with `vmsnap snapshot revert`) first. (Classic volumes instead start a merge LVM finishes at the next activation.)"
            )
            // A thin merge would cut every other thin snapshot off from the origin, so the origin is
            // replaced instead: renamed aside, re-made as a thin snapshot of the snapshot, then removed.
            let aside = "\(origin.vg_name)/\(origin.lv_name.prefix(100))-vs-reverting"
            let steps = [
                PlanStep(
                    "set \(origin.path) aside as \(aside)",
                    .backend(name: "rename-if-present", arguments: ["from": origin.path, "to": aside]),
                    undo: .backend(name: "rename-if-present", arguments: ["from": aside, "to": origin.path])),
                PlanStep(
                    "make \(origin.path) a thin snapshot of \(snap.path)",
                    .backend(name: "thin-snapshot-if-absent", arguments: ["lv": origin.path, "of": snap.path]),
                    undo: .backend(name: "remove-if-present", arguments: ["lv": origin.path])),
                PlanStep(
                    "remove the state after the snapshot (\(aside))",
                    .backend(name: "remove-if-present", arguments: ["lv": aside])),
            ]
            return Plan(
                operation: "revert \(layout.disk.id) to '\(name)'", steps: steps, pointOfNoReturn: 2, result: result)
        }
        // Taken again with the copy-on-write size it had (it may have been grown).
        let tagList = String(decoding: try JSONEncoder().encode(tags), as: UTF8.self)
        var notes: [String] = []
        if origin.isOpen {
            notes.append(
                "\(origin.path) is open: LVM defers the merge until its next activation, so the revert will be pending")
        }
        let steps = [
            PlanStep(
                "merge \(snap.path) into \(origin.path)",
                .backend(name: "merge", arguments: ["snapshot": snap.path, "origin": origin.path])),
            PlanStep(
                "take \(snap.path) again so the snapshot stays available",
                .backend(
                    name: "classic-snapshot-if-absent",
                    arguments: ["lv": snap.path, "of": origin.path, "size": "\(snap.size)b", "tags": tagList])),
        ]
        return Plan(
            operation: "revert \(layout.disk.id) to '\(name)'", steps: steps, pointOfNoReturn: 0, result: result,
            notes: notes)
    }

    public func planDelete(_ name: String, mode: DeleteMode, layout: DiskLayout) async throws -> Plan {
        guard let target = layout.snapshot(named: name) else {
            throw SnapshotError(.notFound, "no snapshot '\(name)' on \(layout.disk.id)")
        }
        // Snapshots of an origin are independent copies: removing one changes no other's data,
        // so "merging into children" is reparenting them in the tree.
        var doomed = [target]
        if mode != .merge { doomed = (mode == .children ? [target] : []) + layout.tree.descendants(of: name) }
        let all = try await planningReport(layout)
        for s in doomed {
            if let v = all.first(where: { $0.path == s.image }) {
                try requireNotOpen(v, "close it before deleting the snapshot")
            }
        }
        var result = layout
        let names = Set(doomed.map(\.name))
        result.snapshots.removeAll { names.contains($0.name) }
        for i in result.snapshots.indices where result.snapshots[i].parent.map(names.contains) == true {
            result.snapshots[i].parent = target.parent
        }
        if let current = layout.disk.current, names.contains(current) {
            result.disk.current = mode == .childrenOnly ? name : target.parent
        }
        let steps = doomed.map {
            PlanStep("remove \($0.image)", .backend(name: "remove-if-present", arguments: ["lv": $0.image]))
        }
        return Plan(
            operation:
                "delete \(mode == .merge ? "snapshot '\(name)'" : "the subtree of '\(name)'") of \(layout.disk.id)",
            steps: steps, pointOfNoReturn: 0, result: result)
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
            try await merge(snap, into: origin)
            return
        case "rename-if-present":
            guard let from = a["from"], let to = a["to"] else { break }
            if (try? await volume(from)) != nil, (try? await volume(to)) == nil {
                try await runner.run(["lvrename", "-q", from, String(to.split(separator: "/").last ?? "")])
            }
            return
        case "classic-snapshot-if-absent":
            // Built here from the journaled values, each checked: the journal never supplies a command.
            guard let lv = a["lv"], let of = a["of"], let size = a["size"], let name = lv.split(separator: "/").last,
                size.range(of: "^[0-9]+b$", options: .regularExpression) != nil,
                let tags = try? JSONDecoder().decode([String].self, from: Data((a["tags"] ?? "[]").utf8)),
                tags.allSatisfy({ $0.range(of: "^[A-Za-z0-9_+.:=/-]+$", options: .regularExpression) != nil })
            else { break }
            if (try? await volume(lv)) == nil {
                try await runner.run(LVMCommands.createClassicSnapshot(String(name), of: of, size: size, tags: tags))
            }
            return
        case "thin-snapshot-if-absent":
            // The command is built here from the volume names, never taken from the journal.
            guard let lv = a["lv"], let of = a["of"], let name = lv.split(separator: "/").last else { break }
            if (try? await volume(lv)) == nil {
                try await runner.run(LVMCommands.createThinSnapshot(String(name), of: of, tags: []))
            }
            return
        default: break
        }
        throw SnapshotError(.unsupported, "backend 'lvm' has no native step '\(name)'")
    }

    /// Merges a classic snapshot into its origin, idempotently: done when the snapshot is gone
    /// and the origin no longer merges. LVM defers the merge while the origin is open; then this
    /// throws `.pending`, and a later run (once the origin is closed) reactivates the origin, which
    /// starts the merge, and waits for it.
    func merge(_ snap: String, into origin: String) async throws {
        var o = try await volume(origin)
        if !o.isMerging {
            // Gone and not merging: the merge finished (LVM removes the snapshot when it does).
            guard (try? await volume(snap)) != nil else { return }
            try await runner.run(LVMCommands.merge(snap))
            o = try await volume(origin)
            if !o.isMerging { return }
        }
        if o.isOpen {
            throw SnapshotError(
                .pending,
                "LVM deferred the merge of \(snap) into \(origin) because \(origin) is open (a running VM or another process); it merges when \(origin) is next activated. Until then \(origin) keeps its current data, and whatever is written to it meanwhile is discarded by the merge. Close it (stop the VM), then run `vmsnap recover` (or any vmsnap command on the disk): vmsnap reactivates the volume, waits for the merge and takes the snapshot again"
            )
        }
        let wasActive = o.isActive
        if wasActive { try await runner.run(LVMCommands.deactivate(origin)) }
        try await runner.run(LVMCommands.activateMerging(origin))
        // The kernel merges; LVM's poller drops the snapshot from the metadata when it is done.
        // Wait while it makes progress; ask again now and then in case no poller runs.
        var lastProgress = Date(), lastFill = o.fill, nudged = Date()
        while true {
            o = try await volume(origin)
            if !o.isMerging { break }
            if o.fill != lastFill {
                lastFill = o.fill
                lastProgress = Date()
            }
            if Date().timeIntervalSince(lastProgress) > 300 {
                throw SnapshotError(
                    .commandFailed,
                    "the merge of \(snap) into \(origin) made no progress for 5 minutes (\(o.data_percent)% left); check `lvs -a \(origin)` and the kernel log, then run `vmsnap recover`"
                )
            }
            if Date().timeIntervalSince(nudged) > 5 {
                try await runner.run(LVMCommands.activateMerging(origin))
                nudged = Date()
            }
            try await Task.sleep(nanoseconds: 200_000_000)
        }
        if !wasActive { try await runner.run(LVMCommands.deactivate(origin)) }
    }

    /// Grows copy-on-write areas and thin pools filled past `warn-percent` by `extend-percent`
    /// of their size. Guest data is untouched; an overflowed snapshot cannot be saved.
    public func maintain(layout: DiskLayout) async throws -> [String] {
        let warn = try warnPercent(), grow = try extendPercent()
        var actions: [String] = []
        let vg = String(layout.disk.id.split(separator: "/").first ?? "")
        let all = try await volumes(vg)
        guard let origin = all.first(where: { $0.path == layout.disk.id }) else {
            throw SnapshotError(.notFound, "logical volume \(layout.disk.id) does not exist")
        }
        func extend(_ argv: [String], _ what: String) async throws {
            let out = try await runner.execute(argv)
            guard out.status == 0 else {
                let err = out.standardError.trimmingCharacters(in: .whitespacesAndNewlines)
                if err.contains("nsufficient") || err.contains("free space") {
                    throw SnapshotError(
                        .noSpace,
                        "cannot grow \(what): volume group \(vg) has too little free space (\(err)); add a physical volume (vgextend) or delete snapshots",
                        cause: nil)
                }
                throw CommandError(argv: argv, status: out.status, standardError: err)
            }
        }
        for s in layout.snapshots {
            guard let v = all.first(where: { $0.path == s.image }), v.isClassicSnapshot, !v.isInvalid,
                let fill = v.fill, fill >= warn
            else { continue }
            let bytes = max(UInt64((Double(v.size) * grow / 100).rounded(.up)), 1)
            try await extend(LVMCommands.extend(v.path, bytes: bytes), "the copy-on-write area of '\(s.name)'")
            let after = try await volume(v.path)
            actions.append(
                "grew the copy-on-write area of snapshot '\(s.name)' (\(v.path)) from \(Self.bytesText(v.size)) to \(Self.bytesText(after.size)): it was \(v.data_percent)% full, now \(after.data_percent)%"
            )
        }
        if let pool = thinPool(of: origin, in: all) {
            if let fill = pool.fill, fill >= warn {
                try await extend(
                    LVMCommands.extend(pool.path, bytes: max(UInt64((Double(pool.size) * grow / 100).rounded(.up)), 1)),
                    "thin pool \(pool.path)")
                let after = try await volume(pool.path)
                actions.append(
                    "grew thin pool \(pool.path) from \(Self.bytesText(pool.size)) to \(Self.bytesText(after.size)): data was \(pool.data_percent)% full, now \(after.data_percent)%"
                )
            }
            if let fill = pool.metadataFill, fill >= warn, pool.metadataSize > 0 {
                try await extend(
                    LVMCommands.extendPoolMetadata(
                        pool.path, bytes: max(UInt64((Double(pool.metadataSize) * grow / 100).rounded(.up)), 1)),
                    "the metadata of thin pool \(pool.path)")
                let after = try await volume(pool.path)
                actions.append(
                    "grew the metadata of thin pool \(pool.path) from \(Self.bytesText(pool.metadataSize)) to \(Self.bytesText(after.metadataSize)): it was \(pool.metadata_percent ?? "?")% full, now \(after.metadata_percent ?? "?")%"
                )
            }
        }
        return actions
    }

    /// Snapshots that overflowed, are missing, or belong to another origin; CoW areas nearly full.
    public func verify(layout: DiskLayout) async throws -> [String] {
        var problems: [String] = []
        let all = try await volumes(String(layout.disk.id.split(separator: "/").first ?? ""))
        guard let origin = all.first(where: { $0.path == layout.disk.id }) else {
            return ["origin volume \(layout.disk.id) is missing"]
        }
        let warn = try warnPercent()
        if origin.isMerging {
            problems.append(
                "a snapshot merge into \(origin.path) is pending; it finishes when \(origin.path) is next activated")
        }
        if let pool = thinPool(of: origin, in: all) {
            for (what, fill) in [("data", pool.fill), ("metadata", pool.metadataFill)] {
                if let fill, fill >= warn {
                    problems.append(
                        "thin pool \(pool.path): \(what) \(fill)% full; extend it (`vmsnap disk check --repair \(origin.path)`, or lvextend) before it fills and writes fail"
                    )
                }
            }
        }
        for s in layout.snapshots {
            guard let v = all.first(where: { $0.path == s.image }) else {
                problems.append("snapshot '\(s.name)': volume \(s.image) is missing")
                continue
            }
            if v.isInvalid {
                problems.append("snapshot '\(s.name)': \(v.path) overflowed its copy-on-write area; its data is lost")
            }
            // Thin snapshots keep no origin link once the origin is replaced by a revert: their tag says whose they are.
            if v.origin != origin.lv_name && !v.tags.contains("vmsnap.origin=\(Self.encode(origin.lv_name))") {
                problems.append("snapshot '\(s.name)': \(v.path) is not a snapshot of \(origin.path)")
            }
            if !v.isThin, !v.isInvalid, let fill = v.fill, fill >= warn {
                problems.append(
                    "snapshot '\(s.name)': copy-on-write area \(fill)% full; grow it (`vmsnap disk check --repair \(layout.disk.id)`, or lvextend -L +SIZE \(v.path)) before it overflows and the snapshot is lost"
                )
            }
        }
        return problems
    }

    // MARK: - Data access

    public func createDisk(named name: String, size: UInt64, in pool: BackendPool) async throws -> String {
        guard let vg = pool.options["vg"] ?? settings["vg"] else {
            throw SnapshotError(
                .invalidArgument,
                "the lvm backend needs a volume group: pass --set vg=NAME (and thin-pool=POOL for thin volumes)")
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
        guard fd >= 0 else {
            throw SnapshotError(
                .io, "cannot open \(devicePath(layout.disk.active)) for writing: \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, bytes.count, off_t(offset)) }
        guard n == bytes.count, fsync(fd) == 0 else {
            throw SnapshotError(.io, "short write to \(devicePath(layout.disk.active))")
        }
    }

    public func read(_ view: DataView, at offset: UInt64, length: Int, layout: DiskLayout) async throws -> [UInt8] {
        var lv = layout.disk.active
        if case .snapshot(let name) = view {
            guard let s = layout.snapshot(named: name) else { throw SnapshotError(.notFound, "no snapshot '\(name)'") }
            lv = s.image
        }
        if !FileManager.default.fileExists(atPath: devicePath(lv)) { try await runner.run(LVMCommands.activate(lv)) }
        let fd = open(devicePath(lv), O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw SnapshotError(.io, "cannot open \(devicePath(lv)): \(String(cString: strerror(errno)))")
        }
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
