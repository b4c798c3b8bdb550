import BackendConformance
import Foundation
import Qcow2Backend
import SnapshotCore
import Testing

@Suite("qcow2 conformance")
struct Qcow2ConformanceTests {
    @Test(
        "the qcow2 backend passes every conformance check, skipping none but the shared-record and storage-changes ones"
    )
    func passesSuite() async throws {
        let fixture = try Fixture()
        let results = await ConformanceSuite(backend: Qcow2Backend(), pool: BackendPool(directory: fixture.pool)).run()
        // qcow2 files are one host's: their record lives in its store, so `shared.*` does not apply;
        // changed blocks come from dirty bitmaps (checkpoints), not from the storage (`changes.*`).
        for r in results
        where r.outcome == .failed
            || (r.outcome == .skipped && !r.check.hasPrefix("shared.") && !r.check.hasPrefix("changes."))
        {
            Issue.record("\(r.check): \(r.outcome.rawValue): \(r.detail ?? "")")
        }
        #expect(results.count == ConformanceSuite.checks.count)
        #expect(try fixture.inventory().isEmpty, "checks leave no disks behind")
    }

    /// Reverts that only move metadata: the suite must notice that the bytes did not come back.
    struct RevertDoesNothing: DiskSnapshotBackend {
        let real = Qcow2Backend()
        var descriptor: BackendDescriptor { real.descriptor }
        func normalize(locator: String) -> String { real.normalize(locator: locator) }
        func recognizes(locator: String) async -> Bool { await real.recognizes(locator: locator) }
        func inspect(locator: String) async throws -> DiskInfo { try await real.inspect(locator: locator) }
        func adopt(locator: String) async throws -> DiskLayout { try await real.adopt(locator: locator) }
        func planCreate(_ r: SnapshotRequest, layout: DiskLayout) async throws -> Plan {
            try await real.planCreate(r, layout: layout)
        }
        func planRevert(to s: String, layout: DiskLayout) async throws -> Plan {
            var result = layout
            result.disk.current = s
            return Plan(operation: "fake revert", steps: [], result: result)
        }
        func planDelete(_ s: String, mode: DeleteMode, layout: DiskLayout) async throws -> Plan {
            try await real.planDelete(s, mode: mode, layout: layout)
        }
        func perform(_ name: String, arguments: [String: String]) async throws {
            try await real.perform(name, arguments: arguments)
        }
        func verify(layout: DiskLayout) async throws -> [String] { try await real.verify(layout: layout) }
        func createDisk(named n: String, size: UInt64, in p: BackendPool) async throws -> String {
            try await real.createDisk(named: n, size: size, in: p)
        }
        func destroyDisk(layout: DiskLayout) async throws { try await real.destroyDisk(layout: layout) }
        func write(_ b: [UInt8], at o: UInt64, layout: DiskLayout) async throws {
            try await real.write(b, at: o, layout: layout)
        }
        func read(_ v: DataView, at o: UInt64, length: Int, layout: DiskLayout) async throws -> [UInt8] {
            try await real.read(v, at: o, length: length, layout: layout)
        }
        func poolInventory(_ p: BackendPool) async throws -> [String] { try await real.poolInventory(p) }
    }

    @Test("a backend whose revert does not restore bytes fails the revert checks")
    func catchesBrokenRevert() async throws {
        let fixture = try Fixture()
        let results = await ConformanceSuite(backend: RevertDoesNothing(), pool: BackendPool(directory: fixture.pool))
            .run(filter: ["internal.revert", "external.revert"])
        let failed = Set(results.filter { $0.outcome == .failed }.map(\.check))
        #expect(failed.isSuperset(of: ["internal.revert", "external.revert"]), "failed: \(failed)")
        #expect(results.first { $0.check == "internal.revert" }?.detail?.contains("bytes differ") == true)
    }

    /// Advertises nothing: every check is skipped, none fails.
    struct AdvertisesNothing: DiskSnapshotBackend {
        let real = Qcow2Backend()
        var descriptor: BackendDescriptor {
            BackendDescriptor(kind: "qcow2", summary: "", capabilities: CapabilityTable([]), imageFormat: "qcow2")
        }
        func recognizes(locator: String) async -> Bool { false }
        func inspect(locator: String) async throws -> DiskInfo { try await real.inspect(locator: locator) }
        func adopt(locator: String) async throws -> DiskLayout { try await real.adopt(locator: locator) }
        func planCreate(_ r: SnapshotRequest, layout: DiskLayout) async throws -> Plan {
            throw SnapshotError(.unsupported, "no")
        }
        func planRevert(to s: String, layout: DiskLayout) async throws -> Plan {
            throw SnapshotError(.unsupported, "no")
        }
        func planDelete(_ s: String, mode: DeleteMode, layout: DiskLayout) async throws -> Plan {
            throw SnapshotError(.unsupported, "no")
        }
        func createDisk(named n: String, size: UInt64, in p: BackendPool) async throws -> String {
            try await real.createDisk(named: n, size: size, in: p)
        }
        func destroyDisk(layout: DiskLayout) async throws { try await real.destroyDisk(layout: layout) }
        func write(_ b: [UInt8], at o: UInt64, layout: DiskLayout) async throws {}
        func read(_ v: DataView, at o: UInt64, length: Int, layout: DiskLayout) async throws -> [UInt8] { [] }
        func poolInventory(_ p: BackendPool) async throws -> [String] { [] }
    }

    @Test("checks are skipped only for capabilities the backend does not advertise")
    func skipsUnadvertised() async throws {
        let fixture = try Fixture()
        let results = await ConformanceSuite(backend: AdvertisesNothing(), pool: BackendPool(directory: fixture.pool))
            .run()
        #expect(
            results.allSatisfy { $0.outcome == .skipped }, "\(results.filter { $0.outcome != .skipped }.map(\.check))")
    }
}
