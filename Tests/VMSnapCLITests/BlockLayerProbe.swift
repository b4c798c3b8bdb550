import Foundation
import QEMUDriver
import SnapshotCore

/// Writes and reads a running domain's disks from outside, for the domain tests whose QEMU runs no
/// guest OS: writes go through QEMU's own block layer (HMP `qemu-io`, whose output goes to QEMU's
/// stdout, so reads happen on the host with `qemu-io -r -U`).
enum BlockLayerProbe {
    static func hmp(_ cli: CLI, _ domain: String, _ line: String) async throws {
        let client = try await QMPClient.connect(path: cli.store + "/run/\(domain)/qmp.sock")
        _ = try await client.execute("human-monitor-command", ["command-line": .string(line)])
        await client.close()
    }

    /// Writes `value` over the first 64 KiB of `drive` and flushes.
    static func write(_ cli: CLI, _ domain: String, _ drive: String, _ value: UInt8) async throws {
        try await hmp(cli, domain, "qemu-io \(drive) \"write -P \(value) 0 64k\"")
        try await hmp(cli, domain, "qemu-io \(drive) \"flush\"")
    }

    /// True if the image (any path qemu-io opens: a file, /dev/..., rbd:...) holds `value` over
    /// its first 64 KiB.
    static func holds(_ path: String, format: String, _ value: UInt8) async throws -> Bool {
        let out = try await SubprocessRunner().execute([
            "qemu-io", "-r", "-U", "-f", format, "-c", "read -P \(value) 0 64k", path,
        ])
        return out.status == 0 && out.standardOutput.contains("read 65536/65536")
            && !out.standardOutput.contains("Pattern verification failed")
    }
}
