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
        let plan = Plan(
            operation: "doomed",
            steps: [
                PlanStep("make a file", .run(["touch", made]), undo: .removeFile(made)),
                PlanStep("fail", .run(["false"])),
            ], result: result)
        let error = await #expect(throws: SnapshotError.self) {
            try await executor.execute(plan, before: layout, backend: InertBackend(kind: "none"))
        }
        #expect(
            error?.code == .commandFailed && error?.message.contains("backend 'none', step 2 of 2 (fail)") == true,
            "\(String(describing: error))")
        #expect(error?.cause is CommandError, "the command's own error is kept as the cause")
        #expect(!FileManager.default.fileExists(atPath: made))
        #expect(try store.layout(diskID: layout.disk.id) == layout)
        #expect(try store.openJournals().isEmpty)
    }

    @Test("an undo that fails too keeps the journal open, and recovery finishes the undo once it can")
    func failedUndoKeepsTheJournal() async throws {
        let (store, executor, layout, dir) = try setUp()
        let made = dir + "/made", gate = dir + "/gate"
        var result = layout
        result.disk.current = "never"
        // The undo needs the gate file, as an undo needs storage that stopped answering.
        let plan = Plan(
            operation: "doomed",
            steps: [
                PlanStep("make a file", .run(["touch", made]), undo: .run(["test", "-e", gate])),
                PlanStep("fail", .run(["false"])),
            ], result: result)
        let error = try await #require(throws: SnapshotError.self) {
            try await executor.execute(plan, before: layout, backend: InertBackend(kind: "none"))
        }
        #expect(error.code == .recoveryNeeded && error.message.contains("undoing it failed too"), "\(error)")
        let open = try store.openJournals()
        #expect(open.count == 1, "the journal stays open for the undo")
        await #expect(throws: SnapshotError.self) {
            try await executor.recover(open[0], backend: InertBackend(kind: "none"))
        }
        #expect(try store.openJournals().count == 1, "a recovery whose undo fails keeps it open too")
        _ = FileManager.default.createFile(atPath: gate, contents: nil)
        let report = try await executor.recover(open[0], backend: InertBackend(kind: "none"))
        #expect(report.outcome == .rolledBack)
        #expect(try store.openJournals().isEmpty)
        #expect(try store.layout(diskID: layout.disk.id) == layout)
    }

    @Test("a failure past the point of no return leaves the journal open, and recovery finishes the plan")
    func rollForwardAfterPointOfNoReturn() async throws {
        let (store, executor, layout, dir) = try setUp()
        let a = dir + "/a", b = dir + "/b", gate = dir + "/gate"
        _ = FileManager.default.createFile(atPath: a, contents: Data("payload".utf8))
        var result = layout
        result.disk.active = b
        let plan = Plan(
            operation: "move",
            steps: [
                PlanStep("rename", .rename(from: a, to: b)),
                PlanStep("needs the gate file", .run(["test", "-e", gate])),
            ], pointOfNoReturn: 0, result: result)
        let error = try await #require(throws: SnapshotError.self) {
            try await executor.execute(plan, before: layout, backend: InertBackend(kind: "none"))
        }
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

    @Test(
        "a step that reports pending past the point of no return keeps the journal open and the old layout; recovery stays pending until it can finish"
    )
    func pendingStep() async throws {
        let (store, executor, layout, dir) = try setUp()
        let a = dir + "/a", b = dir + "/b", gate = dir + "/activated"
        _ = FileManager.default.createFile(atPath: a, contents: Data("payload".utf8))
        var result = layout
        result.disk.active = b
        let plan = Plan(
            operation: "deferred move",
            steps: [
                PlanStep("rename", .rename(from: a, to: b)),
                PlanStep("wait for the storage", .backend(name: "wait-for-file", arguments: ["path": gate])),
                PlanStep("after the wait", .run(["touch", dir + "/after"])),
            ], pointOfNoReturn: 0, result: result)
        let backend = InertBackend(kind: "none")
        let error = try await #require(throws: SnapshotError.self) {
            try await executor.execute(plan, before: layout, backend: backend)
        }
        #expect(
            error.code == .pending && error.message.contains(gate),
            "the backend's reason, not a generic failure: \(error)")
        #expect(try store.layout(diskID: layout.disk.id) == layout, "not claimed done")
        var open = try store.openJournals()
        #expect(open.count == 1 && open[0].stepsDone == 1)
        let still = try await executor.recover(open[0], backend: backend)
        #expect(still.outcome == .pending && still.detail?.contains(gate) == true)
        #expect(!FileManager.default.fileExists(atPath: dir + "/after"), "nothing after the pending step ran")
        open = try store.openJournals()
        #expect(open.count == 1, "still open")
        _ = FileManager.default.createFile(atPath: gate, contents: nil)
        #expect(try await executor.recover(open[0], backend: backend).outcome == .completed)
        #expect(FileManager.default.fileExists(atPath: dir + "/after"))
        #expect(try store.layout(diskID: layout.disk.id)?.disk.active == b)
        #expect(try store.openJournals().isEmpty)
    }

    @Test("backend settings: --set pairs over the store's settings.conf; a bad line or pair names itself")
    func settings() throws {
        let dir = scratchDirectory("settings")
        #expect(try BackendSettings.load(storeDirectory: dir).isEmpty, "no file, no settings")
        try "# policy\ncow-size = 256m   # bigger\n\nwarn-percent=70\n".write(
            toFile: dir + "/settings.conf", atomically: true, encoding: .utf8)
        let file = try BackendSettings.load(storeDirectory: dir)
        #expect(file == ["cow-size": "256m", "warn-percent": "70"])
        let merged = file.merging(try BackendSettings.parse(pairs: ["cow-size=10%ORIGIN", "x=a=b"])) { $1 }
        #expect(merged == ["cow-size": "10%ORIGIN", "warn-percent": "70", "x": "a=b"])
        let pair = try #require(throws: SnapshotError.self) { try BackendSettings.parse(pairs: ["cow-size"]) }
        #expect(pair.message.contains("KEY=VALUE") && pair.message.contains("cow-size"))
        try "cow-size = 1g\nnonsense\n".write(toFile: dir + "/settings.conf", atomically: true, encoding: .utf8)
        let line = try #require(throws: SnapshotError.self) { try BackendSettings.load(storeDirectory: dir) }
        #expect(line.message.contains("line 2") && line.message.contains("nonsense"))
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
        await #expect(throws: SnapshotError.self) {
            try await executor.perform(
                .rename(from: dir + "/none", to: dir + "/none2"), backend: InertBackend(kind: "none"))
        }
    }
}
