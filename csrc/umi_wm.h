/* Working memory: a byte- and count-budgeted key/value store with per-entry
 * expiry and least-recently-used order.
 *
 * Every operation takes the current time `now` (seconds, any epoch) from its
 * caller, reads it once, and first drops every entry whose expiry is <= now.
 * So between operations the store holds only entries that were live at the
 * last operation, and an expired value can never be returned.
 *
 * Storage: one arena record per entry (key bytes then value bytes; aux = key
 * length), a hash index over keys, an indexed min-heap of expiry times and a
 * doubly-linked LRU list, all indexed by the arena's record id.
 *
 * The heap is keyed lazily: an entry's true expiry lives in its meta record,
 * and its heap node holds a time at or before it. Moving an expiry later (the
 * common case: a set or touch restarts a TTL) only writes the meta record;
 * the node is re-keyed when it reaches the top of the heap. Moving it earlier
 * updates the node at once. So the heap top is never later than any entry's
 * expiry, and finding what has expired stays O(log n) per entry, while
 * replacing a value costs O(1) instead of a sift to the bottom.
 */
#ifndef UMI_WM_H
#define UMI_WM_H

#include "umi_arena.h"
#include "umi_hash.h"
#include "umi_heap.h"

typedef struct umi_wm_meta {
    uint64_t hash;      /* hash of the key */
    double expires_at;  /* the entry's expiry (its heap node may hold an earlier time) */
    uint32_t prev;      /* LRU links; umi_wm.lru_head is the least recently used */
    uint32_t next;
} umi_wm_meta;

typedef struct umi_wm {
    umi_arena arena;
    umi_hindex index;
    umi_heap heap;
    umi_wm_meta *meta; /* meta[id], one cache line holds all of it */
    size_t meta_cap;
    uint32_t lru_head;
    uint32_t lru_tail;
    uint64_t max_entries;
    uint64_t seed;
} umi_wm;

umi_rc umi_wm_init(umi_wm *wm, uint64_t max_bytes, uint64_t max_entries, uint64_t seed);
void umi_wm_free(umi_wm *wm);
void umi_wm_clear(umi_wm *wm);

/* Drop every entry with expiry <= now; returns how many. */
size_t umi_wm_expire(umi_wm *wm, double now);

/* Store key -> value with expiry now + ttl. An existing key's value is
 * replaced and its expiry restarted. When the entry does not fit the budgets:
 * evict_lru == 0 refuses with UMI_ERR_BYTES_FULL / UMI_ERR_ENTRIES_FULL
 * (detail filled, nothing changed); otherwise least-recently-used entries are
 * evicted until it fits. An entry larger than max_bytes on its own is refused
 * in both modes. */
umi_rc umi_wm_set(umi_wm *wm, double now, const char *key, size_t klen, const char *val,
                  size_t vlen, double ttl, int evict_lru, umi_err_detail *err);

/* Value of a live key (marks it used). *val stays valid until the next call
 * that changes the store. */
umi_rc umi_wm_get(umi_wm *wm, double now, const char *key, size_t klen, const char **val,
                  size_t *vlen);

int umi_wm_delete(umi_wm *wm, double now, const char *key, size_t klen);
int umi_wm_contains(umi_wm *wm, double now, const char *key, size_t klen);
umi_rc umi_wm_ttl(umi_wm *wm, double now, const char *key, size_t klen, double *left);
umi_rc umi_wm_touch(umi_wm *wm, double now, const char *key, size_t klen, double ttl);

/* Add delta to an ASCII-decimal int64 value. A missing key counts from 0 and
 * is created with expiry now + ttl_if_new; an existing key keeps its expiry. */
umi_rc umi_wm_incr(umi_wm *wm, double now, const char *key, size_t klen, int64_t delta,
                   double ttl_if_new, int evict_lru, int64_t *out, umi_err_detail *err);

/* Walk live entries from least to most recently used (after umi_wm_expire). */
static inline uint32_t umi_wm_first(const umi_wm *wm) { return wm->lru_head; }
static inline uint32_t umi_wm_next(const umi_wm *wm, uint32_t id) { return wm->meta[id].next; }
static inline const char *umi_wm_key(const umi_wm *wm, uint32_t id, size_t *klen) {
    *klen = umi_arena_aux(&wm->arena, id);
    return (const char *)umi_arena_data(&wm->arena, id);
}
static inline size_t umi_wm_len(const umi_wm *wm) { return wm->arena.live; }
static inline uint64_t umi_wm_used_bytes(const umi_wm *wm) { return wm->arena.used_bytes; }

/* Parse an ASCII decimal int64 ("-12", "7"); returns 0 when it is not one. */
int umi_parse_int64(const char *s, size_t n, int64_t *out);

#endif
