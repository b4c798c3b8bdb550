import Foundation
import HypervisorDriver
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// What `vmsnap backup restore` and `backup verify` report.
public struct RestoreReport: Codable, Sendable, Hashable {
    public var backup: String
    /// Restored (or checked) disk images by target.
    public var disks: [String: String]
    /// Each disk's chain of backup images, oldest first.
    public var chains: [String: [String]]
    /// The new domain the restored disks were defined as.
    public var defined: String?
}

extension DomainService {
    /// Checks every image of a backup's chains (`qemu-img check` of each, the whole chain read);
    /// changes nothing.
    public func verifyBackup(directory: String, backup: String?) async throws -> RestoreReport {
        let directory = URL(fileURLWithPath: directory).standardizedFileURL.path
        let (manifest, entry, tools) = try loadBackup(directory, backup)
        var chains: [String: [String]] = [:]
        var problems: [String] = []
        for target in entry.files.keys.sorted() {
            let files = try chainFiles(manifest, entry: entry, target: target, directory: directory)
            chains[target] = files
            for f in files { problems += try await tools.check(f) }
        }
        guard problems.isEmpty else {
            throw SnapshotError(
                .invalidImage, "backup \(entry.name) in \(directory) is damaged: \(problems.joined(separator: "; "))")
        }
        return RestoreReport(backup: entry.name, disks: [:], chains: chains, defined: nil)
    }

    /// Rebuilds disks from a backup chain into standalone images in `outputDirectory` (checked,
    /// then compared with the chain byte for byte), and with `define` defines a new domain on
    /// them from the definition kept with the backups.
    public func restoreBackup(
        directory: String, backup: String?, targets: [String]?, outputDirectory: String, format: String = "qcow2",
        define newName: String? = nil
    ) async throws -> RestoreReport {
        let directory = URL(fileURLWithPath: directory).standardizedFileURL.path
        let (manifest, entry, tools) = try loadBackup(directory, backup)
        let chosen = targets ?? entry.files.keys.sorted()
        for t in chosen where entry.files[t] == nil {
            throw SnapshotError(
                .notFound,
                "backup \(entry.name) has no disk \(t) (disks: \(entry.files.keys.sorted().joined(separator: ", ")))")
        }
        guard ["qcow2", "raw"].contains(format) else {
            throw SnapshotError(.invalidArgument, "restore writes qcow2 or raw images, not '\(format)'")
        }
        if let newName { try checkNewDomainName(newName) }
        let outputDirectory = URL(fileURLWithPath: outputDirectory).standardizedFileURL.path
        var report = RestoreReport(backup: entry.name, disks: [:], chains: [:], defined: nil)
        var made: [String] = []
        do {
            for target in chosen {
                let files = try chainFiles(manifest, entry: entry, target: target, directory: directory)
                report.chains[target] = files
                let problems = try await files.asyncFlatMap { try await tools.check($0) }
                guard problems.isEmpty else {
                    throw SnapshotError(
                        .invalidImage, "the backup chain of \(target) is damaged: \(problems.joined(separator: "; "))")
                }
                let out = (outputDirectory as NSString).appendingPathComponent(
                    "\(newName ?? manifest.domain)-\(target).\(format == "raw" ? "img" : "qcow2")")
                try NewFile.create(out, like: files.last!, resume: false)
                made.append(out)
                try await tools.flatten(files.last!, into: out, format: format, progress: progress)
                guard try await tools.sameContent(files.last!, out) else {
                    throw SnapshotError(
                        .io, "restored \(out) does not read the same as backup \(entry.name) of \(target)")
                }
                report.disks[target] = out
            }
            if let newName {
                var definition = manifest.definition
                definition.name = newName
                definition.uuid = UUID()
                // Each restored file goes to the backend that declares its image format on files.
                var restored: [DomainDisk] = []
                for disk in definition.disks {
                    guard let path = report.disks[disk.target] else { continue }
                    let kind = try await backendKind(
                        format: format, sourceType: .file, locator: path, target: disk.target,
                        consequence: "nothing was restored")
                    restored.append(DomainDisk(target: disk.target, backend: kind, locator: path))
                }
                definition.disks = restored
                try await define(definition)
                report.defined = newName
            }
        } catch {
            for f in made { unlink(f) }
            throw error
        }
        return report
    }

    func loadBackup(_ given: String, _ name: String?) throws -> (
        BackupManifest, BackupManifest.Entry, any BackupImageTool
    ) {
        let directory = URL(fileURLWithPath: given).standardizedFileURL.path
        guard let manifest = try BackupManifest.load(directory) else {
            throw SnapshotError(
                .notFound, "\(directory) holds no vmsnap backups (no \(BackupManifest.fileName))")
        }
        guard let entry = name.map({ n in manifest.backups.first { $0.name == n } }) ?? manifest.backups.last else {
            throw SnapshotError(
                .notFound,
                "no backup \(name ?? "") in \(directory) (backups: \(manifest.backups.map(\.name).joined(separator: ", ")))"
            )
        }
        return (manifest, entry, try drivers.driver(manifest.definition.hypervisor).backupImages)
    }

    func chainFiles(_ manifest: BackupManifest, entry: BackupManifest.Entry, target: String, directory: String) throws
        -> [String]
    {
        try manifest.chain(to: entry.name, target: target).map { e in
            let file = e.files[target] ?? ""
            guard !file.contains("/"), !file.isEmpty, file != "..", file != "." else {
                throw SnapshotError(.storeCorrupt, "the manifest in \(directory) names an image outside it: \(file)")
            }
            return (directory as NSString).appendingPathComponent(file)
        }
    }

    func checkNewDomainName(_ name: String) throws {
        if try store.domain(named: name) != nil {
            throw SnapshotError(
                .alreadyExists, "a domain named '\(name)' exists already; pick another name for the restored one")
        }
    }
}

extension Array {
    func asyncFlatMap<T>(_ transform: (Element) async throws -> [T]) async rethrows -> [T] {
        var out: [T] = []
        for e in self { out += try await transform(e) }
        return out
    }
}
