/*
 * fp_verbs.h — RDMA verbs (libibverbs) and connection management (librdmacm), behind opaque
 * handles. Swift never sees an ibv_* or rdma_cm_* struct: only this header.
 *
 * Convention (liburing's, fp_kernel.h's, fp_uring.h's): every function returns >= 0 on success
 * or -errno on failure; those that create a handle return it and store 0 or -errno in *err.
 * No _GNU_SOURCE here (set in the .c file).
 *
 * Two kinds of endpoint:
 *  - the agent's fp_rdma_conn: one RC queue pair connected through rdma_cm, with its own
 *    protection domain, completion queue, completion channel and one registered staging
 *    buffer (registered once, reused for every READ and WRITE). Used by one thread at a time.
 *  - the memory server's fp_rdma_listener: an rdma_cm listening id; connection requests are
 *    accepted onto a protection domain the caller chooses (one per agent), and the server
 *    registers lease memory in that domain (fp_rdma_mr). The server posts no work requests:
 *    one-sided READ and WRITE need no remote CPU.
 */
#ifndef FP_VERBS_H
#define FP_VERBS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- probe ------------------------------------------------------------------------------ */

/* Lists RDMA devices (ibv_get_device_list). Returns how many (0: the kernel has RDMA but no
 * device is configured), or -errno: -ENOSYS when the kernel has no RDMA support at all
 * (no /sys/class/infiniband_verbs, no ib_uverbs). The names, comma-separated, go to `names`
 * (NUL-terminated, truncated to `names_len`). */
int fp_verbs_probe(char *names, size_t names_len);

/* The text of a work completion status (ibv_wc_status_str). */
const char *fp_verbs_wc_status_str(int status);

/* ---- work requests and completions (agent side) ----------------------------------------- */

enum {
    FP_RDMA_OP_READ = 0,  /* remote -> staging */
    FP_RDMA_OP_WRITE = 1, /* staging -> remote */
};

typedef struct fp_rdma_wr {
    uint64_t wr_id;
    int32_t opcode;      /* FP_RDMA_OP_* */
    uint32_t signaled;   /* 1: generate a completion (IBV_SEND_SIGNALED) */
    uint64_t local_offset; /* bytes into the connection's staging buffer */
    uint32_t length;
    uint32_t rkey;
    uint64_t remote_addr;
} fp_rdma_wr;

typedef struct fp_rdma_wc {
    uint64_t wr_id;
    int32_t status;      /* enum ibv_wc_status; 0 = success */
    uint32_t vendor_err;
} fp_rdma_wc;

/* Connection events seen on a connection's rdma_cm event channel. */
enum {
    FP_RDMA_EV_NONE = 0,
    FP_RDMA_EV_CONNECT_REQUEST = 1,
    FP_RDMA_EV_ESTABLISHED = 2,
    FP_RDMA_EV_DISCONNECTED = 3,
    FP_RDMA_EV_DEVICE_REMOVAL = 4,
    FP_RDMA_EV_OTHER = 5,
};

/* Queue pair states (enum ibv_qp_state). */
enum {
    FP_RDMA_QP_RESET = 0,
    FP_RDMA_QP_INIT = 1,
    FP_RDMA_QP_RTR = 2,
    FP_RDMA_QP_RTS = 3,
    FP_RDMA_QP_SQD = 4,
    FP_RDMA_QP_SQE = 5,
    FP_RDMA_QP_ERR = 6,
};

typedef struct fp_rdma_conn fp_rdma_conn;

/* Connects to `host`:`port` through rdma_cm (resolve address, resolve route, create PD, CQ,
 * completion channel and an RC QP of `send_depth` send WRs, register `staging_bytes` of
 * page-aligned staging memory, rdma_connect with `private_data`), waiting at most `timeout_ms`
 * for each step. Returns NULL with *err: -ENOSYS (no RDMA in the kernel), -ENODEV (no device
 * serves the address), -ECONNREFUSED (rejected), -EHOSTUNREACH (unreachable), -ETIMEDOUT, or
 * the failing verb's errno (-ENOMEM from ibv_reg_mr often means RLIMIT_MEMLOCK). `stage`
 * (may be NULL) gets the name of the step that failed. */
fp_rdma_conn *fp_rdma_connect(const char *host, int port, const void *private_data, uint8_t private_len,
                              size_t staging_bytes, uint32_t send_depth, int timeout_ms, int *err,
                              const char **stage);

/* Disconnects and releases everything (QP before the staging MR it may still reference). */
void fp_rdma_conn_destroy(fp_rdma_conn *conn);

void *fp_rdma_conn_staging(const fp_rdma_conn *conn);
size_t fp_rdma_conn_staging_bytes(const fp_rdma_conn *conn);
/* The send queue depth the QP was created with (the device may have granted more). */
uint32_t fp_rdma_conn_send_depth(const fp_rdma_conn *conn);
/* The device the connection runs on (e.g. "rxe0", "mlx5_0"). */
const char *fp_rdma_conn_device(const fp_rdma_conn *conn);

/* Posts `n` work requests as one chain (ibv_post_send). Returns 0, or -errno with *posted set to
 * how many were accepted before the failing one. */
int fp_rdma_post(fp_rdma_conn *conn, const fp_rdma_wr *wrs, int n, int *posted);

/* Polls up to `max` completions without blocking (ibv_poll_cq). Returns how many, or -errno. */
int fp_rdma_poll(fp_rdma_conn *conn, fp_rdma_wc *wcs, int max);

/* Arms the CQ for the next completion (ibv_req_notify_cq). Poll again after arming: a
 * completion that arrived before the arm raises no event. */
int fp_rdma_arm(fp_rdma_conn *conn);

/* Waits up to `timeout_ms` for a completion event on the armed CQ (poll(2) on the completion
 * channel, ibv_get_cq_event, ibv_ack_cq_events). Returns 1 (event), 0 (timeout), or -errno. */
int fp_rdma_wait(fp_rdma_conn *conn, int timeout_ms);

/* The QP's state (ibv_query_qp): FP_RDMA_QP_*, or -errno. */
int fp_rdma_qp_state(fp_rdma_conn *conn);

/* A pending connection event, without blocking: FP_RDMA_EV_* (NONE when there is none), or
 * -errno. DISCONNECTED and DEVICE_REMOVAL mean the connection is dead. */
int fp_rdma_conn_event(fp_rdma_conn *conn);

/* ---- memory server side ------------------------------------------------------------------ */

typedef struct fp_rdma_listener fp_rdma_listener;
typedef struct fp_rdma_pd fp_rdma_pd;
typedef struct fp_rdma_mr fp_rdma_mr;
/* A connection accepted by a listener: its QP (on the PD chosen at accept) and CQ. */
typedef struct fp_rdma_peer fp_rdma_peer;

/* Binds an rdma_cm id to `host`:`port` (host NULL or "0.0.0.0": every RDMA device) and listens.
 * Returns NULL with *err (-ENOSYS: no kernel RDMA; -EADDRNOTAVAIL/-ENODEV: the address is on
 * no RDMA device; -EADDRINUSE). `stage` as for fp_rdma_connect. */
fp_rdma_listener *fp_rdma_listen(const char *host, int port, int backlog, int *err, const char **stage);
void fp_rdma_listener_destroy(fp_rdma_listener *listener);
/* The bound port (useful with port 0). */
int fp_rdma_listener_port(const fp_rdma_listener *listener);
/* The descriptor to poll for events (rdma_cm event channel). */
int fp_rdma_listener_fd(const fp_rdma_listener *listener);

typedef struct fp_rdma_event {
    int32_t kind;             /* FP_RDMA_EV_* */
    int32_t status;           /* the event's status field */
    void *request;            /* CONNECT_REQUEST: pass to fp_rdma_accept or fp_rdma_reject */
    fp_rdma_peer *peer;       /* ESTABLISHED, DISCONNECTED: the peer it concerns (NULL if none) */
    void *device;             /* CONNECT_REQUEST: the device context the request arrived on */
    uint8_t private_data[56];
    uint32_t private_len;
    uint32_t initiator_depth; /* CONNECT_REQUEST: RDMA READs the agent wants in flight */
} fp_rdma_event;

/* The next event, waiting up to `timeout_ms` (0: do not wait). Returns 1 (an event in *ev),
 * 0 (none), or -errno. Events are acknowledged before this returns. */
int fp_rdma_listener_next(fp_rdma_listener *listener, fp_rdma_event *ev, int timeout_ms);

/* A protection domain on `device` (an fp_rdma_event's device). */
fp_rdma_pd *fp_rdma_pd_alloc(void *device, int *err);
/* Fails with -EBUSY while MRs or peers still use it. */
int fp_rdma_pd_free(fp_rdma_pd *pd);
void *fp_rdma_pd_device(const fp_rdma_pd *pd);

/* Accepts a connection request onto `pd`: a CQ and an RC QP that serves remote READ and
 * WRITE; accepts at most `responder_depth` READs in flight (clamped to the device's limit). */
fp_rdma_peer *fp_rdma_accept(void *request, fp_rdma_pd *pd, uint32_t responder_depth, int *err);
/* Rejects a connection request (with a short reason as private data) and destroys its id. */
int fp_rdma_reject(void *request, const char *reason);
/* Disconnects and destroys a peer. */
void fp_rdma_peer_destroy(fp_rdma_peer *peer);

/* Registers `length` bytes at `addr` in `pd` for remote READ and WRITE (and local write): one
 * memory region per lease, so its rkey reaches that lease's bytes and nothing else, and only
 * through QPs of the same PD. Pins the memory. */
fp_rdma_mr *fp_rdma_mr_reg(fp_rdma_pd *pd, void *addr, size_t length, int *err);
uint32_t fp_rdma_mr_rkey(const fp_rdma_mr *mr);
/* Deregisters (unpins): after this the rkey reaches nothing. */
int fp_rdma_mr_dereg(fp_rdma_mr *mr);

#ifdef __cplusplus
}
#endif
#endif
