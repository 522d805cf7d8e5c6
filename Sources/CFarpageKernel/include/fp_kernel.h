/*
 * fp_kernel.h — Farpage's only window onto kernel structs and ioctl numbers.
 *
 * Convention (liburing's): every function returns >= 0 on success or -errno on
 * failure, and never touches the global errno on the way out. No kernel struct
 * crosses this header: callers see plain integers and Farpage's own structs.
 * Deliberately no _GNU_SOURCE here (it is set in cSettings and the .c files).
 */
#ifndef FP_KERNEL_H
#define FP_KERNEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- userfaultfd -------------------------------------------------------- */

/* Feature bits (mirroring UFFD_FEATURE_* of Linux 6.18). */
#define FP_UFFD_FEATURE_PAGEFAULT_FLAG_WP (1ULL << 0)
#define FP_UFFD_FEATURE_EVENT_FORK (1ULL << 1)
#define FP_UFFD_FEATURE_EVENT_REMAP (1ULL << 2)
#define FP_UFFD_FEATURE_EVENT_REMOVE (1ULL << 3)
#define FP_UFFD_FEATURE_MISSING_HUGETLBFS (1ULL << 4)
#define FP_UFFD_FEATURE_MISSING_SHMEM (1ULL << 5)
#define FP_UFFD_FEATURE_EVENT_UNMAP (1ULL << 6)
#define FP_UFFD_FEATURE_SIGBUS (1ULL << 7)
#define FP_UFFD_FEATURE_THREAD_ID (1ULL << 8)
#define FP_UFFD_FEATURE_MINOR_HUGETLBFS (1ULL << 9)
#define FP_UFFD_FEATURE_MINOR_SHMEM (1ULL << 10)
#define FP_UFFD_FEATURE_EXACT_ADDRESS (1ULL << 11)
#define FP_UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1ULL << 12)
#define FP_UFFD_FEATURE_WP_UNPOPULATED (1ULL << 13)
#define FP_UFFD_FEATURE_POISON (1ULL << 14)
#define FP_UFFD_FEATURE_WP_ASYNC (1ULL << 15)
#define FP_UFFD_FEATURE_MOVE (1ULL << 16)

#define FP_UFFD_REGISTER_MISSING (1ULL << 0)
#define FP_UFFD_REGISTER_WP (1ULL << 1)
#define FP_UFFD_REGISTER_MINOR (1ULL << 2)

#define FP_UFFD_COPY_DONTWAKE (1ULL << 0)
#define FP_UFFD_COPY_WP (1ULL << 1)
#define FP_UFFD_WP_MODE_WP (1ULL << 0)
#define FP_UFFD_WP_MODE_DONTWAKE (1ULL << 1)

/* How fp_uffd_open obtained its descriptor. */
#define FP_UFFD_VIA_DEVICE 1  /* ioctl(USERFAULTFD_IOC_NEW) on /dev/userfaultfd */
#define FP_UFFD_VIA_SYSCALL 2 /* userfaultfd(2) with full (kernel+user) faults */
#define FP_UFFD_VIA_USER_MODE_ONLY 3 /* userfaultfd(2) with UFFD_USER_MODE_ONLY */

/* Event kinds as Farpage reports them (values are the kernel's UFFD_EVENT_*). */
#define FP_UFFD_EVENT_PAGEFAULT 0x12
#define FP_UFFD_EVENT_FORK 0x13
#define FP_UFFD_EVENT_REMAP 0x14
#define FP_UFFD_EVENT_REMOVE 0x15
#define FP_UFFD_EVENT_UNMAP 0x16

#define FP_UFFD_FAULT_WRITE (1ULL << 0)
#define FP_UFFD_FAULT_WP (1ULL << 1)
#define FP_UFFD_FAULT_MINOR (1ULL << 2)

/* One decoded uffd_msg. For PAGEFAULT: flags, address, ptid. For FORK: arg0 =
 * the child's uffd. For REMAP: arg0 = from, arg1 = to, arg2 = len. For
 * REMOVE/UNMAP: arg0 = start, arg1 = end. */
typedef struct fp_uffd_event {
    uint32_t kind;
    uint32_t ptid;
    uint64_t flags;
    uint64_t address;
    uint64_t arg0;
    uint64_t arg1;
    uint64_t arg2;
} fp_uffd_event;

/* Open a userfaultfd (O_CLOEXEC | O_NONBLOCK). Tries /dev/userfaultfd, then the
 * syscall, then the syscall with UFFD_USER_MODE_ONLY (when allow_user_mode_only).
 * *via receives FP_UFFD_VIA_*. On failure returns the errno of the most
 * telling attempt (the device's when it exists, else the syscall's). */
int fp_uffd_open(int allow_user_mode_only, int *via);
/* UFFDIO_API. requested: feature bits. On success *features, *ioctls hold the
 * kernel's answer. A second call on the same fd fails with -EINVAL. */
int fp_uffd_api(int fd, uint64_t requested, uint64_t *features, uint64_t *ioctls);
/* Probe what this kernel offers: opens a throwaway uffd and asks for nothing. */
int fp_uffd_probe(uint64_t *features, uint64_t *ioctls, int *via);
int fp_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls);
int fp_uffd_unregister(int fd, uint64_t start, uint64_t len);
/* UFFDIO_COPY. Returns bytes copied (>= 0) or -errno; on a partial copy the
 * byte count is returned and *err (if non-NULL) receives the errno. */
int64_t fp_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode, int *err);
int64_t fp_uffd_zeropage(int fd, uint64_t start, uint64_t len, int dontwake);
int fp_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);
int fp_uffd_wake(int fd, uint64_t start, uint64_t len);
int64_t fp_uffd_poison(int fd, uint64_t start, uint64_t len, int dontwake);
/* SIGBUS to thread `tid` of process `pid` (tgkill), or to the process when tid is 0 or names
 * no thread of it. Returns 1 (thread), 0 (process) or -errno. */
int fp_signal_sigbus(int32_t pid, uint32_t tid);
/* The calling thread's id (what a uffd fault event's thread id names). */
int32_t fp_gettid(void);
/* Read up to max messages without blocking (fd must be O_NONBLOCK). Returns
 * the count (0 when none is pending) or -errno. */
int fp_uffd_read_events(int fd, fp_uffd_event *out, int max);

/* ---- memfd and files ---------------------------------------------------- */

#define FP_SEAL_SEAL 0x0001
#define FP_SEAL_SHRINK 0x0002
#define FP_SEAL_GROW 0x0004
#define FP_SEAL_WRITE 0x0008

int fp_memfd_create(const char *name, int allow_sealing);
int fp_ftruncate(int fd, uint64_t size);
int fp_add_seals(int fd, int seals);
/* F_GET_SEALS: the seal bits, or -EINVAL for files that are not shmem/memfd. */
int fp_get_seals(int fd);
int fp_file_size(int fd, uint64_t *size);
/* fallocate(PUNCH_HOLE | KEEP_SIZE): frees the range and zaps every mapping. */
int fp_punch_hole(int fd, uint64_t offset, uint64_t len);
/* The file's (st_dev, st_ino): two descriptors with equal identities name the same file. */
int fp_file_identity(int fd, uint64_t *dev, uint64_t *ino);
/* Data files (the spill file). open(O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600). */
int fp_file_open_rw(const char *path);
/* fcntl(F_SETFL) with or without O_DIRECT: -EINVAL where the filesystem refuses direct I/O. */
int fp_set_direct_io(int fd, int on);
/* flock(LOCK_EX | LOCK_NB): -EWOULDBLOCK when another open file description holds it. */
int fp_flock_exclusive(int fd);
/* fallocate(mode 0) of [0, len): reserves the blocks; -EOPNOTSUPP where the filesystem cannot. */
int fp_preallocate(int fd, uint64_t len);
/* fstat: size, bytes allocated on disk, and whether it is a regular file. */
int fp_file_status(int fd, uint64_t *size, uint64_t *allocated, int *regular);
/* fstatfs: bytes available to us, the filesystem's size (0 when it reports none, as ramfs
 * does) and its magic number (f_type). */
int fp_fs_space(int fd, uint64_t *available, uint64_t *total, uint64_t *fs_type);
/* pread that loops until len bytes or EOF; returns bytes read or -errno. */
int64_t fp_pread_full(int fd, void *buf, uint64_t len, uint64_t offset);
/* readlink("/proc/self/fd/N") into buf (NUL-terminated). */
int fp_fd_link(int fd, char *buf, size_t cap);
int fp_close(int fd);
int fp_dup_cloexec(int fd);
/* mmap(MAP_SHARED) of fd; NULL on failure with *err set. */
void *fp_map_shared(int fd, uint64_t len, int *err);
/* Anonymous private mapping (MAP_NORESERVE); NULL on failure with *err set. */
void *fp_map_anonymous(uint64_t len, int *err);
int fp_unmap(void *addr, uint64_t len);
int fp_madvise_dontfork(void *addr, uint64_t len);

/* ---- Unix sockets with SCM_RIGHTS --------------------------------------- */

/* Listening SOCK_SEQPACKET socket at path (unlinks a stale socket first),
 * mode applied with chmod. Non-blocking, close-on-exec. */
int fp_unix_listen(const char *path, int backlog, unsigned mode);
/* Connected SOCK_SEQPACKET socket to path (blocking, close-on-exec). */
int fp_unix_connect(const char *path);
int fp_accept(int listen_fd);
/* sendmsg with up to 8 fds as SCM_RIGHTS. MSG_NOSIGNAL. Returns bytes sent. */
int64_t fp_send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);
/* recvmsg accepting up to maxfds fds (MSG_CMSG_CLOEXEC). Extra fds beyond
 * maxfds are closed. *truncated is set when the packet or its control data
 * did not fit. Returns bytes received (0 = peer closed) or -errno. */
int64_t fp_recv_fds(int sock, void *buf, size_t cap, int *fds, int maxfds, int *nfds, int *truncated);
int fp_peer_cred(int sock, int32_t *pid, uint32_t *uid, uint32_t *gid);
int fp_set_nonblocking(int fd, int on);
int fp_set_recv_timeout_ms(int fd, int ms);

/* ---- TCP (the agent's blocking transport to memory servers) -------------- */

/* Connects to host:port (numeric or a name) within timeout_ms; the socket is blocking,
 * close-on-exec, with TCP_NODELAY and send/receive timeouts of io_timeout_ms. */
int fp_tcp_connect(const char *host, int port, int timeout_ms, int io_timeout_ms);
/* Sends or receives exactly len bytes (retrying short transfers and EINTR). Returns 0,
 * -errno, or -ECONNRESET when the peer closed. EAGAIN means the I/O timeout passed. */
int fp_send_all(int fd, const void *buf, size_t len);
/* Sends a then b (writev semantics) until both are out; a header and a payload without copying. */
int fp_send_two(int fd, const void *a, size_t alen, const void *b, size_t blen);
int fp_recv_all(int fd, void *buf, size_t len);
/* As fp_recv_all, but polls (MSG_DONTWAIT) for up to spin_us microseconds before blocking:
 * a reply that arrives within that time costs no sleep and no wake-up of this thread. */
int fp_recv_all_spin(int fd, void *buf, size_t len, int spin_us);
int fp_shutdown(int fd);

/* ---- processes, polling, notification ---------------------------------- */

int fp_pidfd_open(int32_t pid);
int fp_epoll_create(void);
/* events: FP_POLL_IN etc.; data: caller's 64-bit cookie. op: 1 add, 2 del, 3 mod. */
#define FP_POLL_IN 0x001
#define FP_POLL_ERR 0x008
#define FP_POLL_HUP 0x010
int fp_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data);
typedef struct fp_poll_event {
    uint32_t events;
    uint64_t data;
} fp_poll_event;
int fp_epoll_wait(int epfd, fp_poll_event *out, int max, int timeout_ms);
int fp_eventfd(void);
int fp_eventfd_signal(int fd);
int fp_eventfd_drain(int fd);
/* sd_notify(3) protocol: one datagram to $NOTIFY_SOCKET. 0 when unset. */
int fp_sd_notify(const char *state);
int fp_set_thread_name(const char *name);
/* Servers moving large page batches: serve allocations >= mmap_threshold with mmap (returned to
 * the kernel on free, with no dynamic raising of the threshold), trim heaps above trim_threshold,
 * and use at most max_arenas malloc arenas. */
void fp_malloc_tune(size_t mmap_threshold, size_t trim_threshold, int max_arenas);
uint64_t fp_monotonic_ns(void);
int fp_page_size(void);

#ifdef __cplusplus
}
#endif
#endif
