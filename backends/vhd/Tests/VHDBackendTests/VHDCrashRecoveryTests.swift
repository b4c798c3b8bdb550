import Foundation
import SnapshotCore
import Testing
@testable import VHDBackend

/// Every VHD operation stopped after each of its steps (as a crash would leave it: journaled,
/// k steps done), then recovered: the images check clean, the metadata matches the files, and
/// every surviving snapshot reads what it read before.
@Suite("VHD crash recovery")
struct VHDCrashRecoveryTests {
    struct Scenario: Sendable, CustomTestStringConvertible {
        var name: String
        var setUp: @Sendable (DiskSnapshotService, VHDBackend, String) async throws -> Void
        var plan: @Sendable (VHDBackend, DiskLayout) async throws -> Plan
        var testDescription: String { name }
    }

    static func write(
        _ svc: DiskSnapshotService, _ backend: VHDBackend, _ disk: String, _ seed: UInt64, at offset: UInt64
    ) async throws {
        try await backend.write(pattern(seed, 64 << 10), at: offset, layout: try await svc.layout(of: disk).1)
    }

    static let scenarios: [Scenario] = [
        Scenario(
            name: "create", setUp: { svc, b, d in try await write(svc, b, d, 1, at: 0) },
            plan: { b, l in try await b.planCreate(SnapshotRequest(name: "new", kind: .external), layout: l) }),
        Scenario(
            name: "revert",
            setUp: { svc, b, d in
                try await write(svc, b, d, 1, at: 0)
                try await svc.create(SnapshotRequest(name: "e1", kind: .external), disk: d)
                try await write(svc, b, d, 2, at: 0)
            }, plan: { b, l in try await b.planRevert(to: "e1", layout: l) }),
        Scenario(
            name: "delete by coalesce",
            setUp: { svc, b, d in
                try await write(svc, b, d, 1, at: 0)
                try await svc.create(SnapshotRequest(name: "e1", kind: .external), disk: d)
                try await write(svc, b, d, 2, at: 3 << 20)
                try await svc.create(SnapshotRequest(name: "e2", kind: .external), disk: d)
                try await write(svc, b, d, 3, at: 5 << 20)
                try await svc.create(SnapshotRequest(name: "e3", kind: .external), disk: d)
            }, plan: { b, l in try await b.planDelete("e2", mode: .merge, layout: l) }),
        Scenario(
            name: "delete by rebase",
            setUp: { svc, b, d in
                try await write(svc, b, d, 1, at: 0)
                try await svc.create(SnapshotRequest(name: "e1", kind: .external), disk: d)
                try await write(svc, b, d, 2, at: 3 << 20)
                try await svc.create(SnapshotRequest(name: "e2", kind: .external), disk: d)
                try await svc.revert(disk: d, to: "e1")
                try await write(svc, b, d, 3, at: 5 << 20)
                try await svc.create(SnapshotRequest(name: "e3", kind: .external), disk: d)
            }, plan: { b, l in try await b.planDelete("e1", mode: .merge, layout: l) }),
    ]

    static var cases: [(Scenario, Int)] {
        // Each scenario's step count is known from its plan; 0...4 covers every prefix here.
        scenarios.flatMap { s in (0...4).map { (s, $0) } }
    }

    @Test("stopped after k steps, recovered, data intact", arguments: cases)
    func stopAndRecover(scenario: Scenario, stepsDone: Int) async throws {
        let root = try scratch("crash")
        let svc = try service(root)
        let backend = VHDBackend(settings: ["engine": "native"])
        let disk = root + "/pool/vm.vhd"
        try VHDEngine.createDynamic(disk, size: 8 << 20)
        try await scenario.setUp(svc, backend, disk)
        let before = try await svc.layout(of: disk).1
        if try svc.store.layout(diskID: before.disk.id) == nil { try svc.store.insert(before) }
        let plan = try await scenario.plan(backend, before)
        guard stepsDone <= plan.steps.count else { return }
        // What every snapshot and the active disk read before the operation, where data was
        // written (and one region never written).
        func contents(_ layout: DiskLayout) async throws -> [String: [UInt8]] {
            func regions(_ view: DataView) async throws -> [UInt8] {
                var bytes: [UInt8] = []
                for at: UInt64 in [0, 3 << 20, 5 << 20, 7 << 20] {
                    bytes += try await backend.read(view, at: at, length: 64 << 10, layout: layout)
                }
                return bytes
            }
            var out: [String: [UInt8]] = [:]
            for s in layout.snapshots { out[s.name] = try await regions(.snapshot(s.name)) }
            out["(active)"] = try await regions(.active)
            return out
        }
        let expected = try await contents(before)
        // The crash: journaled, `stepsDone` steps run, nothing after.
        let id = try svc.store.beginJournal(
            diskID: before.disk.id, kind: backend.kind, plan: plan, change: LayoutChange.between(before, plan.result))
        let executor = PlanExecutor(store: svc.store, runner: SubprocessRunner())
        for step in plan.steps.prefix(stepsDone) { try await executor.perform(step.action, backend: backend) }
        try svc.store.markSteps(journal: id, done: stepsDone)
        let reports = try await svc.recoverAll()
        #expect(reports.count == 1 && reports[0].outcome != .skipped)
        let after = try await svc.layout(of: disk).1
        let problems = try await backend.verify(layout: after)
        #expect(problems.isEmpty, "\(problems)")
        let got = try await contents(after)
        for (name, bytes) in got
        where expected[name] != nil
            && (name != "(active)" || reports[0].outcome == .rolledBack || scenario.name != "revert")
        {
            let same = bytes == expected[name]
            #expect(same, "\(name) changed (\(scenario.name), \(stepsDone) steps, \(reports[0].outcome))")
        }
        if scenario.name == "revert", reports[0].outcome == .completed {
            let same = got["(active)"] == expected["e1"]
            #expect(same, "after a completed revert the disk reads e1")
        }
        if scenario.name == "create", reports[0].outcome == .completed {
            let same = got["new"] == expected["(active)"]
            #expect(same, "the new snapshot reads what the disk read")
        }
        let files = try FileManager.default.contentsOfDirectory(atPath: root + "/pool").filter {
            !$0.hasSuffix(".vmsnap-new")
        }
        #expect(Set(files.map { root + "/pool/" + $0 }) == Set(after.layers.map(\.image)), "no stray files: \(files)")
    }
}
