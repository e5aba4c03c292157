/* Return codes shared by every csrc/ function. Nothing in csrc/ aborts or
 * prints: a function either succeeds (UMI_OK) or returns one of these and
 * leaves the structure it was given exactly as it was. */
#ifndef UMI_STATUS_H
#define UMI_STATUS_H

#include <stddef.h>
#include <stdint.h>

typedef enum umi_rc {
    UMI_OK = 0,
    UMI_ERR_NOMEM = 1,         /* malloc/realloc failed */
    UMI_ERR_NOT_FOUND = 2,     /* no such key / label (or it has expired) */
    UMI_ERR_BYTES_FULL = 3,    /* the byte budget would be exceeded */
    UMI_ERR_ENTRIES_FULL = 4,  /* the entry cap would be exceeded */
    UMI_ERR_TOKENS_FULL = 5,   /* the token budget would be exceeded */
    UMI_ERR_NOT_INTEGER = 6,   /* incr on a value that is not an ASCII decimal int64 */
    UMI_ERR_OVERFLOW = 7,      /* incr result outside int64 */
    UMI_ERR_INVALID = 8        /* an argument outside what the C layer accepts */
} umi_rc;

/* Filled in by a function that refuses a write for lack of room, so the
 * caller can say by how much and against which limit. */
typedef struct umi_err_detail {
    uint64_t over_by;
    uint64_t limit;
} umi_err_detail;

/* Checked arithmetic for every size and budget computation in csrc/: each
 * returns nonzero (and leaves *out unset) when the exact result does not fit,
 * so no sum of a caller's numbers can wrap around a limit check. */
static inline int umi_add_u64(uint64_t a, uint64_t b, uint64_t *out) {
    if (b > UINT64_MAX - a) return 1;
    *out = a + b;
    return 0;
}
static inline int umi_add_size(size_t a, size_t b, size_t *out) {
    if (b > SIZE_MAX - a) return 1;
    *out = a + b;
    return 0;
}
static inline int umi_mul_size(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return 1;
    *out = a * b;
    return 0;
}

/* Sentinel for "no id". Ids are dense small integers below this. */
#define UMI_ID_NONE ((uint32_t)0xFFFFFFFFu)

#endif
