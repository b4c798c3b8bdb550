import Foundation
import HypervisorDriver
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// Where a running domain's QEMU keeps its control files: `<store>/run/<domain>/`.
public struct QEMURuntime: Sendable, Hashable {
    public let directory: String

    public init(storeDirectory: String, domain: String) {
        directory = (storeDirectory as NSString).appendingPathComponent("run/\(domain)")
    }

    public init(runDirectory: String, domain: String) {
        directory = (runDirectory as NSString).appendingPathComponent(domain)
    }

    public var qmpSocket: String { (directory as NSString).appendingPathComponent("qmp.sock") }
    /// The guest agent's channel (`org.qemu.guest_agent.0`).
    public var agentSocket: String { (directory as NSString).appendingPathComponent("qga.sock") }
    public var pidFile: String { (directory as NSString).appendingPathComponent("qemu.pid") }
    /// The guest's serial console, appended to across launches.
    public var serialLog: String { (directory as NSString).appendingPathComponent("serial.log") }
    public var stderrLog: String { (directory as NSString).appendingPathComponent("qemu.log") }
    /// The TPM emulator's control socket, pid file and log (domains with a TPM).
    public var tpmSocket: String { (directory as NSString).appendingPathComponent("tpm.sock") }
    public var tpmPidFile: String { (directory as NSString).appendingPathComponent("swtpm.pid") }
    public var tpmLog: String { (directory as NSString).appendingPathComponent("swtpm.log") }

    /// The QEMU process of the domain, if one is alive.
    public func pid() -> pid_t? { Self.liveProcess(pidFile: pidFile, naming: qmpSocket) }

    /// The process a pid file names, if it is alive and its command line names `marker` (a
    /// reused pid is not ours); nil for a zombie.
    static func liveProcess(pidFile: String, naming marker: String) -> pid_t? {
        guard let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
            let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0
        else { return nil }
        guard kill(pid, 0) == 0 || errno == EPERM else { return nil }
        guard let cmdline = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"),
            String(decoding: cmdline, as: UTF8.self).contains(marker)
        else { return nil }
        if let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")"), stat[stat.index(close, offsetBy: 2)] == "Z"
        {
            return nil
        }
        return pid
    }
}

/// How to launch QEMU for a domain.
public struct QEMULaunchOptions: Sendable, Hashable {
    /// Start with the vCPUs stopped (`-S`).
    public var paused = false
    /// Wait for a memory image (`-incoming defer`).
    public var incoming = false
    /// Restore an internal full-system snapshot at start (`-loadvm`).
    public var loadInternal: String?

    public init(paused: Bool = false, incoming: Bool = false, loadInternal: String? = nil) {
        self.paused = paused
        self.incoming = incoming
        self.loadInternal = loadInternal
    }
}

/// Launches, connects to and stops QEMU for a domain. QEMU daemonizes, writes a pid file and
/// listens on a QMP socket under `<store>/run/<domain>/`, so any later vmsnap process can drive it.
public struct QEMUDriver: HypervisorDriver {
    public let runner: any CommandRunning
    public var binary: String
    /// Where each domain's control files go (`<store>/run`).
    public let runDirectory: String

    public init(
        storeDirectory: String, runner: any CommandRunning = SubprocessRunner(),
        binary: String = ProcessInfo.processInfo.environment["VMSNAP_QEMU"] ?? "qemu-system-x86_64"
    ) {
        self.runner = runner
        self.binary = binary
        runDirectory = (storeDirectory as NSString).appendingPathComponent("run")
    }

    public var name: String { "qemu" }

    public var capabilities: HypervisorCapabilities {
        var caps = HypervisorCapabilities(
            liveMemorySave: true, suspendedMemorySave: true, internalMemory: true, liveDiskSnapshotFormats: ["qcow2"],
            liveDiskSnapshotKinds: [.internal, .external], quiesce: true, liveMerge: true, dirtyBitmaps: true,
            blockExport: true, dirtyBitmapFormats: ["qcow2"])
        caps.heldStorageSnapshots = true
        caps.servedDisks = true
        return caps
    }

    public func runtime(_ domain: String) -> QEMURuntime { QEMURuntime(runDirectory: runDirectory, domain: domain) }

    /// The `-drive` id QMP commands name the disk by.
    public static func driveID(_ target: String) -> String { "drive-\(target)" }

    public func validate(_ definition: DomainDefinition) throws {
        guard ["auto", "kvm", "tcg"].contains(definition.accel) else {
            throw SnapshotError(
                .invalidArgument,
                "domain '\(definition.name)': accel '\(definition.accel)' is not one of auto, kvm, tcg")
        }
        guard definition.hypervisorConfig == nil else {
            throw SnapshotError(
                .invalidArgument,
                "domain '\(definition.name)': hypervisorConfig holds another hypervisor's own configuration (a Xen domain's, from `vmsnap domain adopt`); a QEMU domain takes extra settings as qemuArgs. Remove it"
            )
        }
        // swtpm's option parser splits at commas and has no escape for them.
        if let tpm = definition.tpm, tpm.state.contains(",") {
            throw SnapshotError(
                .invalidArgument,
                "domain '\(definition.name)': tpm.state '\(tpm.state)' contains a comma, which swtpm cannot take in a path; choose another directory"
            )
        }
        if definition.tpm != nil, runtime(definition.name).directory.contains(",") {
            throw SnapshotError(
                .invalidArgument,
                "domain '\(definition.name)': its run directory \(runtime(definition.name).directory) contains a comma, which the TPM emulator (swtpm) cannot take in its socket path; rename the domain or use a store path without commas"
            )
        }
    }

    public func pid(_ domain: String) -> Int32? { runtime(domain).pid() }

    public func accelerator(_ definition: DomainDefinition) -> String { Self.chooseAccelerator(definition.accel) }

    public func consoleLog(_ domain: String) -> String { runtime(domain).serialLog }

    public func libvirtDomainType(_ definition: DomainDefinition) -> String {
        Self.chooseAccelerator(definition.accel) == "kvm" ? "kvm" : "qemu"
    }

    /// PCI slots on bus 0, fixed so libvirt can place the same devices at the same addresses
    /// (slot 1 is the PIIX3 bridge; -nodefaults leaves out the VGA card). QEMU chose the same ones
    /// itself before they were fixed, so older saved states still load.
    static let agentChannelSlot = 2
    static let firstDiskSlot = 3

    /// The slot argument for a device, or nothing: a definition with `qemuArgs` may add devices
    /// (`-nic`, `-vga`) that QEMU places before any `-device`, in the slots fixed here, so its
    /// devices are placed by QEMU as before (and libvirt cannot be told the same machine).
    static func slot(_ slot: Int, _ definition: DomainDefinition) -> String {
        definition.qemuArgs.isEmpty ? ",addr=0x" + String(slot, radix: 16) : ""
    }

    /// What `argv` builds besides the disks: ACPI (QEMU's default), the serial console, the guest
    /// agent's channel; no USB, no balloon. libvirt 9.0 then loads this QEMU's device state.
    public func libvirtHardware(_ definition: DomainDefinition) -> LibvirtHardware {
        let placed = definition.qemuArgs.isEmpty
        return LibvirtHardware(
            machine: "pc", features: ["acpi"], firstDiskSlot: placed ? Self.firstDiskSlot : nil, serialConsole: true,
            agentChannelSlot: placed ? Self.agentChannelSlot : nil, withoutUSBAndBalloon: true)
    }

    public func accelerator(forLibvirtType type: String) -> String? {
        switch type {
        case "kvm": return "kvm"
        case "qemu": return "tcg"
        default: return nil
        }
    }

    public func runState(_ domain: String) async throws -> DomainRunState {
        guard pid(domain) != nil else { return .shutoff }
        let client = try await connect(runtime(domain), domain: domain)
        do {
            let running = try await client.status().running
            await client.close()
            return running ? .running : .paused
        } catch {
            await client.close()
            throw Self.layerError(error)
        }
    }

    public func start(
        _ definition: DomainDefinition, drives: [DomainDrive], mode: StartMode, progress: ProgressHandler?
    ) async throws {
        let options: QEMULaunchOptions
        switch mode {
        case .boot(let paused): options = QEMULaunchOptions(paused: paused)
        case .loadInternal(let name, _): options = QEMULaunchOptions(paused: true, loadInternal: name)
        case .restoreMemory: options = QEMULaunchOptions(incoming: true)
        }
        let rt = runtime(definition.name)
        let client = try await launch(definition, drives: drives, runtime: rt, options: options)
        do {
            switch mode {
            case .boot: break
            case .loadInternal(_, let running): if running { try await client.cont() }
            case .restoreMemory(let path, let running):
                try await restoreMemory(client, runtime: rt, from: path, running: running, progress: progress)
            }
            await client.close()
        } catch {
            try? await terminate(rt, client: client)
            await client.close()
            throw Self.layerError(error)
        }
    }

    public func destroy(_ domain: String) async throws { try await terminate(runtime(domain)) }

    public func shutdown(_ domain: String, timeout: Duration) async throws -> Bool {
        try await powerdown(runtime(domain), timeout: timeout)
    }

    public func pause(_ domain: String) async throws {
        let client = try await connect(runtime(domain), domain: domain)
        defer { client.closeNow() }
        do { try await client.stop() } catch { throw Self.layerError(error) }
    }

    public func resume(_ domain: String) async throws {
        let client = try await connect(runtime(domain), domain: domain)
        defer { client.closeNow() }
        do { try await client.cont() } catch { throw Self.layerError(error) }
    }

    public func connect(_ domain: String) async throws -> any LiveDomain {
        QEMULiveDomain(
            client: try await connect(runtime(domain), domain: domain), agentSocket: runtime(domain).agentSocket,
            pid: runtime(domain).pid())
    }

    /// QMP refusals as the layer's error type.
    static func layerError(_ error: any Error) -> any Error {
        (error as? QMPError)?.snapshotError ?? error
    }

    /// The name QEMU knows a memory file by (passed with `getfd`).
    static let memoryFDName = "vmsnap-memory"

    /// Feeds a QEMU started with `-incoming defer` the memory image at `path`.
    func restoreMemory(
        _ client: QMPClient, runtime: QEMURuntime, from path: String, running: Bool, progress: ProgressHandler?
    )
        async throws
    {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw SnapshotError(.io, "cannot open memory image \(path): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        let total = UInt64(max(lseek(fd, 0, SEEK_END), 0))
        lseek(fd, 0, SEEK_SET)
        try await client.setMigrationCapabilities(["events": true])
        try await client.passFile(fd, name: Self.memoryFDName)
        let mark = await client.eventMark
        let unreadable = { (why: String) in
            SnapshotError(
                .invalidImage,
                "QEMU could not load the memory image \(path) (\(why)); it may be damaged or from another QEMU. The disks are reverted; the domain is left shut off. Revert with --force to boot from the disks"
            )
        }
        do {
            Trace.mark("revert: memory load begins")
            try await client.run(QMP.MigrateIncoming(uri: "fd:\(Self.memoryFDName)"))
            _ = try await QEMULiveDomain.followMigration(
                client: client, fd: fd, total: total, since: mark, phase: "memory restore", progress: progress
            ) { status, _ in
                unreadable("migration \(status)")
            }
            Trace.mark("revert: memory loaded")
        } catch let e as SnapshotError where e.code != .invalidImage {
            // QEMU exits when the incoming stream is not one it can load: the connection fails
            // (closed, or a write into it) as it goes.
            guard try await exits(runtime, within: .seconds(5)) else { throw e }
            throw unreadable("QEMU exited while loading it")
        }
        if running { try await client.cont() }
    }

    /// True once the domain's QEMU has exited, waiting up to `timeout`.
    func exits(_ runtime: QEMURuntime, within timeout: Duration) async throws -> Bool {
        let deadline = ContinuousClock.now + timeout
        while runtime.pid() != nil {
            guard ContinuousClock.now < deadline else { return false }
            try await Task.sleep(for: .milliseconds(20))
        }
        return true
    }

    /// `kvm` when /dev/kvm opens and the CPU exposes hardware virtualization (a nested,
    /// software-assisted KVM boots a Linux guest too slowly to use), else `tcg`.
    public static func chooseAccelerator(_ requested: String) -> String {
        guard requested == "auto" else { return requested }
        let fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return "tcg" }
        close(fd)
        guard let cpuinfo = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8) else { return "tcg" }
        let flags = cpuinfo.split(separator: "\n").first { $0.hasPrefix("flags") } ?? ""
        let words = Set(flags.split(separator: " "))
        return words.contains("vmx") || words.contains("svm") ? "kvm" : "tcg"
    }

    /// How long QEMU holds a served disk's requests while its server is gone (then they fail).
    static let servedReconnectSeconds = 300

    /// A `-drive` or `-chardev` option value: commas doubled, as QEMU's option parser wants.
    static func escape(_ value: String) -> String { value.replacingOccurrences(of: ",", with: ",,") }

    /// The guest RAM's id: the machine's own default name, so a memory image names its RAM the
    /// same with and without a memory backend, and loads into either.
    static let ramID = "pc.ram"

    /// Guest RAM in the host's reserved huge pages: a memfd (no hugetlbfs mount, no file to
    /// create), every page taken at start (`prealloc`, as libvirt does for huge pages: a page
    /// missing later would kill the guest with SIGBUS), by up to four threads.
    ///
    /// A background copy write-protects and reads guest RAM page by page in the pause; with
    /// 2 MiB pages there are 512 times fewer of them (docs/benchmarks.md: the pause and the save
    /// rate of huge-page guests).
    static func hugepageBackend(_ backing: DomainMemoryBacking, memoryMiB: Int, vcpus: Int) -> String {
        "memory-backend-memfd,id=\(ramID),size=\(memoryMiB)M,hugetlb=on,hugetlbsize=\(backing.hugepageMiB)M,prealloc=on,prealloc-threads=\(min(max(vcpus, 1), 4))"
    }

    /// The command line for `definition` with `drives`, as an argument array.
    public func argv(
        _ definition: DomainDefinition, drives: [DomainDrive], runtime: QEMURuntime, options: QEMULaunchOptions
    ) -> [String] {
        var argv = [
            binary,
            "-name", "guest=\(Self.escape(definition.name)),debug-threads=on",
            "-uuid", definition.uuid.uuidString.lowercased(),
            "-machine", "pc" + (definition.memoryBacking == nil ? "" : ",memory-backend=\(Self.ramID)"),
            "-accel", Self.chooseAccelerator(definition.accel),
            "-m", "\(definition.memoryMiB)", "-smp", "\(definition.vcpus)",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-daemonize", "-pidfile", runtime.pidFile,
            "-qmp", "unix:\(Self.escape(runtime.qmpSocket)),server=on,wait=off",
            "-chardev", "file,id=serial0,path=\(Self.escape(runtime.serialLog)),append=on",
            "-serial", "chardev:serial0",
            // A channel for the guest agent (freeze and thaw around snapshots, --quiesce).
            "-device", "virtio-serial-pci,id=vmsnap-vser0" + Self.slot(Self.agentChannelSlot, definition),
            "-chardev", "socket,id=qga0,path=\(Self.escape(runtime.agentSocket)),server=on,wait=off",
            "-device", "virtserialport,bus=vmsnap-vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ]
        if let backing = definition.memoryBacking {
            argv += [
                "-object", Self.hugepageBackend(backing, memoryMiB: definition.memoryMiB, vcpus: definition.vcpus),
            ]
        }
        if let firmware = definition.firmware {
            // OVMF as two flash chips: the code read-only, the domain's variable store writable.
            argv += [
                "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=\(Self.escape(firmware.code))",
                "-drive", "if=pflash,format=raw,unit=1,file=\(Self.escape(firmware.vars))",
            ]
        }
        if let tpm = definition.tpm { argv += SoftwareTPM.qemuArguments(tpm, runtime: runtime) }
        if let kernel = definition.boot.kernel {
            argv += ["-kernel", kernel]
            if let initrd = definition.boot.initrd { argv += ["-initrd", initrd] }
            if let cmdline = definition.boot.cmdline { argv += ["-append", cmdline] }
        }
        for (index, disk) in drives.enumerated() {
            let id = Self.driveID(disk.target)
            // A served disk: the raw NBD export of vmsnap's disk server, not the image file. If the
            // server goes (killed, crashed), QEMU holds the guest's requests and reconnects to the
            // one a recovery starts (`vmsnap recover`), for up to `servedReconnectSeconds`.
            let source =
                disk.drive.nbdSocket.map {
                    "file.driver=nbd,file.server.type=unix,file.server.path=\(Self.escape($0)),file.export=\(Self.escape(disk.target)),file.reconnect-delay=\(Self.servedReconnectSeconds),format=raw"
                } ?? "file=\(Self.escape(disk.drive.path)),format=\(disk.drive.format)"
            argv += [
                "-drive",
                "\(source),if=none,id=\(id),cache=writeback,discard=unmap",
                "-device",
                "virtio-blk-pci,drive=\(id),id=\(disk.target)" + Self.slot(Self.firstDiskSlot + index, definition)
                    + (index == 0 && definition.boot.kernel == nil ? ",bootindex=1" : ""),
            ]
        }
        if options.paused || options.incoming { argv.append("-S") }
        if options.incoming { argv += ["-incoming", "defer"] }
        if let tag = options.loadInternal { argv += ["-loadvm", tag] }
        return argv + definition.qemuArgs
    }

    /// Launches QEMU and connects to its QMP socket.
    public func launch(
        _ definition: DomainDefinition, drives: [DomainDrive], runtime: QEMURuntime,
        options: QEMULaunchOptions = QEMULaunchOptions()
    ) async throws -> QMPClient {
        if runtime.pid() != nil {
            throw SnapshotError(.conflict, "domain '\(definition.name)' is running already")
        }
        try FileManager.default.createDirectory(
            atPath: runtime.directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        unlink(runtime.qmpSocket)
        unlink(runtime.pidFile)
        try HostHugePages.check(definition)
        let argv = argv(definition, drives: drives, runtime: runtime, options: options)
        let tpm = SoftwareTPM(runtime: runtime, runner: runner)
        if let device = definition.tpm { try await tpm.start(device, domain: definition.name) }
        let out: CommandOutput
        do { out = try await runner.execute(argv) } catch {
            await tpm.stop(within: .zero)
            throw error
        }
        guard out.status == 0 else {
            await tpm.stop(within: .zero)
            throw SnapshotError(
                .commandFailed,
                "QEMU did not start for domain '\(definition.name)': \(CommandError(argv: argv, status: out.status, standardError: out.standardError.trimmingCharacters(in: .whitespacesAndNewlines)).description)"
            )
        }
        do {
            return try await QMPClient.connect(path: runtime.qmpSocket, timeout: .seconds(20))
        } catch {
            try? await terminate(runtime)  // a QEMU nobody can drive is not left running
            throw error
        }
    }

    /// Connects to a running domain's QEMU.
    public func connect(_ runtime: QEMURuntime, domain: String) async throws -> QMPClient {
        guard runtime.pid() != nil else { throw SnapshotError(.conflict, "domain '\(domain)' is not running") }
        return try await QMPClient.connect(path: runtime.qmpSocket, timeout: .seconds(10))
    }

    /// Ends QEMU: `quit` over QMP (or SIGKILL if QEMU does not answer), then waits until the
    /// process is gone so its image locks are released.
    public func terminate(_ runtime: QEMURuntime, client: QMPClient? = nil) async throws {
        guard let pid = runtime.pid() else {
            await SoftwareTPM(runtime: runtime, runner: runner).stop(within: .seconds(5))
            return
        }
        if let client {
            _ = try? await client.run(QMP.Quit(), timeout: .seconds(5))
        } else if let c = try? await QMPClient.connect(path: runtime.qmpSocket, timeout: .seconds(2)) {
            _ = try? await c.run(QMP.Quit(), timeout: .seconds(5))
            await c.close()
        }
        let deadline = ContinuousClock.now + .seconds(10)
        while runtime.pid() != nil, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
        if runtime.pid() != nil {
            kill(pid, SIGKILL)
            while runtime.pid() != nil { try await Task.sleep(for: .milliseconds(20)) }
        }
        unlink(runtime.pidFile)
        await SoftwareTPM(runtime: runtime, runner: runner).stop(within: .seconds(5))
    }

    /// Asks the guest to power off (ACPI) and waits up to `timeout` for QEMU to exit.
    public func powerdown(_ runtime: QEMURuntime, timeout: Duration) async throws -> Bool {
        guard runtime.pid() != nil else { return true }
        let client = try await QMPClient.connect(path: runtime.qmpSocket, timeout: .seconds(5))
        defer { client.closeNow() }
        try await client.run(QMP.SystemPowerdown())
        let deadline = ContinuousClock.now + timeout
        while runtime.pid() != nil {
            guard ContinuousClock.now < deadline else { return false }
            try await Task.sleep(for: .milliseconds(100))
        }
        await SoftwareTPM(runtime: runtime, runner: runner).stop(within: .seconds(5))
        return true
    }
}
