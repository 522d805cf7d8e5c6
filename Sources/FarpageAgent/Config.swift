import FarpageKernel
import FarpagePool
import Foundation
import Logging
import TOMLKit

/// The agent's configuration (`config/agent.toml` documents every key).
public struct AgentConfig: Sendable, Equatable {
    public var socket = "/run/farpage/agent.sock"
    public var socketMode: UInt32 = 0o666
    public var faultThreads = 0
    public var residentBudget: UInt64 = 8 << 30
    public var regionBudget: UInt64 = 1 << 30
    public var maxRegionSize: UInt64 = 1 << 40
    public var maxRegions = 4096
    public var highWatermark = 0.90
    public var lowWatermark = 0.70
    public var evictBatch = 64
    public var faultSpinMicroseconds = 50
    public var shutdownGraceSeconds = 10.0
    public var storeKind = "memory"
    public var storeCapacity: UInt64 = 16 << 30
    /// The spill file of `storeKind == "file"` (absolute; no default).
    public var storePath: String? = nil
    public var storeDirectIO = SpillDirectIO.auto
    /// How long a fault's spill-file read polls for its completion before it sleeps.
    public var storePollMicroseconds = 100
    /// One lease of the local spill; the memory servers' lease size, so that leases move
    /// between them whole (demotion) without wasting spill space.
    public var storeLeaseBytes: UInt64 = 64 << 20
    /// Memory servers to attach at start ("HOST:PORT").
    public var poolServers: [String] = []
    public var poolSecretFile: String? = nil
    public var poolHeartbeatSeconds = 1.0
    public var poolIOTimeoutSeconds = 2.0
    /// How long a fault waits for a memory server that stopped answering (0: not at all).
    public var poolOutageWaitSeconds = 30.0
    /// `[pool] transport`: "auto", "tcp" or "rdma" (see `TransportPolicy`).
    public var poolTransport = "auto"
    public var logLevel: Logger.Level = .info
    /// [tiering]: see config/agent.toml and docs/tiering.md.
    public var prefetch = true
    public var prefetchWindow = 16
    public var maxPrefetchWindow = 128
    public var minResidenceSeconds = 0.1
    public var classify = true
    public var activeFraction = 0.5
    public var migrationWindowSeconds = 1.0
    /// Demotion of cold pool leases to the spill file, promotion back (docs/tiering.md).
    public var demoteAbove = 0.9
    public var demoteTo = 0.8
    public var demoteAfterSeconds = 30.0
    public var promote = true

    public init() {}

    /// Fault threads to run: the configured number, or one per CPU.
    public var effectiveFaultThreads: Int {
        faultThreads > 0 ? faultThreads : max(1, ProcessInfo.processInfo.activeProcessorCount)
    }
}

/// A configuration problem, naming the key and the fix.
public struct ConfigError: Error, CustomStringConvertible, Equatable {
    public let key: String
    public let problem: String
    public let fix: String
    public var description: String { "config error: \(key): \(problem); \(fix)" }
}

extension AgentConfig {
    static let knownKeys: [String: Set<String>] = [
        "agent": [
            "socket", "socket_mode", "fault_threads", "resident_budget", "region_budget", "max_region_size",
            "max_regions", "high_watermark", "low_watermark", "evict_batch", "shutdown_grace", "fault_spin_us",
        ],
        "store": ["kind", "capacity", "path", "direct_io", "lease_size", "poll_us"],
        "pool": ["servers", "secret_file", "heartbeat", "io_timeout", "transport", "outage_wait"],
        "log": ["level"],
        "tiering": [
            "prefetch", "prefetch_window", "max_prefetch_window", "min_residence", "classify", "active_fraction",
            "migration_window", "demote_above", "demote_to", "demote_after", "promote",
        ],
    ]

    /// Loads and validates a TOML file.
    public static func load(path: String) throws(ConfigError) -> AgentConfig {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigError(key: path, problem: "cannot read the file",
                              fix: "check the path and its permissions, or pass --config with an existing file")
        }
        return try parse(String(decoding: data, as: UTF8.self), origin: path)
    }

    /// Parses and validates TOML text.
    public static func parse(_ text: String, origin: String = "config") throws(ConfigError) -> AgentConfig {
        let table: TOMLTable
        do { table = try TOMLTable(string: text) } catch let error as TOMLParseError {
            throw ConfigError(key: origin, problem: "not valid TOML at line \(error.source.begin.line), column \(error.source.begin.column): \(error.description)",
                              fix: "fix the syntax (see config/agent.toml for a commented example)")
        } catch {
            throw ConfigError(key: origin, problem: "not valid TOML: \(error)", fix: "fix the syntax")
        }
        var c = AgentConfig()
        for section in table.keys {
            guard let allowed = knownKeys[section] else {
                throw ConfigError(key: section, problem: "unknown section",
                                  fix: "use one of [agent], [store], [pool], [tiering], [log]")
            }
            guard let sub = table[section]?.table else {
                throw ConfigError(key: section, problem: "must be a table", fix: "write it as [\(section)]")
            }
            for key in sub.keys where !allowed.contains(key) {
                throw ConfigError(key: "\(section).\(key)", problem: "unknown key",
                                  fix: "valid keys in [\(section)]: \(allowed.sorted().joined(separator: ", "))")
            }
        }
        let agent = table["agent"]?.table
        let store = table["store"]?.table
        let log = table["log"]?.table

        if let v = agent?["socket"] {
            guard let s = v.string, s.hasPrefix("/"), s.utf8.count < 108 else {
                throw ConfigError(key: "agent.socket", problem: "must be an absolute path shorter than 108 bytes",
                                  fix: "e.g. socket = \"/run/farpage/agent.sock\"")
            }
            c.socket = s
        }
        if let v = agent?["socket_mode"] {
            guard let s = v.string, let mode = UInt32(s, radix: 8), mode <= 0o777 else {
                throw ConfigError(key: "agent.socket_mode", problem: "must be an octal string",
                                  fix: "e.g. socket_mode = \"0660\"")
            }
            c.socketMode = mode
        }
        c.faultThreads = try integer(agent, "fault_threads", "agent.fault_threads", 0...256, c.faultThreads)
        c.residentBudget = try size(agent, "resident_budget", "agent.resident_budget", c.residentBudget)
        c.regionBudget = try size(agent, "region_budget", "agent.region_budget", c.regionBudget)
        c.maxRegionSize = try size(agent, "max_region_size", "agent.max_region_size", c.maxRegionSize)
        c.maxRegions = try integer(agent, "max_regions", "agent.max_regions", 1...1_000_000, c.maxRegions)
        c.highWatermark = try fraction(agent, "high_watermark", "agent.high_watermark", c.highWatermark)
        c.lowWatermark = try fraction(agent, "low_watermark", "agent.low_watermark", c.lowWatermark)
        c.evictBatch = try integer(agent, "evict_batch", "agent.evict_batch", 1...4096, c.evictBatch)
        c.faultSpinMicroseconds = try integer(agent, "fault_spin_us", "agent.fault_spin_us", 0...10_000, c.faultSpinMicroseconds)
        if let v = agent?["shutdown_grace"] {
            guard let s = v.string, let seconds = parseDuration(s) else {
                throw ConfigError(key: "agent.shutdown_grace", problem: "must be a duration string",
                                  fix: "e.g. shutdown_grace = \"10s\" (units ms, s, m)")
            }
            c.shutdownGraceSeconds = seconds
        }
        try parseStore(store, into: &c)
        let pool = table["pool"]?.table
        if let v = pool?["servers"] {
            guard let array = v.array else {
                throw ConfigError(key: "pool.servers", problem: "must be a list of \"HOST:PORT\" strings",
                                  fix: "e.g. servers = [\"10.0.0.5:7201\", \"10.0.0.6:7201\"]")
            }
            var servers: [String] = []
            for item in array {
                guard let s = item.string, let colon = s.lastIndex(of: ":"), let port = Int(s[s.index(after: colon)...]),
                    (1...65535).contains(port), colon != s.startIndex
                else {
                    throw ConfigError(key: "pool.servers", problem: "\(item) is not HOST:PORT",
                                      fix: "e.g. servers = [\"10.0.0.5:7201\"]")
                }
                servers.append(s)
            }
            c.poolServers = servers
        }
        if let v = pool?["secret_file"] {
            guard let s = v.string, s.hasPrefix("/") else {
                throw ConfigError(key: "pool.secret_file", problem: "must be an absolute path",
                                  fix: "e.g. secret_file = \"/etc/farpage/cluster.secret\"")
            }
            c.poolSecretFile = s
        }
        for (key, path) in [("heartbeat", \AgentConfig.poolHeartbeatSeconds), ("io_timeout", \AgentConfig.poolIOTimeoutSeconds)] {
            if let v = pool?[key] {
                guard let s = v.string, let d = parseDuration(s), d > 0 else {
                    throw ConfigError(key: "pool.\(key)", problem: "must be a positive duration", fix: "e.g. \(key) = \"1s\"")
                }
                c[keyPath: path] = d
            }
        }
        if let v = pool?["outage_wait"] {
            guard let s = v.string, let d = parseDuration(s), d >= 0, d <= 3600 else {
                throw ConfigError(key: "pool.outage_wait", problem: "must be a duration of at most 1h (0s: faults do not wait)",
                                  fix: "e.g. outage_wait = \"30s\" (the memory servers' lease_grace)")
            }
            c.poolOutageWaitSeconds = d
        }
        if let v = pool?["transport"] {
            guard let s = v.string, ["auto", "tcp", "rdma"].contains(s) else {
                throw ConfigError(key: "pool.transport", problem: "must be \"auto\", \"tcp\" or \"rdma\"",
                                  fix: "e.g. transport = \"auto\" (RDMA where both sides have a device, else TCP)")
            }
            c.poolTransport = s
        }
        if !c.poolServers.isEmpty && c.poolSecretFile == nil {
            throw ConfigError(key: "pool.secret_file", problem: "is required when pool.servers is set",
                              fix: "point it at the cluster secret shared with the memory servers")
        }
        try parseTiering(table["tiering"]?.table, into: &c)
        if let v = log?["level"] {
            guard let s = v.string, let level = Logger.Level(rawValue: s.lowercased()) else {
                throw ConfigError(key: "log.level", problem: "unknown level",
                                  fix: "use one of trace, debug, info, notice, warning, error, critical")
            }
            c.logLevel = level
        }
        try c.validate()
        return c
    }

    private static func parseTiering(_ t: TOMLTable?, into c: inout AgentConfig) throws(ConfigError) {
        for (key, path) in [("prefetch", \AgentConfig.prefetch), ("classify", \AgentConfig.classify), ("promote", \AgentConfig.promote)] {
            guard let v = t?[key] else { continue }
            guard let b = v.bool else {
                throw ConfigError(key: "tiering.\(key)", problem: "must be true or false", fix: "e.g. \(key) = true")
            }
            c[keyPath: path] = b
        }
        c.prefetchWindow = try integer(t, "prefetch_window", "tiering.prefetch_window", 1...4096, c.prefetchWindow)
        c.maxPrefetchWindow = try integer(t, "max_prefetch_window", "tiering.max_prefetch_window", 1...4096, c.maxPrefetchWindow)
        guard c.prefetchWindow <= c.maxPrefetchWindow else {
            throw ConfigError(key: "tiering.prefetch_window", problem: "(\(c.prefetchWindow)) exceeds max_prefetch_window (\(c.maxPrefetchWindow))",
                              fix: "e.g. prefetch_window = 16 and max_prefetch_window = 128")
        }
        c.activeFraction = try fraction(t, "active_fraction", "tiering.active_fraction", c.activeFraction)
        for (key, path, zeroOK, example) in [("min_residence", \AgentConfig.minResidenceSeconds, true, "100ms"),
                                             ("migration_window", \AgentConfig.migrationWindowSeconds, false, "1s"),
                                             ("demote_after", \AgentConfig.demoteAfterSeconds, true, "30s")] {
            guard let v = t?[key] else { continue }
            guard let s = v.string, let d = parseDuration(s), d >= 0, zeroOK || d > 0, d <= 3600 else {
                throw ConfigError(key: "tiering.\(key)", problem: "must be a duration\(zeroOK ? "" : " above zero") of at most 1h",
                                  fix: "e.g. \(key) = \"\(example)\"")
            }
            c[keyPath: path] = d
        }
        c.demoteAbove = try fraction(t, "demote_above", "tiering.demote_above", c.demoteAbove)
        c.demoteTo = try fraction(t, "demote_to", "tiering.demote_to", c.demoteTo)
        guard c.demoteTo < c.demoteAbove else {
            throw ConfigError(key: "tiering.demote_to", problem: "(\(c.demoteTo)) must be below demote_above (\(c.demoteAbove)): the gap is the hysteresis",
                              fix: "e.g. demote_above = 0.9 and demote_to = 0.8")
        }
    }

    /// Demotion and promotion between the pool and a spill file.
    public var tierMovement: TierMovement {
        TierMovement(demoteAbove: demoteAbove, demoteTo: demoteTo, coldAfterMilliseconds: Int(demoteAfterSeconds * 1000),
                     promote: promote)
    }

    private static func parseStore(_ store: TOMLTable?, into c: inout AgentConfig) throws(ConfigError) {
        if let v = store?["kind"] {
            guard let s = v.string, s == "memory" || s == "file" else {
                throw ConfigError(key: "store.kind", problem: "unsupported far tier \(v.string.map { "\"\($0)\"" } ?? "value")",
                                  fix: "use kind = \"memory\" (the agent's own memory) or kind = \"file\" (a spill file; set path too)")
            }
            c.storeKind = s
        }
        c.storeCapacity = try size(store, "capacity", "store.capacity", c.storeCapacity)
        c.storeLeaseBytes = try size(store, "lease_size", "store.lease_size", c.storeLeaseBytes)
        guard c.storeLeaseBytes % UInt64(systemPageSize) == 0, c.storeLeaseBytes <= (1 << 24) * UInt64(systemPageSize) else {
            throw ConfigError(key: "store.lease_size", problem: "must be a whole number of pages, at most 64GiB",
                              fix: "use the memory servers' lease_size, e.g. lease_size = \"64MiB\"")
        }
        if let v = store?["path"] {
            guard let s = v.string, s.hasPrefix("/"), !s.hasSuffix("/") else {
                throw ConfigError(key: "store.path", problem: "must be the absolute path of a file",
                                  fix: "e.g. path = \"/var/lib/farpage/spill\"")
            }
            c.storePath = s
        }
        if let v = store?["direct_io"] {
            guard let s = v.string, let mode = SpillDirectIO(rawValue: s) else {
                throw ConfigError(key: "store.direct_io", problem: "must be \"auto\" or \"off\"",
                                  fix: "direct_io = \"auto\" uses O_DIRECT where the filesystem allows it; \"off\" always goes through the page cache")
            }
            c.storeDirectIO = mode
        }
        c.storePollMicroseconds = try integer(store, "poll_us", "store.poll_us", 0...1000, c.storePollMicroseconds)
    }

    /// Cross-field checks.
    public func validate() throws(ConfigError) {
        let page = UInt64(systemPageSize)
        guard lowWatermark < highWatermark else {
            throw ConfigError(key: "agent.low_watermark", problem: "(\(lowWatermark)) must be below high_watermark (\(highWatermark))",
                              fix: "e.g. high_watermark = 0.9 and low_watermark = 0.7")
        }
        guard residentBudget >= 16 * page else {
            throw ConfigError(key: "agent.resident_budget", problem: "is below 16 pages",
                              fix: "give the agent at least 64KiB, e.g. resident_budget = \"8GiB\"")
        }
        guard regionBudget >= page else {
            throw ConfigError(key: "agent.region_budget", problem: "is below one page", fix: "e.g. region_budget = \"1GiB\"")
        }
        guard maxRegionSize >= page, maxRegionSize <= (UInt64(UInt32.max) * page) else {
            throw ConfigError(key: "agent.max_region_size", problem: "must be between one page and 16TiB",
                              fix: "e.g. max_region_size = \"1TiB\"")
        }
        guard storeCapacity >= page else {
            throw ConfigError(key: "store.capacity", problem: "is below one page", fix: "e.g. capacity = \"16GiB\"")
        }
        if storeKind == "file" && storePath == nil {
            throw ConfigError(key: "store.path", problem: "is required when kind = \"file\"",
                              fix: "name the spill file, e.g. path = \"/var/lib/farpage/spill\" (its directory must exist)")
        }
    }

    private static func integer(_ t: TOMLTable?, _ k: String, _ name: String, _ range: ClosedRange<Int>, _ d: Int)
        throws(ConfigError) -> Int
    {
        guard let v = t?[k] else { return d }
        guard let i = v.int, range.contains(i) else {
            throw ConfigError(key: name, problem: "must be an integer in \(range.lowerBound)...\(range.upperBound)",
                              fix: "e.g. \(k) = \(d)")
        }
        return i
    }

    private static func fraction(_ t: TOMLTable?, _ k: String, _ name: String, _ d: Double) throws(ConfigError) -> Double {
        guard let v = t?[k] else { return d }
        guard let x = v.double ?? v.int.map(Double.init), x > 0, x <= 1 else {
            throw ConfigError(key: name, problem: "must be a fraction in (0, 1]", fix: "e.g. \(k) = \(d)")
        }
        return x
    }

    private static func size(_ t: TOMLTable?, _ k: String, _ name: String, _ d: UInt64) throws(ConfigError) -> UInt64 {
        guard let v = t?[k] else { return d }
        if let i = v.int, i > 0 { return UInt64(i) }
        guard let s = v.string, let bytes = parseSize(s) else {
            throw ConfigError(key: name, problem: "is not a size", fix: "write e.g. \(k) = \"4GiB\" (units B, KiB, MiB, GiB, TiB)")
        }
        return bytes
    }
}

