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

    /// The harness's checksum repair (Fuzz/ImageFuzz), so the crafted fields are what the reader meets.
    static func withChecksums(_ path: String) throws -> String {
        var b = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        for at in [0, (b.count - 512) / 512 * 512] where b.count >= 512 && Array(b[at..<at + 8]) == VHD.footerCookie {
            var frame = Array(b[at..<at + 512])
            frame.put32(VHD.checksum(frame[0..<512], skipping: 64..<68), at: 64)
            b.replaceSubrange(at..<at + 512, with: frame)
        }
        let dataOffset = Array(b[0..<512]).be64(16)
        if dataOffset <= UInt64(b.count), UInt64(b.count) - dataOffset >= 1024 {
            let at = Int(dataOffset)
            var frame = Array(b[at..<at + 1024])
            frame.put32(VHD.checksum(frame[0..<1024], skipping: 36..<40), at: 36)
            b.replaceSubrange(at..<at + 1024, with: frame)
        }
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
