import Foundation
import HypervisorDriver
import SnapshotCore

/// The host's pool of reserved huge pages of one size, as the kernel counts it in
/// /sys/kernel/mm/hugepages/hugepages-<size>kB: how many there are, how many are free, and how
/// many of the free ones another process has reserved already.
struct HostHugePages: Sendable, Equatable {
    var pageMiB: Int
    var total: Int
    var free: Int
    var reserved: Int

    /// Free pages nobody has reserved: what a new domain can take.
    var available: Int { max(free - reserved, 0) }

    static func directory(pageMiB: Int, root: String = "/sys/kernel/mm/hugepages") -> String {
        "\(root)/hugepages-\(pageMiB * 1024)kB"
    }

    /// The pool for `pageMiB`, or nil when the kernel has no huge pages of that size.
    static func read(pageMiB: Int, root: String = "/sys/kernel/mm/hugepages") -> HostHugePages? {
        let dir = directory(pageMiB: pageMiB, root: root)
        func count(_ file: String) -> Int? {
            (try? String(contentsOfFile: "\(dir)/\(file)", encoding: .utf8))
                .flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        }
        guard let total = count("nr_hugepages"), let free = count("free_hugepages") else { return nil }
        return HostHugePages(pageMiB: pageMiB, total: total, free: free, reserved: count("resv_hugepages") ?? 0)
    }

    /// Refuses to start `definition` when its memory backing asks for more huge pages than the
    /// host has available: QEMU takes them all at start (prealloc), so a shortage is told here,
    /// before any process starts, with the pages it needs and how to reserve them.
    static func check(_ definition: DomainDefinition, root: String = "/sys/kernel/mm/hugepages") throws {
        guard let backing = definition.memoryBacking else { return }
        let page = backing.hugepageMiB
        let needed = definition.memoryMiB / page
        guard let pool = read(pageMiB: page, root: root) else {
            throw SnapshotError(
                .unsupported,
                "domain '\(definition.name)' backs its memory with \(page) MiB huge pages, and this host's kernel has none of that size (no \(directory(pageMiB: page, root: root))); use hugepageMiB 2, or remove memoryBacking"
            )
        }
        guard pool.available >= needed else {
            // The pool of this page size by its own path: vm.nr_hugepages is the default size's,
            // which a host may have set to 1 GiB.
            let knob =
                "echo \(pool.total + needed - pool.available) > \(directory(pageMiB: page, root: root))/nr_hugepages"
            throw SnapshotError(
                .noSpace,
                "domain '\(definition.name)' needs \(needed) huge pages of \(page) MiB for its \(definition.memoryMiB) MiB of memory, and the host has \(pool.available) available (\(pool.total) reserved in all, \(pool.free) free, \(pool.reserved) of those promised to other processes). Reserve more as root (\(knob)), or remove memoryBacking from the definition"
            )
        }
    }
}
