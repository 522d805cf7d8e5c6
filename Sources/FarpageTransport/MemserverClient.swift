import FarpageKernel
import FarpageProtocol

/// Why talking to a memory server failed.
public struct TransportError: Error, CustomStringConvertible, Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        /// Connection refused, reset, timed out: the server may come back.
        case unreachable
        /// The server refused our proof of the secret, or could not prove its own.
        case authentication
        /// The server answered ERROR to a request.
        case refused(code: UInt32)
        /// The peer broke the protocol.
        case protocolViolation
        /// Data did not match its checksum.
        case corrupt
        /// The server restarted: its leases, and the pages in them, are gone.
        case restarted
    }
    public let kind: Kind
    public let message: String
    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }
    public var description: String { message }
}

/// One authenticated connection to a memory server, used by one thread at a time.
///
/// Requests may be pipelined: `send` many, then `receive` their replies (matched by id).
public final class MemserverClient: @unchecked Sendable {
    public let host: String
    public let port: Int
    public let leaseBytes: UInt64
    public let capacityBytes: UInt64
    public let serverID: [UInt8]
    let stream: TCPStream
    private var nextRequestID: UInt64 = 1

    /// Connects and runs the mutual HELLO/CHALLENGE/AUTH handshake.
    public init(host: String, port: Int, agentID: [UInt8], name: String, secret: ClusterSecret,
                ioTimeoutMilliseconds: Int32 = 10_000) throws(TransportError)
    {
        self.host = host
        self.port = port
        do {
            stream = try TCPStream.connect(host: host, port: port, ioTimeoutMilliseconds: ioTimeoutMilliseconds)
        } catch {
            throw TransportError(.unreachable, "cannot connect to memory server \(host):\(port): \(error)")
        }
        let clientNonce = ClusterSecret.randomBytes(MemWire.nonceSize)
        let challenge = try Self.exchange(stream, .hello(agentID: agentID, nonce: clientNonce, name: name), id: 0)
        guard case .challenge(let serverNonce, let serverID) = challenge else {
            throw TransportError(.protocolViolation, "\(host):\(port) did not answer HELLO with a challenge")
        }
        let proof = secret.agentProof(serverNonce: serverNonce, clientNonce: clientNonce, agentID: agentID)
        let answer = try Self.exchange(stream, .auth(mac: proof), id: 0)
        switch answer {
        case .authOK(let mac, let leaseBytes, let capacity):
            guard secret.verifyServerProof(mac, serverNonce: serverNonce, clientNonce: clientNonce, agentID: agentID) else {
                throw TransportError(.authentication, "memory server \(host):\(port) could not prove it holds the cluster secret")
            }
            self.leaseBytes = leaseBytes
            self.capacityBytes = capacity
            self.serverID = serverID
        case .error(let code, let message) where code == MemErrorCode.authenticationFailed.rawValue:
            throw TransportError(.authentication, "memory server \(host):\(port) refused authentication: \(message)")
        default:
            throw TransportError(.protocolViolation, "\(host):\(port) answered AUTH with \(answer)")
        }
    }

    private static func exchange(_ stream: TCPStream, _ request: MemRequest, id: UInt64) throws(TransportError) -> MemReply {
        do { try stream.send(MemWire.encode(request, requestID: id)) } catch {
            throw TransportError(.unreachable, "sending to the memory server failed: \(error)")
        }
        return try readReply(stream).1
    }

    /// How long a thread waiting for a reply polls before it sleeps. Off: measured on the
    /// 2-vCPU development VMs with a memory server on the agent's own CPU, polling delays the
    /// server and gains nothing (store fault p50 ~100 µs either way). To be revisited with
    /// servers on other hosts, where a round trip is shorter than a wake-up.
    public static let replySpinMicroseconds: Int32 = 0

    static func readHeader(_ stream: TCPStream) throws(TransportError) -> MemHeader {
        let bytes: [UInt8]
        do { bytes = try stream.receive(exactly: MemWire.headerSize, spinMicroseconds: replySpinMicroseconds) } catch {
            throw TransportError(.unreachable, "reading from the memory server failed: \(error)")
        }
        do { return try MemWire.decodeHeader(bytes) } catch {
            throw TransportError(.protocolViolation, "bad frame from the memory server: \(error)")
        }
    }

    static func readBytes(_ stream: TCPStream, _ n: Int) throws(TransportError) -> [UInt8] {
        do { return try stream.receive(exactly: n) } catch {
            throw TransportError(.unreachable, "reading from the memory server failed: \(error)")
        }
    }

    /// The body of a frame whose header was read, decoded as a reply.
    static func readReply(_ stream: TCPStream, _ header: MemHeader) throws(TransportError) -> MemReply {
        let body = try readBytes(stream, header.bodyLength)
        do { return try MemWire.decodeReply(header.type, body: body) } catch {
            throw TransportError(.protocolViolation, "bad reply from the memory server: \(error)")
        }
    }

    static func readReply(_ stream: TCPStream) throws(TransportError) -> (UInt64, MemReply) {
        let header = try readHeader(stream)
        return (header.requestID, try readReply(stream, header))
    }

    /// Sends a request without waiting; returns its id.
    public func send(_ request: MemRequest) throws(TransportError) -> UInt64 {
        let id = nextRequestID
        nextRequestID += 1
        do { try stream.send(MemWire.encode(request, requestID: id)) } catch {
            throw TransportError(.unreachable, "sending to \(host):\(port) failed: \(error)")
        }
        return id
    }

    /// The next reply (of any outstanding request).
    public func receive() throws(TransportError) -> (UInt64, MemReply) { try Self.readReply(stream) }

    /// One request, one reply. ERROR replies become `TransportError.refused`.
    public func call(_ request: MemRequest) throws(TransportError) -> MemReply {
        try reply(to: try send(request))
    }

    /// The reply to request `id` (replies to others are skipped); ERROR becomes a `TransportError`.
    private func reply(to id: UInt64) throws(TransportError) -> MemReply {
        while true {
            let (rid, reply) = try receive()
            guard rid == id else { continue }
            if case .error = reply { throw Self.failure(reply, host: host, port: port, what: "a request") }
            return reply
        }
    }

    /// READ straight into `into` (pages × 4096 bytes): no intermediate buffer. Returns the
    /// checksums the server stored; the caller verifies them against the data.
    public func readPages(leaseID: UInt64, offset: UInt64, pages: Int, into: UnsafeMutableRawPointer) throws(TransportError)
        -> [UInt64]
    {
        let id = try send(.read(leaseID: leaseID, offset: offset, pages: pages))
        return try receivePages(requestID: id, pages: pages, into: into)
    }

    /// One run of a pipelined read.
    public struct ReadRun {
        public var offset: UInt64
        public var pages: Int
        public var into: UnsafeMutableRawPointer
        public init(offset: UInt64, pages: Int, into: UnsafeMutableRawPointer) {
            self.offset = offset
            self.pages = pages
            self.into = into
        }
    }

    /// Several READs of one lease sent together; their replies are received in order, and
    /// `each(j, checksums, error)` runs as soon as run `j` is in its buffer, while the server
    /// is already sending the next. An ERROR reply fails only its run; a broken connection
    /// throws (runs not reported yet did not complete).
    public func readPipelined(leaseID: UInt64, runs: [ReadRun], each: (Int, [UInt64], TransportError?) -> Void)
        throws(TransportError)
    {
        var frames: [UInt8] = []
        var ids: [UInt64] = []
        for run in runs {
            let id = nextRequestID
            nextRequestID += 1
            ids.append(id)
            frames += MemWire.encode(.read(leaseID: leaseID, offset: run.offset, pages: run.pages), requestID: id)
        }
        do { try stream.send(frames) } catch {
            throw TransportError(.unreachable, "sending to \(host):\(port) failed: \(error)")
        }
        for (j, run) in runs.enumerated() {
            do {
                let sums = try receivePages(requestID: ids[j], pages: run.pages, into: run.into)
                each(j, sums, nil)
            } catch {
                guard case .refused = error.kind else { throw error }
                each(j, [], error)
            }
        }
    }

    /// The DATA reply to `requestID`, its pages received into `into`.
    private func receivePages(requestID id: UInt64, pages: Int, into: UnsafeMutableRawPointer) throws(TransportError) -> [UInt64] {
        while true {
            let header = try Self.readHeader(stream)
            guard header.requestID == id else {
                _ = try Self.readBytes(stream, header.bodyLength)
                continue
            }
            switch header.type {
            case .data:
                let fixed = 4 + 8 * pages
                guard header.bodyLength == fixed + pages * MemWire.pageSize else {
                    throw TransportError(.protocolViolation, "\(host):\(port) answered READ of \(pages) pages with \(header.bodyLength) bytes")
                }
                var head = LittleEndianReader(try Self.readBytes(stream, fixed))
                let count = Int(head.u32())
                guard count == pages else { throw TransportError(.protocolViolation, "\(host):\(port): DATA count \(count) for \(pages) pages") }
                let sums = (0..<pages).map { _ in head.u64() }
                do { try stream.receive(into: into, count: pages * MemWire.pageSize) } catch {
                    throw TransportError(.unreachable, "reading from the memory server failed: \(error)")
                }
                return sums
            default:
                throw Self.failure(try Self.readReply(stream, header), host: host, port: port, what: "READ")
            }
        }
    }

    /// WRITE of `checksums.count` pages from `from`, sent with one gather write (no copy).
    public func writePages(leaseID: UInt64, offset: UInt64, checksums: [UInt64], from: UnsafeRawPointer) throws(TransportError) {
        let id = nextRequestID
        nextRequestID += 1
        let prefix = MemWire.writePrefix(requestID: id, leaseID: leaseID, offset: offset, checksums: checksums)
        do { try stream.send(prefix, then: from, count: checksums.count * MemWire.pageSize) } catch {
            throw TransportError(.unreachable, "sending to \(host):\(port) failed: \(error)")
        }
        let answer = try reply(to: id)
        guard case .ok = answer else { throw Self.failure(answer, host: host, port: port, what: "WRITE") }
    }

    /// The error for a reply that is not the one expected: ERROR codes become `refused` (or
    /// `corrupt`), anything else is a protocol violation.
    static func failure(_ reply: MemReply, host: String, port: Int, what: String) -> TransportError {
        if case .error(let code, let message) = reply {
            return TransportError(code == MemErrorCode.corrupt.rawValue ? .corrupt : .refused(code: code), "\(host):\(port): \(message)")
        }
        return TransportError(.protocolViolation, "\(host):\(port) answered \(what) with \(reply)")
    }

    public func close() { stream.shutdown() }
}
