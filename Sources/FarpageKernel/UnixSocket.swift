import CFarpageKernel

/// The peer of a Unix socket, from `SO_PEERCRED`.
public struct PeerCredentials: Sendable, Equatable {
    public let pid: Int32
    public let uid: UInt32
    public let gid: UInt32
}

/// A `SOCK_SEQPACKET` Unix socket: one message per packet, descriptors passed with `SCM_RIGHTS`.
public final class SeqPacketSocket: @unchecked Sendable {
    public let descriptor: OwnedDescriptor
    public var rawValue: Int32 { descriptor.rawValue }

    public init(_ descriptor: OwnedDescriptor) { self.descriptor = descriptor }

    /// Binds and listens at `path` (a stale socket file there is replaced), non-blocking.
    public static func listen(path: String, mode: UInt32, backlog: Int32 = 128) throws(KernelError) -> SeqPacketSocket {
        SeqPacketSocket(OwnedDescriptor(adopting: try check(fp_unix_listen(path, backlog, mode), "bind/listen(\(path))")))
    }

    /// Connects to `path` (blocking).
    public static func connect(path: String) throws(KernelError) -> SeqPacketSocket {
        SeqPacketSocket(OwnedDescriptor(adopting: try check(fp_unix_connect(path), "connect(\(path))")))
    }

    /// Accepts one pending connection (non-blocking); nil when none is pending.
    public func accept() throws(KernelError) -> SeqPacketSocket? {
        let r = fp_accept(rawValue)
        if r == -11 { return nil }  // EAGAIN
        return SeqPacketSocket(OwnedDescriptor(adopting: try check(r, "accept4")))
    }

    public func peerCredentials() throws(KernelError) -> PeerCredentials {
        var pid: Int32 = 0
        var uid: UInt32 = 0
        var gid: UInt32 = 0
        _ = try check(fp_peer_cred(rawValue, &pid, &uid, &gid), "getsockopt(SO_PEERCRED)")
        return PeerCredentials(pid: pid, uid: uid, gid: gid)
    }

    /// Sends one packet, with descriptors (at most 8) as `SCM_RIGHTS`.
    public func send(_ bytes: [UInt8], descriptors: [Int32] = []) throws(KernelError) {
        let r = bytes.withUnsafeBytes { buf in
            descriptors.withUnsafeBufferPointer { fds in
                fp_send_fds(rawValue, buf.baseAddress, buf.count, fds.baseAddress, Int32(fds.count))
            }
        }
        _ = try check64(r, "sendmsg")
    }

    /// One received packet.
    public struct Packet {
        public var bytes: [UInt8]
        /// Descriptors that came with it, owned by the receiver.
        public var descriptors: [OwnedDescriptor]
        /// The packet or its descriptors did not fit and were cut (extra descriptors are closed).
        public var truncated: Bool
    }

    /// Receives one packet; nil on EAGAIN, an empty packet with no bytes means the peer closed.
    public func receive(maxBytes: Int, maxDescriptors: Int = 4) throws(KernelError) -> Packet? {
        var bytes = [UInt8](repeating: 0, count: maxBytes)
        var fds = [Int32](repeating: -1, count: max(maxDescriptors, 1))
        var nfds: Int32 = 0
        var truncated: Int32 = 0
        let n = bytes.withUnsafeMutableBytes { buf in
            fp_recv_fds(rawValue, buf.baseAddress, buf.count, &fds, Int32(maxDescriptors), &nfds, &truncated)
        }
        if n == -11 { return nil }
        let count = try check64(n, "recvmsg")
        bytes.removeSubrange(Int(count)...)
        let owned = (0..<Int(nfds)).map { OwnedDescriptor(adopting: fds[$0]) }
        return Packet(bytes: bytes, descriptors: owned, truncated: truncated != 0)
    }

    public func setReceiveTimeout(milliseconds: Int32) { _ = fp_set_recv_timeout_ms(rawValue, milliseconds) }
}
