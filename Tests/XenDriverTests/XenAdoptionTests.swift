import Foundation
import HypervisorDriver
import SnapshotCore
import Testing

@testable import XenDriver

/// A domain made with `xl create`, as libxl's configuration JSON describes it (the shape libxl
/// writes to /var/lib/xen/userdata-*; the real one is read back in dom0 by scripts/test-xen).
/// libxl leaves out fields at their default: a read-only drive has no `readwrite`.
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
                   {"pdev_path": "/images/c.iso", "vdev": "xvdc", "format": "raw"}]
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
        #expect(found.keptItems == ["disk xvdc (/images/c.iso): read-only"])
        #expect(found.notModeled.isEmpty)
    }

    func object(_ json: String?) throws -> [String: Any] {
        let text = try #require(json)
        return try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
    }

    static let network = #", "nics": [{"devid": 0, "bridge": "xenbr0", "mac": "00:16:3e:01:02:03"}], "vfbs": []"#

    @Test func devicesVmsnapDoesNotModelAreKept() throws {
        let found = try XenAdoption.adopted(json: config(extra: Self.network), isBlockDevice: { $0.hasPrefix("/dev/") })
        #expect(found.keptItems.contains("nics (1)"))
        #expect(found.keptItems.contains("disk xvdc (/images/c.iso): read-only"))
        #expect(!found.keptItems.contains { $0.hasPrefix("vfbs") })
        #expect(found.notModeled.isEmpty, "nothing is dropped: \(found.notModeled)")
        let kept = try object(found.kept)
        #expect((kept["nics"] as? [[String: Any]])?.first?["mac"] as? String == "00:16:3e:01:02:03")
        // The read-only drive is kept; the drives backends manage come from the definition.
        #expect((kept["disks"] as? [[String: Any]])?.map { $0["vdev"] as? String } == ["xvdc"])
        let b = try #require(kept["b_info"] as? [String: Any])
        for key in ["max_memkb", "target_memkb", "max_vcpus", "avail_vcpus", "kernel", "ramdisk", "cmdline"] {
            #expect(b[key] == nil, "b_info.\(key) is the definition's")
        }
        let c = try #require(kept["c_info"] as? [String: Any])
        #expect(c["name"] == nil && c["uuid"] == nil)
    }

    /// The adopted domain created again (a revert): the definition's values over what was kept.
    @Test func theKeptConfigurationComesBackUnderTheDefinition() throws {
        let found = try XenAdoption.adopted(json: config(extra: Self.network), isBlockDevice: { $0.hasPrefix("/dev/") })
        let definition = DomainDefinition(
            name: "tiny", uuid: found.uuid, memoryMiB: 256, vcpus: 1,
            disks: [DomainDisk(target: "xvda", backend: "lvm", locator: "xvg/d1")],
            boot: DomainBoot(kernel: "/boot/vmlinuz-2", cmdline: "console=hvc0 quiet"), accel: "pv", hypervisor: "xen",
            hypervisorConfig: found.kept)
        try XenDriver().validate(definition)
        let drive = DomainDrive(
            target: "xvda", drive: HypervisorDrive(path: "/dev/xvg/d1-vs-s1", format: "raw", sourceType: .block))
        let config = try object(XenConfig.json(definition, drives: [drive]))
        #expect((config["nics"] as? [[String: Any]])?.first?["bridge"] as? String == "xenbr0")
        let disks = try #require(config["disks"] as? [[String: Any]])
        #expect(disks.map { $0["vdev"] as? String } == ["xvda", "xvdc"])
        #expect(disks[0]["pdev_path"] as? String == "/dev/xvg/d1-vs-s1")
        #expect(disks[1]["readwrite"] == nil, "read-only, as libxl had it")
        let b = try #require(config["b_info"] as? [String: Any])
        #expect(b["max_memkb"] as? Int == 256 * 1024)
        #expect(b["avail_vcpus"] as? [Int] == [0])
        #expect(b["kernel"] as? String == "/boot/vmlinuz-2")
        #expect(b["ramdisk"] == nil, "the definition has no initrd any more")
        #expect(b["cmdline"] as? String == "console=hvc0 quiet")
        let c = try #require(config["c_info"] as? [String: Any])
        #expect(c["name"] as? String == "tiny")
        #expect(config["on_reboot"] as? String == "destroy")
    }

    @Test func aKeptConfigurationThatIsNotLibxlsIsRefused() throws {
        let found = try XenAdoption.adopted(json: config(extra: Self.network), isBlockDevice: { $0.hasPrefix("/dev/") })
        func definition(_ kept: String, target: String = "xvda") -> DomainDefinition {
            DomainDefinition(
                name: "tiny", memoryMiB: 128, disks: [DomainDisk(target: target, backend: "lvm", locator: "xvg/d1")],
                boot: DomainBoot(kernel: "/boot/vmlinuz"), accel: "pv", hypervisor: "xen", hypervisorConfig: kept)
        }
        for (d, says) in [
            (definition("not json"), "not a JSON object"), (definition(#"{"disks": {}}"#), "disks is not a JSON array"),
            (definition(found.kept!, target: "xvdc"), "also a drive in hypervisorConfig"),
        ] {
            do {
                try XenDriver().validate(d)
                Issue.record("validated \(d.hypervisorConfig ?? "")")
            } catch let e as SnapshotError {
                #expect(e.code == .invalidArgument)
                #expect(e.message.contains(says), "\(e.message)")
            }
        }
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
