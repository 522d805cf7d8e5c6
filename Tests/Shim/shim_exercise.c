/* shim_exercise.c — every function libfarpage.so interposes, checked byte for byte.
 *
 * Run it plainly and under LD_PRELOAD=libfarpage.so: the results must be the same. Under the
 * shim (FARPAGE_EXPECT_FAR=1) it also checks that large allocations are far (farpage_stats
 * answers for them) and small ones are not, and that regions are released.
 *
 *   fp-shim-exercise [--size BYTES] [--threads N] [--fork-exec-rounds N] [--stress-seconds S]
 *   fp-shim-exercise --expect-refusal    (FARPAGE_STRICT=1 with no agent: large allocations fail)
 *
 * Prints one line per check and "ok: N checks" at the end; exits 1 on the first failure
 * (with what differed), 2 on bad usage. */
#include "farpage.h"

#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static size_t big = 16u << 20; /* default: 16 MiB per large allocation */
static int threads = 4;
static int fork_exec_rounds = 20;
static int stress_seconds = 3;
static int expect_far;
static int checks;
static int (*stats_fn)(const void *, struct farpage_stats *);
static const size_t PAGE = 4096;

#define CHECK(cond, ...)                                                          \
    do {                                                                          \
        checks++;                                                                 \
        if (!(cond)) {                                                            \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);     \
            fprintf(stderr, __VA_ARGS__);                                         \
            fprintf(stderr, "\n");                                                \
            exit(1);                                                              \
        }                                                                         \
    } while (0)

/* The byte at offset i of a block stamped with seed. */
static inline uint8_t stamp(uint64_t seed, size_t i) {
    uint64_t x = (seed * 0x9E3779B97F4A7C15ull) ^ (i / 8 * 0xBF58476D1CE4E5B9ull);
    x ^= x >> 31;
    return (uint8_t)(x >> ((i % 8) * 8));
}

static void fill(void *p, size_t n, uint64_t seed) {
    uint8_t *b = p;
    for (size_t i = 0; i < n; i++) b[i] = stamp(seed, i);
}

/* Index of the first byte that differs, or -1. */
static long verify(const void *p, size_t n, uint64_t seed) {
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != stamp(seed, i)) return (long)i;
    return -1;
}

static long first_nonzero(const void *p, size_t n) {
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i]) return (long)i;
    return -1;
}

/* Whether p lies in a farpage region (only meaningful under the shim). */
static int is_far(const void *p) {
    if (!stats_fn) return 0;
    struct farpage_stats s;
    return stats_fn(p, &s) == 0;
}

static uint64_t agent_regions(void) {
    struct farpage_stats s;
    if (!stats_fn || stats_fn(NULL, &s) != 0) return 0;
    return s.regions;
}

static void expect_placement(const void *p, int far, const char *what) {
    if (!expect_far) return;
    CHECK(is_far(p) == far, "%s: expected %s memory", what, far ? "far" : "ordinary");
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void test_malloc_family(void) {
    /* malloc: large is far, small is not; the data survives the budget (the caller sets it
     * below the size, so the large blocks are evicted and fetched back). */
    char *a = malloc(big), *b = malloc(big), *small = malloc(100);
    CHECK(a && b && small, "malloc failed");
    expect_placement(a, 1, "malloc(big)");
    expect_placement(small, 0, "malloc(100)");
    fill(a, big, 1);
    fill(b, big, 2);
    fill(small, 100, 3);
    CHECK(verify(a, big, 1) < 0, "malloc block a differs at %ld", verify(a, big, 1));
    CHECK(verify(b, big, 2) < 0, "malloc block b differs at %ld", verify(b, big, 2));
    CHECK(malloc_usable_size(a) >= big, "malloc_usable_size %zu < %zu", malloc_usable_size(a), big);
    CHECK(malloc_usable_size(small) >= 100, "malloc_usable_size(small)");
    printf("malloc/free: far blocks verified\n");

    /* calloc: zeros, even after the block was used and freed (a new region each time). */
    free(b);
    char *c = calloc(big / 8, 8);
    CHECK(c, "calloc failed");
    expect_placement(c, 1, "calloc(big)");
    CHECK(first_nonzero(c, big) < 0, "calloc memory not zero at %ld", first_nonzero(c, big));
    volatile size_t huge = (size_t)1 << 62; /* volatile: the compiler sees the overflow too */
    errno = 0;
    CHECK(calloc(huge, 8) == NULL && errno == ENOMEM, "calloc overflow not refused");
    free(c);
    printf("calloc: zeros, overflow refused\n");

    /* realloc up across the threshold: small -> large keeps the bytes and becomes far. */
    char *r = malloc(1000);
    fill(r, 1000, 4);
    r = realloc(r, big);
    CHECK(r, "realloc up failed");
    expect_placement(r, 1, "realloc(small -> big)");
    CHECK(verify(r, 1000, 4) < 0, "realloc up lost bytes at %ld", verify(r, 1000, 4));
    fill(r, big, 5);
    /* large -> larger: a new region with the old bytes. */
    r = realloc(r, big * 2);
    CHECK(r, "realloc grow failed");
    expect_placement(r, 1, "realloc(big -> 2 big)");
    CHECK(verify(r, big, 5) < 0, "realloc grow lost bytes at %ld", verify(r, big, 5));
    /* shrink in place, still above the threshold. */
    char *same = realloc(r, big);
    CHECK(same, "realloc shrink failed");
    CHECK(verify(same, big, 5) < 0, "realloc shrink lost bytes");
    r = same;
    /* large -> small: back to the ordinary allocator with the first bytes. */
    r = realloc(r, 2000);
    CHECK(r, "realloc down failed");
    expect_placement(r, 0, "realloc(big -> small)");
    CHECK(verify(r, 2000, 5) < 0, "realloc down lost bytes at %ld", verify(r, 2000, 5));
    free(r);
    CHECK(realloc(NULL, big) != NULL, "realloc(NULL, big)");
    char *ra = reallocarray(NULL, big / 16, 16);
    CHECK(ra, "reallocarray failed");
    expect_placement(ra, 1, "reallocarray");
    errno = 0;
    CHECK(reallocarray(ra, huge, 16) == NULL && errno == ENOMEM, "reallocarray overflow not refused");
    free(ra);
    printf("realloc: across the threshold both ways, grow, shrink\n");

    /* The aligned family. */
    size_t aligns[] = {64, 4096, 2u << 20};
    for (size_t i = 0; i < sizeof(aligns) / sizeof(aligns[0]); i++) {
        void *p = NULL;
        CHECK(posix_memalign(&p, aligns[i], big) == 0 && p, "posix_memalign(%zu)", aligns[i]);
        CHECK((uintptr_t)p % aligns[i] == 0, "posix_memalign(%zu) gave %p", aligns[i], p);
        expect_placement(p, 1, "posix_memalign");
        fill(p, big, 10 + i);
        CHECK(verify(p, big, 10 + i) < 0, "posix_memalign block differs");
        free(p);
        void *q = aligned_alloc(aligns[i], big);
        CHECK(q && (uintptr_t)q % aligns[i] == 0, "aligned_alloc(%zu) gave %p", aligns[i], q);
        expect_placement(q, 1, "aligned_alloc");
        free(q);
        void *m = memalign(aligns[i], big);
        CHECK(m && (uintptr_t)m % aligns[i] == 0, "memalign(%zu) gave %p", aligns[i], m);
        expect_placement(m, 1, "memalign");
        free(m);
    }
    void *bad = NULL;
    CHECK(posix_memalign(&bad, 3, big) == EINVAL, "posix_memalign(3) not refused");
    void *v = valloc(big);
    CHECK(v && (uintptr_t)v % PAGE == 0, "valloc");
    expect_placement(v, 1, "valloc");
    free(v);
    void *pv = pvalloc(big + 1);
    CHECK(pv && (uintptr_t)pv % PAGE == 0 && malloc_usable_size(pv) >= big + PAGE, "pvalloc");
    free(pv);
    printf("posix_memalign/aligned_alloc/memalign/valloc/pvalloc: aligned\n");

    CHECK(verify(a, big, 1) < 0, "block a changed while others came and went (at %ld)", verify(a, big, 1));
    free(a);
    free(small);
}

static void test_mappings(void) {
    size_t n = big;
    uint64_t before = agent_regions();
    char *m = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(m != MAP_FAILED, "mmap failed: %s", strerror(errno));
    expect_placement(m, 1, "mmap(anonymous, big)");
    fill(m, n, 20);
    CHECK(verify(m, n, 20) < 0, "mmap block differs");

    /* Partial munmap: a hole in the middle; both sides keep their bytes. */
    size_t q = n / 4;
    CHECK(munmap(m + q, q) == 0, "munmap(middle) failed");
    CHECK(verify(m, q, 20) < 0, "left part lost after a partial munmap");
    for (size_t i = 2 * q; i < n; i += PAGE)
        CHECK(m[i] == (char)stamp(20, i), "right part differs at %zu after a partial munmap", i);
    /* The hole is really gone: mapping it again with MAP_FIXED_NOREPLACE succeeds. */
    void *again = mmap(m + q, q, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    CHECK(again == m + q, "the unmapped hole is still mapped (%p)", again);
    CHECK(first_nonzero(again, q) < 0, "new memory in the hole is not zero");
    munmap(again, q);
    /* The rest: the region goes away with its last mapped page. */
    CHECK(munmap(m, q) == 0 && munmap(m + 2 * q, 2 * q) == 0, "munmap(rest)");
    if (expect_far) CHECK(agent_regions() == before, "region not released: %llu regions, %llu before",
                          (unsigned long long)agent_regions(), (unsigned long long)before);
    printf("mmap/munmap: partial unmaps keep the rest, the last one releases the region\n");

    /* mremap growth moves (by copy) and keeps the bytes; the new tail is zero. */
    char *g = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(g != MAP_FAILED, "mmap for mremap");
    fill(g, n, 21);
    char *h = mremap(g, n, 2 * n, MREMAP_MAYMOVE);
    CHECK(h != MAP_FAILED, "mremap grow failed: %s", strerror(errno));
    expect_placement(h, 1, "mremap(grow)");
    CHECK(verify(h, n, 21) < 0, "mremap grow lost bytes at %ld", verify(h, n, 21));
    CHECK(first_nonzero(h + n, n) < 0, "mremap grow: new tail not zero");
    /* Shrink in place. */
    char *s = mremap(h, 2 * n, n / 2, 0);
    CHECK(s == h, "mremap shrink moved or failed");
    CHECK(verify(s, n / 2, 21) < 0, "mremap shrink lost bytes");
    /* Grow without MAYMOVE is refused rather than silently moved. */
    errno = 0;
    CHECK(mremap(s, n / 2, 4 * n, 0) == MAP_FAILED && errno == ENOMEM, "mremap grow in place not refused");
    CHECK(munmap(s, n / 2) == 0, "munmap after mremap");
    printf("mremap: grow by copy, shrink in place\n");

    /* madvise(DONTNEED/FREE): the range reads as zeros afterwards, the rest keeps its bytes. */
    char *d = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(d != MAP_FAILED, "mmap for madvise");
    fill(d, n, 22);
    CHECK(madvise(d + q, q, MADV_DONTNEED) == 0, "madvise(DONTNEED): %s", strerror(errno));
    CHECK(first_nonzero(d + q, q) < 0, "DONTNEED range not zero at %ld", first_nonzero(d + q, q));
    CHECK(madvise(d + 2 * q, q, MADV_FREE) == 0, "madvise(FREE): %s", strerror(errno));
    /* MADV_FREE lets the kernel keep the old bytes until memory is short; far memory drops them. */
    if (expect_far) CHECK(first_nonzero(d + 2 * q, q) < 0, "FREE range not zero");
    for (size_t i = 2 * q; i < 3 * q; i += PAGE) {
        int kept = 1;
        for (size_t j = i; j < i + PAGE && kept; j++) kept = (uint8_t)d[j] == stamp(22, j);
        CHECK(first_nonzero(d + i, PAGE) < 0 || kept, "FREE page at %zu neither zero nor kept", i);
    }
    CHECK(verify(d, q, 22) < 0, "bytes before the DONTNEED range changed");
    for (size_t i = 3 * q; i < n; i += 997) CHECK(d[i] == (char)stamp(22, i), "bytes after the range changed at %zu", i);
    /* Written again after DONTNEED, the pages hold the new bytes. */
    memset(d + q, 0x5a, q);
    CHECK(d[q] == 0x5a && d[2 * q - 1] == 0x5a, "rewrite after DONTNEED");
    CHECK(madvise(d, n, MADV_SEQUENTIAL) == 0, "madvise(SEQUENTIAL)");
    munmap(d, n);
    printf("madvise: DONTNEED and FREE read as zeros\n");

    /* Small or shared mappings are left alone. */
    char *tiny = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    expect_placement(tiny, 0, "mmap(small)");
    munmap(tiny, PAGE);
    char *shared = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    expect_placement(shared, 0, "mmap(shared anonymous)");
    munmap(shared, n);
}

/* fork without exec: the child reads the parent's far data, writes its own copy, and the
 * parent's bytes do not change. */
static void test_fork(void) {
    char *p = malloc(big);
    char *m = mmap(NULL, big, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(p && m != MAP_FAILED, "allocations for fork");
    fill(p, big, 30);
    fill(m, big, 31);
    for (int round = 0; round < 3; round++) {
        pid_t child = fork();
        CHECK(child >= 0, "fork: %s", strerror(errno));
        if (child == 0) {
            long at = verify(p, big, 30);
            if (at >= 0) {
                fprintf(stderr, "child: malloc block differs at %ld\n", at);
                _exit(3);
            }
            if ((at = verify(m, big, 31)) >= 0) {
                fprintf(stderr, "child: mmap block differs at %ld\n", at);
                _exit(4);
            }
            /* The child's writes are its own. */
            fill(p, big, 99);
            if (verify(p, big, 99) >= 0) _exit(5);
            memset(m, 0x77, big);
            /* The child allocates far memory of its own, too. */
            char *own = malloc(big);
            if (!own) _exit(6);
            fill(own, big, 98);
            if (verify(own, big, 98) >= 0) _exit(7);
            free(own);
            /* The parent's blocks, freed and unmapped in the child: only its views go. */
            free(p);
            if (munmap(m, big) != 0) _exit(8);
            exit(0);
        }
        int status = 0;
        waitpid(child, &status, 0);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child failed (status 0x%x)", status);
        CHECK(verify(p, big, 30) < 0, "the parent's malloc block changed after fork (at %ld)", verify(p, big, 30));
        CHECK(verify(m, big, 31) < 0, "the parent's mmap block changed after fork (at %ld)", verify(m, big, 31));
    }
    printf("fork: children read the parent's far memory and write their own copies\n");

    /* fork then exec: the common case, timed. */
    double t0 = now_seconds();
    for (int i = 0; i < fork_exec_rounds; i++) {
        pid_t child = fork();
        CHECK(child >= 0, "fork: %s", strerror(errno));
        if (child == 0) {
            execl("/bin/true", "true", (char *)NULL);
            _exit(127);
        }
        int status = 0;
        waitpid(child, &status, 0);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "exec'd child failed (status 0x%x)", status);
    }
    double per = fork_exec_rounds ? (now_seconds() - t0) / fork_exec_rounds : 0;
    CHECK(verify(p, big, 30) < 0, "the parent's block changed after fork+exec");
    printf("fork+exec: %.0f us per round with 2 regions\n", per * 1e6);
    free(p);
    munmap(m, big);
}

/* Regressions from review: each once lost data or crashed under the shim only. */
static void test_regressions(void) {
    /* (1) Many partial unmaps of one region: the bookkeeping either records each split or
     * refuses the munmap (ENOMEM, as the kernel past vm.max_map_count); the pages still
     * mapped keep their bytes either way. */
    size_t pages = 64, n = big; /* holes in the first 64 pages of a far-sized block */
    char *m = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(m != MAP_FAILED, "mmap");
    fill(m, n, 40);
    char mapped[64];
    memset(mapped, 1, sizeof(mapped));
    int refused = 0;
    for (size_t i = 1; i < pages; i += 2) {
        if (munmap(m + i * PAGE, PAGE) == 0) {
            mapped[i] = 0;
        } else {
            CHECK(errno == ENOMEM, "partial munmap failed with %s", strerror(errno));
            refused++;
        }
    }
    for (size_t i = 0; i < pages; i++)
        if (mapped[i])
            for (size_t j = i * PAGE; j < (i + 1) * PAGE; j += 256)
                CHECK((uint8_t)m[j] == stamp(40, j), "page %zu lost after %d refused splits", i, refused);
    for (size_t j = pages * PAGE; j < n; j += 4096) CHECK((uint8_t)m[j] == stamp(40, j), "tail lost at %zu", j);
    if (expect_far) CHECK(refused > 0, "a far region took %zu splits: the bookkeeping's limit was not reached", pages / 2);
    for (size_t i = 0; i < pages; i++)
        if (mapped[i]) CHECK(munmap(m + i * PAGE, PAGE) == 0, "munmap page %zu", i);
    CHECK(munmap(m + pages * PAGE, n - pages * PAGE) == 0, "munmap tail");
    printf("partial munmaps: %d splits refused, the rest intact\n", refused);

    /* (2) Ordinary memory mapped into a region's hole is the kernel's: DONTNEED zeroes it. */
    char *r = mmap(NULL, big, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(r != MAP_FAILED, "mmap");
    fill(r, big, 41);
    size_t q = big / 4;
    CHECK(munmap(r + q, q) == 0, "munmap hole");
    char *o = mmap(r + q, PAGE * 4, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    CHECK(o == r + q, "mapping into the hole");
    memset(o, 0xab, PAGE * 4);
    CHECK(madvise(o, PAGE * 4, MADV_DONTNEED) == 0, "madvise");
    CHECK(first_nonzero(o, PAGE * 4) < 0, "DONTNEED of ordinary memory in a region's hole kept its bytes");
    /* A DONTNEED spanning the region and the ordinary memory zeroes both. */
    CHECK(madvise(r + q - PAGE, PAGE * 2, MADV_DONTNEED) == 0, "madvise across");
    CHECK(first_nonzero(r + q - PAGE, PAGE * 2) < 0, "DONTNEED across region and ordinary memory");
    munmap(o, PAGE * 4);
    munmap(r, q);
    munmap(r + 2 * q, 2 * q);
    printf("holes: ordinary memory in a region's hole is left to the kernel\n");

    /* (3) The parent frees a block right after fork; the child still reads it. */
    char *b = malloc(big);
    CHECK(b, "malloc");
    fill(b, big, 42);
    pid_t child = fork();
    CHECK(child >= 0, "fork");
    if (child == 0) {
        usleep(200000);
        _exit(verify(b, big, 42) < 0 ? 0 : 3);
    }
    free(b);
    int status = 0;
    waitpid(child, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "a child whose parent freed the block after fork failed (0x%x)",
          status);

    /* (4) A child's DONTNEED: zeros on its view, ENOMEM over an unmapped hole (as the kernel). */
    char *v = mmap(NULL, big, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(v != MAP_FAILED, "mmap");
    fill(v, big, 43);
    CHECK(munmap(v + q, PAGE) == 0, "hole");
    child = fork();
    CHECK(child >= 0, "fork");
    if (child == 0) {
        if (madvise(v, PAGE * 2, MADV_DONTNEED) != 0 || first_nonzero(v, PAGE * 2) >= 0) _exit(3);
        if (v[2 * PAGE] != (char)stamp(43, 2 * PAGE)) _exit(4);
        errno = 0;
        if (madvise(v + q - PAGE, PAGE * 3, MADV_DONTNEED) == 0 || errno != ENOMEM) _exit(5);
        _exit(0);
    }
    waitpid(child, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child DONTNEED on its view (exit 0x%x)", status);
    CHECK(verify(v, q, 43) < 0, "the parent's block changed after its child's DONTNEED");
    munmap(v, q);
    munmap(v + q + PAGE, big - q - PAGE);
    printf("fork: parent frees after fork, child DONTNEED\n");
}

/* Threads allocating, growing, unmapping in parts and dropping, while a thread forks:
 * addresses are reused all the time, the case where a stale install once landed in a new
 * region at a freed one's address. */
static volatile int stress_stop;
static long stress_errors;
static void *stress_worker(void *arg) {
    unsigned rs = (unsigned)(uintptr_t)arg * 7919u;
    long iterations = 0;
    while (!stress_stop) {
        iterations++;
        uint64_t seed = (uint64_t)rand_r(&rs);
        size_t n = (size_t)(2 + rand_r(&rs) % 7) << 20;
        char *p = malloc(n);
        if (!p) { __atomic_add_fetch(&stress_errors, 1, __ATOMIC_RELAXED); continue; }
        fill(p, n, seed);
        size_t m = (size_t)(1 + rand_r(&rs) % 10) << 20;
        char *q = realloc(p, m);
        if (!q) { free(p); __atomic_add_fetch(&stress_errors, 1, __ATOMIC_RELAXED); continue; }
        if (verify(q, n < m ? n : m, seed) >= 0) {
            fprintf(stderr, "stress: realloc lost bytes\n");
            __atomic_add_fetch(&stress_errors, 1, __ATOMIC_RELAXED);
        }
        free(q);
        size_t len = 8u << 20;
        char *r = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (r == MAP_FAILED) { __atomic_add_fetch(&stress_errors, 1, __ATOMIC_RELAXED); continue; }
        fill(r, len, seed + 1);
        munmap(r + len / 2, len / 2);
        char *s = mremap(r, len / 2, len, MREMAP_MAYMOVE);
        if (s == MAP_FAILED) { munmap(r, len / 2); __atomic_add_fetch(&stress_errors, 1, __ATOMIC_RELAXED); continue; }
        if (verify(s, len / 2, seed + 1) >= 0) {
            fprintf(stderr, "stress: mremap lost bytes\n");
            __atomic_add_fetch(&stress_errors, 1, __ATOMIC_RELAXED);
        }
        madvise(s, 1u << 20, MADV_DONTNEED);
        if (first_nonzero(s, 1u << 20) >= 0) {
            fprintf(stderr, "stress: DONTNEED page not zero\n");
            __atomic_add_fetch(&stress_errors, 1, __ATOMIC_RELAXED);
        }
        munmap(s, len);
    }
    return (void *)iterations;
}

static void test_stress(int seconds) {
    size_t stable_len = 16u << 20;
    char *stable = malloc(stable_len);
    CHECK(stable, "malloc");
    fill(stable, stable_len, 44);
    pthread_t t[16];
    int n = threads > 16 ? 16 : threads;
    stress_stop = 0;
    for (int i = 0; i < n; i++) pthread_create(&t[i], NULL, stress_worker, (void *)(uintptr_t)(i + 1));
    double until = now_seconds() + seconds;
    int kids = 0;
    while (now_seconds() < until) {
        pid_t c = fork();
        CHECK(c >= 0, "fork");
        if (c == 0) _exit(verify(stable, stable_len, 44) < 0 ? 0 : 3);
        int status = 0;
        waitpid(c, &status, 0);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "a child forked mid-stress failed (0x%x)", status);
        kids++;
        usleep(50000);
    }
    stress_stop = 1;
    long total = 0;
    for (int i = 0; i < n; i++) {
        void *r = NULL;
        pthread_join(t[i], &r);
        total += (long)r;
    }
    CHECK(stress_errors == 0, "%ld errors in %ld stress iterations", stress_errors, total);
    CHECK(verify(stable, stable_len, 44) < 0, "the stable block changed during the stress");
    free(stable);
    printf("stress: %ld iterations on %d threads, %d children forked, no error\n", total, n, kids);
}

static void *thread_body(void *arg) {
    uint64_t seed = (uint64_t)(uintptr_t)arg;
    for (int i = 0; i < 6; i++) {
        size_t n = big / 2 + (size_t)i * PAGE * 3;
        char *x = (i % 2) ? malloc(n) : mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (!x || x == MAP_FAILED) return (void *)1;
        fill(x, n, seed * 100 + (uint64_t)i);
        char *small = malloc(64);
        free(small);
        if (verify(x, n, seed * 100 + (uint64_t)i) >= 0) return (void *)2;
        if (i % 2) free(x);
        else munmap(x, n);
    }
    return NULL;
}

static void test_threads(void) {
    pthread_t t[64];
    int n = threads > 64 ? 64 : threads;
    for (int i = 0; i < n; i++) pthread_create(&t[i], NULL, thread_body, (void *)(uintptr_t)(i + 1));
    for (int i = 0; i < n; i++) {
        void *r = NULL;
        pthread_join(t[i], &r);
        CHECK(r == NULL, "thread %d failed (%p)", i, r);
    }
    printf("threads: %d threads allocating, writing and freeing at once\n", n);
}

/* Strict mode with no agent: large allocations fail with ENOMEM, small ones work. */
static int expect_refusal(void) {
    errno = 0;
    void *p = malloc(big);
    CHECK(p == NULL && errno == ENOMEM, "malloc(big) = %p, errno %d under FARPAGE_STRICT with no agent", p, errno);
    errno = 0;
    void *m = mmap(NULL, big, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(m == MAP_FAILED && errno == ENOMEM, "mmap(big) = %p, errno %d under FARPAGE_STRICT", m, errno);
    void *q = NULL;
    CHECK(posix_memalign(&q, 4096, big) == ENOMEM, "posix_memalign(big) under FARPAGE_STRICT");
    char *small = malloc(1000);
    CHECK(small != NULL, "a small malloc failed");
    memset(small, 1, 1000);
    free(small);
    printf("ok: %d checks\n", checks);
    return 0;
}

int main(int argc, char **argv) {
    int refusal = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--expect-refusal")) {
            refusal = 1;
            continue;
        }
        if (!strcmp(argv[i], "--size") && i + 1 < argc) big = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--fork-exec-rounds") && i + 1 < argc) fork_exec_rounds = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--stress-seconds") && i + 1 < argc) stress_seconds = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: %s [--size BYTES] [--threads N] [--fork-exec-rounds N]\n", argv[0]);
            return 2;
        }
    }
    big = (big + PAGE - 1) / PAGE * PAGE;
    const char *e = getenv("FARPAGE_EXPECT_FAR");
    expect_far = e && !strcmp(e, "1");
    stats_fn = (int (*)(const void *, struct farpage_stats *))dlsym(RTLD_DEFAULT, "farpage_stats");
    if (expect_far && !stats_fn) {
        fprintf(stderr, "FARPAGE_EXPECT_FAR=1 but libfarpage.so is not loaded (LD_PRELOAD)\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (refusal) return expect_refusal();
    test_malloc_family();
    test_mappings();
    test_fork();
    test_threads();
    test_regressions();
    if (stress_seconds > 0) test_stress(stress_seconds);
    if (expect_far) {
        struct farpage_stats s;
        CHECK(stats_fn(NULL, &s) == 0, "agent stats");
        printf("agent: %llu evictions, %llu fetches\n", (unsigned long long)s.evictions, (unsigned long long)s.fetches);
    }
    printf("ok: %d checks\n", checks);
    return 0;
}
