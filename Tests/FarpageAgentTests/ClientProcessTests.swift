import FarpageKernel
import FarpageProtocol
import Foundation
import FarpageTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Test 4: many client processes at once; one dies by SIGKILL mid-run.
@Suite("Client processes", .serialized)
struct ClientProcessTests {
    @Test func sixteenClientsOneKilledTheRestFinishAndTheDeadOnesMemoryIsReleased() throws {
        let agent = try AgentProcess()
        defer { agent.stop() }
        func workload(_ extra: [String]) throws -> Process {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: binary("fp-workload"))
            p.arguments = ["--socket", agent.socket, "--size", "8MiB", "--budget", "1MiB", "--json"] + extra
            p.standardOutput = Pipe()
            p.standardError = Pipe()
            try p.run()
            return p
        }
        // The victim holds a region, dirties it (so it has far pages), then waits to be killed.
        let victim = try workload(["--name", "victim", "--passes", "1", "--hold", "60"])
        var others: [Process] = []
        for i in 0..<15 {
            let mode = i % 2 == 0 ? ["--mode", "seq", "--passes", "2"] : ["--mode", "random", "--threads", "2", "--passes", "20000"]
            others.append(try workload(["--name", "client\(i)", "--seed", "\(i + 1)"] + mode))
        }
        // Wait until the victim's region has pages in the far tier.
        var victimRegion: RegionReport?
        let deadline = Date().addingTimeInterval(60)
        while Date() < deadline {
            victimRegion = try agent.regions().first { $0.pid == victim.processIdentifier && $0.farPages > 0 }
            if victimRegion != nil { break }
            usleep(20_000)
        }
        let region = try #require(victimRegion, "the victim never got far pages")
        kill(victim.processIdentifier, SIGKILL)
        let killedAt = Date()
        victim.waitUntilExit()
        // Everything the dead client held is released within a second.
        var released = false
        while Date().timeIntervalSince(killedAt) < 1.0 {
            if try agent.regions().contains(where: { $0.id == region.id }) == false {
                released = true
                break
            }
            usleep(10_000)
        }
        #expect(released, "the killed client's region was still registered 1 s after SIGKILL")
        for p in others {
            p.waitUntilExit()
            let out = String(decoding: (p.standardOutput as! Pipe).fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            let err = String(decoding: (p.standardError as! Pipe).fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            #expect(p.terminationStatus == 0, "a surviving client failed: \(out) \(err)")
            #expect(out.contains("\"failures\":0"), "a surviving client saw bad data: \(out)")
        }
        // With every client gone, the agent holds nothing: no regions, no resident or far pages.
        // A region's pages and slots are handed back when the last thread working on it (a
        // fault thread finishing its batch, the evictor mid-write) lets go: moments later.
        var status = try agent.status()
        let settle = Date().addingTimeInterval(10)
        while (status.residentPages != 0 || status.store.usedPages != 0) && Date() < settle {
            usleep(50_000)
            status = try agent.status()
        }
        #expect(status.regions == 0)
        #expect(status.residentPages == 0)
        #expect(status.store.usedPages == 0, "far-tier slots leaked: \(status.store.usedPages)")
    }

    /// SIGTERM: the agent drains (refuses new regions, serves the existing ones) and exits cleanly.
    @Test func sigtermWithNoClientsExitsCleanlyAndRemovesTheSocket() throws {
        let agent = try AgentProcess()
        agent.process.terminate()
        agent.process.waitUntilExit()
        #expect(agent.process.terminationStatus == 0)
        #expect(!FileManager.default.fileExists(atPath: agent.socket))
        #expect(agent.logText.contains("farpaged agent stopped"))
    }
}
