import FarpageMemserver
import FarpageTransport
import Testing

/// RDMA_CONNECT, LEASE_KEYS, RDMA_ENDPOINT, KEYS: encoding, and every malformed body refused.
@Suite("RDMA messages")
struct RDMAWireTests {
    @Test func requestsAndRepliesRoundTrip() throws {
        for request in [MemRequest.rdmaConnect, .leaseKeys([1]), .leaseKeys(Array(1...1024))] {
            let frame = MemWire.encode(request, requestID: 9)
            let header = try MemWire.decodeHeader(Array(frame.prefix(MemWire.headerSize)))
            #expect(try MemWire.decodeRequest(header.type, body: Array(frame.dropFirst(MemWire.headerSize))) == request)
        }
        let token = (0..<32).map { UInt8($0) }
        let replies: [MemReply] = [
            .rdmaEndpoint(RDMAEndpoint(port: 7202, host: "", token: token)),
            .rdmaEndpoint(RDMAEndpoint(port: 1, host: "fe80::1%eth0", token: token)),
            .keys([]),
            .keys([LeaseKey(leaseID: 3, address: 0x7f00_0000_0000, length: 64 << 20, rkey: 0xdead_beef)]),
        ]
        for reply in replies {
            let frame = MemWire.encode(reply, requestID: 9)
            let header = try MemWire.decodeHeader(Array(frame.prefix(MemWire.headerSize)))
            #expect(try MemWire.decodeReply(header.type, body: Array(frame.dropFirst(MemWire.headerSize))) == reply)
        }
    }

    @Test(arguments: [
        ("RDMA_CONNECT with a body", MemMessageType.rdmaConnect, [UInt8](repeating: 0, count: 1)),
        ("LEASE_KEYS empty", .leaseKeys, []),
        ("LEASE_KEYS of 0 leases", .leaseKeys, [0, 0, 0, 0]),
        ("LEASE_KEYS of 1025 leases", .leaseKeys, [0x01, 0x04, 0, 0] + [UInt8](repeating: 0, count: 8 * 1025)),
        ("LEASE_KEYS count and ids disagree", .leaseKeys, [2, 0, 0, 0] + [UInt8](repeating: 0, count: 8)),
        ("LEASE_KEYS with a trailing byte", .leaseKeys, [1, 0, 0, 0] + [UInt8](repeating: 0, count: 9)),
    ])
    func malformedRequestsAreRefused(_ what: String, _ type: MemMessageType, _ body: [UInt8]) {
        #expect(throws: MemWireError.self, "\(what)") { try MemWire.decodeRequest(type, body: body) }
    }

    @Test(arguments: [
        ("RDMA_ENDPOINT port 0", MemMessageType.rdmaEndpoint, [0, 0, 0, 0] + [UInt8](repeating: 1, count: 32)),
        ("RDMA_ENDPOINT short token", .rdmaEndpoint, [1, 0, 0, 0] + [UInt8](repeating: 1, count: 31)),
        ("RDMA_ENDPOINT host too long", .rdmaEndpoint, [1, 0, 65, 0] + [UInt8](repeating: 0x41, count: 65 + 32)),
        ("RDMA_ENDPOINT host length lies", .rdmaEndpoint, [1, 0, 4, 0] + [UInt8](repeating: 0x41, count: 2 + 32)),
        ("RDMA_ENDPOINT empty", .rdmaEndpoint, []),
        ("KEYS short entry", .keys, [1, 0, 0, 0] + [UInt8](repeating: 0, count: 31)),
        ("KEYS too many", .keys, [0x01, 0x04, 0, 0] + [UInt8](repeating: 0, count: 32 * 1025)),
        ("KEYS empty", .keys, []),
    ])
    func malformedRepliesAreRefused(_ what: String, _ type: MemMessageType, _ body: [UInt8]) {
        #expect(throws: MemWireError.self, "\(what)") { try MemWire.decodeReply(type, body: body) }
    }

    @Test func privateDataCarriesTheTokenAndNothingElseIsAccepted() {
        let token = (0..<32).map { UInt8(200 - $0) }
        let data = MemWire.rdmaPrivateData(token: token)
        #expect(data.count == 36, "must fit an RC connection request's 56 bytes")
        #expect(MemWire.rdmaToken(fromPrivateData: data) == token)
        #expect(MemWire.rdmaToken(fromPrivateData: data + [UInt8](repeating: 0, count: 20)) == token, "the transport pads to 56 bytes")
        #expect(MemWire.rdmaToken(fromPrivateData: Array(data.prefix(35))) == nil)
        #expect(MemWire.rdmaToken(fromPrivateData: [0x46, 0x50, 0x52, 0x32] + token) == nil)
        #expect(MemWire.rdmaToken(fromPrivateData: []) == nil)
    }

    @Test func tokensWorkOnceForTheirAgentAndExpire() {
        var tokens = RDMATokens(lifetimeSeconds: 1)
        let a = AgentID(Array(repeating: 1, count: 16))
        let b = AgentID(Array(repeating: 2, count: 16))
        let ta = tokens.issue(to: a, now: 0)
        let tb = tokens.issue(to: b, now: 0)
        #expect(ta != tb)
        #expect(tokens.redeem(ta, now: 10) == a)
        #expect(tokens.redeem(ta, now: 10) == nil, "a token works once")
        #expect(tokens.redeem(Array(repeating: 0, count: 32), now: 10) == nil)
        #expect(tokens.redeem(tb, now: 2_000_000_000) == nil, "an expired token is refused")
        for i in 0..<(RDMATokens.maxOutstanding + 10) { _ = tokens.issue(to: a, now: UInt64(i)) }
        #expect(tokens.count <= RDMATokens.maxOutstanding)
    }
}
