/// Stride detection for one stream of missing faults (one client thread), after Leap
/// (Al Maruf and Chowdhury, ATC'20): a majority vote over the deltas of the last faults
/// finds the trend; the prefetch window doubles while the stream consumes what was fetched
/// ahead of it and halves when it does not. Pure logic: testable without a kernel.
struct StrideDetector: Sendable {
    static let historySize = 8
    /// Strides beyond this many pages are taken for random access.
    static let maxStride = 64
    /// Pages of the last prefetch: the first, the stride, how many.
    struct Issue: Equatable, Sendable {
        var first: Int
        var stride: Int
        var count: Int
        var last: Int { first + (count - 1) * stride }
        func contains(_ page: Int) -> Bool {
            let d = page - first
            return d % stride == 0 && (0..<count).contains(d / stride)
        }
        var pages: LazyMapCollection<Range<Int>, Int> {
            let (first, stride) = (self.first, self.stride)
            return (0..<count).lazy.map { first + $0 * stride }
        }
    }
    /// What the new fault says about the previous prefetch.
    enum Verdict: Equatable, Sendable {
        case none
        /// The stream went past it: every page was used.
        case hit(Issue)
        /// The stream went elsewhere: pages still untouched are likely wasted.
        case miss(Issue)
    }

    private var history = [Int](repeating: 0, count: historySize)
    private var seen = 0
    private(set) var window: Int
    private(set) var issued: Issue? = nil
    let initialWindow: Int
    let maxWindow: Int

    init(initialWindow: Int, maxWindow: Int) {
        self.initialWindow = max(1, initialWindow)
        self.maxWindow = max(1, maxWindow)
        window = self.initialWindow
    }

    /// Records a missing fault on `page`. Returns the verdict on the previous prefetch and
    /// the pages to fetch now (stride and count; nil when no trend holds).
    mutating func fault(_ page: Int) -> (verdict: Verdict, next: Issue?) {
        var verdict = Verdict.none
        if let issue = issued {
            if passed(issue, page) {
                verdict = .hit(issue)
                window = min(window * 2, maxWindow)
            } else if !issue.contains(page) {
                // A fault on a page of the issue itself (evicted before use, or never installed
                // for want of room) says nothing about the prediction.
                verdict = .miss(issue)
                window /= 2
            }
            issued = nil
        }
        if case .hit(let issue) = verdict {
            // The stream read the prefetched pages without faulting: they count as accesses,
            // or the jumps from one window to the next would outvote the stride.
            for p in issue.pages.suffix(Self.historySize - 1) { remember(p) }
        }
        remember(page)
        guard let stride = trend() else { return (verdict, nil) }
        if window == 0 { window = 1 }  // a new trend after a backoff: probe with one page
        let next = Issue(first: page + stride, stride: stride, count: window)
        issued = next
        return (verdict, next)
    }

    private mutating func remember(_ page: Int) {
        history[seen % Self.historySize] = page
        seen += 1
    }

    /// The stream reached the page after the issue (or a little beyond: several pages of a
    /// fast sweep can fault together).
    private func passed(_ issue: Issue, _ page: Int) -> Bool {
        let beyond = (page - issue.last) * issue.stride.signum()
        return beyond > 0 && beyond <= 2 * abs(issue.stride) + 8
    }

    /// The majority delta of the recent faults (Boyer–Moore vote), if one holds a strict
    /// majority of at least two deltas.
    private func trend() -> Int? {
        let n = min(seen, Self.historySize)
        guard n >= 3 else { return nil }
        // Runs on every missing fault: no arrays, two passes over at most 7 deltas.
        func delta(_ k: Int) -> Int { history[k % Self.historySize] - history[(k - 1) % Self.historySize] }
        let deltas = (seen - n + 1)..<seen
        var candidate = 0
        var votes = 0
        for k in deltas {
            let d = delta(k)
            if votes == 0 {
                candidate = d
                votes = 1
            } else {
                votes += d == candidate ? 1 : -1
            }
        }
        var support = 0
        for k in deltas where delta(k) == candidate { support += 1 }
        guard support * 2 > deltas.count, support >= 2, candidate != 0, abs(candidate) <= Self.maxStride else { return nil }
        return candidate
    }
}

/// Per-thread stride detectors of one region (the fault message names the thread). A few
/// slots, reused least-recently-used.
struct ThreadStreams: Sendable {
    static let slots = 8
    private var threads: [UInt32] = []
    private var detectors: [StrideDetector] = []
    private var lastUse: [UInt64] = []
    private var clock: UInt64 = 0

    mutating func fault(thread: UInt32, page: Int, initialWindow: Int, maxWindow: Int)
        -> (verdict: StrideDetector.Verdict, next: StrideDetector.Issue?)
    {
        clock += 1
        if let i = threads.firstIndex(of: thread) {
            lastUse[i] = clock
            return detectors[i].fault(page)
        }
        var d = StrideDetector(initialWindow: initialWindow, maxWindow: maxWindow)
        let result = d.fault(page)
        if threads.count < Self.slots {
            threads.append(thread)
            detectors.append(d)
            lastUse.append(clock)
        } else {
            let i = lastUse.indices.min { lastUse[$0] < lastUse[$1] }!
            threads[i] = thread
            detectors[i] = d
            lastUse[i] = clock
        }
        return result
    }
}

/// How useful prefetching has been lately: pages confirmed used against pages evicted (or
/// abandoned) unused. Below a quarter useful, prefetch backs off to one page at a time until
/// it proves itself again.
struct PrefetchAccuracy: Sendable {
    private(set) var used = 0
    private(set) var wasted = 0

    mutating func record(used u: Int = 0, wasted w: Int = 0) {
        used += u
        wasted += w
        if used + wasted > 1024 {  // decay: the recent past counts most
            used /= 2
            wasted /= 2
        }
    }

    /// Whether prefetch should be held to one page.
    var backingOff: Bool { wasted >= 64 && wasted > 3 * used }
}
