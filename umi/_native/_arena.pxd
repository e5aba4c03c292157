# The C declarations the arenas sit on (csrc/), in one place, and the layout
# of the two compiled classes.

from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef extern from "umi_status.h" nogil:
    ctypedef enum umi_rc:
        UMI_OK
        UMI_ERR_NOMEM
        UMI_ERR_NOT_FOUND
        UMI_ERR_BYTES_FULL
        UMI_ERR_ENTRIES_FULL
        UMI_ERR_TOKENS_FULL
        UMI_ERR_NOT_INTEGER
        UMI_ERR_OVERFLOW
        UMI_ERR_INVALID

    ctypedef struct umi_err_detail:
        uint64_t over_by
        uint64_t limit

    uint32_t UMI_ID_NONE


cdef extern from "umi_clock.h" nogil:
    double umi_monotonic_secs()


cdef extern from "umi_arena.h" nogil:
    ctypedef struct umi_arena:
        uint32_t live
        uint64_t used_bytes
        uint64_t max_bytes


cdef extern from "umi_wm.h" nogil:
    ctypedef struct umi_wm:
        umi_arena arena
        uint64_t max_entries

    umi_rc umi_wm_init(umi_wm *wm, uint64_t max_bytes, uint64_t max_entries, uint64_t seed)
    void umi_wm_free(umi_wm *wm)
    void umi_wm_clear(umi_wm *wm)
    size_t umi_wm_expire(umi_wm *wm, double now)
    umi_rc umi_wm_set(umi_wm *wm, double now, const char *key, size_t klen, const char *val,
                      size_t vlen, double ttl, int evict_lru, umi_err_detail *err)
    umi_rc umi_wm_get(umi_wm *wm, double now, const char *key, size_t klen, const char **val,
                      size_t *vlen)
    int umi_wm_delete(umi_wm *wm, double now, const char *key, size_t klen)
    int umi_wm_contains(umi_wm *wm, double now, const char *key, size_t klen)
    umi_rc umi_wm_ttl(umi_wm *wm, double now, const char *key, size_t klen, double *left)
    umi_rc umi_wm_touch(umi_wm *wm, double now, const char *key, size_t klen, double ttl)
    umi_rc umi_wm_incr(umi_wm *wm, double now, const char *key, size_t klen, int64_t delta,
                       double ttl_if_new, int evict_lru, int64_t *out, umi_err_detail *err)
    uint32_t umi_wm_first(const umi_wm *wm)
    uint32_t umi_wm_next(const umi_wm *wm, uint32_t id)
    const char *umi_wm_key(const umi_wm *wm, uint32_t id, size_t *klen)
    size_t umi_wm_len(const umi_wm *wm)
    uint64_t umi_wm_used_bytes(const umi_wm *wm)


cdef extern from "umi_core.h" nogil:
    ctypedef enum umi_core_format:
        UMI_CORE_XML
        UMI_CORE_MARKDOWN

    ctypedef struct umi_block:
        char label[64]
        uint32_t label_len
        double importance
        uint64_t gen

    ctypedef struct umi_core:
        umi_arena arena
        umi_block *blocks
        uint64_t used_tokens
        uint64_t max_tokens
        uint64_t version

    umi_rc umi_core_init(umi_core *c, uint64_t max_bytes, uint64_t max_tokens, uint64_t seed)
    void umi_core_free(umi_core *c)
    void umi_core_clear(umi_core *c)
    int umi_core_label_ok(const char *label, size_t length)
    umi_rc umi_core_set(umi_core *c, const char *label, size_t llen, const char *content,
                        size_t clen, double importance, const char *importance_text,
                        uint64_t tokens, umi_err_detail *err)
    uint32_t umi_core_find(const umi_core *c, const char *label, size_t llen)
    int umi_core_remove(umi_core *c, const char *label, size_t llen)
    size_t umi_core_count(const umi_core *c)
    uint64_t umi_core_used_bytes(const umi_core *c)
    const char *umi_core_content(const umi_core *c, uint32_t id, size_t *length)
    void umi_core_order(const umi_core *c, uint32_t *out)
    const char *umi_core_head(umi_core_format fmt)
    const char *umi_core_tail(umi_core_format fmt)
    umi_rc umi_core_fragment(umi_core *c, uint32_t id, umi_core_format fmt, const char **out,
                             size_t *length)
    size_t umi_escape_xml(const char *s, size_t n, char *out)
    size_t umi_escape_markdown(const char *s, size_t n, char *out)


cdef class CoreMemory:
    cdef umi_core _core
    cdef bint _ready
    cdef object _tokenizer
    cdef list _rendered    # per format: the last rendering (str) or None
    cdef uint64_t _rendered_version[2]
    cdef list _fragments   # per format: {block id: (generation, str)}

    cdef uint64_t _tokens(self, object content) except? 0
    cdef str _label_of(self, uint32_t bid)
    cdef str _render(self, umi_core_format fmt)


cdef class WorkingMemory:
    cdef umi_wm _wm
    cdef bint _ready
    cdef object _clock
    cdef double _default_ttl_secs
    cdef bint _evict_lru

    cdef inline double _now(self) except? -1.0
    cdef double _ttl_or_default(self, object ttl_secs) except? -1.0
