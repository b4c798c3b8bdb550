import Foundation

/// One setting a backend declares: its name, the values it takes, its default and one line of
/// help. `vmsnap backend describe` prints the schema; `--set`, `settings.conf` and plug-ins are
/// checked against it before any backend sees a value.
public struct SettingSpec: Codable, Sendable, Hashable {
    /// What values a setting takes.
    public enum ValueType: String, Codable, Sendable, Hashable {
        /// A whole number between `min` and `max`.
        case integer
        /// `true` or `false` (also `on`/`off`, `yes`/`no`).
        case boolean
        /// One of `choices`.
        case choice
        /// Bytes, with an optional `k`, `m`, `g` or `t` suffix (powers of 1024).
        case size
        /// An absolute path.
        case path
        /// Free text; `pattern`, when given, must match the whole value.
        case text
    }

    public var name: String
    public var type: ValueType
    public var help: String
    public var defaultValue: String?
    public var min: Int?
    public var max: Int?
    public var choices: [String]?
    public var pattern: String?

    public init(
        _ name: String, _ type: ValueType, default defaultValue: String? = nil, min: Int? = nil, max: Int? = nil,
        choices: [String]? = nil, pattern: String? = nil, help: String
    ) {
        self.name = name
        self.type = type
        self.help = help
        self.defaultValue = defaultValue
        self.min = min
        self.max = max
        self.choices = choices
        self.pattern = pattern
    }

    enum CodingKeys: String, CodingKey {
        case name, type, help, min, max, choices, pattern
        case defaultValue = "default"
    }

    /// What the setting takes, for error messages and `backend describe`.
    public var valueDescription: String {
        switch type {
        case .integer: return "a whole number from \(min ?? Int.min) to \(max ?? Int.max)"
        case .boolean: return "true or false"
        case .choice: return "one of \((choices ?? []).joined(separator: ", "))"
        case .size: return "a size in bytes, optionally with k, m, g or t (256m)"
        case .path: return "an absolute path"
        case .text: return pattern.map { "text matching \($0)" } ?? "text"
        }
    }

    /// Nil when `value` fits the schema, else why not.
    public func problem(with value: String) -> String? {
        switch type {
        case .integer:
            let number = value.hasSuffix("%") ? String(value.dropLast()) : value
            guard let n = Int(number) else { return "'\(value)' is not a whole number" }
            if let min, n < min { return "\(n) is below \(min)" }
            if let max, n > max { return "\(n) is above \(max)" }
            return nil
        case .boolean:
            return Self.boolean(value) == nil ? "'\(value)' is not true or false" : nil
        case .choice:
            return (choices ?? []).contains(value)
                ? nil : "'\(value)' is not one of \((choices ?? []).joined(separator: ", "))"
        case .size:
            return Self.bytes(value) == nil ? "'\(value)' is not a size (a number with an optional k, m, g or t)" : nil
        case .path:
            return value.hasPrefix("/") && !value.contains("\0") ? nil : "'\(value)' is not an absolute path"
        case .text:
            guard let pattern else { return value.contains("\0") ? "the value contains NUL" : nil }
            let matched = value.range(of: "^(?:\(pattern))$", options: [.regularExpression, .caseInsensitive]) != nil
            return matched ? nil : "'\(value)' does not have the form \(pattern)"
        }
    }

    /// `true`/`false` and their usual spellings.
    public static func boolean(_ value: String) -> Bool? {
        switch value.lowercased() {
        case "true", "on", "yes", "1": return true
        case "false", "off", "no", "0": return false
        default: return nil
        }
    }

    /// A size such as `256m` in bytes.
    public static func bytes(_ value: String) -> UInt64? {
        let lower = value.lowercased()
        let shifts: [Character: UInt64] = ["k": 10, "m": 20, "g": 30, "t": 40]
        var digits = Substring(lower)
        var shift: UInt64 = 0
        if let last = lower.last, let s = shifts[last] {
            shift = s
            digits = lower.dropLast()
        }
        guard !digits.isEmpty, let n = UInt64(digits) else { return nil }
        let (product, overflow) = n.multipliedReportingOverflow(by: 1 << shift)
        return overflow ? nil : product
    }
}

/// Backend settings (`cow-size`, `warn-percent`, ...): `KEY=VALUE` pairs from `--set`, over the
/// lines of `<store>/settings.conf` (`key = value`, `#` comments), so a policy set once applies
/// to every command that uses the store.
public enum BackendSettings {
    public static let fileName = "settings.conf"

    /// Parses `--set` pairs.
    public static func parse(pairs: [String]) throws -> [String: String] {
        var out: [String: String] = [:]
        for pair in pairs {
            guard let eq = pair.firstIndex(of: "="), eq != pair.startIndex else {
                throw SnapshotError(
                    .invalidArgument, "--set expects KEY=VALUE (for example --set cow-size=256m), got '\(pair)'")
            }
            out[String(pair[..<eq])] = String(pair[pair.index(after: eq)...])
        }
        return out
    }

    /// Reads the store's settings file; a missing file is no settings.
    public static func load(storeDirectory: String) throws -> [String: String] {
        let path = (storeDirectory as NSString).appendingPathComponent(fileName)
        guard FileManager.default.fileExists(atPath: path) else { return [:] }
        let data = try RegularFile.read(path, what: "settings file", limit: 1 << 20)
        var out: [String: String] = [:]
        for (n, raw) in String(decoding: data, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false)
            .enumerated()
        {
            let line =
                raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init)?
                .trimmingCharacters(in: .whitespaces) ?? ""
            if line.isEmpty { continue }
            guard let eq = line.firstIndex(of: "="), eq != line.startIndex else {
                throw SnapshotError(
                    .invalidArgument,
                    "\(path) line \(n + 1): expected `key = value`, got '\(line)'; fix or remove the line")
            }
            out[line[..<eq].trimmingCharacters(in: .whitespaces)] = line[line.index(after: eq)...].trimmingCharacters(
                in: .whitespaces)
        }
        return out
    }

    /// Checks every setting against the schemas of the backends that declare it: an unknown key
    /// or a bad value is refused with the valid keys (or values). `source` names where the
    /// settings came from (`--set`, a settings.conf path) for the message.
    public static func validate(
        _ settings: [String: String], against schemas: [BackendKind: [SettingSpec]], source: String
    ) throws {
        for (key, value) in settings.sorted(by: { $0.key < $1.key }) {
            let declaring = schemas.compactMap { kind, specs in specs.first { $0.name == key }.map { (kind, $0) } }
            guard !declaring.isEmpty else {
                let valid = schemas.flatMap { kind, specs in specs.map { "\($0.name) (\(kind))" } }.sorted()
                throw SnapshotError(
                    .invalidArgument,
                    "\(source): unknown setting '\(key)'; valid settings: \(valid.isEmpty ? "none" : valid.joined(separator: ", ")). See `vmsnap backend describe KIND`"
                )
            }
            for (kind, spec) in declaring.sorted(by: { $0.0 < $1.0 }) {
                if let problem = spec.problem(with: value) {
                    throw SnapshotError(
                        .invalidArgument,
                        "\(source): setting \(key)=\(value) for backend '\(kind)': \(problem); it takes \(spec.valueDescription) (\(spec.help))"
                    )
                }
            }
        }
    }
}
