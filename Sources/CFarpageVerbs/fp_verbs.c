/* fp_verbs.c — RDMA verbs and rdma_cm behind opaque handles (see fp_verbs.h). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "fp_verbs.h"

#include <arpa/inet.h>
#include <errno.h>
#include <infiniband/verbs.h>
#include <netdb.h>
#include <poll.h>
#include <rdma/rdma_cma.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FP_MIN(a, b) ((a) < (b) ? (a) : (b))

/* ---- probe ------------------------------------------------------------------------------ */

int fp_verbs_probe(char *names, size_t names_len) {
    int num = 0;
    errno = 0;
    struct ibv_device **list = ibv_get_device_list(&num);
    if (!list) return errno ? -errno : -ENOSYS;
    if (names && names_len) {
        names[0] = 0;
        size_t used = 0;
        for (int i = 0; i < num; i++) {
            int n = snprintf(names + used, names_len - used, "%s%s", i ? "," : "", ibv_get_device_name(list[i]));
            if (n < 0 || (size_t)n >= names_len - used) break;
            used += (size_t)n;
        }
    }
    ibv_free_device_list(list);
    return num;
}

const char *fp_verbs_wc_status_str(int status) { return ibv_wc_status_str((enum ibv_wc_status)status); }

/* ---- helpers ------------------------------------------------------------------------------ */

static int resolve(const char *host, int port, struct sockaddr_storage *out, socklen_t *len) {
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV | (host ? 0 : AI_PASSIVE);
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    int rc = getaddrinfo(host, service, &hints, &res);
    if (rc != 0 || !res) return rc == EAI_SYSTEM ? -errno : -EHOSTUNREACH;
    memcpy(out, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

static int event_kind(enum rdma_cm_event_type t) {
    switch (t) {
    case RDMA_CM_EVENT_CONNECT_REQUEST: return FP_RDMA_EV_CONNECT_REQUEST;
    case RDMA_CM_EVENT_ESTABLISHED: return FP_RDMA_EV_ESTABLISHED;
    case RDMA_CM_EVENT_DISCONNECTED:
    case RDMA_CM_EVENT_CONNECT_ERROR:
    case RDMA_CM_EVENT_UNREACHABLE:
    case RDMA_CM_EVENT_REJECTED: return FP_RDMA_EV_DISCONNECTED;
    case RDMA_CM_EVENT_DEVICE_REMOVAL: return FP_RDMA_EV_DEVICE_REMOVAL;
    default: return FP_RDMA_EV_OTHER;
    }
}

/* Waits for the next event on `ec`; fails unless it is `expected`. */
static int expect_event(struct rdma_event_channel *ec, enum rdma_cm_event_type expected, int timeout_ms) {
    struct pollfd p = {.fd = ec->fd, .events = POLLIN};
    int rc;
    do { rc = poll(&p, 1, timeout_ms); } while (rc < 0 && errno == EINTR);
    if (rc < 0) return -errno;
    if (rc == 0) return -ETIMEDOUT;
    struct rdma_cm_event *e = NULL;
    if (rdma_get_cm_event(ec, &e)) return -errno;
    enum rdma_cm_event_type got = e->event;
    int status = e->status;
    rdma_ack_cm_event(e);
    if (got == expected) return 0;
    switch (got) {
    case RDMA_CM_EVENT_REJECTED: return -ECONNREFUSED;
    case RDMA_CM_EVENT_ADDR_ERROR: return status < 0 ? status : -EHOSTUNREACH;
    case RDMA_CM_EVENT_ROUTE_ERROR:
    case RDMA_CM_EVENT_UNREACHABLE: return -EHOSTUNREACH;
    case RDMA_CM_EVENT_CONNECT_ERROR: return -ECONNRESET;
    case RDMA_CM_EVENT_DEVICE_REMOVAL: return -ENODEV;
    default: return -EPROTO;
    }
}

/* ---- agent side ------------------------------------------------------------------------- */

struct fp_rdma_conn {
    struct rdma_event_channel *ec;
    struct rdma_cm_id *id;
    struct ibv_pd *pd;
    struct ibv_comp_channel *cc;
    struct ibv_cq *cq;
    struct ibv_mr *mr;
    void *staging;
    size_t staging_bytes;
    uint32_t send_depth;
    int connected;
    char device[64];
};

void fp_rdma_conn_destroy(fp_rdma_conn *c) {
    if (!c) return;
    if (c->connected) rdma_disconnect(c->id);
    if (c->id && c->id->qp) rdma_destroy_qp(c->id); /* before the MR its WRs may reference */
    if (c->mr) ibv_dereg_mr(c->mr);
    free(c->staging);
    if (c->cq) ibv_destroy_cq(c->cq);
    if (c->cc) ibv_destroy_comp_channel(c->cc);
    if (c->pd) ibv_dealloc_pd(c->pd);
    if (c->id) rdma_destroy_id(c->id);
    if (c->ec) rdma_destroy_event_channel(c->ec);
    free(c);
}

#define FAIL(step, code) \
    do { \
        *err = (code); \
        if (stage) *stage = (step); \
        fp_rdma_conn_destroy(c); \
        return NULL; \
    } while (0)

fp_rdma_conn *fp_rdma_connect(const char *host, int port, const void *private_data, uint8_t private_len,
                              size_t staging_bytes, uint32_t send_depth, int timeout_ms, int *err,
                              const char **stage) {
    if (stage) *stage = "";
    fp_rdma_conn *c = calloc(1, sizeof *c);
    if (!c) {
        *err = -ENOMEM;
        return NULL;
    }
    struct sockaddr_storage addr;
    socklen_t alen = 0;
    int rc = resolve(host, port, &addr, &alen);
    if (rc < 0) FAIL("getaddrinfo", rc);
    c->ec = rdma_create_event_channel();
    if (!c->ec) FAIL("rdma_create_event_channel", errno ? -errno : -ENOSYS);
    if (rdma_create_id(c->ec, &c->id, c, RDMA_PS_TCP)) FAIL("rdma_create_id", -errno);
    if (rdma_resolve_addr(c->id, NULL, (struct sockaddr *)&addr, timeout_ms)) FAIL("rdma_resolve_addr", -errno);
    if ((rc = expect_event(c->ec, RDMA_CM_EVENT_ADDR_RESOLVED, timeout_ms + 100)) < 0) FAIL("rdma_resolve_addr", rc);
    if (rdma_resolve_route(c->id, timeout_ms)) FAIL("rdma_resolve_route", -errno);
    if ((rc = expect_event(c->ec, RDMA_CM_EVENT_ROUTE_RESOLVED, timeout_ms + 100)) < 0) FAIL("rdma_resolve_route", rc);
    if (!c->id->verbs) FAIL("rdma_resolve_addr", -ENODEV);
    snprintf(c->device, sizeof c->device, "%s", ibv_get_device_name(c->id->verbs->device));

    struct ibv_device_attr da;
    if ((rc = ibv_query_device(c->id->verbs, &da))) FAIL("ibv_query_device", -rc);
    if (send_depth == 0) send_depth = 1;
    if (send_depth > (uint32_t)da.max_qp_wr) send_depth = (uint32_t)da.max_qp_wr;
    c->send_depth = send_depth;
    if (!(c->pd = ibv_alloc_pd(c->id->verbs))) FAIL("ibv_alloc_pd", -errno);
    if (!(c->cc = ibv_create_comp_channel(c->id->verbs))) FAIL("ibv_create_comp_channel", -errno);
    if (!(c->cq = ibv_create_cq(c->id->verbs, (int)send_depth + 1, c, c->cc, 0))) FAIL("ibv_create_cq", -errno);

    struct ibv_qp_init_attr qa;
    memset(&qa, 0, sizeof qa);
    qa.send_cq = c->cq;
    qa.recv_cq = c->cq;
    qa.qp_type = IBV_QPT_RC;
    qa.cap.max_send_wr = send_depth;
    qa.cap.max_recv_wr = 1;
    qa.cap.max_send_sge = 1;
    qa.cap.max_recv_sge = 1;
    qa.sq_sig_all = 0; /* selective signalling */
    if (rdma_create_qp(c->id, c->pd, &qa)) FAIL("rdma_create_qp", -errno);

    size_t bytes = (staging_bytes + 4095) & ~(size_t)4095;
    if ((rc = posix_memalign(&c->staging, 4096, bytes ? bytes : 4096))) FAIL("posix_memalign", -rc);
    c->staging_bytes = bytes;
    memset(c->staging, 0, bytes);
    c->mr = ibv_reg_mr(c->pd, c->staging, bytes, IBV_ACCESS_LOCAL_WRITE);
    if (!c->mr) FAIL("ibv_reg_mr", errno ? -errno : -ENOMEM);

    struct rdma_conn_param cp;
    memset(&cp, 0, sizeof cp);
    cp.private_data = private_data;
    cp.private_data_len = private_len;
    cp.initiator_depth = (uint8_t)FP_MIN(da.max_qp_init_rd_atom, 16);
    cp.responder_resources = 0; /* nobody reads from us */
    cp.retry_count = 7;
    cp.rnr_retry_count = 7;
    if (rdma_connect(c->id, &cp)) FAIL("rdma_connect", -errno);
    if ((rc = expect_event(c->ec, RDMA_CM_EVENT_ESTABLISHED, timeout_ms)) < 0) FAIL("rdma_connect", rc);
    c->connected = 1;
    *err = 0;
    return c;
}

void *fp_rdma_conn_staging(const fp_rdma_conn *c) { return c->staging; }
size_t fp_rdma_conn_staging_bytes(const fp_rdma_conn *c) { return c->staging_bytes; }
uint32_t fp_rdma_conn_send_depth(const fp_rdma_conn *c) { return c->send_depth; }
const char *fp_rdma_conn_device(const fp_rdma_conn *c) { return c->device; }

int fp_rdma_post(fp_rdma_conn *c, const fp_rdma_wr *wrs, int n, int *posted) {
    *posted = 0;
    if (n <= 0) return 0;
    struct ibv_send_wr local_wr[32];
    struct ibv_sge local_sge[32];
    struct ibv_send_wr *w = local_wr;
    struct ibv_sge *s = local_sge;
    if (n > 32) {
        w = calloc((size_t)n, sizeof *w);
        s = calloc((size_t)n, sizeof *s);
        if (!w || !s) {
            free(w);
            free(s);
            return -ENOMEM;
        }
    }
    int rc = 0;
    for (int i = 0; i < n; i++) {
        if (wrs[i].local_offset + wrs[i].length > c->staging_bytes || wrs[i].length == 0) {
            rc = -EINVAL;
            break;
        }
        memset(&w[i], 0, sizeof w[i]);
        s[i].addr = (uintptr_t)c->staging + wrs[i].local_offset;
        s[i].length = wrs[i].length;
        s[i].lkey = c->mr->lkey;
        w[i].wr_id = wrs[i].wr_id;
        w[i].sg_list = &s[i];
        w[i].num_sge = 1;
        w[i].opcode = wrs[i].opcode == FP_RDMA_OP_WRITE ? IBV_WR_RDMA_WRITE : IBV_WR_RDMA_READ;
        w[i].send_flags = wrs[i].signaled ? IBV_SEND_SIGNALED : 0;
        w[i].wr.rdma.remote_addr = wrs[i].remote_addr;
        w[i].wr.rdma.rkey = wrs[i].rkey;
        w[i].next = i + 1 < n ? &w[i + 1] : NULL;
    }
    if (rc == 0) {
        struct ibv_send_wr *bad = NULL;
        int e = ibv_post_send(c->id->qp, w, &bad);
        if (e) {
            rc = -e;
            *posted = bad ? (int)(bad - w) : 0;
        } else {
            *posted = n;
        }
    }
    if (w != local_wr) {
        free(w);
        free(s);
    }
    return rc;
}

int fp_rdma_poll(fp_rdma_conn *c, fp_rdma_wc *out, int max) {
    struct ibv_wc wc[32];
    if (max > 32) max = 32;
    int n = ibv_poll_cq(c->cq, max, wc);
    if (n < 0) return -EIO;
    for (int i = 0; i < n; i++) {
        out[i].wr_id = wc[i].wr_id;
        out[i].status = (int32_t)wc[i].status;
        out[i].vendor_err = wc[i].vendor_err;
    }
    return n;
}

int fp_rdma_arm(fp_rdma_conn *c) {
    int e = ibv_req_notify_cq(c->cq, 0);
    return e ? -e : 0;
}

int fp_rdma_wait(fp_rdma_conn *c, int timeout_ms) {
    struct pollfd p = {.fd = c->cc->fd, .events = POLLIN};
    int rc;
    do { rc = poll(&p, 1, timeout_ms); } while (rc < 0 && errno == EINTR);
    if (rc < 0) return -errno;
    if (rc == 0) return 0;
    struct ibv_cq *cq = NULL;
    void *ctx = NULL;
    if (ibv_get_cq_event(c->cc, &cq, &ctx)) return -errno;
    ibv_ack_cq_events(cq, 1);
    return 1;
}

int fp_rdma_qp_state(fp_rdma_conn *c) {
    struct ibv_qp_attr attr;
    struct ibv_qp_init_attr init;
    int e = ibv_query_qp(c->id->qp, &attr, IBV_QP_STATE, &init);
    return e ? -e : (int)attr.qp_state;
}

int fp_rdma_conn_event(fp_rdma_conn *c) {
    struct pollfd p = {.fd = c->ec->fd, .events = POLLIN};
    int rc = poll(&p, 1, 0);
    if (rc < 0) return -errno;
    if (rc == 0) return FP_RDMA_EV_NONE;
    struct rdma_cm_event *e = NULL;
    if (rdma_get_cm_event(c->ec, &e)) return -errno;
    int kind = event_kind(e->event);
    rdma_ack_cm_event(e);
    if (kind == FP_RDMA_EV_DISCONNECTED) c->connected = 0;
    return kind;
}

/* ---- memory server side ------------------------------------------------------------------ */

struct fp_rdma_listener {
    struct rdma_event_channel *ec;
    struct rdma_cm_id *id;
};

struct fp_rdma_pd {
    struct ibv_pd *pd;
    struct ibv_context *device;
    int users; /* MRs and peers */
};

struct fp_rdma_mr {
    struct ibv_mr *mr;
    fp_rdma_pd *pd;
};

struct fp_rdma_peer {
    struct rdma_cm_id *id;
    struct ibv_cq *cq;
    fp_rdma_pd *pd;
    int connected;
};

void fp_rdma_listener_destroy(fp_rdma_listener *l) {
    if (!l) return;
    if (l->id) rdma_destroy_id(l->id);
    if (l->ec) rdma_destroy_event_channel(l->ec);
    free(l);
}

fp_rdma_listener *fp_rdma_listen(const char *host, int port, int backlog, int *err, const char **stage) {
    if (stage) *stage = "";
    fp_rdma_listener *l = calloc(1, sizeof *l);
    if (!l) {
        *err = -ENOMEM;
        return NULL;
    }
#define LFAIL(step, code) \
    do { \
        *err = (code); \
        if (stage) *stage = (step); \
        fp_rdma_listener_destroy(l); \
        return NULL; \
    } while (0)
    struct sockaddr_storage addr;
    socklen_t alen = 0;
    const char *h = host && *host && strcmp(host, "0.0.0.0") != 0 ? host : NULL;
    int rc = resolve(h, port, &addr, &alen);
    if (rc < 0) LFAIL("getaddrinfo", rc);
    l->ec = rdma_create_event_channel();
    if (!l->ec) LFAIL("rdma_create_event_channel", errno ? -errno : -ENOSYS);
    if (rdma_create_id(l->ec, &l->id, NULL, RDMA_PS_TCP)) LFAIL("rdma_create_id", -errno);
    if (rdma_bind_addr(l->id, (struct sockaddr *)&addr)) LFAIL("rdma_bind_addr", -errno);
    if (rdma_listen(l->id, backlog)) LFAIL("rdma_listen", -errno);
    *err = 0;
    return l;
#undef LFAIL
}

int fp_rdma_listener_port(const fp_rdma_listener *l) { return ntohs(rdma_get_src_port(l->id)); }
int fp_rdma_listener_fd(const fp_rdma_listener *l) { return l->ec->fd; }

int fp_rdma_listener_next(fp_rdma_listener *l, fp_rdma_event *ev, int timeout_ms) {
    memset(ev, 0, sizeof *ev);
    struct pollfd p = {.fd = l->ec->fd, .events = POLLIN};
    int rc;
    do { rc = poll(&p, 1, timeout_ms); } while (rc < 0 && errno == EINTR);
    if (rc < 0) return -errno;
    if (rc == 0) return 0;
    struct rdma_cm_event *e = NULL;
    if (rdma_get_cm_event(l->ec, &e)) return -errno;
    ev->kind = event_kind(e->event);
    ev->status = e->status;
    if (ev->kind == FP_RDMA_EV_CONNECT_REQUEST) {
        ev->request = e->id;
        ev->device = e->id->verbs;
        uint32_t n = e->param.conn.private_data_len;
        if (n > sizeof ev->private_data) n = sizeof ev->private_data;
        if (e->param.conn.private_data && n) memcpy(ev->private_data, e->param.conn.private_data, n);
        ev->private_len = n;
        ev->initiator_depth = e->param.conn.initiator_depth;
    } else if (e->id != l->id) {
        ev->peer = (fp_rdma_peer *)e->id->context;
        if (ev->peer && ev->kind == FP_RDMA_EV_DISCONNECTED) ev->peer->connected = 0;
    }
    rdma_ack_cm_event(e);
    return 1;
}

fp_rdma_pd *fp_rdma_pd_alloc(void *device, int *err) {
    fp_rdma_pd *p = calloc(1, sizeof *p);
    if (!p) {
        *err = -ENOMEM;
        return NULL;
    }
    p->device = device;
    p->pd = ibv_alloc_pd(p->device);
    if (!p->pd) {
        *err = errno ? -errno : -ENOMEM;
        free(p);
        return NULL;
    }
    *err = 0;
    return p;
}

int fp_rdma_pd_free(fp_rdma_pd *p) {
    if (!p) return 0;
    if (p->users > 0) return -EBUSY;
    int e = ibv_dealloc_pd(p->pd);
    if (e) return -e;
    free(p);
    return 0;
}

void *fp_rdma_pd_device(const fp_rdma_pd *p) { return p->device; }

fp_rdma_peer *fp_rdma_accept(void *request, fp_rdma_pd *pd, uint32_t responder_depth, int *err) {
    struct rdma_cm_id *id = request;
    fp_rdma_peer *peer = calloc(1, sizeof *peer);
    if (!peer) {
        *err = -ENOMEM;
        rdma_reject(id, NULL, 0);
        rdma_destroy_id(id);
        return NULL;
    }
    peer->id = id;
    peer->pd = pd;
    struct ibv_device_attr da;
    int rc = ibv_query_device(id->verbs, &da);
    if (rc) {
        *err = -rc;
        goto fail;
    }
    /* The server posts nothing: a CQ of two entries, one send and one receive WR. */
    peer->cq = ibv_create_cq(id->verbs, 2, NULL, NULL, 0);
    if (!peer->cq) {
        *err = -errno;
        goto fail;
    }
    struct ibv_qp_init_attr qa;
    memset(&qa, 0, sizeof qa);
    qa.send_cq = peer->cq;
    qa.recv_cq = peer->cq;
    qa.qp_type = IBV_QPT_RC;
    qa.cap.max_send_wr = 1;
    qa.cap.max_recv_wr = 1;
    qa.cap.max_send_sge = 1;
    qa.cap.max_recv_sge = 1;
    if (rdma_create_qp(id, pd->pd, &qa)) {
        *err = -errno;
        goto fail;
    }
    struct rdma_conn_param cp;
    memset(&cp, 0, sizeof cp);
    uint32_t depth = responder_depth ? responder_depth : 1;
    if (depth > (uint32_t)da.max_qp_rd_atom) depth = (uint32_t)da.max_qp_rd_atom;
    if (depth == 0) depth = 1;
    /* Responder resources > 0 is what lets the CM grant IB_ACCESS_REMOTE_READ on the QP. */
    cp.responder_resources = (uint8_t)depth;
    cp.initiator_depth = 0;
    cp.rnr_retry_count = 7;
    id->context = peer;
    if (rdma_accept(id, &cp)) {
        *err = -errno;
        goto fail;
    }
    peer->connected = 1;
    pd->users++;
    *err = 0;
    return peer;
fail:
    if (id->qp) rdma_destroy_qp(id);
    if (peer->cq) ibv_destroy_cq(peer->cq);
    id->context = NULL;
    rdma_reject(id, NULL, 0);
    rdma_destroy_id(id);
    free(peer);
    return NULL;
}

int fp_rdma_reject(void *request, const char *reason) {
    struct rdma_cm_id *id = request;
    int rc = rdma_reject(id, reason, reason ? (uint8_t)FP_MIN(strlen(reason), 48) : 0) ? -errno : 0;
    rdma_destroy_id(id);
    return rc;
}

void fp_rdma_peer_destroy(fp_rdma_peer *peer) {
    if (!peer) return;
    if (peer->connected) rdma_disconnect(peer->id);
    peer->id->context = NULL;
    if (peer->id->qp) rdma_destroy_qp(peer->id);
    if (peer->cq) ibv_destroy_cq(peer->cq);
    rdma_destroy_id(peer->id);
    peer->pd->users--;
    free(peer);
}

fp_rdma_mr *fp_rdma_mr_reg(fp_rdma_pd *pd, void *addr, size_t length, int *err) {
    fp_rdma_mr *m = calloc(1, sizeof *m);
    if (!m) {
        *err = -ENOMEM;
        return NULL;
    }
    m->mr = ibv_reg_mr(pd->pd, addr, length, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE);
    if (!m->mr) {
        *err = errno ? -errno : -ENOMEM;
        free(m);
        return NULL;
    }
    m->pd = pd;
    pd->users++;
    *err = 0;
    return m;
}

uint32_t fp_rdma_mr_rkey(const fp_rdma_mr *m) { return m->mr->rkey; }

int fp_rdma_mr_dereg(fp_rdma_mr *m) {
    if (!m) return 0;
    int e = ibv_dereg_mr(m->mr);
    if (e) return -e;
    m->pd->users--;
    free(m);
    return 0;
}
