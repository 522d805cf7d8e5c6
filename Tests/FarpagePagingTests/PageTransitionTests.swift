import FarpageTiers
import Testing

@testable import FarpagePaging

/// The page state machine, without a kernel: every interleaving the fault and eviction
/// threads can produce must keep the data reachable.
@Suite struct PageTransitionTests {
    let slot = PageLocation(raw: 42)

    @Test func entryPacksStateFlagsAndLocationIndependently() {
        var e = PageEntry()
        #expect(e.state == .untouched && e.location == nil && !e.dirty)
        e.location = PageLocation(raw: PageLocation.maxRaw)
        e.state = .far
        e.dirty = true
        e.queued = true
        #expect(e.location?.raw == PageLocation.maxRaw)
        #expect(e.state == .far && e.dirty && e.queued && !e.cancel && !e.referenced)
        e.location = nil
        #expect(e.location == nil && e.state == .far && e.dirty && e.queued)
    }

    @Test func firstTouchIsAZeroFillAndAReadInstallsClean() {
        var e = PageEntry()
        #expect(PageTransitions.missingFault(&e) == .zeroFill)
        #expect(e.state == .fetching)
        PageTransitions.installed(&e, writable: false)
        #expect(e.state == .resident && !e.dirty)
        // Clean with no far copy: all zeros, evicted without a write.
        #expect(PageTransitions.beginEviction(&e) == .zero)
    }

    @Test func aWriteFaultInstallsDirtyAndEvictionWritesBack() {
        var e = PageEntry()
        _ = PageTransitions.missingFault(&e)
        PageTransitions.installed(&e, writable: true)
        #expect(e.dirty)
        #expect(PageTransitions.beginEviction(&e) == .writeBack)
        #expect(PageTransitions.copiedOut(&e, stored: slot))
        #expect(e.state == .punching && !e.dirty && e.location == slot)
        PageTransitions.punched(&e)
        #expect(e.state == .far)
        #expect(PageTransitions.missingFault(&e) == .fetch(slot))
    }

    @Test func aWriteDuringEvictionCancelsItAndKeepsThePageDirty() {
        var e = PageEntry()
        _ = PageTransitions.missingFault(&e)
        PageTransitions.installed(&e, writable: true)
        _ = PageTransitions.beginEviction(&e)
        #expect(PageTransitions.writeProtectFault(&e) == .unprotect)
        #expect(e.cancel && e.dirty)
        PageTransitions.unprotected(&e)  // the fault thread's ioctl returned
        // The copy-out finished after the write: it must not be punched.
        #expect(PageTransitions.copiedOut(&e, stored: slot) == false)
        #expect(e.state == .resident && e.dirty && !e.cancel)
        // The slot stays reserved for the page, but the page is dirty: next eviction writes it again.
        #expect(e.location == slot)
        #expect(PageTransitions.beginEviction(&e) == .writeBack)
    }

    @Test func aCleanPageWithAFarCopyIsEvictedByPunchingOnly() {
        var e = PageEntry()
        e.location = slot
        e.state = .far
        _ = PageTransitions.missingFault(&e)
        PageTransitions.installed(&e, writable: false)
        #expect(!e.dirty && e.location == slot)
        #expect(PageTransitions.beginEviction(&e) == .clean)
        #expect(PageTransitions.copiedOut(&e, stored: e.location))
        PageTransitions.punched(&e)
        #expect(e.state == .far && e.location == slot)
    }

    @Test func aFirstWriteToACleanPageMarksItDirty() {
        var e = PageEntry()
        e.location = slot
        e.state = .far
        _ = PageTransitions.missingFault(&e)
        PageTransitions.installed(&e, writable: false)
        #expect(PageTransitions.writeProtectFault(&e) == .unprotect)
        #expect(e.dirty && e.referenced)
        PageTransitions.unprotected(&e)
        #expect(PageTransitions.beginEviction(&e) == .writeBack)
    }

    @Test(arguments: [PageState.punching, .fetching])
    func faultsOnPagesInTransitionAreDroppedForTheOwnerToWake(_ state: PageState) {
        var e = PageEntry()
        e.state = state
        #expect(PageTransitions.missingFault(&e) == .drop)
        #expect(PageTransitions.writeProtectFault(&e) == .drop)
        #expect(e.state == state)
    }

    @Test func staleMessagesForPresentPagesOnlyWake() {
        var e = PageEntry()
        e.state = .resident
        #expect(PageTransitions.missingFault(&e) == .wake)
        e.state = .evicting
        #expect(PageTransitions.missingFault(&e) == .wake)
        var gone = PageEntry()
        gone.state = .far
        gone.location = slot
        #expect(PageTransitions.writeProtectFault(&gone) == .wake)  // writer refaults as missing
        #expect(gone.state == .far)
    }

    @Test func aLostPageIsPoisonedNeverZeroFilled() {
        var e = PageEntry()
        e.location = slot
        e.state = .far
        _ = PageTransitions.missingFault(&e)
        PageTransitions.fetchFailed(&e)
        #expect(e.state == .lost)
        #expect(PageTransitions.missingFault(&e) == .poison)
        // A far entry without a location cannot be served: poison, not zeros.
        var broken = PageEntry()
        broken.state = .far
        #expect(PageTransitions.missingFault(&broken) == .poison)
    }

    @Test func aFailedCopyOutLeavesThePageResidentAndDirty() {
        var e = PageEntry()
        _ = PageTransitions.missingFault(&e)
        PageTransitions.installed(&e, writable: true)
        _ = PageTransitions.beginEviction(&e)
        PageTransitions.evictionFailed(&e)
        #expect(e.state == .resident && e.dirty)
    }

    @Test func dontNeedDropsDataAndReleasesSlots() {
        var far = PageEntry()
        far.state = .far
        far.location = slot
        let r = PageTransitions.drop(&far)
        #expect(r?.release == slot && r?.punch == false && far.state == .untouched)

        var resident = PageEntry()
        resident.state = .resident
        resident.location = slot
        let r2 = PageTransitions.drop(&resident)
        #expect(r2?.release == slot && r2?.punch == true && resident.state == .punching)
        PageTransitions.punched(&resident)
        #expect(resident.state == .untouched)

        var busy = PageEntry()
        busy.state = .evicting
        #expect(PageTransitions.drop(&busy) == nil)
    }

    /// A write-protect fault decides to un-protect, then the fault thread is delayed before the
    /// ioctl. Until it has run, the page must not be picked for eviction: the late un-protect
    /// would let a write land while the page is copied out, and the punch would lose it.
    @Test func aPendingUnprotectBlocksEviction() {
        var e = PageEntry()
        e.state = .resident
        e.location = slot
        #expect(PageTransitions.writeProtectFault(&e) == .unprotect)
        #expect(e.unprotectPending)
        #expect(PageTransitions.beginEviction(&e) == nil)
        #expect(e.state == .resident)
        PageTransitions.unprotected(&e)
        #expect(PageTransitions.beginEviction(&e) == .writeBack)
        // The same holds for the cancel path.
        #expect(PageTransitions.writeProtectFault(&e) == .unprotect)
        #expect(PageTransitions.copiedOut(&e, stored: slot) == false)
        #expect(PageTransitions.beginEviction(&e) == nil)
        #expect(e.location == slot, "the flag must not disturb the location bits")
    }

    @Test func aFailedPunchKeepsThePageResident() {
        var e = PageEntry()
        e.state = .far
        e.location = slot
        _ = PageTransitions.missingFault(&e)
        PageTransitions.installed(&e, writable: false)
        _ = PageTransitions.beginEviction(&e)
        #expect(PageTransitions.copiedOut(&e, stored: slot))
        PageTransitions.punchFailed(&e)
        #expect(e.state == .resident && !e.dirty && e.location == slot)
    }

    @Test func dontNeedLeavesALostPageLost() {
        var e = PageEntry()
        e.state = .lost
        e.location = slot
        let r = PageTransitions.drop(&e)
        #expect(r?.release == slot && r?.punch == false)
        #expect(e.state == .lost, "a poisoned page must keep raising SIGBUS, never read as zeros")
    }

    @Test func anAbandonedInstallRestoresTheFarCopy() {
        var e = PageEntry()
        e.state = .far
        e.location = slot
        _ = PageTransitions.missingFault(&e)
        PageTransitions.installAbandoned(&e)
        #expect(e.state == .far && e.location == slot)
    }
}

@Suite struct PageTableTests {
    @Test func untouchedLeavesCostNothingAndEntriesRoundTrip() {
        let t = PageTable(pageCount: 1 << 28)  // a 1 TiB region
        #expect(t.allocatedLeaves == 0)
        #expect(t.bookkeepingBytes == (1 << 28) / 512 * 8)
        // Reading never allocates; writing a zero entry never allocates.
        #expect(t[123_456_789] == PageEntry())
        t[5] = PageEntry()
        #expect(t.allocatedLeaves == 0)
        var e = PageEntry()
        e.state = .resident
        t[(1 << 28) - 1] = e
        #expect(t.allocatedLeaves == 1)
        #expect(t[(1 << 28) - 1].state == .resident)
        var seen: [Int] = []
        t.forEachEntry { page, _ in seen.append(page) }
        #expect(seen == [(1 << 28) - 1])
    }

    @Test func residentQueueIsFIFOAcrossGrowth() {
        var q = ResidentQueue()
        for i in 0..<1000 { q.push(i) }
        for i in 0..<500 { #expect(q.pop() == i) }
        for i in 1000..<1700 { q.push(i) }
        var out: [Int] = []
        while let x = q.pop() { out.append(x) }
        #expect(out == Array(500..<1700))
    }

    @Test func runsCoalesceConsecutivePages() {
        var runs: [[Int]] = []
        forEachRun([1, 2, 3, 7, 9, 10]) { runs.append([$0, $1]) }
        #expect(runs == [[1, 3], [7, 1], [9, 2]])
    }
}

@Suite struct MemoryStoreTests {
    @Test func writesReadBackAndSlotsAreReusedAndBounded() throws {
        let store = MemoryPageStore(capacityBytes: 8 * 4096, pageSize: 4096, slabBytes: 4 * 4096)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096 * 9, alignment: 4096)
        defer { buffer.deallocate() }
        let write = PageIOBatch(kind: .write)
        for i in 0..<9 {
            (buffer + i * 4096).storeBytes(of: UInt64(i + 1), as: UInt64.self)
            write.append(buffer: buffer + i * 4096, location: nil)
        }
        store.submitAndWait(write)
        #expect(write.errors.prefix(8).allSatisfy { $0 == nil })
        #expect(write.errors[8]?.code == .full, "capacity must be enforced")
        #expect(store.usedPages == 8)
        let read = PageIOBatch(kind: .read)
        let out = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { out.deallocate() }
        read.append(buffer: out, location: write.locations[5])
        store.submitAndWait(read)
        #expect(read.errors[0] == nil)
        #expect(out.load(as: UInt64.self) == 6)
        store.release([write.locations[0]!])
        #expect(store.usedPages == 7)
        let again = PageIOBatch(kind: .write)
        again.append(buffer: buffer + 8 * 4096, location: nil)
        store.submitAndWait(again)
        #expect(again.errors[0] == nil && again.locations[0] == write.locations[0], "a freed slot is reused")
        let bad = PageIOBatch(kind: .read)
        bad.append(buffer: out, location: PageLocation(raw: 1 << 40))
        store.submitAndWait(bad)
        #expect(bad.errors[0]?.code == .badLocation)
    }
}
