import Foundation
import SnapshotCore
import Testing

@Suite("Snapshot names")
struct SnapshotNameTests {
    @Test(
        "bad names are refused with a reason",
        arguments: [
            ("", "empty"), ("a/b", "'/'"), ("a\u{0}b", "NUL"), ("a\tb", "control character"),
            ("a\u{7f}", "control character"),
            ("-x", "starts with '-'"), (String(repeating: "é", count: 128), "256 bytes"), (".", "directories"),
            ("..", "directories"),
        ])
    func refused(name: String, reason: String) throws {
        let error = try #require(throws: SnapshotError.self) { try SnapshotName.validate(name) }
        #expect(error.code == .invalidName)
        #expect(error.message.contains(reason), "message was: \(error.message)")
    }

    @Test(
        "ordinary names pass unchanged",
        arguments: ["before-upgrade", "s1", "nightly 2026-11-21", "état", String(repeating: "x", count: 255)])
    func accepted(name: String) throws {
        #expect(try SnapshotName.validate(name) == name)
    }
}

@Suite("Capability tables")
struct CapabilityTests {
    @Test("an unsupported cell fails naming the backend and the capability")
    func unsupportedNamesBackend() throws {
        let table = CapabilityTable([Capability(.create, .internal, .offline)])
        #expect(table.supports(.create, .internal, .offline))
        #expect(!table.supports(.create, .external, .offline))
        let error = try #require(throws: SnapshotError.self) {
            try table.require(Capability(.revert, .external, .live), backend: "demo")
        }
        #expect(error.code == .unsupported)
        #expect(
            error.message.contains("'demo'") && error.message.contains("revert of external snapshots on live disks"))
    }

    @Test("all(kinds:states:) fills every operation")
    func allFills() {
        let table = CapabilityTable.all(kinds: [.internal], states: [.offline])
        #expect(table.supported.count == SnapshotOperation.allCases.count)
        #expect(table.kinds == [.internal])
    }
}

@Suite("Snapshot tree")
struct SnapshotTreeTests {
    struct Node: SnapshotTreeNode {
        var name: String
        var parent: String?
    }

    //   a ─ b ─ d
    //    └─ c
    //   e
    let tree = SnapshotTree([
        Node(name: "a"), Node(name: "b", parent: "a"), Node(name: "c", parent: "a"), Node(name: "d", parent: "b"),
        Node(name: "e"),
    ])

    @Test("roots, leaves, children, descendants and ancestors")
    func queries() {
        #expect(tree.roots.map(\.name) == ["a", "e"])
        #expect(tree.leaves.map(\.name) == ["c", "d", "e"])
        #expect(tree.children(of: "a").map(\.name) == ["b", "c"])
        #expect(tree.descendants(of: "a").map(\.name) == ["b", "c", "d"])
        #expect(tree.ancestors(of: "d").map(\.name) == ["b", "a"])
        #expect(tree.descendants(of: "e").isEmpty)
    }

    @Test("a parent loop in stored metadata does not hang ancestors()")
    func loopSafe() {
        let looped = SnapshotTree([Node(name: "x", parent: "y"), Node(name: "y", parent: "x")])
        #expect(looped.ancestors(of: "x").map(\.name) == ["y"])
    }

    @Test("the tree renders with the current snapshot marked")
    func rendering() {
        let text = tree.rendered(marking: "d")
        #expect(text == "a\n├─ b\n│  └─ d  <- current\n└─ c\ne")
    }
}

@Suite("Backend registry")
struct RegistryTests {
    @Test("backends register by kind; duplicates, unknown kinds and other API versions are refused")
    func registration() throws {
        let registry = BackendRegistry()
        try registry.register(BackendFactory(kind: "dummy") { _ in InertBackend(kind: "dummy") })
        #expect(registry.kinds == ["dummy"])
        #expect(try registry.backend("dummy").kind == "dummy")
        #expect(throws: SnapshotError.self) {
            try registry.register(BackendFactory(kind: "dummy") { _ in InertBackend(kind: "dummy") })
        }
        let future = #expect(throws: SnapshotError.self) {
            try registry.register(BackendFactory(kind: "future", apiVersion: 99) { _ in InertBackend(kind: "dummy") })
        }
        #expect(future?.code == .incompatibleBackend)
        let unknown = #expect(throws: SnapshotError.self) { try registry.backend("nope") }
        #expect(unknown?.code == .notFound && unknown?.message.contains("dummy") == true)
    }
}

@Suite("Command runner")
struct CommandRunnerTests {
    @Test("a failing command's error carries argv, exit status and trimmed stderr")
    func failureCarriesEverything() async throws {
        let argv = ["sh", "-c", "echo '  first problem  ' >&2; echo 'second problem' >&2; exit 3", "ignored arg"]
        let error = try await #require(throws: CommandError.self) { try await SubprocessRunner().run(argv) }
        #expect(error.argv == argv)
        #expect(error.status == 3)
        #expect(error.standardError == "first problem; second problem")
        #expect(error.description.contains("status 3"))
    }

    @Test("arguments reach the program as they are: no shell splitting or expansion")
    func noShell() async throws {
        let out = try await SubprocessRunner().run(["printf", "%s|", "a b", "$HOME", "*", "; rm -rf /"])
        #expect(out.standardOutput == "a b|$HOME|*|; rm -rf /|")
    }

    @Test("a missing program is a clear error")
    func missingProgram() async throws {
        let error = try await #require(throws: SnapshotError.self) {
            try await SubprocessRunner().run(["vmsnap-no-such-tool-xyz"])
        }
        #expect(error.code == .commandFailed && error.message.contains("vmsnap-no-such-tool-xyz"))
    }

    @Test("the recording runner keeps argv in order")
    func recording() async throws {
        let runner = RecordingRunner()
        try await runner.run(["a", "1"])
        try await runner.run(["b"])
        #expect(runner.commands == [["a", "1"], ["b"]])
    }
}
