// swift-tools-version: 6.2
import PackageDescription

let strict: [SwiftSetting] = [
    .swiftLanguageMode(.v6),
    .enableUpcomingFeature("ExistentialAny"),
]

let package = Package(
    name: "vmsnap",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "SnapshotCore", targets: ["SnapshotCore"]),
        .library(name: "BackendConformance", targets: ["BackendConformance"]),
        .library(name: "BackendPluginKit", targets: ["BackendPluginKit"]),
        .library(name: "Qcow2Backend", targets: ["Qcow2Backend"]),
        .library(name: "VHDBackend", targets: ["VHDBackend"]),
        .library(name: "LVMBackend", targets: ["LVMBackend"]),
        .library(name: "HypervisorDriver", targets: ["HypervisorDriver"]),
        .library(name: "QEMUDriver", targets: ["QEMUDriver"]),
        .library(name: "XenDriver", targets: ["XenDriver"]),
        .library(name: "DomainSnapshots", targets: ["DomainSnapshots"]),
        .executable(name: "vmsnap", targets: ["vmsnap"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/groue/GRDB.swift", from: "7.10.0"),
        .package(url: "https://github.com/swiftlang/swift-subprocess", from: "1.0.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
    ],
    targets: [
        // MARK: - Core and kit
        .target(
            name: "SnapshotCore",
            dependencies: [
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "Subprocess", package: "swift-subprocess"),
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: strict
        ),
        .target(
            name: "BackendConformance",
            dependencies: ["SnapshotCore"],
            swiftSettings: strict
        ),
        // Plug-ins in any language: the host side (discovery, the process, checks) and the
        // server side that turns any DiskSnapshotBackend into a plug-in executable.
        .target(
            name: "BackendPluginKit",
            dependencies: ["SnapshotCore"],
            swiftSettings: strict
        ),

        // vmsnap's NBD disk server: a backend's own engine serving a disk a hypervisor cannot open.
        .target(
            name: "DiskServer",
            dependencies: ["SnapshotCore"],
            swiftSettings: strict
        ),
        // MARK: - Hypervisor drivers and domain snapshots
        // The protocol a hypervisor conforms to, with the domain definition it runs.
        .target(
            name: "HypervisorDriver",
            dependencies: ["SnapshotCore"],
            swiftSettings: strict
        ),
        .target(
            name: "QEMUDriver",
            dependencies: ["SnapshotCore", "HypervisorDriver"],
            swiftSettings: strict
        ),
        // Xen through libxenlight, in process (Debian's libxen-dev).
        .systemLibrary(name: "CLibXL", path: "Sources/CLibXL", providers: [.apt(["libxen-dev"])]),
        .target(
            name: "XenDriver",
            // QEMUDriver for its QMP client: Xen's qdisk disk backend is a QEMU.
            dependencies: ["SnapshotCore", "HypervisorDriver", "QEMUDriver", "CLibXL"],
            swiftSettings: strict
        ),
        // Names no hypervisor and no backend kind: asks the drivers and the backends.
        .target(
            name: "DomainSnapshots",
            dependencies: [
                "SnapshotCore", "HypervisorDriver", "DiskServer", .product(name: "GRDB", package: "GRDB.swift"),
            ],
            swiftSettings: strict
        ),

        // MARK: - Backends
        .target(
            name: "Qcow2Backend",
            dependencies: ["SnapshotCore"],
            path: "backends/qcow2/Sources/Qcow2Backend",
            swiftSettings: strict
        ),
        // The qcow2 backend served as a plug-in (kind qcow2-plugin): the Swift plug-in SDK's
        // worked example, measured against the same backend in process (scripts/bench-plugins).
        .executableTarget(
            name: "vmsnap-backend-qcow2-plugin",
            dependencies: ["Qcow2Backend", "BackendPluginKit", "SnapshotCore"],
            path: "backends/qcow2/Plugin",
            swiftSettings: strict
        ),

        .target(
            name: "VHDBackend",
            dependencies: ["SnapshotCore"],
            path: "backends/vhd/Sources/VHDBackend",
            swiftSettings: strict
        ),

        .systemLibrary(name: "CLVM2Cmd", path: "backends/lvm/Sources/CLVM2Cmd", providers: [.apt(["liblvm2-dev"])]),
        .target(
            name: "LVMBackend",
            dependencies: ["SnapshotCore", "CLVM2Cmd"],
            path: "backends/lvm/Sources/LVMBackend",
            swiftSettings: strict
        ),

        // MARK: - Independent readers (test-only checks against third-party parsers)
        .systemLibrary(
            name: "CLibQcow", path: "TestSupport/CLibQcow", pkgConfig: "libqcow", providers: [.apt(["libqcow-dev"])]),
        .systemLibrary(
            name: "CLibVhdi", path: "TestSupport/CLibVhdi", pkgConfig: "libvhdi", providers: [.apt(["libvhdi-dev"])]),
        .target(
            name: "IndependentReaders",
            dependencies: ["CLibQcow", "CLibVhdi"],
            path: "TestSupport/IndependentReaders",
            swiftSettings: strict
        ),

        // MARK: - CLI
        .executableTarget(
            name: "vmsnap",
            dependencies: [
                "SnapshotCore", "BackendConformance", "BackendPluginKit", "Qcow2Backend", "VHDBackend", "LVMBackend",
                "DomainSnapshots", "DiskServer",
                "HypervisorDriver", "QEMUDriver", "XenDriver",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strict
        ),

        // MARK: - Benchmarks (scripts/bench*)
        .executableTarget(
            name: "vmsnap-bench",
            dependencies: ["SnapshotCore", "Qcow2Backend"],
            path: "Benchmarks/VMSnapBench",
            swiftSettings: strict
        ),

        .executableTarget(
            name: "plugin-bench",
            dependencies: ["BackendPluginKit", "Qcow2Backend", "SnapshotCore"],
            path: "Benchmarks/PluginBench",
            swiftSettings: strict
        ),

        .executableTarget(
            name: "rbd-bench",
            dependencies: ["BackendPluginKit", "SnapshotCore"],
            path: "Benchmarks/RBDBench",
            swiftSettings: strict
        ),

        .executableTarget(
            name: "vhd-bench",
            dependencies: ["VHDBackend", "IndependentReaders"],
            path: "Benchmarks/VHDBench",
            swiftSettings: strict
        ),

        // MARK: - Tests
        .testTarget(
            name: "XenDriverTests",
            dependencies: ["XenDriver", "HypervisorDriver", "SnapshotCore"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "SnapshotCoreTests",
            dependencies: ["SnapshotCore"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "Qcow2BackendTests",
            dependencies: ["Qcow2Backend", "SnapshotCore", "BackendConformance", "IndependentReaders"],
            path: "backends/qcow2/Tests/Qcow2BackendTests",
            swiftSettings: strict
        ),
        .testTarget(
            name: "DiskServerTests",
            dependencies: ["DiskServer", "VHDBackend", "SnapshotCore", "IndependentReaders"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "VHDBackendTests",
            dependencies: ["VHDBackend", "SnapshotCore", "BackendConformance", "IndependentReaders"],
            path: "backends/vhd/Tests/VHDBackendTests",
            swiftSettings: strict
        ),
        .testTarget(
            name: "LVMBackendTests",
            dependencies: ["LVMBackend", "SnapshotCore", "BackendConformance"],
            path: "backends/lvm/Tests/LVMBackendTests",
            swiftSettings: strict
        ),
        .testTarget(
            name: "DomainSnapshotsTests",
            dependencies: [
                "DomainSnapshots", "HypervisorDriver", "QEMUDriver", "XenDriver", "SnapshotCore", "Qcow2Backend",
                "VHDBackend",
                "LVMBackend",
            ],
            swiftSettings: strict
        ),
        .testTarget(
            name: "QEMUDriverTests",
            dependencies: ["QEMUDriver", "HypervisorDriver", "SnapshotCore"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "BackendPluginKitTests",
            dependencies: ["BackendPluginKit", "SnapshotCore"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "VMSnapCLITests",
            dependencies: [
                "SnapshotCore", "HypervisorDriver", "QEMUDriver", "DomainSnapshots", "vmsnap", "IndependentReaders",
            ],
            swiftSettings: strict
        ),
    ]
)
