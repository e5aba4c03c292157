/* A byte-budgeted arena of variable-length records addressed by stable ids.
 *
 * Records live back to back in one growable buffer, each behind an 8-byte
 * header (owner id, physical size) so the buffer can be walked and compacted
 * in place. Ids are dense and reused LIFO, so callers can keep per-record
 * metadata in plain arrays indexed by id.
 *
 * The budget (`max_bytes`) is charged with the logical record lengths only,
 * never with headers or slack: it is the number a user reasons about.
 *
 * Pointers returned by umi_arena_data() are valid until the next call that
 * may move records: umi_arena_reserve / _alloc / _resize.
 */
#ifndef UMI_ARENA_H
#define UMI_ARENA_H

#include "umi_status.h"

typedef struct umi_rec {
    size_t off;    /* offset of the header in buf */
    uint32_t len;  /* logical length (what the budget is charged) */
    uint32_t aux;  /* caller's small per-record integer (e.g. key length) */
} umi_rec;

typedef struct umi_arena {
    unsigned char *buf;
    size_t buf_cap;
    size_t tail;     /* first free byte */
    size_t garbage;  /* physical bytes held by released records */
    umi_rec *recs;
    uint32_t *free_ids;
    uint32_t n_free;
    uint32_t next_id;  /* ids below this have been handed out at least once */
    uint32_t rec_cap;
    uint32_t live;
    uint64_t used_bytes;
    uint64_t max_bytes;
} umi_arena;

#define UMI_ARENA_HEADER_BYTES 8u

umi_rc umi_arena_init(umi_arena *a, uint64_t max_bytes);
void umi_arena_free(umi_arena *a);
/* Drop every record and give the memory back. */
void umi_arena_clear(umi_arena *a);

/* Ensure that allocating one record of `len` bytes (when new_id is nonzero)
 * or growing an existing record to `len` bytes cannot fail for lack of
 * memory, and that rec_cap covers the id the next alloc will return. Does not
 * look at the budget. May move records. */
umi_rc umi_arena_reserve(umi_arena *a, int new_id, size_t len);

/* The id the next umi_arena_alloc will return (needs a prior reserve). */
uint32_t umi_arena_next_id(const umi_arena *a);

/* New record of len bytes (contents unset). Refuses with UMI_ERR_BYTES_FULL
 * (detail filled) when the budget would be exceeded. */
umi_rc umi_arena_alloc(umi_arena *a, size_t len, uint32_t aux, uint32_t *out_id,
                       umi_err_detail *err);

/* Change record id to new_len bytes keeping its first keep_prefix bytes.
 * Same budget rule as alloc (the old length is credited first). */
umi_rc umi_arena_resize(umi_arena *a, uint32_t id, size_t new_len, size_t keep_prefix,
                        umi_err_detail *err);

void umi_arena_release(umi_arena *a, uint32_t id);

static inline unsigned char *umi_arena_data(const umi_arena *a, uint32_t id) {
    return a->buf + a->recs[id].off + UMI_ARENA_HEADER_BYTES;
}
static inline uint32_t umi_arena_len(const umi_arena *a, uint32_t id) { return a->recs[id].len; }
static inline uint32_t umi_arena_aux(const umi_arena *a, uint32_t id) { return a->recs[id].aux; }

#endif
