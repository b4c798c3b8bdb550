import Foundation
import Synchronization
import Testing

@testable import SnapshotCore

/// The shared record's bookkeeping (generations, failed writes, a held lock) over an in-memory
/// "cluster". The real-storage tests are backends/rbd/Tests/test_shared_record.py (two vmsnap
/// installations against a Ceph cluster) and the conformance check `shared.two-hosts`.
@Suite struct SharedRecordTests {
    /// What a cluster keeps: the record, its lock, and which writes should fail.
    final class Cluster: Sendable {
        struct State {
            var document: String?
            var holder: String?
            var failWrites: Set<Int> = []
            var writes = 0
            var snapshots: Set<String> = []
        }
        let state = Mutex(State())
    }

    /// A backend whose snapshots are names in the cluster and whose record lives there too.
    struct SharedBackend: DiskSnapshotBackend {
        let cluster: Cluster
        var descriptor: BackendDescriptor {
            BackendDescriptor(
                kind: "shared-test", summary: "test",
                capabilities: CapabilityTable([Capability(.create, .internal, .offline)]), imageFormat: "raw",
                sharedMetadata: true)
        }
        func recognizes(locator: String) async -> Bool { true }
        func inspect(locator: String) async throws -> DiskInfo { DiskInfo(format: "raw", virtualSize: 1) }
        func adopt(locator: String) async throws -> DiskLayout {
            DiskLayout(
                disk: DiskRecord(id: locator, kind: kind, active: locator),
                layers: [DiskLayer(image: locator, backing: nil)])
        }
        func planCreate(_ request: SnapshotRequest, layout: DiskLayout) async throws -> Plan {
            var after = layout
            after.snapshots.append(
                DiskSnapshot(
                    name: request.name, kind: .internal, image: layout.disk.active, parent: layout.disk.current,
                    virtualSize: 1))
            after.disk.current = request.name
            return Plan(
                operation: "create \(request.name)",
                steps: [
                    PlanStep(
                        "mark", .backend(name: "add", arguments: ["name": request.name]),
                        undo: .backend(name: "remove", arguments: ["name": request.name]))
                ], pointOfNoReturn: 1, result: after)
        }
        func planRevert(to snapshot: String, layout: DiskLayout) async throws -> Plan {
            throw SnapshotError(.unsupported, "test")
        }
        func planDelete(_ snapshot: String, mode: DeleteMode, layout: DiskLayout) async throws -> Plan {
            throw SnapshotError(.unsupported, "test")
        }
        func perform(_ name: String, arguments: [String: String]) async throws {
            let snapshot = arguments["name"] ?? ""
            cluster.state.withLock {
                if name == "add" { $0.snapshots.insert(snapshot) } else { $0.snapshots.remove(snapshot) }
            }
        }
        func createDisk(named name: String, size: UInt64, in pool: BackendPool) async throws -> String { name }
        func destroyDisk(layout: DiskLayout) async throws {}
        func write(_ bytes: [UInt8], at offset: UInt64, layout: DiskLayout) async throws {}
        func read(_ view: DataView, at offset: UInt64, length: Int, layout: DiskLayout) async throws -> [UInt8] {
            []
        }
        func poolInventory(_ pool: BackendPool) async throws -> [String] { [] }

        func lockShared(disk: String, holder: String, wait: TimeInterval) async throws -> SharedLockGrant {
            try cluster.state.withLock {
                if let other = $0.holder, other != holder {
                    throw SnapshotError(.busy, "disk \(disk) is locked by \(other)")
                }
                $0.holder = holder
            }
            return SharedLockGrant()
        }
        func unlockShared(disk: String) async throws { cluster.state.withLock { $0.holder = nil } }
        func readShared(disk: String) async throws -> String? { cluster.state.withLock { $0.document } }
        func writeShared(disk: String, document: String) async throws {
            try cluster.state.withLock {
                $0.writes += 1
                if $0.failWrites.contains($0.writes) { throw SnapshotError(.io, "the cluster is down (test)") }
                $0.document = document
            }
        }
    }

    static func host(_ cluster: Cluster) throws -> (DiskSnapshotService, String) {
        let directory = NSTemporaryDirectory() + "vmsnap-shared-\(UUID().uuidString.prefix(8))"
        let registry = BackendRegistry()
        let backend = SharedBackend(cluster: cluster)
        try registry.register(BackendFactory(kind: backend.kind) { _ in backend })
        return (
            DiskSnapshotService(store: try MetadataStore(directory: directory), registry: registry, notify: { _ in }),
            directory
        )
    }

    /// Snapshot `name` of the test disk, taken by `host`.
    static func snapshot(_ host: DiskSnapshotService, _ name: String) async throws {
        try await host.create(SnapshotRequest(name: name, kind: .internal), disk: "pool/disk", kind: "shared-test")
    }

    static func names(_ service: DiskSnapshotService) async throws -> [String] {
        try await service.layout(of: "pool/disk", kind: "shared-test").1.snapshots.map(\.name)
    }

    @Test func aStepWhoseRecordCannotBeWrittenIsLeftToTheRecord() async throws {
        let cluster = Cluster()
        let ((a, dirA), (b, dirB)) = (try Self.host(cluster), try Self.host(cluster))
        defer { for d in [dirA, dirB] { try? FileManager.default.removeItem(atPath: d) } }
        try await a.create(SnapshotRequest(name: "s1", kind: .internal), disk: "pool/disk", kind: "shared-test")
        // The write after the step fails, and so does every write after it: whether the record
        // learnt of the step is unknown, so host A neither undoes nor finishes it.
        cluster.state.withLock { $0.failWrites = Set(($0.writes + 2)...($0.writes + 9)) }
        let error = await #expect(throws: SnapshotError.self) {
            try await a.create(SnapshotRequest(name: "s2", kind: .internal), disk: "pool/disk", kind: "shared-test")
        }
        #expect(error?.code == .recoveryNeeded && error?.message.contains("recover --disk") == true)
        #expect(cluster.state.withLock { $0.snapshots } == ["s1", "s2"])
        #expect(try a.store.openJournals().count == 1, "host A's copy is back to the record: the journal is open")
        // The record says the step had not run (before the point of no return): host B undoes it.
        cluster.state.withLock { $0.failWrites = [] }
        try await b.recover(disk: "pool/disk", kind: "shared-test")
        #expect(cluster.state.withLock { $0.snapshots } == ["s1"])
        let onB = try await Self.names(b), onA = try await Self.names(a)
        #expect(onB == ["s1"] && onA == ["s1"])
        let recovered = try await a.recoverAll()
        #expect(recovered.isEmpty, "host A's own entry was closed by the record")
        #expect(try a.store.openJournals().isEmpty)
    }

    @Test func aRecordThatCannotBeWrittenStopsTheOperationBeforeItActs() async throws {
        let cluster = Cluster()
        let (a, dir) = try Self.host(cluster)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try await a.create(SnapshotRequest(name: "s1", kind: .internal), disk: "pool/disk", kind: "shared-test")
        // The write that records the journal's start fails: nothing may happen to the storage.
        cluster.state.withLock { $0.failWrites = [$0.writes + 1] }
        let error = await #expect(throws: SnapshotError.self) {
            try await a.create(SnapshotRequest(name: "s2", kind: .internal), disk: "pool/disk", kind: "shared-test")
        }
        #expect(error?.message.contains("could not write the shared record") == true, "\(String(describing: error))")
        #expect(cluster.state.withLock { $0.snapshots } == ["s1"])
        #expect(try a.store.openJournals().isEmpty)
        #expect(try await Self.names(a) == ["s1"])
        #expect(cluster.state.withLock { $0.holder } == nil, "the lock is released")
    }

    @Test func aLostFinalWriteIsWrittenByTheNextCommandNotOverwritten() async throws {
        let cluster = Cluster()
        let ((a, dirA), (b, dirB)) = (try Self.host(cluster), try Self.host(cluster))
        defer { for d in [dirA, dirB] { try? FileManager.default.removeItem(atPath: d) } }
        try await a.create(SnapshotRequest(name: "s1", kind: .internal), disk: "pool/disk", kind: "shared-test")
        // The start and the step are in the record; the completion's write and the closing
        // write fail.
        cluster.state.withLock { $0.failWrites = [$0.writes + 3, $0.writes + 4] }
        await #expect(throws: SnapshotError.self) {
            try await a.create(SnapshotRequest(name: "s2", kind: .internal), disk: "pool/disk", kind: "shared-test")
        }
        #expect(cluster.state.withLock { $0.snapshots } == ["s1", "s2"])
        #expect(cluster.state.withLock { $0.document?.contains(#""stepsDone":1"#) } == true)
        // Host A's next command finds its own copy newer than the record and writes it out.
        _ = try await a.manage("pool/disk", kind: "shared-test")
        #expect(try await Self.names(b) == ["s1", "s2"])
        try await b.create(SnapshotRequest(name: "s3", kind: .internal), disk: "pool/disk", kind: "shared-test")
        let layout = try await a.manage("pool/disk", kind: "shared-test").1
        #expect(layout.snapshots.map(\.name) == ["s1", "s2", "s3"])
        #expect(layout.snapshot(named: "s3")?.parent == "s2")
    }

    @Test func aTamperedRecordIsRefusedAndNothingRuns() async throws {
        let cluster = Cluster()
        let ((a, dirA), (b, dirB)) = (try Self.host(cluster), try Self.host(cluster))
        defer { for d in [dirA, dirB] { try? FileManager.default.removeItem(atPath: d) } }
        // Host A stops after its step: the record holds an open journal.
        var stopped = a
        stopped.crashPoint = CrashPoint(.after, step: 0)
        await #expect(throws: SimulatedCrash.self) {
            try await stopped.create(
                SnapshotRequest(name: "s1", kind: .internal), disk: "pool/disk", kind: "shared-test")
        }
        let victim = dirB + "-victim"
        _ = FileManager.default.createFile(atPath: victim, contents: Data("keep".utf8))
        defer { try? FileManager.default.removeItem(atPath: victim) }
        let undo = #"{"backend":{"arguments":{"name":"s1"},"name":"remove"}}"#
        let forgeries = [
            (undo, #"{"removeFile":"\#(victim)"}"#),
            (#""active":"pool/disk""#, #""active":"pool/other""#),
        ]
        for (original, tampered) in forgeries {
            cluster.state.withLock {
                $0.document = $0.document?.replacingOccurrences(of: original, with: tampered)
                #expect($0.document?.contains(tampered) == true)
            }
            let error = await #expect(throws: SnapshotError.self) {
                try await b.recover(disk: "pool/disk", kind: "shared-test")
            }
            #expect(error?.code == .storeCorrupt, "\(String(describing: error))")
            #expect(FileManager.default.fileExists(atPath: victim))
            #expect(try b.store.openJournals().isEmpty, "nothing of the record was taken in")
            cluster.state.withLock { $0.document = $0.document?.replacingOccurrences(of: tampered, with: original) }
        }
        try await b.recover(disk: "pool/disk", kind: "shared-test")
        #expect(try await Self.names(b) == ["s1"])
    }

    @Test func aFailedFirstCommandDoesNotEraseTheRecord() async throws {
        let cluster = Cluster()
        let ((a, dirA), (b, dirB)) = (try Self.host(cluster), try Self.host(cluster))
        defer { for d in [dirA, dirB] { try? FileManager.default.removeItem(atPath: d) } }
        try await a.create(SnapshotRequest(name: "s1", kind: .internal), disk: "pool/disk", kind: "shared-test")
        let record = cluster.state.withLock { $0.document }
        // Host B, new to the disk, fails a command on it: its record stays as host A wrote it.
        await #expect(throws: SnapshotError.self) {
            try await b.revert(disk: "pool/disk", to: "nosuch", kind: "shared-test")
        }
        #expect(cluster.state.withLock { $0.document } == record)
        #expect(try await Self.names(a) == ["s1"])
    }

    @Test func aDiskLockedElsewhereIsRefusedAndNothingChanges() async throws {
        let cluster = Cluster()
        let (a, dir) = try Self.host(cluster)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        cluster.state.withLock { $0.holder = "host Z" }
        let error = await #expect(throws: SnapshotError.self) {
            try await a.create(SnapshotRequest(name: "s1", kind: .internal), disk: "pool/disk", kind: "shared-test")
        }
        #expect(error?.code == .busy && error?.message.contains("host Z") == true)
        #expect(cluster.state.withLock { $0.snapshots.isEmpty && $0.document == nil })
        #expect(try a.store.layout(diskID: "pool/disk") == nil)
    }

    /// An old copy of the record put back (an operator's restore), then written again by host A:
    /// the record's generation is again one host B synced, for another record. B must take the
    /// record's word, not write its own copy over it.
    @Test func aRestoredRecordIsNotOverwrittenByAHostThatSyncedTheSameGeneration() async throws {
        let cluster = Cluster()
        let ((a, dirA), (b, dirB)) = (try Self.host(cluster), try Self.host(cluster))
        defer { for d in [dirA, dirB] { try? FileManager.default.removeItem(atPath: d) } }
        try await Self.snapshot(a, "s1")
        let old = cluster.state.withLock { $0.document }
        try await Self.snapshot(a, "s2")
        _ = try await b.manage("pool/disk", kind: "shared-test")
        #expect(try await Self.names(b) == ["s1", "s2"])
        cluster.state.withLock { $0.document = old }
        try await Self.snapshot(a, "s3")
        #expect(try await Self.names(a) == ["s1", "s3"], "host A took the restored record's word")
        let generation = try JSONDecoder().decode(
            SharedDiskDocument.self, from: Data((cluster.state.withLock { $0.document } ?? "").utf8)
        ).generation
        #expect(
            try b.store.sharedSync(diskID: "pool/disk")?.generation == generation,
            "the case under test: host B synced this generation for another record")

        let layout = try await b.manage("pool/disk", kind: "shared-test").1
        #expect(layout.snapshots.map(\.name) == ["s1", "s3"], "host B takes the record's word too")
        let record = cluster.state.withLock { $0.document } ?? ""
        #expect(record.contains(#""s3""#) && !record.contains(#""s2""#), "the record keeps s3: \(record)")
    }

    /// Giving up on an operation is written to the record; when that write fails nothing is
    /// given up, and the error says under which id the operation is open again.
    @Test func anAbandonTheRecordDidNotTakeChangesNothing() async throws {
        let cluster = Cluster()
        let (a, dir) = try Self.host(cluster)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try await Self.snapshot(a, "s1")
        cluster.state.withLock { $0.failWrites = Set(($0.writes + 2)...($0.writes + 9)) }
        await #expect(throws: SnapshotError.self) { try await Self.snapshot(a, "s2") }
        let id = try #require(try a.store.openJournals().first?.id)
        let error = await #expect(throws: SnapshotError.self) { _ = try await a.abandon(id) }
        #expect(error?.message.contains("was not given up") == true, "\(String(describing: error))")
        #expect(cluster.state.withLock { $0.document?.contains(#""operation":"create s2""#) } == true)
        let reopened = try #require(try a.store.openJournals().first?.id)
        #expect(error?.message.contains("as journal \(reopened)") == true, "\(String(describing: error))")

        cluster.state.withLock { $0.failWrites = [] }
        #expect(try await a.abandon(reopened).operation == "create s2")
        #expect(cluster.state.withLock { $0.document?.contains(#""operation":"create s2""#) } == false)
        #expect(try a.store.openJournals().isEmpty)
    }

    @Test func aRecordFromANewerVmsnapIsRefused() async throws {
        let cluster = Cluster()
        let (a, dir) = try Self.host(cluster)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        cluster.state.withLock {
            $0.document =
                #"{"format": 9, "generation": 1, "writtenBy": "host Q", "writtenAt": 0, "content": {"journals": []}}"#
        }
        let error = await #expect(throws: SnapshotError.self) {
            try await a.create(SnapshotRequest(name: "s1", kind: .internal), disk: "pool/disk", kind: "shared-test")
        }
        #expect(error?.code == .incompatibleBackend && error?.message.contains("host Q") == true)
        #expect(cluster.state.withLock { $0.snapshots.isEmpty && $0.holder == nil })
    }
}
