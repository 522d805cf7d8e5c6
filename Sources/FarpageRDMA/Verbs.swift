import CFarpageVerbs

#if canImport(Glibc)
import Glibc
#endif

/// What an RDMA work request does: one-sided, so the remote CPU takes no part.
public enum RDMAOpcode: Sendable, Equatable {
    /// RDMA READ: remote memory into the staging buffer.
    case read
    /// RDMA WRITE: the staging buffer into remote memory.
    case write
}

/// One work request on a queue pair's send queue.
public struct WorkRequest: Sendable, Equatable {
    public var id: UInt64
    public var opcode: RDMAOpcode
    /// Generates a completion. Unsignalled requests are retired by a later signalled one.
    public var signaled: Bool
    /// Bytes into the queue pair's staging buffer.
    public var localOffset: Int
    public var length: Int
    public var remoteAddress: UInt64
    public var rkey: UInt32
    public init(id: UInt64, opcode: RDMAOpcode, signaled: Bool, localOffset: Int, length: Int, remoteAddress: UInt64, rkey: UInt32) {
        self.id = id
        self.opcode = opcode
        self.signaled = signaled
        self.localOffset = localOffset
        self.length = length
        self.remoteAddress = remoteAddress
        self.rkey = rkey
    }
}

/// A work completion's status (`enum ibv_wc_status`, same values).
public struct CompletionStatus: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }
    public static let success = CompletionStatus(rawValue: 0)
    public static let localLength = CompletionStatus(rawValue: 1)
    public static let localQueuePairOperation = CompletionStatus(rawValue: 2)
    public static let localProtection = CompletionStatus(rawValue: 4)
    /// The queue pair went to the error state before this request ran.
    public static let flushed = CompletionStatus(rawValue: 5)
    public static let badResponse = CompletionStatus(rawValue: 7)
    public static let localAccess = CompletionStatus(rawValue: 8)
    public static let remoteInvalidRequest = CompletionStatus(rawValue: 9)
    /// The remote key, address or length is not valid there (a lease freed, a key deregistered).
    public static let remoteAccess = CompletionStatus(rawValue: 10)
    public static let remoteOperation = CompletionStatus(rawValue: 11)
    /// No acknowledgement after every transport retry: the peer or the path is down.
    public static let retryExceeded = CompletionStatus(rawValue: 12)
    public static let receiverNotReadyRetryExceeded = CompletionStatus(rawValue: 13)
    public static let fatal = CompletionStatus(rawValue: 19)
    public static let responseTimeout = CompletionStatus(rawValue: 20)
    public static let general = CompletionStatus(rawValue: 21)

    /// libibverbs' own text (`ibv_wc_status_str`).
    public var description: String { String(cString: fp_verbs_wc_status_str(rawValue)) }

    /// What a failed completion says about the connection and the lease.
    public var failure: CompletionFailure {
        switch self {
        case .success: return .none
        case .flushed: return .flushed
        case .remoteAccess, .remoteInvalidRequest: return .remoteAccess
        case .retryExceeded, .receiverNotReadyRetryExceeded, .responseTimeout, .fatal, .badResponse, .remoteOperation:
            return .peerUnreachable
        default: return .local
        }
    }
}

/// Completion failures in the classes the transport acts on.
public enum CompletionFailure: Sendable, Equatable {
    case none
    /// Flushed because the queue pair was already in error: the cause is an earlier completion.
    case flushed
    /// The server refused the key or range: the lease's key is no longer valid. Never retried
    /// on RDMA with the same key.
    case remoteAccess
    /// Transport retries exhausted, fatal device error: the connection is dead.
    case peerUnreachable
    /// A local programming or resource error (length, protection, queue pair operation).
    case local
}

public struct WorkCompletion: Sendable, Equatable {
    public var id: UInt64
    public var status: CompletionStatus
    public init(id: UInt64, status: CompletionStatus) {
        self.id = id
        self.status = status
    }
}

/// Queue pair states (`enum ibv_qp_state`).
public enum QueuePairState: Int32, Sendable {
    case reset = 0, initialized, readyToReceive, readyToSend, sendQueueDrained, sendQueueError, error
}

/// What a connection's rdma_cm event channel reported.
public enum ConnectionEvent: Sendable, Equatable {
    case none
    case disconnected
    case deviceRemoved
    case other
}

/// A failed verbs or rdma_cm call: `'rdma_connect' failed: (111) Connection refused`.
public struct VerbsError: Error, Sendable, Equatable, CustomStringConvertible {
    public let call: String
    public let errno: Int32
    public init(_ call: String, errno: Int32) {
        self.call = call
        self.errno = errno
    }
    public var description: String {
        var text = "'\(call)' failed: (\(errno)) \(String(cString: strerror(errno)))"
        if errno == ENOMEM && call == "ibv_reg_mr" {
            text += " (the memory locking limit is too low: set LimitMEMLOCK=infinity in the systemd unit, or ulimit -l unlimited)"
        }
        if errno == ENOSYS { text += " (no RDMA support in this kernel)" }
        return text
    }
}

/// Whether this host can do RDMA, and why not.
public enum RDMAAvailability: Sendable, Equatable {
    case devices([String])
    /// `ibv_get_device_list` failed with ENOSYS: no RDMA in the kernel.
    case noKernelSupport
    /// The kernel has RDMA, no device is configured.
    case noDevices
    case probeFailed(Int32)

    public var isAvailable: Bool { if case .devices = self { return true } else { return false } }

    /// Why RDMA cannot be used, and how to fix it; nil when it can.
    public var reason: String? {
        switch self {
        case .devices: return nil
        case .noKernelSupport:
            return "no RDMA support in this kernel (ibv_get_device_list: ENOSYS); load ib_uverbs and the device's driver, or set transport = \"tcp\""
        case .noDevices:
            return "no RDMA devices (the kernel has RDMA, but ibv_devices lists none; check the driver, or for Soft-RoCE: rdma link add rxe0 type rxe netdev IFACE)"
        case .probeFailed(let e):
            return "RDMA device probe failed: (\(e)) \(String(cString: strerror(e)))"
        }
    }
}

/// One connected RC queue pair and its registered staging buffer, used by one thread at a time.
/// Closing it (or dropping the last reference) disconnects and releases everything.
public protocol VerbsQueuePair: AnyObject {
    /// Registered once at connect; every READ lands and every WRITE starts here.
    var staging: UnsafeMutableRawPointer { get }
    var stagingBytes: Int { get }
    /// Send queue slots: posted requests not yet retired may never exceed it.
    var sendDepth: Int { get }
    var device: String { get }
    /// `ibv_post_send` of the requests as one chain. On failure, `posted` of them were accepted.
    func post(_ requests: [WorkRequest]) throws(VerbsPostError)
    /// `ibv_poll_cq`, without blocking, up to `max` completions, into `completions` (emptied
    /// first; its storage is reused, so the busy-poll loop allocates nothing).
    func poll(into completions: inout [WorkCompletion], max: Int) throws(VerbsError)
    /// `ibv_req_notify_cq`.
    func arm() throws(VerbsError)
    /// Blocks on the completion channel; false on timeout.
    func wait(timeoutMilliseconds: Int32) throws(VerbsError) -> Bool
    /// `ibv_query_qp`; nil when it cannot be queried.
    func state() -> QueuePairState?
    /// A pending rdma_cm event, without blocking.
    func nextEvent() -> ConnectionEvent
    func close()
}

public struct VerbsPostError: Error, Sendable, Equatable {
    public let error: VerbsError
    public let posted: Int
    public init(error: VerbsError, posted: Int) {
        self.error = error
        self.posted = posted
    }
}

/// Makes queue pairs: the real verbs, or a fake for tests.
public protocol VerbsProvider: Sendable {
    func probe() -> RDMAAvailability
    /// Connects through rdma_cm to `host`:`port`, carrying `privateData` in the request.
    func connect(host: String, port: Int, privateData: [UInt8], stagingBytes: Int, sendDepth: Int,
                 timeoutMilliseconds: Int32) throws(VerbsError) -> any VerbsQueuePair
}

// MARK: - The real verbs

/// libibverbs and librdmacm through `CFarpageVerbs`.
public struct SystemVerbs: VerbsProvider {
    public init() {}

    public func probe() -> RDMAAvailability { Self.probeDevices() }

    /// `ibv_get_device_list`, classified: ENOSYS (no kernel support) is not "no devices".
    public static func probeDevices() -> RDMAAvailability {
        var names = [CChar](repeating: 0, count: 512)
        let n = fp_verbs_probe(&names, names.count)
        if n == -ENOSYS { return .noKernelSupport }
        if n < 0 { return .probeFailed(-n) }
        if n == 0 { return .noDevices }
        let list = names.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        return .devices(list.split(separator: ",").map(String.init))
    }

    public func connect(host: String, port: Int, privateData: [UInt8], stagingBytes: Int, sendDepth: Int,
                        timeoutMilliseconds: Int32) throws(VerbsError) -> any VerbsQueuePair
    {
        var err: Int32 = 0
        var stage: UnsafePointer<CChar>? = nil
        let conn = privateData.withUnsafeBytes { pd in
            fp_rdma_connect(host, Int32(port), pd.baseAddress, UInt8(min(pd.count, 56)), stagingBytes, UInt32(sendDepth),
                            timeoutMilliseconds, &err, &stage)
        }
        guard let conn else { throw VerbsError(stage.map { String(cString: $0) } ?? "rdma_connect", errno: -err) }
        return SystemQueuePair(conn)
    }
}

/// An `fp_rdma_conn`; closed in `close()` or `deinit`, whichever comes first.
final class SystemQueuePair: VerbsQueuePair {
    private var conn: OpaquePointer?
    let staging: UnsafeMutableRawPointer
    let stagingBytes: Int
    let sendDepth: Int
    let device: String
    /// Reused by every post and poll: one thread uses a queue pair at a time.
    private var wrs: [fp_rdma_wr] = []
    private var wcs = [fp_rdma_wc](repeating: fp_rdma_wc(), count: 32)

    init(_ conn: OpaquePointer) {
        self.conn = conn
        staging = fp_rdma_conn_staging(conn)
        stagingBytes = fp_rdma_conn_staging_bytes(conn)
        sendDepth = Int(fp_rdma_conn_send_depth(conn))
        device = String(cString: fp_rdma_conn_device(conn))
    }

    deinit { close() }

    func close() {
        if let c = conn { fp_rdma_conn_destroy(c) }
        conn = nil
    }

    func post(_ requests: [WorkRequest]) throws(VerbsPostError) {
        guard let conn else { throw VerbsPostError(error: VerbsError("ibv_post_send", errno: ENOTCONN), posted: 0) }
        wrs.removeAll(keepingCapacity: true)
        for r in requests {
            wrs.append(fp_rdma_wr(wr_id: r.id, opcode: r.opcode == .read ? Int32(FP_RDMA_OP_READ) : Int32(FP_RDMA_OP_WRITE),
                                  signaled: r.signaled ? 1 : 0, local_offset: UInt64(r.localOffset), length: UInt32(r.length),
                                  rkey: r.rkey, remote_addr: r.remoteAddress))
        }
        var posted: Int32 = 0
        let rc = fp_rdma_post(conn, wrs, Int32(wrs.count), &posted)
        if rc < 0 { throw VerbsPostError(error: VerbsError("ibv_post_send", errno: -rc), posted: Int(posted)) }
    }

    func poll(into completions: inout [WorkCompletion], max: Int) throws(VerbsError) {
        completions.removeAll(keepingCapacity: true)
        guard let conn else { throw VerbsError("ibv_poll_cq", errno: ENOTCONN) }
        let n = fp_rdma_poll(conn, &wcs, Int32(min(max, wcs.count)))
        if n < 0 { throw VerbsError("ibv_poll_cq", errno: -n) }
        for wc in wcs[0..<Int(n)] { completions.append(WorkCompletion(id: wc.wr_id, status: CompletionStatus(rawValue: wc.status))) }
    }

    func arm() throws(VerbsError) {
        guard let conn else { throw VerbsError("ibv_req_notify_cq", errno: ENOTCONN) }
        let rc = fp_rdma_arm(conn)
        if rc < 0 { throw VerbsError("ibv_req_notify_cq", errno: -rc) }
    }

    func wait(timeoutMilliseconds: Int32) throws(VerbsError) -> Bool {
        guard let conn else { throw VerbsError("ibv_get_cq_event", errno: ENOTCONN) }
        let rc = fp_rdma_wait(conn, timeoutMilliseconds)
        if rc < 0 { throw VerbsError("ibv_get_cq_event", errno: -rc) }
        return rc > 0
    }

    func state() -> QueuePairState? {
        guard let conn else { return nil }
        let s = fp_rdma_qp_state(conn)
        return s < 0 ? nil : QueuePairState(rawValue: s)
    }

    func nextEvent() -> ConnectionEvent {
        guard let conn else { return .disconnected }
        switch fp_rdma_conn_event(conn) {
        case Int32(FP_RDMA_EV_NONE): return .none
        case Int32(FP_RDMA_EV_DISCONNECTED): return .disconnected
        case Int32(FP_RDMA_EV_DEVICE_REMOVAL): return .deviceRemoved
        default: return .other
        }
    }
}
