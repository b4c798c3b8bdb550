/// Rules every snapshot name follows, whatever the backend: names end up in file names, LV names,
/// command lines and XML, so anything that could be misread by one of them is refused.
public enum SnapshotName {
    /// Longest name accepted, in UTF-8 bytes.
    public static let maximumBytes = 255

    /// Throws `.invalidName` saying what is wrong with `name`, or returns it unchanged.
    @discardableResult
    public static func validate(_ name: String) throws -> String {
        if let why = problem(name) {
            throw SnapshotError(.invalidName, "invalid snapshot name \(quoted(name)): \(why)")
        }
        return name
    }

    /// What is wrong with `name` as a snapshot or domain name, or nil. Refused rather than
    /// repaired: control and bidirectional-override characters (a name that reads differently
    /// from what it is), leading or trailing spaces, and U+FFFD (what invalid UTF-8 became).
    public static func problem(_ name: String) -> String? {
        if name.isEmpty { return "the name is empty; give a name such as 'before-upgrade'" }
        if name.utf8.count > maximumBytes {
            return "it is \(name.utf8.count) bytes long; the limit is \(maximumBytes) bytes"
        }
        if name.contains("/") { return "it contains '/'; names become file and volume names, use '-' instead" }
        if name.unicodeScalars.contains(where: { $0.value == 0 }) { return "it contains a NUL character" }
        if let c = name.unicodeScalars.first(where: {
            $0.value < 0x20 || $0.value == 0x7f || (0x80..<0xa0).contains($0.value)
        }) {
            return "it contains the control character U+\(String(c.value, radix: 16, uppercase: true).leftPadded(4))"
        }
        if let c = name.unicodeScalars.first(where: { bidiControls.contains($0.value) }) {
            return
                "it contains the bidirectional formatting character U+\(String(c.value, radix: 16, uppercase: true)), which makes a name display differently from what it is"
        }
        if name.unicodeScalars.contains(where: { $0.value == 0xFFFD }) {
            return "it contains U+FFFD, the replacement character: the name was not valid UTF-8"
        }
        if let first = name.unicodeScalars.first, let last = name.unicodeScalars.last,
            first.properties.isWhitespace || last.properties.isWhitespace
        {
            return "it starts or ends with a space; remove it (spaces inside a name are fine)"
        }
        if name.hasPrefix("-") { return "it starts with '-', which commands would read as an option" }
        if name == "." || name == ".." { return "'.' and '..' name directories" }
        return nil
    }

    /// LRM, RLM, ALM, the embeddings and overrides, and the isolates.
    static let bidiControls: Set<UInt32> = [
        0x061C, 0x200E, 0x200F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069,
    ]

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
