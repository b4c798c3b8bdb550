import Foundation
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// A plug-in executable found in a plug-in directory.
public struct DiscoveredPlugin: Codable, Sendable, Hashable {
    public var kind: BackendKind
    public var path: String
}

/// An executable that looked like a plug-in and is not used, with the reason.
public struct RefusedPlugin: Codable, Sendable, Hashable {
    public var path: String
    public var reason: String
}

/// Finds `vmsnap-backend-<kind>` executables (docs/plugin-protocol.md): `VMSNAP_BACKEND_PATH`,
/// then the user's and the system's plug-in directories. An executable that others could change
/// is refused, never run: vmsnap often runs as root.
public enum PluginDiscovery {
    public static let prefix = "vmsnap-backend-"

    /// The directories searched, in order.
    public static func directories(environment: [String: String] = ProcessInfo.processInfo.environment) -> [String] {
        var dirs = (environment["VMSNAP_BACKEND_PATH"] ?? "").split(separator: ":").map(String.init).filter {
            !$0.isEmpty
        }
        if let home = environment["HOME"], !home.isEmpty { dirs.append(home + "/.local/lib/vmsnap/backends") }
        dirs += ["/usr/local/lib/vmsnap/backends", "/usr/lib/vmsnap/backends"]
        return dirs
    }

    /// Plug-ins in `directories`, first one per kind; `builtIn` kinds are shadowed (refused with
    /// that reason).
    public static func discover(in directories: [String] = directories(), builtIn: Set<BackendKind> = []) -> (
        found: [DiscoveredPlugin], refused: [RefusedPlugin]
    ) {
        var found: [DiscoveredPlugin] = []
        var refused: [RefusedPlugin] = []
        var seen = Set<BackendKind>(builtIn)
        for directory in directories {
            guard let names = try? FileManager.default.contentsOfDirectory(atPath: directory) else { continue }
            for name in names.sorted() where name.hasPrefix(prefix) {
                let path = URL(fileURLWithPath: directory).appendingPathComponent(name).standardizedFileURL.path
                var isDirectory: ObjCBool = false
                if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), isDirectory.boolValue {
                    continue
                }
                let kind = BackendKind(rawValue: String(name.dropFirst(prefix.count)))
                if let why = kindProblem(kind) ?? trustProblem(path) {
                    refused.append(RefusedPlugin(path: path, reason: why))
                    continue
                }
                guard !seen.contains(kind) else {
                    let by =
                        builtIn.contains(kind) ? "the built-in backend" : "a plug-in found earlier on the search path"
                    refused.append(RefusedPlugin(path: path, reason: "shadowed: '\(kind)' is \(by)"))
                    continue
                }
                seen.insert(kind)
                found.append(DiscoveredPlugin(kind: kind, path: path))
            }
        }
        return (found, refused)
    }

    static func kindProblem(_ kind: BackendKind) -> String? {
        kind.rawValue.range(of: "^[a-z][a-z0-9-]{0,31}$", options: .regularExpression) == nil
            ? "'\(kind)' is not a backend kind (lowercase letters, digits and '-', starting with a letter)" : nil
    }

    /// Why a file may not be run as a plug-in: not a regular executable file, or writable by
    /// someone other than its owner, or owned by someone other than root and this user; the
    /// same for its directory.
    static func trustProblem(_ path: String) -> String? {
        var st = stat()
        guard lstat(path, &st) == 0 else { return "cannot be read: \(String(cString: strerror(errno)))" }
        if (st.st_mode & S_IFMT) == S_IFLNK {
            guard let real = try? FileManager.default.destinationOfSymbolicLink(atPath: path) else {
                return "is a dangling symbolic link"
            }
            let target =
                real.hasPrefix("/")
                ? real : ((path as NSString).deletingLastPathComponent as NSString).appendingPathComponent(real)
            return trustProblem(URL(fileURLWithPath: target).standardizedFileURL.path).map {
                "links to a file that \($0)"
            }
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else { return "is not a regular file" }
        guard st.st_mode & 0o111 != 0 else { return "is not executable" }
        if let why = ownershipProblem(st, what: "the file") { return why }
        var dir = stat()
        let directory = (path as NSString).deletingLastPathComponent
        guard stat(directory, &dir) == 0 else { return "its directory cannot be read" }
        if let why = ownershipProblem(dir, what: "its directory \(directory)") { return why }
        return nil
    }

    private static func ownershipProblem(_ st: stat, what: String) -> String? {
        let sticky = (st.st_mode & S_IFMT) == S_IFDIR && st.st_mode & S_ISVTX != 0
        if st.st_mode & 0o022 != 0, !sticky {
            return
                "\(what) is writable by group or others (mode \(String(st.st_mode & 0o7777, radix: 8))): anyone who can change it could make vmsnap run anything; chmod go-w"
        }
        if st.st_uid != 0, st.st_uid != geteuid() {
            return "\(what) is owned by uid \(st.st_uid), neither root nor the user running vmsnap; chown it"
        }
        return nil
    }

    /// A factory per plug-in: the plug-in starts when a command first needs the backend, and
    /// that one process serves the whole command.
    public static func factory(for plugin: DiscoveredPlugin, sessions: PluginSessions) -> BackendFactory {
        BackendFactory(kind: plugin.kind, apiVersion: PluginAPIVersion.current.apiVersion, origin: .plugin(plugin.path))
        { env in
            try sessions.backend(plugin.path, settings: env.settings)
        }
    }
}

/// The running plug-ins of one process, by executable and settings, so every caller in a
/// command shares one plug-in process instead of starting one per call.
public final class PluginSessions: @unchecked Sendable {
    private let lock = NSLock()
    private var running: [String: PluginBackend] = [:]

    public init() {}

    /// Ends every plug-in process (each gets end of input, then has a second to exit).
    public func stopAll() {
        let all = lock.withLock { () -> [PluginBackend] in
            defer { running = [:] }
            return Array(running.values)
        }
        all.forEach { $0.stop() }
    }

    public func backend(_ executable: String, settings: [String: String]) throws -> PluginBackend {
        let key =
            executable + "\u{0}"
            + settings.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: "\u{0}")
        if let live = lock.withLock({ running[key] }) { return live }
        let made = try PluginBackend(executable: executable, settings: settings)
        return lock.withLock {
            if let raced = running[key] { return raced }
            running[key] = made
            return made
        }
    }
}
