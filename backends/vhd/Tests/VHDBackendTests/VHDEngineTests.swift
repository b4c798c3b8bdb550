import BackendConformance
import Foundation
import IndependentReaders
import SnapshotCore
import Testing
@testable import VHDBackend

func scratch(_ tag: String) throws -> String {
    let dir = (NSTemporaryDirectory() as NSString).appendingPathComponent(
        "vmsnap-vhd-\(tag)-\(UUID().uuidString.prefix(8))")
    try FileManager.default.createDirectory(atPath: dir + "/pool", withIntermediateDirectories: true)
    return dir
}

func pattern(_ seed: UInt64, _ length: Int) -> [UInt8] { ConformanceContext.pattern(seed: seed, length: length) }

func service(_ root: String) throws -> DiskSnapshotService {
    let registry = BackendRegistry()
    try registry.register(VHDBackend.factory)
    return DiskSnapshotService(
        store: try MetadataStore(directory: root + "/store"), registry: registry, notify: { _ in })
}

/// The chain below `image` as the layout records it, nearest first.
func chain(_ image: String, _ layout: DiskLayout) -> [String] {
    var out: [String] = []
    var next = layout.layer(image)?.backing
    while let b = next {
        out.append(b)
        next = layout.layer(b)?.backing
    }
    return out
}

@Suite("VHD engine and backend")
struct VHDEngineTests {
    @Test("the vhd backend passes every conformance check it advertises; only internal-snapshot checks are skipped")
    func conformance() async throws {
        let root = try scratch("conf")
        let results = await ConformanceSuite(
            backend: VHDBackend(settings: ["engine": "native"]), pool: BackendPool(directory: root + "/pool")
        ).run()
        for r in results where r.outcome == .failed { Issue.record("\(r.check): \(r.detail ?? "")") }
        #expect(
            results.filter { $0.outcome == .skipped }.allSatisfy {
                $0.check.hasPrefix("internal.") || $0.check.hasPrefix("mixed.") || $0.check.hasPrefix("shared.")
            })
        #expect(results.filter { $0.outcome == .passed }.count >= 11)
    }

    @Test(
        "every layer of a snapshot tree reads the same through libvhdi as through the engine, and vhdiinfo agrees on type, size, UUIDs and parent"
    )
    func libvhdiAgrees() async throws {
        let root = try scratch("libvhdi")
        let svc = try service(root)
        let disk = root + "/pool/vm.vhd"
        try VHDEngine.createDynamic(disk, size: 24 << 20)
        let backend = VHDBackend(settings: ["engine": "native"])
        func write(_ seed: UInt64, _ offset: UInt64, _ length: Int = 300 << 10) async throws {
            try await backend.write(pattern(seed, length), at: offset, layout: try await svc.layout(of: disk).1)
        }
        try await write(1, 0)
        try await write(2, (5 << 20) + 1234, 9999)  // unaligned, across a block boundary below
        try await svc.create(SnapshotRequest(name: "e1", kind: .external), disk: disk)
        try await write(3, (2 << 20) - 4096, 8192)  // across the first block boundary
        try await svc.create(SnapshotRequest(name: "e2", kind: .external), disk: disk)
        try await svc.revert(disk: disk, to: "e1")
        try await write(4, 20 << 20)
        try await svc.create(SnapshotRequest(name: "e3", kind: .external), disk: disk)
        try await write(5, 100)
        let layout = try await svc.layout(of: disk).1
        #expect(try await backend.verify(layout: layout).isEmpty)
        for layer in layout.layers {
            let engine = try VHDImage(path: layer.image)
            let lib = try LibVhdiReader(path: layer.image, parentChain: chain(layer.image, layout))
            #expect(try lib.mediaSize == engine.virtualSize)
            #expect(try lib.diskType == engine.type.rawValue)
            #expect(try lib.identifier == engine.footer.uuid)
            #expect(
                try lib.read(at: 0, length: 24 << 20) == engine.read(at: 0, count: 24 << 20), "layer \(layer.image)")
            if let backing = layer.backing {
                #expect(try lib.parentIdentifier == VHDImage(path: backing).footer.uuid)
                #expect(try lib.parentFilename == (backing as NSString).lastPathComponent)
            }
            let info = try await SubprocessRunner().run(["vhdiinfo", layer.image]).standardOutput
            #expect(info.contains("Disk type\t\t: \(layer.backing == nil ? "Dynamic" : "Differential")"), "\(info)")
            #expect(info.contains("(\(engine.virtualSize) bytes)"))
            #expect(info.contains(uuidString(engine.footer.uuid)))
            if let backing = layer.backing {
                #expect(info.contains(uuidString(try VHDImage(path: backing).footer.uuid)))
            }
        }
        let active = try VHDImage(path: layout.disk.active)
        #expect(try active.read(at: 100, count: 300 << 10) == pattern(5, 300 << 10))
        #expect(try active.read(at: 20 << 20, count: 300 << 10) == pattern(4, 300 << 10))
        #expect(
            try active.read(at: (2 << 20) - 4096, count: 8192) == [UInt8](repeating: 0, count: 8192),
            "e2's write is on the other branch")
        #expect(
            try VHDImage(path: layout.snapshot(named: "e2")!.image).read(at: (2 << 20) - 4096, count: 8192)
                == pattern(3, 8192))
    }

    @Test("dynamic VHDs from qemu-img are read right by the engine, and the engine's are read right by qemu-img")
    func qemuInterop() async throws {
        let root = try scratch("qemu")
        let run = SubprocessRunner()
        // qemu-img writes, the engine reads.
        let q = root + "/q.vhd", raw = root + "/q.raw"
        try await run.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", q, "40M"])
        try await run.run(["qemu-io", "-f", "vpc", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0xa5 37M 1M", q])
        try await run.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", q, raw])
        let expected = try [UInt8](Data(contentsOf: URL(fileURLWithPath: raw)))
        let image = try VHDImage(path: q)
        #expect(try image.read(at: 0, count: Int(image.virtualSize)) == Array(expected.prefix(Int(image.virtualSize))))
        // qemu-img convert -O vpc from raw data, the engine reads it.
        let src = root + "/src.raw", converted = root + "/c.vhd"
        try Data(pattern(9, 6 << 20)).write(to: URL(fileURLWithPath: src))
        try await run.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", src, converted])
        #expect(try VHDImage(path: converted).read(at: 0, count: 6 << 20) == pattern(9, 6 << 20))
        // The engine writes, qemu-img reads (QEMU takes the size from the footer for creator 'tap').
        let mine = root + "/mine.vhd", out = root + "/mine.raw"
        try VHDEngine.createDynamic(mine, size: 10 << 20)
        let w = try VHDImage(path: mine, writable: true)
        try w.write(pattern(7, 3 << 20), at: 1 << 20)
        try w.sync()
        let info = try await run.run(["qemu-img", "info", "--output=json", mine]).standardOutput
        #expect(info.contains("\"virtual-size\": \(10 << 20)"), "\(info)")
        try await run.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", mine, out])
        let back = try [UInt8](Data(contentsOf: URL(fileURLWithPath: out)))
        #expect(Array(back[(1 << 20)..<(4 << 20)]) == pattern(7, 3 << 20))
        #expect(back[0..<(1 << 20)].allSatisfy { $0 == 0 })
    }

    @Test("'which sectors does this layer hold' comes from the BAT and bitmaps and matches the writes")
    func ownedRuns() throws {
        let root = try scratch("runs")
        let base = root + "/b.vhd", child = root + "/c.vhd"
        try VHDEngine.createDynamic(base, size: 8 << 20)
        try VHDEngine.createDifferencing(child, parent: base)
        let c = try VHDImage(path: child, writable: true)
        try c.write(pattern(1, 1024), at: 4096)
        try c.write(pattern(2, 512), at: (2 << 20) - 512)
        try c.write(pattern(3, 512), at: 2 << 20)
        let runs = try c.ownedRuns().map { [$0.first, $0.count] }
        #expect(runs == [[8, 2], [4095, 2]])
        #expect(
            VHDEngine.subtract([(0, 10), (20, 5)], [(2, 3), (8, 4), (21, 1)]).map { [$0.first, $0.count] } == [
                [0, 2], [5, 3], [20, 1], [22, 3],
            ])
    }

    @Test("a 100 GiB dynamic disk and its snapshot child are small files created without touching data")
    func largeDisk() throws {
        let root = try scratch("large")
        let base = root + "/big.vhd", child = root + "/big.s.vhd"
        try VHDEngine.createDynamic(base, size: 100 << 30)
        try VHDEngine.createDifferencing(child, parent: base)
        let size = try FileManager.default.attributesOfItem(atPath: child)[.size] as! UInt64
        #expect(size < 256 << 10, "child is \(size) bytes")
        #expect(try VHDImage(path: child).virtualSize == 100 << 30)
        #expect(VHDEngine.check(child).isEmpty)
    }

    @Test("parent locators are written as vhd-util writes them: MACX file URL and W2RU relative, W2KU absolute")
    func locators() throws {
        let root = try scratch("loc")
        try FileManager.default.createDirectory(atPath: root + "/sub", withIntermediateDirectories: true)
        let base = root + "/base.vhd", child = root + "/sub/child.vhd"
        try VHDEngine.createDynamic(base, size: 1 << 20)
        try VHDEngine.createDifferencing(child, parent: base)
        let data = VHDImage.locatorData(child: child, parent: base)
        #expect(data.map(\.0) == [.macx, .w2ru, .w2ku])
        #expect(String(decoding: data[0].1, as: UTF8.self) == "file://../base.vhd")
        #expect(try VHDImage(path: child).parentPath() == base)
        #expect(VHDImage.relativePath(from: root, to: base) == "./base.vhd")
    }
}

@Suite("vhd-util command lines")
struct VHDUtilCommandTests {
    /// Argument building only: Debian has no vhd-util, so the real-tool test of this path waits for
    /// a host that has it (docs/notes.md).
    @Test("snapshot, coalesce and check are argument arrays naming the files")
    func argv() {
        #expect(
            VHDUtilCommands.snapshot(child: "/p/c.vhd", parent: "/p/b.vhd") == [
                "vhd-util", "snapshot", "-e", "-n", "/p/c.vhd", "-p", "/p/b.vhd",
            ])
        #expect(VHDUtilCommands.coalesce(child: "/p/c.vhd") == ["vhd-util", "coalesce", "-n", "/p/c.vhd"])
        #expect(VHDUtilCommands.check("/p/c.vhd") == ["vhd-util", "check", "-n", "/p/c.vhd"])
    }

    @Test("asking for the vhd-util engine where it is not installed fails clearly and creates nothing")
    func missingTool() async throws {
        guard !VHDUtilCommands.installed else { return }
        let root = try scratch("noutil")
        let base = root + "/pool/b.vhd"
        try VHDEngine.createDynamic(base, size: 1 << 20)
        let error = try await #require(throws: SnapshotError.self) {
            try await VHDBackend(settings: ["engine": "vhd-util"]).perform(
                "create-child", arguments: ["parent": base, "child": root + "/pool/c.vhd"])
        }
        #expect(error.message.contains("vhd-util"))
        #expect(!FileManager.default.fileExists(atPath: root + "/pool/c.vhd"))
    }
}
