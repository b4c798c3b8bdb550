import Foundation
import SnapshotCore

/// The path of a memory save from QEMU to its image file: QEMU writes into a pipe, and `cat`, in
/// a session of its own, copies the pipe into the file.
///
/// QEMU's migration thread writes the save's first bytes (header, RAM block list) while the
/// guest is stopped. Written straight into the file, a write that waits for the filesystem
/// (a journal commit, writeback of an earlier save) waits inside the pause: a 4 GiB guest in
/// huge pages paused 5-10 ms with its image on tmpfs and up to 236 ms on this VM's ext4 (its
/// save's setup phase, docs/notes.md). A pipe takes those bytes at once.
///
/// The copier is a process, not a thread of vmsnap: if vmsnap is killed, the save still
/// completes (QEMU 7.2 hangs a guest whose background copy ends early, as a broken pipe would
/// end it). It shares the image's open file description, so the file offset vmsnap reads for
/// progress and size is the copier's.
final class MemoryPump: Sendable {
    let pid: pid_t

    private init(pid: pid_t) { self.pid = pid }

    /// The copier, root's own: never a program from a directory others can write.
    static let copier = ["/usr/bin/cat", "/bin/cat"].first { FileManager.default.isExecutableFile(atPath: $0) }

    /// Starts the copier into `file`; returns it and the pipe's write end, for QEMU (the caller
    /// closes its copy once QEMU has it: the copier sees the end when QEMU closes its own).
    static func start(into file: Int32) throws -> (pump: MemoryPump, qemuEnd: Int32) {
        guard let copier else {
            throw SnapshotError(.unsupported, "no /usr/bin/cat to copy the memory save into its file (coreutils)")
        }
        var ends: [Int32] = [-1, -1]
        guard let pipe2 = Self.pipe2, pipe2(&ends, O_CLOEXEC) == 0 else {
            throw SnapshotError(.io, "cannot make a pipe for the memory save: \(String(cString: strerror(errno)))")
        }
        // 1 MiB (the default pipe-max-size): QEMU's writes in the pause are far smaller.
        _ = fcntl(ends[1], Self.setPipeSize, Int32(1 << 20))
        defer { close(ends[0]) }
        do {
            let pid = try DetachedProcess.spawn([copier], stdin: ends[0], stdout: file, stderr: nil)
            return (MemoryPump(pid: pid), ends[1])
        } catch {
            close(ends[1])
            throw error
        }
    }

    /// glibc's pipe2, which Swift's Glibc module does not show: both ends close-on-exec from
    /// the start, so no child another thread spawns meanwhile holds the write end (the copier
    /// would never see the save's end).
    static let pipe2: (@convention(c) (UnsafeMutablePointer<Int32>, Int32) -> Int32)? = {
        dlsym(UnsafeMutableRawPointer(bitPattern: 0), "pipe2").map {
            unsafeBitCast($0, to: (@convention(c) (UnsafeMutablePointer<Int32>, Int32) -> Int32).self)
        }
    }()

    /// F_SETPIPE_SZ (F_LINUX_SPECIFIC_BASE + 7), not in Swift's Glibc module either.
    static let setPipeSize: Int32 = 1031

    /// Waits for the copier to reach the end of what QEMU wrote and exit (QEMU closes its end
    /// when the save ends, however it ends). Throws if it failed or did not end in `timeout`.
    func finish(timeout: Duration = .seconds(600)) async throws {
        let deadline = ContinuousClock.now + timeout
        while true {
            var status: Int32 = 0
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid {
                let exited = status & 0x7f == 0
                let code = (status >> 8) & 0xff
                guard exited, code == 0 else {
                    throw SnapshotError(
                        .io,
                        "copying the memory save into its file failed (cat \(exited ? "exited with \(code)" : "killed by signal \(status & 0x7f)")); the image is incomplete"
                    )
                }
                return
            }
            guard r == 0 else { return }  // not our child any more (reaped elsewhere)
            guard ContinuousClock.now < deadline else {
                throw SnapshotError(
                    .io,
                    "the memory save's copier (pid \(pid)) did not finish within \(timeout); the image is incomplete")
            }
            try await Task.sleep(for: .milliseconds(5))
        }
    }
}
