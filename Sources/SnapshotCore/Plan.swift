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
        case .backend(let name, let args):
            return "\(name) \(args.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))"
        }
    }
}

extension StepAction {
    // The protocol's form (docs/plugin-protocol.md): `{"run": [argv]}`, `{"removeFile": path}`,
    // `{"rename": {"from", "to"}}`, `{"backend": {"name", "arguments"}}`. Journals written by
    // earlier versions (`{"run": {"_0": [argv]}}`) still decode.
    enum CodingKeys: String, CodingKey { case run, removeFile, rename, backend }
    enum PairKeys: String, CodingKey { case from, to, name, arguments, _0 }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        guard c.allKeys.count == 1, let key = c.allKeys.first else {
            throw DecodingError.dataCorrupted(
                .init(
                    codingPath: c.codingPath,
                    debugDescription: "a step action has exactly one of run, removeFile, rename, backend"))
        }
        switch key {
        case .run:
            if let argv = try? c.decode([String].self, forKey: .run) {
                self = .run(argv)
                return
            }
            self = .run(try c.nestedContainer(keyedBy: PairKeys.self, forKey: .run).decode([String].self, forKey: ._0))
        case .removeFile:
            if let path = try? c.decode(String.self, forKey: .removeFile) {
                self = .removeFile(path)
                return
            }
            self = .removeFile(
                try c.nestedContainer(keyedBy: PairKeys.self, forKey: .removeFile).decode(String.self, forKey: ._0))
        case .rename:
            let pair = try c.nestedContainer(keyedBy: PairKeys.self, forKey: .rename)
            self = .rename(
                from: try pair.decode(String.self, forKey: .from), to: try pair.decode(String.self, forKey: .to))
        case .backend:
            let pair = try c.nestedContainer(keyedBy: PairKeys.self, forKey: .backend)
            self = .backend(
                name: try pair.decode(String.self, forKey: .name),
                arguments: try pair.decodeIfPresent([String: String].self, forKey: .arguments) ?? [:])
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        switch self {
        case .run(let argv): try c.encode(argv, forKey: .run)
        case .removeFile(let path): try c.encode(path, forKey: .removeFile)
        case .rename(let from, let to):
            var pair = c.nestedContainer(keyedBy: PairKeys.self, forKey: .rename)
            try pair.encode(from, forKey: .from)
            try pair.encode(to, forKey: .to)
        case .backend(let name, let arguments):
            var pair = c.nestedContainer(keyedBy: PairKeys.self, forKey: .backend)
            try pair.encode(name, forKey: .name)
            try pair.encode(arguments, forKey: .arguments)
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

    public init(
        operation: String, steps: [PlanStep], pointOfNoReturn: Int? = nil, result: DiskLayout, notes: [String] = []
    ) {
        self.operation = operation
        self.steps = steps
        self.pointOfNoReturn = pointOfNoReturn ?? steps.count
        self.result = result
        self.notes = notes
    }

    enum CodingKeys: String, CodingKey { case operation, steps, pointOfNoReturn, result, notes }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        operation = try c.decode(String.self, forKey: .operation)
        steps = try c.decode([PlanStep].self, forKey: .steps)
        pointOfNoReturn = try c.decodeIfPresent(Int.self, forKey: .pointOfNoReturn) ?? steps.count
        result = try c.decode(DiskLayout.self, forKey: .result)
        notes = try c.decodeIfPresent([String].self, forKey: .notes) ?? []
    }
}
