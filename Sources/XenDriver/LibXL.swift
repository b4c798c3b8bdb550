import CLibXL
import Foundation
import SnapshotCore

#if canImport(Glibc)
    import Glibc
#endif

/// A domain as libxl reports it.
struct XenDomainInfo: Sendable, Hashable {
    enum State: Sendable, Hashable {
        case running, paused
        /// Suspended by a memory save: stopped until resumed (cancelled) or destroyed.
        case suspended
        /// Shut down, crashed or dying: it holds no guest any more.
        case ended
    }
    var domid: UInt32
    var state: State
}

/// One libxenlight context: every libxl call vmsnap makes goes through it, one at a time (the
/// calls are synchronous; they run on their own thread, never on Swift's cooperative pool).
/// Opened on first use: on a host that is not a Xen dom0 it says so, and nothing else changes.
final class LibXL: @unchecked Sendable {
    private let lock = NSLock()
    private var ctx: OpaquePointer?
    private var logger: UnsafeMutablePointer<xentoollog_logger>?
    private var openError: SnapshotError?
    private let queue = DispatchQueue(label: "vmsnap.libxl")

    static let shared = LibXL()
    /// A second context, for watching a domain while the shared one runs a long call (a save).
    static let watcher = LibXL()

    /// libxl reaps only the children it started (vmsnap runs its own: lvcreate, qemu-img).
    /// libxl keeps the pointer: it lives as long as the process.
    private let hooks: UnsafeMutablePointer<libxl_childproc_hooks> = {
        let h = UnsafeMutablePointer<libxl_childproc_hooks>.allocate(capacity: 1)
        h.initialize(to: libxl_childproc_hooks())
        h.pointee.chldowner = libxl_sigchld_owner_libxl_always_selective_reap
        return h
    }()

    /// The open context, opening it on first use.
    private func context() throws -> OpaquePointer {
        if let ctx { return ctx }
        if let openError { throw openError }
        guard FileManager.default.fileExists(atPath: "/proc/xen/capabilities"),
            (try? String(contentsOfFile: "/proc/xen/capabilities", encoding: .utf8))?.contains("control_d") == true
        else {
            openError = SnapshotError(
                .unsupported,
                "this host is not a Xen dom0 (no control_d in /proc/xen/capabilities): Xen domains run only on a host booted under Xen, with xenfs mounted on /proc/xen"
            )
            throw openError!
        }
        let level = ProcessInfo.processInfo.environment["VMSNAP_XEN_DEBUG"] != nil ? XTL_DEBUG : XTL_ERROR
        logger = vmsnap_xtl_stderr(level)
        var c: OpaquePointer?
        let rc = libxl_ctx_alloc(&c, Int32(LIBXL_VERSION), 0, logger)
        guard rc == 0, let c else {
            openError = SnapshotError(
                .commandFailed,
                "libxl could not open a context (error \(rc)): is xenstored running, and is vmsnap run as root?")
            throw openError!
        }
        libxl_childproc_setmode(c, hooks, nil)
        ctx = c
        return c
    }

    /// Runs `body` with the context on libxl's own thread, one call at a time.
    func call<T: Sendable>(_ body: @escaping @Sendable (OpaquePointer) throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { cont in
            queue.async {
                cont.resume(with: Result { try self.now(body) })
            }
        }
    }

    /// Runs `body` with the context on the caller's thread (quick calls from synchronous code).
    func now<T>(_ body: (OpaquePointer) throws -> T) throws -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body(try context())
    }

    // MARK: - Calls

    static func check(_ rc: Int32, _ what: String) throws {
        guard rc == 0 else { throw SnapshotError(.commandFailed, "libxl: \(what) failed (\(describe(rc)))") }
    }

    /// libxl's error codes (libxl.h's `libxl_error`), named.
    static func describe(_ rc: Int32) -> String {
        let names: [Int32: String] = [
            -1: "ERROR_NONSPECIFIC", -2: "ERROR_VERSION", -3: "ERROR_FAIL", -4: "ERROR_NI", -5: "ERROR_NOMEM",
            -6: "ERROR_INVAL", -7: "ERROR_BADFAIL", -8: "ERROR_GUEST_TIMEDOUT", -9: "ERROR_TIMEDOUT",
            -10: "ERROR_NOPARAVIRT", -11: "ERROR_NOT_READY", -12: "ERROR_OSEVENT_REG_FAIL",
            -13: "ERROR_BUFFERFULL", -14: "ERROR_UNKNOWN_CHILD", -15: "ERROR_LOCK_FAIL",
            -16: "ERROR_JSON_CONFIG_EMPTY", -17: "ERROR_DEVICE_EXISTS", -18: "ERROR_CHECKPOINT_DEVOPS_DOES_NOT_MATCH",
            -19: "ERROR_CHECKPOINT_DEVICE_NOT_SUPPORTED", -20: "ERROR_VNUMA_CONFIG_INVALID",
            -21: "ERROR_DOMAIN_NOTFOUND", -22: "ERROR_ABORTED", -23: "ERROR_NOTFOUND", -24: "ERROR_DOMAIN_DESTROYED",
            -25: "ERROR_FEATURE_REMOVED", -26: "ERROR_PROTOCOL_ERROR_QMP", -27: "ERROR_UNKNOWN_QMP_ERROR",
            -28: "ERROR_QMP_GENERIC_ERROR", -29: "ERROR_QMP_COMMAND_NOT_FOUND", -30: "ERROR_QMP_DEVICE_NOT_ACTIVE",
            -31: "ERROR_QMP_DEVICE_NOT_FOUND", -32: "ERROR_QEMU_API",
        ]
        return names[rc].map { "\($0), \(rc)" } ?? "error \(rc)"
    }

    /// The domain named `name`, nil if Xen has none.
    static func domid(_ ctx: OpaquePointer, _ name: String) -> UInt32? {
        var id: UInt32 = 0
        return libxl_name_to_domid(ctx, name, &id) == 0 ? id : nil
    }

    static func info(_ ctx: OpaquePointer, _ domid: UInt32) -> XenDomainInfo? {
        var info = libxl_dominfo()
        libxl_dominfo_init(&info)
        defer { libxl_dominfo_dispose(&info) }
        guard libxl_domain_info(ctx, &info, domid) == 0 else { return nil }
        let state: XenDomainInfo.State =
            if info.dying { .ended } else if info.shutdown {
                info.shutdown_reason == LIBXL_SHUTDOWN_REASON_SUSPEND ? .suspended : .ended
            } else if info.paused { .paused } else { .running }
        return XenDomainInfo(domid: domid, state: state)
    }

    /// A domain configuration parsed from libxl's own JSON form, handed to `body`, then freed.
    static func withConfig<T>(_ ctx: OpaquePointer, json: String, _ body: (inout libxl_domain_config) throws -> T)
        throws -> T
    {
        var config = libxl_domain_config()
        libxl_domain_config_init(&config)
        defer { libxl_domain_config_dispose(&config) }
        let rc = libxl_domain_config_from_json(ctx, &config, json)
        guard rc == 0 else {
            throw SnapshotError(.invalidArgument, "libxl refused the domain configuration (\(describe(rc))): \(json)")
        }
        return try body(&config)
    }

    /// The configuration libxl keeps for a running domain, in its JSON form.
    static func retrieveConfig(_ ctx: OpaquePointer, _ domid: UInt32) throws -> String {
        var config = libxl_domain_config()
        libxl_domain_config_init(&config)
        defer { libxl_domain_config_dispose(&config) }
        try check(
            libxl_retrieve_domain_configuration(ctx, domid, &config, nil), "reading domain \(domid)'s configuration")
        guard let text = libxl_domain_config_to_json(ctx, &config) else {
            throw SnapshotError(.commandFailed, "libxl: writing domain \(domid)'s configuration as JSON failed")
        }
        defer { free(text) }
        return String(cString: text)
    }
}
