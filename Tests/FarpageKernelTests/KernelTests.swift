import CFarpageKernel
import Foundation
import Synchronization
import Testing

@testable import FarpageKernel

#if canImport(Glibc)
import Glibc
#endif

/// The kernel facts the paging engine relies on, checked on the running kernel.
@Suite(.serialized) struct KernelTests {
    static let probe = try? UffdProbe.run()

    @Test func theKernelOffersWhatFarpageNeeds() throws {
        let probe = try #require(Self.probe, "userfaultfd unavailable here")
        #expect(probe.missingRequired.isEmpty, "missing: \(probe.missingRequired.names)")
        #expect(probe.features.names.contains("missing_shmem"))
    }

    @Test func readingAMemfdHoleReturnsZerosWithoutAllocatingIt() throws {
        let fd = try Memfd.create(name: "hole", size: 1 << 20)
        let page = systemPageSize
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: page, alignment: page)
        defer { buffer.deallocate() }
        memset(buffer, 0xAB, page)
        #expect(try Memfd.read(fd, into: buffer, length: page, offset: 8192) == page)
        #expect(buffer.load(as: UInt64.self) == 0)
        var st = stat()
        #expect(fstat(fd.rawValue, &st) == 0)
        #expect(st.st_blocks == 0, "pread allocated the hole")
    }

    @Test func sealsAreVisibleAndNonMemfdsHaveNone() throws {
        let fd = try Memfd.create(name: "seal", size: 4096)
        try Memfd.addSeals(fd, [.shrink, .grow])
        #expect(try Memfd.seals(fd).contains(.shrink))
        #expect(try fd.linkTarget().hasPrefix("/memfd:seal"))
        let null = OwnedDescriptor(adopting: open("/dev/null", O_RDONLY))
        #expect(throws: KernelError.self) { try Memfd.seals(null) }
    }

    /// The eviction sequence on a real region: install, write-protect, punch; then a page whose
    /// data is lost is poisoned and a kernel access to it fails (a user access would get SIGBUS),
    /// never reads zeros.
    @Test(.enabled(if: KernelTests.probe?.features.contains(.poison) == true,
                   "UFFD_FEATURE_POISON unavailable (Linux < 6.6); the SIGBUS fallback is tested below"))
    func poisonAfterWriteProtectAndPunchIsNeverZeros() throws {
        let page = systemPageSize
        let length = UInt64(4 * page)
        let memfd = try Memfd.create(name: "poison", size: length)
        var err: Int32 = 0
        let map = try #require(fp_map_shared(memfd.rawValue, length, &err))
        defer { _ = fp_unmap(map, length) }
        var via: Int32 = 0
        let raw = fp_uffd_open(1, &via)
        try #require(raw >= 0)
        let uffd = Userfaultfd(OwnedDescriptor(adopting: raw))
        var features: UInt64 = 0
        var ioctls: UInt64 = 0
        try #require(fp_uffd_api(raw, FP_UFFD_FEATURE_MISSING_SHMEM | FP_UFFD_FEATURE_WP_HUGETLBFS_SHMEM | FP_UFFD_FEATURE_POISON, &features, &ioctls) == 0)
        let base = UInt64(UInt(bitPattern: map))
        try #require(fp_uffd_register(raw, base, length, FP_UFFD_REGISTER_MISSING | FP_UFFD_REGISTER_WP, &ioctls) == 0)
        let source = UnsafeMutableRawPointer.allocate(byteCount: page, alignment: page)
        defer { source.deallocate() }
        memset(source, 0x5A, page)
        // Install a page (no fault needed: UFFDIO_COPY into a missing page), then evict it.
        #expect(try uffd.copy(to: base, from: source, length: page, writeProtect: false) == .installed)
        #expect(map.load(as: UInt8.self) == 0x5A)
        #expect(try uffd.copy(to: base, from: source, length: page, writeProtect: false) == .alreadyPresent)
        try uffd.writeProtect(address: base, length: UInt64(page), enable: true)
        try Memfd.punchHole(memfd, offset: 0, length: UInt64(page))
        try uffd.poison(address: base, length: UInt64(page))
        // A kernel access to the poisoned page fails with EFAULT instead of reading zeros.
        var pipeFDs: [Int32] = [0, 0]
        #expect(pipe(&pipeFDs) == 0)
        defer { close(pipeFDs[0]); close(pipeFDs[1]) }
        let n = write(pipeFDs[1], map, page)
        let e = errno
        #expect(n == -1 && e == EFAULT, "a poisoned page was readable (n=\(n), errno=\(e))")
    }

    /// Kernels without `UFFDIO_POISON` (6.1): a lost page is never installed; the thread
    /// that touched it gets SIGBUS (tgkill, named by the fault event's thread id), and a
    /// handler that returns touches it again and blocks again, until a real page arrives.
    /// Runs on any kernel: the fallback is chosen explicitly here.
    @Test func lostPageFallbackSignalsTheFaultingThreadAndNeverInstalls() throws {
        let probe = try #require(Self.probe, "userfaultfd unavailable here")
        if !probe.features.contains(.poison) {
            #expect(LostPageSignal(kernel: probe.features) == .sigbusToFaultingThread)
        }
        let page = systemPageSize
        let length = UInt64(2 * page)
        let memfd = try Memfd.create(name: "lost", size: length)
        var err: Int32 = 0
        let map = try #require(fp_map_shared(memfd.rawValue, length, &err))
        defer { _ = fp_unmap(map, length) }
        var via: Int32 = 0
        let raw = fp_uffd_open(1, &via)
        try #require(raw >= 0)
        let uffd = Userfaultfd(OwnedDescriptor(adopting: raw), owner: getpid(), lostPageSignal: .sigbusToFaultingThread)
        var features: UInt64 = 0
        var ioctls: UInt64 = 0
        try #require(fp_uffd_api(raw, FP_UFFD_FEATURE_MISSING_SHMEM | FP_UFFD_FEATURE_THREAD_ID, &features, &ioctls) == 0)
        let base = UInt64(UInt(bitPattern: map))
        try #require(fp_uffd_register(raw, base, length, FP_UFFD_REGISTER_MISSING, &ioctls) == 0)

        var action = sigaction()
        action.__sigaction_handler.sa_sigaction = { _, info, _ in
            LostPageSignalRecord.code.store(info!.pointee.si_code, ordering: .relaxed)
            LostPageSignalRecord.thread.store(fp_gettid(), ordering: .relaxed)
            LostPageSignalRecord.count.add(1, ordering: .relaxed)
        }
        action.sa_flags = SA_SIGINFO
        var previous = sigaction()
        try #require(sigaction(SIGBUS, &action, &previous) == 0)
        defer { sigaction(SIGBUS, &previous, nil) }
        LostPageSignalRecord.count.store(0, ordering: .relaxed)

        let address = UInt(bitPattern: map)
        let reader = Thread {
            LostPageSignalRecord.readerThread.store(fp_gettid(), ordering: .relaxed)
            let target = UnsafeRawPointer(bitPattern: address)!
            LostPageSignalRecord.seen.store(target.load(as: UInt8.self), ordering: .relaxed)
            LostPageSignalRecord.readerDone.store(true, ordering: .releasing)
        }
        reader.start()
        // nextFault: the next page-fault event, within a few seconds.
        func nextFault() throws -> UInt32? {
            var events: [UffdEvent] = []
            for _ in 0..<5000 {
                if try uffd.readEvents(into: &events) > 0, case let .pageFault(address, _, _, _, tid) = events[0].kind {
                    #expect(address & ~UInt64(page - 1) == base)
                    return tid
                }
                usleep(1000)
            }
            return nil
        }
        let tid = try #require(try nextFault(), "the reader's fault did not arrive")
        #expect(tid != 0, "UFFD_FEATURE_THREAD_ID gave no thread id")
        try uffd.poison(address: base, length: UInt64(page), thread: tid)
        // The handler runs on the faulting thread, returns, and the load faults again.
        let again = try #require(try nextFault(), "the reader did not fault again after its SIGBUS handler")
        #expect(again == tid)
        #expect(LostPageSignalRecord.count.load(ordering: .relaxed) == 1)
        #expect(LostPageSignalRecord.thread.load(ordering: .relaxed) == LostPageSignalRecord.readerThread.load(ordering: .relaxed))
        #expect(LostPageSignalRecord.code.load(ordering: .relaxed) == SI_TKILL)
        let readLostPage = LostPageSignalRecord.readerDone.load(ordering: .acquiring)
        #expect(!readLostPage, "the lost page was read")
        // Nothing was installed: the page is still a hole in the memfd.
        var st = stat()
        #expect(fstat(memfd.rawValue, &st) == 0 && st.st_blocks == 0, "a page was installed for a lost page")
        // Release the reader with a real page.
        let source = UnsafeMutableRawPointer.allocate(byteCount: page, alignment: page)
        defer { source.deallocate() }
        memset(source, 0x77, page)
        #expect(try uffd.copy(to: base, from: source, length: page, writeProtect: false) == .installed)
        for _ in 0..<5000 where !LostPageSignalRecord.readerDone.load(ordering: .acquiring) { usleep(1000) }
        let released = LostPageSignalRecord.readerDone.load(ordering: .acquiring)
        #expect(released, "the reader did not finish once the page was installed")
        #expect(LostPageSignalRecord.seen.load(ordering: .relaxed) == 0x77)
    }

    @Test func seqpacketCarriesDescriptorsAndPeerCredentials() throws {
        let dir = FileManager.default.temporaryDirectory.path + "/fp-kt-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let listener = try SeqPacketSocket.listen(path: dir + "/s", mode: 0o600)
        let client = try SeqPacketSocket.connect(path: dir + "/s")
        let server = try #require(try listener.accept())
        // A second listener on a live socket must not steal it.
        #expect(throws: KernelError.self) { try SeqPacketSocket.listen(path: dir + "/s", mode: 0o600) }
        #expect(try server.peerCredentials().pid == getpid())
        let memfd = try Memfd.create(name: "passed", size: 4096)
        try client.send([1, 2, 3], descriptors: [memfd.rawValue])
        let packet = try #require(try server.receive(maxBytes: 64))
        #expect(packet.bytes == [1, 2, 3])
        try #require(packet.descriptors.count == 1)
        #expect(try packet.descriptors[0].linkTarget().hasPrefix("/memfd:passed"))
        // More descriptors than accepted: the extras are closed and the packet is marked truncated.
        let many = (0..<6).map { _ in open("/dev/null", O_RDONLY) }
        defer { many.forEach { close($0) } }
        try client.send([9], descriptors: many)
        let p2 = try #require(try server.receive(maxBytes: 64, maxDescriptors: 2))
        #expect(p2.truncated && p2.descriptors.count == 2)
    }
}

/// What the SIGBUS handler of `lostPageFallbackSignalsTheFaultingThreadAndNeverInstalls` saw.
enum LostPageSignalRecord {
    static let count = Atomic<Int32>(0)
    static let code = Atomic<Int32>(0)
    static let thread = Atomic<Int32>(0)
    static let readerThread = Atomic<Int32>(0)
    static let seen = Atomic<UInt8>(0)
    static let readerDone = Atomic<Bool>(false)
}
