import Foundation
#if canImport(Glibc)
    import Glibc
#endif

/// Probes for open-file-description locks other processes hold on a byte range of a file
/// (F_OFD_GETLK). Hypervisors lock bytes 100-299 of every image they open, one per permission, so a
/// lock there means a hypervisor holds the image.
public enum FileLockProbe {
    /// True if another open file description holds a lock overlapping `range` of `path`.
    public static func isLocked(_ path: String, range: Range<Int64>) -> Bool {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var probe = flock()
        probe.l_type = Int16(F_WRLCK)
        probe.l_whence = Int16(SEEK_SET)
        probe.l_start = off_t(range.lowerBound)
        probe.l_len = off_t(range.count)
        let F_OFD_GETLK: Int32 = 36  // <fcntl.h>, Linux-specific, not imported by Glibc
        guard fcntl(fd, F_OFD_GETLK, &probe) == 0 else { return false }
        return probe.l_type != Int16(F_UNLCK)
    }

    /// The bytes a hypervisor locks in an image it opens: permission locks at 100+n, "shared"
    /// locks at 200+n.
    public static let imageLockBytes: Range<Int64> = 100..<300
}
