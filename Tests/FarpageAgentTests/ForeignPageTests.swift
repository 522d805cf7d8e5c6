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

/// Regression (found in review): `UFFDIO_COPY` failing with `EEXIST` does not wake the faulting thread (the
/// kernel wakes only on success), and `Region.install` treats `.alreadyPresent` as done without
/// an explicit `UFFDIO_WAKE`. The faulting client thread then blocks forever, although the page
/// is in the memfd and the agent records it resident. docs/architecture.md ("taken as resident")
/// and DESIGN.md ("EEXIST ...: wake and go on") both expect the client to continue.
@Suite("Foreign pages", .serialized)
struct ForeignPageTests {
    @Test func aFaultThatEndsInEEXISTIsWoken() throws {
        let agent = try AgentProcess()
        let page = systemPageSize
        let pages = 16
        let length = UInt64(pages * page)
        let memfd = fp_memfd_create("review-eexist", 1)
        try #require(memfd >= 0)
        defer { _ = fp_close(memfd) }
        try #require(fp_ftruncate(memfd, length) == 0)
        try #require(fp_add_seals(memfd, FP_SEAL_SHRINK | FP_SEAL_GROW | FP_SEAL_SEAL) == 0)
        var err: Int32 = 0
        let base = try #require(fp_map_shared(memfd, length, &err))
        _ = fp_madvise_dontfork(base, length)
        let address = UInt64(UInt(bitPattern: base))
        var via: Int32 = 0
        let uffd = fp_uffd_open(1, &via)
        try #require(uffd >= 0)
        defer { _ = fp_close(uffd) }
        var features: UInt64 = 0
        var ioctls: UInt64 = 0
        try #require(fp_uffd_api(uffd, FP_UFFD_FEATURE_MISSING_SHMEM | FP_UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
                                 &features, &ioctls) == 0)
        try #require(fp_uffd_register(uffd, address, length, FP_UFFD_REGISTER_MISSING | FP_UFFD_REGISTER_WP,
                                      &ioctls) == 0)

        let s = try SeqPacketSocket.connect(path: agent.socket)
        s.setReceiveTimeout(milliseconds: 5000)
        let request = Request.register(RegisterRequest(address: address, length: length, pageSize: UInt32(page),
                                                       uffdFeatures: features, name: "eexist"))
        try s.send(Wire.encode(request, requestID: 1), descriptors: [memfd, uffd])
        let p = try #require(try s.receive(maxBytes: Wire.maxMessage))
        guard case .ok = try Wire.decodeReply(p.bytes).1 else {
            Issue.record("registration failed")
            return
        }

        // Freeze the agent so that the client's fault is pending while the page gets populated.
        let target = 3
        stopProcess(agent.pid)
        // kill() returns before every thread has stopped (a fault thread may be polling on the
        // other CPU): wait until all of them show state T, or the fault may still be served.
        let stopDeadline = Date().addingTimeInterval(5)
        func allStopped() -> Bool {
            let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(agent.pid)/task")) ?? []
            return !tasks.isEmpty && tasks.allSatisfy { tid in
                let stat = (try? String(contentsOfFile: "/proc/\(agent.pid)/task/\(tid)/stat", encoding: .utf8)) ?? ""
                guard let close = stat.lastIndex(of: ")") else { return false }
                return stat[stat.index(close, offsetBy: 2)] == "T"
            }
        }
        while !allStopped(), Date() < stopDeadline { usleep(1000) }
        try #require(allStopped(), "the agent did not stop")
        let done = Atomic<Bool>(false)
        let seen = Atomic<UInt64>(0)
        let targetAddress = UInt(bitPattern: base) + UInt(target * page)
        Thread.detachNewThread {
            let w = UnsafeMutablePointer<UInt64>(bitPattern: targetAddress)!
            seen.store(w.pointee, ordering: .relaxed)  // missing fault: blocks until the agent resolves it
            done.store(true, ordering: .releasing)
        }
        usleep(300_000)
        let blocked = !done.load(ordering: .acquiring)
        #expect(blocked, "the fault did not block while the agent was stopped")
        // Populate the page through the file (not through the registered mapping).
        let data = [UInt64](repeating: 0xAB_CDEF, count: page / 8)
        let wrote = data.withUnsafeBytes { pwrite(memfd, $0.baseAddress, page, off_t(target * page)) }
        #expect(wrote == page)
        kill(agent.pid, SIGCONT)

        let deadline = Date().addingTimeInterval(3)
        while !done.load(ordering: .acquiring), Date() < deadline { usleep(10_000) }
        let wokenByAgent = done.load(ordering: .acquiring)
        #expect(wokenByAgent, "the client thread is still blocked 3 s after the agent resolved its fault with EEXIST")
        #expect(agent.logText.contains("already present"), "the agent did not see EEXIST: \(agent.logText.suffix(1500))")
        if !wokenByAgent {
            // Rescue the thread so the test process can exit.
            _ = fp_uffd_wake(uffd, UInt64(targetAddress), UInt64(page))
            while !done.load(ordering: .acquiring) { usleep(10_000) }
        }
        #expect(seen.load(ordering: .relaxed) == 0xAB_CDEF)
        _ = fp_unmap(base, length)
    }
}
