import Foundation
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

    public var qmpSocket: String { (directory as NSString).appendingPathComponent("qmp.sock") }
    public var pidFile: String { (directory as NSString).appendingPathComponent("qemu.pid") }
    /// The guest's serial console, appended to across launches.
    public var serialLog: String { (directory as NSString).appendingPathComponent("serial.log") }
    public var stderrLog: String { (directory as NSString).appendingPathComponent("qemu.log") }

    /// The QEMU process of the domain, if one is alive.
    public func pid() -> pid_t? {
        guard let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
              let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0 else { return nil }
        guard kill(pid, 0) == 0 || errno == EPERM else { return nil }
        // A reused pid is not our QEMU: check its command line names our socket.
        guard let cmdline = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"),
              String(decoding: cmdline, as: UTF8.self).contains(qmpSocket) else { return nil }
        // A zombie has exited.
        if let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
           let close = stat.lastIndex(of: ")"), stat[stat.index(close, offsetBy: 2)] == "Z" { return nil }
        return pid
    }
}

/// One disk as QEMU opens it.
public struct QEMUDrive: Sendable, Hashable {
    public var target: String
    public var path: String
    /// QEMU's format driver: qcow2, vpc, raw.
    public var format: String

    public init(target: String, path: String, format: String) {
        self.target = target
        self.path = path
        self.format = format
    }

    /// The `-drive` id QMP commands name the disk by.
    public var driveID: String { Self.driveID(target) }

    /// The `-drive` id of the disk the guest sees as `target`.
    public static func driveID(_ target: String) -> String { "drive-\(target)" }
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
/// listens on a QMP socket, so any later vmsnap process can drive it.
public struct QEMUDriver: Sendable {
    public let runner: any CommandRunning
    public var binary: String

    public init(runner: any CommandRunning = SubprocessRunner(), binary: String = ProcessInfo.processInfo.environment["VMSNAP_QEMU"] ?? "qemu-system-x86_64") {
        self.runner = runner
        self.binary = binary
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

    /// A `-drive` or `-chardev` option value: commas doubled, as QEMU's option parser wants.
    static func escape(_ value: String) -> String { value.replacingOccurrences(of: ",", with: ",,") }

    /// The command line for `definition` with `drives`, as an argument array.
    public func argv(_ definition: DomainDefinition, drives: [QEMUDrive], runtime: QEMURuntime, options: QEMULaunchOptions) -> [String] {
        var argv = [binary,
                    "-name", "guest=\(Self.escape(definition.name)),debug-threads=on",
                    "-uuid", definition.uuid.uuidString.lowercased(),
                    "-machine", "pc", "-accel", Self.chooseAccelerator(definition.accel),
                    "-m", "\(definition.memoryMiB)", "-smp", "\(definition.vcpus)",
                    "-nodefaults", "-no-user-config", "-display", "none",
                    "-daemonize", "-pidfile", runtime.pidFile,
                    "-qmp", "unix:\(Self.escape(runtime.qmpSocket)),server=on,wait=off",
                    "-chardev", "file,id=serial0,path=\(Self.escape(runtime.serialLog)),append=on",
                    "-serial", "chardev:serial0"]
        if let kernel = definition.boot.kernel {
            argv += ["-kernel", kernel]
            if let initrd = definition.boot.initrd { argv += ["-initrd", initrd] }
            if let cmdline = definition.boot.cmdline { argv += ["-append", cmdline] }
        }
        for (index, drive) in drives.enumerated() {
            argv += ["-drive", "file=\(Self.escape(drive.path)),format=\(drive.format),if=none,id=\(drive.driveID),cache=writeback,discard=unmap",
                     "-device", "virtio-blk-pci,drive=\(drive.driveID),id=\(drive.target)\(index == 0 && definition.boot.kernel == nil ? ",bootindex=1" : "")"]
        }
        if options.paused || options.incoming { argv.append("-S") }
        if options.incoming { argv += ["-incoming", "defer"] }
        if let tag = options.loadInternal { argv += ["-loadvm", tag] }
        return argv + definition.qemuArgs
    }

    /// Launches QEMU and connects to its QMP socket.
    public func launch(_ definition: DomainDefinition, drives: [QEMUDrive], runtime: QEMURuntime, options: QEMULaunchOptions = QEMULaunchOptions()) async throws -> QMPClient {
        if runtime.pid() != nil {
            throw SnapshotError(.conflict, "domain '\(definition.name)' is running already")
        }
        try FileManager.default.createDirectory(atPath: runtime.directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        unlink(runtime.qmpSocket)
        unlink(runtime.pidFile)
        let argv = argv(definition, drives: drives, runtime: runtime, options: options)
        let out = try await runner.execute(argv)
        guard out.status == 0 else {
            throw SnapshotError(.commandFailed, "QEMU did not start for domain '\(definition.name)': \(CommandError(argv: argv, status: out.status, standardError: out.standardError.trimmingCharacters(in: .whitespacesAndNewlines)).description)")
        }
        return try await QMPClient.connect(path: runtime.qmpSocket, timeout: .seconds(20))
    }

    /// Connects to a running domain's QEMU.
    public func connect(_ runtime: QEMURuntime, domain: String) async throws -> QMPClient {
        guard runtime.pid() != nil else { throw SnapshotError(.conflict, "domain '\(domain)' is not running") }
        return try await QMPClient.connect(path: runtime.qmpSocket, timeout: .seconds(10))
    }

    /// Ends QEMU: `quit` over QMP (or SIGKILL if QEMU does not answer), then waits until the
    /// process is gone so its image locks are released.
    public func terminate(_ runtime: QEMURuntime, client: QMPClient? = nil) async throws {
        guard let pid = runtime.pid() else { return }
        if let client { _ = try? await client.execute("quit", timeout: .seconds(5)) }
        else if let c = try? await QMPClient.connect(path: runtime.qmpSocket, timeout: .seconds(2)) {
            _ = try? await c.execute("quit", timeout: .seconds(5))
        }
        let deadline = ContinuousClock.now + .seconds(10)
        while runtime.pid() != nil, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
        if runtime.pid() != nil {
            kill(pid, SIGKILL)
            while runtime.pid() != nil { try await Task.sleep(for: .milliseconds(20)) }
        }
        unlink(runtime.pidFile)
    }

    /// Asks the guest to power off (ACPI) and waits up to `timeout` for QEMU to exit.
    public func powerdown(_ runtime: QEMURuntime, timeout: Duration) async throws -> Bool {
        guard runtime.pid() != nil else { return true }
        let client = try await QMPClient.connect(path: runtime.qmpSocket, timeout: .seconds(5))
        try await client.execute("system_powerdown")
        let deadline = ContinuousClock.now + timeout
        while runtime.pid() != nil {
            guard ContinuousClock.now < deadline else { return false }
            try await Task.sleep(for: .milliseconds(100))
        }
        return true
    }
}
