import FarpageKernel
@testable import FarpagePool
import FarpageTestSupport
import FarpageTiers
import FarpageTransport
import Foundation
import Logging
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Regressions found in review of the streaming read path (fetch-ahead over the pool).
@Suite("Pool store: streaming reads (regressions)", .serialized)
struct StreamingReadTests {
    func makeStore(ioTimeout: Int32 = 500) throws -> PoolStore {
        PoolStore(spillBytes: 1 << 20, leaseBytes: 1 << 20, agentID: ClusterSecret.randomBytes(16), agentName: "streaming-review",
                  secret: try ClusterSecret(Array("test-cluster-secret-0123456789abcdef".utf8)), ioTimeoutMilliseconds: ioTimeout,
                  logger: Logger(label: "test"))
    }

    /// Bug (regression from 46c2bca's `fail`): a read whose connect finds that the server
    /// restarted (new identity) reports its pages lost, but no longer records the restart on the
    /// server (`noteFailure` is skipped for `.restarted`). The server stays healthy and its other
    /// pages count as readable, so the evictor punches clean pages whose only far copy is gone
    /// (instead of writing them elsewhere) until a heartbeat notices. Before 46c2bca the read
    /// path called `noteFailure(.restarted)`: permanently failed and lost at once.
    @Test func aRestartFoundByAReadMarksTheServerLost() throws {
        let first = try MemserverProcess(capacity: "8MiB", leaseSize: "1MiB")
        let port = first.port
        let store = try makeStore()
        try store.attach(address: "127.0.0.1:\(port)")
        let source = randomPages(2, seed: 7)
        let back = UnsafeMutableRawPointer.allocate(byteCount: 2 * 4096, alignment: 4096)
        defer {
            source.deallocate()
            back.deallocate()
        }
        let w = PageIOBatch(kind: .write)
        for i in 0..<2 { w.append(buffer: source + i * 4096, location: nil) }
        store.submitAndWait(w)
        #expect(w.errors.allSatisfy { $0 == nil })
        let a = try #require(w.locations[0])
        let b = try #require(w.locations[1])
        // The server restarts on the same port: every page it held is gone.
        first.stop()
        let second = try MemserverProcess(capacity: "8MiB", leaseSize: "1MiB", port: port)
        defer { second.stop() }
        // No idle connection (as when the pooled ones are in use by other threads): the read
        // connects afresh and the handshake reveals the new identity.
        let remote = try #require(store.state.withLock { $0.servers.first }?.backend as? RemoteBackend)
        remote.closeAll()
        let r = PageIOBatch(kind: .read)
        r.append(buffer: back, location: a)
        store.read(r, chunkPages: 64) { _ in }
        #expect(r.errors[0]?.code == .lost, "\(String(describing: r.errors[0]))")
        // The restart must now be known to the pool.
        #expect(!store.isReadable(b), "page b's only copy was on the restarted server, yet it counts as readable")
        #expect(store.report().first { $0.address == "127.0.0.1:\(port)" }?.status != .healthy)
    }

    /// A server that hangs mid-pipeline fails the
    /// runs not yet in at once (one I/O timeout per lease group, not one per run), and once it
    /// answers again the pool reads exact data (no reply of the broken pipeline is read by a
    /// later request).
    @Test func aHungServerFailsThePipelineOnceAndNothingDesynchronises() throws {
        let server = try MemserverProcess(capacity: "8MiB", leaseSize: "1MiB")
        defer { server.stop() }
        let store = try makeStore(ioTimeout: 500)
        try store.attach(address: "127.0.0.1:\(server.port)")
        let count = 200  // one lease: runs of 16, 64, 64, 56
        let source = randomPages(count, seed: 11)
        let target = UnsafeMutableRawPointer.allocate(byteCount: count * 4096, alignment: 4096)
        defer {
            source.deallocate()
            target.deallocate()
        }
        let w = PageIOBatch(kind: .write)
        for i in 0..<count { w.append(buffer: source + i * 4096, location: nil) }
        store.submitAndWait(w)
        #expect(w.errors.allSatisfy { $0 == nil })

        stopProcess(server.process.processIdentifier)
        let r = PageIOBatch(kind: .read)
        for i in 0..<count { r.append(buffer: target + i * 4096, location: w.locations[i]) }
        var calls: [Int] = []
        let start = monotonicNanoseconds()
        store.read(r, chunkPages: 64) { calls.append($0) }
        let seconds = Double(monotonicNanoseconds() - start) / 1e9
        kill(server.process.processIdentifier, SIGCONT)
        #expect(seconds < 1.6, "each run waited out its own timeout: \(seconds) s")
        #expect(calls.last == count && calls == calls.sorted(), "\(calls)")
        #expect(r.errors.allSatisfy { $0?.code == .unavailable }, "\(r.errors.prefix(3))")
        let errors = store.report().first { $0.address == "127.0.0.1:\(server.port)" }?.errors ?? 0
        print("errors counted for one broken pipeline of 4 runs: \(errors)")

        store.heartbeat()
        #expect(store.report().first { $0.address == "127.0.0.1:\(server.port)" }?.status == .healthy)
        for round in 0..<3 {
            memset(target, 0, count * 4096)
            let again = PageIOBatch(kind: .read)
            for i in 0..<count { again.append(buffer: target + i * 4096, location: w.locations[i]) }
            store.read(again, chunkPages: 64) { _ in }
            for i in 0..<count {
                #expect(again.errors[i] == nil && memcmp(target + i * 4096, source + i * 4096, 4096) == 0, "round \(round) page \(i)")
            }
        }
    }
}
