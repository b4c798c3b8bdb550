import Foundation
import Subprocess
import SystemPackage

/// What a finished command left behind.
public struct CommandOutput: Sendable, Hashable {
    public var argv: [String]
    public var status: Int32
    public var standardOutput: String
    public var standardError: String

    public init(argv: [String], status: Int32, standardOutput: String, standardError: String) {
        self.argv = argv
        self.status = status
        self.standardOutput = standardOutput
        self.standardError = standardError
    }
}

/// A command that did not succeed: the argv, the exit status (or signal) and trimmed stderr,
/// so every failure says which command failed and why.
public struct CommandError: Error, CustomStringConvertible, Sendable {
    public var argv: [String]
    /// Exit status, or 128 + signal number when the command was killed.
    public var status: Int32
    public var standardError: String

    public init(argv: [String], status: Int32, standardError: String) {
        self.argv = argv
        self.status = status
        self.standardError = standardError
    }

    public var description: String {
        let cmd = argv.map(CommandError.displayArgument).joined(separator: " ")
        let why = standardError.isEmpty ? "no error output" : standardError
        return "`\(cmd)` failed with status \(status): \(why)"
    }

    static func displayArgument(_ arg: String) -> String {
        let plain = arg.allSatisfy { $0.isLetter || $0.isNumber || "-_./=:,+@%".contains($0) }
        return plain && !arg.isEmpty ? arg : "'" + arg.replacingOccurrences(of: "'", with: "'\\''") + "'"
    }
}

/// Runs external commands from argument arrays (never through a shell).
public protocol CommandRunning: Sendable {
    /// Runs `argv`; a non-zero exit is returned, not thrown.
    func execute(_ argv: [String]) async throws -> CommandOutput
}

extension CommandRunning {
    /// Runs `argv` and throws `CommandError` unless it exits 0.
    @discardableResult
    public func run(_ argv: [String]) async throws -> CommandOutput {
        let out = try await execute(argv)
        guard out.status == 0 else {
            throw CommandError(argv: argv, status: out.status, standardError: Self.trimmed(out.standardError))
        }
        return out
    }

    /// Stderr cut to its last lines: what a person needs to see why a command failed.
    static func trimmed(_ text: String, maxLines: Int = 12) -> String {
        let lines = text.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }.filter {
            !$0.isEmpty
        }
        return lines.suffix(maxLines).joined(separator: "; ")
    }
}

/// The real runner, over swift-subprocess.
public struct SubprocessRunner: CommandRunning {
    /// Collected output limit per stream; commands here print little.
    public var outputLimit: Int

    public init(outputLimit: Int = 64 << 20) { self.outputLimit = outputLimit }

    public func execute(_ argv: [String]) async throws -> CommandOutput {
        guard let tool = argv.first, !tool.isEmpty else {
            throw SnapshotError(.invalidArgument, "empty command line")
        }
        let executable: Executable = tool.contains("/") ? .path(FilePath(tool)) : .name(tool)
        Trace.mark("(before \(tool))")
        defer { Trace.mark("ran \(argv.prefix(3).joined(separator: " "))") }
        do {
            let result = try await Subprocess.run(
                executable,
                arguments: Arguments(Array(argv.dropFirst())),
                output: .string(limit: outputLimit),
                error: .string(limit: outputLimit)
            )
            let status: Int32
            switch result.terminationStatus {
            case .exited(let code): status = code
            case .signaled(let signal): status = 128 + signal
            }
            return CommandOutput(
                argv: argv, status: status, standardOutput: result.standardOutput, standardError: result.standardError)
        } catch let error as SnapshotError {
            throw error
        } catch {
            throw SnapshotError(
                .commandFailed,
                "could not start `\(tool)`: is it installed? (scripts/setup installs what vmsnap needs)", cause: error)
        }
    }
}

/// A runner that records argv and answers from a script: for unit tests of how arguments are built.
/// It never stands in for the real tool in a behaviour test.
public final class RecordingRunner: CommandRunning, @unchecked Sendable {
    private let lock = NSLock()
    private var recorded: [[String]] = []
    private let answer: @Sendable ([String]) -> CommandOutput

    public init(
        answer: @escaping @Sendable ([String]) -> CommandOutput = {
            CommandOutput(argv: $0, status: 0, standardOutput: "", standardError: "")
        }
    ) {
        self.answer = answer
    }

    /// Every argv run so far, in order.
    public var commands: [[String]] { lock.withLock { recorded } }

    public func execute(_ argv: [String]) async throws -> CommandOutput {
        lock.withLock { recorded.append(argv) }
        return answer(argv)
    }
}
