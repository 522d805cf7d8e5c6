import CFarpageKernel

/// An epoll instance. Used only by dedicated threads (fault service, control server).
public final class Epoll: @unchecked Sendable {
    public let descriptor: OwnedDescriptor

    public struct Ready: Sendable {
        public let token: UInt64
        public let readable: Bool
        public let hangup: Bool
    }

    public init() throws(KernelError) {
        descriptor = OwnedDescriptor(adopting: try check(fp_epoll_create(), "epoll_create1"))
    }

    /// Watches `fd` for input; `token` comes back in `wait`.
    public func add(_ fd: Int32, token: UInt64) throws(KernelError) {
        _ = try check(fp_epoll_ctl(descriptor.rawValue, 1, fd, UInt32(FP_POLL_IN), token), "epoll_ctl(ADD)")
    }

    public func remove(_ fd: Int32) { _ = fp_epoll_ctl(descriptor.rawValue, 2, fd, 0, 0) }

    /// Waits up to `timeoutMilliseconds` (-1: forever). EINTR returns an empty list.
    public func wait(into ready: inout [Ready], timeoutMilliseconds: Int32) throws(KernelError) {
        var raw = [fp_poll_event](repeating: fp_poll_event(), count: 64)
        let n = try check(fp_epoll_wait(descriptor.rawValue, &raw, 64, timeoutMilliseconds), "epoll_wait")
        ready.removeAll(keepingCapacity: true)
        for i in 0..<Int(n) {
            let ev = raw[i].events
            ready.append(
                Ready(
                    token: raw[i].data, readable: ev & UInt32(FP_POLL_IN) != 0,
                    hangup: ev & UInt32(FP_POLL_HUP | FP_POLL_ERR) != 0))
        }
    }
}

/// An eventfd used to wake a dedicated thread out of `epoll_wait`.
public final class EventSignal: @unchecked Sendable {
    public let descriptor: OwnedDescriptor
    public init() throws(KernelError) {
        descriptor = OwnedDescriptor(adopting: try check(fp_eventfd(), "eventfd"))
    }
    public func signal() { _ = fp_eventfd_signal(descriptor.rawValue) }
    public func drain() { _ = fp_eventfd_drain(descriptor.rawValue) }
}

/// A pidfd: readable once the process has exited.
public enum ProcessHandle {
    public static func open(pid: Int32) throws(KernelError) -> OwnedDescriptor {
        OwnedDescriptor(adopting: try check(fp_pidfd_open(pid), "pidfd_open"))
    }
}

/// Keeps a listening socket out of an epoll set for a second after `accept` fails (out of
/// descriptors, most likely): the listener stays readable, and watching it would spin the
/// serving thread. Shared by the agent's control socket and the memory server's admin socket.
public struct AcceptBackoff: Sendable {
    private var pausedUntil: UInt64?
    private var lastComplaint: UInt64 = 0
    public init() {}

    /// After a failed accept: stops watching `listener` for a second. Returns true when the
    /// failure should be logged (at most once a minute).
    public mutating func acceptFailed(epoll: Epoll, listener: Int32) -> Bool {
        let now = monotonicNanoseconds()
        epoll.remove(listener)
        pausedUntil = now + 1_000_000_000
        guard now - lastComplaint > 60_000_000_000 || lastComplaint == 0 else { return false }
        lastComplaint = now
        return true
    }

    /// Watches the listener again once its pause is over; call on every turn of the loop
    /// (whose epoll wait must time out, so that a paused listener comes back).
    public mutating func resumeIfDue(epoll: Epoll, listener: Int32, token: UInt64) {
        guard let until = pausedUntil, monotonicNanoseconds() >= until else { return }
        pausedUntil = nil
        try? epoll.add(listener, token: token)
    }
}
