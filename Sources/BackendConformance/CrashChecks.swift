import Foundation
import SnapshotCore

/// Crash checks: every multi-step operation is stopped before and after each of its steps as a
/// killed vmsnap would stop (the journal as it was, nothing rolled back), then recovered. After
/// recovery the images pass the backend's checks, no journal is open, the metadata matches the
/// storage, the data is either all before or all after the operation, and a rolled-back
/// operation leaves the pool as it found it. Every backend and plug-in gets them from
/// `vmsnap backend test KIND --crash`.
enum CrashChecks {
    /// One operation to interrupt: how to prepare the disk, how many steps its plan has, the
    /// operation itself, and what must hold after recovery (`completed` or rolled back).
    struct Scenario: Sendable {
        var name: String
        var summary: String
        var requires: [Capability]
        var setUp: @Sendable (ConformanceContext) async throws -> Void
        var plan: @Sendable (ConformanceContext) async throws -> Plan
        var operation: @Sendable (DiskSnapshotService, ConformanceContext) async throws -> Void
        var check: @Sendable (ConformanceContext, Bool) async throws -> Void
    }

    static let M: UInt64 = 1 << 20

    static func bytes(_ seed: UInt64) -> [UInt8] { ConformanceContext.pattern(seed: seed, length: 64 << 10) }

    static var all: [ConformanceCheck] { SnapshotKind.allCases.flatMap(scenarios).map(check) }

    static func scenarios(_ kind: SnapshotKind) -> [Scenario] {
        let k = kind.rawValue
        let cap = { (op: SnapshotOperation) in Capability(op, kind, .offline) }
        return [
            Scenario(
                name: "crash.\(k).create", summary: "\(k) create stopped at every step, then recovered",
                requires: [cap(.create)],
                setUp: { c in try await c.write(seed: 1) },
                plan: { c in try await c.backend.planCreate(SnapshotRequest(name: "s1", kind: kind), layout: c.layout())
                },
                operation: { svc, c in
                    try await svc.create(SnapshotRequest(name: "s1", kind: kind), disk: c.disk, kind: c.backend.kind)
                },
                check: { c, done in
                    try await c.expect(.active, equals: bytes(1), "the active disk")
                    let names = try await c.layout().snapshots.map(\.name)
                    try c.require(
                        names == (done ? ["s1"] : []),
                        "snapshots after recovery: \(names) (operation \(done ? "completed" : "rolled back"))")
                    if done { try await c.expect(.snapshot("s1"), equals: bytes(1), "snapshot s1") }
                }),
            Scenario(
                name: "crash.\(k).revert", summary: "\(k) revert stopped at every step, then recovered",
                requires: [cap(.create), cap(.revert)],
                setUp: { c in
                    try await c.write(seed: 1)
                    try await c.snapshot("s1", kind)
                    try await c.write(seed: 2)
                },
                plan: { c in try await c.backend.planRevert(to: "s1", layout: c.layout()) },
                operation: { svc, c in try await svc.revert(disk: c.disk, to: "s1", kind: c.backend.kind) },
                check: { c, done in
                    try await c.expect(
                        .active, equals: bytes(done ? 1 : 2),
                        "the active disk (revert \(done ? "completed" : "rolled back"))")
                    try await c.expect(.snapshot("s1"), equals: bytes(1), "snapshot s1")
                }),
            Scenario(
                name: "crash.\(k).delete",
                summary: "\(k) delete of a chain's middle stopped at every step, then recovered",
                requires: [cap(.create), cap(.delete)],
                setUp: { c in
                    try await c.write(seed: 1)
                    try await c.snapshot("s1", kind)
                    try await c.write(seed: 2, at: M)
                    try await c.snapshot("s2", kind)
                    try await c.write(seed: 3, at: 2 * M)
                },
                plan: { c in try await c.backend.planDelete("s1", mode: .merge, layout: c.layout()) },
                operation: { svc, c in
                    try await svc.delete(disk: c.disk, snapshot: "s1", mode: .merge, kind: c.backend.kind)
                },
                check: { c, done in
                    try await c.expect(.snapshot("s2"), equals: bytes(1), "snapshot s2 at 0")
                    try await c.expect(.snapshot("s2"), at: M, equals: bytes(2), "snapshot s2 at 1 MiB")
                    for (seed, offset) in [(UInt64(1), UInt64(0)), (2, M), (3, 2 * M)] {
                        try await c.expect(.active, at: offset, equals: bytes(seed), "the active disk at \(offset)")
                    }
                    let names = try await c.layout().snapshots.map(\.name).sorted()
                    try c.require(names == (done ? ["s2"] : ["s1", "s2"]), "snapshots after recovery: \(names)")
                    if !done { try await c.expect(.snapshot("s1"), equals: bytes(1), "snapshot s1") }
                }),
            Scenario(
                name: "crash.\(k).delete-subtree",
                summary: "\(k) delete of a branch with its children stopped at every step, then recovered",
                requires: [cap(.create), cap(.revert), cap(.deleteSubtree)],
                setUp: { c in
                    try await c.write(seed: 1)
                    try await c.snapshot("s1", kind)
                    try await c.write(seed: 2)
                    try await c.snapshot("s2", kind)
                    try await c.revert("s1")
                },
                plan: { c in try await c.backend.planDelete("s2", mode: .children, layout: c.layout()) },
                operation: { svc, c in
                    try await svc.delete(disk: c.disk, snapshot: "s2", mode: .children, kind: c.backend.kind)
                },
                check: { c, done in
                    try await c.expect(.active, equals: bytes(1), "the active disk")
                    try await c.expect(.snapshot("s1"), equals: bytes(1), "snapshot s1")
                    let names = try await c.layout().snapshots.map(\.name).sorted()
                    try c.require(names == (done ? ["s1"] : ["s1", "s2"]), "snapshots after recovery: \(names)")
                    if !done { try await c.expect(.snapshot("s2"), equals: bytes(2), "snapshot s2") }
                }),
        ]
    }

    /// The scenario as one check: one fresh disk per crash point.
    static func check(_ scenario: Scenario) -> ConformanceCheck {
        ConformanceCheck(scenario.name, scenario.summary, requires: scenario.requires) { c in
            try await scenario.setUp(c)
            let steps = try await scenario.plan(c).steps.count
            for step in 0..<steps {
                for phase in [FaultInjection.Phase.before, .after] {
                    try await interrupt(scenario, at: CrashPoint(phase, step: step), template: c)
                }
            }
        }
    }

    static func interrupt(_ scenario: Scenario, at point: CrashPoint, template c: ConformanceContext) async throws {
        let context = try await ConformanceContext(
            backend: c.backend, pool: c.pool, diskSize: c.diskSize, checkName: "\(scenario.name)-\(point)")
        do {
            try await scenario.setUp(context)
            let before = try await context.backend.poolInventory(context.pool)
            var crashing = context.service
            crashing.crashPoint = point
            do {
                try await scenario.operation(crashing, context)
                throw ConformanceFailure("at \(point): the operation finished without reaching the crash point")
            } catch is SimulatedCrash {}
            let reports = try await context.service.recoverAll()
            try context.require(
                reports.count == 1, "at \(point): recovery handled \(reports.count) operations, expected 1: \(reports)")
            let outcome = reports[0].outcome
            try context.require(
                outcome == .completed || outcome == .rolledBack,
                "at \(point): recovery ended \(outcome.rawValue): \(reports[0].detail ?? "")")
            try context.require(
                try context.service.store.openJournals().isEmpty, "at \(point): a journal is still open after recovery")
            try await context.verifyAll()
            try await scenario.check(context, outcome == .completed)
            if outcome == .rolledBack {
                let after = try await context.backend.poolInventory(context.pool)
                try context.require(
                    before == after, "at \(point): rolled back, but the pool changed: \(before) -> \(after)")
            }
        } catch let failure as ConformanceFailure {
            await context.cleanUp()
            throw failure.message.hasPrefix("at ") ? failure : ConformanceFailure("at \(point): \(failure.message)")
        } catch {
            await context.cleanUp()
            throw ConformanceFailure("at \(point): \(error)")
        }
        await context.cleanUp()
    }
}
