import FarpageKernel
import FarpageProtocol
import FarpageTransport
import Foundation
import Logging
import NIOCore
import NIOPosix
import FarpageRDMA
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Splits the TCP stream into frames. The header is validated before the body is buffered,
/// so a peer that claims a huge length is cut off without costing memory.
final class MemFrameDecoder: ByteToMessageDecoder {
    /// The body is a slice of the receive buffer: page data is not copied before it is stored.
    typealias InboundOut = (MemHeader, ByteBuffer)
    private var header: MemHeader?

    func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        if header == nil {
            guard buffer.readableBytes >= MemWire.headerSize,
                let bytes = buffer.readBytes(length: MemWire.headerSize)
            else { return .needMoreData }
            header = try MemWire.decodeHeader(bytes)
        }
        guard let h = header, buffer.readableBytes >= h.bodyLength, let body = buffer.readSlice(length: h.bodyLength)
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

    /// - Parameter holdsLeases: whether the agent still holds leases, asked under the session
    ///   lock (another connection of the agent may allocate one meanwhile); one that holds none
    ///   is forgotten at once (there is nothing to keep through a grace period).
    func detach(_ agent: AgentID, channel: any Channel, holdsLeases: () -> Bool) {
        sessions.withLock { s in
            s[agent]?.channels[ObjectIdentifier(channel)] = nil
            if s[agent]?.channels.isEmpty == true {
                if holdsLeases() { s[agent]!.disconnectedAt = monotonicNanoseconds() } else { s[agent] = nil }
            }
        }
    }

    /// Forgets the agents gone for longer than `grace` and runs `free` for each, under the
    /// session lock: an agent reconnecting meanwhile either comes back before the check (and
    /// keeps its leases) or after `free` (and finds none), never in between.
    func expire(grace: Double, free: (AgentID) -> Int) -> [(AgentID, Int)] {
        let now = monotonicNanoseconds()
        return sessions.withLock { s in
            let gone = s.filter { _, v in v.disconnectedAt.map { Double(now - $0) / 1e9 > grace } ?? false }.map(\.key)
            return gone.map { a in
                s[a] = nil
                return (a, free(a))
            }
        }
    }

    /// Name and connection state of every known agent.
    func known() -> [AgentID: (name: String, connected: Bool)] {
        sessions.withLock { s in s.mapValues { ($0.name, !$0.channels.isEmpty) } }
    }

    var connectedAgents: Int { sessions.withLock { s in s.values.filter { !$0.channels.isEmpty }.count } }

    func anyChannel(of agent: AgentID) -> (any Channel)? { sessions.withLock { $0[agent]?.channels.values.first } }
}

/// One agent connection: handshake, then lease and page requests.
final class MemServerHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = (MemHeader, ByteBuffer)
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
    var deferred: [(MemHeader, ByteBuffer)] = []
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
            let leases = server.leases
            server.sessions.detach(agent, channel: context.channel, holdsLeases: { leases.leaseCount(owner: agent) > 0 })
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

    private func handle(_ context: ChannelHandlerContext, header: MemHeader, body: ByteBuffer) {
        if case .closing = state { return }
        // Page traffic is served from the receive buffer and into the reply buffer directly.
        if case .ready(let agent) = state {
            if header.type == .write { return serveWrite(context, agent: agent, header: header, body: body) }
            if header.type == .read { return serveRead(context, agent: agent, header: header, body: body) }
        }
        let request: MemRequest
        do { request = try MemWire.decodeRequest(header.type, body: Array(body.readableBytesView)) } catch {
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
                                  capacityBytes: server.stats(for: agent).capacityBytes), requestID: header.requestID)
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
                let u = server.leases.usage
                reply = .error(
                    code: MemErrorCode.noCapacity.rawValue,
                    message: u.limitLeases < u.capacityLeases
                        ? "the server is reclaiming memory: it lends at most \(u.limitLeases) of its \(u.capacityLeases) leases now"
                        : "no capacity left (\(u.leases) leases lent)")
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
            reply = .pong(server.stats(for: agent))
        case .reclaimQuery:
            reply = .reclaim(leases: Array(server.leases.reclaimRequested(owner: agent).prefix(MemWire.maxLeaseIDs)))
        case .rdmaConnect:
            guard let rdma = server.rdma else {
                reply = .error(code: MemErrorCode.rdmaUnavailable.rawValue, message: server.rdmaOffReason)
                break
            }
            do { reply = .rdmaEndpoint(try rdma.endpoint(for: agent)) } catch {
                reply = .error(code: error.code.rawValue, message: error.message)
            }
        case .leaseKeys(let ids):
            guard let rdma = server.rdma else {
                reply = .error(code: MemErrorCode.rdmaUnavailable.rawValue, message: server.rdmaOffReason)
                break
            }
            do { reply = .keys(try rdma.keys(for: agent, leases: ids)) } catch {
                reply = .error(code: error.code.rawValue, message: error.message)
            }
        case .hello, .auth:
            reply = .error(code: MemErrorCode.malformed.rawValue, message: "already authenticated")
        }
        send(context, reply, requestID: requestID)
    }

    /// WRITE: checked by `MemWire.pageFields`, then checksummed and copied into the lease
    /// straight from the receive buffer.
    private func serveWrite(_ context: ChannelHandlerContext, agent: AgentID, header: MemHeader, body: ByteBuffer) {
        let outcome = body.withUnsafeReadableBytes { raw -> Result<MemReply, MemWireError> in
            let f: (leaseID: UInt64, offset: UInt64, pages: Int)
            do throws(MemWireError) { f = try MemWire.pageFields(.write, raw) } catch { return .failure(error) }
            let sums = (0..<f.pages).map { UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 20 + 8 * $0, as: UInt64.self)) }
            do throws(LeaseError) {
                try server.leases.write(owner: agent, leaseID: f.leaseID, offset: f.offset, checksums: sums,
                                        data: raw.baseAddress! + 20 + 8 * f.pages)
                return .success(.ok)
            } catch {
                if error.code == .corrupt { logger.warning("refused a corrupt write", metadata: ["fp.lease": "\(f.leaseID)"]) }
                return .success(.error(code: error.code.rawValue, message: error.message))
            }
        }
        switch outcome {
        case .success(let reply): send(context, reply, requestID: header.requestID)
        case .failure(let error): fail(context, .malformed, error.message, requestID: header.requestID)
        }
    }

    /// READ: the reply is built in one buffer, the pages copied once, from the lease.
    private func serveRead(_ context: ChannelHandlerContext, agent: AgentID, header: MemHeader, body: ByteBuffer) {
        let parsed = body.withUnsafeReadableBytes { raw in Result { () throws(MemWireError) in try MemWire.pageFields(.read, raw) } }
        guard case .success(let f) = parsed else {
            if case .failure(let error) = parsed { fail(context, .malformed, error.message, requestID: header.requestID) }
            return
        }
        do {
            let buffer = try server.leases.read(owner: agent, leaseID: f.leaseID, offset: f.offset, pages: f.pages) { sums, data -> ByteBuffer in
                let prefix = MemWire.dataPrefix(requestID: header.requestID, checksums: sums)
                var b = context.channel.allocator.buffer(capacity: prefix.count + f.pages * MemWire.pageSize)
                b.writeBytes(prefix)
                b.writeBytes(UnsafeRawBufferPointer(start: data, count: f.pages * MemWire.pageSize))
                return b
            }
            context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
        } catch {
            send(context, .error(code: error.code.rawValue, message: error.message), requestID: header.requestID)
        }
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
    private(set) var boundPort = 0
    /// The RDMA side, when this server lends over RDMA too (set in `start`, before serving).
    private(set) var rdma: (any RDMAControlPlane)?
    /// Why there is no RDMA listener, for RDMA_CONNECT's ERROR.
    private(set) var rdmaOffReason = "this memory server has no RDMA listener"

    /// What bounds lending besides the capacity. Lock order: this, then the lease table.
    struct Limits {
        /// Set by the operator (`farpagectl memserver limit|reclaim`), in leases.
        var operatorLeases: Int?
        /// What free memory allows, in leases (the capacity when there is no pressure).
        var pressureLeases: Int
        var headroomBytes: UInt64
        var memAvailable: UInt64?
        var effective: Int
        var lastStaleWarning: UInt64 = 0
    }
    let limits: Mutex<Limits>
    /// How long a lease asked back may wait before the request goes to another agent instead.
    static let reclaimPatienceSeconds = 120.0

    public init(config: MemserverConfig, secret: ClusterSecret, logger: Logger) {
        // Page batches are up to 1 MiB: keep such buffers in the heap and reused (a fixed mmap
        // threshold above them), rather than mmapped, faulted in and zeroed on every request
        // (docs/decisions.md, item 27).
        tuneAllocatorForLargeBuffers()
        self.config = config
        self.secret = secret
        self.logger = logger
        leases = LeaseTable(capacityBytes: config.capacityBytes, leaseBytes: config.leaseBytes)
        group = MultiThreadedEventLoopGroup(numberOfThreads: config.effectiveThreads)
        limits = Mutex(Limits(operatorLeases: nil, pressureLeases: leases.capacityLeases, headroomBytes: config.headroomBytes,
                              memAvailable: nil, effective: leases.capacityLeases))
    }

    var isDraining: Bool { draining.load(ordering: .relaxed) }

    /// Counters for a PONG to `agent`: `capacity_bytes` is what the server lends now (lowered
    /// while it reclaims), `reclaiming` how many of this agent's leases it wants back.
    func stats(for agent: AgentID) -> MemServerStats {
        let u = leases.usage
        return MemServerStats(
            capacityBytes: UInt64(u.limitLeases) * UInt64(leases.leaseBytes), usedBytes: UInt64(u.leases * leases.leaseBytes),
            leaseBytes: UInt64(leases.leaseBytes), leasesHeld: UInt32(u.leases),
            agents: UInt32(sessions.connectedAgents), reclaiming: UInt32(leases.reclaimRequested(owner: agent).count))
    }

    // MARK: Donor pressure

    /// Recomputes the lending limit and marks (or unmarks) leases to reclaim. Call with `limits` held.
    private func apply(_ l: inout Limits, reason: String) {
        let limit = min(leases.capacityLeases, l.operatorLeases ?? Int.max, l.pressureLeases)
        let old = l.effective
        l.effective = limit
        let marked = leases.setLimit(leases: limit)
        guard limit != old else { return }
        let lb = UInt64(leases.leaseBytes)
        if limit < old {
            logger.notice(
                "lowering the lending limit; asking agents to give leases back",
                metadata: ["fp.reason": "\(reason)", "fp.limit_bytes": "\(UInt64(limit) * lb)", "fp.reclaiming": "\(marked)"])
        } else {
            logger.notice("raising the lending limit", metadata: ["fp.reason": "\(reason)", "fp.limit_bytes": "\(UInt64(limit) * lb)",
                                                                 "fp.reclaiming": "\(marked)"])
        }
    }

    /// Asks for `bytes` of lent memory back: the limit drops that far below what is lent now.
    public func reclaim(bytes: UInt64) {
        limits.withLock { l in
            let u = leases.usage
            let lb = UInt64(leases.leaseBytes)
            let n = Int(clamping: bytes / lb + (bytes % lb == 0 ? 0 : 1))  // no overflow for any size
            l.operatorLeases = max(0, min(l.operatorLeases ?? Int.max, u.leases - u.reclaiming - n))  // >= -Int.max
            apply(&l, reason: "operator asked for \(bytes) bytes back")
        }
    }

    /// Sets the operator's lending limit; nil lifts it.
    public func setLimit(bytes: UInt64?) {
        limits.withLock { l in
            l.operatorLeases = bytes.map { Int(min($0 / UInt64(leases.leaseBytes), UInt64(Int.max))) }
            apply(&l, reason: bytes.map { "operator set the limit to \($0) bytes" } ?? "operator lifted the limit")
        }
    }

    /// Sets the free-memory headroom; nil restores the configured one.
    public func setHeadroom(bytes: UInt64?) {
        limits.withLock { l in l.headroomBytes = bytes ?? config.headroomBytes }
        checkPressure()
    }

    /// Once a second: keeps `headroom` bytes of the host's memory free. Below it, the limit
    /// drops until enough leases are asked back (counting those already on their way back);
    /// it rises again only once free memory is two leases above the headroom (hysteresis).
    public func checkPressure() {
        let available = memAvailableBytes()
        limits.withLock { l in
            l.memAvailable = available
            let cap = leases.capacityLeases
            if l.headroomBytes == 0 {
                l.pressureLeases = cap
            } else if let available {
                let u = leases.usage
                let lb = Int64(leases.leaseBytes)
                let surplus = Int64(clamping: available) + Int64(u.reclaiming) * lb - Int64(clamping: l.headroomBytes)
                let kept = u.leases - u.reclaiming
                if surplus < 0 {
                    let short = -surplus  // surplus >= -Int64.max: no overflow
                    l.pressureLeases = max(0, kept - Int(short / lb + (short % lb == 0 ? 0 : 1)))
                } else if surplus >= 2 * lb {
                    l.pressureLeases = min(cap, max(l.pressureLeases, kept + Int((surplus - lb) / lb)))
                }
            }
            apply(&l, reason: "free memory \(available.map(String.init) ?? "unknown") bytes, headroom \(l.headroomBytes) bytes")
            // Marks an agent has not honoured for two minutes go to other agents that could.
            let moved = leases.rotateStaleMarks(olderThan: Self.reclaimPatienceSeconds)
            if moved > 0 {
                logger.notice("asking other agents for leases an agent has not given back in time",
                              metadata: ["fp.moved": "\(moved)"])
            }
            // An agent that does not give leases back is named once a minute; the server keeps
            // waiting (taking a lease by force would lose its pages).
            let now = monotonicNanoseconds()
            if now - l.lastStaleWarning > 60_000_000_000 {
                let slow = leases.agentUsage().filter { $0.reclaiming > 0 && $0.oldestReclaimSeconds > 60 }
                if !slow.isEmpty {
                    l.lastStaleWarning = now
                    let names = sessions.known()
                    for a in slow {
                        logger.warning(
                            "agent has not given back the leases asked of it; still waiting (check that agent's log: it needs room elsewhere in its pool)",
                            metadata: ["fp.agent": "\(a.agent)", "fp.name": "\(names[a.agent]?.name ?? "?")", "fp.leases": "\(a.reclaiming)",
                                       "fp.waiting_s": "\(Int(a.oldestReclaimSeconds))"])
                    }
                }
            }
        }
    }

    public var adminStatus: MemserverAdmin.Status {
        let (l, u) = limits.withLock { l in (l, leases.usage) }
        let lb = UInt64(leases.leaseBytes)
        let names = sessions.known()
        let agents = leases.agentUsage().prefix(MemserverAdmin.maxAgentsListed).map { a in
            MemserverAdmin.Agent(id: "\(a.agent)", name: names[a.agent]?.name ?? "", connected: names[a.agent]?.connected ?? false,
                                 leases: a.leases, reclaiming: a.reclaiming,
                                 oldestReclaimSeconds: a.reclaiming > 0 ? (a.oldestReclaimSeconds * 10).rounded() / 10 : 0)
        }
        return MemserverAdmin.Status(
            listen: "\(config.host):\(boundPort)", capacityBytes: UInt64(leases.capacityLeases) * lb, leaseBytes: lb,
            limitBytes: UInt64(u.limitLeases) * lb, operatorLimitBytes: l.operatorLeases.map { UInt64($0) * lb },
            pressureLimitBytes: UInt64(min(l.pressureLeases, leases.capacityLeases)) * lb, headroomBytes: l.headroomBytes,
            memAvailableBytes: l.memAvailable, lentBytes: UInt64(u.leases) * lb, leases: u.leases, reclaimingLeases: u.reclaiming,
            agents: Array(agents))
    }

    /// Starts the rdma_cm listener per `[memserver] transport`: `auto` without a device logs why
    /// and serves TCP only; `rdma` without one is an error naming the reason.
    func startRDMA() throws(MemserverConfigError) {
        if rdma != nil { return }
        if config.transport == .tcp {
            rdmaOffReason = "this memory server is configured for TCP only (transport = \"tcp\")"
            return
        }
        let fix = "set [memserver] transport = \"tcp\" (or \"auto\") to lend over TCP only"
        if let reason = SystemVerbs.probeDevices().reason {
            rdmaOffReason = "this memory server has no RDMA: \(reason)"
            if config.transport == .rdma { throw MemserverConfigError(key: "memserver.transport", problem: "is \"rdma\" but \(reason)", fix: fix) }
            logger.notice("lending over TCP only", metadata: ["fp.reason": "\(reason)"])
            return
        }
        do throws(VerbsError) {
            let listener = try RDMAListener(host: config.rdmaHost ?? config.host, port: config.rdmaPort, leases: leases, logger: logger)
            leases.releaseHook = { [weak listener] id in listener?.leaseReleased(id) }
            listener.start()
            rdma = listener
            logger.info("listening for RDMA connections (rdma_cm)", metadata: ["fp.rdma_listen": "\(config.rdmaHost ?? config.host):\(listener.port)"])
        } catch {
            let reason = "cannot listen on rdma_cm at \(config.rdmaHost ?? config.host):\(config.rdmaPort): \(error)"
            rdmaOffReason = "this memory server has no RDMA listener: \(reason)"
            if config.transport == .rdma { throw MemserverConfigError(key: "memserver.rdma_listen", problem: reason, fix: fix) }
            logger.warning("lending over TCP only", metadata: ["fp.reason": "\(reason)"])
        }
    }

    /// The rdma_cm port, when listening (useful with port 0).
    public var rdmaPort: Int? { (rdma as? RDMAListener)?.port }

    /// Serves RDMA_CONNECT and LEASE_KEYS with `plane` instead of an rdma_cm listener (tests
    /// drive the agent's RDMA path with fake verbs this way). Call before `start`.
    public func useRDMA(_ plane: any RDMAControlPlane) {
        rdma = plane
        leases.releaseHook = { [weak plane] id in plane?.leaseReleased(id) }
    }

    /// The leases (for an `RDMAControlPlane` that registers their memory).
    public var leaseTable: LeaseTable { leases }

    /// Binds the listening socket. Returns the bound port (useful with port 0).
    @discardableResult
    public func start() async throws -> Int {
        try startRDMA()
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
        boundPort = port
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
        for (agent, n) in sessions.expire(grace: config.leaseGraceSeconds, free: { leases.freeAll(owner: $0) }) {
            if n > 0 { logger.notice("agent did not come back within the grace period; its leases were freed", metadata: ["fp.agent": "\(agent)", "fp.leases": "\(n)"]) }
            rdma?.agentGone(agent)
        }
    }

    public func stop() async {
        draining.store(true, ordering: .relaxed)
        try? await channel?.close()
        try? await group.shutdownGracefully()
        rdma?.stop()
        logger.info("farpaged memserver stopped")
    }
}

/// MemAvailable from /proc/meminfo, in bytes; nil when it cannot be read.
func memAvailableBytes() -> UInt64? {
    guard let text = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8) else { return nil }
    for line in text.split(separator: "\n") where line.hasPrefix("MemAvailable:") {
        let fields = line.split(separator: " ", omittingEmptySubsequences: true)
        guard fields.count >= 2, let kib = UInt64(fields[1]) else { return nil }
        return kib * 1024
    }
    return nil
}
