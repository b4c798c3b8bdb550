import Foundation
import SnapshotCore
import Testing

@Suite("vmsnap CLI")
struct CLITests {
    @Test("create, list, revert and delete from the command line, with the data right at each step")
    func roundTrip() async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        try await cli.fill(disk, 1)
        try await cli.ok("disk", "snapshot", "create", disk, "i1", "--description", "first")
        try await cli.fill(disk, 2)
        try await cli.ok("disk", "snapshot", "create", disk, "e1", "--kind", "external")
        var listing = try await cli.list(disk)
        try await cli.fill(listing.active, 3)
        #expect(listing.snapshots.map(\.name) == ["i1", "e1"] && listing.current == "e1")
        #expect(listing.snapshots[0].description == "first" && listing.snapshots[1].parent == "i1")
        let tree = try await cli.ok("disk", "snapshot", "list", disk, "--tree")
        #expect(tree.contains("i1 (internal)") && tree.contains("└─ e1 (external)  <- current"))
        try await cli.ok("disk", "snapshot", "revert", disk, "e1")
        listing = try await cli.list(disk)
        #expect(try await cli.holds(listing.active, 2))
        try await cli.ok("disk", "snapshot", "delete", disk, "e1")
        listing = try await cli.list(disk)
        #expect(listing.snapshots.map(\.name) == ["i1"])
        #expect(try await cli.holds(listing.active, 2))
        try await cli.ok("disk", "check", disk)
        let info = try await cli.ok("disk", "info", disk, "--json")
        #expect(info.contains("\"format\" : \"qcow2\""))
    }

    @Test(
        "each bad snapshot name exits non-zero with a message naming the problem, and changes nothing",
        arguments: [
            ("", "empty"), ("a/b", "'/'"), ("tab\there", "control character"), ("-x", "starts with '-'"),
            (String(repeating: "n", count: 256), "256 bytes"), ("12", "snapshot IDs"),
        ])
    func badNames(name: String, reason: String) async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        try await cli.ok("disk", "snapshot", "create", disk, "ok")
        let before = try cli.files()
        let beforeList = try await cli.list(disk)
        for kind in ["internal", "external"] {
            let r = try await cli.run(["disk", "snapshot", "create", disk, "--kind", kind, "--", name])
            #expect(r.status == 1, "status \(r.status): \(r.err)")
            #expect(r.err.contains(reason), "stderr: \(r.err)")
        }
        #expect(try cli.files() == before)
        #expect(try await cli.list(disk).snapshots == beforeList.snapshots)
    }

    @Test("duplicate names, unknown snapshots, missing and non-qcow2 images are clear errors")
    func otherBadInput() async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        try await cli.ok("disk", "snapshot", "create", disk, "s1")
        var r = try await cli.run(["disk", "snapshot", "create", disk, "s1"])
        #expect(r.status == 1 && r.err.contains("already has a snapshot named 's1'"))
        r = try await cli.run(["disk", "snapshot", "revert", disk, "ghost"])
        #expect(r.status == 1 && r.err.contains("no snapshot named 'ghost'") && r.err.contains("s1"))
        r = try await cli.run(["disk", "snapshot", "delete", disk, "ghost"])
        #expect(r.status == 1 && r.err.contains("no snapshot named 'ghost'"))
        r = try await cli.run(["disk", "snapshot", "create", cli.pool + "/missing.qcow2", "s", "--backend", "qcow2"])
        #expect(r.status == 1 && r.err.contains("does not exist"))
        let text = cli.pool + "/notes.txt"
        try "hello".write(toFile: text, atomically: true, encoding: .utf8)
        r = try await cli.run(["disk", "snapshot", "create", text, "s"])
        #expect(r.status == 1 && r.err.contains("no backend recognizes"))
        #expect(try String(contentsOfFile: text, encoding: .utf8) == "hello")
        r = try await cli.run(["disk", "snapshot", "create", disk, "s2", "--backend", "zfs"])
        #expect(r.status == 1 && r.err.contains("no backend named 'zfs'"))
    }

    @Test("conflicting flags are refused before anything runs")
    func conflictingFlags() async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        try await cli.ok("disk", "snapshot", "create", disk, "s1")
        var r = try await cli.run(["disk", "snapshot", "delete", disk, "s1", "--children", "--children-only"])
        #expect(r.status == 64 && r.err.contains("conflict"))
        r = try await cli.run([
            "disk", "snapshot", "create", disk, "s2", "--kind", "internal", "--overlay-dir", cli.pool,
        ])
        #expect(r.status == 64 && r.err.contains("--overlay-dir"))
        r = try await cli.run(["disk", "snapshot", "list", disk, "--tree", "--json"])
        #expect(r.status == 64)
        #expect(try await cli.list(disk).snapshots.map(\.name) == ["s1"])
    }

    @Test("a corrupt metadata store is reported and neither it nor the disk changes")
    func corruptStore() async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        try await cli.ok("disk", "snapshot", "create", disk, "s1")
        let db = cli.store + "/" + MetadataStore.databaseName
        for suffix in ["-wal", "-shm"] { unlink(db + suffix) }
        let garbage = Data((0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 37) })
        try garbage.write(to: URL(fileURLWithPath: db))
        let imageBefore = try Data(contentsOf: URL(fileURLWithPath: disk))
        let r = try await cli.run(["disk", "snapshot", "create", disk, "s2"])
        #expect(r.status == 1 && r.err.contains("not a usable vmsnap database"))
        #expect(try Data(contentsOf: URL(fileURLWithPath: db)) == garbage)
        #expect(try Data(contentsOf: URL(fileURLWithPath: disk)) == imageBefore)
    }

    @Test("backend list shows the capability table, in text and JSON")
    func backendList() async throws {
        let cli = try CLI()
        let text = try await cli.ok("backend", "list")
        #expect(text.contains("qcow2") && text.contains("delete-subtree") && text.contains("offline"))
        let json = try await cli.ok("backend", "list", "--json")
        struct Row: Decodable {
            var kind: BackendKind
            var origin: BackendOrigin
            var descriptor: BackendDescriptor
        }
        struct Listing: Decodable { var backends: [Row] }
        let rows = try JSONDecoder().decode(Listing.self, from: Data(json.utf8)).backends
        #expect(
            rows.filter { ["qcow2", "lvm", "vhd"].contains($0.kind.rawValue) }.allSatisfy { $0.origin == .builtIn },
            "built-in origins")
        let decoded = rows.map(\.descriptor)
        let qcow2 = try #require(decoded.first { $0.kind.rawValue == "qcow2" })
        #expect(qcow2.capabilities.supports(.create, .external, .offline))
        #expect(!qcow2.capabilities.supports(.create, .external, .live), "live qcow2 goes through the QEMU driver")
        let lvm = try #require(decoded.first { $0.kind.rawValue == "lvm" })
        #expect(lvm.capabilities.supports(.create, .external, .live), "a snapshot LV of an open origin")
        #expect(
            lvm.capabilities.defers(Capability(.revert, .external, .live)),
            "a merge into an open origin waits for its next activation")
        #expect(!lvm.capabilities.defers(Capability(.revert, .external, .offline)))
        #expect(!qcow2.capabilities.defers(Capability(.revert, .internal, .offline)))
        #expect(text.contains("deferred"), "the text table marks deferred cells")
    }

    @Test(
        "backend test runs the conformance suite, prints a line per check and a summary, and fails for an unknown kind")
    func backendTest() async throws {
        let cli = try CLI()
        let r = try await cli.run([
            "backend", "test", "qcow2", "--pool", cli.pool, "--only", "internal.revert", "external.delete-middle",
        ])
        #expect(r.status == 0, "\(r.out)\(r.err)")
        #expect(r.out.contains("PASS  internal.revert") && r.out.contains("PASS  external.delete-middle"))
        #expect(r.out.contains("3 passed, 0 failed, 0 skipped"), "\(r.out)")
        let json = try await cli.run(["backend", "test", "qcow2", "--only", "internal.tree", "--json"])
        let lines = json.out.split(separator: "\n")
        #expect(json.status == 0 && lines.count == 2 && lines[0].contains("\"outcome\":\"passed\""))
        let bad = try await cli.run(["backend", "test", "nosuch"])
        #expect(bad.status == 1 && bad.err.contains("no backend named 'nosuch'"))
        let nopool = try await cli.run(["backend", "test", "qcow2", "--pool", cli.root + "/absent"])
        #expect(nopool.status == 1 && nopool.err.contains("does not exist"))
    }

    @Test("metadata-only delete forgets the snapshot and keeps the storage")
    func metadataOnly() async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        try await cli.fill(disk, 7)
        try await cli.ok("disk", "snapshot", "create", disk, "e1", "--kind", "external")
        let files = try cli.files()
        try await cli.ok("disk", "snapshot", "delete", disk, "e1", "--metadata-only")
        #expect(try await cli.list(disk).snapshots.isEmpty)
        #expect(try cli.files() == files)
        #expect(try await cli.holds(try await cli.list(disk).active, 7))
    }
}

@Suite("vmsnap CLI defaults")
struct CLIDefaultTests {
    @Test("without --kind a snapshot is internal where the backend has internal snapshots, external where it has not")
    func defaultKind() async throws {
        let cli = try CLI()
        let qcow = try await cli.disk()
        try await cli.ok("disk", "snapshot", "create", qcow, "q1")
        #expect(try await cli.list(qcow).snapshots.first?.kind == .internal)
        let vhd = cli.pool + "/v.vhd"
        try await cli.sh("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", vhd, "8M")
        try await cli.ok("disk", "snapshot", "create", vhd, "v1")
        #expect(try await cli.list(vhd).snapshots.first?.kind == .external)
    }
}
