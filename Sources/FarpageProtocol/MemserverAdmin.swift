/// The memory server's local administration socket (`farpagectl memserver`): a
/// `SOCK_SEQPACKET` Unix socket, one JSON request per packet, one JSON reply per packet.
/// Only root and the server's own user may use it (checked with `SO_PEERCRED`).
public enum MemserverAdmin {
    /// Largest request accepted; longer packets are refused.
    public static let maxRequest = 4096
    /// Largest reply (the agent table is cut to fit).
    public static let maxReply = 192 * 1024
    /// Most agents listed in a status reply.
    public static let maxAgentsListed = 512

    public enum Operation: String, Codable, Sendable {
        /// Capacity, limits and per-agent leases.
        case status
        /// Lower the lending limit so that `bytes` more of lent memory comes back.
        case reclaim
        /// Set the lending limit to `bytes` (absent: back to the configured capacity).
        case limit
        /// Set the free-memory headroom to `bytes` (0: off; absent: back to the configured value).
        case headroom
    }

    public struct Request: Codable, Sendable, Equatable {
        public var op: Operation
        public var bytes: UInt64?
        public init(op: Operation, bytes: UInt64? = nil) {
            self.op = op
            self.bytes = bytes
        }
    }

    public struct Agent: Codable, Sendable, Equatable {
        /// First 8 bytes of the agent id, in hex.
        public var id: String
        /// The name the agent gave in HELLO (its host name by default).
        public var name: String
        public var connected: Bool
        public var leases: Int
        /// Leases asked back and not yet returned.
        public var reclaiming: Int
        /// How long the oldest of those requests has waited (0 when none).
        public var oldestReclaimSeconds: Double
        public init(id: String, name: String, connected: Bool, leases: Int, reclaiming: Int, oldestReclaimSeconds: Double) {
            self.id = id
            self.name = name
            self.connected = connected
            self.leases = leases
            self.reclaiming = reclaiming
            self.oldestReclaimSeconds = oldestReclaimSeconds
        }
    }

    public struct Status: Codable, Sendable, Equatable {
        public var listen: String
        public var capacityBytes: UInt64
        public var leaseBytes: UInt64
        /// What may be lent now: the capacity, lowered by the operator's limit or by pressure.
        public var limitBytes: UInt64
        /// The operator's limit, when one is set.
        public var operatorLimitBytes: UInt64?
        /// The limit free memory allows (equal to the capacity without pressure).
        public var pressureLimitBytes: UInt64
        public var headroomBytes: UInt64
        /// MemAvailable at the last check; nil when /proc/meminfo could not be read.
        public var memAvailableBytes: UInt64?
        public var lentBytes: UInt64
        public var leases: Int
        public var reclaimingLeases: Int
        public var agents: [Agent]
        public init(listen: String, capacityBytes: UInt64, leaseBytes: UInt64, limitBytes: UInt64, operatorLimitBytes: UInt64?,
                    pressureLimitBytes: UInt64, headroomBytes: UInt64, memAvailableBytes: UInt64?, lentBytes: UInt64, leases: Int,
                    reclaimingLeases: Int, agents: [Agent])
        {
            self.listen = listen
            self.capacityBytes = capacityBytes
            self.leaseBytes = leaseBytes
            self.limitBytes = limitBytes
            self.operatorLimitBytes = operatorLimitBytes
            self.pressureLimitBytes = pressureLimitBytes
            self.headroomBytes = headroomBytes
            self.memAvailableBytes = memAvailableBytes
            self.lentBytes = lentBytes
            self.leases = leases
            self.reclaimingLeases = reclaimingLeases
            self.agents = agents
        }
    }

    public struct Reply: Codable, Sendable, Equatable {
        public var ok: Bool
        /// What went wrong and how to fix it, when `ok` is false.
        public var error: String?
        public var status: Status?
        public init(ok: Bool, error: String? = nil, status: Status? = nil) {
            self.ok = ok
            self.error = error
            self.status = status
        }
    }
}
