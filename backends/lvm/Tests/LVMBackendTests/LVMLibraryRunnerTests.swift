import Foundation
@testable import LVMBackend
import SnapshotCore
import Testing

/// liblvm2cmd in-process reports: the same answers as the `lvs`/`vgs` tools, errors in stderr,
/// the umask left alone, and every command that changes storage still a child process.
@Suite("LVM reports through liblvm2cmd", .serialized)
struct LVMLibraryRunnerTests {
    static let hasTools = FileManager.default.isExecutableFile(atPath: "/usr/sbin/lvs") || FileManager.default.isExecutableFile(atPath: "/sbin/lvs")

    @Test("only reports without quoting go in-process; lvcreate, lvremove and odd arguments go to the child runner")
    func routing() async throws {
        #expect(LVMLibraryRunner.runsInProcess(LVMCommands.lvs("vg0/lv")))
        #expect(LVMLibraryRunner.runsInProcess(LVMCommands.vgs("vg0")))
        #expect(!LVMLibraryRunner.runsInProcess(LVMCommands.remove("vg0/lv")))
        #expect(!LVMLibraryRunner.runsInProcess(["lvs", "vg 0"]))
        #expect(!LVMLibraryRunner.runsInProcess(["lvs", "vg'0"]))
        let recorder = RecordingRunner()
        let runner = LVMLibraryRunner(fallback: recorder)
        _ = try await runner.execute(LVMCommands.remove("vg0/lv"))
        #expect(recorder.commands == [LVMCommands.remove("vg0/lv")])
    }

    @Test("in-process vgs/lvs answer like the tools; a missing VG is an error naming it; umask unchanged",
          .enabled(if: hasTools, "needs lvm2 (scripts/setup --lvm)"))
    func sameAnswersAsTheTools() async throws {
        let runner = LVMLibraryRunner(fallback: SubprocessRunner())
        let mask = umask(0o022); umask(mask)
        let vg = lvmVG ?? "vmsnap-no-such-vg"
        for argv in [LVMCommands.vgs(vg), LVMCommands.lvs(vg)] {
            let inProcess = try await runner.execute(argv)
            let child = try await SubprocessRunner().execute(argv)
            #expect((inProcess.status == 0) == (child.status == 0), "\(argv): library \(inProcess.status) \(inProcess.standardError), tool \(child.status) \(child.standardError)")
            if child.status == 0 {
                let a = try JSONSerialization.jsonObject(with: Data(inProcess.standardOutput.utf8)) as? NSDictionary
                let b = try JSONSerialization.jsonObject(with: Data(child.standardOutput.utf8)) as? NSDictionary
                #expect(a == b, "\(argv): \(inProcess.standardOutput) vs \(child.standardOutput)")
            } else {
                #expect(inProcess.standardError.contains(vg), "the error names the VG: \(inProcess.standardError)")
            }
        }
        let after = umask(0o022); umask(after)
        #expect(after == mask)
    }
}
