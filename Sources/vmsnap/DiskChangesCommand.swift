import ArgumentParser
import Foundation
import SnapshotCore

/// `vmsnap disk changes DISK --from SNAP [--to SNAP]`: which extents differ between a snapshot
/// and a newer view of the disk, from the storage's own metadata (RBD's diff, VHD's sector
/// bitmaps): what an incremental copy of the disk would read.
struct DiskChangesCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "changes",
        abstract: "List the extents that differ between a snapshot and a newer snapshot or the disk now.",
        discussion:
            "The storage answers from its own metadata (rbd: diff_iterate, by whole objects with fast-diff where the image has a valid object map; vhd: the differencing layers' block tables and sector bitmaps), never by comparing data. Every changed byte is inside an extent; an extent may hold unchanged bytes (the storage's granularity). 'zero' extents read as zeros in the newer view."
    )
    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var diskOptions: DiskOptions
    @Option(name: .long, help: "The snapshot to count changes from.") var from: String
    @Option(name: .long, help: "A newer snapshot to count changes to (default: the disk as it is now).")
    var to: String?
    @Flag(name: .long, help: "Print JSON.") var json = false

    func run() async throws {
        try await guarded {
            let service = try storeOptions.service()
            let changes = try await service.changes(
                disk: diskOptions.disk, kind: diskOptions.backend, from: from, to: to.map { .snapshot($0) } ?? .active)
            if json { return try printJSON(changes) }
            for e in changes.extents { print("\(e.offset)\t\(e.length)\t\(e.zero ? "zero" : "data")") }
            print(
                "\(changes.extents.count) extent(s), \(changes.changedBytes) of \(changes.virtualSize) bytes changed since '\(changes.from)' (\(changes.to.map { "to '\($0)'" } ?? "to now"); \(changes.method), granularity \(changes.granularity))"
            )
        }
    }
}
