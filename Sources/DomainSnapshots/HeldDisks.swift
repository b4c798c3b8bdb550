import Foundation
import HypervisorDriver
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// Held disks: a running domain's disks whose backend takes its snapshot on the storage (LVM,
/// plug-ins). The hypervisor holds such a disk still from the pause on with a temporary overlay
/// that takes the guest's writes; after the resume the backend snapshots the unwritten disk, and
/// the overlay is merged back while the guest runs. For the switch back the guest stops for a
/// moment (the merge copies its newest writes in the background; stopped, nothing is written
/// between the last copy and the switch), and the journal records the switch before the guest
/// runs again. So a recovery always knows: before the switch the overlay holds the guest's
/// newest writes (merge it); after it the overlay is stale (never merge it again).
extension DomainService {
    /// Where a held disk's temporary overlay goes: under the store, in a directory only its
    /// owner reads (the file itself takes the disk's mode and owner), named by the journal
    /// entry (a recovery recomputes the name; it never trusts a path read back).
    func heldOverlay(_ domain: String, journalID: Int64, target: String) -> String {
        (store.directory as NSString).appendingPathComponent("held/\(domain)/\(journalID)-\(target).overlay")
    }

    /// After the guest resumed: each held disk's storage snapshot (the disk itself is as it was
    /// at the pause: the guest writes into the temporary overlay), then the overlay merged back
    /// into the disk while the guest runs, and removed. Returns how long the guest stopped for
    /// the switches, in milliseconds.
    func completeHeld(
        _ live: any LiveDomain, _ held: [(DiskPart, LiveDiskSnapshot)], name: String, request: DomainSnapshotRequest,
        journalID: Int64, j: inout DomainJournal
    ) async throws -> Double {
        try await takeThroughBackends(held.map(\.0), name: name, request: request, journalID: journalID, j: &j)
        try phase(journalID, &j, "storage-snapshots")
        var stopped = 0.0
        for (part, overlay) in held {
            Trace.mark("held \(part.disk.target): merging")
            let mark = await live.mark()
            try await mergeHeld(live, overlay, journalID: journalID, j: &j)
            stopped += await live.pauseWindow(since: mark) ?? 0
            Trace.mark("held \(part.disk.target): merged")
        }
        try phase(journalID, &j, "merged")
        return stopped
    }

    /// Merges a held disk's overlay back through the running hypervisor, with the guest stopped
    /// for the switch, then removes it.
    func mergeHeld(_ live: any LiveDomain, _ overlay: LiveDiskSnapshot, journalID: Int64, j: inout DomainJournal)
        async throws
    {
        let target = overlay.target
        let hypervisor = j.record.flatMap { hypervisorProcess($0.domain) }
        var stoppedHere = false
        do {
            try await live.mergeHeldOverlay(overlay) {
                if try await live.isRunning() {
                    // Journaled before the pause: a recovery resumes a guest vmsnap stopped.
                    j.pausedByUs = true
                    try journal(journalID, j)
                    try await live.pause()
                    stoppedHere = true
                }
                DomainFault.point("\(j.operation.rawValue):synced-\(target)", hypervisor: hypervisor)
            }
        } catch {
            // The switch failed (QEMU refused it, or the job ended in an error): the overlay is
            // still the guest's active, newest layer, and the guest runs on it again.
            if stoppedHere, (try? await live.resume()) != nil {
                j.pausedByUs = false
                try? journal(journalID, j)
            }
            throw error
        }
        if !(j.heldSwitched ?? []).contains(target) { j.heldSwitched = (j.heldSwitched ?? []) + [target] }
        try journal(journalID, j)
        DomainFault.point("\(j.operation.rawValue):switched-\(target)", hypervisor: hypervisor)
        if stoppedHere {
            try await live.resume()
            j.pausedByUs = false
            try journal(journalID, j)
        }
        if let path = overlay.overlay { unlink(path) }
    }

    /// A held disk's overlay after its hypervisor died. Switched back (journaled): the overlay
    /// is stale, removed unread. Not switched: it holds the guest's newest writes and is merged
    /// into the disk, after checking that it reads through the disk. A file that is not an image
    /// at all is set aside and named, never removed and never merged (the hypervisor died
    /// formatting it, or it is damaged).
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
        if j.heldSwitched?.contains(disk.target) == true || st.st_size == 0 {
            unlink(overlay)
            return
        }
        let tool = try drivers.driver(for: record.definition).backupImages
        let backing: String?
        do { backing = try await tool.backingFile(of: overlay) } catch {
            let aside = overlay + ".damaged"
            guard rename(overlay, aside) == 0 else {
                throw SnapshotError(.io, "cannot set \(overlay) aside: \(String(cString: strerror(errno)))")
            }
            notify(
                "the temporary overlay of disk \(disk.target) of domain '\(record.domain)' is not a readable image (\(error)); it was set aside as \(aside), not merged. If the hypervisor died while making it, remove it; else inspect it with qemu-img check"
            )
            return
        }
        let expected = j.heldBacking?[disk.target] ?? disk.source
        guard let backing, let expected,
            backing == expected || (FileIdentity(backing) != nil && FileIdentity(backing) == FileIdentity(expected))
        else {
            throw SnapshotError(
                .conflict,
                "the temporary overlay \(overlay) of disk \(disk.target) reads through \(backing ?? "nothing"), not the disk's \(expected ?? "(unrecorded)"); nothing was merged and it was kept"
            )
        }
        try await tool.mergeIntoBacking(overlay)
        unlink(overlay)
    }

    /// Room in the store for a held disk's overlay: the guest's writes during the storage
    /// snapshot and the merge go there, and a full filesystem would stop the guest with an I/O
    /// error. The store must have the disk's size free, or 1 GiB for a larger disk (seconds of
    /// writes), on top of what the snapshot already needs there (`besides`: the memory image,
    /// overlays of other disks; grown by this one's when it is held); else the disk is
    /// snapshotted inside the pause, as before holds, and that is said.
    func holdRoom(for target: String, path: String, besides: inout UInt64) -> Bool {
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
        let overlay = min(size, 1 << 30) + (64 << 20)
        let needed = besides + overlay
        if free < needed {
            notify(
                "disk \(target) is snapshotted with the guest paused: the store \(store.directory) has \(free >> 20) MiB free, and holding the disk during its storage snapshot needs \(needed >> 20) MiB there"
            )
            return false
        }
        besides = needed
        return true
    }
}
