/// Sizes and durations as operators write them in config files and on command lines.

/// "64MiB", "4GiB", "512KiB", "4096", "1TiB" (KB/MB/GB/TB are read as binary units too,
/// as operators mean them). Nil for zero, negative, unknown units or overflow.
public func parseSize(_ text: String) -> UInt64? {
    let s = text.trimmingCharacters(in: " \t")
    let digits = s.prefix { $0.isNumber }
    guard let n = UInt64(digits), n > 0 else { return nil }
    let shift: UInt64
    switch s.dropFirst(digits.count).trimmingCharacters(in: " \t").lowercased() {
    case "", "b": shift = 0
    case "k", "kb", "kib": shift = 10
    case "m", "mb", "mib": shift = 20
    case "g", "gb", "gib": shift = 30
    case "t", "tb", "tib": shift = 40
    default: return nil
    }
    guard n <= UInt64.max >> shift else { return nil }
    return n << shift
}

/// As `parseSize`, but "0" (with or without a unit) is 0: for limits where zero means "none" or "off".
public func parseSizeAllowingZero(_ text: String) -> UInt64? {
    let s = text.trimmingCharacters(in: " \t")
    let digits = s.prefix { $0.isNumber }
    if !digits.isEmpty, digits.allSatisfy({ $0 == "0" }) {
        return parseSize("1" + s.dropFirst(digits.count)) != nil ? 0 : nil
    }
    return parseSize(text)
}

/// "10s", "500ms", "2m" → seconds. Nil when malformed or negative.
public func parseDuration(_ text: String) -> Double? {
    let s = text.trimmingCharacters(in: " \t").lowercased()
    for (suffix, scale) in [("ms", 0.001), ("s", 1.0), ("m", 60.0)] where s.hasSuffix(suffix) {
        if let v = Double(s.dropLast(suffix.count)), v >= 0 { return v * scale }
    }
    return nil
}

extension StringProtocol {
    fileprivate func trimmingCharacters(in set: String) -> String {
        var a = Substring(self)
        while let f = a.first, set.contains(f) { a.removeFirst() }
        while let l = a.last, set.contains(l) { a.removeLast() }
        return String(a)
    }
}
