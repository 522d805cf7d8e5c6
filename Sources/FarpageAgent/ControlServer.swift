import FarpageKernel
import FarpagePaging
import FarpageProtocol
import Foundation
import Logging
import Synchronization

/// The control socket: a dedicated thread multiplexing the listening socket, client
/// connections and their pidfds with epoll. Every request is validated; a bad one gets
/// an ERROR reply naming the problem, and only protocol-level garbage closes the connection.
final class ControlServer: @unchecked Sendable {
    final class Connection {
        let id: UInt64
        let socket: SeqPacketSocket
        let peer: PeerCredentials
        let pidfd: OwnedDescriptor?
        var regions: Set<UInt64> = []
        var views: Set<UInt64> = []
        /// When the client last said it was forking (FORK_PREPARE), monotonic ns; 0: never.
        var lastFork: UInt64 = 0
        /// Regions released now linger for the child's views when the client forked lately.
        var lingerAfterRelease: Bool { lastFork != 0 && monotonicNanoseconds() - lastFork < ControlServer.forkLingerNanoseconds }
        init(id: UInt64, socket: SeqPacketSocket, peer: PeerCredentials, pidfd: OwnedDescriptor?) {
            self.id = id
            self.socket = socket
            self.peer = peer
            self.pidfd = pidfd
        }
    }

    /// How long regions stay available to a child's views after a parent that forked releases them.
    static let forkLingerNanoseconds: UInt64 = 5_000_000_000
    private static let wakeToken: UInt64 = 0
    private static let listenToken: UInt64 = 1
    private static let pidfdFlag: UInt64 = 1 << 63

    let agent: Agent
    let listener: SeqPacketSocket
    let logger: Logger
    let epoll: Epoll
    let wake: EventSignal
    let stopping = Atomic<Bool>(false)
    private var thread: pthread_t?
    private var connections: [UInt64: Connection] = [:]
    private var nextConnection: UInt64 = 16
    private var acceptBackoff = AcceptBackoff()
    let staging: StagingBuffer
    let evictStaging: StagingBuffer

    init(agent: Agent, socket: SeqPacketSocket, logger: Logger) throws(KernelError) {
        self.agent = agent
        self.listener = socket
        self.logger = logger
        epoll = try Epoll()
        wake = try EventSignal()
        staging = try StagingBuffer(pages: 1)
        evictStaging = try StagingBuffer(pages: agent.config.evictBatch)
        try epoll.add(wake.descriptor.rawValue, token: Self.wakeToken)
        try epoll.add(listener.rawValue, token: Self.listenToken)
    }

    func start() { thread = startThread(name: "fp-control") { [self] in run() } }

    func stop() {
        stopping.store(true, ordering: .releasing)
        wake.signal()
        if let thread { pthread_join(thread, nil) }
    }

    private func run() {
        var ready: [Epoll.Ready] = []
        while !stopping.load(ordering: .acquiring) {
            do { try epoll.wait(into: &ready, timeoutMilliseconds: 1000) } catch {
                logger.critical("control socket epoll failed", metadata: ["fp.error": "\(error)"])
                return
            }
            for r in ready {
                switch r.token {
                case Self.wakeToken: wake.drain()
                case Self.listenToken: acceptAll()
                case let t where t & Self.pidfdFlag != 0:
                    if let c = connections[t & ~Self.pidfdFlag] { close(c, reason: "client process exited") }
                default:
                    guard let c = connections[r.token] else { continue }
                    serve(c)
                }
            }
            acceptBackoff.resumeIfDue(epoll: epoll, listener: listener.rawValue, token: Self.listenToken)
        }
        for c in Array(connections.values) { close(c, reason: "agent stopping") }
    }

    private func acceptAll() {
        while true {
            let socket: SeqPacketSocket?
            do { socket = try listener.accept() } catch {
                // Out of descriptors, most likely (a client holding many regions, each two fds
                // here): paused, or the readable listener would spin this thread.
                if acceptBackoff.acceptFailed(epoll: epoll, listener: listener.rawValue) {
                    logger.warning("control socket: accept failed; pausing it for a second (raise LimitNOFILE?)",
                                   metadata: ["fp.error": "\(error)"])
                }
                return
            }
            guard let socket else { return }
            let peer: PeerCredentials
            do { peer = try socket.peerCredentials() } catch {
                logger.warning("dropping a connection without peer credentials", metadata: ["fp.error": "\(error)"])
                continue
            }
            let id = nextConnection
            nextConnection += 1
            // The pidfd catches a client that dies while a forked child still holds the socket open.
            let pidfd = peer.pid > 0 ? try? ProcessHandle.open(pid: peer.pid) : nil
            let c = Connection(id: id, socket: socket, peer: peer, pidfd: pidfd)
            do {
                try epoll.add(socket.rawValue, token: id)
                if let pidfd { try epoll.add(pidfd.rawValue, token: id | Self.pidfdFlag) }
            } catch {
                logger.warning("cannot watch a new connection", metadata: ["fp.error": "\(error)"])
                epoll.remove(socket.rawValue)
                continue
            }
            connections[id] = c
            logger.debug("client connected", metadata: ["fp.pid": "\(peer.pid)", "fp.uid": "\(peer.uid)"])
        }
    }

    private func close(_ c: Connection, reason: String) {
        guard connections.removeValue(forKey: c.id) != nil else { return }
        epoll.remove(c.socket.rawValue)
        if let pidfd = c.pidfd { epoll.remove(pidfd.rawValue) }
        let linger = c.lingerAfterRelease
        for id in c.regions.sorted() { agent.removeRegion(id: id, reason: reason, linger: linger) }
        for id in c.views.sorted() { agent.removeView(id: id, reason: reason) }
        logger.debug("client disconnected", metadata: ["fp.pid": "\(c.peer.pid)", "fp.reason": "\(reason)"])
    }

    private func serve(_ c: Connection) {
        // A few packets per wake-up, so one chatty client cannot monopolise the thread.
        for _ in 0..<16 {
            let packet: SeqPacketSocket.Packet?
            do { packet = try c.socket.receive(maxBytes: Wire.maxMessage, maxDescriptors: 4) } catch {
                close(c, reason: "receive failed: \(error)")
                return
            }
            guard let packet else { return }
            if packet.bytes.isEmpty && packet.descriptors.isEmpty {
                close(c, reason: "client closed the connection")
                return
            }
            if !handle(packet, on: c) {
                close(c, reason: "client closed the connection or violated the protocol")
                return
            }
        }
    }

    /// Returns false when the connection must be closed.
    private func handle(_ packet: SeqPacketSocket.Packet, on c: Connection) -> Bool {
        if packet.truncated {
            reject(c, requestID: 0, errno: EMSGSIZE, .malformed,
                   "message or its descriptors exceed the limits (\(Wire.maxMessage) bytes, 2 descriptors)")
            return false
        }
        let header: Header
        let request: Request
        do { (header, request) = try Wire.decodeRequest(packet.bytes) } catch {
            logger.warning("malformed message", metadata: ["fp.pid": "\(c.peer.pid)", "fp.error": "\(error.message)"])
            reject(c, requestID: error.requestID, errno: EPROTO, .malformed, error.message)
            return !error.fatal
        }
        switch request {
        case .register, .registerView: break
        default:
            guard packet.descriptors.isEmpty else {
                reject(c, requestID: header.requestID, errno: EBADF, .badDescriptor,
                       "descriptors are accepted only with REGISTER and REGISTER_VIEW; \(packet.descriptors.count) were closed")
                return true
            }
        }
        let reply: Reply
        switch request {
        case .register(let r):
            reply = register(r, descriptors: packet.descriptors, on: c)
            if case .error(_, _, let message) = reply {
                logger.notice("registration refused", metadata: ["fp.pid": "\(c.peer.pid)", "fp.reason": "\(message)"])
            }
        case .registerView(let v):
            reply = registerView(v, descriptors: packet.descriptors, on: c)
            if case .error(_, _, let message) = reply {
                logger.notice("view registration refused", metadata: ["fp.pid": "\(c.peer.pid)", "fp.reason": "\(message)"])
            }
        case .unregister(let id):
            if c.regions.remove(id) != nil {
                agent.removeRegion(id: id, reason: "freed by the client", linger: c.lingerAfterRelease)
                reply = .ok(id, 0)
            } else if c.views.remove(id) != nil {
                agent.removeView(id: id, reason: "unmapped by the child")
                reply = .ok(id, 0)
            } else {
                reply = error(ENOENT, .notFound, "region \(id) is not registered on this connection")
            }
        case .advise(let a): reply = advise(a, on: c)
        case .stats(let id):
            if id == 0 {
                var t = agent.totals()
                t.budgetPages = UInt64(agent.budget.budgetPages)
                t.residentPages = UInt64(agent.budget.residentPages)
                reply = .stats(t.fields)
            } else if c.regions.contains(id), let region = agent.region(id) {
                reply = .stats(region.snapshot().fields)
            } else {
                reply = error(ENOENT, .notFound, "region \(id) is not registered on this connection")
            }
        case .statusJSON:
            return sendJSON(agent.status(clients: connections.count), requestID: header.requestID, on: c)
        case .regionsJSON:
            return sendJSON(agent.regionReports(), requestID: header.requestID, on: c)
        case .ping: reply = .ok(0, 0)
        case .forkPrepare:
            c.lastFork = monotonicNanoseconds()
            reply = .ok(0, 0)
        case .poolAttach(let address):
            guard c.peer.uid == 0 || c.peer.uid == getuid() else {
                reply = error(EPERM, .invalidArgument, "only root or the agent's user may change the pool")
                break
            }
            do {
                try agent.store.attach(address: address)
                reply = .ok(0, 0)
            } catch {
                reply = self.error(ECONNREFUSED, .kernel, "cannot attach \(address): \(error)")
            }
        case .poolDetach(let address):
            guard c.peer.uid == 0 || c.peer.uid == getuid() else {
                reply = error(EPERM, .invalidArgument, "only root or the agent's user may change the pool")
                break
            }
            do {
                try agent.store.detach(address: address)
                reply = .ok(0, 0)
            } catch {
                reply = self.error(ENOENT, .notFound, "cannot detach \(address): \(error)")
            }
        case .poolRemove(let address):
            guard c.peer.uid == 0 || c.peer.uid == getuid() else {
                reply = error(EPERM, .invalidArgument, "only root or the agent's user may change the pool")
                break
            }
            do {
                try agent.store.forget(address: address)
                reply = .ok(0, 0)
            } catch {
                reply = self.error(ENOENT, .notFound, "cannot remove \(address): \(error)")
            }
        case .poolJSON:
            return sendJSON(agent.poolReport(), requestID: header.requestID, on: c)
        }
        return send(reply, requestID: header.requestID, on: c)
    }

    private func error(_ errno: Int32, _ code: ErrorCode, _ message: String) -> Reply {
        .error(errno: errno, code: code.rawValue, message: message)
    }

    private func reject(_ c: Connection, requestID: UInt32, errno: Int32, _ code: ErrorCode, _ message: String) {
        _ = send(error(errno, code, message), requestID: requestID, on: c)
    }

    private func send(_ reply: Reply, requestID: UInt32, on c: Connection) -> Bool {
        do {
            try c.socket.send(Wire.encode(reply, requestID: requestID))
            return true
        } catch {
            // EAGAIN: the client does not read its replies; EPIPE: it is gone.
            logger.info("cannot reply to a client; closing its connection",
                        metadata: ["fp.pid": "\(c.peer.pid)", "fp.error": "\(error)"])
            return false
        }
    }

    private func sendJSON<T: Encodable>(_ value: T, requestID: UInt32, on c: Connection) -> Bool {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.keyEncodingStrategy = .convertToSnakeCase
        let bytes = (try? encoder.encode(value)).map(Array.init) ?? Array("{}".utf8)
        var offset = 0
        repeat {
            var end = min(bytes.count, offset + Wire.jsonChunk)
            while end < bytes.count, end > offset, bytes[end] & 0xC0 == 0x80 { end -= 1 }  // not inside a UTF-8 sequence
            let chunk = String(decoding: bytes[offset..<end], as: UTF8.self)
            if !send(.json(text: chunk, more: end < bytes.count), requestID: requestID, on: c) { return false }
            offset = end
        } while offset < bytes.count
        return true
    }

    // MARK: REGISTER

    private func register(_ r: RegisterRequest, descriptors: [SeqPacketSocket.OwnedDescriptorAlias], on c: Connection)
        -> Reply
    {
        let page = UInt64(systemPageSize)
        let config = agent.config
        if agent.shuttingDown.load(ordering: .acquiring) {
            return error(ESHUTDOWN, .shuttingDown, "the agent is shutting down and takes no new regions; retry once it is back")
        }
        guard descriptors.count == 2 else {
            return error(EBADF, .badDescriptor,
                         "REGISTER needs exactly 2 descriptors (memfd, userfaultfd) as SCM_RIGHTS; got \(descriptors.count)")
        }
        let memfd = descriptors[0]
        let uffdDescriptor = descriptors[1]
        let memfdLink = (try? memfd.linkTarget()) ?? "?"
        guard memfdLink.hasPrefix("/memfd:"), (try? Memfd.seals(memfd)) != nil else {
            return error(EBADF, .badDescriptor, "descriptor 1 is not a memfd (it is \(memfdLink))")
        }
        let uffdLink = (try? uffdDescriptor.linkTarget()) ?? "?"
        guard uffdLink == "anon_inode:[userfaultfd]" else {
            return error(EBADF, .badDescriptor, "descriptor 2 is not a userfaultfd (it is \(uffdLink))")
        }
        guard r.pageSize == UInt32(page) else {
            return error(EINVAL, .invalidArgument, "page size \(r.pageSize) is not supported; this host uses \(page)")
        }
        guard r.length > 0, r.length % page == 0 else {
            return error(EINVAL, .invalidArgument, "length \(r.length) is not a positive multiple of the page size \(page)")
        }
        guard r.address % page == 0, r.address != 0 else {
            return error(EINVAL, .invalidArgument, "address 0x\(String(r.address, radix: 16)) is not page aligned")
        }
        guard r.address.addingReportingOverflow(r.length).overflow == false, r.address + r.length <= (1 << 57) else {
            return error(EINVAL, .invalidArgument, "address + length overflows the address space")
        }
        guard r.length <= config.maxRegionSize else {
            return error(ENOMEM, .limit,
                         "region of \(r.length) bytes exceeds agent.max_region_size (\(config.maxRegionSize) bytes)")
        }
        guard r.flags == 0 else { return error(EINVAL, .invalidArgument, "unknown flags 0x\(String(r.flags, radix: 16))") }
        let features = UffdFeatures(rawValue: r.uffdFeatures)
        guard features.isSuperset(of: .required) else {
            return error(EINVAL, .invalidArgument,
                         "the userfaultfd was opened without \(UffdFeatures.required.subtracting(features).names.joined(separator: ", "))")
        }
        let seals = (try? Memfd.seals(memfd)) ?? []
        // Size fixed, and no further seals: a later F_SEAL_FUTURE_WRITE would make punching fail.
        guard seals.isSuperset(of: [.shrink, .grow, .seal]), seals.isDisjoint(with: [.write, .futureWrite]) else {
            return error(EINVAL, .invalidArgument,
                         "the memfd must be sealed with F_SEAL_SHRINK, F_SEAL_GROW and F_SEAL_SEAL (and not F_SEAL_WRITE) so it cannot change under the agent")
        }
        guard let size = try? Memfd.size(memfd), size >= r.length else {
            return error(EINVAL, .invalidArgument, "the memfd is smaller than the region (\(r.length) bytes)")
        }
        guard agent.regionCount < config.maxRegions else {
            return error(ENOMEM, .limit, "the agent already manages agent.max_regions (\(config.maxRegions)) regions")
        }
        let end = r.address + r.length
        // Another region of the process over this range is refused, unless the client unmapped
        // that part of it (a partial munmap: the kernel may map something else there).
        let overlapping = agent.allRegions().first { other in
            guard other.spec.owner.pid == c.peer.pid, other.spec.address < end,
                r.address < other.spec.address + other.spec.length
            else { return false }
            let page = UInt64(other.spec.pageSize)
            let lo = Int((max(r.address, other.spec.address) - other.spec.address) / page)
            let hi = Int((min(end, other.spec.address + other.spec.length) - other.spec.address + page - 1) / page)
            return !other.isGone(lo..<hi)
        }
        if let o = overlapping {
            return error(EEXIST, .overlap, "the range overlaps region \(o.id) of the same process")
        }
        let requested = r.residentBudget > 0 ? r.residentBudget : config.regionBudget
        let budgetPages = Int(max(page, min(requested, config.residentBudget)) / page)
        let spec = RegionSpec(address: r.address, length: r.length, pageSize: Int(page),
                              name: r.name.isEmpty ? "region" : r.name, owner: c.peer, budgetPages: budgetPages)
        let region: Region
        do { region = try agent.addRegion(
                spec: spec, uffd: Userfaultfd(uffdDescriptor, owner: c.peer.pid, lostPageSignal: agent.lostPageSignal), memfd: memfd) } catch {
            return self.error(error.errno, .kernel, "the agent cannot watch this userfaultfd: \(error)")
        }
        c.regions.insert(region.id)
        return .ok(region.id, UInt64(region.budgetPages) * page)
    }

    // MARK: REGISTER_VIEW

    /// A forked child asks to see its parent's region through its own private mapping. It
    /// proves it holds the region's pages by sending the region's memfd (inherited at fork),
    /// and must run as the region owner's user (or root).
    private func registerView(_ v: RegisterViewRequest, descriptors: [SeqPacketSocket.OwnedDescriptorAlias],
                              on c: Connection) -> Reply
    {
        if agent.shuttingDown.load(ordering: .acquiring) {
            return error(ESHUTDOWN, .shuttingDown, "the agent is shutting down and takes no new views; retry once it is back")
        }
        guard descriptors.count == 2 else {
            return error(EBADF, .badDescriptor,
                         "REGISTER_VIEW needs exactly 2 descriptors (the region's memfd, a userfaultfd); got \(descriptors.count)")
        }
        guard let region = agent.region(v.regionID) ?? agent.lingeringRegion(v.regionID) else {
            return error(ENOENT, .notFound, "region \(v.regionID) is not registered (its owner may have exited)")
        }
        guard c.peer.uid == 0 || c.peer.uid == region.spec.owner.uid else {
            return error(EPERM, .invalidArgument, "region \(v.regionID) belongs to another user")
        }
        guard let theirs = try? descriptors[0].identity(), let ours = try? region.memfd.identity(), theirs == ours else {
            return error(EBADF, .badDescriptor, "descriptor 1 is not region \(v.regionID)'s memfd")
        }
        let uffdLink = (try? descriptors[1].linkTarget()) ?? "?"
        guard uffdLink == "anon_inode:[userfaultfd]" else {
            return error(EBADF, .badDescriptor, "descriptor 2 is not a userfaultfd (it is \(uffdLink))")
        }
        guard v.address == region.spec.address, v.length == region.spec.length else {
            return error(EINVAL, .invalidArgument, "a view must cover its region exactly (address and length)")
        }
        guard agent.viewCount < agent.config.maxRegions else {
            return error(ENOMEM, .limit, "the agent already serves agent.max_regions (\(agent.config.maxRegions)) views")
        }
        let view: RegionView
        do { view = try agent.addView(
                of: region, uffd: Userfaultfd(descriptors[1], owner: c.peer.pid, lostPageSignal: agent.lostPageSignal), owner: c.peer) } catch {
            return self.error(error.errno, .kernel, "the agent cannot watch this userfaultfd: \(error)")
        }
        c.views.insert(view.id)
        return .ok(view.id, 0)
    }

    // MARK: ADVISE

    private func advise(_ a: AdviseRequest, on c: Connection) -> Reply {
        guard c.regions.contains(a.regionID), let region = agent.region(a.regionID) else {
            return error(ENOENT, .notFound, "region \(a.regionID) is not registered on this connection")
        }
        guard let hint = AdviceHint(rawValue: a.hint) else {
            return error(EINVAL, .invalidArgument, "unknown hint \(a.hint)")
        }
        let page = UInt64(region.spec.pageSize)
        guard a.offset < region.spec.length, a.length <= region.spec.length - a.offset else {
            return error(EINVAL, .invalidArgument, "range is outside the region")
        }
        var first = a.offset / page
        var last = (a.offset + a.length + page - 1) / page
        if hint == .dontNeed || hint == .gone {
            // Only whole pages are dropped, as madvise(MADV_DONTNEED) requires alignment.
            first = (a.offset + page - 1) / page
            last = (a.offset + a.length) / page
        }
        if hint == .stream, last > first {
            region.advise(firstPage: Int(first), count: Int(last - first), hint: .sequential, staging: staging,
                          evictStaging: evictStaging)
            agent.streams.enqueue(.init(region: region, firstPage: Int(first), count: Int(last - first)))
            return .ok(0, 0)
        }
        if last > first {
            let complete = region.advise(firstPage: Int(first), count: Int(last - first), hint: hint, staging: staging,
                                         evictStaging: evictStaging)
            if !complete {
                return error(EAGAIN, .busy, "some pages of the range stayed in flight and keep their data; retry")
            }
        }
        return .ok(0, 0)
    }
}

extension SeqPacketSocket {
    typealias OwnedDescriptorAlias = OwnedDescriptor
}
