import CFarpageClient
import FarpageKernel
import FarpageProtocol
import Foundation
import FarpageTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("Advice", .serialized)
struct AdviceTests {
    @Test func dontNeedDropsResidentAndFarPagesAndTheyReadAsZeros() throws {
        let page = systemPageSize
        let region = try ClientRegion(size: 4 << 20, budget: 1 << 20, name: "dontneed")
        defer { region.free() }
        for p in 0..<region.pages { region.page(p)[0] = UInt64(p) + 1 }
        let before = region.stats()
        #expect(before.far_pages > 0)
        // Drop the whole region except its first and last page.
        #expect(farpage_advise(region.base + page, region.size - 2 * page, FARPAGE_ADVISE_DONTNEED) == 0)
        #expect(region.page(0)[0] == 1)
        #expect(region.page(region.pages - 1)[0] == UInt64(region.pages))
        for p in 1..<(region.pages - 1) where region.page(p)[0] != 0 {
            Issue.record("page \(p) kept its data after DONTNEED")
            break
        }
        let after = region.stats()
        #expect(after.far_pages <= 2, "far copies were not released")  // only the two kept pages
    }

    @Test func willNeedBringsFarPagesBackWithoutFaults() throws {
        let page = systemPageSize
        let region = try ClientRegion(size: 4 << 20, budget: 1 << 20, name: "willneed")
        defer { region.free() }
        for p in 0..<region.pages { region.page(p)[0] = UInt64(p) + 7 }
        // The first 64 pages were evicted long ago; ask for them back.
        #expect(farpage_advise(region.base, 64 * page, FARPAGE_ADVISE_WILLNEED) == 0)
        let s0 = region.stats()
        for p in 0..<64 { #expect(region.page(p)[0] == UInt64(p) + 7) }
        let s1 = region.stats()
        #expect(s0.prefetched_pages >= 64)
        #expect(s1.missing_faults == s0.missing_faults, "WILLNEED pages still faulted on first touch")
    }

    @Test func sequentialAdviceFetchesAheadOfFaults() throws {
        let region = try ClientRegion(size: 8 << 20, budget: 2 << 20, name: "sequential")
        defer { region.free() }
        for p in 0..<region.pages { region.page(p)[0] = UInt64(p) &* 3 }
        #expect(farpage_advise(region.base, region.size, FARPAGE_ADVISE_SEQUENTIAL) == 0)
        let s0 = region.stats()
        var bad = 0
        for p in 0..<region.pages where region.page(p)[0] != UInt64(p) &* 3 { bad += 1 }
        let s1 = region.stats()
        #expect(bad == 0)
        let faults = s1.missing_faults - s0.missing_faults
        #expect(s1.prefetched_pages > s0.prefetched_pages)
        #expect(faults < UInt64(region.pages) / 4, "\(faults) faults for \(region.pages) pages: no fetch-ahead")
    }

    /// Without any hint, a sequential sweep is detected and fetched ahead in batches: most
    /// pages are resident before their first touch, and every byte is still right.
    @Test func aSequentialSweepIsDetectedAndFetchedAhead() throws {
        let region = try ClientRegion(size: 16 << 20, budget: 4 << 20, name: "stream")
        defer { region.free() }
        for p in 0..<region.pages { region.page(p)[0] = UInt64(p) &* 5 &+ 1 }
        let s0 = region.stats()
        var bad = 0
        for p in 0..<region.pages where region.page(p)[0] != UInt64(p) &* 5 &+ 1 { bad += 1 }
        let s1 = region.stats()
        #expect(bad == 0)
        let faults = s1.missing_faults - s0.missing_faults
        let prefetched = s1.prefetched_pages - s0.prefetched_pages
        #expect(prefetched > UInt64(region.pages) / 2, "only \(prefetched) of \(region.pages) pages were fetched ahead")
        #expect(faults < UInt64(region.pages) / 8, "\(faults) faults for \(region.pages) pages")
    }

    /// RANDOM over the whole region turns fetch-ahead off.
    @Test func randomAdviceTurnsFetchAheadOff() throws {
        let region = try ClientRegion(size: 8 << 20, budget: 2 << 20, name: "random-advice")
        defer { region.free() }
        for p in 0..<region.pages { region.page(p)[0] = UInt64(p) + 3 }
        #expect(farpage_advise(region.base, region.size, FARPAGE_ADVISE_RANDOM) == 0)
        // A fetch-ahead the writes started before the advice may still be installing pages
        // (the faulting page is served first, the rest behind it): wait until it is done.
        var s0 = region.stats()
        for _ in 0..<50 {
            usleep(100_000)
            let s = region.stats()
            if s.prefetched_pages == s0.prefetched_pages { break }
            s0 = s
        }
        for p in 0..<region.pages { #expect(region.page(p)[0] == UInt64(p) + 3) }
        #expect(region.stats().prefetched_pages == s0.prefetched_pages)
    }

    @Test func adviceOutsideARegionIsRefused() throws {
        let region = try ClientRegion(size: 1 << 20, budget: 1 << 20, name: "advise-bad")
        defer { region.free() }
        #expect(farpage_advise(region.base, region.size + 4096, FARPAGE_ADVISE_WILLNEED) == -1)
        #expect(errno == EINVAL)
        #expect(farpage_advise(region.base, 4096, 99) == -1)
        #expect(String(cString: farpage_last_error()).contains("unknown hint"))
    }
}

@Suite("Operator CLI", .serialized)
struct OperatorCLITests {
    func run(_ path: String, _ arguments: [String], user: String? = nil) throws -> (Int32, String) {
        let r = user.map { try? runProgram("/usr/sbin/runuser", ["-u", $0, "--", path] + arguments, mergeOutput: true) }
            ?? (try? runProgram(path, arguments, mergeOutput: true))
        guard let r else { throw TestSupportError("cannot run \(path)") }
        return (r.status, r.stdout)
    }

    @Test func statusAndRegionsInTablesAndJSON() throws {
        let agent = try AgentProcess()
        defer { agent.stop() }
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: binary("fp-workload"))
        holder.arguments = ["--socket", agent.socket, "--size", "4MiB", "--budget", "1MiB", "--name", "cli-check", "--hold", "30"]
        holder.standardOutput = FileHandle.nullDevice
        try holder.run()
        defer { holder.terminate() }
        let deadline = Date().addingTimeInterval(20)
        while try agent.regions().isEmpty, Date() < deadline { usleep(20_000) }

        let (rc1, table) = try run(binary("farpagectl"), ["regions", "--socket", agent.socket])
        #expect(rc1 == 0)
        #expect(table.contains("cli-check") && table.contains("RESIDENT") && table.contains("4.0 MiB"), "\(table)")
        let (rc2, json) = try run(binary("farpagectl"), ["regions", "--json", "--socket", agent.socket])
        #expect(rc2 == 0)
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        let regions = try decoder.decode([RegionReport].self, from: Data(json.utf8))
        #expect(regions.count == 1 && regions[0].name == "cli-check" && regions[0].pid == holder.processIdentifier)
        let (rc3, status) = try run(binary("farpagectl"), ["status", "--socket", agent.socket])
        #expect(rc3 == 0)
        #expect(status.contains("regions         1") && status.contains("userfaultfd"), "\(status)")
        let (rc4, statusJSON) = try run(binary("farpagectl"), ["status", "--json", "--socket", agent.socket])
        #expect(rc4 == 0)
        let s = try decoder.decode(AgentStatus.self, from: Data(statusJSON.utf8))
        #expect(s.regions == 1 && s.pid == agent.pid && s.totals["missing_faults"]! > 0)
        let (rc5, refused) = try run(binary("farpagectl"), ["status", "--socket", "/nonexistent/agent.sock"])
        #expect(rc5 != 0 && refused.contains("cannot reach the agent"), "\(refused)")
    }

    @Test func badConfigFileIsRefusedNamingTheKey() throws {
        let path = FileManager.default.temporaryDirectory.path + "/fp-badconfig-\(getpid()).toml"
        try "[agent]\nhigh_watermark = 2\n".write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let (rc, out) = try run(binary("farpaged"), ["agent", "--config", path, "--check"])
        #expect(rc == 78)
        #expect(out.contains("agent.high_watermark") && out.contains("e.g. high_watermark = 0.9"), "\(out)")
    }

    /// Feature detection: an unprivileged user without /dev/userfaultfd gets only
    /// UFFD_USER_MODE_ONLY here (vm.unprivileged_userfaultfd=0), and the agent says so.
    @Test func detectsUserModeOnlyAccessForUnprivilegedUsers() throws {
        try #require(getuid() == 0, "needs root to switch to an unprivileged user")
        guard FileManager.default.isExecutableFile(atPath: "/usr/sbin/runuser") else {
            print("skipped: runuser is not installed")
            return
        }
        let sysctl = (try? String(contentsOfFile: "/proc/sys/vm/unprivileged_userfaultfd", encoding: .utf8)) ?? "?"
        let (probeRC, probe) = try run("/bin/true", [], user: "nobody")
        guard probeRC == 0 else {
            print("skipped: cannot run as nobody: \(probe)")
            return
        }
        let (rc, out) = try run(binary("farpaged"), ["agent", "--check"], user: "nobody")
        if rc == 126 || out.contains("Permission denied") && !out.contains("userfaultfd") {
            print("skipped: nobody cannot execute the build (\(out))")
            return
        }
        #expect(rc == 0, "\(out)")
        if sysctl.hasPrefix("0") {
            #expect(out.contains("UFFD_USER_MODE_ONLY"), "\(out)")
        }
    }
}
