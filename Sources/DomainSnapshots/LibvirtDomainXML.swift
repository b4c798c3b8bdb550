import Foundation
import HypervisorDriver
import SnapshotCore

#if canImport(FoundationXML)
    import FoundationXML
#endif

/// libvirt's `<domain>` XML, both ways: written for `domain export` and inside snapshot XML,
/// read by `domain import`. Disks are named the way their backend declares (driver type, source
/// type); what vmsnap does not model is reported by name on import, never dropped silently.
public enum LibvirtDomainXML {
    /// One disk as libvirt's XML names it.
    public struct Disk: Sendable, Hashable {
        public var target: String
        public var sourceType: DiskSourceType
        public var driverType: String
        /// The file or device the domain opens (the top of the backing chain).
        public var source: String
    }

    /// A domain read from XML: what vmsnap models, and what it does not.
    public struct Parsed: Sendable {
        public var name: String
        public var uuid: UUID?
        public var memoryMiB: Int
        public var vcpus: Int
        /// `<memoryBacking><hugepages>`: huge pages of one size for all of the guest's memory.
        public var memoryBacking: DomainMemoryBacking?
        public var boot: DomainBoot
        public var domainType: String
        public var disks: [Disk]
        /// Devices and settings vmsnap does not keep (`interface`, `graphics`, ...), by name.
        public var unmodeled: [String]
    }

    static func escape(_ s: String) -> String { SnapshotXML.escape(s) }

    /// libvirt's (and QEMU's) name for an image without a format: the bytes are the disk.
    public static let unformatted = "raw"

    /// `<domain>` for `definition`, with each disk's source (`sources[target]`, else its locator)
    /// and the source and driver types its backend declares (or `named[target]`, as libvirt named
    /// that image), and the rest of the hardware as the domain's driver describes it; `indent`
    /// spaces before each line.
    public static func render(
        _ def: DomainDefinition, sources: [String: String], descriptors: [BackendKind: BackendDescriptor],
        domainType: String, hardware: LibvirtHardware = LibvirtHardware(),
        indent: Int = 0, named: [String: (DiskSourceType, String)] = [:]
    ) -> String {
        let pad = String(repeating: " ", count: indent)
        var x = "\(pad)<domain type='\(escape(domainType))'>\n"
        x += "\(pad)  <name>\(escape(def.name))</name>\n\(pad)  <uuid>\(def.uuid.uuidString.lowercased())</uuid>\n"
        x += "\(pad)  <memory unit='KiB'>\(def.memoryMiB * 1024)</memory>\n\(pad)  <vcpu>\(def.vcpus)</vcpu>\n"
        if let backing = def.memoryBacking {
            x += "\(pad)  <memoryBacking><hugepages><page size='\(backing.hugepageMiB * 1024)' unit='KiB'/></hugepages>"
            x += "</memoryBacking>\n"
        }
        x += "\(pad)  <os>\n\(pad)    <type arch='x86_64' machine='\(escape(hardware.machine))'>hvm</type>\n"
        if let f = def.firmware {
            x += "\(pad)    <loader readonly='yes' type='pflash'>\(escape(f.code))</loader>\n"
            x += "\(pad)    <nvram\(f.template.map { " template='\(escape($0))'" } ?? "")>\(escape(f.vars))</nvram>\n"
        }
        if let k = def.boot.kernel { x += "\(pad)    <kernel>\(escape(k))</kernel>\n" }
        if let i = def.boot.initrd { x += "\(pad)    <initrd>\(escape(i))</initrd>\n" }
        if let c = def.boot.cmdline { x += "\(pad)    <cmdline>\(escape(c))</cmdline>\n" }
        x += "\(pad)  </os>\n"
        if !hardware.features.isEmpty {
            x += "\(pad)  <features>" + hardware.features.map { "<\(escape($0))/>" }.joined() + "</features>\n"
        }
        x += "\(pad)  <devices>\n"
        for (index, disk) in def.disks.enumerated() {
            let type = named[disk.target]?.0 ?? descriptors[disk.backend]?.sourceType ?? .file
            x += "\(pad)    <disk type='\(type.rawValue)' device='disk'>\n"
            if let format = named[disk.target]?.1 ?? descriptors[disk.backend]?.imageFormat {
                x += "\(pad)      <driver name='qemu' type='\(escape(format))'/>\n"
            }
            x += "\(pad)      \(SnapshotXML.source(sources[disk.target] ?? disk.locator, type: type))\n"
            x += "\(pad)      <target dev='\(escape(disk.target))' bus='virtio'/>\n"
            if let first = hardware.firstDiskSlot { x += "\(pad)      \(pciAddress(slot: first + index))\n" }
            x += "\(pad)    </disk>\n"
        }
        if let t = def.tpm {
            x += "\(pad)    <tpm model='\(escape(t.model))'>\n\(pad)      <backend type='emulator' version='2.0'/>\n"
            x += "\(pad)    </tpm>\n"
        }
        x += otherDevices(hardware, domain: def.name, pad: pad + "    ")
        x += "\(pad)  </devices>\n\(pad)</domain>\n"
        return x
    }

    static func pciAddress(slot: Int) -> String {
        "<address type='pci' domain='0x0000' bus='0x00' slot='0x\(String(format: "%02x", slot))' function='0x0'/>"
    }

    /// Where libvirt keeps a domain's serial console output: its own log folder, which exists
    /// wherever libvirt's QEMU driver runs.
    public static func serialLog(domain: String) -> String { "/var/log/libvirt/qemu/\(domain)-serial.log" }

    /// The serial console, the guest agent's channel, and the devices libvirt must leave out.
    static func otherDevices(_ hardware: LibvirtHardware, domain: String, pad: String) -> String {
        var x = ""
        if hardware.withoutUSBAndBalloon { x += "\(pad)<controller type='usb' model='none'/>\n" }
        if let slot = hardware.agentChannelSlot {
            x += "\(pad)<controller type='virtio-serial' index='0'>\n\(pad)  \(pciAddress(slot: slot))\n"
            x += "\(pad)</controller>\n"
            // No path: libvirt makes the socket in its own channel directory.
            x += "\(pad)<channel type='unix'>\n\(pad)  <source mode='bind'/>\n"
            x += "\(pad)  <target type='virtio' name='org.qemu.guest_agent.0'/>\n\(pad)</channel>\n"
        }
        if hardware.serialConsole {
            // A pty (`virsh console`), its output also kept in libvirt's log folder.
            x += "\(pad)<serial type='pty'>\n\(pad)  <log file='\(escape(serialLog(domain: domain)))' append='on'/>\n"
            x += "\(pad)  <target port='0'/>\n\(pad)</serial>\n"
        }
        if hardware.withoutUSBAndBalloon { x += "\(pad)<memballoon model='none'/>\n" }
        return x
    }

    /// Reads a `<domain>` element (a whole `virsh dumpxml`, or the one inside a snapshot).
    public static func parse(_ domain: XMLElement) throws -> Parsed {
        func child(_ e: XMLElement, _ n: String) -> XMLElement? { e.elements(forName: n).first }
        func text(_ e: XMLElement?) -> String? { e?.stringValue?.trimmingCharacters(in: .whitespacesAndNewlines) }
        guard domain.name == "domain" else {
            throw SnapshotError(.invalidArgument, "expected a <domain> element, found <\(domain.name ?? "?")>")
        }
        guard let name = text(child(domain, "name")), !name.isEmpty else {
            throw SnapshotError(.invalidArgument, "the domain XML has no <name>")
        }
        var unmodeled: [String] = []
        let known: Set<String> = [
            "name", "uuid", "memory", "currentMemory", "vcpu", "os", "devices", "on_poweroff", "on_reboot", "on_crash",
            "resource", "clock", "features", "cpu", "pm", "seclabel", "metadata", "description", "title",
            "memoryBacking",
        ]
        for e in domain.children?.compactMap({ $0 as? XMLElement }) ?? [] where !known.contains(e.name ?? "") {
            unmodeled.append("<\(e.name ?? "?")>")
        }
        let memoryBacking = child(domain, "memoryBacking").flatMap { hugepages($0, unmodeled: &unmodeled) }
        let memory = try kibibytes(child(domain, "memory"))
        let vcpus = Int(text(child(domain, "vcpu")) ?? "1") ?? 1
        let os = child(domain, "os")
        let boot = DomainBoot(
            kernel: text(os.flatMap { child($0, "kernel") }), initrd: text(os.flatMap { child($0, "initrd") }),
            cmdline: text(os.flatMap { child($0, "cmdline") }))
        // UEFI firmware: libvirt keeps the variable store in its own place; vmsnap would boot the
        // domain with SeaBIOS. Named, so the operator adds `firmware` to the definition.
        for e in ["loader", "nvram"] where os.flatMap({ child($0, e) }) != nil {
            unmodeled.append("<os><\(e)> (UEFI firmware: give the domain a firmware section)")
        }
        var disks: [Disk] = []
        let ignoredDevices: Set<String> = [
            "emulator", "serial", "console", "controller", "memballoon", "input", "rng", "channel",
        ]
        for device in child(domain, "devices")?.children?.compactMap({ $0 as? XMLElement }) ?? [] {
            guard device.name == "disk" else {
                if !ignoredDevices.contains(device.name ?? "") { unmodeled.append("device <\(device.name ?? "?")>") }
                continue
            }
            let target = child(device, "target")?.attribute(forName: "dev")?.stringValue ?? "?"
            guard (device.attribute(forName: "device")?.stringValue ?? "disk") == "disk" else {
                unmodeled.append("disk \(target) (device='\(device.attribute(forName: "device")?.stringValue ?? "")')")
                continue
            }
            let type = device.attribute(forName: "type")?.stringValue ?? "file"
            let source = child(device, "source")
            let path: String?
            let sourceType: DiskSourceType
            switch type {
            case "file":
                sourceType = .file
                path = source?.attribute(forName: "file")?.stringValue
            case "block":
                sourceType = .block
                path = source?.attribute(forName: "dev")?.stringValue
            case "network":
                sourceType = .network
                path = source?.attribute(forName: "name")?.stringValue
            default:
                unmodeled.append("disk \(target) (type='\(type)')")
                continue
            }
            guard let path, !path.isEmpty else {
                unmodeled.append("disk \(target) (no source)")
                continue
            }
            // libvirt reads a disk without a driver type as unformatted bytes.
            let driverType = child(device, "driver")?.attribute(forName: "type")?.stringValue ?? Self.unformatted
            disks.append(Disk(target: target, sourceType: sourceType, driverType: driverType, source: path))
        }
        return Parsed(
            name: name, uuid: text(child(domain, "uuid")).flatMap(UUID.init(uuidString:)),
            memoryMiB: max(memory >> 10, 1),
            vcpus: vcpus, memoryBacking: memoryBacking, boot: boot,
            domainType: domain.attribute(forName: "type")?.stringValue ?? "qemu",
            disks: disks,
            unmodeled: unmodeled)
    }

    /// The huge pages of `<memoryBacking>`: one page size for all memory (none given: the
    /// host's default, 2 MiB). Anything else in it (per-NUMA-node sizes, locked, shared,
    /// file-backed memory) is named in `unmodeled`.
    static func hugepages(_ backing: XMLElement, unmodeled: inout [String]) -> DomainMemoryBacking? {
        var found: DomainMemoryBacking?
        for e in backing.children?.compactMap({ $0 as? XMLElement }) ?? [] {
            guard e.name == "hugepages" else {
                unmodeled.append("<memoryBacking><\(e.name ?? "?")>")
                continue
            }
            let pages = e.elements(forName: "page")
            guard pages.count <= 1, pages.first?.attribute(forName: "nodeset") == nil else {
                unmodeled.append("<memoryBacking><hugepages> (page sizes per NUMA node)")
                continue
            }
            guard let page = pages.first else {
                found = DomainMemoryBacking(hugepageMiB: 2)
                continue
            }
            let kib = try? kibibytes(page, value: page.attribute(forName: "size")?.stringValue)
            guard let kib, kib % 1024 == 0, DomainMemoryBacking.hugepageSizes.contains(kib / 1024) else {
                unmodeled.append(
                    "<memoryBacking><hugepages> (page size \(page.attribute(forName: "size")?.stringValue ?? "?") \(page.attribute(forName: "unit")?.stringValue ?? "KiB"): vmsnap takes 2 MiB or 1 GiB)"
                )
                continue
            }
            found = DomainMemoryBacking(hugepageMiB: kib / 1024)
        }
        return found
    }

    /// `<memory unit='...'>N</memory>` in KiB.
    /// A size element's `value` (its text unless given: `<page size=...>` holds it in an
    /// attribute) in KiB, read in its `unit` (default KiB).
    static func kibibytes(_ e: XMLElement?, value: String? = nil) throws -> Int {
        let text = (value ?? e?.stringValue)?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
        guard let e, let n = Int(text), n > 0 else {
            throw SnapshotError(
                .invalidArgument,
                "the domain XML's \(e.map { "<\($0.name ?? "?")>" } ?? "<memory>") size '\(text)' is no positive whole number; give one, with a unit such as unit='MiB'"
            )
        }
        let unit = (e.attribute(forName: "unit")?.stringValue ?? "KiB").lowercased()
        let factor: [String: Int] = [
            "b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1 << 20, "mib": 1 << 20, "mb": 1_000_000,
            "g": 1 << 30, "gib": 1 << 30, "gb": 1_000_000_000,
        ]
        guard let f = factor[unit] else {
            throw SnapshotError(.invalidArgument, "the domain XML's memory unit '\(unit)' is not one vmsnap knows")
        }
        let (bytes, overflow) = n.multipliedReportingOverflow(by: f)
        guard !overflow else {
            throw SnapshotError(
                .invalidArgument,
                "the domain XML's memory size \(n) \(unit) is larger than any host's; give the guest's size")
        }
        return bytes / 1024
    }

    /// The root element of an XML document.
    static func root(_ text: String, what: String) throws -> XMLElement {
        do {
            guard let root = try XMLDocument(xmlString: text, options: []).rootElement() else {
                throw SnapshotError(.invalidArgument, "the \(what) has no root element")
            }
            return root
        } catch let e as SnapshotError { throw e } catch {
            throw SnapshotError(.invalidArgument, "the \(what) does not parse as XML: \(error.localizedDescription)")
        }
    }
}
