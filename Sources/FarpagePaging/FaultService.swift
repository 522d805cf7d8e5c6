import FarpageKernel
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Dedicated threads that serve userfaultfd events (never Swift's cooperative pool).
///
/// Each thread owns an epoll set holding the uffds of the regions assigned to
/// it plus an eventfd for commands (add, remove, stop). A region is served by
/// exactly one thread, so its events are handled in order.
public final class FaultService: @unchecked Sendable {
    final class Worker: @unchecked Sendable {
        let index: Int
        let epoll: Epoll
        let signal: EventSignal
        let commands = Mutex<[Command]>([])
        let load = Atomic<Int>(0)
        var thread: pthread_t? = nil
        init(index: Int) throws(KernelError) {
            self.index = index
            epoll = try Epoll()
            signal = try EventSignal()
            try epoll.add(signal.descriptor.rawValue, token: 0)
        }
    }
    enum Command {
        case add(any FaultTarget)
        case remove(UInt64, CompletionSignal?)
        case stop
    }

    let workers: [Worker]
    let evictor: Evictor
    let logger: Logger
    let stagingPages: Int
    let evictBatch: Int
    let spinNanoseconds: UInt64

    /// - Parameter spinMicroseconds: after serving a fault, poll for this long before sleeping.
    ///   Waking a sleeping thread on another vCPU costs 20–45 µs in VMs, more than a fault.
    public init(threads: Int, evictor: Evictor, stagingPages: Int, evictBatch: Int, spinMicroseconds: Int = 0,
                logger: Logger) throws(KernelError)
    {
        var ws: [Worker] = []
        for i in 0..<max(1, threads) { ws.append(try Worker(index: i)) }
        workers = ws
        self.evictor = evictor
        self.logger = logger
        self.stagingPages = max(1, stagingPages)
        self.evictBatch = max(1, evictBatch)
        self.spinNanoseconds = UInt64(max(0, spinMicroseconds)) * 1000
    }

    public func start() throws(KernelError) {
        for worker in workers {
            let staging = try StagingBuffer(pages: stagingPages)
            let evictStaging = try StagingBuffer(pages: evictBatch)
            worker.thread = startThread(name: "fp-fault-\(worker.index)") { [self] in
                run(worker, staging: staging, evictStaging: evictStaging)
            }
        }
    }

    /// Starts serving `region` (or a forked child's view) on the least-loaded thread. Throws
    /// when its uffd cannot be watched (the registration must then fail: nobody would serve
    /// its faults).
    public func add(_ region: any FaultTarget) throws(KernelError) {
        let worker = workers.min { $0.load.load(ordering: .relaxed) < $1.load.load(ordering: .relaxed) }!
        // epoll_ctl is thread-safe; an event before the thread learns the region is simply
        // reported again (level-triggered) once the command is processed.
        try worker.epoll.add(region.uffd.rawValue, token: region.id)
        worker.load.wrappingAdd(1, ordering: .relaxed)
        send(.add(region), to: worker)
    }

    /// Stops serving the region; `done` is signalled once its thread has let go of it.
    public func remove(regionID: UInt64, done: CompletionSignal? = nil) {
        for worker in workers { send(.remove(regionID, done), to: worker) }
    }

    public func stop() {
        for worker in workers { send(.stop, to: worker) }
        for worker in workers { if let t = worker.thread { pthread_join(t, nil) } }
    }

    private func send(_ command: Command, to worker: Worker) {
        worker.commands.withLock { $0.append(command) }
        worker.signal.signal()
    }

    private func run(_ worker: Worker, staging: StagingBuffer, evictStaging: StagingBuffer) {
        var regions: [UInt64: any FaultTarget] = [:]
        var ready: [Epoll.Ready] = []
        var events: [UffdEvent] = []
        events.reserveCapacity(64)
        var spinUntil: UInt64 = 0
        while true {
            let timeout: Int32 = spinUntil > 0 && monotonicNanoseconds() < spinUntil ? 0 : -1
            do { try worker.epoll.wait(into: &ready, timeoutMilliseconds: timeout) } catch {
                logger.critical("epoll_wait failed on a fault thread", metadata: ["fp.error": "\(error)"])
                return
            }
            for r in ready {
                if r.token == 0 {
                    worker.signal.drain()
                    let commands = worker.commands.withLock { c in
                        defer { c.removeAll() }
                        return c
                    }
                    for command in commands {
                        switch command {
                        case .add(let region):
                            regions[region.id] = region
                        case .remove(let id, let done):
                            if let region = regions.removeValue(forKey: id) {
                                worker.epoll.remove(region.uffd.rawValue)
                                worker.load.wrappingSubtract(1, ordering: .relaxed)
                            }
                            done?.signal()
                        case .stop:
                            return
                        }
                    }
                    continue
                }
                guard let region = regions[r.token] else { continue }
                serve(region, events: &events, staging: staging, evictStaging: evictStaging)
                if spinNanoseconds > 0 { spinUntil = monotonicNanoseconds() + spinNanoseconds }
            }
        }
    }

    private func serve(_ region: any FaultTarget, events: inout [UffdEvent], staging: StagingBuffer,
                       evictStaging: StagingBuffer)
    {
        // Bounded rounds so that one busy region cannot starve the others on this thread.
        var wakeEvictor = false
        for _ in 0..<8 {
            let n: Int
            do { n = try region.uffd.readEvents(into: &events) } catch {
                logger.error("reading a userfaultfd failed", metadata: ["fp.region": "\(region.id)", "fp.error": "\(error)"])
                return
            }
            if n == 0 { break }
            for event in events {
                switch event.kind {
                case .pageFault(let address, let write, let wp, _, let thread):
                    if region.handleFault(address: address, write: write, writeProtect: wp, thread: thread, staging: staging,
                                          evictStaging: evictStaging)
                    {
                        wakeEvictor = true
                    }
                default:
                    logger.debug("ignoring a userfaultfd event", metadata: ["fp.event": "\(event.kind)"])
                }
            }
        }
        if wakeEvictor { evictor.poke() }
    }
}

/// Signals a waiting thread once.
public final class CompletionSignal: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    private var condition = pthread_cond_t()
    private var done = false
    public init() {
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&condition, nil)
    }
    deinit {
        pthread_cond_destroy(&condition)
        pthread_mutex_destroy(&mutex)
    }
    public func signal() {
        pthread_mutex_lock(&mutex)
        done = true
        pthread_cond_broadcast(&condition)
        pthread_mutex_unlock(&mutex)
    }
    /// Waits up to `milliseconds`; returns whether it was signalled.
    @discardableResult
    public func wait(milliseconds: Int) -> Bool {
        var deadline = timespec()
        clock_gettime(CLOCK_REALTIME, &deadline)
        let ns = Int(deadline.tv_nsec) + (milliseconds % 1000) * 1_000_000
        deadline.tv_sec += milliseconds / 1000 + ns / 1_000_000_000
        deadline.tv_nsec = ns % 1_000_000_000
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        while !done {
            if pthread_cond_timedwait(&condition, &mutex, &deadline) != 0 { return done }
        }
        return true
    }
}

