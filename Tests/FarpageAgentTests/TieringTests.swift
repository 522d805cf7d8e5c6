import FarpageProtocol
import FarpageTestSupport
import Foundation
import Testing

/// The tier manager and the prefetcher, end to end: a real agent, a real client process
/// (`fp-workload`), real userfaultfd. Each workload verifies every page it reads.
@Suite("Tiering and prefetch", .serialized)
struct TieringTests {
    /// Runs one `fp-workload` probe against an agent with `tiering` settings; returns its
    /// JSON report and the agent's totals afterwards.
    func probe(_ tiering: String, _ arguments: [String]) throws -> (report: [String: Double], totals: [String: UInt64]) {
        let agent = try AgentProcess(config: "[tiering]\n" + tiering, regionBudget: "4MiB")
        defer { agent.stop() }
        let run = try runProgram(binary("fp-workload"), ["--socket", agent.socket, "--size", "16MiB", "--budget", "4MiB"] + arguments)
        #expect(run.status == 0, "fp-workload failed: \(run.stdout) \(run.stderr)")
        let line = run.stdout.split(separator: "\n").last.map(String.init) ?? ""
        let json = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] ?? [:]
        var report: [String: Double] = [:]
        for (k, v) in json { if let d = v as? Double { report[k] = d } }
        #expect(report["failures"] == 0, "pages read back wrong: \(line)")
        return (report, try agent.status().totals)
    }

    /// Acceptance 1: reads skewed 90/10 over a region 4x its budget. After warm-up, the
    /// resident hit rate is within 10% of an offline LRU simulation of the same trace at the
    /// same budget — though the agent never sees a read of a resident page (refaults and
    /// writes are all it can observe).
    @Test func skewedReadsHitWithinTenPercentOfLRU() throws {
        let (r, totals) = try probe("", ["--mode", "zipf", "--passes", "5", "--accesses", "60000", "--seed", "7"])
        let ours = r["hit_rate"] ?? 0
        let lru = r["lru_hit_rate"] ?? 1
        #expect(lru > 0.85, "the trace is not as skewed as intended: LRU hits \(lru)")
        #expect(ours >= 0.9 * lru, "resident hit rate \(ours) is not within 10% of LRU's \(lru)")
        // The hot pages were recognised by their refaults.
        #expect(totals["refault_activations", default: 0] > 100)
    }

    /// The same trace with classification off (one FIFO queue) hits less. Both without a
    /// minimum residence time: at this tiny budget every page is younger than the default
    /// 100 ms, so the hard budget alone picks victims and the comparison would measure that.
    @Test func withoutClassificationTheSkewedTraceHitsLess() throws {
        let (on, _) = try probe("min_residence = \"0s\"", ["--mode", "zipf", "--passes", "5", "--accesses", "60000", "--seed", "7"])
        let (off, totals) = try probe("min_residence = \"0s\"\nclassify = false",
                                      ["--mode", "zipf", "--passes", "5", "--accesses", "60000", "--seed", "7"])
        #expect(totals["refault_activations", default: 1] == 0)
        #expect((on["hit_rate"] ?? 0) > (off["hit_rate"] ?? 1), "classification did not help: on \(on), off \(off)")
    }

    /// Acceptance 2: a working set right at the high watermark, with one page in two that
    /// alternates. With a minimum residence of 500 ms, no page moves more than the hysteresis
    /// bound within a 1 s window: an eviction at the window's start, then at most one per
    /// residence time, each followed by its fetch, and one forced move when prefetch meets the
    /// hard budget. Sampled every 200 ms once the write phase (which fills the region at the
    /// hard budget, where hysteresis yields) is well past.
    @Test func pagesAtTheWatermarkMoveNoMoreThanTheHysteresisBound() throws {
        let bound: UInt64 = 2 * (1000 / 500 + 1) + 1
        let with = try alternatingPeaks("min_residence = \"500ms\"")
        #expect(!with.isEmpty && with.max()! <= bound, "a page moved more than \(bound) times in a window: \(with)")
        // Without hysteresis and classification the same pattern makes pages ping-pong: the
        // bound above is not trivially met.
        let without = try alternatingPeaks("min_residence = \"0s\"\nclassify = false")
        // (Twice the bound: a loaded host moves pages less often, 18-258 times measured.)
        #expect((without.max() ?? 0) > 2 * bound, "the pattern did not provoke ping-pong without hysteresis: \(without)")
    }

    /// Runs the alternating workload for 7 s and samples the last window's per-page peak.
    func alternatingPeaks(_ tiering: String) throws -> [UInt64] {
        let agent = try AgentProcess(config: "[tiering]\nmigration_window = \"1s\"\n" + tiering, regionBudget: "4MiB")
        defer { agent.stop() }
        let workload = Process()
        workload.executableURL = URL(fileURLWithPath: binary("fp-workload"))
        workload.arguments = ["--socket", agent.socket, "--size", "16MiB", "--budget", "4MiB", "--mode", "alternate", "--seconds", "7"]
        workload.standardOutput = FileHandle.nullDevice
        try workload.run()
        var peaks: [UInt64] = []
        let start = Date()
        while workload.isRunning {
            usleep(200_000)
            guard Date().timeIntervalSince(start) > 4, workload.isRunning,
                let totals = try? agent.status().totals, totals["migrations", default: 0] > 0
            else { continue }
            peaks.append(totals["last_window_peak_page_migrations", default: 0])
        }
        workload.waitUntilExit()
        #expect(workload.terminationStatus == 0, "fp-workload failed")
        return peaks
    }

    /// Acceptance 3: a sequential read sweep of far pages finds at least 90% of them already
    /// resident (prefetched); then uniform random reads make prefetch back off: it fetches
    /// almost nothing ahead of them.
    @Test func aSweepIsPrefetchedAndRandomReadsMakePrefetchBackOff() throws {
        let (r, totals) = try probe("", ["--mode", "sweep", "--accesses", "20000"])
        let coverage = r["prefetch_coverage"] ?? 0
        #expect(coverage >= 0.9, "only \(coverage) of the sweep was prefetched: \(r)")
        let randomFaults = r["random_faults"] ?? 0
        let wasted = r["random_prefetched"] ?? .infinity
        #expect(randomFaults > 5000, "the random phase did not fault: \(r)")
        #expect(wasted <= 0.05 * randomFaults, "prefetch kept fetching on random reads: \(wasted) pages for \(randomFaults) faults")
        #expect(totals["prefetch_hits", default: 0] > 3000)
    }

    /// With prefetch off, the same sweep faults on every page: the coverage above is the
    /// prefetcher's doing.
    @Test func withoutPrefetchTheSweepFaultsOnEveryPage() throws {
        let (r, _) = try probe("prefetch = false", ["--mode", "sweep", "--accesses", "1000"])
        #expect((r["prefetch_coverage"] ?? 1) < 0.2, "\(r)")
    }

    /// The stream API: each layer (half the budget) is read in a shuffled order, which no
    /// stride detector can follow. Announcing layer L+1 before computing on layer L
    /// (FARPAGE_ADVISE_STREAM) has it resident before it is read; without, nearly every page faults.
    @Test func announcedLayersAreResidentBeforeTheyAreRead() throws {
        let (with, totals) = try probe("", ["--mode", "layers", "--stream", "--compute-ms", "40"])
        #expect((with["resident_before_read"] ?? 0) >= 0.9, "\(with)")
        #expect(totals["prefetch_wasted", default: 1] < 100, "streamed pages were taken for wasted prefetches: \(totals)")
        let (without, _) = try probe("", ["--mode", "layers", "--compute-ms", "40"])
        #expect((without["resident_before_read"] ?? 1) < 0.3, "\(without)")
    }
}
