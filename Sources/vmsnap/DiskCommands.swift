import ArgumentParser
import DiskServer
import Foundation
import SnapshotCore

/// `vmsnap disk ...`: snapshots of one disk, through its backend.
struct DiskCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "disk",
        abstract: "Snapshots of a single disk (qcow2 file, LVM volume, VHD file).",
        subcommands: [
            DiskInfoCommand.self, DiskCheckCommand.self, DiskSnapshotCommand.self, DiskChangesCommand.self,
            DiskServeCommand.self,
        ]
    )
}

/// How `delete` treats a snapshot's subtree, for disk and domain snapshots alike.
struct DeleteOptions: ParsableArguments {
    @Flag(name: .long, help: "Delete the snapshot and all its descendants.") var children = false
    @Flag(name: .long, help: "Delete only the descendants; keep the snapshot.") var childrenOnly = false
    @Flag(name: .long, help: "Forget the snapshot(s) but leave storage as it is.") var metadataOnly = false

    func validate() throws {
        if children && childrenOnly { throw ValidationError("--children and --children-only conflict: choose one") }
    }

    var mode: DeleteMode { children ? .children : (childrenOnly ? .childrenOnly : .merge) }
}

struct DiskOptions: ParsableArguments {
    @Argument(help: "The disk: an image path, or a volume for block backends.")
    var disk: String

    @Option(name: .long, help: "The backend to use (default: the one that manages or recognizes the disk).")
    var backend: BackendKind?
}

struct DiskInfoCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info", abstract: "What the storage and vmsnap know of a disk.")
    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var diskOptions: DiskOptions
    @Flag(name: .long, help: "Print JSON.") var json = false

    struct Report: Codable {
        var disk: DiskRecord
        var info: DiskInfo
        var layers: [DiskLayer]
        var managed: Bool
    }

    func run() async throws {
        try await guarded {
            let service = try storeOptions.service()
            let (backend, layout) = try await service.layout(of: diskOptions.disk, kind: diskOptions.backend)
            let managed = try service.store.layout(diskID: layout.disk.id) != nil
            let info = try await backend.inspect(locator: layout.disk.active)
            let report = Report(disk: layout.disk, info: info, layers: layout.layers, managed: managed)
            if json { return try printJSON(report) }
            print("disk:         \(layout.disk.id)\(managed ? "" : " (not yet managed by vmsnap)")")
            print("backend:      \(layout.disk.kind)")
            print("active:       \(layout.disk.active)")
            print("format:       \(info.format)")
            print("virtual size: \(info.virtualSize) bytes")
            if !info.backingChain.isEmpty { print("backing:      \(info.backingChain.joined(separator: " <- "))") }
            print("current:      \(layout.disk.current ?? "-")")
            print("in the image: \(info.snapshots.count) internal snapshot(s)")
        }
    }
}

struct DiskServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve a disk's data over NBD on a Unix socket, through its backend's own engine.",
        discussion:
            "vmsnap starts this for a running domain's disk whose format the hypervisor cannot open (a VHD chain under QEMU) and stops it with the domain; run by hand it serves until stopped (`--linger` ends it once the last client has been gone that long). The control socket takes one line: status, hold (flush, drop the image lock, make requests wait), reopen (serve the layer the disk's record names active now), stop."
    )
    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var diskOptions: DiskOptions
    @Option(name: .long, help: "The NBD export's Unix socket.") var socket: String
    @Option(name: .long, help: "The control socket.") var control: String
    @Option(name: .long, help: "The export's name (the default export '' is served too).") var export = "disk"
    @Option(name: .long, help: "Exit once the last client has been gone this many seconds.") var linger: Double?

    func run() async throws {
        try await guarded {
            let service = try storeOptions.service()
            let (backend, layout) = try await service.manage(diskOptions.disk, kind: diskOptions.backend)
            let store = service.store
            let id = layout.disk.id
            let server = try DiskServer(
                dataSocket: socket, controlSocket: control, exportName: export, linger: linger,
                log: { FileHandle.standardError.write(Data("vmsnap disk serve: \($0)\n".utf8)) }
            ) {
                guard let now = try store.layout(diskID: id) else {
                    throw SnapshotError(.notFound, "disk \(id) is no longer managed by vmsnap; nothing to serve")
                }
                return try backend.openServed(now)
            }
            FileHandle.standardError.write(Data("vmsnap disk serve: \(id) on \(socket)\n".utf8))
            try server.run()
        }
    }
}

struct DiskCheckCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check every layer of a disk with its format's checker, and vmsnap's metadata against the storage.",
        discussion:
            "With --repair, first does the upkeep the backend knows that keeps snapshots valid without touching guest data: for LVM, grows copy-on-write areas and thin pools filled past warn-percent (default 80) by extend-percent of their size (default 20). Run it from a timer to keep classic snapshots from overflowing."
    )
    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var diskOptions: DiskOptions
    @Flag(name: .long, help: "Print JSON.") var json = false
    @Flag(name: .long, help: "Grow what is filling up (LVM copy-on-write areas, thin pools) before checking.")
    var repair = false

    func run() async throws {
        try await guarded {
            let service = try storeOptions.service()
            var actions: [String] = []
            if repair {
                actions = try await service.maintain(disk: diskOptions.disk, kind: diskOptions.backend)
                if !json { actions.forEach { print("repaired: \($0)") } }
            }
            let (backend, layout) = try await service.layout(of: diskOptions.disk, kind: diskOptions.backend)
            var problems = try await backend.verify(layout: layout)
            let pending = try await service.unfinishedOperations(layout, backend: backend)
            problems += pending.map {
                "unfinished operation '\($0)' (interrupted, or waiting on the storage): `vmsnap recover --disk \(layout.disk.id)` finishes it or says what it waits for"
            }
            if json {
                try printJSON([
                    "disk": layout.disk.id, "problems": problems.joined(separator: "\n"),
                    "repaired": actions.joined(separator: "\n"),
                ])
            } else {
                problems.forEach { print("problem: \($0)") }
                print(
                    problems.isEmpty
                        ? "\(layout.disk.id): \(layout.layers.count) layer(s), \(layout.snapshots.count) snapshot(s), no problems"
                        : "\(problems.count) problem(s)")
            }
            if !problems.isEmpty { throw ExitCode(1) }
        }
    }
}

struct DiskSnapshotCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Create, list, revert and delete disk snapshots.",
        subcommands: [Create.self, List.self, Revert.self, Delete.self]
    )

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "create", abstract: "Take a snapshot of a disk.")
        @OptionGroup var storeOptions: StoreOptions
        @OptionGroup var diskOptions: DiskOptions
        @Argument(help: "The snapshot's name.") var name: String
        @Option(
            name: .long,
            help:
                "internal (inside the image) or external (new overlay / volume); default: internal where the backend has it, else external."
        ) var kind: SnapshotKind?
        @Option(name: .long, help: "A description kept with the snapshot.") var description: String?
        @Option(name: .long, help: "Directory for the new overlay (external snapshots of file formats).")
        var overlayDir: String?
        @Flag(name: .long, help: "Print the new snapshot as JSON.") var json = false

        func validate() throws {
            if kind == .internal && overlayDir != nil {
                throw ValidationError(
                    "--overlay-dir applies to --kind external only; an internal snapshot stays inside the image")
            }
        }

        func run() async throws {
            try await guarded {
                let service = try storeOptions.service()
                var chosen = kind
                if chosen == nil {
                    let kinds = try await service.layout(of: diskOptions.disk, kind: diskOptions.backend).0.descriptor
                        .capabilities.kinds
                    chosen = overlayDir == nil && kinds.contains(.internal) ? .internal : .external
                }
                let snap = try await service.create(
                    SnapshotRequest(
                        name: name, kind: chosen ?? .internal, description: description, overlayDirectory: overlayDir),
                    disk: diskOptions.disk, kind: diskOptions.backend)
                if json { return try printJSON(snap) }
                print("created \(snap.kind.rawValue) snapshot '\(snap.name)' of \(diskOptions.disk)")
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List a disk's snapshots.")
        @OptionGroup var storeOptions: StoreOptions
        @OptionGroup var diskOptions: DiskOptions
        @Flag(name: .long, help: "Draw the snapshot tree.") var tree = false
        @Flag(name: .long, help: "Print JSON.") var json = false

        func validate() throws {
            if tree && json {
                throw ValidationError("--tree and --json conflict: JSON already carries each snapshot's parent")
            }
        }

        struct Listing: Codable {
            var disk: String
            var active: String
            var current: String?
            var snapshots: [DiskSnapshot]
            /// Operations started and not finished (a deferred LVM merge, an interrupted plan).
            var unfinished: [String]
        }

        func run() async throws {
            try await guarded {
                let service = try storeOptions.service()
                let (backend, layout) = try await service.layout(of: diskOptions.disk, kind: diskOptions.backend)
                let unfinished = try await service.unfinishedOperations(layout, backend: backend)
                if json {
                    return try printJSON(
                        Listing(
                            disk: layout.disk.id, active: layout.disk.active, current: layout.disk.current,
                            snapshots: layout.snapshots, unfinished: unfinished))
                }
                for op in unfinished {
                    FileHandle.standardError.write(
                        Data(
                            "vmsnap: '\(op)' is not finished (deferred or interrupted); `vmsnap recover --disk \(layout.disk.id)` finishes it or says what it waits for\n"
                                .utf8))
                }
                if tree {
                    print(layout.tree.rendered(marking: layout.disk.current) { "\($0.name) (\($0.kind.rawValue))" })
                    return
                }
                let rows = layout.snapshots.map { s in
                    [
                        s.name + (s.name == layout.disk.current ? " *" : ""), s.kind.rawValue, s.parent ?? "-",
                        utcString(s.createdAt), s.image,
                    ]
                }
                printTable(["NAME", "KIND", "PARENT", "CREATED (UTC)", "IMAGE"], rows)
            }
        }
    }

    struct Revert: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "revert",
            abstract: "Make the disk what it was at a snapshot (the current state is discarded).")
        @OptionGroup var storeOptions: StoreOptions
        @OptionGroup var diskOptions: DiskOptions
        @Argument(help: "The snapshot to revert to.") var name: String

        func run() async throws {
            try await guarded {
                let service = try storeOptions.service()
                let layout = try await service.revert(disk: diskOptions.disk, to: name, kind: diskOptions.backend)
                print("reverted \(layout.disk.id) to '\(name)'; active layer: \(layout.disk.active)")
            }
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "delete",
            abstract: "Delete a snapshot, merging its changes into its children.")
        @OptionGroup var storeOptions: StoreOptions
        @OptionGroup var diskOptions: DiskOptions
        @Argument(help: "The snapshot to delete.") var name: String
        @OptionGroup var deletion: DeleteOptions

        func run() async throws {
            try await guarded {
                let service = try storeOptions.service()
                let mode = deletion.mode
                try await service.delete(
                    disk: diskOptions.disk, snapshot: name, mode: mode, metadataOnly: deletion.metadataOnly,
                    kind: diskOptions.backend)
                let what =
                    mode == .merge
                    ? "snapshot '\(name)'"
                    : (mode == .children ? "snapshot '\(name)' and its descendants" : "the descendants of '\(name)'")
                print("deleted \(what)\(deletion.metadataOnly ? " (metadata only; storage kept)" : "")")
            }
        }
    }
}

/// Prints rows under a header, columns padded to their widest cell.
func printTable(_ header: [String], _ rows: [[String]]) {
    let all = [header] + rows
    let widths = header.indices.map { i in all.map { $0[i].count }.max() ?? 0 }
    for row in all {
        print(
            row.enumerated().map { i, cell in
                i == row.count - 1 ? cell : cell.padding(toLength: widths[i], withPad: " ", startingAt: 0)
            }.joined(separator: "  "))
    }
}
