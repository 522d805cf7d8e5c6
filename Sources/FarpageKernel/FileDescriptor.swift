import CFarpageKernel

/// An owned file descriptor, closed exactly once when this object is released.
///
/// Whoever holds the last reference closes the descriptor; hand out `rawValue`
/// only for the duration of a call.
public final class OwnedDescriptor: @unchecked Sendable {
    public let rawValue: Int32

    /// Takes ownership of `rawValue`.
    public init(adopting rawValue: Int32) { self.rawValue = rawValue }

    deinit { _ = fp_close(rawValue) }

    /// `readlink(/proc/self/fd/N)`: what the descriptor refers to, e.g. `/memfd:x (deleted)` or `anon_inode:[userfaultfd]`.
    public func linkTarget() throws(KernelError) -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        let n = try check(fp_fd_link(rawValue, &buffer, buffer.count), "readlink(/proc/self/fd)")
        return String(decoding: buffer.prefix(Int(n)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The file's device and inode: equal for descriptors of the same file.
    public func identity() throws(KernelError) -> FileIdentity {
        var dev: UInt64 = 0
        var ino: UInt64 = 0
        _ = try check(fp_file_identity(rawValue, &dev, &ino), "fstat")
        return FileIdentity(device: dev, inode: ino)
    }
}

/// A file's (st_dev, st_ino).
public struct FileIdentity: Equatable, Hashable, Sendable {
    public let device: UInt64
    public let inode: UInt64
}

/// Operations on a memfd (a shmem file) that backs a region.
public enum Memfd {
    /// Seal bits (`F_SEAL_*`).
    public struct Seals: OptionSet, Sendable {
        public let rawValue: Int32
        public init(rawValue: Int32) { self.rawValue = rawValue }
        public static let seal = Seals(rawValue: FP_SEAL_SEAL)
        public static let shrink = Seals(rawValue: FP_SEAL_SHRINK)
        public static let grow = Seals(rawValue: FP_SEAL_GROW)
        public static let write = Seals(rawValue: FP_SEAL_WRITE)
        public static let futureWrite = Seals(rawValue: 0x0010)
    }

    /// Creates a memfd (`memfd_create` with `MFD_CLOEXEC | MFD_ALLOW_SEALING`).
    public static func create(name: String, size: UInt64) throws(KernelError) -> OwnedDescriptor {
        let fd = try check(fp_memfd_create(name, 1), "memfd_create")
        let owned = OwnedDescriptor(adopting: fd)
        _ = try check(fp_ftruncate(fd, size), "ftruncate")
        return owned
    }

    /// `F_GET_SEALS`; fails with EINVAL for descriptors that are not shmem/memfd files.
    public static func seals(_ fd: OwnedDescriptor) throws(KernelError) -> Seals {
        Seals(rawValue: try check(fp_get_seals(fd.rawValue), "fcntl(F_GET_SEALS)"))
    }

    public static func addSeals(_ fd: OwnedDescriptor, _ seals: Seals) throws(KernelError) {
        _ = try check(fp_add_seals(fd.rawValue, seals.rawValue), "fcntl(F_ADD_SEALS)")
    }

    /// The file size (`fstat`).
    public static func size(_ fd: OwnedDescriptor) throws(KernelError) -> UInt64 {
        var size: UInt64 = 0
        _ = try check(fp_file_size(fd.rawValue, &size), "fstat")
        return size
    }

    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: frees the pages and zaps every mapping of them.
    public static func punchHole(_ fd: OwnedDescriptor, offset: UInt64, length: UInt64) throws(KernelError) {
        _ = try check(fp_punch_hole(fd.rawValue, offset, length), "fallocate(PUNCH_HOLE)")
    }

    /// Reads `length` bytes at `offset` through the page cache (`pread`). Holes read as
    /// zeros without being allocated, so this never populates a page the client has not.
    public static func read(_ fd: OwnedDescriptor, into buffer: UnsafeMutableRawPointer, length: Int, offset: UInt64)
        throws(KernelError) -> Int
    {
        Int(try check64(fp_pread_full(fd.rawValue, buffer, UInt64(length), offset), "pread"))
    }
}

/// Anonymous private memory reserved with `MAP_NORESERVE` (staging buffers, the memory store's slabs).
public enum AnonymousMemory {
    public static func map(bytes: UInt64) throws(KernelError) -> UnsafeMutableRawPointer {
        var err: Int32 = 0
        guard let p = fp_map_anonymous(bytes, &err) else { throw KernelError("mmap(anonymous)", errno: err) }
        return p
    }
    public static func unmap(_ address: UnsafeMutableRawPointer, bytes: UInt64) { _ = fp_unmap(address, bytes) }
}

/// A data file on local storage, opened for reading and writing (the spill file).
public enum DataFile {
    /// What `fstat` says about it.
    public struct Status: Sendable {
        public var size: UInt64
        public var allocated: UInt64
        public var isRegular: Bool
    }

    /// What `fstatfs` says about its filesystem.
    public struct Space: Sendable {
        public var available: UInt64
        /// Zero when the filesystem reports no size (ramfs).
        public var total: UInt64
        /// The filesystem's magic number (`f_type`).
        public var type: UInt64
    }

    /// `open(O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600)`.
    public static func open(_ path: String) throws(KernelError) -> OwnedDescriptor {
        OwnedDescriptor(adopting: try check(fp_file_open_rw(path), "open"))
    }

    /// `fcntl(F_SETFL)` with or without O_DIRECT; EINVAL where the filesystem refuses it.
    public static func setDirect(_ file: OwnedDescriptor, _ direct: Bool) throws(KernelError) {
        _ = try check(fp_set_direct_io(file.rawValue, direct ? 1 : 0), direct ? "fcntl(F_SETFL, O_DIRECT)" : "fcntl(F_SETFL)")
    }

    /// `flock(LOCK_EX | LOCK_NB)`: EWOULDBLOCK when another process holds it.
    public static func lock(_ file: OwnedDescriptor) throws(KernelError) {
        _ = try check(fp_flock_exclusive(file.rawValue), "flock")
    }

    /// `fallocate(mode 0)` over the first `length` bytes; EOPNOTSUPP where the filesystem cannot.
    public static func preallocate(_ file: OwnedDescriptor, length: UInt64) throws(KernelError) {
        _ = try check(fp_preallocate(file.rawValue, length), "fallocate")
    }

    /// `ftruncate`.
    public static func truncate(_ file: OwnedDescriptor, length: UInt64) throws(KernelError) {
        _ = try check(fp_ftruncate(file.rawValue, length), "ftruncate")
    }

    /// `fstat`.
    public static func status(_ file: OwnedDescriptor) throws(KernelError) -> Status {
        var status = Status(size: 0, allocated: 0, isRegular: false)
        var regular: Int32 = 0
        _ = try check(fp_file_status(file.rawValue, &status.size, &status.allocated, &regular), "fstat")
        status.isRegular = regular != 0
        return status
    }

    /// `fstatfs`.
    public static func space(_ file: OwnedDescriptor) throws(KernelError) -> Space {
        var space = Space(available: 0, total: 0, type: 0)
        _ = try check(fp_fs_space(file.rawValue, &space.available, &space.total, &space.type), "fstatfs")
        return space
    }

    /// A filesystem's name from its `f_type`, for messages.
    public static func filesystemName(_ type: UInt64) -> String {
        let names: [UInt64: String] = [
            0xEF53: "ext4", 0x5846_5342: "xfs", 0x9123_683E: "btrfs", 0x0102_1994: "tmpfs",
            0x8584_58F6: "ramfs", 0x794C_7630: "overlayfs", 0x6969: "nfs", 0x6573_5546: "fuse",
            0xFF53_4D42: "cifs", 0x2FC1_2FC1: "zfs", 0xF2F5_2010: "f2fs",
        ]
        return names[type] ?? "filesystem 0x\(String(type, radix: 16))"
    }
}
