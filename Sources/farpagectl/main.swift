import ArgumentParser
import FarpageKernel
import FarpageProtocol
import Foundation

@main
struct FarpageCtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "farpagectl",
        abstract: "Inspect a running farpaged agent.",
        subcommands: [Status.self, Regions.self, Pool.self])
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
        let widths = [24, 9, 9, 11, 11, 7, 11, 7]
        func row(_ cells: [String]) {
            print(zip(cells, widths).enumerated().map { i, cw in column(cw.0, cw.1, right: i >= 3) }.joined(separator: " "))
        }
        row(["SERVER", "STATUS", "TRANSPORT", "CAPACITY", "LEASED", "LEASES", "STORED", "ERRORS"])
        for s in servers {
            row([s.address, s.status, s.transport, bytes(s.capacityBytes), bytes(UInt64(s.leases) * s.leaseBytes),
                 "\(s.leases)", bytes(UInt64(s.storedPages) * 4096), "\(s.errors)"])
            if !s.lastError.isEmpty && s.status != "healthy" { print("    last error: \(s.lastError)") }
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
