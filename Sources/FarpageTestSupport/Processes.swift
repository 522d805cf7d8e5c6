/// Real processes for tests: `farpaged agent` and `farpaged memserver` on private sockets and
/// loopback ports. Shared by the test targets; not part of any product.
import FarpageKernel
import FarpageProtocol
import FarpageTransport
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A failure in test plumbing (a process that did not start, a reply that was not there).
public struct TestSupportError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}

/// Where the built executables are: $FARPAGE_BIN_DIR, else next to the test bundle.
public func binary(_ name: String) -> String {
    if let dir = ProcessInfo.processInfo.environment["FARPAGE_BIN_DIR"] { return dir + "/" + name }
    let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    return (exe as NSString).deletingLastPathComponent + "/" + name
}

/// A real `farpaged agent` process on a private socket.
public final class AgentProcess: @unchecked Sendable {
    public let directory: String
    public let socket: String
    public let process: Process
    public let log: String

    /// - Parameters:
    ///   - extra: more TOML after the [log] section (whole sections).
    ///   - store: more keys of the [store] section, e.g. `kind = "file"`.
    ///   - launcher: a command line the agent runs under (it must exec its arguments), e.g.
    ///     `unshare -m sh -c '...; exec "$0" "$@"'`.
    public init(config extra: String = "", storeCapacity: String = "2GiB", budget: String = "512MiB",
                regionBudget: String = "8MiB", store: String = "", launcher: [String] = []) throws
    {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("fp-test-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        socket = directory + "/agent.sock"
        log = directory + "/agent.log"
        let config = """
            [agent]
            socket = "\(socket)"
            resident_budget = "\(budget)"
            region_budget = "\(regionBudget)"
            max_region_size = "1TiB"
            evict_batch = 32
            shutdown_grace = "1s"
            [store]
            capacity = "\(storeCapacity)"
            \(store)
            [log]
            level = "info"
            \(extra)
            """
        try config.write(toFile: directory + "/agent.toml", atomically: true, encoding: .utf8)
        process = Process()
        let command = launcher + [binary("farpaged"), "agent", "--config", directory + "/agent.toml"]
        process.executableURL = URL(fileURLWithPath: command[0])
        process.arguments = Array(command.dropFirst())
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        // Never inherit the test runner's stdout: a lingering agent would keep its pipe open.
        process.standardError = FileHandle(forWritingAtPath: log)
        process.standardOutput = FileHandle.nullDevice
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let deadline = Date().addingTimeInterval(20)
        while !FileManager.default.fileExists(atPath: socket) {
            guard Date() < deadline, process.isRunning else {
                throw TestSupportError("agent did not start: \(logText)")
            }
            usleep(20_000)
        }
    }

    public var logText: String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }
    public var pid: Int32 { process.processIdentifier }

    public func stop() {
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
    public func call(_ request: Request) throws -> Reply {
        let s = try SeqPacketSocket.connect(path: socket)
        s.setReceiveTimeout(milliseconds: 10_000)
        try s.send(Wire.encode(request, requestID: 7))
        var text = ""
        while true {
            guard let p = try s.receive(maxBytes: Wire.maxMessage), !p.bytes.isEmpty else {
                throw TestSupportError("no reply")
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

    public func regions() throws -> [RegionReport] { try decode(.regionsJSON) }

    public func status() throws -> AgentStatus { try decode(.statusJSON) }

    /// `farpagectl pool list --json`: one row per memory server and the local spill.
    public func pool() throws -> [PoolServer] { try decode(.poolJSON) }

    private func decode<T: Decodable>(_ request: Request) throws -> T {
        guard case .json(let text, _) = try call(request) else { throw TestSupportError("bad reply") }
        let d = JSONDecoder()
        d.keyDecodingStrategy = .convertFromSnakeCase
        return try d.decode(T.self, from: Data(text.utf8))
    }

    /// Starts `fp-workload --socket <this agent> --json <arguments>`, its output in a pipe.
    public func startWorkload(_ arguments: [String]) throws -> WorkloadProcess {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary("fp-workload"))
        p.arguments = ["--socket", socket, "--json"] + arguments
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        return WorkloadProcess(process: p, output: out)
    }
}

/// A running `fp-workload` (see `AgentProcess.startWorkload`).
public struct WorkloadProcess {
    public let process: Process
    let output: Pipe

    /// Waits for it to exit: its exit status (or signal), how it ended, and all it printed.
    public func finish() -> (status: Int32, reason: Process.TerminationReason, output: String) {
        let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        return (process.terminationStatus, process.terminationReason, text)
    }
}

struct AgentTestError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// A real `farpaged memserver` process on a free loopback port.
public final class MemserverProcess: @unchecked Sendable {
    public let directory: String
    public let secretPath: String
    public let process = Process()
    public let log: String
    public private(set) var port = 0
    /// The admin socket (`farpagectl memserver --socket`).
    public var adminSocket: String { directory + "/admin.sock" }

    public init(capacity: String = "64MiB", leaseSize: String = "4MiB", grace: String = "30s", secret: String? = nil,
                port listenPort: Int = 0, headroom: String = "0", keys extraKeys: String = "") throws
    {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("fp-ms-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        secretPath = directory + "/cluster.secret"
        try (secret ?? "test-cluster-secret-0123456789abcdef").write(toFile: secretPath, atomically: true, encoding: .utf8)
        chmod(secretPath, 0o600)
        log = directory + "/memserver.log"
        try """
            [memserver]
            listen = "127.0.0.1:\(listenPort)"
            capacity = "\(capacity)"
            lease_size = "\(leaseSize)"
            secret_file = "\(secretPath)"
            lease_grace = "\(grace)"
            handshake_timeout = "2s"
            threads = 2
            headroom = "\(headroom)"
            admin_socket = "\(directory)/admin.sock"
            \(extraKeys)
            [log]
            level = "info"
            """.write(toFile: directory + "/memserver.toml", atomically: true, encoding: .utf8)
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        process.executableURL = URL(fileURLWithPath: binary("farpaged"))
        process.arguments = ["memserver", "--config", directory + "/memserver.toml"]
        process.standardError = FileHandle(forWritingAtPath: log)
        process.standardOutput = FileHandle.nullDevice
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let deadline = Date().addingTimeInterval(20)
        while port == 0 {
            guard Date() < deadline, process.isRunning else { throw TestSupportError("memserver did not start: \(logText)") }
            if let r = logText.range(of: "fp.listen=127.0.0.1:") {
                port = Int(logText[r.upperBound...].prefix { $0.isNumber }) ?? 0
            }
            usleep(20_000)
        }
    }

    public var logText: String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }

    /// One request on the admin socket (what `farpagectl memserver` sends).
    public func admin(_ request: MemserverAdmin.Request) throws -> MemserverAdmin.Reply {
        try admin(raw: Array(JSONEncoder().encode(request)))
    }

    /// Raw bytes on the admin socket, for malformed-input tests.
    public func admin(raw: [UInt8]) throws -> MemserverAdmin.Reply {
        let socket = try SeqPacketSocket.connect(path: adminSocket)
        socket.setReceiveTimeout(milliseconds: 5000)
        try socket.send(raw)
        guard let packet = try socket.receive(maxBytes: MemserverAdmin.maxReply, maxDescriptors: 0), !packet.bytes.isEmpty else {
            throw TestSupportError("the admin socket closed without a reply")
        }
        return try JSONDecoder().decode(MemserverAdmin.Reply.self, from: Data(packet.bytes))
    }

    /// The server's status from its admin socket.
    public func adminStatus() throws -> MemserverAdmin.Status {
        guard let status = try admin(.init(op: .status)).status else { throw TestSupportError("no status") }
        return status
    }

    public var residentKiB: Int {
        let status = (try? String(contentsOfFile: "/proc/\(process.processIdentifier)/status", encoding: .utf8)) ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
        return Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0
    }

    public func client(agentID: [UInt8] = ClusterSecret.randomBytes(16), secret: String = "test-cluster-secret-0123456789abcdef")
        throws -> MemserverClient
    {
        try MemserverClient(host: "127.0.0.1", port: port, agentID: agentID, name: "test-agent",
                            secret: try ClusterSecret(Array(secret.utf8)), ioTimeoutMilliseconds: 5000)
    }

    public func stop() {
        if process.isRunning {
            process.terminate()
            process.waitUntilExit()
        }
    }

    deinit {
        stop()
        try? FileManager.default.removeItem(atPath: directory)
    }
}


/// A seeded SplitMix64 generator: fuzzers and workloads that must replay exactly.
public struct SplitMix: Sendable {
    public var state: UInt64
    public init(state: UInt64) { self.state = state }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// `count` pages of seeded random data, page-aligned; the caller deallocates it.
public func randomPages(_ count: Int, seed: UInt64) -> UnsafeMutableRawPointer {
    let p = UnsafeMutableRawPointer.allocate(byteCount: count * 4096, alignment: 4096)
    var rng = SplitMix(state: seed)
    for w in 0..<(count * 512) { p.storeBytes(of: rng.next(), toByteOffset: w * 8, as: UInt64.self) }
    return p
}

/// SIGSTOP, then waits (up to 2 s) until every thread of the process is stopped: `kill`
/// returns before the stop takes effect, and a thread running on another CPU may still
/// answer a request sent right after it.
public func stopProcess(_ pid: pid_t) {
    kill(pid, SIGSTOP)
    let deadline = monotonicNanoseconds() + 2_000_000_000
    while monotonicNanoseconds() < deadline {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        let allStopped = !tasks.isEmpty && tasks.allSatisfy { tid in
            guard let stat = try? String(contentsOfFile: "/proc/\(pid)/task/\(tid)/stat", encoding: .utf8),
                let close = stat.lastIndex(of: ")")
            else { return true }  // the thread is gone
            let state = stat[stat.index(close, offsetBy: 2)]
            return state == "T" || state == "t"
        }
        if allStopped { return }
        usleep(1000)
    }
}

/// What a program printed, and how it ended.
public struct ProgramRun: Sendable {
    public let status: Int32
    public let stdout: String
    /// Empty when `mergeOutput` sent stderr to `stdout`.
    public let stderr: String
}

/// Runs a program to completion: `environment` replaces the test's (nil: inherit), `stdin`
/// is written to it, and both pipes are read while it runs (a full pipe would block it).
public func runProgram(_ executable: String, _ arguments: [String], environment: [String: String]? = nil,
                       stdin: String? = nil, mergeOutput: Bool = false) throws -> ProgramRun
{
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = arguments
    if let environment { p.environment = environment }
    let out = Pipe()
    let err = mergeOutput ? out : Pipe()
    p.standardOutput = out
    p.standardError = err
    let input = stdin.map { _ in Pipe() }
    p.standardInput = input ?? FileHandle.nullDevice
    try p.run()
    if let input, let stdin {
        input.fileHandleForWriting.write(Data(stdin.utf8))
        try input.fileHandleForWriting.close()
    }
    let group = DispatchGroup()
    nonisolated(unsafe) var errData = Data()
    if !mergeOutput {
        group.enter()
        DispatchQueue.global().async {
            errData = err.fileHandleForReading.readDataToEndOfFile()
            group.leave()
        }
    }
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    group.wait()
    p.waitUntilExit()
    return ProgramRun(status: p.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                      stderr: String(decoding: errData, as: UTF8.self))
}
