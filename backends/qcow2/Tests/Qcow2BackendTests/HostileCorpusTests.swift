import Foundation
import SnapshotCore
import Testing

@testable import Qcow2Backend

/// The crafted qcow2 files of the fuzz corpus (Fuzz/corpus) that once crashed the header reader
/// with an arithmetic trap: each must now be a clean `invalidImage` error (or a good read).
@Suite("qcow2 hostile corpus")
struct Qcow2HostileCorpusTests {
    static let corpus = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent(
            "Fuzz/corpus"
        ).path

    static var files: [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: corpus)) ?? []).filter { $0.hasSuffix(".qcow2") }
            .sorted()
    }

    @Test("every corpus file opens or fails with a clear invalid-image error, never a trap", arguments: files)
    func corpusFile(name: String) {
        do { _ = try Qcow2Image(path: Self.corpus + "/" + name) } catch let e as SnapshotError {
            #expect(e.code == .invalidImage && e.message.count > 20, "\(name): \(e)")
        } catch {
            Issue.record("\(name): \(error)")
        }
    }
}
