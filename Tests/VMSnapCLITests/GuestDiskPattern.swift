import Foundation
import SnapshotCore

/// What the test guest leaves on a disk (scripts/test-guest): "counter N" in sector 0 and in
/// slot N%31+1 (sector (N%31+1)*1024), the slot written first. A copy of the disk taken at one
/// instant, whose sector 0 says C, holds C, C-1, ..., C-29 in their slots, and C+1 or C-30 in
/// slot (C+1)%31+1; anything else (a newer value, a stale one) means the copy mixes instants.
struct GuestDiskPattern {
    static let slots = 31

    /// The counter in a 512-byte sector, if it holds one.
    static func counter(_ sector: Data) -> Int? {
        let text = String(decoding: sector.prefix { $0 != 0 && $0 != 10 }, as: UTF8.self)
        guard text.hasPrefix("counter ") else { return nil }
        return Int(text.dropFirst(8))
    }

    static func slotOffset(_ n: Int) -> Int { (n % slots + 1) * 1024 * 512 }

    /// The counter in sector 0 and the problems with the slots (empty: one instant).
    static func check(_ raw: Data) -> (counter: Int?, problems: [String]) {
        guard let c = counter(raw.prefix(512)) else { return (nil, []) }
        func at(_ n: Int) -> Int? {
            let o = slotOffset(n)
            return raw.count >= o + 512 ? counter(raw[o..<(o + 512)]) : nil
        }
        var problems: [String] = []
        for n in max(1, c - 29)...c where at(n) != n {
            problems.append("slot of \(n) holds \(at(n).map(String.init) ?? "nothing"), sector 0 says \(c)")
        }
        let next = at(c + 1)
        let allowed: Set<Int?> = [c + 1, c - 30 >= 1 ? c - 30 : nil]
        if !allowed.contains(next) {
            problems.append("slot of \(c + 1) holds \(next.map(String.init) ?? "nothing"), sector 0 says \(c)")
        }
        return (c, problems)
    }

    /// Reads an image (through its backing chain) as raw bytes.
    static func read(_ image: String, format: String = "qcow2", scratch: String) async throws -> Data {
        let raw = scratch + "/read-\(UUID().uuidString.prefix(6)).raw"
        defer { unlink(raw) }
        try await SubprocessRunner().run(["qemu-img", "convert", "-U", "-f", format, "-O", "raw", image, raw])
        return try Data(contentsOf: URL(fileURLWithPath: raw))
    }
}
