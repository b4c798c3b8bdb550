import Foundation
import Qcow2Backend
import SnapshotCore
import Testing

@Suite("qcow2 bad input")
struct Qcow2BadInputTests {
    @Test("a file that is not qcow2 is refused, naming the problem, and left as it is")
    func notQcow2() async throws {
        let f = try Fixture()
        let raw = f.pool + "/disk.raw"
        try await f.runner.run(["qemu-img", "create", "-q", "-f", "raw", raw, "1M"])
        let before = try f.poolDigest()
        let error = try await #require(throws: SnapshotError.self) {
            try await f.service.create(SnapshotRequest(name: "s", kind: .internal), disk: raw, kind: "qcow2")
        }
        #expect(error.code == .invalidImage && error.message.contains("qcow2 magic"))
        #expect(try f.poolDigest() == before)
        let auto = try await #require(throws: SnapshotError.self) {
            try await f.service.create(SnapshotRequest(name: "s", kind: .internal), disk: raw)
        }
        #expect(auto.code == .invalidImage && auto.message.contains("no backend recognizes"))
    }

    @Test("a missing image is refused and nothing is created")
    func missingImage() async throws {
        let f = try Fixture()
        let error = try await #require(throws: SnapshotError.self) {
            try await f.service.create(
                SnapshotRequest(name: "s", kind: .external), disk: f.pool + "/absent.qcow2", kind: "qcow2")
        }
        #expect(error.code == .notFound && error.message.contains("absent.qcow2"))
        #expect(try f.inventory().isEmpty)
        #expect(try f.service.store.disks().isEmpty)
    }

    @Test("an image marked corrupt is refused")
    func corruptBit() async throws {
        let f = try Fixture()
        let disk = try await f.newDisk()
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: disk))
        try handle.seek(toOffset: 79)
        try handle.write(contentsOf: [0x02])  // incompatible_features bit 1: corrupt
        try handle.close()
        let before = try f.poolDigest()
        let error = try await #require(throws: SnapshotError.self) {
            try await f.service.create(SnapshotRequest(name: "s", kind: .internal), disk: disk)
        }
        #expect(error.code == .invalidImage && error.message.contains("qemu-img check -r all"))
        #expect(try f.poolDigest() == before)
    }

    @Test("names made only of digits are refused: qemu-img would take them for snapshot IDs")
    func digitNames() async throws {
        let f = try Fixture()
        let disk = try await f.newDisk()
        try await f.service.create(SnapshotRequest(name: "s1", kind: .internal), disk: disk)
        let error = try await #require(throws: SnapshotError.self) {
            try await f.service.create(SnapshotRequest(name: "1", kind: .internal), disk: disk)
        }
        #expect(error.code == .invalidName && error.message.contains("snapshot IDs"))
        #expect(try Qcow2Image(path: disk).snapshots.map(\.name) == ["s1"])
    }

    @Test("a snapshot name already inside the image (made outside vmsnap) is refused")
    func duplicateInImage() async throws {
        let f = try Fixture()
        let disk = try await f.newDisk()
        _ = try await f.layout(disk)
        try await f.service.create(SnapshotRequest(name: "mine", kind: .internal), disk: disk)
        try await f.runner.run(["qemu-img", "snapshot", "-c", "theirs", disk])
        let error = try await #require(throws: SnapshotError.self) {
            try await f.service.create(SnapshotRequest(name: "theirs", kind: .internal), disk: disk)
        }
        #expect(error.code == .alreadyExists && error.message.contains("outside vmsnap"))
    }

    @Test("an overlay directory that does not exist is refused before anything is made")
    func badOverlayDir() async throws {
        let f = try Fixture()
        let disk = try await f.newDisk()
        let before = try f.poolDigest()
        let error = try await #require(throws: SnapshotError.self) {
            try await f.service.create(
                SnapshotRequest(name: "e", kind: .external, overlayDirectory: f.root + "/nowhere"), disk: disk)
        }
        #expect(error.code == .invalidArgument && error.message.contains("nowhere"))
        #expect(try f.poolDigest() == before)
    }

    @Test(
        "an image a running QEMU holds is refused for every operation, and nothing changes",
        .enabled(if: hasQemuSystem, "needs qemu-system-x86_64"))
    func heldByQemu() async throws {
        let f = try Fixture()
        let disk = try await f.newDisk()
        try await f.write(disk, seed: 1)
        try await f.service.create(SnapshotRequest(name: "s1", kind: .internal), disk: disk)
        let holder = try await QemuHolder(image: disk)
        defer { holder.stop() }
        #expect(QemuImageLock.isHeld(disk), "QEMU should hold the image lock")
        let layoutBefore = try await f.layout(disk)
        let before = try f.poolDigest()
        for kind in SnapshotKind.allCases {
            let e = try await #require(throws: SnapshotError.self) {
                try await f.service.create(SnapshotRequest(name: "s2", kind: kind), disk: disk)
            }
            #expect(e.code == .unsupported && e.message.contains("live disks"), "\(e)")
        }
        await #expect(throws: SnapshotError.self) { try await f.service.revert(disk: disk, to: "s1") }
        await #expect(throws: SnapshotError.self) {
            try await f.service.delete(disk: disk, snapshot: "s1", mode: .merge)
        }
        #expect(try await f.layout(disk) == layoutBefore)
        #expect(try f.poolDigest() == before)
    }
}

@Suite("qcow2 command lines")
struct Qcow2CommandTests {
    @Test("commands are argument arrays with the image last")
    func argv() {
        #expect(
            Qcow2Commands.createInternal("a b", image: "/p/x.qcow2") == [
                "qemu-img", "snapshot", "-q", "-c", "a b", "/p/x.qcow2",
            ])
        #expect(
            Qcow2Commands.createOverlay("/p/o.qcow2", backing: "/p/x.qcow2") == [
                "qemu-img", "create", "-q", "-f", "qcow2", "-b", "/p/x.qcow2", "-F", "qcow2", "/p/o.qcow2",
            ])
        #expect(
            Qcow2Commands.rebase("/p/c", onto: nil, backingFormat: "qcow2") == [
                "qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "", "/p/c",
            ])
        #expect(
            Qcow2Commands.rebase("/p/c", onto: "/p/g", backingFormat: "raw") == [
                "qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "/p/g", "-F", "raw", "/p/c",
            ])
        #expect(Qcow2Commands.commit("/p/c") == ["qemu-img", "commit", "-q", "-f", "qcow2", "-d", "/p/c"])
        #expect(
            Qcow2Commands.commit("/p/c", into: "/p/b") == [
                "qemu-img", "commit", "-q", "-f", "qcow2", "-d", "-b", "/p/b", "/p/c",
            ])
    }

    @Test("an external snapshot plans one overlay named after the snapshot, and undoes it by removal")
    func externalPlan() async throws {
        let f = try Fixture()
        let disk = try await f.newDisk("web")
        let backend = Qcow2Backend(runner: RecordingRunner())
        let layout = try await backend.adopt(locator: disk)
        let plan = try await backend.planCreate(
            SnapshotRequest(name: "before upgrade", kind: .external), layout: layout)
        let overlay = f.pool + "/web.before upgrade.qcow2"
        #expect(
            plan.steps.map(\.action) == [
                .backend(name: "create-overlay", arguments: ["overlay": overlay, "backing": disk])
            ])
        #expect(plan.steps[0].undo == .removeFile(overlay))
        #expect(plan.result.disk.active == overlay && plan.result.disk.current == "before upgrade")
        #expect(plan.result.snapshot(named: "before upgrade")?.image == disk)
    }

    @Test(
        "deleting a snapshot with one child plans commit, bitmaps down, then rename; with two, a safe rebase of each")
    func mergePlans() async throws {
        let f = try Fixture()
        let disk = try await f.newDisk("db")
        try await f.service.create(SnapshotRequest(name: "a", kind: .external), disk: disk)
        var layout = try await f.layout(disk)
        let child = layout.disk.active
        var plan = try await f.backend.planDelete("a", mode: .merge, layout: layout)
        #expect(
            plan.steps.map(\.action) == [
                .run(Qcow2Commands.commit(child, into: disk)),
                .backend(name: "merge-bitmaps-into", arguments: ["from": child, "into": disk]),
                .rename(from: disk, to: child),
            ])
        try await f.service.create(SnapshotRequest(name: "b", kind: .external), disk: disk)
        try await f.service.revert(disk: disk, to: "a")
        layout = try await f.layout(disk)
        let second = layout.disk.active
        #expect(layout.children(ofLayer: disk).map(\.image) == [child, second])
        plan = try await f.backend.planDelete("a", mode: .merge, layout: layout)
        #expect(
            plan.steps.map(\.action) == [
                .run(Qcow2Commands.rebase(child, onto: nil, backingFormat: nil)),
                .run(Qcow2Commands.rebase(second, onto: nil, backingFormat: nil)),
                .removeFile(disk),
            ])
    }
}
