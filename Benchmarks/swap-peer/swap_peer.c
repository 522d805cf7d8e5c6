/*
 * swap_peer — what kernel swap does with a buffer larger than its memory limit.
 *
 * The peer Farpage is compared with: the same access patterns as farpage-bench's
 * sweep and random faults, on plain anonymous memory, left to the kernel's swap
 * (a swap file, or zswap in front of it). Run it inside a memory cgroup whose
 * limit is smaller than the buffer; Benchmarks/swap-peer/run.sh sets that up.
 *
 *   1. fill: mmap an anonymous buffer and write every page with a pattern that
 *      depends on the page index (most of it is pushed out to swap meanwhile);
 *   2. sweep: read every word of every page in order and check it: GB/s;
 *   3. random: read one word of uniformly random pages (seeded), timed with
 *      clock_gettime around the load, and check the whole page afterwards
 *      (untimed). mincore(2) before each read (untimed) says whether the page
 *      was resident, so the latency of the reads that faulted is reported too;
 *   4. zipf: --zipf-ops reads of Zipf-distributed pages (theta 0.99, the YCSB
 *      generator, ranks scattered by a multiplicative hash; the same generator,
 *      seed and constants as farpage-bench's zipf row) after a fifth as many
 *      untimed: reads per second, and the major faults they took (getrusage).
 *
 * Usage: swap_peer [--size SIZE] [--reads N] [--zipf-ops N] [--seed S]
 *                  [--fill half|random|sparse] [--mode NAME]
 *   --size   buffer size, bytes or with a K/M/G/T suffix (KiB etc. accepted; powers
 *            of 1024); default 4GiB
 *   --reads  random reads timed; default 30000
 *   --zipf-ops  Zipf reads timed for throughput; default 1000000, 0 skips them
 *   --fill   page contents. Compression (zswap) depends on it, Farpage does not:
 *            half   the first 2 KiB of each page pseudo-random, the rest zero (about
 *                   2:1 for a compressor, like much anonymous memory); the default
 *            random all 4 KiB pseudo-random (incompressible)
 *            sparse farpage-bench's layout: three stamped words, the rest zero
 *   --mode   the name of the swap setup, for the output (default: zswap when
 *            /sys/module/zswap/parameters/enabled is Y, else swapfile when swap is
 *            on, else noswap)
 * Output: one JSON line on stdout:
 *   {"name":"swap_peer_MODE","mode":"MODE","bytes":..,"fill":"half","fill_gbps":..,
 *    "sweep_gbps":..,"rand_p50_us":..,"rand_p99_us":..,"fault_p50_us":..,...}
 *   rand_* cover every timed read (the resident ones too), fault_* only the reads of
 *   pages mincore reported not resident. The *_swapout_pages / *_swapin_pages fields
 *   are deltas of /proc/vmstat (pswp* + zswp*, system-wide) over each phase: they
 *   show that the run really swapped. zswap_* are /proc/meminfo's Zswap (compressed
 *   pool) and Zswapped (pages in it) after the fill, in KiB.
 * Exits 1 when a page reads back wrong or a system call fails, 2 on bad usage.
 *
 * Build: gcc -O2 -Wall -Wextra -o swap_peer swap_peer.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / sizeof(uint64_t))
#define DEFAULT_SIZE (4ULL << 30)
#define DEFAULT_READS 30000UL
#define STAMP_KEY 0x9E3779B97F4A7C15ULL /* farpage-bench's Region.key */

enum fill { FILL_HALF, FILL_RANDOM, FILL_SPARSE };
static const char *const fill_names[] = {"half", "random", "sparse"};

static void die(const char *what) {
    fprintf(stderr, "swap_peer: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* A cheap bijective mix: incompressible output, cheap enough to regenerate while
 * checking (a few ns per word against microseconds per swapped page). */
static inline uint64_t mix(uint64_t x) {
    x *= 0x9E3779B97F4A7C15ULL;
    x ^= x >> 32;
    x *= 0xD6E8FEB86659FD93ULL;
    x ^= x >> 32;
    return x;
}

/* Word w of page `page`. The +1 keeps word 0 of page 0 from being zero. */
static inline uint64_t expected(enum fill fill, uint64_t page, size_t w) {
    switch (fill) {
    case FILL_HALF:
        return w < WORDS / 2 ? mix(page * WORDS + w + 1) : 0;
    case FILL_RANDOM:
        return mix(page * WORDS + w + 1);
    case FILL_SPARSE:
        if (w == 0) return page;
        if (w == 1) return page ^ STAMP_KEY;
        if (w == WORDS - 1) return ~page;
        return 0;
    }
    return 0;
}

static void write_page(enum fill fill, uint64_t *p, uint64_t page) {
    for (size_t w = 0; w < WORDS; w++) p[w] = expected(fill, page, w);
}

/* Reads every word of the page (this is the sweep's load) and checks all of it. */
static int page_ok(enum fill fill, const volatile uint64_t *p, uint64_t page) {
    uint64_t diff = 0;
    for (size_t w = 0; w < WORDS; w++) diff |= p[w] ^ expected(fill, page, w);
    if (diff == 0) return 1;
    for (size_t w = 0; w < WORDS; w++) {
        if (p[w] != expected(fill, page, w)) {
            fprintf(stderr, "swap_peer: page %" PRIu64 " word %zu is 0x%016" PRIx64 ", want 0x%016" PRIx64 "\n",
                    page, w, p[w], expected(fill, page, w));
            break;
        }
    }
    return 0;
}

/* Swap traffic so far, system-wide: pages written to and read from swap and zswap. */
struct swap_counts {
    uint64_t out, in, zswap_out;
};

static struct swap_counts swap_counts(void) {
    struct swap_counts c = {0, 0, 0};
    FILE *f = fopen("/proc/vmstat", "r");
    if (!f) return c;
    char key[64];
    uint64_t v;
    while (fscanf(f, "%63s %" SCNu64, key, &v) == 2) {
        if (!strcmp(key, "pswpout") || !strcmp(key, "zswpout")) c.out += v;
        if (!strcmp(key, "pswpin") || !strcmp(key, "zswpin")) c.in += v;
        if (!strcmp(key, "zswpout")) c.zswap_out += v;
    }
    fclose(f);
    return c;
}

/* A /proc/meminfo value in KiB, or 0 when the line is absent. */
static uint64_t meminfo_kib(const char *name) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return 0;
    char line[256];
    size_t len = strlen(name);
    uint64_t kib = 0;
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, name, len) && line[len] == ':') {
            kib = strtoull(line + len + 1, NULL, 10);
            break;
        }
    }
    fclose(f);
    return kib;
}

static int swap_enabled(void) {
    FILE *f = fopen("/proc/swaps", "r");
    if (!f) return 0;
    char line[512];
    int lines = 0;
    while (fgets(line, sizeof line, f)) lines++;
    fclose(f);
    return lines > 1; /* a header, then one line per swap area */
}

static int zswap_enabled(void) {
    FILE *f = fopen("/sys/module/zswap/parameters/enabled", "r");
    if (!f) return 0;
    int c = fgetc(f);
    fclose(f);
    return c == 'Y' || c == 'y' || c == '1';
}

/* "4GiB", "512M", "1073741824". */
static int parse_size(const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    unsigned long long n = strtoull(s, &end, 10);
    if (errno || end == s) return -1;
    unsigned shift = 0;
    switch (*end) {
    case 'K': case 'k': shift = 10; end++; break;
    case 'M': case 'm': shift = 20; end++; break;
    case 'G': case 'g': shift = 30; end++; break;
    case 'T': case 't': shift = 40; end++; break;
    default: break;
    }
    if (shift && *end == 'i') end++;
    if (*end == 'B') end++;
    if (*end || (shift && n > (~0ULL >> shift))) return -1;
    *out = (uint64_t)n << shift;
    return 0;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of a sorted array, in microseconds. */
static double percentile_us(const uint64_t *sorted, size_t n, double p) {
    if (n == 0) return 0;
    size_t rank = (size_t)(p * (double)n + 0.999999);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return (double)sorted[rank - 1] / 1000.0;
}

static double mean_us(const uint64_t *v, size_t n) {
    double sum = 0;
    for (size_t i = 0; i < n; i++) sum += (double)v[i];
    return n ? sum / (double)n / 1000.0 : 0;
}

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* The YCSB Zipf generator (Gray et al.), theta < 1; rank 0 is the most popular. Ranks are
 * scattered over the pages by a multiplicative hash (farpage-bench's Zipf, same constants). */
struct zipf {
    uint64_t n;
    double theta, alpha, zetan, eta, first_two;
};
static void zipf_init(struct zipf *z, uint64_t n, double theta) {
    double zetan = 0;
    for (uint64_t i = 1; i <= n; i++) zetan += 1 / pow((double)i, theta);
    double zeta2 = 1 + 1 / pow(2, theta);
    z->n = n;
    z->theta = theta;
    z->alpha = 1 / (1 - theta);
    z->zetan = zetan;
    z->eta = (1 - pow(2 / (double)n, 1 - theta)) / (1 - zeta2 / zetan);
    z->first_two = 1 + pow(0.5, theta);
}
static uint64_t zipf_page(const struct zipf *z, uint64_t *rng) {
    double u = (double)(splitmix64(rng) >> 11) * 0x1p-53, uz = u * z->zetan;
    uint64_t rank;
    if (uz < 1) rank = 0;
    else if (uz < z->first_two) rank = 1;
    else {
        rank = (uint64_t)((double)z->n * pow(z->eta * u - z->eta + 1, z->alpha));
        if (rank > z->n - 1) rank = z->n - 1;
    }
    return (rank * 0x9E3779B97F4A7C15ULL) % z->n;
}

static void usage(const char *argv0) {
    fprintf(stderr, "usage: %s [--size SIZE] [--reads N] [--zipf-ops N] [--seed S] [--fill half|random|sparse] [--mode NAME]\n",
            argv0);
    exit(2);
}

int main(int argc, char **argv) {
    uint64_t size = DEFAULT_SIZE;
    unsigned long reads = DEFAULT_READS;
    unsigned long zipf_ops = 1000000;
    uint64_t seed = 1;
    enum fill fill = FILL_HALF;
    const char *mode = NULL;

    static const struct option options[] = {
        {"size", required_argument, NULL, 's'}, {"reads", required_argument, NULL, 'r'},
        {"seed", required_argument, NULL, 'S'}, {"fill", required_argument, NULL, 'f'},
        {"mode", required_argument, NULL, 'm'}, {"zipf-ops", required_argument, NULL, 'z'}, {NULL, 0, NULL, 0},
    };
    int opt;
    while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
        char *end;
        switch (opt) {
        case 's':
            if (parse_size(optarg, &size) < 0 || size < 16 * PAGE) {
                fprintf(stderr, "swap_peer: bad --size '%s' (want e.g. 4GiB, at least 64KiB)\n", optarg);
                return 2;
            }
            size &= ~(uint64_t)(PAGE - 1);
            break;
        case 'r':
            errno = 0;
            reads = strtoul(optarg, &end, 10);
            if (errno || *end || end == optarg || reads == 0 || reads > (1UL << 26)) {
                fprintf(stderr, "swap_peer: bad --reads '%s'\n", optarg);
                return 2;
            }
            break;
        case 'z':
            errno = 0;
            zipf_ops = strtoul(optarg, &end, 10);
            if (errno || *end || end == optarg || zipf_ops > (1UL << 30)) {
                fprintf(stderr, "swap_peer: bad --zipf-ops '%s'\n", optarg);
                return 2;
            }
            break;
        case 'S':
            errno = 0;
            seed = strtoull(optarg, &end, 0);
            if (errno || *end || end == optarg) {
                fprintf(stderr, "swap_peer: bad --seed '%s'\n", optarg);
                return 2;
            }
            break;
        case 'f':
            if (!strcmp(optarg, "half")) fill = FILL_HALF;
            else if (!strcmp(optarg, "random")) fill = FILL_RANDOM;
            else if (!strcmp(optarg, "sparse")) fill = FILL_SPARSE;
            else usage(argv[0]);
            break;
        case 'm':
            if (!*optarg || strpbrk(optarg, "\"\\ \t\n")) {
                fprintf(stderr, "swap_peer: --mode must be a plain word\n");
                return 2;
            }
            mode = optarg;
            break;
        default:
            usage(argv[0]);
        }
    }
    if (optind != argc) usage(argv[0]);
    if (!mode) mode = zswap_enabled() ? "zswap" : swap_enabled() ? "swapfile" : "noswap";
    if (!swap_enabled()) fprintf(stderr, "swap_peer: warning: no swap is enabled; pages beyond the limit cannot go anywhere\n");

    const uint64_t pages = size / PAGE;
    unsigned char *buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) die("mmap");
    /* Farpage moves 4 KiB pages; so does the kernel here unless THP is "always". */
    (void)madvise(buf, size, MADV_NOHUGEPAGE);

    /* 1. fill */
    struct swap_counts c0 = swap_counts();
    uint64_t t0 = now_ns();
    for (uint64_t p = 0; p < pages; p++) write_page(fill, (uint64_t *)(buf + p * PAGE), p);
    uint64_t fill_ns = now_ns() - t0;
    struct swap_counts c1 = swap_counts();
    uint64_t zswap_pool_kib = meminfo_kib("Zswap"), zswapped_kib = meminfo_kib("Zswapped");

    /* 2. sweep */
    uint64_t bad = 0, first_bad = 0;
    t0 = now_ns();
    for (uint64_t p = 0; p < pages; p++) {
        if (!page_ok(fill, (const volatile uint64_t *)(buf + p * PAGE), p) && bad++ == 0) first_bad = p;
    }
    uint64_t sweep_ns = now_ns() - t0;
    struct swap_counts c2 = swap_counts();
    if (bad) {
        fprintf(stderr, "swap_peer: sweep: %" PRIu64 " pages read back wrong, the first is page %" PRIu64 "\n", bad,
                first_bad);
        return 1;
    }

    /* 3. random reads */
    uint64_t *all = malloc(reads * sizeof *all), *faults = malloc(reads * sizeof *faults);
    if (!all || !faults) die("malloc");
    size_t nfaults = 0;
    uint64_t rng = seed;
    for (size_t i = 0; i < reads; i++) {
        uint64_t p = splitmix64(&rng) % pages;
        const volatile uint64_t *word = (const volatile uint64_t *)(buf + p * PAGE);
        unsigned char vec = 0;
        if (mincore((void *)(buf + p * PAGE), PAGE, &vec) < 0) die("mincore");
        uint64_t a = now_ns();
        uint64_t v = *word; /* the fault, when there is one */
        uint64_t b = now_ns();
        (void)v;
        all[i] = b - a;
        if (!(vec & 1)) faults[nfaults++] = b - a;
        if (!page_ok(fill, word, p)) return 1;
    }
    struct swap_counts c3 = swap_counts();

    /* 4. zipf reads: throughput */
    double zipf_s = 0;
    long zipf_majflt = 0;
    if (zipf_ops > 0) {
        struct zipf z;
        zipf_init(&z, pages, 0.99);
        uint64_t zrng = 2;
        unsigned long warmup = zipf_ops / 5;
        struct rusage r0, r1;
        uint64_t start = 0;
        for (unsigned long i = 0; i < warmup + zipf_ops; i++) {
            if (i == warmup) {
                getrusage(RUSAGE_SELF, &r0);
                start = now_ns();
            }
            uint64_t p = zipf_page(&z, &zrng);
            const volatile uint64_t *w = (const volatile uint64_t *)(buf + p * PAGE);
            if (w[0] != expected(fill, p, 0) || w[1] != expected(fill, p, 1)) {
                fprintf(stderr, "swap_peer: zipf: page %" PRIu64 " reads back wrong\n", p);
                return 1;
            }
        }
        zipf_s = (double)(now_ns() - start) / 1e9;
        getrusage(RUSAGE_SELF, &r1);
        zipf_majflt = r1.ru_majflt - r0.ru_majflt;
    }

    qsort(all, reads, sizeof *all, cmp_u64);
    qsort(faults, nfaults, sizeof *faults, cmp_u64);
    double fill_s = (double)fill_ns / 1e9, sweep_s = (double)sweep_ns / 1e9;
    printf("{\"name\":\"swap_peer_%s\",\"mode\":\"%s\",\"bytes\":%" PRIu64 ",\"fill\":\"%s\",\"fill_gbps\":%.3f,"
           "\"sweep_gbps\":%.3f,\"sweep_seconds\":%.2f,\"reads\":%lu,\"rand_p50_us\":%.2f,\"rand_p99_us\":%.2f,"
           "\"rand_mean_us\":%.2f,\"faults\":%zu,\"fault_p50_us\":%.2f,\"fault_p99_us\":%.2f,"
           "\"fill_swapout_pages\":%" PRIu64 ",\"fill_zswap_pages\":%" PRIu64 ",\"sweep_swapin_pages\":%" PRIu64
           ",\"random_swapin_pages\":%" PRIu64 ",\"zswap_pool_kib\":%" PRIu64 ",\"zswapped_kib\":%" PRIu64
           ",\"zipf_ops\":%lu,\"zipf_seconds\":%.4f,\"zipf_ops_per_s\":%.0f,\"zipf_major_faults\":%ld}\n",
           mode, mode, size, fill_names[fill], (double)size / fill_s / 1e9, (double)size / sweep_s / 1e9, sweep_s,
           reads, percentile_us(all, reads, 0.50), percentile_us(all, reads, 0.99), mean_us(all, reads), nfaults,
           percentile_us(faults, nfaults, 0.50), percentile_us(faults, nfaults, 0.99), c1.out - c0.out,
           c1.zswap_out - c0.zswap_out, c2.in - c1.in, c3.in - c2.in, zswap_pool_kib, zswapped_kib, zipf_ops, zipf_s,
           zipf_s > 0 ? (double)zipf_ops / zipf_s : 0.0, zipf_majflt);
    if (c1.out == c0.out)
        fprintf(stderr, "swap_peer: warning: nothing was swapped out during the fill; is the memory limit below %" PRIu64
                        " bytes?\n", size);
    free(all);
    free(faults);
    munmap(buf, size);
    return 0;
}
