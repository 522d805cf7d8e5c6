import CFarpageChecksum
import FarpageKernel
import FarpageRDMA
import FarpageTransport
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// How the agent moves pages to and from memory servers (`[pool] transport`).
public enum TransportPolicy: String, Sendable, CaseIterable {
    /// RDMA with servers that offer it when this host has a device; TCP otherwise.
    case auto
    /// TCP only.
    case tcp
    /// RDMA required: no device here, or a server without RDMA, is an error.
    case rdma
}

/// The data-plane choice for memory servers attached from now on, set once from the
/// configuration (`PoolStore.dataPlane`).
public final class DataPlaneSelector: Sendable {
    struct Settings: Sendable {
        var policy: TransportPolicy
        var verbs: any VerbsProvider
        var logger: Logger
        var sendDepth: Int
        var signalInterval: Int
        var spinMicroseconds: Int
    }
    let settings: Mutex<Settings>

    public init(policy: TransportPolicy = .auto, verbs: any VerbsProvider = SystemVerbs(),
                logger: Logger = Logger(label: "farpage.rdma"))
    {
        settings = Mutex(Settings(policy: policy, verbs: verbs, logger: logger, sendDepth: 128, signalInterval: 16,
                                  spinMicroseconds: 20))
    }

    /// - Parameters:
    ///   - sendDepth: send-queue slots per queue pair (work requests in flight).
    ///   - spinMicroseconds: how long a thread busy-polls its completion queue before it sleeps.
    public func configure(policy: TransportPolicy, verbs: any VerbsProvider = SystemVerbs(), logger: Logger,
                          sendDepth: Int = 128, signalInterval: Int = 16, spinMicroseconds: Int = 20)
    {
        settings.withLock {
            $0 = Settings(policy: policy, verbs: verbs, logger: logger, sendDepth: sendDepth, signalInterval: signalInterval,
                          spinMicroseconds: spinMicroseconds)
        }
    }

    public var policy: TransportPolicy { settings.withLock { $0.policy } }
}

/// Per-page XXH3-64 checksums kept in agent memory for leases reached over RDMA (one-sided
/// writes bypass the server's check, and one-sided reads return no stored checksum). 8 bytes
/// per page, allocated with the lease and dropped with it; 0 means never written.
final class LeaseChecksums: @unchecked Sendable {
    struct Table: @unchecked Sendable { let entries: UnsafeMutablePointer<UInt64> }
    private let tables = Mutex<[UInt64: Table]>([:])
    let pagesPerLease: Int

    init(pagesPerLease: Int) { self.pagesPerLease = pagesPerLease }

    deinit { tables.withLock { t in t.values.forEach { $0.entries.deallocate() } } }

    func add(_ id: UInt64) {
        let entries = UnsafeMutablePointer<UInt64>.allocate(capacity: pagesPerLease)
        entries.initialize(repeating: 0, count: pagesPerLease)
        let table = Table(entries: entries)
        if let old = tables.withLock({ t -> Table? in
            let previous = t[id]
            t[id] = table
            return previous
        }) { old.entries.deallocate() }
    }

    func remove(_ id: UInt64) { tables.withLock { $0.removeValue(forKey: id) }?.entries.deallocate() }

    /// The table of lease `id`; the caller touches only the pages it owns (no two threads ever
    /// read or write one page at once), so entries need no lock.
    func table(_ id: UInt64) -> UnsafeMutablePointer<UInt64>? { tables.withLock { $0[id]?.entries } }
}

/// One memory server's RDMA data path: a pool of connected queue pairs (one per calling
/// thread, like the TCP connections), the leases' keys, the agent-side checksums and the
/// connection state machine.
final class RDMAPath: @unchecked Sendable {
    let server: String
    let host: String
    let verbs: any VerbsProvider
    let logger: Logger
    let sendDepth: Int
    let signalInterval: Int
    let spinMicroseconds: Int
    let ioTimeoutMilliseconds: Int32
    let leaseBytes: UInt64
    /// Two maximal page batches: a fetch-ahead of several runs goes out in one round.
    static let stagingBytes = 2 * MemWire.maxPagesPerIO * MemWire.pageSize
    let link: Mutex<RDMALink>
    let idle = Mutex<[RDMAChannel]>([])
    let keys = Mutex<[UInt64: LeaseKey]>([:])
    let checksums: LeaseChecksums
    /// Why the data path is on TCP now (empty while RDMA is up): logged when it changes.
    let lastReason = Mutex<String>("")

    init(server: String, host: String, settings: DataPlaneSelector.Settings, ioTimeoutMilliseconds: Int32, leaseBytes: UInt64) {
        self.server = server
        self.host = host
        verbs = settings.verbs
        logger = settings.logger
        sendDepth = settings.sendDepth
        signalInterval = settings.signalInterval
        spinMicroseconds = settings.spinMicroseconds
        self.ioTimeoutMilliseconds = ioTimeoutMilliseconds
        self.leaseBytes = leaseBytes
        link = Mutex(RDMALink(enabled: true))
        checksums = LeaseChecksums(pagesPerLease: Int(leaseBytes) / MemWire.pageSize)
    }

    var isUp: Bool { link.withLock { $0.isUp } }

    func closeAll() { idle.withLock { c in c.forEach { $0.close() }; c.removeAll() } }

    /// Logs a switch to TCP once per distinct reason.
    func noteFallback(_ reason: String) {
        let changed = lastReason.withLock { r -> Bool in
            defer { r = reason }
            return r != reason
        }
        if changed {
            logger.warning("RDMA data path unavailable; moving pages over TCP meanwhile",
                           metadata: ["fp.server": "\(server)", "fp.reason": "\(reason)"])
        }
    }
}

extension RemoteBackend {
    /// Decides at attach whether this server's pages move over RDMA: the policy allows it, this
    /// host has a device, and the server offers an RDMA listener. Then connects the first queue
    /// pair, so that a problem shows at attach. Returns nil for TCP (the reason logged).
    static func setUpRDMA(_ backend: RemoteBackend, selector: DataPlaneSelector?) throws(TransportError) -> RDMAPath? {
        guard let selector else { return nil }
        let settings = selector.settings.withLock { $0 }
        if settings.policy == .tcp { return nil }
        let name = backend.name
        let local = settings.verbs.probe()
        if let reason = local.reason {
            if settings.policy == .rdma {
                throw TransportError(.refused(code: MemErrorCode.rdmaUnavailable.rawValue),
                                     "\(name): transport = \"rdma\" but \(reason)")
            }
            settings.logger.info("memory server reached over TCP", metadata: ["fp.server": "\(name)", "fp.reason": "\(reason)"])
            return nil
        }
        let endpoint: RDMAEndpoint
        do throws(TransportError) { endpoint = try backend.requestEndpoint() } catch {
            if error.kind == .restarted { throw error }
            let reason = error.kind == .refused(code: MemErrorCode.rdmaUnavailable.rawValue)
                ? "the memory server offers no RDMA (\(error.message))" : "the memory server did not answer RDMA_CONNECT (\(error.message))"
            if settings.policy == .rdma {
                throw TransportError(.refused(code: MemErrorCode.rdmaUnavailable.rawValue), "\(name): transport = \"rdma\" but \(reason)")
            }
            settings.logger.info("memory server reached over TCP", metadata: ["fp.server": "\(name)", "fp.reason": "\(reason)"])
            return nil
        }
        let path = RDMAPath(server: name, host: backend.host, settings: settings, ioTimeoutMilliseconds: backend.ioTimeoutMilliseconds,
                            leaseBytes: backend.leaseBytes)
        do throws(TransportError) {
            let channel = try backend.connectChannel(path, endpoint: endpoint)
            path.idle.withLock { $0.append(channel) }
        } catch {
            if settings.policy == .rdma { throw error }
            path.noteFallback(error.message)
        }
        return path
    }

    /// RDMA_CONNECT over TCP: the server's rdma_cm endpoint and a one-time token.
    func requestEndpoint() throws(TransportError) -> RDMAEndpoint {
        try withConnection { c throws(TransportError) in
            guard case .rdmaEndpoint(let e) = try c.call(.rdmaConnect) else {
                throw TransportError(.protocolViolation, "bad RDMA_ENDPOINT")
            }
            guard e.token.count == MemWire.rdmaTokenSize else { throw TransportError(.protocolViolation, "bad RDMA_ENDPOINT token") }
            return e
        }
    }

    /// Opens one more queue pair (a token over TCP, then rdma_cm). Updates the link state.
    func connectChannel(_ path: RDMAPath, endpoint given: RDMAEndpoint? = nil) throws(TransportError) -> RDMAChannel {
        let endpoint: RDMAEndpoint
        if let given {
            endpoint = given
        } else {
            do throws(TransportError) { endpoint = try requestEndpoint() } catch {
                if error.kind == .restarted {
                    path.link.withLock { $0.serverRestarted(reason: error.message) }
                } else {
                    path.link.withLock { $0.connectFailed(reason: error.message, now: monotonicNanoseconds()) }
                }
                throw error
            }
        }
        let target = endpoint.host.isEmpty ? path.host : endpoint.host
        do throws(VerbsError) {
            let qp = try path.verbs.connect(host: target, port: Int(endpoint.port),
                                            privateData: MemWire.rdmaPrivateData(token: endpoint.token),
                                            stagingBytes: RDMAPath.stagingBytes, sendDepth: path.sendDepth,
                                            timeoutMilliseconds: path.ioTimeoutMilliseconds)
            let first = path.link.withLock { l -> Bool in
                defer { l.connected() }
                return !l.isUp
            }
            if first {
                path.lastReason.withLock { $0 = "" }
                path.logger.notice("RDMA data path up", metadata: ["fp.server": "\(path.server)", "fp.device": "\(qp.device)",
                                                                    "fp.rdma_endpoint": "\(target):\(endpoint.port)"])
            }
            return RDMAChannel(queuePair: qp, signalInterval: path.signalInterval, spinMicroseconds: path.spinMicroseconds,
                               timeoutMilliseconds: path.ioTimeoutMilliseconds)
        } catch {
            path.link.withLock { $0.connectFailed(reason: "\(error)", now: monotonicNanoseconds()) }
            throw TransportError(.unreachable, "RDMA connection to \(target):\(endpoint.port) failed: \(error)")
        }
    }

    /// The RDMA window of a lease: cached, else asked for over TCP (LEASE_KEYS) and checked.
    func key(_ path: RDMAPath, lease id: UInt64) throws(TransportError) -> LeaseKey {
        if let k = path.keys.withLock({ $0[id] }) { return k }
        let got = try withConnection { c throws(TransportError) -> [LeaseKey] in
            guard case .keys(let k) = try c.call(.leaseKeys([id])) else { throw TransportError(.protocolViolation, "bad KEYS") }
            return k
        }
        guard got.count == 1, got[0].leaseID == id, got[0].length == leaseBytes else {
            throw TransportError(.protocolViolation, "\(name) answered LEASE_KEYS for lease \(id) with \(got)")
        }
        path.keys.withLock { $0[id] = got[0] }
        return got[0]
    }

    /// Runs `body` on an RDMA channel of `path` with lease `id`'s key. Returns false when the
    /// request must go over TCP instead (RDMA down, backing off, or this access failed: the
    /// reason is logged and the state machine updated). Throws only what TCP could not fix
    /// either: the lease is gone, the server restarted, or the range is outside the lease.
    func withRDMA(_ path: RDMAPath, lease id: UInt64, offset: UInt64, bytes: Int,
                  _ body: (RDMAChannel, LeaseKey) throws(ChannelFailure) -> Void) throws(TransportError) -> Bool
    {
        switch path.link.withLock({ $0.route(now: monotonicNanoseconds()) }) {
        case .useTCP(let reason):
            path.noteFallback(reason)
            return false
        case .fail(let reason):
            throw TransportError(.restarted, reason)
        case .useRDMA:
            break
        }
        // Key scoping, locally: an access outside the lease never reaches the wire.
        guard offset % UInt64(MemWire.pageSize) == 0, offset <= leaseBytes, UInt64(bytes) <= leaseBytes - offset else {
            throw TransportError(.refused(code: MemErrorCode.outOfBounds.rawValue),
                                 "\(name): offset \(offset) + \(bytes) bytes is outside the \(leaseBytes)-byte lease \(id) (refused locally)")
        }
        let channel: RDMAChannel
        if let pooled = path.idle.withLock({ $0.popLast() }) {
            channel = pooled
        } else {
            do throws(TransportError) { channel = try connectChannel(path) } catch {
                if error.kind == .restarted { throw error }
                path.noteFallback(error.message)
                return false
            }
        }
        let key: LeaseKey
        do throws(TransportError) { key = try self.key(path, lease: id) } catch {
            path.idle.withLock { $0.append(channel) }
            if error.kind == .refused(code: MemErrorCode.rdmaUnavailable.rawValue) {
                path.noteFallback(error.message)
                return false
            }
            throw error  // no_such_lease: the lease is gone; unreachable: TCP is down too
        }
        let proven = channel.counters.batches > 0
        do throws(ChannelFailure) {
            try body(channel, key)
            if !proven { path.link.withLock { $0.transferred() } }  // once per queue pair
            path.idle.withLock { if $0.count < 64 { $0.append(channel) } }
            return true
        } catch {
            let qpState = channel.queuePair.state()
            channel.close()
            if error.isRemoteAccess {
                // The key no longer reaches the lease (freed, or re-registered): forget it; TCP
                // serves this request and says whether the lease still exists. Not retried on RDMA.
                path.keys.withLock { $0[id] = nil }
                path.logger.warning("RDMA remote access error; the lease's key is dropped and the request goes over TCP",
                                    metadata: ["fp.server": "\(name)", "fp.lease": "\(id)", "fp.error": "\(error)"])
            } else {
                // The connection is dead (retries exceeded, flushed, disconnected, device removed):
                // every pooled queue pair shares its fate; the next request reconnects.
                path.closeAll()
                // One that never completed a batch is a failed reconnect (backoff), so a path
                // that connects but carries nothing does not cost a reconnect per request.
                path.link.withLock { $0.channelFailed(proven: proven, reason: "\(error)", now: monotonicNanoseconds()) }
                path.logger.error("RDMA connection failed; reconnecting (this request goes over TCP)",
                                  metadata: ["fp.server": "\(name)", "fp.error": "\(error)",
                                             "fp.qp_state": "\(qpState.map { "\($0)" } ?? "unknown")"])
            }
            return false
        }
    }

    /// Verifies pages against the agent-side checksums (RDMA mode).
    func verifyLocal(_ path: RDMAPath, lease id: UInt64, offset: UInt64, pages: Int, at data: UnsafeRawPointer,
                     allowUnwritten: Bool) -> TransportError?
    {
        guard let table = path.checksums.table(id) else {
            return TransportError(.corrupt, "\(name): no checksums for lease \(id)")
        }
        return verify(lease: id, offset: offset, pages: pages, at: data, against: table + Int(offset) / MemWire.pageSize,
                      allowUnwritten: allowUnwritten)
    }

    func rdmaRead(_ path: RDMAPath, lease id: UInt64, offset: UInt64, pages: Int, into: UnsafeMutableRawPointer,
                  allowUnwritten: Bool) throws(TransportError)
    {
        let bytes = pages * MemWire.pageSize
        let viaRDMA = try withRDMA(path, lease: id, offset: offset, bytes: bytes) { channel, key throws(ChannelFailure) in
            try channel.run([RemoteAccess(opcode: .read, localOffset: 0, length: bytes, remoteAddress: key.address + offset, rkey: key.rkey)])
            memcpy(into, channel.staging, bytes)
        }
        if !viaRDMA {
            _ = try withConnection { c throws(TransportError) in try c.readPages(leaseID: id, offset: offset, pages: pages, into: into) }
        }
        if let error = verifyLocal(path, lease: id, offset: offset, pages: pages, at: into, allowUnwritten: allowUnwritten) { throw error }
    }

    func rdmaWrite(_ path: RDMAPath, lease id: UInt64, offset: UInt64, pages: Int, from: UnsafeRawPointer) throws(TransportError) {
        var sums = [UInt64](repeating: 0, count: pages)
        fp_checksum_pages(from, MemWire.pageSize, pages, &sums)
        let bytes = pages * MemWire.pageSize
        let viaRDMA = try withRDMA(path, lease: id, offset: offset, bytes: bytes) { channel, key throws(ChannelFailure) in
            memcpy(channel.staging, from, bytes)
            try channel.run([RemoteAccess(opcode: .write, localOffset: 0, length: bytes, remoteAddress: key.address + offset, rkey: key.rkey)])
        }
        if !viaRDMA {
            try withConnection { c throws(TransportError) in try c.writePages(leaseID: id, offset: offset, checksums: sums, from: from) }
        }
        guard let table = path.checksums.table(id) else { throw TransportError(.corrupt, "\(name): no checksums for lease \(id)") }
        let first = Int(offset) / MemWire.pageSize
        for i in 0..<pages { table[first + i] = sums[i] }
    }

    /// Several runs of one lease: RDMA READs in flight together (as many rounds as the staging
    /// buffer needs), each run reported as soon as its signalled completion (or a later one)
    /// retires it. Runs the RDMA path could not do go over TCP.
    func rdmaReadRuns(_ path: RDMAPath, lease id: UInt64, runs: [LeaseReadRun], each: (Int, TransportError?) -> Void)
        throws(TransportError)
    {
        var start = 0
        while start < runs.count {
            var end = start
            var bytes = 0
            while end < runs.count, bytes + runs[end].pages * MemWire.pageSize <= RDMAPath.stagingBytes {
                bytes += runs[end].pages * MemWire.pageSize
                end += 1
            }
            if end == start { end = start + 1 }  // cannot happen: a run is at most half the staging
            let round = Array(runs[start..<end])
            var reported = 0
            let lowest = round.map(\.offset).min() ?? 0
            let highest = round.map { $0.offset + UInt64($0.pages * MemWire.pageSize) }.max() ?? 0
            let viaRDMA = try withRDMA(path, lease: id, offset: lowest, bytes: Int(highest - lowest)) { channel, key throws(ChannelFailure) in
                var accesses: [RemoteAccess] = []
                var at = 0
                var offsets: [Int] = []
                for run in round {
                    offsets.append(at)
                    accesses.append(RemoteAccess(opcode: .read, localOffset: at, length: run.pages * MemWire.pageSize,
                                                 remoteAddress: key.address + run.offset, rkey: key.rkey))
                    at += run.pages * MemWire.pageSize
                }
                try channel.run(accesses) { j in
                    let run = round[j]
                    memcpy(run.into, channel.staging + offsets[j], run.pages * MemWire.pageSize)
                    each(start + j, verifyLocal(path, lease: id, offset: run.offset, pages: run.pages, at: run.into, allowUnwritten: false))
                    reported = j + 1
                }
            }
            if !viaRDMA {
                // What RDMA did not deliver goes over TCP (pipelined, verified against our checksums).
                let rest = Array(round[reported...])
                try withConnection { c throws(TransportError) in
                    try c.readPipelined(leaseID: id, runs: rest) { j, _, error in
                        let run = rest[j]
                        each(start + reported + j, error ?? verifyLocal(path, lease: id, offset: run.offset, pages: run.pages,
                                                                         at: run.into, allowUnwritten: false))
                    }
                }
            }
            start = end
        }
    }
}
