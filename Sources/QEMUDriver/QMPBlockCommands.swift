import Foundation
import SnapshotCore

/// The QMP commands of checkpoints and backups: dirty bitmaps, block nodes, block jobs and the
/// NBD server, one type each (qapi/block-core.json, qapi/block-export.json, QEMU 7.2).
extension QMP {
    /// One action of a block-job transaction: every action happens at the same instant, or none.
    public enum BlockAction: Sendable, Hashable {
        case addBitmap(node: String, name: String, persistent: Bool, disabled: Bool)
        /// Merges bitmaps (each a node and a name) into `target` on `node`.
        case mergeBitmaps(node: String, target: String, sources: [BitmapRef])
        /// Copy-before-write from `device` into `target`: sync none (a view), full, or the blocks
        /// of `bitmap` (left as it is).
        case backup(device: String, target: String, jobID: String, sync: BackupSync)
        case removeBitmap(node: String, name: String)

        var json: JSONValue {
            switch self {
            case .addBitmap(let node, let name, let persistent, let disabled):
                return [
                    "type": "block-dirty-bitmap-add",
                    "data": [
                        "node": .string(node), "name": .string(name), "persistent": .bool(persistent),
                        "disabled": .bool(disabled),
                    ],
                ]
            case .mergeBitmaps(let node, let target, let sources):
                return [
                    "type": "block-dirty-bitmap-merge",
                    "data": [
                        "node": .string(node), "target": .string(target),
                        "bitmaps": .array(sources.map { ["node": .string($0.node), "name": .string($0.name)] }),
                    ],
                ]
            case .backup(let device, let target, let jobID, let sync):
                var data: [String: JSONValue] = [
                    "device": .string(device), "target": .string(target), "job-id": .string(jobID),
                    "auto-dismiss": false,
                ]
                switch sync {
                case .none: data["sync"] = "none"
                case .full: data["sync"] = "full"
                case .bitmap(let name):
                    data["sync"] = "bitmap"
                    data["bitmap"] = .string(name)
                    data["bitmap-mode"] = "never"
                }
                return ["type": "blockdev-backup", "data": .object(data)]
            case .removeBitmap(let node, let name):
                return ["type": "block-dirty-bitmap-remove", "data": ["node": .string(node), "name": .string(name)]]
            }
        }
    }

    public struct BitmapRef: Sendable, Hashable {
        public var node: String, name: String
        public init(node: String, name: String) {
            self.node = node
            self.name = name
        }
    }

    public enum BackupSync: Sendable, Hashable {
        case none, full
        case bitmap(String)
    }

    public struct BlockTransaction: QMPCommand {
        public typealias Response = Void
        public static let name = "transaction"
        public var actions: [BlockAction]
        public var arguments: JSONValue? { ["actions": .array(actions.map(\.json))] }
    }

    public struct RemoveBitmap: QMPCommand {
        public typealias Response = Void
        public static let name = "block-dirty-bitmap-remove"
        public var node: String, name: String
        public var arguments: JSONValue? { ["node": .string(node), "name": .string(name)] }
    }

    /// A qcow2 image opened as a node: `backing` names the node it reads through (a view's
    /// scratch image reads through the disk), nil opens it without its backing chain.
    public struct AddQcow2Node: QMPCommand {
        public typealias Response = Void
        public static let name = "blockdev-add"
        public var nodeName: String, path: String, backing: String?
        public var arguments: JSONValue? {
            [
                "driver": "qcow2", "node-name": .string(nodeName),
                "file": ["driver": "file", "filename": .string(path)],
                "backing": backing.map { .string($0) } ?? .null,
            ]
        }
    }

    /// A new external snapshot's overlay opened before the pause, without its backing (the
    /// transaction's `blockdev-snapshot` gives it the disk's active layer), as the guest's
    /// `-drive` opens its disks: writeback cache, discards passed down.
    public struct AddOverlayNode: QMPCommand {
        public typealias Response = Void
        public static let name = "blockdev-add"
        public var nodeName: String, path: String
        public var arguments: JSONValue? {
            [
                "driver": "qcow2", "node-name": .string(nodeName), "discard": "unmap",
                "file": ["driver": "file", "filename": .string(path), "discard": "unmap"], "backing": .null,
            ]
        }
    }

    /// A qcow2 image opened read-only without its backing (its bitmaps, to merge from).
    public struct AddReadOnlyQcow2Node: QMPCommand {
        public typealias Response = Void
        public static let name = "blockdev-add"
        public var nodeName: String, path: String
        public var arguments: JSONValue? {
            [
                "driver": "qcow2", "node-name": .string(nodeName), "read-only": true,
                "file": ["driver": "file", "filename": .string(path)], "backing": .null,
            ]
        }
    }

    /// A file opened as a protocol node (for `blockdev-create` to format it).
    public struct AddFileNode: QMPCommand {
        public typealias Response = Void
        public static let name = "blockdev-add"
        public var nodeName: String, path: String
        public var arguments: JSONValue? {
            ["driver": "file", "node-name": .string(nodeName), "filename": .string(path)]
        }
    }

    /// Formats the protocol node `file` as a qcow2 image of `size` bytes whose header names
    /// `backing` (of `backingFormat`) without opening it: a job.
    public struct CreateQcow2: QMPCommand {
        public typealias Response = Void
        public static let name = "blockdev-create"
        public var jobID: String, file: String, size: UInt64, backing: String, backingFormat: String
        public var arguments: JSONValue? {
            [
                "job-id": .string(jobID),
                "options": [
                    "driver": "qcow2", "file": .string(file), "size": .int(Int64(size)),
                    "backing-file": .string(backing), "backing-fmt": .string(backingFormat),
                ],
            ]
        }
    }

    public struct DeleteNode: QMPCommand {
        public typealias Response = Void
        public static let name = "blockdev-del"
        public var nodeName: String
        public var arguments: JSONValue? { ["node-name": .string(nodeName)] }
    }

    /// Every node with its dirty bitmaps.
    public struct QueryNamedBlockNodes: QMPCommand {
        public static let name = "query-named-block-nodes"
        public init() {}
        public func response(_ r: JSONValue) -> [BlockNode] {
            r.array?.map { node in
                BlockNode(
                    nodeName: node["node-name"]?.string ?? "", driver: node["drv"]?.string ?? "",
                    file: node["file"]?.string ?? "", backingFile: node["backing_file"]?.string,
                    virtualSize: UInt64(node["image"]?["virtual-size"]?.int ?? 0),
                    bitmaps: node["dirty-bitmaps"]?.array?.compactMap { b -> DirtyBitmap? in
                        guard let name = b["name"]?.string else { return nil }
                        return DirtyBitmap(
                            name: name, granularity: UInt64(b["granularity"]?.int ?? 0),
                            persistent: b["persistent"]?.bool ?? false, recording: b["recording"]?.bool ?? false,
                            inconsistent: b["inconsistent"]?.bool ?? false,
                            dirtyBytes: b["count"]?.int.map(UInt64.init))
                    } ?? [])
            } ?? []
        }
    }

    public struct BlockNode: Sendable, Hashable {
        public var nodeName: String
        /// The node's driver: an image format (qcow2) or a protocol (file, host_device).
        public var driver: String
        public var file: String
        /// The backing file the image's header names, if any.
        public var backingFile: String?
        public var virtualSize: UInt64
        public var bitmaps: [DirtyBitmap]
    }

    public struct JobCancel: QMPCommand {
        public typealias Response = Void
        public static let name = "job-cancel"
        public var id: String
        public var arguments: JSONValue? { ["id": .string(id)] }
    }

    /// The NBD server, on a Unix socket or TCP.
    public struct NBDServerStart: QMPCommand {
        public typealias Response = Void
        public static let name = "nbd-server-start"
        public var listener: ExportListenerArgument
        /// The id of TLS credentials (`AddTLSCredentials`) clients must use.
        public var tlsCredentials: String?
        public var arguments: JSONValue? {
            var args: [String: JSONValue] = ["addr": listener.json]
            if let tlsCredentials { args["tls-creds"] = .string(tlsCredentials) }
            return .object(args)
        }
    }

    /// x509 credentials from a directory (ca-cert.pem, server-cert.pem, server-key.pem).
    public struct AddTLSCredentials: QMPCommand {
        public typealias Response = Void
        public static let name = "object-add"
        public var id: String, directory: String
        public var arguments: JSONValue? {
            [
                "qom-type": "tls-creds-x509", "id": .string(id), "dir": .string(directory), "endpoint": "server",
                "verify-peer": false,
            ]
        }
    }

    public struct DeleteObject: QMPCommand {
        public typealias Response = Void
        public static let name = "object-del"
        public var id: String
        public var arguments: JSONValue? { ["id": .string(id)] }
    }

    public struct ExportListenerArgument: Sendable, Hashable {
        public var json: JSONValue
        public static func unix(_ path: String) -> Self {
            Self(json: ["type": "unix", "data": ["path": .string(path)]])
        }
        public static func tcp(host: String, port: Int) -> Self {
            Self(json: ["type": "inet", "data": ["host": .string(host), "port": .string(String(port))]])
        }
    }

    public struct NBDServerStop: QMPCommand {
        public typealias Response = Void
        public static let name = "nbd-server-stop"
    }

    /// A read-only NBD export of a node, with bitmaps as `qemu:dirty-bitmap:<name>` contexts.
    public struct BlockExportAdd: QMPCommand {
        public typealias Response = Void
        public static let name = "block-export-add"
        public var id: String, nodeName: String, exportName: String, bitmaps: [String]
        public var arguments: JSONValue? {
            [
                "type": "nbd", "id": .string(id), "node-name": .string(nodeName), "name": .string(exportName),
                "writable": false, "bitmaps": .array(bitmaps.map { .string($0) }),
            ]
        }
    }

    /// Removes an export, disconnecting its clients.
    public struct BlockExportDel: QMPCommand {
        public typealias Response = Void
        public static let name = "block-export-del"
        public var id: String
        public var arguments: JSONValue? { ["id": .string(id), "mode": "hard"] }
    }

    public struct QueryBlockExports: QMPCommand {
        public static let name = "query-block-exports"
        public func response(_ r: JSONValue) -> [String] { r.array?.compactMap { $0["id"]?.string } ?? [] }
    }
}
