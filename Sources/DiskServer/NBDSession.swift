import Foundation
#if canImport(Glibc)
    import Glibc
#endif

/// One NBD client on a connected socket: the fixed newstyle handshake (EXPORT_NAME, INFO, GO,
/// LIST, ABORT; everything else answered "unsupported", structured replies included, so clients
/// use simple replies), then requests one at a time against the served disk.
struct NBDSession {
    let io: SocketIO
    let disk: ServedDisk
    /// The export's name; the empty name (the default export) is accepted too.
    let exportName: String
    let log: @Sendable (String) -> Void

    /// Serves the client until it disconnects or breaks the protocol.
    func run() {
        do {
            guard try handshake() else { return }
            try transmission()
        } catch is SocketIO.Closed {
        } catch {
            log("client dropped: \(error)")
        }
    }

    // MARK: - Handshake

    /// True when the client chose the export and transmission begins.
    func handshake() throws -> Bool {
        var hello = WireWriter()
        hello.u64(NBD.magic)
        hello.u64(NBD.optionMagic)
        hello.u16(NBD.flagFixedNewstyle | NBD.flagNoZeroes)
        try io.write(hello.bytes)
        var flags = WireReader(try io.read(4))
        let clientFlags = flags.u32() ?? 0
        guard clientFlags & UInt32(NBD.flagFixedNewstyle) != 0 else {
            log("client does not speak the fixed newstyle handshake; closed")
            return false
        }
        let noZeroes = clientFlags & UInt32(NBD.flagNoZeroes) != 0
        while true {
            var head = WireReader(try io.read(16))
            guard head.u64() == NBD.optionMagic, let option = head.u32(), let length = head.u32() else {
                log("bad option magic; closed")
                return false
            }
            guard length <= 4096 else {
                log("option \(option) of \(length) bytes is too long; closed")
                return false
            }
            let data = try io.read(Int(length))
            switch NBD.Option(rawValue: option) {
            case .exportName:
                guard knows(String(decoding: data, as: UTF8.self)) else {
                    log("unknown export \(String(decoding: data, as: UTF8.self)); closed")
                    return false
                }
                var w = WireWriter()
                w.u64(disk.size)
                w.u16(NBD.transmissionFlags)
                if !noZeroes { w.bytes += [UInt8](repeating: 0, count: 124) }
                try io.write(w.bytes)
                return true
            case .abort:
                try reply(option, .ack)
                return false
            case .list:
                guard data.isEmpty else {
                    try reply(option, .errInvalid)
                    continue
                }
                var w = WireWriter()
                w.u32(UInt32(exportName.utf8.count))
                w.bytes += Array(exportName.utf8)
                try reply(option, .server, w.bytes)
                try reply(option, .ack)
            case .info, .go:
                if try answerInfo(option, data), NBD.Option(rawValue: option) == .go { return true }
            case nil:
                try reply(option, .errUnsupported)
            }
        }
    }

    func knows(_ name: String) -> Bool { name.isEmpty || name == exportName }

    /// INFO and GO: the export's size and flags and its block sizes, or an error reply. True
    /// when the export was described (GO then enters transmission).
    func answerInfo(_ option: UInt32, _ data: [UInt8]) throws -> Bool {
        var r = WireReader(data)
        guard let nameLength = r.u32(), let name = r.take(Int(nameLength)), let count = r.u16(),
            r.take(Int(count) * 2) != nil, r.at == data.count
        else {
            try reply(option, .errInvalid)
            return false
        }
        guard knows(String(decoding: name, as: UTF8.self)) else {
            try reply(option, .errUnknown)
            return false
        }
        var export = WireWriter()
        export.u16(NBD.infoExport)
        export.u64(disk.size)
        export.u16(NBD.transmissionFlags)
        try reply(option, .info, export.bytes)
        var sizes = WireWriter()
        sizes.u16(NBD.infoBlockSize)
        sizes.u32(NBD.minimumBlock)
        sizes.u32(NBD.preferredBlock)
        sizes.u32(NBD.maximumRequest)
        try reply(option, .info, sizes.bytes)
        try reply(option, .ack)
        return true
    }

    func reply(_ option: UInt32, _ type: NBD.Reply, _ data: [UInt8] = []) throws {
        var w = WireWriter()
        w.u64(NBD.optionReplyMagic)
        w.u32(option)
        w.u32(type.rawValue)
        w.u32(UInt32(data.count))
        try io.write(w.bytes + data)
    }

    // MARK: - Transmission

    func transmission() throws {
        while true {
            var r = WireReader(try io.read(28))
            guard r.u32() == NBD.requestMagic, let flags = r.u16(), let type = r.u16(), let cookie = r.u64(),
                let offset = r.u64(), let length = r.u32()
            else {
                log("bad request magic; closed")
                return
            }
            let command = NBD.Command(rawValue: type)
            // A write's payload is read whatever the answer, to stay in step with the client.
            var payload: [UInt8] = []
            if command == .write {
                guard length <= NBD.maximumRequest else {
                    log("write of \(length) bytes is over the \(NBD.maximumRequest)-byte limit; closed")
                    return
                }
                payload = try io.read(Int(length))
            }
            if command == .disconnect {
                try? disk.flush()
                return
            }
            let (error, data) = answer(command, flags: flags, offset: offset, length: length, payload: payload)
            var w = WireWriter()
            w.u32(NBD.simpleReplyMagic)
            w.u32(error)
            w.u64(cookie)
            try io.write(w.bytes)
            if error == 0, !data.isEmpty { try io.write(data) }
        }
    }

    /// The errno to send (0: done) and, for a read, the data.
    func answer(_ command: NBD.Command?, flags: UInt16, offset: UInt64, length: UInt32, payload: [UInt8]) -> (
        UInt32, [UInt8]
    ) {
        let inBounds = offset <= disk.size && UInt64(length) <= disk.size - offset
        do {
            switch command {
            case .read:
                guard inBounds, length <= NBD.maximumRequest else { return (NBD.einval, []) }
                return (0, try disk.perform { try $0.read(at: offset, count: Int(length)) })
            case .write:
                guard inBounds else { return (NBD.enospc, []) }
                try disk.perform {
                    try $0.write(payload, at: offset)
                    if flags & NBD.commandFlagFUA != 0 { try $0.flush() }
                }
                return (0, [])
            case .writeZeroes:
                guard inBounds else { return (NBD.enospc, []) }
                try disk.perform { image in
                    var at = offset
                    let end = offset + UInt64(length)
                    while at < end {
                        let n = Int(min(end - at, 1 << 20))
                        try image.write([UInt8](repeating: 0, count: n), at: at)
                        at += UInt64(n)
                    }
                    if flags & NBD.commandFlagFUA != 0 { try image.flush() }
                }
                return (0, [])
            case .flush:
                try disk.flush()
                return (0, [])
            default:
                return (NBD.einval, [])
            }
        } catch {
            log("\(command.map { "\($0)" } ?? "command") at \(offset)+\(length): \(error)")
            return (NBD.eio, [])
        }
    }
}
