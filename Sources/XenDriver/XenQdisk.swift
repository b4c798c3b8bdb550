import Foundation
import HypervisorDriver
import QEMUDriver
import SnapshotCore

/// The qdisk QEMU that libxl runs in dom0 for a domain's image-file disks (Debian's
/// qemu-system-xen), reached over libxl's own QMP socket. Its xen-block devices have no
/// BlockBackend name: a guest disk is found by the device's `vdev` property (`xvda0`), and
/// addressed by the node of its active layer.
struct XenBlockAddressing: QEMUDiskAddressing {
    func address(_ target: String, client: QMPClient) async throws -> QEMUDiskAddress {
        for device in try await client.blockDevices() {
            guard let qdev = device.qdev, let node = device.nodeName else { continue }
            // QEMU prints a whole disk's vdev with its partition number: xvda0.
            let vdev = try await client.run(QMP.QOMGetString(path: qdev, property: "vdev"))
            if vdev == target || vdev == target + "0" { return .node(node) }
        }
        throw SnapshotError(
            .notFound, "the domain's qdisk QEMU serves no disk \(target) (block devices go through blkback instead)")
    }
}

enum XenQdisk {
    static func socket(_ domid: UInt32) -> String { "/var/run/xen/qmp-libxl-\(domid)" }

    /// Runs `body` with a handle on the domain's image-file disks in its qdisk QEMU, then closes
    /// the connection (libxl talks to the same socket between vmsnap's commands).
    static func withDisks<T: Sendable>(
        _ domid: UInt32, domain: String, _ body: (QEMULiveDomain) async throws -> T
    ) async throws -> T {
        guard FileManager.default.fileExists(atPath: socket(domid)) else {
            throw SnapshotError(
                .conflict,
                "domain '\(domain)' has no qdisk QEMU (\(socket(domid)) is missing): its image-file disks are not served by QEMU"
            )
        }
        let client = try await QMPClient.connect(path: socket(domid))
        let disks = QEMULiveDomain(client: client, addressing: XenBlockAddressing())
        do {
            let result = try await body(disks)
            await client.close()
            return result
        } catch {
            await client.close()
            throw error
        }
    }
}
