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

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let path = scratch + "/input"
    // VHD structures carry checksums: without recomputing them a mutation almost never gets past
    // the footer.
    let bytes = VHD.withRepairedChecksums(Array(UnsafeBufferPointer(start: data, count: size)))
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
