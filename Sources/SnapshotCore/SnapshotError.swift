/// The error type of the core and of every backend: a code, a message that says what was wrong
/// and what to do, and an optional cause.
public struct SnapshotError: Error, CustomStringConvertible, Sendable {
    /// What kind of failure this is; tests and callers branch on it.
    public enum Code: String, Sendable, Codable, CaseIterable {
        case invalidName
        case invalidArgument
        case notFound
        case alreadyExists
        case unsupported
        case inUse
        case invalidImage
        case commandFailed
        case storeCorrupt
        case conflict
        case recoveryNeeded
        case io
        case busy
        case incompatibleBackend
        /// The storage has no room (volume group, thin pool, filesystem).
        case noSpace
        /// Started, and finishing later outside vmsnap's control (an LVM merge deferred until the
        /// origin's next activation). Not done: the message says what completes it.
        case pending
        /// A backend plug-in crashed, hung, answered out of protocol, or broke its own promises.
        case pluginFailed
    }

    public var code: Code
    public var message: String
    public var cause: (any Error)?

    public init(_ code: Code, _ message: String, cause: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }

    public var description: String {
        guard let cause else { return message }
        let causeText = String(describing: cause)
        return causeText.isEmpty || message.contains(causeText) ? message : "\(message): \(causeText)"
    }

    /// A backend was asked for something its capability table does not list.
    public static func unsupported(_ backend: BackendKind, _ capability: Capability) -> SnapshotError {
        SnapshotError(
            .unsupported,
            "backend '\(backend)' does not support \(capability): see `vmsnap backend list` for what it can do"
        )
    }
}
