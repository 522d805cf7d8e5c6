import CFarpageChecksum
import FarpageKernel
import FarpageProtocol
import FarpageTransport
import Foundation
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Whether the spill file may bypass the page cache (`[store] direct_io`).
public enum SpillDirectIO: String, Sendable, CaseIterable {
    /// O_DIRECT when the filesystem allows it, else buffered I/O (logged at start).
    case auto
    /// Always through the page cache.
    case off
}

/// The spill file could not be set up; `description` says what to change.
public struct SpillFileError: Error, CustomStringConvertible, Sendable {
    public struct Code: Hashable, Sendable {
        let name: String
        public static let ioUringUnavailable = Code(name: "io_uring_unavailable")
        public static let missingDirectory = Code(name: "missing_directory")
        public static let cannotOpen = Code(name: "cannot_open")
        public static let inUse = Code(name: "in_use")
        public static let noSpace = Code(name: "no_space")
        public static let tooSmall = Code(name: "too_small")
    }
    public let code: Code
    public let path: String
    /// What is wrong and how to fix it.
    public let message: String
    public let cause: KernelError?

    init(_ code: Code, _ path: String, _ message: String, cause: KernelError? = nil) {
        self.code = code
        self.path = path
        self.message = message
        self.cause = cause
    }

    public var description: String { "spill file \(path): \(message)" + (cause.map { " [\($0)]" } ?? "") }
}

/// The NVMe tier: leases are fixed extents of one preallocated spill file, read and written
/// with io_uring (O_DIRECT where the filesystem allows). The checksum of every page is kept in
/// the agent's memory and checked on every read: a page that comes back different is
/// reported corrupt (and poisoned by the region), never served.
///
/// Any thread may call it at once: each call takes a ring of its own from a small pool, and
/// no lock is held across I/O. The file descriptor and rings are closed with the backend.
public final class SpillFileBackend: LeaseBackend, @unchecked Sendable {
    public let path: String
    public let leaseBytes: UInt64
    /// Bytes usable for leases: whole leases only.
    public let capacityBytes: UInt64
    /// Whether the file is open with O_DIRECT.
    public let directIO: Bool
    public var name: String { "spill-file \(path)" }
    var transport: String { directIO ? "io_uring (O_DIRECT)" : "io_uring (buffered)" }

    static let pageSize = MemWire.pageSize
    static let ringEntries: UInt32 = 64
    static let maxPooledRings = 64

    private let file: OwnedDescriptor
    private let logger: Logger
    private let rings = Mutex<[IOUring]>([])
    private let pollNanoseconds: UInt64
    private let table: Mutex<ExtentTable>
    private let stats = Stats()
    private let lastComplaint = Atomic<UInt64>(0)

    /// Opens (creating it if needed), locks and preallocates the spill file.
    /// - Parameters:
    ///   - capacityBytes: the file's size; rounded down to whole leases.
    ///   - leaseBytes: the size of one lease (one extent of the file).
    /// - Throws: `SpillFileError` when io_uring is unavailable, the directory is missing, the
    ///   file cannot be created or is in use, or the filesystem lacks the space.
    /// - Parameter pollNanoseconds: how long each read or write polls for its completions
    ///   before it sleeps (`[store] poll`; 0 sleeps at once).
    public init(path: String, capacityBytes: UInt64, leaseBytes: UInt64 = 64 << 20, directIO: SpillDirectIO = .auto,
                pollNanoseconds: UInt64 = 0, logger: Logger) throws(SpillFileError)
    {
        self.pollNanoseconds = pollNanoseconds
        let page = UInt64(Self.pageSize)
        let lease = max(page, min(leaseBytes, capacityBytes) / page * page)
        let extents = Int(capacityBytes / lease)
        self.path = path
        self.leaseBytes = lease
        self.capacityBytes = UInt64(extents) * lease
        self.logger = logger
        table = Mutex(ExtentTable(extents: extents, leaseBytes: lease))
        guard extents > 0 else {
            throw SpillFileError(.tooSmall, path, "a capacity of \(capacityBytes) bytes holds no page; set [store] capacity, e.g. \"16GiB\"")
        }
        if let reason = IOUring.unavailability() { throw SpillFileError(.ioUringUnavailable, path, reason) }
        try Self.checkDirectory(of: path)
        file = try Self.openBuffered(path)
        try Self.lock(file, path)
        try Self.reserve(file, path, bytes: self.capacityBytes, logger: logger)
        let refusal = directIO == .auto ? Self.enableDirect(file) : nil
        self.directIO = directIO == .auto && refusal == nil
        if let refusal { Self.warnBuffered(path, file: file, reason: refusal, logger: logger) }
        logger.info("spill file ready",
                    metadata: ["fp.path": "\(path)", "fp.capacity": "\(self.capacityBytes)", "fp.lease_bytes": "\(lease)",
                               "fp.io": "\(transport)"])
    }

    private var descriptor: Int32 { file.rawValue }

    public var counters: SpillFileIO { stats.snapshot(direct: directIO) }

    // MARK: Leases

    func allocateLeases(_ count: Int) throws(TransportError) -> [UInt64] {
        table.withLock { t in (0..<count).compactMap { _ in t.allocate() } }
    }

    func freeLease(_ id: UInt64) throws(TransportError) {
        let freed = table.withLock { $0.free(id) }
        if !freed { throw TransportError(.refused(code: MemErrorCode.noSuchLease.rawValue), "\(name): no lease \(id)") }
    }

    /// Where lease `id` starts in the file (tests corrupt it there).
    func fileOffset(ofLease id: UInt64) -> UInt64? { table.withLock { $0.leases[id]?.offset } }

    private func extent(_ id: UInt64) throws(TransportError) -> Extent {
        guard let extent = table.withLock({ $0.leases[id] }) else {
            throw TransportError(.refused(code: MemErrorCode.noSuchLease.rawValue), "\(name): no lease \(id)")
        }
        return extent
    }

    private func checkBounds(_ offset: UInt64, pages: Int) throws(TransportError) {
        let end = offset.addingReportingOverflow(UInt64(pages) * UInt64(Self.pageSize))
        guard pages > 0, offset % UInt64(Self.pageSize) == 0, !end.overflow, end.partialValue <= leaseBytes else {
            throw TransportError(.refused(code: MemErrorCode.outOfBounds.rawValue),
                                 "\(name): \(pages) pages at offset \(offset) do not fit a lease of \(leaseBytes) bytes")
        }
    }

    // MARK: Data path

    func write(lease id: UInt64, offset: UInt64, pages: Int, from: UnsafeRawPointer) throws(TransportError) {
        let extent = try extent(id)
        try checkBounds(offset, pages: pages)
        try withUnsafeTemporaryAllocation(of: UInt64.self, capacity: pages) { sums throws(TransportError) in
            fp_checksum_pages(from, Self.pageSize, pages, sums.baseAddress)
            try write(extent, offset: offset, pages: pages, from: from)
            // Only now: a read of the old data (a page rewritten in place) keeps matching until then.
            extent.store(UnsafeBufferPointer(sums), at: Int(offset) / Self.pageSize)
        }
    }

    private func write(_ extent: Extent, offset: UInt64, pages: Int, from: UnsafeRawPointer) throws(TransportError) {
        let length = pages * Self.pageSize
        let bounce = needsBounce(from) ? UnsafeMutableRawPointer.allocate(byteCount: length, alignment: Self.pageSize) : nil
        defer { bounce?.deallocate() }
        if let bounce { memcpy(bounce, from, length) }
        let source = bounce ?? UnsafeMutableRawPointer(mutating: from)
        let op = IOUring.Operation(direction: .write, descriptor: descriptor, buffer: source, length: length,
                                   offset: extent.offset + offset)
        let result = try withRing { ring in ring.run([op]) }[0]
        if bounce != nil { stats.bounced.add(1, ordering: .relaxed) }
        if let error = failure(of: result, op) { throw error }
        stats.writes.add(1, ordering: .relaxed)
        stats.writtenBytes.add(UInt64(length), ordering: .relaxed)
    }

    func read(lease id: UInt64, offset: UInt64, pages: Int, into: UnsafeMutableRawPointer, allowUnwritten: Bool)
        throws(TransportError)
    {
        var failure: TransportError?
        try readRuns(lease: id, runs: [LeaseReadRun(offset: offset, pages: pages, into: into)], allowUnwritten: allowUnwritten) {
            failure = $1
        }
        if let failure { throw failure }
    }

    func readRuns(lease id: UInt64, runs: [LeaseReadRun], each: (Int, TransportError?) -> Void) throws(TransportError) {
        try readRuns(lease: id, runs: runs, allowUnwritten: false, each: each)
    }

    /// All runs go to the kernel in one submission; each is checked and reported, in order, as
    /// soon as it and the runs before it are in (the first is waited for alone).
    private func readRuns(lease id: UInt64, runs: [LeaseReadRun], allowUnwritten: Bool, each: (Int, TransportError?) -> Void)
        throws(TransportError)
    {
        let extent: Extent
        do throws(TransportError) { extent = try self.extent(id) } catch {
            for j in runs.indices { each(j, error) }
            return
        }
        var refused = [TransportError?](repeating: nil, count: runs.count)
        for (j, run) in runs.enumerated() {
            do throws(TransportError) { try checkBounds(run.offset, pages: run.pages) } catch { refused[j] = error }
        }
        let plan = BouncePlan(runs, direct: directIO, pageSize: Self.pageSize, skip: refused.map { $0 != nil })
        defer { plan.release() }
        var ops: [IOUring.Operation] = []
        var opOfRun = [Int?](repeating: nil, count: runs.count)
        for (j, run) in runs.enumerated() where refused[j] == nil {
            opOfRun[j] = ops.count
            ops.append(.init(direction: .read, descriptor: descriptor, buffer: plan.target(j), length: run.pages * Self.pageSize,
                             offset: extent.offset + run.offset))
        }
        var outcomes = [Result<Int, KernelError>?](repeating: nil, count: ops.count)
        var reported = 0
        // Reports every run whose outcome is known and whose predecessors are reported.
        func reportReady() {
            while reported < runs.count {
                let j = reported
                if let k = opOfRun[j] {
                    guard let outcome = outcomes[k] else { return }
                    each(j, finish(j, runs[j], ops[k], outcome, extent: extent, lease: id, plan: plan, allowUnwritten: allowUnwritten))
                } else {
                    each(j, refused[j])
                }
                reported += 1
            }
        }
        if !ops.isEmpty {
            // A fault's page (one page, read first) is polled for; lease moves and the rest of
            // a fetch-ahead batch sleep.
            let poll = !allowUnwritten && ops[0].length == Self.pageSize
            try withRing { ring in
                ring.run(ops, poll: poll) { k, outcome in
                    outcomes[k] = outcome
                    reportReady()
                }
            }
            if plan.bouncedRuns > 0 { stats.bounced.add(UInt64(plan.bouncedRuns), ordering: .relaxed) }
        }
        reportReady()
    }

    /// The verdict on one run read by `op`: its I/O error, or its checksums' (counted).
    private func finish(_ j: Int, _ run: LeaseReadRun, _ op: IOUring.Operation, _ outcome: Result<Int, KernelError>,
                        extent: Extent, lease id: UInt64, plan: BouncePlan, allowUnwritten: Bool) -> TransportError?
    {
        if let error = failure(of: outcome, op) { return error }
        stats.reads.add(1, ordering: .relaxed)
        stats.readBytes.add(UInt64(op.length), ordering: .relaxed)
        plan.copyBack(j, run)
        return verify(extent, lease: id, run, allowUnwritten: allowUnwritten)
    }

    /// Checks pages against the checksums kept since they were written. A slot never written
    /// (checksum 0) reads as zeros with `allowUnwritten` (a lease being moved whole), and
    /// fails otherwise.
    private func verify(_ extent: Extent, lease id: UInt64, _ run: LeaseReadRun, allowUnwritten: Bool) -> TransportError? {
        let first = Int(run.offset) / Self.pageSize
        return withUnsafeTemporaryAllocation(of: UInt64.self, capacity: 2 * run.pages) { sums -> TransportError? in
            let computed = UnsafeMutableBufferPointer(rebasing: sums[..<run.pages])
            let stored = UnsafeMutableBufferPointer(rebasing: sums[run.pages...])
            fp_checksum_pages(run.into, Self.pageSize, run.pages, computed.baseAddress)
            extent.load(first, into: stored)
            for i in 0..<run.pages where computed[i] != stored[i] {
                let fileOffset = extent.offset + run.offset + UInt64(i * Self.pageSize)
                if stored[i] == 0 {
                    if allowUnwritten {
                        memset(run.into + i * Self.pageSize, 0, Self.pageSize)
                        continue
                    }
                    return TransportError(.corrupt, "\(name): slot \(first + i) of lease \(id) (file offset \(fileOffset)) was never written")
                }
                stats.checksumFailures.add(1, ordering: .relaxed)
                return TransportError(.corrupt,
                                      "\(name): page at file offset \(fileOffset) (slot \(first + i) of lease \(id)) does not match its checksum: the file was changed or the device returned bad data")
            }
            return nil
        }
    }

    /// The error of one operation that did not move all its bytes, logged (at most every 10 s).
    private func failure(of result: Result<Int, KernelError>, _ op: IOUring.Operation) -> TransportError? {
        let verb = op.direction == .read ? "reading" : "writing"
        let message: String
        switch result {
        case .success(let n) where n == op.length: return nil
        case .success(let n):
            message = "\(name): \(verb) \(op.length) bytes at file offset \(op.offset) stopped after \(n): the file is shorter than expected (was it truncated?)"
        case .failure(let error):
            message = "\(name): \(verb) \(op.length) bytes at file offset \(op.offset) failed: \(error); check the device (dmesg) and the filesystem"
        }
        complain(message)
        return TransportError(.unreachable, message)
    }

    private func complain(_ message: String) {
        let now = monotonicNanoseconds()
        let last = lastComplaint.load(ordering: .relaxed)
        guard last == 0 || now - last > 10_000_000_000,
            lastComplaint.compareExchange(expected: last, desired: now, ordering: .relaxed).exchanged
        else { return }
        logger.error("spill file I/O failed; evictions to it fail and pages stay resident, faults on its pages are retried then poisoned",
                     metadata: ["fp.path": "\(path)", "fp.error": "\(message)"])
    }

    private func needsBounce(_ buffer: UnsafeRawPointer) -> Bool {
        directIO && Int(bitPattern: buffer) % Self.pageSize != 0
    }

    /// Runs `body` on a pooled ring (this thread's for the call); a broken ring is dropped.
    private func withRing<T>(_ body: (IOUring) -> T) throws(TransportError) -> T {
        let ring: IOUring
        if let pooled = rings.withLock({ $0.popLast() }) {
            ring = pooled
        } else {
            do { ring = try IOUring(entries: Self.ringEntries, pollNanoseconds: pollNanoseconds) } catch {
                throw TransportError(.unreachable, "\(name): cannot set up an io_uring: \(error) (out of memory, or RLIMIT_MEMLOCK on kernels before 5.12)")
            }
        }
        let submitted = ring.submissions
        let polled = ring.polledCompletions
        let result = body(ring)
        stats.submissions.add(ring.submissions - submitted, ordering: .relaxed)
        stats.polled.add(ring.polledCompletions - polled, ordering: .relaxed)
        if !ring.broken { rings.withLock { if $0.count < Self.maxPooledRings { $0.append(ring) } } }
        return result
    }
}

// MARK: Setup

extension SpillFileBackend {
    static func checkDirectory(of path: String) throws(SpillFileError) {
        guard path.hasPrefix("/") else {
            throw SpillFileError(.cannotOpen, path, "the path must be absolute; set [store] path = \"/var/lib/farpage/spill\"")
        }
        let directory = (path as NSString).deletingLastPathComponent
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw SpillFileError(.missingDirectory, path,
                                 "the directory \(directory) does not exist; create it (mkdir -p -m 0700 \(directory)) or set [store] path to a file in an existing directory (under systemd, StateDirectory=farpage creates /var/lib/farpage)")
        }
    }

    static func openBuffered(_ path: String) throws(SpillFileError) -> OwnedDescriptor {
        do { return try DataFile.open(path) } catch { throw openError(path, error) }
    }

    /// Turns O_DIRECT on, and checks it with a read of the first page: some filesystems refuse
    /// it at `fcntl`, others only at the first I/O (EINVAL either way). Returns why it is off,
    /// or nil when it is on.
    static func enableDirect(_ file: OwnedDescriptor) -> String? {
        do throws(KernelError) { try DataFile.setDirect(file, true) } catch {
            return "the filesystem refuses O_DIRECT (\(error))"
        }
        guard let refusal = directReadRefusal(file) else { return nil }
        try? DataFile.setDirect(file, false)
        return "the filesystem refuses O_DIRECT reads (\(refusal))"
    }

    static func openError(_ path: String, _ error: KernelError) -> SpillFileError {
        switch error.errno {
        case ELOOP:
            return SpillFileError(.cannotOpen, path, "is a symbolic link, which the agent does not follow; point [store] path at the file itself", cause: error)
        case EACCES, EPERM, EROFS:
            return SpillFileError(.cannotOpen, path,
                                  "cannot be created or opened for writing; make its directory writable by the agent (under systemd: ReadWritePaths=, or keep it under /var/lib/farpage) or choose another [store] path",
                                  cause: error)
        case EISDIR:
            return SpillFileError(.cannotOpen, path, "is a directory; [store] path names the file itself, e.g. /var/lib/farpage/spill", cause: error)
        default:
            return SpillFileError(.cannotOpen, path, "cannot be created or opened; check the path and its filesystem, or choose another [store] path", cause: error)
        }
    }

    /// Checks that it is a regular file and takes an exclusive lock on it (one agent per file).
    static func lock(_ file: OwnedDescriptor, _ path: String) throws(SpillFileError) {
        let status: DataFile.Status
        do throws(KernelError) { status = try DataFile.status(file) } catch {
            throw SpillFileError(.cannotOpen, path, "cannot be inspected; check the path and its filesystem", cause: error)
        }
        guard status.isRegular else {
            throw SpillFileError(.cannotOpen, path, "is not a regular file; point [store] path at a file (it is created if missing)")
        }
        do throws(KernelError) { try DataFile.lock(file) } catch where error.errno == EWOULDBLOCK {
            throw SpillFileError(.inUse, path, "is in use by another process (another agent?); give each agent its own spill file",
                                 cause: error)
        } catch {
            throw SpillFileError(.cannotOpen, path, "cannot be locked; check the filesystem supports flock(2)", cause: error)
        }
    }

    /// Sizes the file to `bytes` and reserves its blocks, or refuses when the filesystem lacks
    /// the space. Where it cannot preallocate (no fallocate), the file is sparse (logged).
    static func reserve(_ file: OwnedDescriptor, _ path: String, bytes: UInt64, logger: Logger) throws(SpillFileError) {
        let status: DataFile.Status
        let space: DataFile.Space
        do throws(KernelError) {
            status = try DataFile.status(file)
            space = try DataFile.space(file)
        } catch { throw SpillFileError(.cannotOpen, path, "cannot inspect the file or its filesystem", cause: error) }
        let missing = bytes > status.allocated ? bytes - status.allocated : 0
        if space.total > 0 && missing > space.available {
            throw noSpace(path, bytes: bytes, available: space.available + status.allocated, cause: nil)
        }
        do throws(KernelError) {
            if status.size > bytes { try DataFile.truncate(file, length: bytes) }
            try DataFile.preallocate(file, length: bytes)
        } catch where error.errno == ENOSPC || error.errno == EDQUOT || error.errno == EFBIG {
            throw noSpace(path, bytes: bytes, available: space.available + status.allocated, cause: error)
        } catch where error.errno == EOPNOTSUPP {
            do throws(KernelError) { try DataFile.truncate(file, length: bytes) } catch {
                throw SpillFileError(.cannotOpen, path, "cannot be sized to \(bytes) bytes", cause: error)
            }
            logger.warning(
                "the spill file's filesystem cannot preallocate (no fallocate); the file is sparse, so a full filesystem shows up later as failed evictions (pages stay resident); put it on ext4 or xfs to reserve the space at start",
                metadata: ["fp.path": "\(path)", "fp.fs": "\(DataFile.filesystemName(space.type))"])
        } catch {
            throw SpillFileError(.cannotOpen, path, "cannot be sized to \(bytes) bytes", cause: error)
        }
    }

    static func noSpace(_ path: String, bytes: UInt64, available: UInt64, cause: KernelError?) -> SpillFileError {
        SpillFileError(.noSpace, path,
                       "needs \(bytes) bytes ([store] capacity) but its filesystem has \(available) available; lower [store] capacity or free space there",
                       cause: cause)
    }

    /// Whether an O_DIRECT read of the first page fails (EINVAL: the filesystem refuses direct
    /// I/O only when it is done). Other errors are left to the data path to report.
    static func directReadRefusal(_ file: OwnedDescriptor) -> KernelError? {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: pageSize, alignment: pageSize)
        defer { buffer.deallocate() }
        guard let ring = try? IOUring(entries: 2) else { return nil }
        let op = IOUring.Operation(direction: .read, descriptor: file.rawValue, buffer: buffer, length: pageSize, offset: 0)
        if case .failure(let error) = ring.run([op])[0], error.errno == EINVAL { return error }
        return nil
    }

    static func warnBuffered(_ path: String, file: OwnedDescriptor, reason: String, logger: Logger) {
        let fs = (try? DataFile.space(file)).map { DataFile.filesystemName($0.type) } ?? "its filesystem"
        logger.warning(
            "spill file without O_DIRECT: \(reason); using buffered I/O, so spilled pages also pass through the page cache (put the spill file on ext4 or xfs on a local disk to avoid that)",
            metadata: ["fp.path": "\(path)", "fp.fs": "\(fs)"])
    }
}

// MARK: Extents

/// One lease's extent of the file, and the checksums of its pages (0: never written).
final class Extent: Sendable {
    let index: Int
    let offset: UInt64
    private let sums: Mutex<[UInt64]>

    init(index: Int, offset: UInt64, pages: Int) {
        self.index = index
        self.offset = offset
        sums = Mutex([UInt64](repeating: 0, count: pages))
    }

    func store(_ values: UnsafeBufferPointer<UInt64>, at first: Int) {
        sums.withLock { s in s.withUnsafeMutableBufferPointer { (($0.baseAddress! + first)).update(from: values.baseAddress!, count: values.count) } }
    }

    func load(_ first: Int, into values: UnsafeMutableBufferPointer<UInt64>) {
        sums.withLock { s in s.withUnsafeBufferPointer { values.baseAddress!.update(from: $0.baseAddress! + first, count: values.count) } }
    }
}

/// Which extents of the file hold leases. Freed extents are reused lowest offset first; lease
/// ids are never reused, so a stale id fails instead of reaching another lease's pages.
struct ExtentTable {
    let extents: Int
    let leaseBytes: UInt64
    private(set) var leases: [UInt64: Extent] = [:]
    /// Free extent indices below `nextFresh`, highest first (`popLast` is the lowest).
    private var freed: [Int] = []
    private var nextFresh = 0
    private var nextID: UInt64 = 1

    init(extents: Int, leaseBytes: UInt64) {
        self.extents = extents
        self.leaseBytes = leaseBytes
    }

    mutating func allocate() -> UInt64? {
        let index: Int
        if let reused = freed.popLast() {
            index = reused
        } else if nextFresh < extents {
            index = nextFresh
            nextFresh += 1
        } else {
            return nil
        }
        let id = nextID
        nextID += 1
        leases[id] = Extent(index: index, offset: UInt64(index) * leaseBytes, pages: Int(leaseBytes) / MemWire.pageSize)
        return id
    }

    mutating func free(_ id: UInt64) -> Bool {
        guard let extent = leases.removeValue(forKey: id) else { return false }
        let at = freed.firstIndex { $0 < extent.index } ?? freed.endIndex
        freed.insert(extent.index, at: at)
        return true
    }
}

// MARK: Buffers and counters

/// Aligned stand-ins for run buffers O_DIRECT cannot use (not page-aligned).
final class BouncePlan {
    private var buffers: [UnsafeMutableRawPointer?]
    private(set) var bouncedRuns = 0
    private let runs: [LeaseReadRun]

    init(_ runs: [LeaseReadRun], direct: Bool, pageSize: Int, skip: [Bool]) {
        self.runs = runs
        buffers = runs.enumerated().map { j, run in
            guard direct, !skip[j], Int(bitPattern: run.into) % pageSize != 0 else { return nil }
            return UnsafeMutableRawPointer.allocate(byteCount: run.pages * pageSize, alignment: pageSize)
        }
        bouncedRuns = buffers.filter { $0 != nil }.count
    }

    func target(_ j: Int) -> UnsafeMutableRawPointer { buffers[j] ?? runs[j].into }

    func copyBack(_ j: Int, _ run: LeaseReadRun) {
        if let b = buffers[j] { memcpy(run.into, b, run.pages * MemWire.pageSize) }
    }

    func release() { buffers.forEach { $0?.deallocate() } }
}

final class Stats: Sendable {
    let reads = Atomic<UInt64>(0)
    let writes = Atomic<UInt64>(0)
    let readBytes = Atomic<UInt64>(0)
    let writtenBytes = Atomic<UInt64>(0)
    let submissions = Atomic<UInt64>(0)
    let checksumFailures = Atomic<UInt64>(0)
    let bounced = Atomic<UInt64>(0)
    let polled = Atomic<UInt64>(0)

    func snapshot(direct: Bool) -> SpillFileIO {
        SpillFileIO(
            direct: direct, reads: reads.load(ordering: .relaxed), writes: writes.load(ordering: .relaxed),
            readBytes: readBytes.load(ordering: .relaxed), writtenBytes: writtenBytes.load(ordering: .relaxed),
            submissions: submissions.load(ordering: .relaxed), checksumFailures: checksumFailures.load(ordering: .relaxed),
            bounced: bounced.load(ordering: .relaxed), polled: polled.load(ordering: .relaxed))
    }
}
