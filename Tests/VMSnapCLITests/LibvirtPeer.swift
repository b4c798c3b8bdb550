import Foundation
import SnapshotCore
import Testing

/// A real libvirtd (scripts/libvirt-peer starts it without systemd), as the libvirt tests talk to
/// it: virsh's own commands, its snapshot tree, and the lines `vmsnap domain export` prints.
struct LibvirtPeer {
    let runner = SubprocessRunner()

    /// Starts libvirtd unless it runs already (installing it where it is missing).
    static func start() async throws {
        try await SubprocessRunner().run([GuestImage.repository + "/scripts/libvirt-peer", "start"])
    }

    func virsh(_ args: String...) async throws -> String {
        try await virsh(args)
    }

    func virsh(_ args: [String]) async throws -> String {
        try await runner.run(["virsh", "-q", "-c", "qemu:///system"] + args).standardOutput
    }

    /// Runs the `virsh` commands `vmsnap domain export` prints (define, then redefine in parent order).
    func runVirshLines(_ export: String) async throws {
        for line in export.split(whereSeparator: \.isNewline) where line.hasPrefix("  virsh ") {
            let argv = line.split(separator: " ").map(String.init)
            _ = try await virsh(Array(argv.dropFirst()))
        }
    }

    /// name -> parent, from `virsh snapshot-list --parent`.
    func tree(_ domain: String) async throws -> [String: String] {
        var tree: [String: String] = [:]
        for line in try await virsh("snapshot-list", domain, "--parent").split(whereSeparator: \.isNewline) {
            let f = line.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
            // name, date, time, zone, state, [parent]
            guard f.count >= 5 else { continue }
            tree[f[0]] = f.count >= 6 ? f[5] : ""
        }
        return tree
    }

    /// Forgets the domain and its snapshot metadata (storage stays); quiet when it is gone already.
    func undefine(_ domain: String) async {
        _ = try? await virsh("destroy", domain)
        _ = try? await virsh("undefine", domain, "--snapshots-metadata", "--checkpoints-metadata")
    }

    /// name -> parent and the current snapshot, as vmsnap lists them.
    static func vmsnapTree(_ cli: CLI, _ domain: String) async throws -> ([String: String], String?) {
        struct Record: Decodable {
            var name: String
            var parent: String?
            var current: Bool
        }
        let out = try await cli.ok("snapshot", "list", domain, "--json")
        let records = try JSONDecoder().decode([Record].self, from: Data(out.utf8))
        return (
            Dictionary(uniqueKeysWithValues: records.map { ($0.name, $0.parent ?? "") }),
            records.first { $0.current }?.name
        )
    }

    /// A libvirt domain with no kernel and nothing but `devices`: one the tests never boot into an
    /// OS (QEMU sits in the firmware when it is started).
    static func diskOnlyDomain(_ name: String, devices: String) -> String {
        """
        <domain type='qemu'>
          <name>\(name)</name>
          <memory unit='MiB'>128</memory>
          <vcpu>1</vcpu>
          <os><type arch='x86_64' machine='pc'>hvm</type></os>
          <devices>
        \(devices.split(separator: "\n").map { "    " + $0 }.joined(separator: "\n"))
          </devices>
        </domain>
        """
    }

    /// The plain image a libvirt disk starts from: a raw file, or a block device such as an LVM
    /// volume. `fill` writes a byte pattern into it, `reads` checks one through QEMU's block layer.
    struct RawBase {
        var path: String
        /// libvirt's `<disk type>` and the `<source>` attribute that names the path.
        var diskType: String
        var sourceAttribute: String
    }

    /// libvirt builds a tree of two disk-only snapshots of a shut-off domain whose vda is a raw
    /// image (libvirt writes qcow2 overlays over it; the first leaves vdb out). vmsnap imports it
    /// with the chain down to the raw base; reverts to the second snapshot and deletes it (the
    /// layers on its image are rebased onto the raw base, read as raw); reverts to the first (vda
    /// reads the raw base's bytes again) and deletes it while the domain runs (the raw base stays:
    /// it is the chain's start); takes its own snapshot, and gives the tree back to libvirt, which
    /// reverts to that snapshot.
    func diskOnlyTreeOverARawBase(_ cli: CLI, base: RawBase, name: String) async throws {
        // The guest's data: a qcow2 image with an internal snapshot written at the start of its
        // disk (as a nested hypervisor would keep one there), byte 11 at 1 MiB. The disk is raw
        // whatever its bytes say: libvirt records it so in the overlays it builds on it.
        let inner = cli.root + "/inner.qcow2"
        try await cli.sh("qemu-img", "create", "-q", "-f", "qcow2", inner, "16M")
        try await cli.sh("qemu-img", "snapshot", "-c", "guests-own", inner)
        try await cli.sh("dd", "if=\(inner)", "of=\(base.path)", "conv=notrunc", "status=none")
        let at = 1 << 20
        try await cli.sh("qemu-io", "-f", "raw", "-c", "write -P 11 \(at) 64k", base.path)
        let vdb = try await cli.disk("vdb")
        let domainXML = Self.diskOnlyDomain(
            name,
            devices: """
                <disk type='\(base.diskType)' device='disk'><driver name='qemu' type='raw'/><source \(base.sourceAttribute)='\(base.path)'/><target dev='vda' bus='virtio'/></disk>
                <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='\(vdb)'/><target dev='vdb' bus='virtio'/></disk>
                """)
        try domainXML.write(toFile: cli.root + "/\(name).xml", atomically: true, encoding: .utf8)
        _ = try await virsh("define", cli.root + "/\(name).xml")
        let s1 = cli.pool + "/vda.s1", s2 = cli.pool + "/vda.s2"
        _ = try await virsh(
            "snapshot-create-as", name, "s1", "--disk-only", "--diskspec", "vda,snapshot=external,file=\(s1)",
            "--diskspec", "vdb,snapshot=no")
        try await cli.fill(s1, 12, at: at)
        _ = try await virsh(
            "snapshot-create-as", name, "s2", "--disk-only", "--diskspec", "vda,snapshot=external,file=\(s2)",
            "--diskspec", "vdb,snapshot=external,file=\(cli.pool)/vdb.s2")
        try await cli.fill(s2, 13, at: at)
        let built = try await tree(name)
        #expect(built == ["s1": "", "s2": "s1"], "\(built)")

        // Import: vda is a qcow2 chain that starts on the raw image (the guest's qcow2 header and
        // snapshot in it are data, not layers or snapshots).
        let imported = try await cli.ok("domain", "import", "--libvirt", name)
        #expect(imported.contains("vda (qcow2)") && imported.contains("snapshots: s1, s2; current s2"), "\(imported)")
        let (vmsnapBuilt, current) = try await Self.vmsnapTree(cli, name)
        #expect(vmsnapBuilt == built && current == "s2", "\(vmsnapBuilt) current \(current ?? "-")")
        try await cli.ok("disk", "check", s2)
        // The domain each snapshot was taken from: s1's ran vda on the raw image, named as libvirt
        // named it; s2's on s1's layer.
        let s1XML = try await cli.ok("snapshot", "dumpxml", name, "s1")
        #expect(
            s1XML.contains(
                "<disk type='\(base.diskType)' device='disk'>\n        <driver name='qemu' type='raw'/>\n        <source \(base.sourceAttribute)='\(base.path)'/>"
            ), "\(s1XML)")
        let s2XML = try await cli.ok("snapshot", "dumpxml", name, "s2")
        #expect(
            s2XML.contains("<driver name='qemu' type='qcow2'/>\n        <source file='\(s1)'/>"),
            "at s2 the domain ran vda on s1's layer: \(s2XML)")

        // Revert to s2, then delete it: s1's layer has two layers on it (the one the revert left
        // and the new one), so each is rebased onto the raw base, and reads it as raw.
        try await cli.ok("snapshot", "revert", name, "s2")
        let onS1 = try await cli.list(s2).active
        try await cli.expectHolds(onS1, 12, at: at)
        try await cli.ok("snapshot", "delete", name, "s2")
        #expect(!FileManager.default.fileExists(atPath: s1), "s1's layer was merged away")
        try await cli.expectHolds(onS1, 12, at: at)
        let rebased = try await runner.run(["qemu-img", "info", "--output=json", onS1]).standardOutput
        #expect(
            rebased.contains("\"backing-filename-format\": \"raw\"")
                && rebased.contains("\"backing-filename\": \"\(base.path)\""), "\(rebased)")
        try await cli.ok("disk", "check", s2)

        // Revert to s1: vda reads what the raw base held when libvirt froze it.
        try await cli.ok("snapshot", "revert", name, "s1")
        let active = try await cli.list(s2).active
        #expect(![s1, s2, onS1].contains(active), "the revert made a new layer on the raw base: \(active)")
        try await cli.expectHolds(active, 11, at: at)
        let info = try await runner.run(["qemu-img", "info", "--output=json", active]).standardOutput
        #expect(info.contains("\"backing-filename-format\": \"raw\""), "the new layer reads its base as raw: \(info)")

        // Delete s1 while the domain runs: the raw base cannot move into a qcow2 layer's place, so
        // it stays the base (the hypervisor's merge would have pulled it up and removed it).
        try await cli.ok("domain", "start", name)
        try await cli.ok("snapshot", "delete", name, "s1")
        try await cli.ok("domain", "stop", name, "--force")
        #expect(FileManager.default.fileExists(atPath: base.path))
        let chain = try await runner.run(["qemu-img", "info", "--output=json", active]).standardOutput
        #expect(chain.contains("\"backing-filename\": \"\(base.path)\""), "\(chain)")
        try await cli.expectHolds(active, 11, at: at)
        try await cli.ok("snapshot", "create", name, "--name", "v1")
        let top = try await cli.list(s2).active
        try await cli.fill(top, 14, at: at)
        let (after, currentAfter) = try await Self.vmsnapTree(cli, name)
        #expect(after == ["v1": ""] && currentAfter == "v1", "\(after) current \(currentAfter ?? "-")")
        try await cli.ok("disk", "check", s2)

        // Back to libvirt: the tree it redefines is vmsnap's.
        let export = try await cli.ok("domain", "export", name, "--to", cli.root + "/\(name)-export")
        let exported = try String(contentsOfFile: cli.root + "/\(name)-export/domain.xml", encoding: .utf8)
        #expect(
            exported.contains("<driver name='qemu' type='qcow2'/>") && !exported.contains(base.path),
            "the exported domain runs the current layer, not the raw base: \(exported)")
        _ = try await virsh("undefine", name, "--snapshots-metadata")
        try await runVirshLines(export)
        let back = try await tree(name)
        #expect(back == after, "libvirt has vmsnap's tree: \(back)")
        let v1 = try await virsh("snapshot-dumpxml", name, "v1")
        #expect(v1.contains("<disk name='vda' snapshot='internal'/>"), "\(v1)")

        // libvirt reverts to the snapshot vmsnap took (internal, in the layer over the raw base):
        // the write made after it is gone.
        _ = try await virsh("snapshot-revert", name, "v1")
        try await cli.expectHolds(top, 11, at: at)
    }

    /// Stops vmsnap's own QEMU for the domain (a test that failed while it ran) and forgets the
    /// domain in libvirt; quiet when either is gone already.
    func cleanUp(_ cli: CLI, _ domain: String) async {
        _ = try? await cli.run(["domain", "stop", domain, "--force"])
        await undefine(domain)
    }
}
