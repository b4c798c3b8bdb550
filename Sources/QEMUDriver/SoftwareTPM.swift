import Foundation
import HypervisorDriver
import SnapshotCore
#if canImport(Glibc)
    import Glibc
#endif

/// The swtpm process that emulates a domain's TPM 2.0. It starts before QEMU, serves QEMU's one
/// connection on a socket in the domain's run directory, keeps its permanent state in the
/// domain's TPM state directory, and exits once QEMU closes the connection (`--terminate`). QEMU
/// carries the TPM's volatile state in a migration stream, so a memory image holds it.
struct SoftwareTPM {
    let runtime: QEMURuntime
    let runner: any CommandRunning
    var binary = ProcessInfo.processInfo.environment["VMSNAP_SWTPM"] ?? "swtpm"

    /// The swtpm command line: socket mode, TPM 2.0, 0600 state files, a 0600 control socket.
    func argv(_ tpm: DomainTPM) -> [String] {
        [
            binary, "socket", "--tpm2",
            "--tpmstate", "dir=\(tpm.state),mode=0600",
            "--ctrl", "type=unixio,path=\(runtime.tpmSocket),mode=0600",
            "--log", "file=\(runtime.tpmLog)",
            "--pid", "file=\(runtime.tpmPidFile)",
            "--terminate", "--daemon",
        ]
    }

    /// The QEMU arguments that attach the guest's TPM device to the running swtpm.
    static func qemuArguments(_ tpm: DomainTPM, runtime: QEMURuntime) -> [String] {
        [
            "-chardev", "socket,id=vmsnap-tpm,path=\(QEMUDriver.escape(runtime.tpmSocket))",
            "-tpmdev", "emulator,id=vmsnap-tpm0,chardev=vmsnap-tpm",
            "-device", "\(tpm.model),tpmdev=vmsnap-tpm0",
        ]
    }

    /// The swtpm of this domain, if one is alive.
    func pid() -> pid_t? { QEMURuntime.liveProcess(pidFile: runtime.tpmPidFile, naming: runtime.tpmSocket) }

    /// Starts swtpm for `tpm` (ending one an earlier launch left waiting) and waits for its socket.
    func start(_ tpm: DomainTPM, domain: String) async throws {
        await stop(within: .zero)
        unlink(runtime.tpmSocket)
        unlink(runtime.tpmPidFile)
        let command = argv(tpm)
        let out: CommandOutput
        do {
            out = try await runner.execute(command)
        } catch let e as SnapshotError where e.message.hasPrefix("could not start") {
            throw SnapshotError(
                .notFound,
                "domain '\(domain)' has a TPM, and \(binary) (the TPM emulator) is not installed; install swtpm (Debian: apt install swtpm) or remove tpm from the definition"
            )
        }
        guard out.status == 0 else {
            throw SnapshotError(
                .commandFailed,
                "the TPM emulator did not start for domain '\(domain)': \(CommandError(argv: command, status: out.status, standardError: out.standardError.trimmingCharacters(in: .whitespacesAndNewlines)).description); its log is \(runtime.tpmLog)"
            )
        }
        let deadline = ContinuousClock.now + .seconds(10)
        while !FileManager.default.fileExists(atPath: runtime.tpmSocket) {
            guard ContinuousClock.now < deadline else {
                throw SnapshotError(
                    .commandFailed,
                    "the TPM emulator of domain '\(domain)' did not open its socket \(runtime.tpmSocket) within 10 s; its log is \(runtime.tpmLog)"
                )
            }
            try await Task.sleep(for: .milliseconds(10))
        }
    }

    /// Waits up to `timeout` for swtpm to exit on its own (it writes its state as QEMU lets go),
    /// then ends it: a revert must not put state files back under a TPM that still writes them.
    func stop(within timeout: Duration) async {
        guard let pid = pid() else { return }
        let deadline = ContinuousClock.now + timeout
        while self.pid() != nil, ContinuousClock.now < deadline { try? await Task.sleep(for: .milliseconds(10)) }
        guard self.pid() != nil else { return }
        kill(pid, SIGTERM)
        let killAt = ContinuousClock.now + .seconds(3)
        while self.pid() != nil {
            if ContinuousClock.now >= killAt { kill(pid, SIGKILL) }
            try? await Task.sleep(for: .milliseconds(10))
        }
    }
}
