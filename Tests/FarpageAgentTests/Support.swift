import CFarpageClient
import CFarpageKernel
import FarpageKernel
import FarpageProtocol
import Foundation
import Synchronization
import FarpageTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

nonisolated(unsafe) var sharedAgentPID: Int32 = 0

/// The agent this test process's own regions (through libfarpage's single connection) talk to.
enum SharedAgent {
    static let instance: AgentProcess = {
        // No minimum residence time: the correctness tests want every resident page to be an
        // eviction candidate at once (the most churn, the most races). Classification stays on.
        let agent = try! AgentProcess(config: "[tiering]\nmin_residence = \"0s\"")
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
        guard let p else { throw TestSupportError("farpage_alloc failed: \(String(cString: farpage_last_error()))") }
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
