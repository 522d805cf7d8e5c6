/// A region's page table: a two-level radix of 8-byte entries whose leaves
/// (512 entries, 2 MiB of address space) are allocated on first write.
///
/// A never-touched 1 TiB region costs 8 bytes per 512 pages. Not thread-safe:
/// the region lock guards it.
final class PageTable {
    static let leafShift = 9
    static let leafSize = 1 << leafShift
    let pageCount: Int
    private let leafCount: Int
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
                let leaf = UnsafeMutablePointer<UInt64>.allocate(capacity: Self.leafSize)
                leaf.initialize(repeating: 0, count: Self.leafSize)
                leaves[index] = leaf
                allocatedLeaves += 1
            }
            leaves[index]![page & (Self.leafSize - 1)] = newValue.raw
        }
    }

    /// Calls `body` for every entry that is not all-zero (never-touched pages are skipped).
    func forEachEntry(_ body: (Int, PageEntry) -> Void) {
        for i in 0..<leafCount {
            guard let leaf = leaves[i] else { continue }
            for j in 0..<Self.leafSize where leaf[j] != 0 { body(i << Self.leafShift + j, PageEntry(raw: leaf[j])) }
        }
    }

    /// Bytes this table uses.
    var bookkeepingBytes: Int { leafCount * 8 + allocatedLeaves * Self.leafSize * 8 }
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

    mutating func pop() -> Int? {
        guard count > 0 else { return nil }
        let page = Int(ring[head])
        head = (head + 1) % ring.count
        count -= 1
        return page
    }

    var bookkeepingBytes: Int { ring.count * 4 }
}
