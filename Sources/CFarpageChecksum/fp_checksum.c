/* fp_checksum.c — XXH3 inlined from the distribution's header: no library to link. */
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "fp_checksum.h"

uint64_t fp_checksum(const void *data, size_t len) { return XXH3_64bits(data, len); }

void fp_checksum_pages(const void *data, size_t page_size, size_t count, uint64_t *out) {
    const unsigned char *p = data;
    for (size_t i = 0; i < count; i++) out[i] = XXH3_64bits(p + i * page_size, page_size);
}
