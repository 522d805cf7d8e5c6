import FarpageProtocol
import FarpageTestSupport
import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The LD_PRELOAD shim (libfarpage.so) under real, unmodified programs, each compared with the
/// same run without the shim: the C exercise program (every interposed function, fork with and
/// without exec), NumPy, GNU sort, Python multiprocessing with fork, and no agent at all.
@Suite("LD_PRELOAD shim", .serialized)
struct ShimTests {
    /// libfarpage.so and the exercise program, built by `make lib`.
    static var library: String {
        ProcessInfo.processInfo.environment["FARPAGE_LIB"]
            ?? FileManager.default.currentDirectoryPath + "/.build/release/libfarpage.so"
    }
    static var exercise: String { (library as NSString).deletingLastPathComponent + "/fp-shim-exercise" }
    static var scripts: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Shim").path
    }

    /// Runs a program to completion; `preload` adds LD_PRELOAD of the shim and its socket.
    static func run(_ executable: String, _ arguments: [String], preload agent: AgentProcess?, env extra: [String: String] = [:],
                    stdin: String? = nil) throws -> ProgramRun
    {
        var env = ProcessInfo.processInfo.environment
        env["OPENBLAS_NUM_THREADS"] = "1"  // the same matrix product, summed in the same order, each run
        env["OMP_NUM_THREADS"] = "1"
        env["LC_ALL"] = "C"
        if let agent {
            env["LD_PRELOAD"] = library
            env["FARPAGE_SOCKET"] = agent.socket
        }
        for (k, v) in extra { env[k] = v }
        return try runProgram(executable, arguments, environment: env, stdin: stdin)
    }

    /// A python3 that has NumPy (Debian's python3-numpy, which `make deps` installs), or nil.
    static let python: String? = {
        for candidate in ["/usr/bin/python3", "/usr/local/bin/python3"] where FileManager.default.isExecutableFile(atPath: candidate) {
            if let r = try? run(candidate, ["-c", "import numpy"], preload: nil), r.status == 0 { return candidate }
        }
        return nil
    }()

    /// Waits until the agent holds no region and no page (programs have exited).
    static func expectEmpty(_ agent: AgentProcess, sourceLocation: SourceLocation = #_sourceLocation) throws {
        var status = try agent.status()
        let deadline = Date().addingTimeInterval(10)
        while (status.regions != 0 || status.residentPages != 0 || status.store.usedPages != 0) && Date() < deadline {
            usleep(50_000)
            status = try agent.status()
        }
        #expect(status.regions == 0, "regions left: \(status.regions)", sourceLocation: sourceLocation)
        #expect(status.residentPages == 0, "resident pages left: \(status.residentPages)", sourceLocation: sourceLocation)
        #expect(status.store.usedPages == 0, "far slots left: \(status.store.usedPages)", sourceLocation: sourceLocation)
    }

    /// Test 3: every interposed function, realloc across the threshold both ways, partial munmap,
    /// mremap growth, madvise, fork with and without exec, threads — the same results with and
    /// without the shim, and under it the large blocks really are far and really are evicted.
    @Test func theExerciseProgramMatchesItsPlainRunWithEveryFunctionInterposed() throws {
        let agent = try AgentProcess(budget: "64MiB", regionBudget: "2MiB")
        let args = ["--size", "\(8 << 20)", "--threads", "4", "--fork-exec-rounds", "10", "--stress-seconds", "4"]
        let plain = try Self.run(Self.exercise, args, preload: nil)
        #expect(plain.status == 0, "plain run failed: \(plain.stdout) \(plain.stderr)")
        let shim = try Self.run(Self.exercise, args, preload: agent, env: ["FARPAGE_EXPECT_FAR": "1"])
        #expect(shim.status == 0, "run under the shim failed: \(shim.stdout) \(shim.stderr)\n\(agent.logText.suffix(3000))")
        #expect(shim.stdout.contains("ok: "), "\(shim.stdout)")
        #expect(!shim.stderr.contains("warning"), "unexpected warning: \(shim.stderr)")
        let totals = try agent.status().totals
        #expect((totals["evictions"] ?? 0) > 0, "nothing was evicted: the budget never bit")
        #expect((totals["fetches"] ?? 0) > 0, "nothing came back from the far tier")
        #expect(agent.logText.contains("forked child's view registered"), "no child ever saw far memory")
        // A page already in a memfd means something installed where it should not have (once:
        // a freed region's late install landing in a new region at the same address).
        #expect(!agent.logText.contains("already present"), "\(agent.logText.components(separatedBy: "\n").filter { $0.contains("already present") }.prefix(3))")
        try Self.expectEmpty(agent)
    }

    /// Test 1: NumPy over arrays 4x the resident budget (sort, cumulative sums, matrix products)
    /// gives byte-identical results.
    @Test func numpyOverArraysFourTimesTheBudgetGivesIdenticalResults() throws {
        guard let python = Self.python else {
            print("SKIP numpy: no python3 with NumPy (apt-get install python3-numpy)")
            return
        }
        let agent = try AgentProcess(budget: "16MiB", regionBudget: "16MiB")
        let args = [Self.scripts + "/numpy_workload.py", "--mib", "64"]
        let plain = try Self.run(python, args, preload: nil)
        try #require(plain.status == 0, "plain NumPy run failed: \(plain.stderr)")
        let shim = try Self.run(python, args, preload: agent)
        #expect(shim.status == 0, "NumPy under the shim failed: \(shim.stderr)")
        #expect(shim.stdout == plain.stdout, "results differ:\n\(plain.stdout)\nvs\n\(shim.stdout)")
        #expect(plain.stdout.contains("matmul"))
        let totals = try agent.status().totals
        #expect((totals["evictions"] ?? 0) > 1000, "the arrays never left the budget: \(totals)")
        #expect((totals["fetches"] ?? 0) > 0)
        try Self.expectEmpty(agent)
    }

    /// Test 2: GNU sort with a large in-memory buffer over a file larger than the budget.
    @Test func gnuSortWithABufferLargerThanTheBudgetGivesIdenticalOutput() throws {
        let agent = try AgentProcess(budget: "2MiB", regionBudget: "2MiB")
        var rng = SplitMix(state: 2024)
        var text = ""
        text.reserveCapacity(4 << 20)
        for i in 0..<150_000 { text += String(rng.next(), radix: 16) + " \(i)\n" }
        let input = agent.directory + "/input.txt"
        try text.write(toFile: input, atomically: true, encoding: .utf8)
        let args = ["-S", "24M", "--parallel=1", input]
        let plain = try Self.run("/usr/bin/sort", args, preload: nil)
        try #require(plain.status == 0, "\(plain.stderr)")
        let shim = try Self.run("/usr/bin/sort", args, preload: agent)
        #expect(shim.status == 0, "sort under the shim failed: \(shim.stderr)")
        #expect(shim.stdout == plain.stdout, "sort output differs")
        #expect(plain.stdout.utf8.count == text.utf8.count)
        let totals = try agent.status().totals
        #expect((totals["evictions"] ?? 0) > 0, "sort's buffer never left the budget: \(totals)")
        try Self.expectEmpty(agent)
    }

    /// Python multiprocessing with the fork start method: forked workers (no exec) read a far
    /// NumPy array and write their own copies; the parent's array does not change.
    @Test func pythonForkWorkersReadFarArraysAndWriteTheirOwnCopies() throws {
        guard let python = Self.python else {
            print("SKIP multiprocessing: no python3 with NumPy (apt-get install python3-numpy)")
            return
        }
        let agent = try AgentProcess(budget: "16MiB", regionBudget: "16MiB")
        let r = try Self.run("/usr/bin/timeout", ["120", python, Self.scripts + "/fork_workers.py", "48"], preload: agent)
        #expect(r.status == 0 && r.stdout.contains("ok"), "\(r.stdout) \(r.stderr)\n\(agent.logText.suffix(2000))")
        #expect(agent.logText.contains("forked child's view registered"))
        #expect((try agent.status().totals["evictions"] ?? 0) > 0)
        try Self.expectEmpty(agent)
    }

    /// Test 4: no agent: the program runs on ordinary memory with one warning; in strict mode
    /// its large allocations fail instead.
    @Test func withNoAgentProgramsRunOnOrdinaryMemoryWithOneWarning() throws {
        let missing = FileManager.default.temporaryDirectory.path + "/farpage-no-agent-\(getpid()).sock"
        let env = ["LD_PRELOAD": Self.library, "FARPAGE_SOCKET": missing]
        let r = try Self.run(Self.exercise, ["--size", "\(4 << 20)", "--fork-exec-rounds", "2"], preload: nil, env: env)
        #expect(r.status == 0, "\(r.stdout) \(r.stderr)")
        let warnings = r.stderr.split(separator: "\n").filter { $0.contains("farpage: warning") }
        #expect(warnings.count == 1, "expected one warning, got: \(r.stderr)")
        #expect(warnings.first?.contains("cannot reach the farpaged agent at \(missing)") == true)
        #expect(warnings.first?.contains("Continuing with ordinary memory") == true)

        var strict = env
        strict["FARPAGE_STRICT"] = "1"
        let s = try Self.run(Self.exercise, ["--size", "\(4 << 20)", "--expect-refusal"], preload: nil, env: strict)
        #expect(s.status == 0, "\(s.stdout) \(s.stderr)")
        #expect(s.stderr.contains("FARPAGE_STRICT"), "\(s.stderr)")

        // A bad threshold is reported, not obeyed.
        var bad = env
        bad["FARPAGE_THRESHOLD"] = "lots"
        let b = try Self.run(Self.exercise, ["--size", "\(4 << 20)", "--fork-exec-rounds", "1"], preload: nil, env: bad)
        #expect(b.status == 0)
        #expect(b.stderr.contains("FARPAGE_THRESHOLD=lots is not a size"), "\(b.stderr)")

        if let python = Self.python {
            let p = try Self.run(python, [Self.scripts + "/numpy_workload.py", "--mib", "16"], preload: nil, env: env)
            #expect(p.status == 0, "\(p.stderr)")
            #expect(p.stderr.components(separatedBy: "farpage: warning").count == 2, "\(p.stderr)")
        }
    }

    /// A program that never allocates past the threshold never talks to the agent; with the
    /// threshold below its buffer, the same program does (so the shim was loaded, and the
    /// threshold is what decided).
    @Test func smallAllocationsNeverReachTheAgent() throws {
        let agent = try AgentProcess(budget: "16MiB", regionBudget: "4MiB")
        let r = try Self.run("/bin/cat", [], preload: agent, stdin: "b\na\nc\n")
        #expect(r.status == 0 && r.stdout == "b\na\nc\n", "\(r.stdout) \(r.stderr)")
        #expect(!agent.logText.contains("region registered"), "a small program registered a region")
        // cat reads through a 128 KiB buffer: at a 64 KiB threshold it is far memory.
        let low = try Self.run("/bin/cat", [], preload: agent, env: ["FARPAGE_THRESHOLD": "64KiB"], stdin: "b\na\nc\n")
        #expect(low.status == 0 && low.stdout == "b\na\nc\n", "\(low.stdout) \(low.stderr)")
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline, !agent.logText.contains("fp.name=cat") { usleep(20_000) }
        #expect(agent.logText.contains("fp.name=cat"), "cat's buffer never became far memory at a 64 KiB threshold")
    }
}
