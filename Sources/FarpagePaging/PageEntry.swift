import FarpageTiers

/// Where a page's data is. See docs/architecture.md for the transition table.
public enum PageState: UInt8, Sendable, CaseIterable {
    /// Never written (or dropped): reads as zeros, nothing stored anywhere.
    case untouched = 0
    /// In the client's memfd (local DRAM).
    case resident = 1
    /// Being copied out to a far tier; a write fault cancels it.
    case evicting = 2
    /// Copied out; the local copy is being punched. Faults are dropped and the evictor wakes the range after.
    case punching = 3
    /// Only in a far tier, at `location`.
    case far = 4
    /// Being installed by a fault thread; other faults on it are dropped (the install wakes them).
    case fetching = 5
    /// Its only copy is gone: poisoned, the client gets SIGBUS. Never served as zeros.
    case lost = 6
}

/// One page-table entry, packed in 8 bytes.
///
/// Layout: bits 0–2 state, 3 dirty, 4 cancel, 5 referenced, 6 queued, 7 has-location,
/// 8 unprotect-pending, 9 active, 10 speculative, 11 doomed, 12 wasted, 13 orphaned, 16–63 far-tier location. `dirty` means the local copy differs from (or has no) far copy;
/// a clean resident page is mapped write-protected, so its first write is seen.
public struct PageEntry: Equatable, Sendable, CustomStringConvertible {
    public var raw: UInt64

    public init(raw: UInt64 = 0) { self.raw = raw }

    private static let dirtyBit: UInt64 = 1 << 3
    private static let cancelBit: UInt64 = 1 << 4
    private static let referencedBit: UInt64 = 1 << 5
    private static let queuedBit: UInt64 = 1 << 6
    private static let locationBit: UInt64 = 1 << 7
    private static let unprotectBit: UInt64 = 1 << 8
    private static let activeBit: UInt64 = 1 << 9
    private static let speculativeBit: UInt64 = 1 << 10
    private static let doomedBit: UInt64 = 1 << 11
    private static let wastedBit: UInt64 = 1 << 12
    private static let orphanedBit: UInt64 = 1 << 13
    private static let flagsMask: UInt64 = 0xFFFF

    public var state: PageState {
        get { PageState(rawValue: UInt8(raw & 7))! }
        set { raw = (raw & ~7) | UInt64(newValue.rawValue) }
    }

    private func bit(_ b: UInt64) -> Bool { raw & b != 0 }
    private mutating func set(_ b: UInt64, _ on: Bool) { raw = on ? raw | b : raw & ~b }

    public var dirty: Bool {
        get { bit(Self.dirtyBit) }
        set { set(Self.dirtyBit, newValue) }
    }
    /// A write fault arrived while the page was being evicted.
    public var cancel: Bool {
        get { bit(Self.cancelBit) }
        set { set(Self.cancelBit, newValue) }
    }
    /// Touched since the CLOCK hand last passed (second chance).
    public var referenced: Bool {
        get { bit(Self.referencedBit) }
        set { set(Self.referencedBit, newValue) }
    }
    /// Has one entry in a resident queue: the active one when `active`, else the inactive one.
    public var queued: Bool {
        get { bit(Self.queuedBit) }
        set { set(Self.queuedBit, newValue) }
    }
    /// Protected: on the active queue (a refault showed it hot, or it was written again while
    /// inactive). Evicted only after every inactive page.
    public var active: Bool {
        get { bit(Self.activeBit) }
        set { set(Self.activeBit, newValue) }
    }
    /// Installed by prefetch and not yet known to be used (the stream has not passed it, nor a
    /// write touched it).
    public var speculative: Bool {
        get { bit(Self.speculativeBit) }
        set { set(Self.speculativeBit, newValue) }
    }
    /// Far because it was prefetched and evicted unused: not prefetched again soon.
    public var wasted: Bool {
        get { bit(Self.wastedBit) }
        set { set(Self.wastedBit, newValue) }
    }
    /// Its inactive/active queue entry was abandoned when it was evicted from the
    /// reclaim-first queue: the next time that entry comes up it is skipped (a page refetched
    /// meanwhile has a fresh entry at the tail, and must not inherit the old one's place).
    public var orphaned: Bool {
        get { bit(Self.orphanedBit) }
        set { set(Self.orphanedBit, newValue) }
    }
    /// Also has an entry in the reclaim-first queue (a prefetch judged wasted).
    public var doomed: Bool {
        get { bit(Self.doomedBit) }
        set { set(Self.doomedBit, newValue) }
    }
    /// A fault thread decided to un-protect the page and has not finished the ioctl yet.
    /// The page must not be evicted meanwhile: the late un-protect would make it writable
    /// while it is being copied out, and the write would be punched away.
    public var unprotectPending: Bool {
        get { bit(Self.unprotectBit) }
        set { set(Self.unprotectBit, newValue) }
    }
    /// The far-tier slot reserved for this page, if any.
    public var location: PageLocation? {
        get { bit(Self.locationBit) ? PageLocation(raw: raw >> 16) : nil }
        set {
            if let newValue {
                raw = (raw & Self.flagsMask) | Self.locationBit | (newValue.raw << 16)
            } else {
                raw = raw & Self.flagsMask & ~Self.locationBit
            }
        }
    }

    public var description: String {
        "\(state)\(dirty ? " dirty" : "")\(cancel ? " cancel" : "")\(location.map { " @\($0.raw)" } ?? "")"
    }
}

/// What a fault thread must do for a fault, decided under the region lock.
public enum FaultAction: Equatable, Sendable {
    /// Install a zero page.
    case zeroFill
    /// Read the page from the far tier, then install it.
    case fetch(PageLocation)
    /// Unprotect the page (this wakes the writer).
    case unprotect
    /// The page is there already (a stale message): wake waiters.
    case wake
    /// Someone else owns the page's transition and wakes the range when done.
    case drop
    /// The data is lost: poison so the client gets SIGBUS.
    case poison
}

/// How an eviction victim must be written.
public enum EvictionKind: Equatable, Sendable {
    /// Modified: write-protect, copy out, store, punch.
    case writeBack
    /// Unmodified with a valid far copy: punch only.
    case clean
    /// Unmodified and never stored: all zeros, punch only.
    case zero
}

/// The page state machine. Pure functions on entries: every transition is testable without a kernel.
public enum PageTransitions {
    /// A missing-page fault.
    public static func missingFault(_ e: inout PageEntry) -> FaultAction {
        switch e.state {
        case .untouched:
            e.state = .fetching
            return .zeroFill
        case .far:
            guard let location = e.location else {
                e.state = .lost
                return .poison
            }
            e.state = .fetching
            return .fetch(location)
        case .lost: return .poison
        case .resident, .evicting: return .wake  // a stale message: the page is there
        case .punching, .fetching: return .drop
        }
    }

    /// A write-protect fault: the client writes a page we protected.
    public static func writeProtectFault(_ e: inout PageEntry) -> FaultAction {
        switch e.state {
        case .resident:
            e.dirty = true
            e.referenced = true
            e.speculative = false
            e.unprotectPending = true
            return .unprotect
        case .evicting:
            // Never lose a write: cancel the eviction; the page stays and is now dirty.
            e.cancel = true
            e.dirty = true
            e.referenced = true
            e.speculative = false
            e.unprotectPending = true
            return .unprotect
        case .punching, .fetching: return .drop
        case .far, .untouched, .lost: return .wake  // gone already: the writer refaults as missing
        }
    }

    /// The page was installed (`UFFDIO_COPY` succeeded). `writable`: installed without write protection.
    /// `foreign`: the kernel said a page was already there (EEXIST) — its content is unknown, so dirty.
    public static func installed(_ e: inout PageEntry, writable: Bool, foreign: Bool = false) {
        precondition(e.state == .fetching, "installed from \(e.state)")
        e.state = .resident
        e.dirty = writable || foreign
        e.cancel = false
    }

    /// The install could not happen (the client unmapped the range); go back to where it was.
    public static func installAbandoned(_ e: inout PageEntry) {
        precondition(e.state == .fetching)
        e.state = e.location != nil ? .far : .untouched
    }

    /// A far-tier read failed for good: the data is lost.
    public static func fetchFailed(_ e: inout PageEntry) {
        precondition(e.state == .fetching)
        e.state = .lost
    }

    /// The un-protect ioctl decided by `writeProtectFault` has returned.
    public static func unprotected(_ e: inout PageEntry) {
        e.unprotectPending = false
    }

    /// Picks a resident page for eviction. Nil when the page cannot be evicted now.
    public static func beginEviction(_ e: inout PageEntry) -> EvictionKind? {
        guard e.state == .resident, !e.unprotectPending else { return nil }
        e.state = .evicting
        e.cancel = false
        if e.dirty { return .writeBack }
        return e.location != nil ? .clean : .zero
    }

    /// The copy-out is done (`stored`: where the page now lives; nil when it was all zeros).
    /// Returns true when the local copy must now be punched.
    public static func copiedOut(_ e: inout PageEntry, stored: PageLocation?) -> Bool {
        precondition(e.state == .evicting)
        if let stored { e.location = stored }
        if e.cancel {
            e.cancel = false
            e.state = .resident
            return false
        }
        e.state = .punching
        e.dirty = false
        return true
    }

    /// The copy-out failed (far tier full or down): the page stays resident and dirty.
    public static func evictionFailed(_ e: inout PageEntry) {
        precondition(e.state == .evicting)
        e.cancel = false
        e.state = .resident
    }

    /// Punching the local copy failed: the page is still there, mapped write-protected, and
    /// its far copy (if any) is valid. It goes back to resident, clean.
    public static func punchFailed(_ e: inout PageEntry) {
        precondition(e.state == .punching)
        e.state = .resident
        e.dirty = e.location == nil
    }

    /// The local copy is gone.
    public static func punched(_ e: inout PageEntry) {
        precondition(e.state == .punching)
        e.state = e.location != nil ? .far : .untouched
        e.referenced = false
        e.speculative = false
    }

    /// `DONTNEED`: drop the contents. Returns (release: a location to free, punch: whether the
    /// local copy must be punched first). Pages in flight are left alone (returns nil).
    public static func drop(_ e: inout PageEntry) -> (release: PageLocation?, punch: Bool)? {
        switch e.state {
        case .untouched: return (nil, false)
        case .lost:
            // The client's page-table entry is poisoned and only the client can clear it;
            // the page keeps raising SIGBUS (never zeros). Its slot, if any, is freed.
            let location = e.location
            e.location = nil
            return (location, false)
        case .far:
            let location = e.location
            e.location = nil
            e.state = .untouched
            return (location, false)
        case .resident:
            let location = e.location
            e.location = nil
            e.dirty = false
            e.state = .punching
            return (location, true)
        case .evicting, .punching, .fetching: return nil
        }
    }
}
