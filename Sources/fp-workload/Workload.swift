import ArgumentParser
import CFarpageClient
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A workload over one far-memory region: writes, verifies, reports. Used by `make demo` and the tests.
@main
struct Workload: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fp-workload",
        abstract: "Write and verify a far-memory region larger than its resident budget.")

    @Option(help: "Agent socket (sets FARPAGE_SOCKET).") var socket: String?
    @Option(help: "Region size, e.g. 256MiB.") var size = "64MiB"
    @Option(help: "Resident budget, e.g. 16MiB (0 = agent default).") var budget = "0"
    @Option(help: "Worker threads.") var threads = 1
    @Option(help: "Passes over the region (seq) or operations per thread (random).") var passes = 2
    @Option(help: "seq: write all then verify all, per pass; random: random page writes and reads with version stamps; zipf, alternate, sweep: tier-manager and prefetch probes (JSON).")
    var mode = "seq"
    @Option(help: "Random seed.") var seed: UInt64 = 1
    @Option(help: "Region name shown by farpagectl.") var name = "fp-workload"
    @Option(help: "Seconds to stay alive after the work, holding the region.") var hold = 0.0
    @Option(help: "seq: seconds to wait between writing the region and verifying it, each pass.") var pause = 0.0
    @Option(help: "seq: after --passes, keep making passes until this file exists (a harness ends the traffic when its disruption is over).")
    var until: String?
    @Flag(help: "Print a JSON summary line instead of text.") var json = false
    @Option(help: "zipf/sweep: reads measured.") var accesses = 100_000
    @Option(help: "zipf: fraction of pages that are hot.") var hotFraction = 0.1
    @Option(help: "zipf: share of the reads that go to hot pages.") var hotShare = 0.9
    @Option(help: "alternate: pages read every round (0: 90% of the budget, less one).") var workingSet = 0
    @Option(help: "alternate: how long to run.") var seconds = 3.0
    @Option(help: "layers: how many layers the region is cut into.") var layers = 8
    @Option(help: "layers: milliseconds of compute after each layer.") var computeMs = 30
    @Flag(help: "layers: announce each next layer with FARPAGE_ADVISE_STREAM.") var stream = false

    func run() throws {
        if let socket { setenv("FARPAGE_SOCKET", socket, 1) }
        guard let bytes = parseBytes(size), let budgetBytes = parseBytes(budget) else {
            throw ValidationError("bad --size or --budget")
        }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        var options = farpage_options()
        options.struct_size = MemoryLayout<farpage_options>.size
        options.resident_budget = budgetBytes
        let region: UnsafeMutableRawPointer? = name.withCString { cname in
            options.name = cname
            return farpage_alloc_ex(Int(bytes), &options)
        }
        guard let base = region else {
            throw ValidationError(String(cString: farpage_last_error()))
        }
        let pages = Int(bytes) / page
        if ["zipf", "alternate", "sweep", "layers"].contains(mode) {
            let result: [String: Double]
            switch mode {
            case "zipf": result = zipf(base, pages: pages, page: page)
            case "alternate": result = alternate(base, pages: pages, page: page)
            case "layers": result = layerSweep(base, pages: pages, page: page)
            default: result = sweep(base, pages: pages, page: page)
            }
            let body = result.keys.sorted().map { "\"\($0)\":\(result[$0]!)" }.joined(separator: ",")
            print("{\"mode\":\"\(mode)\",\(body)}")
            if hold > 0 { Thread.sleep(forTimeInterval: hold) }
            if farpage_free(base) != 0 { throw ValidationError(String(cString: farpage_last_error())) }
            if result["failures", default: 0] > 0 { throw ExitCode(2) }
            return
        }
        let start = Date()
        let failures: Int
        let checksum: UInt64
        var passesDone = passes
        switch mode {
        case "seq": (failures, checksum, passesDone) = sequential(base, pages: pages, page: page)
        case "random": (failures, checksum) = random(base, pages: pages, page: page)
        default: throw ValidationError("unknown --mode \(mode)")
        }
        let elapsed = Date().timeIntervalSince(start)
        var stats = farpage_stats()
        _ = farpage_stats(base, &stats)
        let touched = Double(bytes) * Double(mode == "seq" ? passesDone * 2 : 1)
        if json {
            print(
                "{\"pages\":\(pages),\"budget_pages\":\(stats.budget_pages),\"failures\":\(failures),\"passes\":\(passesDone),\"checksum\":\"\(String(checksum, radix: 16))\",\"seconds\":\(elapsed),\"missing_faults\":\(stats.missing_faults),\"evictions\":\(stats.evictions),\"writebacks\":\(stats.writebacks),\"wp_faults\":\(stats.wp_faults),\"cancelled_evictions\":\(stats.cancelled_evictions),\"fetches\":\(stats.fetches)}"
            )
        } else {
            print("region          \(bytes >> 20) MiB, resident budget \((stats.budget_pages * UInt64(page)) >> 20) MiB (\(String(format: "%.1f", Double(pages) / Double(max(1, stats.budget_pages))))x)")
            print("faults          \(stats.missing_faults) missing (\(stats.zero_fills) zero-fill, \(stats.fetches) fetched), \(stats.wp_faults) write-protect")
            print("evictions       \(stats.evictions) (\(stats.writebacks) written back, \(stats.clean_evictions) clean, \(stats.zero_evictions) zero, \(stats.cancelled_evictions) cancelled by writes)")
            if mode == "seq" {
                print("throughput      \(String(format: "%.2f", touched / elapsed / 1e9)) GB/s over \(String(format: "%.2f", elapsed)) s (\(passesDone) passes of write+verify)")
            } else {
                print("elapsed         \(String(format: "%.2f", elapsed)) s")
            }
            print("checksum        \(String(checksum, radix: 16)) \(failures == 0 ? "verified" : "MISMATCH: \(failures) bad pages")")
        }
        if hold > 0 { Thread.sleep(forTimeInterval: hold) }
        if farpage_free(base) != 0 { throw ValidationError(String(cString: farpage_last_error())) }
        if failures > 0 { throw ExitCode(2) }
    }

    /// Writes every page with a pattern unique to (page, pass), then reads all back; returns
    /// the failures, a checksum and the passes made (more than --passes with --until).
    func sequential(_ region: UnsafeMutableRawPointer, pages: Int, page: Int) -> (Int, UInt64, Int) {
        let base = SendablePointer(region)
        let words = page / 8
        var failures = 0
        var checksum: UInt64 = 0xcbf2_9ce4_8422_2325
        let stride = max(1, threads)
        var made = 0
        while made < passes || (until.map { access($0, F_OK) != 0 } ?? false) {
            let pass = made
            made += 1
            parallel(stride) { t in
                var p = t
                while p < pages {
                    let w = (base.pointer + p * page).assumingMemoryBound(to: UInt64.self)
                    let seed = pattern(UInt64(p), UInt64(pass), self.seed)
                    for i in 0..<words { w[i] = seed &+ UInt64(i) }
                    p += stride
                }
            }
            if pause > 0 { Thread.sleep(forTimeInterval: pause) }
            let bad = Counter()
            let sums = Counter()
            parallel(stride) { t in
                var p = t
                var local: UInt64 = 0
                var localBad = 0
                while p < pages {
                    let w = (base.pointer + p * page).assumingMemoryBound(to: UInt64.self)
                    let seed = pattern(UInt64(p), UInt64(pass), self.seed)
                    var ok = true
                    for i in 0..<words where w[i] != seed &+ UInt64(i) { ok = false }
                    if !ok { localBad += 1 }
                    local = local &+ w[0] &* 31 &+ w[words - 1]
                    p += stride
                }
                bad.add(localBad)
                sums.add(Int(bitPattern: UInt(local)))
            }
            failures += bad.value
            checksum = (checksum ^ UInt64(UInt(bitPattern: sums.value))) &* 0x100_0000_01b3
        }
        return (failures, checksum, made)
    }

    /// Each thread owns the pages p with p % threads == t and writes/reads them at random,
    /// stamping (page, version) in every word; a read must see its thread's latest version.
    func random(_ region: UnsafeMutableRawPointer, pages: Int, page: Int) -> (Int, UInt64) {
        let base = SendablePointer(region)
        let words = page / 8
        let bad = Counter()
        let n = max(1, threads)
        parallel(n) { t in
            var rng = SplitMix(seed: self.seed &+ UInt64(t) &* 0x9E37_79B9)
            var versions = [UInt32](repeating: 0, count: (pages - t + n - 1) / n)
            for _ in 0..<passes {
                let slot = Int(rng.next() % UInt64(versions.count))
                let p = slot * n + t
                let w = (base.pointer + p * page).assumingMemoryBound(to: UInt64.self)
                if rng.next() % 2 == 0 {
                    versions[slot] &+= 1
                    let stamp = UInt64(p) << 32 | UInt64(versions[slot])
                    for i in 0..<words { w[i] = stamp }
                } else {
                    let expected = versions[slot] == 0 ? 0 : UInt64(p) << 32 | UInt64(versions[slot])
                    let first = w[0]
                    var torn = false
                    for i in 1..<words where w[i] != first { torn = true }
                    if torn || first != expected { bad.add(1) }
                }
            }
        }
        return (bad.value, 0)
    }

    func parallel(_ n: Int, _ body: @escaping @Sendable (Int) -> Void) {
        if n == 1 {
            body(0)
            return
        }
        let group = DispatchGroup()
        for t in 0..<n {
            group.enter()
            Thread.detachNewThread {
                body(t)
                group.leave()
            }
        }
        group.wait()
    }
}

final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var v = 0
    func add(_ x: Int) {
        lock.lock()
        v &+= x
        lock.unlock()
    }
    var value: Int {
        lock.lock()
        defer { lock.unlock() }
        return v
    }
}

struct SplitMix {
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

@inline(__always) func pattern(_ page: UInt64, _ pass: UInt64, _ seed: UInt64) -> UInt64 {
    var s = SplitMix(seed: page &* 0x1000_0000_01b3 ^ pass &* 0x9E37 ^ seed)
    return s.next() | 1
}

func parseBytes(_ s: String) -> UInt64? {
    let t = s.trimmingCharacters(in: .whitespaces)
    let digits = t.prefix { $0.isNumber }
    guard let n = UInt64(digits) else { return nil }
    switch t.dropFirst(digits.count).lowercased() {
    case "", "b": return n
    case "k", "kib", "kb": return n << 10
    case "m", "mib", "mb": return n << 20
    case "g", "gib", "gb": return n << 30
    default: return nil
    }
}

/// The region is shared by the worker threads on purpose: that is what is being tested.
struct SendablePointer: @unchecked Sendable {
    let pointer: UnsafeMutableRawPointer
    init(_ p: UnsafeMutableRawPointer) { pointer = p }
}
