import CFarpageKernel

/// `UFFD_FEATURE_*` bits.
public struct UffdFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    public static let pagefaultFlagWP = UffdFeatures(rawValue: FP_UFFD_FEATURE_PAGEFAULT_FLAG_WP)
    public static let eventFork = UffdFeatures(rawValue: FP_UFFD_FEATURE_EVENT_FORK)
    public static let eventRemap = UffdFeatures(rawValue: FP_UFFD_FEATURE_EVENT_REMAP)
    public static let eventRemove = UffdFeatures(rawValue: FP_UFFD_FEATURE_EVENT_REMOVE)
    public static let missingHugetlbfs = UffdFeatures(rawValue: FP_UFFD_FEATURE_MISSING_HUGETLBFS)
    public static let missingShmem = UffdFeatures(rawValue: FP_UFFD_FEATURE_MISSING_SHMEM)
    public static let eventUnmap = UffdFeatures(rawValue: FP_UFFD_FEATURE_EVENT_UNMAP)
    public static let sigbus = UffdFeatures(rawValue: FP_UFFD_FEATURE_SIGBUS)
    public static let threadID = UffdFeatures(rawValue: FP_UFFD_FEATURE_THREAD_ID)
    public static let minorHugetlbfs = UffdFeatures(rawValue: FP_UFFD_FEATURE_MINOR_HUGETLBFS)
    public static let minorShmem = UffdFeatures(rawValue: FP_UFFD_FEATURE_MINOR_SHMEM)
    public static let exactAddress = UffdFeatures(rawValue: FP_UFFD_FEATURE_EXACT_ADDRESS)
    public static let writeProtectShmem = UffdFeatures(rawValue: FP_UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
    public static let writeProtectUnpopulated = UffdFeatures(rawValue: FP_UFFD_FEATURE_WP_UNPOPULATED)
    public static let poison = UffdFeatures(rawValue: FP_UFFD_FEATURE_POISON)
    public static let writeProtectAsync = UffdFeatures(rawValue: FP_UFFD_FEATURE_WP_ASYNC)
    public static let move = UffdFeatures(rawValue: FP_UFFD_FEATURE_MOVE)

    /// What Farpage cannot work without: missing faults and write protection on shmem.
    public static let required: UffdFeatures = [.missingShmem, .writeProtectShmem]

    static let names: [(UffdFeatures, String)] = [
        (.pagefaultFlagWP, "pagefault_flag_wp"), (.eventFork, "event_fork"), (.eventRemap, "event_remap"),
        (.eventRemove, "event_remove"), (.missingHugetlbfs, "missing_hugetlbfs"), (.missingShmem, "missing_shmem"),
        (.eventUnmap, "event_unmap"), (.sigbus, "sigbus"), (.threadID, "thread_id"),
        (.minorHugetlbfs, "minor_hugetlbfs"), (.minorShmem, "minor_shmem"), (.exactAddress, "exact_address"),
        (.writeProtectShmem, "wp_hugetlbfs_shmem"), (.writeProtectUnpopulated, "wp_unpopulated"),
        (.poison, "poison"), (.writeProtectAsync, "wp_async"), (.move, "move"),
    ]

    /// Feature names, lower-case, as in the kernel's `UFFD_FEATURE_*` spelling.
    public var names: [String] { Self.names.filter { contains($0.0) }.map(\.1) }
}

/// How a client learns that a page's data is lost (its only copy died): it must get SIGBUS,
/// never zeros or another page's bytes.
public enum LostPageSignal: String, Sendable {
    /// `UFFDIO_POISON` (Linux 6.6+): the client's page-table entry raises SIGBUS on every
    /// touch, with `si_code` BUS_MCEERR_AR and the address.
    case poison = "uffdio_poison"
    /// Kernels without `UFFD_FEATURE_POISON` (Debian 12's 6.1): the page stays missing and the
    /// fault is never resolved; the thread that touched it is sent SIGBUS with `tgkill(2)` (the
    /// fault event names it: `UFFD_FEATURE_THREAD_ID`), else the whole process with `kill(2)`.
    /// The signal is not synchronous: `si_code` is SI_TKILL and there is no `si_addr`. A
    /// handler that returns touches the page again, faults again, and gets another SIGBUS.
    case sigbusToFaultingThread = "sigbus_to_faulting_thread"

    /// What this kernel allows.
    public init(kernel features: UffdFeatures) {
        self = features.contains(.poison) ? .poison : .sigbusToFaultingThread
    }
}

/// How a userfaultfd can be obtained on this host.
public enum UffdAccess: String, Sendable {
    case device = "/dev/userfaultfd"
    case syscall = "userfaultfd(2)"
    case userModeOnly = "userfaultfd(2) with UFFD_USER_MODE_ONLY"
}

/// What the kernel offers, probed once at start.
public struct UffdProbe: Sendable {
    public let features: UffdFeatures
    public let access: UffdAccess

    /// Opens a throwaway userfaultfd and asks the kernel what it supports.
    public static func run() throws(UffdUnavailable) -> UffdProbe {
        var features: UInt64 = 0
        var ioctls: UInt64 = 0
        var via: Int32 = 0
        let r = fp_uffd_probe(&features, &ioctls, &via)
        if r < 0 { throw UffdUnavailable(errno: -r) }
        let access: UffdAccess =
            switch via {
            case FP_UFFD_VIA_DEVICE: .device
            case FP_UFFD_VIA_SYSCALL: .syscall
            default: .userModeOnly
            }
        return UffdProbe(features: UffdFeatures(rawValue: features), access: access)
    }

    /// Features Farpage needs that this kernel lacks.
    public var missingRequired: UffdFeatures { UffdFeatures.required.subtracting(features) }
}

/// userfaultfd cannot be used here, with the fix in the message.
public struct UffdUnavailable: Error, CustomStringConvertible, Sendable {
    public let errno: Int32
    public var description: String {
        switch errno {
        case 38:  // ENOSYS
            return "userfaultfd is unavailable (ENOSYS): the kernel is built without CONFIG_USERFAULTFD, "
                + "or a container seccomp profile blocks the userfaultfd syscall; allow 'userfaultfd' in the seccomp profile"
        case 1, 13:  // EPERM, EACCES
            return "userfaultfd is not permitted (\(KernelError.describe(errno))): grant read/write on /dev/userfaultfd "
                + "(e.g. a udev rule setting group 'farpage', mode 0660), or set sysctl vm.unprivileged_userfaultfd=1, "
                + "or give the process CAP_SYS_PTRACE"
        default:
            return "creating a userfaultfd failed: \(KernelError.describe(errno))"
        }
    }
}

/// One event read from a userfaultfd.
public struct UffdEvent: Sendable {
    public enum Kind: Sendable, Equatable {
        case pageFault(address: UInt64, write: Bool, writeProtect: Bool, minor: Bool, threadID: UInt32)
        case fork(childUffd: Int32)
        case remap(from: UInt64, to: UInt64, length: UInt64)
        case remove(start: UInt64, end: UInt64)
        case unmap(start: UInt64, end: UInt64)
        case unknown(UInt32)
    }
    public let kind: Kind

    init(_ raw: fp_uffd_event) {
        switch Int32(raw.kind) {
        case FP_UFFD_EVENT_PAGEFAULT:
            kind = .pageFault(
                address: raw.address, write: raw.flags & FP_UFFD_FAULT_WRITE != 0,
                writeProtect: raw.flags & FP_UFFD_FAULT_WP != 0, minor: raw.flags & FP_UFFD_FAULT_MINOR != 0,
                threadID: raw.ptid)
        case FP_UFFD_EVENT_FORK: kind = .fork(childUffd: Int32(truncatingIfNeeded: raw.arg0))
        case FP_UFFD_EVENT_REMAP: kind = .remap(from: raw.arg0, to: raw.arg1, length: raw.arg2)
        case FP_UFFD_EVENT_REMOVE: kind = .remove(start: raw.arg0, end: raw.arg1)
        case FP_UFFD_EVENT_UNMAP: kind = .unmap(start: raw.arg0, end: raw.arg1)
        default: kind = .unknown(raw.kind)
        }
    }
}

/// A userfaultfd received from a client. The agent resolves its faults.
///
/// Owns the descriptor (closed on release). Every method is safe to call from any thread.
public final class Userfaultfd: @unchecked Sendable {
    public let descriptor: OwnedDescriptor
    public var rawValue: Int32 { descriptor.rawValue }
    /// The process whose faults this userfaultfd reports (as the agent's pid namespace sees
    /// it; 0 when unknown). Signalled on a lost page where the kernel cannot poison.
    public let owner: Int32
    /// How `poison(address:length:thread:)` makes a lost page fail.
    public let lostPageSignal: LostPageSignal

    public init(_ descriptor: OwnedDescriptor, owner: Int32 = 0, lostPageSignal: LostPageSignal = .poison) {
        self.descriptor = descriptor
        self.owner = owner
        self.lostPageSignal = lostPageSignal
    }

    /// Result of an install.
    public enum InstallResult: Equatable, Sendable {
        case installed
        /// EEXIST: a page is already there (another thread won the race).
        case alreadyPresent
        /// ENOENT/ESRCH: the client's address space is gone or the range unmapped.
        case clientGone
    }

    /// `UFFDIO_COPY`: atomically installs `length` bytes from `source` at `address` and wakes waiters.
    /// - Parameter writeProtect: map the page write-protected (`UFFDIO_COPY_MODE_WP`) so the first write is seen.
    public func copy(to address: UInt64, from source: UnsafeRawPointer, length: Int, writeProtect: Bool,
                     wake: Bool = true) throws(KernelError) -> InstallResult
    {
        var mode: UInt64 = writeProtect ? FP_UFFD_COPY_WP : 0
        if !wake { mode |= FP_UFFD_COPY_DONTWAKE }
        var err: Int32 = 0
        let r = fp_uffd_copy(rawValue, address, source, UInt64(length), mode, &err)
        if r >= 0 {
            if err == 0 { return .installed }
            if err == 17 { return .alreadyPresent }
            throw KernelError("UFFDIO_COPY", errno: err)
        }
        switch Int32(-r) {
        case 17: return .alreadyPresent  // EEXIST
        case 2, 3: return .clientGone  // ENOENT, ESRCH
        default: throw KernelError("UFFDIO_COPY", errno: Int32(-r))
        }
    }

    /// `UFFDIO_WRITEPROTECT`: protect (`enable`) or unprotect a range. Unprotecting wakes waiters.
    public func writeProtect(address: UInt64, length: UInt64, enable: Bool) throws(KernelError) {
        let r = fp_uffd_writeprotect(rawValue, address, length, enable ? FP_UFFD_WP_MODE_WP : 0)
        if r == -2 || r == -3 { return }  // the client is gone: nothing left to protect
        _ = try check(r, "UFFDIO_WRITEPROTECT")
    }

    /// `UFFDIO_WAKE`: wakes threads blocked on faults in the range.
    public func wake(address: UInt64, length: UInt64) {
        _ = fp_uffd_wake(rawValue, address, length)
    }

    /// `UFFDIO_POISON`: the range raises SIGBUS on access (a page whose data is lost).
    ///
    /// A page that was write-protected and then punched keeps a uffd-wp marker in the client's
    /// page table, and `UFFDIO_POISON` refuses such an entry with EEXIST; the marker is
    /// cleared by un-protecting the range first.
    ///
    /// Where the kernel has no `UFFDIO_POISON` (`lostPageSignal` is `.sigbusToFaultingThread`)
    /// the range is left missing, so the fault is never resolved, and `thread` (the faulting
    /// thread from the fault event; 0 if unknown) or else the owner process gets SIGBUS.
    /// - Parameter thread: the thread id from the page-fault event being answered.
    public func poison(address: UInt64, length: UInt64, thread: UInt32 = 0) throws(KernelError) {
        if lostPageSignal == .sigbusToFaultingThread {
            guard owner > 0 else { throw KernelError("tgkill(SIGBUS)", errno: 3) }  // ESRCH: no owner known
            let r = fp_signal_sigbus(owner, thread)
            if r == -3 { return }  // the client is gone
            _ = try check(r, "tgkill(SIGBUS)")
            return
        }
        var r = fp_uffd_poison(rawValue, address, length, 0)
        if r == -17 {
            _ = fp_uffd_writeprotect(rawValue, address, length, FP_UFFD_WP_MODE_DONTWAKE)
            r = fp_uffd_poison(rawValue, address, length, 0)
        }
        if r == -2 || r == -3 { return }  // the client is gone
        _ = try check64(r, "UFFDIO_POISON")
    }

    /// Reads pending events without blocking (at most 64).
    public func readEvents(into buffer: inout [UffdEvent]) throws(KernelError) -> Int {
        var raw = [fp_uffd_event](repeating: fp_uffd_event(), count: 64)
        let n = try check(fp_uffd_read_events(rawValue, &raw, 64), "read(userfaultfd)")
        buffer.removeAll(keepingCapacity: true)
        for i in 0..<Int(n) { buffer.append(UffdEvent(raw[i])) }
        return Int(n)
    }
}
