import Foundation

/// A child started in a session of its own: it lives on if vmsnap is killed (a disk server that
/// QEMU reads through, the pump of a memory save that QEMU writes through), and a signal to
/// vmsnap's process group does not reach it.
public enum DetachedProcess {
    /// posix_spawn of `argv` (an absolute path first; never a shell) with its standard input,
    /// output and error on the given descriptors (nil: /dev/null), in a new session.
    public static func spawn(_ argv: [String], stdin: Int32?, stdout: Int32?, stderr: Int32?) throws -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for (fd, target, mode) in [(stdin, Int32(0), O_RDONLY), (stdout, 1, O_WRONLY), (stderr, 2, O_WRONLY)] {
            if let fd {
                posix_spawn_file_actions_adddup2(&actions, fd, target)
            } else {
                posix_spawn_file_actions_addopen(&actions, target, "/dev/null", mode, 0)
            }
        }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        let setsid: Int16 = 0x80  // POSIX_SPAWN_SETSID (glibc)
        posix_spawnattr_setflags(&attributes, setsid)
        var cArgs = argv.map { strdup($0) } + [nil]
        defer { for p in cArgs { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, argv[0], &actions, &attributes, &cArgs, environ)
        guard rc == 0 else {
            throw SnapshotError(.commandFailed, "cannot start \(argv[0]): \(String(cString: strerror(rc)))")
        }
        return pid
    }
}
