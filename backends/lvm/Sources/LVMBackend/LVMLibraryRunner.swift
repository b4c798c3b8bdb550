import CLVM2Cmd
import Foundation
import SnapshotCore

/// Runs LVM's read-only reports (`lvs`, `vgs`) inside the process through liblvm2cmd's
/// `lvm2_run`, and everything else (every command that changes storage) as a child process
/// through `fallback`. Measured in the LVM test guest (docs/benchmarks.md): a report costs
/// 87 ms in-process against 540 ms as a child process, and every vmsnap operation reads 2-4.
///
/// liblvm2cmd keeps global state and is not thread-safe: one handle, one lock, one command at a
/// time; its output comes line by line through the log callback (reports at the PRINT level).
/// `lvm2_init` sets the process umask to 077, so the umask is put back after each call.
final class LVMLibraryRunner: CommandRunning, @unchecked Sendable {
    let fallback: any CommandRunning

    init(fallback: any CommandRunning) { self.fallback = fallback }

    private static let lock = NSLock()
    nonisolated(unsafe) private static var handle: UnsafeMutableRawPointer?
    nonisolated(unsafe) private static var output: [String] = []
    nonisolated(unsafe) private static var errors: [String] = []

    /// Only reports whose arguments need no quoting: `lvm2_run` splits its command line itself.
    static func runsInProcess(_ argv: [String]) -> Bool {
        guard let tool = argv.first, tool == "lvs" || tool == "vgs" else { return false }
        return argv.allSatisfy { !$0.isEmpty && !$0.contains { $0.isWhitespace || "'\"\\".contains($0) } }
    }

    func execute(_ argv: [String]) async throws -> CommandOutput {
        guard Self.runsInProcess(argv) else { return try await fallback.execute(argv) }
        return Self.lock.withLock { Self.run(argv) }
    }

    private static func run(_ argv: [String]) -> CommandOutput {
        let mask = umask(0o022)
        umask(mask)
        defer { umask(mask) }
        if handle == nil {
            lvm2_log_fn { level, _, _, _, message in
                guard let message else { return }
                let line = String(cString: message)
                if level == LVM2_LOG_PRINT, !line.hasPrefix("WARNING") {
                    LVMLibraryRunner.output.append(line)
                } else if level <= LVM2_LOG_VERBOSE {
                    LVMLibraryRunner.errors.append(line)
                }
            }
            handle = lvm2_init()
            umask(mask)
        }
        output = []
        errors = []
        let status = lvm2_run(handle, argv.joined(separator: " "))
        let out = CommandOutput(
            argv: argv, status: status == LVM2_COMMAND_SUCCEEDED ? 0 : 5,
            standardOutput: output.joined(separator: "\n") + "\n", standardError: errors.joined(separator: "\n"))
        output = []
        errors = []
        return out
    }
}
