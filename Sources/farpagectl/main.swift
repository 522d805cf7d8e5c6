import ArgumentParser
import FarpageKernel
import FarpageProtocol
import Foundation

@main
struct FarpageCtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "farpagectl",
        abstract: "Inspect a running farpaged agent.",
        subcommands: [Status.self, Regions.self])
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
