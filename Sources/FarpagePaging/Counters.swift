import Synchronization

/// A region's counters, updated without locks.
public final class RegionCounters: Sendable {
    public let missingFaults = Atomic<UInt64>(0)
    public let zeroFills = Atomic<UInt64>(0)
    public let fetches = Atomic<UInt64>(0)
    public let writeProtectFaults = Atomic<UInt64>(0)
    public let evictions = Atomic<UInt64>(0)
    public let writebacks = Atomic<UInt64>(0)
    public let cleanEvictions = Atomic<UInt64>(0)
    public let zeroEvictions = Atomic<UInt64>(0)
    public let cancelledEvictions = Atomic<UInt64>(0)
    public let prefetchedPages = Atomic<UInt64>(0)
    public let foreignPages = Atomic<UInt64>(0)
    public let lostPages = Atomic<UInt64>(0)
    /// Prefetched pages later known to be used (the stream passed them, or a write touched them).
    public let prefetchHits = Atomic<UInt64>(0)
    /// Prefetched pages evicted unused.
    public let prefetchWasted = Atomic<UInt64>(0)
    /// Refaults close enough to their eviction to make the page active (hot).
    public let refaultActivations = Atomic<UInt64>(0)
    /// Moves of a page between local DRAM and a far tier (evictions and fetches).
    public let migrations = Atomic<UInt64>(0)
    /// Pages evicted before their minimum residence time because the budget insisted.
    public let residenceOverrides = Atomic<UInt64>(0)
    /// Faults that waited for an unreachable far tier to come back instead of failing.
    public let outageWaits = Atomic<UInt64>(0)
    public init() {}
}

extension Atomic where Value == UInt64 {
    @inline(__always) func bump(_ by: UInt64 = 1) { _ = wrappingAdd(by, ordering: .relaxed) }
    @inline(__always) var value: UInt64 { load(ordering: .relaxed) }
}

/// A snapshot of counters in the order of `struct farpage_stats` (see farpage.h).
public struct StatsSnapshot: Sendable, Codable, Equatable {
    public var sizeBytes: UInt64 = 0
    public var pageSize: UInt64 = 0
    public var residentPages: UInt64 = 0
    public var farPages: UInt64 = 0
    public var budgetPages: UInt64 = 0
    public var missingFaults: UInt64 = 0
    public var zeroFills: UInt64 = 0
    public var fetches: UInt64 = 0
    public var writeProtectFaults: UInt64 = 0
    public var evictions: UInt64 = 0
    public var writebacks: UInt64 = 0
    public var cleanEvictions: UInt64 = 0
    public var zeroEvictions: UInt64 = 0
    public var cancelledEvictions: UInt64 = 0
    public var prefetchedPages: UInt64 = 0
    public var regions: UInt64 = 0
    /// Not in `struct farpage_stats` (reported in JSON only).
    public var lostPages: UInt64 = 0
    public var foreignPages: UInt64 = 0
    public var prefetchHits: UInt64 = 0
    public var prefetchWasted: UInt64 = 0
    public var refaultActivations: UInt64 = 0
    public var migrations: UInt64 = 0
    public var residenceOverrides: UInt64 = 0
    public var outageWaits: UInt64 = 0
    /// The most moves of one page within one migration window (a maximum, not a sum).
    public var peakPageMigrationsPerWindow: UInt64 = 0
    /// The most moves of one page within the last complete window (a maximum).
    public var lastWindowPeakMigrations: UInt64 = 0

    public init() {}

    /// The fields in wire order.
    public var fields: [UInt64] {
        [
            sizeBytes, pageSize, residentPages, farPages, budgetPages, missingFaults, zeroFills, fetches,
            writeProtectFaults, evictions, writebacks, cleanEvictions, zeroEvictions, cancelledEvictions,
            prefetchedPages, regions,
        ]
    }

    public static func + (a: StatsSnapshot, b: StatsSnapshot) -> StatsSnapshot {
        var s = StatsSnapshot()
        s.sizeBytes = a.sizeBytes + b.sizeBytes
        s.pageSize = max(a.pageSize, b.pageSize)
        s.residentPages = a.residentPages + b.residentPages
        s.farPages = a.farPages + b.farPages
        s.budgetPages = a.budgetPages + b.budgetPages
        s.missingFaults = a.missingFaults + b.missingFaults
        s.zeroFills = a.zeroFills + b.zeroFills
        s.fetches = a.fetches + b.fetches
        s.writeProtectFaults = a.writeProtectFaults + b.writeProtectFaults
        s.evictions = a.evictions + b.evictions
        s.writebacks = a.writebacks + b.writebacks
        s.cleanEvictions = a.cleanEvictions + b.cleanEvictions
        s.zeroEvictions = a.zeroEvictions + b.zeroEvictions
        s.cancelledEvictions = a.cancelledEvictions + b.cancelledEvictions
        s.prefetchedPages = a.prefetchedPages + b.prefetchedPages
        s.regions = a.regions + b.regions
        s.lostPages = a.lostPages + b.lostPages
        s.foreignPages = a.foreignPages + b.foreignPages
        s.prefetchHits = a.prefetchHits + b.prefetchHits
        s.prefetchWasted = a.prefetchWasted + b.prefetchWasted
        s.refaultActivations = a.refaultActivations + b.refaultActivations
        s.migrations = a.migrations + b.migrations
        s.residenceOverrides = a.residenceOverrides + b.residenceOverrides
        s.outageWaits = a.outageWaits + b.outageWaits
        s.peakPageMigrationsPerWindow = max(a.peakPageMigrationsPerWindow, b.peakPageMigrationsPerWindow)
        s.lastWindowPeakMigrations = max(a.lastWindowPeakMigrations, b.lastWindowPeakMigrations)
        return s
    }
}

/// Resident pages of all regions against the agent-wide budget.
public final class ResidentBudget: Sendable {
    public let budgetPages: Int
    public let highPages: Int
    public let lowPages: Int
    let resident = Atomic<Int>(0)

    public init(budgetPages: Int, highWatermark: Double, lowWatermark: Double) {
        self.budgetPages = budgetPages
        self.highPages = max(1, Int(Double(budgetPages) * highWatermark))
        self.lowPages = max(0, Int(Double(budgetPages) * lowWatermark))
    }

    public var residentPages: Int { resident.load(ordering: .relaxed) }
    func add(_ n: Int) { resident.wrappingAdd(n, ordering: .relaxed) }
}
