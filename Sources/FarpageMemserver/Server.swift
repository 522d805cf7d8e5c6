import FarpageKernel
import FarpageTransport
import Logging
import NIOCore
import NIOPosix
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Splits the TCP stream into frames. The header is validated before the body is buffered,
/// so a peer that claims a huge length is cut off without costing memory.
final class MemFrameDecoder: ByteToMessageDecoder {
    typealias InboundOut = (MemHeader, [UInt8])
    private var header: MemHeader?

    func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        if header == nil {
            guard buffer.readableBytes >= MemWire.headerSize,
                let bytes = buffer.readBytes(length: MemWire.headerSize)
            else { return .needMoreData }
            header = try MemWire.decodeHeader(bytes)
        }
        guard let h = header, buffer.readableBytes >= h.bodyLength, let body = buffer.readBytes(length: h.bodyLength)
        else { return .needMoreData }
        header = nil
        context.fireChannelRead(wrapInboundOut((h, body)))
        return .continue
    }

    func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        .needMoreData
    }
}

/// Agents known to this server: their live connections, and when the last one went away.
final class AgentSessions: @unchecked Sendable {
    struct Session {
        var channels: [ObjectIdentifier: any Channel] = [:]
        var disconnectedAt: UInt64? = nil
        var name = ""
    }
    let sessions = Mutex<[AgentID: Session]>([:])

    func attach(_ agent: AgentID, name: String, channel: any Channel) {
        sessions.withLock { s in
            s[agent, default: Session()].channels[ObjectIdentifier(channel)] = channel
            s[agent]!.disconnectedAt = nil
            s[agent]!.name = name
        }
    }

    /// - Parameter holdsLeases: whether the agent still holds leases; one that holds none is
    ///   forgotten at once (there is nothing to keep through a grace period).
    func detach(_ agent: AgentID, channel: any Channel, holdsLeases: Bool) {
        sessions.withLock { s in
            s[agent]?.channels[ObjectIdentifier(channel)] = nil
            if s[agent]?.channels.isEmpty == true {
                if holdsLeases { s[agent]!.disconnectedAt = monotonicNanoseconds() } else { s[agent] = nil }
            }
        }
    }

    /// Agents gone for longer than `grace`: forgotten here, returned to be freed.
    func expired(grace: Double) -> [AgentID] {
        let now = monotonicNanoseconds()
        return sessions.withLock { s in
            let gone = s.filter { _, v in v.disconnectedAt.map { Double(now - $0) / 1e9 > grace } ?? false }.map(\.key)
            for a in gone { s[a] = nil }
            return gone
        }
    }

    var connectedAgents: Int { sessions.withLock { s in s.values.filter { !$0.channels.isEmpty }.count } }

    func anyChannel(of agent: AgentID) -> (any Channel)? { sessions.withLock { $0[agent]?.channels.values.first } }
}

/// One agent connection: handshake, then lease and page requests.
final class MemServerHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = (MemHeader, [UInt8])
    typealias OutboundOut = ByteBuffer

    enum State {
        case awaitingHello
        case awaitingAuth(serverNonce: [UInt8], clientNonce: [UInt8], agent: AgentID, name: String)
        case ready(AgentID)
        case closing
    }

    let server: Memserver
    var state = State.awaitingHello
    var logger: Logger
    /// Requests read while the peer was not taking its replies: served once it drains them.
    /// Reading stops meanwhile, so this holds at most what one socket read delivered.
    var deferred: [(MemHeader, [UInt8])] = []
    /// Closes a connection that has not authenticated in time; cancelled once it has.
    var handshakeTimer: Scheduled<Void>?
    /// The agent this connection is registered for in `AgentSessions` (whatever the state
    /// later becomes: a connection closed for an error must still be unregistered).
    var attachedAgent: AgentID?

    init(server: Memserver, logger: Logger) {
        self.server = server
        self.logger = logger
    }

    func channelActive(context: ChannelHandlerContext) {
        logger[metadataKey: "fp.peer"] = "\(context.remoteAddress.map { "\($0)" } ?? "?")"
        // A peer that does not authenticate in time is dropped: it holds a connection slot.
        let channel = context.channel
        let timeout = server.config.handshakeTimeoutSeconds
        let logger = self.logger
        // The timer holds only the channel (not this handler), and is cancelled on success or close.
        handshakeTimer = context.eventLoop.scheduleTask(in: .milliseconds(Int64(timeout * 1000))) {
            logger.notice("closing a connection that did not authenticate within \(timeout)s")
            channel.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        handshakeTimer?.cancel()
        handshakeTimer = nil
        if let agent = attachedAgent {
            server.sessions.detach(agent, channel: context.channel, holdsLeases: server.leases.leaseCount(owner: agent) > 0)
            attachedAgent = nil
        }
        state = .closing
        context.fireChannelInactive()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        // Backpressure: a slow agent is not served, nor read, until it drains its replies.
        while context.channel.isWritable, !deferred.isEmpty {
            let (header, body) = deferred.removeFirst()
            handle(context, header: header, body: body)
        }
        if context.channel.isWritable && deferred.isEmpty {
            _ = context.channel.setOption(ChannelOptions.autoRead, value: true)
        }
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let e = error as? MemWireError {
            logger.warning("malformed frame; closing the connection", metadata: ["fp.reason": "\(e.message)"])
            send(context, .error(code: MemErrorCode.malformed.rawValue, message: e.message), requestID: 0)
        } else if let e = error as? ByteToMessageDecoderError {
            logger.warning("closing a connection: \(e)")
        } else {
            logger.info("connection error: \(error)")
        }
        state = .closing
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let (header, body) = unwrapInboundIn(data)
        if !context.channel.isWritable || !deferred.isEmpty {
            deferred.append((header, body))
            _ = context.channel.setOption(ChannelOptions.autoRead, value: false)
            return
        }
        handle(context, header: header, body: body)
    }

    private func handle(_ context: ChannelHandlerContext, header: MemHeader, body: [UInt8]) {
        if case .closing = state { return }
        let request: MemRequest
        do { request = try MemWire.decodeRequest(header.type, body: body) } catch {
            fail(context, .malformed, error.message, requestID: header.requestID)
            return
        }
        switch (state, request) {
        case (.awaitingHello, .hello(let agentID, let nonce, let name)):
            guard agentID.count == MemWire.agentIDSize, nonce.count == MemWire.nonceSize else {
                fail(context, .malformed, "bad HELLO", requestID: header.requestID)
                return
            }
            let serverNonce = ClusterSecret.randomBytes(MemWire.nonceSize)
            state = .awaitingAuth(serverNonce: serverNonce, clientNonce: nonce, agent: AgentID(agentID), name: name)
            send(context, .challenge(nonce: serverNonce, serverID: server.serverID), requestID: header.requestID)
        case (.awaitingAuth(let serverNonce, let clientNonce, let agent, let name), .auth(let mac)):
            guard server.secret.verifyAgentProof(mac, serverNonce: serverNonce, clientNonce: clientNonce, agentID: agent.bytes)
            else {
                server.authFailures.wrappingAdd(1, ordering: .relaxed)
                logger.warning("authentication failed: wrong cluster secret", metadata: ["fp.agent": "\(agent)", "fp.name": "\(name)"])
                fail(context, .authenticationFailed, "authentication failed: check that the agent and this server share the cluster secret",
                     requestID: header.requestID)
                return
            }
            state = .ready(agent)
            handshakeTimer?.cancel()
            handshakeTimer = nil
            logger[metadataKey: "fp.agent"] = "\(agent)"
            server.sessions.attach(agent, name: name, channel: context.channel)
            attachedAgent = agent
            logger.info("agent authenticated", metadata: ["fp.name": "\(name)"])
            let proof = server.secret.serverProof(serverNonce: serverNonce, clientNonce: clientNonce, agentID: agent.bytes)
            send(context, .authOK(mac: proof, leaseBytes: UInt64(server.leases.leaseBytes),
                                  capacityBytes: server.config.capacityBytes), requestID: header.requestID)
        case (.ready(let agent), _):
            serve(context, agent: agent, request: request, requestID: header.requestID)
        case (.awaitingHello, _), (.awaitingAuth, _):
            fail(context, .unauthenticated, "authenticate first (HELLO, then AUTH)", requestID: header.requestID)
        case (.closing, _):
            return
        }
    }

    private func serve(_ context: ChannelHandlerContext, agent: AgentID, request: MemRequest, requestID: UInt64) {
        let reply: MemReply
        switch request {
        case .leaseAlloc(let count):
            guard !server.isDraining else {
                reply = .error(code: MemErrorCode.shuttingDown.rawValue, message: "the server is shutting down")
                break
            }
            let ids = server.leases.allocate(owner: agent, count: Int(min(count, 1024)))
            if ids.isEmpty && count > 0 {
                reply = .error(code: MemErrorCode.noCapacity.rawValue, message: "no capacity left (\(server.leases.capacityLeases) leases lent)")
            } else {
                reply = .leases(ids)
            }
        case .leaseFree(let id):
            do {
                try server.leases.free(owner: agent, leaseID: id)
                reply = .ok
            } catch { reply = .error(code: error.code.rawValue, message: error.message) }
        case .read(let id, let offset, let pages):
            do {
                let (sums, data) = try server.leases.read(owner: agent, leaseID: id, offset: offset, pages: pages)
                reply = .data(checksums: sums, data: data)
            } catch { reply = .error(code: error.code.rawValue, message: error.message) }
        case .write(let id, let offset, let sums, let data):
            do {
                try server.leases.write(owner: agent, leaseID: id, offset: offset, checksums: sums, data: data)
                reply = .ok
            } catch {
                if error.code == .corrupt { logger.warning("refused a corrupt write", metadata: ["fp.lease": "\(id)"]) }
                reply = .error(code: error.code.rawValue, message: error.message)
            }
        case .ping:
            reply = .pong(server.stats)
        case .hello, .auth:
            reply = .error(code: MemErrorCode.malformed.rawValue, message: "already authenticated")
        }
        send(context, reply, requestID: requestID)
    }

    private func fail(_ context: ChannelHandlerContext, _ code: MemErrorCode, _ message: String, requestID: UInt64) {
        send(context, .error(code: code.rawValue, message: message), requestID: requestID)
        state = .closing
        context.close(promise: nil)
    }

    private func send(_ context: ChannelHandlerContext, _ reply: MemReply, requestID: UInt64) {
        let bytes = MemWire.encode(reply, requestID: requestID)
        var buffer = context.channel.allocator.buffer(capacity: bytes.count)
        buffer.writeBytes(bytes)
        context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
    }
}

/// The memory server: lends DRAM to authenticated agents as leases.
public final class Memserver: @unchecked Sendable {
    public let config: MemserverConfig
    let secret: ClusterSecret
    let leases: LeaseTable
    let sessions = AgentSessions()
    let serverID = ClusterSecret.randomBytes(MemWire.agentIDSize)
    let logger: Logger
    let group: MultiThreadedEventLoopGroup
    let authFailures = Atomic<UInt64>(0)
    let draining = Atomic<Bool>(false)
    private var channel: (any Channel)?

    public init(config: MemserverConfig, secret: ClusterSecret, logger: Logger) {
        // Page batches are up to 1 MiB: keep such buffers mmapped and returned to the kernel
        // when freed. glibc otherwise raises its mmap threshold after the first free and serves
        // them from arenas that keep the memory, and the server's footprint creeps up with traffic.
        tuneAllocatorForLargeBuffers()
        self.config = config
        self.secret = secret
        self.logger = logger
        leases = LeaseTable(capacityBytes: config.capacityBytes, leaseBytes: config.leaseBytes)
        group = MultiThreadedEventLoopGroup(numberOfThreads: config.effectiveThreads)
    }

    var isDraining: Bool { draining.load(ordering: .relaxed) }

    var stats: MemServerStats {
        let u = leases.usage
        return MemServerStats(
            capacityBytes: config.capacityBytes, usedBytes: UInt64(u.leases * leases.leaseBytes),
            leaseBytes: UInt64(leases.leaseBytes), leasesHeld: UInt32(u.leases),
            agents: UInt32(sessions.connectedAgents), reclaiming: 0)
    }

    /// Binds the listening socket. Returns the bound port (useful with port 0).
    @discardableResult
    public func start() async throws -> Int {
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.writeBufferWaterMark, value: .init(low: 1 << 20, high: 4 << 20))
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(MemFrameDecoder()))
                    try channel.pipeline.syncOperations.addHandler(MemServerHandler(server: self, logger: logger))
                }
            }
        let ch = try await bootstrap.bind(host: config.host, port: config.port).get()
        channel = ch
        let port = ch.localAddress?.port ?? config.port
        logger.info(
            "farpaged memserver listening",
            metadata: [
                "fp.listen": "\(config.host):\(port)", "fp.capacity": "\(config.capacityBytes)",
                "fp.lease_bytes": "\(config.leaseBytes)",
            ])
        return port
    }

    /// Frees the leases of agents that stayed away longer than the grace period.
    public func expireAbandoned() {
        for agent in sessions.expired(grace: config.leaseGraceSeconds) {
            let n = leases.freeAll(owner: agent)
            if n > 0 { logger.notice("agent did not come back within the grace period; its leases were freed", metadata: ["fp.agent": "\(agent)", "fp.leases": "\(n)"]) }
        }
    }

    public func stop() async {
        draining.store(true, ordering: .relaxed)
        try? await channel?.close()
        try? await group.shutdownGracefully()
        logger.info("farpaged memserver stopped")
    }
}
