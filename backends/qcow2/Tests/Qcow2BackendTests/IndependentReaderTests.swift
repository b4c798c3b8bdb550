import Foundation
import IndependentReaders
import Qcow2Backend
import SnapshotCore
import Testing

@Suite("qcow2 images checked by independent readers")
struct IndependentReaderTests {
    @Test("the native header parser agrees with qemu-img info and libqcow")
    func nativeParserAgrees() async throws {
        let f = try Fixture()
        let disk = try await f.newDisk(size: 48 << 20)
        for name in ["alpha", "beta gamma", "état"] {
            try await f.write(disk, seed: UInt64(name.utf8.count))
            try await f.service.create(SnapshotRequest(name: name, kind: .internal), disk: disk)
        }
        try await f.service.create(SnapshotRequest(name: "ext", kind: .external), disk: disk)
        let active = try await f.layout(disk).disk.active
        for image in [disk, active] {
            let native = try Qcow2Image(path: image)
            let info = try await qemuImgInfo(image)
            #expect(native.virtualSize == info["virtual-size"] as? UInt64)
            let names = (info["snapshots"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
            #expect(native.snapshots.map(\.name) == names)
            #expect(native.resolvedBackingFile == info["full-backing-filename"] as? String)
            let lib = try LibQcowReader(path: image)
            #expect(try lib.mediaSize == native.virtualSize)
            #expect(try lib.snapshotCount == native.snapshots.count)
            #expect(try lib.backingFile == native.backingFile)
        }
    }

    @Test("the native parser counts persistent dirty bitmaps as qemu-img adds and lists them")
    func bitmapCountAgrees() async throws {
        let f = try Fixture()
        let disk = try await f.newDisk()
        #expect(try Qcow2Image(path: disk).bitmapCount == 0)
        for (i, name) in ["b1", "b2"].enumerated() {
            try await SubprocessRunner().run(["qemu-img", "bitmap", "--add", disk, name])
            let listed = (try await qemuImgInfo(disk)["format-specific"] as? [String: Any])?["data"] as? [String: Any]
            let names = (listed?["bitmaps"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
            #expect(names.count == i + 1)
            #expect(try Qcow2Image(path: disk).bitmapCount == UInt32(i + 1))
        }
    }

    @Test(
        "every layer of a snapshot tree reads the same through libqcow as through qemu-img, and passes qemu-img check")
    func chainReadByLibqcow() async throws {
        let f = try Fixture()
        let disk = try await f.newDisk()
        try await f.write(disk, seed: 1)
        try await f.service.create(SnapshotRequest(name: "e1", kind: .external), disk: disk)
        try await f.write(disk, seed: 2, at: 1 << 20)
        try await f.service.create(SnapshotRequest(name: "i1", kind: .internal), disk: disk)
        try await f.service.create(SnapshotRequest(name: "e2", kind: .external), disk: disk)
        try await f.write(disk, seed: 3, at: 2 << 20)
        try await f.service.revert(disk: disk, to: "e1")
        try await f.write(disk, seed: 4, at: 3 << 20)
        try await f.service.create(SnapshotRequest(name: "e3", kind: .external), disk: disk)
        // i1 lives in the layer that reads through e1's image: e1's record goes, its image stays a
        // layer (a merge would replace that layer's file or change what i1 reads).
        let before = try await f.layout(disk)
        try await f.service.delete(disk: disk, snapshot: "e1", mode: .merge)
        #expect(try await f.layout(disk).snapshot(named: "e1") == nil)
        #expect(try await f.layout(disk).layers == before.layers, "no layer moved")
        try await f.service.delete(disk: disk, snapshot: "i1", mode: .merge)
        let layout = try await f.layout(disk)
        #expect(try await f.backend.verify(layout: layout).isEmpty)
        for layer in layout.layers {
            var chain: [String] = []
            var next = layer.backing
            while let b = next {
                chain.append(b)
                next = layout.layer(b)?.backing
            }
            let viaLibqcow = try LibQcowReader(path: layer.image, backingChain: chain).read(at: 0, length: 4 << 20)
            let raw = f.root + "/raw-\(UUID().uuidString.prefix(6))"
            try await f.runner.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", layer.image, raw])
            let viaQemu = try Array(Data(contentsOf: URL(fileURLWithPath: raw)).prefix(4 << 20))
            let same = viaLibqcow == viaQemu
            #expect(
                same,
                "layer \(layer.image) over \(chain): \(Self.regions(viaLibqcow)) through libqcow, \(Self.regions(viaQemu)) through qemu-img"
            )
        }
        // The active disk reads e1's data through its chain, and its own write.
        let active = try LibQcowReader(path: layout.disk.active, backingChain: chainOf(layout.disk.active, layout))
        #expect(try active.read(at: 0, length: 64 << 10) == pattern(seed: 1, length: 64 << 10))
        #expect(try active.read(at: 3 << 20, length: 64 << 10) == pattern(seed: 4, length: 64 << 10))
        #expect(try active.read(at: 1 << 20, length: 64 << 10) == [UInt8](repeating: 0, count: 64 << 10))
        // qemu-img compare agrees that e2 (the other branch) still reads its own bytes.
        let e2Image = try #require(layout.snapshot(named: "e2")).image
        let expected = f.root + "/expected.raw"
        try await f.runner.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", e2Image, expected])
        let bytes = try Data(contentsOf: URL(fileURLWithPath: expected))
        #expect(Array(bytes[(1 << 20)..<((1 << 20) + (64 << 10))]) == pattern(seed: 2, length: 64 << 10))
        try await f.runner.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", e2Image, expected])
    }

    /// Each MiB of `bytes` by its first bytes (zero, or the data's start), for a short message.
    static func regions(_ bytes: [UInt8]) -> String {
        stride(from: 0, to: bytes.count, by: 1 << 20).map { start in
            let head = bytes[start..<min(start + 4, bytes.count)]
            return head.allSatisfy { $0 == 0 } ? "0" : head.map { String($0, radix: 16) }.joined()
        }.joined(separator: "|")
    }

    func chainOf(_ image: String, _ layout: DiskLayout) -> [String] {
        var chain: [String] = []
        var next = layout.layer(image)?.backing
        while let b = next {
            chain.append(b)
            next = layout.layer(b)?.backing
        }
        return chain
    }
}
