import Foundation
import SnapshotCore

/// Checks what a plug-in answers before vmsnap journals or runs any of it: the plan must be for
/// the disk it was asked about, its steps well formed, and its result must hold what the
/// operation promises. A plug-in that breaks these rules gets an error naming it and the call;
/// nothing has changed at that point.
struct PlanCheck {
    let plugin: PluginBackend
    let method: PluginMethod

    private func refuse(_ why: String) -> SnapshotError {
        SnapshotError(
            .pluginFailed,
            "backend plug-in '\(plugin.kind)' (\(plugin.executable)) answered '\(method.rawValue)' with \(why); nothing was changed. This is a bug in the plug-in"
        )
    }

    func layout(_ layout: DiskLayout, of id: String) throws {
        guard layout.disk.id == id else { throw refuse("a layout for disk '\(layout.disk.id)' instead of '\(id)'") }
        guard layout.disk.kind == plugin.kind else { throw refuse("a disk of backend '\(layout.disk.kind)'") }
        var names = Set<String>()
        for snapshot in layout.snapshots {
            do { try SnapshotName.validate(snapshot.name) } catch {
                throw refuse("a snapshot with an invalid name: \(error)")
            }
            guard names.insert(snapshot.name).inserted else { throw refuse("the snapshot '\(snapshot.name)' twice") }
        }
        for snapshot in layout.snapshots {
            if let parent = snapshot.parent, !names.contains(parent) {
                throw refuse("snapshot '\(snapshot.name)' whose parent '\(parent)' does not exist")
            }
        }
        if let current = layout.disk.current, !names.contains(current) {
            throw refuse("a current snapshot '\(current)' that does not exist")
        }
        guard !layout.disk.active.isEmpty else { throw refuse("an empty active image") }
    }

    func steps(_ plan: Plan, before: DiskLayout) throws {
        try layout(plan.result, of: before.disk.id)
        guard (0...plan.steps.count).contains(plan.pointOfNoReturn) else {
            throw refuse("a point of no return (\(plan.pointOfNoReturn)) outside its \(plan.steps.count) steps")
        }
        for (index, step) in plan.steps.enumerated() {
            for action in [step.action] + (step.undo.map { [$0] } ?? []) {
                if let why = problem(action) { throw refuse("step \(index + 1) (\(step.summary)): \(why)") }
            }
        }
    }

    private func problem(_ action: StepAction) -> String? {
        func path(_ p: String) -> String? {
            p.hasPrefix("/") && !p.contains("\0") && !p.split(separator: "/").contains("..")
                ? nil : "'\(p)' is not an absolute path without '..'"
        }
        switch action {
        case .run(let argv):
            guard let tool = argv.first, !tool.isEmpty else { return "an empty command" }
            return argv.contains { $0.contains("\0") } ? "an argument containing NUL" : nil
        case .removeFile(let p): return path(p)
        case .rename(let from, let to): return path(from) ?? path(to)
        case .backend(let name, _): return name.isEmpty ? "a native step without a name" : nil
        }
    }

    func create(_ plan: Plan, request: SnapshotRequest, before: DiskLayout) throws {
        try steps(plan, before: before)
        guard let made = plan.result.snapshot(named: request.name) else {
            throw refuse("a plan whose result has no snapshot named '\(request.name)'")
        }
        guard made.kind == request.kind else {
            throw refuse("a \(made.kind.rawValue) snapshot when \(request.kind.rawValue) was asked for")
        }
        let kept = Set(before.snapshots.map(\.name))
        let lost = kept.subtracting(plan.result.snapshots.map(\.name))
        guard lost.isEmpty else { throw refuse("a create that drops snapshots \(lost.sorted())") }
    }

    func revert(_ plan: Plan, to snapshot: String, before: DiskLayout) throws {
        try steps(plan, before: before)
        guard plan.result.disk.current == snapshot else {
            throw refuse("a revert whose result's current snapshot is not '\(snapshot)'")
        }
        let lost = Set(before.snapshots.map(\.name)).subtracting(plan.result.snapshots.map(\.name))
        guard lost.isEmpty else { throw refuse("a revert that drops snapshots \(lost.sorted())") }
    }

    func delete(_ plan: Plan, snapshot: String, mode: DeleteMode, before: DiskLayout) throws {
        try steps(plan, before: before)
        let below = Set(before.tree.descendants(of: snapshot).map(\.name))
        let expected: Set<String> =
            switch mode {
            case .merge: [snapshot]
            case .children: below.union([snapshot])
            case .childrenOnly: below
            }
        let removed = Set(before.snapshots.map(\.name)).subtracting(plan.result.snapshots.map(\.name))
        guard removed == expected else {
            throw refuse(
                "a \(mode.rawValue) delete of '\(snapshot)' that removes \(removed.sorted()) instead of \(expected.sorted())"
            )
        }
    }
}
