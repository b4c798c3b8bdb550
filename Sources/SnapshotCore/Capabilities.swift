/// An operation a backend may offer on a snapshot.
public enum SnapshotOperation: String, Codable, Sendable, CaseIterable, Hashable {
    case create, list, revert
    /// Delete one snapshot, merging its changes into its children.
    case delete
    /// Delete a snapshot and its whole subtree.
    case deleteSubtree = "delete-subtree"
}

/// One cell of a capability table: operation x snapshot kind x disk state.
public struct Capability: Codable, Sendable, Hashable, CustomStringConvertible, Comparable {
    public var operation: SnapshotOperation
    public var kind: SnapshotKind
    public var state: DiskState

    public init(_ operation: SnapshotOperation, _ kind: SnapshotKind, _ state: DiskState) {
        self.operation = operation
        self.kind = kind
        self.state = state
    }

    public var description: String { "\(operation.rawValue) of \(kind.rawValue) snapshots on \(state.rawValue) disks" }

    public static func < (a: Self, b: Self) -> Bool {
        (a.state.rawValue, a.kind.rawValue, a.operation.rawValue) < (
            b.state.rawValue, b.kind.rawValue, b.operation.rawValue
        )
    }
}

/// What a backend can do, as data. Checked before any step runs.
public struct CapabilityTable: Codable, Sendable, Hashable {
    /// The cells the backend supports.
    public var supported: Set<Capability>
    /// Notes a user should read with the table (limits, conditions).
    public var notes: [String]
    /// Supported cells where the operation is started and completes later, outside vmsnap (an LVM
    /// merge into an open origin waits for its next activation): reported as pending, not done.
    public var deferred: Set<Capability>

    public init(_ supported: Set<Capability>, notes: [String] = [], deferred: Set<Capability> = []) {
        self.supported = supported.union(deferred)
        self.notes = notes
        self.deferred = deferred
    }

    enum CodingKeys: String, CodingKey { case supported, notes, deferred }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        supported = try c.decode(Set<Capability>.self, forKey: .supported)
        notes = try c.decode([String].self, forKey: .notes)
        deferred = try c.decodeIfPresent(Set<Capability>.self, forKey: .deferred) ?? []
    }

    /// Whether the operation may end pending rather than done.
    public func defers(_ capability: Capability) -> Bool { deferred.contains(capability) }

    /// Every operation for the given kinds and states.
    public static func all(kinds: [SnapshotKind], states: [DiskState], notes: [String] = []) -> CapabilityTable {
        var cells: Set<Capability> = []
        for op in SnapshotOperation.allCases {
            for kind in kinds { for state in states { cells.insert(Capability(op, kind, state)) } }
        }
        return CapabilityTable(cells, notes: notes)
    }

    public func supports(_ capability: Capability) -> Bool { supported.contains(capability) }

    public func supports(_ op: SnapshotOperation, _ kind: SnapshotKind, _ state: DiskState) -> Bool {
        supports(Capability(op, kind, state))
    }

    /// The kind a snapshot takes when the caller has no preference: internal where the backend
    /// creates internal snapshots offline, else external.
    public var defaultKind: SnapshotKind { supports(.create, .internal, .offline) ? .internal : .external }

    /// Throws `.unsupported`, naming the backend and the capability, unless it is supported.
    public func require(_ capability: Capability, backend: BackendKind) throws {
        guard supports(capability) else { throw SnapshotError.unsupported(backend, capability) }
    }

    /// The kinds that have at least one supported cell.
    public var kinds: [SnapshotKind] { SnapshotKind.allCases.filter { k in supported.contains { $0.kind == k } } }
}
