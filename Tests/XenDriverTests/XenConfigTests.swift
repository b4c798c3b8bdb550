import Foundation
import HypervisorDriver
import SnapshotCore
import Testing

@testable import XenDriver

/// The libxl configuration a definition becomes, and what the Xen driver refuses before it
/// calls libxl. (The real libxl parses these in dom0: scripts/test-xen.)
@Suite struct XenConfigTests {
    func definition(accel: String = "pv", disks: [DomainDisk] = [], kernel: String? = "/boot/vmlinuz")
        -> DomainDefinition
    {
        DomainDefinition(
            name: "xg", memoryMiB: 128, vcpus: 2, disks: disks,
            boot: DomainBoot(kernel: kernel, initrd: "/tmp/initrd.gz", cmdline: "console=hvc0"), accel: accel,
            hypervisor: "xen")
    }

    func object(_ json: String) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
    }

    @Test func blockDevicesGoThroughBlkbackAndFilesThroughQdisk() throws {
        let drives = [
            DomainDrive(target: "xvda", drive: HypervisorDrive(path: "/dev/vg/lv", format: "raw", sourceType: .block)),
            DomainDrive(target: "xvdb", drive: HypervisorDrive(path: "/images/b.qcow2", format: "qcow2")),
            DomainDrive(target: "xvdc", drive: HypervisorDrive(path: "/images/c.img", format: "raw")),
        ]
        let config = try object(XenConfig.json(definition(), drives: drives))
        let disks = try #require(config["disks"] as? [[String: Any]])
        #expect(disks.map { $0["backend"] as? String } == ["phy", "qdisk", "qdisk"])
        #expect(disks.map { $0["format"] as? String } == ["raw", "qcow2", "raw"])
        #expect(disks.map { $0["vdev"] as? String } == ["xvda", "xvdb", "xvdc"])
        #expect(disks[0]["pdev_path"] as? String == "/dev/vg/lv")
        let b = try #require(config["b_info"] as? [String: Any])
        #expect(b["max_memkb"] as? Int == 128 * 1024)
        #expect(b["avail_vcpus"] as? [Int] == [0, 1])
        #expect(b["kernel"] as? String == "/boot/vmlinuz")
        #expect(b["ramdisk"] as? String == "/tmp/initrd.gz")
        let c = try #require(config["c_info"] as? [String: Any])
        #expect(c["type"] as? String == "pv")
        #expect(c["name"] as? String == "xg")
    }

    @Test func vhdAndNetworkDisksAreRefusedWithTheReason() {
        let vhd = DomainDrive(target: "xvda", drive: HypervisorDrive(path: "/images/a.vhd", format: "vpc"))
        #expect(throws: SnapshotError.self) { try XenConfig.json(definition(), drives: [vhd]) }
        do {
            _ = try XenConfig.json(definition(), drives: [vhd])
        } catch let e as SnapshotError {
            #expect(e.message.contains("tapdisk"))
        } catch { Issue.record("unexpected \(error)") }
        let rbd = DomainDrive(
            target: "xvda", drive: HypervisorDrive(path: "rbd:pool/img", format: "raw", sourceType: .network))
        #expect(throws: SnapshotError.self) { try XenConfig.json(definition(), drives: [rbd]) }
    }

    @Test func definitionsTheDriverCannotRunAreRefused() {
        let driver = XenDriver()
        #expect(throws: Never.self) { try driver.validate(definition()) }
        for bad in [
            definition(accel: "hvm"), definition(kernel: nil),
            definition(disks: [DomainDisk(target: "vda", backend: "lvm", locator: "vg/lv")]),
        ] {
            #expect(throws: SnapshotError.self) { try driver.validate(bad) }
        }
        var dom0 = definition()
        dom0.name = "Domain-0"
        #expect(throws: SnapshotError.self) { try driver.validate(dom0) }
        var uefi = definition()
        uefi.firmware = DomainFirmware(code: "/usr/share/OVMF/OVMF_CODE_4M.fd", vars: "/var/lib/x/VARS.fd")
        #expect(throws: SnapshotError.self) { try driver.validate(uefi) }
        var tpm = definition()
        tpm.tpm = DomainTPM(state: "/var/lib/x/tpm")
        let refused = #expect(throws: SnapshotError.self) { try driver.validate(tpm) }
        #expect(refused?.message.contains("TPM") == true)
        var huge = definition()
        huge.memoryBacking = DomainMemoryBacking(hugepageMiB: 2)
        let hugeRefused = #expect(throws: SnapshotError.self) { try driver.validate(huge) }
        #expect(hugeRefused?.message.contains("memoryBacking") == true)
    }

    @Test func offADom0TheDriverSaysSo() async throws {
        guard !FileManager.default.fileExists(atPath: "/proc/xen/capabilities") else { return }
        let driver = XenDriver()
        #expect(!driver.isRunning("xg"))
        do {
            _ = try await driver.runState("xg")
            Issue.record("runState succeeded off a dom0")
        } catch let e as SnapshotError {
            #expect(e.message.contains("not a Xen dom0"))
        }
    }
}
