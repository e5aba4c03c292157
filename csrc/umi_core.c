#include "umi_core.h"

#include <stdlib.h>
#include <string.h>

static const char *const KNOWN[UMI_CORE_N_KNOWN] = {"system", "persona", "human",
                                                    "facts",  "goals",   "scratch"};

static const char XML_HEAD[] = "<core_memory>\n";
static const char XML_TAIL[] = "</core_memory>";
static const char MD_HEAD[] = "# Core Memory\n";

static int label_eq(const void *ctx, uint32_t id, const char *key, size_t len) {
    const umi_core *c = (const umi_core *)ctx;
    const umi_block *b = &c->blocks[id];
    return b->label_len == len && memcmp(b->label, key, len) == 0;
}

int umi_core_label_ok(const char *label, size_t len) {
    if (len == 0 || len > UMI_CORE_LABEL_BYTES_MAX) return 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)label[i];
        int ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
                 ch == '_' || ch == '.' || ch == '-';
        if (!ok) return 0;
    }
    return 1;
}

static int known_index(const char *label, size_t len) {
    for (int i = 0; i < UMI_CORE_N_KNOWN; i++) {
        if (strlen(KNOWN[i]) == len && memcmp(KNOWN[i], label, len) == 0) return i;
    }
    return -1;
}

umi_rc umi_core_init(umi_core *c, uint64_t max_bytes, uint64_t max_tokens, uint64_t seed) {
    memset(c, 0, sizeof(*c));
    umi_arena_init(&c->arena, max_bytes);
    for (int i = 0; i < UMI_CORE_N_KNOWN; i++) c->known[i] = UMI_ID_NONE;
    c->max_tokens = max_tokens;
    c->seed = seed;
    return umi_hindex_init(&c->index, 16);
}

void umi_core_free(umi_core *c) {
    umi_arena_free(&c->arena);
    umi_hindex_free(&c->index);
    free(c->blocks);
    free(c->others);
    free(c->out);
    c->blocks = NULL;
    c->others = NULL;
    c->out = NULL;
    c->blocks_cap = c->others_cap = c->n_others = c->out_cap = 0;
}

void umi_core_clear(umi_core *c) {
    umi_arena_clear(&c->arena);
    umi_hindex_clear(&c->index);
    for (int i = 0; i < UMI_CORE_N_KNOWN; i++) c->known[i] = UMI_ID_NONE;
    c->n_others = 0;
    c->used_tokens = 0;
    c->version++;
}

/* How far base + add is over limit (base + add > limit), saturating at
 * UINT64_MAX when the exact excess does not fit. */
static uint64_t over_limit(uint64_t base, uint64_t add, uint64_t limit) {
    uint64_t sum;
    if (umi_add_u64(base, add, &sum)) {
        /* base + add - limit = add - (limit - base) when base <= limit */
        if (base <= limit) return add - (limit - base);
        return UINT64_MAX;
    }
    return sum - limit;
}

uint32_t umi_core_find(const umi_core *c, const char *label, size_t llen) {
    uint64_t h = umi_hash_bytes(label, llen, c->seed);
    return umi_hindex_find(&c->index, h, label, llen, label_eq, c);
}

static umi_rc grow_blocks(umi_core *c, size_t n) {
    if (n <= c->blocks_cap) return UMI_OK;
    size_t bytes;
    if (umi_mul_size(n, sizeof(umi_block), &bytes)) return UMI_ERR_NOMEM;
    umi_block *nb = (umi_block *)realloc(c->blocks, bytes);
    if (!nb) return UMI_ERR_NOMEM;
    memset(nb + c->blocks_cap, 0, (n - c->blocks_cap) * sizeof(umi_block));
    c->blocks = nb;
    c->blocks_cap = n;
    return UMI_OK;
}

static umi_rc grow_others(umi_core *c, size_t n) {
    if (n <= c->others_cap) return UMI_OK;
    size_t nc = c->others_cap ? c->others_cap : 16, bytes;
    while (nc < n) {
        if (umi_mul_size(nc, 2, &nc)) return UMI_ERR_NOMEM;
    }
    if (umi_mul_size(nc, sizeof(uint32_t), &bytes)) return UMI_ERR_NOMEM;
    uint32_t *no = (uint32_t *)realloc(c->others, bytes);
    if (!no) return UMI_ERR_NOMEM;
    c->others = no;
    c->others_cap = nc;
    return UMI_OK;
}

umi_rc umi_core_set(umi_core *c, const char *label, size_t llen, const char *content,
                    size_t clen, double importance, const char *importance_text,
                    uint64_t tokens, umi_err_detail *err) {
    if (!umi_core_label_ok(label, llen)) return UMI_ERR_INVALID;
    if (strlen(importance_text) >= UMI_CORE_IMPORTANCE_CHARS) return UMI_ERR_INVALID;
    uint64_t h = umi_hash_bytes(label, llen, c->seed);
    uint32_t id = umi_hindex_find(&c->index, h, label, llen, label_eq, c);
    int exists = id != UMI_ID_NONE;
    umi_arena *a = &c->arena;

    /* Budgets first (pure checks), then every allocation, then the change.
     * Every sum is checked: a sum that does not fit in 64 bits is over any
     * limit (over_by saturates), never a small number that passes. */
    uint64_t old_bytes = exists ? umi_arena_len(a, id) : 0;
    uint64_t need_bytes;
    if (umi_add_u64(a->used_bytes - old_bytes, (uint64_t)clen, &need_bytes) ||
        need_bytes > a->max_bytes) {
        err->over_by = over_limit(a->used_bytes - old_bytes, clen, a->max_bytes);
        err->limit = a->max_bytes;
        return UMI_ERR_BYTES_FULL;
    }
    uint64_t old_tokens = exists ? c->blocks[id].tokens : 0;
    uint64_t need_tokens;
    int tokens_wrap = umi_add_u64(c->used_tokens - old_tokens, tokens, &need_tokens);
    if (tokens_wrap || (c->max_tokens && need_tokens > c->max_tokens)) {
        /* Without a token budget the only limit is what a uint64 can count. */
        uint64_t limit = c->max_tokens ? c->max_tokens : UINT64_MAX;
        err->over_by = over_limit(c->used_tokens - old_tokens, tokens, limit);
        err->limit = limit;
        return UMI_ERR_TOKENS_FULL;
    }
    int known = known_index(label, llen);
    umi_rc rc = umi_arena_reserve(a, !exists, clen);
    if (rc != UMI_OK) return rc;
    rc = grow_blocks(c, a->rec_cap);
    if (rc != UMI_OK) return rc;
    if (!exists) {
        rc = umi_hindex_reserve(&c->index, 1);
        if (rc != UMI_OK) return rc;
        if (known < 0) {
            rc = grow_others(c, c->n_others + 1);
            if (rc != UMI_OK) return rc;
        }
    }

    if (exists) {
        rc = umi_arena_resize(a, id, clen, 0, err);
        if (rc != UMI_OK) return rc; /* unreachable: budget and space checked */
    } else {
        rc = umi_arena_alloc(a, clen, 0, &id, err);
        if (rc != UMI_OK) return rc; /* unreachable: budget and space checked */
        umi_block *nb = &c->blocks[id];
        memcpy(nb->label, label, llen);
        nb->label_len = (uint32_t)llen;
        nb->known = known;
        nb->hash = h;
        umi_hindex_insert(&c->index, h, id);
        if (known >= 0) c->known[known] = id;
        else c->others[c->n_others++] = id;
    }
    umi_block *b = &c->blocks[id];
    memcpy(umi_arena_data(a, id), content, clen);
    b->importance = importance;
    strcpy(b->importance_text, importance_text);
    b->tokens = tokens;
    c->used_tokens = need_tokens;
    b->gen = ++c->version;
    return UMI_OK;
}

int umi_core_remove(umi_core *c, const char *label, size_t llen) {
    uint32_t id = umi_core_find(c, label, llen);
    if (id == UMI_ID_NONE) return 0;
    umi_block *b = &c->blocks[id];
    umi_hindex_remove(&c->index, b->hash, id);
    if (b->known >= 0) {
        c->known[b->known] = UMI_ID_NONE;
    } else {
        size_t i = 0;
        while (c->others[i] != id) i++;
        memmove(c->others + i, c->others + i + 1, (c->n_others - i - 1) * sizeof(uint32_t));
        c->n_others--;
    }
    c->used_tokens -= b->tokens;
    umi_arena_release(&c->arena, id);
    c->version++;
    return 1;
}

void umi_core_order(const umi_core *c, uint32_t *out) {
    size_t n = 0;
    for (int i = 0; i < UMI_CORE_N_KNOWN; i++) {
        if (c->known[i] != UMI_ID_NONE) out[n++] = c->known[i];
    }
    for (size_t i = 0; i < c->n_others; i++) out[n++] = c->others[i];
}

/* --- escaping ---------------------------------------------------------- */

/* Extra bytes escaping adds: '&' -> "&amp;" (+4), '<' -> "&lt;" and '>' ->
 * "&gt;" (+3). Counted in 8-bit lanes over chunks of at most 255 bytes so the
 * compiler can vectorise the inner loop without widening. */
static size_t xml_extra(const char *s, size_t n) {
    size_t amp = 0, angle = 0;
    for (size_t i = 0; i < n;) {
        size_t m = n - i < 255 ? n - i : 255;
        unsigned char a = 0, b = 0;
        for (size_t k = 0; k < m; k++) {
            unsigned char ch = (unsigned char)s[i + k];
            a = (unsigned char)(a + (ch == '&'));
            b = (unsigned char)(b + ((ch == '<') | (ch == '>')));
        }
        amp += a;
        angle += b;
        i += m;
    }
    return amp * 4 + angle * 3;
}

/* Nonzero when one of the 8 bytes of w is '&', '<' or '>' (SWAR zero-byte test). */
static inline uint64_t has_xml_special(uint64_t w) {
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    uint64_t a = w ^ (ones * '&'), l = w ^ (ones * '<'), g = w ^ (ones * '>');
    return ((a - ones) & ~a & highs) | ((l - ones) & ~l & highs) | ((g - ones) & ~g & highs);
}

size_t umi_escape_xml(const char *s, size_t n, char *out) {
    size_t extra = xml_extra(s, n);
    if (!out) return n + extra;
    if (extra == 0) {
        memcpy(out, s, n);
        return n;
    }
    size_t o = 0, i = 0;
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            uint64_t hit = has_xml_special(w);
            if (!hit) { /* the common case: 8 plain bytes */
                memcpy(out + o, &w, 8);
                o += 8;
                i += 8;
                continue;
            }
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
            /* The lowest flagged byte is always a real match: copy up to it. */
            size_t plain = (size_t)__builtin_ctzll(hit) / 8;
            memcpy(out + o, s + i, plain);
            o += plain;
            i += plain;
#endif
        }
        char ch = s[i++];
        if (ch == '&') {
            memcpy(out + o, "&amp;", 5);
            o += 5;
        } else if (ch == '<') {
            memcpy(out + o, "&lt;", 4);
            o += 4;
        } else if (ch == '>') {
            memcpy(out + o, "&gt;", 4);
            o += 4;
        } else {
            out[o++] = ch;
        }
    }
    return o;
}

/* End of the line starting at i: just past its '\n' or '\r', or n. */
static size_t line_end(const char *s, size_t i, size_t n) {
    const char *nl = (const char *)memchr(s + i, '\n', n - i);
    size_t end = nl ? (size_t)(nl - s) : n;
    const char *cr = (const char *)memchr(s + i, '\r', end - i);
    if (cr) end = (size_t)(cr - s);
    return end < n ? end + 1 : n;
}

/* Where a backslash must go on the line whose text (after at most three
 * spaces) starts at j, or n when the line cannot open a block.
 *
 * Under CommonMark only the first characters of a line decide whether it
 * opens a block: a heading ('#', or a '='/'-' underline), a container that
 * can hold a heading (a '>' quote, a '-', '+' or '*' bullet, an ordered
 * marker of 1-9 digits and '.' or ')'), a block that swallows what follows
 * (a ``` or ~~~ fence, raw HTML), a thematic break ('_' too), or a link
 * reference definition ('[') that would hide the line. A backslash before that
 * character turns every one of them into plain paragraph text, and a line of
 * paragraph text opens nothing. Four or more columns of indentation (spaces,
 * or any tab) make indented code or paragraph continuation: no block either.
 * So no content can make a heading, or a container holding one. */
static size_t block_start(const char *s, size_t j, size_t n) {
    if (j >= n) return n;
    switch (s[j]) {
    case '#': case '`': case '~': case '<': case '>': case '=': case '-': case '+':
    case '*': case '_': case '[':
        return j;
    default:
        break;
    }
    size_t k = j;
    while (k < n && k - j < 10 && s[k] >= '0' && s[k] <= '9') k++;
    if (k > j && k - j <= 9 && k < n && (s[k] == '.' || s[k] == ')')) return k;
    return n;
}

/* Markdown cannot be escaped as cleanly as XML: see block_start for what is
 * escaped and why that is enough. Lines end at '\n' or '\r', as in CommonMark;
 * at most one backslash is added per line, so the output is at most 2n. */
size_t umi_escape_markdown(const char *s, size_t n, char *out) {
    size_t o = 0;
    size_t i = 0;
    while (i < n) {
        /* i is at the start of a line. */
        size_t j = i;
        while (j < n && j - i < 3 && s[j] == ' ') j++;
        size_t at = block_start(s, j, n);
        size_t end = j < n ? line_end(s, j, n) : n;
        if (at < end) {
            if (out) {
                memcpy(out + o, s + i, at - i);
                out[o + (at - i)] = '\\';
                memcpy(out + o + (at - i) + 1, s + at, end - at);
            }
            o += (end - i) + 1;
        } else {
            if (out) memcpy(out + o, s + i, end - i);
            o += end - i;
        }
        i = end;
    }
    return o;
}

/* --- render ------------------------------------------------------------ */

const char *umi_core_head(umi_core_format fmt) { return fmt == UMI_CORE_XML ? XML_HEAD : MD_HEAD; }
const char *umi_core_tail(umi_core_format fmt) { return fmt == UMI_CORE_XML ? XML_TAIL : ""; }

static umi_rc reserve_out(umi_core *c, size_t n) {
    if (n <= c->out_cap) return UMI_OK;
    size_t nc = c->out_cap ? c->out_cap : 256;
    while (nc < n) {
        if (umi_mul_size(nc, 2, &nc)) return UMI_ERR_NOMEM;
    }
    char *nb = (char *)realloc(c->out, nc);
    if (!nb) return UMI_ERR_NOMEM;
    c->out = nb;
    c->out_cap = nc;
    return UMI_OK;
}

#define PUT(p, o, lit) (memcpy((p) + (o), (lit), sizeof(lit) - 1), (o) += sizeof(lit) - 1)

umi_rc umi_core_fragment(umi_core *c, uint32_t id, umi_core_format fmt, const char **out,
                         size_t *len) {
    const umi_block *b = &c->blocks[id];
    size_t clen;
    const char *content = umi_core_content(c, id, &clen);
    size_t o = 0;
    umi_rc rc;
    if (fmt == UMI_CORE_XML) {
        /* <block label="L" importance="I">\nBODY\n</block>\n */
        size_t ilen = strlen(b->importance_text);
        size_t n;
        if (umi_add_size(14 + b->label_len + 14 + ilen + 3 + 10, umi_escape_xml(content, clen, NULL),
                         &n))
            return UMI_ERR_NOMEM;
        if ((rc = reserve_out(c, n)) != UMI_OK) return rc;
        char *p = c->out;
        PUT(p, o, "<block label=\"");
        memcpy(p + o, b->label, b->label_len);
        o += b->label_len;
        PUT(p, o, "\" importance=\"");
        memcpy(p + o, b->importance_text, ilen);
        o += ilen;
        PUT(p, o, "\">\n");
        o += umi_escape_xml(content, clen, p + o);
        PUT(p, o, "\n</block>\n");
    } else if (fmt == UMI_CORE_MARKDOWN) {
        /* \n## L\n\nBODY\n */
        size_t n;
        if (umi_add_size(4 + b->label_len + 2 + 1, umi_escape_markdown(content, clen, NULL), &n))
            return UMI_ERR_NOMEM;
        if ((rc = reserve_out(c, n)) != UMI_OK) return rc;
        char *p = c->out;
        PUT(p, o, "\n## ");
        memcpy(p + o, b->label, b->label_len);
        o += b->label_len;
        PUT(p, o, "\n\n");
        o += umi_escape_markdown(content, clen, p + o);
        PUT(p, o, "\n");
    } else {
        return UMI_ERR_INVALID;
    }
    *out = c->out;
    *len = o;
    return UMI_OK;
}
