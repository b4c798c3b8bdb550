import Foundation
import SnapshotCore
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Checkpoints and backups of a running test guest that keeps writing: every backup must be one
/// instant of its disks (GuestDiskPattern), incrementals must hold only what changed, the chain
/// must restore and boot, and a pull backup is read with the real NBD clients.
@Suite("Backups of a running guest", .serialized, .enabled(if: hasNBDClients, "needs nbdinfo and nbdcopy (libnbd-bin)"))
struct BackupGuestTests {
    /// The job `backup begin --json` prints.
    struct Job: Decodable {
        struct Disk: Decodable {
            var target: String
            var destination: String?
            var uri: String?
            var scratch: String?
        }
        var name: String
        var incrementalFrom: String?
        var fullBecause: String?
        var disks: [Disk]
    }

    /// The job: stdout is its one JSON document (progress lines go to stderr).
    static func job(_ out: String) throws -> Job { try decodeJSON(Job.self, out, from: "backup") }

    /// Guest-visible bytes of every extent an image itself (not its backing) holds.
    static func ownExtents(_ image: String) async throws -> [(start: Int, length: Int)] {
        let out = try await SubprocessRunner().run(["qemu-img", "map", "-U", "--output=json", image]).standardOutput
        let list = try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [[String: Any]] ?? []
        return list.compactMap { e in
            guard (e["depth"] as? Int) == 0, (e["data"] as? Bool) == true || (e["zero"] as? Bool) == true,
                let start = e["start"] as? Int, let length = e["length"] as? Int
            else { return nil }
            return (start, length)
        }
    }

    @Test func pushFullAndIncrementalsRestoreAndBoot() async throws {
        let cli = try CLI()
        let g = try await Guest.define(cli, resume: true)
        let dir = cli.root + "/backups"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try await cli.ok("domain", "start", g.name)
        try await g.running {
            try await g.waitCounter(atLeast: 3)

            // Full, while the guest writes: one instant of each disk.
            let full = try Self.job(
                try await cli.ok("backup", "begin", g.name, "--target", dir, "--checkpoint", "b1", "--json"))
            #expect(full.incrementalFrom == nil && full.disks.count == 2)
            let fullCounter = try await expectOneInstant(full, cli: cli, what: "full")

            // Incremental 1, still running: only blocks the guest wrote since b1.
            let mark = g.mark()
            try await g.waitCounter(atLeast: fullCounter + 4, after: mark)
            let inc1 = try Self.job(
                try await cli.ok(
                    "backup", "begin", g.name, "--target", dir, "--incremental", "b1", "--checkpoint", "b2", "--json"))
            #expect(inc1.incrementalFrom == "b1")
            let inc1Counter = try await expectOneInstant(inc1, cli: cli, what: "incremental 1")
            #expect(inc1Counter > fullCounter)
            for disk in inc1.disks {
                let extents = try await Self.ownExtents(disk.destination ?? "")
                let written = Set(
                    (fullCounter...(inc1Counter + 1)).map { GuestDiskPattern.slotOffset($0) / 65536 } + [0])
                for e in extents {
                    for cluster in (e.start / 65536)...((e.start + e.length - 1) / 65536) {
                        #expect(
                            written.contains(cluster),
                            "incremental 1 of \(disk.target) holds cluster \(cluster), which the guest did not write since b1"
                        )
                    }
                }
                #expect(!extents.isEmpty, "incremental 1 of \(disk.target) holds the guest's new writes")
            }

            // Incremental 2 with the guest paused: byte for byte the disks as they are.
            try await g.waitCounter(atLeast: inc1Counter + 2, after: g.mark())
            try await cli.ok("domain", "suspend", g.name)
            let inc2 = try Self.job(
                try await cli.ok(
                    "backup", "begin", g.name, "--target", dir, "--incremental", "b2", "--checkpoint", "b3", "--json"))
            for (disk, part) in zip(g.disks, inc2.disks) {
                let same = try await SubprocessRunner().execute([
                    "qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", try await g.active(disk),
                    part.destination ?? "",
                ])
                #expect(
                    same.status == 0, "incremental 2 of \(disk.target) equals the paused disk: \(same.standardOutput)")
            }
            let inc2Counter = try await expectOneInstant(inc2, cli: cli, what: "incremental 2")
            try await cli.ok("domain", "resume", g.name)

            // The checkpoints report what changed since them, while the guest runs.
            let info = try await cli.ok("checkpoint", "info", g.name, "b1", "--json")
            #expect(info.contains("\"usable\" : true") && info.contains("changedBytes"), "\(info)")
            let verify = try await cli.ok("backup", "verify", dir)
            #expect(verify.contains("is sound"), "\(verify)")

            // Restore the chain as a new domain and boot it: its counter carries on from the backup.
            let restored = cli.root + "/restored"
            try FileManager.default.createDirectory(atPath: restored, withIntermediateDirectories: true)
            try await cli.ok("backup", "restore", dir, "--to", restored, "--define", "r")
            try await cli.ok("domain", "start", "r")
            let r = Guest(cli: cli, name: "r", disks: [])
            try await r.running {
                try await r.waitCounter(atLeast: inc2Counter + 1)
                let log = String(decoding: FileManager.default.contents(atPath: r.serialLog) ?? Data(), as: UTF8.self)
                #expect(log.contains("vmsnap-resumed \(inc2Counter)"), "the restored guest resumed at \(inc2Counter)")
            }
        }
    }

    @Test func liveExternalSnapshotAndMergeKeepTracking() async throws {
        let cli = try CLI()
        let g = try await Guest.define(cli, disks: [("vda", "qcow2")])
        let dir = cli.root + "/backups"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try await cli.ok("domain", "start", g.name)
        try await g.running {
            try await g.waitCounter(atLeast: 2)
            try await cli.ok("backup", "begin", g.name, "--target", dir, "--checkpoint", "b1")
            try await cli.ok("snapshot", "create", g.name, "--name", "s1", "--disk-only", "--kind", "external")
            try await g.waitCounter(atLeast: 3, after: g.mark())

            // Across the live snapshot: the incremental equals the paused disk.
            try await cli.ok("domain", "suspend", g.name)
            let inc = try Self.job(
                try await cli.ok(
                    "backup", "begin", g.name, "--target", dir, "--incremental", "b1", "--checkpoint", "b2", "--json"))
            let same = try await SubprocessRunner().execute([
                "qemu-img", "compare", "-U", try await g.active(g.disks[0]), inc.disks[0].destination ?? "",
            ])
            #expect(
                same.status == 0, "incremental across a live external snapshot equals the disk: \(same.standardOutput)")
            try await cli.ok("domain", "resume", g.name)

            // Merged into the running layer: still whole.
            try await cli.ok("snapshot", "delete", g.name, "s1")
            try await g.waitCounter(atLeast: 3, after: g.mark())
            try await cli.ok("domain", "suspend", g.name)
            let inc2 = try Self.job(
                try await cli.ok("backup", "begin", g.name, "--target", dir, "--incremental", "b2", "--json"))
            let same2 = try await SubprocessRunner().execute([
                "qemu-img", "compare", "-U", try await g.active(g.disks[0]), inc2.disks[0].destination ?? "",
            ])
            #expect(same2.status == 0, "incremental after a live merge equals the disk: \(same2.standardOutput)")
            try await cli.ok("domain", "resume", g.name)
        }
    }

    @Test func blockSnapshotsExportedSideBySide() async throws {
        let cli = try CLI()
        let g = try await Guest.define(cli, disks: [("vda", "qcow2"), ("vdb", "qcow2")])
        try await cli.ok("domain", "start", g.name)
        try await g.running {
            try await g.waitCounter(atLeast: 2)
            try await cli.ok("checkpoint", "create", g.name, "c1")
            try await g.waitCounter(atLeast: 2, after: g.mark())
            try await cli.ok(
                "blocksnapshot", "create", g.name, "v1", "--disks", "vda", "--changes-since", "c1", "--checkpoint", "c2"
            )
            try await g.waitCounter(atLeast: 2, after: g.mark())
            // QEMU 7.2 keeps one view of a disk at a time: a second one of vda is refused by name.
            let second = try await cli.run(["blocksnapshot", "create", g.name, "v3", "--disks", "vda"])
            #expect(second.status != 0 && second.err.contains("already has block snapshot 'v1'"), "\(second.err)")
            try await cli.ok("blocksnapshot", "create", g.name, "v2", "--disks", "vdb")
            let xml = try await cli.ok("blocksnapshot", "dumpxml", g.name, "v1")
            #expect(
                xml.contains("<domainblocksnapshot>") && xml.contains("<disk name='vda' type='file'>")
                    && xml.contains("<source file=") && !xml.contains("fleece") && !xml.contains("nbd"), "\(xml)")
            let refused = try await cli.run(["snapshot", "create", g.name, "--disk-only"])
            #expect(refused.status != 0 && refused.err.contains("blocksnapshot delete"), "\(refused.err)")

            // Both exported over one server; each view is its own instant.
            let e1 = try await cli.ok("export", "start", g.name, "v1")
            let e2 = try await cli.ok("export", "start", g.name, "v2")
            func uri(_ out: String, _ target: String) throws -> String {
                try #require(
                    out.split(separator: "\n").first { $0.hasPrefix("\(target): ") }.map {
                        String($0.dropFirst(target.count + 2))
                    })
            }
            let v1a = try uri(e1, "vda"), v2a = try uri(e2, "vdb")
            let address = try await cli.ok("export", "address", g.name)
            #expect(address.contains("v1 vda: \(v1a)") && address.contains("v2 vdb: \(v2a)"), "\(address)")
            var counters: [Int] = []
            for u in [v1a, v2a] {
                let raw = cli.root + "/\(counters.count).raw"
                try await cli.sh("nbdcopy", u, raw)
                let (c, problems) = GuestDiskPattern.check(try Data(contentsOf: URL(fileURLWithPath: raw)))
                #expect(c != nil && problems.isEmpty, "\(u): \(problems)")
                counters.append(c ?? 0)
            }
            #expect(counters[1] > counters[0], "v2 (vdb) was taken later than v1 (vda): \(counters)")
            let map = try await SubprocessRunner().run(["nbdinfo", "--map=qemu:dirty-bitmap:c1", v1a]).standardOutput
            #expect(map.contains("dirty"), "v1 publishes the changes since c1: \(map)")

            // Stopping one export leaves the other; deleting the views removes their blocks.
            try await cli.ok("export", "stop", g.name, "v1")
            #expect(try await SubprocessRunner().execute(["nbdinfo", v1a]).status != 0)
            #expect(try await SubprocessRunner().execute(["nbdinfo", v2a]).status == 0)
            try await cli.ok("blocksnapshot", "delete", g.name, "v1")
            try await cli.ok("blocksnapshot", "delete", g.name, "v2")
            #expect(
                try FileManager.default.contentsOfDirectory(atPath: cli.store + "/blocksnapshots/\(g.name)").isEmpty)
            #expect(try await SubprocessRunner().execute(["nbdinfo", v2a]).status != 0)
            let info = try await cli.ok("checkpoint", "info", g.name, "c2")
            #expect(info.contains("usable") && !info.contains("NOT"), "c2, taken with v1, tracks on: \(info)")
            try await cli.ok("snapshot", "create", g.name, "--disk-only", "--name", "after")
        }
    }

    @Test func fullSystemSnapshotAndCheckpointAtOneInstant() async throws {
        let cli = try CLI()
        let g = try await Guest.define(cli, disks: [("vda", "qcow2")])
        try await cli.ok("domain", "start", g.name)
        try await g.running {
            try await g.waitCounter(atLeast: 2)
            try await cli.ok("snapshot", "create", g.name, "--name", "full", "--checkpoint", "cs")
            try await g.waitCounter(atLeast: 3, after: g.mark())

            // The disk at the snapshot, and the view now with what changed since cs: every block
            // outside cs's bitmap reads as it did at the snapshot, so no write escaped it.
            let atSnapshot = cli.root + "/at-snapshot.raw"
            try await cli.sh(
                "qemu-img", "convert", "-U", "-f", "qcow2", "-l", "snapshot.name=full", "-O", "raw", g.disks[0].path,
                atSnapshot)
            let job = try Self.job(try await cli.ok("backup", "begin", g.name, "--incremental", "cs", "--json"))
            let uri = try #require(job.disks.first?.uri)
            let now = cli.root + "/now.raw"
            try await cli.sh("nbdcopy", uri, now)
            let map = try await SubprocessRunner().run(["nbdinfo", "--map=qemu:dirty-bitmap:cs", uri]).standardOutput
            try await cli.ok("backup", "end", g.name)
            var dirty = Set<Int>()
            for line in map.split(separator: "\n") {
                let f = line.split(separator: " ", omittingEmptySubsequences: true)
                guard f.count >= 3, let start = Int(f[0]), let length = Int(f[1]), f[2] == "1" else { continue }
                for cluster in (start / 65536)..<((start + length) / 65536) { dirty.insert(cluster) }
            }
            let before = try Data(contentsOf: URL(fileURLWithPath: atSnapshot))
            let after = try Data(contentsOf: URL(fileURLWithPath: now))
            var escaped: [Int] = []
            for cluster in 0..<(after.count / 65536) where !dirty.contains(cluster) {
                let r = (cluster * 65536)..<((cluster + 1) * 65536)
                if before[r] != after[r] { escaped.append(cluster) }
            }
            #expect(escaped.isEmpty, "clusters changed since the snapshot but not in cs: \(escaped)")
            #expect(!dirty.isEmpty && dirty.count <= 8, "cs holds the guest's few writes since: \(dirty.sorted())")
            #expect(before != after, "the guest wrote since the snapshot")
        }
    }

    /// Reads each backup image of `job` (through its chain), checks it is one instant, returns
    /// the first disk's counter.
    func expectOneInstant(_ job: Job, cli: CLI, what: String) async throws -> Int {
        var counters: [Int] = []
        for disk in job.disks {
            let raw = try await GuestDiskPattern.read(disk.destination ?? "", scratch: cli.root)
            let (c, problems) = GuestDiskPattern.check(raw)
            #expect(c != nil && problems.isEmpty, "\(what) of \(disk.target) is not one instant: \(problems)")
            counters.append(c ?? 0)
        }
        // The guest writes vda, then vdb: vdb lags by at most one.
        if counters.count == 2 {
            #expect(counters[0] - counters[1] == 0 || counters[0] - counters[1] == 1, "\(counters)")
        }
        return counters.first ?? 0
    }

    @Test func pullOverNBDWithChangedBlocksThenQEMUKilled() async throws {
        let cli = try CLI()
        let g = try await Guest.define(cli, disks: [("vda", "qcow2")])
        try await cli.ok("domain", "start", g.name)
        try await g.running {
            try await g.waitCounter(atLeast: 2)
            // The last slot written before the checkpoint began: every slot written since is at
            // or after it, however long the command takes to return.
            let beforeCheckpoint = try #require(g.counters(after: 0).last)
            try await cli.ok("checkpoint", "create", g.name, "c1")
            let atCheckpoint = try await g.waitCounter(atLeast: 1, after: g.mark())
            try await g.waitCounter(atLeast: atCheckpoint + 3, after: g.mark())

            let job = try Self.job(try await cli.ok("backup", "begin", g.name, "--incremental", "c1", "--json"))
            let uri = try #require(job.disks.first?.uri)
            #expect(uri.hasPrefix("nbd+unix:///vda?socket="))
            let socket = String(uri[uri.range(of: "socket=")!.upperBound...])
            var st = stat()
            #expect(lstat(socket, &st) == 0 && st.st_mode & 0o077 == 0, "the socket is the owner's only")

            // Data: one instant, though the guest keeps writing.
            let raw = cli.root + "/pulled.raw"
            try await cli.sh("nbdcopy", uri, raw)
            let data = try Data(contentsOf: URL(fileURLWithPath: raw))
            let (c, problems) = GuestDiskPattern.check(data)
            #expect(c != nil && problems.isEmpty, "the pulled view is one instant: \(problems)")
            let pulled = try #require(c)
            try await g.waitCounter(atLeast: pulled + 2, after: g.mark())
            let again = try await SubprocessRunner().run(["nbdcopy", uri, raw + "2"])
            #expect(again.status == 0)
            #expect(try Data(contentsOf: URL(fileURLWithPath: raw + "2")) == data, "the view stays at its instant")

            // Changed blocks since c1: sector 0's cluster and the slots written since, nothing else.
            let map = try await SubprocessRunner().run(["nbdinfo", "--map=qemu:dirty-bitmap:c1", uri]).standardOutput
            var dirty = Set<Int>()
            for line in map.split(separator: "\n") {
                let f = line.split(separator: " ", omittingEmptySubsequences: true)
                guard f.count >= 3, let start = Int(f[0]), let length = Int(f[1]), f[2] == "1" else { continue }
                for cluster in (start / 65536)..<((start + length) / 65536) { dirty.insert(cluster) }
            }
            let written = Set((beforeCheckpoint...(pulled + 1)).map { GuestDiskPattern.slotOffset($0) / 65536 } + [0])
            #expect(dirty.contains(0) && dirty.count >= 3, "dirty clusters: \(dirty.sorted())")
            #expect(dirty.isSubset(of: written), "dirty \(dirty.sorted()) within written \(written.sorted())")

            let status = try await cli.ok("backup", "status", g.name)
            #expect(status.contains("pull") && status.contains(uri), "\(status)")
            let refused = try await cli.run(["snapshot", "create", g.name, "--disk-only"])
            #expect(refused.status != 0 && refused.err.contains("backup end"), "\(refused.err)")
            try await cli.ok("backup", "end", g.name)
            #expect(!FileManager.default.fileExists(atPath: socket))
            #expect(try FileManager.default.contentsOfDirectory(atPath: cli.store + "/backup/\(g.name)").isEmpty)
            let gone = try await SubprocessRunner().execute(["nbdinfo", uri])
            #expect(gone.status != 0, "the export is gone")

            // Checkpoints survive a shutdown: c1's bitmap is stored in the image and loaded again.
            try await cli.ok("checkpoint", "create", g.name, "c2")
            try await cli.ok("domain", "stop", g.name, "--force")
            let stored = try await cli.ok("checkpoint", "info", g.name, "c1")
            #expect(stored.contains("usable") && !stored.contains("NOT"), "\(stored)")
            try await cli.ok("domain", "start", g.name)
            try await g.waitCounter(atLeast: 2, after: 0)
            #expect(!(try await cli.ok("checkpoint", "info", g.name, "c2")).contains("NOT"))
            try await cli.ok("checkpoint", "create", g.name, "c3")

            // QEMU dies during a pull backup: c1 and c2 (loaded from the image) are marked
            // inconsistent, c3 (made since the start) was never stored. Incrementals from them are
            // refused, not wrong; the job says the exports are gone and `backup end` clears it.
            try await cli.ok("backup", "begin", g.name, "--incremental", "c2")
            let pid = try #require(
                Int32(
                    try String(contentsOfFile: cli.store + "/run/\(g.name)/qemu.pid", encoding: .utf8)
                        .trimmingCharacters(in: .whitespacesAndNewlines)))
            kill(pid, SIGKILL)
            while kill(pid, 0) == 0 { try await Task.sleep(for: .milliseconds(20)) }
            let orphan = try await cli.ok("backup", "status", g.name)
            #expect(orphan.contains("stopped, and its exports with it"), "\(orphan)")
            try await cli.ok("backup", "end", g.name)
            #expect(try FileManager.default.contentsOfDirectory(atPath: cli.store + "/backup/\(g.name)").isEmpty)
            let dir = cli.root + "/after-kill"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            let r = try await cli.run(["backup", "begin", g.name, "--incremental", "c1"])
            #expect(r.status != 0 && r.err.contains("inconsistent"), "\(r.err)")
            let r3 = try await cli.run(["backup", "begin", g.name, "--incremental", "c3"])
            #expect(r3.status != 0 && r3.err.contains("ended without storing it"), "\(r3.err)")
            let info = try await cli.ok("checkpoint", "info", g.name, "c1")
            #expect(info.contains("NOT usable"), "\(info)")
            let fallback = try Self.job(
                try await cli.ok(
                    "backup", "begin", g.name, "--target", dir, "--incremental", "c1", "--fallback-full",
                    "--checkpoint", "c4", "--json"))
            #expect(fallback.incrementalFrom == nil && fallback.fullBecause?.contains("inconsistent") == true)
        }
    }
}

let hasNBDClients =
    FileManager.default.isExecutableFile(atPath: "/usr/bin/nbdinfo")
    && FileManager.default.isExecutableFile(atPath: "/usr/bin/nbdcopy")
