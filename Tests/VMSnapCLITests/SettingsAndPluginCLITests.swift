import Foundation
import SnapshotCore
import Testing

/// The raw plug-in's directory, for `VMSNAP_BACKEND_PATH`.
let rawPluginDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent()
    .appendingPathComponent("backends/raw").path

@Suite("Typed settings and plug-ins through the CLI")
struct SettingsAndPluginCLITests {
    let plugins = ["VMSNAP_BACKEND_PATH": rawPluginDirectory]

    @Test(
        "unknown keys and bad values are refused with the valid ones, in --set and in settings.conf, and nothing changes",
        arguments: [
            ("cow_size=8m", "unknown setting 'cow_size'"),
            ("engine=bogus", "'bogus' is not one of auto, native, vhd-util"),
            ("warn-percent=500", "500 is above 100"), ("lvm-library=maybe", "'maybe' is not one of on, off"),
            ("overlay-dir=relative/dir", "not an absolute path"),
            ("copy-mode=fast", "'fast' is not one of auto, reflink, sparse"),
        ])
    func badSettings(pair: String, why: String) async throws {
        let cli = try CLI()
        let disk = try await cli.disk()
        let flag = try await cli.run(["disk", "snapshot", "create", disk, "s1", "--set", pair], environment: plugins)
        #expect(flag.status == 1 && flag.err.contains("--set") && flag.err.contains(why), "\(flag.err)")
        if pair.hasPrefix("cow_size") {
            #expect(
                flag.err.contains("cow-size (lvm)") && flag.err.contains("copy-mode (raw)"),
                "lists valid keys: \(flag.err)")
        }
        let parts = pair.split(separator: "=", maxSplits: 1)
        try "\(parts[0]) = \(parts[1])\n".write(toFile: cli.store + "/settings.conf", atomically: true, encoding: .utf8)
        let file = try await cli.run(["disk", "snapshot", "create", disk, "s1"], environment: plugins)
        #expect(file.status == 1 && file.err.contains("settings.conf") && file.err.contains(why), "\(file.err)")
        try FileManager.default.removeItem(atPath: cli.store + "/settings.conf")
        let listing = try await cli.run(["disk", "snapshot", "list", disk, "--json"], environment: plugins)
        #expect(listing.status == 0 && !listing.out.contains("\"s1\""), "nothing was created: \(listing.out)")
    }

    @Test(
        "backend list shows built-in backends and the raw plug-in with origins and API versions; describe prints the schema"
    )
    func listAndDescribe() async throws {
        let cli = try CLI()
        let list = try await cli.run(["backend", "list"], environment: plugins)
        #expect(list.status == 0)
        for kind in ["qcow2", "lvm", "vhd"] {
            #expect(list.out.contains("\(kind)  (built-in, backend API 1)"), "\(list.out)")
        }
        #expect(
            list.out.contains("raw  (plug-in \(rawPluginDirectory)/vmsnap-backend-raw, plug-in API 1)"), "\(list.out)")
        let describe = try await cli.run(["backend", "describe", "raw"], environment: plugins)
        #expect(
            describe.out.contains("setting copy-mode: one of auto, reflink, sparse, default auto"), "\(describe.out)")
        #expect(describe.out.contains("live snapshots taken by: storage"), "\(describe.out)")
        let unknown = try await cli.run(["backend", "test", "raw", "--only", "nonsense"], environment: plugins)
        #expect(
            unknown.status == 1 && unknown.err.contains("--only nonsense matches no check")
                && unknown.err.contains("external.revert"), "\(unknown.err)")
        let file = cli.root + "/afile"
        _ = FileManager.default.createFile(atPath: file, contents: Data())
        let pool = try await cli.run(["backend", "test", "raw", "--pool", file], environment: plugins)
        #expect(pool.status == 1 && pool.err.contains("is not a directory"), "\(pool.err)")
    }

    @Test("a raw disk through the plug-in: snapshot, revert, delete from the CLI, and a revert lists what it discards")
    func rawDisk() async throws {
        let cli = try CLI()
        let disk = cli.pool + "/vm.raw"
        try Data(repeating: 0x11, count: 1 << 20).write(to: URL(fileURLWithPath: disk))
        let create = try await cli.run(
            ["disk", "snapshot", "create", disk, "s1", "--backend", "raw"], environment: plugins)
        #expect(create.status == 0, "\(create.err)")
        try Data(repeating: 0x22, count: 1 << 20).write(to: URL(fileURLWithPath: disk))
        let revert = try await cli.run(["disk", "snapshot", "revert", disk, "s1"], environment: plugins)
        #expect(revert.status == 0 && revert.err.contains("discards unsaved-changes"), "\(revert.err)")
        #expect(FileManager.default.contents(atPath: disk) == Data(repeating: 0x11, count: 1 << 20))
        let delete = try await cli.run(["disk", "snapshot", "delete", disk, "s1"], environment: plugins)
        #expect(delete.status == 0, "\(delete.err)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: cli.pool) == ["vm.raw"], "the copy is gone")
    }
}
