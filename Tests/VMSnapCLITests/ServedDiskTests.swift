import Foundation
import IndependentReaders
import SnapshotCore
import Testing

/// A running QEMU domain with a qcow2 and a VHD disk. QEMU's vpc driver cannot write a
/// differencing VHD, so vmsnap's disk server serves the VHD over NBD (its own engine) and holds
/// it while the storage takes the VHD's snapshot. The guest counts in memory and writes its
/// counter to sector 0 of both disks every second; the VHD files are read with libvhdi, a
/// reader written independently of vmsnap and QEMU.
@Suite(.serialized) struct ServedDiskTests {
    /// The counter in sector 0 of a VHD chain (`path` and its parents), read with libvhdi.
    static func vhdCounter(_ path: String) throws -> Int? {
        let reader = try chainReader(path)
        let text = String(decoding: try reader.read(at: 0, length: 64).prefix { $0 != 0 && $0 != 10 }, as: UTF8.self)
        guard text.hasPrefix("counter ") else { return nil }
        return Int(text.dropFirst(8))
    }

    /// True if the VHD chain at `path` holds `value` over its first 64 KiB (libvhdi).
    static func vhdHolds(_ path: String, _ value: UInt8) throws -> Bool {
        try chainReader(path).read(at: 0, length: 65536) == [UInt8](repeating: value, count: 65536)
    }

    static func chainReader(_ path: String) throws -> LibVhdiReader {
        var chain = [path]
        while chain.count < 64 {
            let reader = try LibVhdiReader(path: chain.last!)
            guard let parent = try reader.parentFilename, !parent.isEmpty else { break }
            let dir = (chain.last! as NSString).deletingLastPathComponent
            chain.append(parent.hasPrefix("/") ? parent : (dir as NSString).appendingPathComponent(parent))
        }
        return try LibVhdiReader(path: chain[0], parentChain: Array(chain.dropFirst()))
    }

    /// Waits until the guest prints a counter of at least `n`, then checks that its writes reach
    /// `layer` (the served one) and that the snapshot's layer `base` still holds `frozen`.
    static func guestWrites(
        _ g: Guest, layer: String, atLeast n: Int, base: String, frozen: Int,
        sourceLocation: SourceLocation = #_sourceLocation
    ) async throws -> Int {
        let counter = try await g.waitCounter(atLeast: n, after: g.mark())
        try await Task.sleep(for: .seconds(1.5))
        #expect(try vhdCounter(layer) ?? 0 >= counter - 1, "writes reach \(layer)", sourceLocation: sourceLocation)
        #expect(try vhdCounter(base) == frozen, "the snapshot's layer is unchanged", sourceLocation: sourceLocation)
        return counter
    }

    static func commandLine(_ pid: Int32) -> String {
        let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") ?? Data()
        return String(decoding: data.map { $0 == 0 ? 32 : $0 }, as: UTF8.self)
    }

    /// The first process whose command line satisfies `matches`.
    static func process(_ matches: (String) -> Bool) -> Int32? {
        let pids = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { Int32($0) }
        return pids.first { matches(commandLine($0)) }
    }

    struct Status: Decodable { var pid: Int32? }

    func pid(_ cli: CLI, _ g: Guest) async throws -> Int32 {
        try #require(
            try decodeJSON(Status.self, try await cli.ok("domain", "status", g.name, "--json"), from: "status").pid)
    }

    @Test func liveSnapshotsRevertAndRecoveryOfAServedVHD() async throws {
        let cli = try CLI()
        let g = try await Guest.define(cli, disks: [("vda", "qcow2"), ("vdb", "vhd")])
        let vhd = g.disks[1]
        try await g.running {
            try await cli.ok("domain", "start", g.name)
            try await g.waitCounter(atLeast: 3)
            // QEMU opens vdb through the disk server's socket, never the VHD file.
            let argv = Self.commandLine(try await pid(cli, g))
            #expect(argv.contains("file.driver=nbd") && !argv.contains(vhd.path), "\(argv)")
            // The server holds the image lock: the disk alone cannot be snapshotted under it.
            let direct = try await cli.run(["disk", "snapshot", "create", vhd.path, "x"])
            #expect(direct.status != 0 && direct.err.contains("live"), "\(direct.err)")
            #expect(try await cli.list(vhd.path).snapshots.isEmpty)

            // A live full-system snapshot: the qcow2 disk in QEMU's transaction, the VHD by the
            // storage while its server is held.
            try await cli.ok("snapshot", "create", g.name, "--name", "s1")
            let child = try await g.active(vhd)
            #expect(child != vhd.path)
            let frozen = try #require(try Self.vhdCounter(vhd.path), "the base holds a counter")
            // The guest runs on, and its writes reach the new differencing layer.
            let later = try await Self.guestWrites(g, layer: child, atLeast: frozen + 3, base: vhd.path, frozen: frozen)

            // A kill after the VHD's snapshot, before its server serves the new layer: the
            // recovery rolls the snapshot back and the server serves the base again.
            let killed = try await cli.run(
                ["snapshot", "create", g.name, "--name", "k", "--disk-only"],
                environment: ["VMSNAP_DOMAIN_FAULT": "create:served-vdb"])
            #expect(killed.status != 0 && killed.err.contains("fault injection"), "\(killed.err)")
            try await cli.ok("recover")
            #expect(try await g.snapshots().map(\.name) == ["s1"])
            #expect(try await cli.list(vhd.path).snapshots.map(\.name) == ["s1"])
            // (Deleting k merged the layer it froze into the newer one: that is the active now.)
            let afterKill = try await g.active(vhd)
            let resumed = try await Self.guestWrites(
                g, layer: afterKill, atLeast: later + 2, base: vhd.path, frozen: frozen)

            // Revert with memory: the guest resumes from the snapshot's counter, the VHD is
            // served from a new layer over the snapshot's.
            let m3 = g.mark()
            try await cli.ok("snapshot", "revert", g.name, "s1")
            let restored = try await g.restoredCounter(after: m3, below: resumed)
            #expect(restored <= frozen + 3, "restored \(restored), the snapshot's disk had \(frozen)")
            #expect(frozen <= restored, "the VHD's snapshot is not newer than the memory's")
            let branch = try await g.active(vhd)
            #expect(branch != afterKill && branch != vhd.path)
            let next = try await g.waitCounter(atLeast: restored + 2, after: m3)
            try await Task.sleep(for: .seconds(1.5))
            #expect(try Self.vhdCounter(branch) ?? 0 >= next - 1)

            // A snapshot taken and deleted while the domain runs: the delete merges with the
            // server held, then the guest's writes go on into the layer the record names.
            try await cli.ok("snapshot", "create", g.name, "--name", "s2", "--disk-only")
            #expect(try await g.active(vhd) != branch)
            try await cli.ok("snapshot", "delete", g.name, "s2")
            #expect(try await g.snapshots().map(\.name) == ["s1"])
            let afterDelete = try await g.active(vhd)
            let beforeKill = try await Self.guestWrites(
                g, layer: afterDelete, atLeast: next + 3, base: vhd.path, frozen: frozen)

            // The disk server killed: QEMU holds the guest's requests to vdb, a recovery starts a
            // new server, QEMU reconnects, and the guest's writes reach the disk again.
            let control = cli.store + "/served/\(g.name)/vdb.ctl"
            let server = try #require(Self.process { $0.contains(" disk serve ") && $0.contains(control) })
            let beforeKillMark = g.mark()
            kill(server, SIGKILL)
            try await Task.sleep(for: .seconds(3))
            let recovered = try await cli.ok("recover")
            #expect(recovered.contains("recovered domain '\(g.name)'"), "\(recovered)")
            #expect(Self.process { $0.contains(" disk serve ") && $0.contains(control) } != nil)
            _ = try await Self.guestWrites(
                g, layer: afterDelete, atLeast: beforeKill + 6, base: vhd.path, frozen: frozen)
            // The guest's writes waited for the new server instead of failing.
            let console = String(
                decoding: (FileManager.default.contents(atPath: g.serialLog) ?? Data()).dropFirst(beforeKillMark),
                as: UTF8.self)
            #expect(!console.contains("I/O error"), "the guest saw I/O errors: \(console.suffix(400))")

            // Stopped: the server goes with QEMU; offline delete merges the VHD back.
            try await cli.ok("domain", "stop", g.name, "--force")
            let served = cli.store + "/served/\(g.name)"
            let left = (try? FileManager.default.contentsOfDirectory(atPath: served))?.filter { !$0.hasSuffix(".log") }
            #expect(left ?? [] == [], "sockets left: \(left ?? [])")
            let last = try #require(try Self.vhdCounter(afterDelete))
            try await cli.ok("snapshot", "delete", g.name, "s1")
            #expect(try await g.snapshots().isEmpty)
            let merged = try await g.active(vhd)
            #expect(try Self.vhdCounter(merged) == last)
            #expect(try LibVhdiReader(path: merged).parentFilename == nil, "one dynamic VHD again")
            #expect(try await g.diskCounter(merged, format: "vpc") == last, "qemu-img agrees")
            let m4 = g.mark()
            try await cli.ok("domain", "start", g.name)
            try await g.waitCounter(atLeast: 1, after: m4)
        }
    }
}
