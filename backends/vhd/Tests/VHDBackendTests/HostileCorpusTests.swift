import Foundation
import SnapshotCore
import Testing

@testable import VHDBackend

/// The crafted files of the fuzz corpus (Fuzz/corpus) that once crashed the reader with an
/// arithmetic trap: each must now be a clean `invalidImage` error (or a good read), in process.
@Suite("VHD hostile corpus")
struct VHDHostileCorpusTests {
    static let corpus = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent(
            "Fuzz/corpus"
        ).path

    static var files: [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: corpus)) ?? []).filter { $0.hasSuffix(".vhd") }.sorted()
    }

    /// The file with its checksums repaired (as the fuzz harness does), so the crafted fields
    /// are what the reader meets.
    static func withChecksums(_ path: String) throws -> String {
        let b = VHD.withRepairedChecksums([UInt8](try Data(contentsOf: URL(fileURLWithPath: path))))
        let out = NSTemporaryDirectory() + "vmsnap-hostile-\(UUID().uuidString.prefix(8)).vhd"
        try Data(b).write(to: URL(fileURLWithPath: out))
        return out
    }

    @Test("every corpus file opens or fails with a clear invalid-image error, never a trap", arguments: files)
    func corpusFile(name: String) throws {
        let path = try Self.withChecksums(Self.corpus + "/" + name)
        defer { unlink(path) }
        do {
            let image = try VHDImage(path: path)
            _ = image.metadataRegions
            _ = try? image.parentPath()
        } catch let e as SnapshotError {
            #expect(e.code == .invalidImage && e.message.count > 20, "\(name): \(e)")
        }
    }
}
