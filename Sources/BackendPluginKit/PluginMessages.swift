import Foundation
import SnapshotCore

/// The plug-in protocol's version, with an age as pve-storage's APIVER/APIAGE: this side speaks
/// every version from `version - age` to `version` (docs/plugin-protocol.md, "Versions").
public struct PluginAPIVersion: Codable, Sendable, Hashable, CustomStringConvertible {
    public var apiVersion: Int
    public var apiAge: Int

    public init(apiVersion: Int, apiAge: Int) {
        self.apiVersion = apiVersion
        self.apiAge = apiAge
    }

    /// What this build of vmsnap speaks.
    public static let current = PluginAPIVersion(apiVersion: 2, apiAge: 1)

    public var range: ClosedRange<Int> { (apiVersion - max(apiAge, 0))...apiVersion }
    public var description: String { range.count == 1 ? "\(apiVersion)" : "\(range.lowerBound)-\(range.upperBound)" }

    /// The highest version both sides speak, or nil.
    public func agreed(with other: PluginAPIVersion) -> Int? {
        let low = max(range.lowerBound, other.range.lowerBound), high = min(range.upperBound, other.range.upperBound)
        return low <= high ? high : nil
    }
}

/// The protocol's methods, one per backend call (docs/plugin-protocol.md, "Methods").
public enum PluginMethod: String, Codable, Sendable, CaseIterable {
    case hello, describe, configure, recognizes, inspect, adopt, state
    case planCreate, planRevert, planDelete, rollbackBlockers, perform, verify, maintain
    case hypervisorDrive, createDisk, destroyDisk, read, write, poolInventory
    /// Version 2: the disk's record kept in the storage, under the storage's lock.
    case lockShared, unlockShared, readShared, writeShared
    /// Optional, announced by `reportsChanges` in the description: what differs between a
    /// snapshot and a newer view of the disk.
    case changes
}

// MARK: - Envelopes

/// One request line.
struct PluginRequest<Params: Encodable>: Encodable {
    var id: Int
    var method: PluginMethod
    var params: Params
}

/// The parts of an answer line every answer has: read first, so progress lines and errors are
/// recognized before the result is decoded into its type.
struct PluginAnswerHead: Decodable {
    var id: Int?
    var error: PluginErrorBody?
    var isProgress: Bool
    var hasResult: Bool

    enum CodingKeys: String, CodingKey { case id, error, progress, result }

    init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        id = try c.decodeIfPresent(Int.self, forKey: .id)
        error = try c.decodeIfPresent(PluginErrorBody.self, forKey: .error)
        isProgress = c.contains(.progress)
        hasResult = c.contains(.result)
    }
}

struct PluginAnswer<Result: Decodable>: Decodable {
    var result: Result
}

/// An error a plug-in answers with: one of vmsnap's error codes and a message.
public struct PluginErrorBody: Codable, Sendable, Hashable {
    public var code: String
    public var message: String

    public init(code: String, message: String) {
        self.code = code
        self.message = message
    }
}

// MARK: - Parameters and results

public struct HelloParams: Codable, Sendable {
    public var host: String
    public var apiVersion: Int
    public var apiAge: Int
}

public struct HelloResult: Codable, Sendable {
    public var kind: BackendKind
    public var apiVersion: Int
    public var apiAge: Int
    public var version: String?
}

/// How a plug-in names its disks: paths (vmsnap makes them absolute) or opaque names.
public enum LocatorForm: String, Codable, Sendable { case path, name }

public struct DescribeResult: Codable, Sendable {
    public var kind: BackendKind
    public var summary: String
    public var capabilities: CapabilityTable
    public var settings: [SettingSpec]?
    public var locators: LocatorForm?
    public var liveSnapshots: LiveSnapshotTaker?
    public var driveFormat: String?
    public var sourceType: DiskSourceType?
    /// The programs its plans run (`run` steps).
    public var tools: [String]?
    /// Version 2: the storage keeps each disk's record for every host (`lockShared` and the rest).
    public var sharedMetadata: Bool?
    /// The plug-in answers `changes` (SnapshotChanges.swift).
    public var reportsChanges: Bool?
}

struct Empty: Codable, Sendable {}
struct SettingsParams: Codable, Sendable { var settings: [String: String] }
struct LocatorParams: Codable, Sendable { var locator: String }
struct LayoutParams: Codable, Sendable { var layout: DiskLayout }
struct RecognizedResult: Codable, Sendable { var recognized: Bool }
struct StateResult: Codable, Sendable { var state: DiskState }
struct CreateParams: Codable, Sendable {
    var request: SnapshotRequest
    var layout: DiskLayout
}
struct SnapshotParams: Codable, Sendable {
    var snapshot: String
    var layout: DiskLayout
}
struct DeleteParams: Codable, Sendable {
    var snapshot: String
    var mode: DeleteMode
    var layout: DiskLayout
}
struct BlockersResult: Codable, Sendable { var blockers: [RollbackBlocker] }
struct PerformParams: Codable, Sendable {
    var name: String
    var arguments: [String: String]
}
struct ProblemsResult: Codable, Sendable { var problems: [String] }
struct ActionsResult: Codable, Sendable { var actions: [String] }
struct CreateDiskParams: Codable, Sendable {
    var name: String
    var size: UInt64
    var pool: BackendPool
}
struct LocatorResult: Codable, Sendable { var locator: String }
struct SharedLockParams: Codable, Sendable {
    var disk: String
    var holder: String
    var wait: Double
}
struct DiskParams: Codable, Sendable { var disk: String }
struct SharedDocumentResult: Codable, Sendable { var document: String? }
struct SharedWriteParams: Codable, Sendable {
    var disk: String
    var document: String
}
struct PoolParams: Codable, Sendable { var pool: BackendPool }
struct ItemsResult: Codable, Sendable { var items: [String] }
struct BytesResult: Codable, Sendable { var bytes: Data }
struct WriteParams: Codable, Sendable {
    var bytes: Data
    var offset: UInt64
    var layout: DiskLayout
}

struct DriveResult: Codable, Sendable {
    var path: String
    var format: String
    var sourceType: DiskSourceType?
}

/// `{"active": true}` or `{"snapshot": "s1"}`.
struct ViewParam: Codable, Sendable {
    var active: Bool?
    var snapshot: String?

    init(_ view: DataView) {
        switch view {
        case .active: active = true
        case .snapshot(let name): snapshot = name
        }
    }

    var view: DataView? {
        if let snapshot { return .snapshot(snapshot) }
        return active == true ? .active : nil
    }
}

struct ChangesParams: Codable, Sendable {
    var from: String
    var to: ViewParam
    var layout: DiskLayout
}

/// A plug-in's answer to `changes`; vmsnap fills in the disk and the two views it asked for.
struct ChangesResult: Codable, Sendable {
    var virtualSize: UInt64
    var method: String
    var granularity: UInt64
    var extents: [ChangedExtent]
}

struct ReadParams: Codable, Sendable {
    var view: ViewParam
    var offset: UInt64
    var length: Int
    var layout: DiskLayout
}

// MARK: - Coding

enum PluginCoding {
    static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        e.dateEncodingStrategy = .secondsSince1970
        e.dataEncodingStrategy = .base64
        return e
    }()

    static let decoder: JSONDecoder = {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .secondsSince1970
        d.dataDecodingStrategy = .base64
        return d
    }()
}
