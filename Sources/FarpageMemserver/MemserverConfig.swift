import FarpageKernel
import Foundation
import Logging
import TOMLKit

/// The memory server's configuration (`config/memserver.toml` documents every key).
public struct MemserverConfig: Sendable, Equatable {
    public var host = "0.0.0.0"
    public var port = 7201
    public var capacityBytes: UInt64 = 16 << 30
    public var leaseBytes = 64 << 20
    public var secretFile = "/etc/farpage/cluster.secret"
    public var threads = 0
    public var leaseGraceSeconds = 30.0
    public var handshakeTimeoutSeconds = 10.0
    /// Free memory (MemAvailable) the host keeps for itself; below it, leases are asked back. 0: off.
    public var headroomBytes: UInt64 = 0
    /// Local administration socket for `farpagectl memserver`; empty: none.
    public var adminSocket = "/run/farpage-memserver/admin.sock"
    public var logLevel: Logger.Level = .info
    /// Data plane: TCP always; RDMA too when this host has a device (`auto`) or required (`rdma`).
    public var transport: MemserverTransport = .auto
    /// rdma_cm listening address; nil host: the TCP listen host.
    public var rdmaHost: String? = nil
    public var rdmaPort = 7202

    public init() {}

    public var effectiveThreads: Int { threads > 0 ? threads : max(1, ProcessInfo.processInfo.activeProcessorCount) }
}

/// A configuration problem, naming the key and the fix.
/// `[memserver] transport`.
public enum MemserverTransport: String, Sendable, CaseIterable {
    /// Listen on rdma_cm too when an RDMA device exists; TCP only (with the reason logged) otherwise.
    case auto
    /// TCP only.
    case tcp
    /// RDMA required: no device is a startup error.
    case rdma
}

public struct MemserverConfigError: Error, CustomStringConvertible, Equatable {
    public let key: String
    public let problem: String
    public let fix: String
    public var description: String { "config error: \(key): \(problem); \(fix)" }
    public init(key: String, problem: String, fix: String) {
        self.key = key
        self.problem = problem
        self.fix = fix
    }
}

extension MemserverConfig {
    static let known: [String: Set<String>] = [
        "memserver": ["listen", "capacity", "lease_size", "secret_file", "threads", "lease_grace", "handshake_timeout",
                      "headroom", "admin_socket", "transport", "rdma_listen"],
        "log": ["level"],
    ]

    public static func load(path: String) throws(MemserverConfigError) -> MemserverConfig {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw MemserverConfigError(key: path, problem: "cannot read the file", fix: "check the path and permissions")
        }
        return try parse(String(decoding: data, as: UTF8.self), origin: path)
    }

    public static func parse(_ text: String, origin: String = "config") throws(MemserverConfigError) -> MemserverConfig {
        let table: TOMLTable
        do { table = try TOMLTable(string: text) } catch let e as TOMLParseError {
            throw MemserverConfigError(key: origin, problem: "not valid TOML at line \(e.source.begin.line): \(e.description)",
                                       fix: "fix the syntax (see config/memserver.toml)")
        } catch { throw MemserverConfigError(key: origin, problem: "not valid TOML", fix: "fix the syntax") }
        for section in table.keys {
            guard let allowed = known[section], let sub = table[section]?.table else {
                throw MemserverConfigError(key: section, problem: "unknown section", fix: "use [memserver] and [log]")
            }
            for key in sub.keys where !allowed.contains(key) {
                throw MemserverConfigError(key: "\(section).\(key)", problem: "unknown key",
                                           fix: "valid keys: \(allowed.sorted().joined(separator: ", "))")
            }
        }
        var c = MemserverConfig()
        let m = table["memserver"]?.table
        if let v = m?["listen"] {
            guard let s = v.string, let (host, port) = parseListen(s) else {
                throw MemserverConfigError(key: "memserver.listen", problem: "must be HOST:PORT", fix: "e.g. listen = \"0.0.0.0:7201\"")
            }
            (c.host, c.port) = (host, port)
        }
        if let v = m?["transport"] {
            guard let s = v.string, let t = MemserverTransport(rawValue: s) else {
                throw MemserverConfigError(key: "memserver.transport", problem: "must be \"auto\", \"tcp\" or \"rdma\"",
                                           fix: "e.g. transport = \"auto\"")
            }
            c.transport = t
        }
        if let v = m?["rdma_listen"] {
            guard let s = v.string, let (host, port) = parseListen(s) else {
                throw MemserverConfigError(key: "memserver.rdma_listen", problem: "must be HOST:PORT",
                                           fix: "e.g. rdma_listen = \"10.0.0.5:7202\" (the address of the RDMA device's interface)")
            }
            (c.rdmaHost, c.rdmaPort) = (host, port)
        }
        if let v = m?["capacity"] {
            guard let n = v.int.map(UInt64.init) ?? v.string.flatMap(parseSize) else {
                throw MemserverConfigError(key: "memserver.capacity", problem: "is not a size", fix: "e.g. capacity = \"16GiB\"")
            }
            c.capacityBytes = n
        }
        if let v = m?["lease_size"] {
            guard let n = v.int.map(UInt64.init) ?? v.string.flatMap(parseSize) else {
                throw MemserverConfigError(key: "memserver.lease_size", problem: "is not a size", fix: "e.g. lease_size = \"64MiB\"")
            }
            c.leaseBytes = Int(n)
        }
        if let v = m?["headroom"] {
            guard let n = v.int.flatMap({ $0 >= 0 ? UInt64($0) : nil }) ?? v.string.flatMap(parseSizeAllowingZero) else {
                throw MemserverConfigError(key: "memserver.headroom", problem: "is not a size", fix: "e.g. headroom = \"2GiB\" (0 = off)")
            }
            c.headroomBytes = n
        }
        if let v = m?["admin_socket"] {
            guard let s = v.string, s.isEmpty || s.hasPrefix("/") else {
                throw MemserverConfigError(key: "memserver.admin_socket", problem: "must be an absolute path or empty",
                                           fix: "e.g. admin_socket = \"/run/farpage-memserver/admin.sock\" (\"\" = none)")
            }
            c.adminSocket = s
        }
        if let v = m?["secret_file"] {
            guard let s = v.string, s.hasPrefix("/") else {
                throw MemserverConfigError(key: "memserver.secret_file", problem: "must be an absolute path",
                                           fix: "e.g. secret_file = \"/etc/farpage/cluster.secret\"")
            }
            c.secretFile = s
        }
        if let v = m?["threads"] {
            guard let n = v.int, (0...256).contains(n) else {
                throw MemserverConfigError(key: "memserver.threads", problem: "must be 0...256", fix: "0 = one per CPU")
            }
            c.threads = n
        }
        for (key, path) in [("lease_grace", \MemserverConfig.leaseGraceSeconds), ("handshake_timeout", \MemserverConfig.handshakeTimeoutSeconds)] {
            if let v = m?[key] {
                guard let s = v.string, let d = parseDuration(s) else {
                    throw MemserverConfigError(key: "memserver.\(key)", problem: "must be a duration", fix: "e.g. \(key) = \"30s\"")
                }
                c[keyPath: path] = d
            }
        }
        if let v = table["log"]?.table?["level"] {
            guard let s = v.string, let l = Logger.Level(rawValue: s.lowercased()) else {
                throw MemserverConfigError(key: "log.level", problem: "unknown level", fix: "use one of trace, debug, info, notice, warning, error, critical")
            }
            c.logLevel = l
        }
        try c.validate()
        return c
    }

    public func validate() throws(MemserverConfigError) {
        guard leaseBytes >= 1 << 20, leaseBytes % MemWireConstants.pageSize == 0, leaseBytes <= 1 << 34 else {
            throw MemserverConfigError(key: "memserver.lease_size", problem: "must be a multiple of 4KiB between 1MiB and 16GiB",
                                       fix: "e.g. lease_size = \"64MiB\"")
        }
        guard capacityBytes >= UInt64(leaseBytes) else {
            throw MemserverConfigError(key: "memserver.capacity", problem: "is smaller than one lease (\(leaseBytes) bytes)",
                                       fix: "raise capacity or lower lease_size")
        }
        guard (0...65535).contains(rdmaPort) else {
            throw MemserverConfigError(key: "memserver.rdma_listen", problem: "port out of range", fix: "use 1-65535 (0 = any free port)")
        }
        guard (0...65535).contains(port) else {
            throw MemserverConfigError(key: "memserver.listen", problem: "port out of range", fix: "use 1-65535 (0 = any free port)")
        }
    }
}

enum MemWireConstants { static let pageSize = 4096 }

/// "HOST:PORT" or "[v6]:PORT".
public func parseListen(_ s: String) -> (String, Int)? {
    if s.hasPrefix("["), let close = s.firstIndex(of: "]") {
        let host = String(s[s.index(after: s.startIndex)..<close])
        let rest = s[s.index(after: close)...]
        guard rest.hasPrefix(":"), let port = Int(rest.dropFirst()) else { return nil }
        return (host, port)
    }
    guard let colon = s.lastIndex(of: ":"), let port = Int(s[s.index(after: colon)...]) else { return nil }
    let host = String(s[..<colon])
    return host.isEmpty ? nil : (host, port)
}

