import Foundation
#if canImport(Glibc)
    import Glibc
#endif

/// Files vmsnap reads that an operator names (definitions, XML, settings): checked to be regular
/// files before anything blocks on them. A FIFO, socket or device where a file is expected is
/// refused at once instead of hanging the command.
public enum RegularFile {
    /// Reads at most `limit` bytes of the regular file at `path`.
    public static func read(_ path: String, what: String, limit: Int) throws -> Data {
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw SnapshotError(
                errno == ENOENT ? .notFound : .io, "cannot read \(what) \(path): \(String(cString: strerror(errno)))")
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            throw SnapshotError(
                .invalidArgument,
                "\(what) \(path) is \(typeName(st.st_mode)), not a regular file; give the path of a file")
        }
        // O_NONBLOCK: if the path was swapped for a FIFO after the check, open does not wait.
        let fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else {
            throw SnapshotError(.io, "cannot open \(what) \(path): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else {
            throw SnapshotError(
                .invalidArgument,
                "\(what) \(path) changed into something that is not a regular file while it was opened")
        }
        guard st.st_size <= limit else {
            throw SnapshotError(.invalidArgument, "\(what) \(path) is \(st.st_size) bytes; the limit is \(limit)")
        }
        var data = Data(count: Int(st.st_size))
        var done = 0
        while done < data.count {
            let n = data.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + done, $0.count - done) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { break }
            done += n
        }
        return data.prefix(done)
    }

    /// What a file type is called in a message.
    public static func typeName(_ mode: mode_t) -> String {
        switch mode & S_IFMT {
        case S_IFIFO: return "a FIFO (named pipe)"
        case S_IFSOCK: return "a socket"
        case S_IFCHR: return "a character device"
        case S_IFBLK: return "a block device"
        case S_IFDIR: return "a directory"
        case S_IFLNK: return "a symbolic link"
        default: return "not a regular file"
        }
    }
}
