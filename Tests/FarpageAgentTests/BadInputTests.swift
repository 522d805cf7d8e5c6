import CFarpageClient
import CFarpageKernel
import FarpageKernel
import FarpageProtocol
import Foundation
import FarpageTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Test 5: every kind of bad input gets a clear error, and the agent keeps serving others.
@Suite("Bad input", .serialized)
struct BadInputTests {
    let agent: AgentProcess
    init() throws { agent = try AgentProcess() }

    /// A region made by hand, the way libfarpage does it, so each piece can be broken on purpose.
    struct HandMadeRegion {
        let memfd: Int32
        let uffd: Int32
        let address: UInt64
        let length: UInt64
        var features: UInt64

        init(pages: Int = 16, seal: Bool = true) throws {
            length = UInt64(pages * systemPageSize)
            memfd = fp_memfd_create("bad-input-test", 1)
            try #require(memfd >= 0)
            try #require(fp_ftruncate(memfd, length) == 0)
            if seal { try #require(fp_add_seals(memfd, FP_SEAL_SHRINK | FP_SEAL_GROW | FP_SEAL_SEAL) == 0) }
            var err: Int32 = 0
            let p = try #require(fp_map_shared(memfd, length, &err))
            _ = fp_madvise_dontfork(p, length)
            address = UInt64(UInt(bitPattern: p))
            var via: Int32 = 0
            uffd = fp_uffd_open(1, &via)
            try #require(uffd >= 0)
            features = 0
            var ioctls: UInt64 = 0
            try #require(fp_uffd_api(uffd, FP_UFFD_FEATURE_MISSING_SHMEM | FP_UFFD_FEATURE_WP_HUGETLBFS_SHMEM, &features, &ioctls) == 0)
            try #require(fp_uffd_register(uffd, address, length, FP_UFFD_REGISTER_MISSING | FP_UFFD_REGISTER_WP, &ioctls) == 0)
        }

        func request(length: UInt64? = nil, address: UInt64? = nil, pageSize: UInt32 = UInt32(systemPageSize)) -> Request {
            .register(RegisterRequest(address: address ?? self.address, length: length ?? self.length,
                                      pageSize: pageSize, uffdFeatures: features, name: "bad"))
        }

        func close() {
            _ = fp_unmap(UnsafeMutableRawPointer(bitPattern: UInt(address)), length)
            _ = fp_close(uffd)
            _ = fp_close(memfd)
        }
    }

    func connect() throws -> SeqPacketSocket {
        let s = try SeqPacketSocket.connect(path: agent.socket)
        s.setReceiveTimeout(milliseconds: 5000)
        return s
    }

    /// Sends raw bytes (and descriptors) and returns the reply, or nil when the agent closed without one.
    func exchange(_ s: SeqPacketSocket, _ bytes: [UInt8], _ fds: [Int32] = []) throws -> Reply? {
        try s.send(bytes, descriptors: fds)
        guard let p = try s.receive(maxBytes: Wire.maxMessage), !p.bytes.isEmpty else { return nil }
        return try Wire.decodeReply(p.bytes).1
    }

    func expectError(_ reply: Reply?, errno expected: Int32, containing text: String,
                     sourceLocation: SourceLocation = #_sourceLocation) {
        guard case .error(let e, _, let message) = reply else {
            Issue.record("expected an ERROR reply, got \(String(describing: reply))", sourceLocation: sourceLocation)
            return
        }
        #expect(e == expected, "errno \(e), message: \(message)", sourceLocation: sourceLocation)
        #expect(message.contains(text), "message was: \(message)", sourceLocation: sourceLocation)
    }

    /// After each bad input: the same agent still pings, and a real client still works.
    func expectStillServing() throws {
        #expect(agent.process.isRunning, "the agent died: \(agent.logText.suffix(2000))")
        let s = try connect()
        #expect(try exchange(s, Wire.encode(.ping, requestID: 9)) == .ok(0, 0))
    }

    @Test func garbageAndTruncatedMessagesAreRejectedAndTheConnectionClosed() throws {
        var rng = SplitMix(state: 99)
        let garbage = (0..<100).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        let s1 = try connect()
        expectError(try exchange(s1, garbage), errno: EPROTO, containing: "bad magic")
        #expect(try s1.receive(maxBytes: 64)?.bytes.isEmpty == true, "connection should be closed after garbage")

        let s2 = try connect()
        expectError(try exchange(s2, [0x46, 0x50, 0x47]), errno: EPROTO, containing: "shorter than the 16-byte header")

        var truncated = Wire.encode(.stats(regionID: 1), requestID: 3)
        truncated.removeLast(4)  // header still claims the full length
        let s3 = try connect()
        expectError(try exchange(s3, truncated), errno: EPROTO, containing: "does not match")

        var wrongVersion = Wire.encode(.ping, requestID: 4)
        wrongVersion[4] = 9
        let s4 = try connect()
        expectError(try exchange(s4, wrongVersion), errno: EPROTO, containing: "version 9")

        // Known header, wrong body size: an error, but the connection stays usable.
        let s5 = try connect()
        let shortRegister = Wire.message(.register, requestID: 5, body: [1, 2, 3])
        expectError(try exchange(s5, shortRegister), errno: EPROTO, containing: "REGISTER body must be 64 bytes")
        #expect(try exchange(s5, Wire.encode(.ping, requestID: 6)) == .ok(0, 0))
        let unknownType = Wire.message(.ping, requestID: 5, body: []).enumerated().map { $0.offset == 6 ? 0x7F : $0.element }
        expectError(try exchange(s5, unknownType), errno: EPROTO, containing: "unknown message type")

        let s6 = try connect()
        let oversized = [UInt8](repeating: 0x41, count: Wire.maxMessage + 100)
        expectError(try exchange(s6, oversized), errno: EMSGSIZE, containing: "exceed")
        try expectStillServing()
    }

    @Test func descriptorsThatAreNotAMemfdOrAUserfaultfdAreRefused() throws {
        let region = try HandMadeRegion()
        defer { region.close() }
        var pipeFDs: [Int32] = [0, 0]
        #expect(pipe(&pipeFDs) == 0)
        defer { close(pipeFDs[0]); close(pipeFDs[1]) }
        let devNull = open("/dev/null", O_RDWR)
        defer { close(devNull) }
        let s = try connect()
        let register = Wire.encode(region.request(), requestID: 1)
        expectError(try exchange(s, register, [pipeFDs[0], region.uffd]), errno: EBADF, containing: "not a memfd")
        expectError(try exchange(s, register, [region.memfd, devNull]), errno: EBADF, containing: "not a userfaultfd")
        expectError(try exchange(s, register, [region.memfd]), errno: EBADF, containing: "exactly 2 descriptors")
        expectError(try exchange(s, register, []), errno: EBADF, containing: "exactly 2 descriptors")
        expectError(try exchange(s, Wire.encode(.ping, requestID: 2), [devNull]), errno: EBADF, containing: "only with REGISTER")
        // The connection survived all of that: a correct registration on it works.
        guard case .ok(let id, _) = try exchange(s, register, [region.memfd, region.uffd]) else {
            Issue.record("a valid registration failed after bad ones")
            return
        }
        #expect(try exchange(s, Wire.encode(.unregister(regionID: id), requestID: 3)) == .ok(id, 0))
        try expectStillServing()
    }

    @Test func badLayoutsAreRefusedWithTheReason() throws {
        let region = try HandMadeRegion()
        defer { region.close() }
        let fds = [region.memfd, region.uffd]
        let s = try connect()
        expectError(try exchange(s, Wire.encode(region.request(length: region.length - 100), requestID: 1), fds),
                    errno: EINVAL, containing: "not a positive multiple of the page size")
        expectError(try exchange(s, Wire.encode(region.request(address: region.address + 8), requestID: 2), fds),
                    errno: EINVAL, containing: "not page aligned")
        expectError(try exchange(s, Wire.encode(region.request(pageSize: 2 << 20), requestID: 3), fds),
                    errno: EINVAL, containing: "page size")
        expectError(try exchange(s, Wire.encode(region.request(length: region.length * 4), requestID: 4), fds),
                    errno: EINVAL, containing: "memfd is smaller")
        expectError(try exchange(s, Wire.encode(region.request(length: 4 << 40), requestID: 5), fds),
                    errno: ENOMEM, containing: "max_region_size")
        expectError(try exchange(s, Wire.encode(region.request(address: UInt64.max - 4095), requestID: 6), fds),
                    errno: EINVAL, containing: "overflows")
        let unsealed = try HandMadeRegion(seal: false)
        defer { unsealed.close() }
        expectError(try exchange(s, Wire.encode(unsealed.request(), requestID: 7), [unsealed.memfd, unsealed.uffd]),
                    errno: EINVAL, containing: "F_SEAL_SHRINK")
        // Sealed against resizing but still open to new seals, or sealed against writes: a later
        // F_SEAL_FUTURE_WRITE would make every punch fail, so both are refused.
        let resealable = try HandMadeRegion(seal: false)
        defer { resealable.close() }
        #expect(fp_add_seals(resealable.memfd, FP_SEAL_SHRINK | FP_SEAL_GROW) == 0)
        expectError(try exchange(s, Wire.encode(resealable.request(), requestID: 8), [resealable.memfd, resealable.uffd]),
                    errno: EINVAL, containing: "F_SEAL_SEAL")
        #expect(fp_add_seals(resealable.memfd, 0x0010 | FP_SEAL_SEAL) == 0)  // F_SEAL_FUTURE_WRITE
        expectError(try exchange(s, Wire.encode(resealable.request(), requestID: 9), [resealable.memfd, resealable.uffd]),
                    errno: EINVAL, containing: "F_SEAL_WRITE")
        try expectStillServing()
    }

    @Test func overlappingRegionsOfOneProcessAreRefused() throws {
        let region = try HandMadeRegion()
        defer { region.close() }
        let s = try connect()
        let register = Wire.encode(region.request(), requestID: 1)
        guard case .ok(let id, _) = try exchange(s, register, [region.memfd, region.uffd]) else {
            Issue.record("first registration failed")
            return
        }
        let second = try connect()
        expectError(try exchange(second, Wire.encode(region.request(), requestID: 2), [region.memfd, region.uffd]),
                    errno: EEXIST, containing: "overlaps region \(id)")
        // Another connection cannot free or inspect it either.
        expectError(try exchange(second, Wire.encode(.unregister(regionID: id), requestID: 3)), errno: ENOENT,
                    containing: "not registered on this connection")
        #expect(try exchange(s, Wire.encode(.unregister(regionID: id), requestID: 4)) == .ok(id, 0))
        try expectStillServing()
    }

    @Test func aClientThatDisconnectsMidRegistrationLeavesNothingBehind() throws {
        let region = try HandMadeRegion()
        defer { region.close() }
        let before = try agent.status().regions
        do {
            let s = try connect()
            try s.send(Wire.encode(region.request(), requestID: 1), descriptors: [region.memfd, region.uffd])
            // Gone before reading the reply.
        }
        // Wait until the agent has seen the registration and the disconnect.
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline, !agent.logText.contains("fp.name=bad") || !agent.logText.contains("region released") {
            usleep(10_000)
        }
        let log = agent.logText
        #expect(log.contains("fp.name=bad"), "the registration never reached the agent")
        #expect(log.contains("region released"), "the half-registered region was never released")
        #expect(try agent.status().regions == before, "a half-registered region was left behind")
        try expectStillServing()
    }

    @Test func theClientLibraryReportsAnUnreachableAgentClearly() throws {
        let dir = FileManager.default.temporaryDirectory.path
        let path = dir + "/farpage-no-agent-\(getpid()).sock"
        let child = Process()
        child.executableURL = URL(fileURLWithPath: binary("fp-workload"))
        child.arguments = ["--socket", path, "--size", "1MiB"]
        let err = Pipe()
        child.standardError = err
        child.standardOutput = Pipe()
        try child.run()
        child.waitUntilExit()
        let text = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(child.terminationStatus != 0)
        #expect(text.contains("cannot reach the farpaged agent at \(path)"), "stderr: \(text)")
        #expect(text.contains("Start it"))
    }

    /// Out of descriptors, the control socket stops accepting for a second instead of
    /// spinning on a listener that stays readable, and serves again once descriptors are free.
    @Test func runningOutOfDescriptorsPausesAcceptInsteadOfSpinning() throws {
        let pid = agent.process.processIdentifier
        let open = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count
        // The soft limit only: lowered, then set back to what it was.
        let limits = try String(contentsOfFile: "/proc/\(pid)/limits", encoding: .utf8)
        let soft = limits.split(separator: "\n").first { $0.hasPrefix("Max open files") }?
            .split(separator: " ", omittingEmptySubsequences: true).dropFirst(3).first.map(String.init) ?? "1024"
        func prlimit(_ n: String) throws -> Int32 {
            try runProgram("/usr/bin/prlimit", ["--pid", "\(pid)", "--nofile=\(n):"], mergeOutput: true).status
        }
        try #require(try prlimit("\(open + 6)") == 0, "prlimit failed")
        var clients: [SeqPacketSocket] = []
        for _ in 0..<24 { clients.append(try SeqPacketSocket.connect(path: agent.socket)) }
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline, !agent.logText.contains("accept failed; pausing") { usleep(20_000) }
        #expect(agent.logText.contains("control socket: accept failed; pausing it for a second"))
        // CPU over two seconds while out of descriptors: a spinning thread would use ~200 ticks.
        func ticks() throws -> Int {
            let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
            let fields = stat[stat.index(after: stat.lastIndex(of: ")")!)...].split(separator: " ")
            return Int(fields[11])! + Int(fields[12])!  // utime, stime
        }
        let before = try ticks()
        sleep(2)
        let used = try ticks() - before
        #expect(used < 60, "the agent used \(used) ticks in 2 s with accept failing: spinning")
        clients.removeAll()
        try #require(try prlimit(soft) == 0)
        try expectStillServing()
    }

    /// REGISTER_VIEW (a forked child's view of a region) from a peer that lies: each lie is
    /// refused with its reason, and a truthful view is served and released.
    @Test func forkViewsThatLieAreRefusedAndATruthfulOneIsServed() throws {
        let owner = try connect()
        let region = try HandMadeRegion()
        defer { region.close() }
        guard case .ok(let regionID, _) = try exchange(owner, Wire.encode(region.request(), requestID: 1), [region.memfd, region.uffd])
        else {
            Issue.record("the region was not registered")
            return
        }
        // The child's side: a private mapping of the memfd elsewhere, registered for missing faults.
        let viewUffd = fp_uffd_open(1, nil)
        try #require(viewUffd >= 0)
        defer { _ = fp_close(viewUffd) }
        var features: UInt64 = 0
        var ioctls: UInt64 = 0
        try #require(fp_uffd_api(viewUffd, FP_UFFD_FEATURE_MISSING_SHMEM, &features, &ioctls) == 0)
        let other = handMadeMemfd()
        defer { _ = fp_close(other) }

        let child = try connect()
        func view(_ id: UInt64, length: UInt64? = nil) -> [UInt8] {
            Wire.encode(.registerView(RegisterViewRequest(regionID: id, address: region.address, length: length ?? region.length)),
                        requestID: 7)
        }
        expectError(try exchange(child, view(regionID)), errno: EBADF, containing: "exactly 2 descriptors")
        expectError(try exchange(child, view(regionID), [other, viewUffd]), errno: EBADF, containing: "is not region")
        expectError(try exchange(child, view(regionID + 1000), [region.memfd, viewUffd]), errno: ENOENT,
                    containing: "is not registered")
        expectError(try exchange(child, view(regionID), [region.memfd, other]), errno: EBADF, containing: "not a userfaultfd")
        expectError(try exchange(child, view(regionID, length: region.length / 2), [region.memfd, viewUffd]), errno: EINVAL,
                    containing: "cover its region exactly")
        // Descriptors with any other request are refused (and closed).
        expectError(try exchange(child, Wire.encode(.ping, requestID: 8), [viewUffd]), errno: EBADF, containing: "REGISTER_VIEW")
        // The truth: the region's memfd and a userfaultfd.
        guard case .ok(let viewID, _) = try exchange(child, view(regionID), [region.memfd, viewUffd]) else {
            Issue.record("a truthful view was refused: \(agent.logText.suffix(1000))")
            return
        }
        #expect(agent.logText.contains("forked child's view registered"))
        #expect(try exchange(child, Wire.encode(.unregister(regionID: viewID), requestID: 9)) == .ok(viewID, 0))
        #expect(try exchange(child, Wire.encode(.unregister(regionID: viewID), requestID: 10))?.isError == true)
        try expectStillServing()
    }
}

/// A sealed memfd that is not any region's.
private func handMadeMemfd() -> Int32 {
    let fd = fp_memfd_create("not-a-region", 1)
    _ = fp_ftruncate(fd, 16 * 4096)
    return fd
}

extension Reply {
    var isError: Bool {
        if case .error = self { return true }
        return false
    }
}
