import Foundation
import SnapshotCore
import Testing

/// The test guest (scripts/test-guest): Debian's kernel and a busybox initramfs that counts in
/// memory, writes "counter N" to sector 0 of every disk and prints "vmsnap-counter N" on its
/// serial console once a second.
actor GuestImage {
    static let shared = GuestImage()
    /// One build for every suite that asks at once (the actor is reentrant across the await).
    private var building: Task<(kernel: String, initrd: String), any Error>?

    static var repository: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().path
    }

    func files() async throws -> (kernel: String, initrd: String) {
        if let building { return try await building.value }
        let task = Task { try await Self.build() }
        building = task
        return try await task.value
    }

    private static func build() async throws -> (kernel: String, initrd: String) {
        let out = try await SubprocessRunner().run([
            Self.repository + "/scripts/test-guest", Self.repository + "/.build/guest",
        ])
        var kernel = "", initrd = ""
        for line in out.standardOutput.split(separator: "\n") {
            if line.hasPrefix("kernel=") { kernel = String(line.dropFirst(7)) }
            if line.hasPrefix("initrd=") { initrd = String(line.dropFirst(7)) }
        }
        guard !kernel.isEmpty, !initrd.isEmpty else {
            throw CLIFailure("scripts/test-guest printed no kernel/initrd: \(out.standardOutput)")
        }
        return (kernel, initrd)
    }
}

/// One test domain driven through the CLI.
struct Guest {
    let cli: CLI
    let name: String

    struct Disk {
        var target: String
        var backend: String
        var path: String
        var format: String { backend == "vhd" ? "vpc" : backend }
    }
    let disks: [Disk]

    /// Creates the disks (16 MiB each) and defines the domain.
    static func define(
        _ cli: CLI, name: String = "g", disks specs: [(String, String)] = [("vda", "qcow2"), ("vdb", "qcow2")],
        memoryMiB: Int = 192, fill: Int? = nil, memcheck: Int? = nil, resume: Bool = false, agent: Bool = false,
        firmware: [String: String]? = nil, tpm: [String: String]? = nil, hugepageMiB: Int? = nil,
        qemuArgs: [String]? = nil
    ) async throws -> Guest {
        let (kernel, initrd) = try await GuestImage.shared.files()
        var disks: [Disk] = []
        for (target, backend) in specs {
            let path = cli.pool + "/\(name)-\(target).\(["vhd", "raw"].contains(backend) ? backend : "qcow2")"
            if backend == "raw" {
                try await cli.sh("truncate", "-s", "16M", path)
            } else if backend == "vhd" {
                try await cli.sh("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", path, "16M")
            } else {
                try await cli.sh("qemu-img", "create", "-q", "-f", "qcow2", path, "16M")
            }
            disks.append(Disk(target: target, backend: backend, path: path))
        }
        var definition: [String: Any] = [
            "name": name, "memoryMiB": memoryMiB, "vcpus": 1,
            "disks": disks.map { ["target": $0.target, "backend": $0.backend, "locator": $0.path] },
            "boot": [
                "kernel": kernel, "initrd": initrd,
                "cmdline": "console=ttyS0 quiet panic=-1" + (fill.map { " vmsnap.fill=\($0)" } ?? "")
                    + (memcheck.map { " vmsnap.memcheck=\($0)" } ?? "")
                    + (resume ? " vmsnap.resume" : "") + (agent ? " vmsnap.agent" : ""),
            ],
        ]
        if let firmware { definition["firmware"] = firmware }
        if let tpm { definition["tpm"] = tpm }
        if let hugepageMiB { definition["memoryBacking"] = ["hugepageMiB": hugepageMiB] }
        if let qemuArgs { definition["qemuArgs"] = qemuArgs }
        let file = cli.root + "/\(name).json"
        try JSONSerialization.data(withJSONObject: definition).write(to: URL(fileURLWithPath: file))
        try await cli.ok("domain", "define", file)
        return Guest(cli: cli, name: name, disks: disks)
    }

    var serialLog: String { cli.store + "/run/\(name)/serial.log" }

    /// Bytes in the console log so far: a mark to read counters printed after it.
    func mark() -> Int { (try? FileManager.default.attributesOfItem(atPath: serialLog)[.size] as? Int) ?? 0 }

    /// Counters printed after `mark`, in order.
    func counters(after mark: Int) -> [Int] { Self.counters(inLog: serialLog, after: mark) }

    /// The counters a console log at `path` holds after byte `mark` (vmsnap's or libvirt's).
    static func counters(inLog path: String, after mark: Int = 0) -> [Int] {
        consoleLines(inLog: path, after: mark, tagged: "vmsnap-counter ").compactMap { Int($0.prefix { $0.isNumber }) }
    }

    /// What follows `tag` on each console line after byte `mark` that has it.
    static func consoleLines(inLog path: String, after mark: Int, tagged tag: String) -> [Substring] {
        guard let data = FileManager.default.contents(atPath: path), data.count >= mark else { return [] }
        return String(decoding: data[mark...], as: UTF8.self).split(whereSeparator: \.isNewline).compactMap { line in
            line.range(of: tag).map { line[$0.upperBound...] }
        }
    }

    /// The memory checker's lines (`vmsnap.memcheck`) after `mark`: its progress ("sweep S bad
    /// N"), and every page it found that lost a write ("BAD ...") or its end ("exited").
    func memcheckLines(after mark: Int) -> [String] {
        Self.consoleLines(inLog: serialLog, after: mark, tagged: "vmsnap-memcheck ").map(String.init)
    }

    /// Waits until the memory checker has reported its progress `n` times after `mark`, or has
    /// ended (a restored checker that crashed on a stale page).
    func waitMemcheck(sweeps n: Int, after mark: Int, timeout: Double = 120) async throws {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            let lines = memcheckLines(after: mark)
            if lines.filter({ $0.hasPrefix("sweep ") }).count >= n || lines.contains(where: { $0.hasPrefix("exited") })
            {
                return
            }
            try await Task.sleep(for: .milliseconds(250))
        }
        throw CLIFailure(
            "guest '\(name)': the memory checker reported fewer than \(n) sweeps within \(Int(timeout)) s; its lines: \(memcheckLines(after: mark).suffix(5))"
        )
    }

    /// Waits until the guest prints a counter of at least `n` after `mark`; returns it.
    @discardableResult
    func waitCounter(atLeast n: Int, after mark: Int = 0, timeout: Double = 120) async throws -> Int {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let last = counters(after: mark).last, last >= n { return last }
            try await Task.sleep(for: .milliseconds(200))
        }
        let tail = String(
            decoding: (FileManager.default.contents(atPath: serialLog) ?? Data()).suffix(600), as: UTF8.self)
        throw CLIFailure("guest '\(name)' printed no counter >= \(n) within \(Int(timeout)) s; console tail: \(tail)")
    }

    /// The restored guest's first counter after `mark`: the lowest one below `limit`. The old
    /// guest, which the revert stops, may print once more after the mark, at `limit` or above; on
    /// a loaded machine the restored guest may print several before anyone looks, so the last one
    /// seen says little.
    func restoredCounter(after mark: Int, below limit: Int, timeout: Double = 120) async throws -> Int {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let low = counters(after: mark).filter({ $0 < limit }).min() { return low }
            try await Task.sleep(for: .milliseconds(200))
        }
        throw CLIFailure(
            "guest '\(name)' printed no counter below \(limit) within \(Int(timeout)) s of the mark; after it: \(counters(after: mark))"
        )
    }

    /// The counter the guest last wrote to a disk image (read through its chain, `-U` so a
    /// running QEMU's lock does not stop the reader).
    func diskCounter(_ image: String, format: String) async throws -> Int? {
        let raw = cli.root + "/read-\(UUID().uuidString.prefix(6)).raw"
        defer { unlink(raw) }
        try await cli.sh("qemu-img", "convert", "-U", "-f", format, "-O", "raw", image, raw)
        guard let h = FileHandle(forReadingAtPath: raw) else { return nil }
        defer { try? h.close() }
        let text = String(decoding: (try h.read(upToCount: 64) ?? Data()).prefix { $0 != 0 && $0 != 10 }, as: UTF8.self)
        guard text.hasPrefix("counter ") else { return nil }
        return Int(text.dropFirst(8))
    }

    struct DomainStatus: Decodable {
        var state: String
        var currentSnapshot: String?
        var snapshotCount: Int
    }

    func status() async throws -> DomainStatus {
        try decodeJSON(DomainStatus.self, try await cli.ok("domain", "status", name, "--json"), from: "domain status")
    }

    struct SnapshotEntry: Decodable {
        var name: String
        var parent: String?
        var state: String
        var memory: String
        var current: Bool
    }

    func snapshots(_ filters: String...) async throws -> [SnapshotEntry] {
        let r = try await cli.run(["snapshot", "list", name, "--json"] + filters)
        guard r.status == 0 else { throw CLIFailure("snapshot list failed: \(r.err)") }
        return try decodeJSON([SnapshotEntry].self, r.out, from: "snapshot list")
    }

    /// The active layer of a disk, from vmsnap's disk listing.
    func active(_ disk: Disk) async throws -> String { try await cli.list(disk.path).active }

    func stop() async { _ = try? await cli.run(["domain", "stop", name, "--force"]) }

    /// Runs `body`, then stops the guest whether it succeeded or not (a `defer` cannot await,
    /// and a QEMU left behind would slow every later test).
    func running(_ body: () async throws -> Void) async throws {
        do { try await body() } catch {
            await stop()
            throw error
        }
        await stop()
    }
}
