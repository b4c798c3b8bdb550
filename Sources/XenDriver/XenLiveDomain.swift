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
    /// The memory save, running on libxl's thread from the suspend until the file is written.
    private var save: Task<Void, any Error>?
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

    /// With a memory save prepared, the pause is the suspend: libxl asks the guest to suspend
    /// itself, then writes its memory into the file. This returns as soon as the guest has
    /// suspended (a second libxl context watches for it): nothing in the guest runs from then on,
    /// so the disks are snapshotted while the memory is still being written, and the downtime is
    /// the longer of the two rather than their sum. Otherwise the vCPUs stop.
    func pause() async throws {
        let (xl, domid, domain) = (xl, domid, domain)
        if let fd = saveFD, save == nil {
            saveStarted = .now
            let done = Flag()
            let task = Task.detached {
                defer { done.set() }
                try await xl.call { ctx in
                    try LibXL.check(libxl_domain_suspend(ctx, domid, fd, 0, nil), "saving the memory of '\(domain)'")
                }
            }
            save = task
            let watcher = LibXL.watcher
            // The pause window starts when the guest has suspended, not when it was asked to.
            while !done.isSet {
                if (try? watcher.now({ LibXL.info($0, domid) }))??.state == .suspended { break }
                try await Task.sleep(for: .milliseconds(2))
            }
            events.append((true, .now))
            if done.isSet { try await task.value }
            return
        }
        events.append((true, .now))
        try await xl.call { ctx in try LibXL.check(libxl_domain_pause(ctx, domid, nil), "pausing '\(domain)'") }
    }

    /// Cancels the suspend (the guest runs on where it stopped) or unpauses the vCPUs. A save
    /// still writing is waited for first, as is one an interrupted vmsnap left behind.
    func resume() async throws {
        let (xl, domid, domain) = (xl, domid, domain)
        _ = try? await save?.value
        let state = try await info().state
        if state == .suspended {
            await SaveHelpers.waitForNone(domid: domid)
            try await xl.call { ctx in
                try LibXL.check(libxl_domain_resume(ctx, domid, 1, nil), "resuming '\(domain)' after its memory save")
            }
        } else if state == .paused {
            try await xl.call { ctx in
                try LibXL.check(libxl_domain_unpause(ctx, domid, nil), "unpausing '\(domain)'")
            }
        }
        events.append((false, .now))
    }

    /// `live` is never true: the driver declares no live save.
    func prepareMemorySave(to fd: Int32, live: Bool, guestBytes: UInt64, progress: ProgressHandler?) async throws {
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
        guard save != nil else {
            throw SnapshotError(
                .commandFailed, "domain '\(domain)': the memory save runs with the suspend, which did not happen")
        }
    }

    func finishMemorySave(fd: Int32, guestBytes: UInt64, since mark: Int, progress: ProgressHandler?) async throws
        -> Double?
    {
        // Progress while libxl's helper still writes (it shares the file's offset).
        let watch = FileProgress.watch(fd: fd, phase: "memory save", total: guestBytes, progress: progress)
        defer { watch.stop() }
        try await save?.value
        if let progress, let saveStarted {
            let at = UInt64(max(0, lseek(fd, 0, SEEK_CUR)))
            progress(
                .measured("memory save", done: at, total: at, seconds: (ContinuousClock.now - saveStarted).seconds))
        }
        return nil
    }

    func drainMemorySave() async { _ = try? await save?.value }

    /// Image-file disks through the qdisk QEMU's QMP, at one instant (one transaction).
    func snapshotDisks(_ snapshots: [LiveDiskSnapshot]) async throws {
        guard !snapshots.isEmpty else { return }
        try await XenQdisk.withDisks(domid, domain: domain) { try await $0.snapshotDisks(snapshots) }
    }

    func saveInternal(name: String, targets: [String]) async throws {
        throw SnapshotError(.unsupported, "Xen keeps no memory inside disk images")
    }

    func carryDirtyBitmaps(_ previous: [String: String]) async throws {
        guard previous.isEmpty else { throw Self.unsupported("dirty bitmaps") }
    }

    func addDirtyBitmaps(_ name: String, targets: [String]) async throws { throw Self.unsupported("dirty bitmaps") }

    func undoDiskSnapshot(_ snapshot: LiveDiskSnapshot) async throws {
        try await XenQdisk.withDisks(domid, domain: domain) { try await $0.undoDiskSnapshot(snapshot) }
    }

    func deleteInternalSnapshot(target: String, name: String) async throws {
        try await XenQdisk.withDisks(domid, domain: domain) {
            try await $0.deleteInternalSnapshot(target: target, name: name)
        }
    }

    func mergeIntoActive(target: String, base: String?, progress: ProgressHandler?) async throws {
        try await XenQdisk.withDisks(domid, domain: domain) {
            try await $0.mergeIntoActive(target: target, base: base, progress: progress)
        }
    }

    func mergeIntoLayer(target: String, layer: String, base: String?, progress: ProgressHandler?) async throws {
        try await XenQdisk.withDisks(domid, domain: domain) {
            try await $0.mergeIntoLayer(target: target, layer: layer, base: base, progress: progress)
        }
    }

    func freezeFilesystems() async throws -> Int {
        throw SnapshotError(.unsupported, "the Xen driver has no guest agent channel to freeze filesystems through")
    }

    func thawFilesystems() async throws {}

    func isConnected() async -> Bool { (try? await info()) != nil }

    func close() async {}

    /// What the capabilities already say: the domain layer never asks for these.
    static func unsupported(_ what: String) -> SnapshotError {
        SnapshotError(.unsupported, "the Xen driver has no \(what)")
    }
}

/// Set once, read from any thread.
final class Flag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    var isSet: Bool {
        lock.lock()
        defer { lock.unlock() }
        return value
    }
    func set() {
        lock.lock()
        value = true
        lock.unlock()
    }
}

/// libxl's save helpers (`libxl-save-helper --save-domain FD DOMID ...`, children of the process
/// that started the save): one whose parent was killed mid-save still reads the guest's memory,
/// so a recovery waits for it to end before the suspend is cancelled.
enum SaveHelpers {
    static func running(domid: UInt32) -> Bool {
        let procs = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        for pid in procs where pid.allSatisfy(\.isNumber) {
            guard let raw = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { continue }
            let argv = raw.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
            if argv.count > 3, argv[0].hasSuffix("libxl-save-helper"), argv[1] == "--save-domain",
                argv[3] == String(domid)
            {
                return true
            }
        }
        return false
    }

    static func waitForNone(domid: UInt32, timeout: Duration = .seconds(600)) async {
        let deadline = ContinuousClock.now + timeout
        while running(domid: domid), ContinuousClock.now < deadline { try? await Task.sleep(for: .milliseconds(50)) }
    }
}
