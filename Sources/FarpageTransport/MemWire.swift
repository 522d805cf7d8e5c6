import FarpageProtocol

/// The memory-server protocol, version 1 (docs/memserver-protocol.md).
///
/// TCP, little-endian frames: header { magic u32 'FPM1', version u16, type u16,
/// request_id u64, body_length u32, reserved u32 } (24 bytes), then the body. Requests are
/// pipelined: replies carry the request id and may come back in any order. A server under
/// pressure says so in PONG (`reclaiming`); the agent then asks which leases with
/// RECLAIM_QUERY and gets them in a RECLAIM reply.
public enum MemWire {
    public static let magic: UInt32 = 0x314D_5046  // "FPM1"
    public static let version: UInt16 = 1
    public static let headerSize = 24
    public static let pageSize = 4096
    /// Most pages one READ or WRITE may move.
    public static let maxPagesPerIO = 256
    /// Largest body any message may have; a peer claiming more is cut off before it is buffered.
    public static let maxBody = 16 + 8 * maxPagesPerIO + pageSize * maxPagesPerIO + 64
    public static let nonceSize = 32
    public static let agentIDSize = 16
    public static let macSize = 32
    public static let maxName = 64
    public static let maxErrorText = 1024
    /// Most lease ids one LEASES or RECLAIM reply may carry.
    public static let maxLeaseIDs = 65536
    /// Most leases one LEASE_KEYS request may name.
    public static let maxKeysPerRequest = 1024
    /// The one-time token that binds an rdma_cm connection to an authenticated agent.
    public static let rdmaTokenSize = 32
    /// Most bytes of the host in RDMA_ENDPOINT.
    public static let maxEndpointHost = 64
    /// rdma_cm private data of a connection request: "FPR1" then the token (36 of the 56 bytes
    /// an RC connection request may carry).
    public static let rdmaPrivateMagic: [UInt8] = Array("FPR1".utf8)
}

public enum MemMessageType: UInt16, Sendable {
    case hello = 1
    case auth = 2
    case leaseAlloc = 3
    case leaseFree = 4
    case read = 5
    case write = 6
    case ping = 7
    case reclaimQuery = 8
    case rdmaConnect = 9
    case leaseKeys = 10
    case ok = 0x80
    case challenge = 0x81
    case authOK = 0x82
    case leases = 0x83
    case data = 0x85
    case pong = 0x87
    case reclaim = 0x88
    case rdmaEndpoint = 0x89
    case keys = 0x8A
    case error = 0x8F
}

public struct MemHeader: Equatable, Sendable {
    public var type: MemMessageType
    public var requestID: UInt64
    public var bodyLength: Int
    public init(type: MemMessageType, requestID: UInt64, bodyLength: Int) {
        self.type = type
        self.requestID = requestID
        self.bodyLength = bodyLength
    }
}

/// A malformed frame. Always fatal for the connection (the stream cannot be resynchronised).
public struct MemWireError: Error, CustomStringConvertible, Equatable, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Error codes carried by ERROR replies.
public enum MemErrorCode: UInt32, Sendable {
    case malformed = 1
    case unauthenticated = 2
    case authenticationFailed = 3
    case noCapacity = 4
    case noSuchLease = 5
    case outOfBounds = 6
    case corrupt = 7
    case shuttingDown = 8
    /// RDMA_CONNECT or LEASE_KEYS on a server without an RDMA listener, or LEASE_KEYS before
    /// the agent connected over RDMA.
    case rdmaUnavailable = 9
}

/// Where and how to open an RDMA connection to a memory server (RDMA_ENDPOINT).
public struct RDMAEndpoint: Equatable, Sendable {
    /// rdma_cm port.
    public var port: UInt16
    /// Address to connect to; empty: the address the agent reached the server at over TCP.
    public var host: String
    /// One-time token for the rdma_cm connection request's private data.
    public var token: [UInt8]
    public init(port: UInt16, host: String, token: [UInt8]) {
        self.port = port
        self.host = host
        self.token = token
    }
}

/// One lease's RDMA window (KEYS): its bytes start at `address` in the server and `rkey` reaches
/// exactly `length` bytes from there, through this agent's queue pairs only.
public struct LeaseKey: Equatable, Sendable {
    public var leaseID: UInt64
    public var address: UInt64
    public var length: UInt64
    public var rkey: UInt32
    public init(leaseID: UInt64, address: UInt64, length: UInt64, rkey: UInt32) {
        self.leaseID = leaseID
        self.address = address
        self.length = length
        self.rkey = rkey
    }
}

/// Server counters in a PONG.
public struct MemServerStats: Equatable, Sendable {
    public var capacityBytes: UInt64
    public var usedBytes: UInt64
    public var leaseBytes: UInt64
    public var leasesHeld: UInt32
    public var agents: UInt32
    public var reclaiming: UInt32
    public init(capacityBytes: UInt64, usedBytes: UInt64, leaseBytes: UInt64, leasesHeld: UInt32, agents: UInt32,
                reclaiming: UInt32)
    {
        self.capacityBytes = capacityBytes
        self.usedBytes = usedBytes
        self.leaseBytes = leaseBytes
        self.leasesHeld = leasesHeld
        self.agents = agents
        self.reclaiming = reclaiming
    }
}

public enum MemRequest: Equatable, Sendable {
    case hello(agentID: [UInt8], nonce: [UInt8], name: String)
    case auth(mac: [UInt8])
    case leaseAlloc(count: UInt32)
    case leaseFree(leaseID: UInt64)
    case read(leaseID: UInt64, offset: UInt64, pages: Int)
    /// `data` holds `pages` pages; `checksums` one XXH3-64 per page.
    case write(leaseID: UInt64, offset: UInt64, checksums: [UInt64], data: [UInt8])
    case ping
    /// Which of my leases does the server want back?
    case reclaimQuery
    /// Where is your RDMA listener? (reply RDMA_ENDPOINT, with a one-time token)
    case rdmaConnect
    /// The RDMA windows of these leases (reply KEYS).
    case leaseKeys([UInt64])
}

public enum MemReply: Equatable, Sendable {
    case ok
    case challenge(nonce: [UInt8], serverID: [UInt8])
    case authOK(mac: [UInt8], leaseBytes: UInt64, capacityBytes: UInt64)
    case leases([UInt64])
    case data(checksums: [UInt64], data: [UInt8])
    case pong(MemServerStats)
    case reclaim(leases: [UInt64])
    case rdmaEndpoint(RDMAEndpoint)
    case keys([LeaseKey])
    case error(code: UInt32, message: String)
}

// MARK: - Codec

extension LittleEndianReader {
    fileprivate func need(_ n: Int, _ what: String) throws(MemWireError) {
        guard remaining >= n else { throw MemWireError("\(what): body too short") }
    }
}

extension MemWire {
    /// A whole frame: header and body.
    public static func frame(_ type: MemMessageType, requestID: UInt64, body: [UInt8]) -> [UInt8] {
        var bytes = header(type, requestID: requestID, bodyLength: body.count, capacity: headerSize + body.count)
        bytes += body
        return bytes
    }

    /// A frame header alone, for a body sent separately (page data straight from its buffer).
    public static func header(_ type: MemMessageType, requestID: UInt64, bodyLength: Int, capacity: Int = headerSize) -> [UInt8] {
        var w = LittleEndianWriter(capacity: capacity)
        w.u32(magic)
        w.u16(version)
        w.u16(type.rawValue)
        w.u64(requestID)
        w.u32(UInt32(bodyLength))
        w.u32(0)
        return w.bytes
    }

    /// A WRITE's header and fixed fields up to its page data (which follows, pages × 4096 bytes).
    public static func writePrefix(requestID: UInt64, leaseID: UInt64, offset: UInt64, checksums: [UInt64]) -> [UInt8] {
        let fixed = 20 + 8 * checksums.count
        var w = LittleEndianWriter(capacity: headerSize + fixed)
        w.bytes = header(.write, requestID: requestID, bodyLength: fixed + pageSize * checksums.count, capacity: headerSize + fixed)
        w.u64(leaseID)
        w.u64(offset)
        w.u32(UInt32(checksums.count))
        for c in checksums { w.u64(c) }
        return w.bytes
    }

    /// A DATA reply's header and fixed fields up to its page data.
    public static func dataPrefix(requestID: UInt64, checksums: UnsafeBufferPointer<UInt64>) -> [UInt8] {
        let fixed = 4 + 8 * checksums.count
        var w = LittleEndianWriter(capacity: headerSize + fixed)
        w.bytes = header(.data, requestID: requestID, bodyLength: fixed + pageSize * checksums.count, capacity: headerSize + fixed)
        w.u32(UInt32(checksums.count))
        for c in checksums { w.u64(c) }
        return w.bytes
    }


    /// Validates a header (exactly `headerSize` bytes) before its body is read, so a peer
    /// cannot make us buffer more than `maxBody`.
    public static func decodeHeader(_ bytes: [UInt8]) throws(MemWireError) -> MemHeader {
        guard bytes.count == headerSize else { throw MemWireError("header must be \(headerSize) bytes") }
        var r = LittleEndianReader(bytes)
        let m = r.u32()
        let v = r.u16()
        let t = r.u16()
        let id = r.u64()
        let length = Int(r.u32())
        guard m == magic else { throw MemWireError("bad magic 0x\(String(m, radix: 16)) (not a farpage agent?)") }
        guard v == version else { throw MemWireError("protocol version \(v) is not supported (this side speaks \(version))") }
        guard let type = MemMessageType(rawValue: t) else { throw MemWireError("unknown message type \(t)") }
        guard length <= maxBody else { throw MemWireError("body of \(length) bytes exceeds the \(maxBody)-byte limit") }
        return MemHeader(type: type, requestID: id, bodyLength: length)
    }

    public static func encode(_ request: MemRequest, requestID: UInt64) -> [UInt8] {
        var w = LittleEndianWriter()
        let type: MemMessageType
        switch request {
        case .hello(let agentID, let nonce, let name):
            type = .hello
            w.bytes += agentID
            w.bytes += nonce
            let n = Array(name.utf8.prefix(maxName))
            w.u16(UInt16(n.count))
            w.bytes += n
        case .auth(let mac):
            type = .auth
            w.bytes += mac
        case .leaseAlloc(let count):
            type = .leaseAlloc
            w.u32(count)
        case .leaseFree(let id):
            type = .leaseFree
            w.u64(id)
        case .read(let id, let offset, let pages):
            type = .read
            w.u64(id)
            w.u64(offset)
            w.u32(UInt32(pages))
        case .write(let id, let offset, let checksums, let data):
            type = .write
            w = LittleEndianWriter(capacity: 20 + checksums.count * 8 + data.count)
            w.u64(id)
            w.u64(offset)
            w.u32(UInt32(checksums.count))
            for c in checksums { w.u64(c) }
            w.bytes += data
        case .ping: type = .ping
        case .reclaimQuery: type = .reclaimQuery
        case .rdmaConnect: type = .rdmaConnect
        case .leaseKeys(let ids):
            type = .leaseKeys
            w.u32(UInt32(ids.count))
            for id in ids { w.u64(id) }
        }
        return frame(type, requestID: requestID, body: w.bytes)
    }

    /// The fixed fields of a READ or WRITE body, checked: 1 to 256 pages, a READ body of
    /// exactly 20 bytes, a WRITE body of exactly 20 + pages × (8 + 4096). The memory server
    /// parses page traffic in place with this; `decodeRequest` uses it too.
    public static func pageFields(_ type: MemMessageType, _ body: UnsafeRawBufferPointer) throws(MemWireError)
        -> (leaseID: UInt64, offset: UInt64, pages: Int)
    {
        let name = type == .read ? "READ" : "WRITE"
        guard body.count >= 20, type != .read || body.count == 20 else {
            throw MemWireError("\(name) body must be \(type == .read ? "" : "at least ")20 bytes, got \(body.count)")
        }
        let id = UInt64(littleEndian: body.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        let offset = UInt64(littleEndian: body.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        let pages = Int(UInt32(littleEndian: body.loadUnaligned(fromByteOffset: 16, as: UInt32.self)))
        guard pages >= 1, pages <= maxPagesPerIO else { throw MemWireError("\(name) of \(pages) pages (1...\(maxPagesPerIO))") }
        if type == .write, body.count - 20 != pages * (8 + pageSize) {
            throw MemWireError("WRITE of \(pages) pages needs \(pages * (8 + pageSize)) bytes after its header, got \(body.count - 20)")
        }
        return (id, offset, pages)
    }

    static func pageFields(_ type: MemMessageType, _ body: [UInt8]) throws(MemWireError) -> (leaseID: UInt64, offset: UInt64, pages: Int) {
        try body.withUnsafeBytes { raw in Result { () throws(MemWireError) in try pageFields(type, raw) } }.get()
    }

    public static func decodeRequest(_ type: MemMessageType, body: [UInt8]) throws(MemWireError) -> MemRequest {
        var r = LittleEndianReader(body)
        func exact(_ n: Int, _ what: String) throws(MemWireError) {
            guard body.count == n else { throw MemWireError("\(what) body must be \(n) bytes, got \(body.count)") }
        }
        switch type {
        case .hello:
            try r.need(agentIDSize + nonceSize + 2, "HELLO")
            let id = r.raw(agentIDSize)
            let nonce = r.raw(nonceSize)
            let n = Int(r.u16())
            guard n <= maxName, r.remaining == n else { throw MemWireError("HELLO: bad name length \(n)") }
            return .hello(agentID: id, nonce: nonce, name: String(decoding: r.raw(n), as: UTF8.self))
        case .auth:
            try exact(macSize, "AUTH")
            return .auth(mac: r.raw(macSize))
        case .leaseAlloc:
            try exact(4, "LEASE_ALLOC")
            return .leaseAlloc(count: r.u32())
        case .leaseFree:
            try exact(8, "LEASE_FREE")
            return .leaseFree(leaseID: r.u64())
        case .read:
            let f = try pageFields(.read, body)
            return .read(leaseID: f.leaseID, offset: f.offset, pages: f.pages)
        case .write:
            let f = try pageFields(.write, body)
            r.offset = 20
            let checksums = (0..<f.pages).map { _ in r.u64() }
            return .write(leaseID: f.leaseID, offset: f.offset, checksums: checksums, data: r.raw(f.pages * pageSize))
        case .ping:
            try exact(0, "PING")
            return .ping
        case .reclaimQuery:
            try exact(0, "RECLAIM_QUERY")
            return .reclaimQuery
        case .rdmaConnect:
            try exact(0, "RDMA_CONNECT")
            return .rdmaConnect
        case .leaseKeys:
            try r.need(4, "LEASE_KEYS")
            let n = Int(r.u32())
            guard (1...maxKeysPerRequest).contains(n) else {
                throw MemWireError("LEASE_KEYS of \(n) leases (1...\(maxKeysPerRequest))")
            }
            try exact(4 + 8 * n, "LEASE_KEYS of \(n) leases")
            return .leaseKeys((0..<n).map { _ in r.u64() })
        default:
            throw MemWireError("message type \(type.rawValue) is not a request")
        }
    }

    public static func encode(_ reply: MemReply, requestID: UInt64) -> [UInt8] {
        var w = LittleEndianWriter()
        let type: MemMessageType
        switch reply {
        case .ok: type = .ok
        case .challenge(let nonce, let serverID):
            type = .challenge
            w.bytes += nonce
            w.bytes += serverID
        case .authOK(let mac, let leaseBytes, let capacity):
            type = .authOK
            w.bytes += mac
            w.u64(leaseBytes)
            w.u64(capacity)
        case .leases(let ids):
            type = .leases
            w.u32(UInt32(ids.count))
            for id in ids { w.u64(id) }
        case .data(let checksums, let data):
            type = .data
            w = LittleEndianWriter(capacity: 4 + checksums.count * 8 + data.count)
            w.u32(UInt32(checksums.count))
            for c in checksums { w.u64(c) }
            w.bytes += data
        case .pong(let s):
            type = .pong
            w.u64(s.capacityBytes)
            w.u64(s.usedBytes)
            w.u64(s.leaseBytes)
            w.u32(s.leasesHeld)
            w.u32(s.agents)
            w.u32(s.reclaiming)
        case .reclaim(let ids):
            type = .reclaim
            w.u32(UInt32(ids.count))
            for id in ids { w.u64(id) }
        case .rdmaEndpoint(let e):
            type = .rdmaEndpoint
            let host = Array(e.host.utf8.prefix(maxEndpointHost))
            w.u16(e.port)
            w.u16(UInt16(host.count))
            w.bytes += host
            w.bytes += e.token
        case .keys(let keys):
            type = .keys
            w.u32(UInt32(keys.count))
            for k in keys {
                w.u64(k.leaseID)
                w.u64(k.address)
                w.u64(k.length)
                w.u32(k.rkey)
                w.u32(0)
            }
        case .error(let code, let message):
            type = .error
            w.u32(code)
            w.bytes += Array(message.utf8.prefix(maxErrorText))
        }
        return frame(type, requestID: requestID, body: w.bytes)
    }

    public static func decodeReply(_ type: MemMessageType, body: [UInt8]) throws(MemWireError) -> MemReply {
        var r = LittleEndianReader(body)
        switch type {
        case .ok:
            guard body.isEmpty else { throw MemWireError("OK with a body") }
            return .ok
        case .challenge:
            guard body.count == nonceSize + agentIDSize else { throw MemWireError("malformed CHALLENGE") }
            return .challenge(nonce: r.raw(nonceSize), serverID: r.raw(agentIDSize))
        case .authOK:
            guard body.count == macSize + 16 else { throw MemWireError("malformed AUTH_OK") }
            return .authOK(mac: r.raw(macSize), leaseBytes: r.u64(), capacityBytes: r.u64())
        case .leases, .reclaim:
            try r.need(4, "LEASES")
            let n = Int(r.u32())
            guard n <= maxLeaseIDs, r.remaining == n * 8 else { throw MemWireError("malformed LEASES") }
            let ids = (0..<n).map { _ in r.u64() }
            return type == .leases ? .leases(ids) : .reclaim(leases: ids)
        case .data:
            try r.need(4, "DATA")
            let n = Int(r.u32())
            guard n <= maxPagesPerIO, r.remaining == n * (8 + pageSize) else { throw MemWireError("malformed DATA") }
            let checksums = (0..<n).map { _ in r.u64() }
            return .data(checksums: checksums, data: r.raw(n * pageSize))
        case .pong:
            guard body.count == 36 else { throw MemWireError("malformed PONG") }
            return .pong(MemServerStats(capacityBytes: r.u64(), usedBytes: r.u64(), leaseBytes: r.u64(),
                                        leasesHeld: r.u32(), agents: r.u32(), reclaiming: r.u32()))
        case .rdmaEndpoint:
            try r.need(4, "RDMA_ENDPOINT")
            let port = r.u16()
            let n = Int(r.u16())
            guard port != 0, n <= maxEndpointHost, r.remaining == n + rdmaTokenSize else {
                throw MemWireError("malformed RDMA_ENDPOINT (port \(port), host of \(n) bytes, \(body.count) bytes in all)")
            }
            let host = String(decoding: r.raw(n), as: UTF8.self)
            return .rdmaEndpoint(RDMAEndpoint(port: port, host: host, token: r.raw(rdmaTokenSize)))
        case .keys:
            try r.need(4, "KEYS")
            let n = Int(r.u32())
            guard n <= maxKeysPerRequest, r.remaining == n * 32 else { throw MemWireError("malformed KEYS") }
            return .keys((0..<n).map { _ in
                let k = LeaseKey(leaseID: r.u64(), address: r.u64(), length: r.u64(), rkey: r.u32())
                _ = r.u32()
                return k
            })
        case .error:
            try r.need(4, "ERROR")
            let code = r.u32()
            return .error(code: code, message: String(decoding: r.raw(r.remaining), as: UTF8.self))
        default:
            throw MemWireError("message type \(type.rawValue) is not a reply")
        }
    }
}

extension MemWire {
    /// The private data of an rdma_cm connection request: magic, then the token.
    public static func rdmaPrivateData(token: [UInt8]) -> [UInt8] { rdmaPrivateMagic + token }

    /// The token in a connection request's private data (which the transport may pad with
    /// zeros), or nil when it is not ours.
    public static func rdmaToken(fromPrivateData data: [UInt8]) -> [UInt8]? {
        guard data.count >= rdmaPrivateMagic.count + rdmaTokenSize, Array(data.prefix(4)) == rdmaPrivateMagic else { return nil }
        return Array(data[4..<(4 + rdmaTokenSize)])
    }
}
