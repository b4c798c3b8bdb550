import Foundation
import HypervisorDriver
import SnapshotCore

/// Checkpoints on disks whose storage, not a bitmap, knows what changed (a backend that declares
/// `reportsChanges`: LVM thin volumes, RBD images, VHD chains). The checkpoint takes a disk
/// snapshot, `vmsnap-checkpoint-<name>`; "changed since" is what the storage reports between it
/// and the disk now. A backup turns those extents into a bitmap file the hypervisor's backup job
/// merges like any other bitmap (``BackupImageTool/writeChangesBitmap``), so pull and push,
/// full and incremental, run the same job as for bitmap-tracked disks.
///
/// A running guest writes between the count and the job's instant, and some of its finished
/// writes may still sit in the hypervisor's cache. So for a running domain the job first starts a
/// bridge on each such disk: a bitmap in the hypervisor only that records every write from then
/// on, after which the hypervisor flushes each disk, the guest running on
/// (``BlockLayer/startRecording(_:targets:)``). Then the
/// storage counts; the job's transaction merges the count and the bridge and removes the bridge,
/// at one instant.
/// A write lands either on the storage before the count or in the bridge: never in neither.
extension DomainService {
    static func checkpointSnapshotName(_ checkpoint: String) -> String { "vmsnap-checkpoint-\(checkpoint)" }

    /// The bridge's name on each disk's node (bitmap names are per node).
    static let bridgeBitmap = "vmsnap-bridge"

    static func bridgeTargets(_ parts: [(target: String, changedSince: [LayerBitmap])]) -> [String] {
        parts.filter { $0.changedSince.contains { $0.mergedAway == true && $0.name == bridgeBitmap } }
            .map(\.target)
    }

    /// Starts the bridges of a job's or view's parts, before the storage counts.
    func startBridges(_ parts: [(target: String, changedSince: [LayerBitmap])], layer: any BlockLayer) async throws {
        let targets = Self.bridgeTargets(parts)
        guard !targets.isEmpty else { return }
        try await layer.startRecording(Self.bridgeBitmap, targets: targets)
    }

    /// Removes the bridges of a job or view that was undone before its transaction (which removes
    /// them itself). Never throws: a bridge left in the hypervisor only costs memory, and the
    /// next one replaces it.
    func stopBridges(_ parts: [(target: String, changedSince: [LayerBitmap])], layer: any BlockLayer) async {
        let targets = Self.bridgeTargets(parts)
        guard !targets.isEmpty else { return }
        do { try await layer.removeBitmaps(Self.bridgeBitmap, targets: targets) } catch {
            notify("left the recording bitmap \(Self.bridgeBitmap) on \(targets.joined(separator: ", ")): \(error)")
        }
    }

    /// Why a checkpoint snapshot would not serve this disk (nil: it would): the backend plans one
    /// (a plan is data; nothing runs) and the snapshot must leave the disk's active image where
    /// it is. A VHD's external snapshot moves it to a differencing file, which QEMU (the backup
    /// job's reader) cannot open.
    func checkpointSnapshotProblem(_ backend: any DiskSnapshotBackend, _ layout: DiskLayout) async throws -> String? {
        let plan = try await backend.planCreate(
            SnapshotRequest(
                name: Self.checkpointSnapshotName("probe"), kind: backend.descriptor.capabilities.defaultKind),
            layout: layout)
        guard plan.result.disk.active == layout.disk.active else {
            return
                "backend '\(backend.kind)' reports changes between snapshots, but a snapshot moves the disk's active image (to \(plan.result.disk.active)), which the backup job could not then read"
        }
        // A snapshot it has already: can the storage count from it? (An LVM classic volume
        // cannot; with no snapshot yet, the checkpoint's own is asked once it is taken.)
        if let any = layout.snapshots.first {
            do { _ = try await backend.changes(layout, from: any.name, to: .active) } catch let e as SnapshotError
                where e.code == .unsupported
            {
                return e.message
            }
        }
        return nil
    }

    /// The domain's disk (its backend and locator) a checkpoint disk names.
    func checkpointDisk(_ disk: CheckpointDisk, definition: DomainDefinition) throws -> DomainDisk {
        guard let now = definition.disks.first(where: { $0.target == disk.target }) else {
            throw SnapshotError(.notFound, "domain '\(definition.name)' has no disk \(disk.target) any more")
        }
        return now
    }

    /// Takes each storage-tracked disk's checkpoint snapshot (its name checked free before the
    /// journal began: ``requireFreeCheckpointSnapshots``), then asks the storage once for the
    /// changes since it. A volume that cannot answer (an LVM classic volume) has its snapshot
    /// removed and is refused with the storage's reason; when the operator named no disks
    /// (`leaveOut`), it is left out of the checkpoint instead, saying why, unless no disk is
    /// left. Returns the checkpoint as taken.
    func takeCheckpointSnapshots(_ record: CheckpointRecord, definition: DomainDefinition, leaveOut: Bool)
        async throws -> CheckpointRecord
    {
        var taken = record
        for disk in record.disks {
            guard let name = disk.snapshot else { continue }
            let d = try checkpointDisk(disk, definition: definition)
            let (backend, _) = try await disks.manage(d.locator, kind: d.backend)
            _ = try await disks.create(
                SnapshotRequest(
                    name: name, kind: backend.descriptor.capabilities.defaultKind,
                    description: "checkpoint \(record.name) of domain \(record.domain)"),
                disk: d.locator, kind: d.backend)
            do {
                _ = try await disks.changes(disk: d.locator, kind: d.backend, from: name, to: .active)
            } catch let e as SnapshotError where e.code == .unsupported {
                let refusal = SnapshotError(
                    .unsupported,
                    "disk \(disk.target) of domain '\(record.domain)' cannot be in a checkpoint: \(e.message). Leave it out (--disks), or back it up in full"
                )
                taken.disks.removeAll { $0.target == disk.target }
                guard leaveOut, !taken.disks.isEmpty else { throw refusal }
                var one = record
                one.disks = [disk]
                await removeCheckpointSnapshots([one], definition: definition)
                notify(
                    "checkpoint \(record.name) leaves disk \(disk.target) out (\(e.message)); it is backed up in full")
            }
        }
        return taken
    }

    /// Refuses, before anything is journaled, a checkpoint whose snapshot name a disk already
    /// has (a snapshot made by hand, or one `checkpoint delete --metadata-only` left): a rollback
    /// removes the checkpoint's snapshots by name, so the name must be new.
    func requireFreeCheckpointSnapshots(_ record: CheckpointRecord, definition: DomainDefinition) async throws {
        for disk in record.disks {
            guard let name = disk.snapshot else { continue }
            let d = try checkpointDisk(disk, definition: definition)
            if try await disks.layout(of: d.locator, kind: d.backend).1.snapshot(named: name) != nil {
                throw SnapshotError(
                    .alreadyExists,
                    "disk \(disk.target) of domain '\(record.domain)' already has a snapshot named \(name), the name checkpoint \(record.name) would take; delete that snapshot (`vmsnap disk snapshot delete \(d.locator) \(name)`) or pick another checkpoint name. Nothing was changed"
                )
            }
        }
    }

    /// Removes the checkpoint snapshots of `records` that still exist. Never throws: a snapshot
    /// the storage will not remove now (unreachable, held by another host) is named for the
    /// operator and left, and the checkpoint's record goes anyway (a stuck journal would block
    /// every other operation on the domain).
    func removeCheckpointSnapshots(_ records: [CheckpointRecord], definition: DomainDefinition) async {
        for record in records {
            for disk in record.disks {
                guard let name = disk.snapshot, let d = try? checkpointDisk(disk, definition: definition) else {
                    continue
                }
                do {
                    let layout = try await disks.layout(of: d.locator, kind: d.backend).1
                    guard layout.disk.id == disk.diskID, layout.snapshot(named: name) != nil else { continue }
                    _ = try await disks.delete(disk: d.locator, snapshot: name, mode: .merge, kind: d.backend)
                } catch {
                    notify(
                        "left snapshot \(name) of disk \(disk.target) (\(d.locator)), which checkpoint \(record.name) counted from: \(error). Delete it with `vmsnap disk snapshot delete \(d.locator) \(name)` once the storage allows"
                    )
                }
            }
        }
    }

    /// Recovery's part: the bridges and bitmap-file nodes an interrupted job or view left in the
    /// running hypervisor (a storage daemon's go with it).
    func releaseCounts(_ parts: [(target: String, changedSince: [LayerBitmap])], domain: String) async {
        let files = parts.flatMap { $0.changedSince.compactMap(\.file) }
        guard !Self.bridgeTargets(parts).isEmpty || !files.isEmpty,
            let definition = try? definition(domain).definition,
            let layer = try? await aliveLayer(definition, storageDaemon: false)
        else { return }
        await layer.closeBitmapFiles(files)
        await stopBridges(parts, layer: layer)
        await layer.close(keepDaemon: true)
    }

    /// Why a storage-tracked disk cannot serve an incremental (nil: it can), and what changed
    /// since its snapshot. A revert does not spoil it: the storage compares what the disk holds.
    /// While the guest runs the count leaves out what it has not flushed yet (a job's bridge
    /// covers that).
    func storageCheckpointProblem(_ disk: CheckpointDisk, snapshot: String, definition: DomainDefinition)
        async throws -> (String?, DiskChanges?)
    {
        guard let d = try? checkpointDisk(disk, definition: definition),
            let layout = try? await disks.layout(of: d.locator, kind: d.backend).1, layout.disk.id == disk.diskID
        else {
            return ("disk \(disk.target) is no longer the disk the checkpoint tracked", nil)
        }
        guard layout.snapshot(named: snapshot) != nil else {
            return (
                "snapshot \(snapshot) of disk \(disk.target), which the checkpoint counts changes from, is gone (deleted outside `vmsnap checkpoint delete`)",
                nil
            )
        }
        do {
            let changes = try await disks.changes(disk: d.locator, kind: d.backend, from: snapshot, to: .active)
            return (nil, changes)
        } catch let e as SnapshotError {
            return ("the storage of disk \(disk.target) cannot count the changes since \(snapshot): \(e.message)", nil)
        }
    }

    /// Writes the bitmap file of each storage-tracked part of a job or view (journaled as
    /// planned, then created): the changes since the checkpoint's snapshot, counted now.
    func writeChangesFiles(
        _ parts: [(target: String, changedSince: [LayerBitmap])], definition: DomainDefinition,
        tools: any BackupImageTool, size: (String) async throws -> UInt64, journalID: Int64,
        journal j: inout BlockJournal
    ) async throws {
        for part in parts {
            for bitmap in part.changedSince {
                guard let file = bitmap.file else { continue }
                guard let d = definition.disks.first(where: { $0.target == part.target }) else { continue }
                let changes = try await disks.changes(disk: d.locator, kind: d.backend, from: bitmap.name, to: .active)
                try FileManager.default.createDirectory(
                    atPath: (file as NSString).deletingLastPathComponent, withIntermediateDirectories: true,
                    attributes: [.posixPermissions: 0o700])
                j.planned.append(file)
                try blockJournal(journalID, j)
                try NewFile.create(file, like: file, resume: false)
                j.created.append(file)
                try blockJournal(journalID, j)
                try await tools.writeChangesBitmap(
                    file, size: try await size(part.target), name: bitmap.name, extents: changes.extents)
            }
        }
    }

    /// Removes the bitmap files once the hypervisor merged them (the job's or view's own bitmap
    /// holds the changes now).
    static func removeChangesFiles(_ parts: [[LayerBitmap]]) {
        for file in parts.flatMap({ $0.compactMap(\.file) }) { unlink(file) }
    }
}
