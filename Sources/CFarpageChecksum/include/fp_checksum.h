/* fp_checksum.h — page checksums (XXH3-64 from Debian's libxxhash-dev, inlined). */
#ifndef FP_CHECKSUM_H
#define FP_CHECKSUM_H
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif
/* XXH3-64 of len bytes. Detects corruption; it is not a MAC (authentication is HMAC). */
uint64_t fp_checksum(const void *data, size_t len);
/* Checksums of count consecutive pages of page_size bytes into out[count]. */
void fp_checksum_pages(const void *data, size_t page_size, size_t count, uint64_t *out);
#ifdef __cplusplus
}
#endif
#endif
