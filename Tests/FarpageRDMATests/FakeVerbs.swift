import FarpageRDMA
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// An in-memory stand-in for an RDMA fabric: memory regions (rkey → bytes, protection domain),
/// queue pairs that execute one-sided READ and WRITE against them with the verbs' rules (an
/// rkey reaches only its region, only from a queue pair of the same protection domain; any
/// error puts the queue pair in the error state and flushes the rest; a send queue holds
/// `sendDepth` requests, unsignalled ones until a later signalled completion is polled), and
/// knobs to inject failures.
final class FakeFabric: @unchecked Sendable {
    struct Region {
        let pd: Int
        let base: UnsafeMutableRawPointer
        let length: Int
    }
    private let lock = Mutex<Void>(())
    private var regions: [UInt32: Region] = [:]
    private var nextKey: UInt32 = 0x1000
    /// Decides, from a connection request's private data, which protection domain the server
    /// puts the queue pair in; nil rejects it.
    var accept: @Sendable ([UInt8]) -> Int? = { _ in 1 }
    /// Failures for the next connects, first first.
    var connectFailures: [VerbsError] = []
    var availability: RDMAAvailability = .devices(["fake0"])
    /// Installed as `inject` on every queue pair made from now on (a path that connects but
    /// cannot carry data).
    var injectOnNewQueuePairs: ((WorkRequest) -> CompletionStatus?)? = nil
    /// Every queue pair made, in order.
    private(set) var queuePairs: [FakeQueuePair] = []
    private(set) var connects = 0

    func register(pd: Int, base: UnsafeMutableRawPointer, length: Int) -> UInt32 {
        lock.withLock { _ in
            nextKey += 0x101
            regions[nextKey] = Region(pd: pd, base: base, length: length)
            return nextKey
        }
    }

    func deregister(_ rkey: UInt32) { lock.withLock { _ in regions[rkey] = nil } }

    var registeredRegions: Int { lock.withLock { _ in regions.count } }

    /// Performs one access the way a responder would: the status it completes with.
    func access(_ wr: WorkRequest, pd: Int, staging: UnsafeMutableRawPointer) -> CompletionStatus {
        lock.withLock { _ in
            guard let r = regions[wr.rkey], r.pd == pd else { return .remoteAccess }
            let start = UInt(bitPattern: r.base)
            guard wr.remoteAddress >= UInt64(start), wr.remoteAddress + UInt64(wr.length) <= UInt64(start) + UInt64(r.length) else {
                return .remoteAccess
            }
            let remote = UnsafeMutableRawPointer(bitPattern: UInt(wr.remoteAddress))!
            switch wr.opcode {
            case .read: memcpy(staging + wr.localOffset, remote, wr.length)
            case .write: memcpy(remote, staging + wr.localOffset, wr.length)
            }
            return .success
        }
    }

    func makeQueuePair(privateData: [UInt8], stagingBytes: Int, sendDepth: Int) throws(VerbsError) -> FakeQueuePair {
        let (failure, pd): (VerbsError?, Int?) = lock.withLock { _ in
            connects += 1
            if !connectFailures.isEmpty { return (connectFailures.removeFirst(), nil) }
            return (nil, nil)
        }
        if let failure { throw failure }
        guard let domain = pd ?? accept(privateData) else { throw VerbsError("rdma_connect", errno: ECONNREFUSED) }
        let qp = FakeQueuePair(fabric: self, pd: domain, stagingBytes: stagingBytes, sendDepth: sendDepth)
        if let injectOnNewQueuePairs { qp.inject = injectOnNewQueuePairs }
        lock.withLock { _ in queuePairs.append(qp) }
        return qp
    }
}

final class FakeQueuePair: VerbsQueuePair, @unchecked Sendable {
    let fabric: FakeFabric
    let pd: Int
    let staging: UnsafeMutableRawPointer
    let stagingBytes: Int
    let sendDepth: Int
    let device = "fake0"
    /// Posted and not yet executed.
    private var pending: [WorkRequest] = []
    /// Posted and not yet retired (occupying send queue slots).
    private var occupying: [UInt64] = []
    private(set) var qpState = QueuePairState.readyToSend
    private(set) var closed = false
    /// Completions stop coming (a hung peer): polls find nothing, waits time out.
    var stalled = false
    var event = ConnectionEvent.none
    /// Injected: the status a request completes with instead of performing it.
    var inject: (WorkRequest) -> CompletionStatus? = { _ in nil }
    private(set) var maxOccupied = 0
    private(set) var postedTotal = 0
    private(set) var readsPosted = 0

    init(fabric: FakeFabric, pd: Int, stagingBytes: Int, sendDepth: Int) {
        self.fabric = fabric
        self.pd = pd
        self.stagingBytes = stagingBytes
        self.sendDepth = sendDepth
        staging = .allocate(byteCount: stagingBytes, alignment: 4096)
    }

    deinit { staging.deallocate() }

    func post(_ requests: [WorkRequest]) throws(VerbsPostError) {
        if closed { throw VerbsPostError(error: VerbsError("ibv_post_send", errno: ENOTCONN), posted: 0) }
        for (i, r) in requests.enumerated() {
            // A real send queue refuses what it has no slot for (ENOMEM); the engine must never try.
            guard occupying.count < sendDepth else { throw VerbsPostError(error: VerbsError("ibv_post_send", errno: ENOMEM), posted: i) }
            guard r.localOffset + r.length <= stagingBytes, r.length > 0 else {
                throw VerbsPostError(error: VerbsError("ibv_post_send", errno: EINVAL), posted: i)
            }
            pending.append(r)
            occupying.append(r.id)
            postedTotal += 1
            if r.opcode == .read { readsPosted += 1 }
            maxOccupied = max(maxOccupied, occupying.count)
        }
    }

    private func retire(through id: UInt64) {
        while let first = occupying.first, first <= id { occupying.removeFirst() }
    }

    func poll(into out: inout [WorkCompletion], max: Int) throws(VerbsError) {
        out.removeAll(keepingCapacity: true)
        if closed { throw VerbsError("ibv_poll_cq", errno: ENOTCONN) }
        if stalled { return }
        while out.count < max, !pending.isEmpty {
            let r = pending.removeFirst()
            if qpState == .error {
                // Flushed requests complete with an error whether signalled or not.
                out.append(WorkCompletion(id: r.id, status: .flushed))
                retire(through: r.id)
                continue
            }
            let status = inject(r) ?? fabric.access(r, pd: pd, staging: staging)
            if status != .success {
                qpState = .error
                out.append(WorkCompletion(id: r.id, status: status))
                retire(through: r.id)
            } else if r.signaled {
                out.append(WorkCompletion(id: r.id, status: .success))
                retire(through: r.id)
            }
        }
    }

    func arm() throws(VerbsError) {}

    func wait(timeoutMilliseconds: Int32) throws(VerbsError) -> Bool { !stalled && !pending.isEmpty }

    func state() -> QueuePairState? { closed ? nil : qpState }

    func nextEvent() -> ConnectionEvent {
        defer { event = .none }
        return event
    }

    func close() { closed = true }
}

struct FakeVerbs: VerbsProvider {
    let fabric: FakeFabric
    func probe() -> RDMAAvailability { fabric.availability }
    func connect(host: String, port: Int, privateData: [UInt8], stagingBytes: Int, sendDepth: Int,
                 timeoutMilliseconds: Int32) throws(VerbsError) -> any VerbsQueuePair
    {
        try fabric.makeQueuePair(privateData: privateData, stagingBytes: stagingBytes, sendDepth: sendDepth)
    }
}
