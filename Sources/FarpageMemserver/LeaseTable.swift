import CFarpageChecksum
import FarpageKernel
import FarpageTransport
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// An authenticated agent's identity (its 16-byte id from HELLO).
public struct AgentID: Hashable, Sendable, CustomStringConvertible {
    public let bytes: [UInt8]
    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    public var description: String { bytes.prefix(8).map { String($0, radix: 16).leftPadded(2) }.joined() }
}

extension String {
    func leftPadded(_ n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}

/// Why a lease operation was refused (sent back as an ERROR, the connection stays open).
public struct LeaseError: Error, Sendable, Equatable {
    public let code: MemErrorCode
    public let message: String
    public init(code: MemErrorCode, message: String) {
        self.code = code
        self.message = message
    }
}

/// The memory a server lends: slabs of `leaseBytes`, each with one checksum per page.
///
/// Slabs are mapped lazily (`MAP_NORESERVE`: memory is used only when written) and zeroed
/// (`MADV_DONTNEED`) before they are lent again. Data operations take a shared lock, lease
/// allocation and release an exclusive one, so a slab is never reused while a copy into or
/// out of it is running.
///
/// Donor pressure: `setLimit` lowers how many leases may be lent. Leases beyond the limit are
/// marked for reclaim (spread over the agents holding the most) and stay readable and
/// writable until their agent, having moved its pages elsewhere, frees them: the server
/// never takes a lease back by force.
public final class LeaseTable: @unchecked Sendable {
    public let leaseBytes: Int
    public let capacityLeases: Int
    public let pageSize = MemWire.pageSize
    let pagesPerLease: Int
    private var rwlock = pthread_rwlock_t()

    struct Lease {
        let owner: AgentID
        let base: UnsafeMutableRawPointer
    }
    // Guarded by rwlock.
    private var leases: [UInt64: Lease] = [:]
    private var spare: [UnsafeMutableRawPointer] = []
    private var nextID: UInt64 = 1
    private var mappedSlabs = 0
    /// Most leases that may be lent now (the capacity, lowered while reclaiming).
    private var limitLeases: Int
    /// Leases asked back, and when (monotonic ns).
    private var reclaim: [UInt64: UInt64] = [:]
    /// Runs for each lease taken back, under the exclusive lock and before its slab is zeroed:
    /// the RDMA listener deregisters the lease's memory region there, so that its key reaches
    /// nothing once the memory can be lent again. Set before the server serves anyone.
    public var releaseHook: (@Sendable (UInt64) -> Void)?

    public init(capacityBytes: UInt64, leaseBytes: Int) {
        self.leaseBytes = leaseBytes
        self.pagesPerLease = leaseBytes / MemWire.pageSize
        self.capacityLeases = Int(capacityBytes / UInt64(leaseBytes))
        limitLeases = capacityLeases
        pthread_rwlock_init(&rwlock, nil)
    }

    deinit {
        for l in leases.values { AnonymousMemory.unmap(l.base, bytes: UInt64(slabBytes)) }
        for s in spare { AnonymousMemory.unmap(s, bytes: UInt64(slabBytes)) }
        pthread_rwlock_destroy(&rwlock)
    }

    /// Data, then one checksum per page.
    private var slabBytes: Int { leaseBytes + pagesPerLease * 8 }
    @inline(__always) private func checksums(_ base: UnsafeMutableRawPointer) -> UnsafeMutablePointer<UInt64> {
        (base + leaseBytes).assumingMemoryBound(to: UInt64.self)
    }

    private func exclusive<T>(_ body: () throws(LeaseError) -> T) throws(LeaseError) -> T {
        pthread_rwlock_wrlock(&rwlock)
        defer { pthread_rwlock_unlock(&rwlock) }
        return try body()
    }
    private func shared<T>(_ body: () throws(LeaseError) -> T) throws(LeaseError) -> T {
        pthread_rwlock_rdlock(&rwlock)
        defer { pthread_rwlock_unlock(&rwlock) }
        return try body()
    }

    /// Lends up to `count` leases to `owner`; fewer (maybe none) when capacity runs out.
    public func allocate(owner: AgentID, count: Int) -> [UInt64] {
        (try? exclusive { () throws(LeaseError) -> [UInt64] in
            var ids: [UInt64] = []
            while ids.count < count, leases.count < min(capacityLeases, limitLeases) {
                let base: UnsafeMutableRawPointer
                if let s = spare.popLast() {
                    base = s
                } else {
                    guard let fresh = try? AnonymousMemory.map(bytes: UInt64(slabBytes)) else { break }
                    mappedSlabs += 1
                    base = fresh
                }
                let id = nextID
                nextID += 1
                leases[id] = Lease(owner: owner, base: base)
                ids.append(id)
            }
            return ids
        }) ?? []
    }

    /// Takes a lease back; its memory is zeroed (and returned to the kernel) before reuse.
    public func free(owner: AgentID, leaseID: UInt64) throws(LeaseError) {
        try exclusive { () throws(LeaseError) in
            guard let l = leases[leaseID], l.owner == owner else {
                throw LeaseError(code: .noSuchLease, message: "lease \(leaseID) is not held by this agent")
            }
            leases[leaseID] = nil
            reclaim[leaseID] = nil
            releaseHook?(leaseID)
            recycle(l.base)
        }
    }

    /// Frees every lease of an agent (its grace period ran out). Returns how many.
    @discardableResult
    public func freeAll(owner: AgentID) -> Int {
        (try? exclusive { () throws(LeaseError) -> Int in
            let mine = leases.filter { $0.value.owner == owner }
            for (id, l) in mine {
                leases[id] = nil
                reclaim[id] = nil
                releaseHook?(id)
                recycle(l.base)
            }
            return mine.count
        }) ?? 0
    }

    /// Zeroes a slab (`MADV_DONTNEED` on private anonymous memory) for its next agent; a slab
    /// that cannot be zeroed is unmapped rather than lent again with someone else's data.
    private func recycle(_ base: UnsafeMutableRawPointer) {
        if madvise(base, slabBytes, MADV_DONTNEED) == 0 {
            spare.append(base)
        } else {
            AnonymousMemory.unmap(base, bytes: UInt64(slabBytes))
            mappedSlabs -= 1
        }
    }

    private func locate(_ owner: AgentID, _ leaseID: UInt64, _ offset: UInt64, _ pages: Int) throws(LeaseError)
        -> UnsafeMutableRawPointer
    {
        guard let l = leases[leaseID], l.owner == owner else {
            throw LeaseError(code: .noSuchLease, message: "lease \(leaseID) is not held by this agent")
        }
        guard offset % UInt64(pageSize) == 0, offset < UInt64(leaseBytes),
            UInt64(pages * pageSize) <= UInt64(leaseBytes) - offset
        else {
            throw LeaseError(code: .outOfBounds, message: "offset \(offset) + \(pages) pages is outside the \(leaseBytes)-byte lease")
        }
        return l.base
    }

    /// Runs `body` with the start of lease `leaseID`'s data, under the shared lock (the lease
    /// cannot be freed meanwhile). For the RDMA listener, which registers it.
    public func withLease<T>(owner: AgentID, leaseID: UInt64, _ body: (UnsafeMutableRawPointer) throws(LeaseError) -> T)
        throws(LeaseError) -> T
    {
        try shared { () throws(LeaseError) -> T in
            try body(try locate(owner, leaseID, 0, 1))
        }
    }

    /// Copies pages out with their stored checksums.
    public func read(owner: AgentID, leaseID: UInt64, offset: UInt64, pages: Int) throws(LeaseError) -> ([UInt64], [UInt8]) {
        try read(owner: owner, leaseID: leaseID, offset: offset, pages: pages) { sums, data in
            (Array(sums), Array(UnsafeRawBufferPointer(start: data, count: pages * pageSize)))
        }
    }

    /// Hands `body` the stored checksums and the pages in place, under the shared lock (the
    /// slab cannot be zeroed or lent again meanwhile): the reply is built with one copy.
    public func read<T>(owner: AgentID, leaseID: UInt64, offset: UInt64, pages: Int,
                        _ body: (UnsafeBufferPointer<UInt64>, UnsafeRawPointer) -> T) throws(LeaseError) -> T
    {
        try shared { () throws(LeaseError) -> T in
            let base = try locate(owner, leaseID, offset, pages)
            let first = Int(offset) / pageSize
            return body(UnsafeBufferPointer(start: checksums(base) + first, count: pages), UnsafeRawPointer(base + Int(offset)))
        }
    }

    /// Stores pages after checking each against its checksum: corruption on the wire is refused, not kept.
    public func write(owner: AgentID, leaseID: UInt64, offset: UInt64, checksums sums: [UInt64], data: [UInt8])
        throws(LeaseError)
    {
        var failure: LeaseError?
        data.withUnsafeBytes { raw in
            do throws(LeaseError) { try write(owner: owner, leaseID: leaseID, offset: offset, checksums: sums, data: raw.baseAddress!) } catch {
                failure = error
            }
        }
        if let failure { throw failure }
    }

    /// As above, from `sums.count` pages at `data` (straight from the receive buffer).
    public func write(owner: AgentID, leaseID: UInt64, offset: UInt64, checksums sums: [UInt64], data: UnsafeRawPointer)
        throws(LeaseError)
    {
        let pages = sums.count
        var computed = [UInt64](repeating: 0, count: pages)
        fp_checksum_pages(data, pageSize, pages, &computed)
        for i in 0..<pages where computed[i] != sums[i] {
            throw LeaseError(code: .corrupt, message: "page \(i) of the write does not match its checksum; nothing was stored")
        }
        try shared { () throws(LeaseError) in
            let base = try locate(owner, leaseID, offset, pages)
            let first = Int(offset) / pageSize
            memcpy(base + Int(offset), data, pages * pageSize)
            for i in 0..<pages { checksums(base)[first + i] = sums[i] }
        }
    }

    public struct Usage: Sendable {
        public let leases: Int
        public let capacityLeases: Int
        public let owners: Int
        public let mappedSlabs: Int
        /// Most leases that may be lent now.
        public let limitLeases: Int
        /// Leases asked back and not yet returned.
        public let reclaiming: Int
    }

    public var usage: Usage {
        (try? shared { () throws(LeaseError) -> Usage in
            Usage(leases: leases.count, capacityLeases: capacityLeases, owners: Set(leases.values.map(\.owner)).count,
                  mappedSlabs: mappedSlabs, limitLeases: min(limitLeases, capacityLeases), reclaiming: reclaim.count)
        }) ?? Usage(leases: 0, capacityLeases: capacityLeases, owners: 0, mappedSlabs: 0, limitLeases: 0, reclaiming: 0)
    }

    // MARK: Reclaim

    /// Sets how many leases may be lent. Leases lent beyond it are marked for reclaim, taken
    /// first from the agents holding the most (newest leases first); raising it again unmarks
    /// the most recently marked. Returns how many leases are marked now.
    @discardableResult
    public func setLimit(leases newLimit: Int) -> Int {
        (try? exclusive { () throws(LeaseError) -> Int in
            limitLeases = max(0, min(capacityLeases, newLimit))
            let wanted = max(0, leases.count - limitLeases)
            if reclaim.count > wanted {
                let newest = reclaim.sorted { $0.value != $1.value ? $0.value > $1.value : $0.key > $1.key }
                for (id, _) in newest.prefix(reclaim.count - wanted) { reclaim[id] = nil }
            } else if reclaim.count < wanted {
                var unmarked: [AgentID: [UInt64]] = [:]
                for (id, l) in leases where reclaim[id] == nil { unmarked[l.owner, default: []].append(id) }
                for owner in unmarked.keys { unmarked[owner]!.sort() }
                let now = monotonicNanoseconds()
                while reclaim.count < wanted,
                    let owner = unmarked.max(by: { a, b in a.value.count != b.value.count ? a.value.count < b.value.count : a.key.description < b.key.description })?.key,
                    let id = unmarked[owner]!.popLast()
                {
                    reclaim[id] = now
                }
            }
            return reclaim.count
        }) ?? 0
    }

    /// Moves reclaim marks that have waited longer than `seconds` to leases of other agents
    /// (those holding the most unmarked leases first): an agent that cannot give leases back
    /// (nowhere to put the pages) should not hold up the reclaim while another could. The
    /// agent that was asked sees its marks gone at its next heartbeat. Returns how many moved.
    @discardableResult
    public func rotateStaleMarks(olderThan seconds: Double) -> Int {
        (try? exclusive { () throws(LeaseError) -> Int in
            let now = monotonicNanoseconds()
            let limit = UInt64(max(0, seconds) * 1e9)
            let stale = reclaim.filter { now - $0.value >= limit }.sorted { $0.value < $1.value }
            guard !stale.isEmpty else { return 0 }
            let stuck = Set(stale.compactMap { leases[$0.key]?.owner })
            var unmarked: [AgentID: [UInt64]] = [:]
            for (id, l) in leases where reclaim[id] == nil && !stuck.contains(l.owner) { unmarked[l.owner, default: []].append(id) }
            for owner in unmarked.keys { unmarked[owner]!.sort() }
            var moved = 0
            for (id, _) in stale {
                guard let owner = unmarked.max(by: { a, b in a.value.count != b.value.count ? a.value.count < b.value.count : a.key.description < b.key.description })?.key,
                    let other = unmarked[owner]!.popLast()
                else { break }
                reclaim[id] = nil
                reclaim[other] = now
                moved += 1
            }
            return moved
        }) ?? 0
    }

    /// The leases of `owner` the server wants back.
    public func reclaimRequested(owner: AgentID) -> [UInt64] {
        (try? shared { () throws(LeaseError) -> [UInt64] in
            reclaim.keys.filter { leases[$0]?.owner == owner }.sorted()
        }) ?? []
    }

    /// Per agent: leases held, leases asked back, and how long the oldest request has waited.
    public struct AgentUsage: Sendable {
        public let agent: AgentID
        public let leases: Int
        public let reclaiming: Int
        public let oldestReclaimSeconds: Double
    }

    public func agentUsage() -> [AgentUsage] {
        (try? shared { () throws(LeaseError) -> [AgentUsage] in
            let now = monotonicNanoseconds()
            var held: [AgentID: (Int, Int, UInt64)] = [:]
            for (id, l) in leases {
                var e = held[l.owner] ?? (0, 0, now)
                e.0 += 1
                if let since = reclaim[id] {
                    e.1 += 1
                    e.2 = min(e.2, since)
                }
                held[l.owner] = e
            }
            return held.map { AgentUsage(agent: $0.key, leases: $0.value.0, reclaiming: $0.value.1,
                                         oldestReclaimSeconds: Double(now - $0.value.2) / 1e9) }
                .sorted { $0.leases > $1.leases }
        }) ?? []
    }

    public func leaseCount(owner: AgentID) -> Int {
        (try? shared { () throws(LeaseError) -> Int in leases.values.filter { $0.owner == owner }.count }) ?? 0
    }
}
