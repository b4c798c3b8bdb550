import CLibVhdi
import Foundation

/// Reads VHD files with libvhdi (libyal), a parser written independently of vmsnap's engine and
/// of QEMU: the tests check every layer the engine writes against it.
public final class LibVhdiReader {
    public struct Failure: Error, CustomStringConvertible { public var description: String }

    private var files: [UnsafeMutablePointer<libvhdi_file_t>?] = []

    /// Opens `path` and, when given, its parent chain (nearest first) so reads go through it.
    public init(path: String, parentChain: [String] = []) throws {
        for p in [path] + parentChain {
            var file: UnsafeMutablePointer<libvhdi_file_t>?
            var error: UnsafeMutablePointer<libvhdi_error_t>?
            guard libvhdi_file_initialize(&file, &error) == 1 else { throw Self.failure("initialize", error) }
            guard libvhdi_file_open(file, p, Int32(LIBVHDI_ACCESS_FLAG_READ.rawValue), &error) == 1 else {
                libvhdi_file_free(&file, nil)
                throw Self.failure("open \(p)", error)
            }
            files.append(file)
        }
        for i in files.indices.dropLast() {
            var error: UnsafeMutablePointer<libvhdi_error_t>?
            guard libvhdi_file_set_parent_file(files[i], files[i + 1], &error) == 1 else {
                throw Self.failure("set parent of \(([path] + parentChain)[i])", error)
            }
        }
    }

    deinit {
        for i in files.indices.reversed() {
            libvhdi_file_close(files[i], nil)
            libvhdi_file_free(&files[i], nil)
        }
    }

    private static func failure(_ what: String, _ error: UnsafeMutablePointer<libvhdi_error_t>?) -> Failure {
        var text = [CChar](repeating: 0, count: 2048)
        var err = error
        if err != nil {
            libvhdi_error_sprint(err, &text, text.count)
            libvhdi_error_free(&err)
        }
        return Failure(
            description:
                "libvhdi: \(what): \(String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))"
        )
    }

    public var mediaSize: UInt64 {
        get throws {
            var size: UInt64 = 0
            var error: UnsafeMutablePointer<libvhdi_error_t>?
            guard libvhdi_file_get_media_size(files[0], &size, &error) == 1 else {
                throw Self.failure("media size", error)
            }
            return size
        }
    }

    /// 2 fixed, 3 dynamic, 4 differencing.
    public var diskType: UInt32 {
        get throws {
            var type: UInt32 = 0
            var error: UnsafeMutablePointer<libvhdi_error_t>?
            guard libvhdi_file_get_disk_type(files[0], &type, &error) == 1 else {
                throw Self.failure("disk type", error)
            }
            return type
        }
    }

    public var identifier: [UInt8] {
        get throws {
            var id = [UInt8](repeating: 0, count: 16)
            var error: UnsafeMutablePointer<libvhdi_error_t>?
            guard libvhdi_file_get_identifier(files[0], &id, 16, &error) == 1 else {
                throw Self.failure("identifier", error)
            }
            return id
        }
    }

    public var parentIdentifier: [UInt8]? {
        get throws {
            var id = [UInt8](repeating: 0, count: 16)
            var error: UnsafeMutablePointer<libvhdi_error_t>?
            let r = libvhdi_file_get_parent_identifier(files[0], &id, 16, &error)
            guard r != -1 else { throw Self.failure("parent identifier", error) }
            return r == 1 ? id : nil
        }
    }

    public var parentFilename: String? {
        get throws {
            var size = 0
            var error: UnsafeMutablePointer<libvhdi_error_t>?
            let r = libvhdi_file_get_utf8_parent_filename_size(files[0], &size, &error)
            guard r != -1 else { throw Self.failure("parent name size", error) }
            guard r == 1, size > 0 else { return nil }
            var buffer = [UInt8](repeating: 0, count: size)
            guard libvhdi_file_get_utf8_parent_filename(files[0], &buffer, size, &error) == 1 else {
                throw Self.failure("parent name", error)
            }
            return String(decoding: buffer.prefix { $0 != 0 }, as: UTF8.self)
        }
    }

    public func read(at offset: UInt64, length: Int) throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: length)
        var error: UnsafeMutablePointer<libvhdi_error_t>?
        let got = buffer.withUnsafeMutableBytes {
            libvhdi_file_read_buffer_at_offset(files[0], $0.baseAddress, length, off64_t(offset), &error)
        }
        guard got == length else { throw Self.failure("read \(length) bytes at \(offset) (got \(got))", error) }
        return buffer
    }
}
