import Foundation
#if canImport(Glibc)
    import Glibc
#endif

/// Files vmsnap adds beside a disk (overlays, differencing disks, copies): created with O_EXCL and
/// without following a symbolic link at the name, with the mode, owner and group of the image
/// they belong to, so a 0600 disk never gets a world-readable overlay.
public enum NewFile {
    /// The mode (permission bits), owner and group of `path`.
    public static func ownership(of path: String) throws -> (mode: mode_t, uid: uid_t, gid: gid_t) {
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw SnapshotError(.io, "cannot read the mode of \(path): \(String(cString: strerror(errno)))")
        }
        return (st.st_mode & 0o777, st.st_uid, st.st_gid)
    }

    /// Gives the open file `fd` the mode, owner and group of `like`. A non-root vmsnap cannot give
    /// a file away: there the owner stays the caller, and only the mode is copied.
    public static func match(_ fd: Int32, like: String, path: String) throws {
        let (mode, uid, gid) = try ownership(of: like)
        if geteuid() == 0 || uid == geteuid() {
            guard fchown(fd, uid, gid) == 0 || errno == EPERM else {
                throw SnapshotError(
                    .io, "cannot give \(path) the owner of \(like): \(String(cString: strerror(errno)))")
            }
        }
        guard fchmod(fd, mode) == 0 else {
            throw SnapshotError(.io, "cannot give \(path) the mode of \(like): \(String(cString: strerror(errno)))")
        }
    }

    /// Creates the empty file `path` exclusively (never through a symbolic link) with the
    /// ownership of `like`. `resume`: an empty regular file already at `path` is one this step made
    /// before a crash, and is taken as done.
    public static func create(_ path: String, like: String, resume: Bool = true) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        if fd < 0 {
            let why = errno
            var st = stat()
            if why == EEXIST, resume, lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG, st.st_size == 0,
                st.st_uid == geteuid() || geteuid() == 0
            {
                return
            }
            throw SnapshotError(
                why == EEXIST ? .alreadyExists : .io,
                why == EEXIST
                    ? "\(path) exists already (\(lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFLNK ? "a symbolic link" : "a file")); vmsnap creates new files only where nothing is. Remove it or pick another name"
                    : "cannot create \(path): \(String(cString: strerror(why)))")
        }
        defer { close(fd) }
        do { try match(fd, like: like, path: path) } catch {
            unlink(path)
            throw error
        }
    }

    /// True if anything is at `path`, a dangling symbolic link included.
    public static func exists(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0
    }
}

/// What makes two paths the same disk: device and inode for files, the device number for block
/// devices (LVM's `vg/lv` is looked up as /dev/vg/lv).
public struct FileIdentity: Hashable, Sendable {
    var device: UInt64
    var inode: UInt64
    var block: Bool

    public init?(_ path: String) {
        var st = stat()
        let candidates = path.hasPrefix("/") ? [path] : [path, "/dev/" + path]
        guard let found = candidates.first(where: { stat($0, &st) == 0 }), !found.isEmpty else { return nil }
        switch st.st_mode & S_IFMT {
        case S_IFREG: self.init(device: UInt64(st.st_dev), inode: UInt64(st.st_ino), block: false)
        case S_IFBLK: self.init(device: UInt64(st.st_rdev), inode: 0, block: true)
        default: return nil
        }
    }

    init(device: UInt64, inode: UInt64, block: Bool) {
        self.device = device
        self.inode = inode
        self.block = block
    }
}
