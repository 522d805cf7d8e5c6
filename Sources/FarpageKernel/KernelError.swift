import CFarpageKernel

#if canImport(Glibc)
import Glibc
#endif

/// A failed kernel call: which call, the errno it returned, and a readable message.
///
/// Messages read like `'UFFDIO_COPY' failed: (17) File exists`.
public struct KernelError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The call that failed, e.g. `UFFDIO_COPY` or `memfd_create`.
    public let call: String
    /// The errno value (positive).
    public let errno: Int32

    public init(_ call: String, errno: Int32) {
        self.call = call
        self.errno = errno
    }

    public var description: String { "'\(call)' failed: (\(errno)) \(KernelError.describe(errno))" }

    /// `strerror` for an errno value.
    public static func describe(_ code: Int32) -> String { String(cString: strerror(code)) }
}

/// Turns a C shim's `>= 0 or -errno` result into a value or a `KernelError`.
@inline(__always)
func check(_ result: Int32, _ call: @autoclosure () -> String) throws(KernelError) -> Int32 {
    if result < 0 { throw KernelError(call(), errno: -result) }
    return result
}

@inline(__always)
func check64(_ result: Int64, _ call: @autoclosure () -> String) throws(KernelError) -> Int64 {
    if result < 0 { throw KernelError(call(), errno: Int32(-result)) }
    return result
}

/// Monotonic clock in nanoseconds.
public func monotonicNanoseconds() -> UInt64 { fp_monotonic_ns() }

/// Malloc settings for daemons that move megabyte page batches: a fixed mmap threshold above
/// the largest batch buffer (so each 1 MiB buffer is reused from the heap instead of being
/// mmapped, faulted in and zeroed on every request: measured at a quarter of the memory
/// server's CPU), few arenas, and a trim threshold that returns what a burst left behind.
/// The footprint is then bounded by the buffers in flight at the busiest moment.
public func tuneAllocatorForLargeBuffers() { fp_malloc_tune(8 << 20, 64 << 20, 4) }

/// The system page size in bytes.
public let systemPageSize: Int = Int(fp_page_size())

/// Names the calling thread (visible in `top -H`, `/proc/PID/task/*/comm`).
public func setCurrentThreadName(_ name: String) { _ = fp_set_thread_name(name) }

/// Sends a systemd readiness/status notification (`sd_notify(3)` protocol). No-op without `$NOTIFY_SOCKET`.
@discardableResult
public func systemdNotify(_ state: String) -> Bool { fp_sd_notify(state) > 0 }
