import FarpageKernel
import FarpagePaging
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// The stream thread: carries out `FARPAGE_ADVISE_STREAM` ("this range is read next") in the
/// background, so that layer L+1 is fetched while the client computes on layer L and the
/// control socket answers at once.
final class StreamFetcher: @unchecked Sendable {
    struct Request {
        let region: Region
        let firstPage: Int
        let count: Int
    }
    /// Requests beyond this many are dropped, oldest first (a hint, not a promise).
    static let queueLimit = 256
    private var mutex = pthread_mutex_t()
    private var condition = pthread_cond_t()
    private var queue: [Request] = []
    private var stopping = false
    private var thread: pthread_t? = nil
    private let logger: Logger
    private let batchPages: Int
    private let evictBatch: Int

    init(batchPages: Int, evictBatch: Int, logger: Logger) {
        self.batchPages = max(2, batchPages)
        self.evictBatch = max(1, evictBatch)
        self.logger = logger
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&condition, nil)
    }

    deinit {
        pthread_cond_destroy(&condition)
        pthread_mutex_destroy(&mutex)
    }

    func start() throws(KernelError) {
        let staging = try StagingBuffer(pages: batchPages)
        let evictStaging = try StagingBuffer(pages: evictBatch)
        thread = startThread(name: "fp-stream") { [self] in run(staging, evictStaging) }
    }

    func enqueue(_ r: Request) {
        pthread_mutex_lock(&mutex)
        if queue.count >= Self.queueLimit {
            queue.removeFirst()
            logger.debug("stream queue full; dropped the oldest request")
        }
        queue.append(r)
        pthread_cond_signal(&condition)
        pthread_mutex_unlock(&mutex)
    }

    func stop() {
        pthread_mutex_lock(&mutex)
        stopping = true
        queue.removeAll()
        pthread_cond_signal(&condition)
        pthread_mutex_unlock(&mutex)
        if let thread { pthread_join(thread, nil) }
    }

    private func run(_ staging: StagingBuffer, _ evictStaging: StagingBuffer) {
        while true {
            pthread_mutex_lock(&mutex)
            while queue.isEmpty && !stopping { pthread_cond_wait(&condition, &mutex) }
            if stopping {
                pthread_mutex_unlock(&mutex)
                return
            }
            let r = queue.removeFirst()
            pthread_mutex_unlock(&mutex)
            r.region.streamFetch(firstPage: r.firstPage, count: r.count, staging: staging, evictStaging: evictStaging)
        }
    }
}
