import FarpageKernel
import FarpageTestSupport
import FarpageTransport
import Foundation
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A seeded fuzzer against a live memory server: 100k frames, unauthenticated and
/// authenticated, random, truncated, oversized and type-confused, while a real agent
/// connection keeps writing and verifying pages.
@Suite("Memory server fuzzing", .serialized)
struct MemserverFuzzTests {
    static let secret = "test-cluster-secret-0123456789abcdef"

    /// Handshake by hand so the fuzzer owns the raw stream afterwards.
    func authenticated(_ port: Int) throws -> TCPStream {
        let s = try TCPStream.connect(host: "127.0.0.1", port: port, ioTimeoutMilliseconds: 2000)
        let agent = ClusterSecret.randomBytes(16)
        let nonce = ClusterSecret.randomBytes(32)
        try s.send(MemWire.encode(.hello(agentID: agent, nonce: nonce, name: "fuzzer"), requestID: 1))
        guard case .challenge(let serverNonce, _) = try reply(s) else { throw TestError("no challenge") }
        let secret = try ClusterSecret(Array(Self.secret.utf8))
        try s.send(MemWire.encode(.auth(mac: secret.agentProof(serverNonce: serverNonce, clientNonce: nonce, agentID: agent)), requestID: 2))
        guard case .authOK = try reply(s) else { throw TestError("not authenticated") }
        return s
    }

    func reply(_ s: TCPStream) throws -> MemReply {
        let h = try MemWire.decodeHeader(try s.receive(exactly: MemWire.headerSize))
        return try MemWire.decodeReply(h.type, body: try s.receive(exactly: h.bodyLength))
    }

    @Test func oneHundredThousandHostileFrames() throws {
        let server = try MemserverProcess(capacity: "64MiB", leaseSize: "1MiB")
        defer { server.stop() }
        // The honest agent, on its own thread for the whole run.
        let honest = try server.client()
        guard case .leases(let mine) = try honest.call(.leaseAlloc(count: 1)) else { throw TestError("no lease") }
        let stop = Atomic<Bool>(false)
        let honestErrors = Atomic<Int>(0)
        let honestOps = Atomic<Int>(0)
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            var i: UInt64 = 0
            while !stop.load(ordering: .relaxed) {
                i += 1
                let (sums, data) = pages(1, seed: i)
                do {
                    _ = try honest.call(.write(leaseID: mine[0], offset: (i % 256) * 4096, checksums: sums, data: data))
                    guard case .data(let s, let back) = try honest.call(.read(leaseID: mine[0], offset: (i % 256) * 4096, pages: 1)),
                        s == sums, back == data
                    else {
                        honestErrors.wrappingAdd(1, ordering: .relaxed)
                        continue
                    }
                    honestOps.wrappingAdd(1, ordering: .relaxed)
                } catch { honestErrors.wrappingAdd(1, ordering: .relaxed) }
            }
            done.signal()
        }

        let rssBefore = server.residentKiB
        var rng = SplitMix(state: 0xFA22)
        var closedByServer = 0
        var refused = 0
        let valid: [[UInt8]] = [
            MemWire.encode(.ping, requestID: 1), MemWire.encode(.leaseAlloc(count: 2), requestID: 2),
            MemWire.encode(.read(leaseID: 1, offset: 0, pages: 1), requestID: 3),
            MemWire.encode(.leaseFree(leaseID: 1), requestID: 4),
            MemWire.encode(.write(leaseID: 1, offset: 0, checksums: [0], data: [UInt8](repeating: 1, count: 4096)), requestID: 5),
        ]
        // Phase A: unauthenticated. Every frame is answered with an error and a close, or we
        // hang up mid-frame ourselves.
        var raw = try TCPStream.connect(host: "127.0.0.1", port: server.port, ioTimeoutMilliseconds: 2000)
        for i in 0..<25_000 {
            var frame: [UInt8]
            var hangUp = false
            switch rng.next() % 4 {
            case 0: frame = (0..<(24 + Int(rng.next() % 64))).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            case 1:
                frame = valid[Int(rng.next() % UInt64(valid.count))]
                frame = Array(frame.prefix(Int(rng.next() % UInt64(frame.count))))
                hangUp = true
            case 2:
                frame = valid[Int(rng.next() % UInt64(valid.count))]
                let n = UInt32(truncatingIfNeeded: rng.next()) | 0x0100_0000
                for k in 0..<4 { frame[16 + k] = UInt8(truncatingIfNeeded: n >> (8 * k)) }
            default:
                frame = valid[Int(rng.next() % UInt64(valid.count))]
                frame[4] = UInt8(truncatingIfNeeded: rng.next() % 4)  // wrong version, or a request before HELLO
            }
            do {
                try raw.send(frame)
                if hangUp { throw TestError("hang up") }
                _ = try? reply(raw)
                _ = try raw.receive(exactly: 1)  // the server must have closed
                Issue.record("frame \(i): the server kept an unauthenticated connection open")
            } catch {
                closedByServer += hangUp ? 0 : 1
            }
            raw = try TCPStream.connect(host: "127.0.0.1", port: server.port, ioTimeoutMilliseconds: 2000)
        }
        // Phase B: authenticated, well-framed but hostile requests.
        var s = try authenticated(server.port)
        var rssAtThird = 0
        for n in 0..<75_000 {
            if n == 25_000 { rssAtThird = server.residentKiB }
            let request: MemRequest
            switch rng.next() % 5 {
            case 0: request = .read(leaseID: rng.next() % 8, offset: (rng.next() % 600) * 4096 &+ (rng.next() % 2) * 7, pages: 1 + Int(rng.next() % 256))
            case 1:
                let pages = 1 + Int(rng.next() % 4)
                request = .write(leaseID: rng.next() % 8, offset: (rng.next() % 300) * 4096, checksums: (0..<pages).map { _ in rng.next() },
                                 data: [UInt8](repeating: UInt8(truncatingIfNeeded: rng.next()), count: pages * 4096))
            case 2: request = .leaseFree(leaseID: rng.next() % 16)
            case 3: request = .leaseAlloc(count: UInt32(rng.next() % 3))
            default: request = .ping
            }
            var frame = MemWire.encode(request, requestID: rng.next())
            if rng.next() % 10 == 0 { frame[6] = UInt8(truncatingIfNeeded: rng.next() % 200) }  // type confusion
            do {
                try s.send(frame)
                let r = try reply(s)
                if case .error = r { refused += 1 }
                if case .leases(let ids) = r {  // give them back so capacity stays for the honest agent
                    for id in ids {
                        try s.send(MemWire.encode(.leaseFree(leaseID: id), requestID: 0))
                        _ = try reply(s)
                    }
                }
            } catch {
                closedByServer += 1
                s = try authenticated(server.port)
            }
        }
        stop.store(true, ordering: .relaxed)
        done.wait()
        #expect(server.process.isRunning, "the memory server died: \(server.logText.suffix(2000))")
        #expect(closedByServer > 10_000)
        #expect(refused > 10_000, "hostile requests were not refused (\(refused))")
        #expect(honestErrors.load(ordering: .relaxed) == 0, "the honest agent was disturbed")
        #expect(honestOps.load(ordering: .relaxed) > 100)
        // Bounded, not merely small: after the allocator's arenas warm up, two thirds more
        // hostile traffic must not grow the server further.
        let rssEnd = server.residentKiB
        #expect(rssEnd - rssBefore < 32 * 1024, "memory server grew by \(rssEnd - rssBefore) KiB")
        #expect(rssEnd - rssAtThird < 16 * 1024, "memory keeps growing under hostile traffic: \(rssAtThird) -> \(rssEnd) KiB")
        print("memserver RSS KiB: before \(rssBefore), after a third \(rssAtThird), end \(rssEnd)")
    }
}
