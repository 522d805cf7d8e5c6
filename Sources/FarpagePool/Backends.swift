import CFarpageChecksum
import FarpageKernel
import FarpageTiers
import FarpageTransport
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// One run of consecutive pages of a lease, read into consecutive pages at `into` (the memory
/// server client's run, so that a batch goes to it as it is).
typealias LeaseReadRun = MemserverClient.ReadRun

/// Where a lease lives: a memory server over TCP, or the agent's own local spill (memory or a file).
protocol LeaseBackend: AnyObject, Sendable {
    var name: String { get }
    /// How pages get there, for `farpagectl pool list`: `tcp`, `local`, `io_uring (O_DIRECT)`.
    var transport: String { get }
    var leaseBytes: UInt64 { get }
    func allocateLeases(_ count: Int) throws(TransportError) -> [UInt64]
    func freeLease(_ id: UInt64) throws(TransportError)
    /// Reads `pages` pages at `offset` of lease `id` into `into`, verifying every checksum
    /// (`allowUnwritten`: a slot never written reads as zeros instead of failing).
    func read(lease id: UInt64, offset: UInt64, pages: Int, into: UnsafeMutableRawPointer, allowUnwritten: Bool)
        throws(TransportError)
    /// Writes `pages` contiguous pages from `from`.
    func write(lease id: UInt64, offset: UInt64, pages: Int, from: UnsafeRawPointer) throws(TransportError)
    /// Reads several runs of one lease at once (one round trip, one io_uring submission), each
    /// verified: `each(j, error)` runs once per run, in order, as soon as run `j` is in place.
    /// Throws when the backend broke part way; runs not reported by then did not complete.
    func readRuns(lease id: UInt64, runs: [LeaseReadRun], each: (Int, TransportError?) -> Void) throws(TransportError)
}

extension LeaseBackend {
    /// Backends without batched reads: one run at a time.
    func readRuns(lease id: UInt64, runs: [LeaseReadRun], each: (Int, TransportError?) -> Void) throws(TransportError) {
        for (j, run) in runs.enumerated() {
            do throws(TransportError) {
                try read(lease: id, offset: run.offset, pages: run.pages, into: run.into, allowUnwritten: false)
                each(j, nil)
            } catch {
                each(j, error)
            }
        }
    }
}

/// A memory server, reached through a pool of authenticated connections so that each
/// calling thread has its own (a fault never waits behind another thread's bulk write).
final class RemoteBackend: LeaseBackend, @unchecked Sendable {
    let host: String
    let port: Int
    let agentID: [UInt8]
    let agentName: String
    let secret: ClusterSecret
    let ioTimeoutMilliseconds: Int32
    private let idle = Mutex<[MemserverClient]>([])
    private(set) var leaseBytes: UInt64 = 0
    private(set) var capacityBytes: UInt64 = 0
    /// The server's identity at first contact. A server that restarted has a new one, and
    /// none of our leases: its pages are gone, and it must not be taken for healthy again.
    private(set) var serverID: [UInt8] = []
    /// The RDMA data path, when this server's pages move over RDMA (decided at attach; see
    /// `RemoteRDMA.swift`). Leases, health and everything else stay on TCP.
    private(set) var rdma: RDMAPath?

    var name: String { "\(host):\(port)" }
    /// "rdma" while the RDMA data path is connected, else "tcp".
    var transport: String { rdma?.isUp == true ? "rdma" : "tcp" }

    /// - Parameter dataPlane: the RDMA policy and verbs; nil: TCP only.
    init(host: String, port: Int, agentID: [UInt8], agentName: String, secret: ClusterSecret, ioTimeoutMilliseconds: Int32,
         dataPlane: DataPlaneSelector? = nil)
        throws(TransportError)
    {
        self.host = host
        self.port = port
        self.agentID = agentID
        self.agentName = agentName
        self.secret = secret
        self.ioTimeoutMilliseconds = ioTimeoutMilliseconds
        let first = try connect()
        leaseBytes = first.leaseBytes
        capacityBytes = first.capacityBytes
        serverID = first.serverID
        idle.withLock { $0.append(first) }
        rdma = try Self.setUpRDMA(self, selector: dataPlane)
    }

    private func connect() throws(TransportError) -> MemserverClient {
        let client = try MemserverClient(host: host, port: port, agentID: agentID, name: agentName, secret: secret,
                                         ioTimeoutMilliseconds: ioTimeoutMilliseconds)
        if !serverID.isEmpty && client.serverID != serverID {
            client.close()
            throw TransportError(.restarted, "\(host):\(port) restarted since we attached: the pages it held are gone")
        }
        return client
    }

    /// Runs `body` on a pooled connection. A connection that failed is dropped, not reused.
    func withConnection<T>(_ body: (MemserverClient) throws(TransportError) -> T) throws(TransportError) -> T {
        let client: MemserverClient
        if let pooled = idle.withLock({ $0.popLast() }) { client = pooled } else { client = try connect() }
        do {
            let result = try body(client)
            idle.withLock { if $0.count < 64 { $0.append(client) } }
            return result
        } catch {
            if case .refused(let code) = error.kind, code != MemErrorCode.malformed.rawValue {
                idle.withLock { if $0.count < 64 { $0.append(client) } }  // the connection is fine
            } else {
                // A failure, or `malformed`, after which the server closes the connection (e.g. a
                // server older than a request it does not know).
                client.close()
            }
            throw error
        }
    }

    func closeAll() {
        idle.withLock { c in c.forEach { $0.close() }; c.removeAll() }
        rdma?.closeAll()
    }

    func ping() throws(TransportError) -> MemServerStats {
        try withConnection { c throws(TransportError) in
            guard case .pong(let s) = try c.call(.ping) else { throw TransportError(.protocolViolation, "bad PONG") }
            return s
        }
    }

    func allocateLeases(_ count: Int) throws(TransportError) -> [UInt64] {
        try withConnection { c throws(TransportError) in
            guard case .leases(let ids) = try c.call(.leaseAlloc(count: UInt32(count))) else {
                throw TransportError(.protocolViolation, "bad LEASES")
            }
            if let rdma { ids.forEach { rdma.checksums.add($0) } }
            return ids
        }
    }

    func freeLease(_ id: UInt64) throws(TransportError) {
        do throws(TransportError) {
            _ = try withConnection { c throws(TransportError) in try c.call(.leaseFree(leaseID: id)) }
        } catch {
            if error.kind == .refused(code: MemErrorCode.noSuchLease.rawValue) { forgetRDMA(lease: id) }
            throw error
        }
        forgetRDMA(lease: id)
    }

    private func forgetRDMA(lease id: UInt64) {
        guard let rdma else { return }
        rdma.keys.withLock { $0[id] = nil }
        rdma.checksums.remove(id)
    }

    /// The leases the server wants back (donor pressure).
    func reclaimRequested() throws(TransportError) -> [UInt64] {
        try withConnection { c throws(TransportError) in
            guard case .reclaim(let ids) = try c.call(.reclaimQuery) else { throw TransportError(.protocolViolation, "bad RECLAIM") }
            return ids
        }
    }

    /// - Parameter allowUnwritten: accept slots never written (stored checksum 0 and zero data);
    ///   a drain copies whole leases, including slots reserved by a write that failed.
    func read(lease id: UInt64, offset: UInt64, pages: Int, into: UnsafeMutableRawPointer, allowUnwritten: Bool)
        throws(TransportError)
    {
        if let rdma { return try rdmaRead(rdma, lease: id, offset: offset, pages: pages, into: into, allowUnwritten: allowUnwritten) }
        let sums = try withConnection { c throws(TransportError) in try c.readPages(leaseID: id, offset: offset, pages: pages, into: into) }
        let failure = sums.withUnsafeBufferPointer { s in
            verify(lease: id, offset: offset, pages: pages, at: into, against: s.baseAddress!, allowUnwritten: allowUnwritten)
        }
        if let failure { throw failure }
    }

    /// Checks received pages against their checksums (the server's over TCP, the agent's own
    /// table over RDMA). With `allowUnwritten`, a slot never written (checksum 0, zero data)
    /// passes.
    func verify(lease id: UInt64, offset: UInt64, pages: Int, at data: UnsafeRawPointer, against sums: UnsafePointer<UInt64>,
                allowUnwritten: Bool) -> TransportError?
    {
        withUnsafeTemporaryAllocation(of: UInt64.self, capacity: pages) { computed in
            fp_checksum_pages(data, MemWire.pageSize, pages, computed.baseAddress)
            for i in 0..<pages where computed[i] != sums[i] {
                if allowUnwritten && sums[i] == 0 && isZeroPage(data + i * MemWire.pageSize, MemWire.pageSize) { continue }
                return TransportError(.corrupt, "\(name): page \(i) of lease \(id) at offset \(Int(offset) + i * MemWire.pageSize) does not match its checksum")
            }
            return nil
        }
    }

    /// Reads several runs of one lease with one round trip's wait: `each(j, error)` runs as
    /// soon as run `j` is in place and verified. Throws when the connection broke; runs not
    /// reported by then did not complete.
    func readRuns(lease id: UInt64, runs: [LeaseReadRun], each: (Int, TransportError?) -> Void) throws(TransportError) {
        if let rdma { return try rdmaReadRuns(rdma, lease: id, runs: runs, each: each) }
        try withConnection { c throws(TransportError) in
            try c.readPipelined(leaseID: id, runs: runs) { j, sums, error in
                if let error { return each(j, error) }
                let run = runs[j]
                each(j, verify(lease: id, offset: run.offset, pages: run.pages, at: run.into, against: sums, allowUnwritten: false))
            }
        }
    }

    func write(lease id: UInt64, offset: UInt64, pages: Int, from: UnsafeRawPointer) throws(TransportError) {
        if let rdma { return try rdmaWrite(rdma, lease: id, offset: offset, pages: pages, from: from) }
        var sums = [UInt64](repeating: 0, count: pages)
        fp_checksum_pages(from, MemWire.pageSize, pages, &sums)
        try withConnection { c throws(TransportError) in try c.writePages(leaseID: id, offset: offset, checksums: sums, from: from) }
    }
}

/// Leases carved from the agent's own memory: where pages go when no memory server can take
/// them (all full, failed or draining). It keeps data safe; it does not save memory.
final class LocalSpillBackend: LeaseBackend, @unchecked Sendable {
    let name = "local-spill"
    let transport = "local"
    let leaseBytes: UInt64
    let capacityLeases: Int
    struct Slab: @unchecked Sendable { let base: UnsafeMutableRawPointer }
    private let leases = Mutex<[UInt64: Slab]>([:])
    private let nextID = Atomic<UInt64>(1)

    init(capacityBytes: UInt64, leaseBytes: UInt64) {
        self.leaseBytes = leaseBytes
        capacityLeases = Int(capacityBytes / leaseBytes)
    }

    deinit { leases.withLock { l in l.values.forEach { AnonymousMemory.unmap($0.base, bytes: leaseBytes) } } }

    func allocateLeases(_ count: Int) throws(TransportError) -> [UInt64] {
        var ids: [UInt64] = []
        for _ in 0..<count {
            let full = leases.withLock { $0.count >= capacityLeases }
            if full { break }
            guard let memory = try? AnonymousMemory.map(bytes: leaseBytes) else { break }
            let id = nextID.wrappingAdd(1, ordering: .relaxed).oldValue
            let slab = Slab(base: memory)
            leases.withLock { $0[id] = slab }
            ids.append(id)
        }
        return ids
    }

    func freeLease(_ id: UInt64) throws(TransportError) {
        if let m = leases.withLock({ $0.removeValue(forKey: id) }) { AnonymousMemory.unmap(m.base, bytes: leaseBytes) }
    }

    private func base(_ id: UInt64) throws(TransportError) -> UnsafeMutableRawPointer {
        guard let b = leases.withLock({ $0[id] }) else { throw TransportError(.refused(code: 5), "no local lease \(id)") }
        return b.base
    }

    func read(lease id: UInt64, offset: UInt64, pages: Int, into: UnsafeMutableRawPointer, allowUnwritten: Bool)
        throws(TransportError)
    {
        memcpy(into, try base(id) + Int(offset), pages * MemWire.pageSize)
    }

    func write(lease id: UInt64, offset: UInt64, pages: Int, from: UnsafeRawPointer) throws(TransportError) {
        memcpy(try base(id) + Int(offset), from, pages * MemWire.pageSize)
    }
}
