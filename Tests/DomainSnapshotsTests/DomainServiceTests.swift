import DomainSnapshots
import Foundation
import HypervisorDriver
import LVMBackend
import Qcow2Backend
import QEMUDriver
import SnapshotCore
import Testing
import VHDBackend

#if canImport(FoundationXML)
    import FoundationXML
#endif

let hasQemuImg = FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-img")

/// The domain layer through its library API, with the real QEMU driver and qcow2 backend.
@Suite("Domain service", .enabled(if: hasQemuImg, "needs qemu-img"))
struct DomainServiceTests {
    let dir: String
    let service: DomainService

    init() throws {
        dir = NSTemporaryDirectory() + "vmsnap-domains-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir + "/pool", withIntermediateDirectories: true)
        let store = try MetadataStore(directory: dir + "/store")
        let registry = BackendRegistry()
        for f in [Qcow2Backend.factory, VHDBackend.factory, LVMBackend.factory] { try registry.register(f) }
        let disks = DiskSnapshotService(store: store, registry: registry, notify: { _ in })
        service = DomainService(disks: disks, drivers: HypervisorDrivers([QEMUDriver(storeDirectory: store.directory)]))
    }

    func disk(_ name: String) async throws -> String {
        let path = dir + "/pool/\(name).qcow2"
        try await SubprocessRunner().run(["qemu-img", "create", "-q", "-f", "qcow2", path, "4M"])
        return path
    }

    @Test("a libvirt domain whose memory backing is refused is not imported, and none of its disks is adopted")
    func importRefusedBeforeAnyDiskIsAdopted() async throws {
        let a = try await disk("imp")
        // 1 GiB pages for 1,025 MiB: the page size is valid, the memory no whole number of pages.
        let xml = """
            <domain type='qemu'><name>imp</name><memory unit='MiB'>1025</memory>
            <memoryBacking><hugepages><page size='1' unit='G'/></hugepages></memoryBacking>
            <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
            <source file='\(a)'/><target dev='vda' bus='virtio'/></disk></devices></domain>
            """
        let error = await #expect(throws: SnapshotError.self) {
            _ = try await service.importDomain(domainXML: xml, snapshotXMLs: [], current: nil)
        }
        #expect(error?.message.contains("huge pages") == true, "\(String(describing: error))")
        #expect(try service.disks.store.disks().isEmpty, "a refused import adopted no disk")
        #expect(try service.disks.store.domain(named: "imp") == nil)
    }

    @Test("a domain whose hypervisor has no driver, or with an option its driver refuses, is not defined")
    func unknownHypervisor() async throws {
        let a = try await disk("a")
        let xen = DomainDefinition(
            name: "x", memoryMiB: 64, disks: [DomainDisk(target: "vda", backend: "qcow2", locator: a)],
            hypervisor: "xen")
        let error = await #expect(throws: SnapshotError.self) { try await service.define(xen) }
        #expect(
            error?.code == .unsupported && error?.message.contains("no hypervisor driver named 'xen'") == true
                && error?.message.contains("qemu") == true,
            "\(String(describing: error))")
        let bad = DomainDefinition(
            name: "y", memoryMiB: 64, disks: [DomainDisk(target: "vda", backend: "qcow2", locator: a)], accel: "hvf")
        await #expect(throws: SnapshotError.self) { try await service.define(bad) }
        #expect(try service.store.domains().isEmpty, "nothing was defined")
    }

    @Test("a shut-off domain: disk-only snapshots through the backends, revert and delete, tree and current snapshot")
    func shutOff() async throws {
        let a = try await disk("a"), b = try await disk("b")
        try await service.define(
            DomainDefinition(
                name: "off", memoryMiB: 64,
                disks: [
                    DomainDisk(target: "vda", backend: "qcow2", locator: a),
                    DomainDisk(target: "vdb", backend: "qcow2", locator: b),
                ]))
        let s1 = try await service.createSnapshot(domain: "off", DomainSnapshotRequest(name: "s1")).snapshot
        #expect(s1.isDiskOnly && s1.state == .shutoff && s1.disks.allSatisfy { $0.kind == .internal })
        try await service.createSnapshot(domain: "off", DomainSnapshotRequest(name: "s2"))
        #expect(try service.snapshots(of: "off").current == "s2")
        try await service.revertSnapshot(domain: "off", to: "s1")
        #expect(try service.snapshots(of: "off").current == "s1")
        try await service.deleteSnapshot(domain: "off", "s2", mode: .merge)
        #expect(try service.snapshots(of: "off").all.map(\.name) == ["s1"])
        #expect(try await service.runState("off") == .shutoff)
    }

    @Test("snapshot XML names each disk the way its backend declares: driver type and source type")
    func xmlFromDescriptors() async throws {
        let a = try await disk("a")
        let definition = DomainDefinition(
            name: "mixed", memoryMiB: 64,
            disks: [
                DomainDisk(target: "vda", backend: "qcow2", locator: a),
                DomainDisk(target: "vdb", backend: "lvm", locator: "vg0/data"),
                DomainDisk(target: "vdc", backend: "vhd", locator: "/vm/c.vhd"),
            ])
        let record = DomainSnapshotRecord(
            domain: "mixed", name: "s", parent: nil, description: nil,
            createdAt: Date(timeIntervalSince1970: 1_700_000_000),
            state: .shutoff, memory: nil, disks: [], definition: definition)
        let backends: [any DiskSnapshotBackend] = [Qcow2Backend(), VHDBackend(), LVMBackend()]
        var descriptors: [BackendKind: BackendDescriptor] = [:]
        for backend in backends { descriptors[backend.kind] = backend.descriptor }
        let xml = SnapshotXML.render(record, layouts: [:], descriptors: descriptors, domainType: "qemu")
        #expect(
            xml.contains(
                "<disk type='file' device='disk'>\n        <driver name='qemu' type='qcow2'/>\n        <source file='\(a)'/>"
            ), "\(xml)")
        #expect(
            xml.contains(
                "<disk type='block' device='disk'>\n        <driver name='qemu' type='raw'/>\n        <source dev='/dev/vg0/data'/>"
            ), "\(xml)")
        #expect(xml.contains("<driver name='qemu' type='vpc'/>\n        <source file='/vm/c.vhd'/>"), "\(xml)")
    }
}

/// libvirt's `<memoryBacking><hugepages>` and vmsnap's `memoryBacking`: read on import, written in
/// the domain XML vmsnap gives libvirt; what vmsnap does not model is named, not dropped silently.
@Suite("libvirt domain XML: huge-page memory")
struct LibvirtMemoryBackingTests {
    func parse(_ backing: String) throws -> LibvirtDomainXML.Parsed {
        let xml = "<domain type='kvm'><name>d</name><memory unit='MiB'>2048</memory>\(backing)</domain>"
        return try LibvirtDomainXML.parse(try XMLDocument(xmlString: xml).rootElement()!)
    }

    @Test("hugepages with no size, 2 MiB and 1 GiB pages are read; per-node sizes and other settings are named")
    func importRead() throws {
        #expect(try parse("<memoryBacking><hugepages/></memoryBacking>").memoryBacking?.hugepageMiB == 2)
        let gig = try parse("<memoryBacking><hugepages><page size='1' unit='G'/></hugepages></memoryBacking>")
        #expect(gig.memoryBacking?.hugepageMiB == 1024 && gig.unmodeled.isEmpty, "\(gig.unmodeled)")
        #expect(try parse("").memoryBacking == nil)

        let locked = try parse("<memoryBacking><hugepages/><locked/></memoryBacking>")
        #expect(locked.memoryBacking?.hugepageMiB == 2)
        #expect(locked.unmodeled == ["<memoryBacking><locked>"])
        let perNode = try parse(
            "<memoryBacking><hugepages><page size='2048' unit='KiB' nodeset='0'/></hugepages></memoryBacking>")
        #expect(perNode.memoryBacking == nil && perNode.unmodeled.count == 1, "\(perNode.unmodeled)")
        let odd = try parse("<memoryBacking><hugepages><page size='16' unit='M'/></hugepages></memoryBacking>")
        #expect(odd.memoryBacking == nil && odd.unmodeled.first?.contains("16 M") == true, "\(odd.unmodeled)")
    }

    @Test("a memory or page size too large for any host, or no number, is refused with the reason")
    func sizesRefused() throws {
        let huge = "<domain type='kvm'><name>d</name><memory unit='GiB'>9223372036854775807</memory></domain>"
        let error = #expect(throws: SnapshotError.self) {
            try LibvirtDomainXML.parse(try XMLDocument(xmlString: huge).rootElement()!)
        }
        #expect(error?.message.contains("larger than any host") == true, "\(String(describing: error))")
        let negative = "<domain type='kvm'><name>d</name><memory unit='MiB'>-5</memory></domain>"
        #expect(throws: SnapshotError.self) {
            try LibvirtDomainXML.parse(try XMLDocument(xmlString: negative).rootElement()!)
        }
        let page = try parse(
            "<memoryBacking><hugepages><page size='9223372036854775807' unit='G'/></hugepages></memoryBacking>")
        #expect(page.memoryBacking == nil && page.unmodeled.count == 1, "\(page.unmodeled)")
    }

    @Test("the domain XML for libvirt carries the page size, and reads back the same")
    func renderedAndReadBack() throws {
        let def = DomainDefinition(
            name: "d", memoryMiB: 2048, disks: [], boot: DomainBoot(kernel: "/k"),
            memoryBacking: DomainMemoryBacking(hugepageMiB: 1024))
        let xml = LibvirtDomainXML.render(def, sources: [:], descriptors: [:], domainType: "qemu")
        #expect(xml.contains("<memoryBacking><hugepages><page size='1048576' unit='KiB'/></hugepages></memoryBacking>"))
        let back = try LibvirtDomainXML.parse(try XMLDocument(xmlString: xml).rootElement()!)
        #expect(back.memoryBacking == def.memoryBacking && back.unmodeled.isEmpty, "\(back.unmodeled)")
    }
}
