import FarpageKernel
import FarpageTiers
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// What a client asked for when registering a region.
public struct RegionSpec: Sendable {
    public var address: UInt64
    public var length: UInt64
    public var pageSize: Int
    public var name: String
    public var owner: PeerCredentials
    public var budgetPages: Int

    public init(address: UInt64, length: UInt64, pageSize: Int, name: String, owner: PeerCredentials, budgetPages: Int) {
        self.address = address
        self.length = length
        self.pageSize = pageSize
        self.name = name
        self.owner = owner
        self.budgetPages = budgetPages
    }
}

/// Tunables shared by every region of an agent.
public struct PagingPolicy: Sendable {
    public var highWatermark: Double = 0.9
    public var lowWatermark: Double = 0.7
    public var evictBatch: Int = 64
    /// Pages fetched ahead of a fault when a sequential stream starts (or is advised).
    public var sequentialWindow: Int = 16
    /// The most pages fetched ahead at once; the window doubles while a stream keeps using it.
    public var maxPrefetchWindow: Int = 128
    /// Automatic prefetch (stride detection); advised ranges are prefetched either way.
    public var prefetch = true
    /// Hysteresis: a page that became resident is not evicted by background (watermark)
    /// eviction for this long; only the hard budget may take it sooner.
    public var minResidenceMilliseconds = 100
    /// Hot/cold classification: a page faulted back within a budget's worth of evictions
    /// (its refault distance) goes to the active queue, evicted only after inactive pages.
    public var classify = true
    /// Most of the budget the active queue may hold; older active pages move to inactive.
    public var activeFraction = 0.5
    /// The window over which migrations per page are counted.
    public var migrationWindowMilliseconds = 1000
    /// How long a fault waits for a far tier that cannot be reached now but may come back (a
    /// memory server that stopped answering) before the page is given up as lost. 0: no wait.
    public var outageWaitMilliseconds = 30_000
    public init() {}
}

/// Per-thread scratch memory for page copies.
public final class StagingBuffer: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let pages: Int
    public let pageSize: Int
    public init(pages: Int, pageSize: Int = systemPageSize) throws(KernelError) {
        self.pages = pages
        self.pageSize = pageSize
        base = try AnonymousMemory.map(bytes: UInt64(pages * pageSize))
    }
    deinit { AnonymousMemory.unmap(base, bytes: UInt64(pages * pageSize)) }
    @inline(__always) public func page(_ i: Int) -> UnsafeMutableRawPointer { base + i * pageSize }
}

/// A client's region: its page table and the fault and eviction logic that keeps it correct.
///
/// Locking: `core` (one mutex per region) guards the page table and the
/// resident queue; it is never held across a kernel call or a store operation,
/// except none — every syscall happens outside it, and the page state machine
/// (`PageTransitions`) makes the interleavings safe.
public final class Region: @unchecked Sendable {
    public let id: UInt64
    public let spec: RegionSpec
    public let pageCount: Int
    public let uffd: Userfaultfd
    public let memfd: OwnedDescriptor
    public let counters = RegionCounters()
    public let budgetPages: Int
    let highPages: Int
    let lowPages: Int
    let policy: PagingPolicy
    let store: any PageStore
    let agentBudget: ResidentBudget
    let logger: Logger
    let zeroPage: UnsafeMutableRawPointer
    public let createdAt = monotonicNanoseconds()

    struct Core {
        var table: PageTable
        /// Resident pages in the order they arrived (probation), and the protected ones.
        var inactive = ResidentQueue()
        var active = ResidentQueue()
        /// Prefetched pages judged wasted: evicted before anything else.
        var reclaimFirst = ResidentQueue()
        var resident = 0
        var far = 0
        /// Pages punched so far (wrapping): a far page's history stamp is this at its eviction.
        var evictionSeq: UInt32 = 0
        var streams = ThreadStreams()
        var accuracy = PrefetchAccuracy()
        /// The most times one page moved in one migration window, ever.
        var peakMigrations = 0
        /// The same within the current window and the one before it.
        var migrationWindow: UInt16 = 0
        var windowPeak = 0
        var previousWindowPeak = 0
        var sequential: [Range<Int>] = []
        /// Stream detection (fault thread only): last missing fault, run length, window.
        var lastFault = -1
        var streak = 0
        var window = 16
        /// Advised RANDOM for the whole region: no fetch-ahead.
        var random = false
        /// Ranges the client unmapped (ADVISE GONE after a partial munmap), merged.
        var gone: [Range<Int>] = []
        /// Faults waiting for their far tier to come back (pages left *fetching*, so the
        /// client's thread stays blocked in its fault), retried by `retryWaitingFaults`.
        var waiting: [WaitingFault] = []
    }
    struct WaitingFault {
        let page: Int
        let location: PageLocation
        let writable: Bool
        let thread: UInt32  // the faulting thread (for SIGBUS where the kernel cannot poison)
        let since: UInt64  // monotonic ns
    }
    /// `core.waiting.count`, readable without the lock.
    let waitingFaults = Atomic<Int>(0)
    let core: Mutex<Core>
    /// Operations that may touch the client's range (uffd ioctls) pass through it.
    let gate = OperationGate()

    public init(id: UInt64, spec: RegionSpec, uffd: Userfaultfd, memfd: OwnedDescriptor, store: any PageStore,
                agentBudget: ResidentBudget, policy: PagingPolicy, zeroPage: UnsafeMutableRawPointer, logger: Logger)
    {
        self.id = id
        self.spec = spec
        self.pageCount = Int(spec.length / UInt64(spec.pageSize))
        self.uffd = uffd
        self.memfd = memfd
        self.store = store
        self.agentBudget = agentBudget
        self.policy = policy
        self.budgetPages = max(1, spec.budgetPages)
        self.highPages = max(1, min(budgetPages, Int(Double(budgetPages) * policy.highWatermark)))
        self.lowPages = max(0, min(highPages - 1, Int(Double(budgetPages) * policy.lowWatermark)))
        self.zeroPage = zeroPage
        var l = logger
        l[metadataKey: "fp.region"] = "\(id)"
        self.logger = l
        self.core = Mutex(Core(table: PageTable(pageCount: pageCount)))
    }

    deinit {
        // Give the far tier its slots back and the agent its budget.
        var locations: [PageLocation] = []
        let resident = core.withLock { c in
            c.table.forEachEntry { _, e in if let l = e.location { locations.append(l) } }
            return c.resident
        }
        store.release(locations)
        agentBudget.add(-resident)
    }

    public var isClosed: Bool { gate.isClosed }
    /// Stops all further work on the region (faults are no longer served; eviction stops).
    public func close() { gate.close() }
    /// Closes the region and waits until no operation on it is under way (see `OperationGate`).
    public func closeAndDrain() { gate.closeAndDrain() }

    public var residentPages: Int { core.withLock { $0.resident } }

    @inline(__always) func address(ofPage page: Int) -> UInt64 { spec.address + UInt64(page * spec.pageSize) }

    public func snapshot() -> StatsSnapshot {
        var s = StatsSnapshot()
        (s.residentPages, s.farPages) = core.withLock { (UInt64($0.resident), UInt64($0.far)) }
        s.sizeBytes = spec.length
        s.pageSize = UInt64(spec.pageSize)
        s.budgetPages = UInt64(budgetPages)
        s.missingFaults = counters.missingFaults.value
        s.zeroFills = counters.zeroFills.value
        s.fetches = counters.fetches.value
        s.writeProtectFaults = counters.writeProtectFaults.value
        s.evictions = counters.evictions.value
        s.writebacks = counters.writebacks.value
        s.cleanEvictions = counters.cleanEvictions.value
        s.zeroEvictions = counters.zeroEvictions.value
        s.cancelledEvictions = counters.cancelledEvictions.value
        s.prefetchedPages = counters.prefetchedPages.value
        s.lostPages = counters.lostPages.value
        s.foreignPages = counters.foreignPages.value
        s.prefetchHits = counters.prefetchHits.value
        s.prefetchWasted = counters.prefetchWasted.value
        s.refaultActivations = counters.refaultActivations.value
        s.migrations = counters.migrations.value
        s.residenceOverrides = counters.residenceOverrides.value
        s.outageWaits = counters.outageWaits.value
        s.peakPageMigrationsPerWindow = UInt64(peakPageMigrationsPerWindow)
        s.lastWindowPeakMigrations = UInt64(lastWindowPeakMigrations)
        s.regions = 1
        return s
    }

    /// Page-table and queue bytes (the agent's bookkeeping for this region).
    public var bookkeepingBytes: Int {
        core.withLock { $0.table.bookkeepingBytes + $0.inactive.bookkeepingBytes + $0.active.bookkeepingBytes + $0.reclaimFirst.bookkeepingBytes }
    }

    /// The most times one page moved between tiers within one migration window, so far.
    public var peakPageMigrationsPerWindow: Int { core.withLock { $0.peakMigrations } }

    /// The most times one page moved within the last complete migration window.
    public var lastWindowPeakMigrations: Int {
        let window = migrationWindow(at: nowStamp())
        return core.withLock { c in
            if window == c.migrationWindow &+ 1 { return c.windowPeak }
            if window == c.migrationWindow { return c.previousWindowPeak }
            return 0
        }
    }

    /// Milliseconds since the region was created (wrapping): the time base of page histories.
    @inline(__always) func nowStamp() -> UInt32 { UInt32(truncatingIfNeeded: (monotonicNanoseconds() - createdAt) / 1_000_000) }

    /// Whether the region (or the agent) is above its high watermark.
    public var needsEviction: Bool { residentPages > highPages }
    public var aboveLowWatermark: Bool { residentPages > lowPages }
}

// MARK: - Fault service

extension Region {
    /// Serves one page fault. Runs on a fault thread.
    /// - Returns: true when the caller should wake the evictor (above a high watermark).
    @discardableResult
    public func handleFault(address: UInt64, write: Bool, writeProtect: Bool, thread: UInt32 = 0, staging: StagingBuffer,
                            evictStaging: StagingBuffer) -> Bool
    {
        guard gate.enter() else { return false }
        defer { gate.leave() }
        return serveFault(address: address, write: write, writeProtect: writeProtect, thread: thread, staging: staging,
                          evictStaging: evictStaging)
    }

    private func serveFault(address: UInt64, write: Bool, writeProtect: Bool, thread: UInt32, staging: StagingBuffer,
                            evictStaging: StagingBuffer) -> Bool
    {
        let pageAddress = address & ~UInt64(spec.pageSize - 1)
        guard pageAddress >= spec.address, pageAddress - spec.address < spec.length else {
            logger.warning("fault outside the region", metadata: ["fp.address": "\(address)"])
            return false
        }
        let page = Int((pageAddress - spec.address) / UInt64(spec.pageSize))

        if writeProtect {
            counters.writeProtectFaults.bump()
            let action = core.withLock { c in PageTransitions.writeProtectFault(&c.table[page]) }
            switch action {
            case .unprotect:
                do {
                    try uffd.writeProtect(address: pageAddress, length: UInt64(spec.pageSize), enable: false)
                } catch {
                    logger.error("unprotecting a page failed", metadata: ["fp.error": "\(error)"])
                }
                // Only now may the page be evicted again (see PageEntry.unprotectPending).
                core.withLock { c in PageTransitions.unprotected(&c.table[page]) }
            case .wake: uffd.wake(address: pageAddress, length: UInt64(spec.pageSize))
            default: break
            }
            return false
        }

        counters.missingFaults.bump()
        // Direct reclaim: never install past the region's budget.
        if residentPages >= budgetPages { _ = evict(maxPages: policy.evictBatch, staging: evictStaging, force: true) }
        let action = core.withLock { c in PageTransitions.missingFault(&c.table[page]) }
        if case .drop = action { return residentPages > highPages || agentBudget.residentPages > agentBudget.highPages }
        let plan = prefetchPlan(after: page, thread: thread)
        switch action {
        case .zeroFill:
            counters.zeroFills.bump()
            install(page: page, from: zeroPage, writable: write)
        case .fetch(let location):
            if let plan {
                // In a stream, the faulting page heads the fetch-ahead batch: it comes back
                // with the first chunk, and the rest streams in behind it.
                prefetch(from: page, demand: location, plan: plan, writable: write, staging: staging, thread: thread)
                return residentPages > highPages || agentBudget.residentPages > agentBudget.highPages
            }
            fetchAndInstall(page: page, location: location, writable: write, staging: staging, thread: thread)
        case .poison:
            do { try uffd.poison(address: pageAddress, length: UInt64(spec.pageSize), thread: thread) } catch {
                logger.error("poisoning a lost page failed", metadata: ["fp.error": "\(error)"])
            }
        case .wake: uffd.wake(address: pageAddress, length: UInt64(spec.pageSize))
        case .drop, .unprotect: break
        }
        // A stream of writes gets its pages writable (dirty): installed write-protected,
        // each would take a second fault on its first write.
        if let plan { prefetch(from: page, demand: nil, plan: plan, writable: write, staging: staging) }
        return residentPages > highPages || agentBudget.residentPages > agentBudget.highPages
    }

    /// Reads one far page into `staging.page(0)`; the store's error when it could not.
    private func fetchOne(_ location: PageLocation, into staging: StagingBuffer) -> StoreError? {
        let batch = PageIOBatch(kind: .read, capacity: 1)
        batch.append(buffer: staging.page(0), location: location)
        store.submitAndWait(batch)
        return batch.errors.first.flatMap { $0 }
    }

    /// Whether a fault whose read failed with `error` waits for its tier: it is down but may
    /// come back (a memory server stopped answering; it keeps our leases through its grace).
    private func mayWait(_ error: StoreError, _ location: PageLocation) -> Bool {
        error.code != .lost && policy.outageWaitMilliseconds > 0 && store.mayComeBack(location)
    }

    private func fetchAndInstall(page: Int, location: PageLocation, writable: Bool, staging: StagingBuffer, thread: UInt32 = 0) {
        var attempt = 0
        while let error = fetchOne(location, into: staging) {
            attempt += 1
            // The fault waits for the tier off this thread, which goes on serving other pages.
            if mayWait(error, location) {
                wait(page: page, location: location, writable: writable, thread: thread, since: monotonicNanoseconds(),
                     error: error)
                return
            }
            // A page gone for good is poisoned at once; one the tier cannot reach now is retried.
            if attempt >= 3 || error.code == .lost {
                giveUp(page: page, error: error, thread: thread)
                return
            }
            // A moment before trying again (50 ms, then 100 ms), so that a connection reset or a
            // server's brief stall does not cost the page its last tries.
            usleep(UInt32(attempt) * 50_000)
        }
        counters.fetches.bump()
        install(page: page, from: staging.page(0), writable: writable)
    }

    /// Poisons a page its far tier could not return (the client gets SIGBUS on touch).
    /// - Parameter thread: the faulting thread (signalled instead on kernels without UFFDIO_POISON).
    private func giveUp(page: Int, error: StoreError, thread: UInt32) {
        logger.error(
            "far tier could not return a page; poisoning it (the client gets SIGBUS on touch)",
            metadata: ["fp.page": "\(page)", "fp.error": "\(error)"])
        counters.lostPages.bump()
        core.withLock { c in
            PageTransitions.fetchFailed(&c.table[page])
            c.far -= 1
        }
        try? uffd.poison(address: address(ofPage: page), length: UInt64(spec.pageSize), thread: thread)
    }

    /// Leaves a fault unresolved until its far tier is back: the page stays *fetching* (other
    /// faults on it wait too), the client's thread stays blocked in the kernel, and the fault
    /// thread goes on serving other pages.
    private func wait(page: Int, location: PageLocation, writable: Bool, thread: UInt32, since: UInt64, error: StoreError) {
        let first = core.withLock { c -> Bool in
            c.waiting.append(WaitingFault(page: page, location: location, writable: writable, thread: thread, since: since))
            waitingFaults.store(c.waiting.count, ordering: .relaxed)
            return c.waiting.count == 1
        }
        counters.outageWaits.bump()
        if first {
            logger.warning(
                "far tier unreachable; faults on its pages wait for it to come back (up to outage_wait) instead of failing",
                metadata: ["fp.region": "\(spec.name)", "fp.error": "\(error)"])
        }
    }

    /// Faults waiting for their far tier: retried once it answers again, poisoned when it is
    /// gone for good or `outageWaitMilliseconds` ran out. Call periodically (any one thread).
    public func retryWaitingFaults(staging: StagingBuffer) {
        guard waitingFaults.load(ordering: .relaxed) > 0, gate.enter() else { return }
        defer { gate.leave() }
        let waiting = core.withLock { c -> [WaitingFault] in
            defer { c.waiting.removeAll() }
            return c.waiting
        }
        var still: [WaitingFault] = []
        let now = monotonicNanoseconds()
        let limit = UInt64(policy.outageWaitMilliseconds) * 1_000_000
        for w in waiting {
            let expired = now - w.since >= limit
            // Still failed (and not given up on): not back yet, no read to try.
            if !expired && store.mayComeBack(w.location) {
                still.append(w)
                continue
            }
            if let error = fetchOne(w.location, into: staging) {
                if !expired && mayWait(error, w.location) {
                    still.append(w)
                } else {
                    let why = expired
                        ? StoreError(error.code, "\(error.message); waited \(policy.outageWaitMilliseconds / 1000) s ([pool] outage_wait)")
                        : error
                    giveUp(page: w.page, error: why, thread: w.thread)
                }
                continue
            }
            counters.fetches.bump()
            // Off the region's fault thread: a write-protect fault between the copy and the
            // commit would see *fetching* and be dropped; the wake after the commit retries it.
            install(page: w.page, from: staging.page(0), writable: w.writable, wakeAfterCommit: true)
        }
        let left = core.withLock { c -> Int in
            c.waiting += still
            waitingFaults.store(c.waiting.count, ordering: .relaxed)
            return c.waiting.count
        }
        if left == 0 && !waiting.isEmpty {
            logger.notice("faults that waited for the far tier are served", metadata: ["fp.region": "\(spec.name)", "fp.faults": "\(waiting.count)"])
        }
    }

    /// Installs one page with `UFFDIO_COPY` and records it resident.
    /// - Parameter wakeAfterCommit: wake the page's waiters once its state is committed. Needed
    ///   when installing off the region's fault thread: a write-protect fault raised between the
    ///   copy and the commit sees *fetching* and is dropped, and only this wake retries it.
    private func install(page: Int, from source: UnsafeRawPointer, writable: Bool, prefetch: Bool = false,
                         wakeAfterCommit: Bool = false)
    {
        var result: Userfaultfd.InstallResult
        var failed = false
        do {
            result = try uffd.copy(to: address(ofPage: page), from: source, length: spec.pageSize,
                                   writeProtect: !writable)
        } catch {
            // ENOMEM (the client's cgroup is full), EFAULT...: give the page back to its previous
            // state and wake the faulting thread, which faults again and retries.
            logger.error("installing a page failed", metadata: ["fp.page": "\(page)", "fp.error": "\(error)"])
            result = .clientGone
            failed = true
        }
        let now = nowStamp()
        core.withLock { c in
            var e = c.table[page]
            let wasFar = e.location != nil
            switch result {
            case .installed, .alreadyPresent:
                PageTransitions.installed(&e, writable: writable, foreign: result == .alreadyPresent)
                if wasFar { c.far -= 1 }
                c.resident += 1
                admit(&c, &e, page, fromFar: wasFar, speculative: prefetch, now: now)
            case .clientGone:
                PageTransitions.installAbandoned(&e)
            }
            c.table[page] = e
        }
        switch result {
        case .installed, .alreadyPresent:
            agentBudget.add(1)
            if result == .alreadyPresent {
                counters.foreignPages.bump()
                logger.warning("a page was already present in the memfd (populated outside the agent)",
                               metadata: ["fp.page": "\(page)"])
            }
            if prefetch { counters.prefetchedPages.bump() }
        case .clientGone: break
        }
        // UFFDIO_COPY wakes waiters only when it succeeds: after EEXIST or an error they must be
        // woken here, or the faulting thread sleeps forever.
        if result == .alreadyPresent || failed || wakeAfterCommit {
            uffd.wake(address: address(ofPage: page), length: UInt64(spec.pageSize))
        }
    }

    /// Pages a fetch-ahead batch asks the store for per read (after a smaller first one).
    static let fetchChunkPages = 64

    /// Fetches the pages after `page` in one store batch and installs them, clean and
    /// write-protected, one `UFFDIO_COPY` per run of consecutive pages, as each chunk arrives.
    /// With `demand`, `page` itself (already claimed by its fault) heads the batch and is
    /// installed first. Never goes past the region's budget (prefetch must not push the
    /// working set out).
    /// - Parameter speculative: false for pages the client declared it will use (a stream hint).
    private func prefetch(from page: Int, demand: PageLocation?, plan: StrideDetector.Issue, writable: Bool, staging: StagingBuffer,
                          speculative: Bool = true, thread: UInt32 = 0)
    {
        let room = budgetPages - 1 - residentPages
        let window = max(0, min(plan.count, staging.pages - 1, room))
        // The planned pages inside the region, in ascending order (runs install with one ioctl).
        let planned = (0..<window).map { plan.first + $0 * plan.stride }.filter { $0 >= 0 && $0 < pageCount }.sorted()
        // Claim every far or untouched page of the window at once.
        var claimed: [(page: Int, location: PageLocation?)] = []
        if let demand { claimed.append((page, demand)) }
        if !planned.isEmpty {
            core.withLock { c in
                for next in planned {
                    let e = c.table[next]
                    guard e.state == .far || e.state == .untouched else { continue }
                    // Prefetched and evicted unused within the last budget's worth of
                    // evictions: fetching it again would make it ping-pong.
                    if e.wasted, speculative, c.evictionSeq &- c.table.history(next).stamp <= UInt32(budgetPages) { continue }
                    switch PageTransitions.missingFault(&c.table[next]) {
                    case .zeroFill: claimed.append((next, nil))
                    case .fetch(let l): claimed.append((next, l))
                    default: break
                    }
                }
            }
        }
        guard !claimed.isEmpty else { return }
        // Page i of the claim goes to staging page i; zero pages are filled here.
        let batch = PageIOBatch(kind: .read, capacity: claimed.count)
        var inBatch = [Int](repeating: -1, count: claimed.count)
        for (i, c) in claimed.enumerated() {
            if let l = c.location {
                inBatch[i] = batch.count
                batch.append(buffer: staging.page(i), location: l)
            } else {
                memset(staging.page(i), 0, spec.pageSize)
            }
        }
        var done = 0  // claimed pages handled so far
        var demandFailed = false
        var fetched = 0
        // Installs claimed pages [done, upTo): runs of consecutive pages in one UFFDIO_COPY;
        // pages whose read failed go back to far (the demand fault retries, and poisons if lost).
        func installClaimed(upTo end: Int) {
            var failed: [Int] = []
            var i = done
            while i < end {
                let ok = inBatch[i] < 0 || batch.errors[inBatch[i]] == nil
                if inBatch[i] >= 0 && ok { fetched += 1 }
                if !ok {
                    if demand != nil && i == 0 { demandFailed = true } else { failed.append(i) }
                    i += 1
                    continue
                }
                if demand != nil && i == 0 {
                    counters.fetches.bump()
                    install(page: page, from: staging.page(0), writable: writable)
                    i += 1
                    continue
                }
                var j = i + 1
                while j < end, claimed[j].page == claimed[j - 1].page + 1, inBatch[j] < 0 || batch.errors[inBatch[j]] == nil {
                    if inBatch[j] >= 0 { fetched += 1 }
                    j += 1
                }
                installRun(claimed[i].page, count: j - i, from: staging.page(i), writable: writable, speculative: speculative)
                i = j
            }
            if !failed.isEmpty {
                core.withLock { c in for k in failed { PageTransitions.installAbandoned(&c.table[claimed[k].page]) } }
            }
            done = end
        }
        if batch.count > 0 {
            store.read(batch, chunkPages: Self.fetchChunkPages) { completeInBatch in
                // Claimed pages up to the first one still in flight.
                var end = done
                while end < claimed.count, inBatch[end] < completeInBatch { end += 1 }
                if end > done { installClaimed(upTo: end) }
            }
        }
        installClaimed(upTo: claimed.count)
        counters.fetches.bump(UInt64(max(0, fetched - (demand != nil && !demandFailed ? 1 : 0))))
        if demandFailed, let demand {
            // The demand page alone, with its retries (and poison when it is lost).
            fetchAndInstall(page: page, location: demand, writable: writable, staging: staging, thread: thread)
        }
    }

    /// Installs `count` consecutive pages with one `UFFDIO_COPY` (clean and write-protected
    /// unless `writable`). Falls back to page by page when the kernel stops part way.
    private func installRun(_ first: Int, count: Int, from source: UnsafeRawPointer, writable: Bool, speculative: Bool) {
        let result: Userfaultfd.InstallResult
        do {
            result = try uffd.copy(to: address(ofPage: first), from: source, length: count * spec.pageSize,
                                   writeProtect: !writable)
        } catch {
            result = .alreadyPresent  // retry page by page: each reports its own outcome
        }
        guard result == .installed else {
            for k in 0..<count { install(page: first + k, from: source + k * spec.pageSize, writable: writable, prefetch: true) }
            return
        }
        let now = nowStamp()
        core.withLock { c in
            for k in 0..<count {
                var e = c.table[first + k]
                let wasFar = e.location != nil
                PageTransitions.installed(&e, writable: writable)
                if wasFar { c.far -= 1 }
                c.resident += 1
                admit(&c, &e, first + k, fromFar: wasFar, speculative: speculative, now: now)
                c.table[first + k] = e
            }
        }
        agentBudget.add(count)
        counters.prefetchedPages.bump(UInt64(count))
    }

    /// What to fetch ahead of a missing fault on `page` (nil: nothing). The faulting thread's
    /// stride detector (majority vote over its recent fault deltas) decides first; failing a
    /// trend, region-wide sequential-stream detection (several threads sweeping together
    /// fault slightly out of order) or a SEQUENTIAL hint. The verdicts on earlier prefetches
    /// confirm used pages and doom wasted ones; when most prefetched pages go unused,
    /// prefetch backs off to one page.
    func prefetchPlan(after page: Int, thread: UInt32) -> StrideDetector.Issue? {
        core.withLock { c in
            let hinted = c.sequential.contains { $0.contains(page) }
            var plan: StrideDetector.Issue? = nil
            if policy.prefetch && !c.random {
                let (verdict, next) = c.streams.fault(thread: thread, page: page, initialWindow: policy.sequentialWindow,
                                                      maxWindow: policy.maxPrefetchWindow)
                judge(&c, verdict)
                plan = next
            }
            // Region-wide stream: a fault just after the previous one (or just past what was
            // fetched ahead) continues it and doubles the window; anything else resets it.
            let continues = c.lastFault >= 0 && page + 8 > c.lastFault && page <= c.lastFault + c.window + 1
            if continues {
                c.streak += 1
                if page > c.lastFault + 1 {  // the ahead-fetch was used up
                    confirm(&c, (c.lastFault + 1)..<page)
                    c.window = min(c.window * 2, policy.maxPrefetchWindow)
                }
                c.lastFault = max(c.lastFault, page)
            } else {
                c.streak = 0
                c.window = policy.sequentialWindow
                c.lastFault = page
            }
            if plan == nil, hinted || (policy.prefetch && !c.random && c.streak >= 2) {
                plan = StrideDetector.Issue(first: page + 1, stride: 1, count: c.window)
            }
            if var p = plan, !hinted, c.accuracy.backingOff {
                p.count = 1
                plan = p
            }
            return plan
        }
    }

    /// Applies a stride detector's verdict on its previous prefetch.
    private func judge(_ c: inout Core, _ verdict: StrideDetector.Verdict) {
        switch verdict {
        case .none: break
        case .hit(let issue):
            for page in issue.pages where page >= 0 && page < pageCount { unspeculate(&c, page) }
        case .miss(let issue):
            // Pages still untouched are likely wasted: they go before anything else.
            for page in issue.pages where page >= 0 && page < pageCount {
                var e = c.table[page]
                guard e.state == .resident, e.speculative, !e.doomed else { continue }
                e.doomed = true
                c.reclaimFirst.push(page)
                c.table[page] = e
            }
        }
    }

    /// The stream went past `pages`: those fetched ahead were used.
    private func confirm(_ c: inout Core, _ pages: Range<Int>) {
        for page in pages.clamped(to: 0..<pageCount).suffix(policy.maxPrefetchWindow) { unspeculate(&c, page) }
    }

    private func unspeculate(_ c: inout Core, _ page: Int) {
        var e = c.table[page]
        guard e.speculative else { return }
        e.speculative = false
        c.table[page] = e
        c.accuracy.record(used: 1)
        counters.prefetchHits.bump()
    }

    /// Records a page that just became resident: its history (a refault within a budget's
    /// worth of evictions makes it active), its migration count, and its queue.
    func admit(_ c: inout Core, _ e: inout PageEntry, _ page: Int, fromFar: Bool, speculative: Bool, now: UInt32) {
        var h = c.table.history(page)
        var activate = false
        if fromFar {
            // Hot: faulted back within half the active queue's share of evictions (as Linux
            // compares a refault's distance with its active list).
            let threshold = max(16, Int(Double(budgetPages) * policy.activeFraction) / 2)
            activate = policy.classify && !speculative && c.evictionSeq &- h.stamp <= UInt32(threshold)
            countMigration(&c, &h, now)
        }
        h.stamp = now
        c.table.setHistory(page, h)
        e.speculative = speculative
        e.wasted = false
        if activate { counters.refaultActivations.bump() }
        if !e.queued {
            e.queued = true
            e.active = activate
            if activate { c.active.push(page) } else { c.inactive.push(page) }
        } else if activate {
            e.referenced = true  // promoted when its queue entry comes up
        }
    }

    /// The number (wrapping) of the migration window that `now` falls in.
    func migrationWindow(at now: UInt32) -> UInt16 {
        UInt16(truncatingIfNeeded: Int(now) / max(1, policy.migrationWindowMilliseconds))
    }

    func countMigration(_ c: inout Core, _ h: inout PageHistory, _ now: UInt32) {
        let window = migrationWindow(at: now)
        let n = h.countMigration(window: window)
        if n > c.peakMigrations { c.peakMigrations = n }
        if window != c.migrationWindow {
            c.previousWindowPeak = window == c.migrationWindow &+ 1 ? c.windowPeak : 0
            c.migrationWindow = window
            c.windowPeak = 0
        }
        if n > c.windowPeak { c.windowPeak = n }
        counters.migrations.bump()
    }
}

// MARK: - Eviction

extension Region {
    /// Evicts up to `maxPages` cold pages by the protocol in DESIGN.md: write-protect, copy out,
    /// store, punch; a write fault in between cancels a page's eviction. Returns pages freed.
    /// - Parameter force: direct reclaim at the hard budget: the minimum residence time yields.
    public func evict(maxPages: Int, staging: StagingBuffer, force: Bool = false) -> Int {
        guard gate.enter() else { return 0 }
        defer { gate.leave() }
        let limit = min(maxPages, staging.pages)
        // Hysteresis: background eviction (the watermarks) never moves a page again before its
        // minimum residence time; only the hard budget (the region's, in direct reclaim, or
        // the agent's) may take young pages.
        let overrideResidence = force || agentBudget.residentPages >= agentBudget.budgetPages
        var victims = core.withLock { c in chooseVictims(&c, limit: limit, overrideResidence: overrideResidence) }
        guard !victims.isEmpty else { return 0 }
        victims.sort { $0.page < $1.page }

        // 1. Write-protect the modified pages (clean ones are mapped protected already).
        //    From here on a client write blocks in a WP fault, which cancels that page.
        let dirty = victims.indices.filter { victims[$0].kind == .writeBack }
        var protectFailed = false
        forEachRun(dirty.map { victims[$0].page }) { start, count in
            do {
                try uffd.writeProtect(address: address(ofPage: start), length: UInt64(count * spec.pageSize),
                                      enable: true)
            } catch {
                logger.error("write-protecting pages for eviction failed", metadata: ["fp.error": "\(error)"])
                protectFailed = true
            }
        }
        if protectFailed {
            core.withLock { c in for v in victims { abortEviction(&c, v.page) } }
            return 0
        }

        // 2. Copy out through the page cache (never through a mapping: see docs/decisions.md).
        let batch = PageIOBatch(kind: .write, capacity: dirty.count)
        var slot = 0
        var stagingIndex = [Int](repeating: -1, count: victims.count)
        var zero = [Bool](repeating: false, count: victims.count)
        var readFailed = false
        forEachRun(dirty.map { victims[$0].page }) { start, count in
            let dest = staging.page(slot)
            do {
                let n = try Memfd.read(memfd, into: dest, length: count * spec.pageSize,
                                       offset: UInt64(start * spec.pageSize))
                if n != count * spec.pageSize { readFailed = true }
            } catch {
                logger.error("reading pages for eviction failed", metadata: ["fp.error": "\(error)"])
                readFailed = true
            }
            slot += count
        }
        if readFailed {
            core.withLock { c in for v in victims { abortEviction(&c, v.page) } }
            return 0
        }
        let existing = core.withLock { c in dirty.map { c.table[victims[$0].page].location } }
        for (n, i) in dirty.enumerated() {
            stagingIndex[i] = n
            if isZeroPage(staging.page(n), spec.pageSize) {
                zero[i] = true
            } else {
                batch.append(buffer: staging.page(n), location: existing[n])
            }
        }

        // 3. Store, and wait until the far copies are durable.
        if batch.count > 0 { store.submitAndWait(batch) }
        var batchIndex = [Int](repeating: -1, count: victims.count)
        var b = 0
        for i in dirty where !zero[i] {
            batchIndex[i] = b
            b += 1
        }

        // 4. Decide per page under the lock: a cancelled page stays; the rest get punched.
        var toPunch: [Int] = []
        var release: [PageLocation] = []
        var failed = 0
        core.withLock { c in
            for (i, v) in victims.enumerated() {
                var e = c.table[v.page]
                var stored: PageLocation? = nil
                switch v.kind {
                case .clean: stored = e.location
                case .zero: stored = nil
                case .writeBack:
                    if zero[i] {
                        if let l = e.location, !e.cancel {
                            release.append(l)
                            e.location = nil
                        }
                    } else {
                        let bi = batchIndex[i]
                        if let err = batch.errors[bi] {
                            _ = err
                            failed += 1
                            PageTransitions.evictionFailed(&e)
                            requeue(&c, &e, v.page)
                            c.table[v.page] = e
                            continue
                        }
                        stored = batch.locations[bi]
                    }
                }
                let wasCancelled = e.cancel
                if PageTransitions.copiedOut(&e, stored: stored) {
                    toPunch.append(v.page)
                } else {
                    requeue(&c, &e, v.page)
                    if wasCancelled { counters.cancelledEvictions.bump() }
                }
                c.table[v.page] = e
            }
        }
        if failed > 0 {
            logger.warning("far tier refused pages; they stay resident", metadata: ["fp.pages": "\(failed)"])
        }
        store.release(release)

        // 5. Punch the local copies: frees the memory and zaps the client's mapping.
        var unpunched: [Int] = []
        forEachRun(toPunch) { start, count in
            do {
                try Memfd.punchHole(memfd, offset: UInt64(start * spec.pageSize), length: UInt64(count * spec.pageSize))
            } catch {
                logger.error("punching evicted pages failed; they stay resident", metadata: ["fp.error": "\(error)"])
                unpunched += start..<(start + count)
            }
        }
        var writebacks = 0
        var cleans = 0
        var zeros = 0
        core.withLock { c in
            for page in unpunched {
                var e = c.table[page]
                PageTransitions.punchFailed(&e)
                requeue(&c, &e, page)
                c.table[page] = e
            }
        }
        if !unpunched.isEmpty {
            forEachRun(unpunched) { start, count in
                uffd.wake(address: address(ofPage: start), length: UInt64(count * spec.pageSize))
            }
            toPunch = toPunch.filter { !unpunched.binarySearchContains($0) }
        }
        let now = nowStamp()
        core.withLock { c in
            for page in toPunch {
                var e = c.table[page]
                let unused = e.speculative
                PageTransitions.punched(&e)
                e.wasted = unused && e.state == .far
                c.table[page] = e
                c.resident -= 1
                if e.state == .far { c.far += 1 }
                var h = c.table.history(page)
                countMigration(&c, &h, now)
                h.stamp = c.evictionSeq
                c.evictionSeq &+= 1
                c.table.setHistory(page, h)
            }
        }
        for (i, v) in victims.enumerated() where toPunch.binarySearchContains(v.page) {
            switch v.kind {
            case .writeBack: if zero[i] { zeros += 1 } else { writebacks += 1 }
            case .clean: cleans += 1
            case .zero: zeros += 1
            }
        }
        agentBudget.add(-toPunch.count)
        counters.evictions.bump(UInt64(toPunch.count))
        counters.writebacks.bump(UInt64(writebacks))
        counters.cleanEvictions.bump(UInt64(cleans))
        counters.zeroEvictions.bump(UInt64(zeros))
        // 6. Faults that arrived while pages were punching were dropped: wake them to refault.
        forEachRun(toPunch) { start, count in
            uffd.wake(address: address(ofPage: start), length: UInt64(count * spec.pageSize))
        }
        return toPunch.count
    }

    /// Picks up to `limit` victims and marks them evicting: prefetched pages judged wasted
    /// first, then the inactive queue (oldest first; a written page gets promoted instead),
    /// then the active one. Young pages are passed over unless `overrideResidence`, and taken
    /// only when nothing else is left.
    private func chooseVictims(_ c: inout Core, limit: Int, overrideResidence: Bool) -> [(page: Int, kind: EvictionKind)] {
        var victims: [(page: Int, kind: EvictionKind)] = []
        victims.reserveCapacity(limit)
        let now = nowStamp()
        let minResidence = UInt32(max(0, policy.minResidenceMilliseconds))
        /// `orphan`: taken from the reclaim-first queue, so its inactive entry stays behind.
        func take(_ page: Int, _ e: inout PageEntry, orphan: Bool = false) -> Bool {
            guard var kind = PageTransitions.beginEviction(&e) else { return false }
            // A clean page whose far copy cannot be read now (its server failed) is written
            // again instead of only punched: the local copy may be the only good one left. So is
            // one used since it came from a slow tier, when the store promotes it (a prefetched
            // page nobody used is not promoted).
            if kind == .clean, let l = e.location, e.speculative ? !store.isReadable(l) : store.rewriteOnEviction(l) {
                kind = .writeBack
            }
            if e.speculative {
                c.accuracy.record(wasted: 1)
                counters.prefetchWasted.bump()
            }
            e.queued = false
            e.active = false
            e.orphaned = orphan
            c.table[page] = e
            victims.append((page, kind))
            return true
        }
        // 1. Prefetched pages nobody used (their inactive entry is left behind, orphaned; a page
        //    with an orphan entry already waits for the ordinary scan). Not before their
        //    minimum residence either: prefetch must not make pages ping-pong.
        var doomedYoung: [Int] = []
        while victims.count < limit, let page = c.reclaimFirst.pop() {
            var e = c.table[page]
            e.doomed = false
            c.table[page] = e
            guard e.state == .resident, e.speculative, !e.orphaned else { continue }
            if !overrideResidence, minResidence > 0, now &- c.table.history(page).stamp < minResidence {
                doomedYoung.append(page)
                if doomedYoung.count > limit + 64 { break }
                continue
            }
            _ = take(page, &e, orphan: true)
        }
        for page in doomedYoung.reversed() {
            c.table[page].doomed = true
            c.reclaimFirst.pushFront(page)
        }
        // 2. Keep the active queue within its share: its oldest pages move to inactive.
        let activeTarget = Int(Double(budgetPages) * policy.activeFraction)
        var rotations = c.active.count
        while c.active.count > activeTarget, rotations > 0, let page = c.active.pop() {
            rotations -= 1
            var e = c.table[page]
            if skipOrphan(&c, &e, page) { continue }
            guard e.state == .resident || e.state == .evicting || e.state == .fetching else {
                e.queued = false
                e.active = false
                c.table[page] = e
                continue
            }
            if e.referenced {
                e.referenced = false
                c.active.push(page)
            } else {
                e.active = false
                c.inactive.push(page)
            }
            c.table[page] = e
        }
        // 3. Inactive, then active, oldest first.
        var young: [(page: Int, activeQueue: Bool)] = []
        for activeQueue in [false, true] where victims.count < limit {
            var scanned = 0
            var youngInQueue = 0
            let scanLimit = (activeQueue ? c.active.count : c.inactive.count) * 2
            while victims.count < limit, scanned < scanLimit,
                let page = activeQueue ? c.active.pop() : c.inactive.pop()
            {
                scanned += 1
                var e = c.table[page]
                if skipOrphan(&c, &e, page) { continue }
                guard e.state == .resident else {
                    e.queued = false
                    e.active = false
                    c.table[page] = e
                    continue
                }
                if e.referenced {  // written since it arrived: promote (or second chance)
                    e.referenced = false
                    if policy.classify || activeQueue {
                        e.active = true
                        c.active.push(page)
                    } else {
                        c.inactive.push(page)
                    }
                    c.table[page] = e
                    continue
                }
                if minResidence > 0, now &- c.table.history(page).stamp < minResidence {
                    young.append((page, activeQueue))  // held out of its queue until the scan ends
                    youngInQueue += 1
                    // Queues are oldest first: past a run of young pages, the rest are younger.
                    if youngInQueue > limit + 64 { break }
                    continue
                }
                if !take(page, &e) {
                    if activeQueue { c.active.push(page) } else { c.inactive.push(page) }  // an un-protect is in flight
                }
            }
        }
        // 4. Young pages: taken only when the budget insists, oldest first; the rest go back.
        var back: [(page: Int, activeQueue: Bool)] = []
        for (page, activeQueue) in young {
            var e = c.table[page]
            if overrideResidence, victims.count < limit, e.state == .resident, take(page, &e) {
                counters.residenceOverrides.bump()
                continue
            }
            back.append((page, activeQueue))
        }
        // Back at the head of their queues, in their order: they are still the oldest.
        for (page, activeQueue) in back.reversed() {
            if activeQueue { c.active.pushFront(page) } else { c.inactive.pushFront(page) }
        }
        return victims
    }

    /// Whether a popped queue entry is the one abandoned by a reclaim-first eviction (it is
    /// the page's older entry, so it always comes up first). Clears the mark.
    private func skipOrphan(_ c: inout Core, _ e: inout PageEntry, _ page: Int) -> Bool {
        guard e.orphaned else { return false }
        e.orphaned = false
        c.table[page] = e
        return true
    }

    private func abortEviction(_ c: inout Core, _ page: Int) {
        var e = c.table[page]
        PageTransitions.evictionFailed(&e)
        requeue(&c, &e, page)
        c.table[page] = e
    }

    private func requeue(_ c: inout Core, _ e: inout PageEntry, _ page: Int) {
        if !e.queued {
            e.queued = true
            if e.active { c.active.push(page) } else { c.inactive.push(page) }
        }
    }

    func forEachRun(_ pages: [Int], _ body: (Int, Int) -> Void) { FarpagePaging.forEachRun(pages, body) }
}

// MARK: - Advice

/// `farpage_advise` hints.
public enum AdviceHint: UInt32, Sendable {
    case normal = 0
    case sequential = 1
    case willNeed = 2
    case dontNeed = 3
    case random = 4
    /// The client unmapped the range (a partial munmap): dropped as by DONTNEED, then the
    /// pages are marked so that nothing (fetch-ahead above all) ever installs there again:
    /// the kernel may give those addresses to another registered mapping of the process.
    case gone = 5
    /// The range is read next, in order (the next layer): marked sequential, and fetched in
    /// the background by the agent's stream thread (`Region.streamFetch`); the call returns at once.
    case stream = 6
}

extension Region {
    /// Applies a hint to pages [first, first+count). Runs on the control thread.
    /// - Returns: false when `DONTNEED` left pages in flight (they keep their data; the
    ///   client is told to retry).
    @discardableResult
    public func advise(firstPage: Int, count: Int, hint: AdviceHint, staging: StagingBuffer, evictStaging: StagingBuffer) -> Bool {
        guard gate.enter() else { return true }
        defer { gate.leave() }
        let range = firstPage..<(firstPage + count)
        switch hint {
        case .normal, .random:
            core.withLock { c in
                c.sequential.removeAll { $0.overlaps(range) }
                // RANDOM over the whole region turns stream detection off; NORMAL turns it back on.
                if range.count == pageCount { c.random = hint == .random }
            }
        case .sequential, .stream:
            core.withLock { c in
                c.sequential.removeAll { $0.overlaps(range) }
                if c.sequential.count < 64 { c.sequential.append(range) }
            }
        case .willNeed:
            // Bring far pages back, clean, making room by evicting the coldest pages. At most
            // the low watermark's worth: more would evict the range's own first pages.
            for page in range.prefix(max(1, lowPages)) {
                if isClosed { break }
                if residentPages >= budgetPages - 1, evict(maxPages: policy.evictBatch, staging: evictStaging, force: true) == 0 { break }
                let action = core.withLock { c -> FaultAction? in
                    guard c.table[page].state == .far else { return nil }
                    return PageTransitions.missingFault(&c.table[page])
                }
                if case .fetch(let location) = action {
                    let batch = PageIOBatch(kind: .read, capacity: 1)
                    batch.append(buffer: staging.page(0), location: location)
                    store.submitAndWait(batch)
                    if batch.errors[0] != nil {
                        core.withLock { c in PageTransitions.installAbandoned(&c.table[page]) }
                        continue
                    }
                    counters.fetches.bump()
                    install(page: page, from: staging.page(0), writable: false, prefetch: true, wakeAfterCommit: true)
                }
            }
        case .dontNeed, .gone:
            var release: [PageLocation] = []
            var punch: [Int] = []
            var pending = Array(range)
            // Pages in flight (being evicted, punched or installed) finish within microseconds;
            // retry them so that the whole range reads as zeros afterwards.
            for attempt in 0..<1000 where !pending.isEmpty {
                if attempt > 0 { usleep(100) }
                pending = core.withLock { c in
                    var busy: [Int] = []
                    for page in pending {
                        var e = c.table[page]
                        let wasFar = e.state == .far
                        guard let (location, needsPunch) = PageTransitions.drop(&e) else {
                            busy.append(page)
                            continue
                        }
                        if let location { release.append(location) }
                        if needsPunch { punch.append(page) }
                        if wasFar { c.far -= 1 }
                        c.table[page] = e
                    }
                    return busy
                }
            }
            if !pending.isEmpty {
                logger.warning("DONTNEED left pages that stayed in flight; the client retries",
                               metadata: ["fp.pages": "\(pending.count)"])
            }
            punch.sort()
            store.release(release)
            var unpunched: [Int] = []
            forEachRun(punch) { start, n in
                do {
                    try Memfd.punchHole(memfd, offset: UInt64(start * spec.pageSize), length: UInt64(n * spec.pageSize))
                } catch {
                    logger.error("DONTNEED could not drop pages; they keep their data", metadata: ["fp.error": "\(error)"])
                    unpunched += start..<(start + n)
                }
            }
            core.withLock { c in
                for page in unpunched { PageTransitions.punchFailed(&c.table[page]) }
                for page in punch where !unpunched.contains(page) {
                    PageTransitions.punched(&c.table[page])
                    c.resident -= 1
                }
            }
            punch = punch.filter { !unpunched.contains($0) }
            agentBudget.add(-punch.count)
            forEachRun(punch) { start, n in uffd.wake(address: address(ofPage: start), length: UInt64(n * spec.pageSize)) }
            if hint == .gone {
                core.withLock { c in
                    for page in range where c.table[page].state == .untouched {
                        var e = c.table[page]
                        e.state = .lost
                        c.table[page] = e
                    }
                    // Merged, so the list stays as short as the region's holes.
                    var all = (c.gone + [range]).sorted { $0.lowerBound < $1.lowerBound }
                    var merged: [Range<Int>] = []
                    for r in all {
                        if let last = merged.last, r.lowerBound <= last.upperBound {
                            merged[merged.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
                        } else {
                            merged.append(r)
                        }
                    }
                    all = merged
                    c.gone = all
                }
            }
            return pending.isEmpty
        }
        return true
    }

    /// Fetches far pages of [first, first+count) ahead of use, clean, in batches of
    /// consecutive pages (one streaming store read and one `UFFDIO_COPY` per run each), making
    /// room by evicting the oldest pages: the client declared the range its next working set.
    /// At most the low watermark's worth. Runs on the agent's stream thread.
    public func streamFetch(firstPage: Int, count: Int, staging: StagingBuffer, evictStaging: StagingBuffer) {
        guard gate.enter() else { return }
        defer { gate.leave() }
        let range = (firstPage..<(firstPage + count)).clamped(to: 0..<pageCount).prefix(max(1, lowPages))
        var next = range.lowerBound
        while next < range.upperBound, !isClosed {
            let n = min(staging.pages - 1, range.upperBound - next)
            while budgetPages - 1 - residentPages < n, evict(maxPages: policy.evictBatch, staging: evictStaging, force: true) > 0 {}
            prefetch(from: next - 1, demand: nil, plan: StrideDetector.Issue(first: next, stride: 1, count: n), writable: false,
                     staging: staging, speculative: false)
            // A write-protect fault raised between an install and its commit was dropped:
            // wake the run so that it is retried.
            uffd.wake(address: address(ofPage: next), length: UInt64(n * spec.pageSize))
            next += n
        }
    }

    /// Whether the client unmapped all of `pages` (ADVISE GONE): the kernel may map
    /// something else there, and nothing of the region lives there any more.
    public func isGone(_ pages: Range<Int>) -> Bool {
        let r = pages.clamped(to: 0..<pageCount)
        if r.isEmpty { return true }
        return core.withLock { c in c.gone.contains { $0.lowerBound <= r.lowerBound && r.upperBound <= $0.upperBound } }
    }
}

extension Array where Element == Int {
    /// Membership in a sorted array.
    func binarySearchContains(_ x: Int) -> Bool {
        var lo = 0
        var hi = count
        while lo < hi {
            let mid = (lo + hi) / 2
            if self[mid] < x { lo = mid + 1 } else { hi = mid }
        }
        return lo < count && self[lo] == x
    }
}

/// Calls `body(start, count)` for each run of consecutive pages in sorted `pages`
/// (one ioctl or syscall per run instead of one per page).
func forEachRun(_ pages: [Int], _ body: (Int, Int) -> Void) {
    var i = 0
    while i < pages.count {
        var j = i + 1
        while j < pages.count, pages[j] == pages[j - 1] + 1 { j += 1 }
        body(pages[i], j - i)
        i = j
    }
}
