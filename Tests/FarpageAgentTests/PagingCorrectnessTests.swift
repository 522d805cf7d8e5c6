import CFarpageClient
import FarpageKernel
import Foundation
import Synchronization
import FarpageTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The data-integrity tests: real userfaultfd, real memfd, a real agent process.
/// Each tries to lose a write: tiny budgets, many threads, races with eviction.
@Suite("Paging correctness", .serialized)
struct PagingCorrectnessTests {
    /// Test 1: one thread writes then verifies a region 8x its resident budget, several passes.
    @Test func sequentialWriteVerifyEightTimesBudget() throws {
        let page = systemPageSize
        let region = try ClientRegion(size: 32 << 20, budget: 4 << 20, name: "seq8x")
        defer { region.free() }
        let words = page / 8
        for pass in 0..<3 {
            for p in 0..<region.pages {
                let w = region.page(p)
                let seed = UInt64(p) << 20 | UInt64(pass)
                for i in 0..<words { w[i] = seed &* 0x9E37_79B9 &+ UInt64(i) }
            }
            var bad = 0
            for p in 0..<region.pages {
                let w = region.page(p)
                let seed = UInt64(p) << 20 | UInt64(pass)
                for i in 0..<words where w[i] != seed &* 0x9E37_79B9 &+ UInt64(i) {
                    bad += 1
                    break
                }
            }
            #expect(bad == 0, "pass \(pass): \(bad) pages lost their data")
        }
        let s = region.stats()
        #expect(s.budget_pages == UInt64((4 << 20) / page))
        #expect(s.resident_pages <= s.budget_pages, "resident set exceeded the budget")
        // 3 passes x 8192 pages x (write + read) with only 1024 resident: evictions must dominate.
        #expect(s.evictions > UInt64(region.pages) * 4)
        #expect(s.fetches > UInt64(region.pages) * 4)
        #expect(s.writebacks > 0 && s.clean_evictions > 0)
    }

    /// Test 2: 8 threads write and read random pages of a region 4x the budget while eviction
    /// runs continuously. Every write stamps (page, version) in every word; a read must see
    /// the thread's latest version, untorn.
    @Test func eightThreadsRandomPagesWithVersionStamps() throws {
        let page = systemPageSize
        let region = try ClientRegion(size: 16 << 20, budget: 4 << 20, name: "random8")
        defer { region.free() }
        let pages = region.pages
        let threads = 8
        let operations = 25_000
        let failures = Tally()
        let torn = Tally()
        let base = UInt(bitPattern: region.base)
        onThreads(threads) { t in
            var rng = SplitMix(state: UInt64(t) &+ 0xF00D)
            let mine = stride(from: t, to: pages, by: threads).map { $0 }
            var versions = [UInt32](repeating: 0, count: mine.count)
            let words = page / 8
            for _ in 0..<operations {
                let slot = Int(rng.next() % UInt64(mine.count))
                let p = mine[slot]
                let w = UnsafeMutablePointer<UInt64>(bitPattern: base + UInt(p * page))!
                if rng.next() % 3 != 0 {
                    versions[slot] &+= 1
                    let stamp = UInt64(p) << 32 | UInt64(versions[slot])
                    for i in 0..<words { w[i] = stamp }
                } else {
                    let expected: UInt64 = versions[slot] == 0 ? 0 : UInt64(p) << 32 | UInt64(versions[slot])
                    let first = w[0]
                    for i in 1..<words where w[i] != first {
                        torn.add()
                        break
                    }
                    if first != expected { failures.add() }
                }
            }
            // Final sweep: every page of this thread holds its last version.
            for (slot, p) in mine.enumerated() {
                let w = UnsafeMutablePointer<UInt64>(bitPattern: base + UInt(p * page))!
                let expected: UInt64 = versions[slot] == 0 ? 0 : UInt64(p) << 32 | UInt64(versions[slot])
                if w[0] != expected || w[words - 1] != expected { failures.add() }
            }
        }
        let s = region.stats()
        #expect(failures.value == 0, "reads saw a stale or foreign version")
        #expect(torn.value == 0, "reads saw a torn page")
        #expect(s.evictions >= 5_000, "eviction crossed only \(s.evictions) times")
        #expect(s.resident_pages <= s.budget_pages)
    }

    /// Test 3a: many threads fault the same far page at the same instant; all see its data.
    @Test func manyThreadsFaultTheSamePage() throws {
        let page = systemPageSize
        let region = try ClientRegion(size: 8 << 20, budget: 256 << 10, name: "samepage")
        defer { region.free() }
        for p in 0..<region.pages { region.page(p)[0] = UInt64(p) &+ 0xABCD_0000 }
        // No fetch-ahead: every fetch counted below is a demand fetch.
        #expect(farpage_advise(region.base, region.size, FARPAGE_ADVISE_RANDOM) == 0)
        // Wait for the background evictor to finish (down to the low watermark): five more
        // resident pages must not cross the high one, so nothing evicts a target meanwhile.
        let settle = Date()
        while region.stats().resident_pages > region.stats().budget_pages * 7 / 10, Date().timeIntervalSince(settle) < 5 {
            usleep(10_000)
        }
        let targets = [1, 7, 100, 333, 1000]
        let base = UInt(bitPattern: region.base)
        let wrong = Tally()
        for target in targets {
            let before = region.stats()
            let threads = 16
            let arrived = Atomic<Int>(0)
            onThreads(threads) { _ in
                arrived.wrappingAdd(1, ordering: .relaxed)
                while arrived.load(ordering: .relaxed) < threads {}  // all fault together
                let w = UnsafeMutablePointer<UInt64>(bitPattern: base + UInt(target * page))!
                if w[0] != UInt64(target) &+ 0xABCD_0000 { wrong.add() }
            }
            // Sixteen simultaneous faults, one fetch: the page was resolved once.
            let after = region.stats()
            #expect(after.fetches - before.fetches == 1,
                    "page \(target): \(after.fetches - before.fetches) fetches (\(after.evictions - before.evictions) evictions meanwhile, \(after.resident_pages) resident)")
        }
        #expect(wrong.value == 0)
        let s = region.stats()
        #expect(s.missing_faults >= UInt64(targets.count * 2), "the threads did not fault together")
    }

    /// Test 3b: writers hammer one page while churn forces its eviction again and again;
    /// a write racing an eviction (the write-protect path) is never lost.
    @Test func writesRacingEvictionOfTheSamePageAreNeverLost() throws {
        let page = systemPageSize
        let region = try ClientRegion(size: 4 << 20, budget: 64 << 10, name: "wprace")  // 16 pages resident
        defer { region.free() }
        let base = UInt(bitPattern: region.base)
        let writers = 6
        let stop = Atomic<Bool>(false)
        let lost = Tally()
        let deadline = Date().addingTimeInterval(20)
        let group = DispatchGroup()
        group.enter()
        Thread.detachNewThread {
            // Churn: touch the other pages so the hot page keeps getting picked for eviction.
            var rng = SplitMix(state: 42)
            while !stop.load(ordering: .relaxed) {
                let p = 1 + Int(rng.next() % UInt64(region.pages - 1))
                let w = UnsafeMutablePointer<UInt64>(bitPattern: base + UInt(p * page))!
                w[1] = w[1] &+ 1
            }
            group.leave()
        }
        let counts = Mutex([UInt64](repeating: 0, count: writers))
        onThreads(writers) { t in
            let hot = UnsafeMutablePointer<UInt64>(bitPattern: base)!
            var n: UInt64 = 0
            while Date() < deadline {
                n += 1
                hot[t * 64] = n  // each writer owns one cache line of the hot page
                if hot[t * 64] != n { lost.add() }
                if n % 512 == 0 {
                    var s = farpage_stats()
                    _ = farpage_stats(hot, &s)
                    if s.cancelled_evictions >= 20 && s.evictions >= 2000 && n > 100_000 { break }
                }
            }
            counts.withLock { $0[t] = n }
        }
        stop.store(true, ordering: .relaxed)
        group.wait()
        let hot = region.page(0)
        let final = counts.withLock { $0 }
        for t in 0..<writers { #expect(hot[t * 64] == final[t], "writer \(t) lost its last write") }
        #expect(lost.value == 0)
        let s = region.stats()
        #expect(s.cancelled_evictions > 0, "no eviction ever raced a write; the WP path was not exercised")
        #expect(s.evictions > 1000)
    }
}
