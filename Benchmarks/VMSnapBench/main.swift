// In-process benchmark: vmsnap's library (store, journal, planning, lock) around the tool,
// against the bare tool spawned by the same runner, alternating, in one process. Prints one
// line per measurement: name, vmsnap median ms, bare median ms. Used by scripts/bench.
import Foundation
import Qcow2Backend
import SnapshotCore

let n = Int(CommandLine.arguments.dropFirst().first ?? "") ?? 20
let work = (NSTemporaryDirectory() as NSString).appendingPathComponent(
    "vmsnap-bench-lib-\(UUID().uuidString.prefix(6))")
try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
defer { try? FileManager.default.removeItem(atPath: work) }
let runner = SubprocessRunner()
let registry = BackendRegistry()
try registry.register(Qcow2Backend.factory)
let service = DiskSnapshotService(
    store: try MetadataStore(directory: work + "/store"), registry: registry, notify: { _ in })

func ms(_ body: () async throws -> Void) async rethrows -> Double {
    let start = DispatchTime.now().uptimeNanoseconds
    try await body()
    return Double(DispatchTime.now().uptimeNanoseconds - start) / 1e6
}
func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}
func image(_ name: String, data: String? = nil) async throws -> String {
    let path = work + "/" + name
    try await runner.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "10G"])
    if let data { try await runner.run(["qemu-io", "-f", "qcow2", "-c", data, path]) }
    return path
}
func report(_ name: String, _ vm: [Double], _ bare: [Double]) {
    print(String(format: "%@ %.3f %.3f", name, median(vm), median(bare)))
}

// Internal snapshot create.
let bareInt = try await image("bare-int.qcow2", data: "write -P 1 0 64M"),
    vmInt = try await image("vm-int.qcow2", data: "write -P 1 0 64M")
try await service.create(SnapshotRequest(name: "warmup", kind: .internal), disk: vmInt)
try await runner.run(Qcow2Commands.createInternal("warmup", image: bareInt))
var vm: [Double] = [], bare: [Double] = []
for i in 0..<n {
    bare.append(try await ms { try await runner.run(Qcow2Commands.createInternal("s\(i)", image: bareInt)) })
    vm.append(try await ms { try await service.create(SnapshotRequest(name: "s\(i)", kind: .internal), disk: vmInt) })
}
report("internal-create", vm, bare)

// External snapshot create.
var top = try await image("bare-ext.qcow2")
let vmExt = try await image("vm-ext.qcow2")
vm = []
bare = []
for i in 0..<n {
    let next = work + "/bare-ext.\(i).qcow2"
    let backing = top
    bare.append(try await ms { try await runner.run(Qcow2Commands.createOverlay(next, backing: backing)) })
    top = next
    vm.append(try await ms { try await service.create(SnapshotRequest(name: "e\(i)", kind: .external), disk: vmExt) })
}
report("external-create", vm, bare)

// Delete with merge (one child: commit + rename, which frees the merged overlay) against plain
// `qemu-img commit` (which empties the overlay) and against `qemu-img commit -d` + rm.
vm = []
bare = []
var bareDRm: [Double] = []
for i in 0..<min(n, 8) {
    for anchor in ["plain", "d-rm"] {
        let b = try await image("mb\(anchor)\(i).qcow2", data: "write -P 1 0 256M")
        let o = work + "/mb\(anchor)\(i).top.qcow2"
        try await runner.run(Qcow2Commands.createOverlay(o, backing: b))
        try await runner.run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 64M 128M", o])
        if anchor == "plain" {
            bare.append(try await ms { try await runner.run(["qemu-img", "commit", "-q", "-f", "qcow2", o]) })
        } else {
            bareDRm.append(
                try await ms {
                    try await runner.run(Qcow2Commands.commit(o))
                    unlink(o)
                })
        }
    }
    let v = try await image("mv\(i).qcow2", data: "write -P 1 0 256M")
    try await service.create(SnapshotRequest(name: "m", kind: .external), disk: v)
    let active = try await service.layout(of: v).1.disk.active
    try await runner.run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 64M 128M", active])
    vm.append(try await ms { try await service.delete(disk: v, snapshot: "m", mode: .merge) })
}
report("merge-delete", vm, bare)
report("merge-delete-vs-commit-d-rm", vm, bareDRm)
