/// Little-endian field readers and writers shared by the control wire (`Wire`) and the
/// memory-server protocol (`MemWire`). Callers check lengths before reading.
public struct LittleEndianReader {
    public let bytes: [UInt8]
    public var offset: Int
    public init(_ bytes: [UInt8], at offset: Int = 0) {
        self.bytes = bytes
        self.offset = offset
    }
    public var remaining: Int { bytes.count - offset }
    public mutating func u16() -> UInt16 {
        defer { offset += 2 }
        return UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8
    }
    public mutating func u32() -> UInt32 {
        var v: UInt32 = 0
        for i in 0..<4 { v |= UInt32(bytes[offset + i]) << (8 * i) }
        offset += 4
        return v
    }
    public mutating func u64() -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<8 { v |= UInt64(bytes[offset + i]) << (8 * i) }
        offset += 8
        return v
    }
    public mutating func raw(_ n: Int) -> [UInt8] {
        defer { offset += n }
        return Array(bytes[offset..<(offset + n)])
    }
    /// A NUL-padded string field of `n` bytes.
    public mutating func fixedString(_ n: Int) -> String {
        let slice = bytes[offset..<(offset + n)]
        offset += n
        let end = slice.firstIndex(of: 0) ?? slice.endIndex
        return String(decoding: slice[slice.startIndex..<end], as: UTF8.self)
    }
}

public struct LittleEndianWriter {
    public var bytes: [UInt8] = []
    public init(capacity: Int = 0) { bytes.reserveCapacity(capacity) }
    public mutating func u16(_ v: UInt16) { for i in 0..<2 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    public mutating func u32(_ v: UInt32) { for i in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    public mutating func u64(_ v: UInt64) { for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    /// A NUL-padded string field of `n` bytes (at most n - 1 of the string's).
    public mutating func fixedString(_ s: String, _ n: Int) {
        var utf8 = Array(s.utf8.prefix(n - 1))
        utf8 += [UInt8](repeating: 0, count: n - utf8.count)
        bytes += utf8
    }
}
