import Foundation
import SnapshotCore

/// A backend that can do nothing: for tests of the registry and the executor, which never ask it
/// to plan or touch storage.
struct InertBackend: DiskSnapshotBackend {
    var kind: BackendKind
    var descriptor: BackendDescriptor {
        // The executor tests' plans run these; recovery runs only a backend's declared tools.
        BackendDescriptor(
            kind: kind, summary: "test", capabilities: CapabilityTable([]), imageFormat: "test",
            tools: ["touch", "test", "false"])
    }
    func recognizes(locator: String) async -> Bool { false }
    func inspect(locator: String) async throws -> DiskInfo { DiskInfo(format: "none", virtualSize: 0) }
    func adopt(locator: String) async throws -> DiskLayout { throw SnapshotError(.unsupported, "inert") }
    func planCreate(_ request: SnapshotRequest, layout: DiskLayout) async throws -> Plan {
        throw SnapshotError(.unsupported, "inert")
    }
    func planRevert(to snapshot: String, layout: DiskLayout) async throws -> Plan {
        throw SnapshotError(.unsupported, "inert")
    }
    func planDelete(_ snapshot: String, mode: DeleteMode, layout: DiskLayout) async throws -> Plan {
        throw SnapshotError(.unsupported, "inert")
    }
    func createDisk(named name: String, size: UInt64, in pool: BackendPool) async throws -> String { "" }
    func destroyDisk(layout: DiskLayout) async throws {}
    func write(_ bytes: [UInt8], at offset: UInt64, layout: DiskLayout) async throws {}
    func read(_ view: DataView, at offset: UInt64, length: Int, layout: DiskLayout) async throws -> [UInt8] { [] }
    func poolInventory(_ pool: BackendPool) async throws -> [String] { [] }

    /// `wait-for-file path=P`: done once P exists; until then pending, like an LVM merge that
    /// waits for the origin's next activation.
    func perform(_ name: String, arguments: [String: String]) async throws {
        guard name == "wait-for-file", let path = arguments["path"] else {
            throw SnapshotError(.unsupported, "no step \(name)")
        }
        if !FileManager.default.fileExists(atPath: path) { throw SnapshotError(.pending, "waiting for \(path)") }
    }
}
