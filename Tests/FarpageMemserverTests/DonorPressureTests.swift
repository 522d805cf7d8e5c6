import FarpageKernel
import FarpageMemserver
import FarpageProtocol
import FarpageTestSupport
import FarpageTransport
import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Donor pressure on the memory server: the lending limit, which leases are asked back, and
/// that the server waits for the agent instead of taking leases (and their pages) by force.
@Suite("Memory server: donor pressure", .serialized)
struct DonorPressureTests {
    @Test func theCommentedReferenceConfigIsValidAndMatchesTheDefaults() throws {
        let path = #filePath.components(separatedBy: "/Tests/")[0] + "/config/memserver.toml"
        #expect(try MemserverConfig.load(path: path) == MemserverConfig())
        // Headroom and the admin socket: sizes (0 is off), an absolute path or "".
        let c = try MemserverConfig.parse("""
            [memserver]
            headroom = "2GiB"
            admin_socket = ""
            """)
        #expect(c.headroomBytes == 2 << 30 && c.adminSocket.isEmpty)
        #expect(try MemserverConfig.parse("[memserver]\nheadroom = \"0\"").headroomBytes == 0)
        #expect(throws: MemserverConfigError.self) { try MemserverConfig.parse("[memserver]\nheadroom = \"lots\"") }
        #expect(throws: MemserverConfigError.self) { try MemserverConfig.parse("[memserver]\nheadroom = -1") }
        #expect(throws: MemserverConfigError.self) { try MemserverConfig.parse("[memserver]\nadmin_socket = \"relative.sock\"") }
    }

    @Test func aLowerLimitMarksLeasesOfTheBiggestHoldersAndRefusesNewOnes() {
        let table = LeaseTable(capacityBytes: 16 << 20, leaseBytes: 1 << 20)
        let big = AgentID(Array(repeating: 1, count: 16))
        let small = AgentID(Array(repeating: 2, count: 16))
        let bigLeases = table.allocate(owner: big, count: 6)
        let smallLeases = table.allocate(owner: small, count: 2)
        #expect(bigLeases.count == 6 && smallLeases.count == 2)

        // Down to 5 of the 8 lent: 3 asked back, all from the agent holding the most, newest first.
        #expect(table.setLimit(leases: 5) == 3)
        #expect(table.reclaimRequested(owner: big) == Array(bigLeases.suffix(3)).sorted())
        #expect(table.reclaimRequested(owner: small).isEmpty)
        #expect(table.allocate(owner: small, count: 1).isEmpty, "a lease was lent past the limit")
        #expect(table.usage.limitLeases == 5 && table.usage.reclaiming == 3)

        // Down to 2: the marks spread (the big holder keeps no more than the small one).
        #expect(table.setLimit(leases: 2) == 6)
        let bigAsked = table.reclaimRequested(owner: big).count
        let smallAsked = table.reclaimRequested(owner: small).count
        #expect(bigAsked + smallAsked == 6)
        #expect(6 - bigAsked >= 1 && 2 - smallAsked >= 0 && (6 - bigAsked) - (2 - smallAsked) <= 1)

        // Leases stay usable until returned; returning one clears its mark.
        let asked = table.reclaimRequested(owner: big)
        #expect(throws: Never.self) { _ = try table.read(owner: big, leaseID: asked[0], offset: 0, pages: 1) }
        #expect(throws: Never.self) { try table.free(owner: big, leaseID: asked[0]) }
        #expect(table.usage.reclaiming == 5 && table.usage.leases == 7)

        // Lifting the limit unmarks the rest; an expired agent's marks go with its leases.
        #expect(table.setLimit(leases: 16) == 0)
        #expect(table.reclaimRequested(owner: big).isEmpty)
        #expect(table.setLimit(leases: 0) == 7)
        table.freeAll(owner: small)
        #expect(table.usage.reclaiming == 5 && table.reclaimRequested(owner: small).isEmpty)
        #expect(table.allocate(owner: small, count: 1).isEmpty)
    }

    /// Marks an agent has not honoured in time move to another agent's leases; with no other
    /// agent to ask they stay.
    @Test func staleMarksMoveToAnotherAgent() {
        let table = LeaseTable(capacityBytes: 16 << 20, leaseBytes: 1 << 20)
        let stuck = AgentID(Array(repeating: 7, count: 16))
        let able = AgentID(Array(repeating: 8, count: 16))
        _ = table.allocate(owner: stuck, count: 4)
        let ableLeases = table.allocate(owner: able, count: 2)
        #expect(table.setLimit(leases: 4) == 2)
        #expect(table.reclaimRequested(owner: stuck).count == 2 && table.reclaimRequested(owner: able).isEmpty)
        #expect(table.rotateStaleMarks(olderThan: 3600) == 0, "fresh marks moved")
        #expect(table.rotateStaleMarks(olderThan: 0) == 2)
        #expect(table.reclaimRequested(owner: stuck).isEmpty)
        #expect(Set(table.reclaimRequested(owner: able)) == Set(ableLeases))
        #expect(table.usage.reclaiming == 2 && table.usage.leases == 6)

        let alone = LeaseTable(capacityBytes: 16 << 20, leaseBytes: 1 << 20)
        _ = alone.allocate(owner: stuck, count: 4)
        #expect(alone.setLimit(leases: 1) == 3)
        #expect(alone.rotateStaleMarks(olderThan: 0) == 0)
        #expect(alone.reclaimRequested(owner: stuck).count == 3)
    }

    /// An agent that does not give its leases back keeps them, and its pages stay readable:
    /// the server only ever takes back what the agent returns.
    @Test func theServerWaitsForAnAgentThatDoesNotReturnItsLeases() throws {
        let server = try MemserverProcess(capacity: "16MiB", leaseSize: "1MiB")
        defer { server.stop() }
        let c = try server.client()
        defer { c.close() }
        guard case .leases(let ids) = try c.call(.leaseAlloc(count: 4)) else { throw TestError("no leases") }
        #expect(ids.count == 4)
        let (sums, data) = pages(8, seed: 11)
        #expect(try c.call(.write(leaseID: ids[3], offset: 0, checksums: sums, data: data)) == .ok)

        let reply = try server.admin(.init(op: .limit, bytes: 1 << 20))
        #expect(reply.ok && reply.status?.limitBytes == 1 << 20 && reply.status?.reclaimingLeases == 3)
        guard case .pong(let stats) = try c.call(.ping) else { throw TestError("no pong") }
        #expect(stats.reclaiming == 3 && stats.capacityBytes == 1 << 20)
        guard case .reclaim(let asked) = try c.call(.reclaimQuery) else { throw TestError("no RECLAIM") }
        #expect(asked.count == 3 && Set(asked).isSubset(of: Set(ids)))

        // Another agent cannot get a lease meanwhile, and is told why.
        let other = try server.client()
        defer { other.close() }
        #expect {
            try other.call(.leaseAlloc(count: 1))
        } throws: { ($0 as? TransportError)?.message.contains("reclaiming memory") == true }

        // Time passes; nothing is taken by force, and the data is intact.
        sleep(2)
        let status = try server.adminStatus()
        #expect(status.leases == 4 && status.reclaimingLeases == 3)
        #expect(status.agents.first { $0.leases == 4 }?.oldestReclaimSeconds ?? 0 >= 1.5)
        guard case .data(let back, let bytes) = try c.call(.read(leaseID: ids[3], offset: 0, pages: 8)) else {
            throw TestError("no data")
        }
        #expect(back == sums && bytes == data)

        // The agent returns one: the server's lent memory drops by one lease.
        #expect(try c.call(.leaseFree(leaseID: asked[0])) == .ok)
        #expect(try server.adminStatus().reclaimingLeases == 2)
        // The operator changes their mind: nothing is asked back any more.
        #expect(try server.admin(.init(op: .limit)).status?.reclaimingLeases == 0)
        guard case .reclaim(let none) = try c.call(.reclaimQuery) else { throw TestError("no RECLAIM") }
        #expect(none.isEmpty)
        // `reclaim SIZE` asks for that much below what is lent now: 3 held, 1 MiB back -> limit 2.
        let partial = try #require(try server.admin(.init(op: .reclaim, bytes: 1 << 20)).status)
        #expect(partial.limitBytes == 2 << 20 && partial.reclaimingLeases == 1 && partial.operatorLimitBytes == 2 << 20)
        #expect(server.logText.contains("lowering the lending limit"))
    }

    /// Free memory below the headroom lowers the limit until enough is asked back; above it
    /// (by two leases) the limit comes back.
    @Test func memoryPressureAsksLeasesBackAndLiftsWhenMemoryReturns() throws {
        let server = try MemserverProcess(capacity: "64MiB", leaseSize: "1MiB")
        defer { server.stop() }
        let c = try server.client()
        defer { c.close() }
        guard case .leases(let ids) = try c.call(.leaseAlloc(count: 8)) else { throw TestError("no leases") }
        #expect(ids.count == 8)
        // A headroom no host can meet: everything lent is asked back, nothing more is lent.
        let reply = try server.admin(.init(op: .headroom, bytes: 1 << 60))
        let s = try #require(reply.status)
        #expect(s.headroomBytes == 1 << 60 && s.pressureLimitBytes == 0 && s.limitBytes == 0 && s.reclaimingLeases == 8)
        #expect(s.memAvailableBytes ?? 0 > 0)
        guard case .reclaim(let asked) = try c.call(.reclaimQuery) else { throw TestError("no RECLAIM") }
        #expect(Set(asked) == Set(ids))
        // Headroom off: the limit is the capacity again and nothing is asked back.
        let off = try #require(try server.admin(.init(op: .headroom, bytes: 0)).status)
        #expect(off.limitBytes == 64 << 20 && off.reclaimingLeases == 0)
        // A headroom this host can meet: no pressure.
        let easy = try #require(try server.admin(.init(op: .headroom, bytes: 1 << 20)).status)
        #expect(easy.limitBytes == 64 << 20 && easy.reclaimingLeases == 0)
    }

    /// Bad requests on the admin socket get an error naming the problem; the socket keeps serving.
    @Test func badAdminRequestsAreRefusedWithAReason() throws {
        let server = try MemserverProcess(capacity: "16MiB", leaseSize: "1MiB")
        defer { server.stop() }
        let cases: [([UInt8], String)] = [
            (Array("not json".utf8), "not a valid request"),
            (Array(#"{"op":"explode"}"#.utf8), "not a valid request"),
            (Array(#"{"op":"reclaim"}"#.utf8), "reclaim needs"),
            (Array(#"{"op":"reclaim","bytes":-5}"#.utf8), "not a valid request"),
            ([UInt8](repeating: 0x41, count: MemserverAdmin.maxRequest + 100), "longer than"),
            ([0xFF, 0xFE, 0x00], "not a valid request"),
        ]
        for (bytes, expected) in cases {
            let reply = try server.admin(raw: bytes)
            #expect(!reply.ok && reply.error?.contains(expected) == true, "\(reply)")
        }
        #expect(try server.admin(.init(op: .status)).ok)
        // Only root and the server's user may administer it.
        if geteuid() == 0, let nobody = getpwnam("nobody") {
            chmod(server.adminSocket, 0o777)
            chmod(server.directory, 0o755)
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/sbin/runuser")
            p.arguments = ["-u", "nobody", "--", binary("farpagectl"), "memserver", "status", "--socket", server.adminSocket]
            let out = Pipe()
            p.standardError = out
            p.standardOutput = out
            try p.run()
            p.waitUntilExit()
            let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            _ = nobody
            #expect(p.terminationStatus != 0 && text.contains("permission denied"), "\(text)")
        }
    }
}
