import Foundation
import HypervisorDriver
import SnapshotCore
import Testing

@testable import QEMUDriver

let hasQEMU =
    FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-system-x86_64")
    && FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-io")

/// The driver alone against a real QEMU (TCG, no guest OS: the firmware idles), through the
/// protocol the domain layer uses: lifecycle, the live-disk handle, memory save and restore.
@Suite("QEMU driver against a real QEMU", .serialized, .enabled(if: hasQEMU, "needs qemu-system-x86_64 and qemu-io"))
struct QEMUDriverTests {
    let dir: String
    let driver: QEMUDriver
    let runner = SubprocessRunner()

    init() throws {
        dir = NSTemporaryDirectory() + "vmsnap-qemu-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        driver = QEMUDriver(storeDirectory: dir)
    }

    func image(_ name: String) async throws -> String {
        let path = dir + "/\(name).qcow2"
        try await runner.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "16M"])
        return path
    }

    func definition(_ disks: [String]) -> DomainDefinition {
        DomainDefinition(
            name: "d", memoryMiB: 32,
            disks: disks.enumerated().map {
                DomainDisk(
                    target: "vd\(Character(UnicodeScalar(97 + $0.offset)!))", backend: "qcow2", locator: $0.element)
            }, accel: "tcg")
    }

    func drives(_ disks: [String]) -> [DomainDrive] {
        disks.enumerated().map {
            DomainDrive(
                target: "vd\(Character(UnicodeScalar(97 + $0.offset)!))",
                drive: HypervisorDrive(path: $0.element, format: "qcow2", liveSnapshots: true))
        }
    }

    /// Writes `value` over the first 64 KiB of a drive through QEMU's block layer (HMP qemu-io),
    /// on the handle's connection (QEMU serves one QMP client at a time).
    func write(_ live: any LiveDomain, _ drive: String, _ value: UInt8) async throws {
        let qemu = try #require(live as? QEMULiveDomain)
        try await qemu.client.run(QMP.HumanMonitorCommand(commandLine: "qemu-io \(drive) \"write -P \(value) 0 64k\""))
        try await qemu.client.run(QMP.HumanMonitorCommand(commandLine: "qemu-io \(drive) \"flush\""))
    }

    /// True if the image holds `value` over its first 64 KiB, read beside the running QEMU.
    func holds(_ path: String, _ value: UInt8) async throws -> Bool {
        let out = try await runner.execute(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P \(value) 0 64k", path])
        return out.standardOutput.contains("read 65536/65536")
            && !out.standardOutput.contains("Pattern verification failed")
    }

    @Test("lifecycle: start paused, resume, pause, state, destroy; a second start is refused")
    func lifecycle() async throws {
        let disk = try await image("a")
        try driver.validate(definition([disk]))
        #expect(throws: SnapshotError.self) {
            try driver.validate(DomainDefinition(name: "d", memoryMiB: 32, disks: [], accel: "hvf"))
        }
        // Another hypervisor's kept configuration (an adopted Xen domain's) is not QEMU's.
        #expect(throws: SnapshotError.self) {
            try driver.validate(
                DomainDefinition(
                    name: "d", memoryMiB: 32, disks: [], boot: DomainBoot(kernel: "/k"), accel: "tcg",
                    hypervisorConfig: "{}"))
        }
        #expect(try await driver.runState("d") == .shutoff)
        try await driver.start(definition([disk]), drives: drives([disk]), mode: .boot(paused: true), progress: nil)
        #expect(driver.pid("d") != nil)
        #expect(try await driver.runState("d") == .paused)
        try await driver.resume("d")
        #expect(try await driver.runState("d") == .running)
        try await driver.pause("d")
        #expect(try await driver.runState("d") == .paused)
        await #expect(throws: SnapshotError.self) {
            try await driver.start(
                definition([disk]), drives: drives([disk]), mode: .boot(paused: false), progress: nil)
        }
        try await driver.destroy("d")
        #expect(driver.pid("d") == nil)
        #expect(try await driver.runState("d") == .shutoff)
        try await driver.destroy("d")  // idempotent
    }

    @Test(
        "live disks: an internal and an external snapshot at one instant, undone while running; a merge into the running layer"
    )
    func liveDisks() async throws {
        let a = try await image("a"), b = try await image("b")
        try await driver.start(definition([a, b]), drives: drives([a, b]), mode: .boot(paused: false), progress: nil)
        defer { if let pid = driver.pid("d") { kill(pid, SIGKILL) } }
        let live = try await driver.connect("d")
        try await write(live, "drive-vda", 1)
        try await write(live, "drive-vdb", 1)
        let overlay = dir + "/b.s1.qcow2"
        let snaps = [
            LiveDiskSnapshot(target: "vda", name: "s1", kind: .internal, overlay: nil, format: "qcow2"),
            LiveDiskSnapshot(target: "vdb", name: "s1", kind: .external, overlay: overlay, format: "qcow2"),
        ]
        try await live.pause()
        try await live.snapshotDisks(snaps)
        try await live.resume()
        #expect(FileManager.default.fileExists(atPath: overlay))
        try await write(live, "drive-vdb", 2)
        #expect(try await holds(overlay, 2))
        // Undo both while running: the internal snapshot goes, the overlay's writes go back into b.
        for s in snaps { try await live.undoDiskSnapshot(s) }
        try await live.undoDiskSnapshot(snaps[0])  // idempotent
        #expect(!FileManager.default.fileExists(atPath: overlay))
        #expect(try await holds(b, 2), "the guest's write since the snapshot is kept in the base")
        let info = try await runner.run(["qemu-img", "snapshot", "-U", "-l", a]).standardOutput
        #expect(!info.contains("s1"), "the internal snapshot is gone: \(info)")

        // A merge into the running layer: snapshot again, write, stream the base in.
        try await live.snapshotDisks([snaps[1]])
        try await write(live, "drive-vdb", 3)
        try await live.mergeIntoActive(target: "vdb", base: nil, progress: nil)
        let chain = try await runner.run(["qemu-img", "info", "-U", "--output=json", overlay]).standardOutput
        #expect(!chain.contains("backing-filename"), "the running layer stands alone after the merge: \(chain)")
        #expect(try await holds(overlay, 3))
        await live.close()
        try await driver.destroy("d")
    }

    @Test(
        "prepared overlays: made before the pause with the base's mode; undo on a two-layer chain commits into the overlay's backing only; an unused one is closed and removed"
    )
    func preparedOverlays() async throws {
        let b = try await image("b")
        chmod(b, 0o640)
        try await driver.start(definition([b]), drives: drives([b]), mode: .boot(paused: false), progress: nil)
        defer { if let pid = driver.pid("d") { kill(pid, SIGKILL) } }
        let live = try await driver.connect("d")
        try await write(live, "drive-vda", 1)
        func external(_ n: Int) -> LiveDiskSnapshot {
            LiveDiskSnapshot(
                target: "vda", name: "s\(n)", kind: .external, overlay: dir + "/b.s\(n).qcow2", format: "qcow2")
        }
        func take(_ s: LiveDiskSnapshot) async throws {
            try await live.prepareDiskSnapshots([s])
            var st = stat()
            #expect(
                stat(s.overlay!, &st) == 0 && st.st_mode & 0o777 == 0o640, "made before the pause, mode of the base")
            try await live.pause()
            try await live.snapshotDisks([s])
            try await live.resume()
        }
        try await take(external(1))
        // Opened before the pause by vmsnap, the overlay must be opened as the `-drive` opened
        // the disk: cache mode and zero detection.
        let qemu = try #require(live as? QEMULiveDomain)
        let raw = try await qemu.client.execute("query-named-block-nodes").array ?? []
        func options(_ file: String) -> [String] {
            guard let n = raw.first(where: { $0["file"]?.string == file && $0["drv"]?.string == "qcow2" }) else {
                return ["not open"]
            }
            return [n["cache"]?.description ?? "-", n["detect_zeroes"]?.description ?? "-"]
        }
        #expect(options(external(1).overlay!) == options(b), "the overlay opens like the disk")
        try await write(live, "drive-vda", 2)
        try await take(external(2))
        try await write(live, "drive-vda", 3)
        try await live.undoDiskSnapshot(external(2))
        #expect(!FileManager.default.fileExists(atPath: external(2).overlay!))
        #expect(try await holds(external(1).overlay!, 3), "the write since s2 went into s2's backing")
        #expect(try await holds(b, 1), "the image under s1 is untouched by the undo of s2")
        func openFiles() async throws -> [String] {
            try await qemu.client.run(QMP.QueryNamedBlockNodes()).map(\.file)
        }
        #expect(!(try await openFiles()).contains { $0.contains("b.s2.qcow2") }, "the merged overlay's node is closed")

        // A stream into the running layer takes s1's overlay out of the chain: its node is closed.
        try await take(external(4))
        try await write(live, "drive-vda", 4)
        try await live.mergeIntoActive(target: "vda", base: nil, progress: nil)
        #expect(try await holds(external(4).overlay!, 4))
        let files = try await openFiles()
        #expect(!files.contains { $0.contains("b.s1.qcow2") }, "\(files)")
        #expect(files.contains { $0.contains("b.s4.qcow2") }, "\(files)")

        // Prepared, never switched in, then vmsnap killed: a recovery's new handle finds the node
        // by the overlay's path, closes it and removes the file.
        try await live.prepareDiskSnapshots([external(3)])
        #expect((try await openFiles()).contains { $0.contains("b.s3.qcow2") }, "opened before the pause")
        await live.close()
        let recovery = try #require(try await driver.connect("d") as? QEMULiveDomain)
        try await recovery.undoDiskSnapshot(external(3))
        #expect(!FileManager.default.fileExists(atPath: external(3).overlay!))
        let left = try await recovery.client.run(QMP.QueryNamedBlockNodes()).map(\.file)
        #expect(!left.contains { $0.contains("b.s3.qcow2") }, "\(left)")
        #expect(try await holds(external(4).overlay!, 4), "the disk is untouched by the undo")
        await recovery.close()
        try await driver.destroy("d")
    }

    @Test(
        "a save held at its switchover, or completed without `cont` (vmsnap killed there): a new handle's drain gives the guest back running"
    )
    func releaseAfterKill() async throws {
        let a = try await image("a")
        try await driver.start(definition([a]), drives: drives([a]), mode: .boot(paused: false), progress: nil)
        defer { if let pid = driver.pid("d") { kill(pid, SIGKILL) } }
        for completed in [false, true] {
            let path = dir + "/mem\(completed).vmstate"
            let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            try #require(fd >= 0)
            defer { close(fd) }
            let first = try await driver.connect("d")
            // The pre-copy's steps (KVM's method), checked under TCG: this guest has no OS to
            // write memory during the save.
            try #require(first as? QEMULiveDomain).forceLiveSaveMethod(.precopy)
            try await first.prepareMemorySave(to: fd, live: true, guestBytes: 32 << 20, progress: nil)
            try await first.pause()
            #expect(try await first.isRunning() == false)
            if completed {
                let qemu = try #require(first as? QEMULiveDomain)
                let mark = await qemu.client.eventMark
                try await qemu.client.run(QMP.MigrateContinue())
                _ = try await qemu.client.waitForEvent("MIGRATION", since: mark, timeout: .seconds(30)) {
                    $0.data["status"]?.string == "completed"
                }
            }
            await first.close()  // vmsnap died here
            let second = try await driver.connect("d")
            await second.drainMemorySave()
            await second.close()
            #expect(try await driver.runState("d") == .running, "completed: \(completed)")
        }
        try await driver.destroy("d")
    }

    @Test(
        "a background copy started when vmsnap is killed: a new handle's drain lets it finish (cancelling one hangs QEMU 7.2's guest) and the guest runs"
    )
    func backgroundCopyDrainedAfterKill() async throws {
        let a = try await image("a")
        // 8 MiB of random bytes in guest RAM (QEMU's generic loader), saved into a pipe this test
        // reads slowly (64 KiB every 50 ms) until its checks are done: the copy is under way when
        // vmsnap dies and while the next drain waits (a background copy ignores max-bandwidth).
        // Never not at all: a guest write to a protected page from QEMU's main loop (the
        // firmware's port I/O into RAM) waits for the copy, and QMP with it (seen in CI).
        let random = dir + "/random.bin"
        let urandom = try #require(FileHandle(forReadingAtPath: "/dev/urandom"))
        try urandom.readData(ofLength: 8 << 20).write(to: URL(fileURLWithPath: random))
        var def = definition([a])
        def.qemuArgs = ["-device", "loader,file=\(random),addr=0x100000,force-raw=on"]
        try await driver.start(def, drives: drives([a]), mode: .boot(paused: false), progress: nil)
        defer { if let pid = driver.pid("d") { kill(pid, SIGKILL) } }
        var ends: [Int32] = [-1, -1]
        try #require(pipe(&ends) == 0)
        let reader = SlowPipeReader(fd: ends[0])
        defer { reader.hurry() }
        var writer = ends[1]
        defer { if writer >= 0 { close(writer) } }
        let first = try await driver.connect("d")
        let qemu = try #require(first as? QEMULiveDomain)
        qemu.forceLiveSaveMethod(.writeProtect)
        try await first.prepareMemorySave(to: writer, live: true, guestBytes: 32 << 20, progress: nil)
        close(writer)  // QEMU has its own copy
        writer = -1
        #expect(await first.memorySaveMethod()?.hasPrefix("background copy") == true)
        try await first.pause()
        #expect(try await first.isRunning() == false)
        try await first.startMemorySave()
        try await Task.sleep(for: .milliseconds(500))
        let during = try await qemu.client.migrationInfo().status
        try #require(["setup", "active"].contains(during), "the copy is under way: \(during)")
        await first.close()  // vmsnap died here, the copy under way
        let second = try #require(try await driver.connect("d") as? QEMULiveDomain)
        // The drain waits for the copy; it must still be running a second on, not cancelled.
        let drain = Task { await second.drainMemorySave() }
        try await Task.sleep(for: .seconds(1))
        let held = try await second.client.migrationInfo().status
        #expect(held == "active", "the drain waits for the copy, it does not cancel it: \(held)")
        // Now the image is read to its end at full speed (QEMU closes the pipe when the copy ends).
        reader.hurry()
        await drain.value
        let bytes = await reader.bytes()
        let status = try await second.client.migrationInfo().status
        await second.close()
        #expect(status == "completed", "the copy ran to its end, not cancelled: \(status)")
        #expect(try await driver.runState("d") == .running)
        #expect(
            bytes.count > 8 << 20 && Array(bytes.prefix(4)) == Array("QEVM".utf8),
            "the image was written: \(bytes.count) bytes")
        try await driver.destroy("d")
    }

    @Test("every page of a running QEMU's guest RAM is read through from outside, and nothing else")
    func guestMemoryReadThrough() async throws {
        let a = try await image("a")
        try await driver.start(definition([a]), drives: drives([a]), mode: .boot(paused: false), progress: nil)
        let pid = try #require(driver.pid("d"))
        let pages = try await QEMULiveDomain.offPool { GuestMemoryPrefault.touch(pid: pid, guestBytes: 32 << 20) }
        #expect(pages == (32 << 20) / 4096, "pages read: \(String(describing: pages))")
        try await driver.destroy("d")
    }

    @Test(
        "memory: a live save while the guest runs, measured pause; restore into a fresh QEMU, paused or running",
        arguments: [LiveSave.writeProtect, .precopy])
    func memory(method: LiveSave) async throws {
        let a = try await image("a")
        try await driver.start(definition([a]), drives: drives([a]), mode: .boot(paused: false), progress: nil)
        let path = dir + "/mem.vmstate"
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        try #require(fd >= 0)
        let live = try await driver.connect("d")
        // Each method's steps; only the pre-copy's loses writes under TCG, and this guest has no
        // OS writing memory (MemoryImageTests checks the pages with one that does).
        let qemu = try #require(live as? QEMULiveDomain)
        qemu.forceLiveSaveMethod(method)
        // The capabilities an earlier pre-copy leaves on, which QEMU refuses beside a
        // background copy: the save must still be the method asked for, not a stopped save.
        try await qemu.client.setMigrationCapabilities(["pause-before-switchover": true, "auto-converge": true])
        let mark = await live.mark()
        try await live.prepareMemorySave(to: fd, live: true, guestBytes: 32 << 20, progress: nil)
        let said = await live.memorySaveMethod() ?? "none"
        #expect(said.hasPrefix(method == .writeProtect ? "background copy" : "pre-copy"), "\(said)")
        try await live.pause()
        let saveMark = await live.mark()
        try await live.startMemorySave()
        _ = try await live.finishMemorySave(fd: fd, guestBytes: 32 << 20, since: saveMark, progress: nil)
        if try await !live.isRunning() { try await live.resume() }
        let pause = await live.pauseWindow(since: mark)
        #expect(pause != nil && pause! > 0, "STOP and RESUME were seen: \(String(describing: pause))")
        let size = lseek(fd, 0, SEEK_CUR)
        close(fd)
        #expect(size > 0)
        await live.close()
        try await driver.destroy("d")

        try await driver.start(
            definition([a]), drives: drives([a]), mode: .restoreMemory(path: path, running: false), progress: nil)
        #expect(try await driver.runState("d") == .paused)
        try await driver.destroy("d")
        try await driver.start(
            definition([a]), drives: drives([a]), mode: .restoreMemory(path: path, running: true), progress: nil)
        #expect(try await driver.runState("d") == .running)
        try await driver.destroy("d")

        // A damaged image is refused with the reason, and QEMU does not stay behind.
        try Data(repeating: 0x42, count: 4096).write(to: URL(fileURLWithPath: dir + "/bad.vmstate"))
        let error = await #expect(throws: SnapshotError.self) {
            try await driver.start(
                definition([a]), drives: drives([a]), mode: .restoreMemory(path: dir + "/bad.vmstate", running: true),
                progress: nil)
        }
        #expect(error?.code == .invalidImage, "\(String(describing: error))")
        #expect(driver.pid("d") == nil)
    }

    @Test("QMP refusals come back as the layer's error, classified by QEMU's error class")
    func refusals() async throws {
        let a = try await image("a")
        try await driver.start(definition([a]), drives: drives([a]), mode: .boot(paused: true), progress: nil)
        let live = try await driver.connect("d")
        let error = await #expect(throws: SnapshotError.self) {
            try await live.snapshotDisks([
                LiveDiskSnapshot(target: "vdz", name: "x", kind: .internal, overlay: nil, format: "qcow2")
            ])
        }
        let qmp = error?.cause as? QMPError
        #expect(qmp != nil && qmp?.errorClass != .unknown, "\(String(describing: error))")
        await live.close()
        try await driver.destroy("d")
    }
}

/// The PCI slots on QEMU's command line are the ones the driver gives libvirt: both describe one
/// machine, or libvirt's QEMU cannot load vmsnap's saved device state.
/// Reads a pipe to its end on a thread of its own (blocking reads must not hold one of the test
/// pool's threads): 64 KiB every 50 ms until ``hurry()``, then as fast as it comes. Closes the
/// pipe at its end.
final class SlowPipeReader: @unchecked Sendable {
    private let lock = NSLock()
    private var fast = false
    private var data: [UInt8] = []
    private var done = false
    private var waiter: CheckedContinuation<[UInt8], Never>?

    init(fd: Int32) {
        Thread.detachNewThread { [self] in
            var chunk = [UInt8](repeating: 0, count: 1 << 16)
            while true {
                let n = read(fd, &chunk, chunk.count)
                if n <= 0 { break }
                lock.withLock { data += chunk[0..<n] }
                if !lock.withLock({ fast }) { usleep(50_000) }
            }
            close(fd)
            let w: CheckedContinuation<[UInt8], Never>? = lock.withLock {
                done = true
                defer { waiter = nil }
                return waiter
            }
            w?.resume(returning: lock.withLock { data })
        }
    }

    func hurry() { lock.withLock { fast = true } }

    /// Everything read, once the writer has closed its end.
    func bytes() async -> [UInt8] {
        await withCheckedContinuation { continuation in
            let ready: [UInt8]? = lock.withLock {
                if done { return data }
                waiter = continuation
                return nil
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }
}

@Suite("QEMU command line and libvirt hardware")
struct QEMUCommandLineSlotTests {
    let driver = QEMUDriver(storeDirectory: NSTemporaryDirectory() + "vmsnap-argv")
    let targets = (0..<9).map { "vd\(Character(UnicodeScalar(97 + $0)!))" }

    func argv(qemuArgs: [String] = []) -> (argv: [String], hardware: LibvirtHardware) {
        let def = DomainDefinition(
            name: "d", memoryMiB: 32,
            disks: targets.map { DomainDisk(target: $0, backend: "qcow2", locator: "/x/\($0).qcow2") }, accel: "tcg",
            qemuArgs: qemuArgs)
        let drives = targets.map {
            DomainDrive(
                target: $0, drive: HypervisorDrive(path: "/x/\($0).qcow2", format: "qcow2", liveSnapshots: true))
        }
        let argv = driver.argv(
            def, drives: drives, runtime: QEMURuntime(storeDirectory: "/tmp/s", domain: "d"),
            options: QEMULaunchOptions())
        return (argv, driver.libvirtHardware(def))
    }

    /// The options of the `-device` whose value starts with `prefix` and names `id`.
    func device(_ argv: [String], _ prefix: String, id: String) -> [String] {
        argv.first { $0.hasPrefix(prefix) && $0.split(separator: ",").contains("id=\(id)") }?
            .split(separator: ",").map(String.init) ?? []
    }

    @Test("each disk and the agent's channel sit in the slot libvirt is told, written in hex as QEMU reads it")
    func slotsAgree() throws {
        let (argv, hardware) = argv()
        let first = try #require(hardware.firstDiskSlot)
        for (index, target) in targets.enumerated() {
            #expect(
                device(argv, "virtio-blk-pci,", id: target).contains("addr=0x" + String(first + index, radix: 16)),
                "\(target): \(device(argv, "virtio-blk-pci,", id: target))")
        }
        #expect(device(argv, "virtio-blk-pci,", id: "vdi").contains("addr=0xb"), "the ninth disk in slot 11")
        let channel = try #require(hardware.agentChannelSlot)
        #expect(device(argv, "virtio-serial-pci,", id: "vmsnap-vser0").contains("addr=0x\(channel)"))
        #expect(hardware.features == ["acpi"] && hardware.withoutUSBAndBalloon && hardware.serialConsole)
    }

    @Test("a definition with qemuArgs leaves placement to QEMU (a -nic takes a slot first) and tells libvirt no slots")
    func qemuArgsLeavePlacementToQEMU() {
        let (argv, hardware) = argv(qemuArgs: ["-nic", "user,model=virtio-net-pci"])
        #expect(!argv.contains { $0.contains("addr=") }, "\(argv)")
        #expect(hardware.firstDiskSlot == nil && hardware.agentChannelSlot == nil)
    }
}
