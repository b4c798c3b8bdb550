import Foundation
import HypervisorDriver
import SnapshotCore

/// A vmsnap domain definition as libxl's domain configuration, in libxl's own JSON form (what
/// `libxl_domain_config_from_json` reads and libxl keeps in /var/lib/xen/userdata-*). Built
/// from the definition every time, so a snapshot's recorded definition recreates its domain.
enum XenConfig {
    /// How libxl attaches a disk: blkback for block devices, QEMU's qdisk for image files.
    struct Disk: Equatable {
        var path: String
        var vdev: String
        var backend: String
        var format: String
    }

    /// The libxl disk for one drive, or a refusal that says why and what to do.
    static func disk(_ d: DomainDrive) throws -> Disk {
        let vdev = d.target
        guard vdev.range(of: #"^xvd[a-z]{1,2}$"#, options: .regularExpression) != nil else {
            throw SnapshotError(
                .invalidArgument,
                "disk target '\(vdev)': a Xen PV guest names its disks xvda, xvdb, ...; rename the target in the definition"
            )
        }
        switch (d.drive.sourceType, d.drive.format) {
        case (.block, "raw"):
            return Disk(path: d.drive.path, vdev: vdev, backend: "phy", format: "raw")
        case (.file, "raw"), (.file, "qcow2"):
            return Disk(path: d.drive.path, vdev: vdev, backend: "qdisk", format: d.drive.format)
        case (.file, "vpc"):
            throw SnapshotError(
                .unsupported,
                "disk \(vdev): a VHD file has no Xen disk backend in Debian: blktap's tapdisk is not packaged, and QEMU's vpc driver (qdisk) is not safe for writes into differencing disks. Convert it (qemu-img convert -O qcow2) or keep it on a QEMU domain"
            )
        default:
            throw SnapshotError(
                .unsupported,
                "disk \(vdev): a \(d.drive.sourceType.rawValue) disk in \(d.drive.format) format has no Xen disk backend in vmsnap (block devices go through blkback, raw and qcow2 files through qdisk)"
            )
        }
    }

    /// The whole configuration. `uuid` is the definition's: libxl keeps it for the domain.
    static func json(_ definition: DomainDefinition, drives: [DomainDrive]) throws -> String {
        guard let kernel = definition.boot.kernel else {
            throw SnapshotError(
                .invalidArgument,
                "domain '\(definition.name)': a Xen PV domain boots a kernel: set boot.kernel (and boot.initrd, boot.cmdline)"
            )
        }
        // What an adopted domain keeps (network interfaces, drives no backend manages, tuning),
        // with what the definition says laid over it.
        var config = withoutDefinitionFields(try kept(definition))
        var bInfo = config["b_info"] as? [String: Any] ?? [:]
        let kib = definition.memoryMiB * 1024
        bInfo["max_vcpus"] = definition.vcpus
        bInfo["avail_vcpus"] = Array(0..<definition.vcpus)
        bInfo["max_memkb"] = kib
        bInfo["target_memkb"] = kib
        bInfo["kernel"] = kernel
        if let initrd = definition.boot.initrd { bInfo["ramdisk"] = initrd }
        if let cmdline = definition.boot.cmdline { bInfo["cmdline"] = cmdline }
        let disks: [[String: Any]] = try drives.map {
            let d = try disk($0)
            return [
                "pdev_path": d.path, "vdev": d.vdev, "backend": d.backend, "format": d.format, "readwrite": 1,
            ]
        }
        var cInfo = config["c_info"] as? [String: Any] ?? [:]
        cInfo["type"] = "pv"
        cInfo["name"] = definition.name
        cInfo["uuid"] = definition.uuid.uuidString.lowercased()
        config["c_info"] = cInfo
        config["b_info"] = bInfo
        config["disks"] = disks + (config["disks"] as? [[String: Any]] ?? [])
        // A guest that powers off, reboots or crashes is gone, as a QEMU domain's process is.
        for key in ["on_poweroff", "on_reboot", "on_crash"] { config[key] = "destroy" }
        let data = try JSONSerialization.data(withJSONObject: config, options: [.sortedKeys])
        return String(decoding: data, as: UTF8.self)
    }

    /// What the definition leaves to the kept configuration: libxl's whole domain configuration
    /// without what a definition sets, and `disks`: the drives no backend manages, kept as libxl
    /// has them (the managed ones come from the definition).
    static func keptPart(of config: [String: Any], disks: [[String: Any]]) throws -> String {
        var kept = withoutDefinitionFields(config)
        kept["disks"] = disks.isEmpty ? nil : disks
        let data = try JSONSerialization.data(withJSONObject: kept, options: [.sortedKeys])
        return String(decoding: data, as: UTF8.self)
    }

    /// libxl's configuration without the fields a definition sets: the name, UUID, memory,
    /// vCPUs, kernel (initrd, command line, boot loader) and the lifecycle actions (vmsnap's own).
    static func withoutDefinitionFields(_ config: [String: Any]) -> [String: Any] {
        var config = config
        var c = config["c_info"] as? [String: Any] ?? [:]
        for key in ["type", "name", "uuid"] { c[key] = nil }
        var b = config["b_info"] as? [String: Any] ?? [:]
        for key in ["max_vcpus", "avail_vcpus", "max_memkb", "target_memkb", "kernel", "ramdisk", "cmdline"] {
            b[key] = nil
        }
        var pv = b["type.pv"] as? [String: Any] ?? [:]
        for key in ["kernel", "ramdisk", "cmdline", "bootloader", "bootloader_args"] { pv[key] = nil }
        b["type.pv"] = pv
        config["c_info"] = c
        config["b_info"] = b
        for key in ["on_poweroff", "on_reboot", "on_crash", "on_watchdog", "on_soft_reset"] { config[key] = nil }
        return config
    }

    /// The definition's kept configuration as a dictionary ([:] when it has none), or a refusal.
    static func kept(_ definition: DomainDefinition) throws -> [String: Any] {
        guard let text = definition.hypervisorConfig else { return [:] }
        guard let kept = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any] else {
            throw SnapshotError(
                .invalidArgument,
                "domain '\(definition.name)': hypervisorConfig is not a JSON object (it holds libxl's configuration of what the definition does not model, as `vmsnap domain adopt` read it); remove it or restore it from a snapshot's definition"
            )
        }
        for (key, type) in [("c_info", "object"), ("b_info", "object"), ("disks", "array")] {
            guard let value = kept[key] else { continue }
            guard type == "object" ? value is [String: Any] : value is [[String: Any]] else {
                throw SnapshotError(
                    .invalidArgument,
                    "domain '\(definition.name)': hypervisorConfig's \(key) is not a JSON \(type) as libxl writes it; remove it or correct it"
                )
            }
        }
        let ours = Set(definition.disks.map(\.target))
        for disk in kept["disks"] as? [[String: Any]] ?? [] {
            let vdev = disk["vdev"] as? String ?? ""
            guard !ours.contains(vdev) else {
                throw SnapshotError(
                    .invalidArgument,
                    "domain '\(definition.name)': disk target \(vdev) is also a drive in hypervisorConfig (one no backend manages); give the disk another target or remove that drive from hypervisorConfig"
                )
            }
        }
        return kept
    }
}
