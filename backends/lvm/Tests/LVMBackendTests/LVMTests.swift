import BackendConformance
import Foundation
@testable import LVMBackend
import SnapshotCore
import Testing

/// The volume group the real-LVM tests use: set by scripts/lvm-guest inside the test guest, or by
/// an operator on a host with device-mapper (`VMSNAP_LVM_VG=vg0 swift test --filter LVM`).
let lvmVG = ProcessInfo.processInfo.environment["VMSNAP_LVM_VG"]

@Suite("LVM command lines and names")
struct LVMCommandTests {
    @Test(
        "snapshot commands are argument arrays; classic ones carry the copy-on-write size, thin ones skip activation skip"
    )
    func argv() {
        #expect(
            LVMCommands.createClassicSnapshot("s", of: "vg/lv", size: "20%ORIGIN", tags: ["vmsnap"]) == [
                "lvcreate", "-q", "-s", "-n", "s", "-l", "20%ORIGIN", "--addtag", "vmsnap", "vg/lv",
            ])
        #expect(
            LVMCommands.createClassicSnapshot("s", of: "vg/lv", size: "64m", tags: []) == [
                "lvcreate", "-q", "-s", "-n", "s", "-L", "64m", "vg/lv",
            ])
        #expect(
            LVMCommands.createThinSnapshot("s", of: "vg/lv", tags: ["a"]) == [
                "lvcreate", "-q", "-s", "-kn", "-n", "s", "--addtag", "a", "vg/lv",
            ])
        #expect(LVMCommands.merge("vg/s") == ["lvconvert", "-q", "--merge", "-i", "1", "vg/s"])
    }

    @Test(
        "snapshot volume names are valid LVM names and unique; tags round-trip any snapshot name",
        arguments: ["nightly", "before upgrade", "état/é", "a:b&c", String(repeating: "x", count: 200)])
    func names(name: String) {
        let lv = LVMBackend.snapshotVolumeName(origin: "web", snapshot: name)
        #expect(lv.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "+_.-".contains($0)) })
        #expect(lv.count <= 127 && lv.hasPrefix("web-vs-"))
        #expect(lv != LVMBackend.snapshotVolumeName(origin: "web", snapshot: name + "x"))
        let tag = LVMBackend.tags(origin: "web", snapshot: name)[2]
        // LVM allows letters, digits and `_+.-/=!:&#` in tags (no `%`, no space).
        #expect(tag.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "_+.-/=!:&#".contains($0)) })
        #expect(LVMBackend.decode(String(tag.dropFirst("vmsnap.name=".count))) == name)
    }
}

@Suite(
    "LVM on a real device-mapper", .serialized,
    .enabled(if: lvmVG != nil, "set VMSNAP_LVM_VG (scripts/lvm-guest does, inside its test guest)"))
struct LVMRealTests {
    func pool(thin: Bool) throws -> BackendPool {
        var options = ["vg": lvmVG!]
        if thin {
            guard let thinPool = ProcessInfo.processInfo.environment["VMSNAP_LVM_THIN_POOL"] else {
                throw SnapshotError(.invalidArgument, "set VMSNAP_LVM_THIN_POOL for the thin tests")
            }
            options["thin-pool"] = thinPool
        }
        let dir = (NSTemporaryDirectory() as NSString).appendingPathComponent(
            "vmsnap-lvm-\(UUID().uuidString.prefix(6))")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return BackendPool(directory: dir, options: options)
    }

    @Test("bad input: a missing VG, too little space for the CoW area: clear errors, no stray LVs")
    func badInput() async throws {
        let backend = LVMBackend(settings: ["cow-size": "8m"])
        let p = try pool(thin: false)
        let registry = BackendRegistry()
        try registry.register(BackendFactory(kind: "lvm") { _ in backend })
        let svc = DiskSnapshotService(
            store: try MetadataStore(directory: p.directory + "/store"), registry: registry, notify: { _ in })
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
        #expect(
            String(describing: noSpace).contains("insufficient") || String(describing: noSpace).contains("free space")
                || String(describing: noSpace).contains("extents"), "\(noSpace)")
        let after = try await backend.poolInventory(p)
        #expect(after == before.filter { $0 != "filler" }, "no stray LVs: \(before) -> \(after)")
        #expect(try await svc.layout(of: disk, kind: "lvm").1.snapshots.isEmpty, "nothing recorded")
        #expect(
            noSpace is SnapshotError && (noSpace as? SnapshotError)?.code == .noSpace,
            "vmsnap's own check, before lvcreate: \(noSpace)")
        try await backend.perform("remove-if-present", arguments: ["lv": disk])
        #expect(
            !(try await backend.poolInventory(p)).contains { $0.hasPrefix("bad-input") },
            "the test's own volumes are gone")
    }
}

/// One scratch disk on the test VG with a service over a private store; every check reads bytes
/// back through the device nodes.
struct LVMFixture {
    let backend: LVMBackend
    let service: DiskSnapshotService
    let disk: String
    let vg: String
    let directory: String

    init(
        _ tag: String, size: UInt64 = 16 << 20, settings: [String: String] = ["cow-size": "8m"], thinPool: String? = nil
    ) async throws {
        vg = lvmVG!
        directory = (NSTemporaryDirectory() as NSString).appendingPathComponent(
            "vmsnap-lvm-\(tag)-\(UUID().uuidString.prefix(6))")
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        backend = LVMBackend(settings: settings)
        let registry = BackendRegistry()
        let b = backend
        try registry.register(BackendFactory(kind: "lvm") { _ in b })
        service = DiskSnapshotService(
            store: try MetadataStore(directory: directory + "/store"), registry: registry, notify: { _ in })
        var options = ["vg": vg]
        if let thinPool { options["thin-pool"] = thinPool }
        disk = try await backend.createDisk(
            named: "t-\(tag)-\(UUID().uuidString.prefix(4).lowercased())", size: size,
            in: BackendPool(directory: directory, options: options))
    }

    func layout() async throws -> DiskLayout { try await service.layout(of: disk, kind: "lvm").1 }

    func write(seed: UInt64, length: Int = 64 << 10, at offset: UInt64 = 0) async throws -> [UInt8] {
        let bytes = ConformanceContext.pattern(seed: seed, length: length)
        try await backend.write(bytes, at: offset, layout: layout())
        return bytes
    }

    func read(_ view: DataView = .active, length: Int = 64 << 10) async throws -> [UInt8] {
        try await backend.read(view, at: 0, length: length, layout: layout())
    }

    /// Every LV of the VG, by name.
    func inventory() async throws -> [String] { try await backend.volumes(vg).map(\.lv_name).sorted() }

    func volume(_ path: String) async throws -> LVMBackend.Volume { try await backend.volume(path) }

    /// Runs `body` with a fresh fixture and removes its volumes afterwards, whatever happened.
    static func with(
        _ tag: String, size: UInt64 = 16 << 20, settings: [String: String] = ["cow-size": "8m"],
        thinPool: String? = nil,
        _ body: (LVMFixture) async throws -> Void
    ) async throws {
        let f = try await LVMFixture(tag, size: size, settings: settings, thinPool: thinPool)
        do { try await body(f) } catch {
            await f.destroy()
            throw error
        }
        await f.destroy()
    }

    func destroy() async {
        if let layout = try? await layout() { try? await backend.destroyDisk(layout: layout) }
        try? FileManager.default.removeItem(atPath: directory)
    }
}

@Suite(
    "LVM: deferred merges, copy-on-write fill, thin pools, names", .serialized,
    .enabled(if: lvmVG != nil, "set VMSNAP_LVM_VG (scripts/lvm-guest does, inside its test guest)"))
struct LVMStateTests {
    @Test(
        "revert of an open classic origin: started, reported pending (old data kept, disk blocked), finished after close: snapshot bytes back, snapshot taken again"
    )
    func deferredMerge() async throws {
        try await LVMFixture.with("defer") { f in
            let a = try await f.write(seed: 1)
            try await f.service.create(SnapshotRequest(name: "s1", kind: .external), disk: f.disk, kind: "lvm")
            let b = try await f.write(seed: 2)
            let snapPath = try #require(try await f.layout().snapshot(named: "s1")).image
            let fd = open("/dev/\(f.disk)", O_RDONLY)
            try #require(fd >= 0)
            let pending = try await #require(throws: SnapshotError.self) {
                try await f.service.revert(disk: f.disk, to: "s1", kind: "lvm")
            }
            #expect(pending.code == .pending, "\(pending)")
            #expect(
                pending.message.contains("open") && pending.message.contains("vmsnap recover"),
                "says why and what finishes it: \(pending.message)")
            #expect(try await f.volume(f.disk).isMerging, "LVM has the merge queued")
            #expect(try await f.read() == b, "the origin keeps its data until the merge")
            #expect(try f.service.store.openJournals(diskID: f.disk).count == 1, "journal open: not claimed done")
            let blocked = try await #require(throws: SnapshotError.self) {
                try await f.service.create(SnapshotRequest(name: "s2", kind: .external), disk: f.disk, kind: "lvm")
            }
            #expect(blocked.code == .pending && blocked.message.contains("revert"), "\(blocked)")
            let still = try await f.service.recoverAll()
            #expect(still.map(\.outcome) == [.pending], "still open: \(still)")
            close(fd)
            let done = try await f.service.recoverAll()
            #expect(done.map(\.outcome) == [.completed], "\(done)")
            #expect(try await f.read() == a, "the snapshot's bytes")
            #expect(!(try await f.volume(f.disk).isMerging))
            let again = try await f.volume(snapPath)
            #expect(
                again.tags.contains("vmsnap.name=s1")
                    && again.origin == f.disk.split(separator: "/").last.map(String.init),
                "taken again, tagged: \(again)")
            #expect(try await f.read(.snapshot("s1")) == a)
            #expect(try await f.layout().disk.current == "s1")
            #expect(try f.service.store.openJournals().isEmpty)
            // Closed from the start: the merge is immediate.
            _ = try await f.write(seed: 3)
            try await f.service.revert(disk: f.disk, to: "s1", kind: "lvm")
            #expect(try await f.read() == a)
        }
    }

    @Test("an open thin origin: revert refused, nothing changed")
    func thinOpenOriginRefused() async throws {
        guard let pool = ProcessInfo.processInfo.environment["VMSNAP_LVM_THIN_POOL"] else { return }
        try await LVMFixture.with("thinopen", thinPool: pool) { f in
            _ = try await f.write(seed: 1)
            try await f.service.create(SnapshotRequest(name: "s1", kind: .external), disk: f.disk, kind: "lvm")
            let b = try await f.write(seed: 2)
            let before = try await f.inventory()
            let fd = open("/dev/\(f.disk)", O_RDONLY)
            try #require(fd >= 0)
            let refused = try await #require(throws: SnapshotError.self) {
                try await f.service.revert(disk: f.disk, to: "s1", kind: "lvm")
            }
            close(fd)
            #expect(refused.code == .inUse && refused.message.contains("thin"), "\(refused)")
            #expect(try await f.inventory() == before)
            #expect(try await f.read() == b)
            #expect(try f.service.store.openJournals().isEmpty)
        }
    }

    @Test(
        "copy-on-write fill: a warning past warn-percent, --repair grows the area by extend-percent, the snapshot's bytes intact"
    )
    func fillWarningAndRepair() async throws {
        try await LVMFixture.with("fill", settings: ["cow-size": "8m", "warn-percent": "50", "extend-percent": "100"]) {
            f in
            let a = try await f.write(seed: 1, length: 6 << 20)
            try await f.service.create(SnapshotRequest(name: "s1", kind: .external), disk: f.disk, kind: "lvm")
            _ = try await f.write(seed: 2, length: 5 << 20)
            let problems = try await f.backend.verify(layout: f.layout())
            #expect(
                problems.contains {
                    $0.contains("copy-on-write area") && $0.contains("full") && $0.contains("--repair")
                }, "\(problems)")
            let image = try #require(try await f.layout().snapshot(named: "s1")).image
            let sizeBefore = try await f.volume(image).size
            let actions = try await f.service.maintain(disk: f.disk, kind: "lvm")
            #expect(actions.count == 1 && actions[0].contains("grew"), "\(actions)")
            let after = try await f.volume(image)
            #expect(after.size >= sizeBefore * 2, "\(sizeBefore) -> \(after.size)")
            #expect((after.fill ?? 100) < 50, "\(after.data_percent)")
            #expect(try await f.backend.verify(layout: f.layout()).isEmpty)
            #expect(try await f.read(.snapshot("s1"), length: 6 << 20) == a, "the snapshot's data survived the resize")
            #expect(try await f.service.maintain(disk: f.disk, kind: "lvm").isEmpty, "nothing left to grow")
        }
    }

    @Test(
        "an overflowed copy-on-write area: the snapshot is reported lost, revert refused with nothing changed, delete works"
    )
    func overflowIsLost() async throws {
        try await LVMFixture.with("overflow", size: 32 << 20, settings: ["cow-size": "4m"]) { f in
            _ = try await f.write(seed: 1)
            try await f.service.create(SnapshotRequest(name: "s1", kind: .external), disk: f.disk, kind: "lvm")
            let b = try await f.write(seed: 2, length: 12 << 20)
            let image = try #require(try await f.layout().snapshot(named: "s1")).image
            let overflowed = try await f.volume(image)
            #expect(overflowed.isInvalid, "lv_attr \(overflowed.lv_attr)")
            let problems = try await f.backend.verify(layout: f.layout())
            #expect(problems.contains { $0.contains("overflowed") && $0.contains("lost") }, "\(problems)")
            let before = try await f.inventory()
            let refused = try await #require(throws: SnapshotError.self) {
                try await f.service.revert(disk: f.disk, to: "s1", kind: "lvm")
            }
            #expect(refused.code == .invalidImage && refused.message.contains("lost"), "\(refused)")
            #expect(try await f.inventory() == before)
            #expect(try await f.read(length: 12 << 20) == b, "the origin untouched")
            #expect(
                try await f.service.maintain(disk: f.disk, kind: "lvm").isEmpty,
                "an overflowed area is not grown: its data is gone")
            try await f.service.delete(disk: f.disk, snapshot: "s1", mode: .merge, kind: "lvm")
            #expect(!(try await f.inventory()).contains(String(image.split(separator: "/").last!)))
        }
    }

    @Test(
        "a full thin pool: snapshot refused with the pool named and nothing created; --repair grows the pool, then the snapshot works"
    )
    func fullThinPool() async throws {
        let vg = lvmVG!
        let pool = "vmsnap-small-\(UUID().uuidString.prefix(4).lowercased())"
        try await SubprocessRunner().run(["lvcreate", "-q", "-L", "8m", "-T", "\(vg)/\(pool)", "--errorwhenfull", "y"])
        let removePool: @Sendable () async -> Void = {
            _ = try? await SubprocessRunner().execute(["lvremove", "-q", "-y", "\(vg)/\(pool)"])
        }
        do {
            try await LVMFixture.with("full", size: 32 << 20, settings: ["extend-percent": "100"], thinPool: pool) {
                f in
                // Fill the pool: writes past its 8 MiB fail (errorwhenfull).
                let fd = open("/dev/\(f.disk)", O_WRONLY)
                try #require(fd >= 0)
                let chunk = ConformanceContext.pattern(seed: 9, length: 1 << 20)
                for i in 0..<16 {
                    _ = chunk.withUnsafeBytes { pwrite(fd, $0.baseAddress, chunk.count, off_t(i << 20)) }
                }
                fsync(fd)
                close(fd)
                #expect(try await f.volume("\(vg)/\(pool)").fill ?? 0 >= 100)
                let before = try await f.inventory()
                let full = try await #require(throws: SnapshotError.self) {
                    try await f.service.create(SnapshotRequest(name: "s1", kind: .external), disk: f.disk, kind: "lvm")
                }
                #expect(
                    full.code == .noSpace && full.message.contains(pool) && full.message.contains("full"), "\(full)")
                #expect(try await f.inventory() == before, "no stray LVs")
                #expect(try await f.layout().snapshots.isEmpty)
                #expect(
                    try await f.backend.verify(layout: f.layout()).contains {
                        $0.contains("thin pool") && $0.contains("data")
                    })
                let actions = try await f.service.maintain(disk: f.disk, kind: "lvm")
                #expect(actions.contains { $0.contains("grew thin pool") }, "\(actions)")
                #expect(try await f.volume("\(vg)/\(pool)").size >= 16 << 20)
                let a = try await f.write(seed: 3)
                try await f.service.create(SnapshotRequest(name: "s1", kind: .external), disk: f.disk, kind: "lvm")
                _ = try await f.write(seed: 4)
                try await f.service.revert(disk: f.disk, to: "s1", kind: "lvm")
                #expect(try await f.read() == a)
            }
        } catch {
            await removePool()
            throw error
        }
        await removePool()
    }

    @Test(
        "not an origin, names LVM refuses: clear errors, nothing created; reserved words inside snapshot names are made safe"
    )
    func namesAndNonOrigins() async throws {
        try await LVMFixture.with("names") { f in
            let a = try await f.write(seed: 1)
            try await f.service.create(
                SnapshotRequest(name: "nightly_tmeta", kind: .external), disk: f.disk, kind: "lvm")
            let image = try #require(try await f.layout().snapshot(named: "nightly_tmeta")).image
            #expect(!image.contains("_"), "no reserved infix in \(image)")
            #expect(try await f.read(.snapshot("nightly_tmeta")) == a)
            let before = try await f.inventory()
            let other = DiskSnapshotService(
                store: try MetadataStore(directory: f.directory + "/other"), registry: f.service.registry,
                notify: { _ in })
            let cases: [(String, SnapshotError.Code, String)] = [
                (image, .unsupported, "not an origin"),
                (
                    "\(f.vg)/\(ProcessInfo.processInfo.environment["VMSNAP_LVM_THIN_POOL"] ?? "pool")", .unsupported,
                    "thin pool"
                ),
                ("\(f.vg)/-bad", .invalidName, "start with '-'"),
                ("\(f.vg)/data_tdata", .invalidName, "_tdata"),
                ("\(f.vg)/snapshot", .invalidName, "reserves"),
            ]
            for (locator, code, text) in cases {
                let e = try await #require(throws: SnapshotError.self) {
                    try await other.create(SnapshotRequest(name: "x", kind: .external), disk: locator, kind: "lvm")
                }
                #expect(e.code == code && e.message.contains(text), "\(locator): \(e)")
            }
            #expect(try await f.inventory() == before, "nothing created")
            #expect(try other.store.disks().isEmpty, "nothing recorded")
        }
    }

    @Test("the metadata store can be rebuilt from the storage: tags name each snapshot")
    func rebuildFromTags() async throws {
        try await LVMFixture.with("tags") { f in
            let names = ["before upgrade", "état: é&ü"]
            for (i, name) in names.enumerated() {
                _ = try await f.write(seed: UInt64(i + 1))
                try await f.service.create(SnapshotRequest(name: name, kind: .external), disk: f.disk, kind: "lvm")
            }
            let fresh = DiskSnapshotService(
                store: try MetadataStore(directory: f.directory + "/rebuilt"), registry: f.service.registry,
                notify: { _ in })
            let (_, layout) = try await fresh.layout(of: f.disk, kind: "lvm")
            #expect(Set(layout.snapshots.map(\.name)) == Set(names))
            #expect(try await f.backend.verify(layout: layout).isEmpty)
            let b = ConformanceContext.pattern(seed: 1, length: 64 << 10)
            #expect(try await f.backend.read(.snapshot("before upgrade"), at: 0, length: b.count, layout: layout) == b)
        }
    }
}
