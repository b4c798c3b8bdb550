import BackendPluginKit
import Foundation
import SnapshotCore
import Testing

/// The raw plug-in (backends/raw), which the misbehaving plug-ins wrap.
let rawPlugin = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent()
    .appendingPathComponent("backends/raw/vmsnap-backend-raw").path

/// A plug-in that behaves like the raw plug-in except where `patch` (Python, with the raw
/// module as `raw`) changes it: written as `vmsnap-backend-<kind>` into a fresh directory.
func misbehavingPlugin(_ kind: String, _ patch: String) throws -> String {
    let dir = NSTemporaryDirectory() + "vmsnap-plugins-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(
        atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
    let path = dir + "/vmsnap-backend-\(kind)"
    let script = """
        #!/usr/bin/env python3
        import importlib.machinery, json, os, sys, time
        raw = importlib.machinery.SourceFileLoader("rawplugin", \(String(reflecting: rawPlugin))).load_module()
        \(patch)
        sys.exit(raw.main())
        """
    try script.write(toFile: path, atomically: true, encoding: .utf8)
    chmod(path, 0o755)
    return path
}

/// Everything a failed operation must leave as it was: the files of the pool (names, sizes,
/// contents), the disk's metadata and the journal.
struct Snapshot: Equatable {
    var files: [String: Data]
    var layout: DiskLayout?
    var openJournals: Int

    static func take(pool: String, store: MetadataStore, disk: String) throws -> Snapshot {
        var files: [String: Data] = [:]
        for name in try FileManager.default.contentsOfDirectory(atPath: pool) {
            files[name] = FileManager.default.contents(atPath: pool + "/" + name) ?? Data()
        }
        return Snapshot(
            files: files, layout: try store.layout(diskID: disk), openJournals: try store.openJournals().count)
    }
}

/// A raw disk managed through the plug-in at `path`, with one snapshot taken normally.
struct PluginRig {
    let backend: PluginBackend
    let service: DiskSnapshotService
    let pool: String
    let disk: String

    init(_ path: String, timeout: Double = 30) async throws {
        backend = try PluginBackend(executable: path, timeout: timeout)
        pool = NSTemporaryDirectory() + "vmsnap-plugin-pool-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: pool, withIntermediateDirectories: true)
        let store = try MetadataStore(directory: pool + ".store")
        let registry = BackendRegistry()
        let instance = backend
        try registry.register(BackendFactory(kind: backend.kind, origin: .plugin(path)) { _ in instance })
        service = DiskSnapshotService(store: store, registry: registry, notify: { _ in })
        disk = try await backend.createDisk(named: "vm", size: 4 << 20, in: BackendPool(directory: pool))
        let layout = try await service.layout(of: disk, kind: backend.kind).1
        try await backend.write(Array(repeating: 0x5a, count: 65536), at: 0, layout: layout)
        try await service.create(SnapshotRequest(name: "good", kind: .external), disk: disk, kind: backend.kind)
    }

    func state() throws -> Snapshot { try Snapshot.take(pool: pool, store: service.store, disk: disk) }

    /// Runs `body`, which must fail with `code` and a message containing each of `words`, and
    /// change nothing.
    func expectFailure(_ code: SnapshotError.Code, mentioning words: [String], _ body: () async throws -> Void)
        async throws
    {
        let before = try state()
        let error = await #expect(throws: SnapshotError.self) { try await body() }
        #expect(error?.code == code, "code: \(String(describing: error))")
        for word in words {
            #expect(error?.description.contains(word) == true, "'\(word)' in: \(String(describing: error))")
        }
        #expect(try state() == before, "the pool, the metadata and the journal are as they were")
    }
}

@Suite("Plug-ins that misbehave get a clear error, and nothing changes", .serialized)
struct MisbehavingPluginTests {
    @Test("a plug-in that crashes in the middle of a call")
    func crash() async throws {
        let path = try misbehavingPlugin(
            "crashy",
            """
            original = raw.METHODS["planCreate"]
            def crashing(p):
                if p["request"]["name"] == "boom":
                    sys.stderr.write("crashy: segmentation fault (simulated)\\n"); sys.stderr.flush(); os._exit(3)
                return original(p)
            raw.METHODS["planCreate"] = crashing
            """)
        let rig = try await PluginRig(path)
        try await rig.expectFailure(
            .pluginFailed, mentioning: ["'crashy'", path, "planCreate", "status 3", "segmentation fault"]
        ) {
            try await rig.service.create(SnapshotRequest(name: "boom", kind: .external), disk: rig.disk, kind: "crashy")
        }
        // The next call starts the plug-in again.
        try await rig.service.create(SnapshotRequest(name: "after", kind: .external), disk: rig.disk, kind: "crashy")
    }

    @Test("a plug-in that hangs is stopped after the timeout")
    func hang() async throws {
        let path = try misbehavingPlugin(
            "hangs",
            """
            original = raw.METHODS["planCreate"]
            def hanging(p):
                if p["request"]["name"] == "boom": time.sleep(3600)
                return original(p)
            raw.METHODS["planCreate"] = hanging
            """)
        let rig = try await PluginRig(path)
        rig.backend.timeout = 5
        let started = ContinuousClock.now
        try await rig.expectFailure(
            .pluginFailed, mentioning: ["'hangs'", "did not answer 'planCreate' within 5 s", "stopped"]
        ) {
            try await rig.service.create(SnapshotRequest(name: "boom", kind: .external), disk: rig.disk, kind: "hangs")
        }
        // The plug-in sleeps an hour. The bound is loose on purpose: with both cores busy (CI runs
        // every suite at once) the plug-in's start and the failed create took 10.5 s once.
        #expect(ContinuousClock.now - started < .seconds(300), "the timeout, not the plug-in's hour")
    }

    @Test("a plug-in that prints something that is not protocol JSON")
    func garbage() async throws {
        let path = try misbehavingPlugin(
            "noisy",
            """
            original = raw.METHODS["planRevert"]
            def noisy(p):
                if p["snapshot"] == "good":
                    sys.stdout.write("Reverting, please wait...\\n"); sys.stdout.flush()
                return original(p)
            raw.METHODS["planRevert"] = noisy
            """)
        let rig = try await PluginRig(path)
        try await rig.expectFailure(
            .pluginFailed, mentioning: ["'noisy'", "planRevert", "not protocol JSON", "Reverting, please wait"]
        ) {
            try await rig.service.revert(disk: rig.disk, to: "good", kind: "noisy")
        }
    }

    @Test("a plug-in that speaks another API version is refused before any call")
    func version() async throws {
        let path = try misbehavingPlugin(
            "future",
            """
            raw.API_VERSION, raw.API_AGE = 7, 1
            raw.METHODS["hello"] = lambda p: {"kind": raw.KIND, "apiVersion": 7, "apiAge": 1}
            """)
        let error = #expect(throws: SnapshotError.self) { _ = try PluginBackend(executable: path) }
        #expect(error?.code == .incompatibleBackend)
        #expect(
            error?.message.contains("speaks plug-in API 6-7; this vmsnap speaks 1-2") == true,
            "\(String(describing: error))")
    }

    @Test("a plug-in that claims internal snapshots and plans an external one is caught before anything runs")
    func lyingPlan() async throws {
        let path = try misbehavingPlugin(
            "liar",
            """
            describe = raw.METHODS["describe"]
            def claims(p):
                d = describe(p)
                d["capabilities"]["supported"].append({"operation": "create", "kind": "internal", "state": "offline"})
                return d
            raw.METHODS["describe"] = claims
            create = raw.METHODS["planCreate"]
            def lies(p):
                p["request"]["kind"] = "external"
                return create(p)
            raw.METHODS["planCreate"] = lies
            """)
        let rig = try await PluginRig(path)
        #expect(rig.backend.descriptor.capabilities.supports(.create, .internal, .offline))
        try await rig.expectFailure(
            .pluginFailed,
            mentioning: ["'liar'", "planCreate", "external snapshot when internal was asked for", "bug in the plug-in"]
        ) {
            try await rig.service.create(SnapshotRequest(name: "boom", kind: .internal), disk: rig.disk, kind: "liar")
        }
    }

    @Test("a plug-in whose plan fails half way is rolled back: the copy it started is removed")
    func failingStep() async throws {
        let path = try misbehavingPlugin(
            "fails",
            """
            create = raw.METHODS["planCreate"]
            def failing(p):
                plan = create(p)
                if p["request"]["name"] == "boom":
                    plan["steps"].insert(1, {"summary": "check the copy", "action": {"run": ["false"]}})
                    plan["pointOfNoReturn"] = len(plan["steps"])
                return plan
            raw.METHODS["planCreate"] = failing
            """)
        let rig = try await PluginRig(path)
        try await rig.expectFailure(
            .commandFailed, mentioning: ["backend 'fails'", "step 2 of 3 (check the copy)", "`false` failed"]
        ) {
            try await rig.service.create(SnapshotRequest(name: "boom", kind: .external), disk: rig.disk, kind: "fails")
        }
    }

    @Test("discovery refuses a plug-in others can write, and a directory others can write")
    func untrusted() throws {
        let path = try misbehavingPlugin("open", "")
        chmod(path, 0o777)
        let dir = (path as NSString).deletingLastPathComponent
        var found = PluginDiscovery.discover(in: [dir])
        #expect(found.found.isEmpty)
        #expect(found.refused.first?.reason.contains("writable by group or others") == true, "\(found.refused)")
        chmod(path, 0o755)
        chmod(dir, 0o777)
        found = PluginDiscovery.discover(in: [dir])
        #expect(
            found.found.isEmpty && found.refused.first?.reason.contains("its directory") == true, "\(found.refused)")
        chmod(dir, 0o755)
        #expect(PluginDiscovery.discover(in: [dir]).found.map(\.kind) == ["open"])
        #expect(
            PluginDiscovery.discover(in: [dir], builtIn: ["open"]).refused.first?.reason.contains("shadowed") == true)
    }
}
