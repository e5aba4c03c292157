/* Indexed binary min-heap of expiry times.
 *
 * Each id appears at most once; pos[id] remembers where, so update and remove
 * are O(log n) as well as push and pop. Ties on time break by id, so the pop
 * order is a pure function of the contents.
 */
#ifndef UMI_HEAP_H
#define UMI_HEAP_H

#include "umi_status.h"

typedef struct umi_heap_node {
    double at;
    uint32_t id;
} umi_heap_node;

typedef struct umi_heap {
    umi_heap_node *nodes;
    size_t len;
    size_t cap;
    uint32_t *pos;   /* pos[id] = index in nodes, or UMI_ID_NONE */
    size_t pos_cap;  /* number of ids pos can describe */
} umi_heap;

umi_rc umi_heap_init(umi_heap *h);
void umi_heap_free(umi_heap *h);
void umi_heap_clear(umi_heap *h);

/* Make room for ids below n_ids and for `extra` more nodes. */
umi_rc umi_heap_reserve(umi_heap *h, size_t n_ids, size_t extra);

/* The id must not be in the heap and room must have been reserved. */
void umi_heap_push(umi_heap *h, uint32_t id, double at);
void umi_heap_update(umi_heap *h, uint32_t id, double at);
void umi_heap_remove(umi_heap *h, uint32_t id);
int umi_heap_contains(const umi_heap *h, uint32_t id);
double umi_heap_time_of(const umi_heap *h, uint32_t id);

/* Id of the earliest node if its time is <= now, else UMI_ID_NONE. The node
 * stays in the heap: callers remove it with the rest of the entry. */
uint32_t umi_heap_peek_expired(const umi_heap *h, double now);

#endif
