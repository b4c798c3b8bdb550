// VHD engine benchmarks, each against an anchor measured in the same run:
//   snapshot create on a 100 GiB disk (and on 1 GiB, to show it does not depend on size);
//   coalesce throughput against a plain sequential copy of the same amount of data;
//   read throughput through a chain of 10 against libvhdi reading the same chain.
// Prints `name value anchor` lines for scripts/bench.
import Foundation
import IndependentReaders
import VHDBackend

let work = (NSTemporaryDirectory() as NSString).appendingPathComponent(
    "vmsnap-vhd-bench-\(UUID().uuidString.prefix(6))")
try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
defer { try? FileManager.default.removeItem(atPath: work) }

func seconds(_ body: () throws -> Void) rethrows -> Double {
    let start = DispatchTime.now().uptimeNanoseconds
    try body()
    return Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
}
func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    return s[s.count / 2]
}
func fill(_ n: Int, _ seed: UInt8) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31) ^ seed } }

// 1. Snapshot create (a differencing child) on 100 GiB and 1 GiB parents.
for (label, size) in [("100GiB", UInt64(100) << 30), ("1GiB", UInt64(1) << 30)] {
    let base = work + "/base-\(label).vhd"
    try VHDEngine.createDynamic(base, size: size)
    let times = try (0..<15).map { i in
        try seconds { try VHDEngine.createDifferencing(work + "/snap-\(label)-\(i).vhd", parent: base) } * 1000
    }
    print(String(format: "snapshot-create-%@-ms %.3f 5", label, median(times)))
}

// 2. Coalesce 256 MiB of allocated data against copying the same bytes sequentially.
let size: UInt64 = 512 << 20, amount = 256 << 20
let parent = work + "/c-parent.vhd", child = work + "/c-child.vhd"
try VHDEngine.createDynamic(parent, size: size)
try VHDEngine.createDifferencing(child, parent: parent)
let writer = try VHDImage(path: child, writable: true)
let chunk = fill(4 << 20, 7)
for i in 0..<(amount / chunk.count) { try writer.write(chunk, at: UInt64(i * chunk.count) * 2) }  // every other 4 MiB
try writer.sync()
let src = work + "/copy-src", dst = work + "/copy-dst"
_ = FileManager.default.createFile(atPath: src, contents: Data(repeating: 0x5a, count: amount))
let copyTime = try seconds {
    let input = FileHandle(forReadingAtPath: src)!,
        output = FileHandle(
            forWritingAtPath: {
                _ = FileManager.default.createFile(atPath: dst, contents: nil)
                return dst
            }())!
    while let data = try input.read(upToCount: 4 << 20), !data.isEmpty { try output.write(contentsOf: data) }
    try output.synchronize()
}
let coalesceTime = try seconds { try VHDEngine.coalesce(child: child, into: parent) }
print(String(format: "coalesce-MBps %.1f %.1f", Double(amount) / coalesceTime / 1e6, Double(amount) / copyTime / 1e6))

// 3. Read 128 MiB through a chain of 10 layers, each holding a slice: the engine against libvhdi.
let readSize = 128 << 20
var chain = [work + "/r0.vhd"]
try VHDEngine.createDynamic(chain[0], size: UInt64(readSize))
for layer in 0..<10 {
    let image = try VHDImage(path: chain.last!, writable: true)
    try image.write(fill(readSize / 10 / 512 * 512, UInt8(layer)), at: UInt64(layer * (readSize / 10 / 512 * 512)))
    try image.sync()
    let next = work + "/r\(layer + 1).vhd"
    try VHDEngine.createDifferencing(next, parent: chain.last!)
    chain.append(next)
}
let leaf = chain.removeLast()
var engineTimes: [Double] = [], libTimes: [Double] = []
for _ in 0..<3 {
    engineTimes.append(
        try seconds {
            let image = try VHDImage(path: leaf)
            var at = 0
            while at < readSize {
                _ = try image.read(at: UInt64(at), count: 4 << 20)
                at += 4 << 20
            }
        })
    libTimes.append(
        try seconds {
            let reader = try LibVhdiReader(path: leaf, parentChain: chain.reversed())
            var at = 0
            while at < readSize {
                _ = try reader.read(at: UInt64(at), length: 4 << 20)
                at += 4 << 20
            }
        })
}
print(
    String(
        format: "chain10-read-MBps %.1f %.1f", Double(readSize) / median(engineTimes) / 1e6,
        Double(readSize) / median(libTimes) / 1e6))
