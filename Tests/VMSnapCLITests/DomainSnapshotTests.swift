import Foundation
import QEMUDriver
import SnapshotCore
import Testing

let ovmfCode = "/usr/share/OVMF/OVMF_CODE_4M.fd"
let ovmfVars = "/usr/share/OVMF/OVMF_VARS_4M.fd"

/// Domain snapshots on a real guest under QEMU (TCG here): memory and disks checked from outside
/// through the guest's counter (console = memory, sector 0 = disks). One guest at a time: they
/// share two cores.
@Suite("Domain snapshots on a real guest", .serialized)
struct DomainSnapshotTests {
    /// A live full-system snapshot of a running guest with two qcow2 disks; after the guest has
    /// counted on, a revert brings back memory (the counter resumes from the snapshot) and disks.
    @Test func liveFullSystemSnapshotRevertsMemoryAndDisks() async throws {
        let cli = try CLI()
        let g = try await Guest.define(cli)
        try await g.running {
            try await cli.ok("domain", "start", g.name)
            try await g.waitCounter(atLeast: 3)
            let created = try await cli.ok(
                "snapshot", "create", g.name, "--name", "s1", "--description", "counter test", "--json")
            struct Report: Decodable {
                var pauseMs: Double?
                var pausePhases: [Phase]?
                var memorySaveMethod: String?
                struct Phase: Decodable {
                    var name: String
                    var ms: Double
                }
                var snapshot: Snap
                struct Snap: Decodable {
                    var memory: Memory?
                    struct Memory: Decodable {
                        var path: String
                        var size: UInt64?
                    }
                }
            }
            let report = try decodeJSON(Report.self, created, from: "snapshot create")
            let pause = try #require(report.pauseMs)
            #expect(pause > 0 && pause < 5000, "guest pause \(pause) ms")
            // The pause step by step from QEMU's stamps, together the whole pause. A pre-copy
            // (KVM): its stop, the disk snapshots, the last round, the resume. A background copy
            // (TCG, where QEMU 7.2's pre-copy loses writes: MemoryImageTests): the disk snapshots,
            // the save's setup, the write-protection and resume.
            let phases = try #require(report.pausePhases)
            let method = try #require(report.memorySaveMethod)
            #expect(phases.count == (method.hasPrefix("pre-copy") ? 4 : 3), "\(method): \(phases)")
            #expect(abs(phases.map(\.ms).reduce(0, +) - pause) < 0.5, "\(phases) sum to \(pause) ms")
            let memory = try #require(report.snapshot.memory)
            let size = try #require(memory.size)
            #expect(
                size > 1 << 20 && size <= UInt64(192 << 20) * 105 / 100,
                "memory image \(size) bytes for a 192 MiB guest")
            let attributes = try FileManager.default.attributesOfItem(atPath: memory.path)
            #expect((attributes[.posixPermissions] as? Int) == 0o600)

            let later = try await g.waitCounter(atLeast: (g.counters(after: 0).last ?? 0) + 5)
            try await cli.ok("snapshot", "revert", g.name, "s1", "--paused")
            #expect(try await g.status().state == "paused")
            // Marked once the revert is done: the old guest may print once more before it is stopped.
            let mark = g.mark()
            // Disks are what they were: both hold the snapshot's counter (vdb written right after vda).
            let vda = try #require(try await g.diskCounter(try await g.active(g.disks[0]), format: "qcow2"))
            let vdb = try #require(try await g.diskCounter(try await g.active(g.disks[1]), format: "qcow2"))
            #expect(vda >= vdb && vda - vdb <= 1, "disks taken at one point in time: vda \(vda), vdb \(vdb)")
            #expect(vda < later - 2, "disk counter \(vda) is from the snapshot, not from \(later)")
            try await cli.ok("domain", "resume", g.name)
            let resumed = try await g.waitCounter(atLeast: 1, after: mark)
            let first = try #require(g.counters(after: mark).first)
            #expect(
                first == vda || first == vda + 1,
                "memory restored: the guest went on from \(first), its disk held \(vda)")
            #expect(resumed < later, "the counter restarted from the snapshot (\(resumed) < \(later))")
            #expect(try await g.status().currentSnapshot == "s1")

            // The qcow2 images pass qemu-img check and hold the internal snapshot.
            await g.stop()
            for disk in g.disks {
                try await cli.sh("qemu-img", "check", "-q", disk.path)
                let info = try await SubprocessRunner().run(["qemu-img", "snapshot", "-l", disk.path]).standardOutput
                #expect(info.contains("s1"))
            }
            // The shut-off domain reverts back to running from memory.
            let m2 = g.mark()
            try await cli.ok("snapshot", "revert", g.name, "s1")
            #expect(try await g.status().state == "running")
            let again = try await g.waitCounter(atLeast: 1, after: m2)
            let firstAgain = try #require(g.counters(after: m2).first)
            // At or above s1's disk counter: a guest that booted afresh counts from 1.
            #expect(
                firstAgain >= vda && firstAgain <= vda + 3,
                "resumed from s1's memory (\(firstAgain)), its disk held \(vda)")

            // Memory inside the qcow2 images (QEMU's snapshot-save job), reverted through -loadvm.
            let atInternal = try await g.waitCounter(atLeast: again + 2, after: m2)
            try await cli.ok("snapshot", "create", g.name, "--name", "i2", "--memory", "internal")
            try await g.waitCounter(atLeast: atInternal + 5, after: m2)
            let m3 = g.mark()
            try await cli.ok("snapshot", "revert", g.name, "i2")
            let fromInternal = try await g.restoredCounter(after: m3, below: atInternal + 5)
            #expect(
                fromInternal <= atInternal + 3,
                "resumed from the internal snapshot's memory (\(fromInternal), snapshot near \(atInternal))")
            let vmstate = try await SubprocessRunner().run(["qemu-img", "snapshot", "-U", "-l", g.disks[0].path])
                .standardOutput
            let line = vmstate.split(separator: "\n").first { $0.contains(" i2 ") } ?? ""
            #expect(!line.contains(" 0 B "), "vda holds i2 with its vmstate: \(line)")
            #expect(
                try await g.snapshots("--internal").map(\.name) == ["i2"], "s1 keeps its memory in a file: external")
        }
    }

    /// External disk snapshots with external memory, disk-only snapshots of a running guest,
    /// delete while running (block-stream), list filters, dumpxml and --redefine.
    @Test func externalSnapshotsDeleteWhileRunningAndXML() async throws {
        let cli = try CLI()
        let g = try await Guest.define(cli, disks: [("vda", "qcow2")])
        try await g.running {
            try await cli.ok("domain", "start", g.name)
            try await g.waitCounter(atLeast: 2)
            try await cli.ok("snapshot", "create", g.name, "--name", "e1", "--kind", "external")
            try await cli.ok("snapshot", "create", g.name, "--name", "d2", "--kind", "external", "--disk-only")
            let c2 = try await g.waitCounter(atLeast: (g.counters(after: 0).last ?? 0) + 2)
            #expect(try await g.snapshots().map(\.name) == ["e1", "d2"])
            #expect(try await g.snapshots("--disk-only").map(\.name) == ["d2"])
            #expect(try await g.snapshots("--active").map(\.name) == ["e1"])
            #expect(try await g.snapshots("--roots").map(\.name) == ["e1"])
            #expect(try await g.snapshots("--leaves").map(\.name) == ["d2"])
            #expect(try await g.snapshots("--from", "e1").map(\.name) == ["d2"])
            #expect(try await g.snapshots("--external").count == 2)
            #expect(try await g.snapshots("--internal").isEmpty)
            let xml = try await cli.ok("snapshot", "dumpxml", g.name, "d2")
            #expect(
                xml.contains("<state>disk-snapshot</state>") && xml.contains("<memory snapshot='no'/>")
                    && xml.contains("<parent>"))
            #expect(
                xml.contains("snapshot='external'") && xml.contains(".d2.qcow2"), "libvirt names the overlay: \(xml)")

            // Delete d2 while the guest runs: QEMU streams its base into the running layer.
            try await cli.ok("snapshot", "delete", g.name, "d2")
            #expect(try await g.snapshots().map(\.name) == ["e1"])
            let active = try await g.active(g.disks[0])
            let files = try cli.files()
            #expect(
                !files.contains { $0.contains(".e1.") }, "d2's image (the overlay e1 made) is merged and gone: \(files)"
            )
            let after = try await g.waitCounter(atLeast: c2 + 2)
            #expect(try await g.diskCounter(active, format: "qcow2") ?? 0 >= c2, "guest kept writing to \(active)")
            try await cli.sh("qemu-img", "check", "-U", "-q", active)
            _ = after

            // A record can be forgotten and imported again from its XML.
            let e1xml = try await cli.ok("snapshot", "dumpxml", g.name, "e1")
            try await cli.ok("snapshot", "delete", g.name, "e1", "--metadata-only")
            #expect(try await g.snapshots().isEmpty)
            let file = cli.root + "/e1.xml"
            try e1xml.write(toFile: file, atomically: true, encoding: .utf8)
            try await cli.ok("snapshot", "create", g.name, "--redefine", file, "--current")
            #expect(try await g.snapshots().map(\.name) == ["e1"])
            #expect(
                try await cli.ok("snapshot", "current", g.name).trimmingCharacters(in: .whitespacesAndNewlines) == "e1")
            let dup = try await cli.run(["snapshot", "create", g.name, "--redefine", file])
            #expect(dup.status != 0 && dup.err.contains("already has a snapshot named"))

            // Revert to e1 (external disk + external memory) while running: a branch off e1's image.
            // The old guest may print once more (past c2) before it stops: the lowest counter after
            // the mark is the restored guest's.
            let mark = g.mark()
            try await cli.ok("snapshot", "revert", g.name, "e1")
            let deadline = Date().addingTimeInterval(60)
            while !g.counters(after: mark).contains(where: { $0 < c2 }), Date() < deadline {
                try await Task.sleep(for: .milliseconds(200))
            }
            let first = try #require(g.counters(after: mark).min(), "the guest printed nothing after the revert")
            #expect(first < c2, "resumed from e1's memory (\(first)), not from \(c2)")

            // A mixed tree, live: an internal snapshot in the running layer, an external one on
            // top. Deleting the external one keeps its image as a layer (the internal snapshot
            // lives in it; a merge into the running layer would lose it) and the guest runs on.
            try await cli.ok("snapshot", "create", g.name, "--name", "i1", "--kind", "internal", "--disk-only")
            let holder = try await g.active(g.disks[0])
            try await cli.ok("snapshot", "create", g.name, "--name", "x1", "--kind", "external", "--disk-only")
            let beforeDelete = g.counters(after: 0).last ?? 0
            try await cli.ok("snapshot", "delete", g.name, "x1")
            #expect(try await g.snapshots().map(\.name).sorted() == ["e1", "i1"])
            #expect(FileManager.default.fileExists(atPath: holder), "x1's image holds i1: kept as a layer")
            try await g.waitCounter(atLeast: beforeDelete + 2)
            try await cli.ok("domain", "stop", g.name, "--force")
            // i1 reverts (a branch off the kept layer) to exactly what the layer held at i1.
            let atI1 = cli.root + "/at-i1.raw"
            try await cli.sh("qemu-img", "convert", "-l", "snapshot.name=i1", "-f", "qcow2", "-O", "raw", holder, atI1)
            try await cli.ok("snapshot", "revert", g.name, "i1", "--force", "--paused")  // disk-only: a cold boot
            let reverted = cli.root + "/reverted.raw"
            try await cli.sh(
                "qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", try await g.active(g.disks[0]), reverted)
            #expect(
                FileManager.default.contentsEqual(atPath: atI1, andPath: reverted), "the revert reads what i1 held")
        }
    }

    /// Deletes further down a running guest's chain: an external snapshot whose image has the
    /// running chain's next layer on it (QEMU streams the image into that read-only layer, which
    /// then reads through the image's own backing file), and one on a branch the guest does not
    /// run (nothing of it is open: the backend deletes it as offline). What the other snapshots
    /// read does not change; the guest writes on throughout.
    @Test func deleteFurtherDownTheRunningChain() async throws {
        let cli = try CLI()
        let g = try await Guest.define(cli, name: "dc", disks: [("vda", "qcow2")])
        try await g.running {
            try await cli.ok("domain", "start", g.name)
            try await g.waitCounter(atLeast: 2)
            var images: [String: String] = [:]
            for name in ["e0", "e1", "e2"] {
                try await cli.ok("snapshot", "create", g.name, "--name", name, "--kind", "external", "--disk-only")
                images[name] = try #require(
                    try await cli.list(g.disks[0].path).snapshots.first { $0.name == name }?.image)
                try await g.waitCounter(atLeast: (g.counters(after: 0).last ?? 0) + 1)
            }
            // e2's image reads through e1's: what it reads now, it must read after e1 goes.
            func read(_ image: String) async throws -> Data {
                let raw = cli.root + "/read-\(UUID().uuidString.prefix(6)).raw"
                defer { unlink(raw) }
                try await cli.sh("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", image, raw)
                return try Data(contentsOf: URL(fileURLWithPath: raw))
            }
            let e2Before = try await read(images["e2"]!)
            let e0Before = try await read(images["e0"]!)
            // QEMU and vmsnap killed once the stream is done, before vmsnap confirmed it: e2's
            // layer may name e0's image already; a recovery must not plan the merge again over the
            // old layout (that wrote into e0's image), it points the layer back and merges offline.
            let killed = try await cli.run(
                ["snapshot", "delete", g.name, "e1"],
                environment: ["VMSNAP_DOMAIN_FAULT": "qemu@delete:stream-done-vda,delete:stream-done-vda"])
            #expect(killed.status != 0 && killed.err.contains("fault injection"), "\(killed.err)")
            try await cli.ok("recover")
            #expect(try await g.snapshots().map(\.name) == ["e0", "e2"])
            #expect(!FileManager.default.fileExists(atPath: images["e1"]!), "e1's image was merged away")
            #expect(try await read(images["e2"]!) == e2Before, "e2 reads what it read before")
            #expect(try await read(images["e0"]!) == e0Before, "e0's image is untouched")
            try await cli.sh("qemu-img", "check", "-q", images["e2"]!)
            let restarted = g.mark()
            try await cli.ok("domain", "start", g.name)
            try await g.waitCounter(atLeast: 2, after: restarted)
            try await cli.sh("qemu-img", "check", "-U", "-q", try await g.active(g.disks[0]))
            try await cli.sh("qemu-img", "check", "-U", "-q", images["e2"]!)

            // A branch: back to e0 (a cold boot), then delete e2, which the guest no longer runs.
            let mark = g.mark()
            try await cli.ok("snapshot", "revert", g.name, "e0", "--force", "--running")
            try await g.waitCounter(atLeast: 2, after: mark)
            try await cli.ok("snapshot", "delete", g.name, "e2")
            #expect(try await g.snapshots().map(\.name) == ["e0"])
            #expect(!FileManager.default.fileExists(atPath: images["e2"]!), "e2's image, on no running chain, is gone")
            try await g.waitCounter(atLeast: (g.counters(after: mark).last ?? 0) + 2, after: mark)

            // Into the running layer, QEMU and vmsnap killed once the merge is confirmed: the
            // recovery records it. Every counter the guest printed had reached the disk (it syncs
            // before it prints), so the disk holds at least the last one.
            try await cli.ok("snapshot", "create", g.name, "--name", "e3", "--kind", "external", "--disk-only")
            try await g.waitCounter(atLeast: (g.counters(after: mark).last ?? 0) + 2, after: mark)
            let confirmed = try await cli.run(
                ["snapshot", "delete", g.name, "e3"],
                environment: ["VMSNAP_DOMAIN_FAULT": "qemu@delete:confirmed-vda,delete:confirmed-vda"])
            #expect(confirmed.status != 0 && confirmed.err.contains("fault injection"), "\(confirmed.err)")
            let printed = g.counters(after: mark).last ?? 0
            try await cli.ok("recover")
            #expect(try await g.snapshots().map(\.name) == ["e0"])
            let active = try await g.active(g.disks[0])
            try await cli.sh("qemu-img", "check", "-q", active)
            #expect((try await g.diskCounter(active, format: "qcow2") ?? 0) >= printed, "the disk lost writes")
            #expect(try await read(images["e0"]!) == e0Before, "e0's image is untouched")
        }
    }

    /// `--quiesce` freezes the guest's filesystems through Debian's qemu-guest-agent running in the
    /// test guest, and thaws them; without an agent it fails within the timeout, thawed, with
    /// nothing changed; with memory it is refused (the image would resume frozen).
    @Test func quiesceThroughTheGuestAgent() async throws {
        let cli = try CLI()
        let g = try await Guest.define(cli, name: "qg", disks: [("vda", "qcow2")], agent: true)
        try await g.running {
            try await cli.ok("domain", "start", g.name)
            try await g.waitCounter(atLeast: 3)
            let log = String(decoding: FileManager.default.contents(atPath: g.serialLog) ?? Data(), as: UTF8.self)
            #expect(log.contains("vmsnap-guest agent on /dev/vport"), "the guest started its agent: \(log.suffix(400))")
            let withMemory = try await cli.run(["snapshot", "create", g.name, "--name", "m", "--quiesce"])
            #expect(
                withMemory.status == 1 && withMemory.err.contains("--quiesce needs --disk-only"), "\(withMemory.err)")
            let q = try await cli.ok("snapshot", "create", g.name, "--name", "q1", "--disk-only", "--quiesce")
            #expect(q.contains("the guest agent froze"), "\(q)")
            let mark = g.mark()
            try await g.waitCounter(atLeast: (g.counters(after: 0).last ?? 0) + 2, after: mark)  // thawed, counting on
            #expect(try await g.status().snapshotCount == 1)
        }
        // A guest with no agent (QEMU's firmware only): a clear error within the timeout, nothing changed.
        let disk = try await cli.disk("noagent")
        let file = cli.root + "/noagent.json"
        try
            #"{"name": "na", "memoryMiB": 32, "accel": "tcg", "disks": [{"target": "vda", "backend": "qcow2", "locator": "\#(disk)"}]}"#
            .write(toFile: file, atomically: true, encoding: .utf8)
        try await cli.ok("domain", "define", file)
        try await cli.ok("domain", "start", "na")
        do {
            let none = try await cli.run(
                ["snapshot", "create", "na", "--name", "x", "--disk-only", "--quiesce"],
                environment: ["VMSNAP_AGENT_TIMEOUT": "2"])
            #expect(
                none.status == 1 && none.err.contains("did not answer") && none.err.contains("Nothing was changed"),
                "\(none.err)")
            #expect(try await cli.list(disk).snapshots.isEmpty)
            #expect(try await cli.ok("domain", "status", "na").contains("running"))
        } catch {
            _ = try? await cli.run(["domain", "stop", "na", "--force"])
            throw error
        }
        _ = try await cli.run(["domain", "stop", "na", "--force"])
    }

    /// Bad input and failures: clear errors, nothing changed, the guest keeps running.
    @Test func badInputAndFailuresChangeNothing() async throws {
        let cli = try CLI()
        let g = try await Guest.define(cli, disks: [("vda", "qcow2")])
        try await g.running {
            func fails(
                _ args: [String], _ needle: String, environment: [String: String] = [:],
                sourceLocation: SourceLocation = #_sourceLocation
            ) async throws {
                let r = try await cli.run(args, environment: environment)
                #expect(
                    r.status != 0, "vmsnap \(args.joined(separator: " ")) should fail", sourceLocation: sourceLocation)
                #expect(r.err.contains(needle), "error for \(args): \(r.err)", sourceLocation: sourceLocation)
            }
            try await fails(["snapshot", "create", "nosuch"], "no domain named 'nosuch'")
            try await fails(["snapshot", "revert", g.name, "nosuch"], "no snapshot named")
            try await fails(["snapshot", "create", g.name, "--name", "bad/name"], "invalid snapshot name")
            try await fails(["domain", "start", "nosuch"], "no domain named")
            let badDef = cli.root + "/bad.json"
            try #"{"name": "x", "memoryMiB": "lots"}"#.write(toFile: badDef, atomically: true, encoding: .utf8)
            try await fails(["domain", "define", badDef], "memoryMiB")
            try
                #"{"name": "x", "memoryMiB": 64, "disks": [{"target": "vda", "backend": "qcow2", "locator": "/nonexistent.qcow2"}]}"#
                .write(toFile: badDef, atomically: true, encoding: .utf8)
            try await fails(["domain", "define", badDef], "does not exist")

            try await cli.ok("domain", "start", g.name)
            try await g.waitCounter(atLeast: 2)
            try await fails(
                ["snapshot", "create", g.name, "--disk-only", "--memory-file", cli.root + "/m"],
                "--disk-only takes no memory")
            try await fails(["snapshot", "create", g.name, "--disk-only", "--disks", "vdz"], "has no disk vdz")
            try await fails(["domain", "undefine", g.name], "is running")
            // The busybox guest ignores ACPI: a graceful stop times out with the way out named.
            try await fails(["domain", "stop", g.name, "--timeout", "2"], "--force")
            #expect(try await g.status().state == "running")
            try await cli.ok("domain", "suspend", g.name)
            #expect(try await g.status().state == "paused")
            try await cli.ok("domain", "resume", g.name)
            #expect(try await g.status().state == "running")
            try await fails(["snapshot", "revert", g.name, "x", "--running", "--paused"], "exclude each other")
            try await cli.ok("snapshot", "create", g.name, "--name", "d1", "--disk-only")
            try await fails(["snapshot", "create", g.name, "--name", "d1"], "already has a snapshot named")
            try await fails(["snapshot", "revert", g.name, "d1"], "--force")
            #expect(try await g.status().state == "running")

            // A memory file on a full filesystem: refused before the guest is touched.
            let small = cli.root + "/small"
            try FileManager.default.createDirectory(atPath: small, withIntermediateDirectories: true)
            try await cli.sh("mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", small)
            let before = try await g.snapshots().count
            try await fails(
                ["snapshot", "create", g.name, "--name", "full", "--memory-file", small + "/mem"],
                "no room for the memory image")
            let leftInSmall = try FileManager.default.contentsOfDirectory(atPath: small)
            try await cli.sh("umount", small)
            #expect(leftInSmall.isEmpty, "no partial memory file")
            #expect(try await g.snapshots().count == before)
            #expect(try await cli.list(g.disks[0].path).snapshots.map(\.name) == ["d1"])
            let m = g.mark()
            try await g.waitCounter(atLeast: 1, after: m)

            // QEMU dies in the middle of a snapshot (after the disks, during the memory save):
            // the error says so, the disk snapshot is undone, the memory file removed.
            let died = try await cli.run(
                ["snapshot", "create", g.name, "--name", "dies"],
                environment: ["VMSNAP_DOMAIN_FAULT": "qemu@create:disks-recorded"])
            #expect(died.status != 0 && died.err.contains("QEMU"), "\(died.err)")
            #expect(try await g.snapshots().map(\.name) == ["d1"])
            #expect(try await cli.list(g.disks[0].path).snapshots.map(\.name) == ["d1"])
            #expect(!FileManager.default.fileExists(atPath: cli.store + "/memory/\(g.name)/dies.vmstate"))
            #expect(try await g.status().state == "shutoff")
            try await cli.sh("qemu-img", "check", "-q", g.disks[0].path)
            let names = try await SubprocessRunner().run(["qemu-img", "snapshot", "-l", g.disks[0].path]).standardOutput
            #expect(!names.contains("dies"))

            // Subtrees of a shut-off domain: --children-only keeps the snapshot, --children takes it too.
            try await cli.ok("snapshot", "create", g.name, "--name", "c1")
            try await cli.ok("snapshot", "create", g.name, "--name", "c2")
            #expect(try await g.snapshots("--from", "d1", "--descendants").map(\.name) == ["c1", "c2"])
            let info = try await cli.ok("snapshot", "info", g.name, "c1")
            #expect(
                info.contains("parent:      d1") && info.contains("memory:      no")
                    && info.contains("state:       shutoff"), "\(info)")
            try await cli.ok("snapshot", "delete", g.name, "d1", "--children-only")
            #expect(try await g.snapshots().map(\.name) == ["d1"])
            #expect(try await cli.list(g.disks[0].path).snapshots.map(\.name) == ["d1"])
            let left = try await SubprocessRunner().run(["qemu-img", "snapshot", "-l", g.disks[0].path]).standardOutput
            #expect(!left.contains("c1") && !left.contains("c2"), "\(left)")
            #expect(
                try await cli.ok("snapshot", "current", g.name).trimmingCharacters(in: .whitespacesAndNewlines) == "d1")
            try await cli.ok("snapshot", "delete", g.name, "d1", "--children")
            #expect(try await g.snapshots().isEmpty)
            #expect(try await cli.list(g.disks[0].path).snapshots.isEmpty)

            // A domain with snapshots is not forgotten by accident.
            try await cli.ok("snapshot", "create", g.name, "--name", "keep")
            try await fails(["domain", "undefine", g.name], "--snapshots-metadata")
            try await cli.ok("domain", "undefine", g.name, "--snapshots-metadata")
            #expect(!(try await cli.ok("domain", "list")).contains(g.name + "\t"))
            #expect(
                try await cli.list(g.disks[0].path).snapshots.map(\.name) == ["keep"],
                "the disk snapshot stays on the disk")
        }
    }

    /// A disk whose storage takes the snapshot (the raw plug-in copies the file) beside a qcow2
    /// disk: the copy is made after the guest resumed, QEMU holding the disk's point in time
    /// (a temporary overlay) meanwhile, so the pause holds none of it. The storage is made slow
    /// (3 s at the resume, the guest writing its counter every second): the copy must still be
    /// the disk at the pause, at one instant with the qcow2 disk and the memory.
    @Test func storageSnapshotTakenAfterTheResume() async throws {
        let cli = try CLI()
        let g = try await Guest.define(cli, name: "h", disks: [("vda", "qcow2"), ("vdb", "raw")])
        try await g.running {
            try await cli.ok("domain", "start", g.name)
            try await g.waitCounter(atLeast: 3)
            let r = try await cli.run(
                ["snapshot", "create", g.name, "--name", "s1", "--json"],
                // 3 s before the copy (the guest writes on meanwhile), 2 s after it (inside the
                // pause, had the copy been taken there).
                environment: ["VMSNAP_DOMAIN_FAULT": "delay3@create:resumed, delay2@create:disk-vdb"])
            #expect(r.status == 0, "\(r.err)")
            #expect(!r.err.contains("snapshotted with the guest paused"), "held, not paused for: \(r.err)")
            struct Report: Decodable {
                var pauseMs: Double?
                var switchPauseMs: Double?
            }
            let report = try decodeJSON(Report.self, r.out, from: "snapshot create")
            let pause = try #require(report.pauseMs)
            #expect(pause < 2000, "the guest ran while the storage was slow: paused \(pause) ms")
            // The second, short stop: vdb switched back from its overlay.
            let switchPause = try #require(report.switchPauseMs)
            #expect(switchPause > 0 && switchPause < 2000, "stopped \(switchPause) ms for the switch back")
            #expect(
                try FileManager.default.contentsOfDirectory(atPath: cli.store + "/held/\(g.name)").isEmpty,
                "the temporary overlay is merged back and gone")
            #expect(try await cli.list(g.disks[1].path).active == g.disks[1].path, "vdb runs on its own file again")
            let later = try await g.waitCounter(atLeast: (g.counters(after: 0).last ?? 0) + 3)
            #expect(
                try await g.diskCounter(g.disks[1].path, format: "raw") ?? 0 >= later - 1,
                "the guest's writes since the pause reached the raw file")

            try await cli.ok("snapshot", "revert", g.name, "s1", "--paused")
            let vda = try #require(try await g.diskCounter(try await g.active(g.disks[0]), format: "qcow2"))
            let vdb = try #require(try await g.diskCounter(g.disks[1].path, format: "raw"))
            #expect(vda >= vdb && vda - vdb <= 1, "one instant: vda \(vda), vdb (copied 3 s later) \(vdb)")
            let mark = g.mark()
            try await cli.ok("domain", "resume", g.name)
            try await g.waitCounter(atLeast: 1, after: mark)
            let first = try #require(g.counters(after: mark).first)
            #expect(first == vda || first == vda + 1, "memory of the same instant: went on from \(first), disks \(vda)")
        }
    }

    /// A UEFI guest (Debian's OVMF, the test kernel booted by the firmware): its variable store is
    /// part of every snapshot. OVMF writes its variables as it boots, so a second boot changes the
    /// store; a revert puts the snapshot's store back byte for byte; a delete removes the copy.
    @Test(.enabled(if: FileManager.default.fileExists(atPath: ovmfCode), "needs Debian's ovmf (\(ovmfCode))"))
    func uefiVariablesFollowTheSnapshots() async throws {
        let cli = try CLI()
        let vars = cli.pool + "/u-VARS.fd"
        let firmware = ["code": ovmfCode, "vars": vars, "template": ovmfVars]
        // A missing store with no template to make it from, and the shared template as the
        // domain's own store, are refused.
        let bad = cli.root + "/bad.json"
        let kernel = try await GuestImage.shared.files().0
        for f in [["code": ovmfCode, "vars": vars], ["code": ovmfCode, "vars": ovmfVars, "template": ovmfVars]] {
            let d: [String: Any] = ["name": "b", "memoryMiB": 64, "boot": ["kernel": kernel], "firmware": f]
            try JSONSerialization.data(withJSONObject: d).write(to: URL(fileURLWithPath: bad))
            let r = try await cli.run(["domain", "define", bad])
            #expect(r.status != 0 && r.err.contains("firmware"), "\(f): \(r.err)")
        }
        #expect(!FileManager.default.fileExists(atPath: vars))

        let g = try await Guest.define(cli, name: "u", disks: [("vda", "qcow2")], firmware: firmware)
        let template = try Data(contentsOf: URL(fileURLWithPath: ovmfVars))
        func store() throws -> Data { try Data(contentsOf: URL(fileURLWithPath: vars)) }
        #expect(try store() == template, "define made the store from the template")
        #expect(try FileManager.default.attributesOfItem(atPath: vars)[.posixPermissions] as? Int == 0o600)
        try await g.running {
            try await cli.ok("domain", "start", g.name)
            try await g.waitCounter(atLeast: 2, timeout: 300)
            let first = try store()
            #expect(first != template, "OVMF wrote its variables as it booted")
            let inImage = try await cli.run(["snapshot", "create", g.name, "--name", "i", "--memory", "internal"])
            #expect(inImage.status != 0 && inImage.err.contains("variable store"), "\(inImage.err)")
            try await cli.ok("snapshot", "create", g.name, "--name", "s1")
            let copy = cli.store + "/devices/u/s1/nvram.fd"
            #expect(try Data(contentsOf: URL(fileURLWithPath: copy)) == first, "the snapshot keeps the store")
            #expect(try FileManager.default.attributesOfItem(atPath: copy)[.posixPermissions] as? Int == 0o600)
            // Killed after the copy: the recovery removes it with the rest of the snapshot.
            let killed = try await cli.run(
                ["snapshot", "create", g.name, "--name", "k"],
                environment: ["VMSNAP_DOMAIN_FAULT": "create:disks-recorded"])
            #expect(killed.status != 0 && killed.err.contains("fault injection"), "\(killed.err)")
            try await cli.ok("recover")
            #expect(
                !FileManager.default.fileExists(atPath: cli.store + "/devices/u/k"), "the rollback removed the copy")

            // OVMF writes its variables at every boot; QEMU holds no copy of the flash in the memory
            // of a shut-off domain to write back, so that revert must put the store back itself.
            try await revertsPutStateBack(g, s1: first, read: store, what: "the variables")

            try await cli.ok("snapshot", "delete", g.name, "s1")
            try await cli.ok("snapshot", "delete", g.name, "off")
            #expect(!FileManager.default.fileExists(atPath: copy), "the delete removed the copy")
            #expect(try FileManager.default.contentsOfDirectory(atPath: cli.store + "/devices/u").isEmpty)
        }
    }

    /// A guest with an emulated TPM 2.0 (Debian's swtpm): the TPM's permanent state is part of every
    /// snapshot. Each boot starts the TPM anew, which changes its permanent state (its reset
    /// counter); a revert puts the snapshot's state back; a delete removes the copy.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/swtpm"), "needs Debian's swtpm"))
    func tpmStateFollowsTheSnapshots() async throws {
        let cli = try CLI()
        let state = cli.pool + "/t-tpm"
        let kernel = try await GuestImage.shared.files().0
        // Bad TPM settings are refused at define, naming the field.
        let bad = cli.root + "/bad.json"
        let file = cli.pool + "/a-file"
        #expect(FileManager.default.createFile(atPath: file, contents: Data()))
        for (tpm, words) in [
            (["state": file], "not a directory"), (["state": "relative/dir"], "absolute"),
            (["state": cli.pool + "/a,b"], "comma"), (["state": state, "model": "tpm-spapr"], "tpm.model"),
            (["state": state, "version": "1.2"], "version"),
        ] {
            let d: [String: Any] = ["name": "b", "memoryMiB": 64, "boot": ["kernel": kernel], "tpm": tpm]
            try JSONSerialization.data(withJSONObject: d).write(to: URL(fileURLWithPath: bad))
            let r = try await cli.run(["domain", "define", bad])
            #expect(r.status != 0 && r.err.contains(words), "\(tpm): \(r.err)")
        }
        #expect(!FileManager.default.fileExists(atPath: state))

        let g = try await Guest.define(cli, name: "t", disks: [("vda", "qcow2")], tpm: ["state": state])
        // One TPM belongs to one domain, by any spelling of its directory.
        try FileManager.default.createSymbolicLink(atPath: cli.root + "/tpm-link", withDestinationPath: state)
        for spelling in [state, cli.root + "/tpm-link"] {
            let twin: [String: Any] = [
                "name": "t2", "memoryMiB": 64, "boot": ["kernel": kernel], "tpm": ["state": spelling],
            ]
            try JSONSerialization.data(withJSONObject: twin).write(to: URL(fileURLWithPath: bad))
            let r = try await cli.run(["domain", "define", bad])
            #expect(r.status != 0 && r.err.contains("TPM state of domain 't'"), "\(spelling): \(r.err)")
        }
        #expect(try FileManager.default.attributesOfItem(atPath: state)[.posixPermissions] as? Int == 0o700)
        let permall = state + "/tpm2-00.permall"
        func live() throws -> Data { try Data(contentsOf: URL(fileURLWithPath: permall)) }
        func copy(_ snapshot: String) throws -> Data {
            try Data(contentsOf: URL(fileURLWithPath: cli.store + "/devices/t/\(snapshot)/tpm/tpm2-00.permall"))
        }
        // Without the emulator the start fails clearly and leaves nothing running.
        let missing = try await cli.run(
            ["domain", "start", g.name], environment: ["VMSNAP_SWTPM": "/nonexistent/swtpm"])
        #expect(missing.status != 0 && missing.err.contains("swtpm"), "\(missing.err)")
        #expect(try await cli.run(["domain", "list"]).out.contains("t\tshutoff"), "nothing was left running")
        try await g.running {
            try await cli.ok("domain", "start", g.name)
            try await g.waitCounter(atLeast: 2, timeout: 300)
            let booted = try live()
            try await cli.ok("snapshot", "create", g.name, "--name", "s1")
            #expect(try copy("s1") == booted, "the snapshot keeps the TPM's state")
            let xml = try await cli.ok("snapshot", "dumpxml", g.name, "s1")
            #expect(xml.contains("<tpm model='tpm-tis'>") && xml.contains("<backend type='emulator' version='2.0'/>"))
            #expect(
                try FileManager.default.attributesOfItem(atPath: cli.store + "/devices/t/s1/tpm/tpm2-00.permall")[
                    .posixPermissions] as? Int == 0o600)

            // Each boot starts the TPM again (its reset counter moves on).
            try await revertsPutStateBack(g, s1: booted, read: live, what: "the TPM's state")
            let offline = try live()

            // A snapshot whose copy went missing is refused, unless --force keeps the TPM as it is.
            try FileManager.default.removeItem(atPath: cli.store + "/devices/t/s1")
            let refused = try await cli.run(["snapshot", "revert", g.name, "s1"])
            #expect(refused.status != 0 && refused.err.contains("TPM state"), "\(refused.err)")
            #expect(try live() == offline, "the refusal changed nothing")

            // Files in the directory that are not the TPM's own survive a revert.
            let foreign = state + "/notes.txt"
            #expect(FileManager.default.createFile(atPath: foreign, contents: Data("mine".utf8)))
            try await cli.ok("snapshot", "revert", g.name, "off")
            #expect(FileManager.default.fileExists(atPath: foreign), "a revert removed a file that is no TPM state")

            // The domain moves to another TPM directory and a second domain takes the old one: a
            // revert of the first to a snapshot that names the old directory is refused.
            var moved = try #require(
                try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: cli.root + "/t.json")))
                    as? [String: Any])
            let listed = try JSONSerialization.jsonObject(with: Data(try await cli.ok("domain", "list", "--json").utf8))
            moved["uuid"] = try #require((listed as? [[String: Any]])?.first { $0["name"] as? String == "t" }?["uuid"])
            moved["tpm"] = ["state": cli.pool + "/t-tpm-new"]
            try JSONSerialization.data(withJSONObject: moved).write(to: URL(fileURLWithPath: bad))
            try await cli.ok("domain", "define", bad)
            let other: [String: Any] = [
                "name": "t3", "memoryMiB": 64, "boot": ["kernel": kernel], "tpm": ["state": state],
            ]
            try JSONSerialization.data(withJSONObject: other).write(to: URL(fileURLWithPath: bad))
            try await cli.ok("domain", "define", bad)
            let taken = try await cli.run(["snapshot", "revert", g.name, "off"])
            #expect(taken.status != 0 && taken.err.contains("domain 't3'"), "\(taken.err)")

            try await cli.ok("snapshot", "delete", g.name, "off")
            #expect(
                !FileManager.default.fileExists(atPath: cli.store + "/devices/t/off"), "the delete removed the copy")
        }
    }

    /// For a running guest with snapshot s1 (with memory) whose device state was `s1`: a second
    /// boot changes the state, a revert to s1 puts it back; then shut off, snapshot "off", a boot
    /// that changes it again, and a revert to "off" that puts it back. Leaves the domain shut off.
    func revertsPutStateBack(_ g: Guest, s1: Data, read: () throws -> Data, what: String) async throws {
        let cli = g.cli
        try await cli.ok("domain", "stop", g.name, "--force")
        let m1 = g.mark()
        try await cli.ok("domain", "start", g.name)
        try await g.waitCounter(atLeast: 2, after: m1, timeout: 300)
        #expect(try read() != s1, "the second boot changed \(what)")
        let m2 = g.mark()
        try await cli.ok("snapshot", "revert", g.name, "s1")
        try await g.waitCounter(atLeast: 1, after: m2)
        #expect(try read() == s1, "the revert with memory put \(what) back")
        try await cli.ok("domain", "stop", g.name, "--force")
        let offline = try read()
        try await cli.ok("snapshot", "create", g.name, "--name", "off")
        let m3 = g.mark()
        try await cli.ok("domain", "start", g.name)
        try await g.waitCounter(atLeast: 2, after: m3, timeout: 300)
        try await cli.ok("domain", "stop", g.name, "--force")
        #expect(try read() != offline, "the boot changed \(what)")
        try await cli.ok("snapshot", "revert", g.name, "off")
        #expect(try read() == offline, "the revert of a shut-off snapshot put \(what) back")
    }

    /// A store with too little room for a held disk's overlay (a 48 MiB filesystem; the raw disk
    /// needs 16 MiB and a margin): the disk is snapshotted inside the pause, as before holds, and
    /// the command says so, rather than risk the guest stopping on a full filesystem.
    @Test(.enabled(if: geteuid() == 0, "mounts a small tmpfs as the store: needs root"))
    func heldDiskNeedsRoomInTheStore() async throws {
        let cli = try CLI()
        try FileManager.default.createDirectory(atPath: cli.store, withIntermediateDirectories: true)
        try await cli.sh("mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", cli.store)
        defer { _ = umount2(cli.store, Int32(MNT_DETACH)) }
        let g = try await Guest.define(cli, name: "r", disks: [("vda", "qcow2"), ("vdb", "raw")])
        try await g.running {
            try await cli.ok("domain", "start", g.name)
            try await g.waitCounter(atLeast: 2)
            let r = try await cli.run(["snapshot", "create", g.name, "--name", "s1", "--disk-only"])
            #expect(r.status == 0, "\(r.err)")
            #expect(r.err.contains("disk vdb is snapshotted with the guest paused"), "\(r.err)")
            #expect(!FileManager.default.fileExists(atPath: cli.store + "/held"), "no overlay was made")
            #expect(try await cli.list(g.disks[1].path).snapshots.map(\.name) == ["s1"])
        }
    }

    /// Kills around a held disk: vmsnap at each phase (the overlay is merged back by `vmsnap
    /// recover`, with the writes the guest made meanwhile; a merge killed once ready, with the
    /// guest stopped for the switch, is taken over where it stood and the guest resumed); vmsnap
    /// killed after the switch back, the guest resumed by hand and then its QEMU killed (the stale
    /// overlay is never merged over the guest's newer writes); QEMU killed with the guest stopped
    /// for the switch, before the overlays exist, and while the storage snapshot is being taken
    /// (the overlay merged offline into the raw file).
    @Test func heldDiskCrashAtEveryPhaseRecovers() async throws {
        let cli = try CLI()
        let g = try await Guest.define(cli, name: "k", disks: [("vda", "qcow2"), ("vdb", "raw")])
        let raw = g.disks[1].path
        func clean(_ phase: String) async throws {
            #expect(try await g.snapshots().isEmpty, "\(phase): rolled back")
            let l = try await cli.list(raw)
            #expect(l.snapshots.isEmpty && l.active == raw, "\(phase): \(l.snapshots.map(\.name)) on \(l.active)")
            let held = (try? FileManager.default.contentsOfDirectory(atPath: cli.store + "/held/\(g.name)")) ?? []
            #expect(held.isEmpty, "\(phase): no temporary overlay left: \(held)")
            let copies = try FileManager.default.contentsOfDirectory(atPath: cli.pool).filter { $0.contains(".snap-") }
            #expect(copies.isEmpty, "\(phase): no copy left: \(copies)")
        }
        try await g.running {
            try await cli.ok("domain", "start", g.name)
            try await g.waitCounter(atLeast: 2)
            for phase in [
                "create:prepared", "create:paused", "create:transaction", "create:disks-recorded",
                "create:memory-saved", "create:resumed", "create:storage-snapshots", "create:synced-vdb",
                "create:merged",
            ] {
                let r = try await cli.run(
                    ["snapshot", "create", g.name, "--name", "c"], environment: ["VMSNAP_DOMAIN_FAULT": phase])
                #expect(r.status != 0 && r.err.contains("fault injection"), "\(phase): \(r.err)")
                // The guest writes on (into the overlay, where there is one) before the recovery,
                // unless the kill left it stopped in the pause.
                let stopped = ["create:paused", "create:transaction", "create:synced-vdb"].contains(phase)
                let before =
                    stopped ? 0 : try await g.waitCounter(atLeast: (g.counters(after: 0).last ?? 0) + 3)
                try await cli.ok("recover")
                try await clean(phase)
                #expect(try await g.status().state == "running", "\(phase): the guest runs")
                #expect(
                    try await g.diskCounter(raw, format: "raw") ?? 0 >= before - 1,
                    "\(phase): the raw file holds what the guest wrote before the recovery (\(before))")
            }
            // The same kill, then vmsnap's own `domain resume`: it recovers first (the overlay
            // removed, the rollback done) and the guest runs.
            let resumed = try await cli.run(
                ["snapshot", "create", g.name, "--name", "c"],
                environment: ["VMSNAP_DOMAIN_FAULT": "create:switched-vdb"])
            #expect(resumed.status != 0 && resumed.err.contains("fault injection"), "\(resumed.err)")
            try await cli.ok("domain", "resume", g.name)
            try await clean("resumed through vmsnap")
            #expect(try await g.status().state == "running")

            // Killed once QEMU switched vdb back to the raw file and the switch is journaled,
            // before the guest runs again and the overlay is removed (3 s of guest writes went
            // into the overlay first). Another tool resumes the guest through QMP (vmsnap's own
            // `domain resume` recovers first), the guest writes on into the raw file, then QEMU
            // dies. The overlay is stale: merging it offline would write old data over new.
            let switched = try await cli.run(
                ["snapshot", "create", g.name, "--name", "c"],
                environment: ["VMSNAP_DOMAIN_FAULT": "delay3@create:storage-snapshots, create:switched-vdb"])
            #expect(switched.status != 0 && switched.err.contains("fault injection"), "\(switched.err)")
            #expect(try await g.status().state == "paused", "the guest is stopped for the switch")
            let qmp = try await QMPClient.connect(path: cli.store + "/run/\(g.name)/qmp.sock")
            try await qmp.cont()
            await qmp.close()
            let newer = try await g.waitCounter(atLeast: (g.counters(after: 0).last ?? 0) + 3)
            let pid = try #require(
                Int32(
                    try String(contentsOfFile: cli.store + "/run/\(g.name)/qemu.pid", encoding: .utf8)
                        .trimmingCharacters(in: .whitespacesAndNewlines)))
            kill(pid, SIGKILL)
            // Until QEMU is gone (a loaded machine takes its time), so recovery finds it dead.
            let gone = ContinuousClock.now + .seconds(30)
            while kill(pid, 0) == 0, ContinuousClock.now < gone { try await Task.sleep(for: .milliseconds(100)) }
            try await cli.ok("recover")
            try await clean("switched")
            #expect(
                try await g.diskCounter(raw, format: "raw") ?? 0 >= newer - 1,
                "the raw file keeps the guest's writes after the switch (\(newer)), not the stale overlay's")

            // QEMU and vmsnap killed with the guest stopped for the switch, its commit ready: the
            // overlay holds the guest's newest writes and is merged offline.
            try await cli.ok("domain", "start", g.name)
            try await g.waitCounter(atLeast: 2, after: g.mark())
            let ready = try await cli.run(
                ["snapshot", "create", g.name, "--name", "c"],
                environment: [
                    "VMSNAP_DOMAIN_FAULT":
                        "delay3@create:storage-snapshots, qemu@create:synced-vdb, create:synced-vdb"
                ])
            #expect(ready.status != 0 && ready.err.contains("fault injection"), "\(ready.err)")
            let final = try #require(g.counters(after: 0).last)
            try await cli.ok("recover")
            try await clean("killed at the switch")
            #expect(
                try await g.diskCounter(raw, format: "raw") ?? 0 >= final - 1,
                "the raw file has the guest's last writes (\(final)), merged from the overlay")

            // The guest booted again, then a create that kills its QEMU: it must fail.
            func createKillingQEMU(_ name: String, _ faults: String) async throws {
                try await cli.ok("domain", "start", g.name)
                try await g.waitCounter(atLeast: 2, after: g.mark())
                let r = try await cli.run(
                    ["snapshot", "create", g.name, "--name", name], environment: ["VMSNAP_DOMAIN_FAULT": faults])
                #expect(r.status != 0, "\(faults): \(r.err)")
            }
            // QEMU dies before the overlays are made: nothing to merge, nothing left.
            try await createKillingQEMU("e", "qemu@create:prepared")
            _ = try await cli.run(["recover"])
            try await clean("qemu killed before the overlays")

            // QEMU dies while the storage takes its snapshot: the create fails, the overlay (with
            // the guest's last writes) is merged into the raw file offline.
            try await createKillingQEMU("q", "delay3@create:resumed,qemu@create:storage-snapshots")
            let last = try #require(g.counters(after: 0).last)
            try await clean("qemu killed")
            #expect(try await g.status().state == "shutoff")
            #expect(
                try await g.diskCounter(raw, format: "raw") ?? 0 >= last - 1,
                "the guest's writes in the overlay reached the raw file (console \(last))")
        }
    }

    /// Kill vmsnap at every journaled phase of create, revert and delete; `vmsnap recover`
    /// must leave the guest running, disks consistent and metadata matching the storage.
    @Test func crashAtEveryPhaseRecovers() async throws {
        let cli = try CLI()
        let g = try await Guest.define(cli, disks: [("vda", "qcow2"), ("vdb", "qcow2")])
        try await g.running {
            try await cli.ok("domain", "start", g.name)
            try await g.waitCounter(atLeast: 2)
            for (phase, kind) in [
                ("create:prepared", "external"), ("create:paused", "internal"), ("create:transaction", "external"),
                ("create:transaction", "internal"), ("create:disks-recorded", "external"),
                ("create:memory-saved", "internal"),
                ("create:commit", "external"),
            ] {
                let r = try await cli.run(
                    ["snapshot", "create", g.name, "--name", "c", "--kind", kind],
                    environment: ["VMSNAP_DOMAIN_FAULT": phase])
                #expect(r.status != 0 && r.err.contains("fault injection"), "\(phase): \(r.err)")
                let rec = try await cli.ok("recover")
                #expect(rec.contains("recovered domain"), "\(phase): \(rec)")
                #expect(try await g.snapshots().isEmpty, "\(phase): rolled back")
                for disk in g.disks {
                    let l = try await cli.list(disk.path)
                    #expect(
                        l.snapshots.isEmpty && l.active == disk.path,
                        "\(phase) \(disk.target): \(l.snapshots.map(\.name)) active \(l.active)")
                    let names = try await SubprocessRunner().run(["qemu-img", "snapshot", "-U", "-l", disk.path])
                        .standardOutput
                    #expect(!names.contains(" c "), "\(phase): no internal snapshot left in \(disk.path)")
                }
                let files = try cli.files()
                #expect(files.count == 2, "\(phase): no stray overlay: \(files)")
                #expect(
                    !FileManager.default.fileExists(atPath: cli.store + "/memory/\(g.name)/c.vmstate"),
                    "\(phase): memory file removed")
                #expect(try await g.status().state == "running", "\(phase): the guest runs again")
                let m = g.mark()
                try await g.waitCounter(atLeast: 1, after: m, timeout: 30)
            }

            try await cli.ok("snapshot", "create", g.name, "--name", "s1", "--kind", "external")
            let atSnapshot = try #require(g.counters(after: 0).last)
            for phase in ["revert:stopped", "revert:disk-vda", "revert:disk-vdb", "revert:defined"] {
                try await g.waitCounter(atLeast: atSnapshot + 4)
                let mark = g.mark()
                let r = try await cli.run(
                    ["snapshot", "revert", g.name, "s1"], environment: ["VMSNAP_DOMAIN_FAULT": phase])
                #expect(r.status != 0 && r.err.contains("fault injection"), "\(phase): \(r.err)")
                try await cli.ok("recover")
                #expect(try await g.status().state == "running", "\(phase): finished, running")
                let first = try await g.restoredCounter(after: mark, below: atSnapshot + 5)
                #expect(
                    first <= atSnapshot + 2,
                    "\(phase): resumed from the snapshot's memory (\(first), snapshot at \(atSnapshot))")
                for disk in g.disks { try await cli.sh("qemu-img", "check", "-U", "-q", try await g.active(disk)) }
            }

            try await cli.ok("domain", "stop", g.name, "--force")
            try await cli.ok("snapshot", "create", g.name, "--name", "s2", "--kind", "external")
            for (index, phase) in ["delete:disk-vda", "delete:memory-removed"].enumerated() {
                let name = index == 0 ? "s2" : "s1"
                let r = try await cli.run(
                    ["snapshot", "delete", g.name, name], environment: ["VMSNAP_DOMAIN_FAULT": phase])
                #expect(r.status != 0, "\(phase)")
                try await cli.ok("recover")
                #expect(!(try await g.snapshots().map(\.name).contains(name)), "\(phase): delete finished")
                for disk in g.disks {
                    #expect(!(try await cli.list(disk.path).snapshots.map(\.name).contains(name)))
                    try await cli.sh("qemu-img", "check", "-q", try await g.active(disk))
                }
            }
            #expect(!FileManager.default.fileExists(atPath: cli.store + "/memory/\(g.name)/s1.vmstate"))
        }
    }
}
