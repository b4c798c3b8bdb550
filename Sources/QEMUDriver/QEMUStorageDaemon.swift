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
    /// as `--blockdev` options for the rbd driver, split as QEMU splits it (on unescaped `:`,
    /// then `/` and `@`; `\\` makes the next character literal); nil for any other spelling, a
    /// key this does not know, or an empty part (nothing guessed).
    static func rbdOptions(_ path: String) -> [String: Any]? {
        guard path.hasPrefix("rbd:") else { return nil }
        /// Splits on unescaped `separators`, keeping escapes; nil if the text ends in `\`.
        func split(_ text: Substring, on separators: Set<Character>) -> [(Substring, Character?)]? {
            var out: [(Substring, Character?)] = []
            var start = text.startIndex
            var i = text.startIndex
            while i < text.endIndex {
                if text[i] == "\\" {
                    i = text.index(after: i)
                    guard i < text.endIndex else { return nil }
                } else if separators.contains(text[i]) {
                    out.append((text[start..<i], text[i]))
                    start = text.index(after: i)
                }
                i = text.index(after: i)
            }
            out.append((text[start...], nil))
            return out
        }
        func unescape(_ text: Substring) -> String {
            var out = ""
            var escaped = false
            for c in text {
                if !escaped && c == "\\" {
                    escaped = true
                } else {
                    out.append(c)
                    escaped = false
                }
            }
            return out
        }
        guard let fields = split(path.dropFirst(4), on: [":"]), let name = split(fields[0].0, on: ["/", "@"]) else {
            return nil
        }
        // pool / [namespace /] image [@ snapshot]
        let slashes = name.filter { $0.1 == "/" }.count
        let at = name.firstIndex { $0.1 == "@" }
        guard (1...2).contains(slashes), name.filter({ $0.1 == "@" }).count <= 1,
            at.map({ $0 == name.count - 2 }) ?? true, name.allSatisfy({ !$0.0.isEmpty })
        else { return nil }
        var options: [String: Any] = ["driver": "rbd", "pool": unescape(name[0].0)]
        if slashes == 2 { options["namespace"] = unescape(name[1].0) }
        options["image"] = unescape(name[slashes].0)
        if at != nil { options["snapshot"] = unescape(name[slashes + 1].0) }
        for (field, _) in fields.dropFirst() {
            guard let kv = split(field, on: ["="]), kv.count == 2, !kv[1].0.isEmpty else { return nil }
            switch unescape(kv[0].0) {
            case "id": options["user"] = unescape(kv[1].0)
            case "conf": options["conf"] = unescape(kv[1].0)
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
