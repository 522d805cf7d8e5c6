import FarpageKernel
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The background eviction thread: keeps every region, and the agent as a whole,
/// between the low and high watermarks of its resident budget.
public final class Evictor: @unchecked Sendable {
    let budget: ResidentBudget
    let batch: Int
    let logger: Logger
    let regions: @Sendable () -> [Region]
    private var mutex = pthread_mutex_t()
    private var condition = pthread_cond_t()
    private var pending = false
    private var stopping = false
    private var thread: pthread_t? = nil
    public let passes = Atomic<UInt64>(0)

    /// - Parameter regions: returns the live regions (called on the evictor thread).
    public init(budget: ResidentBudget, batch: Int, logger: Logger, regions: @escaping @Sendable () -> [Region]) {
        self.budget = budget
        self.batch = max(1, batch)
        self.logger = logger
        self.regions = regions
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&condition, nil)
    }

    deinit {
        pthread_cond_destroy(&condition)
        pthread_mutex_destroy(&mutex)
    }

    public func start() throws(KernelError) {
        let staging = try StagingBuffer(pages: batch)
        thread = startThread(name: "fp-evictor") { [self] in run(staging) }
    }

    /// Asks for a pass soon (cheap; called from fault threads).
    public func poke() {
        pthread_mutex_lock(&mutex)
        if !pending {
            pending = true
            pthread_cond_signal(&condition)
        }
        pthread_mutex_unlock(&mutex)
    }

    public func stop() {
        pthread_mutex_lock(&mutex)
        stopping = true
        pthread_cond_signal(&condition)
        pthread_mutex_unlock(&mutex)
        if let thread { pthread_join(thread, nil) }
    }

    private func run(_ staging: StagingBuffer) {
        while true {
            pthread_mutex_lock(&mutex)
            if !pending && !stopping {
                // Also wake periodically: watermarks can be crossed without a poke (budget changes).
                var deadline = timespec()
                clock_gettime(CLOCK_REALTIME, &deadline)
                deadline.tv_nsec += 50_000_000
                if deadline.tv_nsec >= 1_000_000_000 {
                    deadline.tv_sec += 1
                    deadline.tv_nsec -= 1_000_000_000
                }
                pthread_cond_timedwait(&condition, &mutex, &deadline)
            }
            pending = false
            let stop = stopping
            pthread_mutex_unlock(&mutex)
            if stop { return }
            pass(staging)
        }
    }

    /// One pass: each region above its high watermark down to its low one, then the agent.
    func pass(_ staging: StagingBuffer) {
        passes.wrappingAdd(1, ordering: .relaxed)
        let live = regions()
        for region in live where region.needsEviction {
            while region.aboveLowWatermark, !region.isClosed {
                if region.evict(maxPages: batch, staging: staging) == 0 { break }
            }
        }
        if budget.residentPages > budget.highPages {
            // Agent-wide pressure: take from the regions with the most resident pages first.
            var progress = true
            while budget.residentPages > budget.lowPages, progress {
                progress = false
                for region in live.sorted(by: { $0.residentPages > $1.residentPages }) where !region.isClosed {
                    if region.evict(maxPages: batch, staging: staging) > 0 { progress = true }
                    if budget.residentPages <= budget.lowPages { break }
                }
            }
        }
    }
}
