import Foundation
import SnapshotCore

/// Changed chunks between two thin volumes of one pool, from the pool's own metadata: the kernel
/// is asked for a metadata snapshot (`reserve_metadata_snap`, which commits what it holds), then
/// `thin_delta` compares the two devices' block mappings in it, then the snapshot is released.
/// Classic (copy-on-write) volumes are refused: their exception store says what changed after a
/// snapshot, but not between two of them.
extension LVMBackend {
    public func changes(_ layout: DiskLayout, from snapshot: String, to view: DataView) async throws -> DiskChanges {
        let (base, newerPath, toName) = try layout.changesViews(from: snapshot, to: view)
        let older = try await thinVolume(base.image, disk: layout.disk.id)
        let newer = try await thinVolume(newerPath, disk: layout.disk.id)
        guard older.vg == newer.vg, older.pool == newer.pool else {
            throw SnapshotError(
                .unsupported,
                "\(base.image) and \(newerPath) are in different thin pools (\(older.vg)/\(older.pool), \(newer.vg)/\(newer.pool)): their mappings cannot be compared"
            )
        }
        let xml = try await withMetadataSnapshot(vg: older.vg, pool: older.pool) {
            try await runner.run(
                LVMCommands.thinDelta(older.id, newer.id, metadata: Self.dmPath(older.vg, "\(older.pool)_tmeta"))
            )
            .standardOutput
        }
        let delta = try ThinDelta(xml: xml)
        let chunk = delta.blockSectors * 512
        // Blocks only the older volume maps are not marked zero: a thin volume with an external
        // origin reads unmapped blocks from it.
        let extents = delta.runs.map { ChangedExtent(offset: $0.begin * chunk, length: $0.length * chunk) }
        // The last chunk may reach past a volume whose size is not a multiple of the chunk.
        let clipped = extents.compactMap { e -> ChangedExtent? in
            guard e.offset < newer.size else { return nil }
            return ChangedExtent(offset: e.offset, length: min(e.length, newer.size - e.offset), zero: e.zero)
        }
        return DiskChanges(
            disk: layout.disk.id, from: snapshot, to: toName, virtualSize: newer.size, method: "lvm-thin-delta",
            granularity: chunk, extents: clipped)
    }

    struct ThinVolume {
        var vg: String
        var pool: String
        var id: String
        var size: UInt64
    }

    /// A thin volume's pool and device id (`lvs -o thin_id`); classic volumes are refused.
    func thinVolume(_ path: String, disk: String) async throws -> ThinVolume {
        struct Row: Decodable {
            var vg_name: String
            var pool_lv: String
            var thin_id: String?
            var lv_size: String
        }
        struct Report: Decodable {
            struct Inner: Decodable { var lv: [Row]? }
            var report: [Inner]
        }
        let out = try await runner.execute(LVMCommands.thinIdentity(path))
        guard out.status == 0,
            let row = try JSONDecoder().decode(Report.self, from: Data(out.standardOutput.utf8)).report.first?.lv?.first
        else {
            throw SnapshotError(
                .notFound,
                "\(path) of disk \(disk): no such logical volume (\(out.standardError.trimmingCharacters(in: .whitespacesAndNewlines)))"
            )
        }
        guard !row.pool_lv.isEmpty, let id = row.thin_id, !id.isEmpty, id.allSatisfy(\.isNumber) else {
            throw SnapshotError(
                .unsupported,
                "\(path) of disk \(disk) is a classic (copy-on-write) volume: LVM keeps no map of the chunks that changed between two of its snapshots; thin volumes have one (back this disk up in full)"
            )
        }
        guard let size = UInt64(row.lv_size), size > 0 else {
            throw SnapshotError(
                .invalidArgument, "lvs reported size '\(row.lv_size)' for \(path); cannot count its changes")
        }
        return ThinVolume(vg: row.vg_name, pool: row.pool_lv, id: id, size: size)
    }

    /// Runs `body` while the pool holds a metadata snapshot, and releases it after, whatever
    /// happens. vmsnap processes take turns on a pool (an advisory lock on the pool's device
    /// node); a snapshot another tool holds is not taken over: the error says whose it may be.
    func withMetadataSnapshot<T: Sendable>(vg: String, pool: String, _ body: () async throws -> T) async throws -> T {
        let tpool = Self.dmPath(vg, "\(pool)-tpool")
        let fd = open(tpool, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw SnapshotError(
                .unsupported,
                "thin pool \(vg)/\(pool) is not active (no \(tpool)): activate it (lvchange -ay \(vg)/\(pool)) to compare its volumes"
            )
        }
        defer { close(fd) }  // also drops the lock
        let deadline = Date().addingTimeInterval(60)
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            guard Date() < deadline else {
                throw SnapshotError(
                    .busy, "another vmsnap has held thin pool \(vg)/\(pool)'s metadata snapshot for 60 s; try again")
            }
            try await Task.sleep(for: .milliseconds(50))
        }
        let reserve = try await runner.execute(LVMCommands.poolMessage(tpool, "reserve_metadata_snap"))
        guard reserve.status == 0 else {
            throw SnapshotError(
                .busy,
                "thin pool \(vg)/\(pool) refused a metadata snapshot (\(reserve.standardError.trimmingCharacters(in: .whitespacesAndNewlines))): one is held, by a tool reading the pool's metadata (thin_dump -m, a backup program) or by a vmsnap that was killed while counting changes. Once nothing reads it, `dmsetup message \(tpool) 0 release_metadata_snap` releases it"
            )
        }
        do {
            let result = try await body()
            try await runner.run(LVMCommands.poolMessage(tpool, "release_metadata_snap"))
            return result
        } catch {
            _ = try? await runner.execute(LVMCommands.poolMessage(tpool, "release_metadata_snap"))
            throw error
        }
    }

    /// `/dev/mapper/` name of an LV (or a layer of one): device-mapper doubles the dashes inside
    /// the VG and LV names and joins them with one.
    static func dmPath(_ vg: String, _ lv: String) -> String {
        let esc = { (s: String) in s.replacingOccurrences(of: "-", with: "--") }
        // The layer suffix (`-tpool`) is not escaped.
        if lv.hasSuffix("-tpool") { return "/dev/mapper/\(esc(vg))-\(esc(String(lv.dropLast(6))))-tpool" }
        return "/dev/mapper/\(esc(vg))-\(esc(lv))"
    }
}

/// `thin_delta`'s report: runs of data blocks that differ between two thin devices.
struct ThinDelta {
    enum Kind: String {
        case different
        case rightOnly = "right_only"
        case leftOnly = "left_only"
    }
    struct Run {
        var kind: Kind
        var begin: UInt64
        var length: UInt64
    }
    /// Sectors (512 bytes) per data block: the pool's chunk size.
    var blockSectors: UInt64
    var runs: [Run]

    init(xml: String) throws {
        func attribute(_ name: String, in element: Substring) -> UInt64? {
            guard let r = element.range(of: " \(name)=\"") else { return nil }
            return UInt64(element[r.upperBound...].prefix { $0 != "\"" })
        }
        func bad(_ why: String) -> SnapshotError {
            SnapshotError(.invalidImage, "thin_delta's report cannot be read (\(why)); nothing was used")
        }
        var blockSectors: UInt64?
        var runs: [Run] = []
        var sawDiff = false
        for line in xml.split(whereSeparator: \.isNewline) {
            let element = line.drop { $0 == " " }
            guard element.hasPrefix("<"), !element.hasPrefix("</"), !element.hasPrefix("<?") else { continue }
            let name = element.dropFirst().prefix { $0.isLetter || $0 == "_" }
            switch name {
            case "superblock": blockSectors = attribute("data_block_size", in: element)
            case "diff": sawDiff = true
            case "same": continue
            default:
                guard let kind = Kind(rawValue: String(name)) else { throw bad("unknown element <\(name)>") }
                guard let begin = attribute("begin", in: element), let length = attribute("length", in: element),
                    length > 0
                else { throw bad("<\(name)> without begin and length") }
                runs.append(Run(kind: kind, begin: begin, length: length))
            }
        }
        guard let blockSectors, blockSectors > 0 else { throw bad("no data_block_size") }
        guard sawDiff else { throw bad("no <diff>") }
        self.blockSectors = blockSectors
        self.runs = runs
    }
}
