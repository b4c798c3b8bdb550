import SnapshotCore

/// A VHD chain served by vmsnap's disk server: reads through the differencing layers, writes
/// into the active one (QEMU's vpc driver cannot write a differencing VHD; this engine can).
final class VHDServedImage: ServedImage {
    let image: VHDImage

    init(path: String) throws {
        image = try VHDImage(path: path, writable: true)
    }

    var activePath: String { image.path }
    var size: UInt64 { image.virtualSize }

    func read(at offset: UInt64, count: Int) throws -> [UInt8] { try image.read(at: offset, count: count) }

    func write(_ bytes: [UInt8], at offset: UInt64) throws { try image.write(bytes, at: offset) }

    func flush() throws { try image.sync() }
}
