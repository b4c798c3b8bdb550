import Foundation
import SnapshotCore

/// Reads one byte of every page of a QEMU's guest RAM from outside, just before the guest is
/// stopped for a background copy.
///
/// QEMU 7.2 reads one byte of every guest page itself when it sets the copy up, so that
/// userfaultfd can write-protect it (`ram_write_tracking_prepare`), and it does so with the
/// guest stopped. Pages nobody touched for a while can be slow to read: on this machine (itself
/// a virtual machine) a 4 GiB guest in huge pages spent 65-228 ms of its pause on those 2,048
/// reads, all of it on the read instruction (perf), from the second save on. Read beforehand,
/// the same reads in the pause took 0.45-1 ms and the pause 6.9-11.3 ms (docs/notes.md). The
/// read here costs what QEMU's would have (115-165 ms there), while the guest runs.
///
/// Guest RAM is found in /proc/PID/maps: a huge-page memfd (`memory-backend-memfd`) or an
/// anonymous private mapping, either exactly the guest's size. A memfd is stepped by its page
/// size as /proc/PID/smaps gives it (2 MiB or 1 GiB), anonymous memory by 4 KiB.
///
/// The reads allocate nothing QEMU would not: QEMU's own read of each page in the pause maps
/// the same pages (a never-written anonymous page reads as the shared zero page, or, with
/// transparent huge pages and their use_zero_page off, as a new huge page, in QEMU's read too).
enum GuestMemoryPrefault {
    struct Region: Equatable {
        var start: UInt
        var length: UInt
        var step: UInt
    }

    /// The guest RAM regions in a maps text (`/proc/PID/maps`); `pageSizes` gives the kernel's
    /// page size by a mapping's start (from smaps; a memfd without one is stepped by 2 MiB).
    static func regions(maps: String, guestBytes: UInt64, pageSizes: [UInt: UInt] = [:]) -> [Region] {
        var found: [Region] = []
        for line in maps.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 5 else { continue }
            let bounds = fields[0].split(separator: "-")
            guard bounds.count == 2, let a = UInt(bounds[0], radix: 16), let b = UInt(bounds[1], radix: 16), b > a,
                UInt64(b - a) == guestBytes
            else { continue }
            let path = fields.count > 5 ? String(fields[5]) : ""
            if path.hasPrefix("/memfd:memory-backend-memfd") {
                found.append(Region(start: a, length: b - a, step: pageSizes[a] ?? (2 << 20)))
            } else if path.isEmpty, fields[1] == "rw-p" {
                found.append(Region(start: a, length: b - a, step: 4096))
            }
        }
        return found
    }

    /// Each mapping's kernel page size in an smaps text (`/proc/PID/smaps`), by its start.
    static func pageSizes(smaps: String) -> [UInt: UInt] {
        var sizes: [UInt: UInt] = [:]
        var current: UInt?
        for line in smaps.split(separator: "\n") {
            if let dash = line.firstIndex(of: "-"), let start = UInt(line[..<dash], radix: 16) {
                current = start
            } else if line.hasPrefix("KernelPageSize:"), let current,
                let kB = UInt(line.dropFirst("KernelPageSize:".count).split(separator: " ").first ?? "")
            {
                sizes[current] = kB << 10
            }
        }
        return sizes
    }

    /// A /proc file's whole text: /proc files have no size, and Foundation's whole-file readers
    /// stop after the first 4 KiB of one (measured: 4,066 of 34,618 bytes of a QEMU's maps).
    static func procText(_ path: String) -> String? {
        guard let data = try? FileHandle(forReadingFrom: URL(fileURLWithPath: path)).readToEnd() else { return nil }
        return String(data: data, encoding: .utf8)
    }

    /// process_vm_readv (glibc), which Swift's Glibc module does not show.
    typealias ReadV =
        @convention(c) (
            pid_t, UnsafePointer<iovec>, UInt, UnsafePointer<iovec>, UInt, UInt
        ) -> Int
    static let readv: ReadV? = {
        dlsym(UnsafeMutableRawPointer(bitPattern: 0), "process_vm_readv").map { unsafeBitCast($0, to: ReadV.self) }
    }()

    /// Touches every page of `pid`'s guest RAM (1,024 pages a call); returns the pages read, or
    /// nil when there was nothing to read or no way to (the save goes on without it: QEMU reads
    /// them in the pause, as before).
    @discardableResult
    static func touch(pid: pid_t, guestBytes: UInt64) -> Int? {
        guard let readv, let maps = procText("/proc/\(pid)/maps") else { return nil }
        var found = regions(maps: maps, guestBytes: guestBytes)
        // A memfd's page size (2 MiB or 1 GiB) only when there is one: smaps is the longer read.
        if found.contains(where: { $0.step > 4096 }), let smaps = procText("/proc/\(pid)/smaps") {
            found = regions(maps: maps, guestBytes: guestBytes, pageSizes: pageSizes(smaps: smaps))
        }
        guard !found.isEmpty else { return nil }
        let batch = 1024
        var sink = [UInt8](repeating: 0, count: batch)
        var remote = [iovec](repeating: iovec(), count: batch)
        var pages = 0
        return sink.withUnsafeMutableBytes { buffer -> Int? in
            var local = iovec(iov_base: buffer.baseAddress, iov_len: batch)
            for region in found {
                var offset: UInt = 0
                while offset < region.length {
                    var n = 0
                    while n < batch, offset < region.length {
                        remote[n] = iovec(
                            iov_base: UnsafeMutableRawPointer(bitPattern: region.start + offset), iov_len: 1)
                        n += 1
                        offset += region.step
                    }
                    local.iov_len = n
                    guard remote.withUnsafeBufferPointer({ readv(pid, &local, 1, $0.baseAddress!, UInt(n), 0) }) == n
                    else { return pages > 0 ? pages : nil }
                    pages += n
                }
            }
            return pages
        }
    }
}
