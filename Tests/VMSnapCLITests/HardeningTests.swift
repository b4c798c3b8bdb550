import Foundation
import SnapshotCore
import Testing

/// Defects found by hostile and careless input (the hardening issue): each test fails on the
/// code before its fix.
@Suite("Hardening: identity, hostile files, permissions, names, wedged journals")
struct HardeningTests {
    /// Runs with a deadline, so a command that would hang on a FIFO fails the test instead.
    func runBounded(_ cli: CLI, _ args: [String]) async throws -> CLI.Result {
        try await cli.run(["timeout", "-s", "KILL", "20", CLI.binary] + args, raw: true)
    }

    @Test("a symbolic link or a hard link to a managed disk is that disk, not a second one")
    func oneDiskOneIdentity() async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        try await cli.fill(disk, 1)
        try await cli.ok("disk", "snapshot", "create", disk, "e1", "--kind", "external")
        let symlink = cli.root + "/link.qcow2", hardlink = cli.pool + "/hard.qcow2"
        try FileManager.default.createSymbolicLink(atPath: symlink, withDestinationPath: disk)
        #expect(link(disk, hardlink) == 0)
        for spelling in [symlink, hardlink] {
            let listing = try await cli.list(spelling)
            #expect(
                listing.disk == disk && listing.snapshots.map(\.name) == ["e1"],
                "\(spelling) resolves to \(listing.disk)")
        }
        try await cli.fill(try await cli.list(disk).active, 2)
        try await cli.ok("disk", "snapshot", "revert", hardlink, "e1")
        let after = try await cli.list(disk)
        #expect(after.current == "e1" && after.snapshots.count == 1)
        try await cli.expectHolds(after.active, 1)
        try await cli.expectHolds(disk, 1)  // the snapshot's own data untouched
    }

    @Test("a FIFO where a disk, a definition or an XML file is expected is refused at once")
    func fifos() async throws {
        let cli = try CLI()
        let fifo = cli.root + "/fifo"
        #expect(mkfifo(fifo, 0o600) == 0)
        let disk = try await runBounded(cli, ["disk", "snapshot", "create", fifo, "s1", "--backend", "qcow2"])
        #expect(disk.status == 1 && !disk.err.isEmpty, "\(disk.status) \(disk.err)")
        let define = try await runBounded(cli, ["domain", "define", fifo])
        #expect(define.status == 1 && define.err.contains("FIFO"), "\(define.err)")
        let dir = cli.root + "/plain"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let asDir = try await runBounded(cli, ["domain", "define", dir])
        #expect(asDir.status == 1 && asDir.err.contains("a directory, not a regular file"), "\(asDir.err)")
        // A command that waited on the FIFO would have been killed by `timeout` (status 137), not exit 1.
    }

    @Test("a dangling symbolic link at an overlay's name is never followed: the overlay goes beside it")
    func danglingLink() async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        let elsewhere = cli.root + "/elsewhere-target.qcow2"
        try FileManager.default.createSymbolicLink(atPath: cli.pool + "/vm.e1.qcow2", withDestinationPath: elsewhere)
        try await cli.ok("disk", "snapshot", "create", disk, "e1", "--kind", "external")
        #expect(!FileManager.default.fileExists(atPath: elsewhere), "nothing was created through the link")
        let active = try await cli.list(disk).active
        #expect(active == cli.pool + "/vm.e1.1.qcow2", "\(active)")
    }

    @Test("overlays and differencing disks take the base's mode, never wider")
    func overlayModes() async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        chmod(disk, 0o600)
        try await cli.ok("disk", "snapshot", "create", disk, "e1", "--kind", "external")
        let vhd = cli.pool + "/d.vhd"
        try await cli.sh("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", vhd, "8M")
        chmod(vhd, 0o640)
        try await cli.ok("disk", "snapshot", "create", vhd, "v1")
        for (base, expected) in [(disk, 0o600), (vhd, 0o640)] {
            let active = try await cli.list(base).active
            let mode = try #require(FileManager.default.attributesOfItem(atPath: active)[.posixPermissions] as? Int)
            #expect(
                mode == expected, "\(active) has mode \(String(mode, radix: 8)), its base \(String(expected, radix: 8))"
            )
        }
    }

    @Test("an external snapshot of an encrypted qcow2 is refused: its overlay would be plaintext")
    func encrypted() async throws {
        let cli = try CLI()
        let disk = try await cli.encryptedDisk("secret")
        let r = try await cli.run(["disk", "snapshot", "create", disk, "e1", "--kind", "external"])
        #expect(r.status == 1 && r.err.contains("is encrypted") && r.err.contains("unencrypted"), "\(r.err)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: cli.pool) == ["secret.qcow2"], "no overlay")
    }

    @Test("a store or settings file others can write is refused, and --store '' is an error")
    func storeTrust() async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        try await cli.ok("disk", "snapshot", "create", disk, "s1")
        chmod(cli.store, 0o777)
        let open = try await cli.run(["disk", "snapshot", "list", disk])
        #expect(open.status == 1 && open.err.contains("writable by group or others"), "\(open.err)")
        chmod(cli.store, 0o700)
        try "warn-percent = 90\n".write(toFile: cli.store + "/settings.conf", atomically: true, encoding: .utf8)
        chmod(cli.store + "/settings.conf", 0o666)
        let settings = try await cli.run(["disk", "snapshot", "list", disk])
        #expect(
            settings.status == 1 && settings.err.contains("settings.conf is writable by group or others"),
            "\(settings.err)")
        chmod(cli.store + "/settings.conf", 0o600)
        try await cli.ok("disk", "snapshot", "list", disk)
        let empty = try await cli.run(["disk", "snapshot", "list", disk, "--store", ""])
        #expect(empty.status == 1 && empty.err.contains("--store is empty"), "\(empty.err)")
    }

    @Test(
        "names with bidirectional overrides, edge spaces or replaced bytes are refused, not repaired",
        arguments: ["evil\u{202E}txt", " lead", "trail ", "bad\u{FFFD}utf8", "iso\u{2066}late"])
    func names(name: String) async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        let r = try await cli.run(["disk", "snapshot", "create", disk, name])
        #expect(r.status == 1 && r.err.contains("invalid snapshot name"), "\(r.err)")
        #expect(try await cli.list(disk).snapshots.isEmpty)
    }

    @Test(
        "domain definitions: bad names, out-of-range memory and unknown fields are named as such; one disk, one domain")
    func definitions() async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        let cases: [(String, String)] = [
            (
                #"{"name": "bad\u202Ename", "memoryMiB": 64, "disks": [{"target": "vda", "backend": "qcow2", "locator": "\#(disk)"}]}"#,
                "invalid domain name"
            ),
            (
                #"{"name": "big", "memoryMiB": 1e30, "disks": [{"target": "vda", "backend": "qcow2", "locator": "\#(disk)"}]}"#,
                "give a whole number of MiB from 16 to 1048576"
            ),
            (#"{"name": "typo", "memoryMB": 64, "disks": []}"#, "unknown field 'memoryMB'"),
            (
                #"{"name": "typo2", "memoryMiB": 64, "disks": [{"target": "vda", "backend": "qcow2", "locator": "\#(disk)", "format": "x"}]}"#,
                "unknown field 'format'"
            ),
        ]
        for (json, why) in cases {
            let file = cli.root + "/d.json"
            try json.write(toFile: file, atomically: true, encoding: .utf8)
            let r = try await cli.run(["domain", "define", file])
            #expect(r.status == 1 && r.err.contains(why), "\(json): \(r.err)")
        }
        let first = cli.root + "/one.json", second = cli.root + "/two.json"
        try
            #"{"name": "one", "memoryMiB": 64, "disks": [{"target": "vda", "backend": "qcow2", "locator": "\#(disk)"}]}"#
            .write(toFile: first, atomically: true, encoding: .utf8)
        try
            #"{"name": "two", "memoryMiB": 64, "disks": [{"target": "vdb", "backend": "qcow2", "locator": "\#(disk)"}]}"#
            .write(toFile: second, atomically: true, encoding: .utf8)
        try await cli.ok("domain", "define", first)
        let twice = try await cli.run(["domain", "define", second])
        #expect(twice.status == 1 && twice.err.contains("of domain 'one' already"), "\(twice.err)")
    }

    @Test("an internal snapshot deleted outside vmsnap is found before a revert changes anything")
    func missingInternal() async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        try await cli.fill(disk, 1)
        try await cli.ok("disk", "snapshot", "create", disk, "i1")
        try await cli.sh("qemu-img", "snapshot", "-d", "i1", disk)
        try await cli.fill(disk, 2)
        let r = try await cli.run(["disk", "snapshot", "revert", disk, "i1"])
        #expect(r.status == 1 && r.err.contains("no longer in") && r.err.contains("--metadata-only"), "\(r.err)")
        try await cli.expectHolds(disk, 2)
        #expect(try await cli.ok("recover").contains("nothing to recover"), "no wedged journal")
    }

    @Test("a wedged operation has a way out: recover --abandon leaves storage, restores metadata, says what to check")
    func abandon() async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        try await cli.fill(disk, 1)
        try await cli.ok("disk", "snapshot", "create", disk, "e1", "--kind", "external")
        try await cli.ok("disk", "snapshot", "create", disk, "e2", "--kind", "external")
        let before = try await cli.list(disk)
        // Killed after the commit of a delete, then both files of the rename that remains are
        // removed (outside vmsnap): recovery can never finish.
        let killed = try await cli.run(["disk", "snapshot", "delete", disk, "e1"], fault: "after-step:0")
        #expect(killed.status == 137)
        for name in ["e1", "e2"] {
            try FileManager.default.removeItem(atPath: try #require(before.snapshots.first { $0.name == name }).image)
        }
        let stuck = try await cli.run(["recover"])
        #expect(stuck.status == 1 && stuck.err.contains("recover --abandon"), "\(stuck.err)")
        let id = try #require(stuck.err.firstMatch(of: /--abandon (\d+)/).map { String($0.1) })
        let abandoned = try await cli.run(["recover", "--abandon", id])
        #expect(
            abandoned.status == 0 && abandoned.out.contains("abandoned:") && abandoned.out.contains("Check:"),
            "\(abandoned.out) \(abandoned.err)")
        #expect(try await cli.ok("recover").contains("nothing to recover"))
        #expect(
            try await cli.list(disk).snapshots.map(\.name) == before.snapshots.map(\.name),
            "metadata as before the delete")
        let unknown = try await cli.run(["recover", "--abandon", "999999"])
        #expect(unknown.status == 1 && unknown.err.contains("no interrupted operation has id 999999"), "\(unknown.err)")
    }

    @Test("a command that fails leaves the store as it was: no disk registered by a refused create")
    func failedCreateRegistersNothing() async throws {
        let cli = try CLI()
        let vhd = cli.pool + "/d.vhd"
        try await cli.sh("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", vhd, "8M")
        let r = try await cli.run(["disk", "snapshot", "create", vhd, "i1", "--kind", "internal"])
        #expect(r.status == 1 && r.err.contains("does not support"), "\(r.err)")
        let info = try await cli.ok("disk", "info", vhd)
        #expect(info.contains("not yet managed by vmsnap"), "\(info)")
    }

    @Test("an image whose backing spec is not a plain file, or with an external data file, is refused unless allowed")
    func unusualBacking() async throws {
        let cli = try CLI()
        let image = cli.pool + "/json.qcow2"
        try await cli.sh(
            "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b",
            #"json:{"driver": "raw", "file": {"driver": "file", "filename": "/etc/hostname"}}"#, image, "1M")
        let r = try await cli.run(["disk", "snapshot", "create", image, "s1", "--backend", "qcow2"])
        #expect(r.status == 1 && r.err.contains("json:") && r.err.contains("unusual-images=allow"), "\(r.err)")
        let data = cli.pool + "/data.qcow2"
        try await cli.sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=\(cli.pool)/data.raw", data, "1M")
        let d = try await cli.run(["disk", "snapshot", "create", data, "s1"])
        #expect(d.status == 1 && d.err.contains("external data file"), "\(d.err)")
    }

    @Test(
        "disk check reports drift both ways: snapshots vmsnap lost, snapshots made outside it, backing outside the folders"
    )
    func drift() async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        try await cli.ok("disk", "snapshot", "create", disk, "mine")
        try await cli.ok("disk", "check", disk)
        try await cli.sh("qemu-img", "snapshot", "-c", "theirs", disk)
        let added = try await cli.run(["disk", "check", disk])
        #expect(
            added.status == 1 && added.out.contains("internal snapshot 'theirs'") && added.out.contains("did not make"),
            "\(added.out)")
        try await cli.sh("qemu-img", "snapshot", "-d", "theirs", disk)
        try await cli.sh("qemu-img", "snapshot", "-d", "mine", disk)
        let lost = try await cli.run(["disk", "check", disk])
        #expect(lost.status == 1 && lost.out.contains("internal snapshot 'mine' is not in"), "\(lost.out)")

        let outside = cli.root + "/elsewhere"
        try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
        let base = try await cli.disk("base")
        let moved = outside + "/base.qcow2"
        try FileManager.default.moveItem(atPath: base, toPath: moved)
        let child = cli.pool + "/child.qcow2"
        try await cli.sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", moved, "-F", "qcow2", child)
        let far = try await cli.run(["disk", "check", child])
        #expect(far.status == 1 && far.out.contains("lies outside the disk's folders"), "\(far.out)")
    }

    @Test("recovery runs only what the backend could have planned: a tampered journal is refused, nothing runs")
    func tamperedJournal() async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        let killed = try await cli.run(
            ["disk", "snapshot", "create", disk, "e1", "--kind", "external"], fault: "before-step:0")
        #expect(killed.status == 137)
        let marker = cli.root + "/ran-as-root"
        for (action, why) in [
            (#"{"run": ["touch", "\#(marker)"]}"#, "which backend 'qcow2' does not use"),
            (#"{"removeFile": "/etc/hostname-not-really"}"#, "outside the disk's folders"),
        ] {
            let steps = #"[{"summary": "innocent", "action": \#(action)}]"#
            try await cli.sh(
                "python3", "-c",
                "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute(\"UPDATE journal SET steps_json = ?, point_of_no_return = 0 WHERE state = 'open'\", (sys.argv[2].encode(),)); c.commit()",
                cli.store + "/vmsnap.sqlite", steps)
            let r = try await cli.run(["recover"])
            #expect(r.status == 1 && r.err.contains(why) && r.err.contains("nothing was run"), "\(r.err)")
            #expect(!FileManager.default.fileExists(atPath: marker))
        }
    }
}
