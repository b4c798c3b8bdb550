import BackendPluginKit
import Foundation
import SnapshotCore

// vmsnap's own time for RBD snapshot operations, in process through the service with a warm
// plug-in (what a long-running caller pays, without process start-up), and one plug-in round
// trip. Prints JSON (medians in ms) for scripts/bench-rbd, which measures the anchors (python3-rbd
// and the rbd CLI) in the same run and writes the table.
//   usage: rbd-bench N PLUGIN DISK MISSING_DISK      (DISK: an existing pool/image)

let args = CommandLine.arguments
guard args.count == 5, let n = Int(args[1]) else {
    FileHandle.standardError.write(Data("usage: rbd-bench N PLUGIN DISK MISSING_DISK\n".utf8))
    exit(2)
}
let plugin = args[2], disk = args[3], missing = args[4]

func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

func time(_ body: () async throws -> Void) async rethrows -> Double {
    let start = ContinuousClock.now
    try await body()
    let d = ContinuousClock.now - start
    return (Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18) * 1000
}

let store = NSTemporaryDirectory() + "vmsnap-rbd-bench-\(UUID().uuidString.prefix(8))"
defer { try? FileManager.default.removeItem(atPath: store) }
let backend = try PluginBackend(executable: plugin)
let registry = BackendRegistry()
try registry.register(BackendFactory(kind: backend.kind) { _ in backend })
let service = DiskSnapshotService(store: try MetadataStore(directory: store), registry: registry, notify: { _ in })

// One round trip: reading the record of a disk that has none (one RADOS stat in the plug-in).
var roundTrip: [Double] = []
for _ in 0..<max(n * 5, 50) {
    roundTrip.append(try await time { _ = try await backend.readShared(disk: missing) })
}

_ = try await service.manage(disk, kind: backend.kind)
var create: [Double] = [], revert: [Double] = [], delete: [Double] = []
var calls: [String: Int] = [:]
for i in 0..<n {
    var before = backend.callCount
    create.append(
        try await time {
            try await service.create(SnapshotRequest(name: "b\(i)", kind: .internal), disk: disk, kind: backend.kind)
        })
    calls["create"] = backend.callCount - before
    before = backend.callCount
    revert.append(try await time { try await service.revert(disk: disk, to: "b\(i)", kind: backend.kind) })
    calls["revert"] = backend.callCount - before
    before = backend.callCount
    delete.append(
        try await time { try await service.delete(disk: disk, snapshot: "b\(i)", mode: .merge, kind: backend.kind) })
    calls["delete"] = backend.callCount - before
}
let result: [String: Double] = [
    "roundTrip": median(roundTrip), "create": median(create), "revert": median(revert), "delete": median(delete),
    "createCalls": Double(calls["create"] ?? 0), "revertCalls": Double(calls["revert"] ?? 0),
    "deleteCalls": Double(calls["delete"] ?? 0),
]
let encoder = JSONEncoder()
encoder.outputFormatting = [.sortedKeys]
print(String(decoding: try encoder.encode(result), as: UTF8.self))
