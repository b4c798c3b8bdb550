/// A disk's data as vmsnap's disk server serves it to a hypervisor that cannot open the format
/// itself: block reads and writes through the backend's own engine, from the active layer down.
/// One thread uses it at a time (the server serializes requests).
public protocol ServedImage: AnyObject {
    /// The file that takes the writes (the server locks it while it serves it, the way
    /// hypervisors lock their images, so the backend sees the disk in use).
    var activePath: String { get }
    /// The virtual size in bytes.
    var size: UInt64 { get }
    /// `count` bytes at `offset`, read through the layers.
    func read(at offset: UInt64, count: Int) throws -> [UInt8]
    /// Writes `bytes` at `offset` into the active layer.
    func write(_ bytes: [UInt8], at offset: UInt64) throws
    /// Puts every write so far on stable storage.
    func flush() throws
}
