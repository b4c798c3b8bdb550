import DomainSnapshots
import Foundation
import SnapshotCore
import Testing

let canRunLibvirt = getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-system-x86_64")

/// Both directions against Debian's real libvirtd (scripts/libvirt-peer starts it): a tree
/// libvirt built (internal shut-off snapshot, external disk-only, external with memory) is
/// imported with its backing chains, reverted and pruned in vmsnap, exported back, redefined in
/// libvirt with the same tree, and libvirt reverts to a snapshot vmsnap took.
@Suite("libvirt interop", .serialized, .enabled(if: canRunLibvirt, "needs root and qemu-system-x86_64"))
struct LibvirtInteropTests {
    let runner = SubprocessRunner()
    let peer = LibvirtPeer()

    func virsh(_ args: String...) async throws -> String { try await peer.virsh(args) }

    @Test("import a libvirt tree, revert and delete in vmsnap, export back, libvirt reverts to vmsnap's snapshot")
    func roundTrip() async throws {
        try await LibvirtPeer.start()
        let cli = try CLI()
        let (kernel, initrd) = try await GuestImage.shared.files()
        let name = "lvi-\(UUID().uuidString.prefix(6).lowercased())"
        for disk in ["vda", "vdb"] {
            try await cli.sh("qemu-img", "create", "-q", "-f", "qcow2", cli.pool + "/\(disk).qcow2", "16M")
        }
        let serial = cli.root + "/serial.log"
        let domainXML = """
            <domain type='qemu'>
              <name>\(name)</name>
              <memory unit='MiB'>192</memory>
              <vcpu>1</vcpu>
              <os><type arch='x86_64' machine='pc'>hvm</type><kernel>\(kernel)</kernel><initrd>\(initrd)</initrd>
                <cmdline>console=ttyS0 quiet panic=-1</cmdline></os>
              <devices>
                <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='\(cli.pool)/vda.qcow2'/><target dev='vda' bus='virtio'/></disk>
                <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='\(cli.pool)/vdb.qcow2'/><target dev='vdb' bus='virtio'/></disk>
                <serial type='file'><source path='\(serial)'/></serial>
                <memballoon model='none'/>
              </devices>
            </domain>
            """
        try domainXML.write(toFile: cli.root + "/domain.xml", atomically: true, encoding: .utf8)
        _ = try await virsh("define", cli.root + "/domain.xml")
        do {
            _ = try await virsh("snapshot-create-as", name, "s1", "--description", "first")
            _ = try await virsh("start", name)
            let deadline = ContinuousClock.now + .seconds(90)
            while !(String(decoding: FileManager.default.contents(atPath: serial) ?? Data(), as: UTF8.self).contains(
                "vmsnap-counter 2"))
            {
                guard ContinuousClock.now < deadline else {
                    throw CLIFailure("the libvirt guest did not start counting")
                }
                try await Task.sleep(for: .milliseconds(500))
            }
            _ = try await virsh("snapshot-create-as", name, "s2", "--disk-only", "--atomic")
            _ = try await virsh(
                "snapshot-create-as", name, "s3", "--memspec", "file=\(cli.root)/s3.mem,snapshot=external",
                "--diskspec", "vda,snapshot=external", "--diskspec", "vdb,snapshot=external")
            _ = try await virsh("destroy", name)
            let built = try await peer.tree(name)
            #expect(built == ["s1": "", "s2": "s1", "s3": "s2"], "\(built)")

            // Import: the tree, the current snapshot and the backing chains libvirt built.
            let imported = try await cli.ok("domain", "import", "--libvirt", name)
            #expect(imported.contains("snapshots: s1, s2, s3; current s3"), "\(imported)")
            let (tree, current) = try await LibvirtPeer.vmsnapTree(cli, name)
            #expect(tree == built && current == "s3", "\(tree) current \(current ?? "-")")
            let vda = try await cli.list(cli.pool + "/vda.s3")
            #expect(vda.snapshots.map(\.name).sorted() == ["s1", "s2", "s3"])
            try await cli.ok("disk", "check", cli.pool + "/vda.s3")

            // vmsnap acts on it: revert to the disk-only snapshot (libvirt 9.0 cannot revert to
            // external snapshots), then prune the branch it left and take its own snapshot.
            try await cli.ok("snapshot", "revert", name, "s2", "--force")
            try await cli.ok("domain", "stop", name, "--force")
            try await cli.ok("snapshot", "delete", name, "s3")
            try await cli.ok("snapshot", "create", name, "--name", "v2")
            let (after, currentAfter) = try await LibvirtPeer.vmsnapTree(cli, name)
            #expect(after == ["s1": "", "s2": "s1", "v2": "s2"] && currentAfter == "v2", "\(after)")

            // Export and give it back to libvirt.
            let active = try await cli.list(cli.pool + "/vda.s3").active
            try await cli.sh("qemu-io", "-f", "qcow2", "-c", "write -P 77 0 64k", active)
            let export = try await cli.ok("domain", "export", name, "--to", cli.root + "/export")
            _ = try await virsh("undefine", name, "--snapshots-metadata")
            try await peer.runVirshLines(export)
            let back = try await peer.tree(name)
            #expect(back == after, "libvirt has vmsnap's tree: \(back)")
            #expect(
                try await virsh("snapshot-current", name, "--name").trimmingCharacters(in: .whitespacesAndNewlines)
                    == "v2")
            _ = try await virsh("snapshot-revert", name, "v2")
            let read = try await runner.execute(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 77 0 64k", active])
            #expect(
                read.standardOutput.contains("Pattern verification failed"),
                "libvirt's revert to v2 undid the write made after it")
        } catch {
            _ = try? await virsh("destroy", name)
            _ = try? await virsh("undefine", name, "--snapshots-metadata")
            throw error
        }
        _ = try? await virsh("undefine", name, "--snapshots-metadata")
    }

    /// The other half of the way back: libvirt reverts to a full-system snapshot vmsnap took, with
    /// the guest's memory, and the guest goes on from the snapshot's instant. libvirt 9.0 reverts
    /// only internal snapshots (memory inside the qcow2 images); its QEMU loads vmsnap's device
    /// state because the exported `<domain>` describes vmsnap's machine (ACPI, the serial console,
    /// the agent's channel, the disks' PCI slots, no USB, no balloon).
    @Test("libvirt reverts to a full-system snapshot vmsnap took: the guest goes on from the snapshot's counter")
    func libvirtRevertsVmsnapFullSystemSnapshot() async throws {
        try await LibvirtPeer.start()
        let cli = try CLI()
        let name = "lvf-\(UUID().uuidString.prefix(6).lowercased())"
        let g = try await Guest.define(cli, name: name, disks: [("vda", "qcow2"), ("vdb", "qcow2")])
        do {
            try await cli.ok("domain", "start", name)
            let before = try await g.waitCounter(atLeast: 3)
            try await cli.ok("snapshot", "create", name, "--name", "f1", "--memory", "internal")
            let after = try await g.waitCounter(atLeast: before + 8)
            await g.stop()
            let xml = try await cli.ok("snapshot", "dumpxml", name, "f1")
            #expect(
                xml.contains("<features><acpi/></features>") && xml.contains("<memballoon model='none'/>")
                    && xml.contains("slot='0x04'"), "\(xml)")

            let export = try await cli.ok("domain", "export", name, "--to", cli.root + "/export")
            try await peer.runVirshLines(export)
            // libvirt reverts, paused: the disks hold the snapshot's instant.
            _ = try await virsh("snapshot-revert", name, "f1", "--paused")
            #expect(try await virsh("domstate", name).trimmingCharacters(in: .whitespacesAndNewlines) == "paused")
            let vda = try #require(try await g.diskCounter(g.disks[0].path, format: "qcow2"))
            let vdb = try #require(try await g.diskCounter(g.disks[1].path, format: "qcow2"))
            #expect(
                vda >= before && vda < after - 2 && (vda == vdb || vda == vdb + 1),
                "disks at the snapshot: vda \(vda), vdb \(vdb) (taken after \(before), stopped at \(after))")
            // Resumed, the guest goes on from the snapshot's memory (libvirt keeps the serial
            // console's output in its log folder, where the export put it).
            _ = try await virsh("resume", name)
            let log = LibvirtDomainXML.serialLog(domain: name)
            var printed: [Int] = []
            let deadline = ContinuousClock.now + .seconds(60)
            while printed.isEmpty && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(500))
                printed = Guest.counters(inLog: log)
            }
            let first = try #require(printed.first, "libvirt's guest printed no counter to \(log)")
            #expect(
                first == vda || first == vda + 1,
                "the guest went on from the snapshot's memory (\(first), its disk held \(vda); stopped at \(after))")
        } catch {
            _ = try? await virsh("destroy", name)
            _ = try? await virsh("undefine", name, "--snapshots-metadata")
            await g.stop()
            unlink(LibvirtDomainXML.serialLog(domain: name))
            throw error
        }
        _ = try? await virsh("destroy", name)
        _ = try? await virsh("undefine", name, "--snapshots-metadata")
        unlink(LibvirtDomainXML.serialLog(domain: name))
    }

    @Test(
        "a libvirt tree of disk-only snapshots over a raw image: imported down to the raw base, reverted, pruned, given back"
    )
    func diskOnlyTreeOverARawFile() async throws {
        try await LibvirtPeer.start()
        let cli = try CLI()
        let base = cli.pool + "/vda.raw"
        try await cli.sh("qemu-img", "create", "-q", "-f", "raw", base, "16M")
        let name = "lvr-\(UUID().uuidString.prefix(6).lowercased())"
        do {
            try await peer.diskOnlyTreeOverARawBase(
                cli, base: .init(path: base, diskType: "file", sourceAttribute: "file"), name: name)
        } catch {
            await peer.cleanUp(cli, name)
            throw error
        }
        await peer.undefine(name)
    }

    @Test(
        "checkpoints both ways: libvirt's come in with domain import, vmsnap's are redefined in libvirt and read back the same"
    )
    func checkpointsBothWays() async throws {
        try await LibvirtPeer.start()
        let cli = try CLI()
        let name = "lvc-\(UUID().uuidString.prefix(6).lowercased())"
        let disk = cli.pool + "/vda.qcow2"
        try await cli.sh("qemu-img", "create", "-q", "-f", "qcow2", disk, "16M")
        let domainXML = LibvirtPeer.diskOnlyDomain(
            name,
            devices: """
                <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='\(disk)'/><target dev='vda' bus='virtio'/></disk>
                <memballoon model='none'/>
                """)
        try domainXML.write(toFile: cli.root + "/domain.xml", atomically: true, encoding: .utf8)
        _ = try await virsh("define", cli.root + "/domain.xml")
        do {
            // libvirt 9.0 takes no checkpoint of a shut-off domain: give it one over a bitmap.
            try await cli.sh("qemu-img", "bitmap", "--add", disk, "l1")
            let l1 = """
                <domaincheckpoint>
                  <name>l1</name>
                  <creationTime>1764500000</creationTime>
                  <disks>
                    <disk name='vda' checkpoint='bitmap' bitmap='l1'/>
                  </disks>
                </domaincheckpoint>
                """
            try l1.write(toFile: cli.root + "/l1.xml", atomically: true, encoding: .utf8)
            _ = try await virsh("checkpoint-create", name, cli.root + "/l1.xml", "--redefine")

            let imported = try await cli.ok("domain", "import", "--libvirt", name)
            #expect(imported.contains("checkpoints: l1"), "\(imported)")
            try await cli.ok("checkpoint", "create", name, "c2")
            let ours = try await cli.ok("checkpoint", "dumpxml", name, "c2")

            let export = try await cli.ok("domain", "export", name, "--to", cli.root + "/export")
            _ = try await virsh("undefine", name, "--checkpoints-metadata")
            try await peer.runVirshLines(export)
            let list = try await virsh("checkpoint-list", name, "--parent")
            let tree = list.split(whereSeparator: \.isNewline).map {
                $0.split(separator: " ", omittingEmptySubsequences: true)
            }
            #expect(tree.contains { $0.first == "l1" && $0.count == 4 }, "l1 has no parent: \(list)")
            #expect(tree.contains { $0.first == "c2" && $0.last == "l1" }, "c2 follows l1: \(list)")
            let theirs = try await virsh("checkpoint-dumpxml", name, "c2", "--no-domain")
            #expect(
                theirs.trimmingCharacters(in: .whitespacesAndNewlines)
                    == ours.trimmingCharacters(in: .whitespacesAndNewlines),
                "libvirt reads vmsnap's checkpoint back as written:\n\(theirs)\nvs\n\(ours)")
        } catch {
            _ = try? await virsh("undefine", name, "--checkpoints-metadata", "--snapshots-metadata")
            throw error
        }
        _ = try? await virsh("undefine", name, "--checkpoints-metadata", "--snapshots-metadata")
    }
}
