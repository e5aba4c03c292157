#include "umi_wm.h"

#include <stdlib.h>
#include <string.h>

static inline int key_eq(const void *ctx, uint32_t id, const char *key, size_t len) {
    const umi_wm *wm = (const umi_wm *)ctx;
    return umi_arena_aux(&wm->arena, id) == len &&
           memcmp(umi_arena_data(&wm->arena, id), key, len) == 0;
}

umi_rc umi_wm_init(umi_wm *wm, uint64_t max_bytes, uint64_t max_entries, uint64_t seed) {
    memset(wm, 0, sizeof(*wm));
    umi_arena_init(&wm->arena, max_bytes);
    umi_heap_init(&wm->heap);
    wm->lru_head = wm->lru_tail = UMI_ID_NONE;
    wm->max_entries = max_entries;
    wm->seed = seed;
    return umi_hindex_init(&wm->index, 16);
}

void umi_wm_free(umi_wm *wm) {
    umi_arena_free(&wm->arena);
    umi_hindex_free(&wm->index);
    umi_heap_free(&wm->heap);
    free(wm->meta);
    wm->meta = NULL;
    wm->meta_cap = 0;
    wm->lru_head = wm->lru_tail = UMI_ID_NONE;
}

void umi_wm_clear(umi_wm *wm) {
    umi_heap_clear(&wm->heap);
    umi_hindex_clear(&wm->index);
    umi_arena_clear(&wm->arena);
    wm->lru_head = wm->lru_tail = UMI_ID_NONE;
}

/* --- LRU list --------------------------------------------------------- */

static inline void lru_unlink(umi_wm *wm, uint32_t id) {
    umi_wm_meta *m = wm->meta;
    uint32_t p = m[id].prev, n = m[id].next;
    if (p != UMI_ID_NONE) m[p].next = n;
    else wm->lru_head = n;
    if (n != UMI_ID_NONE) m[n].prev = p;
    else wm->lru_tail = p;
}

static inline void lru_append(umi_wm *wm, uint32_t id) {
    umi_wm_meta *m = wm->meta;
    m[id].prev = wm->lru_tail;
    m[id].next = UMI_ID_NONE;
    if (wm->lru_tail != UMI_ID_NONE) m[wm->lru_tail].next = id;
    else wm->lru_head = id;
    wm->lru_tail = id;
}

static inline void lru_touch(umi_wm *wm, uint32_t id) {
    if (wm->lru_tail == id) return;
    lru_unlink(wm, id);
    lru_append(wm, id);
}

/* --- internals -------------------------------------------------------- */

static void remove_entry(umi_wm *wm, uint32_t id) {
    umi_hindex_remove(&wm->index, wm->meta[id].hash, id);
    umi_heap_remove(&wm->heap, id);
    lru_unlink(wm, id);
    umi_arena_release(&wm->arena, id);
}

size_t umi_wm_expire(umi_wm *wm, double now) {
    size_t n = 0;
    uint32_t id;
    while ((id = umi_heap_peek_expired(&wm->heap, now)) != UMI_ID_NONE) {
        double expires_at = wm->meta[id].expires_at;
        if (expires_at <= now) {
            remove_entry(wm, id);
            n++;
        } else {
            umi_heap_update(&wm->heap, id, expires_at); /* lazily deferred re-key */
        }
    }
    return n;
}

/* Give live entry id the expiry `at` (see the lazy keying note in umi_wm.h). */
static inline void set_expiry(umi_wm *wm, uint32_t id, double at) {
    if (at < umi_heap_time_of(&wm->heap, id)) umi_heap_update(&wm->heap, id, at);
    wm->meta[id].expires_at = at;
}

static inline uint32_t lookup(const umi_wm *wm, const char *key, size_t klen, uint64_t *hash) {
    *hash = umi_hash_bytes(key, klen, wm->seed);
    return umi_hindex_find(&wm->index, *hash, key, klen, key_eq, wm);
}

static umi_rc grow_meta(umi_wm *wm, size_t n) {
    if (n <= wm->meta_cap) return UMI_OK;
    size_t bytes;
    if (umi_mul_size(n, sizeof(umi_wm_meta), &bytes)) return UMI_ERR_NOMEM;
    umi_wm_meta *m = (umi_wm_meta *)realloc(wm->meta, bytes);
    if (!m) return UMI_ERR_NOMEM;
    wm->meta = m;
    wm->meta_cap = n;
    return UMI_OK;
}

/* klen + vlen - limit, saturating when the sum does not fit. */
static uint64_t entry_over(size_t klen, size_t vlen, uint64_t limit) {
    uint64_t sum;
    if (umi_add_u64((uint64_t)klen, (uint64_t)vlen, &sum)) return UINT64_MAX;
    return sum - limit;
}

/* Store after the caller has expired entries and looked the key up.
 * expires_at < 0 means "keep the existing entry's expiry". */
static umi_rc store(umi_wm *wm, const char *key, size_t klen, uint64_t hash, uint32_t id,
                    const char *val, size_t vlen, double expires_at, int keep_expiry,
                    int evict_lru, umi_err_detail *err) {
    umi_arena *a = &wm->arena;
    uint64_t entry;
    if (umi_add_u64((uint64_t)klen, (uint64_t)vlen, &entry) || entry > a->max_bytes) {
        err->over_by = entry_over(klen, vlen, a->max_bytes);
        err->limit = a->max_bytes;
        return UMI_ERR_BYTES_FULL;
    }
    int exists = id != UMI_ID_NONE;
    uint64_t old_bytes = exists ? umi_arena_len(a, id) : 0;
    /* used - old <= max and entry <= max, so this sum cannot wrap (max < 2**63) */
    uint64_t need_bytes = a->used_bytes - old_bytes + entry;
    uint64_t need_count = (uint64_t)a->live - (exists ? 1 : 0) + 1;
    int full = need_bytes > a->max_bytes || need_count > wm->max_entries;
    if (full && !evict_lru) {
        if (need_bytes > a->max_bytes) {
            err->over_by = need_bytes - a->max_bytes;
            err->limit = a->max_bytes;
            return UMI_ERR_BYTES_FULL;
        }
        err->over_by = need_count - wm->max_entries;
        err->limit = wm->max_entries;
        return UMI_ERR_ENTRIES_FULL;
    }

    /* Every allocation happens before the first change, so running out of
     * memory leaves the store as it was. */
    umi_rc rc = umi_arena_reserve(a, !exists, (size_t)entry);
    if (rc != UMI_OK) return rc;
    rc = grow_meta(wm, a->rec_cap);
    if (rc != UMI_OK) return rc;
    rc = umi_heap_reserve(&wm->heap, a->rec_cap, 1);
    if (rc != UMI_OK) return rc;
    if (!exists) {
        rc = umi_hindex_reserve(&wm->index, 1);
        if (rc != UMI_OK) return rc;
    }

    while (need_bytes > a->max_bytes || need_count > wm->max_entries) {
        uint32_t victim = wm->lru_head;
        if (victim == id) victim = wm->meta[victim].next;
        need_bytes -= umi_arena_len(a, victim);
        need_count -= 1;
        remove_entry(wm, victim);
    }

    if (exists) {
        rc = umi_arena_resize(a, id, (size_t)entry, klen, err);
        if (rc != UMI_OK) return rc; /* unreachable: budget and space checked */
        memcpy(umi_arena_data(a, id) + klen, val, vlen);
        if (!keep_expiry) set_expiry(wm, id, expires_at);
        lru_touch(wm, id);
        return UMI_OK;
    }
    uint32_t nid;
    rc = umi_arena_alloc(a, (size_t)entry, (uint32_t)klen, &nid, err);
    if (rc != UMI_OK) return rc; /* unreachable: budget and space checked */
    unsigned char *p = umi_arena_data(a, nid);
    memcpy(p, key, klen);
    memcpy(p + klen, val, vlen);
    wm->meta[nid].hash = hash;
    wm->meta[nid].expires_at = expires_at;
    umi_hindex_insert(&wm->index, hash, nid);
    umi_heap_push(&wm->heap, nid, expires_at);
    lru_append(wm, nid);
    return UMI_OK;
}

/* --- public operations ------------------------------------------------ */

umi_rc umi_wm_set(umi_wm *wm, double now, const char *key, size_t klen, const char *val,
                  size_t vlen, double ttl, int evict_lru, umi_err_detail *err) {
    umi_wm_expire(wm, now);
    uint64_t hash;
    uint32_t id = lookup(wm, key, klen, &hash);
    return store(wm, key, klen, hash, id, val, vlen, now + ttl, 0, evict_lru, err);
}

umi_rc umi_wm_get(umi_wm *wm, double now, const char *key, size_t klen, const char **val,
                  size_t *vlen) {
    umi_wm_expire(wm, now);
    uint64_t hash;
    uint32_t id = lookup(wm, key, klen, &hash);
    if (id == UMI_ID_NONE) return UMI_ERR_NOT_FOUND;
    lru_touch(wm, id);
    *val = (const char *)umi_arena_data(&wm->arena, id) + klen;
    *vlen = umi_arena_len(&wm->arena, id) - klen;
    return UMI_OK;
}

int umi_wm_delete(umi_wm *wm, double now, const char *key, size_t klen) {
    umi_wm_expire(wm, now);
    uint64_t hash;
    uint32_t id = lookup(wm, key, klen, &hash);
    if (id == UMI_ID_NONE) return 0;
    remove_entry(wm, id);
    return 1;
}

int umi_wm_contains(umi_wm *wm, double now, const char *key, size_t klen) {
    umi_wm_expire(wm, now);
    uint64_t hash;
    return lookup(wm, key, klen, &hash) != UMI_ID_NONE;
}

umi_rc umi_wm_ttl(umi_wm *wm, double now, const char *key, size_t klen, double *left) {
    umi_wm_expire(wm, now);
    uint64_t hash;
    uint32_t id = lookup(wm, key, klen, &hash);
    if (id == UMI_ID_NONE) return UMI_ERR_NOT_FOUND;
    *left = wm->meta[id].expires_at - now;
    return UMI_OK;
}

umi_rc umi_wm_touch(umi_wm *wm, double now, const char *key, size_t klen, double ttl) {
    umi_wm_expire(wm, now);
    uint64_t hash;
    uint32_t id = lookup(wm, key, klen, &hash);
    if (id == UMI_ID_NONE) return UMI_ERR_NOT_FOUND;
    set_expiry(wm, id, now + ttl);
    lru_touch(wm, id);
    return UMI_OK;
}

int umi_parse_int64(const char *s, size_t n, int64_t *out) {
    size_t i = 0;
    int neg = 0;
    if (n > 0 && s[0] == '-') {
        neg = 1;
        i = 1;
    }
    if (i == n) return 0;
    /* Accumulate negatively so INT64_MIN parses. */
    int64_t acc = 0;
    for (; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < '0' || c > '9') return 0;
        int d = c - '0';
        if (acc < (INT64_MIN + d) / 10) return 0;
        acc = acc * 10 - d;
    }
    if (!neg) {
        if (acc == INT64_MIN) return 0;
        acc = -acc;
    }
    *out = acc;
    return 1;
}

static size_t format_int64(int64_t v, char *buf /* >= 21 bytes */) {
    char tmp[21];
    size_t n = 0;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        tmp[n++] = (char)('0' + (u % 10));
        u /= 10;
    } while (u);
    size_t o = 0;
    if (v < 0) buf[o++] = '-';
    while (n) buf[o++] = tmp[--n];
    return o;
}

umi_rc umi_wm_incr(umi_wm *wm, double now, const char *key, size_t klen, int64_t delta,
                   double ttl_if_new, int evict_lru, int64_t *out, umi_err_detail *err) {
    umi_wm_expire(wm, now);
    uint64_t hash;
    uint32_t id = lookup(wm, key, klen, &hash);
    int64_t cur = 0;
    if (id != UMI_ID_NONE) {
        const char *v = (const char *)umi_arena_data(&wm->arena, id) + klen;
        size_t vlen = umi_arena_len(&wm->arena, id) - klen;
        if (!umi_parse_int64(v, vlen, &cur)) return UMI_ERR_NOT_INTEGER;
    }
    if ((delta > 0 && cur > INT64_MAX - delta) || (delta < 0 && cur < INT64_MIN - delta))
        return UMI_ERR_OVERFLOW;
    int64_t result = cur + delta;
    char buf[24];
    size_t n = format_int64(result, buf);
    umi_rc rc = store(wm, key, klen, hash, id, buf, n, now + ttl_if_new, id != UMI_ID_NONE,
                      evict_lru, err);
    if (rc == UMI_OK) *out = result;
    return rc;
}
