import Foundation
import HypervisorDriver
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// A qemu-storage-daemon over a shut-off domain's disks: QEMU's block layer without a guest, so
/// checkpoints' bitmaps, views, exports and push backups of a shut-off domain go through the same
/// QMP as a running one's. It daemonizes with a pid file and a QMP socket beside the domain's
/// other control files, so `backup end` in a later command finds it.
struct QEMUStorageDaemon: Sendable {
    let runtime: QEMURuntime
    static let binary = ProcessInfo.processInfo.environment["VMSNAP_QEMU_STORAGE_DAEMON"] ?? "qemu-storage-daemon"

    var qmpSocket: String { (runtime.directory as NSString).appendingPathComponent("storage-qmp.sock") }
    var pidFile: String { (runtime.directory as NSString).appendingPathComponent("storage.pid") }
    var logFile: String { (runtime.directory as NSString).appendingPathComponent("storage.log") }

    /// The daemon's process, if it is alive and is ours (its command line names our socket).
    func pid() -> pid_t? { QEMURuntime.liveProcess(pidFile: pidFile, naming: qmpSocket) }

    /// One `--blockdev` in JSON (no option-string escaping): the drive's format over its file or
    /// block device, named after the drive as the domain's QEMU names it.
    static func blockdev(_ drive: DomainDrive) throws -> String {
        let file: [String: Any]
        switch drive.drive.sourceType {
        case .file: file = ["driver": "file", "filename": drive.drive.path]
        case .block: file = ["driver": "host_device", "filename": drive.drive.path]
        case .network:
            // `-drive` takes QEMU's legacy `rbd:` filename; `--blockdev` wants its parts.
            guard let rbd = rbdOptions(drive.drive.path) else {
                throw SnapshotError(
                    .unsupported,
                    "disk \(drive.target) is a network volume QEMU names \(drive.drive.path); the storage daemon that serves a shut-off domain's backups opens files, block devices and rbd: volumes only. Start the domain and back it up while it runs"
                )
            }
            file = rbd
        }
        let spec: [String: Any] = [
            "driver": drive.drive.format, "node-name": QEMUDriver.driveID(drive.target), "file": file,
        ]
        let data = try JSONSerialization.data(withJSONObject: spec, options: [.sortedKeys])
        return String(decoding: data, as: UTF8.self)
    }

    /// QEMU's legacy `rbd:pool[/namespace]/image[@snapshot][:id=USER][:conf=PATH]` filename
    /// (`\\` escapes `:` and itself) as `--blockdev` options for the rbd driver; nil for any
    /// other spelling, or a key this does not know (nothing guessed).
    static func rbdOptions(_ path: String) -> [String: Any]? {
        guard path.hasPrefix("rbd:") else { return nil }
        var fields: [String] = [""]
        var escaped = false
        for c in path.dropFirst(4) {
            if escaped {
                fields[fields.count - 1].append(c)
                escaped = false
            } else if c == "\\" {
                escaped = true
            } else if c == ":" {
                fields.append("")
            } else {
                fields[fields.count - 1].append(c)
            }
        }
        guard !escaped else { return nil }
        var name = Substring(fields[0])
        var options: [String: Any] = ["driver": "rbd"]
        if let at = name.firstIndex(of: "@") {
            options["snapshot"] = String(name[name.index(after: at)...])
            name = name[..<at]
        }
        let parts = name.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        guard (2...3).contains(parts.count), parts.allSatisfy({ !$0.isEmpty }) else { return nil }
        options["pool"] = parts[0]
        if parts.count == 3 { options["namespace"] = parts[1] }
        options["image"] = parts[parts.count - 1]
        for field in fields.dropFirst() {
            guard let eq = field.firstIndex(of: "=") else { return nil }
            let key = field[..<eq]
            let value = String(field[field.index(after: eq)...])
            switch key {
            case "id": options["user"] = value
            case "conf": options["conf"] = value
            default: return nil
            }
        }
        return options
    }

    /// Starts the daemon over `drives` (they are opened read-write: a checkpoint's new bitmap is
    /// written into the image) and connects to it.
    func start(_ drives: [DomainDrive], runner: any CommandRunning) async throws -> QMPClient {
        try FileManager.default.createDirectory(
            atPath: runtime.directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        unlink(qmpSocket)
        unlink(pidFile)
        var argv = [Self.binary]
        for drive in drives { argv += ["--blockdev", try Self.blockdev(drive)] }
        argv += [
            "--chardev", "socket,id=vmsnap-qmp,path=\(QEMUDriver.escape(qmpSocket)),server=on,wait=off",
            "--monitor", "chardev=vmsnap-qmp", "--pidfile", pidFile, "--daemonize",
        ]
        let out = try await runner.execute(argv)
        guard out.status == 0 else {
            throw SnapshotError(
                .commandFailed,
                "qemu-storage-daemon did not start over the domain's disks: \(CommandError(argv: argv, status: out.status, standardError: out.standardError.trimmingCharacters(in: .whitespacesAndNewlines)).description)"
            )
        }
        return try await QMPClient.connect(path: qmpSocket, timeout: .seconds(10))
    }

    /// Waits (up to 10 s, then kills it) until the daemon has exited and released the images.
    func waitUntilGone() {
        let deadline = Date().addingTimeInterval(10)
        while let pid = pid() {
            if Date() > deadline { kill(pid, SIGKILL) }
            usleep(20_000)
        }
        unlink(pidFile)
        unlink(qmpSocket)
    }
}

extension QEMUDriver {
    func storageDaemon(_ domain: String) -> QEMUStorageDaemon { QEMUStorageDaemon(runtime: runtime(domain)) }

    public func storageDaemonRuns(_ domain: String) -> Bool { storageDaemon(domain).pid() != nil }

    public func blockLayer(_ definition: DomainDefinition, drives: [DomainDrive]) async throws -> any BlockLayer {
        let rt = runtime(definition.name)
        if rt.pid() != nil {
            return QEMUBlockLayer(client: try await connect(rt, domain: definition.name), daemon: nil)
        }
        let daemon = storageDaemon(definition.name)
        if daemon.pid() != nil {
            return QEMUBlockLayer(
                client: try await QMPClient.connect(path: daemon.qmpSocket, timeout: .seconds(10)), daemon: daemon)
        }
        return QEMUBlockLayer(client: try await daemon.start(drives, runner: runner), daemon: daemon)
    }
}
