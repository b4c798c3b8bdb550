import CLibXL
import Foundation
import HypervisorDriver
import QEMUDriver
import SnapshotCore

#if canImport(Glibc)
    import Glibc
#endif

/// Xen domains through libxenlight (Debian's libxen-dev), in process: no `xl` output is read.
/// PV guests (a kernel, an initrd, a command line); disks through blkback (block devices: LVM
/// volumes, raw block plug-ins) or QEMU's qdisk (raw and qcow2 files). Memory snapshots are
/// libxl's suspend to a file, with the guest resumed afterwards (`xl save -c`); disk snapshots are taken by the backends while the guest is paused or suspended.
public struct XenDriver: HypervisorDriver {
    let xl: LibXL
    /// Where xenconsoled keeps guest consoles (`xenconsoled --log=guest --log-dir=DIR`).
    public var consoleDirectory: String

    public init(
        consoleDirectory: String = ProcessInfo.processInfo.environment["VMSNAP_XEN_CONSOLE_DIR"]
            ?? "/var/log/xen/console"
    ) {
        xl = LibXL.shared
        self.consoleDirectory = consoleDirectory
    }

    public var name: String { "xen" }

    public var capabilities: HypervisorCapabilities {
        // No live (pre-copy) save: it needs log-dirty paging for the PV guest, which Debian's
        // Xen 4.17 refuses (EOPNOTSUPP from the shadow code); the memory is saved while the guest
        // is suspended, as XenServer does.
        // qcow2 files are served by the qdisk QEMU: their snapshots, merges and deletes go through
        // its QMP while the domain runs.
        var caps = HypervisorCapabilities(
            liveMemorySave: false, suspendedMemorySave: true, internalMemory: false, liveDiskSnapshotFormats: ["qcow2"],
            liveDiskSnapshotKinds: [.internal, .external], quiesce: false, liveMerge: true, dirtyBitmaps: false,
            blockExport: false)
        caps.viewsPerDisk = 0
        // qdisk's QEMU holds image files open and locked: only block devices can be snapshotted
        // by their backend under a paused guest.
        caps.pausedStorageSnapshotSources = [.block]
        return caps
    }

    public func validate(_ definition: DomainDefinition) throws {
        guard ["auto", "pv"].contains(definition.accel) else {
            throw SnapshotError(
                .invalidArgument,
                "domain '\(definition.name)': accel '\(definition.accel)' for Xen: vmsnap's Xen driver runs PV guests ('pv' or 'auto'); PVH and HVM guests are not built"
            )
        }
        guard definition.qemuArgs.isEmpty else {
            throw SnapshotError(
                .invalidArgument, "domain '\(definition.name)': qemuArgs are for QEMU domains; a Xen domain takes none")
        }
        guard definition.firmware == nil else {
            throw SnapshotError(
                .invalidArgument,
                "domain '\(definition.name)': UEFI firmware is for QEMU domains; a Xen PV domain boots its kernel directly"
            )
        }
        guard definition.tpm == nil else {
            throw SnapshotError(
                .invalidArgument,
                "domain '\(definition.name)': an emulated TPM (swtpm) is for QEMU domains; a Xen PV domain has no TPM device here (remove tpm)"
            )
        }
        guard definition.memoryBacking == nil else {
            throw SnapshotError(
                .invalidArgument,
                "domain '\(definition.name)': memoryBacking (huge pages) is for QEMU domains; Xen gives a PV guest its memory itself (remove memoryBacking)"
            )
        }
        _ = try XenConfig.kept(definition)  // a kept configuration that is not libxl's, refused now
        guard definition.name != "Domain-0" else {
            throw SnapshotError(.invalidArgument, "'Domain-0' is Xen's control domain; it cannot be a vmsnap domain")
        }
        guard definition.boot.kernel != nil else {
            throw SnapshotError(
                .invalidArgument,
                "domain '\(definition.name)': a Xen PV domain boots a kernel: set boot.kernel (and boot.initrd, boot.cmdline)"
            )
        }
        for disk in definition.disks {
            guard disk.target.range(of: #"^xvd[a-z]{1,2}$"#, options: .regularExpression) != nil else {
                throw SnapshotError(
                    .invalidArgument,
                    "domain '\(definition.name)': disk target '\(disk.target)': a Xen PV guest names its disks xvda, xvdb, ..."
                )
            }
        }
    }

    /// Xen domains are not host processes.
    public func pid(_ domain: String) -> Int32? { nil }

    public func isRunning(_ domain: String) -> Bool {
        let info = try? xl.now { ctx in LibXL.domid(ctx, domain).flatMap { LibXL.info(ctx, $0) } }
        guard let info else { return false }
        return info.state != .ended
    }

    public func accelerator(_ definition: DomainDefinition) -> String { "xen-pv" }

    public func consoleLog(_ domain: String) -> String {
        (consoleDirectory as NSString).appendingPathComponent("guest-\(domain).log")
    }

    public func libvirtDomainType(_ definition: DomainDefinition) -> String { "xen" }

    public func accelerator(forLibvirtType type: String) -> String? { type == "xen" ? "pv" : nil }

    /// The domain's id and state; nil when Xen has no such domain.
    func lookup(_ domain: String) async throws -> XenDomainInfo? {
        try await xl.call { ctx in LibXL.domid(ctx, domain).flatMap { LibXL.info(ctx, $0) } }
    }

    func require(_ domain: String) async throws -> XenDomainInfo {
        guard let info = try await lookup(domain), info.state != .ended else {
            throw SnapshotError(.conflict, "domain '\(domain)' is not running")
        }
        return info
    }

    public func runState(_ domain: String) async throws -> DomainRunState {
        switch try await lookup(domain)?.state {
        case .running: .running
        case .paused, .suspended: .paused
        case .ended, nil: .shutoff
        }
    }

    public func start(
        _ definition: DomainDefinition, drives: [DomainDrive], mode: StartMode, progress: ProgressHandler?
    ) async throws {
        try validate(definition)
        if let info = try await lookup(definition.name) {
            guard info.state == .ended else {
                throw SnapshotError(.conflict, "domain '\(definition.name)' is running already")
            }
            try await destroy(definition.name)
        }
        let json = try XenConfig.json(definition, drives: drives)
        switch mode {
        case .boot(let paused):
            let domid = try await xl.call { ctx in
                try LibXL.withConfig(ctx, json: json) { config in
                    var id: UInt32 = 0
                    try LibXL.check(
                        libxl_domain_create_new(ctx, &config, &id, nil, nil),
                        "creating domain '\(definition.name)'")
                    return id
                }
            }
            if !paused { try await unpause(domid, definition.name) }
        case .restoreMemory(let path, let running):
            let domid = try await restore(json, from: path, domain: definition.name, progress: progress)
            if running { try await unpause(domid, definition.name) }
        case .loadInternal:
            throw SnapshotError(
                .unsupported, "Xen keeps no memory inside disk images: its full-system snapshots have a memory file")
        }
    }

    /// Creates the domain from a memory image libxl's suspend wrote; it stays paused.
    func restore(_ json: String, from path: String, domain: String, progress: ProgressHandler?) async throws -> UInt32 {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else {
            throw SnapshotError(.io, "cannot open memory image \(path): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG else {
            throw SnapshotError(.invalidImage, "memory image \(path) is not a regular file")
        }
        let total = UInt64(st.st_size)
        let watch = FileProgress.watch(fd: fd, phase: "memory restore", total: total, progress: progress)
        defer { watch.stop() }
        do {
            return try await xl.call { ctx in
                try LibXL.withConfig(ctx, json: json) { config in
                    var params = libxl_domain_restore_params()
                    libxl_domain_restore_params_init(&params)
                    defer { libxl_domain_restore_params_dispose(&params) }
                    params.stream_version = 2
                    var id: UInt32 = 0
                    try LibXL.check(
                        libxl_domain_create_restore(ctx, &config, &id, fd, -1, &params, nil, nil),
                        "restoring domain '\(domain)' from \(path)")
                    return id
                }
            }
        } catch let e as SnapshotError {
            // A half-made domain from a stream libxl could not load goes again.
            try? await destroy(domain)
            throw SnapshotError(
                .invalidImage,
                "\(e.message). The memory image is not one libxl's suspend wrote for this domain, or it is damaged")
        }
    }

    func unpause(_ domid: UInt32, _ domain: String) async throws {
        try await xl.call { ctx in
            try LibXL.check(libxl_domain_unpause(ctx, domid, nil), "unpausing domain '\(domain)'")
        }
    }

    public func destroy(_ domain: String) async throws {
        guard let info = try await lookup(domain) else { return }
        try await xl.call { ctx in
            try LibXL.check(libxl_domain_destroy(ctx, info.domid, nil), "destroying domain '\(domain)'")
        }
    }

    public func shutdown(_ domain: String, timeout: Duration) async throws -> Bool {
        let info = try await require(domain)
        try await xl.call { ctx in
            try LibXL.check(libxl_domain_shutdown(ctx, info.domid, nil), "asking domain '\(domain)' to shut down")
        }
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            guard let now = try await lookup(domain), now.domid == info.domid, now.state != .ended else {
                try await destroy(domain)  // the shut-down shell, if Xen still holds it
                return true
            }
            try await Task.sleep(for: .milliseconds(200))
        }
        return false
    }

    public func pause(_ domain: String) async throws {
        let info = try await require(domain)
        guard info.state == .running else { throw SnapshotError(.conflict, "domain '\(domain)' is paused already") }
        try await xl.call { ctx in try LibXL.check(libxl_domain_pause(ctx, info.domid, nil), "pausing '\(domain)'") }
    }

    public func resume(_ domain: String) async throws {
        let info = try await require(domain)
        guard info.state != .running else { throw SnapshotError(.conflict, "domain '\(domain)' is not paused") }
        if info.state == .suspended {
            try await xl.call { ctx in
                try LibXL.check(libxl_domain_resume(ctx, info.domid, 1, nil), "resuming suspended '\(domain)'")
            }
        } else {
            try await unpause(info.domid, domain)
        }
    }

    public func connect(_ domain: String) async throws -> any LiveDomain {
        let info = try await require(domain)
        return XenLiveDomain(xl: xl, domain: domain, domid: info.domid)
    }

    public func blockLayer(_ definition: DomainDefinition, drives: [DomainDrive]) async throws -> any BlockLayer {
        throw SnapshotError(
            .unsupported,
            "domain '\(definition.name)': checkpoints, block snapshots, exports and backups use QEMU's block layer; the Xen driver has none yet (take disk snapshots, or back up the disks while the domain is shut off with the qemu-img tools)"
        )
    }

    public func storageDaemonRuns(_ domain: String) -> Bool { false }

    public var backupImages: any BackupImageTool { XenBackupImages() }
}

/// Backups need QEMU's block layer, which the Xen driver does not offer; those calls say so.
struct XenBackupImages: BackupImageTool {
    var format: String { "qcow2" }
    static let refusal = SnapshotError(
        .unsupported, "backups of Xen domains are not built: the Xen driver has no block layer for them")
    func create(_ path: String, size: UInt64, backing: String?) async throws { throw Self.refusal }
    func check(_ path: String) async throws -> [String] { throw Self.refusal }
    func sameContent(_ a: String, _ b: String) async throws -> Bool { throw Self.refusal }
    func flatten(_ image: String, into destination: String, format: String, progress: ProgressHandler?) async throws {
        throw Self.refusal
    }
    // The qdisk images are qcow2: their headers are read and mended with qemu-img, as for QEMU.
    func backingFile(of image: String) async throws -> String? {
        try await QEMUBackupImages(runner: SubprocessRunner()).backingFile(of: image)
    }
    func setBackingFile(of image: String, to backing: String) async throws {
        try await QEMUBackupImages(runner: SubprocessRunner()).setBackingFile(of: image, to: backing)
    }
}
