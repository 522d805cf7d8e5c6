import CFarpageClient
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Workloads that probe the tier manager and the prefetcher (acceptance tests and
/// `make bench`). Each writes every page first, so that reads come back from the far tier,
/// verifies every read, and reports what it measured as one JSON object.
extension Workload {
    /// Writes page `p`'s first and last word with its pattern.
    func stamp(_ base: UnsafeMutableRawPointer, _ p: Int, _ page: Int) {
        let w = (base + p * page).assumingMemoryBound(to: UInt64.self)
        let v = pattern(UInt64(p), 0, seed)
        w[0] = v
        w[page / 8 - 1] = ~v
    }

    /// Reads page `p` back; false when it does not hold its pattern.
    func check(_ base: UnsafeMutableRawPointer, _ p: Int, _ page: Int) -> Bool {
        let w = (base + p * page).assumingMemoryBound(to: UInt64.self)
        let v = pattern(UInt64(p), 0, seed)
        return w[0] == v && w[page / 8 - 1] == ~v
    }

    func stats(_ base: UnsafeMutableRawPointer) -> farpage_stats {
        var s = farpage_stats()
        _ = farpage_stats(base, &s)
        return s
    }

    /// Skewed reads: `hotFraction` of the pages (a seeded random subset) get `hotShare` of the
    /// accesses. After a warm-up of `passes` x pages accesses, measures `accesses` reads:
    /// the resident hit rate (1 - missing faults / reads) next to an offline LRU simulation
    /// of the same trace at the region's budget.
    func zipf(_ base: UnsafeMutableRawPointer, pages: Int, page: Int) -> [String: Double] {
        for p in 0..<pages { stamp(base, p, page) }
        var rng = SplitMix(seed: seed)
        var order = Array(0..<pages)
        for i in stride(from: pages - 1, to: 0, by: -1) { order.swapAt(i, Int(rng.next() % UInt64(i + 1))) }
        let hotCount = max(1, Int(Double(pages) * hotFraction))
        let hot = Array(order[..<hotCount])
        let cold = Array(order[hotCount...])
        let capacity = Int(stats(base).budget_pages)
        var lru = LRUSimulation(pages: pages, capacity: capacity)
        var failures = 0
        func run(_ n: Int) -> Int {
            var hits = 0
            for _ in 0..<n {
                let r = Double(rng.next() % 1_000_000) / 1_000_000
                let p = r < hotShare || cold.isEmpty ? hot[Int(rng.next() % UInt64(hot.count))] : cold[Int(rng.next() % UInt64(cold.count))]
                if lru.access(p) { hits += 1 }
                if !check(base, p, page) { failures += 1 }
            }
            return hits
        }
        _ = run(passes * pages)
        let before = stats(base)
        let start = Date()
        let lruHits = run(accesses)
        let elapsed = Date().timeIntervalSince(start)
        let after = stats(base)
        let faults = Double(after.missing_faults - before.missing_faults)
        return [
            "accesses": Double(accesses), "faults": faults, "hit_rate": 1 - faults / Double(accesses),
            "lru_hit_rate": Double(lruHits) / Double(accesses), "failures": Double(failures),
            "budget_pages": Double(capacity), "seconds": elapsed, "accesses_per_second": Double(accesses) / elapsed,
        ]
    }

    /// A working set right at the high watermark: every round reads `working-set` pages and
    /// then one of two extra pages, alternately, for `seconds`. Without hysteresis the extra
    /// page pushes the region over the watermark every round and pages ping-pong.
    func alternate(_ base: UnsafeMutableRawPointer, pages: Int, page: Int) -> [String: Double] {
        for p in 0..<pages { stamp(base, p, page) }
        let budget = Int(stats(base).budget_pages)
        let common = min(pages - 2, workingSet > 0 ? workingSet : Int(Double(budget) * 0.9) - 1)
        var failures = 0
        var rounds = 0
        let start = Date()
        while Date().timeIntervalSince(start) < seconds {
            for p in 0..<common where !check(base, p, page) { failures += 1 }
            if !check(base, common + rounds % 2, page) { failures += 1 }
            rounds += 1
        }
        return ["rounds": Double(rounds), "working_set": Double(common + 2), "budget_pages": Double(budget),
                "failures": Double(failures)]
    }

    /// One sequential read pass over pages written earlier (all far but the last budget's
    /// worth), then `accesses` uniform random reads: how many pages the prefetcher had in
    /// place before the sweep touched them, and how many it fetched in vain on the random reads.
    func sweep(_ base: UnsafeMutableRawPointer, pages: Int, page: Int) -> [String: Double] {
        for p in 0..<pages { stamp(base, p, page) }
        // Let the evictor settle so the sweep starts from far pages.
        usleep(200_000)
        var failures = 0
        let s0 = stats(base)
        let start = Date()
        for p in 0..<pages where !check(base, p, page) { failures += 1 }
        let elapsed = Date().timeIntervalSince(start)
        let s1 = stats(base)
        var rng = SplitMix(seed: seed)
        for _ in 0..<accesses {
            let p = Int(rng.next() % UInt64(pages))
            if !check(base, p, page) { failures += 1 }
        }
        let s2 = stats(base)
        let sweepFaults = Double(s1.missing_faults - s0.missing_faults)
        return [
            "sweep_pages": Double(pages), "sweep_faults": sweepFaults, "prefetch_coverage": 1 - sweepFaults / Double(pages),
            "sweep_gbps": Double(pages * page) / elapsed / 1e9,
            "random_reads": Double(accesses), "random_faults": Double(s2.missing_faults - s1.missing_faults),
            "random_prefetched": Double(s2.prefetched_pages - s1.prefetched_pages), "failures": Double(failures),
        ]
    }
}

extension Workload {
    /// An ML-style layer sweep: the region in `layers` equal layers, each read in a shuffled
    /// order (no stride for the prefetcher to find), with `compute-ms` of "compute" after
    /// each. With --stream, layer L+1 is announced (FARPAGE_ADVISE_STREAM) before layer L
    /// is read. Reports the missing faults of layers 1 and up.
    func layerSweep(_ base: UnsafeMutableRawPointer, pages: Int, page: Int) -> [String: Double] {
        for p in 0..<pages { stamp(base, p, page) }
        usleep(200_000)
        let per = pages / max(1, layers)
        var rng = SplitMix(seed: seed)
        var failures = 0
        var faults: UInt64 = 0
        if stream { _ = farpage_advise(base, per * page, FARPAGE_ADVISE_STREAM) }
        usleep(UInt32(computeMs * 1000))
        for layer in 0..<layers {
            if stream, layer + 1 < layers {
                _ = farpage_advise(base + (layer + 1) * per * page, per * page, FARPAGE_ADVISE_STREAM)
            }
            var order = Array((layer * per)..<((layer + 1) * per))
            for i in stride(from: order.count - 1, to: 0, by: -1) { order.swapAt(i, Int(rng.next() % UInt64(i + 1))) }
            let before = stats(base).missing_faults
            for p in order where !check(base, p, page) { failures += 1 }
            if layer > 0 { faults += stats(base).missing_faults - before }
            usleep(UInt32(computeMs * 1000))
        }
        let measured = Double(per * (layers - 1))
        return ["layer_pages": measured, "layer_faults": Double(faults), "resident_before_read": 1 - Double(faults) / measured,
                "failures": Double(failures)]
    }
}

/// An exact LRU cache of `capacity` pages: intrusive doubly linked list over page numbers.
struct LRUSimulation {
    private var prev: [Int32]
    private var next: [Int32]
    private var present: [Bool]
    private var head: Int32 = -1  // most recent
    private var tail: Int32 = -1  // least recent
    private var count = 0
    let capacity: Int

    init(pages: Int, capacity: Int) {
        prev = Array(repeating: -1, count: pages)
        next = Array(repeating: -1, count: pages)
        present = Array(repeating: false, count: pages)
        self.capacity = max(1, capacity)
    }

    /// Touches `page`; true when it was cached.
    mutating func access(_ page: Int) -> Bool {
        let p = Int32(page)
        if present[page] {
            unlink(p)
            pushFront(p)
            return true
        }
        if count == capacity {
            let victim = tail
            unlink(victim)
            present[Int(victim)] = false
            count -= 1
        }
        pushFront(p)
        present[page] = true
        count += 1
        return false
    }

    private mutating func unlink(_ p: Int32) {
        let a = prev[Int(p)]
        let b = next[Int(p)]
        if a >= 0 { next[Int(a)] = b } else { head = b }
        if b >= 0 { prev[Int(b)] = a } else { tail = a }
        prev[Int(p)] = -1
        next[Int(p)] = -1
    }

    private mutating func pushFront(_ p: Int32) {
        next[Int(p)] = head
        prev[Int(p)] = -1
        if head >= 0 { prev[Int(head)] = p }
        head = p
        if tail < 0 { tail = p }
    }
}
