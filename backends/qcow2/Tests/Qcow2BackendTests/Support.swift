import Foundation
import Qcow2Backend
import SnapshotCore

/// A fresh pool directory, a store beside it, and a service that knows the qcow2 backend.
struct Fixture {
    let root: String
    let pool: String
    let service: DiskSnapshotService
    let backend = Qcow2Backend()
    let runner = SubprocessRunner()

    init() throws {
        root = (NSTemporaryDirectory() as NSString).appendingPathComponent(
            "vmsnap-qcow2-\(UUID().uuidString.prefix(8))")
        pool = root + "/pool"
        try FileManager.default.createDirectory(atPath: pool, withIntermediateDirectories: true)
        let registry = BackendRegistry()
        try registry.register(Qcow2Backend.factory)
        service = DiskSnapshotService(
            store: try MetadataStore(directory: root + "/store"), registry: registry, notify: { _ in })
    }

    func newDisk(_ name: String = "vm", size: UInt64 = 16 << 20) async throws -> String {
        try await backend.createDisk(named: name, size: size, in: BackendPool(directory: pool))
    }

    func layout(_ disk: String) async throws -> DiskLayout { try await service.layout(of: disk).1 }

    /// Writes deterministic bytes for `seed` at `offset` of the active image.
    @discardableResult
    func write(_ disk: String, seed: UInt64, at offset: UInt64 = 0, length: Int = 64 << 10) async throws -> [UInt8] {
        let bytes = pattern(seed: seed, length: length)
        try await backend.write(bytes, at: offset, layout: layout(disk))
        return bytes
    }

    func inventory() throws -> [String] { try FileManager.default.contentsOfDirectory(atPath: pool).sorted() }

    /// A checksum of every file in the pool, to prove nothing changed.
    func poolDigest() throws -> [String: Int] {
        var out: [String: Int] = [:]
        for name in try inventory() {
            out[name] = try Data(contentsOf: URL(fileURLWithPath: pool + "/" + name)).hashValue
        }
        return out
    }
}

func pattern(seed: UInt64, length: Int) -> [UInt8] {
    var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    return (0..<length).map { _ in
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return UInt8(truncatingIfNeeded: state)
    }
}

func qemuImgInfo(_ path: String) async throws -> [String: Any] {
    let out = try await SubprocessRunner().run(["qemu-img", "info", "--output=json", "-U", path])
    return try JSONSerialization.jsonObject(with: Data(out.standardOutput.utf8)) as! [String: Any]
}

/// A QEMU process that holds `image` open (and locked) until stopped. Daemonized, so it is not
/// a child the test runner has to reap.
final class QemuHolder {
    let pidFile: String
    let image: String

    init(image: String) async throws {
        self.image = image
        pidFile = image + ".holder.pid"
        try await SubprocessRunner().run([
            "qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S", "-daemonize", "-pidfile",
            pidFile,
            "-blockdev", "driver=qcow2,node-name=d0,file.driver=file,file.filename=\(image)",
        ])
    }

    func stop() {
        if let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
            let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines))
        {
            kill(pid, SIGTERM)
            for _ in 0..<100 where kill(pid, 0) == 0 { usleep(20_000) }
        }
        unlink(pidFile)
    }
}

let hasQemuSystem = FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-system-x86_64")
