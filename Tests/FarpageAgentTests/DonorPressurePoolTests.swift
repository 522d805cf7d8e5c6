import FarpageKernel
import FarpageProtocol
import FarpageTestSupport
import FarpageTransport
import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Donor pressure end to end: a memory server asks for leases back (operator or free-memory
/// headroom), the agent moves their pages elsewhere while a workload runs, and the server
/// gets its memory back with no page lost.
extension PoolTests {
    func farpagectl(_ args: [String]) throws -> (Int32, String) {
        let r = try runProgram(binary("farpagectl"), args, mergeOutput: true)
        return (r.status, r.stdout)
    }

    /// Waits until `server` holds at least `pages` of the agent's pages.
    func waitForPages(_ agent: AgentProcess, on server: MemserverProcess, _ pages: Int) throws {
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline {
            if let row = try agent.pool().first(where: { $0.address == "127.0.0.1:\(server.port)" }), row.storedPages >= pages { return }
            usleep(20_000)
        }
        throw TestSupportError("no \(pages) pages reached \(server.port): \(try agent.pool())")
    }

    @Test func anOperatorReclaimMovesPagesOffTheServerWhileTheWorkloadRuns() throws {
        let servers = try startServers(2)
        let agent = try startAgent(servers)
        defer { agent.stop() }
        let w = try agent.startWorkload(["--size", "32MiB", "--budget", "4MiB", "--passes", "6", "--threads", "2"])
        let donor = servers[0]
        try waitForPages(agent, on: donor, 500)
        #expect(try donor.adminStatus().lentBytes > 0)
        // Its whole capacity back (more than it lends); farpagectl waits until the agent has
        // returned every lease.
        let (rc, text) = try farpagectl(["memserver", "reclaim", "256MiB", "--socket", donor.adminSocket, "--wait", "--timeout", "60"])
        #expect(rc == 0, "\(text)")
        let after = try donor.adminStatus()
        #expect(after.reclaimingLeases == 0 && after.limitBytes == 0, "\(after)")
        let (wrc, _, out) = w.finish()
        #expect(wrc == 0 && out.contains("\"failures\":0"), "pages were lost while the lease moved: \(out)")
        // The limit holds: the server lent nothing more while the workload went on.
        #expect(try leasesHeld(on: donor) == 0)
        #expect(try agent.pool().first { $0.address == "127.0.0.1:\(donor.port)" }?.status == "healthy")
        #expect(agent.logText.contains("memory server asks for leases back"))
        #expect(agent.logText.contains("leases given back to the memory server"))
        // Lifting the limit lends again.
        let (lrc, ltext) = try farpagectl(["memserver", "limit", "none", "--socket", donor.adminSocket, "--json"])
        #expect(lrc == 0 && ltext.contains("\"limitBytes\" : \(256 << 20)"), "\(ltext)")
    }

    @Test func memoryPressureOnTheDonorMovesEveryLeaseElsewhereAndLosesNothing() throws {
        let servers = try startServers(2)
        let agent = try startAgent(servers)
        defer { agent.stop() }
        let donor = servers[1]
        let w = try agent.startWorkload(["--size", "32MiB", "--budget", "4MiB", "--passes", "6", "--mode", "seq"])
        try waitForPages(agent, on: donor, 500)
        // A headroom this host cannot meet: the donor wants every lease back.
        #expect(try donor.admin(.init(op: .headroom, bytes: 1 << 60)).ok)
        let deadline = Date().addingTimeInterval(60)
        var status = try donor.adminStatus()
        while Date() < deadline, status.leases > 0 {
            usleep(100_000)
            status = try donor.adminStatus()
        }
        #expect(status.leases == 0 && status.pressureLimitBytes == 0, "\(status)")
        let (rc, _, out) = w.finish()
        #expect(rc == 0 && out.contains("\"failures\":0"), "\(out)")
        #expect(donor.logText.contains("lowering the lending limit"))
        // Pressure gone: the limit comes back.
        let relieved = try #require(try donor.admin(.init(op: .headroom, bytes: 0)).status)
        #expect(relieved.limitBytes == relieved.capacityBytes)
    }

    /// With nowhere to put the pages (one server, a small local spill), the agent keeps what it
    /// cannot move, says so, and retries; the server keeps waiting; no data is lost.
    @Test func aReclaimWithNowhereToGoKeepsThePagesAndRetries() throws {
        let servers = try startServers(1)
        let agent = try startAgent(servers, spill: "2MiB")
        defer { agent.stop() }
        let donor = servers[0]
        let w = try agent.startWorkload(["--size", "24MiB", "--budget", "4MiB", "--passes", "1", "--hold", "4"])
        try waitForPages(agent, on: donor, 3000)
        #expect(try donor.admin(.init(op: .limit, bytes: 0)).ok)
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline, !agent.logText.contains("their pages have nowhere to go") { usleep(100_000) }
        #expect(agent.logText.contains("their pages have nowhere to go"))
        let status = try donor.adminStatus()
        #expect(status.leases > 0 && status.reclaimingLeases == status.leases, "\(status)")
        let row = try #require(try agent.pool().first { $0.address == "127.0.0.1:\(donor.port)" })
        #expect((row.reclaimingLeases ?? 0) > 0 && row.status == "healthy")
        let (rc, _, out) = w.finish()
        #expect(rc == 0 && out.contains("\"failures\":0"), "\(out)")
        // The operator lifts the limit: the agent stops moving and places pages there again.
        #expect(try donor.admin(.init(op: .limit)).status?.reclaimingLeases == 0)
        let clear = Date().addingTimeInterval(10)
        while Date() < clear, (try agent.pool().first { $0.address == "127.0.0.1:\(donor.port)" }?.reclaimingLeases ?? 0) > 0 {
            usleep(100_000)
        }
        #expect((try agent.pool().first { $0.address == "127.0.0.1:\(donor.port)" }?.reclaimingLeases ?? 0) == 0)
    }

    /// Churn: four threads write and read random pages with version stamps (a tiny budget, so
    /// nearly every access goes far) while the servers take turns asking for every lease back
    /// and lending again. Leases move back and forth under the writes; not one may be lost.
    @Test func leasesChurningBetweenServersUnderRandomWritesLoseNothing() throws {
        let servers = try startServers(3)
        let agent = try startAgent(servers, spill: "64MiB")
        defer { agent.stop() }
        let w = try agent.startWorkload(["--size", "24MiB", "--budget", "2MiB", "--mode", "random", "--threads", "4",
                                     "--passes", "20000", "--seed", "77"])
        var turns = 0
        var k = 0
        while w.process.isRunning {
            let donor = servers[k % servers.count]
            k += 1
            guard (try? donor.admin(.init(op: .limit, bytes: 0)))?.ok == true else { continue }
            usleep(400_000)
            _ = try? donor.admin(.init(op: .limit))
            usleep(100_000)
            turns += 1
        }
        let (rc, _, out) = w.finish()
        #expect(rc == 0 && out.contains("\"failures\":0"), "a write was lost while leases moved: \(out)")
        #expect(turns >= 3, "the workload ended before the churn got going (\(turns) turns)")
        let moved = agent.logText.components(separatedBy: "leases given back to the memory server").count - 1
        print("churn: \(turns) turns, \(moved) reclaims completed")
        #expect(moved >= 2, "leases never moved during the churn")
        #expect(agent.logText.contains("memory server asks for leases back"))
        #expect(!agent.logText.contains("poisoning"), "pages were poisoned during the churn")
    }
}
