import Testing

@testable import FarpagePaging

/// Stride detection without a kernel: trends found by majority vote, the window's growth on
/// hits and shrinkage on misses, and no trend in random faults.
@Suite struct PrefetcherTests {
    @Test(arguments: [1, -1, 3, -5])
    func aStrideIsFoundAndTheWindowGrowsWhileTheStreamUsesIt(stride: Int) {
        var d = StrideDetector(initialWindow: 4, maxWindow: 32)
        var page = 10_000
        var issues: [StrideDetector.Issue] = []
        for _ in 0..<3 {
            if let next = d.fault(page).next { issues.append(next) }
            page += stride
        }
        #expect(issues.last?.stride == stride)
        // The stream faults just past each prefetch: every verdict is a hit and the window doubles.
        var windows: [Int] = []
        for _ in 0..<4 {
            let issue = d.issued!
            let (verdict, next) = d.fault(issue.last + stride)
            #expect(verdict == .hit(issue))
            windows.append(next?.count ?? 0)
        }
        #expect(windows == [8, 16, 32, 32])
    }

    @Test func aBrokenStreamHalvesTheWindowAndRandomFaultsFindNoTrend() {
        var d = StrideDetector(initialWindow: 16, maxWindow: 128)
        for p in 0..<4 { _ = d.fault(p) }
        let issue = d.issued!
        let (verdict, _) = d.fault(90_000)
        #expect(verdict == .miss(issue))
        #expect(d.window == 8)
        var rng: UInt64 = 12345
        var prefetches = 0
        for _ in 0..<1000 {
            rng = rng &* 6364136223846793005 &+ 1442695040888963407
            if d.fault(Int(rng >> 40) % 100_000).next != nil { prefetches += 1 }
        }
        #expect(prefetches < 10, "random faults found a trend \(prefetches) times")
    }

    @Test func aFaultOnAPrefetchedPageSaysNothing() {
        var d = StrideDetector(initialWindow: 8, maxWindow: 64)
        for p in 0..<3 { _ = d.fault(p) }
        let (verdict, _) = d.fault(d.issued!.first + 2)
        #expect(verdict == .none)
        #expect(d.window == 8)
    }

    @Test func accuracyBacksOffWhenMostPrefetchesAreWasted() {
        var a = PrefetchAccuracy()
        a.record(used: 10, wasted: 20)
        #expect(!a.backingOff)
        a.record(wasted: 100)
        #expect(a.backingOff)
        a.record(used: 200)
        #expect(!a.backingOff)
    }
}

/// The resident queue's head insertion, used to put young pages back where they were.
@Suite struct ResidentQueueTests {
    @Test func pagesPutBackAtTheHeadComeOutFirstInTheirOrderEvenWhenTheRingGrows() {
        var q = ResidentQueue()
        for p in 0..<64 { q.push(p) }  // exactly full: the next insertion grows the ring
        let popped = (0..<3).map { _ in q.pop()! }
        for p in popped.reversed() { q.pushFront(p) }
        for p in [100, 101] { q.pushFront(p) }  // grows past 64
        var out: [Int] = []
        while let p = q.pop() { out.append(p) }
        #expect(out == [101, 100] + Array(0..<64))
    }
}
