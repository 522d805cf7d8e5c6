/* fp_uring.c — batched io_uring reads and writes (liburing). The spill file's other kernel calls
 * are in fp_kernel.c. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "fp_uring.h"

#include <errno.h>
#include <liburing.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- io_uring ------------------------------------------------------------ */

struct fp_ring {
    struct io_uring ring;
    unsigned entries;
    uint64_t submits;  /* io_uring_enter calls that submitted at least one entry */
    uint64_t spin_ns;  /* per fp_ring_rw call: how long to poll for completions before sleeping */
    uint64_t spun;     /* completions reaped while polling */
    int taskrun_flag;  /* IORING_SETUP_TASKRUN_FLAG: the SQ flags say when completions wait */
};

fp_ring *fp_ring_create(unsigned entries, int *err) {
    fp_ring *r = calloc(1, sizeof *r);
    if (!r) {
        *err = -ENOMEM;
        return NULL;
    }
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    /* COOP_TASKRUN: completions are processed when we next enter the kernel (to wait, or
     * when TASKRUN_FLAG shows some pending while we poll) instead of interrupting us. SUBMIT_ALL: one bad SQE does not hold back the rest. */
    p.flags = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG | IORING_SETUP_SUBMIT_ALL;
    int rc = io_uring_queue_init_params(entries, &r->ring, &p);
    r->taskrun_flag = rc == 0;
    if (rc == -EINVAL) { /* kernels before 5.19 */
        memset(&p, 0, sizeof p);
        rc = io_uring_queue_init_params(entries, &r->ring, &p);
    }
    if (rc < 0) {
        free(r);
        *err = rc;
        return NULL;
    }
    r->entries = p.sq_entries;
    *err = 0;
    return r;
}

void fp_ring_destroy(fp_ring *ring) {
    if (!ring) return;
    io_uring_queue_exit(&ring->ring);
    free(ring);
}

void fp_ring_set_spin(fp_ring *ring, uint64_t nanoseconds) { ring->spin_ns = nanoseconds; }

uint64_t fp_ring_spun(const fp_ring *ring) { return ring->spun; }

static uint64_t fp_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* One fp_ring_rw call. While an op runs, its `result` counts the bytes done so far. */
typedef struct {
    fp_ring *r;
    fp_ring_op *ops;
    fp_ring_done done;
    void *context;
    uint64_t *finished; /* bitmap over ops */
    int remaining;      /* ops not finished */
    unsigned pending;   /* queued in the SQ, not submitted yet */
    unsigned inflight;  /* submitted, completion not reaped yet */
    uint64_t spin_left; /* ns of polling left to this call */
} fp_batch;

static int fp_is_finished(const fp_batch *b, int i) { return (b->finished[i / 64] >> (i % 64)) & 1; }

static void fp_finish(fp_batch *b, int i, int64_t result) {
    b->ops[i].result = result;
    b->finished[i / 64] |= 1ULL << (i % 64);
    b->remaining--;
    if (b->done) b->done(b->context, i, result);
}

/* Queues the part of op `i` not done yet. */
static void fp_queue(fp_batch *b, int i) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&b->r->ring);
    if (!sqe) { /* cannot happen while pending + inflight <= entries; never loop on it */
        fp_finish(b, i, -EBUSY);
        return;
    }
    fp_ring_op *op = &b->ops[i];
    uint64_t done = (uint64_t)op->result;
    char *buffer = (char *)op->buffer + done;
    unsigned length = op->length - (unsigned)done;
    if (op->write)
        io_uring_prep_write(sqe, op->fd, buffer, length, op->offset + done);
    else
        io_uring_prep_read(sqe, op->fd, buffer, length, op->offset + done);
    io_uring_sqe_set_data64(sqe, (uint64_t)i);
    b->pending++;
}

/* Records one completion; resubmits the rest of a short transfer when `resubmit` is set. */
static void fp_complete(fp_batch *b, const struct io_uring_cqe *cqe, int resubmit) {
    int i = (int)cqe->user_data;
    int res = cqe->res;
    fp_ring_op *op = &b->ops[i];
    b->inflight--;
    if ((res == -EINTR || res == -EAGAIN) && resubmit) {
        fp_queue(b, i);
    } else if (res < 0) {
        fp_finish(b, i, res);
    } else if (res == 0) {
        /* A read at the end of the file: what was read so far. A write that makes no progress
         * would loop forever: an I/O error. */
        fp_finish(b, i, op->write ? -EIO : op->result);
    } else {
        op->result += res;
        if ((uint64_t)op->result >= op->length)
            fp_finish(b, i, op->result);
        else if (resubmit)
            fp_queue(b, i);
        else
            fp_finish(b, i, -EIO);
    }
}

/* Reaps every completion already posted, without waiting. */
static void fp_reap(fp_batch *b) {
    struct io_uring_cqe *cqe;
    while (io_uring_peek_cqe(&b->r->ring, &cqe) == 0) {
        struct io_uring_cqe copy = *cqe;
        io_uring_cqe_seen(&b->r->ring, cqe);
        fp_complete(b, &copy, 1);
    }
}

/* The ring failed with `error`: waits out what the kernel still has (the buffers are the
 * caller's), then fails every op that did not finish. */
static int fp_abandon(fp_batch *b, int n, int error) {
    while (b->inflight > 0) {
        struct io_uring_cqe *cqe;
        int w = io_uring_wait_cqe(&b->r->ring, &cqe);
        if (w == -EINTR) continue;
        if (w < 0) break;
        struct io_uring_cqe copy = *cqe;
        io_uring_cqe_seen(&b->r->ring, cqe);
        fp_complete(b, &copy, 0);
    }
    for (int i = 0; i < n; i++)
        if (!fp_is_finished(b, i)) fp_finish(b, i, error);
    return error;
}

/* Polls for completions, without sleeping, until at least `want` have been reaped since the
 * call or this call's polling time is spent. A device that completes within the polling time
 * saves the thread a sleep and a wakeup (10-20 us each on a virtual machine). */
static void fp_spin(fp_batch *b, unsigned want) {
    uint64_t start = fp_now_ns();
    int before = b->remaining;
    for (;;) {
        /* The clock is read before the queue, so the pass that finds the time spent still
         * looks once more (a thread preempted while polling does not miss what came). */
        int last = fp_now_ns() - start >= b->spin_left;
        struct io_uring_cqe *cqe;
        /* COOP_TASKRUN defers completions to our next kernel entry: enter when some wait. */
        if (!b->r->taskrun_flag || (IO_URING_READ_ONCE(*b->r->ring.sq.kflags) & IORING_SQ_TASKRUN))
            io_uring_get_events(&b->r->ring);
        while (io_uring_peek_cqe(&b->r->ring, &cqe) == 0) {
            struct io_uring_cqe copy = *cqe;
            io_uring_cqe_seen(&b->r->ring, cqe);
            fp_complete(b, &copy, 1);
        }
        /* Only finished ops count: a short transfer resubmitted is no progress. */
        if ((unsigned)(before - b->remaining) >= want || b->inflight == 0 || last) break;
    }
    b->r->spun += (uint64_t)(before - b->remaining);
    uint64_t spent = fp_now_ns() - start;
    b->spin_left = spent < b->spin_left ? b->spin_left - spent : 0;
}

int fp_ring_rw(fp_ring *ring, fp_ring_op *ops, int n, fp_ring_done done, void *context, int poll) {
    if (n <= 0) return 0;
    uint64_t finished[(n + 63) / 64];
    memset(finished, 0, sizeof finished);
    fp_batch b = {.r = ring, .ops = ops, .done = done, .context = context, .finished = finished, .remaining = n,
                  .spin_left = poll ? ring->spin_ns : 0};
    for (int i = 0; i < n; i++) ops[i].result = 0;
    int next = 0;
    int stalls = 0;
    while (b.remaining > 0) {
        /* Never more outstanding than the ring holds: the completion queue cannot overflow. */
        while (next < n && b.pending + b.inflight < ring->entries) fp_queue(&b, next++);
        /* A streaming caller gets op 0 as soon as it is in; then everything at once. */
        unsigned outstanding = b.pending + b.inflight;
        unsigned wait = (done && !fp_is_finished(&b, 0) && outstanding > 0) ? 1 : outstanding;
        /* A caller that polls (a fault's read: its page alone, or at the head of a streaming
         * batch), waiting for one completion with polling time left: submit without waiting,
         * poll, and sleep only if it has not come. The rest of a batch is slept for: polling
         * it takes the CPU that installs its pages, and its size hides a wakeup. */
        if (b.spin_left > 0 && wait == 1) {
            int sub = b.pending > 0 ? io_uring_submit(&ring->ring) : 0;
            if (sub > 0) {
                unsigned submitted = (unsigned)sub < b.pending ? (unsigned)sub : b.pending;
                b.pending -= submitted;
                b.inflight += submitted;
                ring->submits++;
            }
            if (sub >= 0 && b.inflight > 0) {
                int before = b.remaining;
                fp_spin(&b, wait);
                if (b.remaining < before) continue; /* progress: queue more, recompute the wait */
                wait = b.pending + b.inflight < wait ? b.pending + b.inflight : wait;
            }
        }
        int rc = io_uring_submit_and_wait(&ring->ring, wait);
        if (rc >= 0) {
            unsigned submitted = (unsigned)rc < b.pending ? (unsigned)rc : b.pending;
            b.pending -= submitted;
            b.inflight += submitted;
            if (submitted > 0) ring->submits++;
            stalls = 0;
        } else if (rc == -EINTR) {
            /* Nothing was submitted; the queued entries go with the next call. */
        } else if ((rc == -EAGAIN || rc == -EBUSY) && stalls++ < 1000) {
            /* Out of kernel resources, or completions to reap first: wait for one, retry. */
            struct io_uring_cqe *cqe;
            if (b.inflight == 0 || io_uring_wait_cqe(&ring->ring, &cqe) < 0) sched_yield();
        } else {
            return fp_abandon(&b, n, rc);
        }
        fp_reap(&b);
    }
    return 0;
}

uint64_t fp_ring_submits(const fp_ring *ring) { return ring->submits; }

int fp_ring_probe(void) {
    struct io_uring ring;
    int rc = io_uring_queue_init(2, &ring, 0);
    if (rc < 0) return rc;
    struct io_uring_probe *probe = io_uring_get_probe_ring(&ring);
    rc = 0;
    if (!probe || !io_uring_opcode_supported(probe, IORING_OP_READ) || !io_uring_opcode_supported(probe, IORING_OP_WRITE))
        rc = -EOPNOTSUPP;
    if (probe) io_uring_free_probe(probe);
    io_uring_queue_exit(&ring);
    return rc;
}
