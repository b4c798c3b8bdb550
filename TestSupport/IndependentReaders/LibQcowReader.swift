import CLibQcow
import Foundation

/// Reads qcow2 images with libqcow (libyal), a parser written independently of QEMU: the tests
/// use it to check that what vmsnap and qemu-img wrote is what another reader sees.
public final class LibQcowReader {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    private var files: [UnsafeMutablePointer<libqcow_file_t>?] = []

    /// Opens `path` and, when given, its backing chain (nearest first) so reads go through it.
    public init(path: String, backingChain: [String] = []) throws {
        for p in ([path] + backingChain) {
            var file: UnsafeMutablePointer<libqcow_file_t>?
            var error: UnsafeMutablePointer<libqcow_error_t>?
            guard libqcow_file_initialize(&file, &error) == 1 else { throw Self.failure("initialize", error) }
            guard libqcow_file_open(file, p, Int32(LIBQCOW_ACCESS_FLAG_READ.rawValue), &error) == 1 else {
                libqcow_file_free(&file, nil)
                throw Self.failure("open \(p)", error)
            }
            files.append(file)
        }
        for i in files.indices.dropLast() {
            var error: UnsafeMutablePointer<libqcow_error_t>?
            guard libqcow_file_set_parent_file(files[i], files[i + 1], &error) == 1 else {
                throw Self.failure("set parent", error)
            }
        }
    }

    deinit {
        for i in files.indices.reversed() {
            libqcow_file_close(files[i], nil)
            libqcow_file_free(&files[i], nil)
        }
    }

    private static func failure(_ what: String, _ error: UnsafeMutablePointer<libqcow_error_t>?) -> Failure {
        var text = [CChar](repeating: 0, count: 1024)
        var err = error
        if err != nil {
            libqcow_error_sprint(err, &text, text.count)
            libqcow_error_free(&err)
        }
        let message = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return Failure(description: "libqcow: \(what): \(message)")
    }

    /// The virtual disk size.
    public var mediaSize: UInt64 {
        get throws {
            var size: UInt64 = 0
            var error: UnsafeMutablePointer<libqcow_error_t>?
            guard libqcow_file_get_media_size(files[0], &size, &error) == 1 else {
                throw Self.failure("media size", error)
            }
            return size
        }
    }

    /// How many internal snapshots the image holds.
    public var snapshotCount: Int {
        get throws {
            var count: Int32 = 0
            var error: UnsafeMutablePointer<libqcow_error_t>?
            guard libqcow_file_get_number_of_snapshots(files[0], &count, &error) == 1 else {
                throw Self.failure("snapshot count", error)
            }
            return Int(count)
        }
    }

    /// The backing file name recorded in the header, if any.
    public var backingFile: String? {
        get throws {
            var size = 0
            var error: UnsafeMutablePointer<libqcow_error_t>?
            let found = libqcow_file_get_utf8_backing_filename_size(files[0], &size, &error)
            guard found != -1 else { throw Self.failure("backing name size", error) }
            guard found == 1, size > 0 else { return nil }
            var buffer = [UInt8](repeating: 0, count: size)
            guard libqcow_file_get_utf8_backing_filename(files[0], &buffer, size, &error) == 1 else {
                throw Self.failure("backing name", error)
            }
            return String(decoding: buffer.prefix { $0 != 0 }, as: UTF8.self)
        }
    }

    /// `length` bytes of the virtual disk at `offset`, read through the backing chain.
    ///
    /// Reads go in pieces of at most 64 KiB that never cross a 64 KiB boundary: libqcow 20201213,
    /// once one cluster of a longer read falls through to the parent file, returns the parent's
    /// bytes for the rest of that read (an image with a layer's own data after a hole read as
    /// the base), which qemu-img and a cluster-by-cluster read disagree with.
    public func read(at offset: UInt64, length: Int) throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: length)
        var done = 0
        while done < length {
            let at = offset + UInt64(done)
            let piece = min(length - done, Self.piece - Int(at % UInt64(Self.piece)))
            var error: UnsafeMutablePointer<libqcow_error_t>?
            let got = buffer.withUnsafeMutableBytes {
                libqcow_file_read_buffer_at_offset(files[0], $0.baseAddress! + done, piece, off64_t(at), &error)
            }
            guard got == piece else { throw Self.failure("read \(piece) bytes at \(at) (got \(got))", error) }
            done += piece
        }
        return buffer
    }

    /// The largest piece one libqcow call reads: vmsnap makes images with QEMU's default 64 KiB
    /// clusters (an image with smaller ones would need smaller pieces).
    static let piece = 64 << 10
}
