import FarpageKernel
import FarpageTiers
import Logging
import Synchronization

/// Fences a region (or view) against its release: every operation that may touch the
/// client's address range enters and leaves it; `closeAndDrain` closes it and waits until
/// none is left. Needed because the kernel lets a userfaultfd install pages into any
/// registered mapping of the process, not only its own: after release the client may map
/// a new region at the same addresses (docs/decisions.md, 32).
public final class OperationGate: Sendable {
    private let closed = Atomic<Bool>(false)
    private let inFlight = Atomic<Int>(0)
    public init() {}

    public var isClosed: Bool { closed.load(ordering: .acquiring) }

    /// Enters an operation; false once closed. Dekker-style with `closeAndDrain`: each side
    /// writes its own flag, then reads the other's (sequentially consistent).
    @inline(__always) public func enter() -> Bool {
        inFlight.wrappingAdd(1, ordering: .sequentiallyConsistent)
        if closed.load(ordering: .sequentiallyConsistent) {
            inFlight.wrappingSubtract(1, ordering: .sequentiallyConsistent)
            return false
        }
        return true
    }
    @inline(__always) public func leave() { inFlight.wrappingSubtract(1, ordering: .sequentiallyConsistent) }

    /// Stops new operations without waiting.
    public func close() { closed.store(true, ordering: .sequentiallyConsistent) }

    /// Stops new operations and waits until those under way are done.
    public func closeAndDrain() {
        close()
        while inFlight.load(ordering: .sequentiallyConsistent) > 0 { usleep(50) }
    }
}

#if canImport(Glibc)
import Glibc
#endif

/// What a fault thread serves: something with a userfaultfd and a fault handler.
public protocol FaultTarget: AnyObject, Sendable {
    var id: UInt64 { get }
    var uffd: Userfaultfd { get }
    /// Returns true when the evictor should be woken.
    func handleFault(address: UInt64, write: Bool, writeProtect: Bool, thread: UInt32, staging: StagingBuffer,
                     evictStaging: StagingBuffer) -> Bool
}

extension Region: FaultTarget {}

/// A forked child's view of one of its parent's regions.
///
/// The child maps the region's memfd `MAP_PRIVATE` at the same address and registers that
/// mapping for missing faults. Pages resident in the memfd are in the page cache, so the child
/// maps them without a fault (and copies them on its first write: the kernel's copy on write);
/// a missing fault means the page is not in the memfd, and the view installs a private copy of
/// it from the parent's far tier, or zeros for a page never written. Nothing the child does
/// reaches the memfd or the parent's page table, and the view holds the parent's `Region`, so
/// its far copies outlive the parent until the last view goes (see docs/decisions.md, "Fork").
public final class RegionView: FaultTarget, @unchecked Sendable {
    public let id: UInt64
    public let uffd: Userfaultfd
    public let source: Region
    public let owner: PeerCredentials
    let zeroPage: UnsafeMutableRawPointer
    let logger: Logger
    public let counters = RegionCounters()
    let gate = OperationGate()

    /// Stops serving and waits until no install into the child's range is under way (the
    /// child may map something else there once the view is gone).
    public func closeAndDrain() { gate.closeAndDrain() }
    /// Faults served for the child.
    public var faultCount: UInt64 { counters.missingFaults.value }

    public init(id: UInt64, source: Region, uffd: Userfaultfd, owner: PeerCredentials, zeroPage: UnsafeMutableRawPointer,
                logger: Logger)
    {
        self.id = id
        self.source = source
        self.uffd = uffd
        self.owner = owner
        self.zeroPage = zeroPage
        var l = logger
        l[metadataKey: "fp.view"] = "\(id)"
        l[metadataKey: "fp.region"] = "\(source.id)"
        self.logger = l
    }

    public func handleFault(address: UInt64, write: Bool, writeProtect: Bool, thread: UInt32, staging: StagingBuffer,
                            evictStaging: StagingBuffer) -> Bool
    {
        guard gate.enter() else { return false }
        defer { gate.leave() }
        let spec = source.spec
        let pageAddress = address & ~UInt64(spec.pageSize - 1)
        guard !writeProtect, pageAddress >= spec.address, pageAddress - spec.address < spec.length else { return false }
        let page = Int((pageAddress - spec.address) / UInt64(spec.pageSize))
        counters.missingFaults.bump()
        // A few rounds: a page in flight in the parent (being installed or punched) settles in
        // microseconds; each round re-reads its state.
        for round in 0..<1000 {
            let entry = source.core.withLock { $0.table[page] }
            switch entry.state {
            case .untouched:
                counters.zeroFills.bump()
                install(pageAddress, from: zeroPage)
                return false
            case .far:
                guard let location = entry.location else { break }
                let batch = PageIOBatch(kind: .read, capacity: 1)
                batch.append(buffer: staging.page(0), location: location)
                source.store.submitAndWait(batch)
                if let error = batch.errors[0] {
                    if error.code == .lost {
                        logger.error("a forked child's page is lost; poisoning it in the child", metadata: ["fp.page": "\(page)"])
                        try? uffd.poison(address: pageAddress, length: UInt64(spec.pageSize), thread: thread)
                        return false
                    }
                    usleep(UInt32(min(round + 1, 10)) * 10_000)
                    continue
                }
                // The slot read must still be this page's: had the parent rewritten the page and
                // freed the slot meanwhile, another page's bytes could be in it now.
                let still = source.core.withLock { $0.table[page] }
                guard still.state == .far, still.location == location else { continue }
                counters.fetches.bump()
                install(pageAddress, from: staging.page(0))
                return false
            case .lost:
                try? uffd.poison(address: pageAddress, length: UInt64(spec.pageSize), thread: thread)
                return false
            case .resident, .evicting:
                // In the memfd: retrying finds it in the page cache.
                uffd.wake(address: pageAddress, length: UInt64(spec.pageSize))
                return false
            case .punching, .fetching:
                break
            }
            usleep(50)
        }
        logger.warning("a forked child's fault found the page in flight for too long; it faults again",
                       metadata: ["fp.page": "\(page)"])
        uffd.wake(address: pageAddress, length: UInt64(source.spec.pageSize))
        return false
    }

    /// A private, writable copy in the child (UFFDIO_COPY into a MAP_PRIVATE mapping).
    private func install(_ address: UInt64, from source: UnsafeRawPointer) {
        let size = self.source.spec.pageSize
        do {
            switch try uffd.copy(to: address, from: source, length: size, writeProtect: false) {
            case .installed: break
            case .alreadyPresent, .clientGone: uffd.wake(address: address, length: UInt64(size))
            }
        } catch {
            logger.error("installing a page in a forked child failed", metadata: ["fp.error": "\(error)"])
            uffd.wake(address: address, length: UInt64(size))
        }
    }
}
