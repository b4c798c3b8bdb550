import Foundation
import HypervisorDriver
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// A UEFI domain's variable store (its NVRAM) in its snapshots: `domain define` makes the store
/// from the firmware's template when it is missing; each snapshot keeps a copy, taken while the
/// guest's vCPUs are stopped (the hypervisor has flushed its flash writes) or the domain is shut
/// off; a revert puts the copy back before the domain starts; a delete removes it. The copies
/// live under the store, 0600, named by domain and snapshot (recomputed, never read back).
extension DomainService {
    /// The largest variable store accepted (OVMF's are 128 KiB to 4 MiB).
    static let firmwareVarsLimit = 64 << 20

    /// Where snapshot `snapshot` of `domain` keeps its copy of the variables.
    func firmwareVarsCopy(_ domain: String, snapshot: String) -> String {
        (store.directory as NSString).appendingPathComponent("nvram/\(domain)/\(snapshot).fd")
    }

    /// At define: the firmware code must be readable; a missing variable store is made from the
    /// template (0600, never through a symbolic link); an existing one must be a regular file.
    static func prepareFirmwareVars(_ definition: DomainDefinition) throws {
        guard let firmware = definition.firmware else { return }
        let domain = definition.name
        var st = stat()
        guard stat(firmware.code, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG,
            FileManager.default.isReadableFile(atPath: firmware.code)
        else {
            throw SnapshotError(
                .notFound,
                "domain '\(domain)': firmware.code \(firmware.code) is not a readable file; install the firmware (Debian: ovmf) or fix the path"
            )
        }
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
        let data = try RegularFile.read(template, what: "firmware template", limit: firmwareVarsLimit)
        try writeNew(firmware.vars, data, mode: 0o600)
    }

    /// Before a create's journal: the copy's name must be free (a rollback removes the copy, so
    /// it must be one this create made), and internal memory cannot carry the variables.
    func checkFirmwareVarsCopy(_ definition: DomainDefinition, snapshot: String, internalMemory: Bool) throws {
        guard definition.firmware != nil else { return }
        if internalMemory {
            throw SnapshotError(
                .unsupported,
                "--memory internal: domain '\(definition.name)' has UEFI firmware, whose variable store is a flash image that cannot hold internal snapshots; use an external memory file (the default)"
            )
        }
        let copy = firmwareVarsCopy(definition.name, snapshot: snapshot)
        if NewFile.exists(copy) {
            throw SnapshotError(
                .alreadyExists,
                "\(copy), where snapshot '\(snapshot)' would keep the firmware variables, exists already; nothing was changed. Remove it or pick another name"
            )
        }
    }

    /// Copies the domain's variables into the snapshot's copy; the hypervisor is stopped or paused.
    /// `sync: false` inside a guest's pause: ``syncFirmwareVars(_:snapshot:)`` follows after it.
    func saveFirmwareVars(_ definition: DomainDefinition, snapshot: String, sync: Bool = true) throws {
        guard let firmware = definition.firmware else { return }
        let copy = firmwareVarsCopy(definition.name, snapshot: snapshot)
        try FileManager.default.createDirectory(
            atPath: (copy as NSString).deletingLastPathComponent, withIntermediateDirectories: true,
            attributes: [.posixPermissions: 0o700])
        let data = try RegularFile.read(firmware.vars, what: "firmware variable store", limit: Self.firmwareVarsLimit)
        try Self.writeNew(copy, data, mode: 0o600, sync: sync)
        if sync { Self.syncDirectory(of: copy) }
    }

    /// Makes a copy saved with `sync: false` durable.
    func syncFirmwareVars(_ definition: DomainDefinition, snapshot: String) throws {
        guard definition.firmware != nil else { return }
        let copy = firmwareVarsCopy(definition.name, snapshot: snapshot)
        let fd = open(copy, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0, fsync(fd) == 0 else {
            let why = String(cString: strerror(errno))
            if fd >= 0 { close(fd) }
            throw SnapshotError(.io, "cannot sync \(copy): \(why)")
        }
        close(fd)
        Self.syncDirectory(of: copy)
    }

    /// Puts the snapshot's copy back as the domain's variables: a new file beside the store with
    /// its mode and owner, renamed over it (a crash leaves the old or the new store, never half).
    func restoreFirmwareVars(_ record: DomainSnapshotRecord) throws {
        guard let firmware = record.definition.firmware else { return }
        let copy = firmwareVarsCopy(record.domain, snapshot: record.name)
        let data = try RegularFile.read(copy, what: "the snapshot's firmware variables", limit: Self.firmwareVarsLimit)
        let staging = firmware.vars + ".vmsnap-revert"
        unlink(staging)  // one an interrupted revert left
        let (mode, uid, gid) =
            (try? NewFile.ownership(of: firmware.vars)) ?? (0o600, geteuid(), getegid())
        try Self.writeNew(staging, data, mode: mode, owner: geteuid() == 0 ? (uid, gid) : nil)
        guard rename(staging, firmware.vars) == 0 else {
            let why = String(cString: strerror(errno))
            unlink(staging)
            throw SnapshotError(.io, "cannot put the firmware variables back at \(firmware.vars): \(why)")
        }
        Self.syncDirectory(of: firmware.vars)
    }

    /// The checks a revert makes before anything changes: a snapshot without its copy of the
    /// variables is refused, unless `force` says to go on with the variables as they are (a
    /// snapshot redefined from XML or imported has none).
    func checkFirmwareVarsRestorable(_ record: DomainSnapshotRecord, force: Bool) throws {
        guard record.definition.firmware != nil else { return }
        let copy = firmwareVarsCopy(record.domain, snapshot: record.name)
        guard FileManager.default.isReadableFile(atPath: copy) else {
            guard force else {
                throw SnapshotError(
                    .notFound,
                    "the firmware variables of snapshot '\(record.name)' (\(copy)) are missing; nothing was changed. Restore the file, or revert with --force to keep the domain's variables as they are"
                )
            }
            notify("snapshot '\(record.name)' has no copy of the firmware variables; the domain keeps its own")
            return
        }
    }

    /// Makes a rename or a new file in the directory of `path` durable (a power cut after the
    /// journal moves on must not bring back the old name).
    static func syncDirectory(of path: String) {
        let fd = open((path as NSString).deletingLastPathComponent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return }
        _ = fsync(fd)
        close(fd)
    }

    /// Removes a snapshot's copy of the variables (delete, rollback); nothing if there is none.
    func removeFirmwareVars(_ domain: String, snapshot: String) {
        unlink(firmwareVarsCopy(domain, snapshot: snapshot))
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
