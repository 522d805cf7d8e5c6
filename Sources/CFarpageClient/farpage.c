/* farpage.c — the Farpage client library (built as libfarpage.so and as the
 * CFarpageClient module for tests). Plain C, no Swift runtime. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "farpage.h"
#include "farpage_wire.h"
#include "fp_kernel.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FP_EXPORT __attribute__((visibility("default")))
/* Largest reply a request of ours can get: an ERROR with its text (<= 1024 bytes) or STATS. */
#define FP_REPLY_MAX 2048

struct fp_region {
    struct fp_region *next;
    uintptr_t address;
    uint64_t length;
    uint64_t id;
    int memfd;
    int uffd;
};

static pthread_mutex_t fp_lock = PTHREAD_MUTEX_INITIALIZER;
static int fp_sock = -1;
static uint32_t fp_next_request = 1;
static struct fp_region *fp_regions;
static int fp_atfork_installed;
static uint64_t fp_kernel_features;
static int fp_kernel_probed;
static __thread char fp_error[512];

static void fp_set_error(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fp_set_error(int err, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(fp_error, sizeof(fp_error), fmt, ap);
    va_end(ap);
    errno = err;
}

FP_EXPORT const char *farpage_last_error(void) { return fp_error[0] ? fp_error : "no error"; }

static const char *fp_socket_path(void) {
    const char *p = getenv("FARPAGE_SOCKET");
    return (p && *p) ? p : FARPAGE_DEFAULT_SOCKET;
}

/* A forked child shares nothing with the agent: regions are MADV_DONTFORK, so
 * they are not mapped in the child; drop the parent's bookkeeping and fds. */
static void fp_atfork_child(void) {
    struct fp_region *r = fp_regions;
    while (r) {
        struct fp_region *next = r->next;
        close(r->memfd);
        close(r->uffd);
        free(r);
        r = next;
    }
    fp_regions = NULL;
    if (fp_sock >= 0) close(fp_sock);
    fp_sock = -1;
    pthread_mutex_init(&fp_lock, NULL);
}

/* Called with fp_lock held. */
static int fp_connect_locked(void) {
    if (fp_sock >= 0) return 0;
    if (!fp_atfork_installed) {
        pthread_atfork(NULL, NULL, fp_atfork_child);
        fp_atfork_installed = 1;
    }
    const char *path = fp_socket_path();
    int fd = fp_unix_connect(path);
    if (fd < 0) {
        int e = -fd;
        if (e == ENOENT || e == ECONNREFUSED || e == ENOTDIR) {
            fp_set_error(ECONNREFUSED,
                         "farpage: cannot reach the farpaged agent at %s (%s). Start it "
                         "(systemctl start farpaged-agent) or point FARPAGE_SOCKET at its socket.",
                         path, strerror(e));
        } else if (e == EACCES || e == EPERM) {
            fp_set_error(EACCES,
                         "farpage: permission denied on the agent socket %s. Ask the operator to "
                         "widen agent.socket_mode in agent.toml or add you to the socket's group.",
                         path);
        } else {
            fp_set_error(e, "farpage: connecting to the agent at %s failed: %s", path, strerror(e));
        }
        return -1;
    }
    fp_set_recv_timeout_ms(fd, 30000);
    fp_sock = fd;
    return 0;
}

static void fp_drop_connection_locked(void) {
    if (fp_sock >= 0) close(fp_sock);
    fp_sock = -1;
}

/* Send one request and wait for its reply. Called with fp_lock held. Returns
 * the reply length, or -1 with the error set. */
static int64_t fp_call_locked(uint16_t type, const void *body, uint32_t body_len, const int *fds, int nfds,
                              unsigned char *reply, size_t reply_cap) {
    if (fp_connect_locked() < 0) return -1;
    unsigned char msg[sizeof(struct fpw_header) + 128];
    if (body_len > 128) {
        fp_set_error(EINVAL, "farpage: internal error: request body too large");
        return -1;
    }
    struct fpw_header h = {FPW_MAGIC, FPW_VERSION, type, (uint32_t)sizeof(h) + body_len, fp_next_request++};
    memcpy(msg, &h, sizeof(h));
    if (body_len) memcpy(msg + sizeof(h), body, body_len);
    int64_t n = fp_send_fds(fp_sock, msg, h.length, fds, nfds);
    if (n < 0) {
        fp_drop_connection_locked();
        fp_set_error(ECONNRESET, "farpage: the agent closed the connection (%s); is farpaged still running?",
                     strerror((int)-n));
        return -1;
    }
    for (;;) {
        int got_fds[4], ngot = 0, trunc = 0;
        n = fp_recv_fds(fp_sock, reply, reply_cap, got_fds, 4, &ngot, &trunc);
        for (int i = 0; i < ngot; i++) close(got_fds[i]);
        if (n < 0 && (n == -EAGAIN || n == -EWOULDBLOCK)) {
            /* Keep the connection: closing it would make the agent release every region of
             * this process. A late reply is skipped by its request id. */
            fp_set_error(ETIMEDOUT, "farpage: the agent did not answer within 30 s; is it overloaded?");
            return -1;
        }
        if (n <= 0) {
            int e = n == 0 ? ECONNRESET : (int)-n;
            fp_drop_connection_locked();
            fp_set_error(ECONNRESET, "farpage: lost the connection to the agent (%s)", strerror(e));
            return -1;
        }
        struct fpw_header rh;
        if ((size_t)n < sizeof(rh) || trunc) {
            fp_drop_connection_locked();
            fp_set_error(EPROTO, "farpage: malformed reply from the agent");
            return -1;
        }
        memcpy(&rh, reply, sizeof(rh));
        if (rh.magic != FPW_MAGIC || rh.version != FPW_VERSION || rh.length != (uint32_t)n) {
            fp_drop_connection_locked();
            fp_set_error(EPROTO, "farpage: the agent speaks another protocol version (%u); upgrade libfarpage",
                         rh.version);
            return -1;
        }
        if (rh.request_id != h.request_id) continue; /* a stale reply to an abandoned request */
        if (rh.type == FPW_ERROR) {
            struct fpw_error e = {EIO, 0};
            if (n >= (int64_t)(sizeof(rh) + sizeof(e))) memcpy(&e, reply + sizeof(rh), sizeof(e));
            int textlen = (int)(n - (int64_t)(sizeof(rh) + sizeof(e)));
            if (textlen < 0) textlen = 0;
            fp_set_error(e.err > 0 ? e.err : EIO, "farpage: the agent refused: %.*s", textlen,
                         (const char *)reply + sizeof(rh) + sizeof(e));
            return -1;
        }
        return n;
    }
}

static uint64_t fp_probe_features_locked(void) {
    if (!fp_kernel_probed) {
        uint64_t features = 0, ioctls = 0;
        int via = 0;
        if (fp_uffd_probe(&features, &ioctls, &via) == 0) fp_kernel_features = features;
        fp_kernel_probed = 1;
    }
    return fp_kernel_features;
}

static void fp_uffd_error(int e) {
    if (e == ENOSYS)
        fp_set_error(ENOSYS, "farpage: userfaultfd is not available: the kernel lacks CONFIG_USERFAULTFD or a "
                             "seccomp filter (container runtime) blocks the userfaultfd syscall; allow it in the "
                             "container's seccomp profile.");
    else if (e == EPERM || e == EACCES)
        fp_set_error(EPERM, "farpage: this process may not create a userfaultfd: grant read/write on "
                            "/dev/userfaultfd (e.g. group 'farpage', mode 0660 via a udev rule), or set "
                            "sysctl vm.unprivileged_userfaultfd=1, or run with CAP_SYS_PTRACE.");
    else
        fp_set_error(e, "farpage: creating a userfaultfd failed: %s", strerror(e));
}

FP_EXPORT void *farpage_alloc(size_t size, int flags) {
    if (flags != 0) {
        fp_set_error(EINVAL, "farpage_alloc: flags must be 0");
        return NULL;
    }
    return farpage_alloc_ex(size, NULL);
}

FP_EXPORT void *farpage_alloc_ex(size_t size, const struct farpage_options *options) {
    uint64_t page = (uint64_t)fp_page_size();
    if (size == 0) {
        fp_set_error(EINVAL, "farpage_alloc: size must be greater than zero");
        return NULL;
    }
    if (options && options->struct_size < sizeof(size_t) + sizeof(uint64_t)) {
        fp_set_error(EINVAL, "farpage_alloc_ex: options->struct_size must be sizeof(struct farpage_options)");
        return NULL;
    }
    if (options && options->flags != 0) {
        fp_set_error(EINVAL, "farpage_alloc_ex: options->flags must be 0");
        return NULL;
    }
    uint64_t length = ((uint64_t)size + page - 1) / page * page;
    if (length < size) {
        fp_set_error(EINVAL, "farpage_alloc: size too large");
        return NULL;
    }
    int memfd = -1, uffd = -1, via = 0;
    void *addr = NULL;
    int r;

    memfd = fp_memfd_create("farpage", 1);
    if (memfd < 0) {
        fp_set_error(-memfd, "farpage: memfd_create failed: %s", strerror(-memfd));
        goto fail;
    }
    if ((r = fp_ftruncate(memfd, length)) < 0) {
        fp_set_error(-r, "farpage: sizing the region's memfd to %llu bytes failed: %s",
                     (unsigned long long)length, strerror(-r));
        goto fail;
    }
    /* The agent refuses regions whose memfd could shrink under it. */
    if ((r = fp_add_seals(memfd, FP_SEAL_SHRINK | FP_SEAL_GROW | FP_SEAL_SEAL)) < 0) {
        fp_set_error(-r, "farpage: sealing the region's memfd failed: %s", strerror(-r));
        goto fail;
    }
    int err = 0;
    addr = fp_map_shared(memfd, length, &err);
    if (!addr) {
        fp_set_error(err == ENOMEM ? ENOMEM : err, "farpage: mapping %llu bytes failed: %s",
                     (unsigned long long)length, strerror(err));
        goto fail;
    }
    /* A forked child's copy of this mapping would not be registered with the
     * uffd and would fill evicted pages with zeros in the shared memfd. */
    if ((r = fp_madvise_dontfork(addr, length)) < 0) {
        fp_set_error(-r, "farpage: madvise(MADV_DONTFORK) failed: %s", strerror(-r));
        goto fail;
    }
    uffd = fp_uffd_open(1, &via);
    if (uffd < 0) {
        fp_uffd_error(-uffd);
        goto fail;
    }
    pthread_mutex_lock(&fp_lock);
    uint64_t available = fp_probe_features_locked();
    pthread_mutex_unlock(&fp_lock);
    uint64_t required = FP_UFFD_FEATURE_MISSING_SHMEM | FP_UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
    if ((available & required) != required) {
        fp_set_error(ENOTSUP, "farpage: this kernel's userfaultfd lacks shmem missing/write-protect support "
                              "(features 0x%llx); Linux 5.19 or newer is required.",
                     (unsigned long long)available);
        goto fail;
    }
    uint64_t wanted = required | (available & FP_UFFD_FEATURE_THREAD_ID);
    uint64_t features = 0, ioctls = 0;
    if ((r = fp_uffd_api(uffd, wanted, &features, &ioctls)) < 0) {
        fp_set_error(-r, "farpage: UFFDIO_API failed: %s", strerror(-r));
        goto fail;
    }
    if ((r = fp_uffd_register(uffd, (uint64_t)(uintptr_t)addr, length, FP_UFFD_REGISTER_MISSING | FP_UFFD_REGISTER_WP,
                              &ioctls)) < 0) {
        fp_set_error(-r, "farpage: UFFDIO_REGISTER failed: %s", strerror(-r));
        goto fail;
    }

    struct fpw_register body;
    memset(&body, 0, sizeof(body));
    body.address = (uint64_t)(uintptr_t)addr;
    body.length = length;
    body.page_size = (uint32_t)page;
    body.resident_budget = options ? options->resident_budget : 0;
    body.uffd_features = features;
    if (options && options->name) strncpy(body.name, options->name, sizeof(body.name) - 1);
    int fds[2] = {memfd, uffd};
    unsigned char reply[FP_REPLY_MAX];

    pthread_mutex_lock(&fp_lock);
    int64_t n = fp_call_locked(FPW_REGISTER, &body, sizeof(body), fds, 2, reply, sizeof(reply));
    if (n < 0) {
        pthread_mutex_unlock(&fp_lock);
        goto fail;
    }
    struct fpw_ok ok = {0, 0};
    if (n >= (int64_t)(sizeof(struct fpw_header) + sizeof(ok))) memcpy(&ok, reply + sizeof(struct fpw_header), sizeof(ok));
    struct fp_region *reg = calloc(1, sizeof(*reg));
    if (!reg) {
        pthread_mutex_unlock(&fp_lock);
        fp_set_error(ENOMEM, "farpage: out of memory");
        goto fail;
    }
    reg->address = (uintptr_t)addr;
    reg->length = length;
    reg->id = ok.value;
    reg->memfd = memfd;
    reg->uffd = uffd;
    reg->next = fp_regions;
    fp_regions = reg;
    pthread_mutex_unlock(&fp_lock);
    return addr;

fail : {
    int saved = errno;
    if (addr) fp_unmap(addr, length);
    if (uffd >= 0) fp_close(uffd);
    if (memfd >= 0) fp_close(memfd);
    errno = saved;
    return NULL;
}
}

/* Called with fp_lock held. */
static struct fp_region *fp_find_locked(uintptr_t address, uint64_t len, struct fp_region ***link) {
    struct fp_region **pp = &fp_regions;
    for (struct fp_region *r = fp_regions; r; pp = &r->next, r = r->next) {
        if (address >= r->address && address - r->address < r->length && len <= r->length - (address - r->address)) {
            if (link) *link = pp;
            return r;
        }
    }
    return NULL;
}

FP_EXPORT int farpage_free(void *addr) {
    if (!addr) return 0;
    pthread_mutex_lock(&fp_lock);
    struct fp_region **link = NULL;
    struct fp_region *r = fp_find_locked((uintptr_t)addr, 0, &link);
    if (!r || r->address != (uintptr_t)addr) {
        pthread_mutex_unlock(&fp_lock);
        fp_set_error(EINVAL, "farpage_free: %p is not the start of a farpage region", addr);
        return -1;
    }
    *link = r->next;
    /* Unmap first: no thread of ours can fault on the region while the agent
     * tears it down. */
    fp_unmap((void *)r->address, r->length);
    unsigned char reply[FP_REPLY_MAX];
    int64_t n = fp_call_locked(FPW_UNREGISTER, &r->id, sizeof(r->id), NULL, 0, reply, sizeof(reply));
    int saved = errno;
    pthread_mutex_unlock(&fp_lock);
    fp_close(r->uffd);
    fp_close(r->memfd);
    free(r);
    /* The mapping is gone either way; if the agent was unreachable it releases
     * the region when our connection closes. */
    if (n < 0 && saved != ECONNRESET && saved != ECONNREFUSED) {
        errno = saved;
        return -1;
    }
    return 0;
}

FP_EXPORT int farpage_advise(void *addr, size_t len, int hint) {
    if (hint < FARPAGE_ADVISE_NORMAL || hint > FARPAGE_ADVISE_RANDOM) {
        fp_set_error(EINVAL, "farpage_advise: unknown hint %d", hint);
        return -1;
    }
    pthread_mutex_lock(&fp_lock);
    struct fp_region *r = fp_find_locked((uintptr_t)addr, len, NULL);
    if (!r) {
        pthread_mutex_unlock(&fp_lock);
        fp_set_error(EINVAL, "farpage_advise: [%p, +%zu) is not inside one farpage region", addr, len);
        return -1;
    }
    struct fpw_advise body = {r->id, (uint64_t)((uintptr_t)addr - r->address), len, (uint32_t)hint, 0};
    unsigned char reply[FP_REPLY_MAX];
    int64_t n = fp_call_locked(FPW_ADVISE, &body, sizeof(body), NULL, 0, reply, sizeof(reply));
    pthread_mutex_unlock(&fp_lock);
    return n < 0 ? -1 : 0;
}

FP_EXPORT int farpage_stats(const void *addr, struct farpage_stats *out) {
    if (!out) {
        fp_set_error(EINVAL, "farpage_stats: out must not be NULL");
        return -1;
    }
    pthread_mutex_lock(&fp_lock);
    uint64_t id = 0;
    if (addr) {
        struct fp_region *r = fp_find_locked((uintptr_t)addr, 0, NULL);
        if (!r) {
            pthread_mutex_unlock(&fp_lock);
            fp_set_error(EINVAL, "farpage_stats: %p is not inside a farpage region", addr);
            return -1;
        }
        id = r->id;
    }
    unsigned char reply[FP_REPLY_MAX];
    int64_t n = fp_call_locked(FPW_STATS, &id, sizeof(id), NULL, 0, reply, sizeof(reply));
    pthread_mutex_unlock(&fp_lock);
    if (n < 0) return -1;
    uint32_t count = 0;
    size_t off = sizeof(struct fpw_header);
    if ((size_t)n < off + 8) {
        fp_set_error(EPROTO, "farpage_stats: short reply from the agent");
        return -1;
    }
    memcpy(&count, reply + off, 4);
    off += 8;
    memset(out, 0, sizeof(*out));
    uint64_t *fields = (uint64_t *)out;
    size_t nfields = sizeof(*out) / sizeof(uint64_t);
    for (uint32_t i = 0; i < count && i < nfields && off + 8 <= (size_t)n; i++, off += 8) memcpy(&fields[i], reply + off, 8);
    return 0;
}
