import DiskServer
import Foundation
import IndependentReaders
import SnapshotCore
import Testing
import VHDBackend

#if canImport(Glibc)
    import Glibc
#endif

/// vmsnap's disk server against real NBD clients (libnbd's nbdinfo and nbdcopy, QEMU's qemu-io
/// and qemu-img), serving a VHD chain through vmsnap's VHD engine; what it wrote is read back
/// with libvhdi, a reader independent of both.
@Suite(.serialized) struct DiskServerTests {
    /// A served VHD chain in a fresh directory, its server running on a thread of its own.
    final class Rig: @unchecked Sendable {
        let dir: String
        let base: String
        let child: String
        /// What a reopen serves.
        var active: String
        var server: DiskServer!
        var done = false
        let finished = NSCondition()

        var socket: String { dir + "/d.nbd" }
        var control: String { dir + "/d.ctl" }
        var uri: String { "nbd+unix:///d?socket=\(socket)" }

        init(linger: Double? = nil) throws {
            dir = NSTemporaryDirectory() + "vmsnap-served-\(UUID().uuidString.prefix(8))"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            base = dir + "/base.vhd"
            child = dir + "/child.vhd"
            try VHDEngine.createDynamic(base, size: 8 << 20)
            try Self.fill(base, byte: 0x11, at: 0, count: 8 << 20)
            try VHDEngine.createDifferencing(child, parent: base)
            active = child
            server = try DiskServer(
                dataSocket: socket, controlSocket: control, exportName: "d", linger: linger, log: { _ in }
            ) { [unowned self] in try VHDBackend().openServed(self.layout) }
            Thread.detachNewThread { [self] in
                try? server.run()
                finished.lock()
                done = true
                finished.broadcast()
                finished.unlock()
            }
            let deadline = Date().addingTimeInterval(10)
            while (try? DiskServerControl.send("status", to: control)) == nil, Date() < deadline { usleep(10_000) }
        }

        var layout: DiskLayout {
            DiskLayout(
                disk: DiskRecord(id: active, kind: BackendKind("vhd"), active: active, current: nil), snapshots: [],
                layers: [])
        }

        static func fill(_ path: String, byte: UInt8, at offset: UInt64, count: Int) throws {
            let image = try VHDImage(path: path, writable: true)
            try image.write([UInt8](repeating: byte, count: count), at: offset)
        }

        /// Waits up to `seconds` for the server to exit; true if it did.
        func waitExit(_ seconds: Double) -> Bool {
            finished.lock()
            defer { finished.unlock() }
            let deadline = Date().addingTimeInterval(seconds)
            while !done { if !finished.wait(until: deadline) { return done } }
            return true
        }

        func stop() {
            _ = try? DiskServerControl.send("stop", to: control)
            _ = waitExit(10)
            try? FileManager.default.removeItem(atPath: dir)
        }

        /// Bytes of the chain `[path, parents...]` read with libvhdi.
        func readIndependently(_ chain: [String], at offset: UInt64, count: Int) throws -> [UInt8] {
            try LibVhdiReader(path: chain[0], parentChain: Array(chain.dropFirst())).read(at: offset, length: count)
        }
    }

    /// True once no process holds the image lock on `path`, waiting up to 10 s. The server runs
    /// inside this test process, whose other suites start programs all the time: a child forked
    /// a moment before the server closed its lock descriptor holds a copy of it until its exec.
    static func unlocked(_ path: String) -> Bool {
        let deadline = Date().addingTimeInterval(10)
        while FileLockProbe.isLocked(path, range: FileLockProbe.imageLockBytes) {
            guard Date() < deadline else { return false }
            usleep(20_000)
        }
        return true
    }

    struct Result {
        var status: Int32
        var out: String
        var err: String
    }

    static func run(_ argv: [String], stdin: Data? = nil) throws -> Result {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = argv
        let out = Pipe(), err = Pipe(), input = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = input
        try p.run()
        if let stdin { input.fileHandleForWriting.write(stdin) }
        try input.fileHandleForWriting.close()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return Result(
            status: p.terminationStatus, out: String(decoding: o, as: UTF8.self),
            err: String(decoding: e, as: UTF8.self))
    }

    @Test func realClientsReadAndWriteThroughTheEngine() throws {
        let rig = try Rig()
        defer { rig.stop() }
        let info = try Self.run(["nbdinfo", rig.uri])
        #expect(info.status == 0, "\(info.err)")
        #expect(info.out.contains("export-size: \(8 << 20)") && info.out.contains("can_flush: true"), "\(info.out)")
        #expect(info.out.contains("can_zero: true") && info.out.contains("block_size_minimum: 512"), "\(info.out)")
        // The image lock: the backend sees the served disk in use.
        #expect(FileLockProbe.isLocked(rig.child, range: FileLockProbe.imageLockBytes))
        // nbdcopy writes 3 MiB of random bytes at the start; qemu-io writes a pattern at an odd
        // offset (QEMU aligns it to the 512-byte minimum itself) and zeroes a range.
        var random = [UInt8](repeating: 0, count: 3 << 20)
        for i in random.indices { random[i] = UInt8.random(in: 0...255) }
        let copy = try Self.run(["nbdcopy", "-", rig.uri], stdin: Data(random))
        #expect(copy.status == 0, "\(copy.err)")
        let io = try Self.run([
            "qemu-io", "-f", "raw", rig.uri, "-c", "write -P 0xab 5000001 70000", "-c", "write -z 6291456 65536", "-c",
            "flush",
        ])
        #expect(io.status == 0 && !io.out.contains("failed"), "\(io.out) \(io.err)")
        // Read back through the server and, independently, from the files.
        let read = try Self.run(["qemu-io", "-f", "raw", rig.uri, "-c", "read -P 0xab 5000001 70000"])
        #expect(read.status == 0 && !read.out.contains("fail"), "\(read.out)")
        let chain = [rig.child, rig.base]
        #expect(try rig.readIndependently(chain, at: 0, count: 3 << 20) == random)
        #expect(try rig.readIndependently(chain, at: 5_000_001, count: 70000) == [UInt8](repeating: 0xab, count: 70000))
        #expect(
            try rig.readIndependently(chain, at: 5_000_000, count: 1) == [0x11], "the byte before stays the parent's")
        #expect(try rig.readIndependently(chain, at: 6_291_456, count: 65536) == [UInt8](repeating: 0, count: 65536))
        #expect(try rig.readIndependently(chain, at: 7 << 20, count: 4096) == [UInt8](repeating: 0x11, count: 4096))
        // Writes went to the served layer only.
        #expect(try rig.readIndependently([rig.base], at: 0, count: 4096) == [UInt8](repeating: 0x11, count: 4096))
        let compare = try Self.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", rig.uri, rig.uri])
        #expect(compare.status == 0, "\(compare.out) \(compare.err)")
    }

    @Test func holdWaitsRequestsAndReopenServesTheNewLayer() throws {
        let rig = try Rig()
        defer { rig.stop() }
        #expect(try DiskServerControl.send("status", to: rig.control) == "\(rig.child) serving")
        try DiskServerControl.send("hold", to: rig.control)
        #expect(try DiskServerControl.send("status", to: rig.control) == "\(rig.child) held")
        #expect(Self.unlocked(rig.child), "held: the lock is dropped")
        // A flush is answered while held (QEMU's memory save flushes every disk): nothing is dirty.
        let flushed = try Self.run(["timeout", "20", "qemu-io", "-f", "raw", rig.uri, "-c", "flush"])
        #expect(flushed.status == 0, "a flush waited for the hold: \(flushed.out) \(flushed.err)")
        // A write sent while held waits (it must not reach the old layer).
        let writer = Thread {
            _ = try? Self.run(["qemu-io", "-f", "raw", rig.uri, "-c", "write -P 0x77 0 4096"])
        }
        writer.start()
        usleep(800_000)
        // The storage changes: a new differencing layer over the served one.
        let next = rig.dir + "/next.vhd"
        try VHDEngine.createDifferencing(next, parent: rig.child)
        rig.active = next
        #expect(try DiskServerControl.send("reopen", to: rig.control) == next)
        let deadline = Date().addingTimeInterval(30)
        while (try? rig.readIndependently([next, rig.child, rig.base], at: 0, count: 1)) != [0x77], Date() < deadline {
            usleep(50_000)
        }
        #expect(
            try rig.readIndependently([next, rig.child, rig.base], at: 0, count: 4096)
                == [UInt8](repeating: 0x77, count: 4096))
        #expect(
            try rig.readIndependently([rig.child, rig.base], at: 0, count: 1) == [0x11], "the old layer was not written"
        )
        #expect(FileLockProbe.isLocked(next, range: FileLockProbe.imageLockBytes))
        #expect(Self.unlocked(rig.child))
    }

    @Test func badInputGetsClearAnswersAndChangesNothing() throws {
        let rig = try Rig()
        defer { rig.stop() }
        // Unknown export.
        let unknown = try Self.run(["nbdinfo", "nbd+unix:///nope?socket=\(rig.socket)"])
        #expect(unknown.status != 0, "\(unknown.out)")
        // A read past the end: an error for that request, the connection and the disk fine.
        let past = try Self.run(["qemu-io", "-f", "raw", rig.uri, "-c", "read \((8 << 20) - 512) 1024"])
        #expect(past.out.contains("fail") || past.err.contains("fail") || past.status != 0, "\(past.out) \(past.err)")
        // Garbage instead of a handshake: that client is dropped, the server serves on.
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(rig.socket.utf8) + [0]) }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        #expect(connected == 0)
        var hello = [UInt8](repeating: 0, count: 18)
        _ = read(fd, &hello, 18)
        let junk: [UInt8] = [0, 0, 0, 3] + Array(repeating: 0xee, count: 40)
        _ = junk.withUnsafeBytes { write(fd, $0.baseAddress, junk.count) }
        var byte: UInt8 = 0
        #expect(read(fd, &byte, 1) <= 0, "the server hung up on the bad client")
        close(fd)
        #expect(try Self.run(["nbdinfo", rig.uri]).status == 0, "still serving")
        // Control: an unknown command, and a reopen onto a layer of another size (held, named).
        #expect(throws: SnapshotError.self) { try DiskServerControl.send("explode", to: rig.control) }
        let other = rig.dir + "/other.vhd"
        try VHDEngine.createDynamic(other, size: 4 << 20)
        rig.active = other
        do {
            try DiskServerControl.send("reopen", to: rig.control)
            Issue.record("a reopen onto a 4 MiB layer was accepted")
        } catch let e as SnapshotError {
            #expect(e.message.contains("stays held"), "\(e.message)")
        }
        #expect(try DiskServerControl.send("status", to: rig.control) == "\(rig.child) held")
        rig.active = rig.child
        #expect(try DiskServerControl.send("reopen", to: rig.control) == rig.child)
        // A socket path where a regular file is: refused.
        let file = rig.dir + "/file"
        _ = FileManager.default.createFile(atPath: file, contents: Data("x".utf8))
        let spare = DiskLayout(disk: DiskRecord(id: other, kind: BackendKind("vhd"), active: other))
        do {
            try DiskServer(
                dataSocket: file, controlSocket: rig.dir + "/c2", exportName: "d", linger: nil, log: { _ in }
            ) {
                try VHDBackend().openServed(spare)
            }.run()
            Issue.record("a server listened where a regular file is")
        } catch let e as SnapshotError {
            #expect(e.message.contains("is not a socket"), "\(e.message)")
        }
        #expect(try String(contentsOfFile: file, encoding: .utf8) == "x")
        // A second server on the same disk: refused (the image lock).
        do {
            _ = try DiskServer(
                dataSocket: rig.dir + "/d2", controlSocket: rig.dir + "/c3", exportName: "d", linger: nil, log: { _ in }
            ) { try VHDBackend().openServed(rig.layout) }
            Issue.record("a second server took the served disk")
        } catch let e as SnapshotError {
            #expect(e.code == .inUse, "\(e.message)")
        }
    }

    @Test func exitsOnceTheLastClientHasGone() throws {
        let rig = try Rig(linger: 0.3)
        defer { rig.stop() }
        #expect(!rig.waitExit(1), "no client yet: it waits for one")
        #expect(try Self.run(["nbdinfo", rig.uri]).status == 0)
        #expect(rig.waitExit(10), "the last client left: it exits")
        #expect(!FileManager.default.fileExists(atPath: rig.socket))
        #expect(Self.unlocked(rig.child))
    }
}
