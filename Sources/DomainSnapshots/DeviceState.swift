import Foundation
import HypervisorDriver
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// One piece of a domain's device state that lives in files beside its disks: a UEFI variable
/// store (one file) or an emulated TPM's state directory (the files in it).
struct DeviceStateItem {
    /// Its name inside a snapshot's copy.
    let name: String
    /// What it is, for messages.
    let what: String
    /// The domain's own file or directory.
    let live: String
    let isDirectory: Bool
    /// In a directory: the names that are state start with this (others are left alone).
    var prefix = ""

    static func items(of definition: DomainDefinition) -> [DeviceStateItem] {
        var items: [DeviceStateItem] = []
        if let f = definition.firmware {
            items.append(
                DeviceStateItem(name: "nvram.fd", what: "firmware variables", live: f.vars, isDirectory: false))
        }
        if let t = definition.tpm {
            // swtpm's files for a TPM 2.0 (permanent, volatile and saved state).
            items.append(
                DeviceStateItem(name: "tpm", what: "TPM state", live: t.state, isDirectory: true, prefix: "tpm2-"))
        }
        return items
    }
}

/// A domain's device state in its snapshots (the UEFI variables, the TPM's state): `domain define`
/// makes what is missing; each snapshot keeps a copy, taken while the guest's vCPUs are stopped
/// (the hypervisor has flushed) or the domain is shut off; a revert puts the copy back before the
/// domain starts; a delete removes it. The copies live under the store,
/// `devices/<domain>/<snapshot>/`, 0600, named by domain and snapshot (recomputed, never read
/// back). In a state directory only the emulator's own files are state (a TPM's `tpm2-*`); its
/// lock and anything else there are left alone.
extension DomainService {
    /// The largest state file accepted (OVMF's variable stores are 128 KiB to 4 MiB, a TPM's
    /// permanent state tens of KiB).
    static let deviceStateFileLimit = 64 << 20
    /// The most files a state directory may hold.
    static let deviceStateFileCount = 64

    /// Where snapshot `snapshot` of `domain` keeps its copy of the device state.
    func deviceStateCopy(_ domain: String, snapshot: String) -> String {
        (store.directory as NSString).appendingPathComponent("devices/\(domain)/\(snapshot)")
    }

    // MARK: - Define

    /// At define: the firmware code must be readable; a missing variable store is made from the
    /// template (0600, never through a symbolic link); a missing TPM state directory is made
    /// (0700); an existing one must be what it claims to be.
    static func prepareDeviceState(_ definition: DomainDefinition) throws {
        let domain = definition.name
        if let firmware = definition.firmware {
            var st = stat()
            guard stat(firmware.code, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG,
                FileManager.default.isReadableFile(atPath: firmware.code)
            else {
                throw SnapshotError(
                    .notFound,
                    "domain '\(domain)': firmware.code \(firmware.code) is not a readable file; install the firmware (Debian: ovmf) or fix the path"
                )
            }
            try prepareVariableStore(firmware, domain: domain)
        }
        if let tpm = definition.tpm {
            var st = stat()
            if lstat(tpm.state, &st) == 0 {
                guard (st.st_mode & S_IFMT) == S_IFDIR else {
                    throw SnapshotError(
                        .invalidArgument,
                        "domain '\(domain)': tpm.state \(tpm.state) is \(RegularFile.typeName(st.st_mode)), not a directory"
                    )
                }
            } else {
                do {
                    try FileManager.default.createDirectory(
                        atPath: tpm.state, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
                } catch {
                    throw SnapshotError(
                        .io, "domain '\(domain)': cannot make the TPM state directory \(tpm.state): \(error)")
                }
            }
        }
    }

    /// Refuses device state that another domain already has: two guests writing one variable
    /// store or one TPM would corrupt it, and each one's snapshots would restore the other's.
    /// The same file or directory is recognised through symbolic links and hard links.
    static func checkDeviceStateOwnership(_ definition: DomainDefinition, others: [DomainDefinition]) throws {
        func same(_ a: String, _ b: String) -> Bool {
            if let x = FileIdentity(a), let y = FileIdentity(b) { return x == y }
            let resolve = { (p: String) in URL(fileURLWithPath: p).resolvingSymlinksInPath().standardizedFileURL.path }
            return resolve(a) == resolve(b)
        }
        for mine in DeviceStateItem.items(of: definition) {
            for other in others {
                for theirs in DeviceStateItem.items(of: other) where same(mine.live, theirs.live) {
                    throw SnapshotError(
                        .conflict,
                        "domain '\(definition.name)': \(mine.live) holds the \(theirs.what) of domain '\(other.name)' already; give each domain its own"
                    )
                }
            }
        }
    }

    private static func prepareVariableStore(_ firmware: DomainFirmware, domain: String) throws {
        var st = stat()
        if lstat(firmware.vars, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFREG else {
                throw SnapshotError(
                    .invalidArgument,
                    "domain '\(domain)': firmware.vars \(firmware.vars) is \(RegularFile.typeName(st.st_mode)), not a regular file"
                )
            }
            return
        }
        guard let template = firmware.template else {
            throw SnapshotError(
                .notFound,
                "domain '\(domain)': firmware.vars \(firmware.vars) does not exist and no firmware.template was given to make it from"
            )
        }
        let data = try RegularFile.read(template, what: "firmware template", limit: deviceStateFileLimit)
        try writeNew(firmware.vars, data, mode: 0o600)
    }

    // MARK: - Create

    /// Before a create's journal: the copy's name must be free (a rollback removes the copy, so
    /// it must be one this create made), and internal memory cannot carry the variables.
    func checkDeviceStateCopy(_ definition: DomainDefinition, snapshot: String, internalMemory: Bool) throws {
        guard !DeviceStateItem.items(of: definition).isEmpty else { return }
        if internalMemory, definition.firmware != nil {
            throw SnapshotError(
                .unsupported,
                "--memory internal: domain '\(definition.name)' has UEFI firmware, whose variable store is a flash image that cannot hold internal snapshots; use an external memory file (the default)"
            )
        }
        let copy = deviceStateCopy(definition.name, snapshot: snapshot)
        if NewFile.exists(copy) {
            throw SnapshotError(
                .alreadyExists,
                "\(copy), where snapshot '\(snapshot)' would keep its device state, exists already; nothing was changed. Remove it or pick another name"
            )
        }
    }

    /// Copies the domain's device state into the snapshot's copy; the hypervisor is stopped or
    /// paused. `sync: false` inside a guest's pause: ``syncDeviceState(_:snapshot:)`` follows.
    func saveDeviceState(_ definition: DomainDefinition, snapshot: String, sync: Bool = true) throws {
        let items = DeviceStateItem.items(of: definition)
        guard !items.isEmpty else { return }
        let copy = deviceStateCopy(definition.name, snapshot: snapshot)
        try FileManager.default.createDirectory(
            atPath: (copy as NSString).deletingLastPathComponent, withIntermediateDirectories: true,
            attributes: [.posixPermissions: 0o700])
        try Self.makeDirectory(copy)
        for item in items {
            let target = (copy as NSString).appendingPathComponent(item.name)
            if item.isDirectory {
                try Self.makeDirectory(target)
                for file in try Self.stateFiles(in: item.live, what: item.what, prefix: item.prefix) {
                    let data = try RegularFile.read(
                        (item.live as NSString).appendingPathComponent(file), what: item.what,
                        limit: Self.deviceStateFileLimit)
                    try Self.writeNew((target as NSString).appendingPathComponent(file), data, mode: 0o600, sync: sync)
                }
            } else {
                let data = try RegularFile.read(item.live, what: item.what, limit: Self.deviceStateFileLimit)
                try Self.writeNew(target, data, mode: 0o600, sync: sync)
            }
        }
        if sync { try syncDeviceState(definition, snapshot: snapshot) }
    }

    /// Makes a copy saved with `sync: false` durable: every file, then every directory.
    func syncDeviceState(_ definition: DomainDefinition, snapshot: String) throws {
        let items = DeviceStateItem.items(of: definition)
        guard !items.isEmpty else { return }
        let copy = deviceStateCopy(definition.name, snapshot: snapshot)
        var directories = [copy]
        for item in items {
            let target = (copy as NSString).appendingPathComponent(item.name)
            let files =
                item.isDirectory
                ? try Self.stateFiles(in: target, what: item.what).map {
                    (target as NSString).appendingPathComponent($0)
                }
                : [target]
            if item.isDirectory { directories.append(target) }
            for file in files { try Self.sync(file) }
        }
        for directory in directories { try Self.sync(directory) }
        Self.syncDirectory(of: copy)
    }

    // MARK: - Revert

    /// The checks a revert makes before anything changes: a snapshot without its copy of a piece
    /// of device state is refused, unless `force` says to go on with the domain's own (a snapshot
    /// redefined from XML or imported has none).
    func checkDeviceStateRestorable(_ record: DomainSnapshotRecord, force: Bool) throws {
        let copy = deviceStateCopy(record.domain, snapshot: record.name)
        for item in DeviceStateItem.items(of: record.definition) {
            let saved = (copy as NSString).appendingPathComponent(item.name)
            guard NewFile.exists(saved) else {
                guard force else {
                    throw SnapshotError(
                        .notFound,
                        "snapshot '\(record.name)' has no copy of its \(item.what) (\(saved) is missing); nothing was changed. Put the copy back, or revert with --force to keep the domain's own"
                    )
                }
                notify("snapshot '\(record.name)' has no copy of the \(item.what); the domain keeps its own")
                continue
            }
        }
    }

    /// Puts the snapshot's copy back: each file written beside the domain's own with its mode and
    /// owner and renamed over it (a crash leaves the old or the new file, never half); files of a
    /// state directory that the snapshot did not have are removed. Re-runnable.
    func restoreDeviceState(_ record: DomainSnapshotRecord) throws {
        let copy = deviceStateCopy(record.domain, snapshot: record.name)
        for item in DeviceStateItem.items(of: record.definition) {
            let saved = (copy as NSString).appendingPathComponent(item.name)
            guard NewFile.exists(saved) else { continue }  // checked before the journal (--force)
            guard item.isDirectory else {
                try Self.restoreFile(saved, over: item.live, what: item.what)
                continue
            }
            if !NewFile.exists(item.live) { try Self.makeDirectory(item.live) }  // it went away
            let keep = Set(try Self.stateFiles(in: saved, what: item.what, prefix: item.prefix))
            for file in keep.sorted() {
                try Self.restoreFile(
                    (saved as NSString).appendingPathComponent(file),
                    over: (item.live as NSString).appendingPathComponent(file), what: item.what)
            }
            for file in try Self.stateFiles(in: item.live, what: item.what, prefix: item.prefix)
            where !keep.contains(file) {
                unlink((item.live as NSString).appendingPathComponent(file))
            }
            try Self.sync(item.live)
        }
    }

    /// Removes a snapshot's copy of the device state (delete, rollback); nothing if there is none.
    func removeDeviceState(_ domain: String, snapshot: String) {
        try? FileManager.default.removeItem(atPath: deviceStateCopy(domain, snapshot: snapshot))
    }

    // MARK: - Files

    /// The state files in `directory`: regular files, names not starting with a dot. Anything
    /// else there (a link, a directory, a device) is refused: it is not state the emulator wrote.
    static func stateFiles(in directory: String, what: String, prefix: String = "") throws -> [String] {
        let names: [String]
        do { names = try FileManager.default.contentsOfDirectory(atPath: directory) } catch {
            throw SnapshotError(.io, "cannot list the \(what) in \(directory): \(error)")
        }
        var files: [String] = []
        for name in names.sorted() where !name.hasPrefix(".") && name.hasPrefix(prefix) {
            var st = stat()
            let path = (directory as NSString).appendingPathComponent(name)
            guard lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else {
                throw SnapshotError(
                    .invalidArgument,
                    "\(path) in the \(what) is \(RegularFile.typeName(st.st_mode)), not a regular file; nothing was changed. Move it away"
                )
            }
            files.append(name)
        }
        guard files.count <= deviceStateFileCount else {
            throw SnapshotError(
                .invalidArgument,
                "\(directory) holds \(files.count) files; the \(what) of one domain is at most \(deviceStateFileCount)")
        }
        return files
    }

    /// Writes `source`'s bytes over `path` through a new file beside it (mode and owner of the
    /// file it replaces, else 0600 and the directory's owner) and a rename.
    static func restoreFile(_ source: String, over path: String, what: String) throws {
        let data = try RegularFile.read(source, what: "the snapshot's \(what)", limit: deviceStateFileLimit)
        let staging = path + ".vmsnap-revert"
        unlink(staging)  // one an interrupted revert left
        let directory = (path as NSString).deletingLastPathComponent
        let (mode, uid, gid) =
            (try? NewFile.ownership(of: path))
            ?? (try? NewFile.ownership(of: directory)).map { (0o600, $0.1, $0.2) }
            ?? (0o600, geteuid(), getegid())
        try writeNew(staging, data, mode: mode & 0o7777, owner: geteuid() == 0 ? (uid, gid) : nil)
        guard rename(staging, path) == 0 else {
            let why = String(cString: strerror(errno))
            unlink(staging)
            throw SnapshotError(.io, "cannot put the \(what) back at \(path): \(why)")
        }
        syncDirectory(of: path)
    }

    /// A directory that must not exist yet (0700).
    static func makeDirectory(_ path: String) throws {
        guard mkdir(path, 0o700) == 0 else {
            throw SnapshotError(
                errno == EEXIST ? .alreadyExists : .io, "cannot make \(path): \(String(cString: strerror(errno)))")
        }
    }

    /// fsync of a file or directory, never through a symbolic link.
    static func sync(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0, fsync(fd) == 0 else {
            let why = String(cString: strerror(errno))
            if fd >= 0 { close(fd) }
            throw SnapshotError(.io, "cannot sync \(path): \(why)")
        }
        close(fd)
    }

    /// Makes a rename or a new file in the directory of `path` durable (a power cut after the
    /// journal moves on must not bring back the old name).
    static func syncDirectory(of path: String) {
        let fd = open((path as NSString).deletingLastPathComponent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return }
        _ = fsync(fd)
        close(fd)
    }

    /// Writes `data` into a new file (exclusive, no symbolic link followed; mode and owner set on
    /// the open file) and syncs it.
    static func writeNew(_ path: String, _ data: Data, mode: mode_t, owner: (uid_t, gid_t)? = nil, sync: Bool = true)
        throws
    {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)
        guard fd >= 0 else {
            throw SnapshotError(
                errno == EEXIST ? .alreadyExists : .io, "cannot create \(path): \(String(cString: strerror(errno)))")
        }
        var ok = fchmod(fd, mode) == 0 && (owner.map { fchown(fd, $0.0, $0.1) == 0 } ?? true)
        var done = 0
        while ok, done < data.count {
            let n = data.withUnsafeBytes { write(fd, $0.baseAddress! + done, data.count - done) }
            if n < 0, errno == EINTR { continue }
            ok = n > 0
            if ok { done += n }
        }
        ok = ok && (!sync || fsync(fd) == 0)
        let why = String(cString: strerror(errno))
        close(fd)
        guard ok else {
            unlink(path)
            throw SnapshotError(.io, "cannot write \(path): \(why)")
        }
    }
}
