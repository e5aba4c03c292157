#include "umi_heap.h"

#include <stdlib.h>

umi_rc umi_heap_init(umi_heap *h) {
    h->nodes = NULL;
    h->len = 0;
    h->cap = 0;
    h->pos = NULL;
    h->pos_cap = 0;
    return UMI_OK;
}

void umi_heap_free(umi_heap *h) {
    free(h->nodes);
    free(h->pos);
    umi_heap_init(h);
}

void umi_heap_clear(umi_heap *h) {
    for (size_t i = 0; i < h->len; i++) h->pos[h->nodes[i].id] = UMI_ID_NONE;
    h->len = 0;
}

umi_rc umi_heap_reserve(umi_heap *h, size_t n_ids, size_t extra) {
    if (n_ids > h->pos_cap) {
        size_t nc = h->pos_cap ? h->pos_cap : 16, bytes;
        while (nc < n_ids) {
            if (umi_mul_size(nc, 2, &nc)) return UMI_ERR_NOMEM;
        }
        if (umi_mul_size(nc, sizeof(uint32_t), &bytes)) return UMI_ERR_NOMEM;
        uint32_t *np = (uint32_t *)realloc(h->pos, bytes);
        if (!np) return UMI_ERR_NOMEM;
        for (size_t i = h->pos_cap; i < nc; i++) np[i] = UMI_ID_NONE;
        h->pos = np;
        h->pos_cap = nc;
    }
    size_t want;
    if (umi_add_size(h->len, extra, &want)) return UMI_ERR_NOMEM;
    if (want > h->cap) {
        size_t nc = h->cap ? h->cap : 16, bytes;
        while (nc < want) {
            if (umi_mul_size(nc, 2, &nc)) return UMI_ERR_NOMEM;
        }
        if (umi_mul_size(nc, sizeof(umi_heap_node), &bytes)) return UMI_ERR_NOMEM;
        umi_heap_node *nn = (umi_heap_node *)realloc(h->nodes, bytes);
        if (!nn) return UMI_ERR_NOMEM;
        h->nodes = nn;
        h->cap = nc;
    }
    return UMI_OK;
}

static inline int less(const umi_heap_node *a, const umi_heap_node *b) {
    return a->at < b->at || (a->at == b->at && a->id < b->id);
}

static inline void put(umi_heap *h, size_t i, umi_heap_node n) {
    h->nodes[i] = n;
    h->pos[n.id] = (uint32_t)i;
}

static void sift_up(umi_heap *h, size_t i) {
    umi_heap_node n = h->nodes[i];
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!less(&n, &h->nodes[parent])) break;
        put(h, i, h->nodes[parent]);
        i = parent;
    }
    put(h, i, n);
}

static void sift_down(umi_heap *h, size_t i) {
    umi_heap_node n = h->nodes[i];
    for (;;) {
        size_t l = 2 * i + 1;
        if (l >= h->len) break;
        size_t c = l;
        if (l + 1 < h->len && less(&h->nodes[l + 1], &h->nodes[l])) c = l + 1;
        if (!less(&h->nodes[c], &n)) break;
        put(h, i, h->nodes[c]);
        i = c;
    }
    put(h, i, n);
}

void umi_heap_push(umi_heap *h, uint32_t id, double at) {
    umi_heap_node n = {at, id};
    size_t i = h->len++;
    put(h, i, n);
    sift_up(h, i);
}

void umi_heap_update(umi_heap *h, uint32_t id, double at) {
    size_t i = h->pos[id];
    double old = h->nodes[i].at;
    h->nodes[i].at = at;
    if (at < old) sift_up(h, i);
    else sift_down(h, i);
}

void umi_heap_remove(umi_heap *h, uint32_t id) {
    size_t i = h->pos[id];
    h->pos[id] = UMI_ID_NONE;
    size_t last = --h->len;
    if (i == last) return;
    umi_heap_node moved = h->nodes[last];
    put(h, i, moved);
    if (i > 0 && less(&moved, &h->nodes[(i - 1) / 2])) sift_up(h, i);
    else sift_down(h, i);
}

int umi_heap_contains(const umi_heap *h, uint32_t id) {
    return id < h->pos_cap && h->pos[id] != UMI_ID_NONE;
}

double umi_heap_time_of(const umi_heap *h, uint32_t id) {
    return h->nodes[h->pos[id]].at;
}

uint32_t umi_heap_peek_expired(const umi_heap *h, double now) {
    if (h->len == 0 || h->nodes[0].at > now) return UMI_ID_NONE;
    return h->nodes[0].id;
}
