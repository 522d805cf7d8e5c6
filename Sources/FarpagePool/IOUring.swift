import CFarpageUring
import FarpageKernel
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// One io_uring (liburing, behind the opaque `fp_ring`), used by one thread at a time.
///
/// The ring is torn down in `deinit`: whoever holds the last reference owns it. A ring whose
/// submission failed is `broken` and must be dropped rather than used again (entries that never
/// reached the kernel may still sit in its submission queue).
final class IOUring: @unchecked Sendable {
    /// One read or write, and (after `run`) how it went.
    struct Operation {
        enum Direction { case read, write }
        var direction: Direction
        var descriptor: Int32
        var buffer: UnsafeMutableRawPointer
        var length: Int
        var offset: UInt64
    }

    private let ring: OpaquePointer
    private(set) var broken = false

    /// Sets up a ring with room for `entries` operations at once (`io_uring_setup`).
    /// - Parameter pollNanoseconds: per `run`, how long to poll for completions before sleeping.
    init(entries: UInt32, pollNanoseconds: UInt64 = 0) throws(KernelError) {
        var error: Int32 = 0
        guard let ring = fp_ring_create(entries, &error) else { throw KernelError("io_uring_setup", errno: -error) }
        self.ring = ring
        fp_ring_set_spin(ring, pollNanoseconds)
    }

    deinit { fp_ring_destroy(ring) }

    /// How many times `run` entered the kernel to submit (one per batch that fits the ring).
    var submissions: UInt64 { fp_ring_submits(ring) }

    /// Completions reaped while polling (they cost no sleep and wakeup).
    var polledCompletions: UInt64 { fp_ring_spun(ring) }

    /// Runs every operation and waits for all of them, with one `io_uring_submit_and_wait` when
    /// they fit the ring; short transfers are completed. Returns, per operation, the bytes done
    /// (a read stops short only at the end of the file) or the error.
    func run(_ operations: [Operation]) -> [Result<Int, KernelError>] {
        var ops = operations.map(Self.cOperation)
        if fp_ring_rw(ring, &ops, Int32(ops.count), nil, nil, 0) < 0 { broken = true }
        return zip(operations, ops).map { Self.outcome($0, $1.result) }
    }

    /// As `run`, calling `completed(i, outcome)` as each operation finishes (in completion
    /// order). Operation 0 is waited for alone first, while the rest stay in flight, so that
    /// the head of a batch can be used before the batch is in. `completed` must not use this ring.
    /// - Parameter poll: poll for operation 0 (up to the ring's polling time) before sleeping.
    func run(_ operations: [Operation], poll: Bool = false, completed: (Int, Result<Int, KernelError>) -> Void) {
        var ops = operations.map(Self.cOperation)
        let status = withoutActuallyEscaping(completed) { body in
            let box = Completion { index, result in body(Int(index), Self.outcome(operations[Int(index)], result)) }
            return withExtendedLifetime(box) {
                fp_ring_rw(ring, &ops, Int32(ops.count), { context, index, result in
                    Unmanaged<Completion>.fromOpaque(context!).takeUnretainedValue().body(index, result)
                }, Unmanaged.passUnretained(box).toOpaque(), poll ? 1 : 0)
            }
        }
        if status < 0 { broken = true }
    }

    private final class Completion {
        let body: (Int32, Int64) -> Void
        init(_ body: @escaping (Int32, Int64) -> Void) { self.body = body }
    }

    private static func cOperation(_ o: Operation) -> fp_ring_op {
        fp_ring_op(fd: o.descriptor, write: o.direction == .write ? 1 : 0, buffer: o.buffer, length: UInt32(o.length),
                   offset: o.offset, result: 0)
    }

    private static func outcome(_ o: Operation, _ result: Int64) -> Result<Int, KernelError> {
        result >= 0
            ? .success(Int(result))
            : .failure(KernelError(o.direction == .read ? "io_uring read" : "io_uring write", errno: Int32(-result)))
    }

    /// Whether this process may use io_uring, and if not, why, in words an operator can act on.
    static func unavailability() -> String? {
        let status = fp_ring_probe()
        guard status < 0 else { return nil }
        let cause = KernelError("io_uring_setup", errno: -status)
        switch -status {
        case EPERM, EACCES:
            let sysctl = (try? String(contentsOfFile: "/proc/sys/kernel/io_uring_disabled", encoding: .utf8))?
                .trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
            return "io_uring is disabled for this process (\(cause); sysctl kernel.io_uring_disabled = \(sysctl)): "
                + "run `sysctl -w kernel.io_uring_disabled=0` (or 1 with the agent in kernel.io_uring_group), "
                + "or use [store] kind = \"memory\""
        case ENOSYS:
            return "io_uring is unavailable (\(cause)): the kernel lacks it, or a seccomp filter blocks it "
                + "(systemd SystemCallFilter=, a container's seccomp profile); allow io_uring_setup, io_uring_enter "
                + "and io_uring_register, or use [store] kind = \"memory\""
        case EOPNOTSUPP:
            return "this kernel's io_uring lacks IORING_OP_READ/IORING_OP_WRITE (Linux 5.6 or newer is needed), "
                + "or use [store] kind = \"memory\""
        default:
            return "io_uring is unavailable (\(cause)); check the kernel's io_uring support and memory limits, "
                + "or use [store] kind = \"memory\""
        }
    }
}
