import Foundation
import SnapshotCore
import Testing

/// Plans made of real file actions and real commands: the executor's rollback and recovery.
@Suite("Plan executor")
struct PlanExecutorTests {
    func setUp() throws -> (MetadataStore, PlanExecutor, DiskLayout, String) {
        let dir = scratchDirectory("exec")
        let store = try MetadataStore(directory: (dir as NSString).appendingPathComponent("store"))
        let layout = DiskLayout(disk: DiskRecord(id: dir + "/disk", kind: "none", active: dir + "/disk"))
        try store.insert(layout)
        return (store, PlanExecutor(store: store, runner: SubprocessRunner()), layout, dir)
    }

    @Test("a failure before the point of no return undoes the steps already run and changes no metadata")
    func rollbackBeforePointOfNoReturn() async throws {
        let (store, executor, layout, dir) = try setUp()
        let made = dir + "/made-by-step-1"
        var result = layout
        result.disk.current = "never"
        let plan = Plan(operation: "doomed", steps: [
            PlanStep("make a file", .run(["touch", made]), undo: .removeFile(made)),
            PlanStep("fail", .run(["false"])),
        ], result: result)
        await #expect(throws: CommandError.self) { try await executor.execute(plan, before: layout, backend: InertBackend(kind: "none")) }
        #expect(!FileManager.default.fileExists(atPath: made))
        #expect(try store.layout(diskID: layout.disk.id) == layout)
        #expect(try store.openJournals().isEmpty)
    }

    @Test("a failure past the point of no return leaves the journal open, and recovery finishes the plan")
    func rollForwardAfterPointOfNoReturn() async throws {
        let (store, executor, layout, dir) = try setUp()
        let a = dir + "/a", b = dir + "/b", gate = dir + "/gate"
        _ = FileManager.default.createFile(atPath: a, contents: Data("payload".utf8))
        var result = layout
        result.disk.active = b
        let plan = Plan(operation: "move", steps: [
            PlanStep("rename", .rename(from: a, to: b)),
            PlanStep("needs the gate file", .run(["test", "-e", gate])),
        ], pointOfNoReturn: 0, result: result)
        let error = try await #require(throws: SnapshotError.self) { try await executor.execute(plan, before: layout, backend: InertBackend(kind: "none")) }
        #expect(error.code == .recoveryNeeded && error.message.contains("vmsnap recover"))
        let open = try store.openJournals()
        #expect(open.count == 1 && open[0].stepsDone == 1)
        _ = FileManager.default.createFile(atPath: gate, contents: nil)
        let report = try await executor.recover(open[0], backend: InertBackend(kind: "none"))
        #expect(report.outcome == .completed)
        #expect(try store.layout(diskID: layout.disk.id)?.disk.active == b)
        #expect(try String(contentsOfFile: b, encoding: .utf8) == "payload")
        #expect(try store.openJournals().isEmpty)
    }

    @Test("steps are idempotent: rename and remove run twice without harm")
    func idempotentSteps() async throws {
        let (_, executor, _, dir) = try setUp()
        let a = dir + "/x", b = dir + "/y"
        _ = FileManager.default.createFile(atPath: a, contents: Data("1".utf8))
        for _ in 0..<2 { try await executor.perform(.rename(from: a, to: b), backend: InertBackend(kind: "none")) }
        #expect(FileManager.default.fileExists(atPath: b) && !FileManager.default.fileExists(atPath: a))
        for _ in 0..<2 { try await executor.perform(.removeFile(b), backend: InertBackend(kind: "none")) }
        #expect(!FileManager.default.fileExists(atPath: b))
        await #expect(throws: SnapshotError.self) { try await executor.perform(.rename(from: dir + "/none", to: dir + "/none2"), backend: InertBackend(kind: "none")) }
    }
}
