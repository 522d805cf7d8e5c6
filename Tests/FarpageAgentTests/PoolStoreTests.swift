import FarpageKernel
import FarpagePool
import FarpageTestSupport
import FarpageTiers
import FarpageTransport
import Foundation
import Logging
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// PoolStore against a real memory server, driven directly (no agent), to pin down slot
/// ownership when writes fail.
@Suite("Pool store", .serialized)
struct PoolStoreTests {
    /// Regression (found in review): a page whose copy sits on a failed server is rewritten at
    /// eviction. When no other place can take it, the write fails and the page keeps its old
    /// slot (the page table still points there): that slot must not be released, or another
    /// page would be given it and the first page would later read the other's data.
    @Test func aFailedRewriteKeepsThePagesSlot() throws {
        let server = try MemserverProcess(capacity: "8MiB", leaseSize: "1MiB")
        defer { server.stop() }
        let store = PoolStore(spillBytes: 1 << 20, leaseBytes: 1 << 20, agentID: ClusterSecret.randomBytes(16),
                              agentName: "pool-store-test", secret: try ClusterSecret(Array("test-cluster-secret-0123456789abcdef".utf8)),
                              ioTimeoutMilliseconds: 500, logger: Logger(label: "test"))
        let page = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { page.deallocate() }
        memset(page, 0x42, 4096)
        func write(_ location: PageLocation?) -> (PageLocation?, StoreError?) {
            let b = PageIOBatch(kind: .write)
            b.append(buffer: page, location: location)
            store.submitAndWait(b)
            return (b.locations[0], b.errors[0])
        }
        // Fill the local spill (one 1 MiB lease) while no server is attached.
        for _ in 0..<256 { #expect(write(nil).1 == nil) }
        #expect(write(nil).1?.code == .full, "the spill should be full")
        // A page on the memory server.
        try store.attach(address: "127.0.0.1:\(server.port)")
        let (onServer, error) = write(nil)
        #expect(error == nil)
        let slot = try #require(onServer)
        let used = store.usedPages
        // The server stops answering: the heartbeat marks it failed.
        stopProcess(server.process.processIdentifier)
        defer { kill(server.process.processIdentifier, SIGCONT) }
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline, store.report().first(where: { $0.address == "127.0.0.1:\(server.port)" })?.status != .failed {
            store.heartbeat()
        }
        #expect(store.report().first { $0.address == "127.0.0.1:\(server.port)" }?.status == .failed)
        // Rewriting the page finds no healthy place: it fails, and the page keeps its slot.
        let (after, failure) = write(slot)
        #expect(failure != nil)
        #expect(after == slot)
        #expect(store.usedPages == used, "the failed rewrite released the page's slot")
        // The server comes back: a fresh page must not be given the slot the first page still owns.
        kill(server.process.processIdentifier, SIGCONT)
        store.heartbeat()
        let (fresh, e2) = write(nil)
        #expect(e2 == nil)
        #expect(fresh != slot, "a slot still owned by a page was handed to another")
    }

    func makeStore(ioTimeout: Int32 = 500) throws -> PoolStore {
        PoolStore(spillBytes: 1 << 20, leaseBytes: 1 << 20, agentID: ClusterSecret.randomBytes(16), agentName: "pool-store-test",
                  secret: try ClusterSecret(Array("test-cluster-secret-0123456789abcdef".utf8)), ioTimeoutMilliseconds: ioTimeout,
                  logger: Logger(label: "test"))
    }

    /// A server frees our leases after its grace period while we cannot reach it (a partition
    /// longer than lease_grace). When it answers again, those pages are reported lost (to be
    /// poisoned at once), never read as zeros, and rewrites go to a new lease.
    @Test func leasesFreedDuringAPartitionAreRecognisedAsLost() throws {
        let server = try MemserverProcess(capacity: "8MiB", leaseSize: "1MiB", grace: "1s")
        defer { server.stop() }
        let store = try makeStore()
        try store.attach(address: "127.0.0.1:\(server.port)")
        let page = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { page.deallocate() }
        memset(page, 0x5A, 4096)
        let w = PageIOBatch(kind: .write)
        w.append(buffer: page, location: nil)
        store.submitAndWait(w)
        #expect(w.errors[0] == nil)
        let slot = try #require(w.locations[0])
        #expect(try server.adminStatus().leases == 1)
        // Partition: the server stops; our requests time out and we drop our connections.
        stopProcess(server.process.processIdentifier)
        for _ in 0..<3 { store.heartbeat() }
        #expect(store.report().first { $0.address == "127.0.0.1:\(server.port)" }?.status == .failed)
        // The server comes back, sees us gone, and frees our lease after its grace period.
        kill(server.process.processIdentifier, SIGCONT)
        let deadline = Date().addingTimeInterval(15)
        while Date() < deadline, (try server.adminStatus().leases) > 0 { usleep(100_000) }
        #expect(try server.adminStatus().leases == 0)
        store.heartbeat()  // it answers again: healthy
        // Reading the page: lost, not zeros, not "try again".
        let r = PageIOBatch(kind: .read)
        let back = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { back.deallocate() }
        r.append(buffer: back, location: slot)
        store.submitAndWait(r)
        #expect(r.errors[0]?.code == .lost, "\(String(describing: r.errors[0]))")
        #expect(!store.isReadable(slot))
        // A rewrite of the page lands in a new lease, not the lost one.
        let again = PageIOBatch(kind: .write)
        again.append(buffer: page, location: slot)
        store.submitAndWait(again)
        #expect(again.errors[0] == nil)
        let moved = try #require(again.locations[0])
        #expect(moved != slot)
        let check = PageIOBatch(kind: .read)
        check.append(buffer: back, location: moved)
        store.submitAndWait(check)
        #expect(check.errors[0] == nil && memcmp(back, page, 4096) == 0)
    }

    /// Leases that hold no page are given back after a few heartbeats.
    @Test func emptyLeasesAreReturned() throws {
        let server = try MemserverProcess(capacity: "8MiB", leaseSize: "1MiB")
        defer { server.stop() }
        let store = try makeStore()
        try store.attach(address: "127.0.0.1:\(server.port)")
        let buffers = (0..<300).map { _ in UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096) }
        defer { buffers.forEach { $0.deallocate() } }
        let w = PageIOBatch(kind: .write)
        for (i, b) in buffers.enumerated() {
            memset(b, Int32(i & 0xFF), 4096)
            w.append(buffer: b, location: nil)
        }
        store.submitAndWait(w)
        #expect(w.errors.allSatisfy { $0 == nil })
        #expect(try server.adminStatus().leases == 2)  // 300 pages: two 256-page leases
        // Pages of the second lease go away; the first still holds some.
        store.release(w.locations.compactMap { $0 }.filter { $0.raw >> 24 == w.locations[299]!.raw >> 24 })
        for _ in 0..<2 { store.heartbeat() }
        #expect(try server.adminStatus().leases == 2, "returned before three empty heartbeats")
        store.heartbeat()
        #expect(try server.adminStatus().leases == 1)
        // The pages of the kept lease still read back.
        let r = PageIOBatch(kind: .read)
        let back = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { back.deallocate() }
        r.append(buffer: back, location: w.locations[0])
        store.submitAndWait(r)
        #expect(r.errors[0] == nil && memcmp(back, buffers[0], 4096) == 0)
    }

    /// Streaming reads (fetch-ahead): runs of one lease are pipelined and handed over chunk by
    /// chunk, in order, each page exact; a page whose location names no lease fails alone.
    @Test func streamingReadsArriveInOrderChunkByChunk() throws {
        let server = try MemserverProcess(capacity: "8MiB", leaseSize: "1MiB")
        defer { server.stop() }
        let store = try makeStore()
        try store.attach(address: "127.0.0.1:\(server.port)")
        let count = 400
        let source = UnsafeMutableRawPointer.allocate(byteCount: count * 4096, alignment: 4096)
        let target = UnsafeMutableRawPointer.allocate(byteCount: count * 4096, alignment: 4096)
        defer {
            source.deallocate()
            target.deallocate()
        }
        var rng = SplitMix(state: 42)
        for w in 0..<(count * 512) { source.storeBytes(of: rng.next(), toByteOffset: w * 8, as: UInt64.self) }
        let w = PageIOBatch(kind: .write)
        for i in 0..<count { w.append(buffer: source + i * 4096, location: nil) }
        store.submitAndWait(w)
        #expect(w.errors.allSatisfy { $0 == nil })

        let r = PageIOBatch(kind: .read)
        for i in 0..<count { r.append(buffer: target + i * 4096, location: w.locations[i]) }
        // Page 123 names a lease that does not exist.
        r.locations[123] = PageLocation(raw: UInt64(4000) << 24)
        var calls: [Int] = []
        store.read(r, chunkPages: 64) { calls.append($0) }
        #expect(calls.count >= 6, "not streamed: \(calls)")
        #expect(calls == calls.sorted() && calls.last == count && (calls.first ?? 0) <= 16, "\(calls)")
        #expect(r.errors[123]?.code == .badLocation)
        for i in 0..<count where i != 123 {
            #expect(r.errors[i] == nil && memcmp(target + i * 4096, source + i * 4096, 4096) == 0, "page \(i)")
        }
        // Buffers that are not consecutive are read through a scratch buffer, still exact.
        let scattered = PageIOBatch(kind: .read)
        for i in stride(from: count - 1, through: 0, by: -2) { scattered.append(buffer: target + i * 4096, location: w.locations[i]) }
        memset(target, 0, count * 4096)
        store.read(scattered, chunkPages: 64) { _ in }
        for i in stride(from: count - 1, through: 0, by: -2) {
            #expect(memcmp(target + i * 4096, source + i * 4096, 4096) == 0, "page \(i)")
        }
    }

    /// Placement counts what a server lends to other agents: a second agent puts its pages on
    /// the server the first one has not filled.
    @Test func placementCountsOtherAgentsLeases() throws {
        let busy = try MemserverProcess(capacity: "8MiB", leaseSize: "1MiB")
        let idle = try MemserverProcess(capacity: "8MiB", leaseSize: "1MiB")
        defer {
            busy.stop()
            idle.stop()
        }
        let page = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { page.deallocate() }
        memset(page, 0x33, 4096)
        func write(_ store: PoolStore, _ n: Int) -> [PageLocation?] {
            let w = PageIOBatch(kind: .write)
            for _ in 0..<n { w.append(buffer: page, location: nil) }
            store.submitAndWait(w)
            #expect(w.errors.allSatisfy { $0 == nil })
            return w.locations
        }
        // Agent A fills 6 of the busy server's 8 leases.
        let a = try makeStore()
        try a.attach(address: "127.0.0.1:\(busy.port)")
        _ = write(a, 6 * 256)
        #expect(try busy.adminStatus().leases == 6)
        // Agent B sees both servers; after a heartbeat it knows what the busy one lends.
        let b = try makeStore()
        try b.attach(address: "127.0.0.1:\(busy.port)")
        try b.attach(address: "127.0.0.1:\(idle.port)")
        b.heartbeat()
        for _ in 0..<8 { _ = write(b, 64) }
        let rows = b.report()
        #expect(rows.first { $0.address == "127.0.0.1:\(idle.port)" }?.storedPages == 512, "\(rows.map { "\($0.address)=\($0.storedPages)" })")
        #expect(rows.first { $0.address == "127.0.0.1:\(busy.port)" }?.storedPages == 0)
    }
}
