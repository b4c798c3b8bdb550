import Foundation

/// A child started in a session of its own: it lives on if vmsnap is killed (a disk server a
/// hypervisor reads through), and a signal to vmsnap's process group does not reach it.
public enum DetachedProcess {
    /// posix_spawn of `argv` (an absolute path first; never a shell) with its standard input,
    /// output and error on the given descriptors (nil: /dev/null), in a new session.
    public static func spawn(_ argv: [String], stdin: Int32?, stdout: Int32?, stderr: Int32?) throws -> pid_t {
        guard let program = argv.first, program.hasPrefix("/") else {
            throw SnapshotError(
                .invalidArgument,
                "cannot start a detached process from \(argv.isEmpty ? "an empty command" : "'\(argv[0])'"): the first argument must be an absolute path to the program"
            )
        }
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
        let rc = posix_spawn(&pid, program, &actions, &attributes, &cArgs, environ)
        guard rc == 0 else {
            throw SnapshotError(.commandFailed, "cannot start \(program): \(String(cString: strerror(rc)))")
        }
        return pid
    }
}
