/* farpage_internal.h — what the LD_PRELOAD shim (Shim/farpage_preload.c) uses of the
 * client library. Not installed; hidden symbols of libfarpage.so. */
#ifndef FARPAGE_INTERNAL_H
#define FARPAGE_INTERNAL_H
#include <stddef.h>
#include <stdint.h>

/* Where a region came from: the C API, the shim's malloc family, or the shim's mmap. */
#define FP_ORIGIN_API 0
#define FP_ORIGIN_MALLOC 1
#define FP_ORIGIN_MMAP 2

#define FP_HIDDEN __attribute__((visibility("hidden")))

/* ADVISE hint the library sends after unmapping part of a region: the pages are dropped and
 * the agent never installs there again (not part of farpage.h: only the library knows when
 * a range is really unmapped). */
#define FP_ADVISE_GONE 5

/* Creates a region of `size` bytes (rounded up to pages) at an address aligned to `align`
 * (0 or a power of two; the page size at least). NULL with errno and farpage_last_error()
 * set on failure. */
FP_HIDDEN void *fp_region_create(size_t size, size_t align, const char *name, int origin);

/* Whether `addr` may start a region: a lock-free filter with false positives only. */
FP_HIDDEN int fp_region_maybe(const void *addr);

/* When `addr` is the start of a live region: 1, with its length and origin. Else 0. */
FP_HIDDEN int fp_region_lookup(const void *addr, size_t *length, int *origin);

/* Whether any region overlaps [addr, addr+len). */
FP_HIDDEN int fp_region_overlaps(const void *addr, size_t len);

/* munmap() of a range that overlaps regions: regions inside it are released, parts of
 * regions are unmapped and their far copies dropped. `real_munmap` unmaps. Returns
 * munmap's result. */
FP_HIDDEN int fp_region_unmap(void *addr, size_t len, int (*real_munmap)(void *, size_t));

/* madvise(MADV_DONTNEED/MADV_FREE/MADV_REMOVE) over a range that overlaps regions: their
 * pages read as zeros after; the parts of the range outside regions go to `real_madvise`.
 * Returns 0 or -1 with errno set. */
FP_HIDDEN int fp_region_discard(void *addr, size_t len, int advice, int (*real_madvise)(void *, size_t, int));

/* A region shrinks to `keep` bytes in place: the pages after it are dropped. */
FP_HIDDEN void fp_region_shrink(void *addr, size_t keep);

/* Prints `message` on stderr once per `key` (a small integer below 32) for the process. */
FP_HIDDEN void fp_warn_once(int key, const char *message);

#endif
