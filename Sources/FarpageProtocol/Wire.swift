/// The agent's control protocol, version 1 (docs/protocol.md; C side: farpage_wire.h).
///
/// One message per `SOCK_SEQPACKET` packet, little-endian:
/// header { magic u32 'FPG1', version u16, type u16, length u32 (whole message), request_id u32 }.
public enum Wire {
    public static let magic: UInt32 = 0x3147_5046
    public static let version: UInt16 = 1
    public static let headerSize = 16
    public static let maxMessage = 65536
    public static let registerBodySize = 64
    public static let adviseBodySize = 32
    public static let registerViewBodySize = 24
    public static let maxErrorText = 1024
    public static let jsonChunk = 60000
}

public enum MessageType: UInt16, Sendable {
    case register = 1
    case unregister = 2
    case advise = 3
    case stats = 4
    case statusJSON = 5
    case regionsJSON = 6
    case ping = 7
    case poolAttach = 8
    case poolDetach = 9
    case poolJSON = 10
    case poolRemove = 11
    case registerView = 12
    case forkPrepare = 13
    case ok = 0x81
    case error = 0x82
    case statsReply = 0x83
    case json = 0x84
}

public struct Header: Equatable, Sendable {
    public var type: UInt16
    public var length: UInt32
    public var requestID: UInt32
}

/// Why a message was rejected. `fatal` errors close the connection (the peer does not speak the protocol).
public struct WireError: Error, CustomStringConvertible, Equatable, Sendable {
    public let message: String
    public let fatal: Bool
    public let requestID: UInt32
    public var description: String { message }
}

public struct RegisterRequest: Equatable, Sendable {
    public var address: UInt64
    public var length: UInt64
    public var pageSize: UInt32
    public var flags: UInt32
    public var residentBudget: UInt64
    public var uffdFeatures: UInt64
    public var name: String

    public init(address: UInt64, length: UInt64, pageSize: UInt32, flags: UInt32 = 0, residentBudget: UInt64 = 0,
                uffdFeatures: UInt64 = 0, name: String = "")
    {
        self.address = address
        self.length = length
        self.pageSize = pageSize
        self.flags = flags
        self.residentBudget = residentBudget
        self.uffdFeatures = uffdFeatures
        self.name = name
    }
}

public struct AdviseRequest: Equatable, Sendable {
    public var regionID: UInt64
    public var offset: UInt64
    public var length: UInt64
    public var hint: UInt32
    public init(regionID: UInt64, offset: UInt64, length: UInt64, hint: UInt32) {
        self.regionID = regionID
        self.offset = offset
        self.length = length
        self.hint = hint
    }
}

/// A forked child's private view of one of its parent's regions (fds: that region's memfd,
/// and a userfaultfd registered for missing faults on the child's MAP_PRIVATE mapping).
public struct RegisterViewRequest: Equatable, Sendable {
    public var regionID: UInt64
    public var address: UInt64
    public var length: UInt64
    public init(regionID: UInt64, address: UInt64, length: UInt64) {
        self.regionID = regionID
        self.address = address
        self.length = length
    }
}

public enum Request: Equatable, Sendable {
    case register(RegisterRequest)
    case registerView(RegisterViewRequest)
    /// The client is about to fork: regions it releases in the next seconds stay available
    /// to its children's views for a few seconds.
    case forkPrepare
    case unregister(regionID: UInt64)
    case advise(AdviseRequest)
    case stats(regionID: UInt64)
    case statusJSON
    case regionsJSON
    case ping
    /// Body: the server address, "HOST:PORT" (at most 255 bytes).
    case poolAttach(address: String)
    case poolDetach(address: String)
    /// Drop a server without draining it (dead server): its pages are lost, poisoned on touch.
    case poolRemove(address: String)
    case poolJSON
}

public enum Reply: Equatable, Sendable {
    case ok(UInt64, UInt64)
    case error(errno: Int32, code: UInt32, message: String)
    case stats([UInt64])
    case json(text: String, more: Bool)
}

// MARK: - Byte helpers

// MARK: - Encoding and decoding

extension Wire {
    /// A whole message: header + body.
    public static func message(_ type: MessageType, requestID: UInt32, body: [UInt8]) -> [UInt8] {
        var w = LittleEndianWriter()
        w.u32(magic)
        w.u16(version)
        w.u16(type.rawValue)
        w.u32(UInt32(headerSize + body.count))
        w.u32(requestID)
        return w.bytes + body
    }

    /// Parses and validates a header against the packet it came in.
    public static func decodeHeader(_ bytes: [UInt8]) throws(WireError) -> Header {
        guard bytes.count >= headerSize else {
            throw WireError(message: "message of \(bytes.count) bytes is shorter than the 16-byte header", fatal: true, requestID: 0)
        }
        var r = LittleEndianReader(bytes, at: 0)
        let m = r.u32()
        let v = r.u16()
        let type = r.u16()
        let length = r.u32()
        let id = r.u32()
        guard m == magic else {
            throw WireError(message: "bad magic 0x\(String(m, radix: 16)) (not a farpage client?)", fatal: true, requestID: id)
        }
        guard v == version else {
            throw WireError(message: "protocol version \(v) is not supported (this agent speaks \(version))", fatal: true, requestID: id)
        }
        guard Int(length) == bytes.count else {
            throw WireError(message: "declared length \(length) does not match the \(bytes.count)-byte packet", fatal: true, requestID: id)
        }
        return Header(type: type, length: length, requestID: id)
    }

    /// Decodes a client request. Errors name the field at fault.
    public static func decodeRequest(_ bytes: [UInt8]) throws(WireError) -> (Header, Request) {
        let h = try decodeHeader(bytes)
        var r = LittleEndianReader(bytes, at: headerSize)
        func need(_ n: Int, _ what: String) throws(WireError) {
            guard r.remaining == n else {
                throw WireError(message: "\(what) body must be \(n) bytes, got \(r.remaining)", fatal: false, requestID: h.requestID)
            }
        }
        guard let type = MessageType(rawValue: h.type) else {
            throw WireError(message: "unknown message type \(h.type)", fatal: false, requestID: h.requestID)
        }
        switch type {
        case .register:
            try need(registerBodySize, "REGISTER")
            let req = RegisterRequest(
                address: r.u64(), length: r.u64(), pageSize: r.u32(), flags: r.u32(), residentBudget: r.u64(),
                uffdFeatures: r.u64(), name: r.fixedString(24))
            return (h, .register(req))
        case .registerView:
            try need(registerViewBodySize, "REGISTER_VIEW")
            return (h, .registerView(RegisterViewRequest(regionID: r.u64(), address: r.u64(), length: r.u64())))
        case .forkPrepare:
            try need(0, "FORK_PREPARE")
            return (h, .forkPrepare)
        case .unregister:
            try need(8, "UNREGISTER")
            return (h, .unregister(regionID: r.u64()))
        case .advise:
            try need(adviseBodySize, "ADVISE")
            let req = AdviseRequest(regionID: r.u64(), offset: r.u64(), length: r.u64(), hint: r.u32())
            return (h, .advise(req))
        case .stats:
            try need(8, "STATS")
            return (h, .stats(regionID: r.u64()))
        case .statusJSON:
            try need(0, "STATUS")
            return (h, .statusJSON)
        case .regionsJSON:
            try need(0, "REGIONS")
            return (h, .regionsJSON)
        case .ping:
            try need(0, "PING")
            return (h, .ping)
        case .poolAttach, .poolDetach, .poolRemove:
            guard r.remaining >= 3, r.remaining <= 255 else {
                throw WireError(message: "pool address must be 3...255 bytes, got \(r.remaining)", fatal: false, requestID: h.requestID)
            }
            // HOST:PORT in plain ASCII: letters, digits and . - : [ ] only.
            let raw = bytes[headerSize...]
            let allowed: (UInt8) -> Bool = { c in
                (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || c == 0x2E || c == 0x2D
                    || c == 0x3A || c == 0x5B || c == 0x5D
            }
            guard raw.allSatisfy(allowed) else {
                throw WireError(message: "pool address must be HOST:PORT in ASCII", fatal: false, requestID: h.requestID)
            }
            let address = String(decoding: raw, as: UTF8.self)
            switch type {
            case .poolAttach: return (h, .poolAttach(address: address))
            case .poolDetach: return (h, .poolDetach(address: address))
            default: return (h, .poolRemove(address: address))
            }
        case .poolJSON:
            try need(0, "POOL")
            return (h, .poolJSON)
        case .ok, .error, .statsReply, .json:
            throw WireError(message: "message type \(h.type) is a reply, not a request", fatal: false, requestID: h.requestID)
        }
    }

    public static func encode(_ request: Request, requestID: UInt32) -> [UInt8] {
        var w = LittleEndianWriter()
        let type: MessageType
        switch request {
        case .register(let q):
            type = .register
            w.u64(q.address)
            w.u64(q.length)
            w.u32(q.pageSize)
            w.u32(q.flags)
            w.u64(q.residentBudget)
            w.u64(q.uffdFeatures)
            w.fixedString(q.name, 24)
        case .registerView(let q):
            type = .registerView
            w.u64(q.regionID)
            w.u64(q.address)
            w.u64(q.length)
        case .forkPrepare: type = .forkPrepare
        case .unregister(let id):
            type = .unregister
            w.u64(id)
        case .advise(let q):
            type = .advise
            w.u64(q.regionID)
            w.u64(q.offset)
            w.u64(q.length)
            w.u32(q.hint)
            w.u32(0)
        case .stats(let id):
            type = .stats
            w.u64(id)
        case .statusJSON: type = .statusJSON
        case .regionsJSON: type = .regionsJSON
        case .ping: type = .ping
        case .poolAttach(let a):
            type = .poolAttach
            w.bytes += Array(a.utf8.prefix(255))
        case .poolDetach(let a):
            type = .poolDetach
            w.bytes += Array(a.utf8.prefix(255))
        case .poolRemove(let a):
            type = .poolRemove
            w.bytes += Array(a.utf8.prefix(255))
        case .poolJSON: type = .poolJSON
        }
        return message(type, requestID: requestID, body: w.bytes)
    }

    public static func encode(_ reply: Reply, requestID: UInt32) -> [UInt8] {
        var w = LittleEndianWriter()
        let type: MessageType
        switch reply {
        case .ok(let a, let b):
            type = .ok
            w.u64(a)
            w.u64(b)
        case .error(let errno, let code, let text):
            type = .error
            w.u32(UInt32(bitPattern: errno))
            w.u32(code)
            w.bytes += Array(text.utf8.prefix(maxErrorText))
        case .stats(let fields):
            type = .statsReply
            w.u32(UInt32(fields.count))
            w.u32(0)
            for f in fields { w.u64(f) }
        case .json(let text, let more):
            type = .json
            w.u32(more ? 1 : 0)
            w.u32(0)
            w.bytes += Array(text.utf8)
        }
        return message(type, requestID: requestID, body: w.bytes)
    }

    public static func decodeReply(_ bytes: [UInt8]) throws(WireError) -> (Header, Reply) {
        let h = try decodeHeader(bytes)
        var r = LittleEndianReader(bytes, at: headerSize)
        func bad(_ what: String) -> WireError { WireError(message: "malformed \(what) reply", fatal: true, requestID: h.requestID) }
        switch MessageType(rawValue: h.type) {
        case .ok:
            guard r.remaining == 16 else { throw bad("OK") }
            return (h, .ok(r.u64(), r.u64()))
        case .error:
            guard r.remaining >= 8 else { throw bad("ERROR") }
            let e = Int32(bitPattern: r.u32())
            let code = r.u32()
            return (h, .error(errno: e, code: code, message: String(decoding: bytes[r.offset...], as: UTF8.self)))
        case .statsReply:
            guard r.remaining >= 8 else { throw bad("STATS") }
            let count = Int(r.u32())
            _ = r.u32()
            guard r.remaining == count * 8 else { throw bad("STATS") }
            return (h, .stats((0..<count).map { _ in r.u64() }))
        case .json:
            guard r.remaining >= 8 else { throw bad("JSON") }
            let more = r.u32() & 1 != 0
            _ = r.u32()
            return (h, .json(text: String(decoding: bytes[r.offset...], as: UTF8.self), more: more))
        default:
            throw WireError(message: "unexpected reply type \(h.type)", fatal: true, requestID: h.requestID)
        }
    }
}
