import Foundation
import HypervisorDriver
import SnapshotCore

#if canImport(Glibc)
    import Glibc
#endif

/// A domain created with `xl create`, read back from the configuration libxl keeps for it
/// (`libxl_retrieve_domain_configuration`, in libxl's JSON form) as vmsnap models it.
enum XenAdoption {
    /// The definition in libxl's JSON configuration; `isBlockDevice` tells block devices from
    /// image files. Refuses what vmsnap cannot run; keeps the rest of libxl's configuration
    /// (network interfaces, consoles, drives no backend manages, tuning) for every later create,
    /// and names it.
    static func adopted(json: String, isBlockDevice: (String) -> Bool) throws -> AdoptedDomain {
        guard let config = try? JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any],
            let c = config["c_info"] as? [String: Any], let b = config["b_info"] as? [String: Any]
        else {
            throw SnapshotError(
                .invalidArgument, "libxl's configuration of the domain is not what libxl writes: \(json.prefix(200))")
        }
        let name = c["name"] as? String ?? ""
        guard (c["type"] as? String ?? "pv") == "pv" else {
            throw SnapshotError(
                .unsupported,
                "domain '\(name)' is a \(c["type"] as? String ?? "?") guest; vmsnap's Xen driver runs PV guests only. Nothing was adopted"
            )
        }
        let pv = b["type.pv"] as? [String: Any] ?? [:]
        guard let kernel = b["kernel"] as? String ?? pv["kernel"] as? String else {
            let loader = pv["bootloader"] as? String
            throw SnapshotError(
                .unsupported,
                "domain '\(name)' boots \(loader.map { "through a boot loader (\($0))" } ?? "with no kernel"); a vmsnap Xen definition boots a kernel (with an initrd and command line). Nothing was adopted"
            )
        }
        guard let uuidText = c["uuid"] as? String, let uuid = UUID(uuidString: uuidText) else {
            throw SnapshotError(.invalidArgument, "domain '\(name)': libxl's configuration has no UUID")
        }
        let kib = (b["target_memkb"] as? Int) ?? (b["max_memkb"] as? Int) ?? 0
        var disks: [AdoptedDomain.Disk] = []
        var keptDisks: [[String: Any]] = []
        var keptItems: [String] = []
        for d in config["disks"] as? [[String: Any]] ?? [] {
            let vdev = d["vdev"] as? String ?? "?"
            // Drives no backend manages stay as libxl has them, and come back with every create.
            guard let path = d["pdev_path"] as? String, !path.isEmpty, (d["is_cdrom"] as? Int ?? 0) == 0 else {
                keptDisks.append(d)
                keptItems.append("disk \(vdev): a CD-ROM or an empty drive")
                continue
            }
            // libxl writes `readwrite` only for writable drives (0 is its default, left out).
            guard (d["readwrite"] as? Int ?? 0) == 1 else {
                keptDisks.append(d)
                keptItems.append("disk \(vdev) (\(path)): read-only")
                continue
            }
            let format = (d["format"] as? String).map { $0 == "vhd" ? "vpc" : $0 } ?? "raw"
            disks.append(
                AdoptedDomain.Disk(
                    target: vdev, path: path, format: format, sourceType: isBlockDevice(path) ? .block : .file))
        }
        for (key, value) in config.sorted(by: { $0.key < $1.key }) where key != "disks" {
            if let list = value as? [Any], !list.isEmpty { keptItems.append("\(key) (\(list.count))") }
        }
        let kept = try XenConfig.keptPart(of: config, disks: keptDisks)
        return AdoptedDomain(
            name: name, uuid: uuid, memoryMiB: kib / 1024, vcpus: b["max_vcpus"] as? Int ?? 1,
            boot: DomainBoot(kernel: kernel, initrd: b["ramdisk"] as? String, cmdline: b["cmdline"] as? String),
            accel: "pv", disks: disks, notModeled: [], kept: kept, keptItems: keptItems)
    }

    static func isBlockDevice(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && st.st_mode & S_IFMT == S_IFBLK
    }
}

extension XenDriver {
    public func adopt(_ domain: String) async throws -> AdoptedDomain {
        let info = try await require(domain)
        let json = try await xl.call { ctx in try LibXL.retrieveConfig(ctx, info.domid) }
        return try XenAdoption.adopted(json: json, isBlockDevice: XenAdoption.isBlockDevice)
    }
}
