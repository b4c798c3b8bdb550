import Foundation
#if canImport(FoundationXML)
    import FoundationXML
#endif
import HypervisorDriver
import SnapshotCore

/// libvirt's `<domaincheckpoint>` XML: written by `checkpoint dumpxml`, read by `checkpoint
/// redefine`. Disks outside the checkpoint appear with `checkpoint='no'`, as libvirt writes them.
/// A disk its storage tracks (StorageCheckpoints.swift) is written like a bitmap disk, so the XML
/// stays valid for libvirt's schema; its snapshot's name follows from the checkpoint's, and a
/// redefine finds it there.
public enum CheckpointXML {
    static let escape = SnapshotXML.escape

    public static func render(
        _ r: CheckpointRecord, definition: DomainDefinition, sizes: [String: UInt64] = [:]
    ) -> String {
        var x = "<domaincheckpoint>\n  <name>\(escape(r.name))</name>\n"
        if let d = r.description { x += "  <description>\(escape(d))</description>\n" }
        if let p = r.parent { x += "  <parent>\n    <name>\(escape(p))</name>\n  </parent>\n" }
        x += "  <creationTime>\(Int64(r.createdAt.timeIntervalSince1970))</creationTime>\n  <disks>\n"
        for disk in definition.disks {
            if let c = r.disks.first(where: { $0.target == disk.target }) {
                let size = sizes[disk.target].map { " size='\($0)'" } ?? ""
                x +=
                    "    <disk name='\(escape(disk.target))' checkpoint='bitmap' bitmap='\(escape(c.bitmap))'\(size)/>\n"
            } else {
                x += "    <disk name='\(escape(disk.target))' checkpoint='no'/>\n"
            }
        }
        x += "  </disks>\n</domaincheckpoint>\n"
        return x
    }

    /// Reads a checkpoint from XML: its disks must be disks of the domain, each with a bitmap.
    public static func parse(
        _ xml: String, domain: String, disks: [String: (id: String, kind: BackendKind, image: String)]
    )
        throws -> CheckpointRecord
    {
        let doc: XMLDocument
        do { doc = try XMLDocument(xmlString: xml, options: []) } catch {
            throw SnapshotError(.invalidArgument, "the checkpoint XML does not parse: \(error.localizedDescription)")
        }
        guard let root = doc.rootElement(), root.name == "domaincheckpoint" else {
            throw SnapshotError(.invalidArgument, "the checkpoint XML's root element must be <domaincheckpoint>")
        }
        func text(_ e: XMLElement?, _ n: String) -> String? {
            e?.elements(forName: n).first?.stringValue?.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        guard let name = text(root, "name"), !name.isEmpty else {
            throw SnapshotError(.invalidArgument, "the checkpoint XML has no <name>")
        }
        try SnapshotName.validate(name)
        let parent = text(root.elements(forName: "parent").first, "name")
        let created = text(root, "creationTime").map { t -> Date? in
            Int64(t).map { Date(timeIntervalSince1970: TimeInterval($0)) }
        }
        guard let createdAt = created ?? Date(timeIntervalSince1970: floor(Date().timeIntervalSince1970)) else {
            throw SnapshotError(.invalidArgument, "the checkpoint XML's <creationTime> is not whole seconds since 1970")
        }
        var out: [CheckpointDisk] = []
        for e in root.elements(forName: "disks").first?.elements(forName: "disk") ?? [] {
            guard let target = e.attribute(forName: "name")?.stringValue else {
                throw SnapshotError(.invalidArgument, "a <disk> of the checkpoint XML has no name")
            }
            let mode = e.attribute(forName: "checkpoint")?.stringValue ?? "bitmap"
            if mode == "no" { continue }
            guard mode == "bitmap" else {
                throw SnapshotError(.invalidArgument, "disk \(target): checkpoint='\(mode)' is not bitmap or no")
            }
            guard let disk = disks[target] else {
                throw SnapshotError(
                    .notFound, "the checkpoint XML names disk \(target), which domain '\(domain)' does not have")
            }
            let bitmap = e.attribute(forName: "bitmap")?.stringValue ?? name
            try SnapshotName.validate(bitmap)
            out.append(
                CheckpointDisk(
                    target: target, diskID: disk.id, backend: disk.kind, bitmap: bitmap, image: disk.image, epoch: 0))
        }
        guard !out.isEmpty else { throw SnapshotError(.invalidArgument, "the checkpoint XML tracks no disk") }
        return CheckpointRecord(
            domain: domain, name: name, parent: parent, description: text(root, "description"), createdAt: createdAt,
            disks: out)
    }
}

extension DomainService {
    public func checkpointXML(domain: String, _ name: String, withSizes: Bool = false) async throws -> String {
        let record = try checkpoint(domain: domain, name)
        let (definition, _) = try definition(domain)
        var sizes: [String: UInt64] = [:]
        if withSizes {
            for s in try await checkpointState(domain: domain, name) {
                if let b = s.changedBytes { sizes[s.target] = b }
            }
        }
        return CheckpointXML.render(record, definition: definition, sizes: sizes)
    }

    /// Records a checkpoint from XML (a libvirt checkpoint, or one vmsnap wrote): the disks'
    /// bitmaps must exist already; the checkpoint takes the disks' current content epoch.
    @discardableResult
    public func redefineCheckpoint(domain: String, xml: String) async throws -> CheckpointRecord {
        let lock = try domainLock(domain)
        defer { withExtendedLifetime(lock) {} }
        try await recover(domain: domain)
        let (definition, _) = try definition(domain)
        var disks: [String: (id: String, kind: BackendKind, image: String)] = [:]
        for disk in definition.disks {
            let (backend, layout) = try await self.disks.manage(disk.locator, kind: disk.backend)
            disks[disk.target] = (layout.disk.id, backend.kind, layout.disk.active)
        }
        var record = try CheckpointXML.parse(xml, domain: domain, disks: disks)
        try checkCheckpointName(record.name, domain: domain)
        let existing = try store.checkpoints(of: domain)
        if let p = record.parent, !existing.contains(where: { $0.name == p }) {
            throw SnapshotError(
                .notFound,
                "the checkpoint's parent \(SnapshotName.quoted(p)) is not a checkpoint of '\(domain)'; redefine it first"
            )
        }
        for i in record.disks.indices {
            record.disks[i].epoch = try store.contentEpoch(diskID: record.disks[i].diskID)
            record.disks[i].snapshot = try await storageSnapshot(
                of: record.disks[i], checkpoint: record.name, definition)
        }
        let bitmapDisks = record.disks.filter { $0.snapshot == nil }
        if !bitmapDisks.isEmpty {
            try await withBitmapAccess(definition) { access in
                for d in bitmapDisks where try await !access.bitmaps(d.target).contains(where: { $0.name == d.bitmap })
                {
                    throw SnapshotError(
                        .notFound,
                        "disk \(d.target) has no bitmap \(d.bitmap) in \(d.image) (nor, if its storage tracks it, a snapshot \(Self.checkpointSnapshotName(record.name))); a checkpoint is redefined only over the bitmap or snapshot it counts from"
                    )
                }
            }
        }
        try store.updateCheckpoints(domain: domain, upsert: [record])
        return record
    }

    /// The storage's snapshot a redefined checkpoint counts from on `disk`, when its backend
    /// reports changes and the disk holds the snapshot named for the checkpoint; nil: a bitmap.
    private func storageSnapshot(of disk: CheckpointDisk, checkpoint: String, _ definition: DomainDefinition)
        async throws -> String?
    {
        guard let d = definition.disks.first(where: { $0.target == disk.target }) else { return nil }
        let (backend, layout) = try await disks.layout(of: d.locator, kind: d.backend)
        let name = Self.checkpointSnapshotName(checkpoint)
        guard backend.descriptor.reportsChanges else { return nil }
        if layout.snapshot(named: name) != nil { return name }
        guard backend.changeTracking.isAvailable else {
            throw SnapshotError(
                .notFound,
                "disk \(disk.target) (\(d.locator)) has no snapshot \(name), which a checkpoint of its storage counts from (and backend '\(backend.kind)' keeps no bitmaps); a checkpoint is redefined only over the snapshot it counts from"
            )
        }
        return nil
    }
}
