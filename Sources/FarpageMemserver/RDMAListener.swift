import CFarpageVerbs
import FarpageKernel
import FarpageRDMA
import FarpageTransport
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// One-time tokens that bind an rdma_cm connection request to an agent authenticated over TCP
/// (RDMA_CONNECT issues one; the connection request carries it in its private data). A token
/// works once, for `lifetime` seconds.
public struct RDMATokens: Sendable {
    public let lifetimeNanoseconds: UInt64
    private var issued: [[UInt8]: (agent: AgentID, at: UInt64)] = [:]
    /// Most tokens outstanding; the oldest go first beyond it (an agent that asks and never connects).
    public static let maxOutstanding = 4096

    public init(lifetimeSeconds: Double = 10) { lifetimeNanoseconds = UInt64(lifetimeSeconds * 1e9) }

    public var count: Int { issued.count }

    public mutating func issue(to agent: AgentID, now: UInt64, token: [UInt8] = ClusterSecret.randomBytes(MemWire.rdmaTokenSize))
        -> [UInt8]
    {
        prune(now: now)
        if issued.count >= Self.maxOutstanding, let oldest = issued.min(by: { $0.value.at < $1.value.at })?.key {
            issued[oldest] = nil
        }
        issued[token] = (agent, now)
        return token
    }

    /// The agent a token was issued to, if it is valid; it cannot be used again.
    public mutating func redeem(_ token: [UInt8], now: UInt64) -> AgentID? {
        guard let entry = issued.removeValue(forKey: token) else { return nil }
        return now - entry.at <= lifetimeNanoseconds ? entry.agent : nil
    }

    public mutating func prune(now: UInt64) { issued = issued.filter { now - $0.value.at <= lifetimeNanoseconds } }
}

/// What the TCP control plane needs from the server's RDMA side: tokens for rdma_cm
/// connections, lease keys, and notice of leases and agents going away.
public protocol RDMAControlPlane: AnyObject, Sendable {
    /// RDMA_CONNECT: the endpoint and a one-time token bound to `agent`.
    func endpoint(for agent: AgentID) throws(LeaseError) -> RDMAEndpoint
    /// LEASE_KEYS: one key per lease, each reaching only that lease, only for `agent`.
    func keys(for agent: AgentID, leases ids: [UInt64]) throws(LeaseError) -> [LeaseKey]
    /// A lease was freed: its key must reach nothing from now on (called before it is zeroed).
    func leaseReleased(_ id: UInt64)
    /// An agent's grace period ran out.
    func agentGone(_ agent: AgentID)
    func stop()
}

/// The memory server's RDMA side: an rdma_cm listener (its own thread, `fp-rdma-cm`), a
/// protection domain per agent, and a memory region per lease registered when the agent first
/// asks for the lease's key. A region's rkey reaches that lease's bytes only, and only through
/// the queue pairs of the agent that holds the lease (a queue pair reaches regions of its own
/// protection domain only). The server posts no work requests: agents READ and WRITE.
final class RDMAListener: RDMAControlPlane, @unchecked Sendable {
    let listener: OpaquePointer
    let port: Int
    /// Address agents should connect to; empty: the address they reached the server at over TCP.
    let advertisedHost: String
    let leases: LeaseTable
    let logger: Logger
    private let stopping = Atomic<Bool>(false)
    private var thread: pthread_t?

    struct Domain {
        var pd: OpaquePointer
        var device: UnsafeMutableRawPointer?
        var peers = 0
    }
    struct Region {
        let agent: AgentID
        let mr: OpaquePointer
        let key: LeaseKey
    }
    struct State: @unchecked Sendable {
        var tokens = RDMATokens()
        var domains: [AgentID: Domain] = [:]
        var peers: [OpaquePointer: AgentID] = [:]
        var regions: [UInt64: Region] = [:]
        /// The device went away: no RDMA until restart.
        var removed = false
    }
    let state = Mutex(State())

    /// Binds and listens. Throws a message that names the failing call and the fix.
    init(host: String, port: Int, leases: LeaseTable, logger: Logger) throws(VerbsError) {
        var err: Int32 = 0
        var stage: UnsafePointer<CChar>? = nil
        guard let l = fp_rdma_listen(host, Int32(port), 128, &err, &stage) else {
            throw VerbsError(stage.map { String(cString: $0) } ?? "rdma_listen", errno: -err)
        }
        listener = l
        self.port = Int(fp_rdma_listener_port(l))
        advertisedHost = ["", "0.0.0.0", "::", "[::]"].contains(host) ? "" : host
        self.leases = leases
        self.logger = logger
    }

    func start() {
        thread = startThread(name: "fp-rdma-cm") { [self] in run() }
    }

    func stop() {
        stopping.store(true, ordering: .relaxed)
        if let t = thread { pthread_join(t, nil) }
        thread = nil
        state.withLock { s in teardown(&s) }
        fp_rdma_listener_destroy(listener)
    }

    /// Releases every peer, region and domain (stop, or the device was removed).
    private func teardown(_ s: inout State) {
        for peer in s.peers.keys { fp_rdma_peer_destroy(peer) }
        s.peers.removeAll()
        for r in s.regions.values { _ = fp_rdma_mr_dereg(r.mr) }
        s.regions.removeAll()
        for d in s.domains.values { _ = fp_rdma_pd_free(d.pd) }
        s.domains.removeAll()
    }

    // MARK: Control plane (called from the TCP handler)

    func endpoint(for agent: AgentID) throws(LeaseError) -> RDMAEndpoint {
        let token = try state.withLock { s throws(LeaseError) -> [UInt8] in
            guard !s.removed else { throw LeaseError(code: .rdmaUnavailable, message: "this memory server's RDMA device was removed; use TCP") }
            return s.tokens.issue(to: agent, now: monotonicNanoseconds())
        }
        return RDMAEndpoint(port: UInt16(port), host: advertisedHost, token: token)
    }

    /// The keys of `ids`, registering each lease's memory in the agent's domain on first use.
    func keys(for agent: AgentID, leases ids: [UInt64]) throws(LeaseError) -> [LeaseKey] {
        var out: [LeaseKey] = []
        for id in ids {
            let key = try leases.withLease(owner: agent, leaseID: id) { base throws(LeaseError) -> LeaseKey in
                try state.withLock { s throws(LeaseError) -> LeaseKey in
                    if let r = s.regions[id], r.agent == agent { return r.key }
                    guard !s.removed, let domain = s.domains[agent] else {
                        throw LeaseError(code: .rdmaUnavailable, message: "connect over RDMA (RDMA_CONNECT, then rdma_cm) before asking for keys")
                    }
                    var err: Int32 = 0
                    guard let mr = fp_rdma_mr_reg(domain.pd, base, leases.leaseBytes, &err) else {
                        let e = VerbsError("ibv_reg_mr", errno: -err)
                        logger.error("cannot register a lease for RDMA", metadata: ["fp.lease": "\(id)", "fp.error": "\(e)"])
                        throw LeaseError(code: .rdmaUnavailable, message: "registering the lease for RDMA failed: \(e)")
                    }
                    let key = LeaseKey(leaseID: id, address: UInt64(UInt(bitPattern: base)), length: UInt64(leases.leaseBytes),
                                       rkey: fp_rdma_mr_rkey(mr))
                    s.regions[id] = Region(agent: agent, mr: mr, key: key)
                    return key
                }
            }
            out.append(key)
        }
        return out
    }

    /// A lease was taken back (LeaseTable's release hook, before its memory is zeroed).
    func leaseReleased(_ id: UInt64) {
        state.withLock { s in
            if let r = s.regions.removeValue(forKey: id) {
                let rc = fp_rdma_mr_dereg(r.mr)
                if rc < 0 { logger.error("ibv_dereg_mr failed", metadata: ["fp.lease": "\(id)", "fp.errno": "\(-rc)"]) }
            }
        }
    }

    /// The agent's grace period ran out (its leases are freed): drop its domain if nothing uses it.
    func agentGone(_ agent: AgentID) {
        state.withLock { s in
            guard let d = s.domains[agent], d.peers == 0, !s.regions.values.contains(where: { $0.agent == agent }) else { return }
            if fp_rdma_pd_free(d.pd) == 0 { s.domains[agent] = nil }
        }
    }

    var connectedPeers: Int { state.withLock { $0.peers.count } }

    // MARK: Connection events

    private func run() {
        var event = fp_rdma_event()
        while !stopping.load(ordering: .relaxed) {
            let rc = fp_rdma_listener_next(listener, &event, 200)
            if rc < 0 {
                logger.error("rdma_get_cm_event failed; RDMA listener stops", metadata: ["fp.errno": "\(-rc)"])
                return
            }
            if rc == 0 { continue }
            switch event.kind {
            case Int32(FP_RDMA_EV_CONNECT_REQUEST): connectRequest(&event)
            case Int32(FP_RDMA_EV_DISCONNECTED):
                guard let peer = event.peer else { continue }
                state.withLock { s in
                    if let agent = s.peers.removeValue(forKey: peer) {
                        s.domains[agent]?.peers -= 1
                        fp_rdma_peer_destroy(peer)
                    }
                }
            case Int32(FP_RDMA_EV_DEVICE_REMOVAL):
                logger.critical("the RDMA device was removed; agents fall back to TCP (restart the server to use RDMA again)")
                state.withLock { s in
                    s.removed = true
                    teardown(&s)
                }
            default:
                continue
            }
        }
    }

    private func connectRequest(_ event: inout fp_rdma_event) {
        let data = withUnsafeBytes(of: &event.private_data) { Array($0.prefix(Int(event.private_len))) }
        let request = event.request
        let device = event.device
        let depth = event.initiator_depth
        state.withLock { s in
            guard !s.removed else {
                _ = fp_rdma_reject(request, "device removed")
                return
            }
            guard let token = MemWire.rdmaToken(fromPrivateData: data), let agent = s.tokens.redeem(token, now: monotonicNanoseconds())
            else {
                logger.warning("refused an RDMA connection without a valid token (ask RDMA_CONNECT over the authenticated TCP connection first)")
                _ = fp_rdma_reject(request, "bad token")
                return
            }
            if s.domains[agent] == nil {
                var err: Int32 = 0
                guard let pd = fp_rdma_pd_alloc(device, &err) else {
                    logger.error("ibv_alloc_pd failed", metadata: ["fp.agent": "\(agent)", "fp.errno": "\(-err)"])
                    _ = fp_rdma_reject(request, "no PD")
                    return
                }
                s.domains[agent] = Domain(pd: pd, device: device)
            }
            guard let domain = s.domains[agent], domain.device == device else {
                logger.warning("refused an RDMA connection on another device than the agent's first", metadata: ["fp.agent": "\(agent)"])
                _ = fp_rdma_reject(request, "other device")
                return
            }
            var err: Int32 = 0
            guard let peer = fp_rdma_accept(request, domain.pd, max(1, depth), &err) else {
                logger.error("rdma_accept failed", metadata: ["fp.agent": "\(agent)", "fp.errno": "\(-err)"])
                return
            }
            s.peers[peer] = agent
            s.domains[agent]?.peers += 1
            logger.debug("agent connected over RDMA", metadata: ["fp.agent": "\(agent)"])
        }
    }
}
