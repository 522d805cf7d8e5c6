/*
 * fp_uring.h — io_uring (through liburing) and the spill file's kernel calls, behind an
 * opaque handle.
 *
 * liburing 2.3's header is mostly static inline functions and clashes with the Glibc and
 * swift-system modules, so Swift never includes it: only this header, which exposes no
 * liburing or kernel struct. Convention (liburing's and fp_kernel.h's): every function
 * returns >= 0 on success or -errno on failure. No _GNU_SOURCE here (set in the .c file).
 */
#ifndef FP_URING_H
#define FP_URING_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- io_uring ------------------------------------------------------------ */

/* One ring. Used by one thread at a time; create one per concurrent caller. */
typedef struct fp_ring fp_ring;

/* One read or write of `length` bytes at `offset` of `fd`. */
typedef struct fp_ring_op {
    int32_t fd;
    int32_t write;  /* 0: read into buffer; 1: write from buffer */
    void *buffer;
    uint32_t length;
    uint64_t offset;
    /* Out: bytes done (== length, or less when a read reached the end of the file), or -errno. */
    int64_t result;
} fp_ring_op;

/* A ring with room for `entries` submissions at once (rounded up to a power of two).
 * Returns NULL and stores -errno in *err on failure. */
fp_ring *fp_ring_create(unsigned entries, int *err);

/* Tears the ring down (io_uring_queue_exit). Safe only when no fp_ring_rw is running. */
void fp_ring_destroy(fp_ring *ring);

/* Called once per op as it finishes (in completion order) with its index and result. */
typedef void (*fp_ring_done)(void *context, int index, int64_t result);

/* Runs `n` operations and waits for all of them: queues as many as the ring holds, submits
 * them with one io_uring_submit_and_wait, reaps every completion, resubmits the rest of a
 * short read or write, and queues more as room frees up. Stores each op's outcome in its
 * `result`, and calls `done` (when not NULL) as each finishes; with `done`, it first waits
 * for op 0 alone (the rest stay in flight), so that the head of a batch can be used before
 * the whole batch is in. `done` must not use this ring. Returns 0 when every op ran (each may
 * still have failed: see `result`), or -errno when the ring itself failed; then ops that
 * never ran hold that error, every op that was submitted has completed (no buffer is touched
 * after the return), and the ring must be destroyed, not reused. */
int fp_ring_rw(fp_ring *ring, fp_ring_op *ops, int n, fp_ring_done done, void *context);

/* Whether this process may use io_uring: sets up and tears down a small ring and checks
 * that IORING_OP_READ and IORING_OP_WRITE are supported. 0, or -errno: -EPERM when
 * kernel.io_uring_disabled forbids it, -ENOSYS when the kernel lacks io_uring or a seccomp
 * filter blocks it, -EOPNOTSUPP when the opcodes are missing. */
int fp_ring_probe(void);

/* ---- The spill file ---------------------------------------------------------- */

/* Opens (creating with mode 0600) a file for reading and writing, O_CLOEXEC and O_NOFOLLOW. */
int fp_spill_open(const char *path);

/* Turns O_DIRECT on or off for an open file (fcntl F_SETFL): -EINVAL where the filesystem
 * refuses direct I/O. */
int fp_spill_set_direct(int fd, int direct);

/* Takes an exclusive, non-blocking flock(2): -EWOULDBLOCK when another process holds it. */
int fp_spill_lock(int fd);

/* fallocate(2) mode 0 of [0, length): reserves the blocks. -EOPNOTSUPP where the filesystem
 * has no fallocate. */
int fp_spill_preallocate(int fd, uint64_t length);

/* ftruncate(2). */
int fp_spill_truncate(int fd, uint64_t length);

/* fstat(2): size in bytes, bytes allocated on disk, and whether it is a regular file. */
int fp_spill_stat(int fd, uint64_t *size, uint64_t *allocated, int *regular);

/* statfs(2) of the file's filesystem: bytes available to us, its total size (0 when the
 * filesystem reports none, as ramfs does) and its magic number (f_type). */
int fp_spill_space(int fd, uint64_t *available, uint64_t *total, uint64_t *fs_type);

#ifdef __cplusplus
}
#endif
#endif
