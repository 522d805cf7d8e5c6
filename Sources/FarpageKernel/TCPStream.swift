import CFarpageKernel

/// A blocking TCP connection for dedicated threads (the agent's transport to memory servers).
///
/// Every send and receive is bounded by the I/O timeout given at connect time: a peer that
/// stops answering surfaces as `KernelError(errno: EAGAIN)` instead of a hang.
public final class TCPStream: @unchecked Sendable {
    public let descriptor: OwnedDescriptor

    public init(_ descriptor: OwnedDescriptor) { self.descriptor = descriptor }

    public static func connect(host: String, port: Int, timeoutMilliseconds: Int32 = 5000,
                               ioTimeoutMilliseconds: Int32 = 10_000) throws(KernelError) -> TCPStream
    {
        let fd = fp_tcp_connect(host, Int32(port), timeoutMilliseconds, ioTimeoutMilliseconds)
        return TCPStream(OwnedDescriptor(adopting: try check(fd, "connect(\(host):\(port))")))
    }

    public func send(_ bytes: [UInt8]) throws(KernelError) {
        let r = bytes.withUnsafeBytes { fp_send_all(descriptor.rawValue, $0.baseAddress, $0.count) }
        _ = try check(r, "send")
    }

    public func send(_ pointer: UnsafeRawPointer, count: Int) throws(KernelError) {
        _ = try check(fp_send_all(descriptor.rawValue, pointer, count), "send")
    }

    /// `head`, then `count` bytes at `payload`, with one gather write (no copy of the payload).
    public func send(_ head: [UInt8], then payload: UnsafeRawPointer, count: Int) throws(KernelError) {
        let r = head.withUnsafeBytes { fp_send_two(descriptor.rawValue, $0.baseAddress, $0.count, payload, count) }
        _ = try check(r, "send")
    }

    /// Exactly `count` bytes; ECONNRESET when the peer closed first.
    public func receive(exactly count: Int) throws(KernelError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        if count == 0 { return out }
        let r = out.withUnsafeMutableBytes { fp_recv_all(descriptor.rawValue, $0.baseAddress, count) }
        _ = try check(r, "recv")
        return out
    }

    /// Exactly `count` bytes, polling for up to `spinMicroseconds` before sleeping.
    public func receive(exactly count: Int, spinMicroseconds: Int32) throws(KernelError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        if count == 0 { return out }
        let r = out.withUnsafeMutableBytes { fp_recv_all_spin(descriptor.rawValue, $0.baseAddress, count, spinMicroseconds) }
        _ = try check(r, "recv")
        return out
    }

    public func receive(into pointer: UnsafeMutableRawPointer, count: Int) throws(KernelError) {
        _ = try check(fp_recv_all(descriptor.rawValue, pointer, count), "recv")
    }

    /// Unblocks a thread stuck in send/receive on this stream (from another thread).
    public func shutdown() { _ = fp_shutdown(descriptor.rawValue) }
}
