import FarpageKernel
import FarpagePool
import FarpageTestSupport
import FarpageTiers
import FarpageTransport
import Foundation
import Logging
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Regressions found in review of the donor-pressure change; each test failed before its fix.
/// The comments describe the bug each one guards against.
@Suite("Pool: reclaim and drain races (regressions)", .serialized)
struct ReclaimRaceTests {
    static let secret = "test-cluster-secret-0123456789abcdef"

    func makeStore(spill: UInt64 = 1 << 20, ioTimeout: Int32) throws -> PoolStore {
        PoolStore(spillBytes: spill, leaseBytes: 1 << 20, agentID: ClusterSecret.randomBytes(16), agentName: "review-test",
                  secret: try ClusterSecret(Array(Self.secret.utf8)), ioTimeoutMilliseconds: ioTimeout,
                  logger: Logger(label: "review"))
    }

    final class Pages {
        let buffers: [UnsafeMutableRawPointer]
        var locations: [PageLocation?] = []
        init(_ n: Int) {
            buffers = (0..<n).map { i in
                let b = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
                memset(b, Int32(i % 251 + 1), 4096)
                b.storeBytes(of: UInt64(i), as: UInt64.self)
                return b
            }
        }
        deinit { buffers.forEach { $0.deallocate() } }
    }

    func write(_ store: PoolStore, _ pages: Pages) {
        let w = PageIOBatch(kind: .write)
        for b in pages.buffers { w.append(buffer: b, location: nil) }
        store.submitAndWait(w)
        #expect(w.errors.allSatisfy { $0 == nil })
        pages.locations = w.locations
    }

    /// Reads every page back; returns the errors (nil: read and matched).
    func readBack(_ store: PoolStore, _ pages: Pages, count: Int? = nil) -> [StoreError?] {
        let back = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { back.deallocate() }
        return pages.locations.prefix(count ?? pages.locations.count).enumerated().map { i, l in
            let r = PageIOBatch(kind: .read)
            r.append(buffer: back, location: l)
            store.submitAndWait(r)
            if let e = r.errors[0] { return e }
            return memcmp(back, pages.buffers[i], 4096) == 0 ? nil : StoreError(.corrupt, "wrong data")
        }
    }

    func row(_ store: PoolStore, _ s: MemserverProcess) -> PoolServerReport? {
        store.report().first { $0.address == "127.0.0.1:\(s.port)" }
    }

    final class Flag: Sendable {
        let value = Mutex<Bool?>(nil)
        func set(_ v: Bool) { value.withLock { $0 = v } }
    }

    func waitDone(_ flag: Flag, seconds: Double = 20) -> Bool? {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if let v = flag.value.withLock({ $0 }) { return v }
            usleep(20_000)
        }
        return nil
    }

    /// Finding 1. A reclaim moves a lease from the donor into server T; meanwhile the operator
    /// detaches T. T's drain sees no lease on T (the record still names the donor while the copy
    /// runs), reports T detached and "all its pages moved"; then moveLease switches the record
    /// onto T anyway (it never re-checks the target). The pages now live only on a server the
    /// pool calls detached: once the operator stops it, they are gone.
    @Test func aLeaseIsNeverMovedOntoAServerThatLeftThePool() throws {
        let target = try MemserverProcess(capacity: "16MiB", leaseSize: "4MiB")
        defer { target.stop() }
        let donor = try MemserverProcess(capacity: "16MiB", leaseSize: "4MiB")
        defer { donor.stop() }
        let store = try makeStore(ioTimeout: 15000)
        // The pages must land on the donor: the target lends nothing yet.
        #expect(try target.admin(.init(op: .limit, bytes: 0)).ok)
        try store.attach(address: "127.0.0.1:\(target.port)")
        try store.attach(address: "127.0.0.1:\(donor.port)")
        let pages = Pages(512)
        write(store, pages)
        #expect(row(store, donor)?.leases == 1 && row(store, target)?.leases == 0)
        #expect(try target.admin(.init(op: .limit)).ok)
        // The donor asks its lease back; the heartbeat starts the reclaim (move to the target).
        #expect(try donor.admin(.init(op: .limit, bytes: 0)).ok)
        store.heartbeat()
        // Hold the move before its record switch: the target stops answering for a while.
        stopProcess(target.process.processIdentifier)
        usleep(300_000)
        // The operator detaches the target meanwhile.
        let detached = Flag()
        try store.detach(address: "127.0.0.1:\(target.port)") { ok in detached.set(ok) }
        #expect(waitDone(detached) == true)
        kill(target.process.processIdentifier, SIGCONT)
        // Wait for the reclaim to finish.
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline, (try? donor.adminStatus().leases) ?? 1 > 0 { usleep(50_000) }
        let t = try #require(row(store, target))
        #expect(t.status == .detached)
        #expect(t.leases == 0, "a detached server holds \(t.leases) lease(s) with \(t.storedPages) pages of ours")
        // The operator, told the target is drained, stops it: every page must still read back.
        target.stop()
        let errors = readBack(store, pages).compactMap { $0 }
        #expect(errors.count == 0, "\(errors.count) of \(pages.buffers.count) pages lost; first: \(String(describing: errors.first))")
    }

    /// Finding 2 (pre-existing, in code this commit touched). A heartbeat ping in flight when
    /// the server is forgotten (or detached) sets it back to healthy when the reply comes:
    /// the pool then places new pages on a server the operator removed.
    @Test func aHeartbeatInFlightDoesNotReviveAForgottenServer() throws {
        let server = try MemserverProcess(capacity: "8MiB", leaseSize: "1MiB")
        defer { server.stop() }
        let store = try makeStore(ioTimeout: 5000)
        try store.attach(address: "127.0.0.1:\(server.port)")
        stopProcess(server.process.processIdentifier)
        let beat = Flag()
        let t = Thread {
            store.heartbeat()
            beat.set(true)
        }
        t.start()
        usleep(300_000)
        try store.forget(address: "127.0.0.1:\(server.port)")
        kill(server.process.processIdentifier, SIGCONT)
        #expect(waitDone(beat) == true)
        #expect(row(store, server)?.status == .detached, "forgotten server is \(String(describing: row(store, server)?.status))")
        let pages = Pages(4)
        write(store, pages)
        #expect(row(store, server)?.storedPages == 0, "new pages were placed on a forgotten server")
    }

    /// Finding 3. While a drain copies a lease into the target, the target marks that new
    /// lease (newest first). The agent has no record of it until the copy ends, so after two
    /// reclaim queries it takes it for a lease "whose release was lost" and frees it, under
    /// the running copy. Here the copy then fails (the drain fails and the donor becomes
    /// permanently failed); had the free landed just after the record switch, every page of
    /// the lease would be lost.
    @Test func theAgentNeverFreesALeaseItIsMovingInto() throws {
        let donor = try MemserverProcess(capacity: "16MiB", leaseSize: "4MiB")
        defer { donor.stop() }
        let target = try MemserverProcess(capacity: "16MiB", leaseSize: "4MiB")
        defer { target.stop() }
        let store = try makeStore(ioTimeout: 20000)
        try store.attach(address: "127.0.0.1:\(donor.port)")
        let pages = Pages(512)
        write(store, pages)
        try store.attach(address: "127.0.0.1:\(target.port)")
        // The copy out of the donor will block: the donor stops answering for a while.
        stopProcess(donor.process.processIdentifier)
        let drained = Flag()
        try store.detach(address: "127.0.0.1:\(donor.port)") { ok in drained.set(ok) }
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline, (try? target.adminStatus().leases) != 1 { usleep(10_000) }
        #expect(try target.adminStatus().leases == 1, "the move did not allocate its target lease")
        // The target now wants that lease back (it is the newest).
        #expect(try target.admin(.init(op: .limit, bytes: 0)).ok)
        store.heartbeat()
        usleep(500_000)
        store.heartbeat()
        usleep(500_000)
        #expect(try target.adminStatus().leases == 1, "the agent freed the lease it is copying into")
        kill(donor.process.processIdentifier, SIGCONT)
        #expect(waitDone(drained, seconds: 30) == true, "the drain failed")
        let errors = readBack(store, pages).compactMap { $0 }
        #expect(errors.count == 0, "\(errors.count) pages unreadable; first: \(String(describing: errors.first))")
    }

    /// Finding 4. A drain that fails for lack of room sets `permanentlyFailed` on a server
    /// that is alive and holds the pages. read() now maps any error on such a server to
    /// `.lost`, which Region poisons at once: one timeout destroys a page that is still there.
    @Test func aTimeoutOnAServerWhoseDrainFailedIsNotALostPage() throws {
        let server = try MemserverProcess(capacity: "8MiB", leaseSize: "1MiB")
        defer { server.stop() }
        let store = try makeStore(spill: 0, ioTimeout: 500)
        try store.attach(address: "127.0.0.1:\(server.port)")
        let pages = Pages(8)
        write(store, pages)
        // Nowhere to move them: the drain fails and the server stays, failed.
        let drained = Flag()
        try store.detach(address: "127.0.0.1:\(server.port)") { ok in drained.set(ok) }
        #expect(waitDone(drained) == false)
        #expect(readBack(store, pages).allSatisfy { $0 == nil }, "the pages are still on the server")
        // A hiccup: the server is slow for a moment.
        stopProcess(server.process.processIdentifier)
        let during = readBack(store, pages, count: 1)
        kill(server.process.processIdentifier, SIGCONT)
        #expect(during[0]?.code != .lost, "a timeout was reported as a lost page (Region poisons it): \(String(describing: during[0]))")
        usleep(200_000)
        #expect(readBack(store, pages).allSatisfy { $0 == nil }, "and yet the page is there")
    }
}
