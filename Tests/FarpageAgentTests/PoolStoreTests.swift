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
        kill(server.process.processIdentifier, SIGSTOP)
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
}
