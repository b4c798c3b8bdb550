import Foundation
import SnapshotCore
import Testing
@testable import VHDBackend

/// Corrupt files: every defect is a clean error naming the file and the defect, nothing is
/// written, and random corruption never crashes or hangs the parser.
@Suite("VHD bad input")
struct VHDBadInputTests {
    /// A small dynamic disk with one allocated block and its differencing child.
    func sample(_ root: String) throws -> (base: String, child: String) {
        let base = root + "/pool/base.vhd", child = root + "/pool/child.vhd"
        try VHDEngine.createDynamic(base, size: 4 << 20, blockSize: 1 << 20)
        let b = try VHDImage(path: base, writable: true)
        try b.write(pattern(1, 4096), at: 0)
        try VHDEngine.createDifferencing(child, parent: base)
        let c = try VHDImage(path: child, writable: true)
        try c.write(pattern(2, 4096), at: 1 << 20)
        return (base, child)
    }

    func poke(_ path: String, at offset: Int64, _ bytes: [UInt8], fromEnd: Bool = false) throws {
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        let end = try h.seekToEnd()
        try h.seek(toOffset: fromEnd ? UInt64(Int64(end) + offset) : UInt64(offset))
        try h.write(contentsOf: bytes)
        try h.close()
    }

    func be32(_ v: UInt32) -> [UInt8] {
        [UInt8(v >> 24), UInt8(v >> 16 & 0xff), UInt8(v >> 8 & 0xff), UInt8(v & 0xff)]
    }

    /// Rewrites the dynamic header of `path` with `change` applied and a correct checksum.
    func editHeader(_ path: String, _ change: (inout VHDHeader) -> Void) throws {
        let image = try VHDImage(path: path)
        var h = image.header!
        change(&h)
        try poke(path, at: Int64(image.footer.dataOffset), h.serialized())
    }

    /// The corpus: one case per defect class, each with the words its error must contain.
    static let cases: [(String, String)] = [
        ("truncated file", "truncated"), ("footer cookie", "expected 'conectix'"), ("footer checksum", "checksum"),
        ("header cookie", "expected 'cxsparse'"), ("header checksum", "checksum"), ("BAT past the end", "past the end"),
        ("BAT into the metadata", "inside the metadata"), ("BAT table too large", "block allocation table"),
        ("block size", "power of two"), ("parent missing", "not found"), ("parent UUID", "expects"),
        ("parent loop", "loops"),
        ("footer copies differ", "differs"),
    ]

    func corrupt(_ name: String, _ s: (base: String, child: String)) throws -> String {
        let image = try VHDImage(path: s.base)
        let tableOffset = Int64(image.header!.tableOffset)
        switch name {
        case "truncated file":
            try FileHandle(forUpdating: URL(fileURLWithPath: s.base)).truncate(atOffset: 300)
            return s.base
        case "footer cookie":
            try poke(s.base, at: -512, Array("connectx".utf8), fromEnd: true)
            try poke(s.base, at: 0, Array("connectx".utf8))
            return s.base
        case "footer checksum":
            try poke(s.base, at: -512 + 48, [0xff], fromEnd: true)
            return s.base
        case "header cookie":
            try poke(s.base, at: 512, Array("cxsp4rse".utf8))
            return s.base
        case "header checksum":
            try poke(s.base, at: 512 + 30, [0x7f])
            return s.base
        case "BAT past the end":
            try poke(s.base, at: tableOffset, be32(0x00ff_ffff))
            return s.base
        case "BAT into the metadata":
            try poke(s.base, at: tableOffset, be32(2))
            return s.base
        case "BAT table too large":
            try editHeader(s.base) { $0.maxTableEntries = 0x0fff_ffff }
            return s.base
        case "block size":
            try editHeader(s.base) { $0.blockSize = 3000 }
            return s.base
        case "parent missing":
            try FileManager.default.moveItem(atPath: s.base, toPath: s.base + ".moved")
            return s.child
        case "parent UUID":
            let b = try VHDImage(path: s.base, writable: true)
            try b.setUUID([UInt8](repeating: 7, count: 16))
            return s.child
        case "parent loop":
            let b = try VHDImage(path: s.base, writable: true)
            try b.setParent(s.child)
            return s.child
        case "footer copies differ":
            try poke(s.base, at: 0 + 84, [1])
            try fixStartChecksum(s.base)
            return s.base
        default: fatalError(name)
        }
    }

    func fixStartChecksum(_ path: String) throws {
        var f = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)).prefix(512))
        f.put32(0, at: 64)
        f.put32(VHD.checksum(f[0..<512], skipping: 64..<68), at: 64)
        try poke(path, at: 0, f)
    }

    @Test("each defect is a clean error naming the file and the defect", arguments: cases)
    func defect(name: String, words: String) throws {
        let root = try scratch("bad")
        let s = try sample(root)
        let target = try corrupt(name, s)
        let problems = VHDEngine.check(target)
        #expect(!problems.isEmpty, "check found nothing wrong with '\(name)'")
        #expect(problems.joined().contains(words), "\(problems)")
        #expect(problems.joined().contains("/pool/"), "names the file: \(problems)")
        let error = #expect(throws: SnapshotError.self) {
            let image = try VHDImage(path: target)
            _ = try image.read(at: 0, count: Int(image.virtualSize))
        }
        #expect(error?.code == .invalidImage || error?.code == .notFound || error?.code == .io)
    }

    @Test(
        "a snapshot of a corrupt disk is refused and nothing is written",
        arguments: ["footer checksum", "BAT past the end", "parent UUID"])
    func nothingWritten(name: String) async throws {
        let root = try scratch("bad-svc")
        let s = try sample(root)
        let target = try corrupt(name, s)
        let before = try FileManager.default.contentsOfDirectory(atPath: root + "/pool").sorted()
        let bytes = try Data(contentsOf: URL(fileURLWithPath: target))
        let error = try await #require(throws: SnapshotError.self) {
            try await service(root).create(SnapshotRequest(name: "s", kind: .external), disk: target, kind: "vhd")
        }
        #expect(error.message.contains(target) || error.message.contains("/pool/"))
        #expect(try FileManager.default.contentsOfDirectory(atPath: root + "/pool").sorted() == before)
        #expect(try Data(contentsOf: URL(fileURLWithPath: target)) == bytes)
    }

    @Test(
        "seeded random corruption of footers, headers, tables and locators: always a clean error or a good read, never a crash or hang"
    )
    func randomCorruption() throws {
        let root = try scratch("fuzz")
        let s = try sample(root)
        let pristine = (
            try Data(contentsOf: URL(fileURLWithPath: s.base)), try Data(contentsOf: URL(fileURLWithPath: s.child))
        )
        var rng = SplitMix(seed: 0x5EED_0001)
        var errors = 0, reads = 0
        for round in 0..<300 {
            try pristine.0.write(to: URL(fileURLWithPath: s.base))
            try pristine.1.write(to: URL(fileURLWithPath: s.child))
            let victim = round % 2 == 0 ? s.base : s.child
            var bytes = [UInt8](round % 2 == 0 ? pristine.0 : pristine.1)
            // Metadata lives in the first 8 KiB and the last 512 bytes: aim there.
            let regions = [0..<min(8192, bytes.count), (bytes.count - 512)..<bytes.count]
            for _ in 0..<(1 + Int(rng.next() % 4)) {
                let region = regions[Int(rng.next() % 2)]
                let at = region.lowerBound + Int(rng.next() % UInt64(region.count))
                bytes[at] = UInt8(truncatingIfNeeded: rng.next())
            }
            if rng.next() % 10 == 0 { bytes.removeLast(Int(rng.next() % UInt64(bytes.count))) }
            try Data(bytes).write(to: URL(fileURLWithPath: victim))
            do {
                let image = try VHDImage(path: s.child)
                _ = try image.read(at: 0, count: Int(min(image.virtualSize, 2 << 20)))
                _ = try image.ownedRuns()
                reads += 1
            } catch is SnapshotError {
                errors += 1
            }
            _ = VHDEngine.check(s.child)
        }
        #expect(errors > 100, "most corruptions are detected (\(errors) errors, \(reads) clean reads)")
    }
}

/// A small deterministic generator, so the fuzz cases are the same on every run.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
