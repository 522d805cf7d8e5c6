import FarpageKernel
import FarpageProtocol
import FarpageTestSupport
import FarpageTransport
import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The pool: real memory-server processes on loopback ports, a real agent, real clients.
@Suite("Pool", .serialized)
struct PoolTests {
    func startServers(_ n: Int, capacity: String = "256MiB") throws -> [MemserverProcess] {
        try (0..<n).map { _ in try MemserverProcess(capacity: capacity, leaseSize: "1MiB") }
    }

    func startAgent(_ servers: [MemserverProcess], secretPath: String? = nil, spill: String = "1GiB") throws -> AgentProcess {
        let list = servers.map { "\"127.0.0.1:\($0.port)\"" }.joined(separator: ", ")
        return try AgentProcess(config: """
            [pool]
            servers = [\(list)]
            secret_file = "\(secretPath ?? servers[0].secretPath)"
            heartbeat = "200ms"
            io_timeout = "1s"
            """, storeCapacity: spill)
    }

    func leasesHeld(on server: MemserverProcess) throws -> UInt32 {
        let c = try server.client()
        defer { c.close() }
        guard case .pong(let s) = try c.call(.ping) else { throw TestSupportError("no pong") }
        return s.leasesHeld
    }

    /// Test 1: a region 4x its budget spread over 3 memory servers: write, verify, rewrite, verify.
    @Test func aRegionFourTimesItsBudgetSpreadsOverThreeServers() throws {
        let servers = try startServers(3)
        let agent = try startAgent(servers)
        defer { agent.stop() }
        let (rc, _, out) = try agent.startWorkload(["--size", "64MiB", "--budget", "16MiB", "--passes", "2", "--hold", "1"]).finish()
        #expect(rc == 0 && out.contains("\"failures\":0"), "\(out)")
        // Pages went to the servers, spread by free capacity; none needed the local spill.
        let report = try agent.pool()
        let used = report.filter { $0.transport == "tcp" && $0.leases > 0 }
        #expect(used.count >= 2, "pages did not spread: \(report.map { "\($0.address)=\($0.leases)" })")
        #expect(report.first { $0.transport == "local" }?.leases == 0, "pages went to the local spill")
        for s in servers { #expect(try leasesHeld(on: s) <= 64) }
    }

    /// Test 2: detach one server mid-workload: the workload finishes byte-exact and the server
    /// ends with no lease held.
    @Test func detachingAServerMidWorkloadMovesItsPagesAndReleasesItsLeases() throws {
        let servers = try startServers(3)
        let agent = try startAgent(servers)
        defer { agent.stop() }
        let w = try agent.startWorkload(["--size", "32MiB", "--budget", "4MiB", "--passes", "4", "--threads", "2"])
        // Let pages land everywhere, then detach the server holding the most.
        let deadline = Date().addingTimeInterval(30)
        var victim: PoolServer?
        while Date() < deadline {
            victim = try agent.pool().filter { $0.transport == "tcp" }.max { $0.storedPages < $1.storedPages }
            if let v = victim, v.storedPages > 500 { break }
            usleep(50_000)
        }
        let target = try #require(victim)
        #expect(try agent.call(.poolDetach(address: target.address)) == .ok(0, 0))
        var status = ""
        while Date() < deadline {
            status = try agent.pool().first { $0.address == target.address }?.status ?? "gone"
            if status == "detached" || status == "failed" { break }
            usleep(50_000)
        }
        #expect(status == "detached")
        let (rc, _, out) = w.finish()
        #expect(rc == 0 && out.contains("\"failures\":0"), "the workload saw bad data after the detach: \(out)")
        let server = try #require(servers.first { "127.0.0.1:\($0.port)" == target.address })
        #expect(try leasesHeld(on: server) == 0, "the detached server still lends leases to the agent")
        #expect(agent.logText.contains("memory server detached: all its pages moved"))
    }

    /// Test 3: attach a new server mid-workload: new leases land on it.
    @Test func anAttachedServerReceivesNewLeases() throws {
        let servers = try startServers(1)
        let agent = try startAgent(servers)
        defer { agent.stop() }
        let late = try MemserverProcess(capacity: "256MiB", leaseSize: "1MiB")
        let w = try agent.startWorkload(["--size", "32MiB", "--budget", "4MiB", "--passes", "12"])
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline, (try agent.pool().first { $0.transport == "tcp" }?.storedPages ?? 0) < 1000 { usleep(20_000) }
        #expect(try agent.call(.poolAttach(address: "127.0.0.1:\(late.port)")) == .ok(0, 0))
        let (rc, _, out) = w.finish()
        #expect(rc == 0 && out.contains("\"failures\":0"), "\(out)")
        let report = try agent.pool()
        let row = try #require(report.first { $0.address == "127.0.0.1:\(late.port)" })
        #expect(row.status == "healthy")
        #expect(try leasesHeld(on: late) > 0, "no lease was placed on the new server")
        _ = row
    }

    /// Test 5: an agent with the wrong secret gets nothing from a server; the operator is told why.
    @Test func aWrongSecretIsRefusedAndReported() throws {
        let servers = try startServers(1)
        let wrong = servers[0].directory + "/wrong.secret"
        try "a-different-secret-0123456789abcdef".write(toFile: wrong, atomically: true, encoding: .utf8)
        chmod(wrong, 0o600)
        let agent = try startAgent(servers, secretPath: wrong)
        defer { agent.stop() }
        // The configured server is tried as the agent starts; wait for the verdict in its log.
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline, !agent.logText.contains("memory server not reachable yet") { usleep(20_000) }
        #expect(agent.logText.contains("memory server not reachable yet"))
        #expect(agent.logText.contains("refused authentication"), "\(agent.logText)")
        guard case .error(_, _, let message) = try agent.call(.poolAttach(address: "127.0.0.1:\(servers[0].port)")) else {
            Issue.record("attach with a wrong secret succeeded")
            return
        }
        #expect(message.contains("authentication"))
        #expect(try agent.pool().allSatisfy { $0.transport == "local" })
        #expect(try leasesHeld(on: servers[0]) == 0)
        #expect(servers[0].logText.contains("authentication failed"))
    }

    /// A memory server that restarts on the same address has lost every page it held: the
    /// agent must see that it is not the same server (its identity changed) and poison those
    /// pages as lost (reads fail, the fault path poisons), never take it back as healthy.
    @Test func aRestartedServerIsRecognisedAndNotTakenBack() throws {
        let first = try MemserverProcess(capacity: "256MiB", leaseSize: "1MiB")
        let port = first.port
        let agent = try startAgent([first])
        defer { agent.stop() }
        let w = try agent.startWorkload(["--size", "32MiB", "--budget", "4MiB", "--passes", "1", "--hold", "3"])
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline, (try agent.pool().first { $0.transport == "tcp" }?.storedPages ?? 0) < 4000 { usleep(50_000) }
        _ = w.finish()
        // Pages are far on the first server. Restart it on the same port.
        let holder = try agent.startWorkload(["--size", "32MiB", "--budget", "4MiB", "--passes", "1", "--hold", "30"])
        while Date() < deadline, (try agent.pool().first { $0.transport == "tcp" }?.storedPages ?? 0) < 4000 { usleep(50_000) }
        first.stop()
        let second = try MemserverProcess(capacity: "256MiB", leaseSize: "1MiB", port: port)
        defer { second.stop() }
        var status = ""
        while Date() < deadline {
            status = try agent.pool().first { $0.transport == "tcp" }?.status ?? ""
            if status == "failed" && agent.logText.contains("memory server restarted") { break }
            usleep(100_000)
        }
        #expect(status == "failed")
        #expect(agent.logText.contains("memory server restarted"))
        usleep(1_000_000)  // several heartbeats: it must stay failed
        #expect(try agent.pool().first { $0.transport == "tcp" }?.status == "failed")
        holder.process.terminate()
        _ = holder.finish()
    }

    /// A memory server that stops answering for longer than the agent's retries (a network
    /// outage, a paused process): faults on its pages wait for it (the client's threads stay
    /// blocked in their faults), and when it answers again the workload finishes byte-exact.
    @Test func faultsWaitForAServerThatStopsAnsweringAndNoPageIsLost() throws {
        let servers = try startServers(1)
        let agent = try startAgent(servers)
        defer { agent.stop() }
        let pid = servers[0].process.processIdentifier
        let w = try agent.startWorkload(["--size", "32MiB", "--budget", "4MiB", "--passes", "16"])
        let deadline = Date().addingTimeInterval(60)
        while Date() < deadline, (try agent.pool().first { $0.transport == "tcp" }?.storedPages ?? 0) < 2000 { usleep(50_000) }
        kill(pid, SIGSTOP)
        // Five io_timeouts: every read to it times out, the heartbeat marks it failed.
        usleep(5_000_000)
        let during = try agent.status()
        let stillRunning = w.process.isRunning
        kill(pid, SIGCONT)
        #expect(stillRunning, "the client ended while its server was paused")
        #expect(during.pool.first { $0.transport == "tcp" }?.status == "failed")
        #expect(during.totals["outage_waits", default: 0] > 0, "no fault waited: \(during.totals)")
        let (rc, _, out) = w.finish()
        // What the agent said about the server and the faults, for a failure's message.
        let story = agent.logText.split(separator: "\n")
            .filter { $0.contains("memory server") || $0.contains("far tier") || $0.contains("poison") }
            .suffix(40).joined(separator: "\n")
        #expect(rc == 0 && out.contains("\"failures\":0"), "\(out)\n\(story)")
        let after = try agent.status()
        #expect(after.totals["lost_pages", default: 0] == 0, "\(after.totals)\n\(story)")
        #expect(after.pool.first { $0.transport == "tcp" }?.status == "healthy", "\(story)")
        #expect(agent.logText.contains("faults on its pages wait for it"))
        #expect(agent.logText.contains("faults that waited for the far tier are served"))
        #expect(!agent.logText.contains("poisoning it"))
    }

    /// A memory server that dies: the agent notices, and pages that only it held are never
    /// served as zeros. Faults on them wait (it may come back) until the operator removes the
    /// server: then they are poisoned and the client gets SIGBUS. New evictions go elsewhere.
    @Test func aServerThatDiesIsReportedAndItsPagesArePoisonedNotZeroed() throws {
        let servers = try startServers(1)
        let agent = try startAgent(servers)
        defer { agent.stop() }
        let w = try agent.startWorkload(["--size", "32MiB", "--budget", "4MiB", "--passes", "200"])
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline, (try agent.pool().first { $0.transport == "tcp" }?.storedPages ?? 0) < 2000 { usleep(50_000) }
        kill(servers[0].process.processIdentifier, SIGKILL)
        // The client waits on a fault (a dead server cannot be told from a silent one)...
        while Date() < deadline, try agent.status().totals["outage_waits", default: 0] == 0 { usleep(50_000) }
        #expect(try agent.status().totals["outage_waits", default: 0] > 0)
        #expect(w.process.isRunning, "the client ended before the server was removed")
        // ...until the operator removes the server: its pages are lost, the faults poisoned.
        let row0 = try #require(try agent.pool().first { $0.transport == "tcp" })
        #expect(row0.status == "failed")
        #expect(agent.logText.contains("memory server failed"))
        #expect(try agent.call(.poolRemove(address: row0.address)) == .ok(0, 0))
        let (_, reason, out) = w.finish()
        #expect(reason == .uncaughtSignal && w.process.terminationStatus == SIGBUS,
                "the client should die of SIGBUS on a lost page, got \(reason) \(w.process.terminationStatus): \(out)")
        #expect(!out.contains("MISMATCH"), "a lost page was served with wrong contents: \(out)")
        #expect(agent.logText.contains("poisoning it"))
        // The dead server, removed, gets no more heartbeats.
        let address = row0.address
        guard case .error = try agent.call(.poolDetach(address: "127.0.0.1:1")) else {
            Issue.record("detaching an unknown server succeeded")
            return
        }
        let row = try #require(try agent.pool().first { $0.address == address })
        #expect(row.status == "detached")
        let errors = row.errors
        usleep(800_000)  // four heartbeats
        #expect(try agent.pool().first { $0.address == address }?.errors == errors, "a removed server is still pinged")
        #expect(agent.logText.contains("removed without draining"))
    }
}
