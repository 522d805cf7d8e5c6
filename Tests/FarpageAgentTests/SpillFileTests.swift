import FarpageKernel
@testable import FarpagePool
import FarpageProtocol
import FarpageTestSupport
import FarpageTiers
import FarpageTransport
import Foundation
import Logging
import Synchronization
import Testing

@testable import FarpageAgent

#if canImport(Glibc)
import Glibc
#endif

// The NVMe tier: the spill file backend on real files (ext4 under /var/tmp, tmpfs), and the
// agent with `[store] kind = "file"` end to end (real agent, real clients, real userfaultfd).

/// A directory removed with everything in it when the test is done.
final class ScratchDirectory: @unchecked Sendable {
    let path: String
    init(under base: String = "/var/tmp") throws {
        path = base + "/fp-spill-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Log lines kept in memory, to check what a component said.
final class LogCapture: Sendable {
    let lines = Mutex<[String]>([])
    var text: String { lines.withLock { $0.joined(separator: "\n") } }
    var logger: Logger { Logger(label: "spill-test") { _ in CapturingLogHandler(capture: self) } }
}

struct CapturingLogHandler: LogHandler {
    let capture: LogCapture
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) {
        capture.lines.withLock { $0.append("\(event.level) \(event.message) \(event.metadata ?? [:])") }
    }
}

/// Overwrites `bytes` bytes of a file at `offset` with `byte`, through the page cache, as a
/// failing disk or a stray writer would.
func overwrite(_ path: String, offset: UInt64, bytes: Int, with byte: UInt8 = 0x5A) {
    let fd = open(path, O_WRONLY)
    precondition(fd >= 0, "cannot open \(path)")
    let junk = [UInt8](repeating: byte, count: bytes)
    precondition(pwrite(fd, junk, bytes, off_t(offset)) == bytes)
    fsync(fd)
    close(fd)
}

/// Whether the kernel accepts O_DIRECT I/O on files in `directory` (tmpfs does since Linux 6.6):
/// a plain `pwrite`, independent of the backend's own io_uring probe.
func kernelAcceptsDirectIO(in directory: String) -> Bool {
    let path = directory + "/direct-probe"
    defer { unlink(path) }
    guard let file = try? DataFile.open(path), (try? DataFile.setDirect(file, true)) != nil else { return false }
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
    defer { buffer.deallocate() }
    memset(buffer, 1, 4096)
    return pwrite(file.rawValue, buffer, 4096, 0) == 4096
}

@Suite("Spill file backend", .serialized)
struct SpillFileTests {
    func makeSpill(_ dir: ScratchDirectory, capacity: UInt64 = 8 << 20, lease: UInt64 = 1 << 20,
                   directIO: SpillDirectIO = .auto, pollNanoseconds: UInt64 = 0,
                   logger: Logger = Logger(label: "spill-test")) throws -> SpillFileBackend
    {
        try SpillFileBackend(path: dir.path + "/spill", capacityBytes: capacity, leaseBytes: lease, directIO: directIO,
                             pollNanoseconds: pollNanoseconds, logger: logger)
    }

    /// Writes every page of `lease` in runs of 1...32 pages, then reads them back: all at once
    /// in batched runs, and page by page at random. Returns the number of bad pages or errors.
    static func roundTrip(_ spill: SpillFileBackend, lease id: UInt64, seed: UInt64) -> Int {
        let pages = Int(spill.leaseBytes) / 4096
        let source = randomPages(pages, seed: seed)
        let back = UnsafeMutableRawPointer.allocate(byteCount: pages * 4096, alignment: 4096)
        defer {
            source.deallocate()
            back.deallocate()
        }
        var bad = 0
        var rng = SplitMix(state: seed)
        var slot = 0
        while slot < pages {
            let n = min(pages - slot, Int(rng.next() % 32) + 1)
            do { try spill.write(lease: id, offset: UInt64(slot * 4096), pages: n, from: source + slot * 4096) } catch { bad += 1 }
            slot += n
        }
        var runs: [LeaseReadRun] = []
        slot = 0
        while slot < pages {
            let n = min(pages - slot, Int(rng.next() % 64) + 1)
            runs.append(LeaseReadRun(offset: UInt64(slot * 4096), pages: n, into: back + slot * 4096))
            slot += n
        }
        var reported: [Int] = []
        do {
            try spill.readRuns(lease: id, runs: runs) { j, error in
                reported.append(j)
                if error != nil { bad += 1 }
            }
        } catch { bad += 1 }
        if reported != Array(runs.indices) { bad += 1 }
        for p in 0..<pages where memcmp(back + p * 4096, source + p * 4096, 4096) != 0 { bad += 1 }
        for _ in 0..<64 {
            let p = Int(rng.next() % UInt64(pages))
            do {
                try spill.read(lease: id, offset: UInt64(p * 4096), pages: 1, into: back, allowUnwritten: false)
                if memcmp(back, source + p * 4096, 4096) != 0 { bad += 1 }
            } catch { bad += 1 }
        }
        return bad
    }

    /// Also with `[store] poll`: completions reaped by polling (short transfers resubmitted,
    /// the streaming head reported first) must come back as exact as those slept for.
    @Test(arguments: [0, 2_000_000] as [UInt64])
    func runsRoundTripAcrossLeasesOnManyThreads(pollNanoseconds: UInt64) throws {
        let dir = try ScratchDirectory()
        let spill = try makeSpill(dir, pollNanoseconds: pollNanoseconds)
        let leases = try spill.allocateLeases(8)
        #expect(leases.count == 8)
        let bad = Tally()
        onThreads(8) { t in
            // Each thread writes its own lease and reads back, twice, while the others do too.
            for round in 0..<2 { bad.add(Self.roundTrip(spill, lease: leases[t], seed: UInt64(t * 10 + round + 1))) }
        }
        #expect(bad.value == 0, "\(bad.value) pages or runs came back wrong")
        let c = spill.counters
        #expect(c.checksumFailures == 0)
        #expect(c.writtenBytes == 2 * 8 * spill.leaseBytes)
        #expect(c.reads > 0 && c.submissions < c.reads + c.writes, "batched reads took one submission per run: \(c)")
        #expect(c.bounced == 0, "page-aligned buffers were bounced")
        if pollNanoseconds == 0 {
            #expect(c.polled == 0, "polled without [store] poll")
        } else {
            // Each thread's single-page reads poll (8 threads on few CPUs: not every one in time).
            #expect((c.polled ?? 0) > 0, "no read was polled: \(c)")
        }
    }

    /// Only a fault's read polls: one page, read alone or first. Writes (evictions) and
    /// multi-page reads (lease moves, fetch-ahead) sleep for their completions.
    @Test func onlySinglePageReadsArePolled() throws {
        let dir = try ScratchDirectory()
        let spill = try makeSpill(dir, capacity: 2 << 20, pollNanoseconds: 20_000_000)
        let id = try #require(try spill.allocateLeases(1).first)
        let source = randomPages(64, seed: 5)
        let back = UnsafeMutableRawPointer.allocate(byteCount: 64 * 4096, alignment: 4096)
        defer {
            source.deallocate()
            back.deallocate()
        }
        for p in 0..<64 { try spill.write(lease: id, offset: UInt64(p * 4096), pages: 1, from: source + p * 4096) }
        #expect(spill.counters.polled == 0, "writes were polled")
        try spill.read(lease: id, offset: 0, pages: 64, into: back, allowUnwritten: false)
        #expect(memcmp(back, source, 64 * 4096) == 0)
        #expect(spill.counters.polled == 0, "a 64-page read was polled")
        for p in 0..<64 {
            try spill.read(lease: id, offset: UInt64(p * 4096), pages: 1, into: back, allowUnwritten: false)
            #expect(memcmp(back, source + p * 4096, 4096) == 0, "page \(p)")
        }
        // 20 ms of polling covers a 4 KiB read many times over; one thread, no competition.
        let polled = try #require(spill.counters.polled)
        #expect(polled >= 58 && polled <= 64, "\(polled) of 64 single-page reads were polled")
    }

    /// More runs than a ring holds (64): queued as room frees up, still one call, all exact.
    @Test func aBatchLargerThanTheRingCompletes() throws {
        let dir = try ScratchDirectory()
        let spill = try makeSpill(dir, capacity: 2 << 20)
        let id = try #require(try spill.allocateLeases(1).first)
        let source = randomPages(256, seed: 21)
        let back = UnsafeMutableRawPointer.allocate(byteCount: 256 * 4096, alignment: 4096)
        defer {
            source.deallocate()
            back.deallocate()
        }
        try spill.write(lease: id, offset: 0, pages: 256, from: source)
        // Page p lands at back[255 - p]: 256 one-page runs, scattered.
        let runs = (0..<256).map { p in LeaseReadRun(offset: UInt64(p * 4096), pages: 1, into: back + (255 - p) * 4096) }
        let before = spill.counters.submissions
        var order: [Int] = []
        try spill.readRuns(lease: id, runs: runs) { j, error in
            #expect(error == nil)
            order.append(j)
        }
        #expect(order == Array(0..<256))
        // Counted by the ring itself: a 64-entry ring takes at least 4 entries into the kernel
        // for 256 reads, and batching means far fewer than one per read.
        let submissions = spill.counters.submissions - before
        #expect(submissions >= 4 && submissions <= 16, "256 reads took \(submissions) io_uring submissions")
        for p in 0..<256 { #expect(memcmp(back + (255 - p) * 4096, source + p * 4096, 4096) == 0, "page \(p)") }
    }

    /// A file cut short behind the agent's back: the read stops early and says so.
    @Test func aTruncatedFileIsReportedNotServed() throws {
        let dir = try ScratchDirectory()
        let spill = try makeSpill(dir, capacity: 2 << 20)
        let id = try #require(try spill.allocateLeases(1).first)
        let source = randomPages(4, seed: 8)
        defer { source.deallocate() }
        try spill.write(lease: id, offset: 0, pages: 4, from: source)
        #expect(truncate(dir.path + "/spill", 2 * 4096) == 0)
        var caught: TransportError?
        do { try spill.read(lease: id, offset: 0, pages: 4, into: source, allowUnwritten: false) } catch { caught = error }
        #expect(caught?.kind == .unreachable)
        #expect(caught?.message.contains("stopped after 8192") == true, "\(String(describing: caught))")
    }

    @Test func freedExtentsAreReusedLowestFirstAndStartUnwritten() throws {
        let dir = try ScratchDirectory()
        let spill = try makeSpill(dir, capacity: 4 << 20)
        let ids = try spill.allocateLeases(4)
        #expect(ids.count == 4)
        #expect(try spill.allocateLeases(1).isEmpty, "a fifth lease fit a four-lease file")
        let offsets = ids.map { spill.fileOffset(ofLease: $0)! }
        #expect(offsets == [0, 1 << 20, 2 << 20, 3 << 20])
        let page = randomPages(1, seed: 5)
        defer { page.deallocate() }
        try spill.write(lease: ids[1], offset: 0, pages: 1, from: page)
        try spill.freeLease(ids[2])
        try spill.freeLease(ids[1])
        #expect(throws: TransportError.self) { try spill.freeLease(ids[1]) }
        let again = try spill.allocateLeases(2)
        #expect(again.map { spill.fileOffset(ofLease: $0)! } == [1 << 20, 2 << 20], "freed extents are not reused lowest first")
        #expect(Set(again).isDisjoint(with: ids), "a lease id was reused")
        // The extent still holds the old lease's page, but the new lease never wrote it: a read
        // fails, and a whole-lease copy (allowUnwritten) sees zeros, not the old data.
        let back = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { back.deallocate() }
        #expect(throws: TransportError.self) {
            try spill.read(lease: again[0], offset: 0, pages: 1, into: back, allowUnwritten: false)
        }
        try spill.read(lease: again[0], offset: 0, pages: 1, into: back, allowUnwritten: true)
        #expect((0..<512).allSatisfy { back.load(fromByteOffset: $0 * 8, as: UInt64.self) == 0 })
        // The old lease's id is gone for good.
        #expect(throws: TransportError.self) {
            try spill.read(lease: ids[1], offset: 0, pages: 1, into: back, allowUnwritten: true)
        }
    }

    @Test func aPageChangedOnDiskFailsItsChecksum() throws {
        let dir = try ScratchDirectory()
        let spill = try makeSpill(dir)
        let id = try #require(try spill.allocateLeases(2).last)
        let source = randomPages(16, seed: 9)
        let back = UnsafeMutableRawPointer.allocate(byteCount: 16 * 4096, alignment: 4096)
        defer {
            source.deallocate()
            back.deallocate()
        }
        try spill.write(lease: id, offset: 0, pages: 16, from: source)
        // One byte of page 7 changes behind the agent's back.
        let base = try #require(spill.fileOffset(ofLease: id))
        overwrite(dir.path + "/spill", offset: base + 7 * 4096 + 100, bytes: 1, with: ~source.load(fromByteOffset: 7 * 4096 + 100, as: UInt8.self))
        var caught: TransportError?
        do { try spill.read(lease: id, offset: 0, pages: 16, into: back, allowUnwritten: false) } catch { caught = error }
        #expect(caught?.kind == .corrupt, "\(String(describing: caught))")
        #expect(caught?.message.contains("does not match its checksum") == true)
        #expect(spill.counters.checksumFailures == 1)
        // The pages around it are intact and still read.
        try spill.read(lease: id, offset: 0, pages: 7, into: back, allowUnwritten: false)
        try spill.read(lease: id, offset: 8 * 4096, pages: 8, into: back + 8 * 4096, allowUnwritten: false)
        #expect(memcmp(back, source, 7 * 4096) == 0 && memcmp(back + 8 * 4096, source + 8 * 4096, 8 * 4096) == 0)
        // A rewrite makes the page good again.
        try spill.write(lease: id, offset: 7 * 4096, pages: 1, from: source + 7 * 4096)
        try spill.read(lease: id, offset: 0, pages: 16, into: back, allowUnwritten: false)
        #expect(memcmp(back, source, 16 * 4096) == 0)
    }

    /// Through the pool store (what the fault path calls): a corrupt page is `.corrupt` (the
    /// region then poisons it). A batched read fails the run that holds it (its other pages stay
    /// far and are fetched again on their own); every other page reads exact.
    @Test func thePoolStoreReportsACorruptSpillPageAsCorrupt() throws {
        let dir = try ScratchDirectory()
        let spill = try makeSpill(dir)
        let store = PoolStore(spill: .file(spill), agentID: ClusterSecret.randomBytes(16), agentName: "spill-test", secret: nil,
                              logger: Logger(label: "spill-test"))
        let count = 100
        let source = randomPages(count, seed: 3)
        let back = UnsafeMutableRawPointer.allocate(byteCount: count * 4096, alignment: 4096)
        defer {
            source.deallocate()
            back.deallocate()
        }
        let w = PageIOBatch(kind: .write)
        for i in 0..<count { w.append(buffer: source + i * 4096, location: nil) }
        store.submitAndWait(w)
        #expect(w.errors.allSatisfy { $0 == nil })
        #expect(store.report().first?.address == "spill-file \(dir.path)/spill")
        #expect(store.report().first?.transport.hasPrefix("io_uring (") == true)
        // Slot of page 42, in the file: its lease's extent plus the slot.
        let location = try #require(w.locations[42])
        let remoteID = try #require(store.state.withLock { $0.leases[Int(location.raw >> 24)]?.remoteID })
        let extent = try #require(spill.fileOffset(ofLease: remoteID))
        overwrite(dir.path + "/spill", offset: extent + (location.raw & 0xFF_FFFF) * 4096, bytes: 4096)
        let r = PageIOBatch(kind: .read)
        for i in 0..<count { r.append(buffer: back + i * 4096, location: w.locations[i]) }
        var calls: [Int] = []
        store.read(r, chunkPages: 64) { calls.append($0) }
        #expect(calls.last == count && calls.count >= 2, "\(calls)")
        #expect(r.errors[42]?.code == .corrupt, "\(String(describing: r.errors[42]))")
        #expect(r.errors.allSatisfy { $0 == nil || $0?.code == .corrupt })
        #expect(r.errors[0] == nil && r.errors[count - 1] == nil, "runs without the corrupt page failed")
        for i in 0..<count where r.errors[i] == nil {
            #expect(memcmp(back + i * 4096, source + i * 4096, 4096) == 0, "page \(i)")
        }
        // One page at a time (the fault path's demand read): only page 42 fails.
        memset(back, 0, count * 4096)
        for i in 0..<count {
            let one = PageIOBatch(kind: .read)
            one.append(buffer: back + i * 4096, location: w.locations[i])
            store.submitAndWait(one)
            if i == 42 {
                #expect(one.errors[0]?.code == .corrupt)
            } else {
                #expect(one.errors[0] == nil && memcmp(back + i * 4096, source + i * 4096, 4096) == 0, "page \(i)")
            }
        }
        #expect((store.report().first?.spillFile?.checksumFailures ?? 0) >= 2)
    }

    @Test func onTmpfsTheModeMatchesTheKernelAndIOWorks() throws {
        let dir = try ScratchDirectory(under: "/dev/shm")
        let capture = LogCapture()
        let spill = try makeSpill(dir, capacity: 2 << 20, logger: capture.logger)
        let direct = kernelAcceptsDirectIO(in: dir.path)
        #expect(spill.directIO == direct)
        if direct {
            #expect(spill.transport == "io_uring (O_DIRECT)")
        } else {
            #expect(spill.transport == "io_uring (buffered)")
            #expect(capture.text.contains("spill file without O_DIRECT"), "\(capture.text)")
        }
        let id = try #require(try spill.allocateLeases(1).first)
        #expect(Self.roundTrip(spill, lease: id, seed: 11) == 0)
    }

    @Test func directIOOffIsBufferedAndSaysSo() throws {
        let dir = try ScratchDirectory()
        let capture = LogCapture()
        let spill = try makeSpill(dir, capacity: 2 << 20, directIO: .off, logger: capture.logger)
        #expect(!spill.directIO && !spill.counters.direct)
        #expect(spill.transport == "io_uring (buffered)")
        #expect(!capture.text.contains("without O_DIRECT"), "direct_io = off is asked for: no warning")
        #expect(capture.text.contains("spill file ready"))
        let id = try #require(try spill.allocateLeases(1).first)
        #expect(Self.roundTrip(spill, lease: id, seed: 12) == 0)
    }

    /// Buffers that are not page-aligned cannot go to O_DIRECT: they are copied through an
    /// aligned one, and the data is still exact.
    @Test func unalignedBuffersAreBounced() throws {
        let dir = try ScratchDirectory()
        let spill = try makeSpill(dir, capacity: 2 << 20)
        // Buffered, nothing is bounced and this would prove nothing.
        try #require(spill.directIO == kernelAcceptsDirectIO(in: dir.path))
        guard spill.directIO else { return }
        let id = try #require(try spill.allocateLeases(1).first)
        let raw = UnsafeMutableRawPointer.allocate(byteCount: 9 * 4096, alignment: 4096)
        let back = UnsafeMutableRawPointer.allocate(byteCount: 9 * 4096, alignment: 4096)
        defer {
            raw.deallocate()
            back.deallocate()
        }
        let source = raw + 64
        var rng = SplitMix(state: 77)
        for w in 0..<(8 * 512) { source.storeBytes(of: rng.next(), toByteOffset: w * 8, as: UInt64.self) }
        try spill.write(lease: id, offset: 4096, pages: 8, from: source)
        try spill.read(lease: id, offset: 4096, pages: 8, into: back + 8, allowUnwritten: false)
        #expect(memcmp(back + 8, source, 8 * 4096) == 0)
        #expect(spill.counters.bounced == 2)
    }

    @Test func aMissingDirectoryIsRefusedWithTheFix() throws {
        let dir = try ScratchDirectory()
        #expect {
            try SpillFileBackend(path: dir.path + "/no/such/dir/spill", capacityBytes: 1 << 20, logger: Logger(label: "spill-test"))
        } throws: { error in
            guard let e = error as? SpillFileError else { return false }
            return e.code == .missingDirectory && e.description.contains("does not exist") && e.description.contains("mkdir -p")
        }
    }

    @Test func aSecondUserOfTheFileIsRefused() throws {
        let dir = try ScratchDirectory()
        let first = try makeSpill(dir, capacity: 1 << 20)
        #expect {
            try makeSpill(dir, capacity: 1 << 20)
        } throws: { error in
            (error as? SpillFileError)?.code == .inUse && "\(error)".contains("its own spill file")
        }
        _ = first
    }

    @Test func notEnoughSpaceIsRefusedBeforeAnythingIsAllocated() throws {
        let dir = try ScratchDirectory()
        #expect {
            try makeSpill(dir, capacity: 1 << 56, lease: 64 << 20)
        } throws: { error in
            guard let e = error as? SpillFileError else { return false }
            return e.code == .noSpace && e.description.contains("lower [store] capacity")
        }
        var st = stat()
        #expect(stat(dir.path + "/spill", &st) == 0 && st.st_blocks == 0, "space was allocated for a spill that was refused")
    }

    @Test func aFullSpillAllocatesFewerLeases() throws {
        let dir = try ScratchDirectory()
        let spill = try makeSpill(dir, capacity: (3 << 20) + 12345, lease: 1 << 20)
        #expect(spill.capacityBytes == 3 << 20)
        let ids = try spill.allocateLeases(5)
        #expect(ids.count == 3)
        #expect(try spill.allocateLeases(1).isEmpty)
        try spill.freeLease(ids[0])
        #expect(try spill.allocateLeases(5).count == 1)
        // The file was sized and its blocks reserved at start.
        var st = stat()
        #expect(stat(dir.path + "/spill", &st) == 0 && UInt64(st.st_size) == 3 << 20)
        #expect(UInt64(st.st_blocks) * 512 >= 3 << 20, "the spill file was not preallocated")
    }

    @Test func outOfBoundsRunsAreRefused() throws {
        let dir = try ScratchDirectory()
        let spill = try makeSpill(dir, capacity: 2 << 20)
        let id = try #require(try spill.allocateLeases(1).first)
        let buffer = randomPages(2, seed: 1)
        defer { buffer.deallocate() }
        #expect(throws: TransportError.self) { try spill.write(lease: id, offset: spill.leaseBytes - 4096, pages: 2, from: buffer) }
        #expect(throws: TransportError.self) { try spill.write(lease: id, offset: 100, pages: 1, from: buffer) }
        #expect(throws: TransportError.self) { try spill.write(lease: 999, offset: 0, pages: 1, from: buffer) }
    }

    /// Measures, on this machine's disk under /var/tmp: 4 KiB reads at queue depth 1, and 64-page
    /// batches (64 scattered pages in one submission; one 64-page run). Logged, never asserted.
    @Test func measuresReadLatencyAndBatchBandwidth() throws {
        let dir = try ScratchDirectory()
        let spill = try makeSpill(dir, capacity: 128 << 20, lease: 64 << 20)
        let ids = try spill.allocateLeases(2)
        let pages = Int(spill.leaseBytes) / 4096
        let data = randomPages(64, seed: 1)
        defer { data.deallocate() }
        let started = monotonicNanoseconds()
        for id in ids {
            for slot in stride(from: 0, to: pages, by: 64) {
                try spill.write(lease: id, offset: UInt64(slot * 4096), pages: 64, from: data)
            }
        }
        let writeSeconds = Double(monotonicNanoseconds() - started) / 1e9
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 64 * 4096, alignment: 4096)
        defer { buffer.deallocate() }
        var rng = SplitMix(state: 99)
        var single: [UInt64] = []
        for _ in 0..<2000 {
            let slot = Int(rng.next() % UInt64(pages))
            let t = monotonicNanoseconds()
            try spill.read(lease: ids[Int(rng.next() % 2)], offset: UInt64(slot * 4096), pages: 1, into: buffer, allowUnwritten: false)
            single.append(monotonicNanoseconds() - t)
        }
        var scattered: [UInt64] = []
        for _ in 0..<200 {
            let runs = (0..<64).map { k in
                LeaseReadRun(offset: UInt64(Int(rng.next() % UInt64(pages)) * 4096), pages: 1, into: buffer + k * 4096)
            }
            let t = monotonicNanoseconds()
            try spill.readRuns(lease: ids[0], runs: runs) { _, error in precondition(error == nil) }
            scattered.append(monotonicNanoseconds() - t)
        }
        var sequential: [UInt64] = []
        for _ in 0..<200 {
            let slot = Int(rng.next() % UInt64(pages / 64)) * 64
            let t = monotonicNanoseconds()
            try spill.read(lease: ids[1], offset: UInt64(slot * 4096), pages: 64, into: buffer, allowUnwritten: false)
            sequential.append(monotonicNanoseconds() - t)
        }
        func median(_ v: [UInt64]) -> Double { Double(v.sorted()[v.count / 2]) / 1000 }
        func p99(_ v: [UInt64]) -> Double { Double(v.sorted()[v.count * 99 / 100]) / 1000 }
        let batchBytes = 64.0 * 4096
        print("""
            spill-file microbenchmark (\(dir.path), \(spill.transport)):
              write 64-page runs: \(String(format: "%.0f", Double(2 * spill.leaseBytes) / writeSeconds / 1e6)) MB/s
              4 KiB read, QD1: median \(String(format: "%.1f", median(single))) us, p99 \(String(format: "%.1f", p99(single))) us
              64 scattered 4 KiB pages, one submission: median \(String(format: "%.1f", median(scattered))) us per batch = \(String(format: "%.0f", batchBytes / median(scattered))) MB/s
              one 64-page (256 KiB) run: median \(String(format: "%.1f", median(sequential))) us = \(String(format: "%.0f", batchBytes / median(sequential))) MB/s
            """)
        #expect(spill.counters.checksumFailures == 0)
    }
}

// MARK: The agent with a spill file

@Suite("Spill file agent", .serialized)
struct SpillFileAgentTests {
    func spillAgent(_ dir: ScratchDirectory, capacity: String = "512MiB", launcher: [String] = []) throws -> AgentProcess {
        try AgentProcess(storeCapacity: capacity, store: "kind = \"file\"\npath = \"\(dir.path)/spill\"", launcher: launcher)
    }

    func spillRow(_ agent: AgentProcess) throws -> PoolServer? { try agent.pool().first { $0.address.hasPrefix("spill-file ") } }

    /// NVMe only (no memory server): a region 4x its budget written, verified, rewritten and
    /// verified byte-exact, every far page through the spill file.
    @Test func aRegionFourTimesItsBudgetLivesInTheSpillFile() throws {
        let dir = try ScratchDirectory()
        let agent = try spillAgent(dir)
        defer { agent.stop() }
        let w = try agent.startWorkload(["--size", "64MiB", "--budget", "16MiB", "--passes", "2", "--hold", "1"])
        var peak = 0
        let deadline = Date().addingTimeInterval(60)
        while w.process.isRunning, Date() < deadline {
            peak = max(peak, try spillRow(agent)?.storedPages ?? 0)
            usleep(50_000)
        }
        let (rc, _, out) = w.finish()
        #expect(rc == 0 && out.contains("\"failures\":0"), "\(out)")
        #expect(peak >= 8192, "the spill file held at most \(peak) pages of a 16384-page region with a 4096-page budget")
        let row = try #require(try spillRow(agent), "no spill-file row in the pool")
        #expect(row.address == "spill-file \(dir.path)/spill")
        let direct = kernelAcceptsDirectIO(in: dir.path)
        #expect(row.transport == (direct ? "io_uring (O_DIRECT)" : "io_uring (buffered)"))
        #expect(row.capacityBytes == 512 << 20 && row.status == "healthy")
        let io = try #require(row.spillFile)
        #expect(io.direct == direct && io.writes > 0 && io.reads > 0 && io.checksumFailures == 0, "\(io)")
        #expect(io.writtenBytes >= 8192 * 4096 && io.readBytes >= 8192 * 4096, "\(io)")
        #expect(row.errors == 0)
        // What an operator sees.
        let list = try runProgram(binary("farpagectl"), ["pool", "list", "--socket", agent.socket], mergeOutput: true)
        #expect(list.status == 0)
        #expect(list.stdout.contains("spill-file \(dir.path)/spill") && list.stdout.contains(row.transport), "\(list.stdout)")
        #expect(list.stdout.contains("0 checksum failures"), "\(list.stdout)")
        #expect(agent.logText.contains("spill file ready"))
    }

    /// The spill file's data is overwritten after the pages went there: the client that touches
    /// such a page dies of SIGBUS (the page is poisoned), never sees wrong data; the agent logs
    /// the checksum failure and goes on serving other regions.
    @Test func aCorruptedSpillFileGivesSIGBUSNeverWrongData() throws {
        let dir = try ScratchDirectory()
        let agent = try spillAgent(dir)
        defer { agent.stop() }
        let victim = try agent.startWorkload(["--size", "128MiB", "--budget", "4MiB", "--passes", "1"])
        let deadline = Date().addingTimeInterval(60)
        while victim.process.isRunning, Date() < deadline, (try spillRow(agent)?.storedPages ?? 0) < 4000 { usleep(10_000) }
        // Mid-way through the write pass: every page evicted so far has its copy in the first
        // leases (64 MiB extents). Overwrite them, then let the client verify.
        stopProcess(victim.process.processIdentifier)
        #expect(victim.process.isRunning, "the workload finished before the spill file could be corrupted")
        overwrite(dir.path + "/spill", offset: 0, bytes: 128 << 20)
        kill(victim.process.processIdentifier, SIGCONT)
        let (_, reason, out) = victim.finish()
        #expect(reason == .uncaughtSignal && victim.process.terminationStatus == SIGBUS,
                "the client should die of SIGBUS on a corrupt page, got \(reason) \(victim.process.terminationStatus): \(out)")
        #expect(!out.contains("MISMATCH"), "a corrupt page was served: \(out)")
        #expect(agent.logText.contains("a far page failed its checksum"), "\(agent.logText.suffix(2000))")
        #expect(agent.logText.contains("does not match its checksum"))
        #expect(agent.logText.contains("poisoning it"))
        #expect((try spillRow(agent)?.spillFile?.checksumFailures ?? 0) > 0)
        // The agent keeps serving: a new region goes through the same file, byte-exact.
        let (rc, _, again) = try agent.startWorkload(["--size", "64MiB", "--budget", "8MiB", "--passes", "2"]).finish()
        #expect(rc == 0 && again.contains("\"failures\":0"), "\(again)")
    }

    static let ramfsAvailable: Bool = {
        guard getuid() == 0, FileManager.default.isExecutableFile(atPath: "/usr/bin/unshare") else { return false }
        let dir = "/tmp/fp-ramfs-probe-\(getpid())"
        mkdir(dir, 0o700)
        defer { rmdir(dir) }
        let run = try? runProgram("/usr/bin/unshare", ["-m", "/bin/sh", "-c", "mount -t ramfs none \(dir)"], mergeOutput: true)
        return run?.status == 0
    }()

    /// ramfs refuses O_DIRECT (and fallocate): the agent, in a private mount namespace with the
    /// spill directory on ramfs, says so once at start, runs buffered, and stays byte-exact.
    @Test(.enabled(if: SpillFileAgentTests.ramfsAvailable, "needs root, unshare(1) and ramfs to make a filesystem that refuses O_DIRECT"))
    func withoutODirectTheAgentFallsBackToBufferedIOAndSaysSo() throws {
        let dir = try ScratchDirectory()
        let launcher = ["/usr/bin/unshare", "-m", "/bin/sh", "-c", "mount -t ramfs none \(dir.path) && exec \"$0\" \"$@\""]
        let agent = try spillAgent(dir, capacity: "64MiB", launcher: launcher)
        defer { agent.stop() }
        let (rc, _, out) = try agent.startWorkload(["--size", "32MiB", "--budget", "8MiB", "--passes", "2"]).finish()
        #expect(rc == 0 && out.contains("\"failures\":0"), "\(out)")
        let row = try #require(try spillRow(agent))
        #expect(row.transport == "io_uring (buffered)")
        #expect(row.spillFile?.direct == false && (row.spillFile?.reads ?? 0) > 0)
        let log = agent.logText
        #expect(log.contains("spill file without O_DIRECT") && log.contains("ramfs"), "\(log)")
        #expect(log.components(separatedBy: "spill file without O_DIRECT").count == 2, "the fallback was logged more than once")
        #expect(log.contains("cannot preallocate"), "ramfs has no fallocate: the sparse file should be reported")
    }

    /// A spill file in a directory that does not exist stops the agent at start, with exit 78
    /// (configuration) and the fix in the message.
    @Test func aSpillFileInAMissingDirectoryStopsTheStart() throws {
        let dir = try ScratchDirectory()
        let config = dir.path + "/agent.toml"
        try """
            [agent]
            socket = "\(dir.path)/agent.sock"
            [store]
            kind = "file"
            path = "\(dir.path)/missing/spill"
            capacity = "64MiB"
            """.write(toFile: config, atomically: true, encoding: .utf8)
        let run = try runProgram(binary("farpaged"), ["agent", "--config", config, "--check"], mergeOutput: true)
        #expect(run.status == 78, "\(run.stdout)")
        #expect(run.stdout.contains("\(dir.path)/missing does not exist") && run.stdout.contains("mkdir -p"), "\(run.stdout)")
    }
}

// MARK: Configuration

@Suite struct SpillFileConfigTests {
    @Test func aFileStoreParses() throws {
        let c = try AgentConfig.parse("""
            [store]
            kind = "file"
            path = "/var/lib/farpage/spill"
            capacity = "100GiB"
            direct_io = "off"
            """)
        #expect(c.storeKind == "file" && c.storePath == "/var/lib/farpage/spill")
        #expect(c.storeCapacity == 100 << 30 && c.storeDirectIO == .off)
        #expect(AgentConfig().storeDirectIO == .auto && AgentConfig().storePath == nil)
    }
}
