import Foundation
#if canImport(FoundationXML)
    import FoundationXML
#endif
import HypervisorDriver
import SnapshotCore

/// libvirt's `<domainsnapshot>` XML: written by `snapshot dumpxml`, read by `create --redefine`.
public enum SnapshotXML {
    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "'", with: "&apos;")
            .replacingOccurrences(of: "\"", with: "&quot;")
    }

    /// libvirt's state words: a running or paused snapshot without memory is `disk-snapshot`.
    static func stateWord(_ r: DomainSnapshotRecord) -> String {
        if r.isDiskOnly, r.state != .shutoff { return "disk-snapshot" }
        return r.state.rawValue
    }

    /// A disk's `<source>` element: a file, a block device (LVM's `vg/lv` under /dev), a
    /// network volume.
    static func source(_ locator: String, type: DiskSourceType) -> String {
        switch type {
        case .file: return "<source file='\(escape(locator))'/>"
        case .block: return "<source dev='\(escape(locator.hasPrefix("/") ? locator : "/dev/" + locator))'/>"
        case .network: return "<source name='\(escape(locator))'/>"
        }
    }

    /// `descriptors` says, per backend kind, how libvirt names its disks (source type, format);
    /// `domainType` is libvirt's `<domain type>` and `hardware` the rest of the machine, as the
    /// domain's driver names them.
    public static func render(
        _ r: DomainSnapshotRecord, layouts: [String: DiskLayout], descriptors: [BackendKind: BackendDescriptor],
        domainType: String, hardware: LibvirtHardware = LibvirtHardware()
    ) -> String {
        var x = "<domainsnapshot>\n  <name>\(escape(r.name))</name>\n"
        if let d = r.description { x += "  <description>\(escape(d))</description>\n" }
        x += "  <state>\(stateWord(r))</state>\n"
        if let p = r.parent { x += "  <parent>\n    <name>\(escape(p))</name>\n  </parent>\n" }
        x += "  <creationTime>\(Int64(r.createdAt.timeIntervalSince1970))</creationTime>\n"
        switch r.memory?.location {
        case .external?: x += "  <memory snapshot='external' file='\(escape(r.memory!.path))'/>\n"
        case .internal?: x += "  <memory snapshot='internal'/>\n"
        case nil: x += "  <memory snapshot='no'/>\n"
        }
        x += "  <disks>\n"
        for d in r.disks {
            guard let kind = d.kind else {
                x += "    <disk name='\(d.target)' snapshot='no'/>\n"
                continue
            }
            if kind == .external, let layout = layouts[d.diskID], let snap = layout.snapshot(named: r.name) {
                // libvirt names the overlay the snapshot created (the new active layer then).
                let overlays = layout.layers.filter { $0.backing == snap.image }.map(\.image)
                let source = overlays.first { $0.contains(".\(r.name).") } ?? overlays.first ?? snap.image
                let type = descriptors[d.backend]?.sourceType ?? .file
                x += "    <disk name='\(d.target)' snapshot='external' type='\(type.rawValue)'>\n"
                if let format = descriptors[d.backend]?.imageFormat {
                    x += "      <driver type='\(escape(format))'/>\n"
                }
                x += "      \(Self.source(source, type: type))\n    </disk>\n"
            } else {
                x += "    <disk name='\(d.target)' snapshot='\(kind.rawValue)'/>\n"
            }
        }
        x += "  </disks>\n"
        // The domain as it was: each disk's source is the image it had open then.
        var sources: [String: String] = [:]
        var named: [String: (DiskSourceType, String)] = [:]
        for d in r.disks {
            if let source = d.source { sources[d.target] = source }
            if let type = d.sourceType, let format = d.sourceFormat { named[d.target] = (type, format) }
        }
        x += LibvirtDomainXML.render(
            r.definition, sources: sources, descriptors: descriptors, domainType: domainType, hardware: hardware,
            indent: 2, named: named)
        x += "</domainsnapshot>\n"
        return x
    }

    /// Reads a `<domainsnapshot>` document into a record for `domain`, whose current definition
    /// supplies what the XML does not carry (disk backends and identities).
    public static func parse(_ text: String, domain: DomainDefinition, diskIDs: [String: (String, BackendKind)]) throws
        -> DomainSnapshotRecord
    {
        let doc: XMLDocument
        do { doc = try XMLDocument(xmlString: text, options: []) } catch {
            throw SnapshotError(.invalidArgument, "the snapshot XML does not parse: \(error.localizedDescription)")
        }
        guard let root = doc.rootElement(), root.name == "domainsnapshot" else {
            throw SnapshotError(.invalidArgument, "the snapshot XML's root element must be <domainsnapshot>")
        }
        func child(_ e: XMLElement, _ n: String) -> XMLElement? { e.elements(forName: n).first }
        guard let name = child(root, "name")?.stringValue?.trimmingCharacters(in: .whitespacesAndNewlines),
            !name.isEmpty
        else {
            throw SnapshotError(.invalidArgument, "the snapshot XML has no <name>")
        }
        try SnapshotName.validate(name)
        let stateText = child(root, "state")?.stringValue?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "shutoff"
        let state: DomainRunState
        switch stateText {
        case "running", "disk-snapshot": state = .running
        case "paused": state = .paused
        case "shutoff", "shutdown": state = .shutoff
        default:
            throw SnapshotError(
                .invalidArgument,
                "the snapshot XML's <state> '\(stateText)' is not one of running, paused, shutoff, disk-snapshot")
        }
        var memory: MemoryImage?
        if let m = child(root, "memory"), let kind = m.attribute(forName: "snapshot")?.stringValue {
            switch kind {
            case "external":
                guard let file = m.attribute(forName: "file")?.stringValue else {
                    throw SnapshotError(.invalidArgument, "<memory snapshot='external'> needs a file attribute")
                }
                guard FileManager.default.fileExists(atPath: file) else {
                    throw SnapshotError(.notFound, "the memory image \(file) named in the XML does not exist")
                }
                memory = MemoryImage(
                    location: .external, path: file,
                    size: (try? FileManager.default.attributesOfItem(atPath: file)[.size] as? UInt64) ?? nil)
            case "internal": memory = MemoryImage(location: .internal, path: domain.disks.first?.target ?? "")
            case "no": memory = nil
            default:
                throw SnapshotError(.invalidArgument, "<memory snapshot='\(kind)'> is not external, internal or no")
            }
        }
        if stateText == "disk-snapshot", memory != nil {
            throw SnapshotError(.invalidArgument, "a disk-snapshot state cannot carry memory")
        }
        // The image each disk had open when the snapshot was taken, as the embedded <domain> says
        // (libvirt records the definition from before an external snapshot's new overlay).
        var sources: [String: LibvirtDomainXML.Disk] = [:]
        if let embedded = child(root, "domain"), let parsed = try? LibvirtDomainXML.parse(embedded) {
            for disk in parsed.disks { sources[disk.target] = disk }
        }
        var disks: [DomainSnapshotDisk] = []
        for e in child(root, "disks")?.elements(forName: "disk") ?? [] {
            guard let target = e.attribute(forName: "name")?.stringValue else {
                throw SnapshotError(.invalidArgument, "a <disk> in the XML has no name")
            }
            guard let (id, backend) = diskIDs[target] else {
                throw SnapshotError(
                    .notFound, "the XML names disk \(target), which domain '\(domain.name)' does not have")
            }
            let kindText = e.attribute(forName: "snapshot")?.stringValue ?? "no"
            let kind: SnapshotKind? = kindText == "no" ? nil : SnapshotKind(rawValue: kindText)
            if kindText != "no", kind == nil {
                throw SnapshotError(
                    .invalidArgument, "disk \(target): snapshot='\(kindText)' is not internal, external or no")
            }
            let was = sources[target]
            disks.append(
                DomainSnapshotDisk(
                    target: target, diskID: id, backend: backend, kind: kind, source: was?.source,
                    sourceType: was.map(\.sourceType), sourceFormat: was.map(\.driverType)))
        }
        let created =
            Int64(child(root, "creationTime")?.stringValue?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "")
            ?? Int64(Date().timeIntervalSince1970)
        return DomainSnapshotRecord(
            domain: domain.name, name: name, parent: child(root, "parent").flatMap { child($0, "name")?.stringValue },
            description: child(root, "description")?.stringValue,
            createdAt: Date(timeIntervalSince1970: TimeInterval(created)),
            state: state, memory: memory, disks: disks.sorted { $0.target < $1.target }, definition: domain)
    }
}

extension DomainService {
    public func dumpXML(domain: String, _ name: String) throws -> String {
        let record = try info(domain: domain, name)
        var layouts: [String: DiskLayout] = [:]
        var descriptors: [BackendKind: BackendDescriptor] = [:]
        for d in record.disks {
            layouts[d.diskID] = try store.layout(diskID: d.diskID)
            if descriptors[d.backend] == nil {
                descriptors[d.backend] = try disks.registry.backend(d.backend, environment: disks.environment)
                    .descriptor
            }
        }
        let driver = try drivers.driver(for: record.definition)
        return SnapshotXML.render(
            record, layouts: layouts, descriptors: descriptors, domainType: driver.libvirtDomainType(record.definition),
            hardware: driver.libvirtHardware(record.definition))
    }

    /// The embedded <domain>'s image for a disk, kept only when it is one of that disk's own
    /// images (an export never hands libvirt a path the XML alone made up), with the format the
    /// storage records for it, not the one the XML claims: the backend's own, or for a lower
    /// image the one the layer above records (the raw image a chain starts on).
    func checkedSource(_ disk: DomainSnapshotDisk) async throws -> DomainSnapshotDisk {
        var d = disk
        (d.sourceType, d.sourceFormat) = (nil, nil)
        guard let source = d.source else { return d }
        let backend = try disks.registry.backend(d.backend, environment: disks.environment)
        let path = backend.normalize(locator: source)
        guard let layout = try store.layout(diskID: d.diskID),
            let image = [source, path].first(where: {
                [layout.disk.id, layout.disk.active].contains($0) || layout.layer($0) != nil
            })
        else {
            d.source = nil
            return d
        }
        guard image != layout.disk.active, image != layout.disk.id else { return d }
        let info = try? await backend.inspect(locator: layout.disk.active)
        guard let info, let k = info.backingChain.firstIndex(of: image), let formats = info.backingFormats,
            k < formats.count, !formats[k].isEmpty, formats[k] != backend.descriptor.imageFormat
        else { return d }
        var st = stat()
        d.sourceFormat = formats[k]
        d.sourceType = stat(image, &st) == 0 && (st.st_mode & S_IFMT) == S_IFBLK ? .block : .file
        return d
    }

    /// Imports a snapshot record from XML (`create --redefine`): every disk snapshot it names
    /// must exist on its disk already; nothing on storage changes.
    public func redefine(domain: String, xml: String, makeCurrent: Bool) async throws -> DomainSnapshotRecord {
        let lock = try domainLock(domain)
        defer { withExtendedLifetime(lock) {} }
        let (definition, _) = try definition(domain)
        var ids: [String: (String, BackendKind)] = [:]
        for disk in definition.disks {
            let (backend, layout) = try await disks.manage(disk.locator, kind: disk.backend)
            ids[disk.target] = (layout.disk.id, backend.kind)
        }
        var record = try SnapshotXML.parse(xml, domain: definition, diskIDs: ids)
        for i in record.disks.indices { record.disks[i] = try await checkedSource(record.disks[i]) }
        let existing = try store.domainSnapshots(of: domain)
        if existing.contains(where: { $0.name == record.name }) {
            throw SnapshotError(
                .alreadyExists, "domain '\(domain)' already has a snapshot named \(SnapshotName.quoted(record.name))")
        }
        if let parent = record.parent, !existing.contains(where: { $0.name == parent }) {
            throw SnapshotError(
                .notFound,
                "the XML's parent '\(parent)' is not a snapshot of domain '\(domain)'; redefine the parent first")
        }
        for d in record.disks where d.kind != nil {
            guard let layout = try store.layout(diskID: d.diskID), layout.snapshot(named: record.name) != nil else {
                throw SnapshotError(
                    .notFound,
                    "disk \(d.target) has no disk snapshot named '\(record.name)'; --redefine only records snapshots whose disk parts exist"
                )
            }
        }
        try store.updateDomainSnapshots(
            domain: domain, upsert: [record], current: makeCurrent ? .some(record.name) : nil)
        return record
    }
}
