/* farpage_preload.c — the LD_PRELOAD half of libfarpage.so: unmodified programs get far
 * memory for their large allocations.
 *
 *   LD_PRELOAD=libfarpage.so your-program
 *
 * Interposed: malloc, calloc, realloc, reallocarray, free, posix_memalign, aligned_alloc,
 * memalign, valloc, pvalloc, malloc_usable_size, and anonymous private mmap/mmap64, munmap,
 * mremap and madvise. An allocation of at least FARPAGE_THRESHOLD bytes becomes a farpage
 * region (a memfd registered with the agent); everything smaller goes to the next allocator
 * untouched. glibc's malloc makes its own large mappings with an internal mmap that no
 * interposer sees, which is why malloc is interposed as well as mmap.
 *
 * Environment:
 *   FARPAGE_THRESHOLD  smallest allocation made far (default 2MiB; suffixes K, KiB, M, MiB, G, GiB)
 *   FARPAGE_SOCKET     the agent's socket (default /run/farpage/agent.sock)
 *   FARPAGE_TENANT     the name the agent shows for this program's regions (default: program name)
 *   FARPAGE_STRICT     1: an allocation the agent cannot take fails (NULL / MAP_FAILED, ENOMEM)
 *                      instead of falling back to ordinary memory
 *   FARPAGE_DISABLE    1: interpose nothing (everything goes to the next allocator)
 *
 * Plain C, no Swift runtime: it runs inside arbitrary programs. See docs/shim.md. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "farpage.h"
#include "farpage_internal.h"

#include <dlfcn.h>
#include <errno.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define FP_EXPORT __attribute__((visibility("default")))
#define FP_TLS __attribute__((tls_model("initial-exec")))

/* Inside the shim's own work (creating or freeing a region): every allocation and mapping
 * made meanwhile goes to the real functions. */
static __thread int fp_busy FP_TLS;

static struct {
    void *(*malloc)(size_t);
    void (*free)(void *);
    void *(*calloc)(size_t, size_t);
    void *(*realloc)(void *, size_t);
    int (*posix_memalign)(void **, size_t, size_t);
    void *(*aligned_alloc)(size_t, size_t);
    void *(*memalign)(size_t, size_t);
    void *(*valloc)(size_t);
    void *(*pvalloc)(size_t);
    size_t (*malloc_usable_size)(void *);
    void *(*mmap)(void *, size_t, int, int, int, off_t);
    int (*munmap)(void *, size_t);
    void *(*mremap)(void *, size_t, size_t, int, ...);
    int (*madvise)(void *, size_t, int);
} real;

/* 0: not initialised, 1: a thread is initialising, 2: ready. */
static int fp_state;
/* 2 MiB: just above CPython's 1 MiB obmalloc arenas (see docs/shim.md). */
static size_t fp_threshold = (size_t)2 << 20;
static int fp_strict;
static int fp_enabled = 1;
static char fp_name[24] = "preload";
/* After the agent could not be reached, CLOCK_MONOTONIC seconds before trying again. */
static int64_t fp_retry_at;

/* ---- Bootstrap: allocations made while dlsym() resolves the real functions ---------- */

static char fp_boot[256 * 1024] __attribute__((aligned(64)));
static size_t fp_boot_used;

static int fp_in_boot(const void *p) { return (const char *)p >= fp_boot && (const char *)p < fp_boot + sizeof(fp_boot); }

/* A 16-byte header holds the size; never freed (dlsym asks for a few hundred bytes). */
static void *fp_boot_alloc(size_t size, size_t align) {
    if (align < 16) align = 16;
    if (size > sizeof(fp_boot)) return NULL;
    size_t need = size + 16 + align;
    size_t start = __atomic_fetch_add(&fp_boot_used, need, __ATOMIC_RELAXED);
    if (start + need > sizeof(fp_boot)) return NULL;
    uintptr_t p = ((uintptr_t)(fp_boot + start + 16) + align - 1) & ~(uintptr_t)(align - 1);
    ((size_t *)p)[-2] = size;
    return (void *)p;
}

static size_t fp_boot_size(const void *p) { return ((const size_t *)p)[-2]; }

/* ---- Configuration ------------------------------------------------------------------ */

static int fp_env_true(const char *name) {
    const char *v = getenv(name);
    return v && (!strcmp(v, "1") || !strcasecmp(v, "true") || !strcasecmp(v, "yes") || !strcasecmp(v, "on"));
}

/* "64MiB", "1M", "4096": bytes, or 0 when malformed. */
static size_t fp_parse_size(const char *s) {
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s) return 0;
    unsigned long long mul = 1;
    if (*end) {
        char c = (char)(*end | 0x20);
        if (c == 'k') mul = 1ULL << 10;
        else if (c == 'm') mul = 1ULL << 20;
        else if (c == 'g') mul = 1ULL << 30;
        else if (c == 't') mul = 1ULL << 40;
        else if (c != 'b') return 0;
        end++;
        if (c != 'b' && (!strcasecmp(end, "ib") || !strcasecmp(end, "b") || *end == 0)) end += strlen(end);
    }
    if (*end) return 0;
    if (v > ~0ULL / mul) return 0;
    return (size_t)(v * mul);
}

static void fp_configure(void) {
    if (fp_env_true("FARPAGE_DISABLE")) fp_enabled = 0;
    fp_strict = fp_env_true("FARPAGE_STRICT");
    const char *t = getenv("FARPAGE_THRESHOLD");
    if (t && *t) {
        size_t v = fp_parse_size(t);
        if (v == 0) {
            char line[256];
            snprintf(line, sizeof(line),
                     "farpage: warning: FARPAGE_THRESHOLD=%s is not a size (e.g. 1MiB, 65536); using %zu bytes", t,
                     fp_threshold);
            fp_warn_once(20, line);
        } else {
            size_t page = (size_t)sysconf(_SC_PAGESIZE);
            fp_threshold = v < page ? page : v;
        }
    }
    const char *tenant = getenv("FARPAGE_TENANT");
    const char *name = tenant && *tenant ? tenant : program_invocation_short_name;
    if (name && *name) snprintf(fp_name, sizeof(fp_name), "%s", name);
}

#define FP_RESOLVE(sym) real.sym = (__typeof__(real.sym))dlsym(RTLD_NEXT, #sym)

static void fp_init(void) {
    int expected = 0;
    if (!__atomic_compare_exchange_n(&fp_state, &expected, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        if (expected == 2 || fp_busy) return; /* ready, or dlsym calling back into us */
        while (__atomic_load_n(&fp_state, __ATOMIC_ACQUIRE) != 2) sched_yield();
        return;
    }
    fp_busy++;
    FP_RESOLVE(malloc);
    FP_RESOLVE(free);
    FP_RESOLVE(calloc);
    FP_RESOLVE(realloc);
    FP_RESOLVE(posix_memalign);
    FP_RESOLVE(aligned_alloc);
    FP_RESOLVE(memalign);
    FP_RESOLVE(valloc);
    FP_RESOLVE(pvalloc);
    FP_RESOLVE(malloc_usable_size);
    FP_RESOLVE(mmap);
    FP_RESOLVE(munmap);
    FP_RESOLVE(mremap);
    FP_RESOLVE(madvise);
    fp_configure();
    fp_busy--;
    __atomic_store_n(&fp_state, 2, __ATOMIC_RELEASE);
}

__attribute__((constructor)) static void fp_constructor(void) { fp_init(); }

static inline int fp_ready(void) {
    if (__builtin_expect(__atomic_load_n(&fp_state, __ATOMIC_ACQUIRE) != 2, 0)) fp_init();
    return __atomic_load_n(&fp_state, __ATOMIC_ACQUIRE) == 2;
}

/* ---- Far allocations -------------------------------------------------------------------- */

static int64_t fp_now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec;
}

/* Whether an allocation of `size` should be far. */
static inline int fp_wants(size_t size) { return size >= fp_threshold && fp_enabled && !fp_busy; }

/* A far allocation, or NULL. On NULL, *fallback says whether to use ordinary memory
 * (never in strict mode, where errno is ENOMEM). */
static void *fp_far(size_t size, size_t align, int origin, int *fallback) {
    *fallback = 1;
    int64_t retry = __atomic_load_n(&fp_retry_at, __ATOMIC_RELAXED);
    if (retry && fp_now_seconds() < retry) {
        if (fp_strict) {
            *fallback = 0;
            errno = ENOMEM;
        }
        return NULL;
    }
    int saved_errno = errno;
    fp_busy++;
    void *p = fp_region_create(size, align, fp_name, origin);
    int e = errno;
    fp_busy--;
    if (p) {
        errno = saved_errno;
        return p;
    }
    char line[768];
    /* Keys: one warning per kind of failure for the life of the process. */
    int key = e == ECONNREFUSED || e == ECONNRESET || e == EACCES ? 1 : e == ENOSYS || e == EPERM || e == ENOTSUP ? 2 : e == ENOMEM ? 3 : 4;
    if (key <= 2) __atomic_store_n(&fp_retry_at, fp_now_seconds() + (key == 1 ? 1 : 3600), __ATOMIC_RELAXED);
    const char *why = farpage_last_error();
    if (!strncmp(why, "farpage: ", 9)) why += 9;
    snprintf(line, sizeof(line), "farpage: warning: %s %s", why,
             fp_strict ? "(FARPAGE_STRICT: the allocation fails)" : "Continuing with ordinary memory.");
    fp_warn_once(key, line);
    if (fp_strict) {
        *fallback = 0;
        errno = ENOMEM;
    } else {
        errno = saved_errno;
    }
    return NULL;
}

/* When p is a region the malloc family made: 1 with its length. */
static inline int fp_owned(void *p, size_t *length) {
    if (fp_busy || !fp_region_maybe(p)) return 0;
    int origin = 0;
    return fp_region_lookup(p, length, &origin) && origin == FP_ORIGIN_MALLOC;
}

static void fp_release(void *p) {
    fp_busy++;
    farpage_free(p);
    fp_busy--;
}

/* ---- The malloc family --------------------------------------------------------------------- */

FP_EXPORT void *malloc(size_t size) {
    if (!fp_ready() || !real.malloc) return fp_boot_alloc(size, 16);
    if (fp_wants(size)) {
        int fallback;
        void *p = fp_far(size, 0, FP_ORIGIN_MALLOC, &fallback);
        if (p || !fallback) return p;
    }
    return real.malloc(size);
}

FP_EXPORT void free(void *p) {
    if (!p || fp_in_boot(p)) return;
    if (!fp_ready() || !real.free) return; /* cannot happen: nothing was allocated elsewhere yet */
    size_t length;
    if (fp_owned(p, &length)) {
        fp_release(p);
        return;
    }
    real.free(p);
}

FP_EXPORT void *calloc(size_t n, size_t size) {
    size_t bytes;
    if (__builtin_mul_overflow(n, size, &bytes)) {
        errno = ENOMEM;
        return NULL;
    }
    if (!fp_ready() || !real.calloc) return fp_boot_alloc(bytes, 16); /* static memory: zeros */
    if (fp_wants(bytes)) {
        int fallback;
        void *p = fp_far(bytes, 0, FP_ORIGIN_MALLOC, &fallback); /* a new region reads as zeros */
        if (p || !fallback) return p;
    }
    return real.calloc(n, size);
}

FP_EXPORT void *realloc(void *p, size_t size) {
    if (!p) return malloc(size);
    if (fp_in_boot(p)) {
        void *q = malloc(size);
        if (q) memcpy(q, p, fp_boot_size(p) < size ? fp_boot_size(p) : size);
        return q;
    }
    if (!fp_ready()) return NULL;
    size_t length;
    if (fp_owned(p, &length)) {
        if (size == 0) {
            fp_release(p);
            return NULL;
        }
        if (size <= length && size >= fp_threshold) {
            /* Shrinks in place; pages past the new end are dropped. */
            if (length - size >= fp_threshold) {
                fp_busy++;
                fp_region_shrink(p, size);
                fp_busy--;
            }
            return p;
        }
        /* Grows (a new, larger region) or falls below the threshold (ordinary memory). */
        void *q = malloc(size);
        if (!q) return NULL; /* p is untouched, as realloc promises */
        memcpy(q, p, size < length ? size : length);
        fp_release(p);
        return q;
    }
    if (fp_wants(size)) {
        size_t old = real.malloc_usable_size ? real.malloc_usable_size(p) : 0;
        int fallback;
        void *q = fp_far(size, 0, FP_ORIGIN_MALLOC, &fallback);
        if (q) {
            memcpy(q, p, old < size ? old : size);
            real.free(p);
            return q;
        }
        if (!fallback) return NULL;
    }
    return real.realloc(p, size);
}

FP_EXPORT void *reallocarray(void *p, size_t n, size_t size) {
    size_t bytes;
    if (__builtin_mul_overflow(n, size, &bytes)) {
        errno = ENOMEM;
        return NULL;
    }
    return realloc(p, bytes);
}

static int fp_valid_alignment(size_t align) { return align && !(align & (align - 1)); }

/* A far block aligned to `align`, or NULL with *fallback as for fp_far. */
static void *fp_far_aligned(size_t align, size_t size, int *fallback) {
    *fallback = 1;
    if (!fp_wants(size)) return NULL;
    return fp_far(size, align, FP_ORIGIN_MALLOC, fallback);
}

FP_EXPORT int posix_memalign(void **out, size_t align, size_t size) {
    if (!fp_valid_alignment(align) || align % sizeof(void *)) return EINVAL;
    if (!fp_ready() || !real.posix_memalign) {
        void *p = fp_boot_alloc(size, align);
        if (!p) return ENOMEM;
        *out = p;
        return 0;
    }
    int fallback;
    void *p = fp_far_aligned(align, size, &fallback);
    if (p) {
        *out = p;
        return 0;
    }
    if (!fallback) return ENOMEM;
    return real.posix_memalign(out, align, size);
}

FP_EXPORT void *aligned_alloc(size_t align, size_t size) {
    if (!fp_valid_alignment(align)) {
        errno = EINVAL;
        return NULL;
    }
    if (!fp_ready() || !real.aligned_alloc) return fp_boot_alloc(size, align);
    int fallback;
    void *p = fp_far_aligned(align, size, &fallback);
    if (p || !fallback) return p;
    return real.aligned_alloc(align, size);
}

FP_EXPORT void *memalign(size_t align, size_t size) {
    if (!fp_ready() || !real.memalign) return fp_boot_alloc(size, align);
    if (fp_valid_alignment(align)) {
        int fallback;
        void *p = fp_far_aligned(align, size, &fallback);
        if (p || !fallback) return p;
    }
    return real.memalign(align, size);
}

FP_EXPORT void *valloc(size_t size) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    if (!fp_ready() || !real.valloc) return fp_boot_alloc(size, page);
    int fallback;
    void *p = fp_far_aligned(page, size, &fallback);
    if (p || !fallback) return p;
    return real.valloc(size);
}

FP_EXPORT void *pvalloc(size_t size) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t rounded = (size + page - 1) & ~(page - 1);
    if (rounded < size) {
        errno = ENOMEM;
        return NULL;
    }
    if (!fp_ready() || !real.pvalloc) return fp_boot_alloc(rounded, page);
    int fallback;
    void *p = fp_far_aligned(page, rounded ? rounded : page, &fallback);
    if (p || !fallback) return p;
    return real.pvalloc(size);
}

FP_EXPORT size_t malloc_usable_size(void *p) {
    if (!p) return 0;
    if (fp_in_boot(p)) return fp_boot_size(p);
    if (!fp_ready() || !real.malloc_usable_size) return 0;
    size_t length;
    if (fp_owned(p, &length)) return length;
    return real.malloc_usable_size(p);
}

/* ---- Mappings ---------------------------------------------------------------------------- */

static void *fp_raw_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    if (real.mmap) return real.mmap(addr, len, prot, flags, fd, off);
    long r = syscall(SYS_mmap, addr, len, prot, flags, fd, off);
    if (r < 0 && r > -4096) {
        errno = (int)-r;
        return MAP_FAILED;
    }
    return (void *)r;
}

static int fp_raw_munmap(void *addr, size_t len) {
    if (real.munmap) return real.munmap(addr, len);
    return (int)syscall(SYS_munmap, addr, len);
}

FP_EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    if (fp_ready() && !addr && len >= fp_threshold && fp_enabled && !fp_busy && (flags & MAP_ANONYMOUS) &&
        (flags & MAP_TYPE) == MAP_PRIVATE && prot == (PROT_READ | PROT_WRITE) &&
        !(flags & (MAP_FIXED | MAP_FIXED_NOREPLACE | MAP_GROWSDOWN | MAP_HUGETLB | MAP_STACK | MAP_32BIT))) {
        int fallback;
        void *p = fp_far(len, 0, FP_ORIGIN_MMAP, &fallback);
        if (p) return p;
        if (!fallback) return MAP_FAILED;
    }
    return fp_raw_mmap(addr, len, prot, flags, fd, off);
}

FP_EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off) __attribute__((alias("mmap")));

FP_EXPORT int munmap(void *addr, size_t len) {
    if (fp_ready() && !fp_busy && fp_region_overlaps(addr, len)) {
        fp_busy++;
        int rc = fp_region_unmap(addr, len, fp_raw_munmap);
        fp_busy--;
        return rc;
    }
    return fp_raw_munmap(addr, len);
}

FP_EXPORT void *mremap(void *old, size_t old_size, size_t new_size, int flags, ...) {
    void *new_address = NULL;
    if (flags & MREMAP_FIXED) {
        va_list ap;
        va_start(ap, flags);
        new_address = va_arg(ap, void *);
        va_end(ap);
    }
    if (!fp_ready() || fp_busy || !fp_region_overlaps(old, old_size ? old_size : 1)) {
        if (real.mremap) return real.mremap(old, old_size, new_size, flags, new_address);
        long r = syscall(SYS_mremap, old, old_size, new_size, flags, new_address);
        if (r < 0 && r > -4096) {
            errno = (int)-r;
            return MAP_FAILED;
        }
        return (void *)r;
    }
    /* The kernel must never move a region's mapping: without UFFD_FEATURE_EVENT_REMAP the
     * moved mapping would lose its uffd registration and read zeros into the memfd. So a
     * region is resized by copying, as realloc does. */
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    if (((uintptr_t)old & (page - 1)) || old_size == 0 || new_size == 0 || (flags & MREMAP_DONTUNMAP)) {
        errno = EINVAL;
        return MAP_FAILED;
    }
    size_t old_pages = (old_size + page - 1) & ~(page - 1), new_pages = (new_size + page - 1) & ~(page - 1);
    if (new_pages <= old_pages && !(flags & MREMAP_FIXED)) {
        if (new_pages < old_pages && munmap((char *)old + new_pages, old_pages - new_pages) != 0) return MAP_FAILED;
        return old;
    }
    if (!(flags & MREMAP_MAYMOVE)) {
        errno = ENOMEM; /* cannot grow in place, as the kernel says when the next pages are taken */
        return MAP_FAILED;
    }
    void *dst;
    if (flags & MREMAP_FIXED) {
        /* As the kernel: the two ranges must not overlap; whatever is at the destination goes
         * (through munmap, so that a region there is released properly). */
        uintptr_t o = (uintptr_t)old, n = (uintptr_t)new_address;
        if ((n & (page - 1)) || (n < o + old_pages && o < n + new_pages)) {
            errno = EINVAL;
            return MAP_FAILED;
        }
        if (munmap(new_address, new_size) != 0) return MAP_FAILED;
        dst = fp_raw_mmap(new_address, new_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    } else {
        dst = mmap(NULL, new_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    if (dst == MAP_FAILED) return MAP_FAILED;
    memcpy(dst, old, old_size < new_size ? old_size : new_size);
    munmap(old, old_size);
    return dst;
}

static int fp_raw_madvise(void *addr, size_t len, int advice) {
    return real.madvise ? real.madvise(addr, len, advice) : (int)syscall(SYS_madvise, addr, len, advice);
}

FP_EXPORT int madvise(void *addr, size_t len, int advice) {
    int ours = fp_ready() && !fp_busy && fp_region_overlaps(addr, len);
    if (!ours) return real.madvise ? real.madvise(addr, len, advice) : (int)syscall(SYS_madvise, addr, len, advice);
    switch (advice) {
    case MADV_DOFORK:
    case MADV_WIPEONFORK:
    case MADV_KEEPONFORK:
        return 0; /* regions stay MADV_DONTFORK: a child's copy would corrupt them (see fork) */
    case MADV_DONTNEED:
    case MADV_FREE:
    case MADV_REMOVE: {
        /* Anonymous memory reads as zeros after these: the agent drops the far copies and
         * punches the memfd (the kernel's own MADV_REMOVE would punch behind its back). The
         * parts of the range that are not regions go to the kernel. */
        fp_busy++;
        int rc = fp_region_discard(addr, len, advice, fp_raw_madvise);
        fp_busy--;
        return rc;
    }
    case MADV_SEQUENTIAL:
    case MADV_RANDOM:
    case MADV_WILLNEED:
    case MADV_NORMAL: {
        /* The agent's fetch-ahead takes the hint; the kernel's readahead has nothing to read. */
        int hint = advice == MADV_SEQUENTIAL ? FARPAGE_ADVISE_SEQUENTIAL
                   : advice == MADV_RANDOM   ? FARPAGE_ADVISE_RANDOM
                   : advice == MADV_WILLNEED ? FARPAGE_ADVISE_WILLNEED
                                             : FARPAGE_ADVISE_NORMAL;
        fp_busy++;
        farpage_advise(addr, len, hint); /* best effort: a range over several regions is ignored */
        fp_busy--;
        return 0;
    }
    default:
        return real.madvise ? real.madvise(addr, len, advice) : (int)syscall(SYS_madvise, addr, len, advice);
    }
}
