import Foundation
import HypervisorDriver
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// Held disks: a running domain's disks whose backend takes its snapshot on the storage (LVM,
/// plug-ins). The hypervisor holds such a disk still from the pause on with a temporary overlay
/// that takes the guest's writes; after the resume the backend snapshots the unwritten disk, and
/// the overlay is merged back while the guest runs. The journal names each overlay before it
/// exists and marks when its merge has synced, so a recovery knows whether the overlay still
/// holds the guest's newest writes (merge it) or may be stale (never merge it again).
extension DomainService {
    /// Where a held disk's temporary overlay goes: under the store, in a directory only its
    /// owner reads (the file itself takes the disk's mode and owner), named by the journal
    /// entry (a recovery recomputes the name; it never trusts a path read back).
    func heldOverlay(_ domain: String, journalID: Int64, target: String) -> String {
        (store.directory as NSString).appendingPathComponent("held/\(domain)/\(journalID)-\(target).overlay")
    }

    /// After the guest resumed: each held disk's storage snapshot (the disk itself is as it was
    /// at the pause: the guest writes into the temporary overlay), then the overlay merged back
    /// into the disk while the guest runs, and removed.
    func completeHeld(
        _ live: any LiveDomain, _ held: [(DiskPart, LiveDiskSnapshot)], name: String, request: DomainSnapshotRequest,
        journalID: Int64, j: inout DomainJournal
    ) async throws {
        try await takeThroughBackends(held.map(\.0), name: name, request: request, journalID: journalID, j: &j)
        try phase(journalID, &j, "storage-snapshots")
        for (part, overlay) in held {
            Trace.mark("held \(part.disk.target): merging")
            try await mergeHeld(live, overlay, journalID: journalID, j: &j)
            Trace.mark("held \(part.disk.target): merged")
        }
        try phase(journalID, &j, "merged")
    }

    /// Merges a held disk's overlay back through the running hypervisor, then removes it.
    func mergeHeld(_ live: any LiveDomain, _ overlay: LiveDiskSnapshot, journalID: Int64, j: inout DomainJournal)
        async throws
    {
        try await live.mergeHeldOverlay(overlay) {
            try markHeldSynced(overlay.target, journalID: journalID, j: &j)
        }
        DomainFault.point(
            "\(j.operation.rawValue):switched-\(overlay.target)",
            hypervisor: j.record.flatMap { hypervisorProcess($0.domain) })
        if let path = overlay.overlay { unlink(path) }
    }

    /// Journals that the disk under a held overlay holds every write the overlay took: from the
    /// switch back on the overlay is stale, and a recovery must never merge it again.
    func markHeldSynced(_ target: String, journalID: Int64, j: inout DomainJournal) throws {
        j.heldSynced = (j.heldSynced ?? []) + [target]
        try journal(journalID, j)
        DomainFault.point(
            "\(j.operation.rawValue):synced-\(target)", hypervisor: j.record.flatMap { hypervisorProcess($0.domain) })
    }

    /// A held disk's overlay after its hypervisor died. Not yet synced: merged into the disk
    /// (it holds the guest's writes since the pause). Synced: the disk already holds all of it
    /// and the overlay may be stale, so it is removed when it reads as the disk does, else kept
    /// aside and reported (a hypervisor that died at the switch leaves no way to tell which is
    /// newer). A file the hypervisor died formatting, before any switch to it, is removed.
    func mergeHeldOffline(
        _ record: DomainSnapshotRecord, disk: DomainSnapshotDisk, overlay: String, _ j: DomainJournal
    ) async throws {
        var st = stat()
        guard lstat(overlay, &st) == 0 else { return }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            throw SnapshotError(
                .conflict,
                "\(overlay), where vmsnap held disk \(disk.target), is not a regular file; it was left as it is. Remove it and run `vmsnap recover` again"
            )
        }
        let tool = try drivers.driver(for: record.definition).backupImages
        // The switch to the overlay happens in the pause's transaction, journaled right after.
        let mayHaveSwitched = j.phases.contains("disks-recorded")
        let backing: String?
        do { backing = st.st_size == 0 ? nil : try await tool.backingFile(of: overlay) } catch {
            guard !mayHaveSwitched else {
                throw SnapshotError(
                    .invalidImage,
                    "the temporary overlay \(overlay) of disk \(disk.target) is damaged (\(error)); it may hold the guest's writes since the snapshot's pause, so it was kept. Inspect it with qemu-img check"
                )
            }
            unlink(overlay)
            return
        }
        guard let backing else {
            guard !mayHaveSwitched || st.st_size == 0 else {
                throw SnapshotError(
                    .invalidImage,
                    "the temporary overlay \(overlay) of disk \(disk.target) reads through no disk; it was kept")
            }
            unlink(overlay)
            return
        }
        guard let source = disk.source, Self.sameFile(backing, source) else {
            throw SnapshotError(
                .conflict,
                "the temporary overlay \(overlay) of disk \(disk.target) reads through \(backing), not the disk's \(disk.source ?? "(unrecorded)"); nothing was merged and it was kept"
            )
        }
        if j.heldSynced?.contains(disk.target) == true {
            if try await tool.sameContent(overlay, backing) {
                unlink(overlay)
            } else {
                let kept = overlay + ".kept"
                guard rename(overlay, kept) == 0 else {
                    throw SnapshotError(.io, "cannot set \(overlay) aside: \(String(cString: strerror(errno)))")
                }
                notify(
                    "the hypervisor of domain '\(record.domain)' died while switching disk \(disk.target) back from its temporary overlay; vmsnap cannot tell whether the guest's last writes reached the disk. The disk was left as the hypervisor left it and the overlay kept as \(kept): if the guest misses its last writes, `qemu-img commit \(kept)` puts them back"
                )
            }
            return
        }
        try await tool.mergeIntoBacking(overlay)
        unlink(overlay)
    }

    /// Room in the store for a held disk's overlay: the guest's writes during the storage
    /// snapshot and the merge go there, and a full filesystem would stop the guest with an I/O
    /// error. The store must have the disk's size free, or 1 GiB for a larger disk (seconds of
    /// writes); else the disk is snapshotted inside the pause, as before holds, and that is said.
    func holdRoom(for target: String, path: String) -> Bool {
        // A network disk (no local path) counts as large.
        var size: UInt64 = 1 << 30
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        if fd >= 0 {
            size = UInt64(max(lseek(fd, 0, SEEK_END), 0))
            close(fd)
        }
        var fs = statvfs()
        guard statvfs(store.directory, &fs) == 0 else { return false }
        let free = UInt64(fs.f_bavail) * UInt64(fs.f_frsize)
        let needed = min(size, 1 << 30) + (64 << 20)
        if free < needed {
            notify(
                "disk \(target) is snapshotted with the guest paused: the store \(store.directory) has \(free >> 20) MiB free, and holding the disk during its storage snapshot needs \(needed >> 20) MiB there"
            )
            return false
        }
        return true
    }

    /// True when both paths name one file (symlinks resolved: an LVM volume's /dev/VG/LV).
    static func sameFile(_ a: String, _ b: String) -> Bool {
        var sa = stat()
        var sb = stat()
        guard stat(a, &sa) == 0, stat(b, &sb) == 0 else { return false }
        return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino
    }
}
