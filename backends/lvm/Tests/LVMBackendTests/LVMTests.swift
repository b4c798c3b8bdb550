import Foundation
@testable import LVMBackend
import SnapshotCore
import Testing

/// The volume group the real-LVM tests use: set by scripts/lvm-guest inside the test guest, or by
/// an operator on a host with device-mapper (`VMSNAP_LVM_VG=vg0 swift test --filter LVM`).
let lvmVG = ProcessInfo.processInfo.environment["VMSNAP_LVM_VG"]

@Suite("LVM command lines and names")
struct LVMCommandTests {
    @Test("snapshot commands are argument arrays; classic ones carry the copy-on-write size, thin ones skip activation skip")
    func argv() {
        #expect(LVMCommands.createClassicSnapshot("s", of: "vg/lv", size: "20%ORIGIN", tags: ["vmsnap"]) == ["lvcreate", "-q", "-s", "-n", "s", "-l", "20%ORIGIN", "--addtag", "vmsnap", "vg/lv"])
        #expect(LVMCommands.createClassicSnapshot("s", of: "vg/lv", size: "64m", tags: []) == ["lvcreate", "-q", "-s", "-n", "s", "-L", "64m", "vg/lv"])
        #expect(LVMCommands.createThinSnapshot("s", of: "vg/lv", tags: ["a"]) == ["lvcreate", "-q", "-s", "-kn", "-n", "s", "--addtag", "a", "vg/lv"])
        #expect(LVMCommands.merge("vg/s") == ["lvconvert", "-q", "--merge", "-i", "1", "vg/s"])
    }

    @Test("snapshot volume names are valid LVM names and unique; tags round-trip any snapshot name", arguments: ["nightly", "before upgrade", "état/é", "a:b&c", String(repeating: "x", count: 200)])
    func names(name: String) {
        let lv = LVMBackend.snapshotVolumeName(origin: "web", snapshot: name)
        #expect(lv.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "+_.-".contains($0)) })
        #expect(lv.count <= 127 && lv.hasPrefix("web-vs-"))
        #expect(lv != LVMBackend.snapshotVolumeName(origin: "web", snapshot: name + "x"))
        let tag = LVMBackend.tags(origin: "web", snapshot: name)[2]
        #expect(tag.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "+_.-=%".contains($0)) })
        #expect(LVMBackend.decode(String(tag.dropFirst("vmsnap.name=".count))) == name)
    }
}

@Suite("LVM on a real device-mapper", .serialized, .enabled(if: lvmVG != nil, "set VMSNAP_LVM_VG (scripts/lvm-guest does, inside its test guest)"))
struct LVMRealTests {
    func pool(thin: Bool) throws -> BackendPool {
        var options = ["vg": lvmVG!]
        if thin {
            guard let thinPool = ProcessInfo.processInfo.environment["VMSNAP_LVM_THIN_POOL"] else {
                throw SnapshotError(.invalidArgument, "set VMSNAP_LVM_THIN_POOL for the thin tests")
            }
            options["thin-pool"] = thinPool
        }
        let dir = (NSTemporaryDirectory() as NSString).appendingPathComponent("vmsnap-lvm-\(UUID().uuidString.prefix(6))")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return BackendPool(directory: dir, options: options)
    }

    @Test("bad input: a missing VG, too little space for the CoW area, an LV open by another process: clear errors, no stray LVs")
    func badInput() async throws {
        let backend = LVMBackend(settings: ["cow-size": "8m"])
        let p = try pool(thin: false)
        let registry = BackendRegistry()
        try registry.register(BackendFactory(kind: "lvm") { _ in backend })
        let svc = DiskSnapshotService(store: try MetadataStore(directory: p.directory + "/store"), registry: registry, notify: { _ in })
        let missing = try await #require(throws: SnapshotError.self) {
            try await svc.create(SnapshotRequest(name: "s", kind: .external), disk: "novg/nolv", kind: "lvm")
        }
        #expect(missing.code == .notFound)
        let disk = try await backend.createDisk(named: "bad-input", size: 16 << 20, in: p)
        // Use up the volume group's free extents: the copy-on-write area cannot be allocated.
        try await SubprocessRunner().run(["lvcreate", "-q", "-n", "filler", "-l", "100%FREE", lvmVG!])
        let before = try await backend.poolInventory(p)
        let noSpace = try await #require(throws: (any Error).self) {
            try await svc.create(SnapshotRequest(name: "huge", kind: .external), disk: disk, kind: "lvm")
        }
        try await SubprocessRunner().run(["lvremove", "-q", "-y", "\(lvmVG!)/filler"])
        #expect(String(describing: noSpace).contains("insufficient") || String(describing: noSpace).contains("free space") || String(describing: noSpace).contains("extents"), "\(noSpace)")
        let after = try await backend.poolInventory(p)
        #expect(after == before.filter { $0 != "filler" }, "no stray LVs: \(before) -> \(after)")
        #expect(try await svc.layout(of: disk, kind: "lvm").1.snapshots.isEmpty, "nothing recorded")
        // Hold the origin open: a revert must be refused, not deferred silently.
        let ok = LVMBackend(settings: ["cow-size": "8m"])
        let registry2 = BackendRegistry()
        try registry2.register(BackendFactory(kind: "lvm") { _ in ok })
        let svc2 = DiskSnapshotService(store: try MetadataStore(directory: p.directory + "/store2"), registry: registry2, notify: { _ in })
        try await svc2.create(SnapshotRequest(name: "s1", kind: .external), disk: disk, kind: "lvm")
        let fd = open("/dev/\(disk)", O_RDONLY)
        #expect(fd >= 0)
        let busy = try await #require(throws: SnapshotError.self) { try await svc2.revert(disk: disk, to: "s1", kind: "lvm") }
        close(fd)
        #expect(busy.code == .unsupported || busy.code == .inUse, "\(busy)")
        try await svc2.delete(disk: disk, snapshot: "s1", mode: .merge, kind: "lvm")
        try await backend.perform("remove-if-present", arguments: ["lv": disk])
        #expect(!(try await backend.poolInventory(p)).contains { $0.hasPrefix("bad-input") }, "the test's own volumes are gone")
    }
}
