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
        let kib = definition.memoryMiB * 1024
        var bInfo: [String: Any] = [
            "max_vcpus": definition.vcpus,
            "avail_vcpus": Array(0..<definition.vcpus),
            "max_memkb": kib,
            "target_memkb": kib,
            "kernel": kernel,
            "type.pv": [String: Any](),
        ]
        if let initrd = definition.boot.initrd { bInfo["ramdisk"] = initrd }
        if let cmdline = definition.boot.cmdline { bInfo["cmdline"] = cmdline }
        let disks: [[String: Any]] = try drives.map {
            let d = try disk($0)
            return [
                "pdev_path": d.path, "vdev": d.vdev, "backend": d.backend, "format": d.format, "readwrite": 1,
            ]
        }
        let config: [String: Any] = [
            "c_info": ["type": "pv", "name": definition.name, "uuid": definition.uuid.uuidString.lowercased()],
            "b_info": bInfo,
            "disks": disks,
            // A guest that powers off, reboots or crashes is gone, as a QEMU domain's process is.
            "on_poweroff": "destroy", "on_reboot": "destroy", "on_crash": "destroy",
        ]
        let data = try JSONSerialization.data(withJSONObject: config, options: [.sortedKeys])
        return String(decoding: data, as: UTF8.self)
    }
}
