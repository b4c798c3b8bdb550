import Foundation
import SnapshotCore

/// One QMP command as a type: its name, its arguments and how its `return` value reads.
public protocol QMPCommand: Sendable {
    associatedtype Response: Sendable
    static var name: String { get }
    var arguments: JSONValue? { get }
    func response(_ value: JSONValue) throws -> Response
}

extension QMPCommand where Response == Void {
    public func response(_ value: JSONValue) throws {}
}

extension QMPCommand {
    public var arguments: JSONValue? { nil }
}

/// QEMU's error classes (qapi/error.json); a refusal is matched by its class, never by its text.
public enum QMPErrorClass: String, Sendable {
    case genericError = "GenericError"
    case commandNotFound = "CommandNotFound"
    case deviceNotActive = "DeviceNotActive"
    case deviceNotFound = "DeviceNotFound"
    case kvmMissingCap = "KVMMissingCap"
    case unknown
}

extension QMPClient {
    /// Runs a typed command.
    @discardableResult
    public func run<C: QMPCommand>(_ command: C, passing fd: Int32? = nil, timeout: Duration = .seconds(60))
        async throws -> C.Response
    {
        try command.response(try await execute(C.name, command.arguments, passing: fd, timeout: timeout))
    }
}

/// How QMP names a disk: by its block device (a `-drive` id, a BlockBackend name), or by the
/// node of its active layer (devices whose BlockBackend has no name, like Xen's xen-block).
public enum QEMUDiskAddress: Sendable, Hashable {
    case device(String)
    case node(String)

    /// The name commands that take "the device or node name" want.
    public var name: String {
        switch self {
        case .device(let d): d
        case .node(let n): n
        }
    }

    /// The block device QEMU lists for this disk, if any.
    public func find(in devices: [QEMUBlockDevice]) -> QEMUBlockDevice? {
        switch self {
        case .device(let d): devices.first { $0.device == d }
        case .node(let n): devices.first { $0.nodeName == n }
        }
    }
}

/// Finds a guest disk's address in a running QEMU.
public protocol QEMUDiskAddressing: Sendable {
    func address(_ target: String, client: QMPClient) async throws -> QEMUDiskAddress
}

/// vmsnap's own QEMU domains: every disk is a `-drive` whose id is `drive-<target>`.
public struct QEMUDriveIDs: QEMUDiskAddressing {
    public init() {}
    public func address(_ target: String, client: QMPClient) async throws -> QEMUDiskAddress {
        .device(QEMUDriver.driveID(target))
    }
}

/// The commands vmsnap sends, one type each.
public enum QMP {
    public struct Capabilities: QMPCommand {
        public typealias Response = Void
        public static let name = "qmp_capabilities"
    }
    public struct Stop: QMPCommand {
        public typealias Response = Void
        public static let name = "stop"
    }
    public struct Cont: QMPCommand {
        public typealias Response = Void
        public static let name = "cont"
    }
    public struct Quit: QMPCommand {
        public typealias Response = Void
        public static let name = "quit"
    }
    public struct SystemPowerdown: QMPCommand {
        public typealias Response = Void
        public static let name = "system_powerdown"
    }

    public struct QueryStatus: QMPCommand {
        public static let name = "query-status"
        public func response(_ r: JSONValue) -> QEMUStatus {
            QEMUStatus(running: r["running"]?.bool ?? false, status: r["status"]?.string ?? "unknown")
        }
    }

    /// Whether the vCPUs run under KVM (`enabled`); false under TCG.
    public struct QueryKVM: QMPCommand {
        public static let name = "query-kvm"
        public func response(_ r: JSONValue) -> Bool { r["enabled"]?.bool ?? false }
    }

    public struct QueryBlock: QMPCommand {
        public static let name = "query-block"
        public func response(_ r: JSONValue) -> [QEMUBlockDevice] {
            r.array?.map {
                QEMUBlockDevice(
                    device: $0["device"]?.string ?? "", nodeName: $0["inserted"]?["node-name"]?.string,
                    file: $0["inserted"]?["file"]?.string, qdev: $0["qdev"]?.string,
                    format: $0["inserted"]?["drv"]?.string,
                    virtualSize: $0["inserted"]?["image"]?["virtual-size"]?.int.map { UInt64($0) },
                    backing: $0["inserted"]?["image"]?["backing-image"]?["filename"]?.string,
                    internalSnapshots: $0["inserted"]?["image"]?["snapshots"]?.array?.compactMap { $0["name"]?.string }
                        ?? [],
                    chain: Self.chain($0["inserted"]?["image"]))
            } ?? []
        }

        static func chain(_ image: JSONValue?) -> [String] {
            var files: [String] = []
            var image = image
            while let i = image, let file = i["filename"]?.string {
                files.append(file)
                image = i["backing-image"]
            }
            return files
        }
    }

    /// One action of a `transaction`.
    public enum TransactionAction: Sendable, Hashable {
        /// `existing`: the overlay file was made (and formatted) beforehand, QEMU only opens it.
        case externalSnapshot(disk: QEMUDiskAddress, overlay: String, format: String, existing: Bool = false)
        /// The overlay is open already as node `overlay` (without its backing): QEMU only puts
        /// it on top of the disk's active layer.
        case attachOverlay(disk: QEMUDiskAddress, overlay: String)
        /// QEMU looks the name up as a device, then as a node.
        case internalSnapshot(device: String, name: String)

        var json: JSONValue {
            switch self {
            case .externalSnapshot(let disk, let overlay, let format, let existing):
                var data: [String: JSONValue] = [
                    "snapshot-file": .string(overlay), "format": .string(format),
                    "mode": existing ? "existing" : "absolute-paths",
                ]
                switch disk {
                case .device(let d): data["device"] = .string(d)
                case .node(let n):
                    // Addressed by node, QEMU wants the new overlay's node named too.
                    data["node-name"] = .string(n)
                    data["snapshot-node-name"] = .string("vmsnap-" + UUID().uuidString.prefix(8).lowercased())
                }
                return ["type": "blockdev-snapshot-sync", "data": .object(data)]
            case .attachOverlay(let disk, let overlay):
                return [
                    "type": "blockdev-snapshot", "data": ["node": .string(disk.name), "overlay": .string(overlay)],
                ]
            case .internalSnapshot(let device, let name):
                return [
                    "type": "blockdev-snapshot-internal-sync",
                    "data": ["device": .string(device), "name": .string(name)],
                ]
            }
        }
    }

    /// Actions that happen all together or not at all.
    public struct Transaction: QMPCommand {
        public typealias Response = Void
        public static let name = "transaction"
        public var actions: [TransactionAction]
        public var arguments: JSONValue? { ["actions": .array(actions.map(\.json))] }
    }

    /// Hands QEMU the file descriptor sent along with the command (SCM_RIGHTS) under `name`.
    public struct GetFD: QMPCommand {
        public typealias Response = Void
        public static let name = "getfd"
        public var name: String
        public var arguments: JSONValue? { ["fdname": .string(name)] }
    }

    public struct QueryMigrate: QMPCommand {
        public static let name = "query-migrate"
        public func response(_ r: JSONValue) -> MigrationInfo {
            let ram = r["ram"]
            return MigrationInfo(
                status: r["status"]?.string ?? "none",
                transferred: UInt64(ram?["transferred"]?.int ?? 0), total: UInt64(ram?["total"]?.int ?? 0),
                remaining: UInt64(ram?["remaining"]?.int ?? 0), downtimeMs: r["downtime"]?.double,
                errorDescription: r["error-desc"]?.string)
        }
    }

    public struct MigrateSetCapabilities: QMPCommand {
        public typealias Response = Void
        public static let name = "migrate-set-capabilities"
        public var capabilities: [String: Bool]
        public var arguments: JSONValue? {
            [
                "capabilities": .array(
                    capabilities.sorted { $0.key < $1.key }.map {
                        ["capability": .string($0.key), "state": .bool($0.value)]
                    })
            ]
        }
    }

    /// The migration capabilities switched on.
    public struct QueryMigrateCapabilities: QMPCommand {
        public static let name = "query-migrate-capabilities"
        public func response(_ r: JSONValue) -> Set<String> {
            Set(
                (r.array ?? []).compactMap {
                    $0["state"]?.bool == true ? $0["capability"]?.string : nil
                })
        }
    }

    /// Migration bandwidth (bytes per second).
    public struct MigrateSetParameters: QMPCommand {
        public typealias Response = Void
        public static let name = "migrate-set-parameters"
        public var maxBandwidth: Int?
        /// The longest final stop a pre-copy migration may plan for, in milliseconds.
        public var downtimeLimitMs: Int?
        public init(maxBandwidth: Int? = nil, downtimeLimitMs: Int? = nil) {
            self.maxBandwidth = maxBandwidth
            self.downtimeLimitMs = downtimeLimitMs
        }
        public var arguments: JSONValue? {
            var a: [String: JSONValue] = [:]
            if let maxBandwidth { a["max-bandwidth"] = .int(Int64(maxBandwidth)) }
            if let downtimeLimitMs { a["downtime-limit"] = .int(Int64(downtimeLimitMs)) }
            return .object(a)
        }
    }

    /// Lets a migration paused before its switchover (`pause-before-switchover`) go on.
    public struct MigrateContinue: QMPCommand {
        public typealias Response = Void
        public static let name = "migrate-continue"
        public init() {}
        public var arguments: JSONValue? { ["state": "pre-switchover"] }
    }

    public struct MigrateCancel: QMPCommand {
        public typealias Response = Void
        public static let name = "migrate_cancel"
    }

    public struct Migrate: QMPCommand {
        public typealias Response = Void
        public static let name = "migrate"
        public var uri: String
        public var arguments: JSONValue? { ["uri": .string(uri)] }
    }

    public struct MigrateIncoming: QMPCommand {
        public typealias Response = Void
        public static let name = "migrate-incoming"
        public var uri: String
        public var arguments: JSONValue? { ["uri": .string(uri)] }
    }

    /// Memory and disks into the qcow2 images, as a job.
    public struct SnapshotSave: QMPCommand {
        public typealias Response = Void
        public static let name = "snapshot-save"
        public var jobID: String, tag: String, vmstate: String, devices: [String]
        public var arguments: JSONValue? {
            [
                "job-id": .string(jobID), "tag": .string(tag), "vmstate": .string(vmstate),
                "devices": .array(devices.map { .string($0) }),
            ]
        }
    }

    /// One job of `query-jobs`.
    public struct Job: Sendable, Hashable {
        public var id: String
        public var status: String
        public var done: UInt64?
        public var total: UInt64?
        public var error: String?
    }

    public struct QueryJobs: QMPCommand {
        public static let name = "query-jobs"
        public func response(_ r: JSONValue) -> [Job] {
            r.array?.map {
                Job(
                    id: $0["id"]?.string ?? "", status: $0["status"]?.string ?? "",
                    done: $0["current-progress"]?.int.map(UInt64.init),
                    total: $0["total-progress"]?.int.map(UInt64.init), error: $0["error"]?.string)
            } ?? []
        }
    }

    public struct JobResume: QMPCommand {
        public typealias Response = Void
        public static let name = "job-resume"
        public var id: String
        public var arguments: JSONValue? { ["id": .string(id)] }
    }

    public struct JobDismiss: QMPCommand {
        public typealias Response = Void
        public static let name = "job-dismiss"
        public var id: String
        public var arguments: JSONValue? { ["id": .string(id)] }
    }

    /// Copies the data of the layers below the device's active layer (down to `base`) into it.
    public struct BlockStream: QMPCommand {
        public typealias Response = Void
        public static let name = "block-stream"
        public var device: String, jobID: String, base: String?
        public var arguments: JSONValue? {
            var args: [String: JSONValue] = ["device": .string(device), "job-id": .string(jobID)]
            if let base { args["base"] = .string(base) }
            return .object(args)
        }
    }

    /// Commits the active layer into its backing image (then `BlockJobComplete` pivots).
    public struct BlockCommit: QMPCommand {
        public typealias Response = Void
        public static let name = "block-commit"
        public var device: String, jobID: String
        /// The node the active layer is committed into. Never left out: QEMU would then commit
        /// the whole chain into its deepest image, changing every snapshot frozen in between.
        public var baseNode: String
        public var arguments: JSONValue? {
            ["device": .string(device), "job-id": .string(jobID), "base-node": .string(baseNode)]
        }
    }

    public struct BlockJobComplete: QMPCommand {
        public typealias Response = Void
        public static let name = "block-job-complete"
        public var device: String
        public var arguments: JSONValue? { ["device": .string(device)] }
    }

    /// One block job of `query-block-jobs`: its bytes done and total.
    public struct BlockJob: Sendable, Hashable {
        public var device: String
        public var offset: UInt64
        public var length: UInt64
    }

    public struct QueryBlockJobs: QMPCommand {
        public static let name = "query-block-jobs"
        public func response(_ r: JSONValue) -> [BlockJob] {
            r.array?.map {
                BlockJob(
                    device: $0["device"]?.string ?? "", offset: UInt64($0["offset"]?.int ?? 0),
                    length: UInt64($0["len"]?.int ?? 0))
            } ?? []
        }
    }

    public struct DeleteInternalSnapshot: QMPCommand {
        public typealias Response = Void
        public static let name = "blockdev-snapshot-delete-internal-sync"
        public var device: String, name: String
        public var arguments: JSONValue? { ["device": .string(device), "name": .string(name)] }
    }

    /// A property of a QOM object (`qom-get`), as text.
    public struct QOMGetString: QMPCommand {
        public static let name = "qom-get"
        public var path: String, property: String
        public init(path: String, property: String) {
            self.path = path
            self.property = property
        }
        public var arguments: JSONValue? { ["path": .string(path), "property": .string(property)] }
        public func response(_ r: JSONValue) -> String? { r.string }
    }
    public struct HumanMonitorCommand: QMPCommand {
        public static let name = "human-monitor-command"
        public var commandLine: String
        public init(commandLine: String) { self.commandLine = commandLine }
        public var arguments: JSONValue? { ["command-line": .string(commandLine)] }
        public func response(_ r: JSONValue) -> String { r.string ?? "" }
    }
}
