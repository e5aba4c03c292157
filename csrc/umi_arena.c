#include "umi_arena.h"

#include <stdlib.h>
#include <string.h>

#define DEAD_ID UMI_ID_NONE
#define MIN_BUF 4096u
#define MAX_RECORD ((size_t)UINT32_MAX - UMI_ARENA_HEADER_BYTES)

static inline void write_header(unsigned char *p, uint32_t id, uint32_t phys) {
    memcpy(p, &id, 4);
    memcpy(p + 4, &phys, 4);
}

static inline uint32_t header_phys(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p + 4, 4);
    return v;
}

static inline uint32_t header_id(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

umi_rc umi_arena_init(umi_arena *a, uint64_t max_bytes) {
    memset(a, 0, sizeof(*a));
    a->max_bytes = max_bytes;
    return UMI_OK;
}

void umi_arena_free(umi_arena *a) {
    free(a->buf);
    free(a->recs);
    free(a->free_ids);
    uint64_t max_bytes = a->max_bytes;
    memset(a, 0, sizeof(*a));
    a->max_bytes = max_bytes;
}

void umi_arena_clear(umi_arena *a) { umi_arena_free(a); }

/* Slide live records down over the dead ones, fixing their offsets. */
static void compact(umi_arena *a) {
    size_t read = 0, write = 0;
    while (read < a->tail) {
        unsigned char *p = a->buf + read;
        uint32_t phys = header_phys(p);
        size_t step = UMI_ARENA_HEADER_BYTES + phys;
        uint32_t id = header_id(p);
        if (id != DEAD_ID) {
            if (write != read) memmove(a->buf + write, p, step);
            a->recs[id].off = write;
            write += step;
        }
        read += step;
    }
    a->tail = write;
    a->garbage = 0;
}

static umi_rc ensure_ids(umi_arena *a) {
    if (a->n_free > 0 || a->next_id < a->rec_cap) return UMI_OK;
    if (a->rec_cap >= UMI_ID_NONE / 2) return UMI_ERR_NOMEM;
    uint32_t nc = a->rec_cap ? a->rec_cap * 2 : 16;
    size_t rec_bytes, id_bytes;
    if (umi_mul_size(nc, sizeof(umi_rec), &rec_bytes) || umi_mul_size(nc, sizeof(uint32_t), &id_bytes))
        return UMI_ERR_NOMEM;
    umi_rec *nr = (umi_rec *)realloc(a->recs, rec_bytes);
    if (!nr) return UMI_ERR_NOMEM;
    a->recs = nr;
    uint32_t *nf = (uint32_t *)realloc(a->free_ids, id_bytes);
    if (!nf) return UMI_ERR_NOMEM; /* recs grew; harmless */
    a->free_ids = nf;
    a->rec_cap = nc;
    return UMI_OK;
}

static umi_rc ensure_space(umi_arena *a, size_t len) {
    size_t step, need;
    if (umi_add_size(UMI_ARENA_HEADER_BYTES, len, &step) || umi_add_size(a->tail, step, &need))
        return UMI_ERR_NOMEM;
    if (need <= a->buf_cap) return UMI_OK;
    /* Compact when dead space is a real share of the buffer: each compaction
     * then frees at least a quarter of it, which keeps the cost amortised O(1)
     * per byte written. */
    if (a->garbage >= step && a->garbage * 4 >= a->buf_cap) {
        compact(a);
        need = a->tail + step; /* compaction only shrinks tail */
        if (need <= a->buf_cap) return UMI_OK;
    }
    size_t nc = a->buf_cap ? a->buf_cap : MIN_BUF;
    while (nc < need) {
        if (nc > ((size_t)-1) / 2) return UMI_ERR_NOMEM;
        nc *= 2;
    }
    unsigned char *nb = (unsigned char *)realloc(a->buf, nc);
    if (!nb) return UMI_ERR_NOMEM;
    a->buf = nb;
    a->buf_cap = nc;
    return UMI_OK;
}

umi_rc umi_arena_reserve(umi_arena *a, int new_id, size_t len) {
    if (len > MAX_RECORD) return UMI_ERR_INVALID;
    if (new_id) {
        umi_rc rc = ensure_ids(a);
        if (rc != UMI_OK) return rc;
    }
    return ensure_space(a, len);
}

uint32_t umi_arena_next_id(const umi_arena *a) {
    return a->n_free > 0 ? a->free_ids[a->n_free - 1] : a->next_id;
}

static umi_rc over_budget(const umi_arena *a, uint64_t credit, size_t len, umi_err_detail *err) {
    uint64_t base = a->used_bytes - credit; /* credit is a live record's length: <= used */
    uint64_t after;
    if (!umi_add_u64(base, (uint64_t)len, &after) && after <= a->max_bytes) return UMI_OK;
    if (err) {
        /* base <= max_bytes always, so the excess is len - room, exact even on a wrap */
        err->over_by = (uint64_t)len - (a->max_bytes - base);
        err->limit = a->max_bytes;
    }
    return UMI_ERR_BYTES_FULL;
}

umi_rc umi_arena_alloc(umi_arena *a, size_t len, uint32_t aux, uint32_t *out_id,
                       umi_err_detail *err) {
    umi_rc rc = over_budget(a, 0, len, err);
    if (rc != UMI_OK) return rc;
    rc = umi_arena_reserve(a, 1, len);
    if (rc != UMI_OK) return rc;
    uint32_t id = a->n_free > 0 ? a->free_ids[--a->n_free] : a->next_id++;
    size_t off = a->tail;
    write_header(a->buf + off, id, (uint32_t)len);
    a->tail += UMI_ARENA_HEADER_BYTES + len;
    a->recs[id].off = off;
    a->recs[id].len = (uint32_t)len;
    a->recs[id].aux = aux;
    a->used_bytes += len;
    a->live++;
    *out_id = id;
    return UMI_OK;
}

umi_rc umi_arena_resize(umi_arena *a, uint32_t id, size_t new_len, size_t keep_prefix,
                        umi_err_detail *err) {
    uint32_t old_len = a->recs[id].len;
    umi_rc rc = over_budget(a, old_len, new_len, err);
    if (rc != UMI_OK) return rc;
    if (new_len > MAX_RECORD) return UMI_ERR_INVALID;
    uint32_t phys = header_phys(a->buf + a->recs[id].off);
    /* In place when it fits and wastes at most half the slot, which bounds
     * the physical size by twice the logical one. */
    if (new_len <= phys && new_len * 2 >= phys) {
        a->recs[id].len = (uint32_t)new_len;
        a->used_bytes = a->used_bytes - old_len + new_len;
        return UMI_OK;
    }
    rc = ensure_space(a, new_len); /* may compact: re-read offsets after */
    if (rc != UMI_OK) return rc;
    size_t old_off = a->recs[id].off;
    size_t new_off = a->tail;
    if (keep_prefix > old_len) keep_prefix = old_len;
    if (keep_prefix > new_len) keep_prefix = new_len;
    write_header(a->buf + new_off, id, (uint32_t)new_len);
    memcpy(a->buf + new_off + UMI_ARENA_HEADER_BYTES, a->buf + old_off + UMI_ARENA_HEADER_BYTES,
           keep_prefix);
    a->tail += UMI_ARENA_HEADER_BYTES + new_len;
    write_header(a->buf + old_off, DEAD_ID, phys);
    a->garbage += UMI_ARENA_HEADER_BYTES + phys;
    a->recs[id].off = new_off;
    a->recs[id].len = (uint32_t)new_len;
    a->used_bytes = a->used_bytes - old_len + new_len;
    return UMI_OK;
}

void umi_arena_release(umi_arena *a, uint32_t id) {
    unsigned char *p = a->buf + a->recs[id].off;
    uint32_t phys = header_phys(p);
    write_header(p, DEAD_ID, phys);
    a->garbage += UMI_ARENA_HEADER_BYTES + phys;
    a->used_bytes -= a->recs[id].len;
    a->free_ids[a->n_free++] = id;
    a->live--;
    if (a->live == 0) {
        /* Nothing left: start writing from the front again. */
        a->tail = 0;
        a->garbage = 0;
    }
}
