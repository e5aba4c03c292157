#include "umi_hash.h"

#include <stdlib.h>
#include <string.h>

#define UMI_HINDEX_MIN_CAP 16u

static inline uint64_t load64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint64_t mix64(uint64_t x) {
    /* splitmix64 finaliser: full avalanche. */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

uint64_t umi_hash_bytes(const void *data, size_t len, uint64_t seed) {
    const unsigned char *p = (const unsigned char *)data;
    const uint64_t k = 0x9e3779b97f4a7c15ULL;
    uint64_t h = seed ^ ((uint64_t)len * k);
    while (len >= 8) {
        h = (h ^ mix64(load64(p))) * k;
        h ^= h >> 29;
        p += 8;
        len -= 8;
    }
    if (len) {
        uint64_t tail = 0;
        memcpy(&tail, p, len);
        h = (h ^ mix64(tail ^ ((uint64_t)len << 56))) * k;
    }
    return mix64(h);
}

static umi_rc alloc_slots(size_t cap, umi_hslot **out) {
    size_t bytes;
    if (umi_mul_size(cap, sizeof(umi_hslot), &bytes)) return UMI_ERR_NOMEM;
    umi_hslot *s = (umi_hslot *)malloc(bytes);
    if (!s) return UMI_ERR_NOMEM;
    for (size_t i = 0; i < cap; i++) {
        s[i].tag = 0;
        s[i].id = UMI_ID_NONE;
    }
    *out = s;
    return UMI_OK;
}

umi_rc umi_hindex_init(umi_hindex *ix, size_t expected) {
    size_t cap = UMI_HINDEX_MIN_CAP;
    while (cap < expected * 2 && cap < ((size_t)1 << 31)) cap <<= 1;
    ix->slots = NULL;
    ix->count = 0;
    ix->mask = 0;
    umi_rc rc = alloc_slots(cap, &ix->slots);
    if (rc != UMI_OK) return rc;
    ix->mask = cap - 1;
    return UMI_OK;
}

void umi_hindex_free(umi_hindex *ix) {
    free(ix->slots);
    ix->slots = NULL;
    ix->count = 0;
    ix->mask = 0;
}

void umi_hindex_clear(umi_hindex *ix) {
    for (size_t i = 0; i <= ix->mask; i++) ix->slots[i].id = UMI_ID_NONE;
    ix->count = 0;
}

static void place(umi_hslot *slots, size_t mask, uint32_t tag, uint32_t id) {
    size_t i = (size_t)tag & mask;
    while (slots[i].id != UMI_ID_NONE) i = (i + 1) & mask;
    slots[i].tag = tag;
    slots[i].id = id;
}

umi_rc umi_hindex_reserve(umi_hindex *ix, size_t extra) {
    /* Keep the load factor at or below 1/2: short probe runs. */
    size_t need, twice;
    if (umi_add_size(ix->count, extra, &need) || umi_mul_size(need, 2, &twice)) return UMI_ERR_NOMEM;
    size_t cap = ix->mask + 1;
    if (twice <= cap) return UMI_OK;
    size_t new_cap = cap;
    while (twice > new_cap) {
        if (new_cap > ((size_t)1 << 31)) return UMI_ERR_NOMEM; /* homes come from 32 bits */
        new_cap <<= 1;
    }
    umi_hslot *ns;
    umi_rc rc = alloc_slots(new_cap, &ns);
    if (rc != UMI_OK) return rc;
    for (size_t i = 0; i < cap; i++) {
        if (ix->slots[i].id != UMI_ID_NONE) place(ns, new_cap - 1, ix->slots[i].tag, ix->slots[i].id);
    }
    free(ix->slots);
    ix->slots = ns;
    ix->mask = new_cap - 1;
    return UMI_OK;
}

void umi_hindex_insert(umi_hindex *ix, uint64_t hash, uint32_t id) {
    place(ix->slots, ix->mask, umi_hash_tag(hash), id);
    ix->count++;
}

int umi_hindex_remove(umi_hindex *ix, uint64_t hash, uint32_t id) {
    size_t mask = ix->mask;
    size_t i = (size_t)umi_hash_tag(hash) & mask;
    for (;;) {
        if (ix->slots[i].id == UMI_ID_NONE) return 0;
        if (ix->slots[i].id == id) break;
        i = (i + 1) & mask;
    }
    /* Backward-shift: pull later members of the run into the hole when the
     * hole lies on the path from their home slot to where they sit. */
    size_t hole = i;
    size_t j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (ix->slots[j].id == UMI_ID_NONE) break;
        size_t home = (size_t)ix->slots[j].tag & mask;
        int movable = (hole <= j) ? (home <= hole || home > j) : (home <= hole && home > j);
        if (movable) {
            ix->slots[hole] = ix->slots[j];
            hole = j;
        }
    }
    ix->slots[hole].id = UMI_ID_NONE;
    ix->count--;
    return 1;
}
