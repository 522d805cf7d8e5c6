/// JSON documents served to `farpagectl` (`status`, `regions`). Field names are the JSON keys.
public struct AgentStatus: Codable, Sendable {
    public var version: String
    public var pid: Int32
    public var uptimeSeconds: Double
    public var socket: String
    public var uffdAccess: String
    public var uffdFeatures: [String]
    /// How a client touching a lost page gets SIGBUS: "uffdio_poison", or on kernels before
    /// 6.6 "sigbus_to_faulting_thread" (absent from agents that predate it).
    public var lostPageSignal: String?
    public var pageSize: Int
    public var faultThreads: Int
    public var budgetPages: Int
    public var residentPages: Int
    public var highWatermarkPages: Int
    public var lowWatermarkPages: Int
    public var store: StoreStatus
    public var regions: Int
    public var clients: Int
    public var bookkeepingBytes: Int
    public var totals: [String: UInt64]
    public var shuttingDown: Bool
    public var pool: [PoolServer]

    public init(version: String, pid: Int32, uptimeSeconds: Double, socket: String, uffdAccess: String,
                uffdFeatures: [String], lostPageSignal: String? = nil, pageSize: Int, faultThreads: Int, budgetPages: Int, residentPages: Int,
                highWatermarkPages: Int, lowWatermarkPages: Int, store: StoreStatus, regions: Int, clients: Int,
                bookkeepingBytes: Int, totals: [String: UInt64], shuttingDown: Bool, pool: [PoolServer] = [])
    {
        self.pool = pool
        self.version = version
        self.pid = pid
        self.uptimeSeconds = uptimeSeconds
        self.socket = socket
        self.uffdAccess = uffdAccess
        self.uffdFeatures = uffdFeatures
        self.lostPageSignal = lostPageSignal
        self.pageSize = pageSize
        self.faultThreads = faultThreads
        self.budgetPages = budgetPages
        self.residentPages = residentPages
        self.highWatermarkPages = highWatermarkPages
        self.lowWatermarkPages = lowWatermarkPages
        self.store = store
        self.regions = regions
        self.clients = clients
        self.bookkeepingBytes = bookkeepingBytes
        self.totals = totals
        self.shuttingDown = shuttingDown
    }
}

public struct StoreStatus: Codable, Sendable {
    public var kind: String
    public var capacityPages: UInt64
    public var usedPages: UInt64
    public init(kind: String, capacityPages: UInt64, usedPages: UInt64) {
        self.kind = kind
        self.capacityPages = capacityPages
        self.usedPages = usedPages
    }
}

public struct RegionReport: Codable, Sendable {
    public var id: UInt64
    public var name: String
    public var pid: Int32
    public var uid: UInt32
    public var address: UInt64
    public var sizeBytes: UInt64
    public var budgetPages: Int
    public var residentPages: UInt64
    public var farPages: UInt64
    public var counters: [String: UInt64]
    public var ageSeconds: Double

    public init(id: UInt64, name: String, pid: Int32, uid: UInt32, address: UInt64, sizeBytes: UInt64,
                budgetPages: Int, residentPages: UInt64, farPages: UInt64, counters: [String: UInt64], ageSeconds: Double)
    {
        self.id = id
        self.name = name
        self.pid = pid
        self.uid = uid
        self.address = address
        self.sizeBytes = sizeBytes
        self.budgetPages = budgetPages
        self.residentPages = residentPages
        self.farPages = farPages
        self.counters = counters
        self.ageSeconds = ageSeconds
    }
}

/// One far-memory backend of the agent's pool (`farpagectl pool list`).
public struct PoolServer: Codable, Sendable {
    public var address: String
    public var status: String
    public var transport: String
    public var capacityBytes: UInt64
    public var leaseBytes: UInt64
    public var leases: Int
    public var storedPages: Int
    public var errors: UInt64
    public var lastError: String
    /// Leases the server asked back (donor pressure) that are still being moved elsewhere.
    public var reclaimingLeases: Int?
    /// I/O of the spill file (`[store] kind = "file"`); absent for other backends.
    public var spillFile: SpillFileIO?
    public init(address: String, status: String, transport: String, capacityBytes: UInt64, leaseBytes: UInt64, leases: Int,
                storedPages: Int, errors: UInt64, lastError: String, reclaimingLeases: Int? = nil, spillFile: SpillFileIO? = nil)
    {
        self.reclaimingLeases = reclaimingLeases
        self.spillFile = spillFile
        self.address = address
        self.status = status
        self.transport = transport
        self.capacityBytes = capacityBytes
        self.leaseBytes = leaseBytes
        self.leases = leases
        self.storedPages = storedPages
        self.errors = errors
        self.lastError = lastError
    }
}

/// What the agent's spill file has done since it started.
public struct SpillFileIO: Codable, Sendable, Equatable {
    /// Whether its reads and writes bypass the page cache (O_DIRECT).
    public var direct: Bool
    /// Read and write operations: one per run of consecutive pages.
    public var reads: UInt64
    public var writes: UInt64
    public var readBytes: UInt64
    public var writtenBytes: UInt64
    /// Kernel entries that submitted I/O (`io_uring_enter`): a fetch-ahead batch of runs that
    /// fits the ring (64) is one.
    public var submissions: UInt64
    /// Pages that did not match their checksum when read (each is poisoned, never served).
    public var checksumFailures: UInt64
    /// Operations on buffers not aligned for O_DIRECT, copied through an aligned one.
    public var bounced: UInt64
    /// Completions found while polling (`[store] poll`): no sleep and wakeup paid for them.
    /// Nil from agents older than the setting.
    public var polled: UInt64?

    public init(direct: Bool, reads: UInt64, writes: UInt64, readBytes: UInt64, writtenBytes: UInt64, submissions: UInt64,
                checksumFailures: UInt64, bounced: UInt64, polled: UInt64? = nil)
    {
        self.polled = polled
        self.direct = direct
        self.reads = reads
        self.writes = writes
        self.readBytes = readBytes
        self.writtenBytes = writtenBytes
        self.submissions = submissions
        self.checksumFailures = checksumFailures
        self.bounced = bounced
    }
}

/// Error codes carried in ERROR replies (with an errno and a message).
public enum ErrorCode: UInt32, Sendable {
    case malformed = 1
    case invalidArgument = 2
    case badDescriptor = 3
    case overlap = 4
    case limit = 5
    case notFound = 6
    case kernel = 7
    case shuttingDown = 8
    /// Pages of the range were busy (in flight); nothing was lost, retry.
    case busy = 9
}
