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

    enum CodingKeys: String, CodingKey, CaseIterable { case target, backend, locator }

    public init(from decoder: any Decoder) throws {
        try StrictKeys.refuseUnknown(decoder, known: CodingKeys.allCases.map(\.rawValue), in: "a disk")
        let c = try decoder.container(keyedBy: CodingKeys.self)
        target = try c.decode(String.self, forKey: .target)
        backend = try c.decode(BackendKind.self, forKey: .backend)
        locator = try c.decode(String.self, forKey: .locator)
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

    enum CodingKeys: String, CodingKey, CaseIterable { case kernel, initrd, cmdline }

    public init(from decoder: any Decoder) throws {
        try StrictKeys.refuseUnknown(decoder, known: CodingKeys.allCases.map(\.rawValue), in: "boot")
        let c = try decoder.container(keyedBy: CodingKeys.self)
        kernel = try c.decodeIfPresent(String.self, forKey: .kernel)
        initrd = try c.decodeIfPresent(String.self, forKey: .initrd)
        cmdline = try c.decodeIfPresent(String.self, forKey: .cmdline)
    }
}

/// UEFI firmware (QEMU: OVMF): the read-only firmware image and the domain's own variable store
/// (its NVRAM: boot entries, Secure Boot keys, counters the firmware keeps). The variables are
/// the domain's state as much as its disks: each snapshot keeps a copy, a revert puts it back.
public struct DomainFirmware: Codable, Sendable, Hashable {
    /// The firmware code, e.g. /usr/share/OVMF/OVMF_CODE_4M.fd; never written.
    public var code: String
    /// The domain's variable store; made from `template` when `domain define` finds none.
    public var vars: String
    /// The pristine variable store that matches `code`, e.g. /usr/share/OVMF/OVMF_VARS_4M.fd.
    public var template: String?

    public init(code: String, vars: String, template: String? = nil) {
        self.code = code
        self.vars = vars
        self.template = template
    }

    enum CodingKeys: String, CodingKey, CaseIterable { case code, vars, template }

    public init(from decoder: any Decoder) throws {
        try StrictKeys.refuseUnknown(decoder, known: CodingKeys.allCases.map(\.rawValue), in: "firmware")
        let c = try decoder.container(keyedBy: CodingKeys.self)
        code = try c.decode(String.self, forKey: .code)
        vars = try c.decode(String.self, forKey: .vars)
        template = try c.decodeIfPresent(String.self, forKey: .template)
    }
}

/// An emulated TPM 2.0 (QEMU: swtpm). Its state directory holds what the TPM keeps across power
/// cycles (seeds, NV indices, counters); like the disks, each snapshot keeps a copy and a revert
/// puts it back. The running TPM's volatile state travels inside a memory image.
public struct DomainTPM: Codable, Sendable, Hashable {
    /// The domain's own TPM state directory; `domain define` makes it (0700) when missing.
    public var state: String
    /// The guest's interface: `tpm-tis` (default) or `tpm-crb`.
    public var model: String

    public init(state: String, model: String = "tpm-tis") {
        self.state = state
        self.model = model
    }

    enum CodingKeys: String, CodingKey, CaseIterable { case state, model }

    public init(from decoder: any Decoder) throws {
        try StrictKeys.refuseUnknown(decoder, known: CodingKeys.allCases.map(\.rawValue), in: "tpm")
        let c = try decoder.container(keyedBy: CodingKeys.self)
        state = try c.decode(String.self, forKey: .state)
        model = try c.decodeIfPresent(String.self, forKey: .model) ?? "tpm-tis"
    }
}

/// Where a domain's memory lives on the host. nil in the definition: the hypervisor's default
/// (QEMU: anonymous memory, which the kernel may map with transparent huge pages).
public struct DomainMemoryBacking: Codable, Sendable, Hashable {
    /// Back the guest's RAM with the host's reserved huge pages of this size (2, or 1024 for
    /// 1 GiB pages; 2 when not given), all taken when the domain starts (libvirt's
    /// `<memoryBacking><hugepages/>`).
    /// The host must have them free (`vm.nr_hugepages`); the memory is never swapped.
    public var hugepageMiB: Int

    public static let hugepageSizes = [2, 1024]

    public init(hugepageMiB: Int = 2) { self.hugepageMiB = hugepageMiB }

    enum CodingKeys: String, CodingKey, CaseIterable { case hugepageMiB }

    public init(from decoder: any Decoder) throws {
        try StrictKeys.refuseUnknown(decoder, known: CodingKeys.allCases.map(\.rawValue), in: "memoryBacking")
        let c = try decoder.container(keyedBy: CodingKeys.self)
        // `"memoryBacking": {}` is the host's default huge pages, 2 MiB (libvirt's `<hugepages/>`).
        hugepageMiB =
            c.contains(.hugepageMiB)
            ? try StrictKeys.wholeNumber(c, .hugepageMiB, range: 1...(1 << 20), unit: "MiB") : 2
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
    /// UEFI firmware; nil: the hypervisor's default (SeaBIOS for QEMU, a PV kernel for Xen).
    public var firmware: DomainFirmware?
    /// An emulated TPM; nil: none.
    public var tpm: DomainTPM?
    /// The hypervisor's own configuration of what this definition does not model (network
    /// interfaces, consoles, drives no backend manages, tuning), as the driver read it when the
    /// domain was adopted: a JSON text only that driver reads. It lays what the definition says
    /// over it each time it creates the domain, so a revert recreates the whole domain. nil: none.
    public var hypervisorConfig: String?
    /// Where the guest's memory lives on the host; nil: the hypervisor's default.
    public var memoryBacking: DomainMemoryBacking?

    public init(
        name: String, uuid: UUID = UUID(), memoryMiB: Int, vcpus: Int = 1, disks: [DomainDisk],
        boot: DomainBoot = DomainBoot(),
        accel: String = "auto", qemuArgs: [String] = [], hypervisor: String = "qemu", firmware: DomainFirmware? = nil,
        tpm: DomainTPM? = nil, hypervisorConfig: String? = nil, memoryBacking: DomainMemoryBacking? = nil
    ) {
        self.hypervisorConfig = hypervisorConfig
        self.memoryBacking = memoryBacking
        self.firmware = firmware
        self.tpm = tpm
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

    enum CodingKeys: String, CodingKey, CaseIterable {
        case name, uuid, memoryMiB, vcpus, disks, boot, accel, qemuArgs, hypervisor, firmware, tpm, hypervisorConfig
        case memoryBacking
    }

    public init(from decoder: any Decoder) throws {
        try StrictKeys.refuseUnknown(decoder, known: CodingKeys.allCases.map(\.rawValue), in: "the domain definition")
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        uuid = try c.decodeIfPresent(UUID.self, forKey: .uuid) ?? UUID()
        memoryMiB = try StrictKeys.wholeNumber(c, .memoryMiB, range: 16...(1 << 20), unit: "MiB")
        vcpus = try c.contains(.vcpus) ? StrictKeys.wholeNumber(c, .vcpus, range: 1...256, unit: "vCPUs") : 1
        disks = try c.decodeIfPresent([DomainDisk].self, forKey: .disks) ?? []
        boot = try c.decodeIfPresent(DomainBoot.self, forKey: .boot) ?? DomainBoot()
        accel = try c.decodeIfPresent(String.self, forKey: .accel) ?? "auto"
        qemuArgs = try c.decodeIfPresent([String].self, forKey: .qemuArgs) ?? []
        hypervisor = try c.decodeIfPresent(String.self, forKey: .hypervisor) ?? "qemu"
        firmware = try c.decodeIfPresent(DomainFirmware.self, forKey: .firmware)
        tpm = try c.decodeIfPresent(DomainTPM.self, forKey: .tpm)
        hypervisorConfig = try c.decodeIfPresent(String.self, forKey: .hypervisorConfig)
        memoryBacking = try c.decodeIfPresent(DomainMemoryBacking.self, forKey: .memoryBacking)
    }

    /// Checks everything that can be checked without touching storage.
    public func validate() throws {
        if let why = SnapshotName.problem(name) {
            throw SnapshotError(.invalidName, "invalid domain name \(SnapshotName.quoted(name)): \(why)")
        }
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
        if let firmware {
            for (field, path) in [("code", firmware.code), ("vars", firmware.vars), ("template", firmware.template)] {
                guard let path else { continue }
                guard path.hasPrefix("/"), !path.contains("\0"), !path.hasSuffix("/") else {
                    throw SnapshotError(
                        .invalidArgument, "domain '\(name)': firmware.\(field) '\(path)' is not an absolute file path")
                }
            }
            guard firmware.vars != firmware.code, firmware.vars != firmware.template else {
                throw SnapshotError(
                    .invalidArgument,
                    "domain '\(name)': firmware.vars must be the domain's own file, not the firmware code or the shared template"
                )
            }
        }
        if let memoryBacking {
            let page = memoryBacking.hugepageMiB
            guard DomainMemoryBacking.hugepageSizes.contains(page) else {
                throw SnapshotError(
                    .invalidArgument,
                    "domain '\(name)': memoryBacking.hugepageMiB is \(page); x86-64 huge pages are 2 or 1024 MiB")
            }
            guard memoryMiB % page == 0 else {
                throw SnapshotError(
                    .invalidArgument,
                    "domain '\(name)': memoryMiB \(memoryMiB) is not a whole number of \(page) MiB huge pages; make it a multiple of \(page)"
                )
            }
        }
        if let tpm {
            guard tpm.state.hasPrefix("/"), tpm.state != "/", !tpm.state.contains("\0") else {
                throw SnapshotError(
                    .invalidArgument, "domain '\(name)': tpm.state '\(tpm.state)' is not an absolute directory path")
            }
            guard ["tpm-tis", "tpm-crb"].contains(tpm.model) else {
                throw SnapshotError(
                    .invalidArgument, "domain '\(name)': tpm.model '\(tpm.model)' is not one of tpm-tis, tpm-crb")
            }
        }
    }
}

/// Decoding helpers that refuse what a lenient decoder would drop or misreport: unknown fields
/// (a typo such as `memoryMB` is named, not ignored) and numbers out of range (reported as such,
/// not as "not JSON").
public enum StrictKeys {
    struct AnyKey: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    public static func refuseUnknown(_ decoder: any Decoder, known: [String], in what: String) throws {
        let all = try decoder.container(keyedBy: AnyKey.self)
        let unknown = all.allKeys.map(\.stringValue).filter { !known.contains($0) }.sorted()
        guard unknown.isEmpty else {
            throw DecodingError.dataCorrupted(
                .init(
                    codingPath: decoder.codingPath,
                    debugDescription:
                        "\(what) has unknown field\(unknown.count == 1 ? "" : "s") \(unknown.map { "'\($0)'" }.joined(separator: ", ")); the fields are \(known.joined(separator: ", "))"
                ))
        }
    }

    /// A whole number in `range`; anything else (a fraction, a number too large for any
    /// machine) is reported with the range.
    public static func wholeNumber<K: CodingKey>(
        _ c: KeyedDecodingContainer<K>, _ key: K, range: ClosedRange<Int>, unit: String
    ) throws -> Int {
        let value: Double
        if let n = try? c.decode(Int.self, forKey: key) {
            value = Double(n)
        } else {
            do { value = try c.decode(Double.self, forKey: key) } catch {
                throw DecodingError.typeMismatch(
                    Int.self,
                    .init(codingPath: c.codingPath + [key], debugDescription: "\(key.stringValue) must be a number"))
            }
        }
        guard value.rounded() == value, value >= Double(range.lowerBound), value <= Double(range.upperBound) else {
            throw DecodingError.dataCorrupted(
                .init(
                    codingPath: c.codingPath + [key],
                    debugDescription:
                        "\(key.stringValue) is \(value.rounded() == value && abs(value) < 1e18 ? String(Int64(value)) : String(value)); give a whole number of \(unit) from \(range.lowerBound) to \(range.upperBound)"
                ))
        }
        return Int(value)
    }
}
