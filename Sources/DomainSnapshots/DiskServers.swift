import DiskServer
import Foundation
import HypervisorDriver
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// Served disks: a running domain's disks whose image the hypervisor cannot open (a VHD chain
/// under QEMU). vmsnap's disk server (`vmsnap disk serve`, one process per disk) serves each over
/// NBD on a Unix socket under the store, started before the hypervisor and stopped after it.
/// Storage changes happen with the server held (every write flushed, its image lock dropped,
/// requests waiting), so the backend changes the disk offline; the server then reopens the layer
/// the disk's record names active. A recovery reopens every served disk of a running domain, so
/// a vmsnap killed in between never leaves a server on a stale layer, nor one held for ever.
extension DomainService {
    /// The sockets and log of the server of `target`: under the store, in an owner-only directory.
    func servedPaths(_ domain: String, target: String) -> (data: String, control: String, log: String) {
        let dir = servedDirectory(domain)
        return ("\(dir)/\(target).nbd", "\(dir)/\(target).ctl", "\(dir)/\(target).log")
    }

    func servedDirectory(_ domain: String) -> String {
        (store.directory as NSString).appendingPathComponent("served/\(domain)")
    }

    /// The drives to start the hypervisor with: `drives(_:)`, each served disk's server started
    /// (any left from an earlier run stopped first) and its export named.
    func startDrives(_ definition: DomainDefinition, driver: any HypervisorDriver) async throws -> [DomainDrive] {
        var drives = try await drives(definition)
        stopDiskServers(definition.name)
        do {
            // A driver that opens no served disk gets the image itself, and says why it cannot run it.
            for (i, d) in drives.enumerated() where d.drive.served && driver.capabilities.servedDisks {
                guard let disk = definition.disks.first(where: { $0.target == d.target }) else { continue }
                drives[i].drive.nbdSocket = try startDiskServer(definition.name, disk: disk)
            }
        } catch {
            stopDiskServers(definition.name)
            throw error
        }
        return drives
    }

    /// Starts `vmsnap disk serve` for one disk, detached (its own session), and waits until its
    /// control socket answers.
    func startDiskServer(_ domain: String, disk: DomainDisk) throws -> String {
        guard let command = diskServerCommand, !command.isEmpty else {
            throw SnapshotError(
                .unsupported,
                "disk \(disk.target) must be served by vmsnap's disk server, which this program cannot start; use the vmsnap command"
            )
        }
        let paths = servedPaths(domain, target: disk.target)
        try FileManager.default.createDirectory(
            atPath: servedDirectory(domain), withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let log = open(paths.log, O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard log >= 0 else {
            throw SnapshotError(.io, "cannot open \(paths.log): \(String(cString: strerror(errno)))")
        }
        defer { close(log) }
        let argv =
            command + [
                disk.locator, "--backend", disk.backend.rawValue, "--socket", paths.data, "--control", paths.control,
                "--export", disk.target, "--linger", "3",
            ]
        let pid = try Self.spawnDetached(argv, output: log)
        let deadline = ContinuousClock.now + .seconds(20)
        while true {
            if (try? DiskServerControl.send("status", to: paths.control, timeout: 5)) != nil { return paths.data }
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid || ContinuousClock.now > deadline {
                if ContinuousClock.now > deadline { kill(pid, SIGKILL) }
                let tail = (try? String(contentsOfFile: paths.log, encoding: .utf8))?.split(separator: "\n").suffix(3)
                    .joined(separator: "; ")
                throw SnapshotError(
                    .commandFailed,
                    "vmsnap's disk server for disk \(disk.target) did not start: \(tail ?? "no output") (log: \(paths.log))"
                )
            }
            usleep(20_000)
        }
    }

    /// Stops every disk server of `domain` (each flushes first) and waits for each to go.
    func stopDiskServers(_ domain: String) {
        for s in servedControls(domain) {
            let data = servedPaths(domain, target: s.target).data
            if (try? DiskServerControl.send("stop", to: s.control, timeout: 10)) != nil {
                let deadline = ContinuousClock.now + .seconds(10)
                while NewFile.exists(data), ContinuousClock.now < deadline { usleep(10_000) }
            }
        }
    }

    /// The control sockets of `domain`'s disk servers among `targets` (all with nil), from the
    /// served directory (no store read: a hold runs inside the guest's pause).
    func servedControls(_ domain: String, targets: [String]? = nil) -> [(target: String, control: String)] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: servedDirectory(domain))) ?? []
        return names.filter { $0.hasSuffix(".ctl") }.sorted().compactMap { name in
            let target = String(name.dropLast(4))
            guard targets?.contains(target) ?? true else { return nil }
            return (target, servedPaths(domain, target: target).control)
        }
    }

    /// Holds a served disk before its storage changes.
    func holdServed(_ domain: String, target: String) throws {
        for s in servedControls(domain, targets: [target]) {
            do { try DiskServerControl.send("hold", to: s.control) } catch let e as SnapshotError
                where e.code == .notFound
            {
                continue  // the server is gone: nothing writes the disk
            }
        }
    }

    /// Serves each served disk's active layer as its record names it now (after a storage change,
    /// and in every recovery): a server left held by a killed vmsnap serves again.
    func reopenServed(_ domain: String, targets: [String]? = nil) throws {
        for s in servedControls(domain, targets: targets) {
            do { try DiskServerControl.send("reopen", to: s.control) } catch let e as SnapshotError
                where e.code == .notFound
            {
                continue  // no server (the domain stopped): nothing is served
            } catch let e as SnapshotError {
                throw SnapshotError(
                    e.code,
                    "disk \(s.target) of domain '\(domain)': \(e.message). The guest's requests to it wait; fix the disk, then run `vmsnap recover`"
                )
            }
        }
    }

    /// Starts again the server of each served disk of a running domain whose server is gone (its
    /// control socket is left, nothing answers it: killed, or crashed). The hypervisor holds the
    /// guest's requests to that disk meanwhile and reconnects on its own. Returns the targets.
    func reviveDiskServers(_ domain: String) async throws -> [String] {
        let dead = servedControls(domain).filter {
            (try? DiskServerControl.send("status", to: $0.control, timeout: 5)) == nil
        }
        guard !dead.isEmpty, let definition = try? definition(domain).definition,
            try await runState(domain) != .shutoff
        else { return [] }
        var revived: [String] = []
        for s in dead {
            guard let disk = definition.disks.first(where: { $0.target == s.target }) else { continue }
            _ = try startDiskServer(domain, disk: disk)
            notify("disk \(s.target) of domain '\(domain)': its disk server was gone; started again")
            revived.append(s.target)
        }
        return revived
    }

    /// The domains that have disk servers (running or left behind).
    func domainsWithServedDisks() -> [String] {
        let dir = (store.directory as NSString).appendingPathComponent("served")
        return ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted()
    }

    /// In a session of its own, stdin from /dev/null, stdout and stderr to `output`.
    static func spawnDetached(_ argv: [String], output: Int32) throws -> pid_t {
        try DetachedProcess.spawn(argv, stdin: nil, stdout: output, stderr: output)
    }
}
