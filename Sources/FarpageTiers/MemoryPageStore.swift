import FarpageKernel
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A far tier inside the agent's own memory: slabs of anonymous memory carved into page slots.
///
/// The stand-in far tier of a single-host agent (memory servers, NVMe and CXL
/// come behind the same `PageStore` interface). Completes every batch inline.
/// Memory is reserved lazily, one slab at a time, and freed slots are reused.
public final class MemoryPageStore: PageStore, @unchecked Sendable {
    public let name = "memory"
    public let pageSize: Int
    public let capacityPages: UInt64
    private let slabPages: UInt64

    private struct State {
        var slabs: [UnsafeMutableRawPointer] = []
        var freeSlots: [UInt64] = []
        var nextFresh: UInt64 = 0
        var used: UInt64 = 0
    }
    private let state = Mutex(State())

    /// - Parameters:
    ///   - capacityBytes: most bytes the store will hold.
    ///   - slabBytes: how much anonymous memory to reserve at a time.
    public init(capacityBytes: UInt64, pageSize: Int = systemPageSize, slabBytes: UInt64 = 64 << 20) {
        self.pageSize = pageSize
        self.capacityPages = capacityBytes / UInt64(pageSize)
        self.slabPages = max(1, slabBytes / UInt64(pageSize))
    }

    deinit {
        state.withLock { s in
            for slab in s.slabs { AnonymousMemory.unmap(slab, bytes: slabPages * UInt64(pageSize)) }
        }
    }

    public var usedPages: UInt64 { state.withLock { $0.used } }

    /// Bytes of anonymous memory reserved for slabs.
    public var reservedBytes: UInt64 { state.withLock { UInt64($0.slabs.count) } * slabPages * UInt64(pageSize) }

    private func address(_ slot: UInt64, _ s: borrowing State) -> UnsafeMutableRawPointer? {
        let slab = Int(slot / slabPages)
        guard slab < s.slabs.count else { return nil }
        return s.slabs[slab] + Int(slot % slabPages) * pageSize
    }

    public func submit(_ batch: PageIOBatch, completion: @escaping @Sendable (PageIOBatch) -> Void) {
        let size = pageSize
        batch.errors = Array(repeating: nil, count: batch.count)
        for i in 0..<batch.count {
            switch batch.kind {
            case .read:
                guard let location = batch.locations[i],
                    let source = state.withLock({ s in address(location.raw, s) })
                else {
                    batch.errors[i] = StoreError(.badLocation, "no page at \(String(describing: batch.locations[i]))")
                    continue
                }
                memcpy(batch.buffers[i], source, size)
            case .write:
                let slot: UInt64? = state.withLock { s in
                    if let existing = batch.locations[i], existing.raw < s.nextFresh { return existing.raw }
                    return allocate(&s)
                }
                guard let slot, let target = state.withLock({ s in address(slot, s) }) else {
                    batch.errors[i] = StoreError(.full, "memory store full (\(capacityPages) pages)")
                    continue
                }
                memcpy(target, batch.buffers[i], size)
                batch.locations[i] = PageLocation(raw: slot)
            }
        }
        completion(batch)
    }

    private func allocate(_ s: inout State) -> UInt64? {
        if let slot = s.freeSlots.popLast() {
            s.used += 1
            return slot
        }
        guard s.nextFresh < capacityPages else { return nil }
        let slot = s.nextFresh
        if slot / slabPages >= UInt64(s.slabs.count) {
            guard let slab = try? AnonymousMemory.map(bytes: slabPages * UInt64(pageSize)) else { return nil }
            s.slabs.append(slab)
        }
        s.nextFresh += 1
        s.used += 1
        return slot
    }

    public func release(_ locations: [PageLocation]) {
        guard !locations.isEmpty else { return }
        state.withLock { s in
            for location in locations where location.raw < s.nextFresh {
                s.freeSlots.append(location.raw)
                s.used -= 1
            }
        }
    }
}
