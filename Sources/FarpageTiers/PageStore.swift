import Synchronization

/// Where a far tier keeps one page: an opaque, store-defined 48-bit value.
public struct PageLocation: Hashable, Sendable, CustomStringConvertible {
    public static let bits = 48
    public static let maxRaw: UInt64 = (1 << 48) - 1
    public let raw: UInt64
    public init(raw: UInt64) {
        precondition(raw <= PageLocation.maxRaw, "page location out of range")
        self.raw = raw
    }
    public var description: String { "slot \(raw)" }
}

/// Why a far tier could not serve a page.
public struct StoreError: Error, CustomStringConvertible, Sendable, Equatable {
    public struct Code: Hashable, Sendable {
        let name: String
        public static let full = Code(name: "full")
        public static let badLocation = Code(name: "bad_location")
        public static let unavailable = Code(name: "unavailable")
        public static let corrupt = Code(name: "corrupt")
        /// Gone for good (the server restarted, was removed, or no longer holds the lease):
        /// poison at once, retrying cannot help.
        public static let lost = Code(name: "lost")
    }
    public let code: Code
    public let message: String
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }
    public var description: String { "store error (\(code.name)): \(message)" }
}

/// A batch of page reads or writes submitted to a `PageStore` at once.
///
/// Buffers are owned by the submitter and must stay valid until the completion
/// runs. Every buffer holds exactly one page (`PageStore.pageSize` bytes).
public final class PageIOBatch: @unchecked Sendable {
    public enum Kind: Sendable { case read, write }
    public let kind: Kind
    /// One page each.
    public var buffers: [UnsafeMutableRawPointer] = []
    /// Read: the location to read. Write: a location the page already owns (overwritten in
    /// place) or nil for a fresh one; on completion, where the page now lives.
    public var locations: [PageLocation?] = []
    /// On completion: nil for pages that succeeded.
    public var errors: [StoreError?] = []

    public init(kind: Kind, capacity: Int = 0) {
        self.kind = kind
        buffers.reserveCapacity(capacity)
        locations.reserveCapacity(capacity)
    }

    public var count: Int { buffers.count }

    public func append(buffer: UnsafeMutableRawPointer, location: PageLocation?) {
        buffers.append(buffer)
        locations.append(location)
    }

    public func reset() {
        buffers.removeAll(keepingCapacity: true)
        locations.removeAll(keepingCapacity: true)
        errors.removeAll(keepingCapacity: true)
    }
}

/// A far tier: somewhere pages go when they leave local DRAM.
///
/// The interface is asynchronous and batched so that network and NVMe tiers can
/// keep many operations in flight: `submit` returns at once and `completion`
/// runs (on any thread) when every page of the batch is done. A write is
/// complete only when the page is durable in the tier (the eviction protocol
/// punches the local copy after that).
public protocol PageStore: AnyObject, Sendable {
    /// Short name for logs and metrics, e.g. `memory`.
    var name: String { get }
    var pageSize: Int { get }
    /// Pages the tier can hold and holds now.
    var capacityPages: UInt64 { get }
    var usedPages: UInt64 { get }
    /// Starts the batch; `completion` runs exactly once.
    func submit(_ batch: PageIOBatch, completion: @escaping @Sendable (PageIOBatch) -> Void)
    /// Frees locations whose pages are no longer needed.
    func release(_ locations: [PageLocation])
    /// Whether the copy at `location` can be read now (its tier is up).
    func isReadable(_ location: PageLocation) -> Bool
    /// Whether a clean page whose copy is at `location`, used since it was fetched, should be
    /// written again when evicted rather than only dropped: its copy cannot be read now, or
    /// the store wants it in a faster tier (promotion).
    func rewriteOnEviction(_ location: PageLocation) -> Bool
    /// Whether the copy at `location` cannot be read now but may be later (its memory server
    /// stopped answering and is not known to have lost it): a fault on it waits.
    func mayComeBack(_ location: PageLocation) -> Bool
    /// Reads `batch` (kind `.read`) on the calling thread, calling `ready(k)` whenever pages
    /// `0..<k` are complete (k grows; the last call has `batch.count`), so the caller can
    /// install the first pages while later ones are still on their way. Page `i` failed when
    /// `batch.errors[i]` is set.
    func read(_ batch: PageIOBatch, chunkPages: Int, ready: (Int) -> Void)
}

extension PageStore {
    public func isReadable(_ location: PageLocation) -> Bool { true }
    public func rewriteOnEviction(_ location: PageLocation) -> Bool { !isReadable(location) }
    public func mayComeBack(_ location: PageLocation) -> Bool { false }

    /// Tiers without streaming reads: the whole batch, then one `ready`.
    public func read(_ batch: PageIOBatch, chunkPages: Int, ready: (Int) -> Void) {
        submitAndWait(batch)
        ready(batch.count)
    }
}

extension PageStore {
    /// Submits and blocks the calling (dedicated, non-cooperative) thread until completion.
    public func submitAndWait(_ batch: PageIOBatch) {
        let done = CompletionLatch()
        submit(batch) { _ in done.signal() }
        done.wait()
    }
}

/// Whether `size` bytes (a multiple of 8) at `p` are all zero.
@inline(__always)
public func isZeroPage(_ p: UnsafeRawPointer, _ size: Int) -> Bool {
    let words = p.assumingMemoryBound(to: UInt64.self)
    var acc: UInt64 = 0
    for i in 0..<(size / 8) { acc |= words[i] }
    return acc == 0
}

/// A one-shot latch for waiting on a completion from a dedicated thread.
public final class CompletionLatch: @unchecked Sendable {
    private let state = Mutex(false)
    private var condition = pthread_cond_t()
    private var mutex = pthread_mutex_t()

    public init() {
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&condition, nil)
    }
    deinit {
        pthread_cond_destroy(&condition)
        pthread_mutex_destroy(&mutex)
    }
    public func signal() {
        pthread_mutex_lock(&mutex)
        state.withLock { $0 = true }
        pthread_cond_signal(&condition)
        pthread_mutex_unlock(&mutex)
    }
    public func wait() {
        pthread_mutex_lock(&mutex)
        while !state.withLock({ $0 }) { pthread_cond_wait(&condition, &mutex) }
        pthread_mutex_unlock(&mutex)
    }
}

#if canImport(Glibc)
import Glibc
#endif
