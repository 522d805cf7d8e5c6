/*
 * fp_uring.h — io_uring (through liburing), behind an opaque handle. The spill file's other
 * kernel calls (open, O_DIRECT, flock, fallocate, fstatfs) are in fp_kernel.h.
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
 * the whole batch is in. `done` must not use this ring. With `poll` (and a polling time set by
 * fp_ring_set_spin), a wait for one completion polls before it sleeps. Returns 0 when every op ran (each may
 * still have failed: see `result`), or -errno when the ring itself failed; then ops that
 * never ran hold that error, every op that was submitted has completed (no buffer is touched
 * after the return), and the ring must be destroyed, not reused. */
int fp_ring_rw(fp_ring *ring, fp_ring_op *ops, int n, fp_ring_done done, void *context, int poll);

/* Each fp_ring_rw call with `poll` set polls the completion queue for up to `nanoseconds` in
 * all before it sleeps for its first completion (0, the default: never polls). Polling trades CPU for the sleep and
 * wakeup a fast device's completion otherwise costs. */
void fp_ring_set_spin(fp_ring *ring, uint64_t nanoseconds);

/* Completions reaped while polling, over the ring's life. */
uint64_t fp_ring_spun(const fp_ring *ring);

/* How many times this ring's fp_ring_rw calls entered the kernel to submit entries (a batch
 * that fits the ring takes one; a larger one takes more). */
uint64_t fp_ring_submits(const fp_ring *ring);

/* Whether this process may use io_uring: sets up and tears down a small ring and checks
 * that IORING_OP_READ and IORING_OP_WRITE are supported. 0, or -errno: -EPERM when
 * kernel.io_uring_disabled forbids it, -ENOSYS when the kernel lacks io_uring or a seccomp
 * filter blocks it, -EOPNOTSUPP when the opcodes are missing. */
int fp_ring_probe(void);

#ifdef __cplusplus
}
#endif
#endif
