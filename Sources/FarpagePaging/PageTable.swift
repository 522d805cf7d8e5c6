/// A region's page table: a two-level radix of 8-byte entries whose leaves
/// (512 entries, 2 MiB of address space) are allocated on first write.
///
/// A never-touched 1 TiB region costs 8 bytes per 512 pages. Each leaf also holds each
/// page's `PageHistory` (8 more bytes per page). Not thread-safe: the region lock guards it.
final class PageTable {
    static let leafShift = 9
    static let leafSize = 1 << leafShift
    let pageCount: Int
    private let leafCount: Int
    /// A leaf is 2 x 512 words: the entries, then the histories.
    private let leaves: UnsafeMutablePointer<UnsafeMutablePointer<UInt64>?>
    private(set) var allocatedLeaves = 0

    init(pageCount: Int) {
        self.pageCount = pageCount
        leafCount = (pageCount + Self.leafSize - 1) >> Self.leafShift
        leaves = .allocate(capacity: leafCount)
        leaves.initialize(repeating: nil, count: leafCount)
    }

    deinit {
        for i in 0..<leafCount { leaves[i]?.deallocate() }
        leaves.deallocate()
    }

    subscript(page: Int) -> PageEntry {
        get {
            guard let leaf = leaves[page >> Self.leafShift] else { return PageEntry() }
            return PageEntry(raw: leaf[page & (Self.leafSize - 1)])
        }
        set {
            let index = page >> Self.leafShift
            if leaves[index] == nil {
                if newValue.raw == 0 { return }
                allocateLeaf(index)
            }
            leaves[index]![page & (Self.leafSize - 1)] = newValue.raw
        }
    }

    private func allocateLeaf(_ index: Int) {
        let leaf = UnsafeMutablePointer<UInt64>.allocate(capacity: 2 * Self.leafSize)
        leaf.initialize(repeating: 0, count: 2 * Self.leafSize)
        leaves[index] = leaf
        allocatedLeaves += 1
    }

    /// A page's movement history (all zero for a page never touched).
    func history(_ page: Int) -> PageHistory {
        guard let leaf = leaves[page >> Self.leafShift] else { return PageHistory() }
        return PageHistory(raw: leaf[Self.leafSize + page & (Self.leafSize - 1)])
    }

    func setHistory(_ page: Int, _ h: PageHistory) {
        let index = page >> Self.leafShift
        if leaves[index] == nil { allocateLeaf(index) }
        leaves[index]![Self.leafSize + page & (Self.leafSize - 1)] = h.raw
    }

    /// Calls `body` for every entry that is not all-zero (never-touched pages are skipped).
    func forEachEntry(_ body: (Int, PageEntry) -> Void) {
        for i in 0..<leafCount {
            guard let leaf = leaves[i] else { continue }
            for j in 0..<Self.leafSize where leaf[j] != 0 { body(i << Self.leafShift + j, PageEntry(raw: leaf[j])) }
        }
    }

    /// Bytes this table uses.
    var bookkeepingBytes: Int { leafCount * 8 + allocatedLeaves * Self.leafSize * 16 }
}

/// The resident pages of a region in the order they became resident (a CLOCK queue).
struct ResidentQueue {
    private var ring: [UInt32] = []
    private var head = 0
    private(set) var count = 0

    mutating func push(_ page: Int) {
        if count == ring.count {
            var grown = [UInt32](repeating: 0, count: max(64, ring.count * 2))
            for i in 0..<count { grown[i] = ring[(head + i) % ring.count] }
            ring = grown
            head = 0
        }
        ring[(head + count) % ring.count] = UInt32(page)
        count += 1
    }

    /// Puts a page back at the head (it stays the next to go).
    mutating func pushFront(_ page: Int) {
        if count == ring.count { push(page); _ = popLast(); }
        head = (head + ring.count - 1) % ring.count
        ring[head] = UInt32(page)
        count += 1
    }

    private mutating func popLast() -> Int {
        count -= 1
        return Int(ring[(head + count) % ring.count])
    }

    mutating func pop() -> Int? {
        guard count > 0 else { return nil }
        let page = Int(ring[head])
        head = (head + 1) % ring.count
        count -= 1
        return page
    }

    var bookkeepingBytes: Int { ring.count * 4 }
}

/// What the tier manager remembers about a page, packed in 8 bytes.
///
/// Layout: bits 0–31 stamp, 32–47 migrations in the current window, 48–63 that window's
/// number (low 16 bits). The stamp is the time it became resident (milliseconds since the
/// region was created) while it is resident, and the region's eviction sequence number when
/// it left, so a refault's distance (evictions since) is one subtraction.
struct PageHistory: Equatable {
    var raw: UInt64 = 0
    var stamp: UInt32 {
        get { UInt32(truncatingIfNeeded: raw) }
        set { raw = (raw & ~0xFFFF_FFFF) | UInt64(newValue) }
    }
    var migrations: UInt16 { UInt16(truncatingIfNeeded: raw >> 32) }
    var window: UInt16 { UInt16(truncatingIfNeeded: raw >> 48) }

    /// Counts one move in `window`; returns the page's moves in that window.
    mutating func countMigration(window now: UInt16) -> Int {
        let n: UInt16 = window == now ? (migrations == .max ? .max : migrations + 1) : 1
        raw = UInt64(stamp) | UInt64(n) << 32 | UInt64(now) << 48
        return Int(n)
    }
}
