import Foundation
import SnapshotCore
import Testing

/// Runs the built `vmsnap` binary, as an operator would.
struct CLI {
    static let binary: String = {
        if let env = ProcessInfo.processInfo.environment["VMSNAP_BIN"] { return env }
        let dir = (CommandLine.arguments[0] as NSString).deletingLastPathComponent
        for candidate in [dir + "/vmsnap", (dir as NSString).deletingLastPathComponent + "/vmsnap"]
        where FileManager.default.isExecutableFile(atPath: candidate) {
            return candidate
        }
        return URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().path + "/.build/debug/vmsnap"
    }()

    let root: String
    var store: String { root + "/store" }
    var pool: String { root + "/pool" }

    init() throws {
        root = (NSTemporaryDirectory() as NSString).appendingPathComponent("vmsnap-cli-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(atPath: root + "/pool", withIntermediateDirectories: true)
    }

    struct Result {
        var status: Int32
        var out: String
        var err: String
    }

    /// `vmsnap ARGS --store STORE`, with extra environment (fault injection). `raw`: ARGS is the
    /// whole command line (a wrapper such as `timeout` around vmsnap), run with the same environment.
    @discardableResult
    func run(_ args: [String], fault: String? = nil, environment: [String: String] = [:], raw: Bool = false)
        async throws
        -> Result
    {
        var argv = ["env"]
        if let fault { argv.append("VMSNAP_FAULT=\(fault)") }
        var environment = environment
        if environment["VMSNAP_BACKEND_PATH"] == nil,
            ProcessInfo.processInfo.environment["VMSNAP_BACKEND_PATH"] == nil
        {
            // The raw plug-in, as scripts/test sets it up.
            environment["VMSNAP_BACKEND_PATH"] = rawPluginDirectory
        }
        argv += environment.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
        argv += ["VMSNAP_STORE=\(store)"] + (raw ? [] : [CLI.binary]) + args
        let out = try await SubprocessRunner().execute(argv)
        return Result(status: out.status, out: out.standardOutput, err: out.standardError)
    }

    /// Runs and requires exit status 0.
    @discardableResult
    func ok(_ args: String...) async throws -> String {
        let r = try await run(args)
        guard r.status == 0 else {
            throw CLIFailure("vmsnap \(args.joined(separator: " ")) exited \(r.status): \(r.err)")
        }
        return r.out
    }

    func sh(_ argv: String...) async throws {
        try await SubprocessRunner().run(argv)
    }

    /// A new qcow2 disk in the pool.
    func disk(_ name: String = "vm", size: String = "16M") async throws -> String {
        let path = pool + "/\(name).qcow2"
        try await sh("qemu-img", "create", "-q", "-f", "qcow2", path, size)
        return path
    }

    /// A new LUKS-encrypted qcow2 disk in the pool (secret given as a QEMU object, never stored).
    ///
    /// qemu-img times PBKDF2 with the thread's CPU clock before it writes the LUKS header; on these
    /// VMs that clock often reads zero for the first round and qemu-img gives up with "Unable to get
    /// accurate CPU usage" (11 of 30 runs here). That is QEMU measuring, not the image, so the
    /// creation is tried again on exactly that message; any other failure is thrown at once.
    func encryptedDisk(_ name: String, size: String = "8M") async throws -> String {
        let path = pool + "/\(name).qcow2"
        let argv = [
            "qemu-img", "create", "-q", "--object", "secret,id=sec0,data=hunter2", "-f", "qcow2", "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0", path, size,
        ]
        for attempt in 1...20 {
            do {
                try await SubprocessRunner().run(argv)
                return path
            } catch let error as CommandError where "\(error)".contains("Unable to get accurate CPU usage") {
                try? FileManager.default.removeItem(atPath: path)
                if attempt == 20 { throw error }
            }
        }
        return path
    }

    /// Writes byte `value` over `length` bytes at `offset` of a qcow2 image, through QEMU's block layer.
    func fill(_ image: String, _ value: UInt8, at offset: Int = 0, length: Int = 65536) async throws {
        try await sh("qemu-io", "-f", "qcow2", "-c", "write -P \(value) \(offset) \(length)", image)
    }

    /// True if `image` (through its chain) holds byte `value` over the range.
    func holds(_ image: String, _ value: UInt8, at offset: Int = 0, length: Int = 65536, snapshot: String? = nil)
        async throws -> Bool
    {
        var target = image, format = "qcow2"
        if let snapshot {
            // qemu-io cannot open an internal snapshot; qemu-img convert -l can copy it out.
            target = root + "/snapshot-\(UUID().uuidString.prefix(6)).raw"
            format = "raw"
            try await sh(
                "qemu-img", "convert", "-f", "qcow2", "-l", "snapshot.name=\(snapshot)", "-O", "raw", image, target)
        }
        defer { if snapshot != nil { unlink(target) } }
        let out = try await SubprocessRunner().execute([
            "qemu-io", "-r", "-f", format, "-c", "read -P \(value) \(offset) \(length)", target,
        ])
        return out.status == 0 && !out.standardOutput.contains("Pattern verification failed")
    }

    /// Records an issue unless `image` holds byte `value` over the range.
    func expectHolds(
        _ image: String, _ value: UInt8, at offset: Int = 0, snapshot: String? = nil,
        sourceLocation: SourceLocation = #_sourceLocation
    ) async throws {
        let ok = try await holds(image, value, at: offset, snapshot: snapshot)
        #expect(
            ok, "\(image)\(snapshot.map { " at snapshot \($0)" } ?? "") should hold byte \(value) at offset \(offset)",
            sourceLocation: sourceLocation)
    }

    struct Listing: Decodable {
        var disk: String
        var active: String
        var current: String?
        var snapshots: [DiskSnapshot]
    }

    func list(_ disk: String) async throws -> Listing {
        try decodeJSON(
            Listing.self, try await ok("disk", "snapshot", "list", disk, "--json"), from: "disk snapshot list")
    }

    func files() throws -> [String] { try FileManager.default.contentsOfDirectory(atPath: pool).sorted() }
}

/// Decodes a command's `--json` output (ISO 8601 dates); when it is not what was expected, the
/// error names the command and shows the output, so a failure says what vmsnap printed.
func decodeJSON<T: Decodable>(_ type: T.Type, _ output: String, from command: String) throws -> T {
    let decoder = JSONDecoder()
    decoder.dateDecodingStrategy = .iso8601
    do { return try decoder.decode(type, from: Data(output.utf8)) } catch {
        let shown = output.count > 2000 ? output.prefix(1000) + " [...] " + output.suffix(1000) : Substring(output)
        throw CLIFailure(
            "vmsnap \(command) printed \(output.utf8.count) bytes that are not the expected JSON (\(error)): \(shown.debugDescription)"
        )
    }
}

struct CLIFailure: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

let hasQemuIO = FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-io")
