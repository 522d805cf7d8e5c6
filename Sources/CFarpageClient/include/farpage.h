/*
 * farpage.h — the Farpage client API (libfarpage.so).
 *
 * A region returned by farpage_alloc() is ordinary read/write memory whose
 * pages the local farpaged agent may move to far tiers (other hosts' DRAM,
 * NVMe) and bring back on touch. Every byte written is preserved; a page whose
 * only copy is lost raises SIGBUS on access, never silent zeros.
 *
 * Thread safety: every function may be called from any thread.
 * Errors: functions set errno and keep a per-thread human-readable message
 * that farpage_last_error() returns.
 *
 * Environment:
 *   FARPAGE_SOCKET  path of the agent's socket (default /run/farpage/agent.sock)
 */
#ifndef FARPAGE_H
#define FARPAGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FARPAGE_API_VERSION 1
#define FARPAGE_DEFAULT_SOCKET "/run/farpage/agent.sock"

/* farpage_advise() hints. */
#define FARPAGE_ADVISE_NORMAL 0     /* forget earlier hints for the range */
#define FARPAGE_ADVISE_SEQUENTIAL 1 /* expect ascending access: fetch ahead of faults */
#define FARPAGE_ADVISE_WILLNEED 2   /* bring the range resident now (within the budget) */
#define FARPAGE_ADVISE_DONTNEED 3   /* drop the contents: the range reads as zeros after */
#define FARPAGE_ADVISE_RANDOM 4     /* no fetch-ahead for the range */
#define FARPAGE_ADVISE_STREAM 6     /* the range is read next, in order (e.g. the next layer):
                                       fetch it in the background now; returns at once */

/* Options for farpage_alloc_ex(). Zero-initialise, then set what you need. */
struct farpage_options {
    size_t struct_size;        /* sizeof(struct farpage_options) */
    uint64_t resident_budget;  /* bytes of the region kept in local DRAM; 0 = agent default */
    const char *name;          /* shown by `farpagectl regions` (up to 23 bytes kept) */
    unsigned flags;            /* reserved, must be 0 */
};

/* Counters for one region, or for the whole agent (farpage_stats(NULL, ...)). */
struct farpage_stats {
    uint64_t size_bytes;          /* region size (agent: sum over regions) */
    uint64_t page_size;
    uint64_t resident_pages;      /* pages in local DRAM now */
    uint64_t far_pages;           /* pages held only by a far tier */
    uint64_t budget_pages;        /* resident budget in pages */
    uint64_t missing_faults;      /* missing-page faults served */
    uint64_t zero_fills;          /* faults on never-written pages (served as zeros) */
    uint64_t fetches;             /* pages read back from a far tier */
    uint64_t wp_faults;           /* write-protect faults (first write after fetch, or racing eviction) */
    uint64_t evictions;           /* pages evicted (all kinds) */
    uint64_t writebacks;          /* evictions that wrote the page to a far tier */
    uint64_t clean_evictions;     /* evictions of unmodified pages: no write needed */
    uint64_t zero_evictions;      /* evictions of all-zero pages: nothing stored */
    uint64_t cancelled_evictions; /* evictions cancelled by a racing write */
    uint64_t prefetched_pages;    /* pages installed ahead of a fault */
    uint64_t regions;             /* agent: number of regions; region: 1 */
};

/* Allocate `size` bytes of far memory (rounded up to the page size), zero-filled.
 * flags must be 0. Returns NULL with errno set on failure:
 *   ECONNREFUSED  the agent is not running or its socket is missing (see FARPAGE_SOCKET)
 *   EACCES        no permission on the agent's socket
 *   EPERM/ENOSYS  userfaultfd is not available to this process (see farpage_last_error())
 *   ENOMEM        the agent refused: over its region or capacity limits
 *   EINVAL        bad size or flags */
void *farpage_alloc(size_t size, int flags);
/* As farpage_alloc() with options (resident budget, name). */
void *farpage_alloc_ex(size_t size, const struct farpage_options *options);
/* Release a region returned by farpage_alloc(): its local and far pages are freed.
 * Returns 0, or -1 with errno EINVAL when addr is not the start of a region. */
int farpage_free(void *addr);
/* Give the agent a hint about [addr, addr+len), which must lie in one region.
 * Returns 0 or -1 with errno set. */
int farpage_advise(void *addr, size_t len, int hint);
/* Fill *out with the counters of the region containing addr, or of the whole
 * agent when addr is NULL. Returns 0 or -1 with errno set. */
int farpage_stats(const void *addr, struct farpage_stats *out);
/* The last error of this thread, as a sentence that says how to fix it. */
const char *farpage_last_error(void);

#ifdef __cplusplus
}
#endif
#endif
