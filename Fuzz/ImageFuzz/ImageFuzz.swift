import Foundation
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

// libFuzzer target for the image readers vmsnap parses untrusted files with: the VHD reader
// (footer, dynamic header, BAT, parent locators, block checks) and the qcow2 header reader
// (header, backing name, extensions, snapshot table). Each input is written to a file and opened
// by both readers; any error is fine, a trap (overflow, out of range) or a hang is a crash.
// Built and run by scripts/fuzz (libFuzzer through swiftc -sanitize=fuzzer).

let scratch: String = {
    let dir = NSTemporaryDirectory() + "vmsnap-fuzz-\(getpid())"
    mkdir(dir, 0o700)
    return dir
}()

/// VHD structures carry checksums: a mutated input would almost always stop at the first one.
/// The harness recomputes the footer's (at both ends) and the dynamic header's, so mutations
/// reach the fields behind them, as a crafted file would.
func fixChecksums(_ b: inout [UInt8]) {
    guard b.count >= 512 else { return }
    let ends = [0, (b.count - 512) / 512 * 512]
    for at in ends where Array(b[at..<at + 8]) == VHD.footerCookie {
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
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let path = scratch + "/input"
    var bytes = Array(UnsafeBufferPointer(start: data, count: size))
    fixChecksums(&bytes)
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard fd >= 0 else { return 0 }
    _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    close(fd)
    if let image = try? VHDImage(path: path) {
        _ = image.metadataRegions
        _ = try? image.parentPath()
        _ = image.virtualSize
    }
    _ = try? Qcow2Image(path: path)
    return 0
}
