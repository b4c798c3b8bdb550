import Foundation
import SnapshotCore

/// qcow2's persistent dirty bitmaps, offline: one per checkpoint in the active image, added and
/// removed with `qemu-img bitmap`, listed from `qemu-img info`. While a guest runs, QEMU keeps
/// them (the domain layer goes through the hypervisor driver then).
extension Qcow2Backend {
    public var changeTracking: ChangeTracking { .imageBitmaps }

    public func bitmaps(_ layout: DiskLayout, layer: String?) async throws -> [DirtyBitmap] {
        try await imageBitmaps(layer ?? layout.disk.active)
    }

    public func addBitmap(_ name: String, layout: DiskLayout) async throws {
        try await addBitmap(name, image: layout.disk.active)
    }

    public func removeBitmap(_ name: String, layout: DiskLayout) async throws {
        try await removeBitmap(name, image: layout.disk.active)
    }

    func imageBitmaps(_ image: String) async throws -> [DirtyBitmap] {
        // The header says when there are none: no `qemu-img info`, whose cost grows with the
        // image's snapshot table (about 100 ms at 400 snapshots).
        if let header = try? Qcow2Image(path: image), header.bitmapCount == 0 { return [] }
        return try Self.parseBitmaps(try await runner.run(Qcow2Commands.info(image)).standardOutput, image: image)
    }

    func addBitmap(_ name: String, image: String) async throws {
        if try await imageBitmaps(image).contains(where: { $0.name == name }) { return }
        try await runner.run(Qcow2Commands.addBitmap(name, image: image))
    }

    func removeBitmap(_ name: String, image: String) async throws {
        guard try await imageBitmaps(image).contains(where: { $0.name == name }) else { return }
        try await runner.run(Qcow2Commands.removeBitmap(name, image: image))
    }

    /// Each persistent bitmap of `from` merged (a union, so repeating it changes nothing) into
    /// the bitmap of the same name in `into`, added there first if missing.
    func mergeBitmaps(from: String, into: String) async throws {
        for b in try await imageBitmaps(from) where !b.inconsistent {
            try await addBitmap(b.name, image: into)
            try await runner.run(Qcow2Commands.mergeBitmap(b.name, from: from, into: into))
        }
    }

    /// A new overlay records the guest's writes under each name its backing records, so a
    /// checkpoint taken before the snapshot still says what changed since (the union of its name
    /// down the chain). Idempotent.
    func carryBitmaps(from backing: String, to overlay: String) async throws {
        for b in try await imageBitmaps(backing) where b.recording && !b.inconsistent {
            try await addBitmap(b.name, image: overlay)
        }
    }

    /// The bitmaps in `qemu-img info --output=json`: `auto` means recording, `in-use` that a
    /// QEMU which had the image open never stored the bitmap (it may miss writes).
    static func parseBitmaps(_ json: String, image: String) throws -> [DirtyBitmap] {
        guard let top = try? JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any] else {
            throw SnapshotError(.invalidImage, "qemu-img info of \(image) is not the JSON it should print")
        }
        let data = (top["format-specific"] as? [String: Any])?["data"] as? [String: Any]
        let list = data?["bitmaps"] as? [[String: Any]] ?? []
        return list.compactMap { entry in
            guard let name = entry["name"] as? String else { return nil }
            let flags = entry["flags"] as? [String] ?? []
            return DirtyBitmap(
                name: name, granularity: (entry["granularity"] as? NSNumber)?.uint64Value ?? 0, persistent: true,
                recording: flags.contains("auto"), inconsistent: flags.contains("in-use"))
        }
    }
}
