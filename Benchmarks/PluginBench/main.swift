import BackendPluginKit
import Foundation
import Qcow2Backend
import SnapshotCore

// The cost of a backend living in a plug-in process, measured in one run against the same work in
// process: one call's round trip (state of a disk), a plug-in's start-up, and whole snapshot
// operations through the service. Prints a markdown section for docs/benchmarks.md.
//   usage: plugin-bench N SWIFT_PLUGIN PYTHON_PLUGIN

let args = CommandLine.arguments
guard args.count == 4, let n = Int(args[1]) else {
    FileHandle.standardError.write(Data("usage: plugin-bench N SWIFT_PLUGIN PYTHON_PLUGIN\n".utf8))
    exit(2)
}
let swiftPlugin = args[2], pythonPlugin = args[3]

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

let work = NSTemporaryDirectory() + "vmsnap-plugin-bench-\(UUID().uuidString.prefix(8))"
try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
defer { try? FileManager.default.removeItem(atPath: work) }
let pool = BackendPool(directory: work)

let inProcess = Qcow2Backend()
let swift = try PluginBackend(executable: swiftPlugin)
let python = try PluginBackend(executable: pythonPlugin)

// 1. One call: the state of a disk (a lock probe on the image), N times each, interleaved.
let qcowDisk = try await inProcess.createDisk(named: "state", size: 64 << 20, in: pool)
let qcowLayout = try await inProcess.adopt(locator: qcowDisk)
var swiftLayout = qcowLayout
swiftLayout.disk.kind = swift.kind
let rawDisk = try await python.createDisk(named: "state", size: 64 << 20, in: pool)
let rawLayout = try await python.adopt(locator: rawDisk)
var stateIn: [Double] = [], stateSwift: [Double] = [], statePython: [Double] = []
for _ in 0..<max(n * 10, 50) {
    stateIn.append(try await time { _ = try await inProcess.state(of: qcowLayout) })
    stateSwift.append(try await time { _ = try await swift.state(of: swiftLayout) })
    statePython.append(try await time { _ = try await python.state(of: rawLayout) })
}

// 2. Start-up: spawn, hello, describe, configure.
var startSwift: [Double] = [], startPython: [Double] = []
for _ in 0..<n {
    startSwift.append(try await time { _ = try PluginBackend(executable: swiftPlugin) })
    startPython.append(try await time { _ = try PluginBackend(executable: pythonPlugin) })
}

// 3. Whole operations through the service (journal, plan, steps): internal snapshot create and
// delete of the same qcow2 image in process and through the Swift plug-in; the raw plug-in's
// copy-based create against `cp` of the same file.
func service(_ backend: any DiskSnapshotBackend, _ name: String) throws -> DiskSnapshotService {
    let registry = BackendRegistry()
    try registry.register(BackendFactory(kind: backend.kind) { _ in backend })
    return DiskSnapshotService(
        store: try MetadataStore(directory: work + "/store-" + name), registry: registry, notify: { _ in })
}
let svcIn = try service(inProcess, "in"), svcSwift = try service(swift, "swift"),
    svcPython = try service(python, "python")
let diskIn = try await inProcess.createDisk(named: "op-in", size: 1 << 30, in: pool)
let diskSwift = try await inProcess.createDisk(named: "op-swift", size: 1 << 30, in: pool)
let diskRaw = try await python.createDisk(named: "op", size: 256 << 20, in: pool)
try await python.write(Array(repeating: 7, count: 1 << 20), at: 0, layout: try await python.adopt(locator: diskRaw))
var createIn: [Double] = [], createSwift: [Double] = [], deleteIn: [Double] = [], deleteSwift: [Double] = []
var createRaw: [Double] = [], cpRaw: [Double] = []
var callsPerCreate = 0
for i in 0..<n {
    createIn.append(
        try await time {
            try await svcIn.create(SnapshotRequest(name: "s\(i)", kind: .internal), disk: diskIn, kind: inProcess.kind)
        })
    let before = swift.callCount
    createSwift.append(
        try await time {
            try await svcSwift.create(
                SnapshotRequest(name: "s\(i)", kind: .internal), disk: diskSwift, kind: swift.kind)
        })
    callsPerCreate = swift.callCount - before
    deleteIn.append(
        try await time { try await svcIn.delete(disk: diskIn, snapshot: "s\(i)", mode: .merge, kind: inProcess.kind) })
    deleteSwift.append(
        try await time { try await svcSwift.delete(disk: diskSwift, snapshot: "s\(i)", mode: .merge, kind: swift.kind) }
    )
    createRaw.append(
        try await time {
            try await svcPython.create(
                SnapshotRequest(name: "r\(i)", kind: .external), disk: diskRaw, kind: python.kind)
        })
    cpRaw.append(
        try await time {
            try await SubprocessRunner().run([
                "cp", "--reflink=auto", "--sparse=always", diskRaw, work + "/cp-\(i).raw",
            ])
        })
    try await svcPython.delete(disk: diskRaw, snapshot: "r\(i)", mode: .merge, kind: python.kind)
    unlink(work + "/cp-\(i).raw")
}

func f(_ x: Double) -> String { String(format: "%.2f", x) }
let date = ISO8601DateFormatter().string(from: Date()).prefix(10)
print(
    """
    ## Backend plug-ins (`scripts/bench-plugins \(n)`, \(date), release build, medians)

    One plug-in process serves a whole command; each backend call is one JSON line each way over
    its stdin and stdout. Measured in one run on this machine: the in-process qcow2 backend, the same
    backend served by the Swift plug-in SDK (`vmsnap-backend-qcow2-plugin`), and the Python raw
    plug-in (`backends/raw`).

    | measurement | in process | Swift plug-in | Python plug-in | plug-in cost |
    | --- | ---: | ---: | ---: | --- |
    | one call (`state` of a disk: a lock probe), ms | \(f(median(stateIn))) | \(f(median(stateSwift))) | \(f(median(statePython))) | Swift +\(f(median(stateSwift) - median(stateIn))) ms, Python +\(f(median(statePython) - median(stateIn))) ms |
    | plug-in start (spawn, hello, describe, configure), once per command, ms | - | \(f(median(startSwift))) | \(f(median(startPython))) | |
    | internal snapshot create through the service, ms | \(f(median(createIn))) | \(f(median(createSwift))) | | \(f(median(createSwift) / median(createIn)))x, +\(f(median(createSwift) - median(createIn))) ms |
    | internal snapshot delete through the service, ms | \(f(median(deleteIn))) | \(f(median(deleteSwift))) | | \(f(median(deleteSwift) / median(deleteIn)))x, +\(f(median(deleteSwift) - median(deleteIn))) ms |
    | raw copy snapshot create (1 MiB data, 256 MiB sparse) vs bare `cp`, ms | \(f(median(cpRaw))) (cp) | | \(f(median(createRaw))) | \(f(median(createRaw) / median(cpRaw)))x |

    A create through a plug-in makes \(callsPerCreate) calls (state, plan; the steps run in vmsnap), none
    per existing snapshot. Target: a Swift plug-in adds at most 10 ms per operation.
    """)
