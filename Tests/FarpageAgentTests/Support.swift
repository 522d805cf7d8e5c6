import CFarpageClient
import CFarpageKernel
import FarpageKernel
import FarpageProtocol
import Foundation
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Where the built executables are: $FARPAGE_BIN_DIR, else next to the test bundle.
func binary(_ name: String) -> String {
    if let dir = ProcessInfo.processInfo.environment["FARPAGE_BIN_DIR"] { return dir + "/" + name }
    let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    return (exe as NSString).deletingLastPathComponent + "/" + name
}

/// A real `farpaged agent` process on a private socket.
final class AgentProcess: @unchecked Sendable {
    let directory: String
    let socket: String
    let process: Process
    let log: String

    init(config extra: String = "") throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("fp-test-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        socket = directory + "/agent.sock"
        log = directory + "/agent.log"
        let config = """
            [agent]
            socket = "\(socket)"
            resident_budget = "512MiB"
            region_budget = "8MiB"
            max_region_size = "1TiB"
            evict_batch = 32
            shutdown_grace = "1s"
            [store]
            capacity = "2GiB"
            [log]
            level = "info"
            \(extra)
            """
        try config.write(toFile: directory + "/agent.toml", atomically: true, encoding: .utf8)
        process = Process()
        process.executableURL = URL(fileURLWithPath: binary("farpaged"))
        process.arguments = ["agent", "--config", directory + "/agent.toml"]
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        // Never inherit the test runner's stdout: a lingering agent would keep its pipe open.
        process.standardError = FileHandle(forWritingAtPath: log)
        process.standardOutput = FileHandle.nullDevice
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let deadline = Date().addingTimeInterval(20)
        while !FileManager.default.fileExists(atPath: socket) {
            guard Date() < deadline, process.isRunning else {
                throw AgentTestError("agent did not start: \(logText)")
            }
            usleep(20_000)
        }
    }

    var logText: String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }
    var pid: Int32 { process.processIdentifier }

    func stop() {
        if process.isRunning {
            process.terminate()
            process.waitUntilExit()
        }
    }

    deinit {
        stop()
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// One request on a fresh connection; returns the decoded reply.
    func call(_ request: Request) throws -> Reply {
        let s = try SeqPacketSocket.connect(path: socket)
        s.setReceiveTimeout(milliseconds: 10_000)
        try s.send(Wire.encode(request, requestID: 7))
        var text = ""
        while true {
            guard let p = try s.receive(maxBytes: Wire.maxMessage), !p.bytes.isEmpty else {
                throw AgentTestError("no reply")
            }
            let reply = try Wire.decodeReply(p.bytes).1
            if case .json(let chunk, let more) = reply {
                text += chunk
                if more { continue }
                return .json(text: text, more: false)
            }
            return reply
        }
    }

    func regions() throws -> [RegionReport] {
        guard case .json(let text, _) = try call(.regionsJSON) else { throw AgentTestError("bad reply") }
        let d = JSONDecoder()
        d.keyDecodingStrategy = .convertFromSnakeCase
        return try d.decode([RegionReport].self, from: Data(text.utf8))
    }

    func status() throws -> AgentStatus {
        guard case .json(let text, _) = try call(.statusJSON) else { throw AgentTestError("bad reply") }
        let d = JSONDecoder()
        d.keyDecodingStrategy = .convertFromSnakeCase
        return try d.decode(AgentStatus.self, from: Data(text.utf8))
    }
}

struct AgentTestError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

nonisolated(unsafe) var sharedAgentPID: Int32 = 0

/// The agent this test process's own regions (through libfarpage's single connection) talk to.
enum SharedAgent {
    static let instance: AgentProcess = {
        let agent = try! AgentProcess()
        setenv("FARPAGE_SOCKET", agent.socket, 1)
        sharedAgentPID = agent.pid
        atexit {
            if sharedAgentPID > 0 { kill(sharedAgentPID, SIGTERM) }
        }
        return agent
    }()
}

/// A region allocated through the C client library.
final class ClientRegion: @unchecked Sendable {
    let base: UnsafeMutableRawPointer
    let size: Int
    let pageSize = systemPageSize
    var pages: Int { size / pageSize }

    init(size: Int, budget: Int, name: String = "test") throws {
        _ = SharedAgent.instance
        var options = farpage_options()
        options.struct_size = MemoryLayout<farpage_options>.size
        options.resident_budget = UInt64(budget)
        let p: UnsafeMutableRawPointer? = name.withCString { n in
            options.name = n
            return farpage_alloc_ex(size, &options)
        }
        guard let p else { throw AgentTestError("farpage_alloc failed: \(String(cString: farpage_last_error()))") }
        base = p
        self.size = size
    }

    func page(_ i: Int) -> UnsafeMutablePointer<UInt64> { (base + i * pageSize).assumingMemoryBound(to: UInt64.self) }

    func stats() -> farpage_stats {
        var s = farpage_stats()
        #expect(farpage_stats(base, &s) == 0)
        return s
    }

    func free() { #expect(farpage_free(base) == 0) }
}

/// Runs `body` on `n` real threads and waits for all of them.
func onThreads(_ n: Int, _ body: @escaping @Sendable (Int) -> Void) {
    let group = DispatchGroup()
    for t in 0..<n {
        group.enter()
        Thread.detachNewThread {
            body(t)
            group.leave()
        }
    }
    group.wait()
}

/// A thread-safe tally of failures.
final class Tally: Sendable {
    let count = Atomic<Int>(0)
    func add(_ n: Int = 1) { count.wrappingAdd(n, ordering: .relaxed) }
    var value: Int { count.load(ordering: .relaxed) }
}

struct SplitMix {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
