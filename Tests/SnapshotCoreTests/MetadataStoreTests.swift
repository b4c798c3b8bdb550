import Foundation
import Synchronization
import SnapshotCore
import Testing

func scratchDirectory(_ tag: String = "t") -> String {
    let dir = (NSTemporaryDirectory() as NSString).appendingPathComponent(
        "vmsnap-\(tag)-\(UUID().uuidString.prefix(8))")
    try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

@Suite("Metadata store")
struct MetadataStoreTests {
    func sampleLayout(_ id: String = "/pool/vm.qcow2") -> DiskLayout {
        DiskLayout(
            disk: DiskRecord(id: id, kind: "qcow2", active: id, current: "b"),
            snapshots: [
                DiskSnapshot(name: "a", kind: .internal, image: id, virtualSize: 1 << 20),
                DiskSnapshot(
                    name: "b", kind: .internal, image: id, parent: "a", description: "second", virtualSize: 1 << 20),
            ],
            layers: [DiskLayer(image: id, backing: nil)])
    }

    @Test("a layout round-trips, and only changed rows are rewritten")
    func roundTrip() throws {
        let store = try MetadataStore(directory: scratchDirectory())
        let layout = sampleLayout()
        try store.insert(layout)
        #expect(try store.layout(diskID: layout.disk.id) == layout)
        var after = layout
        after.snapshots.removeAll { $0.name == "a" }
        after.snapshots[0].parent = nil
        after.snapshots.append(
            DiskSnapshot(name: "c", kind: .external, image: "/pool/vm.qcow2", parent: "b", virtualSize: 1 << 20))
        after.layers.append(DiskLayer(image: "/pool/vm.c.qcow2", backing: "/pool/vm.qcow2"))
        after.disk.active = "/pool/vm.c.qcow2"
        after.disk.current = "c"
        try store.update(from: layout, to: after)
        #expect(try store.layout(diskID: layout.disk.id) == after)
        #expect(try store.findDisk(locator: "/pool/vm.c.qcow2")?.disk.id == layout.disk.id, "found by a layer")
        #expect(try store.findDisk(locator: "/elsewhere") == nil)
        #expect(throws: SnapshotError.self) { try store.insert(layout) }
    }

    @Test("the journal records the steps, the row change and progress; completing applies the change")
    func journal() throws {
        let store = try MetadataStore(directory: scratchDirectory())
        let before = sampleLayout()
        try store.insert(before)
        var after = before
        after.disk.current = "a"
        after.snapshots.removeAll { $0.name == "b" }
        let plan = Plan(
            operation: "demo", steps: [PlanStep("one", .removeFile("/nonexistent"))], pointOfNoReturn: 0, result: after)
        let change = LayoutChange.between(before, after)
        #expect(
            change.removeSnapshots == ["b"] && change.upsertSnapshots.isEmpty, "only the changed rows are journaled")
        let id = try store.beginJournal(diskID: before.disk.id, kind: "qcow2", plan: plan, change: change)
        try store.markSteps(journal: id, done: 1)
        let open = try store.openJournals(diskID: before.disk.id)
        #expect(
            open.count == 1 && open[0].stepsDone == 1 && open[0].steps == plan.steps && open[0].change == change
                && open[0].pointOfNoReturn == 0)
        try store.completeJournal(id, change: change, stepCount: 1)
        #expect(try store.openJournals().isEmpty)
        #expect(try store.layout(diskID: before.disk.id) == after)
    }

    @Test(
        "a file that is not a database is reported, not overwritten",
        arguments: [
            Array("this is not sqlite at all, just text".utf8),
            Array(repeating: UInt8(0xff), count: 8192),
        ])
    func corruptStore(garbage: [UInt8]) throws {
        let dir = scratchDirectory()
        let path = (dir as NSString).appendingPathComponent(MetadataStore.databaseName)
        _ = FileManager.default.createFile(atPath: path, contents: Data(garbage))
        let error = try #require(throws: SnapshotError.self) { try MetadataStore(directory: dir) }
        #expect(error.code == .storeCorrupt)
        #expect(error.message.contains(path) && error.message.contains("nothing was changed"))
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == Data(garbage))
    }

    @Test("two store handles writing at once lose nothing")
    func concurrentWriters() async throws {
        let dir = scratchDirectory()
        _ = try MetadataStore(directory: dir)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for writer in 0..<2 {
                group.addTask {
                    let store = try MetadataStore(directory: dir)
                    for i in 0..<40 { try store.insert(sampleLayout("/pool/w\(writer)-\(i).qcow2")) }
                }
            }
            try await group.waitForAll()
        }
        #expect(try MetadataStore(directory: dir).disks().count == 80)
    }

    @Test("a disk lock excludes a second holder until released")
    func diskLock() throws {
        let store = try MetadataStore(directory: scratchDirectory())
        var first: DiskLock? = try DiskLock(store: store, diskID: "/pool/x")
        let error = try #require(throws: SnapshotError.self) {
            try DiskLock(store: store, diskID: "/pool/x", timeout: 0.1)
        }
        #expect(error.code == .busy)
        _ = try DiskLock(store: store, diskID: "/pool/other", timeout: 0)
        withExtendedLifetime(first) {}
        first = nil
        _ = try DiskLock(store: store, diskID: "/pool/x", timeout: 0)
    }

    /// A refused lock once closed its descriptor twice (in init, then in deinit), closing whatever
    /// another thread had opened with that number meanwhile: an SQLite store in a test beside it
    /// failed with "disk I/O error".
    @Test("a refused disk lock closes only its own descriptor")
    func refusedLockClosesOnce() throws {
        let store = try MetadataStore(directory: scratchDirectory())
        let held = try DiskLock(store: store, diskID: "/pool/x")
        let stop = Mutex(false)
        let lost = Mutex(0)
        let watcher = Thread {
            while !stop.withLock({ $0 }) {
                let fd = open("/dev/null", O_RDONLY | O_CLOEXEC)
                guard fd >= 0 else { continue }
                for _ in 0..<50 where fcntl(fd, F_GETFD) < 0 { lost.withLock { $0 += 1 } }
                if fcntl(fd, F_GETFD) >= 0 { close(fd) } else { lost.withLock { $0 += 1 } }
            }
        }
        watcher.start()
        for _ in 0..<3000 {
            _ = try? DiskLock(store: store, diskID: "/pool/x", timeout: 0)
        }
        stop.withLock { $0 = true }
        while !watcher.isFinished { usleep(1000) }
        withExtendedLifetime(held) {}
        #expect(lost.withLock { $0 } == 0, "another thread's descriptor was closed under it")
    }

    @Test("the store directory comes from the flag, then VMSNAP_STORE, then the default")
    func storeResolution() throws {
        #expect(try MetadataStore.resolveDirectory(flag: "/a", environment: ["VMSNAP_STORE": "/b"]) == "/a")
        #expect(try MetadataStore.resolveDirectory(flag: nil, environment: ["VMSNAP_STORE": "/b"]) == "/b")
        #expect(try MetadataStore.resolveDirectory(flag: nil, environment: [:]) == "/var/lib/vmsnap")
        let empty = #expect(throws: SnapshotError.self) {
            try MetadataStore.resolveDirectory(flag: "", environment: ["VMSNAP_STORE": "/b"])
        }
        #expect(empty?.message.contains("--store is empty") == true)
    }
}
