import Foundation
import HypervisorDriver
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// QEMU's block layer behind the ``BlockLayer`` protocol, over QMP: the running domain's QEMU,
/// or a qemu-storage-daemon over a shut-off domain's disks. Views are image fleecing (a
/// `blockdev-backup` job with sync none into a scratch qcow2 that reads through the disk); push
/// backups are `blockdev-backup` jobs (sync full, or sync bitmap from a frozen copy of the
/// checkpoint's bitmaps); exports are QEMU's NBD server.
public struct QEMUBlockLayer: BlockLayer {
    public let client: QMPClient
    /// The storage daemon this handle drives, if the domain is shut off.
    let daemon: QEMUStorageDaemon?

    public var isStorageDaemon: Bool { daemon != nil }

    init(client: QMPClient, daemon: QEMUStorageDaemon?) {
        self.client = client
        self.daemon = daemon
    }

    /// Node names vmsnap gives what it adds, per disk target.
    static func viewNode(_ id: String) -> String { "vmsnap-view-\(id)" }
    static func viewJob(_ id: String) -> String { "vmsnap-view-\(id)" }
    static func backupNode(_ target: String) -> String { "vmsnap-backup-\(target)" }
    /// The node a bitmap file is opened as while it is merged (FNV-1a of its path: node names
    /// are short and plain).
    static func bitmapFileNode(_ path: String) -> String {
        var hash: UInt32 = 2_166_136_261
        for byte in path.utf8 { hash = (hash ^ UInt32(byte)) &* 16_777_619 }
        return "vmsnap-cb-" + String(format: "%08x", hash)
    }

    /// Opens every bitmap file the parts merge from (read-only), runs `body`, closes them again.
    func withBitmapFiles<T>(_ sources: [[LayerBitmap]], _ body: () async throws -> T) async throws -> T {
        let files = Array(Set(sources.flatMap { $0.compactMap(\.file) })).sorted()
        var opened: [String] = []
        func closeAll() async { for node in opened { try? await client.run(QMP.DeleteNode(nodeName: node)) } }
        do {
            for file in files {
                let node = Self.bitmapFileNode(file)
                try await client.run(QMP.AddReadOnlyQcow2Node(nodeName: node, path: file))
                opened.append(node)
            }
            let result = try await body()
            await closeAll()
            return result
        } catch {
            await closeAll()
            throw error
        }
    }
    static func backupJob(_ target: String) -> String { "vmsnap-backup-\(target)" }
    /// The frozen copy of the checkpoint bitmaps a push incremental copies from.
    static func frozenBitmap(_ target: String) -> String { "vmsnap-backup-\(target)" }
    static func exportID(_ id: String) -> String { "vmsnap-export-\(id)" }
    static let tlsID = "vmsnap-tls"

    /// Protocol drivers: a file, a block device, a network volume below an image's format node.
    static func isProtocol(_ driver: String) -> Bool {
        ["file", "host_device", "host_cdrom", "rbd", "nbd"].contains(driver)
    }

    func layer<T>(_ body: () async throws -> T) async throws -> T {
        do { return try await body() } catch { throw QEMUDriver.layerError(error) }
    }

    /// The block graph at one moment: each disk's active node and every node with its bitmaps.
    /// Read once per operation (two QMP round trips, whatever the number of disks): some of these
    /// operations run while the guest is paused for a snapshot.
    struct Graph {
        /// Drive id (`QEMUDriver.driveID`) -> node of the disk's active layer.
        let active: [String: String]
        let nodes: [QMP.BlockNode]

        /// The node holding the disk's active layer.
        func node(_ target: String) throws -> String {
            guard let node = active[QEMUDriver.driveID(target)] else {
                throw SnapshotError(.conflict, "QEMU has no block device for disk \(target)")
            }
            return node
        }

        /// The node of one layer of a disk: the active one, or the image format node QEMU opened
        /// `image` with (a backing layer).
        func node(_ target: String, layer image: String?) throws -> String {
            guard let image else { return try node(target) }
            guard let found = nodes.first(where: { $0.file == image && !QEMUBlockLayer.isProtocol($0.driver) }) else {
                throw SnapshotError(.notFound, "QEMU has no layer \(image) open for disk \(target)")
            }
            return found.nodeName
        }

        func bitmaps(_ target: String, layer image: String? = nil) throws -> [DirtyBitmap] {
            let name = try node(target, layer: image)
            return nodes.first { $0.nodeName == name }?.bitmaps ?? []
        }

        /// The bitmaps to merge, each by node (a bitmap file by the node ``openBitmapFiles`` gave it).
        func sources(_ target: String, _ bitmaps: [LayerBitmap]) throws -> [QMP.BitmapRef] {
            try bitmaps.map {
                if let file = $0.file {
                    return QMP.BitmapRef(node: QEMUBlockLayer.bitmapFileNode(file), name: $0.name)
                }
                return QMP.BitmapRef(node: try node(target, layer: $0.layer), name: $0.name)
            }
        }

        /// The actions that remove the merged bitmaps marked `mergedAway`, after the merges of the
        /// same transaction (the job's own copy has their bits from then on).
        func removeActions(_ target: String, _ bitmaps: [LayerBitmap]) throws -> [QMP.BlockAction] {
            try bitmaps.filter { $0.mergedAway == true && $0.file == nil }.map {
                .removeBitmap(node: try node(target, layer: $0.layer), name: $0.name)
            }
        }

        /// The actions that add a new checkpoint's bitmap to its disks, persistent and recording.
        func addActions(_ bitmap: NewBitmap?) throws -> [QMP.BlockAction] {
            guard let bitmap else { return [] }
            return try bitmap.targets.map {
                .addBitmap(node: try node($0), name: bitmap.name, persistent: true, disabled: false)
            }
        }
    }

    /// The storage daemon names each disk's node after its drive; a QEMU started with `-drive`
    /// has automatic node names, read from `query-block`.
    func graph() async throws -> Graph {
        let nodes = try await client.run(QMP.QueryNamedBlockNodes())
        var active: [String: String] = [:]
        if daemon != nil {
            for n in nodes { active[n.nodeName] = n.nodeName }
        } else {
            for d in try await client.blockDevices() { active[d.device] = d.nodeName }
        }
        return Graph(active: active, nodes: nodes)
    }

    func nodes() async throws -> [QMP.BlockNode] { try await client.run(QMP.QueryNamedBlockNodes()) }

    // MARK: - Bitmaps

    public func bitmaps(target: String, layer image: String?) async throws -> [DirtyBitmap] {
        try await layer { try await graph().bitmaps(target, layer: image) }
    }

    public func addBitmaps(_ name: String, targets: [String]) async throws {
        try await layer {
            let g = try await graph()
            let missing = try targets.filter { t in try !g.bitmaps(t).contains { $0.name == name } }
            let actions = try g.addActions(NewBitmap(name: name, targets: missing))
            if !actions.isEmpty { try await client.run(QMP.BlockTransaction(actions: actions)) }
        }
    }

    public func removeBitmaps(_ name: String, targets: [String]) async throws {
        try await layer {
            let g = try await graph()
            for target in targets where try g.bitmaps(target).contains(where: { $0.name == name }) {
                try await client.run(QMP.RemoveBitmap(node: try g.node(target), name: name))
            }
        }
    }

    public func startRecording(_ name: String, targets: [String]) async throws {
        guard daemon == nil else {
            throw SnapshotError(
                .unsupported, "a storage daemon serves a shut-off domain: there are no guest writes to record")
        }
        try await layer {
            let g = try await graph()
            for target in targets where try g.bitmaps(target).contains(where: { $0.name == name }) {
                try await client.run(QMP.RemoveBitmap(node: try g.node(target), name: name))
            }
            let actions = try targets.map {
                QMP.BlockAction.addBitmap(node: try g.node($0), name: name, persistent: false, disabled: false)
            }
            try await client.run(QMP.BlockTransaction(actions: actions))
            // A flush per disk through HMP `qemu-io`, the guest running on (QMP `stop` flushes too,
            // but a vmsnap killed between `stop` and `cont` would leave the guest paused). QEMU 7.2
            // prints a failed qemu-io command's error on its own stdout, not in the answer; the
            // check below serves QEMUs that answer with it.
            for target in targets {
                let answer = try await client.execute(
                    "human-monitor-command",
                    ["command-line": .string("qemu-io \(QEMUDriver.driveID(target)) \"flush\"")])
                let said = answer.string ?? ""
                if said.contains("rror") || said.contains("fail") {
                    throw SnapshotError(
                        .commandFailed,
                        "QEMU could not flush disk \(target) before the storage counts its changes: \(said.trimmingCharacters(in: .whitespacesAndNewlines)); nothing was counted"
                    )
                }
            }
        }
    }

    /// Closes the nodes a job opened over bitmap files (``withBitmapFiles``) that a killed
    /// vmsnap left in the hypervisor.
    public func closeBitmapFiles(_ paths: [String]) async {
        for path in paths { _ = try? await client.run(QMP.DeleteNode(nodeName: Self.bitmapFileNode(path))) }
    }

    // MARK: - Views

    public func startBlockSnapshots(_ parts: [BlockSnapshotPart], newBitmap: NewBitmap?) async throws {
        try await layer {
            let g = try await graph()
            var actions: [QMP.BlockAction] = []
            for part in parts {
                let disk = try g.node(part.target)
                let view = Self.viewNode(part.id)
                try await client.run(QMP.AddQcow2Node(nodeName: view, path: part.scratch, backing: disk))
                var removals: [QMP.BlockAction] = []
                if let published = part.changedSinceName {
                    actions.append(.addBitmap(node: view, name: published, persistent: false, disabled: true))
                    actions.append(
                        .mergeBitmaps(
                            node: view, target: published, sources: try g.sources(part.target, part.changedSince)))
                    removals = try g.removeActions(part.target, part.changedSince)
                }
                actions.append(.backup(device: disk, target: view, jobID: Self.viewJob(part.id), sync: .none))
                actions += removals
            }
            actions += try g.addActions(newBitmap)
            do {
                Trace.mark("views prepared")
                try await withBitmapFiles(parts.map(\.changedSince)) {
                    try await client.run(QMP.BlockTransaction(actions: actions))
                }
                Trace.mark("views transaction")
            } catch {
                for part in parts { try? await client.run(QMP.DeleteNode(nodeName: Self.viewNode(part.id))) }
                throw error
            }
        }
    }

    public func stopBlockSnapshot(id: String) async throws {
        try await layer {
            try await endJob(Self.viewJob(id))
            try await deleteNode(Self.viewNode(id))
        }
    }

    /// Cancels a job if it runs, waits until it concluded and dismisses it; nothing if it is gone.
    func endJob(_ id: String) async throws {
        let deadline = ContinuousClock.now + .seconds(60)
        while let job = try await client.run(QMP.QueryJobs()).first(where: { $0.id == id }) {
            switch job.status {
            case "concluded":
                try await client.run(QMP.JobDismiss(id: id))
            case "aborting", "waiting", "pending", "null":
                break
            default:
                _ = try? await client.run(QMP.JobCancel(id: id))
            }
            guard ContinuousClock.now < deadline else {
                throw SnapshotError(.busy, "QEMU job \(id) did not end within 60 s of being cancelled")
            }
            try await Task.sleep(for: .milliseconds(50))
        }
    }

    func deleteNode(_ name: String) async throws {
        guard try await nodes().contains(where: { $0.nodeName == name }) else { return }
        try await client.run(QMP.DeleteNode(nodeName: name))
    }

    // MARK: - Exports

    public func startExports(_ parts: [BlockSnapshotPart], listener: ExportListener) async throws {
        try await layer {
            let running = try await client.run(QMP.QueryBlockExports())
            if running.isEmpty {
                switch listener {
                case .unix(let path):
                    unlink(path)
                    try await client.run(QMP.NBDServerStart(listener: .unix(path)))
                    chmod(path, 0o600)
                case .tcp(let host, let port, let tls):
                    if let tls {
                        _ = try? await client.run(QMP.DeleteObject(id: Self.tlsID))
                        try await client.run(QMP.AddTLSCredentials(id: Self.tlsID, directory: tls))
                    }
                    try await client.run(
                        QMP.NBDServerStart(
                            listener: .tcp(host: host, port: port), tlsCredentials: tls.map { _ in Self.tlsID }))
                }
            }
            for part in parts where !running.contains(Self.exportID(part.id)) {
                try await client.run(
                    QMP.BlockExportAdd(
                        id: Self.exportID(part.id), nodeName: Self.viewNode(part.id), exportName: part.exportName,
                        bitmaps: part.changedSinceName.map { [$0] } ?? []))
            }
        }
    }

    public func stopExports(ids: [String]) async throws {
        try await layer {
            var running = try await client.run(QMP.QueryBlockExports())
            for id in ids where running.contains(Self.exportID(id)) {
                try await client.run(QMP.BlockExportDel(id: Self.exportID(id)))
            }
            // A removed export goes once its clients are gone (hard mode disconnects them).
            let deadline = ContinuousClock.now + .seconds(30)
            repeat {
                running = try await client.run(QMP.QueryBlockExports())
                if !running.contains(where: { e in ids.contains { Self.exportID($0) == e } }) { break }
                try await Task.sleep(for: .milliseconds(50))
            } while ContinuousClock.now < deadline
            if running.isEmpty {
                do { try await client.run(QMP.NBDServerStop()) } catch let e as QMPError
                    where e.errorClass == .genericError
                {
                    // Not running: nothing to stop.
                }
                _ = try? await client.run(QMP.DeleteObject(id: Self.tlsID))
            }
        }
    }

    // MARK: - Push backups

    public func startBackups(_ parts: [BackupPart], newBitmap: NewBitmap?) async throws {
        try await layer {
            let g = try await graph()
            var actions: [QMP.BlockAction] = []
            for part in parts {
                let disk = try g.node(part.target)
                let target = Self.backupNode(part.target)
                try await client.run(QMP.AddQcow2Node(nodeName: target, path: part.destination, backing: nil))
                if part.changedSince.isEmpty {
                    actions.append(
                        .backup(device: disk, target: target, jobID: Self.backupJob(part.target), sync: .full))
                } else {
                    let frozen = Self.frozenBitmap(part.target)
                    actions.append(.addBitmap(node: disk, name: frozen, persistent: false, disabled: true))
                    actions.append(
                        .mergeBitmaps(
                            node: disk, target: frozen, sources: try g.sources(part.target, part.changedSince)))
                    actions.append(
                        .backup(device: disk, target: target, jobID: Self.backupJob(part.target), sync: .bitmap(frozen))
                    )
                    actions += try g.removeActions(part.target, part.changedSince)
                }
            }
            actions += try g.addActions(newBitmap)
            do {
                try await withBitmapFiles(parts.map(\.changedSince)) {
                    try await client.run(QMP.BlockTransaction(actions: actions))
                }
            } catch {
                for part in parts { try? await client.run(QMP.DeleteNode(nodeName: Self.backupNode(part.target))) }
                throw error
            }
        }
    }

    public func backupProgress(targets: [String]) async throws -> [BlockJobProgress] {
        try await layer {
            let jobs = try await client.run(QMP.QueryJobs())
            return targets.compactMap { target in
                guard let job = jobs.first(where: { $0.id == Self.backupJob(target) }) else { return nil }
                return BlockJobProgress(
                    target: target, status: job.status, done: job.done ?? 0, total: job.total ?? 0, error: job.error)
            }
        }
    }

    public func waitForBackups(targets: [String], progress: ProgressHandler?) async throws {
        try await layer {
            let started = ContinuousClock.now
            var failure: SnapshotError?
            var pending = Set(targets)
            while !pending.isEmpty {
                let mark = await client.eventMark
                let jobs = try await client.run(QMP.QueryJobs())
                var done: UInt64 = 0
                var total: UInt64 = 0
                for target in pending.sorted() {
                    guard let job = jobs.first(where: { $0.id == Self.backupJob(target) }) else {
                        failure = failure ?? SnapshotError(.commandFailed, "the backup job of \(target) disappeared")
                        pending.remove(target)
                        continue
                    }
                    done += job.done ?? 0
                    total += job.total ?? 0
                    guard job.status == "concluded" else { continue }
                    if let error = job.error {
                        failure = failure ?? SnapshotError(.io, "the backup of \(target) failed in QEMU: \(error)")
                    }
                    try await finishBackup(target)
                    pending.remove(target)
                }
                if !pending.isEmpty {
                    if let progress {
                        let elapsed = ContinuousClock.now - started
                        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
                        progress(.measured("backup", done: done, total: total, seconds: seconds))
                    }
                    // Woken by the job's status change (or every 200 ms for progress).
                    let ids = Set(pending.map { Self.backupJob($0) })
                    _ = try? await client.waitForEvent("JOB_STATUS_CHANGE", since: mark, timeout: .milliseconds(200)) {
                        ids.contains($0.data["id"]?.string ?? "")
                    }
                }
            }
            if let failure { throw failure }
        }
    }

    /// Dismisses a concluded backup job, closes its destination and drops the frozen bitmap.
    func finishBackup(_ target: String) async throws {
        try await endJob(Self.backupJob(target))
        try await deleteNode(Self.backupNode(target))
        try await removeBitmaps(Self.frozenBitmap(target), targets: [target])
    }

    public func cancelBackups(targets: [String]) async throws {
        try await layer {
            for target in targets { try await finishBackup(target) }
        }
    }

    public func close(keepDaemon: Bool) async {
        if let daemon, !keepDaemon {
            _ = try? await client.run(QMP.Quit(), timeout: .seconds(10))
            await client.close()
            daemon.waitUntilGone()
            return
        }
        await client.close()
    }
}

extension QEMUBlockLayer {
    public func virtualSize(target: String) async throws -> UInt64 {
        try await layer {
            let g = try await graph()
            let name = try g.node(target)
            guard let size = g.nodes.first(where: { $0.nodeName == name })?.virtualSize, size > 0 else {
                throw SnapshotError(.conflict, "QEMU reports no size for disk \(target)")
            }
            return size
        }
    }
}

/// Backup images through qemu-img: qcow2, each incremental reading through the one before.
public struct QEMUBackupImages: BackupImageTool {
    let runner: any CommandRunning
    public var format: String { "qcow2" }

    public init(runner: any CommandRunning) { self.runner = runner }

    public func create(_ path: String, size: UInt64, backing: String?) async throws {
        var argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if let backing { argv += ["-b", backing, "-F", "qcow2"] }
        try await runner.run(argv + [path, String(size)])
    }

    public func check(_ path: String) async throws -> [String] {
        let out = try await runner.execute(["qemu-img", "check", "-q", "-f", "qcow2", path])
        guard out.status != 0 else { return [] }
        let text = (out.standardError + out.standardOutput).trimmingCharacters(in: .whitespacesAndNewlines)
        return ["\(path): qemu-img check exited \(out.status)\(text.isEmpty ? "" : ": " + text)"]
    }

    public func sameContent(_ a: String, _ b: String) async throws -> Bool {
        let out = try await runner.execute(["qemu-img", "compare", "-q", a, b])
        switch out.status {
        case 0: return true
        case 1: return false
        default:
            throw SnapshotError(
                .commandFailed, "qemu-img compare \(a) \(b) failed (\(out.status)): \(out.standardError)")
        }
    }

    public func flatten(_ image: String, into destination: String, format: String, progress: ProgressHandler?)
        async throws
    {
        // The destination is the empty file the caller created (O_EXCL, its mode); qemu-img
        // writes the image into it.
        try await runner.run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", format, image, destination])
    }

    public func mergeIntoBacking(_ image: String) async throws {
        var st = stat()
        guard lstat(image, &st) == 0 else { return }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            throw SnapshotError(.invalidArgument, "\(image) is not a regular file; it was not merged")
        }
        if st.st_size == 0 { return }
        // -d: the image is removed after, no need to empty it.
        try await runner.run(["qemu-img", "commit", "-q", "-f", "qcow2", "-d", image])
    }

    public func backingFile(of image: String) async throws -> String? {
        let out = try await runner.execute(["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", image])
        guard out.status == 0,
            let info = try? JSONSerialization.jsonObject(with: Data(out.standardOutput.utf8)) as? [String: Any]
        else {
            throw SnapshotError(
                .invalidImage,
                "\(image) is not a readable qcow2 image: \(out.standardError.trimmingCharacters(in: .whitespacesAndNewlines))"
            )
        }
        return (info["full-backing-filename"] as? String) ?? (info["backing-filename"] as? String)
    }

    /// A qcow2 image with no data and one persistent bitmap (64 KiB a bit): qemu-io writes zeros
    /// over each extent (a zero write allocates nothing, but marks the bitmap), a few thousand
    /// extents a run. Extents are widened to whole sectors; a bit covers its whole 64 KiB.
    public func writeChangesBitmap(_ path: String, size: UInt64, name: String, extents: [ChangedExtent])
        async throws
    {
        try await runner.run(["qemu-img", "create", "-q", "-f", "qcow2", path, String(size)])
        try await runner.run(["qemu-img", "bitmap", "--add", "-g", "65536", path, name])
        var commands: [String] = []
        for e in extents {
            let first = e.offset / 512 * 512
            let end = min((e.offset + e.length + 511) / 512 * 512, size)
            guard end > first else { continue }
            commands += ["-c", "write -z \(first) \(end - first)"]
        }
        for batch in stride(from: 0, to: commands.count, by: 4000) {
            try await runner.run(
                ["qemu-io", "-f", "qcow2"] + commands[batch..<min(batch + 4000, commands.count)] + [path])
        }
    }

    public func setBackingFile(of image: String, to backing: String) async throws {
        // -u: the header only; nothing is copied or compared.
        // The backing file's own format (a chain's root may be a raw image).
        let out = try await runner.execute(["qemu-img", "info", "-U", "--output=json", backing])
        let info = try? JSONSerialization.jsonObject(with: Data(out.standardOutput.utf8)) as? [String: Any]
        guard out.status == 0, let backingFormat = info?["format"] as? String, ["qcow2", "raw"].contains(backingFormat)
        else {
            throw SnapshotError(
                .invalidImage,
                "\(backing) is not a qcow2 or raw image; \(image) was left naming its current backing file")
        }
        try await runner.run([
            "qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-F", backingFormat, "-b", backing, image,
        ])
    }
}

extension QEMUDriver {
    public var backupImages: any BackupImageTool { QEMUBackupImages(runner: runner) }
}
