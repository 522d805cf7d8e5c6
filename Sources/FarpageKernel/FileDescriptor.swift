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
