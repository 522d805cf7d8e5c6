// farpage-bench — measures a running farpaged agent through the public C client API.
//
// Measurements (each printed as one JSON line on stdout as soon as it is done):
//   bookkeeping           agent memory per managed page (needs --agent-pid)
//   store_fault           latency of a read fault on a page held by the far store, no eviction running
//   store_fault_evicting  the same for random far pages while the evictor runs
//   sweep                 sequential read of the whole region, GB/s (and the fill rate of the first write)
//   random                uniform random 4 KiB reads, each timed (--random-reads; the swap peer's rows)
//   zipf                  Zipf-distributed reads (theta 0.99), reads per second (--zipf-ops)
//
// Every page read is checked against the stamp written into it; any mismatch, or a
// measurement that could not run, makes the exit status non-zero.

import ArgumentParser
import CFarpageClient
import FarpageKernel
import Histogram

#if canImport(Glibc)
import Glibc
#endif

@main
struct FarpageBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "farpage-bench",
        abstract: "Benchmark a running farpaged agent: far-store fault latency, sweep bandwidth, bookkeeping.")

    @Option(help: "Path of the running agent's socket.")
    var socket: String

    @Option(help: "PID of the agent, for the bookkeeping measurement (skipped without it).")
    var agentPid: Int32?

    @Option(help: "Pages in the measured region.")
    var regionPages: Int = 65536

    @Option(help: "Resident budget of the measured region, in pages.")
    var budgetPages: Int = 16384

    @Option(help: "Faults timed while eviction runs.")
    var evictingFaults: Int = 20000

    @Option(help: "Uniform random 4 KiB reads timed after the sweep, as the swap peer does (0: none).")
    var randomReads: Int = 0

    @Option(help: "Zipf-distributed reads (theta 0.99) timed for throughput after a fifth as many untimed (0: none).")
    var zipfOps: Int = 0

    @Option(help: "Suffix for the JSON line names, e.g. same_cpu (names the CPU placement of the run).")
    var label: String = ""

    @Flag(help: "Print only the JSON lines, no table.")
    var jsonOnly = false

    func validate() throws {
        guard budgetPages >= 64 else { throw ValidationError("--budget-pages must be at least 64") }
        // The store measurements need far pages: most of the region must not fit the budget.
        guard regionPages >= 2 * budgetPages else {
            throw ValidationError("--region-pages must be at least twice --budget-pages")
        }
        guard evictingFaults > 0 else { throw ValidationError("--evicting-faults must be positive") }
        guard randomReads >= 0, zipfOps >= 0 else { throw ValidationError("--random-reads and --zipf-ops cannot be negative") }
    }

    func run() throws {
        // The client library reads FARPAGE_SOCKET on its first connection.
        setenv("FARPAGE_SOCKET", socket, 1)
        benchLabel = label
        var bench = Bench(jsonOnly: jsonOnly)

        // Bookkeeping first: the agent's heap is fresh, so memory freed by the store
        // measurements cannot be reused and hide what the regions cost.
        if let pid = agentPid {
            bench.attempt("bookkeeping") { try $0.bookkeeping(agentPid: pid) }
        } else {
            bench.note("bookkeeping skipped: no --agent-pid")
        }
        bench.attempt("store") {
            try $0.storeMeasurements(regionPages: regionPages, budgetPages: budgetPages, evictingFaults: evictingFaults,
                                     randomReads: randomReads, zipfOps: zipfOps)
        }

        if !jsonOnly { bench.printTable() }
        if !bench.failures.isEmpty {
            for failure in bench.failures { printErr("farpage-bench: FAILED: \(failure)") }
            throw ExitCode.failure
        }
    }
}

// MARK: - The measurements

let pageSize = systemPageSize

struct Bench {
    let jsonOnly: Bool
    var failures: [String] = []
    var rows: [(String, String)] = []

    init(jsonOnly: Bool) { self.jsonOnly = jsonOnly }

    func note(_ text: String) { printErr("farpage-bench: \(text)") }

    /// Runs one measurement; an error is recorded as a failure and the next measurement still runs.
    mutating func attempt(_ what: String, _ body: (inout Bench) throws -> Void) {
        do { try body(&self) } catch { failures.append("\(what): \(error)") }
    }

    func emit(_ line: JSONLine) {
        print(line.text)
        fflush(nil)  // all streams: a crash in the next measurement must not eat this line
    }

    // MARK: store_fault, store_fault_evicting, sweep

    mutating func storeMeasurements(regionPages: Int, budgetPages: Int, evictingFaults: Int, randomReads: Int = 0,
                                    zipfOps: Int = 0) throws
    {
        let region = try Region(pages: regionPages, budgetPages: budgetPages, name: "bench-store")
        defer { region.free() }

        // Fill: every page gets its stamp, so most of the region is pushed to the store.
        let fillStart = monotonicNanoseconds()
        for page in 0..<regionPages { region.stamp(page) }
        let fillSeconds = Double(monotonicNanoseconds() - fillStart) / 1e9

        let settled = try waitForEviction(region, fraction: 0.75, timeoutSeconds: 10)
        if !settled.done {
            note("resident pages still \(settled.resident) after 10 s, above 75% of the budget; measuring anyway")
        }
        // Demand faults only: fetch-ahead would turn most timed reads into hits.
        if farpage_advise(region.base, region.bytes, FARPAGE_ADVISE_RANDOM) != 0 {
            note("farpage_advise(RANDOM) failed (\(lastError())); prefetch may hide faults")
        }

        try storeFault(region)
        try storeFaultEvicting(region, faults: evictingFaults)
        try sweep(region, fillSeconds: fillSeconds)
        if randomReads > 0 { try random(region, reads: randomReads) }
        if zipfOps > 0 { try zipf(region, ops: zipfOps) }
    }

    /// Polls the region's counters every 10 ms until resident <= fraction * budget, or until
    /// resident has stopped falling for 500 ms (the evictor is done, a little above the
    /// target), or the timeout.
    func waitForEviction(_ region: Region, fraction: Double, timeoutSeconds: Double) throws -> (done: Bool, resident: Int) {
        let start = monotonicNanoseconds()
        let deadline = start + UInt64(timeoutSeconds * 1e9)
        var lowest = Int.max
        var lowestSince = start
        while true {
            let s = try region.stats()
            let resident = Int(s.resident_pages)
            let now = monotonicNanoseconds()
            if Double(resident) <= fraction * Double(s.budget_pages) { return (true, resident) }
            if resident < lowest {
                lowest = resident
                lowestSince = now
            } else if now - lowestSince >= 500_000_000 && resident < Int(s.budget_pages) * 89 / 100 {
                return (true, resident)
            }
            if now >= deadline { return (false, resident) }
            usleep(10_000)
        }
    }

    mutating func storeFault(_ region: Region) throws {
        let before = try region.stats()
        let budget = Int(before.budget_pages)
        // Stay under the high watermark (0.9 in the shipped config) so that no eviction
        // runs while we time: at most 15% of the budget, fewer if resident is already high.
        let allowed = min(budget * 15 / 100, budget * 89 / 100 - Int(before.resident_pages))
        guard allowed >= 100 else {
            throw BenchError("store_fault: only \(allowed) faults fit under the high watermark (resident \(before.resident_pages) of \(budget))")
        }
        let warmup = min(100, allowed / 10)
        var latency = Latency()
        var taken = 0
        var page = 0
        // Pages were written in ascending order and the oldest are evicted first, so far
        // pages are found from page 0 upward; mincore says which ones are not resident.
        while taken < allowed && page < region.pages {
            defer { page += 1 }
            guard try !region.isResident(page) else { continue }
            let (ns, ok) = region.timedRead(page)
            if !ok { throw BenchError("store_fault: page \(page) has a wrong stamp (\(region.describe(page)))") }
            if taken >= warmup { latency.record(ns) }
            taken += 1
        }
        let after = try region.stats()
        guard latency.count > 0 else { throw BenchError("store_fault: no far page found") }

        var line = JSONLine(name: "store_fault")
        line.add("pages", latency.count)
        latency.addFields(to: &line)
        line.add("fetches", Int(after.fetches) - Int(before.fetches))
        line.add("prefetched", Int(after.prefetched_pages) - Int(before.prefetched_pages))
        line.add("evictions", Int(after.evictions) - Int(before.evictions))
        line.add("region_pages", region.pages)
        line.add("budget_pages", budget)
        line.add("resident_at_start", Int(before.resident_pages))
        emit(line)
        rows.append(("store_fault p50 / p99 / mean", latency.summary))
        if after.evictions != before.evictions {
            note("store_fault: \(after.evictions - before.evictions) evictions ran during the measurement")
        }
    }

    mutating func storeFaultEvicting(_ region: Region, faults: Int) throws {
        let before = try region.stats()
        var latency = Latency()
        var rng = SplitMix64(seed: 0x5eed)
        var attempts = 0
        // Resident pages are skipped, not timed; bound the search in case nothing is far.
        let maxAttempts = faults * 100
        while latency.count < faults && attempts < maxAttempts {
            attempts += 1
            let page = Int(rng.next() % UInt64(region.pages))
            guard try !region.isResident(page) else { continue }
            let (ns, ok) = region.timedRead(page)
            if !ok { throw BenchError("store_fault_evicting: page \(page) has a wrong stamp (\(region.describe(page)))") }
            latency.record(ns)
        }
        let after = try region.stats()
        guard latency.count == faults else {
            throw BenchError("store_fault_evicting: found only \(latency.count) far pages in \(attempts) tries")
        }

        var line = JSONLine(name: "store_fault_evicting")
        line.add("pages", latency.count)
        latency.addFields(to: &line)
        line.add("fetches", Int(after.fetches) - Int(before.fetches))
        line.add("evictions", Int(after.evictions) - Int(before.evictions))
        emit(line)
        rows.append(("store_fault_evicting p50 / p99 / mean", latency.summary))
    }

    mutating func sweep(_ region: Region, fillSeconds: Double) throws {
        // An unmodified program gives no hint: measure what the agent's own stride detection does.
        _ = farpage_advise(region.base, region.bytes, FARPAGE_ADVISE_NORMAL)
        let before = try region.stats()
        var bad: Int? = nil
        let start = monotonicNanoseconds()
        for page in 0..<region.pages where !region.verifyWholePage(page) {
            if bad == nil { bad = page }
        }
        let seconds = Double(monotonicNanoseconds() - start) / 1e9
        let after = try region.stats()
        if let page = bad { throw BenchError("sweep: page \(page) has wrong contents (\(region.describe(page)))") }

        let gbps = Double(region.bytes) / seconds / 1e9
        let fillGbps = Double(region.bytes) / fillSeconds / 1e9
        var line = JSONLine(name: "sweep")
        line.add("bytes", region.bytes)
        line.add("seconds", seconds, digits: 4)
        line.add("gbps", gbps, digits: 3)
        line.add("fill_gbps", fillGbps, digits: 3)
        line.add("fetches", Int(after.fetches) - Int(before.fetches))
        line.add("prefetched", Int(after.prefetched_pages) - Int(before.prefetched_pages))
        emit(line)
        rows.append(("sweep read GB/s", fixed(gbps, 3)))
        rows.append(("first write (fill) GB/s", fixed(fillGbps, 3)))
    }

    /// What `swap_peer` measures after its sweep: one word of uniformly random pages (the
    /// same pages: the same generator and seed), each timed, with no hint to the agent.
    mutating func random(_ region: Region, reads: Int) throws {
        _ = farpage_advise(region.base, region.bytes, FARPAGE_ADVISE_NORMAL)
        let before = try region.stats()
        var all = Latency()
        var far = Latency()
        var rng = SplitMix64(seed: 1)
        for _ in 0..<reads {
            let page = Int(rng.next() % UInt64(region.pages))
            let resident = try region.isResident(page)
            let (ns, ok) = region.timedRead(page)
            if !ok { throw BenchError("random: page \(page) has a wrong stamp (\(region.describe(page)))") }
            all.record(ns)
            if !resident { far.record(ns) }
        }
        let after = try region.stats()
        var line = JSONLine(name: "random")
        line.add("reads", reads)
        line.add("rand_p50_us", all.us(50))
        line.add("rand_p99_us", all.us(99))
        line.add("rand_mean_us", all.meanUs)
        line.add("faulted", far.count)
        line.add("fault_p50_us", far.us(50))
        line.add("fault_p99_us", far.us(99))
        line.add("fetches", Int(after.fetches) - Int(before.fetches))
        line.add("prefetched", Int(after.prefetched_pages) - Int(before.prefetched_pages))
        emit(line)
        rows.append(("random 4 KiB read p50 / p99 / mean", all.summary))
    }

    /// Reads per second of a Zipf-skewed stream (theta 0.99, the YCSB default; page ranks
    /// scattered over the region), as `swap_peer --zipf-ops` does: the hot pages should stay
    /// resident and the rest come from the far tier.
    mutating func zipf(_ region: Region, ops: Int) throws {
        _ = farpage_advise(region.base, region.bytes, FARPAGE_ADVISE_NORMAL)
        let zipf = Zipf(pages: region.pages, theta: 0.99)
        var rng = SplitMix64(seed: 2)
        let warmup = ops / 5
        var before = try region.stats()
        var start: UInt64 = 0
        for i in 0..<(warmup + ops) {
            if i == warmup {
                before = try region.stats()
                start = monotonicNanoseconds()
            }
            let page = zipf.page(&rng)
            if !region.verifyStamp(page) { throw BenchError("zipf: page \(page) has a wrong stamp (\(region.describe(page)))") }
        }
        let seconds = Double(monotonicNanoseconds() - start) / 1e9
        let after = try region.stats()
        let faults = Int(after.missing_faults) - Int(before.missing_faults)
        var line = JSONLine(name: "zipf")
        line.add("ops", ops)
        line.add("theta", 0.99)
        line.add("seconds", seconds, digits: 4)
        line.add("ops_per_s", Double(ops) / seconds, digits: 0)
        line.add("faults", faults)
        line.add("hit_ratio", 1 - Double(faults) / Double(ops), digits: 4)
        line.add("fetches", Int(after.fetches) - Int(before.fetches))
        emit(line)
        rows.append(("zipf reads/s (theta 0.99)", fixed(Double(ops) / seconds, 0)))
    }

    // MARK: bookkeeping

    mutating func bookkeeping(agentPid: Int32) throws {
        // Sparse: a 256 GiB region of which one page per 2 MiB of the first GiB is touched.
        let sparsePages = (256 << 30) / pageSize
        let stride = (2 << 20) / pageSize
        let touchedSpan = (1 << 30) / pageSize
        let base0 = try AgentMemory(pid: agentPid)
        let sparse = try Region(pages: sparsePages, budgetPages: (64 << 20) / pageSize, name: "bench-sparse")
        // Both regions stay registered until both are measured: memory the agent freed
        // for one could otherwise be reused for the other and hide its cost.
        defer { sparse.free() }
        var sparseTouched = 0
        for page in Swift.stride(from: 0, to: touchedSpan, by: stride) {
            sparse.stamp(page)
            sparseTouched += 1
        }
        usleep(100_000)  // let the agent finish any work the faults queued
        let sparseMem = try AgentMemory(pid: agentPid)
        for page in Swift.stride(from: 0, to: touchedSpan, by: stride) where !sparse.verifyStamp(page) {
            throw BenchError("bookkeeping: sparse page \(page) has a wrong stamp")
        }

        // Dense: 1 GiB written in full under a budget whose high watermark (0.9 x budget)
        // lies above it, so nothing is evicted to the store and the delta is the agent's
        // per-page state alone.
        let densePages = (1 << 30) / pageSize
        let base1 = try AgentMemory(pid: agentPid)
        let dense = try Region(pages: densePages, budgetPages: densePages * 5 / 4, name: "bench-dense")
        defer { dense.free() }
        for page in 0..<densePages { dense.stamp(page) }
        usleep(100_000)
        let denseMem = try AgentMemory(pid: agentPid)
        let denseStats = try dense.stats()
        for page in 0..<densePages where !dense.verifyStamp(page) {
            throw BenchError("bookkeeping: dense page \(page) has a wrong stamp")
        }

        let sparseDelta = sparseMem.rssPlusPte - base0.rssPlusPte
        let denseDelta = denseMem.rssPlusPte - base1.rssPlusPte
        let perSparse = Double(sparseDelta) / Double(sparsePages)
        let perTouched = Double(denseDelta) / Double(densePages)
        var line = JSONLine(name: "bookkeeping")
        line.add("sparse_region_pages", sparsePages)
        line.add("sparse_touched_pages", sparseTouched)
        line.add("sparse_delta_bytes", sparseDelta)
        line.add("sparse_delta_anon_bytes", sparseMem.anon - base0.anon)
        line.add("bytes_per_page_sparse", perSparse, digits: 3)
        line.add("dense_pages", densePages)
        line.add("dense_delta_bytes", denseDelta)
        line.add("dense_delta_anon_bytes", denseMem.anon - base1.anon)
        line.add("dense_evictions", Int(denseStats.evictions))
        line.add("bytes_per_page_touched", perTouched, digits: 3)
        emit(line)
        rows.append(("agent bytes/page, sparse 256 GiB", fixed(perSparse, 3)))
        rows.append(("agent bytes/page, touched 1 GiB", fixed(perTouched, 3)))
        if denseStats.evictions != 0 {
            note("bookkeeping: \(denseStats.evictions) evictions in the dense region; its per-page figure includes them")
        }
    }

    func printTable() {
        let width = max(10, rows.map(\.0.count).max() ?? 0)
        print("")
        print("farpage-bench" + (failures.isEmpty ? "" : "  (\(failures.count) FAILED)"))
        for (label, value) in rows {
            print("  " + label + String(repeating: " ", count: width - label.count) + "  " + value)
        }
    }
}

// MARK: - Region

/// A far-memory region from the client library, stamped and checked page by page.
///
/// Page layout: word 0 = page index, word 1 = index ^ key, last word = ~index, the
/// rest zero. The key keeps page 0 from being all zeros (which the agent may drop
/// instead of storing, and then a fault would be a zero fill, not a store fetch).
struct Region {
    static let key: UInt64 = 0x9E37_79B9_7F4A_7C15
    let base: UnsafeMutableRawPointer
    let pages: Int
    var bytes: Int { pages * pageSize }

    init(pages: Int, budgetPages: Int, name: String) throws {
        var options = farpage_options()
        options.struct_size = MemoryLayout<farpage_options>.size
        options.resident_budget = UInt64(budgetPages * pageSize)
        let size = pages * pageSize
        let p = name.withCString { cname -> UnsafeMutableRawPointer? in
            options.name = cname
            return farpage_alloc_ex(size, &options)
        }
        guard let p else { throw BenchError("farpage_alloc_ex(\(size) bytes): \(lastError())") }
        self.base = p
        self.pages = pages
    }

    func free() {
        if farpage_free(base) != 0 { printErr("farpage-bench: farpage_free: \(lastError())") }
    }

    func stats() throws -> farpage_stats {
        var s = farpage_stats()
        guard farpage_stats(base, &s) == 0 else { throw BenchError("farpage_stats: \(lastError())") }
        return s
    }

    @inline(__always) func word(_ page: Int, _ index: Int) -> UnsafeMutablePointer<UInt64> {
        (base + page * pageSize).assumingMemoryBound(to: UInt64.self) + index
    }

    func stamp(_ page: Int) {
        let i = UInt64(page)
        word(page, 0).pointee = i
        word(page, 1).pointee = i ^ Region.key
        word(page, pageSize / 8 - 1).pointee = ~i
    }

    func verifyStamp(_ page: Int) -> Bool {
        let i = UInt64(page)
        return word(page, 0).pointee == i && word(page, 1).pointee == i ^ Region.key
            && word(page, pageSize / 8 - 1).pointee == ~i
    }

    /// Reads every word of the page (this is the sweep's load) and checks all of it.
    func verifyWholePage(_ page: Int) -> Bool {
        let words = pageSize / 8
        var others: UInt64 = 0
        for w in 2..<(words - 1) { others |= word(page, w).pointee }
        return others == 0 && verifyStamp(page)
    }

    /// Times the first load from the page (the fault), then checks the stamp.
    @inline(__always) func timedRead(_ page: Int) -> (ns: UInt64, ok: Bool) {
        let p = UnsafeRawPointer(word(page, 0))
        // The clock calls are opaque to the compiler, so the load stays between them.
        let t0 = monotonicNanoseconds()
        let v = p.load(as: UInt64.self)
        let t1 = monotonicNanoseconds()
        return (t1 - t0, v == UInt64(page) && verifyStamp(page))
    }

    /// mincore(2): whether the memfd holds the page now. A page that is not resident
    /// was evicted (everything was written), so touching it is a store fault.
    func isResident(_ page: Int) throws -> Bool {
        var vec: UInt8 = 0
        guard mincore(base + page * pageSize, pageSize, &vec) == 0 else {
            throw BenchError("mincore: \(String(cString: strerror(errno)))")
        }
        return vec & 1 != 0
    }

    func describe(_ page: Int) -> String {
        "words: \(hex(word(page, 0).pointee)) \(hex(word(page, 1).pointee)) ... \(hex(word(page, pageSize / 8 - 1).pointee))"
    }
}

// MARK: - Helpers

struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

func lastError() -> String { String(cString: farpage_last_error()) }

/// Unbuffered write to stderr (the C `stderr` global is off limits under strict concurrency).
func printErr(_ text: String) {
    let bytes = Array((text + "\n").utf8)
    var done = 0
    while done < bytes.count {
        let n = bytes.withUnsafeBytes { write(2, $0.baseAddress! + done, $0.count - done) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { return }
        done += n
    }
}

func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

/// The agent's memory from /proc/PID/status, in bytes.
struct AgentMemory {
    var rss = 0
    var pte = 0
    var anon = 0
    var rssPlusPte: Int { rss + pte }

    init(pid: Int32) throws {
        let path = "/proc/\(pid)/status"
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw BenchError("open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var data: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw BenchError("read \(path): \(String(cString: strerror(errno)))") }
            if n == 0 { break }
            data.append(contentsOf: chunk[0..<n])
        }
        var found = 0
        for line in String(decoding: data, as: UTF8.self).split(separator: "\n") {
            // "VmRSS:\t   12345 kB"
            let parts = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard parts.count >= 2, let kb = Int(parts[1]) else { continue }
            switch parts[0] {
            case "VmRSS:": rss = kb * 1024; found += 1
            case "VmPTE:": pte = kb * 1024; found += 1
            case "RssAnon:": anon = kb * 1024
            default: break
            }
        }
        guard found == 2 else { throw BenchError("\(path) has no VmRSS/VmPTE (is \(pid) alive?)") }
    }
}

/// Fault latencies in nanoseconds.
struct Latency {
    var histogram = Histogram<UInt64>(
        lowestDiscernibleValue: 1, highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
    var count: Int { Int(histogram.totalCount) }

    mutating func record(_ ns: UInt64) { histogram.record(min(max(ns, 1), histogram.highestTrackableValue)) }

    func us(_ percentile: Double) -> Double { Double(histogram.valueAtPercentile(percentile)) / 1000 }
    var meanUs: Double { histogram.mean / 1000 }
    var maxUs: Double { Double(histogram.max) / 1000 }

    func addFields(to line: inout JSONLine) {
        line.add("p50_us", us(50))
        line.add("p99_us", us(99))
        line.add("p999_us", us(99.9))
        line.add("mean_us", meanUs)
        line.add("max_us", maxUs)
    }

    var summary: String { "\(fixed(us(50))) / \(fixed(us(99))) / \(fixed(meanUs)) us  (n=\(count))" }
}

/// Appended to every JSON line name (set once from --label before any measurement).
nonisolated(unsafe) var benchLabel = ""

/// One flat JSON object with a fixed key order; values are numbers or plain strings.
struct JSONLine {
    private var parts: [String]
    init(name: String) { parts = ["\"name\":\"\(name)\(benchLabel.isEmpty ? "" : "_" + benchLabel)\""] }
    mutating func add(_ key: String, _ value: Int) { parts.append("\"\(key)\":\(value)") }
    mutating func add(_ key: String, _ value: Double, digits: Int = 2) { parts.append("\"\(key)\":\(fixed(value, digits))") }
    var text: String { "{" + parts.joined(separator: ",") + "}" }
}

/// `value` with exactly `digits` decimals (no Foundation); "null" when not finite.
func fixed(_ value: Double, _ digits: Int = 2) -> String {
    guard value.isFinite else { return "null" }
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let scaled = (abs(value) * scale).rounded()
    guard scaled < 9e18 else { return String(value) }
    let n = UInt64(scaled)
    let unit = UInt64(scale)
    let sign = value < 0 && n != 0 ? "-" : ""
    guard digits > 0 else { return sign + String(n) }
    let frac = String(n % unit)
    return sign + String(n / unit) + "." + String(repeating: "0", count: digits - frac.count) + frac
}

/// Small deterministic generator: the same pages are chosen on every run.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Zipf-distributed page numbers, the YCSB generator (Gray et al., "Quickly generating
/// billion-record synthetic databases"): rank 0 is the most popular. Ranks are scattered over
/// the region by a multiplicative hash, as in swap_peer.c (the same constants).
struct Zipf {
    let n: Int
    let theta: Double
    let alpha: Double
    let zetaN: Double
    let eta: Double
    let firstTwo: Double

    init(pages: Int, theta: Double) {
        n = pages
        self.theta = theta
        var z = 0.0
        for i in 1...pages { z += 1 / pow(Double(i), theta) }
        zetaN = z
        let zeta2 = 1 + 1 / pow(2, theta)
        alpha = 1 / (1 - theta)
        eta = (1 - pow(2 / Double(pages), 1 - theta)) / (1 - zeta2 / zetaN)
        firstTwo = 1 + pow(0.5, theta)
    }

    func rank(_ u: Double) -> Int {
        let uz = u * zetaN
        if uz < 1 { return 0 }
        if uz < firstTwo { return 1 }
        return min(n - 1, Int(Double(n) * pow(eta * u - eta + 1, alpha)))
    }

    func page(_ rng: inout SplitMix64) -> Int {
        let u = Double(rng.next() >> 11) * 0x1p-53
        return Int((UInt64(rank(u)) &* 0x9E37_79B9_7F4A_7C15) % UInt64(n))
    }
}
