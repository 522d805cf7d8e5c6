import FarpageKernel

/// One remote access: `length` bytes between the staging buffer at `localOffset` and
/// `remoteAddress` under `rkey`.
public struct RemoteAccess: Sendable, Equatable {
    public var opcode: RDMAOpcode
    public var localOffset: Int
    public var length: Int
    public var remoteAddress: UInt64
    public var rkey: UInt32
    public init(opcode: RDMAOpcode, localOffset: Int, length: Int, remoteAddress: UInt64, rkey: UInt32) {
        self.opcode = opcode
        self.localOffset = localOffset
        self.length = length
        self.remoteAddress = remoteAddress
        self.rkey = rkey
    }
}

/// Why a batch on a channel failed. The channel is broken afterwards and must be closed.
public enum ChannelFailure: Error, Sendable, Equatable, CustomStringConvertible {
    /// Access `index` completed with `status` (the first error that was not a flush).
    case completion(index: Int, status: CompletionStatus)
    case post(VerbsError)
    case poll(VerbsError)
    /// No completion within the I/O timeout.
    case timeout(milliseconds: Int32)
    /// The connection reported it is gone (rdma_cm DISCONNECTED or DEVICE_REMOVAL).
    case connection(ConnectionEvent)

    public var description: String {
        switch self {
        case .completion(let i, let s): return "RDMA access \(i) completed with '\(s)' (status \(s.rawValue))"
        case .post(let e): return "posting RDMA work requests failed: \(e)"
        case .poll(let e): return "polling RDMA completions failed: \(e)"
        case .timeout(let ms): return "no RDMA completion within \(ms) ms"
        case .connection(.deviceRemoved): return "the RDMA device was removed"
        case .connection: return "the RDMA connection was disconnected"
        }
    }

    /// Whether the server refused the key or range (as opposed to the connection dying).
    public var isRemoteAccess: Bool {
        if case .completion(_, let s) = self { return s.failure == .remoteAccess }
        return false
    }
}

/// Counters of one channel, for tests and the benchmark.
public struct ChannelCounters: Sendable, Equatable {
    public var posted = 0
    public var signaled = 0
    public var completions = 0
    /// Times the poller gave up spinning and slept on the completion channel.
    public var sleeps = 0
    /// Most work requests outstanding at once (never above the send queue depth).
    public var maxOutstanding = 0
    /// Batches that completed in full: a queue pair with none has not yet shown that the path
    /// carries data.
    public var batches = 0
}

/// Runs batches of one-sided accesses on a queue pair: as many in flight as the send queue
/// holds, signalled selectively, completions polled on the calling thread (a brief busy-poll,
/// then sleep on the completion channel).
///
/// Selective signalling: a request is signalled when it is the first of a batch (so the head of
/// a fetch is usable early), every `signalInterval`-th, and the last of every chain posted.
/// Completions of one send queue arrive in order, so a signalled completion retires every
/// unsignalled request before it; and because the last request of every chain is signalled,
/// no unsignalled request waits for a completion that will never come. Posting never exceeds
/// `sendDepth` outstanding requests, counting unsignalled ones until they are retired.
///
/// After any failure the queue pair is in (or must be treated as in) the error state: the
/// channel is broken and refuses further work.
public final class RDMAChannel: @unchecked Sendable {
    public let queuePair: any VerbsQueuePair
    public let signalInterval: Int
    public let spinNanoseconds: UInt64
    public let timeoutMilliseconds: Int32
    public private(set) var broken: ChannelFailure?
    public private(set) var counters = ChannelCounters()
    /// Work request ids are unique over the channel's life, so a completion can never be
    /// mistaken for one of another batch.
    private var nextID: UInt64 = 1
    /// Reused by every `run`: the post and poll loop allocates nothing.
    private var chain: [WorkRequest] = []
    private var completions: [WorkCompletion] = []
    private var outstanding = 0

    public init(queuePair: any VerbsQueuePair, signalInterval: Int = 16, spinMicroseconds: Int = 20,
                timeoutMilliseconds: Int32 = 2000)
    {
        self.queuePair = queuePair
        self.signalInterval = max(1, signalInterval)
        self.spinNanoseconds = UInt64(max(0, spinMicroseconds)) * 1000
        self.timeoutMilliseconds = timeoutMilliseconds
    }

    public var staging: UnsafeMutableRawPointer { queuePair.staging }
    public var stagingBytes: Int { queuePair.stagingBytes }

    public func close() { queuePair.close() }

    /// Runs `accesses` and waits for all of them. `done(i)` runs once per access, in order, as
    /// soon as access `i` is known complete. Throws on the first failure (accesses not reported
    /// by then did not complete); the channel is then broken.
    public func run(_ accesses: [RemoteAccess], done: (Int) -> Void = { _ in }) throws(ChannelFailure) {
        if let broken { throw broken }
        let n = accesses.count
        guard n > 0 else { return }
        let base = nextID
        nextID += UInt64(n)
        var next = 0  // first access not posted
        var retired = 0  // accesses known complete
        var spinStart: UInt64 = 0
        while retired < n {
            let room = queuePair.sendDepth - outstanding
            if next < n && room > 0 {
                let end = min(n, next + room)
                chain.removeAll(keepingCapacity: true)
                var signals = 0
                for i in next..<end {
                    let a = accesses[i]
                    let signaled = i == 0 || i == end - 1 || (i + 1) % signalInterval == 0
                    if signaled { signals += 1 }
                    chain.append(WorkRequest(id: base + UInt64(i), opcode: a.opcode, signaled: signaled, localOffset: a.localOffset,
                                             length: a.length, remoteAddress: a.remoteAddress, rkey: a.rkey))
                }
                do throws(VerbsPostError) { try queuePair.post(chain) } catch {
                    try fail(.post(error.error))
                }
                counters.posted += chain.count
                counters.signaled += signals
                outstanding += chain.count
                counters.maxOutstanding = max(counters.maxOutstanding, outstanding)
                next = end
            }
            do throws(VerbsError) { try queuePair.poll(into: &completions, max: 16) } catch { try fail(.poll(error)) }
            if completions.isEmpty {
                let now = monotonicNanoseconds()
                if spinStart == 0 { spinStart = now }
                if now - spinStart < spinNanoseconds { continue }
                // Sleep: arm, then poll once more (a completion that came before the arm raises no event).
                do throws(VerbsError) {
                    try queuePair.arm()
                    try queuePair.poll(into: &completions, max: 16)
                } catch { try fail(.poll(error)) }
                if completions.isEmpty {
                    counters.sleeps += 1
                    let woke: Bool
                    do throws(VerbsError) { woke = try queuePair.wait(timeoutMilliseconds: timeoutMilliseconds) } catch {
                        try fail(.poll(error))
                    }
                    if !woke {
                        let event = queuePair.nextEvent()
                        try fail(event == .none || event == .other ? .timeout(milliseconds: timeoutMilliseconds) : .connection(event))
                    }
                    spinStart = 0
                    continue
                }
            }
            spinStart = 0
            for wc in completions {
                counters.completions += 1
                guard wc.id >= base, wc.id < base + UInt64(n) else { continue }  // cannot happen: ids are unique
                let index = Int(wc.id - base)
                if wc.status != .success {
                    // Accesses before it completed (in order); this one and the rest did not.
                    while retired < index {
                        done(retired)
                        retired += 1
                    }
                    try fail(.completion(index: index, status: wc.status))
                }
                // A signalled completion retires every access up to it.
                let newlyRetired = index + 1 - retired
                if newlyRetired > 0 {
                    outstanding -= newlyRetired
                    while retired <= index {
                        done(retired)
                        retired += 1
                    }
                }
            }
        }
        counters.batches += 1
    }

    private func fail(_ failure: ChannelFailure) throws(ChannelFailure) -> Never {
        broken = failure
        throw failure
    }
}

/// The RDMA data path's connection state, per memory server. A struct whose transitions return
/// what to do, so every path is testable without a device.
///
/// ```
/// disabled(reason)                       RDMA not possible (policy, no device, server has none)
/// idle ──connect──▶ connecting ──ok──▶ connected ──channel failed──▶ reconnecting ──ok──▶ connected
///                        │                                                │
///                        └──failed──▶ backoff(until) ◀────failed──────────┘
///                                       └── elapsed ──▶ reconnecting
/// any ──server restarted──▶ failed(reason)   (its pages are gone; the pool marks it failed)
/// ```
/// While in backoff, data moves over TCP; RDMA is tried again when the backoff elapses.
public struct RDMALink: Sendable, Equatable {
    public enum State: Sendable, Equatable {
        case disabled(reason: String)
        case idle
        case connecting
        case connected
        case reconnecting
        case backoff(untilNanoseconds: UInt64, reason: String)
        case failed(reason: String)
    }

    public enum Action: Sendable, Equatable {
        /// Take a pooled channel, or connect one if none is idle.
        case useRDMA
        /// Serve this request over TCP.
        case useTCP(reason: String)
        /// The server is gone for good.
        case fail(reason: String)
    }

    public private(set) var state: State
    public private(set) var consecutiveFailures = 0
    public let baseBackoffNanoseconds: UInt64
    public let maxBackoffNanoseconds: UInt64

    public init(enabled: Bool, reason: String = "", baseBackoffNanoseconds: UInt64 = 1_000_000_000,
                maxBackoffNanoseconds: UInt64 = 30_000_000_000)
    {
        state = enabled ? .idle : .disabled(reason: reason)
        self.baseBackoffNanoseconds = baseBackoffNanoseconds
        self.maxBackoffNanoseconds = maxBackoffNanoseconds
    }

    /// Whether data moves over RDMA now (for `farpagectl pool list`).
    public var isUp: Bool { state == .connected }

    /// A data request wants a path.
    public mutating func route(now: UInt64) -> Action {
        switch state {
        case .disabled(let reason): return .useTCP(reason: reason)
        case .failed(let reason): return .fail(reason: reason)
        case .backoff(let until, let reason):
            guard now >= until else { return .useTCP(reason: reason) }
            state = .reconnecting
            return .useRDMA
        case .idle:
            state = .connecting
            return .useRDMA
        case .connecting, .connected, .reconnecting:
            return .useRDMA
        }
    }

    /// A new channel connected. The failure count is not reset here: a path where rdma_cm
    /// connects but no transfer completes (an MTU mismatch, a broken route) must still back off;
    /// `transferred` resets it.
    public mutating func connected() {
        guard case .failed = state else {
            state = .connected
            return
        }
    }

    /// A channel completed its first batch: the path carries data.
    public mutating func transferred() { consecutiveFailures = 0 }

    /// Connecting a channel failed: back off (exponentially, up to the maximum) and use TCP.
    public mutating func connectFailed(reason: String, now: UInt64) {
        if case .failed = state { return }
        if case .disabled = state { return }
        consecutiveFailures += 1
        let shift = UInt64(min(consecutiveFailures - 1, 16))
        let delay = min(maxBackoffNanoseconds, baseBackoffNanoseconds << shift)
        state = .backoff(untilNanoseconds: now + delay, reason: "RDMA connection failed (\(reason)); retrying in \(delay / 1_000_000) ms")
    }

    /// A connected channel broke (retry exceeded, flush, disconnect, device removal): the next
    /// request reconnects at once; if that fails too, `connectFailed` backs off. A channel that
    /// broke before it completed anything (`proven` false) is a failed reconnect: back off.
    public mutating func channelFailed(proven: Bool = true, reason: String = "", now: UInt64 = 0) {
        guard proven else { return connectFailed(reason: "no transfer completed on a new connection: \(reason)", now: now) }
        switch state {
        case .connected, .connecting: state = .reconnecting
        default: break
        }
    }

    /// The server restarted (new identity): nothing will bring its pages back.
    public mutating func serverRestarted(reason: String) { state = .failed(reason: reason) }
}
