import ArgumentParser
import FarpageKernel
import FarpageProtocol
import Foundation

@main
struct FarpageCtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "farpagectl",
        abstract: "Inspect and steer a farpaged agent or memory server.",
        subcommands: [Status.self, Regions.self, Pool.self, MemserverCmd.self])
}

struct Connection: ParsableArguments {
    @Option(name: .long, help: "Agent control socket (default: $FARPAGE_SOCKET or /run/farpage/agent.sock).")
    var socket: String?

    @Flag(name: .long, help: "Print JSON instead of a table.")
    var json = false

    var path: String { socket ?? ProcessInfo.processInfo.environment["FARPAGE_SOCKET"] ?? "/run/farpage/agent.sock" }

    /// Sends one request and collects a (possibly multi-packet) JSON reply.
    func fetchJSON(_ request: Request) throws -> Data {
        let socket: SeqPacketSocket
        do { socket = try SeqPacketSocket.connect(path: path) } catch {
            FileHandle.standardError.write(
                Data("farpagectl: cannot reach the agent at \(path): \(error). Is farpaged running? (systemctl status farpaged-agent)\n".utf8))
            throw ExitCode(69)  // EX_UNAVAILABLE
        }
        socket.setReceiveTimeout(milliseconds: 10_000)
        try socket.send(Wire.encode(request, requestID: 1))
        var text = ""
        while true {
            guard let packet = try socket.receive(maxBytes: Wire.maxMessage), !packet.bytes.isEmpty else {
                throw ValidationError("the agent closed the connection")
            }
            switch try Wire.decodeReply(packet.bytes).1 {
            case .json(let chunk, let more):
                text += chunk
                if !more { return Data(text.utf8) }
            case .error(_, _, let message): throw ValidationError("the agent refused: \(message)")
            default: throw ValidationError("unexpected reply from the agent")
            }
        }
    }

    /// Sends one request that expects OK.
    func command(_ request: Request) throws {
        let socket: SeqPacketSocket
        do { socket = try SeqPacketSocket.connect(path: path) } catch {
            FileHandle.standardError.write(Data("farpagectl: cannot reach the agent at \(path): \(error)\n".utf8))
            throw ExitCode(69)
        }
        socket.setReceiveTimeout(milliseconds: 30_000)
        try socket.send(Wire.encode(request, requestID: 1))
        guard let packet = try socket.receive(maxBytes: Wire.maxMessage), !packet.bytes.isEmpty else {
            throw ValidationError("the agent closed the connection")
        }
        switch try Wire.decodeReply(packet.bytes).1 {
        case .ok: return
        case .error(_, _, let message):
            FileHandle.standardError.write(Data("farpagectl: \(message)\n".utf8))
            throw ExitCode(1)
        default: throw ValidationError("unexpected reply from the agent")
        }
    }
}

struct Pool: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The agent's memory servers.", subcommands: [PoolList.self, PoolAttach.self, PoolDetach.self],
        defaultSubcommand: PoolList.self)
}

struct PoolList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "Capacity, use, leases and health per server.")
    @OptionGroup var connection: Connection

    func run() throws {
        let data = try connection.fetchJSON(.poolJSON)
        if connection.json {
            print(String(decoding: data, as: UTF8.self))
            return
        }
        let servers = try decode([PoolServer].self, data)
        let widths = [24, 9, 19, 11, 11, 7, 11, 7]
        func row(_ cells: [String]) {
            print(zip(cells, widths).enumerated().map { i, cw in column(cw.0, cw.1, right: i >= 3) }.joined(separator: " "))
        }
        row(["SERVER", "STATUS", "TRANSPORT", "CAPACITY", "LEASED", "LEASES", "STORED", "ERRORS"])
        for s in servers {
            // A spill file's name is its path: on a line of its own when it does not fit the column.
            let long = s.address.count > widths[0]
            if long { print(s.address) }
            row([long ? "" : s.address, s.status, s.transport, bytes(s.capacityBytes), bytes(UInt64(s.leases) * s.leaseBytes),
                 "\(s.leases)", bytes(UInt64(s.storedPages) * 4096), "\(s.errors)"])
            if let io = s.spillFile {
                print("    \(io.reads) reads (\(bytes(io.readBytes))), \(io.writes) writes (\(bytes(io.writtenBytes))) in \(io.submissions) io_uring submissions\(io.polled.map { $0 > 0 ? ", \($0) reads polled" : "" } ?? ""); \(io.checksumFailures) checksum failures")
            }
            if !s.lastError.isEmpty && (s.status != "healthy" || s.spillFile != nil) { print("    last error: \(s.lastError)") }
            if let r = s.reclaimingLeases, r > 0 { print("    the server asked \(r) lease(s) back; moving their pages elsewhere") }
        }
    }
}

struct PoolAttach: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "attach", abstract: "Add a memory server to the pool.")
    @OptionGroup var connection: Connection
    @Argument(help: "The server, HOST:PORT.") var address: String

    func run() throws {
        try connection.command(.poolAttach(address: address))
        print("attached \(address)")
    }
}

struct PoolDetach: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "detach", abstract: "Drain a memory server (move its pages elsewhere), then release its leases.")
    @OptionGroup var connection: Connection
    @Argument(help: "The server, HOST:PORT.") var address: String
    @Flag(help: "Wait until the drain has finished.") var wait = false
    @Flag(help: "Drop the server without draining it (when it is dead): pages only it held are lost, and clients get SIGBUS when they touch them.")
    var force = false

    func run() throws {
        if force {
            try connection.command(.poolRemove(address: address))
            print("removed \(address) without draining")
            return
        }
        try connection.command(.poolDetach(address: address))
        guard wait else {
            print("draining \(address); `farpagectl pool list` shows when it is detached")
            return
        }
        while true {
            let servers = try decode([PoolServer].self, try connection.fetchJSON(.poolJSON))
            guard let s = servers.first(where: { $0.address == address }) else { break }
            if s.status == "detached" { break }
            if s.status == "failed" {
                FileHandle.standardError.write(Data("farpagectl: draining \(address) failed: \(s.lastError)\n".utf8))
                throw ExitCode(1)
            }
            Thread.sleep(forTimeInterval: 0.2)
        }
        print("detached \(address)")
    }
}

func decode<T: Decodable>(_ type: T.Type, _ data: Data) throws -> T {
    let d = JSONDecoder()
    d.keyDecodingStrategy = .convertFromSnakeCase
    return try d.decode(type, from: data)
}

/// Pads to a column width (left-aligned, or right-aligned for numbers).
func column(_ s: String, _ width: Int, right: Bool = false) -> String {
    let pad = String(repeating: " ", count: max(0, width - s.count))
    return right ? pad + s : s + pad
}

func bytes(_ n: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var v = Double(n)
    var i = 0
    while v >= 1024, i < units.count - 1 {
        v /= 1024
        i += 1
    }
    return i == 0 ? "\(n) B" : String(format: "%.1f %@", v, units[i])
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Agent health, budget, far tier and totals.")
    @OptionGroup var connection: Connection

    func run() throws {
        let data = try connection.fetchJSON(.statusJSON)
        if connection.json {
            print(String(decoding: data, as: UTF8.self))
            return
        }
        let s = try decode(AgentStatus.self, data)
        let page = UInt64(s.pageSize)
        print("farpaged \(s.version)  pid \(s.pid)  up \(String(format: "%.0f", s.uptimeSeconds))s\(s.shuttingDown ? "  (shutting down)" : "")")
        print("socket          \(s.socket)")
        print("userfaultfd     \(s.uffdAccess)")
        if let signal = s.lostPageSignal { print("lost pages      \(signal)") }
        print("resident        \(bytes(UInt64(s.residentPages) * page)) of \(bytes(UInt64(s.budgetPages) * page)) budget (evict at \(bytes(UInt64(s.highWatermarkPages) * page)), down to \(bytes(UInt64(s.lowWatermarkPages) * page)))")
        print("far tier        \(s.store.kind): \(bytes(s.store.usedPages * page)) used of \(bytes(s.store.capacityPages * page))")
        print("regions         \(s.regions) from \(s.clients) client connection(s); bookkeeping \(bytes(UInt64(s.bookkeepingBytes)))")
        print("fault threads   \(s.faultThreads)")
        print("since start:")
        for key in s.totals.keys.sorted() { print("  " + column(key, 22) + column("\(s.totals[key]!)", 12, right: true)) }
    }
}

struct Regions: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "One line per registered region.")
    @OptionGroup var connection: Connection

    func run() throws {
        let data = try connection.fetchJSON(.regionsJSON)
        if connection.json {
            print(String(decoding: data, as: UTF8.self))
            return
        }
        let regions = try decode([RegionReport].self, data)
        if regions.isEmpty {
            print("no regions")
            return
        }
        let page = UInt64(systemPageSize)
        let widths = [6, 16, 8, 6, 11, 11, 11, 11, 10, 10]
        func row(_ cells: [String]) {
            print(zip(cells, widths).enumerated().map { i, cw in column(cw.0, cw.1, right: i >= 4) }.joined(separator: " "))
        }
        row(["ID", "NAME", "PID", "UID", "SIZE", "BUDGET", "RESIDENT", "FAR", "FAULTS", "EVICTIONS"])
        for r in regions {
            row([
                "\(r.id)", r.name, "\(r.pid)", "\(r.uid)", bytes(r.sizeBytes), bytes(UInt64(r.budgetPages) * page),
                bytes(r.residentPages * page), bytes(r.farPages * page), "\(r.counters["missing_faults"] ?? 0)",
                "\(r.counters["evictions"] ?? 0)",
            ])
        }
    }
}

// MARK: - Memory server administration

struct MemserverCmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "memserver",
        abstract: "Administer a memory server on this host: its lending limit and free-memory headroom.",
        subcommands: [MemserverStatus.self, MemserverReclaim.self, MemserverLimit.self, MemserverHeadroom.self],
        defaultSubcommand: MemserverStatus.self)
}

struct AdminConnection: ParsableArguments {
    @Option(name: .long, help: "The memory server's admin socket (default: /run/farpage-memserver/admin.sock).")
    var socket = "/run/farpage-memserver/admin.sock"

    @Flag(name: .long, help: "Print JSON instead of a table.")
    var json = false

    func send(_ request: MemserverAdmin.Request) throws -> MemserverAdmin.Status {
        let s: SeqPacketSocket
        do { s = try SeqPacketSocket.connect(path: socket) } catch {
            FileHandle.standardError.write(
                Data("farpagectl: cannot reach the memory server at \(socket): \(error). Is it running (systemctl status farpaged-memserver), with admin_socket set?\n".utf8))
            throw ExitCode(69)
        }
        s.setReceiveTimeout(milliseconds: 10_000)
        // A server that refuses us (permission, too many connections) replies and closes before
        // reading: the send then fails, and its reason is still waiting to be read.
        let sendError: (any Error)?
        do {
            try s.send(Array(try JSONEncoder().encode(request)))
            sendError = nil
        } catch { sendError = error }
        guard let packet = try? s.receive(maxBytes: MemserverAdmin.maxReply, maxDescriptors: 0), !packet.bytes.isEmpty else {
            if let sendError { throw sendError }
            throw ValidationError("the memory server closed the connection")
        }
        let reply = try JSONDecoder().decode(MemserverAdmin.Reply.self, from: Data(packet.bytes))
        guard reply.ok, let status = reply.status else {
            FileHandle.standardError.write(Data("farpagectl: the memory server refused: \(reply.error ?? "no reason given")\n".utf8))
            throw ExitCode(1)
        }
        return status
    }

    func show(_ s: MemserverAdmin.Status) throws {
        if json {
            let e = JSONEncoder()
            e.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try e.encode(s), as: UTF8.self))
            return
        }
        print("listen          \(s.listen)")
        print("capacity        \(bytes(s.capacityBytes)) in leases of \(bytes(s.leaseBytes))")
        var limit = "lending limit   \(bytes(s.limitBytes))"
        if let o = s.operatorLimitBytes { limit += "  (operator limit \(bytes(o)))" }
        if s.pressureLimitBytes < s.capacityBytes { limit += "  (memory pressure: \(bytes(s.pressureLimitBytes)))" }
        print(limit)
        print("lent            \(bytes(s.lentBytes)) in \(s.leases) lease(s); \(s.reclaimingLeases) asked back")
        let avail = s.memAvailableBytes.map(bytes) ?? "unknown"
        print("headroom        \(s.headroomBytes == 0 ? "off" : bytes(s.headroomBytes))  (MemAvailable \(avail))")
        guard !s.agents.isEmpty else { return }
        let widths = [18, 24, 10, 8, 11, 9]
        func row(_ cells: [String]) {
            print(zip(cells, widths).enumerated().map { i, cw in column(cw.0, cw.1, right: i >= 3) }.joined(separator: " "))
        }
        row(["AGENT", "NAME", "STATE", "LEASES", "ASKED BACK", "WAITING"])
        for a in s.agents {
            row([a.id, a.name, a.connected ? "connected" : "away", "\(a.leases)", "\(a.reclaiming)",
                 a.reclaiming > 0 ? String(format: "%.0fs", a.oldestReclaimSeconds) : "-"])
        }
    }
}

func parseSizeArgument(_ text: String, _ what: String) throws -> UInt64 {
    guard let n = parseSizeAllowingZero(text) else { throw ValidationError("\(what): '\(text)' is not a size (e.g. 4GiB, 512MiB)") }
    return n
}

struct MemserverStatus: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "status", abstract: "Capacity, limits, lent memory and agents.")
    @OptionGroup var admin: AdminConnection
    func run() throws { try admin.show(try admin.send(.init(op: .status))) }
}

struct MemserverReclaim: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reclaim",
        abstract: "Ask agents to give SIZE of lent memory back. They move their pages elsewhere first; the server waits for them.")
    @OptionGroup var admin: AdminConnection
    @Argument(help: "How much, e.g. 4GiB (rounded up to whole leases).") var size: String
    @Flag(help: "Wait until the leases asked back have been returned.") var wait = false
    @Option(help: "With --wait: give up after this many seconds (exit 1).") var timeout: Double = 600

    func run() throws {
        var s = try admin.send(.init(op: .reclaim, bytes: try parseSizeArgument(size, "SIZE")))
        if wait {
            let deadline = Date().addingTimeInterval(timeout)
            while s.reclaimingLeases > 0 {
                guard Date() < deadline else {
                    FileHandle.standardError.write(Data("farpagectl: \(s.reclaimingLeases) lease(s) still not returned after \(Int(timeout))s; see `farpagectl memserver status` and the agents' logs\n".utf8))
                    throw ExitCode(1)
                }
                Thread.sleep(forTimeInterval: 0.5)
                s = try admin.send(.init(op: .status))
            }
        }
        try admin.show(s)
    }
}

struct MemserverLimit: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "limit", abstract: "Set the most this server lends (leases beyond it are asked back), or `none` to lift it.")
    @OptionGroup var admin: AdminConnection
    @Argument(help: "A size, e.g. 8GiB, or `none`.") var size: String
    func run() throws {
        let bytes = size.lowercased() == "none" ? nil : try parseSizeArgument(size, "SIZE")
        try admin.show(try admin.send(.init(op: .limit, bytes: bytes)))
    }
}

struct MemserverHeadroom: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "headroom",
        abstract: "Set the free memory (MemAvailable) this host keeps for itself until restart; `0` turns it off, `config` restores the configured value.")
    @OptionGroup var admin: AdminConnection
    @Argument(help: "A size, e.g. 2GiB, 0, or `config`.") var size: String
    func run() throws {
        let bytes = size.lowercased() == "config" ? nil : try parseSizeArgument(size, "SIZE")
        try admin.show(try admin.send(.init(op: .headroom, bytes: bytes)))
    }
}
