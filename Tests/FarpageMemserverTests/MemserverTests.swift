import CFarpageChecksum
import FarpageKernel
import FarpageTransport
import Foundation
import Synchronization
import FarpageTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

struct TestError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

func pages(_ n: Int, seed: UInt64) -> ([UInt64], [UInt8]) {
    var data = [UInt8](repeating: 0, count: n * 4096)
    for i in 0..<data.count / 8 {
        let v = seed &* 0x9E37_79B9_7F4A_7C15 &+ UInt64(i)
        for k in 0..<8 { data[i * 8 + k] = UInt8(truncatingIfNeeded: v >> (8 * k)) }
    }
    var sums = [UInt64](repeating: 0, count: n)
    data.withUnsafeBytes { fp_checksum_pages($0.baseAddress, 4096, n, &sums) }
    return (sums, data)
}

@Suite("Memory server", .serialized)
struct MemserverTests {
    @Test func leasesCarryPagesWithTheirChecksums() throws {
        let server = try MemserverProcess()
        defer { server.stop() }
        let c = try server.client()
        #expect(c.leaseBytes == 4 << 20 && c.capacityBytes == 64 << 20)
        guard case .leases(let ids) = try c.call(.leaseAlloc(count: 3)) else { throw TestError("no leases") }
        #expect(ids.count == 3)
        let (sums, data) = pages(16, seed: 7)
        #expect(try c.call(.write(leaseID: ids[1], offset: 8192, checksums: sums, data: data)) == .ok)
        guard case .data(let back, let bytes) = try c.call(.read(leaseID: ids[1], offset: 8192, pages: 16)) else {
            throw TestError("no data")
        }
        #expect(back == sums && bytes == data)
        // Pipelined: many requests in flight on one connection, replies matched by id.
        var pending: Set<UInt64> = []
        for i in 0..<32 { pending.insert(try c.send(.read(leaseID: ids[1], offset: UInt64(i % 16) * 4096, pages: 1))) }
        while !pending.isEmpty {
            let (id, reply) = try c.receive()
            #expect(pending.remove(id) != nil)
            guard case .data(let s, _) = reply else { throw TestError("bad pipelined reply \(reply)") }
            #expect(s.count == 1)
        }
        #expect(try c.call(.leaseFree(leaseID: ids[0])) == .ok)
        guard case .pong(let stats) = try c.call(.ping) else { throw TestError("no pong") }
        #expect(stats.leasesHeld == 2 && stats.agents == 1)
        // A freed lease is zeroed before it is lent again.
        guard case .leases(let again) = try c.call(.leaseAlloc(count: 1)) else { throw TestError("no lease") }
        guard case .data(_, let fresh) = try c.call(.read(leaseID: again[0], offset: 0, pages: 4)) else { throw TestError("no data") }
        #expect(fresh.allSatisfy { $0 == 0 })
    }

    @Test func aWrongSecretGetsNothing() throws {
        let server = try MemserverProcess()
        defer { server.stop() }
        #expect {
            _ = try server.client(secret: "not-the-cluster-secret-at-all!!")
        } throws: { error in
            (error as? TransportError)?.kind == .authentication
        }
        #expect(server.logText.contains("authentication failed"))
        // Unauthenticated requests are refused and the connection closed, before any lease exists.
        let raw = try TCPStream.connect(host: "127.0.0.1", port: server.port)
        try raw.send(MemWire.encode(.leaseAlloc(count: 1), requestID: 1))
        let header = try MemWire.decodeHeader(try raw.receive(exactly: MemWire.headerSize))
        let reply = try MemWire.decodeReply(header.type, body: try raw.receive(exactly: header.bodyLength))
        #expect(reply == .error(code: MemErrorCode.unauthenticated.rawValue, message: "authenticate first (HELLO, then AUTH)"))
        #expect(throws: KernelError.self) { _ = try raw.receive(exactly: 1) }
        let c = try server.client()
        guard case .pong(let stats) = try c.call(.ping) else { throw TestError("no pong") }
        #expect(stats.leasesHeld == 0)
    }

    @Test func leasesBelongToTheirAgentAndOffsetsAreChecked() throws {
        let server = try MemserverProcess()
        defer { server.stop() }
        let a = try server.client()
        let b = try server.client()
        guard case .leases(let ids) = try a.call(.leaseAlloc(count: 1)) else { throw TestError("no lease") }
        let (sums, data) = pages(1, seed: 1)
        #expect(try a.call(.write(leaseID: ids[0], offset: 0, checksums: sums, data: data)) == .ok)
        for request: MemRequest in [
            .read(leaseID: ids[0], offset: 0, pages: 1), .write(leaseID: ids[0], offset: 0, checksums: sums, data: data),
            .leaseFree(leaseID: ids[0]),
        ] {
            #expect { _ = try b.call(request) } throws: {
                ($0 as? TransportError)?.kind == .refused(code: MemErrorCode.noSuchLease.rawValue)
            }
        }
        for request: MemRequest in [
            .read(leaseID: ids[0], offset: 4 << 20, pages: 1), .read(leaseID: ids[0], offset: (4 << 20) - 4096, pages: 2),
            .read(leaseID: ids[0], offset: 100, pages: 1), .read(leaseID: ids[0], offset: UInt64.max - 4095, pages: 1),
        ] {
            #expect { _ = try a.call(request) } throws: {
                ($0 as? TransportError)?.kind == .refused(code: MemErrorCode.outOfBounds.rawValue)
            }
        }
        // The owner's data is intact after all that.
        guard case .data(_, let back) = try a.call(.read(leaseID: ids[0], offset: 0, pages: 1)) else { throw TestError("no data") }
        #expect(back == data)
    }

    @Test func aCorruptWriteIsRefusedAndNothingIsStored() throws {
        let server = try MemserverProcess()
        defer { server.stop() }
        let c = try server.client()
        guard case .leases(let ids) = try c.call(.leaseAlloc(count: 1)) else { throw TestError("no lease") }
        let (sums, data) = pages(4, seed: 3)
        #expect(try c.call(.write(leaseID: ids[0], offset: 0, checksums: sums, data: data)) == .ok)
        var flipped = pages(4, seed: 4).1
        let newSums = pages(4, seed: 4).0
        flipped[3 * 4096 + 17] ^= 0x40  // one bit flipped in flight in the last page
        #expect { _ = try c.call(.write(leaseID: ids[0], offset: 0, checksums: newSums, data: flipped)) } throws: {
            ($0 as? TransportError)?.kind == .corrupt
        }
        guard case .data(let s, let back) = try c.call(.read(leaseID: ids[0], offset: 0, pages: 4)) else { throw TestError("no data") }
        #expect(s == sums && back == data, "a corrupt batch must not be stored, not even in part")
    }

    @Test func capacityIsNeverOverLent() throws {
        let server = try MemserverProcess(capacity: "16MiB", leaseSize: "4MiB")
        defer { server.stop() }
        let a = try server.client()
        let b = try server.client()
        guard case .leases(let first) = try a.call(.leaseAlloc(count: 3)) else { throw TestError("no leases") }
        guard case .leases(let second) = try b.call(.leaseAlloc(count: 3)) else { throw TestError("no leases") }
        #expect(first.count == 3 && second.count == 1)
        #expect { _ = try b.call(.leaseAlloc(count: 1)) } throws: {
            ($0 as? TransportError)?.kind == .refused(code: MemErrorCode.noCapacity.rawValue)
        }
    }

    @Test func leasesSurviveADisconnectForTheGracePeriodThenAreFreed() throws {
        let server = try MemserverProcess(grace: "2s")
        defer { server.stop() }
        let agent = ClusterSecret.randomBytes(16)
        var c: MemserverClient? = try server.client(agentID: agent)
        guard case .leases(let ids) = try c!.call(.leaseAlloc(count: 2)) else { throw TestError("no leases") }
        let (sums, data) = pages(2, seed: 9)
        #expect(try c!.call(.write(leaseID: ids[1], offset: 0, checksums: sums, data: data)) == .ok)
        c!.close()
        c = nil
        usleep(300_000)
        // The same agent reconnects within the grace period: its lease and data are still there.
        let back = try server.client(agentID: agent)
        guard case .data(_, let bytes) = try back.call(.read(leaseID: ids[1], offset: 0, pages: 2)) else { throw TestError("lost") }
        #expect(bytes == data)
        back.close()
        // Gone for longer than the grace period: the leases are freed.
        let deadline = Date().addingTimeInterval(6)
        var held: UInt32 = 99
        while Date() < deadline {
            usleep(250_000)
            let probe = try server.client()
            if case .pong(let s) = try probe.call(.ping) { held = s.leasesHeld }
            probe.close()
            if held == 0 { break }
        }
        #expect(held == 0)
        #expect(server.logText.contains("did not come back within the grace period"))
    }

    @Test func aHugeClaimedLengthIsCutOffWithoutBufferingIt() throws {
        let server = try MemserverProcess()
        defer { server.stop() }
        let raw = try TCPStream.connect(host: "127.0.0.1", port: server.port)
        var frame = MemWire.encode(.ping, requestID: 1)
        frame[16] = 0xFF; frame[17] = 0xFF; frame[18] = 0xFF; frame[19] = 0x7F  // body_length ~ 2 GiB
        try raw.send(frame)
        let header = try MemWire.decodeHeader(try raw.receive(exactly: MemWire.headerSize))
        guard case .error(_, let message) = try MemWire.decodeReply(header.type, body: try raw.receive(exactly: header.bodyLength)) else {
            throw TestError("expected an error")
        }
        #expect(message.contains("exceeds"))
        #expect(throws: KernelError.self) { _ = try raw.receive(exactly: 1) }
    }

    /// An agent that pipelines reads and never reads the replies must not stall another agent,
    /// nor make the server buffer without bound.
    @Test func aSlowAgentDoesNotStallOthers() throws {
        let server = try MemserverProcess()
        defer { server.stop() }
        let slow = try server.client()
        guard case .leases(let ids) = try slow.call(.leaseAlloc(count: 1)) else { throw TestError("no lease") }
        let before = server.residentKiB
        // ~256 MiB of replies requested, none read.
        let stop = Atomic<Bool>(false)
        Thread.detachNewThread {
            for _ in 0..<1024 where !stop.load(ordering: .relaxed) {
                _ = try? slow.send(.read(leaseID: ids[0], offset: 0, pages: 64))
            }
        }
        usleep(500_000)
        let fast = try server.client()
        guard case .leases(let mine) = try fast.call(.leaseAlloc(count: 1)) else { throw TestError("no lease") }
        let (sums, data) = pages(1, seed: 5)
        let start = Date()
        for i in 0..<500 {
            #expect(try fast.call(.write(leaseID: mine[0], offset: UInt64(i % 64) * 4096, checksums: sums, data: data)) == .ok)
        }
        let elapsed = Date().timeIntervalSince(start)
        stop.store(true, ordering: .relaxed)
        #expect(elapsed < 10, "500 writes took \(elapsed)s next to a slow agent")
        #expect(server.residentKiB - before < 32 * 1024, "the server buffered \(server.residentKiB - before) KiB for a slow agent")
        slow.close()
    }
}
