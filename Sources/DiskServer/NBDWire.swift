import Foundation
#if canImport(Glibc)
    import Glibc
#endif

/// The NBD protocol's numbers (the newstyle fixed handshake and simple replies; see the NBD
/// protocol document, doc/proto.md in the NetworkBlockDevice project).
enum NBD {
    static let magic: UInt64 = 0x4e42_444d_4147_4943  // "NBDMAGIC"
    static let optionMagic: UInt64 = 0x4948_4156_454f_5054  // "IHAVEOPT"
    static let optionReplyMagic: UInt64 = 0x0003_e889_0455_65a9
    static let requestMagic: UInt32 = 0x2560_9513
    static let simpleReplyMagic: UInt32 = 0x6744_6698

    static let flagFixedNewstyle: UInt16 = 1
    static let flagNoZeroes: UInt16 = 2

    enum Option: UInt32 {
        case exportName = 1, abort = 2, list = 3, info = 6, go = 7
    }

    enum Reply: UInt32 {
        case ack = 1, server = 2, info = 3
        case errUnsupported = 0x8000_0001, errInvalid = 0x8000_0003, errUnknown = 0x8000_0006
    }

    static let infoExport: UInt16 = 0
    static let infoBlockSize: UInt16 = 3

    enum Command: UInt16 {
        case read = 0, write = 1, disconnect = 2, flush = 3, trim = 4, cache = 5, writeZeroes = 6
    }

    static let commandFlagFUA: UInt16 = 1

    /// Transmission flags: has flags, flush, FUA, write zeroes.
    static let transmissionFlags: UInt16 = 1 | 4 | 8 | 64

    static let minimumBlock: UInt32 = 512
    static let preferredBlock: UInt32 = 4096
    /// The largest request served (the protocol's customary 32 MiB).
    static let maximumRequest: UInt32 = 32 << 20

    // errno values the protocol carries
    static let eio: UInt32 = 5
    static let einval: UInt32 = 22
    static let enospc: UInt32 = 28
}

/// Big-endian encoding into a byte buffer.
struct WireWriter {
    var bytes: [UInt8] = []
    mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.bigEndian) { bytes += $0 } }
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.bigEndian) { bytes += $0 } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.bigEndian) { bytes += $0 } }
}

/// Big-endian decoding from a byte buffer; reads past the end return nil.
struct WireReader {
    let bytes: [UInt8]
    var at = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    mutating func u16() -> UInt16? { take(2).map { UInt16($0[0]) << 8 | UInt16($0[1]) } }
    mutating func u32() -> UInt32? { take(4).map { $0.reduce(0) { $0 << 8 | UInt32($1) } } }
    mutating func u64() -> UInt64? { take(8).map { $0.reduce(0) { $0 << 8 | UInt64($1) } } }
    mutating func take(_ n: Int) -> [UInt8]? {
        guard n >= 0, at + n <= bytes.count else { return nil }
        defer { at += n }
        return Array(bytes[at..<at + n])
    }
}

/// A connected socket's blocking reads and writes, whole buffers at a time.
struct SocketIO {
    let fd: Int32

    struct Closed: Error {}

    /// Exactly `count` bytes, or `Closed` when the peer hangs up first.
    func read(_ count: Int) throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + got, count - got) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw Closed() }
            got += n
        }
        return buffer
    }

    func write(_ bytes: [UInt8]) throws {
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes {
                Glibc.send(fd, $0.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL))
            }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw Closed() }
            sent += n
        }
    }
}
