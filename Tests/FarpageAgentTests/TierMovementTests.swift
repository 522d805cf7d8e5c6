import FarpageProtocol
import FarpageTestSupport
import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Pages moving between the pool (memory servers) and the spill file below it: cold leases go
/// down in the background, pages used again come back up at their next eviction.
@Suite("Tier movement", .serialized)
struct TierMovementTests {
    /// One memory server of 32 MiB over a spill file, both with 1 MiB leases.
    func poolOverSpill(_ dir: ScratchDirectory, _ server: MemserverProcess, spill: String = "256MiB", tiering: String) throws
        -> AgentProcess
    {
        try AgentProcess(config: """
            [pool]
            servers = ["127.0.0.1:\(server.port)"]
            secret_file = "\(server.secretPath)"
            heartbeat = "200ms"
            io_timeout = "1s"
            [tiering]
            \(tiering)
            """, storeCapacity: spill, store: "kind = \"file\"\npath = \"\(dir.path)/spill\"\nlease_size = \"1MiB\"")
    }

    func rows(_ agent: AgentProcess) throws -> (server: PoolServer, spill: PoolServer) {
        let pool = try agent.pool()
        let server = try #require(pool.first { $0.transport == "tcp" }, "no memory server in \(pool.map(\.address))")
        let spill = try #require(pool.first { $0.address.hasPrefix("spill-file ") }, "no spill file in \(pool.map(\.address))")
        return (server, spill)
    }

    /// A region twice the server fills it and overflows into the file. While it sits unread the
    /// server's leases turn cold and go down until the server is at most `demote_to` full; then
    /// the whole region verifies byte-exact from both tiers, the pages read back from the file go
    /// up again when evicted (the server has room), and a second pass verifies too.
    @Test func coldLeasesGoDownAndPagesUsedAgainComeBackUp() throws {
        let dir = try ScratchDirectory()
        let server = try MemserverProcess(capacity: "32MiB", leaseSize: "1MiB")
        let agent = try poolOverSpill(dir, server, tiering: """
            demote_above = 0.75
            demote_to = 0.5
            demote_after = "1s"
            """)
        defer { agent.stop() }
        // 64 MiB through an 8 MiB budget; 5 s between the writes and the reads of each pass.
        let w = try agent.startWorkload(["--size", "64MiB", "--budget", "8MiB", "--passes", "2", "--pause", "5"])
        var peakOnServer = 0
        var demotedWhilePaused = false
        let deadline = Date().addingTimeInterval(90)
        while w.process.isRunning, Date() < deadline {
            let (s, _) = try rows(agent)
            peakOnServer = max(peakOnServer, s.storedPages)
            let totals = try agent.status().totals
            if totals["demoted_pages", default: 0] > 0 && totals["promoted_pages", default: 0] == 0 { demotedWhilePaused = true }
            usleep(100_000)
        }
        let (rc, _, out) = w.finish()
        #expect(rc == 0 && out.contains("\"failures\":0"), "\(out)")
        let totals = try agent.status().totals
        let (s, spill) = try rows(agent)
        // The server filled (it was the first choice) before the file took the rest.
        #expect(peakOnServer >= 7000, "the server held at most \(peakOnServer) pages of its 8192")
        #expect(demotedWhilePaused, "no lease was demoted while the region sat unread")
        #expect(totals["demoted_leases", default: 0] >= 8, "\(totals)")
        #expect(totals["demoted_pages", default: 0] >= 8 * 200, "\(totals)")
        #expect(totals["promoted_pages", default: 0] > 0, "no page used again came back up: \(totals)")
        #expect(totals["demotion_failures", default: 0] == 0, "\(totals)")
        #expect(s.errors == 0 && spill.errors == 0 && spill.spillFile?.checksumFailures == 0)
        #expect(agent.logText.contains("cold leases demoted"), "\(agent.logText.suffix(2000))")
    }

    /// A lease read within `demote_after` stays on the server however full it is: with the
    /// thresholds low enough to demote everything, the cold part of the region goes down and
    /// the working set read round after round is never read from the file.
    @Test func leasesReadRecentlyStayOnTheServer() throws {
        let dir = try ScratchDirectory()
        let server = try MemserverProcess(capacity: "32MiB", leaseSize: "1MiB")
        let agent = try poolOverSpill(dir, server, tiering: """
            demote_above = 0.3
            demote_to = 0.1
            demote_after = "3s"
            promote = false
            prefetch = false
            """)
        defer { agent.stop() }
        // 6144 pages, all written once; then pages 0..<3072 (1.5x the budget) read round after
        // round for 8 s, so their leases are read from all the time; the other half is cold.
        // No prefetch: it would read ahead into the cold half at the end of each round.
        let w = try agent.startWorkload(["--mode", "alternate", "--size", "24MiB", "--budget", "8MiB", "--working-set", "3072",
                                         "--seconds", "8", "--hold", "2"])
        // The last look before the workload ends (and frees the region).
        var last: (totals: [String: UInt64], server: PoolServer, spill: PoolServer)? = nil
        let deadline = Date().addingTimeInterval(60)
        while w.process.isRunning, Date() < deadline {
            let (s, spill) = try rows(agent)
            if s.storedPages + spill.storedPages > 0 { last = (try agent.status().totals, s, spill) }
            usleep(100_000)
        }
        let (rc, _, out) = w.finish()
        #expect(rc == 0 && out.contains("\"failures\":0"), "\(out)")
        let (totals, s, spill) = try #require(last)
        let io = try #require(spill.spillFile)
        #expect(totals["demoted_pages", default: 0] >= 1000, "the cold half was not demoted: \(totals)")
        #expect(io.reads == 0, "pages were read from the spill file: hot leases went down (\(io), \(totals))")
        #expect(s.storedPages >= 1024, "the working set left the server: \(s.storedPages) pages there, \(totals)")
        #expect(totals["promoted_pages", default: 0] == 0, "promote = false, yet \(totals)")
    }

    /// A spill file with room for 4 leases under a server that wants everything demoted: 4 go
    /// down, then demotion waits for room instead of failing over and over, and the region
    /// still verifies byte-exact.
    @Test func aFullSpillFileStopsDemotionWithoutLosingPages() throws {
        let dir = try ScratchDirectory()
        let server = try MemserverProcess(capacity: "32MiB", leaseSize: "1MiB")
        let agent = try poolOverSpill(dir, server, spill: "4MiB", tiering: """
            demote_above = 0.3
            demote_to = 0.1
            demote_after = "500ms"
            """)
        defer { agent.stop() }
        let w = try agent.startWorkload(["--size", "24MiB", "--budget", "8MiB", "--passes", "2", "--pause", "3"])
        let (rc, _, out) = w.finish()
        #expect(rc == 0 && out.contains("\"failures\":0"), "\(out)")
        let totals = try agent.status().totals
        #expect(totals["demoted_leases", default: 0] >= 1, "\(totals)")
        let (_, spill) = try rows(agent)
        #expect(spill.leases <= 4, "the spill file holds \(spill.leases) leases of 1 MiB in 4 MiB")
        #expect(totals["demotion_failures", default: 0] == 0, "demotion kept trying a full file: \(totals)")
    }
}
