/* Core memory: labelled blocks of UTF-8 text under a byte budget (and an
 * optional token budget), rendered deterministically as XML or Markdown.
 *
 * Block contents live in an arena whose budget is the core's max_bytes; a
 * block's id is its arena record id. Render order: the known labels (system,
 * persona, human, facts, goals, scratch) in that order, then the rest in
 * insertion order. A rendering is a head, one fragment per block and a tail;
 * each block carries a generation stamp that changes whenever the block does,
 * so a caller can keep rendered fragments and rebuild only the changed ones.
 */
#ifndef UMI_CORE_H
#define UMI_CORE_H

#include "umi_arena.h"
#include "umi_hash.h"

#define UMI_CORE_LABEL_BYTES_MAX 64
#define UMI_CORE_N_KNOWN 6
#define UMI_CORE_IMPORTANCE_CHARS 8

typedef enum umi_core_format { UMI_CORE_XML = 0, UMI_CORE_MARKDOWN = 1 } umi_core_format;

typedef struct umi_block {
    char label[UMI_CORE_LABEL_BYTES_MAX];
    uint32_t label_len;
    int32_t known;  /* index into the known labels, or -1 */
    double importance;
    char importance_text[UMI_CORE_IMPORTANCE_CHARS]; /* "0.50", as rendered */
    uint64_t tokens;
    uint64_t hash;
    uint64_t gen;  /* the core's version when this block last changed: unique per change */
} umi_block;

typedef struct umi_core {
    umi_arena arena;
    umi_hindex index;
    umi_block *blocks;
    size_t blocks_cap;
    uint32_t known[UMI_CORE_N_KNOWN];  /* block id per known label, or UMI_ID_NONE */
    uint32_t *others;                  /* other block ids in insertion order */
    size_t n_others;
    size_t others_cap;
    uint64_t used_tokens;
    uint64_t max_tokens;  /* 0: no token budget */
    uint64_t version;     /* bumped by every change */
    char *out;            /* scratch buffer for umi_core_fragment */
    size_t out_cap;
    uint64_t seed;
} umi_core;

umi_rc umi_core_init(umi_core *c, uint64_t max_bytes, uint64_t max_tokens, uint64_t seed);
void umi_core_free(umi_core *c);
void umi_core_clear(umi_core *c);

/* 1-64 bytes of [A-Za-z0-9_.-]. */
int umi_core_label_ok(const char *label, size_t len);

/* Insert or replace a block. importance_text is how the importance renders
 * (at most 7 chars). Refuses with UMI_ERR_BYTES_FULL / UMI_ERR_TOKENS_FULL
 * (detail filled) or UMI_ERR_INVALID (bad label), changing nothing. */
umi_rc umi_core_set(umi_core *c, const char *label, size_t llen, const char *content,
                    size_t clen, double importance, const char *importance_text,
                    uint64_t tokens, umi_err_detail *err);

uint32_t umi_core_find(const umi_core *c, const char *label, size_t llen);
int umi_core_remove(umi_core *c, const char *label, size_t llen);

static inline size_t umi_core_count(const umi_core *c) { return c->arena.live; }
static inline uint64_t umi_core_used_bytes(const umi_core *c) { return c->arena.used_bytes; }
static inline const char *umi_core_content(const umi_core *c, uint32_t id, size_t *len) {
    *len = umi_arena_len(&c->arena, id);
    return (const char *)umi_arena_data(&c->arena, id);
}

/* Block ids in render order; out must hold umi_core_count() ids. */
void umi_core_order(const umi_core *c, uint32_t *out);

/* Text before the first and after the last fragment of a rendering. */
const char *umi_core_head(umi_core_format fmt);
const char *umi_core_tail(umi_core_format fmt);

/* Render block id as one fragment into an internal buffer, valid until the
 * next call on c. A full rendering is head + fragments in umi_core_order +
 * tail. UMI_ERR_INVALID for an unknown format. */
umi_rc umi_core_fragment(umi_core *c, uint32_t id, umi_core_format fmt, const char **out,
                         size_t *len);

/* Escapers, exposed for tests: write into out (when not NULL), return length. */
size_t umi_escape_xml(const char *s, size_t n, char *out);
size_t umi_escape_markdown(const char *s, size_t n, char *out);

#endif
