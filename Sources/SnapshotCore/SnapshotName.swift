/// Rules every snapshot name follows, whatever the backend: names end up in file names, LV names,
/// command lines and XML, so anything that could be misread by one of them is refused.
public enum SnapshotName {
    /// Longest name accepted, in UTF-8 bytes.
    public static let maximumBytes = 255

    /// Throws `.invalidName` saying what is wrong with `name`, or returns it unchanged.
    @discardableResult
    public static func validate(_ name: String) throws -> String {
        func reject(_ why: String) -> SnapshotError {
            SnapshotError(.invalidName, "invalid snapshot name \(quoted(name)): \(why)")
        }
        if name.isEmpty { throw reject("the name is empty; give a name such as 'before-upgrade'") }
        if name.utf8.count > maximumBytes {
            throw reject("it is \(name.utf8.count) bytes long; the limit is \(maximumBytes) bytes")
        }
        if name.contains("/") { throw reject("it contains '/'; names become file and volume names, use '-' instead") }
        if name.unicodeScalars.contains(where: { $0.value == 0 }) { throw reject("it contains a NUL character") }
        if let c = name.unicodeScalars.first(where: {
            $0.value < 0x20 || $0.value == 0x7f || (0x80..<0xa0).contains($0.value)
        }) {
            throw reject(
                "it contains the control character U+\(String(c.value, radix: 16, uppercase: true).leftPadded(4))")
        }
        if name.hasPrefix("-") { throw reject("it starts with '-', which commands would read as an option") }
        if name == "." || name == ".." { throw reject("'.' and '..' name directories") }
        return name
    }

    /// A name quoted for an error message, with control characters made visible.
    public static func quoted(_ name: String) -> String {
        var out = "'"
        for scalar in name.unicodeScalars.prefix(80) {
            if scalar.value < 0x20 || scalar.value == 0x7f {
                out += "\\u{\(String(scalar.value, radix: 16))}"
            } else {
                out.unicodeScalars.append(scalar)
            }
        }
        return out + (name.unicodeScalars.count > 80 ? "...'" : "'")
    }
}

extension String {
    func leftPadded(_ width: Int, with pad: Character = "0") -> String {
        count >= width ? self : String(repeating: pad, count: width - count) + self
    }
}
