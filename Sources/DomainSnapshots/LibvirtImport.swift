import Foundation
import HypervisorDriver
import SnapshotCore

#if canImport(FoundationXML)
    import FoundationXML
#endif

/// What `domain import` brought in, and what it could not.
public struct ImportReport: Codable, Sendable {
    public var domain: String
    /// Disk target -> backend kind.
    public var disks: [String: String]
    /// Snapshots in parent order.
    public var snapshots: [String]
    public var current: String?
    /// Checkpoints in parent order.
    public var checkpoints: [String] = []
    /// Devices and settings vmsnap does not model, by name: not imported.
    public var notImported: [String]
}

/// A domain and its snapshot XMLs, in parent order, as `domain export` writes them.
public struct DomainExport: Sendable {
    public var domainXML: String
    public var snapshots: [(name: String, xml: String)]
    public var current: String?
    /// `<domaincheckpoint>` XMLs, parents first, for `virsh checkpoint-create --redefine`.
    public var checkpoints: [(name: String, xml: String)] = []
}

/// The parts of a `<domainsnapshot>` the importer needs before the records exist.
struct ImportedSnapshot {
    var name: String
    var parent: String?
    var createdAt: Date
    var description: String?
    /// Disk target -> (kind, the new overlay an external snapshot made).
    var disks: [String: (kind: SnapshotKind, overlay: String?)]
    var xml: String

    init(_ xml: String) throws {
        let root = try LibvirtDomainXML.root(xml, what: "snapshot XML")
        func child(_ e: XMLElement, _ n: String) -> XMLElement? { e.elements(forName: n).first }
        func text(_ e: XMLElement?) -> String? { e?.stringValue?.trimmingCharacters(in: .whitespacesAndNewlines) }
        guard root.name == "domainsnapshot", let name = text(child(root, "name")), !name.isEmpty else {
            throw SnapshotError(.invalidArgument, "a snapshot XML is not a <domainsnapshot> with a <name>")
        }
        self.name = name
        parent = child(root, "parent").flatMap { text(child($0, "name")) }
        createdAt = Date(timeIntervalSince1970: TimeInterval(Int64(text(child(root, "creationTime")) ?? "") ?? 0))
        description = text(child(root, "description"))
        disks = [:]
        for e in child(root, "disks")?.elements(forName: "disk") ?? [] {
            guard let target = e.attribute(forName: "name")?.stringValue,
                let kind = SnapshotKind(rawValue: e.attribute(forName: "snapshot")?.stringValue ?? "no")
            else { continue }
            let source = child(e, "source")
            disks[target] = (
                kind, source?.attribute(forName: "file")?.stringValue ?? source?.attribute(forName: "dev")?.stringValue
            )
        }
        self.xml = xml
    }

    /// `snapshots` with every parent before its children.
    static func parentOrder(_ snapshots: [ImportedSnapshot]) throws -> [ImportedSnapshot] {
        var out: [ImportedSnapshot] = []
        var placed = Set<String>()
        var left = snapshots
        while !left.isEmpty {
            let names = Set(snapshots.map(\.name))
            let ready = left.filter { s in s.parent.map { placed.contains($0) || !names.contains($0) } ?? true }
            guard !ready.isEmpty else {
                throw SnapshotError(.invalidArgument, "the snapshots' parents form a cycle: \(left.map(\.name))")
            }
            out += ready.sorted { $0.createdAt < $1.createdAt }
            placed.formUnion(ready.map(\.name))
            left.removeAll { placed.contains($0.name) }
        }
        return out
    }
}

extension DomainService {
    // MARK: - Import

    /// Brings in a libvirt domain (`virsh dumpxml`) and its snapshots (`virsh snapshot-dumpxml`,
    /// any order): its disks with the backends that declare their driver and source types, the
    /// backing chains libvirt's external snapshots built, the internal snapshots in the images,
    /// then every snapshot record in parent order. Storage is not changed.
    public func importDomain(
        domainXML: String, snapshotXMLs: [String], current: String?, checkpointXMLs: [String] = []
    ) async throws -> ImportReport {
        let parsed = try LibvirtDomainXML.parse(try LibvirtDomainXML.root(domainXML, what: "domain XML"))
        if try store.domain(named: parsed.name) != nil {
            throw SnapshotError(
                .alreadyExists,
                "a domain named '\(parsed.name)' is defined in vmsnap already; undefine it or rename the libvirt domain first"
            )
        }
        let snapshots = try ImportedSnapshot.parentOrder(try snapshotXMLs.map(ImportedSnapshot.init))
        guard
            let (driver, accel) = drivers.all.lazy.compactMap({ d in
                d.accelerator(forLibvirtType: parsed.domainType).map { (d, $0) }
            }).first
        else {
            throw SnapshotError(
                .unsupported,
                "libvirt domain type '\(parsed.domainType)' has no hypervisor driver in this build (drivers: \(drivers.names.joined(separator: ", ")))"
            )
        }
        var disks: [DomainDisk] = []
        for disk in parsed.disks {
            disks.append(
                DomainDisk(target: disk.target, backend: try await backendKind(for: disk), locator: disk.source))
        }
        let definition = DomainDefinition(
            name: parsed.name, uuid: parsed.uuid ?? UUID(), memoryMiB: parsed.memoryMiB, vcpus: parsed.vcpus,
            disks: disks,
            boot: parsed.boot, accel: accel, hypervisor: driver.name, memoryBacking: parsed.memoryBacking)
        // The whole definition is checked (memory backing, boot, the driver's rules) before any
        // disk is adopted: a definition refused leaves no disk half brought in.
        try definition.validate()
        try driver.validate(definition)
        for (disk, adopted) in zip(parsed.disks, disks) {
            try await adoptDisk(disk, kind: adopted.backend, snapshots: snapshots, current: current)
        }
        try await define(definition)
        for snapshot in snapshots {
            _ = try await redefine(domain: parsed.name, xml: snapshot.xml, makeCurrent: snapshot.name == current)
        }
        // Checkpoints (parents first, as `checkpoint-list --topological` gives them): one whose
        // bitmap the images no longer hold is named, not imported.
        var checkpoints: [String] = []
        var skipped = parsed.unmodeled
        for xml in checkpointXMLs {
            do { checkpoints.append(try await redefineCheckpoint(domain: parsed.name, xml: xml).name) } catch let e
                as SnapshotError
            {
                skipped.append("checkpoint: \(e.message)")
            }
        }
        return ImportReport(
            domain: parsed.name,
            disks: Dictionary(uniqueKeysWithValues: disks.map { ($0.target, $0.backend.rawValue) }),
            snapshots: snapshots.map(\.name), current: current, checkpoints: checkpoints, notImported: skipped)
    }

    /// The backend whose descriptor names disks the way libvirt's XML does (driver type, source
    /// type); among several, the one that recognizes the disk.
    func backendKind(for disk: LibvirtDomainXML.Disk) async throws -> BackendKind {
        try await backendKind(
            format: disk.driverType, sourceType: disk.sourceType, locator: disk.source, target: disk.target,
            consequence: "nothing was imported")
    }

    /// The backend that declares this image format on this source type; among several, the one
    /// that recognizes the disk.
    func backendKind(
        format: String, sourceType: DiskSourceType, locator: String, target: String, consequence: String
    ) async throws -> BackendKind {
        let all = try disks.registry.allBackends(environment: disks.environment)
        let matching = all.filter { $0.descriptor.imageFormat == format && $0.descriptor.sourceType == sourceType }
        for backend in matching {
            if matching.count == 1 { return backend.kind }
            if await backend.recognizes(locator: locator) { return backend.kind }
        }
        throw SnapshotError(
            .unsupported,
            "disk \(target) (\(locator)): no backend takes \(format) images on a \(sourceType.rawValue) source (backends: \(all.map { "\($0.kind): \($0.descriptor.imageFormat) on \($0.descriptor.sourceType.rawValue)" }.joined(separator: ", "))); \(consequence)"
        )
    }

    /// Manages one disk with its chain: each external snapshot froze the backing image of the
    /// overlay it made; each snapshot's parent on this disk is its nearest ancestor that has this disk.
    func adoptDisk(_ disk: LibvirtDomainXML.Disk, kind: BackendKind, snapshots: [ImportedSnapshot], current: String?)
        async throws
    {
        let backend = try disks.registry.backend(kind, environment: disks.environment)
        let byName = Dictionary(uniqueKeysWithValues: snapshots.map { ($0.name, $0) })
        func parentOnDisk(_ name: String?) -> String? {
            var next = name
            while let n = next, let s = byName[n] {
                if s.disks[disk.target] != nil { return n }
                next = s.parent
            }
            return nil
        }
        var external: [DiskSnapshotService.ImportedExternalSnapshot] = []
        for s in snapshots {
            guard let (kind, overlay) = s.disks[disk.target], kind == .external else { continue }
            guard let overlay, let frozen = try await backend.inspect(locator: overlay).backingChain.first else {
                throw SnapshotError(
                    .notFound,
                    "snapshot '\(s.name)', disk \(disk.target): the overlay it made (\(s.disks[disk.target]?.overlay ?? "none")) is missing or has no backing file; nothing was imported"
                )
            }
            external.append(
                .init(
                    name: s.name, frozenImage: frozen, parent: parentOnDisk(s.parent), createdAt: s.createdAt,
                    description: s.description))
        }
        let layout = try await disks.adoptChain(disk.source, kind: kind, external: external, current: nil)
        var parents: [String: String?] = [:]
        for s in layout.snapshots where byName[s.name] != nil { parents[s.name] = parentOnDisk(byName[s.name]?.parent) }
        try await disks.setTree(disk: layout.disk.id, parents: parents, current: .some(parentOnDisk(current)))
    }

    // MARK: - Export

    /// The domain as libvirt defines it (the disks' current images) and every snapshot's XML in
    /// parent order, for `virsh define` and `virsh snapshot-create --redefine`.
    public func exportDomain(_ name: String) async throws -> DomainExport {
        let (definition, current) = try definition(name)
        var sources: [String: String] = [:]
        var descriptors: [BackendKind: BackendDescriptor] = [:]
        for disk in definition.disks {
            let (backend, layout) = try await disks.manage(disk.locator, kind: disk.backend)
            sources[disk.target] = (try? backend.hypervisorDrive(layout).path) ?? layout.disk.active
            descriptors[backend.kind] = backend.descriptor
        }
        let driver = try drivers.driver(for: definition)
        let domainXML = LibvirtDomainXML.render(
            definition, sources: sources, descriptors: descriptors, domainType: driver.libvirtDomainType(definition),
            hardware: driver.libvirtHardware(definition))
        let records = try store.domainSnapshots(of: name)
        var ordered: [DomainSnapshotRecord] = []
        var placed = Set<String>()
        while ordered.count < records.count {
            let ready = records.filter {
                !placed.contains($0.name) && ($0.parent == nil || placed.contains($0.parent!))
            }
            guard !ready.isEmpty else { break }
            ordered += ready
            placed.formUnion(ready.map(\.name))
        }
        var checkpoints: [(name: String, xml: String)] = []
        for c in try store.checkpoints(of: name) {
            checkpoints.append((c.name, CheckpointXML.render(c, definition: definition)))
        }
        return DomainExport(
            domainXML: domainXML, snapshots: try ordered.map { ($0.name, try dumpXML(domain: name, $0.name)) },
            current: current, checkpoints: checkpoints)
    }
}

/// What `vmsnap domain adopt` brought in.
public struct AdoptReport: Codable, Sendable, Hashable {
    public var domain: String
    public var hypervisor: String
    /// Backend per disk target.
    public var disks: [String: String]
    public var notAdopted: [String]
    /// Devices and settings kept in the hypervisor's own form (a revert recreates them).
    public var kept: [String]
}

extension DomainService {
    /// Brings a running domain that an operator created with the hypervisor's own tools (`xl
    /// create`) under vmsnap: the driver reads its configuration back, each disk goes to the
    /// backend that declares its format and source type. Storage and the domain are not changed.
    public func adoptDomain(_ name: String, hypervisor: String) async throws -> AdoptReport {
        let driver = try drivers.driver(hypervisor)
        if try store.domain(named: name) != nil {
            throw SnapshotError(.alreadyExists, "a domain named '\(name)' is defined in vmsnap already")
        }
        let found = try await driver.adopt(name)
        var disks: [DomainDisk] = []
        for disk in found.disks {
            let kind = try await backendKind(
                format: disk.format, sourceType: disk.sourceType, locator: disk.path, target: disk.target,
                consequence: "nothing was adopted")
            disks.append(DomainDisk(target: disk.target, backend: kind, locator: disk.path))
        }
        let definition = DomainDefinition(
            name: found.name, uuid: found.uuid, memoryMiB: found.memoryMiB, vcpus: found.vcpus, disks: disks,
            boot: found.boot, accel: found.accel, hypervisor: driver.name, hypervisorConfig: found.kept)
        try await define(definition)
        return AdoptReport(
            domain: name, hypervisor: driver.name,
            disks: Dictionary(uniqueKeysWithValues: disks.map { ($0.target, $0.backend.rawValue) }),
            notAdopted: found.notModeled, kept: found.keptItems)
    }
}
