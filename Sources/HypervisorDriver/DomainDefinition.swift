import Foundation
import SnapshotCore

/// The run state of a domain, recorded with a domain snapshot (lowercase, as in libvirt).
public enum DomainRunState: String, Codable, Sendable, CaseIterable, Hashable {
    case running, paused, shutoff
}

// MARK: - Domains

/// One disk of a domain: the device name the guest sees, the backend and the locator.
public struct DomainDisk: Codable, Sendable, Hashable {
    /// Guest device name (`vda`, `vdb`, ...).
    public var target: String
    public var backend: BackendKind
    /// A path (qcow2, VHD, raw LV device) or `vg/lv`.
    public var locator: String

    public init(target: String, backend: BackendKind, locator: String) {
        self.target = target
        self.backend = backend
        self.locator = locator
    }
}

/// How a domain boots: a kernel (and initrd, command line) or the first disk's boot loader.
public struct DomainBoot: Codable, Sendable, Hashable {
    public var kernel: String?
    public var initrd: String?
    public var cmdline: String?

    public init(kernel: String? = nil, initrd: String? = nil, cmdline: String? = nil) {
        self.kernel = kernel
        self.initrd = initrd
        self.cmdline = cmdline
    }
}

/// A virtual machine as vmsnap knows it. `vmsnap domain define FILE` reads this as JSON.
public struct DomainDefinition: Codable, Sendable, Hashable {
    public var name: String
    public var uuid: UUID
    public var memoryMiB: Int
    public var vcpus: Int
    public var disks: [DomainDisk]
    public var boot: DomainBoot
    /// The accelerator, as the hypervisor's driver understands it (QEMU: `auto`, `kvm`, `tcg`).
    public var accel: String
    /// Extra arguments for the QEMU driver, appended as given (an array: never parsed by a shell).
    public var qemuArgs: [String]
    /// The hypervisor that runs the domain, by driver name (`qemu`); the driver registry
    /// resolves it.
    public var hypervisor: String

    public init(
        name: String, uuid: UUID = UUID(), memoryMiB: Int, vcpus: Int = 1, disks: [DomainDisk],
        boot: DomainBoot = DomainBoot(),
        accel: String = "auto", qemuArgs: [String] = [], hypervisor: String = "qemu"
    ) {
        self.name = name
        self.uuid = uuid
        self.memoryMiB = memoryMiB
        self.vcpus = vcpus
        self.disks = disks
        self.boot = boot
        self.accel = accel
        self.qemuArgs = qemuArgs
        self.hypervisor = hypervisor
    }

    enum CodingKeys: String, CodingKey { case name, uuid, memoryMiB, vcpus, disks, boot, accel, qemuArgs, hypervisor }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        uuid = try c.decodeIfPresent(UUID.self, forKey: .uuid) ?? UUID()
        memoryMiB = try c.decode(Int.self, forKey: .memoryMiB)
        vcpus = try c.decodeIfPresent(Int.self, forKey: .vcpus) ?? 1
        disks = try c.decodeIfPresent([DomainDisk].self, forKey: .disks) ?? []
        boot = try c.decodeIfPresent(DomainBoot.self, forKey: .boot) ?? DomainBoot()
        accel = try c.decodeIfPresent(String.self, forKey: .accel) ?? "auto"
        qemuArgs = try c.decodeIfPresent([String].self, forKey: .qemuArgs) ?? []
        hypervisor = try c.decodeIfPresent(String.self, forKey: .hypervisor) ?? "qemu"
    }

    /// Checks everything that can be checked without touching storage.
    public func validate() throws {
        try SnapshotName.validate(name)
        guard (16...(1 << 20)).contains(memoryMiB) else {
            throw SnapshotError(
                .invalidArgument,
                "domain '\(name)': memoryMiB is \(memoryMiB); give a size in MiB between 16 and 1048576")
        }
        guard (1...256).contains(vcpus) else {
            throw SnapshotError(.invalidArgument, "domain '\(name)': vcpus is \(vcpus); give 1 to 256")
        }
        var targets = Set<String>()
        for disk in disks {
            guard disk.target.range(of: "^[a-z]{2,3}[a-z]$", options: .regularExpression) != nil else {
                throw SnapshotError(
                    .invalidArgument,
                    "domain '\(name)': disk target '\(disk.target)' is not a device name like vda or vdb")
            }
            guard targets.insert(disk.target).inserted else {
                throw SnapshotError(.invalidArgument, "domain '\(name)': disk target '\(disk.target)' appears twice")
            }
            guard !disk.locator.isEmpty else {
                throw SnapshotError(.invalidArgument, "domain '\(name)': disk \(disk.target) has an empty locator")
            }
        }
        if boot.kernel == nil, disks.isEmpty {
            throw SnapshotError(
                .invalidArgument, "domain '\(name)': nothing to boot; give boot.kernel or at least one disk")
        }
        if boot.kernel == nil, boot.initrd != nil || boot.cmdline != nil {
            throw SnapshotError(.invalidArgument, "domain '\(name)': boot.initrd and boot.cmdline need boot.kernel")
        }
    }
}
