/// One action of a plan. Every action is idempotent: the executor may run it again after a crash.
public enum StepAction: Codable, Sendable, Hashable, CustomStringConvertible {
    /// Run a command (argument array, no shell).
    case run([String])
    /// Remove a file if it exists.
    case removeFile(String)
    /// Rename a file; done already when `from` is gone and `to` exists.
    case rename(from: String, to: String)
    /// An action the backend itself performs (native engines); it must be idempotent.
    case backend(name: String, arguments: [String: String])

    public var description: String {
        switch self {
        case .run(let argv): return argv.map(CommandError.displayArgument).joined(separator: " ")
        case .removeFile(let path): return "remove \(path)"
        case .rename(let from, let to): return "rename \(from) -> \(to)"
        case .backend(let name, let args): return "\(name) \(args.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))"
        }
    }
}

/// A step of a plan and how to undo it before the point of no return.
public struct PlanStep: Codable, Sendable, Hashable {
    /// A short sentence for progress output and the journal.
    public var summary: String
    public var action: StepAction
    /// Undoes the step (and a partial run of it). Nil where nothing needs undoing.
    public var undo: StepAction?

    public init(_ summary: String, _ action: StepAction, undo: StepAction? = nil) {
        self.summary = summary
        self.action = action
        self.undo = undo
    }
}

/// What a backend intends to do, as data: the journal records it before the first step runs,
/// so recovery after a crash can finish it or roll it back.
public struct Plan: Codable, Sendable, Hashable {
    /// For the journal and messages: "create snapshot 's1'".
    public var operation: String
    public var steps: [PlanStep]
    /// Index of the first step after which the plan can only go forward. A failure or crash before
    /// it rolls back (running `undo` of the steps started, newest first); from it on, recovery
    /// finishes the remaining steps.
    public var pointOfNoReturn: Int
    /// The layout once every step has run.
    public var result: DiskLayout
    /// Things the operator should know (kept layers, deferred work).
    public var notes: [String]

    public init(operation: String, steps: [PlanStep], pointOfNoReturn: Int? = nil, result: DiskLayout, notes: [String] = []) {
        self.operation = operation
        self.steps = steps
        self.pointOfNoReturn = pointOfNoReturn ?? steps.count
        self.result = result
        self.notes = notes
    }
}
