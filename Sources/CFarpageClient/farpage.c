/* farpage.c — the Farpage client library (built as libfarpage.so and as the
 * CFarpageClient module for tests). Plain C, no Swift runtime. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "farpage.h"
#include "farpage_internal.h"
#include "farpage_wire.h"
#include "fp_kernel.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define FP_EXPORT __attribute__((visibility("default")))
/* Largest reply a request of ours can get: an ERROR with its text (<= 1024 bytes) or STATS. */
#define FP_REPLY_MAX 2048

/* A still-mapped piece of a region, [start, end): partial munmap() splits a region. */
struct fp_piece {
    uintptr_t start, end;
};

struct fp_region {
    struct fp_region *next;
    uintptr_t address;
    uint64_t length;
    uint64_t id;     /* the agent's id: of the region, or of this process's view of it */
    uint64_t source; /* the region whose pages these are (== id unless a view) */
    int memfd;
    int uffd;
    int origin; /* FP_ORIGIN_* */
    int view;   /* a forked child's private view of its parent's region (see fp_atfork_child) */
    int npieces;
    struct fp_piece pieces[16]; /* mapped parts; a munmap that would need more fails (ENOMEM) */
};

static pthread_mutex_t fp_lock = PTHREAD_MUTEX_INITIALIZER;
static int fp_sock = -1;
static uint32_t fp_next_request = 1;
static struct fp_region *fp_regions;
static pthread_once_t fp_atfork_once = PTHREAD_ONCE_INIT;
static uint64_t fp_kernel_features;
static int fp_kernel_probed;
static __thread char fp_error[512] __attribute__((tls_model("initial-exec")));
/* Lock-free filter over region start addresses: a count per hash of the page number.
 * Zero means "certainly not a region"; free() of small blocks never takes the lock. */
#define FP_FILTER_SIZE 4096
static uint16_t fp_filter[FP_FILTER_SIZE];
static unsigned fp_live; /* regions and views linked, for lock-free "none" answers */

static inline unsigned fp_filter_slot(uintptr_t a) { return (unsigned)((a >> 12) ^ (a >> 24)) & (FP_FILTER_SIZE - 1); }

FP_HIDDEN int fp_region_maybe(const void *addr) {
    uintptr_t a = (uintptr_t)addr;
    if (a & 4095) return 0;
    return __atomic_load_n(&fp_filter[fp_filter_slot(a)], __ATOMIC_RELAXED) != 0;
}

/* Called with fp_lock held. */
static void fp_link_locked(struct fp_region *r) {
    r->next = fp_regions;
    fp_regions = r;
    __atomic_add_fetch(&fp_filter[fp_filter_slot(r->address)], 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&fp_live, 1, __ATOMIC_RELAXED);
}

/* Called with fp_lock held. */
static void fp_unlink_locked(struct fp_region *r) {
    for (struct fp_region **pp = &fp_regions; *pp; pp = &(*pp)->next) {
        if (*pp == r) {
            *pp = r->next;
            __atomic_sub_fetch(&fp_filter[fp_filter_slot(r->address)], 1, __ATOMIC_RELAXED);
            __atomic_sub_fetch(&fp_live, 1, __ATOMIC_RELAXED);
            return;
        }
    }
}

static unsigned fp_warned;
FP_HIDDEN void fp_warn_once(int key, const char *message) {
    unsigned bit = 1u << (key & 31);
    if (__atomic_fetch_or(&fp_warned, bit, __ATOMIC_RELAXED) & bit) return;
    char line[768];
    int n = snprintf(line, sizeof(line), "%s\n", message);
    if (n > 0) {
        ssize_t w = write(2, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1);
        (void)w;
    }
}

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

/* Fork. Regions are MADV_DONTFORK: a child's copy of a shared mapping that no uffd serves
 * would fill evicted pages of the memfd with zeros, corrupting the parent. Instead, the
 * child maps each region privately (MAP_PRIVATE of the same memfd, at the same address),
 * registers that mapping with a uffd of its own and hands it to the agent as a view:
 * pages the parent holds resident are shared until the child writes them (copy on write,
 * by the kernel), far pages are fetched into the child's private copy, and nothing the
 * child does reaches the memfd. See docs/decisions.md ("Fork"). */
static int64_t fp_call_locked(uint16_t type, const void *body, uint32_t body_len, const int *fds, int nfds,
                              unsigned char *reply, size_t reply_cap);
/* The parent, before fork: the agent keeps regions this process releases in the next
 * seconds available to the child's views (a parent that frees a block or exits right
 * after fork must not pull it from under the child). */
static void fp_atfork_prepare(void) {
    pthread_mutex_lock(&fp_lock);
    int any = 0;
    for (struct fp_region *r = fp_regions; r && !any; r = r->next) any = !r->view;
    if (any && fp_sock >= 0) {
        unsigned char reply[FP_REPLY_MAX];
        int saved = errno;
        fp_call_locked(FPW_FORK_PREPARE, NULL, 0, NULL, 0, reply, sizeof(reply));
        errno = saved;
    }
}
static void fp_atfork_parent(void) { pthread_mutex_unlock(&fp_lock); }
static void fp_atfork_child(void);
static void fp_install_atfork(void) { pthread_atfork(fp_atfork_prepare, fp_atfork_parent, fp_atfork_child); }

/* Called with fp_lock held. */
static int fp_connect_locked(void) {
    if (fp_sock >= 0) return 0;
    pthread_once(&fp_atfork_once, fp_install_atfork);
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

/* Called with fp_lock held; unmaps a node's pieces. */
static void fp_unmap_pieces(struct fp_region *r) {
    for (int i = 0; i < r->npieces; i++) syscall(SYS_munmap, (void *)r->pieces[i].start, r->pieces[i].end - r->pieces[i].start);
}

/* Replaces [a, b) with an inaccessible reservation (atomically: the range is never free).
 * Until the agent has let go of a region, its uffd could still install pages there, and the
 * kernel accepts such an install into any registered mapping of the process, a new region
 * at the same address included; a reservation is not registered, so it refuses them. */
static void fp_reserve(uintptr_t a, uintptr_t b) {
    if (a < b) syscall(SYS_mmap, (void *)a, b - a, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
}

/* After a request failed this way, the agent may have taken it (or may still be letting go
 * of the region): its range stays reserved for the life of the process, never reused. */
static int fp_agent_may_hold(int err) { return err == ETIMEDOUT || err == ECONNRESET || err == EPROTO; }

/* In the child of fork(): every region becomes a view (see above). A region whose view
 * cannot be set up stays unmapped in the child, which gets SIGSEGV if it touches it. */
static void fp_atfork_child(void) {
    pthread_mutex_init(&fp_lock, NULL);
    /* The parent's connection: its regions are the parent's; the child gets its own. */
    if (fp_sock >= 0) close(fp_sock);
    fp_sock = -1;
    struct fp_region *list = fp_regions;
    fp_regions = NULL;
    memset(fp_filter, 0, sizeof(fp_filter));
    fp_live = 0;
    int failed = 0, first_error = 0;
    while (list) {
        struct fp_region *r = list;
        list = r->next;
        close(r->uffd); /* the parent's uffd: the child's copy serves nothing */
        r->uffd = -1;
        int ok = 1;
        for (int i = 0; i < r->npieces && ok; i++) {
            void *want = (void *)r->pieces[i].start;
            size_t len = r->pieces[i].end - r->pieces[i].start;
            void *p = (void *)syscall(SYS_mmap, want, len, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_FIXED_NOREPLACE | MAP_NORESERVE, r->memfd,
                                      (off_t)(r->pieces[i].start - r->address));
            if (p != want) {
                if ((uintptr_t)p < (uintptr_t)-4096) syscall(SYS_munmap, p, len);
                r->npieces = i;
                ok = 0;
                break;
            }
            /* A grandchild must not inherit an unserved mapping either. */
            syscall(SYS_madvise, want, len, MADV_DONTFORK);
        }
        int via = 0, uffd = ok ? fp_uffd_open(1, &via) : -1;
        uint64_t features = 0, ioctls = 0;
        if (ok && (uffd < 0 || fp_uffd_api(uffd, FP_UFFD_FEATURE_MISSING_SHMEM, &features, &ioctls) < 0)) ok = 0;
        for (int i = 0; i < r->npieces && ok; i++)
            if (fp_uffd_register(uffd, r->pieces[i].start, r->pieces[i].end - r->pieces[i].start,
                                 FP_UFFD_REGISTER_MISSING, &ioctls) < 0)
                ok = 0;
        if (ok) {
            struct fpw_register_view body = {r->source, r->address, r->length};
            int fds[2] = {r->memfd, uffd};
            unsigned char reply[FP_REPLY_MAX];
            int64_t n = fp_call_locked(FPW_REGISTER_VIEW, &body, sizeof(body), fds, 2, reply, sizeof(reply));
            if (n < 0) {
                ok = 0;
                if (!first_error) first_error = errno;
            } else {
                struct fpw_ok v = {0, 0};
                if (n >= (int64_t)(sizeof(struct fpw_header) + sizeof(v)))
                    memcpy(&v, reply + sizeof(struct fpw_header), sizeof(v));
                r->id = v.value;
            }
        }
        if (!ok) {
            /* Nobody would serve this mapping's faults: unmapped (or reserved, when the agent
             * may have the view after all), it faults with SIGSEGV instead of reading zeros
             * into the parent's pages. */
            if (first_error && fp_agent_may_hold(first_error)) {
                for (int i = 0; i < r->npieces; i++) fp_reserve(r->pieces[i].start, r->pieces[i].end);
            } else {
                fp_unmap_pieces(r);
            }
            if (uffd >= 0) close(uffd);
            close(r->memfd);
            free(r);
            failed++;
            continue;
        }
        r->uffd = uffd;
        r->view = 1;
        fp_link_locked(r);
    }
    if (failed) {
        char line[700];
        snprintf(line, sizeof(line),
                 "farpage: warning: this forked child cannot see %d far-memory region(s) of its parent "
                 "(%s); touching them raises SIGSEGV. %s",
                 failed, first_error ? strerror(first_error) : "userfaultfd or mmap failed", farpage_last_error());
        fp_warn_once(30, line);
    }
}

FP_EXPORT void *farpage_alloc(size_t size, int flags) {
    if (flags != 0) {
        fp_set_error(EINVAL, "farpage_alloc: flags must be 0");
        return NULL;
    }
    return farpage_alloc_ex(size, NULL);
}

/* Maps the memfd shared at an address aligned to `align`: over-reserve, then map in place. */
static void *fp_map_aligned(int memfd, uint64_t length, size_t align, int *err) {
    size_t page = (size_t)fp_page_size();
    if (align <= page) return fp_map_shared(memfd, length, err);
    uint64_t span = length + align;
    void *reserve = (void *)syscall(SYS_mmap, NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if ((uintptr_t)reserve >= (uintptr_t)-4096) {
        *err = -(int)(intptr_t)reserve;
        return NULL;
    }
    uintptr_t start = ((uintptr_t)reserve + align - 1) & ~(uintptr_t)(align - 1);
    void *p = (void *)syscall(SYS_mmap, (void *)start, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, memfd, 0);
    if ((uintptr_t)p >= (uintptr_t)-4096) {
        *err = -(int)(intptr_t)p;
        syscall(SYS_munmap, reserve, span);
        return NULL;
    }
    if (start > (uintptr_t)reserve) syscall(SYS_munmap, reserve, start - (uintptr_t)reserve);
    uintptr_t end = start + length, reserve_end = (uintptr_t)reserve + span;
    if (reserve_end > end) syscall(SYS_munmap, (void *)end, reserve_end - end);
    return p;
}

static void *fp_create(size_t size, size_t align, const struct farpage_options *options, int origin) {
    uint64_t page = (uint64_t)fp_page_size();
    if (size == 0) {
        fp_set_error(EINVAL, "farpage_alloc: size must be greater than zero");
        return NULL;
    }
    if (align & (align - 1)) {
        fp_set_error(EINVAL, "farpage: alignment %zu is not a power of two", align);
        return NULL;
    }
    uint64_t length = ((uint64_t)size + page - 1) / page * page;
    if (length < size || length > ((uint64_t)1 << 56)) {
        fp_set_error(ENOMEM, "farpage_alloc: size too large");
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
    addr = fp_map_aligned(memfd, length, align, &err);
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
    struct fp_region *reg = calloc(1, sizeof(*reg));
    if (!reg) {
        fp_set_error(ENOMEM, "farpage: out of memory");
        goto fail;
    }

    pthread_mutex_lock(&fp_lock);
    int64_t n = fp_call_locked(FPW_REGISTER, &body, sizeof(body), fds, 2, reply, sizeof(reply));
    if (n < 0) {
        int e = errno;
        pthread_mutex_unlock(&fp_lock);
        free(reg);
        if (fp_agent_may_hold(e)) {
            /* A late registration would serve this range: keep it reserved, never reused. */
            fp_reserve((uintptr_t)addr, (uintptr_t)addr + length);
            addr = NULL;
        }
        errno = e;
        goto fail;
    }
    struct fpw_ok ok = {0, 0};
    if (n >= (int64_t)(sizeof(struct fpw_header) + sizeof(ok))) memcpy(&ok, reply + sizeof(struct fpw_header), sizeof(ok));
    reg->address = (uintptr_t)addr;
    reg->length = length;
    reg->id = ok.value;
    reg->source = ok.value;
    reg->memfd = memfd;
    reg->uffd = uffd;
    reg->origin = origin;
    reg->npieces = 1;
    reg->pieces[0].start = reg->address;
    reg->pieces[0].end = reg->address + length;
    fp_link_locked(reg);
    pthread_mutex_unlock(&fp_lock);
    return addr;

fail : {
    int saved = errno;
    if (addr) syscall(SYS_munmap, addr, length);
    if (uffd >= 0) fp_close(uffd);
    if (memfd >= 0) fp_close(memfd);
    errno = saved;
    return NULL;
}
}

FP_EXPORT void *farpage_alloc_ex(size_t size, const struct farpage_options *options) {
    if (options && options->struct_size < sizeof(size_t) + sizeof(uint64_t)) {
        fp_set_error(EINVAL, "farpage_alloc_ex: options->struct_size must be sizeof(struct farpage_options)");
        return NULL;
    }
    if (options && options->flags != 0) {
        fp_set_error(EINVAL, "farpage_alloc_ex: options->flags must be 0");
        return NULL;
    }
    return fp_create(size, 0, options, FP_ORIGIN_API);
}

FP_HIDDEN void *fp_region_create(size_t size, size_t align, const char *name, int origin) {
    struct farpage_options o;
    memset(&o, 0, sizeof(o));
    o.struct_size = sizeof(o);
    o.name = name;
    return fp_create(size, align, &o, origin);
}

/* Called with fp_lock held. The region containing all of [address, address+len). */
static struct fp_region *fp_find_locked(uintptr_t address, uint64_t len) {
    for (struct fp_region *r = fp_regions; r; r = r->next) {
        if (address >= r->address && address - r->address < r->length && len <= r->length - (address - r->address))
            return r;
    }
    return NULL;
}

/* Called with fp_lock held: forgets r, unmaps its pieces still mapped, tells the agent and
 * closes its descriptors. The caller frees r after unlocking: free() may be the interposed
 * one, which takes fp_lock. */
static int fp_release_locked(struct fp_region *r) {
    fp_unlink_locked(r);
    /* Reserve first: no thread of ours can fault on the region while the agent tears it
     * down, and no other mapping can take its addresses until the agent has let go (its
     * UNREGISTER reply comes once nothing of it is under way). */
    for (int i = 0; i < r->npieces; i++) fp_reserve(r->pieces[i].start, r->pieces[i].end);
    unsigned char reply[FP_REPLY_MAX];
    int64_t n = fp_call_locked(FPW_UNREGISTER, &r->id, sizeof(r->id), NULL, 0, reply, sizeof(reply));
    int saved = errno;
    /* Unless the agent may still be working on it (no answer): then the reservation stays. */
    if (!(n < 0 && fp_agent_may_hold(saved))) fp_unmap_pieces(r);
    r->npieces = 0;
    fp_close(r->uffd);
    fp_close(r->memfd);
    /* The mapping is gone either way; if the agent was unreachable it released the region
     * when our connection closed (a new connection does not know the id: ENOENT). */
    if (n < 0 && saved != ECONNRESET && saved != ECONNREFUSED && saved != ENOENT) {
        errno = saved;
        return -1;
    }
    return 0;
}

FP_EXPORT int farpage_free(void *addr) {
    if (!addr) return 0;
    pthread_mutex_lock(&fp_lock);
    struct fp_region *r = fp_find_locked((uintptr_t)addr, 0);
    if (!r || r->address != (uintptr_t)addr) {
        pthread_mutex_unlock(&fp_lock);
        fp_set_error(EINVAL, "farpage_free: %p is not the start of a farpage region", addr);
        return -1;
    }
    int rc = fp_release_locked(r);
    int saved = errno;
    pthread_mutex_unlock(&fp_lock);
    free(r);
    errno = saved;
    return rc;
}

/* Replaces the mapped parts of a view inside [s, t) with fresh anonymous memory: they read
 * as zeros, cost nothing until written, and need no uffd (a child's MADV_DONTNEED). */
static void fp_zero_view(struct fp_region *r, uintptr_t s, uintptr_t t) {
    for (int i = 0; i < r->npieces; i++) {
        uintptr_t a = r->pieces[i].start > s ? r->pieces[i].start : s;
        uintptr_t b = r->pieces[i].end < t ? r->pieces[i].end : t;
        if (a < b)
            syscall(SYS_mmap, (void *)a, b - a, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    }
}

/* Called with fp_lock held: asks the agent to drop [start, end) of region r (page aligned). */
static int fp_drop_locked(struct fp_region *r, uintptr_t start, uintptr_t end, uint32_t hint) {
    if (end <= start) return 0;
    struct fpw_advise body = {r->id, (uint64_t)(start - r->address), (uint64_t)(end - start), hint, 0};
    unsigned char reply[FP_REPLY_MAX];
    /* EAGAIN: some pages stayed in flight (a slow far tier); what was dropped stays dropped. */
    for (int attempt = 0; attempt < 5; attempt++) {
        if (fp_call_locked(FPW_ADVISE, &body, sizeof(body), NULL, 0, reply, sizeof(reply)) >= 0) return 0;
        if (errno != EAGAIN) return -1;
    }
    return -1;
}

FP_EXPORT int farpage_advise(void *addr, size_t len, int hint) {
    if (hint < FARPAGE_ADVISE_NORMAL || (hint > FARPAGE_ADVISE_RANDOM && hint != FARPAGE_ADVISE_STREAM)) {
        fp_set_error(EINVAL, "farpage_advise: unknown hint %d", hint);
        return -1;
    }
    pthread_mutex_lock(&fp_lock);
    struct fp_region *r = fp_find_locked((uintptr_t)addr, len);
    if (!r) {
        pthread_mutex_unlock(&fp_lock);
        fp_set_error(EINVAL, "farpage_advise: [%p, +%zu) is not inside one farpage region", addr, len);
        return -1;
    }
    if (r->view) {
        /* A forked child's view is private: dropped pages become fresh anonymous zeros;
         * fetch-ahead hints are the parent's to give. */
        if (hint == FARPAGE_ADVISE_DONTNEED) {
            uintptr_t page = (uintptr_t)fp_page_size();
            fp_zero_view(r, ((uintptr_t)addr + page - 1) & ~(page - 1), ((uintptr_t)addr + len) & ~(page - 1));
        }
        pthread_mutex_unlock(&fp_lock);
        return 0;
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
        struct fp_region *r = fp_find_locked((uintptr_t)addr, 0);
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

/* ---- For the LD_PRELOAD shim ------------------------------------------------- */

FP_HIDDEN int fp_region_lookup(const void *addr, size_t *length, int *origin) {
    if (!fp_region_maybe(addr)) return 0;
    pthread_mutex_lock(&fp_lock);
    struct fp_region *r = fp_find_locked((uintptr_t)addr, 0);
    int found = r && r->address == (uintptr_t)addr;
    if (found) {
        if (length) *length = r->length;
        if (origin) *origin = r->origin;
    }
    pthread_mutex_unlock(&fp_lock);
    return found;
}

/* Whether [a, e) overlaps a still-mapped piece of r. */
static int fp_overlaps(const struct fp_region *r, uintptr_t a, uintptr_t e) {
    if (!(r->address < e && a < r->address + r->length)) return 0;
    for (int i = 0; i < r->npieces; i++)
        if (r->pieces[i].start < e && a < r->pieces[i].end) return 1;
    return 0;
}

FP_HIDDEN int fp_region_overlaps(const void *addr, size_t len) {
    if (__atomic_load_n(&fp_live, __ATOMIC_RELAXED) == 0) return 0;
    uintptr_t a = (uintptr_t)addr, e = a + len;
    if (e < a) e = UINTPTR_MAX;
    int found = 0;
    pthread_mutex_lock(&fp_lock);
    for (struct fp_region *r = fp_regions; r && !found; r = r->next) found = fp_overlaps(r, a, e);
    pthread_mutex_unlock(&fp_lock);
    return found;
}

/* How many pieces r has once [a, e) is removed. */
static int fp_pieces_after(const struct fp_region *r, uintptr_t a, uintptr_t e) {
    int n = 0;
    for (int i = 0; i < r->npieces; i++) {
        const struct fp_piece *p = &r->pieces[i];
        if (p->end <= a || e <= p->start) n++;
        else n += (p->start < a) + (e < p->end);
    }
    return n;
}

/* Removes [a, e) from r's pieces (already unmapped; fp_pieces_after said it fits). */
static void fp_subtract_pieces(struct fp_region *r, uintptr_t a, uintptr_t e) {
    struct fp_piece out[sizeof(r->pieces) / sizeof(r->pieces[0])];
    int n = 0;
    for (int i = 0; i < r->npieces; i++) {
        struct fp_piece p = r->pieces[i];
        if (p.end <= a || e <= p.start) {
            out[n++] = p;
            continue;
        }
        if (p.start < a) out[n++] = (struct fp_piece){p.start, a};
        if (e < p.end) out[n++] = (struct fp_piece){e, p.end};
    }
    memcpy(r->pieces, out, sizeof(out[0]) * (size_t)n);
    r->npieces = n;
}

FP_HIDDEN int fp_region_unmap(void *addr, size_t len, int (*real_munmap)(void *, size_t)) {
    uintptr_t page = (uintptr_t)fp_page_size();
    uintptr_t a = (uintptr_t)addr, e = a + ((len + page - 1) & ~(page - 1));
    if (len == 0 || (a & (page - 1)) || e < a) return real_munmap(addr, len); /* the kernel's EINVAL */
    pthread_mutex_lock(&fp_lock);
    /* A split the bookkeeping cannot record is refused before anything changes, as the
     * kernel refuses one past vm.max_map_count. */
    for (struct fp_region *r = fp_regions; r; r = r->next) {
        if (fp_overlaps(r, a, e) && fp_pieces_after(r, a, e) > (int)(sizeof(r->pieces) / sizeof(r->pieces[0]))) {
            pthread_mutex_unlock(&fp_lock);
            fp_set_error(ENOMEM, "farpage: munmap would split a region into more than %d pieces",
                         (int)(sizeof(r->pieces) / sizeof(r->pieces[0])));
            return -1;
        }
    }
    /* The regions' parts of the range become reservations first (see fp_reserve), the
     * agent lets go of them, and only then is the whole range unmapped. */
    for (struct fp_region *r = fp_regions; r; r = r->next) {
        if (!fp_overlaps(r, a, e)) continue;
        for (int i = 0; i < r->npieces; i++) {
            uintptr_t s = r->pieces[i].start > a ? r->pieces[i].start : a;
            uintptr_t t = r->pieces[i].end < e ? r->pieces[i].end : e;
            fp_reserve(s, t);
        }
    }
    struct fp_region *released = NULL;
    struct fp_region *r = fp_regions;
    while (r) {
        struct fp_region *next = r->next;
        if (fp_overlaps(r, a, e)) {
            fp_subtract_pieces(r, a, e);
            if (r->npieces == 0) {
                fp_release_locked(r);
                r->next = released;
                released = r;
            } else if (!r->view) {
                uintptr_t s = a > r->address ? a : r->address;
                uintptr_t t = e < r->address + r->length ? e : r->address + r->length;
                /* Dropped, and marked so that the agent never installs there again. */
                fp_drop_locked(r, s, t, FP_ADVISE_GONE);
            }
        }
        r = next;
    }
    int rc = real_munmap(addr, len);
    int saved = errno;
    pthread_mutex_unlock(&fp_lock);
    while (released) {
        struct fp_region *next = released->next;
        free(released);
        released = next;
    }
    errno = saved;
    return rc;
}

struct fp_span {
    uintptr_t start, end;
};

static int fp_span_cmp(const void *x, const void *y) {
    const struct fp_span *a = x, *b = y;
    return (a->start > b->start) - (a->start < b->start);
}

FP_HIDDEN int fp_region_discard(void *addr, size_t len, int advice, int (*real_madvise)(void *, size_t, int)) {
    uintptr_t page = (uintptr_t)fp_page_size();
    uintptr_t a = (uintptr_t)addr, e = a + ((len + page - 1) & ~(page - 1));
    if ((a & (page - 1)) || e < a) {
        errno = EINVAL;
        return -1;
    }
    enum { MAX_SPANS = 128 };
    struct fp_span spans[MAX_SPANS];
    int nspans = 0, rc = 0, overflow = 0;
    pthread_mutex_lock(&fp_lock);
    for (struct fp_region *r = fp_regions; r; r = r->next) {
        if (!fp_overlaps(r, a, e)) continue;
        for (int i = 0; i < r->npieces; i++) {
            uintptr_t s = r->pieces[i].start > a ? r->pieces[i].start : a;
            uintptr_t t = r->pieces[i].end < e ? r->pieces[i].end : e;
            if (s >= t) continue;
            if (nspans < MAX_SPANS) spans[nspans++] = (struct fp_span){s, t};
            else overflow = 1;
            if (r->view) fp_zero_view(r, s, t);
            else if (fp_drop_locked(r, s, t, FARPAGE_ADVISE_DONTNEED) < 0) rc = -1;
        }
    }
    int saved = errno;
    pthread_mutex_unlock(&fp_lock);
    /* The rest of the range is ordinary memory: the kernel's. */
    if (overflow) {
        if (advice != MADV_REMOVE && real_madvise(addr, len, advice) != 0) rc = -1;
    } else {
        qsort(spans, (size_t)nspans, sizeof(spans[0]), fp_span_cmp);
        uintptr_t at = a;
        for (int i = 0; i <= nspans; i++) {
            uintptr_t until = i < nspans ? spans[i].start : e;
            if (until > at && real_madvise((void *)at, until - at, advice) != 0) {
                saved = errno;
                rc = -1;
            }
            if (i < nspans && spans[i].end > at) at = spans[i].end;
        }
    }
    errno = saved;
    return rc;
}

FP_HIDDEN void fp_region_shrink(void *addr, size_t keep) {
    uintptr_t page = (uintptr_t)fp_page_size();
    pthread_mutex_lock(&fp_lock);
    struct fp_region *r = fp_find_locked((uintptr_t)addr, 0);
    if (r && r->address == (uintptr_t)addr) {
        uintptr_t from = r->address + ((keep + page - 1) & ~(page - 1));
        if (r->view)
            fp_zero_view(r, from, r->address + r->length);
        else
            fp_drop_locked(r, from, r->address + r->length, FARPAGE_ADVISE_DONTNEED);
    }
    pthread_mutex_unlock(&fp_lock);
}
