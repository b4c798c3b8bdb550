import Foundation
#if canImport(Glibc)
    import Glibc
#endif

/// Fault-injection points for crash tests: `VMSNAP_FAULT=before-step:N` or `after-step:N` makes
/// the process kill itself with SIGKILL right before step N starts, or right after step N is
/// journaled as done. Used by the tests that prove recovery works from every step.
/// `VMSNAP_FAULT=delay-before-step:N:SECONDS` waits instead, so a test can break the storage
/// (stop a daemon) between the journal and the step.
public enum FaultInjection {
    public enum Phase: String, Sendable { case before = "before-step", after = "after-step" }

    static let spec: (Phase, Int)? = {
        guard let raw = ProcessInfo.processInfo.environment["VMSNAP_FAULT"] else { return nil }
        let parts = raw.split(separator: ":")
        guard parts.count == 2, let phase = Phase(rawValue: String(parts[0])), let n = Int(parts[1]) else { return nil }
        return (phase, n)
    }()

    static let delay: (step: Int, seconds: Double)? = {
        guard let raw = ProcessInfo.processInfo.environment["VMSNAP_FAULT"] else { return nil }
        let parts = raw.split(separator: ":")
        guard parts.count == 3, parts[0] == "delay-before-step", let n = Int(parts[1]),
            let seconds = Double(parts[2])
        else { return nil }
        return (n, seconds)
    }()

    static func point(_ phase: Phase, step: Int) {
        if phase == .before, let delay, delay.step == step {
            FileHandle.standardError.write(
                Data("vmsnap: fault injection: waiting \(delay.seconds) s before step \(step)\n".utf8))
            Thread.sleep(forTimeInterval: delay.seconds)
        }
        guard let (p, n) = spec, p == phase, n == step else { return }
        FileHandle.standardError.write(
            Data("vmsnap: fault injection: killing myself at \(phase.rawValue) \(step)\n".utf8))
        kill(getpid(), SIGKILL)
    }
}

/// A crash at a chosen point of a plan, simulated inside the process: the executor stops there
/// as a killed process would (nothing rolled back, the journal left as it is), so the
/// conformance suite can check recovery from every step of every backend, plug-ins included.
public struct CrashPoint: Sendable, Hashable, CustomStringConvertible {
    public var phase: FaultInjection.Phase
    public var step: Int
    public init(_ phase: FaultInjection.Phase, step: Int) {
        self.phase = phase
        self.step = step
    }
    public var description: String { "\(phase.rawValue):\(step)" }
}

/// A step ran but the shared record could not learn it (SharedMetadata.swift).
struct RecordNotWritten: Error {
    var cause: any Error
}

/// Thrown where a ``CrashPoint`` is reached.
public struct SimulatedCrash: Error, CustomStringConvertible, Sendable {
    public var point: CrashPoint
    public var description: String { "simulated crash at \(point)" }
}

/// Runs plans step by step under the journal, rolls back before the point of no return,
/// and finishes or rolls back interrupted plans on recovery.
public struct PlanExecutor: Sendable {
    public let store: MetadataStore
    public let runner: any CommandRunning
    /// Where to stop as if killed (conformance crash checks); nil in normal use.
    public var crashPoint: CrashPoint?

    public init(store: MetadataStore, runner: any CommandRunning, crashPoint: CrashPoint? = nil) {
        self.store = store
        self.runner = runner
        self.crashPoint = crashPoint
    }

    private func crash(_ phase: FaultInjection.Phase, step: Int) throws {
        FaultInjection.point(phase, step: step)
        if let crashPoint, crashPoint == CrashPoint(phase, step: step) { throw SimulatedCrash(point: crashPoint) }
    }

    /// Journals `plan`, runs it and records its result. The caller holds the disk's lock.
    @discardableResult
    public func execute(_ plan: Plan, before: DiskLayout, backend: any DiskSnapshotBackend) async throws -> DiskLayout {
        let change = LayoutChange.between(before, plan.result)
        let journalID = try store.beginJournal(diskID: before.disk.id, kind: backend.kind, plan: plan, change: change)
        do { try await publishJournal(of: before.disk.id) } catch {
            // Not acted on yet: the operation never started, for this host or any other.
            try? store.rollBackJournal(journalID)
            throw error
        }
        Trace.mark("journal begin")
        var index = 0
        do {
            while index < plan.steps.count {
                try crash(.before, step: index)
                do { try await perform(plan.steps[index].action, backend: backend) } catch let e as SnapshotError
                    where e.code == .pending
                {
                    throw e
                } catch {
                    throw stepFailure(
                        backend: backend.kind, index: index, count: plan.steps.count,
                        summary: plan.steps[index].summary, cause: error)
                }
                Trace.mark("step \(index): \(plan.steps[index].summary)")
                // The last step is recorded by the completing transaction itself, unless a crash
                // test wants to stop between the two, or another host must learn that it ran
                // before this one completes (the shared record: a step that ran must never be
                // replayed or undone there from an older record).
                if index + 1 < plan.steps.count || FaultInjection.spec != nil || crashPoint != nil
                    || SharedDiskSession.current?.diskID == before.disk.id
                {
                    try store.markSteps(journal: journalID, done: index + 1)
                    do { try await publishJournal(of: before.disk.id) } catch {
                        throw RecordNotWritten(cause: error)
                    }
                }
                try crash(.after, step: index)
                index += 1
            }
            Trace.mark("steps")
            try store.completeJournal(journalID, change: change, stepCount: plan.steps.count)
            // Every step is in the record already; a failure here leaves the record one write
            // behind (a journal whose steps all ran, which any host completes without running
            // them), and the command's closing write tries again.
            try? await publishJournal(of: before.disk.id)
            Trace.mark("journal complete")
            return plan.result
        } catch let e as SimulatedCrash {
            throw e
        } catch let e as RecordNotWritten {
            // The step ran; whether the shared record learnt it is unknown (a write that timed
            // out may still have landed). Neither undone nor finished here: the journal stays
            // open, and the next command on the disk (this host's or another's) goes by the
            // record, whose every outcome the idempotent steps and undos agree with.
            throw SnapshotError(
                .recoveryNeeded,
                "\(plan.operation): step \(index + 1) of \(plan.steps.count) ran, but the disk's shared record could not be written (\((e.cause as? SnapshotError)?.message ?? "\(e.cause)")). The operation stays journaled: `vmsnap recover --disk \(before.disk.id)` finishes or rolls it back once the storage answers",
                cause: e.cause)
        } catch let e as SnapshotError where e.code == .pending && index >= plan.pointOfNoReturn {
            // Started, finishing outside vmsnap: the journal stays open so the next command on
            // the disk (or `vmsnap recover`) finishes the plan once the backend says it can.
            try? store.markSteps(journal: journalID, done: index)
            try? await publishJournal(of: before.disk.id)
            throw e
        } catch {
            if index < plan.pointOfNoReturn {
                let failed = await rollBack(plan, through: index, backend: backend)
                guard failed.isEmpty else {
                    // The storage did not let the undo through (a daemon down, a timeout): the
                    // journal stays open, so recovery undoes the rest once the storage answers.
                    // Its step count goes back below the point of no return (a write of the
                    // record may have failed after the count reached it): recovery undoes.
                    try? store.markSteps(journal: journalID, done: index)
                    try? await publishJournal(of: before.disk.id)
                    throw SnapshotError(
                        .recoveryNeeded,
                        "\(plan.operation) failed at step \(index + 1) of \(plan.steps.count) (\((error as? SnapshotError)?.message ?? "\(error)")), and undoing it failed too (\(failed.joined(separator: "; "))). The operation stays journaled: run `vmsnap recover` once the storage answers, and it finishes the undo",
                        cause: error)
                }
                try? store.rollBackJournal(journalID)
                try? await publishJournal(of: before.disk.id)
                throw error
            }
            throw SnapshotError(
                .recoveryNeeded,
                "\(plan.operation) stopped at step \(index + 1) of \(plan.steps.count) (\(plan.steps[min(index, plan.steps.count - 1)].summary)), past the point where it can be undone; fix the cause and run `vmsnap recover` to finish it. If it cannot be finished, `vmsnap recover --abandon \(journalID)` gives up on it and says what to check",
                cause: error)
        }
    }

    /// Writes the journal out to the storage's shared record when the disk's metadata is shared
    /// (a ``SharedDiskSession`` is open for it), so another host can finish what this one started.
    private func publishJournal(of diskID: String) async throws {
        guard let session = SharedDiskSession.current, session.diskID == diskID else { return }
        try await session.publish()
    }

    /// Finishes or rolls back an interrupted operation. The caller holds the disk's lock.
    public func recover(_ entry: JournalEntry, backend: any DiskSnapshotBackend) async throws -> RecoveryReport {
        try checkJournaled(entry, backend: backend)
        let plan = Plan(
            operation: entry.operation, steps: entry.steps, pointOfNoReturn: entry.pointOfNoReturn,
            result: DiskLayout(disk: entry.change.disk))
        if entry.stepsDone < plan.pointOfNoReturn {
            let failed = await rollBack(plan, through: min(entry.stepsDone, plan.steps.count - 1), backend: backend)
            guard failed.isEmpty else {
                throw SnapshotError(
                    .recoveryNeeded,
                    "rolling back '\(plan.operation)' on \(entry.diskID) (journal \(entry.id)) failed: \(failed.joined(separator: "; ")). Fix the cause and run `vmsnap recover` again; if it cannot be rolled back, `vmsnap recover --abandon \(entry.id)` gives up on it and says what to check"
                )
            }
            try store.rollBackJournal(entry.id)
            try await publishJournal(of: entry.diskID)
            return RecoveryReport(
                diskID: entry.diskID, operation: plan.operation, outcome: .rolledBack, stepsDone: entry.stepsDone,
                stepCount: plan.steps.count)
        }
        var index = entry.stepsDone
        while index < plan.steps.count {
            do {
                try await perform(plan.steps[index].action, backend: backend)
            } catch let e as SnapshotError where e.code == .pending {
                return RecoveryReport(
                    diskID: entry.diskID, operation: plan.operation, outcome: .pending, stepsDone: index,
                    stepCount: plan.steps.count, detail: e.message)
            } catch {
                let why = (error as? SnapshotError)?.message ?? String(describing: error)
                throw SnapshotError(
                    .recoveryNeeded,
                    "finishing '\(plan.operation)' on \(entry.diskID) (journal \(entry.id)) failed at step \(index + 1) of \(plan.steps.count) (\(plan.steps[index].summary)): \(why). Fix the cause and run `vmsnap recover` again; if it cannot be finished, `vmsnap recover --abandon \(entry.id)` gives up on it and says what to check",
                    cause: error)
            }
            try store.markSteps(journal: entry.id, done: index + 1)
            try await publishJournal(of: entry.diskID)
            index += 1
        }
        try store.completeJournal(entry.id, change: entry.change, stepCount: plan.steps.count)
        try await publishJournal(of: entry.diskID)
        return RecoveryReport(
            diskID: entry.diskID, operation: plan.operation, outcome: .completed, stepsDone: entry.stepsDone,
            stepCount: plan.steps.count)
    }

    /// Recovery runs what the journal says; the journal is only as trustworthy as the store. Every
    /// journaled action must be one the disk's backend could have planned: a command starting with
    /// one of its declared tools, and absolute paths only inside the folders of the disk's images
    /// (before or after the change). Anything else is refused, with nothing run.
    func checkJournaled(_ entry: JournalEntry, backend: any DiskSnapshotBackend) throws {
        let stored = try store.layout(diskID: entry.diskID)
        var images: [String] = [entry.diskID, entry.change.disk.active]
        images += entry.change.upsertLayers.map(\.image) + entry.change.upsertSnapshots.map(\.image)
        if let stored { images += [stored.disk.active] + stored.layers.map(\.image) + stored.snapshots.map(\.image) }
        let folders = Set(images.filter { $0.hasPrefix("/") }.map { ($0 as NSString).deletingLastPathComponent })
        let tools = Set(backend.descriptor.tools)
        func inFolders(_ path: String) -> Bool {
            path.hasPrefix("/") && !path.split(separator: "/").contains("..")
                && folders.contains((path as NSString).deletingLastPathComponent)
        }
        func problem(_ action: StepAction) -> String? {
            switch action {
            case .run(let argv):
                guard let tool = argv.first, tools.contains(tool) else {
                    return
                        "it runs `\(argv.first ?? "")`, which backend '\(backend.kind)' does not use (its tools: \(tools.sorted().joined(separator: ", ")))"
                }
                if let stray = argv.dropFirst().first(where: { $0.hasPrefix("/") && !inFolders($0) }) {
                    return "it names \(stray), outside the disk's folders"
                }
                return nil
            case .removeFile(let path): return inFolders(path) ? nil : "it removes \(path), outside the disk's folders"
            case .rename(let from, let to):
                return inFolders(from) && inFolders(to)
                    ? nil : "it renames \(from) to \(to), outside the disk's folders"
            case .backend: return nil  // performed by the backend itself, which checks its arguments
            }
        }
        for (n, step) in entry.steps.enumerated() {
            for action in [step.action] + (step.undo.map { [$0] } ?? []) {
                if let why = problem(action) {
                    throw SnapshotError(
                        .storeCorrupt,
                        "journal \(entry.id) ('\(entry.operation)' on \(entry.diskID)), step \(n + 1): \(why). vmsnap would not have planned it, so the store may have been changed by someone else; nothing was run. Inspect the store, then give up on the operation with `vmsnap recover --abandon \(entry.id)`"
                    )
                }
            }
        }
    }

    /// Undoes steps 0...`last` (the last one possibly half done), newest first. Undo actions are
    /// idempotent; one that fails is reported on stderr and the rest still run. Returns the
    /// undos that failed: the caller keeps the journal open for them.
    @discardableResult
    private func rollBack(_ plan: Plan, through last: Int, backend: any DiskSnapshotBackend) async -> [String] {
        guard last >= 0, !plan.steps.isEmpty else { return [] }
        var failed: [String] = []
        for step in plan.steps[0...min(last, plan.steps.count - 1)].reversed() {
            guard let undo = step.undo else { continue }
            do { try await perform(undo, backend: backend) } catch {
                let why = (error as? SnapshotError)?.message ?? "\(error)"
                FileHandle.standardError.write(Data("vmsnap: warning: undo of '\(step.summary)' failed: \(why)\n".utf8))
                failed.append("undo of '\(step.summary)': \(why)")
            }
        }
        return failed
    }

    /// Runs one action. Each is idempotent so a crash in the middle can run it again.
    public func perform(_ action: StepAction, backend: any DiskSnapshotBackend) async throws {
        switch action {
        case .run(let argv):
            try await runner.run(argv)
        case .removeFile(let path):
            if unlink(path) != 0 && errno != ENOENT {
                throw SnapshotError(.io, "cannot remove \(path): \(String(cString: strerror(errno)))")
            }
        case .rename(let from, let to):
            let fm = FileManager.default
            if !fm.fileExists(atPath: from) && fm.fileExists(atPath: to) { return }
            if Glibc.rename(from, to) != 0 {
                throw SnapshotError(.io, "cannot rename \(from) to \(to): \(String(cString: strerror(errno)))")
            }
        case .backend(let name, let arguments):
            try await backend.perform(name, arguments: arguments)
        }
    }
}

/// A failed plan step as the layer's error: the code of the cause (`commandFailed` for a
/// command), and a message that names the backend (a plug-in's kind) and the step.
func stepFailure(backend: BackendKind, index: Int, count: Int, summary: String, cause: any Error) -> SnapshotError {
    let code = (cause as? SnapshotError)?.code ?? .commandFailed
    let why = (cause as? SnapshotError)?.message ?? String(describing: cause)
    return SnapshotError(
        code, "backend '\(backend)', step \(index + 1) of \(count) (\(summary)): \(why)",
        cause: (cause as? SnapshotError)?.cause ?? cause)
}

/// What recovery did with one interrupted operation.
public struct RecoveryReport: Codable, Sendable, Hashable {
    /// `pending`: still waiting on something outside vmsnap (the journal stays open).
    public enum Outcome: String, Codable, Sendable {
        case completed
        case rolledBack = "rolled-back"
        case skipped, pending
    }
    public var diskID: String
    public var operation: String
    public var outcome: Outcome
    public var stepsDone: Int
    public var stepCount: Int
    public var detail: String?

    public init(
        diskID: String, operation: String, outcome: Outcome, stepsDone: Int, stepCount: Int, detail: String? = nil
    ) {
        self.diskID = diskID
        self.operation = operation
        self.outcome = outcome
        self.stepsDone = stepsDone
        self.stepCount = stepCount
        self.detail = detail
    }
}
