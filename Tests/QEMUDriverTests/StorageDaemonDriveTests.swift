import Foundation
import HypervisorDriver
import SnapshotCore
import Testing

@testable import QEMUDriver

/// How the storage daemon opens each kind of drive (`--blockdev` JSON), the rbd: spelling above all.
@Suite("storage daemon drives")
struct StorageDaemonDriveTests {
    func options(_ json: String) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
    }

    @Test(
        "QEMU's legacy rbd: filename becomes rbd driver options: pool, namespace, image, snapshot, user, conf, escapes")
    func rbdSpelling() throws {
        let spec = try options(
            QEMUStorageDaemon.blockdev(
                DomainDrive(
                    target: "vda",
                    drive: HypervisorDrive(
                        path: #"rbd:vms/ns1/web@s1:id=backup:conf=/etc/ceph/a\:b.conf"#, format: "raw",
                        sourceType: .network))))
        #expect(spec["driver"] as? String == "raw")
        let file = try #require(spec["file"] as? [String: String])
        #expect(
            file == [
                "driver": "rbd", "pool": "vms", "namespace": "ns1", "image": "web", "snapshot": "s1", "user": "backup",
                "conf": "/etc/ceph/a:b.conf",
            ])
        let plain = try #require(QEMUStorageDaemon.rbdOptions("rbd:vms/web") as? [String: String])
        #expect(plain == ["driver": "rbd", "pool": "vms", "image": "web"])
        // An escaped '@' or '/' is part of the name, as QEMU reads it.
        let escaped = try #require(QEMUStorageDaemon.rbdOptions(#"rbd:vms/im\@g\/x"#) as? [String: String])
        #expect(escaped == ["driver": "rbd", "pool": "vms", "image": "im@g/x"])
    }

    @Test("other network spellings, unknown keys and malformed names are refused, naming the disk")
    func refusals() throws {
        for path in [
            "nbd:localhost:10809", "rbd:vms", "rbd:vms/web:mon_host=1.2.3.4", "rbd:vms//web", #"rbd:vms/web\"#,
            "rbd:vms/web:id", "rbd:vms/web@", "rbd:vms@s/web", "rbd:a/b/c/d", "rbd:vms/web@a@b",
        ] {
            #expect(QEMUStorageDaemon.rbdOptions(path) == nil, "\(path)")
            do {
                _ = try QEMUStorageDaemon.blockdev(
                    DomainDrive(
                        target: "vdb", drive: HypervisorDrive(path: path, format: "raw", sourceType: .network)))
                Issue.record("\(path) was accepted")
            } catch let e as SnapshotError {
                #expect(e.code == .unsupported && e.message.contains("disk vdb"), "\(e.message)")
            }
        }
    }
}
