import Foundation
import SnapshotCore
import Synchronization

/// Reports a long hypervisor step's progress from a file's position, shared with the process
/// that writes it (libxl's save helper, QEMU's migration): both use the same open file, so its
/// offset moves.
public final class FileProgress: Sendable {
    private let stopped = Mutex(false)

    public static func watch(fd: Int32, phase: String, total: UInt64, progress: ProgressHandler?) -> FileProgress {
        let watch = FileProgress()
        guard let progress else { return watch }
        let start = ContinuousClock.now
        Thread.detachNewThread {
            while watch.isRunning {
                Thread.sleep(forTimeInterval: 0.25)
                let at = lseek(fd, 0, SEEK_CUR)
                if at > 0, watch.isRunning {
                    progress(
                        .measured(phase, done: UInt64(at), total: total, seconds: (ContinuousClock.now - start).seconds)
                    )
                }
            }
        }
        return watch
    }

    public var isRunning: Bool { !stopped.withLock { $0 } }

    public func stop() { stopped.withLock { $0 = true } }
}

extension Duration {
    /// The duration in seconds, as a floating-point number.
    public var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}
