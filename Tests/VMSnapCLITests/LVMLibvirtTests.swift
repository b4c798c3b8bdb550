import Foundation
import SnapshotCore
import Testing

/// A libvirt domain whose disks are an LVM block device and a qcow2 file, imported from its
/// `virsh dumpxml` and exported back: the LV goes to the lvm backend (libvirt: type='block',
/// driver raw) and comes back as the same block source. Needs a real device-mapper, so it runs in
/// scripts/lvm-guest (VMSNAP_LVM_VG set).
@Suite(
    "LVM disk imported from and exported to libvirt XML",
    .enabled(
        if: ProcessInfo.processInfo.environment["VMSNAP_LVM_VG"] != nil, "set VMSNAP_LVM_VG (scripts/lvm-guest does)"))
struct LVMLibvirtTests {
    let vg = ProcessInfo.processInfo.environment["VMSNAP_LVM_VG"] ?? ""

    @Test func importAndExportAnLVMDisk() async throws {
        let cli = try CLI()
        let lv = "vmsnap-lvirt-\(UUID().uuidString.prefix(6).lowercased())"
        try await cli.sh("lvcreate", "-q", "-y", "-L", "16m", "-n", lv, vg)
        do {
            let qcow = try await cli.disk("xml-vdb")
            let name = "lx\(UUID().uuidString.prefix(4).lowercased())"
            let xml = """
                <domain type='qemu'>
                  <name>\(name)</name>
                  <uuid>\(UUID().uuidString.lowercased())</uuid>
                  <memory unit='KiB'>65536</memory>
                  <vcpu placement='static'>1</vcpu>
                  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><boot dev='hd'/></os>
                  <devices>
                    <emulator>/usr/bin/qemu-system-x86_64</emulator>
                    <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/\(vg)/\(lv)'/><target dev='vda' bus='virtio'/></disk>
                    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='\(qcow)'/><target dev='vdb' bus='virtio'/></disk>
                    <interface type='network'><source network='default'/></interface>
                  </devices>
                </domain>
                """
            try xml.write(toFile: cli.root + "/dom.xml", atomically: true, encoding: .utf8)
            let imported = try await cli.ok("domain", "import", cli.root + "/dom.xml")
            #expect(imported.contains("vda (lvm)") && imported.contains("vdb (qcow2)"), "\(imported)")
            #expect(imported.contains("not imported: device <interface>"), "what is not modeled is named: \(imported)")
            try await cli.ok("snapshot", "create", name, "--name", "s1")
            let out = cli.root + "/export"
            try await cli.ok("domain", "export", name, "--to", out)
            let domain = try String(contentsOfFile: out + "/domain.xml", encoding: .utf8)
            #expect(
                domain.contains("<disk type='block' device='disk'>")
                    && domain.contains("<source dev='/dev/\(vg)/\(lv)'/>"),
                "\(domain)")
            #expect(
                domain.contains("<driver name='qemu' type='raw'/>")
                    && domain.contains("<driver name='qemu' type='qcow2'/>"), "\(domain)")
            let snapshot = try String(contentsOfFile: out + "/snapshots/001.xml", encoding: .utf8)
            #expect(
                snapshot.contains("<name>s1</name>")
                    && snapshot.contains("<disk name='vda' snapshot='external' type='block'>"), "\(snapshot)")
            try await cli.ok("snapshot", "delete", name, "s1")
        } catch {
            _ = try? await cli.sh("lvremove", "-q", "-y", "-f", "\(vg)/\(lv)")
            throw error
        }
        _ = try? await cli.sh("lvremove", "-q", "-y", "-f", "\(vg)/\(lv)")
    }

    /// The same tree through a live libvirtd in the guest, on an LVM volume: libvirt's disk-only
    /// snapshots write qcow2 overlays over the block device, and vmsnap takes the chain down to it.
    @Test(
        "a live libvirtd's disk-only snapshots over an LVM volume: imported to the volume, reverted, pruned, given back",
        .enabled(if: canRunLibvirt, "needs root and qemu-system-x86_64"))
    func liveLibvirtdOverAnLVMVolume() async throws {
        try await LibvirtPeer.start()
        let cli = try CLI()
        let peer = LibvirtPeer()
        let lv = "vmsnap-lvlive-\(UUID().uuidString.prefix(6).lowercased())"
        try await cli.sh("lvcreate", "-q", "-y", "-L", "16m", "-n", lv, vg)
        let name = "lvl-\(UUID().uuidString.prefix(6).lowercased())"
        do {
            try await peer.diskOnlyTreeOverARawBase(
                cli, base: .init(path: "/dev/\(vg)/\(lv)", diskType: "block", sourceAttribute: "dev"), name: name)
        } catch {
            await peer.cleanUp(cli, name)
            _ = try? await cli.sh("lvremove", "-q", "-y", "-f", "\(vg)/\(lv)")
            throw error
        }
        await peer.undefine(name)
        try await cli.sh("lvremove", "-q", "-y", "-f", "\(vg)/\(lv)")
    }
}
