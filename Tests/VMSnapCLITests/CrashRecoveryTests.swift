import Foundation
import Testing

/// Kill vmsnap (SIGKILL, through the VMSNAP_FAULT injection points) before and after every
/// journaled step of every multi-step operation, then run `vmsnap recover`: the disk must pass
/// qemu-img check, the metadata must match the storage, and no guest data may be lost.
struct CrashScenario: Sendable, CustomTestStringConvertible {
    var name: String
    var steps: Int
    var setUp: @Sendable (CLI, String) async throws -> Void
    var command: [String]
    /// Checks the disk after recovery; `completed` says whether recovery finished the operation.
    var check: @Sendable (CLI, String, CLI.Listing, Bool) async throws -> Void
    var testDescription: String { name }

    static let M = 1 << 20

    static let all: [CrashScenario] = [
        CrashScenario(
            name: "create external", steps: 1,
            setUp: { cli, disk in
                try await cli.fill(disk, 1)
            }, command: ["disk", "snapshot", "create", "DISK", "e1", "--kind", "external"],
            check: { cli, disk, l, done in
                try await cli.expectHolds(l.active, 1)
                #expect(l.snapshots.map(\.name) == (done ? ["e1"] : []))
                let files = try cli.files()
                #expect(files.count == (done ? 2 : 1), "no stray overlay: \(files)")
            }),
        CrashScenario(
            name: "create internal", steps: 1,
            setUp: { cli, disk in
                try await cli.fill(disk, 1)
            }, command: ["disk", "snapshot", "create", "DISK", "i1"],
            check: { cli, disk, l, done in
                #expect(l.snapshots.map(\.name) == (done ? ["i1"] : []))
                if done { try await cli.expectHolds(disk, 1, snapshot: "i1") }
            }),
        CrashScenario(
            name: "revert external", steps: 2,
            setUp: { cli, disk in
                try await cli.fill(disk, 1)
                try await cli.ok("disk", "snapshot", "create", disk, "e1", "--kind", "external")
                try await cli.fill(try await cli.list(disk).active, 2)
            }, command: ["disk", "snapshot", "revert", "DISK", "e1"],
            check: { cli, disk, l, done in
                try await cli.expectHolds(l.active, done ? 1 : 2)
                try await cli.expectHolds(disk, 1)
            }),
        CrashScenario(
            name: "revert internal", steps: 1,
            setUp: { cli, disk in
                try await cli.fill(disk, 1)
                try await cli.ok("disk", "snapshot", "create", disk, "i1")
                try await cli.fill(disk, 2)
            }, command: ["disk", "snapshot", "revert", "DISK", "i1"],
            check: { cli, disk, l, done in
                try await cli.expectHolds(l.active, done ? 1 : 2)
                try await cli.expectHolds(disk, 1, snapshot: "i1")
            }),
        CrashScenario(
            name: "delete by commit", steps: 2,
            setUp: { cli, disk in
                try await cli.fill(disk, 1)
                try await cli.ok("disk", "snapshot", "create", disk, "e1", "--kind", "external")
                try await cli.fill(try await cli.list(disk).active, 2, at: M)
                try await cli.ok("disk", "snapshot", "create", disk, "e2", "--kind", "external")
                try await cli.fill(try await cli.list(disk).active, 3, at: 2 * M)
            }, command: ["disk", "snapshot", "delete", "DISK", "e1"],
            check: { cli, disk, l, done in
                #expect(done, "a delete past its first step finishes")
                let e2 = try #require(l.snapshots.first { $0.name == "e2" }).image
                try await cli.expectHolds(e2, 1)
                try await cli.expectHolds(e2, 2, at: M)
                try await cli.expectHolds(l.active, 1)
                try await cli.expectHolds(l.active, 2, at: M)
                try await cli.expectHolds(l.active, 3, at: 2 * M)
            }),
        CrashScenario(
            name: "delete by rebase", steps: 3,
            setUp: { cli, disk in
                try await cli.fill(disk, 1)
                try await cli.ok("disk", "snapshot", "create", disk, "e1", "--kind", "external")
                try await cli.fill(try await cli.list(disk).active, 2, at: M)
                try await cli.ok("disk", "snapshot", "create", disk, "e2", "--kind", "external")
                try await cli.ok("disk", "snapshot", "revert", disk, "e1")
                try await cli.fill(try await cli.list(disk).active, 3, at: 2 * M)
                try await cli.ok("disk", "snapshot", "create", disk, "e3", "--kind", "external")
            }, command: ["disk", "snapshot", "delete", "DISK", "e1"],
            check: { cli, disk, l, done in
                let e2 = try #require(l.snapshots.first { $0.name == "e2" }).image
                let e3 = try #require(l.snapshots.first { $0.name == "e3" }).image
                try await cli.expectHolds(e2, 1)
                try await cli.expectHolds(e2, 2, at: M)
                try await cli.expectHolds(e2, 0, at: 2 * M)
                try await cli.expectHolds(e3, 1)
                try await cli.expectHolds(e3, 0, at: M)
                try await cli.expectHolds(e3, 3, at: 2 * M)
                try await cli.expectHolds(l.active, 1)
                try await cli.expectHolds(l.active, 3, at: 2 * M)
                #expect(l.snapshots.map(\.name).sorted() == (done ? ["e2", "e3"] : ["e1", "e2", "e3"]))
            }),
        CrashScenario(
            name: "delete subtree", steps: 1,
            setUp: { cli, disk in
                try await cli.fill(disk, 1)
                try await cli.ok("disk", "snapshot", "create", disk, "e1", "--kind", "external")
                try await cli.fill(try await cli.list(disk).active, 2)
                try await cli.ok("disk", "snapshot", "create", disk, "e2", "--kind", "external")
                try await cli.ok("disk", "snapshot", "revert", disk, "e1")
            }, command: ["disk", "snapshot", "delete", "DISK", "e2", "--children"],
            check: { cli, disk, l, done in
                #expect(l.snapshots.map(\.name) == (done ? ["e1"] : ["e1", "e2"]))
                try await cli.expectHolds(l.active, 1)
            }),
    ]

    static var cases: [(CrashScenario, String)] {
        all.flatMap { s in (0..<s.steps).flatMap { i in [(s, "before-step:\(i)"), (s, "after-step:\(i)")] } }
    }
}

@Suite("Crash recovery", .enabled(if: hasQemuIO, "needs qemu-io"))
struct CrashRecoveryTests {
    @Test(
        "killed at a journaled step, then recovered: images check, metadata matches, data intact",
        arguments: CrashScenario.cases)
    func killAndRecover(scenario: CrashScenario, fault: String) async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        try await scenario.setUp(cli, disk)
        let command = scenario.command.map { $0 == "DISK" ? disk : $0 }
        let killed = try await cli.run(command, fault: fault)
        #expect(killed.status == 128 + 9, "expected SIGKILL at \(fault), got status \(killed.status): \(killed.err)")
        let pending = try await cli.run(["disk", "check", disk])
        #expect(
            pending.status == 1 && pending.out.contains("vmsnap recover"),
            "check reports the pending operation: \(pending.out)")
        let recovered = try await cli.ok("recover")
        let completed = recovered.contains("completed:")
        #expect(completed || recovered.contains("rolled-back:"), "\(recovered)")
        #expect(try await cli.ok("recover").contains("nothing to recover"))
        try await cli.ok("disk", "check", disk)
        try await scenario.check(cli, disk, try await cli.list(disk), completed)
    }

    @Test("the next command on the disk recovers an interrupted operation by itself")
    func nextCommandRecovers() async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        try await cli.fill(disk, 1)
        let killed = try await cli.run(
            ["disk", "snapshot", "create", disk, "e1", "--kind", "external"], fault: "after-step:0")
        #expect(killed.status == 137)
        let r = try await cli.run(["disk", "snapshot", "create", disk, "e2", "--kind", "external"])
        #expect(r.status == 0 && r.err.contains("recovered an interrupted"), "\(r.err)")
        let listing = try await cli.list(disk)
        #expect(listing.snapshots.map(\.name) == ["e1", "e2"])
        try await cli.ok("disk", "check", disk)
    }
}
