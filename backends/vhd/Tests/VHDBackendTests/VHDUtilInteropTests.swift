import BackendConformance
import Foundation
import SnapshotCore
import Testing
@testable import VHDBackend

/// blktap's vhd-util against the files vmsnap writes, and chains other tools wrote adopted with
/// their layers. Debian ships no vhd-util: the tests that run it say "vhd-util not installed"
/// elsewhere (blktap builds it: autotools, uuid-dev, libaio-dev, libssl-dev).
@Suite("VHD files and blktap's vhd-util")
struct VHDUtilInteropTests {
    static var hasVhdUtil: Bool { VHDUtilCommands.installed }

    func vhdUtil(_ args: String...) async throws -> CommandOutput {
        try await SubprocessRunner().execute(["vhd-util"] + args)
    }

    @Test("a differencing chain made outside vmsnap is adopted with its layers as snapshots, and reverts")
    func adoptedChain() async throws {
        let root = try scratch("adopt")
        let base = root + "/pool/base.vhd", mid = root + "/pool/mid.vhd", top = root + "/pool/top.vhd"
        try VHDEngine.createDynamic(base, size: 8 << 20)
        try VHDImage(path: base, writable: true).write(pattern(1, 4096), at: 0)
        try VHDEngine.createDifferencing(mid, parent: base)
        try VHDImage(path: mid, writable: true).write(pattern(2, 4096), at: 0)
        try VHDEngine.createDifferencing(top, parent: mid)
        try VHDImage(path: top, writable: true).write(pattern(3, 4096), at: 0)

        let svc = try service(root)
        let (_, layout) = try await svc.manage(top)
        #expect(layout.snapshots.map(\.name) == ["base", "mid"])
        #expect(layout.snapshot(named: "mid")?.parent == "base" && layout.snapshot(named: "base")?.parent == nil)
        #expect(layout.disk.current == "mid")
        #expect(Set(layout.layers.map(\.image)) == [base, mid, top])
        #expect(try await VHDBackend(settings: ["engine": "native"]).verify(layout: layout).isEmpty)

        // The adopted snapshots are vmsnap's now: revert to the oldest reads what it held.
        let reverted = try await svc.revert(disk: top, to: "base")
        #expect(try VHDImage(path: reverted.disk.active).read(at: 0, count: 4096) == pattern(1, 4096))
        #expect(try VHDImage(path: mid).read(at: 0, count: 4096) == pattern(2, 4096), "mid keeps its bytes")
    }

    @Test(
        "vhd-util checks, snapshots and coalesces the native engine's files (creator tap 1.3 with blktap's batmap)",
        .enabled(if: hasVhdUtil, "vhd-util not installed"))
    func vhdUtilReadsNativeFiles() async throws {
        let root = try scratch("vhdutil")
        let base = root + "/pool/base.vhd", child = root + "/pool/child.vhd", grand = root + "/pool/grand.vhd"
        try VHDEngine.createDynamic(base, size: 8 << 20)
        try VHDImage(path: base, writable: true).write(pattern(1, 65536), at: 0)
        try VHDEngine.createDifferencing(child, parent: base)
        try VHDImage(path: child, writable: true).write(pattern(2, 65536), at: 1 << 20)
        for f in [base, child] {
            let c = try await vhdUtil("check", "-n", f)
            #expect(c.status == 0 && c.standardOutput.contains("is valid"), "\(f): \(c.standardOutput)")
        }
        let s = try await vhdUtil("snapshot", "-e", "-n", grand, "-p", child)
        #expect(s.status == 0, "\(s.standardError)")
        #expect(try VHDImage(path: grand).parentPath() == child, "vhd-util's child reads through ours")
        let co = try await vhdUtil("coalesce", "-n", child)
        #expect(co.status == 0, "\(co.standardError)")
        #expect(try VHDImage(path: base).read(at: 1 << 20, count: 65536) == pattern(2, 65536), "coalesced into base")
        let after = try await vhdUtil("check", "-n", base)
        #expect(after.status == 0, "\(after.standardOutput)")
    }

    @Test(
        "with vhd-util as the engine the whole conformance suite passes, crash checks included",
        .enabled(if: hasVhdUtil, "vhd-util not installed"))
    func vhdUtilEngineConformance() async throws {
        let root = try scratch("vhdutil-conf")
        let results = await ConformanceSuite(
            backend: VHDBackend(settings: ["engine": "vhd-util"]), pool: BackendPool(directory: root + "/pool")
        ).run(includingCrash: true)
        for r in results where r.outcome == .failed { Issue.record("\(r.check): \(r.detail ?? "")") }
        #expect(results.filter { $0.outcome == .passed }.count >= 15)
    }

    @Test("disk check runs vhd-util check where it is installed", .enabled(if: hasVhdUtil, "vhd-util not installed"))
    func diskCheckRunsVhdUtil() async throws {
        let root = try scratch("vhdutil-check")
        let disk = root + "/pool/vm.vhd"
        try VHDEngine.createDynamic(disk, size: 8 << 20)
        let svc = try service(root)
        let backend = VHDBackend(settings: ["engine": "native"])
        #expect(try await backend.verify(layout: try await svc.manage(disk).1).isEmpty)
        // Spoil the batmap's cookie (right after the BAT): only vhd-util looks at it.
        let h = try #require(FileHandle(forUpdatingAtPath: disk))
        try h.seek(toOffset: 1536 + 512)
        try h.write(contentsOf: Data("xxxxxxxx".utf8))
        try h.close()
        let problems = try await backend.verify(layout: try await svc.layout(of: disk).1)
        #expect(problems.contains { $0.contains("vhd-util check failed") }, "\(problems)")
    }
}
