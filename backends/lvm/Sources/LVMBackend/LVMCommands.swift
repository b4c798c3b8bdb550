/// The LVM command lines the backend runs, as argument arrays built by pure functions.
public enum LVMCommands {
    /// Columns read with `lvs`, as JSON.
    public static let lvFields =
        "lv_name,vg_name,lv_attr,lv_size,origin,pool_lv,data_percent,lv_tags,lv_device_open,lv_merging,lv_active,metadata_percent,lv_metadata_size,vg_free,vg_extent_size"

    public static func lvs(_ target: String) -> [String] {
        ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", lvFields, target]
    }

    /// A volume's thin pool and thin device id (empty for classic volumes).
    public static func thinIdentity(_ target: String) -> [String] {
        [
            "lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "vg_name,pool_lv,thin_id,lv_size",
            target,
        ]
    }

    /// A message to a thin pool's device-mapper target (`reserve_metadata_snap`, `release_metadata_snap`).
    public static func poolMessage(_ tpool: String, _ message: String) -> [String] {
        ["dmsetup", "message", tpool, "0", message]
    }

    /// The block mappings that differ between two thin devices, read from the pool's metadata
    /// snapshot.
    public static func thinDelta(_ id1: String, _ id2: String, metadata: String) -> [String] {
        ["thin_delta", "-m", "--snap1", id1, "--snap2", id2, metadata]
    }

    public static func vgs(_ vg: String) -> [String] {
        [
            "vgs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o",
            "vg_name,vg_size,vg_free,vg_extent_size", vg,
        ]
    }

    /// A classic snapshot with a copy-on-write area of `cowSize` (`-L 64m`) or `cowExtents` (`-l 20%ORIGIN`).
    public static func createClassicSnapshot(_ name: String, of origin: String, size: String, tags: [String])
        -> [String]
    {
        let sizeArgs = size.contains("%") ? ["-l", size] : ["-L", size]
        return ["lvcreate", "-q", "-s", "-n", name] + sizeArgs + tags.flatMap { ["--addtag", $0] } + [origin]
    }

    /// A thin snapshot, activatable (`-kn`: no activation skip) so it can be read and merged.
    public static func createThinSnapshot(_ name: String, of origin: String, tags: [String]) -> [String] {
        ["lvcreate", "-q", "-s", "-kn", "-n", name] + tags.flatMap { ["--addtag", $0] } + [origin]
    }

    /// Merges and waits, polling progress every second (the default interval is 15 s).
    public static func merge(_ snapshot: String) -> [String] { ["lvconvert", "-q", "--merge", "-i", "1", snapshot] }

    public static func remove(_ lv: String) -> [String] { ["lvremove", "-q", "-y", lv] }

    public static func createVolume(_ name: String, vg: String, size: UInt64, thinPool: String?) -> [String] {
        if let thinPool { return ["lvcreate", "-q", "-n", name, "-V", "\(size)b", "--thinpool", thinPool, vg] }
        return ["lvcreate", "-q", "-n", name, "-L", "\(size)b", vg]
    }

    public static func activate(_ lv: String) -> [String] { ["lvchange", "-q", "-ay", "-K", lv] }

    public static func deactivate(_ lv: String) -> [String] { ["lvchange", "-q", "-an", lv] }

    /// Activates an origin whose merge LVM deferred: the kernel merges on activation, and the
    /// poller LVM starts (checking every second, not the default 15) removes the snapshot when done.
    public static func activateMerging(_ lv: String) -> [String] {
        ["lvchange", "-q", "-ay", "--config", "activation/polling_interval=1", lv]
    }

    /// Grows a classic snapshot's copy-on-write area, or a thin pool's data, by `bytes`.
    public static func extend(_ lv: String, bytes: UInt64) -> [String] { ["lvextend", "-q", "-L", "+\(bytes)b", lv] }

    /// Grows a thin pool's metadata by `bytes`.
    public static func extendPoolMetadata(_ pool: String, bytes: UInt64) -> [String] {
        ["lvextend", "-q", "--poolmetadatasize", "+\(bytes)b", pool]
    }
}
