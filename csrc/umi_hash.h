/* Open-addressing hash index: byte-string key -> uint32 id.
 *
 * The index does not own key bytes (they live in an arena that may move them);
 * a slot holds 32 bits of the key's hash and the id (8 bytes, so the table
 * stays small enough to sit in cache), and the caller compares a candidate
 * id's key through a callback. The slot's home is those 32 hash bits modulo the
 * table size. Linear probing with backward-shift deletion, so there are no
 * tombstones and lookups never degrade after churn.
 */
#ifndef UMI_HASH_H
#define UMI_HASH_H

#include "umi_status.h"

typedef struct umi_hslot {
    uint32_t tag; /* the high 32 bits of the key's 64-bit hash */
    uint32_t id;  /* UMI_ID_NONE when the slot is empty */
} umi_hslot;

static inline uint32_t umi_hash_tag(uint64_t hash) { return (uint32_t)(hash >> 32); }

/* Returns nonzero when id's key equals key[0:len]. */
typedef int (*umi_key_eq_fn)(const void *ctx, uint32_t id, const char *key, size_t len);

typedef struct umi_hindex {
    umi_hslot *slots;
    size_t mask;  /* capacity - 1; capacity is a power of two */
    size_t count;
} umi_hindex;

uint64_t umi_hash_bytes(const void *data, size_t len, uint64_t seed);

umi_rc umi_hindex_init(umi_hindex *ix, size_t expected);
void umi_hindex_free(umi_hindex *ix);
void umi_hindex_clear(umi_hindex *ix);

/* Make room so that `extra` more inserts cannot fail. */
umi_rc umi_hindex_reserve(umi_hindex *ix, size_t extra);

/* Inline so that callers passing a static eq function get it inlined too. */
static inline uint32_t umi_hindex_find(const umi_hindex *ix, uint64_t hash, const char *key,
                                       size_t len, umi_key_eq_fn eq, const void *ctx) {
    uint32_t tag = umi_hash_tag(hash);
    size_t i = (size_t)tag & ix->mask;
    for (;;) {
        const umi_hslot *s = &ix->slots[i];
        if (s->id == UMI_ID_NONE) return UMI_ID_NONE;
        if (s->tag == tag && eq(ctx, s->id, key, len)) return s->id;
        i = (i + 1) & ix->mask;
    }
}

/* The key must not be present and room must have been reserved. */
void umi_hindex_insert(umi_hindex *ix, uint64_t hash, uint32_t id);

/* Remove the entry (hash, id); returns 1 if it was there. */
int umi_hindex_remove(umi_hindex *ix, uint64_t hash, uint32_t id);

#endif
