import FarpageRDMA
import FarpageTransport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The RDMA queue-pair engine and connection state machine, on fake verbs (no device needed).
@Suite("RDMA channel (fake verbs)")
struct ChannelTests {
    /// A region of `pages` pages filled with a pattern, registered in protection domain `pd`.
    static func region(_ fabric: FakeFabric, pages: Int, pd: Int = 1) -> (UnsafeMutableRawPointer, UInt32) {
        let base = UnsafeMutableRawPointer.allocate(byteCount: pages * 4096, alignment: 4096)
        for i in 0..<(pages * 4096 / 8) { base.storeBytes(of: UInt64(i) &* 0x9E37_79B9_7F4A_7C15, toByteOffset: i * 8, as: UInt64.self) }
        return (base, fabric.register(pd: pd, base: base, length: pages * 4096))
    }

    static func channel(_ fabric: FakeFabric, depth: Int, signalInterval: Int = 16, staging: Int = 1 << 20) throws -> (RDMAChannel, FakeQueuePair) {
        let qp = try fabric.makeQueuePair(privateData: [], stagingBytes: staging, sendDepth: depth)
        return (RDMAChannel(queuePair: qp, signalInterval: signalInterval, spinMicroseconds: 0, timeoutMilliseconds: 50), qp)
    }

    @Test(arguments: [1, 2, 3, 8, 64], [1, 4, 64])
    func manyReadsInFlightNeverOverflowTheSendQueue(depth: Int, signalInterval: Int) throws {
        let fabric = FakeFabric()
        let (base, rkey) = Self.region(fabric, pages: 200)
        defer { base.deallocate() }
        let (channel, qp) = try Self.channel(fabric, depth: depth, signalInterval: signalInterval)
        let accesses = (0..<200).map {
            RemoteAccess(opcode: .read, localOffset: $0 * 4096, length: 4096, remoteAddress: UInt64(UInt(bitPattern: base)) + UInt64($0 * 4096), rkey: rkey)
        }
        var order: [Int] = []
        try channel.run(accesses) { order.append($0) }
        #expect(order == Array(0..<200), "each access reported once, in order")
        #expect(memcmp(channel.staging, base, 200 * 4096) == 0)
        #expect(qp.maxOccupied <= depth, "the send queue overflowed")
        #expect(channel.counters.maxOutstanding <= depth)
        #expect(channel.counters.posted == 200)
        if signalInterval > 1 && depth > 2 {
            #expect(channel.counters.signaled < 200, "selective signalling signalled everything")
        }
    }

    @Test func writesLandInRemoteMemory() throws {
        let fabric = FakeFabric()
        let (base, rkey) = Self.region(fabric, pages: 4)
        defer { base.deallocate() }
        let (channel, _) = try Self.channel(fabric, depth: 4)
        memset(channel.staging, 0xAB, 4 * 4096)
        try channel.run([RemoteAccess(opcode: .write, localOffset: 0, length: 4 * 4096, remoteAddress: UInt64(UInt(bitPattern: base)), rkey: rkey)])
        #expect(base.load(fromByteOffset: 3 * 4096 + 17, as: UInt8.self) == 0xAB)
    }

    /// An error completion (here a remote access error on access 5, unsignalled) puts the queue
    /// pair in error: the accesses before it are reported done, the first real cause is thrown
    /// (not the flushes behind it), and the channel refuses further work.
    @Test func anErrorCompletionReportsItsCauseAndBreaksTheChannel() throws {
        let fabric = FakeFabric()
        let (base, rkey) = Self.region(fabric, pages: 16)
        defer { base.deallocate() }
        let (channel, qp) = try Self.channel(fabric, depth: 16, signalInterval: 64)
        let addr = UInt64(UInt(bitPattern: base))
        var accesses = (0..<10).map { RemoteAccess(opcode: .read, localOffset: $0 * 4096, length: 4096, remoteAddress: addr + UInt64($0 * 4096), rkey: rkey) }
        accesses[5].rkey = rkey &+ 1  // a key that reaches nothing
        var done: [Int] = []
        #expect(throws: ChannelFailure.completion(index: 5, status: .remoteAccess)) { try channel.run(accesses) { done.append($0) } }
        #expect(done == [0, 1, 2, 3, 4])
        #expect(qp.state() == .error)
        #expect(channel.broken != nil)
        #expect(ChannelFailure.completion(index: 5, status: .remoteAccess).isRemoteAccess)
        #expect(throws: ChannelFailure.self) { try channel.run([accesses[0]]) }
    }

    @Test(arguments: [CompletionStatus.retryExceeded, .flushed, .fatal, .localProtection])
    func completionStatusesAreClassified(status: CompletionStatus) throws {
        let expected: [CompletionStatus: CompletionFailure] = [
            .retryExceeded: .peerUnreachable, .flushed: .flushed, .fatal: .peerUnreachable, .localProtection: .local,
        ]
        #expect(status.failure == expected[status])
        #expect(CompletionStatus.remoteAccess.failure == .remoteAccess)
        #expect(CompletionStatus.success.failure == .none)
        // Injected at access 0: thrown with its own status, never as a flush.
        let fabric = FakeFabric()
        let (base, rkey) = Self.region(fabric, pages: 2)
        defer { base.deallocate() }
        let (channel, qp) = try Self.channel(fabric, depth: 4)
        qp.inject = { $0.id == 1 ? status : nil }
        let a = RemoteAccess(opcode: .read, localOffset: 0, length: 4096, remoteAddress: UInt64(UInt(bitPattern: base)), rkey: rkey)
        #expect(throws: ChannelFailure.completion(index: 0, status: status)) { try channel.run([a, a]) }
    }

    /// Key scoping as the responder enforces it: a key reaches its own region only, only within
    /// its length, and only from a queue pair of the same protection domain.
    @Test func aKeyReachesOnlyItsRegionFromItsDomain() throws {
        let fabric = FakeFabric()
        let (mine, myKey) = Self.region(fabric, pages: 4, pd: 1)
        let (theirs, theirKey) = Self.region(fabric, pages: 4, pd: 2)
        defer {
            mine.deallocate()
            theirs.deallocate()
        }
        func read(_ addr: UnsafeMutableRawPointer, offset: Int, length: Int, key: UInt32) throws {
            let (channel, _) = try Self.channel(fabric, depth: 4)  // protection domain 1 (the fabric's default)
            try channel.run([RemoteAccess(opcode: .read, localOffset: 0, length: length, remoteAddress: UInt64(UInt(bitPattern: addr)) + UInt64(offset), rkey: key)])
        }
        try read(mine, offset: 0, length: 4 * 4096, key: myKey)
        #expect(throws: ChannelFailure.completion(index: 0, status: .remoteAccess)) { try read(theirs, offset: 0, length: 4096, key: theirKey) }
        #expect(throws: ChannelFailure.completion(index: 0, status: .remoteAccess)) { try read(mine, offset: 3 * 4096, length: 2 * 4096, key: myKey) }
        #expect(throws: ChannelFailure.completion(index: 0, status: .remoteAccess)) { try read(theirs, offset: 0, length: 4096, key: myKey) }
        fabric.deregister(myKey)
        #expect(throws: ChannelFailure.completion(index: 0, status: .remoteAccess)) { try read(mine, offset: 0, length: 4096, key: myKey) }
    }

    @Test func aPeerThatStopsAnsweringTimesOut() throws {
        let fabric = FakeFabric()
        let (base, rkey) = Self.region(fabric, pages: 1)
        defer { base.deallocate() }
        let (channel, qp) = try Self.channel(fabric, depth: 4)
        qp.stalled = true
        let a = RemoteAccess(opcode: .read, localOffset: 0, length: 4096, remoteAddress: UInt64(UInt(bitPattern: base)), rkey: rkey)
        #expect(throws: ChannelFailure.timeout(milliseconds: 50)) { try channel.run([a]) }
        #expect(channel.counters.sleeps == 1, "it should sleep on the completion channel after spinning")
    }

    @Test func aRemovedDeviceIsReportedAsSuch() throws {
        let fabric = FakeFabric()
        let (base, rkey) = Self.region(fabric, pages: 1)
        defer { base.deallocate() }
        let (channel, qp) = try Self.channel(fabric, depth: 4)
        qp.stalled = true
        qp.event = .deviceRemoved
        let a = RemoteAccess(opcode: .read, localOffset: 0, length: 4096, remoteAddress: UInt64(UInt(bitPattern: base)), rkey: rkey)
        #expect(throws: ChannelFailure.connection(.deviceRemoved)) { try channel.run([a]) }
        #expect(ChannelFailure.connection(.deviceRemoved).description.contains("removed"))
    }

    @Test func aPostFailureBreaksTheChannel() throws {
        let fabric = FakeFabric()
        let (channel, qp) = try Self.channel(fabric, depth: 4)
        qp.close()
        #expect(throws: ChannelFailure.post(VerbsError("ibv_post_send", errno: ENOTCONN))) {
            try channel.run([RemoteAccess(opcode: .read, localOffset: 0, length: 4096, remoteAddress: 0, rkey: 1)])
        }
    }
}

@Suite("RDMA link state machine")
struct LinkTests {
    @Test func connectsUsesFallsBackAndReconnects() {
        var link = RDMALink(enabled: true, baseBackoffNanoseconds: 100, maxBackoffNanoseconds: 1000)
        #expect(link.state == .idle)
        #expect(link.route(now: 0) == .useRDMA)
        #expect(link.state == .connecting)
        link.connected()
        #expect(link.isUp)
        #expect(link.route(now: 1) == .useRDMA)
        // A channel dies (retry exceeded, flush): the next request reconnects at once.
        link.channelFailed()
        #expect(link.state == .reconnecting)
        #expect(!link.isUp)
        #expect(link.route(now: 2) == .useRDMA)
        // Reconnecting fails: back off, TCP meanwhile, doubling up to the maximum.
        link.connectFailed(reason: "refused", now: 10)
        guard case .useTCP(let reason) = link.route(now: 50) else { Issue.record("expected TCP during the backoff"); return }
        #expect(reason.contains("refused"))
        #expect(link.route(now: 110) == .useRDMA)
        link.connectFailed(reason: "refused", now: 110)
        #expect(link.route(now: 250) != .useRDMA, "the second backoff should be twice the first")
        #expect(link.route(now: 310) == .useRDMA)
        for t in 0..<10 { link.connectFailed(reason: "x", now: UInt64(1000 + t)) }
        #expect(link.route(now: 1009 + 1000) == .useRDMA, "backoff is capped at the maximum")
        link.connected()
        #expect(link.isUp)
        link.transferred()
        #expect(link.consecutiveFailures == 0)
    }

    /// A connection that breaks before it completed anything is a failed reconnect: the link
    /// backs off (doubling) instead of reconnecting on every request.
    @Test func aConnectionThatNeverCarriesDataBacksOff() {
        var link = RDMALink(enabled: true, baseBackoffNanoseconds: 100, maxBackoffNanoseconds: 1000)
        _ = link.route(now: 0)
        link.connected()
        link.transferred()
        link.channelFailed(proven: true, reason: "retry exceeded", now: 1)
        #expect(link.state == .reconnecting, "a connection that worked reconnects at once")
        #expect(link.route(now: 2) == .useRDMA)
        link.connected()
        link.channelFailed(proven: false, reason: "retry exceeded", now: 3)
        guard case .useTCP = link.route(now: 50) else { Issue.record("expected a backoff"); return }
        #expect(link.route(now: 103) == .useRDMA)
        link.connected()
        link.channelFailed(proven: false, reason: "retry exceeded", now: 110)
        #expect(link.route(now: 250) != .useRDMA, "the second backoff should be twice the first")
        #expect(link.route(now: 310) == .useRDMA)
    }

    @Test func aRestartedServerFailsForGood() {
        var link = RDMALink(enabled: true)
        _ = link.route(now: 0)
        link.connected()
        link.serverRestarted(reason: "new identity")
        #expect(link.route(now: 1) == .fail(reason: "new identity"))
        link.connected()
        link.connectFailed(reason: "x", now: 2)
        #expect(link.route(now: .max) == .fail(reason: "new identity"), "nothing brings a restarted server back")
    }

    @Test func aDisabledLinkAlwaysSaysWhy() {
        var link = RDMALink(enabled: false, reason: "no RDMA support in this kernel")
        #expect(link.route(now: 0) == .useTCP(reason: "no RDMA support in this kernel"))
        link.connectFailed(reason: "x", now: 0)
        #expect(link.route(now: .max) == .useTCP(reason: "no RDMA support in this kernel"))
    }
}

@Suite("RDMA probe on this host")
struct ProbeTests {
    /// On a kernel without RDMA, ibv_get_device_list fails with ENOSYS: that must read as "no
    /// RDMA support in this kernel", not as "no devices". Where RDMA exists, it lists devices
    /// or says there are none.
    @Test func theProbeTellsNoKernelSupportFromNoDevices() {
        let probe = SystemVerbs.probeDevices()
        let kernelHasRDMA = access("/sys/class/infiniband_verbs", F_OK) == 0
        if !kernelHasRDMA {
            #expect(probe == .noKernelSupport)
            #expect(probe.reason?.contains("no RDMA support in this kernel") == true)
        } else {
            #expect(probe != .noKernelSupport)
            if probe == .noDevices { #expect(probe.reason?.contains("no RDMA devices") == true) }
        }
        #expect(RDMAAvailability.noDevices.reason?.contains("no RDMA devices") == true)
        #expect(RDMAAvailability.devices(["rxe0"]).reason == nil)
    }

    @Test func aMemlockFailureSaysHowToFixIt() {
        #expect(VerbsError("ibv_reg_mr", errno: ENOMEM).description.contains("LimitMEMLOCK=infinity"))
    }
}
