import Foundation
import HypervisorDriver
import SnapshotCore
import Testing

@testable import XenDriver

/// A domain made with `xl create`, as libxl's configuration JSON describes it (the shape libxl
/// writes to /var/lib/xen/userdata-*; the real one is read back in dom0 by scripts/test-xen).
@Suite struct XenAdoptionTests {
    static let uuid = "07909b89-4ef2-46df-b928-72b8ce22855a"

    func config(type: String = "pv", kernel: String? = "/boot/vmlinuz", extra: String = "") -> String {
        """
        {"c_info": {"type": "\(type)", "name": "tiny", "uuid": "\(Self.uuid)"},
         "b_info": {"max_vcpus": 2, "avail_vcpus": [0, 1], "max_memkb": 262144, "target_memkb": 131072,
                    \(kernel.map { "\"kernel\": \"\($0)\"," } ?? "") "cmdline": "console=hvc0", "ramdisk": "/tmp/i.gz",
                    "type.pv": {\(kernel == nil ? "\"bootloader\": \"pygrub\"" : "")}},
         "disks": [{"pdev_path": "/dev/xvg/d1", "vdev": "xvda", "format": "raw", "readwrite": 1},
                   {"pdev_path": "/images/b.qcow2", "vdev": "xvdb", "format": "qcow2", "readwrite": 1},
                   {"pdev_path": "/images/c.iso", "vdev": "xvdc", "format": "raw", "readwrite": 0}]
         \(extra)}
        """
    }

    @Test func aPVDomainBecomesADefinition() throws {
        let found = try XenAdoption.adopted(json: config(), isBlockDevice: { $0.hasPrefix("/dev/") })
        #expect(found.name == "tiny")
        #expect(found.uuid == UUID(uuidString: Self.uuid))
        #expect(found.memoryMiB == 128)
        #expect(found.vcpus == 2)
        #expect(found.boot == DomainBoot(kernel: "/boot/vmlinuz", initrd: "/tmp/i.gz", cmdline: "console=hvc0"))
        #expect(
            found.disks == [
                AdoptedDomain.Disk(target: "xvda", path: "/dev/xvg/d1", format: "raw", sourceType: .block),
                AdoptedDomain.Disk(target: "xvdb", path: "/images/b.qcow2", format: "qcow2", sourceType: .file),
            ])
        #expect(found.notModeled == ["disk xvdc (/images/c.iso): read-only"])
    }

    @Test func devicesVmsnapDoesNotModelAreNamed() throws {
        let found = try XenAdoption.adopted(
            json: config(extra: #", "nics": [{"devid": 0, "bridge": "xenbr0"}], "vfbs": []"#),
            isBlockDevice: { _ in false })
        #expect(found.notModeled.contains("nics (1)"))
        #expect(!found.notModeled.contains { $0.hasPrefix("vfbs") })
    }

    @Test func whatTheDriverCannotRunIsRefused() {
        for (json, says) in [
            (config(type: "hvm"), "PV guests only"), (config(kernel: nil), "pygrub"), ("{}", "not what libxl writes"),
        ] {
            do {
                _ = try XenAdoption.adopted(json: json, isBlockDevice: { _ in false })
                Issue.record("adopted \(json)")
            } catch let e as SnapshotError {
                #expect(e.message.contains(says), "\(e.message)")
            } catch { Issue.record("\(error)") }
        }
    }
}
