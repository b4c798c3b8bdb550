import Foundation
import HypervisorDriver
import SnapshotCore
import Testing

@testable import QEMUDriver

/// A domain's memory in the host's huge pages (`memoryBacking`): what the definition accepts,
/// the command line it gives QEMU, and the check of the host's pool before QEMU starts. The
/// guest that runs in huge pages is MemoryImageTests' (VMSnapCLITests).
@Suite("Huge-page memory: definition, command line, host pool")
struct HugePageMemoryTests {
    let driver = QEMUDriver(storeDirectory: NSTemporaryDirectory() + "vmsnap-argv")

    func definition(memoryMiB: Int = 512, page: Int? = 2) -> DomainDefinition {
        DomainDefinition(
            name: "hp", memoryMiB: memoryMiB,
            disks: [DomainDisk(target: "vda", backend: "qcow2", locator: "/x/a.qcow2")],
            accel: "tcg", memoryBacking: page.map { DomainMemoryBacking(hugepageMiB: $0) })
    }

    func argv(_ def: DomainDefinition) -> [String] {
        driver.argv(
            def, drives: [DomainDrive(target: "vda", drive: HypervisorDrive(path: "/x/a.qcow2", format: "qcow2"))],
            runtime: QEMURuntime(storeDirectory: "/tmp/s", domain: def.name), options: QEMULaunchOptions())
    }

    /// The value after the first `option` in `argv`.
    func value(_ argv: [String], _ option: String) -> String? {
        argv.firstIndex(of: option).flatMap { $0 + 1 < argv.count ? argv[$0 + 1] : nil }
    }

    @Test("the definition reads memoryBacking and refuses page sizes and memory sizes that cannot be")
    func definitionChecks() throws {
        let json = #"{"name":"hp","memoryMiB":512,"memoryBacking":{"hugepageMiB":2},"boot":{"kernel":"/k"}}"#
        let read = try JSONDecoder().decode(DomainDefinition.self, from: Data(json.utf8))
        #expect(read.memoryBacking == DomainMemoryBacking(hugepageMiB: 2))
        try read.validate()
        let encoded = try JSONDecoder().decode(DomainDefinition.self, from: JSONEncoder().encode(read))
        #expect(encoded.memoryBacking == read.memoryBacking, "kept through a store round trip")

        let empty = #"{"name":"hp","memoryMiB":512,"memoryBacking":{},"boot":{"kernel":"/k"}}"#
        let byDefault = try JSONDecoder().decode(DomainDefinition.self, from: Data(empty.utf8))
        #expect(byDefault.memoryBacking == DomainMemoryBacking(hugepageMiB: 2), "an empty backing: 2 MiB pages")

        let typo = #"{"name":"hp","memoryMiB":512,"memoryBacking":{"hugepages":true},"boot":{"kernel":"/k"}}"#
        #expect(throws: DecodingError.self) { try JSONDecoder().decode(DomainDefinition.self, from: Data(typo.utf8)) }

        let fourMiB = #expect(throws: SnapshotError.self) { try definition(page: 4).validate() }
        #expect(fourMiB?.message.contains("2 or 1024 MiB") == true, "\(fourMiB?.message ?? "")")
        let odd = #expect(throws: SnapshotError.self) { try definition(memoryMiB: 1500, page: 1024).validate() }
        #expect(odd?.message.contains("multiple of 1024") == true, "\(odd?.message ?? "")")
        try definition(memoryMiB: 2048, page: 1024).validate()
    }

    @Test("QEMU gets the guest's RAM as a huge-page memfd, taken at start, under the machine's own RAM name")
    func commandLine() throws {
        let huge = argv(definition())
        let backend = try #require(value(huge, "-object"), "\(huge)")
        let options = Set(backend.split(separator: ",").map(String.init))
        #expect(backend.hasPrefix("memory-backend-memfd,"))
        for expected in ["id=pc.ram", "size=512M", "hugetlb=on", "hugetlbsize=2M", "prealloc=on"] {
            #expect(options.contains(expected), "\(expected) in \(backend)")
        }
        #expect(value(huge, "-machine") == "pc,memory-backend=pc.ram")
        #expect(value(huge, "-m") == "512")

        let plain = argv(definition(page: nil))
        #expect(value(plain, "-machine") == "pc")
        #expect(!plain.contains { $0.hasPrefix("memory-backend") }, "\(plain)")
    }

    /// A directory laid out as /sys/kernel/mm/hugepages with one pool of `pageMiB` pages.
    func sysfs(pageMiB: Int = 2, total: Int, free: Int, reserved: Int) throws -> String {
        let root = NSTemporaryDirectory() + "vmsnap-hugepages-\(UUID().uuidString.prefix(8))"
        let dir = HostHugePages.directory(pageMiB: pageMiB, root: root)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        for (file, n) in [("nr_hugepages", total), ("free_hugepages", free), ("resv_hugepages", reserved)] {
            try "\(n)\n".write(toFile: "\(dir)/\(file)", atomically: false, encoding: .utf8)
        }
        return root
    }

    @Test("a host short of huge pages is told how many the domain needs and how to reserve them")
    func hostPoolChecked() throws {
        let enough = try sysfs(total: 300, free: 280, reserved: 20)
        defer { try? FileManager.default.removeItem(atPath: enough) }
        try HostHugePages.check(definition(), root: enough)  // 256 needed, 260 available

        let short = try sysfs(total: 300, free: 280, reserved: 100)
        defer { try? FileManager.default.removeItem(atPath: short) }
        let refused = #expect(throws: SnapshotError.self) { try HostHugePages.check(definition(), root: short) }
        #expect(refused?.code == .noSpace)
        for part in [
            "needs 256 huge pages of 2 MiB", "has 180 available", "echo 376 > \(short)/hugepages-2048kB/nr_hugepages",
        ] {
            #expect(refused?.message.contains(part) == true, "\(part) in \(refused?.message ?? "")")
        }

        let gigantic = #expect(throws: SnapshotError.self) {
            try HostHugePages.check(definition(memoryMiB: 2048, page: 1024), root: enough)
        }
        #expect(gigantic?.code == .unsupported)
        #expect(gigantic?.message.contains("none of that size") == true, "\(gigantic?.message ?? "")")

        try HostHugePages.check(definition(page: nil), root: short)  // ordinary memory: nothing to check
    }
}

/// The guest RAM found in a QEMU's /proc/PID/maps, read through before a background copy's pause.
@Suite("Guest memory read through before the pause: finding guest RAM")
struct GuestMemoryPrefaultTests {
    let maps = """
        55f9a2c00000-55f9a3400000 r-xp 00000000 fe:00 1234   /usr/bin/qemu-system-x86_64
        7fe9ebe00000-7fea4be00000 rw-p 00000000 00:00 0
        7fea4be00000-7fea4be01000 ---p 00000000 00:00 0
        7ff31be00000-7ff41be00000 rw-s 00000000 00:01 77     /memfd:memory-backend-memfd (deleted)
        7ff500000000-7ff540000000 rwxp 00000000 00:00 0
        7ff600000000-7ff600200000 rw-p 00000000 00:00 0
        """

    @Test(
        "guest RAM only at the guest's exact size: a huge-page memfd by its name, stepped 2 MiB; anonymous RAM stepped 4 KiB"
    )
    func regionsFound() {
        let anon = GuestMemoryPrefault.regions(maps: maps, guestBytes: 1536 << 20)
        #expect(anon == [.init(start: 0x7fe9_ebe0_0000, length: 1536 << 20, step: 4096)], "\(anon)")
        let memfd = GuestMemoryPrefault.regions(maps: maps, guestBytes: 4096 << 20)
        #expect(memfd == [.init(start: 0x7ff3_1be0_0000, length: 4096 << 20, step: 2 << 20)], "\(memfd)")
        // The TCG code buffer (rwxp), smaller anonymous mappings and a memfd of another size
        // are never taken for RAM.
        let none = GuestMemoryPrefault.regions(maps: maps, guestBytes: 1024 << 20)
        #expect(none.isEmpty, "\(none)")
    }

    @Test("a memfd of 1 GiB pages is stepped by 1 GiB, by the page size smaps gives")
    func gigabytePages() {
        let smaps = """
            7fe9ebe00000-7fea4be00000 rw-p 00000000 00:00 0
            Size:            1572864 kB
            KernelPageSize:        4 kB
            7ff31be00000-7ff41be00000 rw-s 00000000 00:01 77     /memfd:memory-backend-memfd (deleted)
            Size:            4194304 kB
            KernelPageSize:  1048576 kB
            MMUPageSize:     1048576 kB
            """
        let sizes = GuestMemoryPrefault.pageSizes(smaps: smaps)
        #expect(sizes == [0x7fe9_ebe0_0000: 4096, 0x7ff3_1be0_0000: 1 << 30], "\(sizes)")
        let memfd = GuestMemoryPrefault.regions(maps: maps, guestBytes: 4096 << 20, pageSizes: sizes)
        #expect(memfd == [.init(start: 0x7ff3_1be0_0000, length: 4096 << 20, step: 1 << 30)], "\(memfd)")
    }

    @Test("every page of a mapping this process holds is read, through process_vm_readv")
    func readsEveryPage() throws {
        // 301 pages of RAM between two inaccessible pages, so the kernel keeps it one mapping
        // of exactly that size; its pages written, so each read finds a page.
        let page = 4096
        let pages = 301
        let base = try #require(
            mmap(nil, (pages + 2) * page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0).flatMap {
                $0 == MAP_FAILED ? nil : $0
            })
        defer { munmap(base, (pages + 2) * page) }
        let ram = base + page
        try #require(mprotect(ram, pages * page, PROT_READ | PROT_WRITE) == 0)
        memset(ram, 0x5a, pages * page)
        #expect(GuestMemoryPrefault.touch(pid: getpid(), guestBytes: UInt64(pages * page)) == pages)
    }

    @Test("a process without guest RAM is read nothing of")
    func nothingToRead() {
        #expect(GuestMemoryPrefault.touch(pid: getpid(), guestBytes: 1 << 40) == nil)
    }
}
