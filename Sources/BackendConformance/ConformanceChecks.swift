import SnapshotCore

/// The contract, check by check.
enum ConformanceChecks {
    static func cap(_ op: SnapshotOperation, _ kind: SnapshotKind) -> Capability { Capability(op, kind, .offline) }

    static var all: [ConformanceCheck] {
        SnapshotKind.allCases.flatMap(perKind) + [
            mixedKinds, mixedRevertBelowExternal, mixedDeleteExternalOverInternal, sharedTwoHosts,
            changesBetweenViews,
        ]
            + SnapshotKind.allCases.flatMap(badInput)
    }

    // MARK: - Per snapshot kind

    static func perKind(_ kind: SnapshotKind) -> [ConformanceCheck] {
        let k = kind.rawValue
        return [
            ConformanceCheck(
                "\(k).revert", "write A, snapshot, overwrite with B, revert: the disk reads A again",
                requires: [cap(.create, kind), cap(.revert, kind)]
            ) { c in
                let a = try await c.write(seed: 1)
                let a2 = try await c.write(seed: 11, at: 8 << 20, length: 4096)
                try await c.snapshot("s1", kind)
                try await c.write(seed: 2)
                try await c.write(seed: 12, at: 8 << 20, length: 4096)
                try await c.revert("s1")
                try await c.expect(.active, equals: a, "after revert to s1")
                try await c.expect(.active, at: 8 << 20, equals: a2, "after revert to s1, second region")
                let layout = try await c.layout()
                try c.require(
                    layout.disk.current == "s1",
                    "current snapshot after revert is \(layout.disk.current ?? "none"), expected s1")
                let b = try await c.write(seed: 3)
                try await c.expect(.active, equals: b, "writing after the revert")
            },
            ConformanceCheck(
                "\(k).list", "snapshots are listed with name, kind, parent and creation time",
                requires: [cap(.create, kind), cap(.list, kind)]
            ) { c in
                try await c.write(seed: 1)
                try await c.snapshot("first", kind)
                try await c.write(seed: 2)
                try await c.snapshot("second", kind)
                let snaps = try await c.layout().snapshots
                try c.require(
                    snaps.map(\.name) == ["first", "second"], "listed \(snaps.map(\.name)), expected [first, second]")
                try c.require(snaps.allSatisfy { $0.kind == kind }, "a snapshot is listed with the wrong kind")
                try c.require(
                    snaps[1].parent == "first", "second's parent is \(snaps[1].parent ?? "none"), expected first")
                try c.require(
                    snaps.allSatisfy { abs($0.createdAt.timeIntervalSinceNow) < 600 }, "creation times are not now")
                try await c.expect(
                    .snapshot("first"), equals: ConformanceContext.pattern(seed: 1, length: 64 << 10),
                    "snapshot 'first' content")
            },
            ConformanceCheck(
                "\(k).revert-branch",
                "revert to an older snapshot keeps the newer ones: a branch, and each still reads its own bytes",
                requires: [cap(.create, kind), cap(.revert, kind)]
            ) { c in
                let a = try await c.write(seed: 1)
                try await c.snapshot("s1", kind)
                let b = try await c.write(seed: 2)
                try await c.snapshot("s2", kind)
                try await c.write(seed: 3)
                try await c.revert("s1")
                try await c.expect(.active, equals: a, "after revert to s1")
                try await c.write(seed: 4)
                try await c.snapshot("s3", kind)
                try await c.revert("s2")
                try await c.expect(.active, equals: b, "after revert to s2, taken before the branch")
                try await c.expect(.snapshot("s1"), equals: a, "s1 after both reverts")
                let tree = try await c.layout().tree
                try c.require(tree["s3"]?.parent == "s1", "s3's parent is \(tree["s3"]?.parent ?? "none"), expected s1")
                try c.require(
                    Set(tree.children(of: "s1").map(\.name)) == ["s2", "s3"],
                    "s1's children are \(tree.children(of: "s1").map(\.name))")
            },
            ConformanceCheck(
                "\(k).delete-middle",
                "delete the middle of a chain: the survivors and the active disk read the same bytes",
                requires: [cap(.create, kind), cap(.delete, kind)]
            ) { c in
                let a = try await c.write(seed: 1)
                try await c.snapshot("s1", kind)
                try await c.write(seed: 2, at: 1 << 20)
                try await c.snapshot("s2", kind)
                try await c.write(seed: 3, at: 2 << 20)
                try await c.snapshot("s3", kind)
                let d = try await c.write(seed: 4)
                try await c.delete("s2")
                let layout = try await c.layout()
                try c.require(layout.snapshot(named: "s2") == nil, "s2 is still listed after delete")
                try c.require(layout.snapshot(named: "s3")?.parent == "s1", "s3 was not reparented to s1")
                try await c.expect(.snapshot("s1"), equals: a, "s1 after deleting s2")
                try await c.expect(.snapshot("s3"), equals: a, "s3 (first region) after deleting s2")
                try await c.expect(
                    .snapshot("s3"), at: 1 << 20, equals: ConformanceContext.pattern(seed: 2, length: 64 << 10),
                    "s3 keeps s2's changes")
                try await c.expect(
                    .snapshot("s3"), at: 2 << 20, equals: ConformanceContext.pattern(seed: 3, length: 64 << 10),
                    "s3's own changes")
                try await c.expect(.active, equals: d, "active disk after deleting s2")
                try await c.expect(
                    .active, at: 1 << 20, equals: ConformanceContext.pattern(seed: 2, length: 64 << 10),
                    "active disk keeps s2's changes")
            },
            ConformanceCheck(
                "\(k).delete-branch-point", "delete a snapshot with two children: both branches read the same bytes",
                requires: [cap(.create, kind), cap(.revert, kind), cap(.delete, kind)]
            ) { c in
                try await c.write(seed: 1)
                try await c.snapshot("base", kind)
                let b1 = try await c.write(seed: 2, at: 1 << 20)
                try await c.snapshot("left", kind)
                try await c.revert("base")
                let b2 = try await c.write(seed: 3, at: 1 << 20)
                try await c.snapshot("right", kind)
                let base = ConformanceContext.pattern(seed: 1, length: 64 << 10)
                try await c.delete("base")
                for (name, mine) in [("left", b1), ("right", b2)] {
                    try await c.expect(
                        .snapshot(name), equals: base, "\(name) reads base's bytes after base is deleted")
                    try await c.expect(.snapshot(name), at: 1 << 20, equals: mine, "\(name) reads its own bytes")
                }
                try await c.expect(.active, at: 1 << 20, equals: b2, "active disk after deleting the branch point")
                let roots = try await c.layout().tree.roots.map(\.name)
                try c.require(
                    Set(roots) == ["left", "right"], "roots after delete are \(roots), expected left and right")
                try await c.revert("left")
                try await c.expect(.active, at: 1 << 20, equals: b1, "revert to left after its parent was deleted")
            },
            ConformanceCheck(
                "\(k).delete-subtree",
                "delete a snapshot with its children: the subtree is gone, the rest and the active disk intact",
                requires: [cap(.create, kind), cap(.deleteSubtree, kind)]
            ) { c in
                let a = try await c.write(seed: 1)
                try await c.snapshot("keep", kind)
                try await c.write(seed: 2)
                try await c.snapshot("drop", kind)
                try await c.write(seed: 3)
                try await c.snapshot("drop-child", kind)
                let now = try await c.write(seed: 4)
                try await c.delete("drop", .children)
                let layout = try await c.layout()
                try c.require(
                    layout.snapshots.map(\.name) == ["keep"],
                    "after deleting the subtree: \(layout.snapshots.map(\.name))")
                try c.require(
                    layout.disk.current == "keep", "current is \(layout.disk.current ?? "none"), expected keep")
                try await c.expect(.active, equals: now, "active disk after deleting the subtree")
                try await c.expect(.snapshot("keep"), equals: a, "keep after deleting the subtree")
                try await c.snapshot("again", kind)
                try c.require(
                    try await c.layout().snapshot(named: "again")?.parent == "keep",
                    "a new snapshot does not descend from keep")
            },
            ConformanceCheck(
                "\(k).delete-children-only", "delete only the children of a snapshot: it stays, its descendants go",
                requires: [cap(.create, kind), cap(.deleteSubtree, kind)]
            ) { c in
                let a = try await c.write(seed: 1)
                try await c.snapshot("top", kind)
                try await c.write(seed: 2)
                try await c.snapshot("child", kind)
                try await c.delete("top", .childrenOnly)
                let names = try await c.layout().snapshots.map(\.name)
                try c.require(names == ["top"], "after children-only delete: \(names)")
                try await c.expect(.snapshot("top"), equals: a, "top after its children were deleted")
            },
            ConformanceCheck(
                "\(k).tree", "the current snapshot is the parent of the next one, across reverts",
                requires: [cap(.create, kind), cap(.revert, kind)]
            ) { c in
                try await c.write(seed: 1)
                try await c.snapshot("a", kind)
                try await c.snapshot("b", kind)
                try await c.revert("a")
                try await c.snapshot("c", kind)
                let layout = try await c.layout()
                try c.require(layout.disk.current == "c", "current is \(layout.disk.current ?? "none"), expected c")
                try c.require(
                    layout.tree["b"]?.parent == "a" && layout.tree["c"]?.parent == "a",
                    "b and c should both descend from a")
                try c.require(
                    Set(layout.tree.leaves.map(\.name)) == ["b", "c"], "leaves are \(layout.tree.leaves.map(\.name))")
                try c.require(layout.tree.roots.map(\.name) == ["a"], "roots are \(layout.tree.roots.map(\.name))")
            },
        ]
    }

    // MARK: - Mixed kinds

    /// A backend whose storage keeps the record for every host: a second installation sees the
    /// tree, acts on it, and finishes what the first one left open.
    static let sharedTwoHosts = ConformanceCheck(
        "shared.two-hosts",
        "a second host (a store of its own) sees the tree, reverts it, and finishes a create the first host was stopped in",
        applies: { $0.sharedMetadata ? nil : "backend keeps vmsnap's record in this host's store (no sharedMetadata)" }
    ) { c in
        let kind = c.backend.descriptor.capabilities.defaultKind
        let a = try await c.write(seed: 1)
        try await c.snapshot("s1", kind)
        try await c.write(seed: 2)
        try await c.snapshot("s2", kind)
        let hostB = try c.secondHost()
        let seen = try await hostB.layout(of: c.disk, kind: c.backend.kind).1
        try c.require(
            seen.snapshots.map(\.name) == ["s1", "s2"] && seen.snapshot(named: "s2")?.parent == "s1"
                && seen.disk.current == "s2",
            "host B sees \(seen.snapshots.map { "\($0.name)<-\($0.parent ?? "-")" }), current \(seen.disk.current ?? "none"); expected s1, s2<-s1, current s2"
        )
        try await hostB.revert(disk: c.disk, to: "s1", kind: c.backend.kind)
        try await c.expect(.active, equals: a, "after host B's revert to s1")
        let afterRevert = try await c.layout().disk.current
        try c.require(afterRevert == "s1", "host A sees current \(afterRevert ?? "none") after host B's revert to s1")

        var stopped = c.service
        stopped.crashPoint = CrashPoint(.after, step: 0)
        do {
            try await stopped.create(SnapshotRequest(name: "s3", kind: kind), disk: c.disk, kind: c.backend.kind)
            throw ConformanceFailure("the create on host A was not stopped at its first step")
        } catch is SimulatedCrash {}
        try await hostB.recover(disk: c.disk, kind: c.backend.kind)
        let (backend, finished) = try await hostB.layout(of: c.disk, kind: c.backend.kind)
        let open = try await hostB.unfinishedOperations(finished, backend: backend)
        try c.require(open.isEmpty, "host B's recovery left \(open) open")
        let mine = try await c.service.recoverAll()
        try c.require(
            mine.isEmpty,
            "host A ran \(mine.map { "\($0.operation): \($0.outcome.rawValue)" }) again after host B had recovered it")
        let onA = try await c.layout()
        try c.require(onA == finished, "hosts A and B disagree after the recovery")
    }

    /// A backend that reports changes: every byte written between two views is inside an
    /// extent, a region written in neither is in none, and after a revert the views still differ
    /// where they did. The writes sit 4 MiB apart, so a storage that counts by whole 4 MiB
    /// objects (RBD with fast-diff) still tells them apart on the 16 MiB disk.
    static let changesBetweenViews = ConformanceCheck(
        "changes.between-views",
        "the storage's changed extents cover every byte written between two snapshots (or since one), and no region written before both",
        applies: { $0.reportsChanges ? nil : "backend does not report changes between snapshots (no reportsChanges)" }
    ) { c in
        let kind = c.backend.descriptor.capabilities.defaultKind
        let before: Range<UInt64> = 0..<(64 << 10)
        let a: Range<UInt64> = (4 << 20) + 512..<(4 << 20) + 512 + 4096
        let b: Range<UInt64> = (12 << 20)..<(12 << 20) + 8192
        try await c.write(seed: 1, at: before.lowerBound, length: before.count)
        try await c.snapshot("s1", kind)
        try await c.write(seed: 2, at: a.lowerBound, length: a.count)
        try await c.snapshot("s2", kind)
        try await c.write(seed: 3, at: b.lowerBound, length: b.count)
        func changes(_ from: String, _ to: DataView) async throws -> DiskChanges {
            try await c.service.changes(disk: c.disk, kind: c.backend.kind, from: from, to: to)
        }
        // Some disks of a backend that reports changes may not (LVM: classic volumes): a refusal
        // on the first question skips the check, with the backend's reason.
        let first: DiskChanges
        do { first = try await changes("s1", .snapshot("s2")) } catch let e as SnapshotError
            where e.code == .unsupported
        {
            throw ConformanceSkip("the scratch disk's storage does not report changes: \(e.message)")
        }
        func check(_ d: DiskChanges, covers: [Range<UInt64>], avoids: [Range<UInt64>]) throws {
            let what =
                "changes \(d.from) -> \(d.to ?? "now") (\(d.method)): \(d.extents.map { "\($0.offset)+\($0.length)" })"
            for r in covers {
                var at = r.lowerBound
                for e in d.extents where e.offset <= at && at < e.end { at = min(e.end, r.upperBound) }
                try c.require(at >= r.upperBound, "\(what) leave bytes \(at)..<\(r.upperBound) that changed uncovered")
            }
            for r in avoids {
                try c.require(
                    !d.extents.contains { $0.offset < r.upperBound && r.lowerBound < $0.end },
                    "\(what) cover \(r), which changed in neither view")
            }
            try c.require(d.granularity > 0 && d.changedBytes <= d.virtualSize, "\(what): granularity or size wrong")
        }
        try check(first, covers: [a], avoids: [before, b])
        try check(try await changes("s1", .active), covers: [a, b], avoids: [before])
        try check(try await changes("s2", .active), covers: [b], avoids: [before, a])
        try await c.revert("s1")
        // A revert may rewrite what it restores (an RBD rollback rewrites every object), so past
        // it only coverage is required.
        try check(try await changes("s2", .active), covers: [a], avoids: [])
        try await c.expectRefusal([.notFound], "changes from a snapshot the disk does not have") {
            _ = try await changes("no-such", .active)
        }
    }

    static let mixedKinds = ConformanceCheck(
        "mixed.internal-external",
        "internal and external snapshots on one disk: each operation either keeps every byte right or is refused and changes nothing",
        requires: [
            cap(.create, .internal), cap(.create, .external), cap(.revert, .internal), cap(.revert, .external),
            cap(.delete, .external), cap(.delete, .internal),
        ]
    ) { c in
        let a = try await c.write(seed: 1)
        try await c.snapshot("i1", .internal)
        let b = try await c.write(seed: 2)
        try await c.snapshot("e1", .external)
        try await c.write(seed: 3)
        try await c.snapshot("i2", .internal)
        let d = try await c.write(seed: 4)
        let refusals: Set<SnapshotError.Code> = [.conflict, .unsupported]
        // Revert to an internal snapshot below an external one: handled or refused cleanly.
        do { try await c.revert("i1") } catch let e as SnapshotError where refusals.contains(e.code) {
            try await c.expect(.active, equals: d, "after a refused revert to i1")
            try await c.expectRefusal(refusals, "revert to i1 below e1 (repeat)") { try await c.revert("i1") }
        }
        if try await c.layout().disk.current == "i1" { try await c.expect(.active, equals: a, "after revert to i1") }
        try await c.revert("e1")
        try await c.expect(.active, equals: b, "after revert to e1")
        try await c.expect(
            .snapshot("i2"), equals: ConformanceContext.pattern(seed: 3, length: 64 << 10), "i2 after revert to e1")
        do { try await c.delete("e1") } catch let e as SnapshotError where refusals.contains(e.code) {
            try await c.expect(
                .snapshot("i2"), equals: ConformanceContext.pattern(seed: 3, length: 64 << 10),
                "i2 after a refused delete of e1")
        }
        try await c.delete("i2")
        try await c.expect(.active, equals: b, "active disk after deleting i2")
        if try await c.layout().snapshot(named: "e1") != nil {
            try await c.delete("e1")
            try await c.expect(.active, equals: b, "active disk after deleting e1")
        }
    }

    /// A revert to an internal snapshot inside an image that an external snapshot froze must work
    /// (as a branch) and change what no other snapshot reads; the branch can be left again.
    static let mixedRevertBelowExternal = ConformanceCheck(
        "mixed.revert-below-external",
        "revert to an internal snapshot below an external one works as a branch; every other snapshot reads the same, and the branch can be left and taken again",
        requires: [cap(.create, .internal), cap(.create, .external), cap(.revert, .internal), cap(.revert, .external)]
    ) { c in
        let a = try await c.write(seed: 11)
        try await c.snapshot("i1", .internal)
        let b = try await c.write(seed: 12)
        try await c.snapshot("e1", .external)
        let d = try await c.write(seed: 13)
        try await c.snapshot("e2", .external)
        try await c.revert("i1")
        try await c.expect(.active, equals: a, "after revert to i1 (below e1)")
        try await c.expect(.snapshot("e1"), equals: b, "e1 after the branch")
        try await c.expect(.snapshot("e2"), equals: d, "e2 after the branch")
        let branch = try await c.write(seed: 14)
        try await c.snapshot("i3", .internal)
        try await c.revert("e2")
        try await c.expect(.active, equals: d, "back on e2")
        try await c.revert("i3")
        try await c.expect(.active, equals: branch, "the branch's own snapshot")
        try await c.revert("i1")
        try await c.expect(.active, equals: a, "i1 again")
        try await c.expect(.snapshot("i1"), equals: a, "i1 itself")
    }

    /// A delete of an external snapshot whose image other snapshots need (internal snapshots in
    /// the layer on it, or in the image itself with several layers on it) must work and change what
    /// no other snapshot reads; the internal snapshots stay reachable, revertible and deletable.
    static let mixedDeleteExternalOverInternal = ConformanceCheck(
        "mixed.delete-external-over-internal",
        "delete of an external snapshot whose image internal snapshots need works; every other snapshot reads the same and stays revertible and deletable",
        requires: [
            cap(.create, .internal), cap(.create, .external), cap(.revert, .internal), cap(.revert, .external),
            cap(.delete, .external), cap(.delete, .internal),
        ]
    ) { c in
        // An internal snapshot in the layer built on e1's image.
        let a = try await c.write(seed: 21)
        try await c.snapshot("i1", .internal)
        try await c.snapshot("e1", .external)
        let b = try await c.write(seed: 22)
        try await c.snapshot("i2", .internal)
        let d = try await c.write(seed: 23)
        try await c.delete("e1")
        let afterE1 = try await c.layout()
        try c.require(afterE1.snapshot(named: "e1") == nil, "e1 is still listed after its delete")
        try await c.expect(.active, equals: d, "active after deleting e1")
        try await c.expect(.snapshot("i2"), equals: b, "i2 after deleting e1")
        try await c.expect(.snapshot("i1"), equals: a, "i1 after deleting e1")
        // The image i2 lives in, with two layers on it: e3's, and a branch from e2.
        try await c.snapshot("e2", .external)
        let f = try await c.write(seed: 24)
        try await c.snapshot("e3", .external)
        try await c.write(seed: 25)
        try await c.revert("e2")
        try await c.expect(.active, equals: d, "after revert to e2")
        try await c.delete("e2")
        try await c.expect(.active, equals: d, "active after deleting e2")
        try await c.expect(.snapshot("e3"), equals: f, "e3 after deleting e2")
        try await c.expect(.snapshot("i2"), equals: b, "i2 after deleting e2")
        try await c.expect(.snapshot("i1"), equals: a, "i1 after deleting e2")
        // Everything left still reverts and deletes.
        try await c.revert("i1")
        try await c.expect(.active, equals: a, "after revert to i1")
        try await c.revert("e3")
        try await c.expect(.active, equals: f, "back on e3")
        for name in ["i2", "i1", "e3"] { try await c.delete(name) }
        try await c.expect(.active, equals: f, "active after deleting the rest")
        let end = try await c.layout()
        try c.require(end.snapshots.isEmpty, "snapshots \(end.snapshots.map(\.name)) are left after deleting them all")
    }

    // MARK: - Bad input
    // MARK: - Bad input

    static let badNames: [(String, String)] = [
        ("", "empty"), ("a/b", "contains a slash"), ("a\u{0}b", "contains NUL"),
        ("tab\there", "contains a control character"),
        ("line\nbreak", "contains a newline"), ("-rf", "starts with a dash"),
        (String(repeating: "x", count: 256), "is 256 bytes long"),
    ]

    static func badInput(_ kind: SnapshotKind) -> [ConformanceCheck] {
        let k = kind.rawValue
        return [
            ConformanceCheck(
                "\(k).bad-names",
                "names that are empty, contain '/', NUL or control characters, start with '-' or exceed 255 bytes are refused and nothing changes",
                requires: [cap(.create, kind)]
            ) { c in
                try await c.write(seed: 1)
                try await c.snapshot("existing", kind)
                for (name, why) in badNames {
                    try await c.expectRefusal([.invalidName], "a name that \(why)") { try await c.snapshot(name, kind) }
                }
                try await c.expectRefusal([.alreadyExists], "a name that already exists") {
                    try await c.snapshot("existing", kind)
                }
            },
            ConformanceCheck(
                "\(k).unknown-snapshot",
                "reverting or deleting a snapshot that does not exist is refused and nothing changes",
                requires: [cap(.create, kind), cap(.revert, kind), cap(.delete, kind)]
            ) { c in
                try await c.write(seed: 1)
                try await c.snapshot("real", kind)
                try await c.expectRefusal([.notFound], "revert to a missing snapshot") { try await c.revert("ghost") }
                try await c.expectRefusal([.notFound], "delete of a missing snapshot") { try await c.delete("ghost") }
                try await c.expectRefusal([.notFound], "delete with children of a missing snapshot") {
                    try await c.delete("ghost", .children)
                }
            },
            ConformanceCheck(
                "\(k).missing-disk", "a snapshot of a disk that does not exist is refused and nothing is created",
                requires: [cap(.create, kind)]
            ) { c in
                // A disk that existed and is gone: a locator of the backend's own form.
                let missing = try await c.backend.createDisk(
                    named: "gone-\(k)-\(UInt32.random(in: 0...UInt32.max))", size: 1 << 20, in: c.pool)
                let gone = try await c.backend.adopt(locator: missing)
                try await c.backend.destroyDisk(layout: gone)
                let before = try await c.backend.poolInventory(c.pool)
                do {
                    try await c.service.create(
                        SnapshotRequest(name: "s", kind: kind), disk: missing, kind: c.backend.kind)
                    throw ConformanceFailure("snapshot of a missing disk succeeded")
                } catch let e as SnapshotError {
                    try c.require(
                        [.notFound, .invalidImage].contains(e.code),
                        "missing disk gave \(e.code.rawValue): \(e.message)")
                }
                let after = try await c.backend.poolInventory(c.pool)
                try c.require(before == after, "the pool changed: \(before) -> \(after)")
            },
        ]
    }
}
