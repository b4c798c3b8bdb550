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
        let protocolDriver: String
        switch drive.drive.sourceType {
        case .file: protocolDriver = "file"
        case .block: protocolDriver = "host_device"
        case .network:
            throw SnapshotError(
                .unsupported,
                "disk \(drive.target) is a network volume (\(drive.drive.path)); backups of a shut-off domain open files and block devices only. Start the domain and back it up while it runs"
            )
        }
        let spec: [String: Any] = [
            "driver": drive.drive.format, "node-name": QEMUDriver.driveID(drive.target),
            "file": ["driver": protocolDriver, "filename": drive.drive.path],
        ]
        let data = try JSONSerialization.data(withJSONObject: spec, options: [.sortedKeys])
        return String(decoding: data, as: UTF8.self)
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
