import FarpageKernel
import FarpageProtocol
import Foundation
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The local administration socket (`farpagectl memserver ...`): a thread multiplexing the
/// listening socket and its connections with epoll. Requests are JSON (`MemserverAdmin`);
/// anything else gets an error reply naming the problem, and the connection stays open.
/// Only root and the server's own user are served.
public final class AdminServer: @unchecked Sendable {
    private static let wakeToken: UInt64 = 0
    private static let listenToken: UInt64 = 1
    private static let maxConnections = 64
    /// A connection with no request for this long is closed (it holds a slot).
    private static let idleNanoseconds: UInt64 = 10_000_000_000

    struct Connection {
        let socket: SeqPacketSocket
        var lastActive: UInt64
        /// Set for a peer that may not administer the server: its first request gets this
        /// answer, then the connection is closed (closing before reading would reset it, and
        /// the peer would never see why).
        var refusal: String?
    }

    let server: Memserver
    let listener: SeqPacketSocket
    let path: String
    let logger: Logger
    let epoll: Epoll
    let wake: EventSignal
    let stopping = Atomic<Bool>(false)
    private var thread: pthread_t?
    private var connections: [UInt64: Connection] = [:]
    private var nextConnection: UInt64 = 16
    private var acceptBackoff = AcceptBackoff()

    /// Binds `path` (mode 0600; a stale socket there is replaced).
    public init(server: Memserver, path: String, logger: Logger) throws(KernelError) {
        self.server = server
        self.path = path
        self.logger = logger
        let dir = (path as NSString).deletingLastPathComponent
        if !dir.isEmpty { try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) }
        listener = try SeqPacketSocket.listen(path: path, mode: 0o600)
        epoll = try Epoll()
        wake = try EventSignal()
        try epoll.add(wake.descriptor.rawValue, token: Self.wakeToken)
        try epoll.add(listener.rawValue, token: Self.listenToken)
    }

    public func start() { thread = startThread(name: "fp-admin") { [self] in run() } }

    public func stop() {
        stopping.store(true, ordering: .releasing)
        wake.signal()
        if let thread { pthread_join(thread, nil) }
        thread = nil
        unlink(path)
    }

    private func run() {
        var ready: [Epoll.Ready] = []
        while !stopping.load(ordering: .acquiring) {
            do { try epoll.wait(into: &ready, timeoutMilliseconds: 1000) } catch {
                logger.critical("admin socket epoll failed", metadata: ["fp.error": "\(error)"])
                return
            }
            for r in ready {
                switch r.token {
                case Self.wakeToken: wake.drain()
                case Self.listenToken: acceptAll()
                default: serve(r.token)
                }
            }
            let now = monotonicNanoseconds()
            for (id, c) in connections where now - c.lastActive > Self.idleNanoseconds { close(id) }
            acceptBackoff.resumeIfDue(epoll: epoll, listener: listener.rawValue, token: Self.listenToken)
        }
        for id in Array(connections.keys) { close(id) }
    }

    private func acceptAll() {
        while true {
            let socket: SeqPacketSocket?
            do { socket = try listener.accept() } catch {
                if acceptBackoff.acceptFailed(epoll: epoll, listener: listener.rawValue) {
                    logger.warning("admin socket: accept failed; pausing it for a second", metadata: ["fp.error": "\(error)"])
                }
                return
            }
            guard let socket else { return }
            let allowed = (try? socket.peerCredentials()).map { $0.uid == 0 || $0.uid == geteuid() } ?? false
            if connections.count >= Self.maxConnections, let oldest = connections.min(by: { $0.value.lastActive < $1.value.lastActive }) {
                close(oldest.key)  // make room: the least recently active goes
            }
            let id = nextConnection
            nextConnection += 1
            do { try epoll.add(socket.rawValue, token: id) } catch { continue }
            connections[id] = Connection(
                socket: socket, lastActive: monotonicNanoseconds(),
                refusal: allowed ? nil : "permission denied: only root and the server's user may administer it")
        }
    }

    private func close(_ id: UInt64) {
        guard let c = connections.removeValue(forKey: id) else { return }
        epoll.remove(c.socket.rawValue)
    }

    private func serve(_ id: UInt64) {
        guard let c = connections[id] else { return }
        for _ in 0..<8 {
            let packet: SeqPacketSocket.Packet?
            do { packet = try c.socket.receive(maxBytes: MemserverAdmin.maxRequest + 1, maxDescriptors: 0) } catch {
                close(id)
                return
            }
            guard let packet else { return }  // nothing more for now
            if packet.bytes.isEmpty {
                close(id)
                return
            }
            connections[id]?.lastActive = monotonicNanoseconds()
            if let refusal = c.refusal {
                _ = try? c.socket.send(encode(.init(ok: false, error: refusal)))
                close(id)
                return
            }
            let reply = handle(packet.bytes, truncated: packet.truncated)
            do { try c.socket.send(encode(reply)) } catch {
                close(id)
                return
            }
        }
    }

    func handle(_ bytes: [UInt8], truncated: Bool) -> MemserverAdmin.Reply {
        guard !truncated, bytes.count <= MemserverAdmin.maxRequest else {
            return .init(ok: false, error: "request longer than \(MemserverAdmin.maxRequest) bytes")
        }
        let request: MemserverAdmin.Request
        do { request = try JSONDecoder().decode(MemserverAdmin.Request.self, from: Data(bytes)) } catch {
            return .init(ok: false, error: "not a valid request (JSON {\"op\": \"status|reclaim|limit|headroom\", \"bytes\": N}): \(error)")
        }
        switch request.op {
        case .status:
            break
        case .reclaim:
            guard let bytes = request.bytes, bytes > 0 else {
                return .init(ok: false, error: "reclaim needs \"bytes\" > 0: how much lent memory to take back")
            }
            logger.notice("operator asked for memory back", metadata: ["fp.bytes": "\(bytes)"])
            server.reclaim(bytes: bytes)
        case .limit:
            logger.notice("operator set the lending limit", metadata: ["fp.bytes": "\(request.bytes.map(String.init) ?? "none")"])
            server.setLimit(bytes: request.bytes)
        case .headroom:
            logger.notice("operator set the free-memory headroom", metadata: ["fp.bytes": "\(request.bytes.map(String.init) ?? "configured")"])
            server.setHeadroom(bytes: request.bytes)
        }
        return .init(ok: true, status: server.adminStatus)
    }

    private func encode(_ reply: MemserverAdmin.Reply) -> [UInt8] {
        var reply = reply
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        while true {
            let bytes = Array((try? encoder.encode(reply)) ?? Data(#"{"ok":false,"error":"cannot encode the reply"}"#.utf8))
            guard bytes.count > MemserverAdmin.maxReply, var status = reply.status, !status.agents.isEmpty else { return bytes }
            status.agents.removeLast(max(1, status.agents.count / 2))
            reply.status = status
        }
    }
}
