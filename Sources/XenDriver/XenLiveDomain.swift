import CLibXL
import Foundation
import HypervisorDriver
import SnapshotCore

#if canImport(Glibc)
    import Glibc
#endif

/// A running Xen domain during a snapshot. A memory snapshot is libxl's suspend: the guest
/// itself suspends (a PV guest cooperates, so it must be running when asked), libxl writes its
/// memory to the file, and the domain stays suspended while the backends snapshot the disks;
/// then it resumes where it was (suspend cancelled, as `xl save -c` does). A disk-only snapshot
/// pauses the vCPUs instead.
actor XenLiveDomain: LiveDomain {
    let xl: LibXL
    let domain: String
    let domid: UInt32
    /// Pauses and resumes with their times, for pause windows.
    private var events: [(paused: Bool, at: ContinuousClock.Instant)] = []
    private var saveFD: Int32?
    private var saved = false
    private var saveStarted: ContinuousClock.Instant?

    init(xl: LibXL, domain: String, domid: UInt32) {
        self.xl = xl
        self.domain = domain
        self.domid = domid
    }

    func mark() -> Int { events.count }

    func pauseWindow(since mark: Int) -> Double? {
        let after = events.dropFirst(mark)
        guard let first = after.first(where: { $0.paused }), let last = after.last(where: { !$0.paused }),
            last.at >= first.at
        else { return nil }
        return (last.at - first.at).seconds * 1000
    }

    private func info() async throws -> XenDomainInfo {
        let (xl, domid, domain) = (xl, domid, domain)
        guard let info = try await xl.call({ LibXL.info($0, domid) }), info.state != .ended else {
            throw SnapshotError(.conflict, "domain '\(domain)' (Xen domain \(domid)) is gone")
        }
        return info
    }

    func isRunning() async throws -> Bool { try await info().state == .running }

    /// With a memory save prepared, the pause is the suspend: libxl saves the memory and leaves
    /// the domain suspended. Otherwise the vCPUs stop.
    func pause() async throws {
        let (xl, domid, domain) = (xl, domid, domain)
        if let fd = saveFD, !saved {
            events.append((true, .now))
            saveStarted = .now
            try await xl.call { ctx in
                try LibXL.check(libxl_domain_suspend(ctx, domid, fd, 0, nil), "saving the memory of '\(domain)'")
            }
            saved = true
            return
        }
        events.append((true, .now))
        try await xl.call { ctx in try LibXL.check(libxl_domain_pause(ctx, domid, nil), "pausing '\(domain)'") }
    }

    func resume() async throws {
        let (xl, domid, domain) = (xl, domid, domain)
        if try await info().state == .suspended {
            try await xl.call { ctx in
                try LibXL.check(libxl_domain_resume(ctx, domid, 1, nil), "resuming '\(domain)' after its memory save")
            }
        } else {
            try await xl.call { ctx in
                try LibXL.check(libxl_domain_unpause(ctx, domid, nil), "unpausing '\(domain)'")
            }
        }
        events.append((false, .now))
    }

    /// `live` is never true: the driver declares no live save.
    func prepareMemorySave(to fd: Int32, live: Bool) async throws {
        // A PV guest suspends itself: a paused guest cannot answer, and unpausing it would move
        // its memory past the disks' instant.
        guard try await info().state == .running else {
            throw SnapshotError(
                .unsupported,
                "domain '\(domain)' is paused: a Xen PV guest saves its memory by suspending itself, which a paused guest cannot do. Resume it first, or take --disk-only"
            )
        }
        saveFD = fd
    }

    /// The memory's instant was the suspend (in ``pause()``); nothing is left to start.
    func startMemorySave() async throws {
        guard saved else {
            throw SnapshotError(
                .commandFailed, "domain '\(domain)': the memory save runs with the suspend, which did not happen")
        }
    }

    func finishMemorySave(fd: Int32, guestBytes: UInt64, since mark: Int, progress: ProgressHandler?) async throws
        -> Double?
    {
        if let progress, let saveStarted {
            let at = UInt64(max(0, lseek(fd, 0, SEEK_CUR)))
            progress(
                .measured("memory save", done: at, total: at, seconds: (ContinuousClock.now - saveStarted).seconds))
        }
        return nil
    }

    func drainMemorySave() async {}

    func snapshotDisks(_ snapshots: [LiveDiskSnapshot]) async throws {
        guard snapshots.isEmpty else { throw Self.notLive("disk snapshots") }
    }

    func saveInternal(name: String, targets: [String]) async throws {
        throw SnapshotError(.unsupported, "Xen keeps no memory inside disk images")
    }

    func carryDirtyBitmaps(_ previous: [String: String]) async throws {
        guard previous.isEmpty else { throw Self.notLive("dirty bitmaps") }
    }

    func addDirtyBitmaps(_ name: String, targets: [String]) async throws { throw Self.notLive("dirty bitmaps") }

    func undoDiskSnapshot(_ snapshot: LiveDiskSnapshot) async throws { throw Self.notLive("disk snapshots") }

    func deleteInternalSnapshot(target: String, name: String) async throws { throw Self.notLive("snapshot deletion") }

    func mergeIntoActive(target: String, base: String?, progress: ProgressHandler?) async throws {
        throw Self.notLive("merges")
    }

    func freezeFilesystems() async throws -> Int {
        throw SnapshotError(.unsupported, "the Xen driver has no guest agent channel to freeze filesystems through")
    }

    func thawFilesystems() async throws {}

    func isConnected() async -> Bool { (try? await info()) != nil }

    func close() async {}

    /// What the capabilities already say: the domain layer never asks for these.
    static func notLive(_ what: String) -> SnapshotError {
        SnapshotError(
            .unsupported, "the Xen driver takes no live \(what): its disks' backends do, with the guest paused")
    }
}
