import FarpageKernel
import FarpageMemserver
@testable import FarpagePool
import FarpageRDMA
import FarpageTestSupport
import FarpageTiers
@testable import FarpageTransport
import Foundation
import Logging
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The memory server's RDMA side on fake verbs: tokens bound to agents, a protection domain per
/// agent, a region per lease registered in the fabric (the lease's real memory in this
/// process), deregistered when the lease is freed.
final class FakeRDMAPlane: RDMAControlPlane, @unchecked Sendable {
    let fabric: FakeFabric
    let leases: LeaseTable
    struct State {
        var tokens = RDMATokens()
        var domains: [AgentID: Int] = [:]
        var regions: [UInt64: LeaseKey] = [:]
    }
    let state = Mutex(State())

    init(fabric: FakeFabric, leases: LeaseTable) {
        self.fabric = fabric
        self.leases = leases
        fabric.accept = { [weak self] data in self?.accept(data) }
    }

    func accept(_ data: [UInt8]) -> Int? {
        guard let token = MemWire.rdmaToken(fromPrivateData: data) else { return nil }
        return state.withLock { s -> Int? in
            guard let agent = s.tokens.redeem(token, now: monotonicNanoseconds()) else { return nil }
            if s.domains[agent] == nil { s.domains[agent] = 100 + s.domains.count }
            return s.domains[agent]
        }
    }

    func endpoint(for agent: AgentID) throws(LeaseError) -> RDMAEndpoint {
        RDMAEndpoint(port: 7202, host: "", token: state.withLock { $0.tokens.issue(to: agent, now: monotonicNanoseconds()) })
    }

    func keys(for agent: AgentID, leases ids: [UInt64]) throws(LeaseError) -> [LeaseKey] {
        var out: [LeaseKey] = []
        for id in ids {
            out.append(try leases.withLease(owner: agent, leaseID: id) { base throws(LeaseError) -> LeaseKey in
                try state.withLock { s throws(LeaseError) -> LeaseKey in
                    if let k = s.regions[id] { return k }
                    guard let pd = s.domains[agent] else { throw LeaseError(code: .rdmaUnavailable, message: "connect first") }
                    let rkey = fabric.register(pd: pd, base: base, length: leases.leaseBytes)
                    let key = LeaseKey(leaseID: id, address: UInt64(UInt(bitPattern: base)), length: UInt64(leases.leaseBytes), rkey: rkey)
                    s.regions[id] = key
                    return key
                }
            })
        }
        return out
    }

    func leaseReleased(_ id: UInt64) {
        if let k = state.withLock({ $0.regions.removeValue(forKey: id) }) { fabric.deregister(k.rkey) }
    }

    /// Forgets every registration (as a server that lost its device would): old keys reach nothing.
    func dropAllRegistrations() {
        for k in state.withLock({ s in defer { s.regions.removeAll() }; return Array(s.regions.values) }) { fabric.deregister(k.rkey) }
    }

    func agentGone(_ agent: AgentID) {}
    func stop() {}
}

/// The agent's RDMA data path end to end: a real memory server in this process (TCP control
/// plane, real leases) with its RDMA side on fake verbs, and a real `PoolStore`.
@Suite("Pool over RDMA (fake verbs)", .serialized)
struct PoolOverRDMATests {
    static let secret = "test-cluster-secret-0123456789abcdef"

    final class Setup: @unchecked Sendable {
        let fabric = FakeFabric()
        let server: Memserver
        let plane: FakeRDMAPlane?
        let store: PoolStore
        let port: Int
        var address: String { "127.0.0.1:\(port)" }

        init(rdmaOnServer: Bool = true, policy: TransportPolicy = .auto, availability: RDMAAvailability = .devices(["fake0"]))
            async throws
        {
            var config = MemserverConfig()
            config.host = "127.0.0.1"
            config.port = 0
            config.capacityBytes = 8 << 20
            config.leaseBytes = 1 << 20
            config.transport = .tcp
            config.threads = 1
            config.adminSocket = ""
            let logger = Logger(label: "test")
            server = Memserver(config: config, secret: try ClusterSecret(Array(PoolOverRDMATests.secret.utf8)), logger: logger)
            if rdmaOnServer {
                let plane = FakeRDMAPlane(fabric: fabric, leases: server.leaseTable)
                server.useRDMA(plane)
                self.plane = plane
            } else {
                plane = nil
            }
            port = try await server.start()
            fabric.availability = availability
            store = PoolStore(spillBytes: 1 << 20, leaseBytes: 1 << 20, agentID: ClusterSecret.randomBytes(16), agentName: "rdma-test",
                              secret: try ClusterSecret(Array(PoolOverRDMATests.secret.utf8)), ioTimeoutMilliseconds: 1000,
                              logger: logger)
            store.dataPlane.configure(policy: policy, verbs: FakeVerbs(fabric: fabric), logger: logger, sendDepth: 8,
                                      signalInterval: 4, spinMicroseconds: 0)
        }

        func stop() async { await server.stop() }

        var transport: String? { store.report().first { $0.address == address }?.transport }
    }

    /// Writes `count` pages of a pattern seeded by `seed`; returns their locations.
    static func write(_ store: PoolStore, count: Int, seed: UInt8) -> ([PageLocation?], [StoreError?]) {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: count * 4096, alignment: 4096)
        defer { buffer.deallocate() }
        let batch = PageIOBatch(kind: .write)
        for i in 0..<count {
            memset(buffer + i * 4096, Int32(truncatingIfNeeded: Int(seed) &+ i), 4096)
            buffer.storeBytes(of: UInt64(i), toByteOffset: i * 4096, as: UInt64.self)
            batch.append(buffer: buffer + i * 4096, location: nil)
        }
        store.submitAndWait(batch)
        return (batch.locations, batch.errors)
    }

    /// Reads the pages back (streaming read: several runs per lease) and checks them.
    static func check(_ store: PoolStore, _ locations: [PageLocation?], seed: UInt8) -> Int {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: locations.count * 4096, alignment: 4096)
        defer { buffer.deallocate() }
        let batch = PageIOBatch(kind: .read)
        for i in 0..<locations.count { batch.append(buffer: buffer + i * 4096, location: locations[i]) }
        store.read(batch, chunkPages: 16) { _ in }
        var bad = 0
        for i in 0..<locations.count {
            let p = buffer + i * 4096
            let ok = batch.errors[i] == nil && p.load(as: UInt64.self) == UInt64(i)
                && p.load(fromByteOffset: 4095, as: UInt8.self) == UInt8(truncatingIfNeeded: Int(seed) &+ i)
            if !ok { bad += 1 }
        }
        return bad
    }

    @Test func pagesMoveOverRDMAAndStayReadableOverTCP() async throws {
        let s = try await Setup()
        defer { Task { await s.stop() } }
        try s.store.attach(address: s.address)
        #expect(s.transport == "rdma")
        let (locations, errors) = Self.write(s.store, count: 600, seed: 7)
        #expect(errors.allSatisfy { $0 == nil })
        #expect(s.fabric.registeredRegions >= 1, "leases should be registered as memory regions")
        #expect(Self.check(s.store, locations, seed: 7) == 0)
        // Reads too, not only the writes: a read path that fell back to TCP would go unseen.
        let reads = s.fabric.queuePairs.reduce(0) { $0 + $1.readsPosted }
        let writes = s.fabric.queuePairs.reduce(0) { $0 + $1.postedTotal } - reads
        #expect(reads > 0 && writes > 0, "reads \(reads), writes \(writes) over RDMA")
        #expect(s.fabric.queuePairs.allSatisfy { $0.maxOccupied <= 8 })
        // RDMA goes down for good (every reconnect refused): data keeps flowing over TCP, and
        // pages written over RDMA (no server checksum) verify against the agent's checksums.
        for qp in s.fabric.queuePairs { qp.inject = { _ in .retryExceeded } }
        s.fabric.connectFailures = Array(repeating: VerbsError("rdma_connect", errno: ECONNREFUSED), count: 1000)
        #expect(Self.check(s.store, locations, seed: 7) == 0)
        #expect(s.transport == "tcp")
        let (more, moreErrors) = Self.write(s.store, count: 50, seed: 9)
        #expect(moreErrors.allSatisfy { $0 == nil })
        #expect(Self.check(s.store, more, seed: 9) == 0)
        #expect(s.store.report().first { $0.address == s.address }?.status == .healthy, "a broken RDMA path is not a failed server")
    }

    @Test func aRetryExceededConnectionIsReestablished() async throws {
        let s = try await Setup()
        defer { Task { await s.stop() } }
        try s.store.attach(address: s.address)
        let (locations, _) = Self.write(s.store, count: 64, seed: 3)
        let before = s.fabric.connects
        for qp in s.fabric.queuePairs { qp.inject = { _ in .retryExceeded } }
        #expect(Self.check(s.store, locations, seed: 3) == 0, "the failed request is served over TCP")
        #expect(Self.check(s.store, locations, seed: 3) == 0)
        #expect(s.fabric.connects > before, "a new queue pair should have been connected")
        #expect(s.transport == "rdma", "the link should be up again")
    }

    /// The path is broken but rdma_cm still connects (an MTU mismatch: every transfer ends in
    /// RETRY_EXC_ERR): a reconnected queue pair that dies before moving anything is a failed
    /// reconnect, so the agent backs off to TCP rather than reconnecting, and waiting out the
    /// transport's retries, on every request.
    @Test func aPathThatConnectsButCarriesNothingBacksOff() async throws {
        let s = try await Setup()
        defer { Task { await s.stop() } }
        try s.store.attach(address: s.address)
        let (locations, _) = Self.write(s.store, count: 64, seed: 4)
        let broken: (WorkRequest) -> CompletionStatus? = { _ in .retryExceeded }
        for qp in s.fabric.queuePairs { qp.inject = broken }
        s.fabric.injectOnNewQueuePairs = broken
        let before = s.fabric.connects
        for _ in 0..<8 { #expect(Self.check(s.store, locations, seed: 4) == 0) }
        #expect(s.fabric.connects - before <= 2, "reconnected \(s.fabric.connects - before) times within the first backoff")
        #expect(s.transport == "tcp")
        #expect(s.store.report().first { $0.address == s.address }?.status == .healthy)
    }

    /// A key that no longer reaches its lease (remote access error) is dropped, the request is
    /// served over TCP, and the error is not retried on RDMA with the same key.
    @Test func aRemoteAccessErrorDropsTheKey() async throws {
        let s = try await Setup()
        defer { Task { await s.stop() } }
        try s.store.attach(address: s.address)
        let (locations, _) = Self.write(s.store, count: 32, seed: 5)
        s.plane!.dropAllRegistrations()
        let qpsBefore = s.fabric.queuePairs.count
        #expect(Self.check(s.store, locations, seed: 5) == 0)
        #expect(s.fabric.registeredRegions == 0, "the failed request must not have asked for the key again")
        // The next request asks for the key again (a fresh registration) and goes over RDMA.
        let postedBefore = s.fabric.queuePairs.reduce(0) { $0 + $1.postedTotal }
        #expect(Self.check(s.store, locations, seed: 5) == 0)
        #expect(s.fabric.registeredRegions == 1)
        #expect(s.fabric.queuePairs.reduce(0) { $0 + $1.postedTotal } > postedBefore)
        #expect(s.fabric.queuePairs.count <= qpsBefore + 1, "a remote access error is not a broken connection")
        #expect(s.transport == "rdma")
    }

    /// A freed lease's region is deregistered before its memory is zeroed and lent again.
    @Test func aFreedLeaseKeyReachesNothing() async throws {
        let s = try await Setup()
        defer { Task { await s.stop() } }
        try s.store.attach(address: s.address)
        let (locations, _) = Self.write(s.store, count: 8, seed: 1)
        #expect(s.fabric.registeredRegions == 1)
        s.store.release(locations.compactMap { $0 })
        for _ in 0..<4 { s.store.heartbeat() }  // empty leases go back after three heartbeats
        #expect(s.fabric.registeredRegions == 0)
    }

    @Test func aServerWithoutRDMAIsReachedOverTCP() async throws {
        let s = try await Setup(rdmaOnServer: false)
        defer { Task { await s.stop() } }
        try s.store.attach(address: s.address)
        #expect(s.transport == "tcp")
        let (locations, errors) = Self.write(s.store, count: 40, seed: 2)
        #expect(errors.allSatisfy { $0 == nil })
        #expect(Self.check(s.store, locations, seed: 2) == 0)
        #expect(s.fabric.connects == 0)
    }

    @Test func transportRDMARefusesAServerWithoutRDMA() async throws {
        let s = try await Setup(rdmaOnServer: false, policy: .rdma)
        defer { Task { await s.stop() } }
        do {
            try s.store.attach(address: s.address)
            Issue.record("attach should fail")
        } catch {
            #expect(error.message.contains("transport = \"rdma\""))
            #expect(error.message.contains("no RDMA"))
        }
    }

    @Test func transportRDMAWithoutADeviceHereSaysWhy() async throws {
        let s = try await Setup(policy: .rdma, availability: .noKernelSupport)
        defer { Task { await s.stop() } }
        do {
            try s.store.attach(address: s.address)
            Issue.record("attach should fail")
        } catch {
            #expect(error.message.contains("no RDMA support in this kernel"))
        }
        // auto: TCP, no RDMA traffic, no token asked.
        let t = try await Setup(policy: .auto, availability: .noDevices)
        defer { Task { await t.stop() } }
        try t.store.attach(address: t.address)
        #expect(t.transport == "tcp")
        #expect(t.fabric.connects == 0)
    }

    /// RDMA_CONNECT and LEASE_KEYS through the real server: a key is only for the lease's owner,
    /// and a malformed LEASE_KEYS closes that connection while the server keeps serving.
    @Test func leaseKeysAreScopedToTheirAgent() async throws {
        let s = try await Setup()
        defer { Task { await s.stop() } }
        let secret = try ClusterSecret(Array(Self.secret.utf8))
        let a = try MemserverClient(host: "127.0.0.1", port: s.port, agentID: Array(repeating: 1, count: 16), name: "a", secret: secret)
        let b = try MemserverClient(host: "127.0.0.1", port: s.port, agentID: Array(repeating: 2, count: 16), name: "b", secret: secret)
        guard case .leases(let ids) = try a.call(.leaseAlloc(count: 1)), let id = ids.first else { Issue.record("no lease"); return }
        // Before an RDMA connection there is no domain to register in.
        do {
            _ = try a.call(.leaseKeys([id]))
            Issue.record("keys before any RDMA connection")
        } catch {
            #expect(error.kind == .refused(code: MemErrorCode.rdmaUnavailable.rawValue), "\(error)")
        }
        guard case .rdmaEndpoint(let e) = try a.call(.rdmaConnect) else { Issue.record("no endpoint"); return }
        #expect(e.token.count == 32)
        _ = try s.fabric.makeQueuePair(privateData: MemWire.rdmaPrivateData(token: e.token), stagingBytes: 4096, sendDepth: 1)
        guard case .keys(let keys) = try a.call(.leaseKeys([id])) else { Issue.record("no keys"); return }
        #expect(keys.count == 1 && keys[0].leaseID == id && keys[0].length == 1 << 20)
        do {
            _ = try b.call(.leaseKeys([id]))
            Issue.record("another agent got the key")
        } catch {
            #expect(error.kind == .refused(code: MemErrorCode.noSuchLease.rawValue))
        }
        // A token works once.
        #expect(throws: VerbsError.self) {
            _ = try s.fabric.makeQueuePair(privateData: MemWire.rdmaPrivateData(token: e.token), stagingBytes: 4096, sendDepth: 1)
        }
        // Malformed LEASE_KEYS (count 0): ERROR malformed, that connection closes, others go on.
        let raw = MemWire.frame(.leaseKeys, requestID: 77, body: [0, 0, 0, 0])
        _ = try b.send(.ping)
        try b.stream.send(raw)
        var sawMalformed = false
        while let (rid, reply) = try? b.receive() {
            if rid == 77 || rid == 0, case .error(let code, _) = reply, code == MemErrorCode.malformed.rawValue { sawMalformed = true }
        }
        #expect(sawMalformed)
        guard case .pong = try a.call(.ping) else { Issue.record("the server stopped serving"); return }
        a.close()
        b.close()
    }

    /// A request the server refuses as `malformed` (after which it closes the connection: what
    /// a server older than a message does) must not leave that connection in the pool: the next
    /// request over the same backend works.
    @Test func aConnectionRefusedAsMalformedIsNotPooled() async throws {
        let s = try await Setup(rdmaOnServer: false)
        defer { Task { await s.stop() } }
        let backend = try RemoteBackend(host: "127.0.0.1", port: s.port, agentID: ClusterSecret.randomBytes(16), agentName: "old-peer",
                                        secret: try ClusterSecret(Array(Self.secret.utf8)), ioTimeoutMilliseconds: 2000)
        defer { backend.closeAll() }
        _ = try backend.ping()  // one pooled connection
        do {
            _ = try backend.withConnection { c throws(TransportError) in try c.call(.leaseKeys([])) }  // count 0: malformed
            Issue.record("an empty LEASE_KEYS was accepted")
        } catch {
            #expect(error.kind == .refused(code: MemErrorCode.malformed.rawValue), "\(error)")
        }
        let stats = try backend.ping()  // on the closed connection, were it pooled
        #expect(stats.capacityBytes == 8 << 20)
    }
}

/// The daemons on this host: without kernel RDMA they run on TCP and say why; "rdma" required
/// is a startup error naming the reason.
@Suite("RDMA on this host", .serialized)
struct HostRDMATests {
    static var kernelHasRDMA: Bool { access("/sys/class/infiniband_verbs", F_OK) == 0 }

    @Test func theMemoryServerLendsOverTCPAndSaysWhy() throws {
        let server = try MemserverProcess(capacity: "8MiB", leaseSize: "1MiB")
        defer { server.stop() }
        if Self.kernelHasRDMA {
            // Either outcome names itself: listening, or why it lends over TCP only.
            #expect(server.logText.contains("listening for RDMA connections") || server.logText.contains("lending over TCP only"),
                    "\(server.logText)")
        } else {
            #expect(server.logText.contains("no RDMA support in this kernel"), "\(server.logText)")
            #expect(server.logText.contains("lending over TCP only"))
        }
    }

    @Test(.enabled(if: !HostRDMATests.kernelHasRDMA, "this kernel has RDMA"))
    func theMemoryServerRefusesTransportRDMAWithoutIt() {
        do {
            let server = try MemserverProcess(capacity: "8MiB", leaseSize: "1MiB", keys: "transport = \"rdma\"")
            server.stop()
            Issue.record("the memory server started with transport = rdma and no RDMA")
        } catch {
            #expect("\(error)".contains("no RDMA support in this kernel"), "\(error)")
        }
    }

    @Test(.enabled(if: !HostRDMATests.kernelHasRDMA, "this kernel has RDMA"))
    func theAgentRefusesTransportRDMAWithoutIt() {
        do {
            let agent = try AgentProcess(config: "[pool]\ntransport = \"rdma\"")
            agent.stop()
            Issue.record("the agent started with transport = rdma and no RDMA")
        } catch {
            #expect("\(error)".contains("no RDMA support in this kernel"), "\(error)")
        }
    }
}
