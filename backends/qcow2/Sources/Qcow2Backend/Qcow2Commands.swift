/// The qemu-img and qemu-io command lines the backend runs, built by small pure functions so
/// tests can compare them. Argument arrays only; nothing goes through a shell.
public enum Qcow2Commands {
    public static let qemuImg = "qemu-img"
    public static let qemuIO = "qemu-io"

    public static func createInternal(_ name: String, image: String) -> [String] {
        [qemuImg, "snapshot", "-q", "-c", name, image]
    }

    public static func applyInternal(_ name: String, image: String) -> [String] {
        [qemuImg, "snapshot", "-q", "-a", name, image]
    }

    public static func deleteInternal(_ name: String, image: String) -> [String] {
        [qemuImg, "snapshot", "-q", "-d", name, image]
    }

    /// A new qcow2 overlay on `backing` (backing file and format recorded in the header).
    public static func createOverlay(_ overlay: String, backing: String, backingFormat: String = "qcow2") -> [String] {
        [qemuImg, "create", "-q", "-f", "qcow2", "-b", backing, "-F", backingFormat, overlay]
    }

    /// A new empty qcow2 image.
    public static func createImage(_ path: String, size: UInt64) -> [String] {
        [qemuImg, "create", "-q", "-f", "qcow2", path, String(size)]
    }

    /// Commits `overlay` into its backing file; `-d` leaves the overlay as it is (it is removed after).
    /// With `base`, qemu-img refuses unless `base` is in the overlay's chain: a header that names
    /// another file (one a crash left) is never committed into.
    public static func commit(_ overlay: String, into base: String? = nil) -> [String] {
        [qemuImg, "commit", "-q", "-f", "qcow2", "-d"] + (base.map { ["-b", $0] } ?? []) + [overlay]
    }

    /// Safe rebase: copies into `image` whatever differs between its old and new backing, so it
    /// reads the same bytes afterwards. A nil backing makes the image standalone.
    public static func rebase(_ image: String, onto backing: String?, backingFormat: String?) -> [String] {
        var argv = [qemuImg, "rebase", "-q", "-f", "qcow2", "-b", backing ?? ""]
        if backing != nil, let backingFormat { argv += ["-F", backingFormat] }
        return argv + [image]
    }

    public static func check(_ image: String) -> [String] {
        [qemuImg, "check", "-q", "-f", "qcow2", image]
    }

    /// The disk as raw bytes, at a snapshot when `snapshot` is given.
    public static func exportRaw(_ image: String, snapshot: String?, to output: String) -> [String] {
        var argv = [qemuImg, "convert", "-f", "qcow2"]
        if let snapshot { argv += ["-l", "snapshot.name=\(snapshot)"] }
        return argv + ["-O", "raw", image, output]
    }

    /// Writes the contents of `source` at `offset` through QEMU's block layer.
    public static func write(from source: String, at offset: UInt64, length: Int, image: String) -> [String] {
        [qemuIO, "-f", "qcow2", "-c", "write -s \(source) \(offset) \(length)", image]
    }

    /// Adds a persistent, recording dirty bitmap to `image` (offline).
    public static func addBitmap(_ name: String, image: String) -> [String] {
        [qemuImg, "bitmap", "-f", "qcow2", "--add", image, name]
    }

    public static func removeBitmap(_ name: String, image: String) -> [String] {
        [qemuImg, "bitmap", "-f", "qcow2", "--remove", image, name]
    }

    /// Merges bitmap `name` of `from` into the bitmap of the same name in `into` (offline).
    public static func mergeBitmap(_ name: String, from: String, into: String) -> [String] {
        [qemuImg, "bitmap", "-f", "qcow2", "--merge", name, "-b", from, "-F", "qcow2", into, name]
    }

    /// The image's metadata as JSON (its bitmaps under `format-specific`).
    public static func info(_ image: String) -> [String] {
        [qemuImg, "info", "-f", "qcow2", "--output=json", image]
    }
}
