import FarpageKernel
import FarpageProtocol
import FarpageTiers
import FarpageTransport
import Foundation
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The health of one far-memory backend, as `farpagectl pool list` shows it.
public enum ServerStatus: String, Sendable, Codable {
    case healthy
    /// Missed heartbeats or failed requests; its pages cannot be read now.
    case failed
    /// Detach requested: no new pages; its leases are being moved elsewhere.
    case draining
    /// Fully drained and released.
    case detached
}

/// One row of `farpagectl pool list`.
public struct PoolServerReport: Codable, Sendable {
    public var address: String
    public var status: ServerStatus
    public var capacityBytes: UInt64
    public var leaseBytes: UInt64
    public var leases: Int
    public var storedPages: Int
    public var errors: UInt64
    public var lastError: String
    public var transport: String
    /// Leases the server asked back that are still being moved.
    public var reclaimingLeases: Int
    /// The spill file's I/O counters (`[store] kind = "file"`); nil for other backends.
    public var spillFile: SpillFileIO? = nil
}

/// Where the pool keeps pages that no memory server can take (with no servers, all of them).
public enum LocalSpill: Sendable {
    /// Leases of the agent's own anonymous memory, up to `capacityBytes`: keeps data safe,
    /// saves no memory on this host.
    case memory(capacityBytes: UInt64)
    /// Leases in a spill file on local storage (the NVMe tier).
    case file(SpillFileBackend)
}

/// Background movement between the pool (memory servers) and a spill file below it.
///
/// Demotion works on whole leases: when the pages we keep on memory servers fill more than
/// `demoteAbove` of what they can give us, the leases read least recently (and not within
/// `coldAfterMilliseconds`) are moved into the spill file until the fill is `demoteTo` or
/// less. Promotion works on pages: while the fill is below `demoteAbove` and no demotion is
/// under way, a page whose far copy is in the spill file and that was used again goes to a
/// memory server when it is next evicted (a clean one is written instead of only dropped). Only with `[store] kind = "file"`
/// and at least one memory server; the gap between the two fractions and the cold age are the
/// hysteresis that keeps leases from moving back and forth.
public struct TierMovement: Sendable, Equatable {
    public var demoteAbove = 0.9
    public var demoteTo = 0.8
    public var coldAfterMilliseconds = 30_000
    public var promote = true
    public init() {}
    public init(demoteAbove: Double, demoteTo: Double, coldAfterMilliseconds: Int, promote: Bool) {
        self.demoteAbove = demoteAbove
        self.demoteTo = demoteTo
        self.coldAfterMilliseconds = coldAfterMilliseconds
        self.promote = promote
    }
}

/// What tier movement has done since the agent started.
public struct TierMovementCounters: Sendable, Equatable {
    public var demotedLeases: UInt64
    public var demotedPages: UInt64
    public var demotionFailures: UInt64
    public var promotedPages: UInt64
}

/// The pool of far memory: leases on memory servers (placed by free capacity, power of two
/// choices) and a local spill used only when no server can take a page.
///
/// A location is `lease index << 24 | page slot`. The lease index names an agent-side lease
/// record, which points at (backend, remote lease id); moving a lease to another server
/// (detach) rewrites only that record, so page tables never change.
public final class PoolStore: PageStore, @unchecked Sendable {
    public let name = "pool"
    public let pageSize = MemWire.pageSize
    static let slotBits: UInt64 = 24

    final class Server: @unchecked Sendable {
        let backend: any LeaseBackend
        let isLocal: Bool
        var status: ServerStatus = .healthy  // guarded by PoolStore.state
        /// Restarted, or its drain failed: heartbeats no longer bring it back to healthy.
        var permanentlyFailed = false
        var capacityBytes: UInt64
        /// Bytes the server lends to all its agents (from PONG), ours included.
        var lentBytes: UInt64 = 0
        let errors = Atomic<UInt64>(0)
        var lastError = ""
        /// A reclaim (donor pressure) thread is running for this server.
        var reclaimRunning = false
        /// Its pages are gone for good: it restarted (new identity) or was removed unread.
        var lost = false
        /// Lease ids whose LEASE_FREE failed: retried at every heartbeat (pool mutex).
        var pendingFrees: [UInt64] = []
        var lastReclaimComplaint: UInt64 = 0
        init(backend: any LeaseBackend, isLocal: Bool, capacityBytes: UInt64) {
            self.backend = backend
            self.isLocal = isLocal
            self.capacityBytes = capacityBytes
        }
        var address: String { backend.name }
    }

    final class Lease: @unchecked Sendable {
        var server: Server  // changes only under `lock` held exclusively (migration)
        var remoteID: UInt64
        var pages: Int
        var freeSlots: [UInt32] = []
        var nextFresh = 0
        var used = 0
        /// Asked back by its server: takes no new pages, and is being moved. Pool mutex.
        var reclaiming = false
        /// The server no longer holds it (it freed it while we were away): its pages are gone.
        var lost = false
        /// Consecutive heartbeats it held no page; returned to its server after a few.
        var emptyHeartbeats = 0
        /// When a page was last read from it (monotonic ms; its creation until then): demotion
        /// takes the leases read least recently.
        let lastRead: Atomic<UInt64>
        private var rw = pthread_rwlock_t()
        init(server: Server, remoteID: UInt64, pages: Int) {
            self.server = server
            self.remoteID = remoteID
            self.pages = pages
            lastRead = Atomic(monotonicNanoseconds() / 1_000_000)
            pthread_rwlock_init(&rw, nil)
        }
        @inline(__always) func noteRead() { lastRead.store(monotonicNanoseconds() / 1_000_000, ordering: .relaxed) }
        deinit { pthread_rwlock_destroy(&rw) }
        func shared<T>(_ body: () throws -> T) rethrows -> T {
            pthread_rwlock_rdlock(&rw)
            defer { pthread_rwlock_unlock(&rw) }
            return try body()
        }
        func exclusive<T>(_ body: () throws -> T) rethrows -> T {
            pthread_rwlock_wrlock(&rw)
            defer { pthread_rwlock_unlock(&rw) }
            return try body()
        }
    }

    struct State {
        var servers: [Server] = []
        var leases: [Lease?] = []
        var freeLeaseIndices: [Int] = []
    }
    let state = Mutex(State())
    let local: Server
    let logger: Logger
    let agentID: [UInt8]
    let agentName: String
    let secret: ClusterSecret?
    let ioTimeoutMilliseconds: Int32
    let leasesPerRequest: Int
    /// Demotion to and promotion from the spill file; nil when the spill is the agent's memory.
    let movement: TierMovement?
    /// Whether a page used again from the spill file goes to a memory server at its next
    /// eviction: set at each heartbeat (fill below `demoteAbove`, no demotion under way), cleared at
    /// once when a placement finds the servers full.
    let promoting = Atomic<Bool>(false)
    let demotionRunning = Atomic<Bool>(false)
    /// The fill went above `demoteAbove` and has not yet come down to `demoteTo`.
    let demotionWanted = Atomic<Bool>(false)
    let demotedLeases = Atomic<UInt64>(0)
    let demotedPages = Atomic<UInt64>(0)
    let demotionFailures = Atomic<UInt64>(0)
    let promotedPages = Atomic<UInt64>(0)
    var lastDemotionComplaint: UInt64 = 0  // pool mutex
    /// TCP or RDMA for servers attached from now on (`[pool] transport`).
    public let dataPlane = DataPlaneSelector()

    /// - Parameters:
    ///   - spillBytes: capacity of the local spill (the agent's own memory).
    ///   - secret: the cluster secret; nil when no memory server will be used.
    public convenience init(spillBytes: UInt64, leaseBytes: UInt64 = 64 << 20, agentID: [UInt8], agentName: String,
                            secret: ClusterSecret?, ioTimeoutMilliseconds: Int32 = 2000, leasesPerRequest: Int = 2,
                            logger: Logger)
    {
        self.init(spill: .memory(capacityBytes: spillBytes), leaseBytes: leaseBytes, agentID: agentID, agentName: agentName,
                  secret: secret, ioTimeoutMilliseconds: ioTimeoutMilliseconds, leasesPerRequest: leasesPerRequest,
                  logger: logger)
    }

    /// - Parameters:
    ///   - spill: the local spill: the agent's own memory, or a spill file (whose lease size is its own).
    ///   - leaseBytes: lease size of a memory spill.
    ///   - secret: the cluster secret; nil when no memory server will be used.
    ///   - movement: demotion to and promotion from a spill file (ignored for a memory spill).
    public init(spill: LocalSpill, leaseBytes: UInt64 = 64 << 20, agentID: [UInt8], agentName: String,
                secret: ClusterSecret?, ioTimeoutMilliseconds: Int32 = 2000, leasesPerRequest: Int = 2,
                movement: TierMovement = TierMovement(), logger: Logger)
    {
        switch spill {
        case .memory(let bytes):
            local = Server(backend: LocalSpillBackend(capacityBytes: bytes, leaseBytes: min(leaseBytes, max(bytes, 1 << 20))),
                           isLocal: true, capacityBytes: bytes)
            self.movement = nil
        case .file(let file):
            local = Server(backend: file, isLocal: true, capacityBytes: file.capacityBytes)
            self.movement = movement
        }
        self.logger = logger
        self.agentID = agentID
        self.agentName = agentName
        self.secret = secret
        self.ioTimeoutMilliseconds = ioTimeoutMilliseconds
        self.leasesPerRequest = max(1, leasesPerRequest)
    }

    public var capacityPages: UInt64 {
        state.withLock { s in s.servers.filter { $0.status == .healthy }.reduce(local.capacityBytes) { $0 + $1.capacityBytes } }
            / UInt64(pageSize)
    }

    public var usedPages: UInt64 {
        state.withLock { s in UInt64(s.leases.reduce(0) { $0 + ($1?.used ?? 0) }) }
    }

    // MARK: Servers

    /// Connects to a memory server and adds it to the pool.
    public func attach(address: String) throws(TransportError) {
        guard let secret else {
            throw TransportError(.authentication, "no cluster secret configured ([pool] secret_file); cannot attach \(address)")
        }
        guard let (host, port) = splitAddress(address) else {
            throw TransportError(.unreachable, "\(address) is not HOST:PORT")
        }
        let existing = state.withLock { s in s.servers.contains { $0.address == "\(host):\(port)" && $0.status != .detached } }
        if existing { throw TransportError(.refused(code: 0), "\(address) is already in the pool") }
        let backend = try RemoteBackend(host: host, port: port, agentID: agentID, agentName: agentName, secret: secret,
                                        ioTimeoutMilliseconds: ioTimeoutMilliseconds, dataPlane: dataPlane)
        let server = Server(backend: backend, isLocal: false, capacityBytes: backend.capacityBytes)
        state.withLock { s in
            s.servers.removeAll { $0.address == server.address && $0.status == .detached }
            s.servers.append(server)
        }
        logger.info("memory server attached", metadata: ["fp.server": "\(server.address)", "fp.capacity": "\(backend.capacityBytes)"])
    }

    /// Starts draining a server: no new pages go there, and its leases move elsewhere in the
    /// background. `done` runs when it is detached (or the drain failed).
    public func detach(address: String, done: (@Sendable (Bool) -> Void)? = nil) throws(TransportError) {
        let server = state.withLock { s -> Server? in
            guard let server = s.servers.first(where: { $0.address == address && $0.status != .detached }) else { return nil }
            server.status = .draining
            return server
        }
        guard let server else { throw TransportError(.refused(code: 0), "\(address) is not in the pool") }
        logger.notice("draining memory server", metadata: ["fp.server": "\(address)"])
        startThread(name: "fp-drain", detached: true) { [self] in
            let ok = drain(server)
            done?(ok)
        }
    }

    /// Drops a server without draining it (it is dead, or its drain failed). Pages that only it
    /// held are lost: they are poisoned when touched, never served as zeros. No more
    /// heartbeats or requests go to it.
    public func forget(address: String) throws(TransportError) {
        let server = state.withLock { s -> Server? in
            guard let server = s.servers.first(where: { $0.address == address && $0.status != .detached }) else { return nil }
            server.status = .detached
            server.permanentlyFailed = true
            server.lost = true
            server.lastError = "removed without draining: its pages are lost"
            return server
        }
        guard let server else { throw TransportError(.refused(code: 0), "\(address) is not in the pool") }
        let lost = state.withLock { s in s.leases.reduce(0) { $0 + ($1?.server === server ? $1!.used : 0) } }
        (server.backend as? RemoteBackend)?.closeAll()
        logger.error("memory server removed without draining; pages only it held are lost and will be poisoned when touched",
                     metadata: ["fp.server": "\(address)", "fp.pages": "\(lost)"])
    }

    /// Moves every lease of `server` to other servers (or the local spill), then releases it.
    func drain(_ server: Server) -> Bool {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: MemWire.maxPagesPerIO * pageSize, alignment: pageSize)
        defer { buffer.deallocate() }
        var ok = true
        var moved = 0
        // Repeat until no lease points at the server: one may have been added while draining
        // (a lease allocation that was in flight when the detach began).
        for _ in 0..<16 {
            let leases = state.withLock { s in s.leases.compactMap { $0 }.filter { $0.server === server } }
            if leases.isEmpty || !ok { break }
            moved += leases.count
            ok = drainLeases(leases, of: server, buffer: buffer)
        }
        state.withLock { s in
            // Checked and set together: a lease switched onto this server after the check
            // (a move that raced the drain) is refused at its switch (`moveLease`).
            if ok, s.leases.contains(where: { $0?.server === server }) { ok = false }
            server.status = ok ? .detached : .failed
            if !ok {
                server.permanentlyFailed = true
                server.lastError = "drain failed: see the agent's log"
            }
        }
        if ok {
            (server.backend as? RemoteBackend)?.closeAll()
            logger.notice("memory server detached: all its pages moved", metadata: ["fp.server": "\(server.address)", "fp.leases": "\(moved)"])
        } else {
            logger.error("memory server could not be fully drained", metadata: ["fp.server": "\(server.address)"])
        }
        return ok
    }

    private func drainLeases(_ leases: [Lease], of server: Server, buffer: UnsafeMutableRawPointer) -> Bool {
        var ok = true
        for lease in leases where !moveLease(lease, from: server, buffer: buffer) { ok = false }
        return ok
    }

    /// Moves one lease off `server`: its used part is copied into a new lease elsewhere (another
    /// server, else the local spill; or `destination` only, when given) and its record switched,
    /// so page tables do not change. A lease holding no page is just given back. Faults on the
    /// lease wait while it moves.
    func moveLease(_ lease: Lease, from server: Server, buffer: UnsafeMutableRawPointer, to destination: Server? = nil) -> Bool {
        lease.exclusive {
            // Slots are reserved under the pool mutex; no slot past `nextFresh` can hold data yet.
            let (present, used, nextFresh) = state.withLock { s in
                (s.leases.contains { $0 === lease } && lease.server === server, lease.used, lease.nextFresh)
            }
            guard present else { return true }  // returned or moved meanwhile
            if used == 0 {
                let removed = state.withLock { s -> Bool in
                    // Nothing can be reserved in it: its server drains, or it is being reclaimed.
                    guard lease.used == 0, let i = s.leases.firstIndex(where: { $0 === lease }) else { return false }
                    s.leases[i] = nil
                    s.freeLeaseIndices.append(i)
                    return true
                }
                if removed {
                    freeRemote(server, lease.remoteID)
                    return true
                }
            }
            let allocated: (Server, UInt64)?
            if let destination {
                allocated = ((try? destination.backend.allocateLeases(1))?.first).map { (destination, $0) }
            } else {
                allocated = try? allocateLease(on: chooseServer(excluding: server), excluding: server)
            }
            guard let (target, remoteID) = allocated else {
                if destination == nil {
                    logger.error("no capacity anywhere to move a lease into", metadata: ["fp.server": "\(server.address)"])
                }
                return false
            }
            let targetPages = Int(target.backend.leaseBytes) / pageSize
            guard targetPages >= nextFresh else {
                logger.error("cannot move a lease: the target's leases are smaller than this one's used part; use one lease_size across the pool",
                             metadata: ["fp.server": "\(server.address)", "fp.target": "\(target.address)"])
                try? target.backend.freeLease(remoteID)
                return false
            }
            var page = 0
            while page < nextFresh {
                let n = min(MemWire.maxPagesPerIO, nextFresh - page)
                do {
                    try server.backend.read(lease: lease.remoteID, offset: UInt64(page * pageSize), pages: n, into: buffer,
                                            allowUnwritten: true)
                    try target.backend.write(lease: remoteID, offset: UInt64(page * pageSize), pages: n, from: buffer)
                } catch {
                    logger.error("moving a lease failed", metadata: ["fp.server": "\(server.address)", "fp.error": "\(error)"])
                    try? target.backend.freeLease(remoteID)
                    return false
                }
                page += n
            }
            let old = lease.remoteID
            // Switched under both locks: data paths read the record under the lease lock,
            // placement and reports under the pool mutex. Only onto a target still taking
            // pages: one that started draining or was removed meanwhile would be left holding
            // this lease after its own drain reported it empty.
            let switched = state.withLock { _ -> Bool in
                guard target.isLocal || (target.status == .healthy && !target.permanentlyFailed) else { return false }
                lease.server = target
                lease.remoteID = remoteID
                lease.reclaiming = false
                lease.emptyHeartbeats = 0
                lease.pages = min(lease.pages, targetPages)
                lease.freeSlots.removeAll { Int($0) >= lease.pages }
                return true
            }
            guard switched else {
                logger.notice("the server a lease was moving to left the pool meanwhile; the move is retried",
                              metadata: ["fp.server": "\(server.address)", "fp.target": "\(target.address)"])
                freeRemote(target, remoteID)
                return false
            }
            freeRemote(server, old)
            return true
        }
    }

    /// Pings remote servers; marks them failed or healthy again. Call periodically.
    public func heartbeat() {
        let servers = state.withLock { s in
            s.servers.filter { !$0.isLocal && !$0.permanentlyFailed && ($0.status == .healthy || $0.status == .failed) }
        }
        for server in servers {
            guard let remote = server.backend as? RemoteBackend else { continue }
            do {
                let stats = try remote.ping()
                let (healthy, flagged, frees) = state.withLock { s -> (Bool, Int, [UInt64]) in
                    // Only a failed server comes back; one removed or drained while this ping
                    // was in flight stays as the operator left it.
                    if server.status == .failed && !server.permanentlyFailed {
                        logger.notice("memory server answers again", metadata: ["fp.server": "\(server.address)"])
                        server.status = .healthy
                    }
                    guard server.status == .healthy else { return (false, 0, []) }
                    server.capacityBytes = stats.capacityBytes
                    server.lentBytes = stats.usedBytes
                    defer { server.pendingFrees.removeAll() }
                    return (true, s.leases.reduce(0) { $0 + ($1?.server === server && $1!.reclaiming ? 1 : 0) }, server.pendingFrees)
                }
                for id in frees { freeRemote(server, id) }
                // Donor pressure: the server wants leases back (or stopped wanting them).
                if healthy && (stats.reclaiming > 0 || flagged > 0) { startReclaim(server, remote) }
            } catch {
                noteFailure(server, error)
            }
        }
        returnEmptyLeases()
        moveBetweenTiers()
    }

    // MARK: Demotion and promotion (spill file under the pool)

    /// Our pages on healthy memory servers, and the room they have left for us.
    func poolFill() -> (storedPages: Int, roomPages: Int) {
        state.withLock { s in
            var stored = 0
            var room = 0
            for server in s.servers where server.status == .healthy && !server.permanentlyFailed {
                let u = usage(of: server, in: s)
                stored += u.storedPages
                room += Int(max(0, u.freeBytes) / Int64(pageSize))
            }
            return (stored, room)
        }
    }

    /// Called at every heartbeat: decides whether pages used again may go up, and starts a
    /// demotion thread when the servers are fuller than `demoteAbove`.
    func moveBetweenTiers() {
        guard let movement else { return }
        let (stored, room) = poolFill()
        let total = stored + room
        guard total > 0 else {
            promoting.store(false, ordering: .relaxed)
            return
        }
        let fill = Double(stored) / Double(total)
        // Hysteresis: demotion starts above `demoteAbove` and goes on (as leases turn cold)
        // until the fill is down to `demoteTo`; promotion fills the servers again meanwhile
        // only up to `demoteAbove`, and not while a demotion is under way.
        if fill > movement.demoteAbove { demotionWanted.store(true, ordering: .relaxed) }
        if fill <= movement.demoteTo { demotionWanted.store(false, ordering: .relaxed) }
        let wanted = demotionWanted.load(ordering: .relaxed)
        promoting.store(movement.promote && fill < movement.demoteAbove && !wanted, ordering: .relaxed)
        guard wanted, spillHasRoomForALease(),
            demotionRunning.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged
        else { return }
        startThread(name: "fp-demote", detached: true) { [self] in
            defer { demotionRunning.store(false, ordering: .releasing) }
            demoteColdLeases(movement, targetPages: Int(Double(total) * movement.demoteTo))
        }
    }

    /// Whether the spill file can take one more lease (else demotion waits: the file is full).
    private func spillHasRoomForALease() -> Bool {
        let leases = state.withLock { s in s.leases.count { $0?.server === local } }
        return UInt64(leases + 1) * local.backend.leaseBytes <= local.capacityBytes
    }

    /// Moves the leases read least recently from memory servers into the spill file until our
    /// pages on the servers are `targetPages` or fewer. A lease read within the cold age stays.
    func demoteColdLeases(_ movement: TierMovement, targetPages: Int) {
        let now = monotonicNanoseconds() / 1_000_000
        let coldBefore = now >= UInt64(movement.coldAfterMilliseconds) ? now - UInt64(movement.coldAfterMilliseconds) : 0
        let candidates = state.withLock { s in
            s.leases.compactMap { $0 }.filter { l in
                !l.server.isLocal && l.server.status == .healthy && !l.reclaiming && !l.lost && l.used > 0
                    && l.lastRead.load(ordering: .relaxed) <= coldBefore
            }.sorted { $0.lastRead.load(ordering: .relaxed) < $1.lastRead.load(ordering: .relaxed) }
        }
        guard !candidates.isEmpty else { return }
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: MemWire.maxPagesPerIO * pageSize, alignment: pageSize)
        defer { buffer.deallocate() }
        var moved = 0
        var pages = 0
        for lease in candidates {
            // Done, or the file is full (not a failure: demotion resumes when it has room).
            guard poolFill().storedPages > targetPages, spillHasRoomForALease() else { break }
            let (server, used, cold) = state.withLock { _ in
                (lease.server, lease.used, lease.lastRead.load(ordering: .relaxed) <= coldBefore)
            }
            // Read meanwhile, or moved by a drain or reclaim: leave it.
            guard !server.isLocal, server.status == .healthy, cold else { continue }
            if moveLease(lease, from: server, buffer: buffer, to: local) {
                moved += 1
                pages += used
                demotedLeases.wrappingAdd(1, ordering: .relaxed)
                demotedPages.wrappingAdd(UInt64(used), ordering: .relaxed)
            } else {
                demotionFailures.wrappingAdd(1, ordering: .relaxed)
                let complain = state.withLock { _ -> Bool in
                    let t = monotonicNanoseconds()
                    guard t - lastDemotionComplaint > 30_000_000_000 else { return false }
                    lastDemotionComplaint = t
                    return true
                }
                if complain {
                    logger.warning("cannot demote cold pages to the spill file (full, or a read failed); the memory servers stay full and new pages go to the spill file directly",
                                   metadata: ["fp.server": "\(server.address)", "fp.spill": "\(local.address)"])
                }
                break
            }
        }
        if moved > 0 {
            logger.info("cold leases demoted from memory servers to the spill file",
                        metadata: ["fp.leases": "\(moved)", "fp.pages": "\(pages)"])
        }
    }

    /// What tier movement has done (all zero without a spill file).
    public var movementCounters: TierMovementCounters {
        TierMovementCounters(demotedLeases: demotedLeases.load(ordering: .relaxed),
                             demotedPages: demotedPages.load(ordering: .relaxed),
                             demotionFailures: demotionFailures.load(ordering: .relaxed),
                             promotedPages: promotedPages.load(ordering: .relaxed))
    }

    /// A clean page used again after it came from the spill file is written to a memory server
    /// at its eviction while there is room (promotion); one whose copy cannot be read now is
    /// written anywhere.
    public func rewriteOnEviction(_ location: PageLocation) -> Bool {
        withLease(location) { lease in
            guard let lease else { return true }
            return !Self.readable(lease) || (lease.server.isLocal && promoting.load(ordering: .relaxed))
        }
    }

    /// Gives back leases that have held no page for three heartbeats: memory a server lends us
    /// is memory its host cannot use, and the local spill's is our own.
    func returnEmptyLeases() {
        let candidates = state.withLock { s -> [Lease] in
            // A lost lease's server no longer holds it: once no page points there, drop the record.
            for (i, l) in s.leases.enumerated() where l?.lost == true && l?.used == 0 {
                s.leases[i] = nil
                s.freeLeaseIndices.append(i)
            }
            return s.leases.compactMap { $0 }.filter { l in
                l.emptyHeartbeats = l.used == 0 && !l.reclaiming && !l.lost && (l.server.status == .healthy || l.server.isLocal)
                    ? l.emptyHeartbeats + 1 : 0
                return l.emptyHeartbeats >= 3
            }
        }
        for lease in candidates {
            lease.exclusive {
                let removed = state.withLock { s -> Bool in
                    guard lease.used == 0, lease.emptyHeartbeats >= 3, let i = s.leases.firstIndex(where: { $0 === lease }) else { return false }
                    s.leases[i] = nil
                    s.freeLeaseIndices.append(i)
                    return true
                }
                if removed { freeRemote(lease.server, lease.remoteID) }
            }
        }
    }

    /// Asks the server which leases it wants back and moves them elsewhere, on a thread of its
    /// own; the server frees its memory once each is returned. One at a time per server; a
    /// lease that cannot be moved now (nowhere to put it) is retried at the next heartbeat.
    private func startReclaim(_ server: Server, _ remote: RemoteBackend) {
        let begin = state.withLock { _ -> Bool in
            guard !server.reclaimRunning, server.status == .healthy else { return false }
            server.reclaimRunning = true
            return true
        }
        guard begin else { return }
        startThread(name: "fp-reclaim", detached: true) { [self] in
            defer { state.withLock { _ in server.reclaimRunning = false } }
            let wanted: Set<UInt64>
            do throws(TransportError) { wanted = Set(try remote.reclaimRequested()) } catch {
                noteFailure(server, error)
                return
            }
            // Ids with no record here are left alone: they may be leases being allocated or
            // moved into right now (no record yet). Releases that failed are retried by the
            // heartbeat (`pendingFrees`).
            let leases = state.withLock { s -> [Lease] in
                var asked: [Lease] = []
                for case let l? in s.leases where l.server === server {
                    l.reclaiming = wanted.contains(l.remoteID)  // the server may have stopped asking
                    if l.reclaiming { asked.append(l) }
                }
                return asked
            }
            guard !leases.isEmpty else { return }
            logger.notice("memory server asks for leases back; moving their pages elsewhere",
                          metadata: ["fp.server": "\(server.address)", "fp.leases": "\(leases.count)"])
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: MemWire.maxPagesPerIO * pageSize, alignment: pageSize)
            defer { buffer.deallocate() }
            for lease in leases {
                guard state.withLock({ _ in lease.reclaiming && server.status == .healthy }) else { continue }
                _ = moveLease(lease, from: server, buffer: buffer)
            }
            // Returned: no longer on that server (moved here, by a drain, or given back empty).
            let left = state.withLock { s in leases.filter { l in l.server === server && s.leases.contains { $0 === l } }.count }
            let returned = leases.count - left
            if left == 0 {
                logger.notice("leases given back to the memory server", metadata: ["fp.server": "\(server.address)", "fp.leases": "\(returned)"])
                return
            }
            let now = monotonicNanoseconds()
            let complain = state.withLock { _ -> Bool in
                guard now - server.lastReclaimComplaint > 30_000_000_000 else { return false }
                server.lastReclaimComplaint = now
                return true
            }
            if complain {
                logger.error(
                    "memory server wants leases back but their pages have nowhere to go; retrying every heartbeat (attach another server or raise [store] capacity)",
                    metadata: ["fp.server": "\(server.address)", "fp.returned": "\(returned)", "fp.left": "\(left)"])
            }
        }
    }

    private func noteFailure(_ server: Server, _ error: TransportError) {
        server.errors.wrappingAdd(1, ordering: .relaxed)
        if server.isLocal {
            // The spill does not go down (it is our memory, or a file the backend reports on).
            state.withLock { _ in server.lastError = error.message }
            return
        }
        var newlyRestarted = false
        let wasHealthy = state.withLock { _ -> Bool in
            server.lastError = error.message
            if error.kind == .restarted {
                newlyRestarted = !server.permanentlyFailed
                server.permanentlyFailed = true
                server.lost = true
                server.status = .failed
            }
            defer { if server.status == .healthy, error.kind != .corrupt { server.status = .failed } }
            return server.status == .healthy
        }
        if newlyRestarted {
            logger.error("memory server restarted: the pages it held are lost and are poisoned when touched; it stays failed",
                         metadata: ["fp.server": "\(server.address)", "fp.error": "\(error)"])
        } else if wasHealthy {
            logger.error("memory server failed; its pages cannot be read until it answers again (pages lost for good are poisoned, never served as zeros)",
                         metadata: ["fp.server": "\(server.address)", "fp.error": "\(error)"])
        }
    }

    public func report() -> [PoolServerReport] {
        state.withLock { s in
            ([local] + s.servers).map { server in
                let mine = s.leases.compactMap { $0 }.filter { $0.server === server }
                return PoolServerReport(
                    address: server.address, status: server.status, capacityBytes: server.capacityBytes,
                    leaseBytes: server.backend.leaseBytes, leases: mine.count, storedPages: mine.reduce(0) { $0 + $1.used },
                    errors: server.errors.load(ordering: .relaxed), lastError: server.lastError,
                    transport: server.backend.transport, reclaimingLeases: mine.filter(\.reclaiming).count,
                    spillFile: (server.backend as? SpillFileBackend)?.counters)
            }
        }
    }

    // MARK: Placement

    /// Picks a server for new pages: of two healthy servers drawn at random, the one with more
    /// free bytes (Infiniswap's power of two choices). Nil when no server is healthy.
    private func chooseServer(excluding: Server? = nil) -> Server? {
        let candidates = state.withLock { s in s.servers.filter { $0.status == .healthy && $0 !== excluding } }
        guard let a = candidates.randomElement() else { return nil }
        guard candidates.count > 1 else { return a }
        var b = candidates.randomElement()!
        while b === a { b = candidates.randomElement()! }
        return freeBytes(a) >= freeBytes(b) ? a : b
    }

    /// A new lease: on the chosen server, else on any other healthy server, else on the local
    /// spill when no server can take one.
    private func allocateLease(on preferred: Server? = nil, excluding: Server? = nil) throws(StoreError) -> (Server, UInt64) {
        var candidates = state.withLock { s in s.servers.filter { $0.status == .healthy && $0 !== excluding } }
        if let preferred, let i = candidates.firstIndex(where: { $0 === preferred }) {
            candidates.swapAt(0, i)
        } else {
            candidates.shuffle()
        }
        for server in candidates {
            do {
                if let id = try server.backend.allocateLeases(1).first { return (server, id) }
            } catch {
                if case .refused = error.kind {} else { noteFailure(server, error) }
            }
        }
        if local !== excluding, let id = try? local.backend.allocateLeases(1).first { return (local, id) }
        throw StoreError(.full, "no memory server and no local spill can take more pages")
    }

    /// Free bytes of a server for us: its capacity, less what it lends to other agents (from
    /// its last PONG) and the pages we keep there.
    private func freeBytes(_ server: Server) -> Int64 {
        state.withLock { s in usage(of: server, in: s).freeBytes }
    }

    /// Our pages on `server`, and its bytes free for us: its capacity, less what it lends to
    /// other agents (from its last PONG) and the pages we keep there (pool mutex held).
    private func usage(of server: Server, in s: State) -> (storedPages: Int, freeBytes: Int64) {
        var leased = 0
        var stored = 0
        for case let l? in s.leases where l.server === server {
            leased += l.pages
            stored += l.used
        }
        let others = max(0, Int64(clamping: server.lentBytes) - Int64(leased) * Int64(pageSize))
        return (stored, Int64(clamping: server.capacityBytes) - others - Int64(stored) * Int64(pageSize))
    }

    /// Reserves `count` slots on one server chosen for the batch, preferring consecutive slots
    /// of one lease (one WRITE per run). Falls back to other servers, then the local spill.
    private func reserveSlots(_ count: Int) throws(StoreError) -> [PageLocation] {
        var partial: [PageLocation] = []
        do { return try reserveSlots(count, into: &partial) } catch {
            release(partial)  // never leak what was reserved before the failure
            throw error
        }
    }

    private func reserveSlots(_ count: Int, into out: inout [PageLocation]) throws(StoreError) -> [PageLocation] {
        let target = chooseServer()
        out.reserveCapacity(count)
        while out.count < count {
            let got = state.withLock { s -> [PageLocation] in
                var taken: [PageLocation] = []
                for (index, lease) in s.leases.enumerated() {
                    guard let lease else { continue }
                    // Only leases of the chosen server (or, with no healthy server, the spill), and
                    // none its server asked back.
                    guard lease.server === (target ?? local), lease.server.status == .healthy, !lease.reclaiming, !lease.lost
                    else { continue }
                    while taken.count < count - out.count, lease.nextFresh < lease.pages {
                        taken.append(location(index, lease.nextFresh))
                        lease.nextFresh += 1
                        lease.used += 1
                    }
                    while taken.count < count - out.count, let slot = lease.freeSlots.popLast() {
                        taken.append(location(index, Int(slot)))
                        lease.used += 1
                    }
                    if taken.count == count - out.count { break }
                }
                return taken
            }
            out += got
            if out.count < count {
                let (server, remoteID) = try allocateLease(on: target)
                let lease = Lease(server: server, remoteID: remoteID, pages: Int(server.backend.leaseBytes) / pageSize)
                let added = state.withLock { s -> Bool in
                    // A server that began draining (or was removed) while the lease was being
                    // allocated gets no record: its drain may already have finished.
                    guard server.isLocal || server.status == .healthy else { return false }
                    if let i = s.freeLeaseIndices.popLast() { s.leases[i] = lease } else { s.leases.append(lease) }
                    return true
                }
                if !added {
                    freeRemote(server, remoteID)
                    continue
                }
                if server !== (target ?? local) {
                    // The chosen server was full or failed: take the rest from where the lease came.
                    out += try reserveSlots(on: lease, count: count - out.count)
                    return out
                }
            }
        }
        return out
    }

    /// Slots from one specific lease (used when placement had to fall back).
    private func reserveSlots(on lease: Lease, count: Int) throws(StoreError) -> [PageLocation] {
        let got = state.withLock { s -> [PageLocation] in
            // A lease whose server started draining (or failed) meanwhile takes no new pages.
            guard lease.server.status == .healthy || lease.server.isLocal, !lease.reclaiming, !lease.lost,
                let index = s.leases.firstIndex(where: { $0 === lease })
            else { return [] }
            var taken: [PageLocation] = []
            while taken.count < count, lease.nextFresh < lease.pages {
                taken.append(location(index, lease.nextFresh))
                lease.nextFresh += 1
                lease.used += 1
            }
            return taken
        }
        if got.count < count { return got + (try reserveSlots(count - got.count)) }
        return got
    }

    @inline(__always) private func location(_ lease: Int, _ slot: Int) -> PageLocation {
        PageLocation(raw: UInt64(lease) << Self.slotBits | UInt64(slot))
    }

    private func lease(of location: PageLocation) -> (Lease, Int)? {
        let index = Int(location.raw >> Self.slotBits)
        let slot = Int(location.raw & ((1 << Self.slotBits) - 1))
        return state.withLock { s in index < s.leases.count ? s.leases[index].map { ($0, slot) } : nil }
    }

    // MARK: PageStore

    public func submit(_ batch: PageIOBatch, completion: @escaping @Sendable (PageIOBatch) -> Void) {
        batch.errors = Array(repeating: nil, count: batch.count)
        switch batch.kind {
        case .read: read(batch)
        case .write: write(batch)
        }
        completion(batch)
    }

    /// A run of pages consecutive in one lease (and in the batch): one READ.
    struct ReadRun {
        let first: Int  // index in the batch
        let count: Int
        let lease: Lease?  // nil: the location names no lease (the run's error is set)
        let slot: Int
    }

    /// Splits a read batch into runs of at most `maxPages` (the first at most `firstPages`).
    private func plan(_ batch: PageIOBatch, maxPages: Int, firstPages: Int) -> [ReadRun] {
        var runs: [ReadRun] = []
        var i = 0
        while i < batch.count {
            guard let location = batch.locations[i], let (lease, slot) = lease(of: location) else {
                batch.errors[i] = StoreError(.badLocation, "no lease for \(String(describing: batch.locations[i]))")
                runs.append(ReadRun(first: i, count: 1, lease: nil, slot: 0))
                i += 1
                continue
            }
            let limit = min(MemWire.maxPagesPerIO, runs.isEmpty ? firstPages : maxPages)
            var n = 1
            while i + n < batch.count, n < limit, let next = batch.locations[i + n],
                next.raw == location.raw + UInt64(n), next.raw >> Self.slotBits == location.raw >> Self.slotBits
            {
                n += 1
            }
            runs.append(ReadRun(first: i, count: n, lease: lease, slot: slot))
            i += n
        }
        return runs
    }

    private func read(_ batch: PageIOBatch) {
        var scratch: UnsafeMutableRawPointer? = nil
        defer { scratch?.deallocate() }
        for run in plan(batch, maxPages: MemWire.maxPagesPerIO, firstPages: MemWire.maxPagesPerIO) {
            read(run, of: batch, scratch: &scratch)
        }
    }

    /// Whether a run's buffers are consecutive pages (then it is read straight into them).
    private func contiguous(_ run: ReadRun, _ batch: PageIOBatch) -> Bool {
        (1..<max(run.count, 1)).allSatisfy { batch.buffers[run.first + $0] == batch.buffers[run.first] + $0 * pageSize }
    }

    /// Whether a lease can no longer be read at all: its server was removed, or it lost the lease.
    private func unreadable(_ lease: Lease) -> StoreError? {
        let (server, forgotten, gone) = state.withLock { _ in (lease.server, lease.server.status == .detached && lease.server.lost, lease.lost) }
        if forgotten { return StoreError(.lost, "\(server.address) was removed from the pool") }
        if gone { return StoreError(.lost, "\(server.address) no longer holds this lease") }
        return nil
    }

    /// Reads one run: straight into the batch's buffers when they are consecutive (fetch-ahead
    /// staging), else through `scratch`.
    private func read(_ run: ReadRun, of batch: PageIOBatch, scratch: inout UnsafeMutableRawPointer?) {
        guard let lease = run.lease else { return }
        if let error = unreadable(lease) { return set(run, of: batch, error) }
        lease.noteRead()
        let direct = contiguous(run, batch)
        if !direct && scratch == nil { scratch = .allocate(byteCount: MemWire.maxPagesPerIO * pageSize, alignment: pageSize) }
        let target = direct ? batch.buffers[run.first] : scratch!
        // The server is taken under the lease lock: the failure is blamed on the server asked.
        let (server, failure): (Server, TransportError?) = lease.shared {
            do {
                try lease.server.backend.read(lease: lease.remoteID, offset: UInt64(run.slot * pageSize), pages: run.count,
                                              into: target, allowUnwritten: false)
                return (lease.server, nil)
            } catch let error as TransportError {
                return (lease.server, error)
            } catch {
                return (lease.server, TransportError(.unreachable, "\(error)"))
            }
        }
        if let failure {
            fail(run, of: batch, failure, server: server)
        } else if !direct {
            for k in 0..<run.count { memcpy(batch.buffers[run.first + k], target + k * pageSize, pageSize) }
        }
    }

    private func set(_ run: ReadRun, of batch: PageIOBatch, _ error: StoreError) {
        for k in 0..<run.count { batch.errors[run.first + k] = error }
    }

    /// Records a failed read of `run` from `server`, and what it says about the server or lease.
    private func fail(_ run: ReadRun, of batch: PageIOBatch, _ error: TransportError, server: Server) {
        guard let lease = run.lease else { return }
        let code: StoreError.Code
        if error.kind == .corrupt {
            server.errors.wrappingAdd(1, ordering: .relaxed)
            logger.error("a far page failed its checksum", metadata: ["fp.server": "\(server.address)", "fp.error": "\(error)"])
            code = .corrupt
        } else if noteLeaseGone(lease, error) {
            code = .lost
        } else {
            // A restart found here marks the server lost (so that clean pages whose only copy
            // was there are rewritten before eviction), as a heartbeat would.
            noteFailure(server, error)
            code = error.kind == .restarted || state.withLock({ _ in server.lost }) ? .lost : .unavailable
        }
        set(run, of: batch, StoreError(code, error.message))
    }

    /// Streaming read (fetch-ahead): runs of one lease go out together (on a memory server, on
    /// one connection, each handed to `ready` as soon as it is in while the server sends the
    /// next; in a spill file, as one io_uring submission). The first run is small, so the page
    /// at the head of the batch (the one a fault waits for) comes back after one short round trip.
    public func read(_ batch: PageIOBatch, chunkPages: Int, ready: (Int) -> Void) {
        batch.errors = Array(repeating: nil, count: batch.count)
        let runs = plan(batch, maxPages: max(1, chunkPages), firstPages: min(max(1, chunkPages), 16))
        var scratch: UnsafeMutableRawPointer? = nil
        defer { scratch?.deallocate() }
        // Servers whose connection broke during this batch: their later runs fail at once
        // instead of each waiting out a timeout (the faulting page has its own retries).
        var broken: [ObjectIdentifier: StoreError] = [:]
        var k = 0
        while k < runs.count {
            let run = runs[k]
            guard let lease = run.lease else {
                ready(run.first + run.count)
                k += 1
                continue
            }
            let server = state.withLock { _ in lease.server }
            if let error = broken[ObjectIdentifier(server)] {
                set(run, of: batch, error)
                ready(run.first + run.count)
                k += 1
                continue
            }
            guard contiguous(run, batch) else {
                read(run, of: batch, scratch: &scratch)
                ready(run.first + run.count)
                k += 1
                continue
            }
            var m = k + 1
            while m < runs.count, runs[m].lease === lease, contiguous(runs[m], batch) { m += 1 }
            let group = Array(runs[k..<m])
            k = m
            if let error = unreadable(lease) {
                for run in group {
                    set(run, of: batch, error)
                    ready(run.first + run.count)
                }
                continue
            }
            lease.noteRead()
            var reported = 0
            enum Outcome { case done, moved, broken(TransportError) }
            let outcome: Outcome = lease.shared {
                // The record cannot move to another server while its lock is held; it may have
                // moved since it was looked at (then read it run by run, below).
                guard lease.server === server else { return .moved }
                let wire = group.map {
                    LeaseReadRun(offset: UInt64($0.slot * pageSize), pages: $0.count, into: batch.buffers[$0.first])
                }
                do throws(TransportError) {
                    try server.backend.readRuns(lease: lease.remoteID, runs: wire) { j, error in
                        if let error { fail(group[j], of: batch, error, server: server) }
                        reported = j + 1
                        ready(group[j].first + group[j].count)
                    }
                    return .done
                } catch {
                    return .broken(error)
                }
            }
            switch outcome {
            case .done:
                continue
            case .moved:
                // It moved to another server meanwhile: the rest, one run at a time.
                for run in group[reported...] {
                    read(run, of: batch, scratch: &scratch)
                    ready(run.first + run.count)
                }
            case .broken(let error):
                // The connection broke part way: one failure for the server, and the runs not
                // in yet fail now (fetched-ahead pages stay far; the faulting page is retried).
                noteFailure(server, error)
                let failed = StoreError(error.kind == .restarted || state.withLock({ _ in server.lost }) ? .lost : .unavailable,
                                        error.message)
                broken[ObjectIdentifier(server)] = failed
                for run in group[reported...] {
                    set(run, of: batch, failed)
                    ready(run.first + run.count)
                }
            }
        }
    }

    private func write(_ batch: PageIOBatch) {
        // Pages that own a slot on a healthy lease are rewritten in place; the rest get new slots.
        var targets = [PageLocation?](repeating: nil, count: batch.count)
        var fresh: [Int] = []
        var isFresh = [Bool](repeating: false, count: batch.count)
        // The slot a page owned on an unhealthy lease: released only once the page's new copy
        // is written. If the write fails the page keeps it (the eviction is abandoned and the
        // page table still points there): releasing it would let another page reuse it.
        var stale = [PageLocation?](repeating: nil, count: batch.count)
        // One pass under the pool mutex for the whole batch (this is the eviction path).
        enum Place { case inPlace, reclaiming, promoting, elsewhere }
        let promote = promoting.load(ordering: .relaxed)
        let places: [Place] = state.withLock { s in
            batch.locations.map { l in
                guard let l, case let index = Int(l.raw >> Self.slotBits), index < s.leases.count,
                    let lease = s.leases[index]
                else { return .elsewhere }
                guard (lease.server.status == .healthy || lease.server.isLocal) && !lease.lost else { return .elsewhere }
                // A page in the spill file goes up to a memory server while they have room.
                if promote && lease.server.isLocal { return .promoting }
                // A lease asked back gets no rewrites if the page can go elsewhere: it moves now,
                // not with the lease.
                return lease.reclaiming ? .reclaiming : .inPlace
            }
        }
        for i in 0..<batch.count {
            if places[i] == .inPlace {
                targets[i] = batch.locations[i]
            } else {
                stale[i] = batch.locations[i]
                fresh.append(i)
                isFresh[i] = true
            }
        }
        if !fresh.isEmpty {
            do {
                let slots = try reserveSlots(fresh.count)
                for (k, i) in fresh.enumerated() { targets[i] = slots[k] }
            } catch {
                for i in fresh {
                    if places[i] == .reclaiming || places[i] == .promoting {
                        // Nowhere else to go: the lease asked back is still ours and usable (it
                        // moves as a whole, later); rewrite the page there rather than fail.
                        targets[i] = batch.locations[i]
                        stale[i] = nil
                        isFresh[i] = false
                    } else {
                        batch.errors[i] = error
                    }
                }
            }
        }
        // Group consecutive slots of one lease into runs: one WRITE each.
        var order = (0..<batch.count).filter { targets[$0] != nil && batch.errors[$0] == nil }
        order.sort { targets[$0]!.raw < targets[$1]!.raw }
        let staging = UnsafeMutableRawPointer.allocate(byteCount: MemWire.maxPagesPerIO * pageSize, alignment: pageSize)
        defer { staging.deallocate() }
        var k = 0
        while k < order.count {
            var end = k + 1
            while end < order.count, end - k < MemWire.maxPagesPerIO,
                targets[order[end]]!.raw == targets[order[end - 1]]!.raw + 1,
                targets[order[end]]!.raw >> Self.slotBits == targets[order[k]]!.raw >> Self.slotBits
            {
                end += 1
            }
            let run = Array(order[k..<end])
            k = end
            guard let (lease, slot) = lease(of: targets[run[0]]!) else {
                for i in run { batch.errors[i] = StoreError(.badLocation, "lease vanished") }
                continue
            }
            for (n, i) in run.enumerated() { memcpy(staging + n * pageSize, batch.buffers[i], pageSize) }
            let failed: TransportError? = lease.shared { () -> TransportError? in
                do {
                    try lease.server.backend.write(lease: lease.remoteID, offset: UInt64(slot * pageSize), pages: run.count,
                                                   from: staging)
                    return nil
                } catch let error as TransportError {
                    return error
                } catch {
                    return TransportError(.unreachable, "\(error)")
                }
            }
            if let failed {
                if !noteLeaseGone(lease, failed) { noteFailure(lease.server, failed) }
                for i in run { batch.errors[i] = StoreError(.unavailable, failed.message) }
                // Slots reserved for this batch go back; a page rewritten in place keeps its own.
                release(run.filter { isFresh[$0] }.map { targets[$0]! })
            } else {
                for i in run { batch.locations[i] = targets[i] }
            }
        }
        let promoted = (0..<batch.count).filter { places[$0] == .promoting && isFresh[$0] && batch.errors[$0] == nil }
        if !promoted.isEmpty {
            // Only those that reached a memory server count (placement may fall back to the spill).
            let up = state.withLock { s in
                promoted.count { i in
                    let index = Int(batch.locations[i]!.raw >> Self.slotBits)
                    return index < s.leases.count && s.leases[index].map { !$0.server.isLocal } == true
                }
            }
            promotedPages.wrappingAdd(UInt64(up), ordering: .relaxed)
            if up < promoted.count { promoting.store(false, ordering: .relaxed) }
        }
        release((0..<batch.count).compactMap { batch.errors[$0] == nil ? stale[$0] : nil })
    }

    /// Whether `error` says the server no longer holds `lease` (it freed it after a grace period
    /// while we could not reach it). Marks the lease lost: its pages are poisoned when touched,
    /// and none are placed or rewritten there again.
    private func noteLeaseGone(_ lease: Lease, _ error: TransportError) -> Bool {
        guard error.kind == .refused(code: MemErrorCode.noSuchLease.rawValue), !lease.server.isLocal else { return false }
        let first = state.withLock { _ -> Bool in
            defer { lease.lost = true }
            return !lease.lost
        }
        if first {
            lease.server.errors.wrappingAdd(1, ordering: .relaxed)
            logger.error(
                "memory server no longer holds one of our leases (it freed it while we were away longer than its lease_grace); its pages are lost and are poisoned when touched",
                metadata: ["fp.server": "\(lease.server.address)", "fp.lease": "\(lease.remoteID)", "fp.pages": "\(lease.used)"])
        }
        return true
    }

    /// Gives a lease back to its server; a release that fails (not one the server says it does
    /// not know) is retried at the next heartbeats, so the server does not keep it forever.
    private func freeRemote(_ server: Server, _ id: UInt64) {
        do throws(TransportError) { try server.backend.freeLease(id) } catch {
            if error.kind == .refused(code: MemErrorCode.noSuchLease.rawValue) || server.isLocal { return }
            state.withLock { _ in if !server.lost && server.pendingFrees.count < 4096 { server.pendingFrees.append(id) } }
        }
    }

    /// Whether the far copy at `location` can be read now. A clean page whose copy is on a
    /// failed server must be written elsewhere before its local copy may be dropped.
    public func isReadable(_ location: PageLocation) -> Bool {
        withLease(location) { lease in lease.map(Self.readable) ?? false }
    }

    /// Looks up the lease of `location` and runs `body` on it under one take of the pool mutex
    /// (these run per clean victim on the eviction path).
    private func withLease<T>(_ location: PageLocation, _ body: (Lease?) -> T) -> T {
        let index = Int(location.raw >> Self.slotBits)
        return state.withLock { s in body(index < s.leases.count ? s.leases[index] : nil) }
    }

    /// Whether a lease's pages can be read now (pool mutex held).
    private static func readable(_ lease: Lease) -> Bool {
        lease.server.status != .failed && !lease.server.permanentlyFailed && !lease.lost
    }

    /// A server that failed (stopped answering, refused connections) but did not restart, was
    /// not removed and still holds the lease: its pages may be read again when it answers.
    public func mayComeBack(_ location: PageLocation) -> Bool {
        withLease(location) { lease in
            guard let lease else { return false }
            return !lease.server.isLocal && lease.server.status == .failed && !lease.server.permanentlyFailed
                && !lease.server.lost && !lease.lost
        }
    }

    public func release(_ locations: [PageLocation]) {
        guard !locations.isEmpty else { return }
        state.withLock { s in
            for location in locations {
                let index = Int(location.raw >> Self.slotBits)
                guard index < s.leases.count, let lease = s.leases[index] else { continue }
                lease.freeSlots.append(UInt32(location.raw & ((1 << Self.slotBits) - 1)))
                lease.used -= 1
            }
        }
    }
}

func splitAddress(_ s: String) -> (String, Int)? {
    guard let colon = s.lastIndex(of: ":"), let port = Int(s[s.index(after: colon)...]), (1...65535).contains(port) else { return nil }
    let host = String(s[..<colon]).trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
    return host.isEmpty ? nil : (host, port)
}

