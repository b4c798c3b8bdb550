import Foundation
@testable import LVMBackend
import SnapshotCore
import Testing

/// liblvm2cmd in-process reports: the same answers as the `lvs`/`vgs` tools, errors in stderr,
/// the umask left alone, and every command that changes storage still a child process.
@Suite("LVM reports through liblvm2cmd", .serialized)
struct LVMLibraryRunnerTests {
    static let hasTools =
        FileManager.default.isExecutableFile(atPath: "/usr/sbin/lvs")
        || FileManager.default.isExecutableFile(atPath: "/sbin/lvs")

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

    @Test(
        "in-process vgs/lvs answer like the tools; a missing VG is an error naming it; umask unchanged",
        .enabled(if: hasTools, "needs lvm2 (scripts/setup --lvm)"))
    func sameAnswersAsTheTools() async throws {
        let runner = LVMLibraryRunner(fallback: SubprocessRunner())
        let mask = umask(0o022)
        umask(mask)
        // Other suites change the VG at the same time: compare a volume of this test's own, and
        // the VG's fixed columns.
        var targets = ["vmsnap-no-such-vg"]
        var own: String?
        if let vg = lvmVG {
            own = "\(vg)/vmsnap-libtest-\(UUID().uuidString.prefix(6).lowercased())"
            try await SubprocessRunner().run([
                "lvcreate", "-q", "-y", "-L", "8m", "-n", String(own!.split(separator: "/")[1]), vg,
            ])
            targets = [own!, "\(vg)/no-such-lv"]
        }
        for argv in targets.map(LVMCommands.lvs) + (lvmVG.map { [LVMCommands.vgs($0)] } ?? []) {
            let inProcess = try await runner.execute(argv)
            let child = try await SubprocessRunner().execute(argv)
            #expect(
                (inProcess.status == 0) == (child.status == 0),
                "\(argv): library \(inProcess.status) \(inProcess.standardError), tool \(child.status) \(child.standardError)"
            )
            if child.status == 0 {
                func rows(_ text: String) throws -> [[String: String]] {
                    let object = try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any]
                    let report = (object?["report"] as? [[String: Any]])?.first
                    let list = (report?["lv"] ?? report?["vg"]) as? [[String: String]] ?? []
                    return list.map { $0.filter { $0.key != "vg_free" } }
                }
                let a = try rows(inProcess.standardOutput), b = try rows(child.standardOutput)
                #expect(!a.isEmpty && a == b, "\(argv): \(inProcess.standardOutput) vs \(child.standardOutput)")
            } else {
                #expect(
                    inProcess.standardError.contains("no-such"),
                    "the error names what is missing: \(inProcess.standardError)")
            }
        }
        if let own { _ = try? await SubprocessRunner().run(["lvremove", "-q", "-y", own]) }
        let after = umask(0o022)
        umask(after)
        #expect(after == mask)
    }
}
