import FarpageKernel
import FarpagePaging
import FarpagePool
import FarpageRDMA
import FarpageProtocol
import FarpageTiers
import FarpageTransport
import Foundation
import Logging
import Synchronization

/// The agent could not start; the message says what to change.
public struct AgentStartError: Error, CustomStringConvertible {
    public let description: String
    /// The configuration is at fault (exit 78, EX_CONFIG) rather than the host (exit 69).
    public let isConfiguration: Bool
    public init(_ description: String, isConfiguration: Bool = false) {
        self.description = description
        self.isConfiguration = isConfiguration
    }
}

/// The paging agent: owns the far tier, the regions, the fault and eviction threads and the control socket.
public final class Agent: @unchecked Sendable {
    public static let version = "0.1.0"
    public let config: AgentConfig
    public let probe: UffdProbe
    /// How clients learn of a lost page on this kernel (UFFDIO_POISON, or SIGBUS on 6.1).
    public let lostPageSignal: LostPageSignal
    let logger: Logger
    let store: PoolStore
    /// Configured servers not reached yet: retried on every heartbeat.
    let pendingServers = Mutex<[String]>([])
    private var heartbeatThread: pthread_t?
    let budget: ResidentBudget
    let policy: PagingPolicy
    let evictor: Evictor
    let streams: StreamFetcher
    let faults: FaultService
    let zeroPage: UnsafeMutableRawPointer
    let registry = RegionRegistry()
    let nextRegionID = Atomic<UInt64>(1)
    let shuttingDown = Atomic<Bool>(false)
    let startedAt = monotonicNanoseconds()
    /// Counters of regions already released, so totals cover the agent's whole life.
    let retired = Mutex(StatsSnapshot())
    private var control: ControlServer?

    /// Probes the kernel and builds the agent; nothing runs until `start()`.
    public init(config: AgentConfig, logger: Logger) throws(AgentStartError) {
        self.config = config
        self.logger = logger
        let probe: UffdProbe
        do { probe = try UffdProbe.run() } catch { throw AgentStartError(error.description) }
        guard probe.missingRequired.isEmpty else {
            throw AgentStartError(
                "this kernel's userfaultfd lacks \(probe.missingRequired.names.joined(separator: ", ")) "
                    + "(missing faults and write protection on shmem); Linux 5.19 or newer is required")
        }
        if probe.access == .userModeOnly {
            logger.warning(
                "userfaultfd is available to this agent only with UFFD_USER_MODE_ONLY; clients that are not privileged will do the same, so kernel accesses (read(2) into an evicted page) fail with EFAULT. Grant /dev/userfaultfd to fix (docs/operations.md)")
        }
        self.probe = probe
        lostPageSignal = LostPageSignal(kernel: probe.features)
        if lostPageSignal != .poison {
            logger.notice(
                "this kernel has no UFFDIO_POISON (UFFD_FEATURE_POISON, Linux 6.6): a client touching a lost page is sent SIGBUS (tgkill to the faulting thread) and its fault is never resolved, instead of a poisoned page-table entry",
                metadata: ["fp.lost_page_signal": "\(lostPageSignal.rawValue)", "fp.uffd_features": "0x\(String(probe.features.rawValue, radix: 16))"])
        }
        let page = UInt64(systemPageSize)
        var secret: ClusterSecret? = nil
        if let path = config.poolSecretFile {
            do { secret = try ClusterSecret.load(path: path) } catch {
                throw AgentStartError("pool.secret_file: \(error)", isConfiguration: true)
            }
        }
        store = PoolStore(spill: try Self.localSpill(config, logger: logger), leaseBytes: config.storeLeaseBytes,
                          agentID: ClusterSecret.randomBytes(16),
                          agentName: "farpaged-\(getpid())", secret: secret,
                          ioTimeoutMilliseconds: Int32(config.poolIOTimeoutSeconds * 1000), movement: config.tierMovement,
                          logger: logger)
        let transport = TransportPolicy(rawValue: config.poolTransport) ?? .auto
        if transport != .tcp {
            let rdma = SystemVerbs.probeDevices()
            if transport == .rdma, let reason = rdma.reason {
                throw AgentStartError("pool.transport is \"rdma\" but \(reason)", isConfiguration: true)
            }
            logger.info(rdma.reason == nil ? "RDMA devices found; memory servers that offer RDMA are reached over it"
                                           : "memory servers are reached over TCP",
                        metadata: ["fp.transport": "\(transport.rawValue)", "fp.rdma": "\(rdma.reason ?? "\(rdma)")"])
        }
        store.dataPlane.configure(policy: transport, logger: logger)
        budget = ResidentBudget(budgetPages: Int(config.residentBudget / page), highWatermark: config.highWatermark,
                                lowWatermark: config.lowWatermark)
        var p = PagingPolicy()
        p.highWatermark = config.highWatermark
        p.lowWatermark = config.lowWatermark
        p.evictBatch = config.evictBatch
        p.prefetch = config.prefetch
        p.sequentialWindow = config.prefetchWindow
        p.maxPrefetchWindow = config.maxPrefetchWindow
        p.minResidenceMilliseconds = Int(config.minResidenceSeconds * 1000)
        p.classify = config.classify
        p.activeFraction = config.activeFraction
        p.migrationWindowMilliseconds = max(1, Int(config.migrationWindowSeconds * 1000))
        p.outageWaitMilliseconds = Int(config.poolOutageWaitSeconds * 1000)
        policy = p
        do {
            zeroPage = try AnonymousMemory.map(bytes: page)
        } catch { throw AgentStartError("cannot reserve memory: \(error)") }
        let registry = self.registry
        evictor = Evictor(budget: budget, batch: config.evictBatch, logger: logger) { registry.all() }
        streams = StreamFetcher(batchPages: max(p.maxPrefetchWindow, 16) + 1, evictBatch: config.evictBatch, logger: logger)
        do {
            faults = try FaultService(threads: config.effectiveFaultThreads, evictor: evictor,
                                      stagingPages: max(p.maxPrefetchWindow, 1), evictBatch: config.evictBatch,
                                      spinMicroseconds: config.faultSpinMicroseconds, logger: logger)
        } catch { throw AgentStartError("cannot create fault threads: \(error)") }
    }

    /// The local spill `[store]` asks for: the agent's memory, or a spill file (opened, locked
    /// and preallocated now, so that a missing directory or a full disk stops the start).
    static func localSpill(_ config: AgentConfig, logger: Logger) throws(AgentStartError) -> LocalSpill {
        guard config.storeKind == "file" else { return .memory(capacityBytes: config.storeCapacity) }
        guard let path = config.storePath else {
            throw AgentStartError("[store] path is required when kind = \"file\"", isConfiguration: true)
        }
        do {
            return .file(try SpillFileBackend(path: path, capacityBytes: config.storeCapacity, leaseBytes: config.storeLeaseBytes,
                                              directIO: config.storeDirectIO,
                                              pollNanoseconds: UInt64(config.storePollMicroseconds) * 1000, logger: logger))
        } catch {
            // io_uring refused is the host's doing (exit 69); the rest needs [store] or the disk changed (78).
            throw AgentStartError("[store] \(error)", isConfiguration: error.code != .ioUringUnavailable)
        }
    }

    /// Starts the threads and the control socket, then tells systemd it is ready.
    public func start() throws(AgentStartError) {
        let directory = (config.socket as NSString).deletingLastPathComponent
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        } catch {
            throw AgentStartError("cannot create the socket directory \(directory): \(error.localizedDescription); set agent.socket to a writable place")
        }
        let socket: SeqPacketSocket
        do { socket = try SeqPacketSocket.listen(path: config.socket, mode: config.socketMode) } catch {
            if error.errno == EADDRINUSE {
                throw AgentStartError("another agent is already serving \(config.socket); stop it first (systemctl stop farpaged-agent) or choose another agent.socket")
            }
            throw AgentStartError("cannot listen on \(config.socket): \(error); is the directory writable?")
        }
        for address in config.poolServers {
            do { try store.attach(address: address) } catch {
                logger.warning("memory server not reachable yet; retrying in the background",
                               metadata: ["fp.server": "\(address)", "fp.error": "\(error)"])
                pendingServers.withLock { $0.append(address) }
            }
        }
        heartbeatThread = startThread(name: "fp-heartbeat") { [self] in heartbeatLoop() }
        do {
            try evictor.start()
            try streams.start()
            try faults.start()
            let server = try ControlServer(agent: self, socket: socket, logger: logger)
            server.start()
            control = server
        } catch { throw AgentStartError("cannot start: \(error)") }
        logger.info(
            "farpaged agent ready",
            metadata: [
                "fp.socket": "\(config.socket)", "fp.uffd_access": "\(probe.access.rawValue)",
                "fp.budget_pages": "\(budget.budgetPages)", "fp.fault_threads": "\(config.effectiveFaultThreads)",
                "fp.store": "\(store.name)", "fp.spill": "\(store.report().first.map { "\($0.address) via \($0.transport), \($0.capacityBytes) bytes" } ?? "none")",
            ])
        systemdNotify("READY=1\nSTATUS=serving on \(config.socket)")
    }

    /// Refuses new registrations from now on (existing regions keep being served).
    public func beginShutdown() {
        shuttingDown.store(true, ordering: .releasing)
        systemdNotify("STOPPING=1")
        logger.info("shutting down: no new regions; serving \(regionCount) existing ones for up to \(config.shutdownGraceSeconds)s")
    }

    /// Stops everything and removes the socket.
    public func stop() {
        control?.stop()
        control = nil
        let left = registry.regions.withLock { r in
            defer { r.removeAll() }
            return Array(r.values)
        }
        if !left.isEmpty {
            logger.warning(
                "stopping with regions still registered; their clients' faults block until an agent serves them again",
                metadata: ["fp.regions": "\(left.map(\.id))"])
        }
        for region in left { region.close() }
        streams.stop()
        faults.stop()
        evictor.stop()
        stopHeartbeat.store(true, ordering: .relaxed)
        if let heartbeatThread { pthread_join(heartbeatThread, nil) }
        unlink(config.socket)
        logger.info("farpaged agent stopped")
    }

    public var regionCount: Int { registry.regions.withLock { $0.count } }

    let stopHeartbeat = Atomic<Bool>(false)

    /// Pings memory servers and retries configured ones that were not reachable.
    private func heartbeatLoop() {
        var last = monotonicNanoseconds()
        // One page to read into for faults that waited for a memory server (`outage_wait`).
        let staging = try? StagingBuffer(pages: 1)
        if staging == nil { logger.error("no staging page for faults waiting on a memory server; they will wait out outage_wait") }
        while !stopHeartbeat.load(ordering: .relaxed) {
            usleep(50_000)
            if let staging { for region in allRegions() { region.retryWaitingFaults(staging: staging) } }
            let now = monotonicNanoseconds()
            guard Double(now - last) / 1e9 >= config.poolHeartbeatSeconds else { continue }
            last = now
            store.heartbeat()
            purgeLingering()
            let pending = pendingServers.withLock { $0 }
            for address in pending {
                if (try? store.attach(address: address)) != nil {
                    pendingServers.withLock { $0.removeAll { $0 == address } }
                }
            }
        }
    }

    // MARK: Region lifecycle (called on the control thread)

    func addRegion(spec: RegionSpec, uffd: Userfaultfd, memfd: OwnedDescriptor) throws(KernelError) -> Region {
        let id = nextRegionID.wrappingAdd(1, ordering: .relaxed).oldValue
        let region = Region(id: id, spec: spec, uffd: uffd, memfd: memfd, store: store, agentBudget: budget,
                            policy: policy, zeroPage: zeroPage, logger: logger)
        try faults.add(region)
        registry.regions.withLock { $0[id] = region }
        logger.info(
            "region registered",
            metadata: [
                "fp.region": "\(id)", "fp.pid": "\(spec.owner.pid)", "fp.uid": "\(spec.owner.uid)",
                "fp.bytes": "\(spec.length)", "fp.budget_pages": "\(region.budgetPages)", "fp.name": "\(spec.name)",
            ])
        return region
    }

    /// Regions released by a client that forked moments before: kept (closed) a few seconds
    /// so that the child's views can still attach; by id, with the deadline (monotonic ns).
    let lingering = Mutex<[UInt64: (region: Region, until: UInt64)]>([:])

    func lingeringRegion(_ id: UInt64) -> Region? { lingering.withLock { $0[id]?.region } }

    /// Drops lingering regions whose time is up (their pages and slots go once no view holds them).
    func purgeLingering() {
        let now = monotonicNanoseconds()
        lingering.withLock { l in l = l.filter { $0.value.until > now } }
    }

    func removeRegion(id: UInt64, reason: String, linger: Bool = false) {
        guard let region = registry.regions.withLock({ $0.removeValue(forKey: id) }) else { return }
        // Synchronous: once the client hears back, nothing of ours touches its range again.
        region.closeAndDrain()
        faults.remove(regionID: id)
        if linger {
            let until = monotonicNanoseconds() + ControlServer.forkLingerNanoseconds
            lingering.withLock { $0[id] = (region, until) }
        }
        var s = region.snapshot()
        s.lastWindowPeakMigrations = 0  // a gauge of live regions
        retired.withLock { $0 = $0 + s }
        logger.info(
            "region released",
            metadata: [
                "fp.region": "\(id)", "fp.reason": "\(reason)", "fp.faults": "\(s.missingFaults)",
                "fp.evictions": "\(s.evictions)",
            ])
    }

    func region(_ id: UInt64) -> Region? { registry.regions.withLock { $0[id] } }

    // MARK: Forked children's views

    /// Views by id; each holds its parent's Region, whose far copies live while it does.
    let views = Mutex<[UInt64: RegionView]>([:])

    func addView(of region: Region, uffd: Userfaultfd, owner: PeerCredentials) throws(KernelError) -> RegionView {
        let id = nextRegionID.wrappingAdd(1, ordering: .relaxed).oldValue
        let view = RegionView(id: id, source: region, uffd: uffd, owner: owner, zeroPage: zeroPage, logger: logger)
        try faults.add(view)
        views.withLock { $0[id] = view }
        logger.info("forked child's view registered",
                    metadata: ["fp.view": "\(id)", "fp.region": "\(region.id)", "fp.pid": "\(owner.pid)"])
        return view
    }

    func removeView(id: UInt64, reason: String) {
        guard let view = views.withLock({ $0.removeValue(forKey: id) }) else { return }
        view.closeAndDrain()
        faults.remove(regionID: id)
        logger.info("forked child's view released",
                    metadata: ["fp.view": "\(id)", "fp.region": "\(view.source.id)", "fp.reason": "\(reason)",
                               "fp.faults": "\(view.faultCount)"])
    }

    var viewCount: Int { views.withLock { $0.count } }
    func allRegions() -> [Region] { registry.regions.withLock { Array($0.values) }.sorted { $0.id < $1.id } }

    // MARK: Reports

    func totals() -> StatsSnapshot { allRegions().reduce(StatsSnapshot()) { $0 + $1.snapshot() } }

    static func counterDictionary(_ s: StatsSnapshot) -> [String: UInt64] {
        [
            "missing_faults": s.missingFaults, "zero_fills": s.zeroFills, "fetches": s.fetches,
            "wp_faults": s.writeProtectFaults, "evictions": s.evictions, "writebacks": s.writebacks,
            "clean_evictions": s.cleanEvictions, "zero_evictions": s.zeroEvictions,
            "cancelled_evictions": s.cancelledEvictions, "prefetched_pages": s.prefetchedPages,
            "lost_pages": s.lostPages, "foreign_pages": s.foreignPages,
            "prefetch_hits": s.prefetchHits, "prefetch_wasted": s.prefetchWasted,
            "refault_activations": s.refaultActivations, "migrations": s.migrations,
            "residence_overrides": s.residenceOverrides, "outage_waits": s.outageWaits, "peak_page_migrations_per_window": s.peakPageMigrationsPerWindow,
            "last_window_peak_page_migrations": s.lastWindowPeakMigrations,
        ]
    }

    func status(clients: Int) -> AgentStatus {
        let regions = allRegions()
        let totals = regions.reduce(retired.withLock { $0 }) { $0 + $1.snapshot() }
        return AgentStatus(
            version: Self.version, pid: getpid(),
            uptimeSeconds: Double(monotonicNanoseconds() - startedAt) / 1e9, socket: config.socket,
            uffdAccess: probe.access.rawValue, uffdFeatures: probe.features.names, lostPageSignal: lostPageSignal.rawValue,
            pageSize: systemPageSize,
            faultThreads: config.effectiveFaultThreads, budgetPages: budget.budgetPages,
            residentPages: budget.residentPages, highWatermarkPages: budget.highPages,
            lowWatermarkPages: budget.lowPages,
            store: StoreStatus(kind: store.name, capacityPages: store.capacityPages, usedPages: store.usedPages),
            regions: regions.count, clients: clients,
            bookkeepingBytes: regions.reduce(0) { $0 + $1.bookkeepingBytes },
            totals: Self.counterDictionary(totals).merging(movementCounters()) { a, _ in a },
            shuttingDown: shuttingDown.load(ordering: .relaxed), pool: poolReport())
    }

    /// Pages moved between the pool and the spill file (docs/tiering.md).
    func movementCounters() -> [String: UInt64] {
        let m = store.movementCounters
        return ["demoted_leases": m.demotedLeases, "demoted_pages": m.demotedPages,
                "demotion_failures": m.demotionFailures, "promoted_pages": m.promotedPages]
    }

    func poolReport() -> [PoolServer] {
        store.report().map {
            PoolServer(address: $0.address, status: $0.status.rawValue, transport: $0.transport, capacityBytes: $0.capacityBytes,
                       leaseBytes: $0.leaseBytes, leases: $0.leases, storedPages: $0.storedPages, errors: $0.errors,
                       lastError: $0.lastError, reclaimingLeases: $0.reclaimingLeases, spillFile: $0.spillFile)
        }
    }

    func regionReports() -> [RegionReport] {
        allRegions().map { r in
            let s = r.snapshot()
            return RegionReport(
                id: r.id, name: r.spec.name, pid: r.spec.owner.pid, uid: r.spec.owner.uid, address: r.spec.address,
                sizeBytes: r.spec.length, budgetPages: r.budgetPages, residentPages: s.residentPages,
                farPages: s.farPages, counters: Self.counterDictionary(s),
                ageSeconds: Double(monotonicNanoseconds() - r.createdAt) / 1e9)
        }
    }
}

/// The live regions, by id.
final class RegionRegistry: Sendable {
    let regions = Mutex<[UInt64: Region]>([:])
    func all() -> [Region] { regions.withLock { Array($0.values) } }
}
