/*
 * policy._wirefilter: the engine's fast path for RecordEvents payloads, on the wire form.
 *
 * One pass over the bytes of a RecordEventsRequest, driven by tables built from the
 * generated descriptors (policy/fastpath.py): every field is checked against the
 * schema and copied, skipped or rewritten; nothing is parsed into objects. It
 * applies a kind's rules (whole-event filter, validity, marketing_tracking,
 * private_metadata keep/drop/allowlist, field drops, unknown fields) exactly as the
 * Python engine does.
 *
 * It only takes the encodings it fully understands: canonical ones, as exporters
 * write them. At anything else (a singular field or oneof member given twice, a
 * duplicate map key, a wrong wire type, a group, invalid UTF-8, a tag or a length in
 * more than 5 bytes, a metadata message, deep nesting, ...) it returns None and the caller runs the Python engine, which is
 * the reference. So it never accepts what the reference refuses, and never lets a
 * shadowed value (one a parser would overwrite) through.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { T_VARINT, T_FIXED64, T_STRING, T_BYTES, T_MESSAGE, T_FIXED32 };
/* F_INT32: a varint a parser reads as 32 bits (int32, uint32, sint32, enum); F_FLOAT: float or double. */
enum { F_REPEATED = 1, F_IMPLICIT = 2, F_MAP = 4, F_INT32 = 8, F_FLOAT = 16 };
/* R_ITEM: an item of a user metadata payload (a user, an organization): written filtered, its drop_fields
 * counted once per item, as events count theirs (the Python engine counts the items that had a field set). */
enum { R_NONE, R_FALLBACK, R_EVENT, R_ID, R_FEATURE, R_ACTION, R_TIMESTAMP, R_MARKETING, R_PRIVATE, R_LEGACY, R_ITEM };
enum { MODE_KEEP, MODE_DROP, MODE_ALLOWLIST };
/* Flags of an event's record, read by policy/fastpath.py. */
enum { REC_MARKETING = 1, REC_PRIVATE_WHOLE = 2, REC_UNKNOWN = 4 };

#define MAX_FIELD 63   /* field numbers above are unknown to every message here */
#define MAX_DEPTH 32   /* deeper: fallback (upb's own limit is 100) */
#define MAX_KEYS 48    /* map entries checked for duplicates; more: fallback */
#define LINEAR_KEYS 12 /* up to this many: compared one by one; more: a hash table */
#define MAX_TYPES 64   /* event types remembered per call */
#define MAX_MESSAGES 64
#define MAX_REMEMBERED 4096 /* event types kept in Plan.types; then it starts afresh */
#define REPLACEMENTS 7      /* per google.protobuf.Value kind: 0 = none set, then its fields 1-6 */

#define OK 0
#define FALLBACK 1
#define FAIL (-1) /* a Python exception is set */

#define INLINE static inline __attribute__((always_inline)) /* the helpers of the per-field loop */

typedef struct {
    uint8_t known, type, flags, role;
    int8_t oneof; /* -1: not in a oneof */
    int8_t drop;  /* -1: kept; else the bit of the drop_fields rule that removes it */
    int16_t child; /* message index for T_MESSAGE (the entry message for a map) */
    /* Of the child message, kept here so that the per-field loop does not reach into another table: */
    uint8_t child_clean; /* the child's Msg.clean */
    uint8_t entry_value; /* a map's entry: 1 + the type of its value (field 2), 0 if it has none */
} Field;

typedef struct {
    int max;
    int strict; /* map entries: an unknown field means fallback */
    int clean;  /* nothing inside is ever dropped or read by a rule: copied as it came, once checked */
    Field fields[MAX_FIELD + 1];
    uint8_t tag1[128]; /* 1: this one-byte tag is a known field (numbers 1-15) with its own wire type */
} Msg;

typedef struct {
    PyObject_HEAD
    Msg *msgs;
    int nmsgs, root, value_msg; /* value_msg: google.protobuf.Value (allowlist checks) */
    int drop_marketing, private_mode, merge_legacy, discard_unknown, drop_invalid;
    PyObject *replacement; /* tuple of REPLACEMENTS bytes, by the Value kind replaced; NULL: removed */
    PyObject *invalid_rule; /* str */
    PyObject *types;        /* what resolve said per event type, across calls: {bytes: tuple} */
} Plan;

typedef struct { const uint8_t *p; Py_ssize_t n; } Slice;

typedef struct {
    Slice feature, action;
    uint32_t hash;
    PyObject *resolved; /* a reference, released when the call ends */
    int nallowed;       /* its allowlisted keys, in Ctx.allowed from allowed_at; -1: ask the set */
    Py_ssize_t allowed_at;
} TypeMemo;

#define MAX_ALLOWED 16 /* allowlisted keys of a type compared in C; more: the frozenset is asked */

/* What happened to one event, as slices of the payload (kept alive by the Records object). */
typedef struct {
    Py_ssize_t index;
    Slice id, feature, action;
    PyObject *dropped_by; /* a reference, or NULL */
    unsigned flags;
    uint64_t drops;
    Py_ssize_t keys_at; /* its gone keys, then its wrong keys, in Ctx.rec_keys / Records.keys */
    int ngone, nwrong;
} Rec;

typedef struct {
    const Plan *plan;
    PyObject *resolve;
    PyObject *out;
    Py_ssize_t pos, cap;
    Rec *recs; /* one per event something happened to; Python objects only when asked (Records) */
    Py_ssize_t nrecs, caprecs;
    Slice *rec_keys; /* the gone and wrong keys of every record, in turn */
    Py_ssize_t nrec_keys, caprec_keys;
    Py_ssize_t events_in, events_out;
    /* the call's totals, for a decision's counts without its records */
    Py_ssize_t n_marketing, n_private_whole, n_gone, n_wrong, n_unknown, n_drops[64];
    PyObject *dropped_ids;   /* list of str: events removed whole */
    PyObject *dropped_rules; /* {rule: count} */
    int saw_unknown;
    /* the event being written */
    unsigned flags;
    uint64_t drops;
    PyObject *keys; /* frozenset of allowed keys (bytes) or NULL */
    const Slice *allowed; /* the same keys as slices of those bytes (nallowed >= 0), else NULL */
    const uint64_t *allowed_prints;
    int nallowed;
    Slice *allowed_keys; /* every memoized type's allowed keys, in turn, and their fingerprints */
    uint64_t *allowed_fp;
    Py_ssize_t nallowed_keys, capallowed_keys, capallowed_fp;
    Slice gone[MAX_KEYS], wrong[MAX_KEYS];
    int ngone, nwrong;
    TypeMemo memo[MAX_TYPES];
    int nmemo;
    uint8_t slots[2 * MAX_TYPES]; /* hash table of memo: index + 1, 0 = empty */
    PyObject *overflow;           /* the type of the current event when the memo is full */
} Ctx;

/* ---- output ------------------------------------------------------------------------ */

INLINE int reserve(Ctx *c, Py_ssize_t n) {
    if (c->pos + n <= c->cap) return OK;
    Py_ssize_t cap = c->cap * 2;
    if (cap < c->pos + n) cap = c->pos + n + 256;
    if (_PyBytes_Resize(&c->out, cap) < 0) return FAIL;
    c->cap = cap;
    return OK;
}

static inline uint8_t *at(Ctx *c) { return (uint8_t *)PyBytes_AS_STRING(c->out) + c->pos; }

INLINE int put(Ctx *c, const uint8_t *p, Py_ssize_t n) {
    if (reserve(c, n) < 0) return FAIL;
    memcpy(at(c), p, (size_t)n);
    c->pos += n;
    return OK;
}

static int varint_size(uint64_t v) {
    int n = 1;
    while (v >= 0x80) { v >>= 7; n++; }
    return n;
}

static void write_varint(uint8_t *p, uint64_t v) {
    while (v >= 0x80) { *p++ = (uint8_t)(v | 0x80); v >>= 7; }
    *p = (uint8_t)v;
}

static int put_varint(Ctx *c, uint64_t v) {
    if (reserve(c, 10) < 0) return FAIL;
    write_varint(at(c), v);
    c->pos += varint_size(v);
    return OK;
}

/* A length prefix written once the content is known. As many bytes are held as the input's
 * length took: the content moves only when its length needs another number of bytes. */
typedef struct {
    Py_ssize_t at;
    int held;
} Len;

static int open_len(Ctx *c, Len *len, Py_ssize_t input_length) {
    len->held = varint_size((uint64_t)input_length);
    if (reserve(c, len->held) < 0) return FAIL;
    len->at = c->pos;
    c->pos += len->held;
    return OK;
}

static int close_len(Ctx *c, const Len *len) {
    Py_ssize_t size = c->pos - len->at - len->held;
    int n = varint_size((uint64_t)size);
    if (n > len->held && reserve(c, n - len->held) < 0) return FAIL; /* grown (replaced values) */
    uint8_t *base = (uint8_t *)PyBytes_AS_STRING(c->out);
    if (n != len->held) memmove(base + len->at + n, base + len->at + len->held, (size_t)size);
    write_varint(base + len->at, (uint64_t)size);
    c->pos += n - len->held;
    return OK;
}

/* ---- input ------------------------------------------------------------------------- */

/* A varint in at most `width` bytes: 10 for values, 5 for tags and lengths (upb refuses longer ones
 * with DecodeError, while Go's protowire takes 10: nothing wider than the stricter parser passes). */
static int read_varint_long(const uint8_t **pp, const uint8_t *end, uint64_t *out, int width) {
    const uint8_t *p = *pp;
    uint64_t v = 0;
    for (int i = 0; i < width; i++) {
        if (p >= end) return 0;
        uint8_t b = *p++;
        if (i == 9 && b > 1) return 0;
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            *pp = p;
            *out = v;
            return 1;
        }
    }
    return 0;
}

#define VALUE_WIDTH 10
#define TAG_WIDTH 5 /* tags and length prefixes */

/* Most tags and lengths here are one byte. */
INLINE int read_varint_of(const uint8_t **pp, const uint8_t *end, uint64_t *out, int width) {
    const uint8_t *p = *pp;
    if (p < end && *p < 0x80) {
        *out = *p;
        *pp = p + 1;
        return 1;
    }
    return read_varint_long(pp, end, out, width);
}

INLINE int read_varint(const uint8_t **pp, const uint8_t *end, uint64_t *out) {
    return read_varint_of(pp, end, out, VALUE_WIDTH);
}

INLINE int read_length(const uint8_t **pp, const uint8_t *end, uint64_t *out) {
    return read_varint_of(pp, end, out, TAG_WIDTH);
}

INLINE int read_tag(const uint8_t **pp, const uint8_t *end, uint32_t *num, uint32_t *wt) {
    uint64_t tag;
    if (!read_varint_of(pp, end, &tag, TAG_WIDTH) || tag > 0xffffffffu || (tag >> 3) == 0) return 0;
    *num = (uint32_t)(tag >> 3);
    *wt = (uint32_t)(tag & 7);
    return 1;
}

/* Past a varint value, not decoded: as read_varint_long reads it (at most 10 bytes, the 10th 0 or 1). */
INLINE int skip_varint(const uint8_t **pp, const uint8_t *end) {
    const uint8_t *p = *pp;
    for (int i = 0; i < VALUE_WIDTH; i++) {
        if (p + i >= end) return 0;
        uint8_t b = p[i];
        if (!(b & 0x80)) {
            if (i == VALUE_WIDTH - 1 && b > 1) return 0;
            *pp = p + i + 1;
            return 1;
        }
    }
    return 0;
}

/* Past one value of wire type wt; v..*vend is a length-delimited payload. Groups: no. */
INLINE int skip_value(const uint8_t **pp, const uint8_t *end, uint32_t wt, const uint8_t **v) {
    uint64_t x;
    switch (wt) {
    case 0:
        *v = *pp;
        return skip_varint(pp, end);
    case 1:
        if (end - *pp < 8) return 0;
        *v = *pp;
        *pp += 8;
        return 1;
    case 2:
        if (!read_length(pp, end, &x) || x > (uint64_t)(end - *pp)) return 0;
        *v = *pp;
        *pp += x;
        return 1;
    case 5:
        if (end - *pp < 4) return 0;
        *v = *pp;
        *pp += 4;
        return 1;
    default:
        return 0;
    }
}

static int utf8_valid(const uint8_t *s, Py_ssize_t n) {
    Py_ssize_t i = 0;
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (!(w & 0x8080808080808080ull)) { i += 8; continue; }
        }
        uint8_t b = s[i];
        if (b < 0x80) { i++; continue; }
        int len;
        uint32_t cp;
        if (b >= 0xc2 && b <= 0xdf) { len = 2; cp = b & 0x1f; }
        else if (b >= 0xe0 && b <= 0xef) { len = 3; cp = b & 0x0f; }
        else if (b >= 0xf0 && b <= 0xf4) { len = 4; cp = b & 0x07; }
        else return 0;
        if (i + len > n) return 0;
        for (int k = 1; k < len; k++) {
            uint8_t cb = s[i + k];
            if ((cb & 0xc0) != 0x80) return 0;
            cp = (cp << 6) | (cb & 0x3f);
        }
        if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
            return 0;
        i += len;
    }
    return 1;
}

/* Most strings here are ASCII: their bytes are OR-ed a word at a time and the high bits tested
 * once (the last word overlaps the one before it); the rest go to utf8_valid. */
INLINE int utf8_ok(const uint8_t *s, Py_ssize_t n) {
    uint64_t acc = 0, w;
    if (n >= 8) {
        Py_ssize_t i = 0;
        for (; i + 8 < n; i += 8) {
            memcpy(&w, s + i, 8);
            acc |= w;
        }
        memcpy(&w, s + n - 8, 8);
        acc |= w;
    } else if (n >= 4) {
        uint32_t a, b;
        memcpy(&a, s, 4);
        memcpy(&b, s + n - 4, 4);
        acc = a | b;
    } else {
        for (Py_ssize_t i = 0; i < n; i++) acc |= s[i];
    }
    return (acc & 0x8080808080808080ull) ? utf8_valid(s, n) : 1;
}

INLINE int wire_type(uint8_t type) {
    switch (type) {
    case T_VARINT: return 0;
    case T_FIXED64: return 1;
    case T_FIXED32: return 5;
    default: return 2;
    }
}

INLINE int same(Slice a, const uint8_t *p, Py_ssize_t n) { return a.n == n && memcmp(a.p, p, (size_t)n) == 0; }

/* ---- the walk ---------------------------------------------------------------------- */

static int walk(Ctx *c, int mi, const uint8_t *p, const uint8_t *end, int depth, int emit);
static int check(Ctx *c, int mi, const uint8_t *p, const uint8_t *end, int depth);
static int event(Ctx *c, const Field *f, const uint8_t *tag, const uint8_t *tag_end, const uint8_t *v,
                 const uint8_t *end, Py_ssize_t index);
static int private_allowlist(Ctx *c, const uint8_t *tag, const uint8_t *tag_end, const uint8_t *p, const uint8_t *end);

/* A map entry's key (the entry itself is checked by walking it as a message). */
INLINE int map_key(const uint8_t *p, const uint8_t *end, Slice *key) {
    key->p = p;
    key->n = 0;
    while (p < end) {
        uint32_t num, wt;
        const uint8_t *v;
        if (!read_tag(&p, end, &num, &wt) || !skip_value(&p, end, wt, &v)) return FALLBACK;
        if (num == 1 && wt == 2) *key = (Slice){v, p - v};
    }
    return OK;
}

/* A map entry in the form every encoder writes: key, then a scalar or string value, each
 * with one-byte lengths, nothing else. Checked here without a walk (1 = it is; key set). */
INLINE int plain_entry(const Field *map, const uint8_t *v, const uint8_t *end, Slice *key) {
    if (end - v < 2 || v[0] != 0x0a || v[1] >= 0x80 || v[1] > end - v - 2) return 0;
    *key = (Slice){v + 2, v[1]};
    const uint8_t *q = v + 2 + v[1];
    if (q < end) {
        if (!map->entry_value) return 0;
        uint8_t type = (uint8_t)(map->entry_value - 1);
        switch (type) {
        case T_STRING:
        case T_BYTES:
            if (end - q < 2 || q[0] != 0x12 || q[1] >= 0x80 || q + 2 + q[1] != end) return 0;
            if (type == T_STRING && !utf8_ok(q + 2, q[1])) return 0;
            break;
        case T_FIXED64:
            if (q[0] != 0x11 || end - q != 9) return 0;
            break;
        case T_FIXED32:
            if (q[0] != 0x15 || end - q != 5) return 0;
            break;
        case T_VARINT: {
            uint64_t x;
            q++;
            if (v[2 + v[1]] != 0x10 || !read_varint(&q, end, &x) || q != end) return 0;
            break;
        }
        default:
            return 0;
        }
    }
    return utf8_ok(key->p, key->n);
}

/* Whether a dropped field counts as removed: as the Python remover sees it (HasField, a
 * non-default value for implicit presence, a non-empty repeated field). */
INLINE int is_set(const Field *f, const uint8_t *v, const uint8_t *end) {
    if (!(f->flags & F_IMPLICIT) || (f->flags & F_REPEATED)) return 1;
    switch (f->type) {
    case T_VARINT: {
        uint64_t x = 0;
        read_varint(&v, end, &x);
        return (f->flags & F_INT32) ? (uint32_t)x != 0 : x != 0; /* 2**32 is an int32 0 to a parser */
    }
    case T_FIXED64: {
        uint64_t x;
        memcpy(&x, v, 8);
        return (f->flags & F_FLOAT) ? (x << 1) != 0 : x != 0; /* 0.0 and -0.0 are both "not set" to Python */
    }
    case T_FIXED32: {
        uint32_t x;
        memcpy(&x, v, 4);
        return (f->flags & F_FLOAT) ? (uint32_t)(x << 1) != 0 : x != 0;
    }
    default:
        return end > v;
    }
}

/* What a message's walk remembers of its fields: singular ones, oneofs, map keys. */
typedef struct {
    uint64_t seen;
    uint32_t oneofs;
    int nkeys;
    uint8_t slots[2 * 64];       /* the keys by fingerprint: index + 1, 0 = empty (filled at LINEAR_KEYS keys) */
    uint32_t key_maps[MAX_KEYS]; /* keys[i] is a key of the map field key_maps[i] */
    uint64_t prints[MAX_KEYS];   /* keys[i]'s fingerprint: compared before the bytes */
    Slice keys[MAX_KEYS];
} Seen;

/* One field: start..tag_end its tag, v..end its value (a length-delimited one's content). */
typedef struct {
    const uint8_t *start, *tag_end, *v, *end;
    const Field *f; /* NULL: a field number the message does not know */
    uint32_t num;
} Head;

/* The next field, read, bounded and checked against the message's table: its wire type, a
 * singular field or oneof given twice, a string's UTF-8. */
INLINE int next_field(const Msg *m, const uint8_t *p, const uint8_t *end, Seen *s, Head *h) {
    uint32_t wt;
    const Field *f;
    h->start = p;
    if (*p < 0x80 && m->tag1[*p]) { /* the common case: p < end, as every caller's loop has it */
        h->num = *p >> 3;
        wt = *p & 7;
        f = &m->fields[h->num];
        p++;
    } else {
        if (!read_tag(&p, end, &h->num, &wt)) return FALLBACK;
        f = h->num <= (uint32_t)m->max && m->fields[h->num].known ? &m->fields[h->num] : NULL;
        if (f == NULL) {
            h->tag_end = p;
            h->f = NULL;
            if (m->strict || !skip_value(&p, end, wt, &h->v)) return FALLBACK;
            h->end = p;
            return OK;
        }
        if (wt != (uint32_t)wire_type(f->type)) return FALLBACK;
    }
    h->tag_end = p;
    h->f = f;
    if (!skip_value(&p, end, wt, &h->v)) return FALLBACK;
    h->end = p;
    if (!(f->flags & F_REPEATED)) {
        if (s->seen & (1ull << h->num)) return FALLBACK;
        s->seen |= 1ull << h->num;
    }
    if (f->oneof >= 0) {
        if (s->oneofs & (1u << f->oneof)) return FALLBACK;
        s->oneofs |= 1u << f->oneof;
    }
    if (f->type == T_STRING && !utf8_ok(h->v, h->end - h->v)) return FALLBACK;
    return OK;
}

/* Equal keys of the same map have equal fingerprints: the map's number, the length, and the
 * first and last (up to) 8 bytes. */
INLINE uint64_t fingerprint(uint32_t num, Slice key) {
    uint64_t head = 0, tail = 0;
    if (key.n >= 8) {
        memcpy(&head, key.p, 8);
        memcpy(&tail, key.p + key.n - 8, 8);
    } else {
        memcpy(&head, key.p, (size_t)key.n);
    }
    return (head * 0x9e3779b97f4a7c15ull) ^ tail ^ ((uint64_t)key.n << 48) ^ num;
}

/* A map entry's key, against the keys of the same map seen before (a key given twice would
 * shadow a value). *plain: the entry was checked whole here; otherwise it is walked. */
INLINE uint32_t key_slot(uint64_t print) {
    uint64_t x = print ^ (print >> 33); /* murmur3's finalizer: the slot depends on every byte read */
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return (uint32_t)x;
}

/* The keys seen so far go into the hash table (from LINEAR_KEYS keys on). */
static void hash_keys(Seen *s) {
    uint32_t mask = sizeof s->slots - 1;
    memset(s->slots, 0, sizeof s->slots);
    for (int k = 0; k < s->nkeys; k++) {
        uint32_t i = key_slot(s->prints[k]) & mask;
        while (s->slots[i]) i = (i + 1) & mask;
        s->slots[i] = (uint8_t)(k + 1);
    }
}

INLINE int map_entry_key(const Head *h, Seen *s, int *plain) {
    Slice key;
    *plain = plain_entry(h->f, h->v, h->end, &key);
    if ((!*plain && map_key(h->v, h->end, &key) != OK) || s->nkeys == MAX_KEYS) return FALLBACK;
    uint64_t print = fingerprint(h->num, key);
    if (s->nkeys < LINEAR_KEYS) { /* most maps here are small: compared one by one, no table */
        for (int k = 0; k < s->nkeys; k++)
            if (s->prints[k] == print && s->key_maps[k] == h->num && same(s->keys[k], key.p, key.n)) return FALLBACK;
    } else {
        uint32_t mask = sizeof s->slots - 1, i = key_slot(print) & mask;
        for (; s->slots[i]; i = (i + 1) & mask) {
            int k = s->slots[i] - 1;
            if (s->prints[k] == print && s->key_maps[k] == h->num && same(s->keys[k], key.p, key.n)) return FALLBACK;
        }
        s->slots[i] = (uint8_t)(s->nkeys + 1);
    }
    s->key_maps[s->nkeys] = h->num;
    s->prints[s->nkeys] = print;
    s->keys[s->nkeys++] = key;
    if (s->nkeys == LINEAR_KEYS) hash_keys(s);
    return OK;
}

/* A message nothing inside of which is governed by a rule: checked as a parser would, no output. */
static int check(Ctx *c, int mi, const uint8_t *p, const uint8_t *end, int depth) {
    if (depth > MAX_DEPTH) return FALLBACK;
    const Plan *plan = c->plan;
    const Msg *m = &plan->msgs[mi];
    Seen s;
    s.seen = 0;
    s.oneofs = 0;
    s.nkeys = 0;
    Head h;
    while (p < end) {
        int r = next_field(m, p, end, &s, &h);
        if (r != OK) return r;
        p = h.end;
        if (h.f == NULL) {
            c->saw_unknown = 1;
            continue;
        }
        if (h.f->type != T_MESSAGE) continue;
        int plain = 0;
        if ((h.f->flags & F_MAP) && (r = map_entry_key(&h, &s, &plain)) != OK) return r;
        if (!plain && (r = check(c, h.f->child, h.v, h.end, depth + 1)) != OK) return r;
    }
    return OK;
}

/* The keys of a private_metadata removed whole (a Struct already checked: no key twice), as
 * c->gone: the record names them and counts them, 1 each, as the reference does. */
static int whole_keys(Ctx *c, const uint8_t *p, const uint8_t *end) {
    while (p < end) {
        uint32_t num, wt;
        const uint8_t *entry;
        if (!read_tag(&p, end, &num, &wt) || !skip_value(&p, end, wt, &entry)) return FALLBACK;
        if (num != 1) continue; /* an unknown field of the Struct: goes with it */
        Slice key;
        if (wt != 2 || map_key(entry, p, &key) != OK || c->ngone == MAX_KEYS) return FALLBACK;
        c->gone[c->ngone++] = key;
    }
    return OK;
}

/* A message, field by field: copied, skipped or rewritten (emit), or only checked (!emit).
 * Fields kept as they came are copied in runs: a field that follows the run is added to it, and the
 * run is written out (flush) before anything else is written and at the end. */
static int walk(Ctx *c, int mi, const uint8_t *p, const uint8_t *end, int depth, int emit) {
    if (depth > MAX_DEPTH) return FALLBACK;
    const Plan *plan = c->plan;
    const Msg *m = &plan->msgs[mi];
    if (!emit && m->clean) return check(c, mi, p, end, depth);
    Seen s;
    s.seen = 0;
    s.oneofs = 0;
    s.nkeys = 0;
    Head h;
    Py_ssize_t index = 0;
    const uint8_t *run = NULL, *run_end = NULL; /* input bytes kept as they came, not yet written */
#define KEEP(from, to)                                                                                  \
    do {                                                                                                \
        if (run_end != (from)) {                                                                        \
            if (run != NULL && put(c, run, run_end - run) < 0) return FAIL;                            \
            run = (from);                                                                               \
        }                                                                                               \
        run_end = (to);                                                                                 \
    } while (0)
#define FLUSH()                                                                                         \
    do {                                                                                                \
        if (run != NULL && put(c, run, run_end - run) < 0) return FAIL;                                \
        run = run_end = NULL;                                                                           \
    } while (0)
    while (p < end) {
        int r = next_field(m, p, end, &s, &h);
        if (r != OK) return r;
        p = h.end;
        const Field *f = h.f;
        if (f == NULL) {
            c->saw_unknown = 1;
            if (emit && plan->discard_unknown) c->flags |= REC_UNKNOWN; /* left out of what leaves */
            if (emit && !plan->discard_unknown) KEEP(h.start, h.end);
            continue;
        }
        int keep = emit && f->drop < 0;
        if (emit && f->drop >= 0 && is_set(f, h.v, h.end)) c->drops |= 1ull << f->drop;
        switch (f->role) {
        case R_FALLBACK:
            return FALLBACK;
        case R_EVENT:
            if (!emit) return FALLBACK;
            FLUSH();
            if ((r = event(c, f, h.start, h.tag_end, h.v, h.end, index++)) != OK) return r;
            continue;
        case R_MARKETING:
            if (plan->drop_marketing) { /* a dropped field is not read (as the view's bytes field) */
                if (emit) c->flags |= REC_MARKETING;
                continue;
            }
            break;
        case R_LEGACY:
            if (emit && plan->merge_legacy) return FALLBACK; /* merged by the Python engine */
            break;
        case R_ITEM: {
            if (!emit) return FALLBACK;
            uint64_t outer = c->drops;
            Len len;
            FLUSH();
            c->drops = 0;
            if (put(c, h.start, h.tag_end - h.start) < 0 || open_len(c, &len, h.end - h.v) < 0) return FAIL;
            if ((r = walk(c, f->child, h.v, h.end, depth + 1, 1)) != OK) return r;
            if (close_len(c, &len) < 0) return FAIL;
            for (uint64_t d = c->drops; d; d &= d - 1) c->n_drops[__builtin_ctzll(d)]++;
            c->drops = outer;
            c->events_in++;
            c->events_out++;
            continue;
        }
        case R_PRIVATE:
            if (!emit || plan->private_mode == MODE_KEEP) break;
            if (plan->private_mode == MODE_ALLOWLIST && c->keys != NULL) {
                FLUSH();
                if ((r = private_allowlist(c, h.start, h.tag_end, h.v, h.end)) != OK) return r;
                continue;
            }
            c->flags |= REC_PRIVATE_WHOLE; /* checked as the reference parses it; its keys named */
            if ((r = walk(c, f->child, h.v, h.end, depth + 1, 0)) != OK || (r = whole_keys(c, h.v, h.end)) != OK)
                return r;
            continue;
        default:
            break;
        }
        if (f->type != T_MESSAGE) {
            if (keep) KEEP(h.start, h.end);
            continue;
        }
        int plain = 0;
        if ((f->flags & F_MAP) && (r = map_entry_key(&h, &s, &plain)) != OK) return r;
        if (plain) {
            if (keep) KEEP(h.start, h.end);
            continue;
        }
        if (keep && f->child_clean) { /* checked, then copied as it came */
            int saw = c->saw_unknown;
            c->saw_unknown = 0;
            if ((r = check(c, f->child, h.v, h.end, depth + 1)) != OK) return r;
            int rewrite = c->saw_unknown && plan->discard_unknown;
            c->saw_unknown |= saw;
            if (rewrite) c->flags |= REC_UNKNOWN;
            if (!rewrite) {
                KEEP(h.start, h.end);
                continue;
            }
        }
        if (keep) {
            Len len;
            FLUSH();
            if (put(c, h.start, h.tag_end - h.start) < 0 || open_len(c, &len, h.end - h.v) < 0) return FAIL;
            if ((r = walk(c, f->child, h.v, h.end, depth + 1, 1)) != OK) return r;
            if (close_len(c, &len) < 0) return FAIL;
            continue;
        }
        if ((r = walk(c, f->child, h.v, h.end, depth + 1, 0)) != OK) return r;
    }
    FLUSH();
#undef KEEP
#undef FLUSH
    return OK;
}

/* ---- events ------------------------------------------------------------------------ */

static PyObject *decode(Slice s) { return PyUnicode_DecodeUTF8((const char *)s.p, s.n, "strict"); }

/* (dropped_by, invalid, keys) for an event type: asked of Python once per type and call. */
static uint32_t type_hash(Slice feature, Slice action) {
    uint64_t x = fingerprint(1, feature) * 0x9e3779b97f4a7c15ull ^ fingerprint(2, action);
    x ^= x >> 33; /* murmur3's finalizer: every input bit reaches the low bits the table uses */
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return (uint32_t)x;
}

static int remember_allowed(Ctx *c, TypeMemo *t);
static int grow(void **array, Py_ssize_t *cap, Py_ssize_t need, size_t size);

static int resolve(Ctx *c, Slice feature, Slice action, PyObject **out, const TypeMemo **memo) {
    uint32_t h = type_hash(feature, action), mask = 2 * MAX_TYPES - 1, i = h & mask;
    for (; c->slots[i]; i = (i + 1) & mask) {
        TypeMemo *t = &c->memo[c->slots[i] - 1];
        if (t->hash == h && same(t->feature, feature.p, feature.n) && same(t->action, action.p, action.n)) {
            *out = t->resolved;
            *memo = t;
            return OK;
        }
    }
    if (!utf8_ok(feature.p, feature.n) || !utf8_ok(action.p, action.n)) return FALLBACK;
    /* Plan.types: keyed by the feature's length (4 bytes), the feature and the action */
    PyObject *key = PyBytes_FromStringAndSize(NULL, 4 + feature.n + action.n);
    if (key == NULL) return FAIL;
    uint8_t *k = (uint8_t *)PyBytes_AS_STRING(key);
    uint32_t fn = (uint32_t)feature.n;
    memcpy(k, &fn, 4);
    memcpy(k + 4, feature.p, (size_t)feature.n);
    memcpy(k + 4 + feature.n, action.p, (size_t)action.n);
    PyObject *r = PyDict_GetItemWithError(c->plan->types, key);
    if (r != NULL) {
        Py_INCREF(r);
    } else if (PyErr_Occurred()) {
        Py_DECREF(key);
        return FAIL;
    } else {
        PyObject *f = decode(feature), *a = f ? decode(action) : NULL;
        r = a ? PyObject_CallFunctionObjArgs(c->resolve, f, a, NULL) : NULL;
        Py_XDECREF(f);
        Py_XDECREF(a);
        if (r == NULL) {
            Py_DECREF(key);
            return FAIL;
        }
        if (!PyTuple_Check(r) || PyTuple_GET_SIZE(r) != 3 ||
            (PyTuple_GET_ITEM(r, 0) != Py_None && !PyUnicode_Check(PyTuple_GET_ITEM(r, 0))) ||
            (PyTuple_GET_ITEM(r, 2) != Py_None && !PyAnySet_Check(PyTuple_GET_ITEM(r, 2)))) {
            Py_DECREF(r);
            Py_DECREF(key);
            PyErr_SetString(PyExc_TypeError,
                            "resolve must return (dropped_by: str | None, invalid, keys: frozenset | None)");
            return FAIL;
        }
        if (PyDict_GET_SIZE(c->plan->types) >= MAX_REMEMBERED) PyDict_Clear(c->plan->types);
        if (PyDict_SetItem(c->plan->types, key, r) < 0) {
            Py_DECREF(r);
            Py_DECREF(key);
            return FAIL;
        }
    }
    Py_DECREF(key);
    *out = r;
    if (c->nmemo == MAX_TYPES) { /* full: kept only while its event is processed (one at a time) */
        Py_XSETREF(c->overflow, r);
        *memo = NULL;
        return OK;
    }
    TypeMemo *t = &c->memo[c->nmemo];
    *t = (TypeMemo){feature, action, h, r, -1, 0};
    c->slots[i] = (uint8_t)++c->nmemo; /* i: the empty slot the search ended on */
    *memo = t;
    return remember_allowed(c, t);
}

/* A memoized type's allowlisted keys as slices of the frozenset's bytes (alive as long as the
 * memo holds the type): compared in C, without a bytes object and a hash per key. */
static int remember_allowed(Ctx *c, TypeMemo *t) {
    PyObject *keys = PyTuple_GET_ITEM(t->resolved, 2);
    if (keys == Py_None || PySet_GET_SIZE(keys) > MAX_ALLOWED) return OK;
    Py_ssize_t need = c->nallowed_keys + PySet_GET_SIZE(keys);
    if (grow((void **)&c->allowed_keys, &c->capallowed_keys, need, sizeof(Slice)) < 0 ||
        grow((void **)&c->allowed_fp, &c->capallowed_fp, need, sizeof(uint64_t)) < 0)
        return FAIL;
    Py_ssize_t pos = 0, at = c->nallowed_keys;
    Py_hash_t hash;
    PyObject *key;
    while (_PySet_NextEntry(keys, &pos, &key, &hash)) {
        if (!PyBytes_Check(key)) { /* not bytes: the set decides */
            c->nallowed_keys = at;
            return OK;
        }
        Slice k = {(const uint8_t *)PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)};
        c->allowed_keys[c->nallowed_keys] = k;
        c->allowed_fp[c->nallowed_keys++] = fingerprint(0, k);
    }
    t->allowed_at = at;
    t->nallowed = (int)(c->nallowed_keys - at);
    return OK;
}

static PyObject *key_tuple(const Slice *keys, int n) {
    PyObject *t = PyTuple_New(n);
    if (t == NULL) return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *s = decode(keys[i]);
        if (s == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, s);
    }
    return t;
}

static int grow(void **array, Py_ssize_t *cap, Py_ssize_t need, size_t size) {
    if (need <= *cap) return OK;
    Py_ssize_t more = *cap ? *cap * 2 : 64;
    while (more < need) more *= 2;
    void *bigger = PyMem_Realloc(*array, (size_t)more * size);
    if (bigger == NULL) {
        PyErr_NoMemory();
        return FAIL;
    }
    *array = bigger;
    *cap = more;
    return OK;
}

/* A record for an event something happened to; an event removed whole also gives its id now. */
static int add_record(Ctx *c, Py_ssize_t index, Slice id, Slice feature, Slice action, PyObject *dropped_by) {
    if (!utf8_ok(id.p, id.n)) return FALLBACK; /* the reference refuses it */
    if (grow((void **)&c->recs, &c->caprecs, c->nrecs + 1, sizeof(Rec)) < 0 ||
        grow((void **)&c->rec_keys, &c->caprec_keys, c->nrec_keys + c->ngone + c->nwrong, sizeof(Slice)) < 0)
        return FAIL;
    Rec *rec = &c->recs[c->nrecs++];
    *rec = (Rec){index, id, feature, action, NULL, c->flags, c->drops, c->nrec_keys, c->ngone, c->nwrong};
    if (c->ngone) memcpy(c->rec_keys + c->nrec_keys, c->gone, (size_t)c->ngone * sizeof(Slice));
    if (c->nwrong) memcpy(c->rec_keys + c->nrec_keys + c->ngone, c->wrong, (size_t)c->nwrong * sizeof(Slice));
    c->nrec_keys += c->ngone + c->nwrong;
    if (dropped_by == NULL) return OK;
    rec->dropped_by = Py_NewRef(dropped_by);
    PyObject *sid = decode(id);
    if (sid == NULL) return FAIL;
    PyObject *n = PyDict_GetItemWithError(c->dropped_rules, dropped_by);
    Py_ssize_t count = n == NULL ? 0 : PyLong_AsSsize_t(n);
    PyObject *more = PyErr_Occurred() ? NULL : PyLong_FromSsize_t(count + 1);
    int r = more == NULL || PyDict_SetItem(c->dropped_rules, dropped_by, more) < 0 || PyList_Append(c->dropped_ids, sid) < 0
                ? FAIL
                : OK;
    Py_XDECREF(more);
    Py_DECREF(sid);
    return r;
}

/* ---- the Records type: a call's records, built as Python objects only when asked ---- */

typedef struct {
    PyObject_HEAD
    PyObject *data; /* the payload the slices point into */
    Rec *recs;
    Py_ssize_t nrecs;
    Slice *keys;
} Records;

static void records_dealloc(Records *self) {
    for (Py_ssize_t i = 0; i < self->nrecs; i++) Py_XDECREF(self->recs[i].dropped_by);
    PyMem_Free(self->recs);
    PyMem_Free(self->keys);
    Py_XDECREF(self->data);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *records_tuple(const Records *self, const Rec *rec) {
    PyObject *items[9] = {
        PyLong_FromSsize_t(rec->index),
        decode(rec->id),
        decode(rec->feature),
        decode(rec->action),
        Py_NewRef(rec->dropped_by ? rec->dropped_by : Py_None),
        PyLong_FromUnsignedLong(rec->flags),
        rec->ngone ? key_tuple(self->keys + rec->keys_at, rec->ngone) : Py_NewRef(Py_None),
        rec->nwrong ? key_tuple(self->keys + rec->keys_at + rec->ngone, rec->nwrong) : Py_NewRef(Py_None),
        PyLong_FromUnsignedLongLong((unsigned long long)rec->drops),
    };
    PyObject *t = PyTuple_New(9);
    for (int i = 0; i < 9; i++) {
        if (items[i] == NULL) Py_CLEAR(t);
        if (t != NULL) PyTuple_SET_ITEM(t, i, items[i]);
        else Py_XDECREF(items[i]);
    }
    return t;
}

PyDoc_STRVAR(records_build_doc,
             "build() -> list of (index, id, feature, action, dropped_by, flags, gone, wrong, drops)");

static PyObject *records_build(Records *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyList_New(self->nrecs);
    for (Py_ssize_t i = 0; out != NULL && i < self->nrecs; i++) {
        PyObject *t = records_tuple(self, &self->recs[i]);
        if (t == NULL) Py_CLEAR(out);
        else PyList_SET_ITEM(out, i, t);
    }
    return out;
}

static Py_ssize_t records_len(Records *self) { return self->nrecs; }

static PyMethodDef records_methods[] = {
    {"build", (PyCFunction)records_build, METH_NOARGS, records_build_doc},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods records_sequence = {.sq_length = (lenfunc)records_len};

static PyTypeObject RecordsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "telemetry_guard.policy._wirefilter.Records",
    .tp_basicsize = sizeof(Records),
    .tp_dealloc = (destructor)records_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The records of one filter call, as slices of its payload until build() is called.",
    .tp_methods = records_methods,
    .tp_as_sequence = &records_sequence,
};

/* The event's own fields that decide its fate, read before anything of it is written. */
static int event_header(const uint8_t *p, const uint8_t *end, Slice *id, Slice *feature, Slice *action, int *stamped) {
    int seen = 0;
    while (p < end) {
        uint32_t num, wt;
        const uint8_t *v;
        if (!read_tag(&p, end, &num, &wt) || !skip_value(&p, end, wt, &v)) return FALLBACK;
        if (num > 4) continue;
        if (wt != 2 || (seen & (1 << num))) return FALLBACK; /* the walk would refuse it too */
        seen |= 1 << num;
        Slice s = {v, p - v};
        if (num == 1) *id = s;
        else if (num == 2) *stamped = 1;
        else if (num == 3) *feature = s;
        else *action = s;
    }
    return OK;
}

/* One event: tag..v its tag and length, v..end its content. Removed whole, or written filtered. */
static int event(Ctx *c, const Field *f, const uint8_t *tag, const uint8_t *tag_end, const uint8_t *v,
                 const uint8_t *end, Py_ssize_t index) {
    const Plan *plan = c->plan;
    Slice id = {v, 0}, feature = {v, 0}, action = {v, 0};
    int stamped = 0;
    int r = event_header(v, end, &id, &feature, &action, &stamped);
    if (r != OK) return r;
    PyObject *type;
    const TypeMemo *memo;
    if ((r = resolve(c, feature, action, &type, &memo)) != OK) return r;
    PyObject *dropped_by = PyTuple_GET_ITEM(type, 0);
    if (dropped_by == Py_None) dropped_by = NULL;
    if (dropped_by == NULL && plan->drop_invalid) {
        int invalid = PyObject_IsTrue(PyTuple_GET_ITEM(type, 1));
        if (invalid < 0) return FAIL;
        if (invalid || id.n == 0 || !stamped) dropped_by = plan->invalid_rule;
    }
    c->flags = 0;
    c->drops = 0;
    c->ngone = c->nwrong = 0;
    c->keys = PyTuple_GET_ITEM(type, 2) == Py_None ? NULL : PyTuple_GET_ITEM(type, 2);
    c->nallowed = memo == NULL ? -1 : memo->nallowed;
    c->allowed = c->nallowed < 0 ? NULL : c->allowed_keys + memo->allowed_at;
    c->allowed_prints = c->nallowed < 0 ? NULL : c->allowed_fp + memo->allowed_at;
    c->events_in++;
    if (dropped_by != NULL) { /* checked as the reference parses it, then left out */
        if ((r = walk(c, f->child, v, end, 2, 0)) != OK) return r;
        return add_record(c, index, id, feature, action, dropped_by);
    }
    c->events_out++;
    Len len;
    if (put(c, tag, tag_end - tag) < 0 || open_len(c, &len, end - v) < 0) return FAIL;
    if ((r = walk(c, f->child, v, end, 2, 1)) != OK) return r;
    if (close_len(c, &len) < 0) return FAIL;
    if (!(c->flags || c->drops || c->ngone || c->nwrong)) return OK;
    c->n_marketing += (c->flags & REC_MARKETING) != 0;
    c->n_private_whole += (c->flags & REC_PRIVATE_WHOLE) && c->ngone == 0; /* else its keys count, 1 each */
    c->n_gone += c->ngone;
    c->n_unknown += (c->flags & REC_UNKNOWN) != 0;
    c->n_wrong += c->nwrong;
    for (uint64_t d = c->drops; d; d &= d - 1) c->n_drops[__builtin_ctzll(d)]++;
    return add_record(c, index, id, feature, action, NULL);
}

/* An entry {key, Value{string_value: s}}, written anew. */
static int put_string_entry(Ctx *c, Slice key, const uint8_t *s, Py_ssize_t n) {
    uint64_t value_len = 1 + (uint64_t)varint_size((uint64_t)n) + (uint64_t)n;
    uint64_t entry_len =
        1 + (uint64_t)varint_size((uint64_t)key.n) + (uint64_t)key.n + 1 + (uint64_t)varint_size(value_len) + value_len;
    if (put_varint(c, 0x0a) < 0 || put_varint(c, entry_len) < 0 || put_varint(c, 0x0a) < 0 ||
        put_varint(c, (uint64_t)key.n) < 0 || put(c, key.p, key.n) < 0 || put_varint(c, 0x12) < 0 ||
        put_varint(c, value_len) < 0 || put_varint(c, 0x1a) < 0 || put_varint(c, (uint64_t)n) < 0 || put(c, s, n) < 0)
        return FAIL;
    return OK;
}

/* private_metadata under an allowlist entry (c->keys): allowlisted keys with string values
 * stay; other keys go; a non-string value goes or is replaced. As the Python engine: the
 * Struct is checked as a parser would, and unknown fields go when the kind discards them. */
static int private_allowlist(Ctx *c, const uint8_t *tag, const uint8_t *tag_end, const uint8_t *p, const uint8_t *end) {
    const Plan *plan = c->plan;
    Len len;
    if (put(c, tag, tag_end - tag) < 0 || open_len(c, &len, end - p) < 0) return FAIL;
    Slice keys[MAX_KEYS];
    int nkeys = 0;
    while (p < end) {
        const uint8_t *start = p, *entry;
        uint32_t num, wt;
        if (!read_tag(&p, end, &num, &wt) || !skip_value(&p, end, wt, &entry)) return FALLBACK;
        if (num != 1) { /* an unknown field of the Struct */
            c->saw_unknown = 1;
            if (!plan->discard_unknown && put(c, start, p - start) < 0) return FAIL;
            continue;
        }
        if (wt != 2) return FALLBACK;
        /* the entry: key 1 (string) and value 2 (Value), each at most once, nothing else */
        Slice key = {entry, 0}, value = {NULL, 0};
        int seen = 0;
        for (const uint8_t *q = entry; q < p;) {
            const uint8_t *fv;
            uint32_t fn, fw;
            if (!read_tag(&q, p, &fn, &fw) || fn > 2 || fw != 2 || (seen & (1 << fn)) || !skip_value(&q, p, fw, &fv))
                return FALLBACK;
            seen |= 1 << fn;
            if (fn == 1) key = (Slice){fv, q - fv};
            else value = (Slice){fv, q - fv};
        }
        if (!utf8_ok(key.p, key.n) || nkeys == MAX_KEYS) return FALLBACK;
        for (int k = 0; k < nkeys; k++)
            if (same(keys[k], key.p, key.n)) return FALLBACK;
        keys[nkeys++] = key;
        /* the value, checked as the reference parses it; which kind it holds */
        Slice string = {NULL, 0};
        int unknown_inside = 0, kind = 0; /* kind: the Value field holding its value, 0 = none */
        if (value.p != NULL) {
            int saw = c->saw_unknown;
            c->saw_unknown = 0;
            int r = walk(c, plan->value_msg, value.p, value.p + value.n, 3, 0);
            if (r != OK) return r;
            unknown_inside = c->saw_unknown;
            c->saw_unknown |= saw;
            const uint8_t *vp = value.p, *vv = NULL, *vend = value.p + value.n;
            while (vp < vend) { /* the walk allowed one kind at most */
                uint32_t vn = 0, vw = 0;
                if (!read_tag(&vp, vend, &vn, &vw) || !skip_value(&vp, vend, vw, &vv)) return FALLBACK;
                if (vn == 3 && vw == 2) string = (Slice){vv, vp - vv};
                if (vn < REPLACEMENTS) kind = (int)vn;
            }
        }
        int allowed = 0;
        if (c->nallowed >= 0) {
            uint64_t print = fingerprint(0, key);
            for (int k = 0; k < c->nallowed && !allowed; k++)
                allowed = c->allowed_prints[k] == print && same(c->allowed[k], key.p, key.n);
        } else {
            PyObject *kb = PyBytes_FromStringAndSize((const char *)key.p, key.n);
            if (kb == NULL) return FAIL;
            allowed = PySet_Contains(c->keys, kb);
            Py_DECREF(kb);
            if (allowed < 0) return FAIL;
        }
        if (!allowed) {
            c->gone[c->ngone++] = key;
        } else if (string.p != NULL) {
            int r = unknown_inside && plan->discard_unknown ? put_string_entry(c, key, string.p, string.n)
                                                            : put(c, start, p - start);
            if (r < 0) return FAIL;
        } else {
            c->wrong[c->nwrong++] = key;
            /* replaced: nothing of the old value survives, unknown fields included */
            if (plan->replacement != NULL) {
                PyObject *with = PyTuple_GET_ITEM(plan->replacement, kind);
                if (put_string_entry(c, key, (const uint8_t *)PyBytes_AS_STRING(with), PyBytes_GET_SIZE(with)) < 0)
                    return FAIL;
            }
        }
    }
    return close_len(c, &len);
}

/* ---- the Plan type ----------------------------------------------------------------- */

static void plan_dealloc(Plan *self) {
    PyMem_Free(self->msgs);
    Py_XDECREF(self->replacement);
    Py_XDECREF(self->invalid_rule);
    Py_XDECREF(self->types);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int parse_messages(Plan *self, PyObject *messages) {
    if (!PyList_Check(messages) || PyList_GET_SIZE(messages) == 0 || PyList_GET_SIZE(messages) > MAX_MESSAGES) {
        PyErr_SetString(PyExc_ValueError, "messages: a non-empty list of at most 64 field lists");
        return -1;
    }
    self->nmsgs = (int)PyList_GET_SIZE(messages);
    self->msgs = PyMem_Calloc((size_t)self->nmsgs, sizeof(Msg));
    if (self->msgs == NULL) { PyErr_NoMemory(); return -1; }
    for (int i = 0; i < self->nmsgs; i++) {
        PyObject *spec = PyList_GET_ITEM(messages, i);
        PyObject *fields;
        int strict, clean;
        if (!PyArg_ParseTuple(spec, "Opp", &fields, &strict, &clean)) return -1;
        Msg *m = &self->msgs[i];
        m->strict = strict;
        m->clean = clean;
        PyObject *seq = PySequence_Fast(fields, "fields: a sequence");
        if (seq == NULL) return -1;
        for (Py_ssize_t k = 0; k < PySequence_Fast_GET_SIZE(seq); k++) {
            int num, type, flags, role, oneof, drop, child;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, k), "iiiiiii", &num, &type, &flags, &role, &oneof, &drop,
                                  &child)) {
                Py_DECREF(seq);
                return -1;
            }
            if (num < 1 || num > MAX_FIELD || type < T_VARINT || type > T_FIXED32 || oneof < -1 || oneof > 31 ||
                drop < -1 || drop > 63 || (type == T_MESSAGE && (child < 0 || child >= self->nmsgs)) || role < R_NONE ||
                role > R_ITEM || ((role == R_EVENT || role == R_ITEM) && type != T_MESSAGE)) {
                Py_DECREF(seq);
                PyErr_Format(PyExc_ValueError, "message %d: field %d is out of range", i, num);
                return -1;
            }
            Field *f = &m->fields[num];
            f->known = 1;
            f->type = (uint8_t)type;
            f->flags = (uint8_t)flags;
            f->role = (uint8_t)role;
            f->oneof = (int8_t)oneof;
            f->drop = (int8_t)drop;
            f->child = (int16_t)child;
            if (num > m->max) m->max = num;
            if (num < 16) m->tag1[(num << 3) | wire_type(f->type)] = 1;
        }
        Py_DECREF(seq);
    }
    for (int i = 0; i < self->nmsgs; i++) { /* what the walk reads of a field's child, on the field */
        Msg *m = &self->msgs[i];
        for (int num = 1; num <= m->max; num++) {
            Field *f = &m->fields[num];
            if (!f->known || f->type != T_MESSAGE) continue;
            const Msg *child = &self->msgs[f->child];
            f->child_clean = (uint8_t)child->clean;
            f->entry_value = child->fields[2].known ? (uint8_t)(1 + child->fields[2].type) : 0;
        }
    }
    return 0;
}

static PyObject *plan_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"messages", "root", "value", "drop_marketing", "private_mode", "merge_legacy",
                            "discard_unknown", "drop_invalid", "replacement", "invalid_rule", NULL};
    PyObject *messages, *replacement, *invalid_rule;
    int root, value, drop_marketing, private_mode, merge_legacy, discard_unknown, drop_invalid;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!iipipppOU", names, &PyList_Type, &messages, &root, &value,
                                     &drop_marketing, &private_mode, &merge_legacy, &discard_unknown, &drop_invalid,
                                     &replacement, &invalid_rule))
        return NULL;
    if (replacement != Py_None) {
        int ok = PyTuple_Check(replacement) && PyTuple_GET_SIZE(replacement) == REPLACEMENTS;
        for (Py_ssize_t k = 0; ok && k < REPLACEMENTS; k++) ok = PyBytes_Check(PyTuple_GET_ITEM(replacement, k));
        if (!ok) {
            PyErr_SetString(PyExc_TypeError, "replacement: a tuple of 7 bytes (per Value kind) or None");
            return NULL;
        }
    }
    Plan *self = (Plan *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    if (parse_messages(self, messages) < 0) { Py_DECREF(self); return NULL; }
    if (root < 0 || root >= self->nmsgs || value < 0 || value >= self->nmsgs || private_mode < MODE_KEEP ||
        private_mode > MODE_ALLOWLIST) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_ValueError, "root, value or private_mode out of range");
        return NULL;
    }
    self->root = root;
    self->value_msg = value;
    self->drop_marketing = drop_marketing;
    self->private_mode = private_mode;
    self->merge_legacy = merge_legacy;
    self->discard_unknown = discard_unknown;
    self->drop_invalid = drop_invalid;
    self->replacement = replacement == Py_None ? NULL : Py_NewRef(replacement);
    self->invalid_rule = Py_NewRef(invalid_rule);
    if ((self->types = PyDict_New()) == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

PyDoc_STRVAR(plan_filter_doc,
             "filter(data, resolve) -> (bytes, events_in, events_out, records, totals) or None\n\n"
             "data: a serialized RecordEventsRequest. resolve(feature, action) -> (dropped_by, invalid, keys).\n"
             "None: the bytes are not in the canonical form this path takes; run the Python engine.");

static PyObject *plan_filter(Plan *self, PyObject *args) {
    PyObject *data, *resolver;
    if (!PyArg_ParseTuple(args, "SO", &data, &resolver)) return NULL;
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (size >= INT32_MAX) Py_RETURN_NONE;
    Ctx *c = PyMem_Calloc(1, sizeof(Ctx));
    if (c == NULL) return PyErr_NoMemory();
    c->plan = self;
    c->resolve = resolver;
    c->cap = size + 64;
    c->out = PyBytes_FromStringAndSize(NULL, c->cap);
    c->dropped_ids = PyList_New(0);
    c->dropped_rules = PyDict_New();
    const uint8_t *bytes = (const uint8_t *)PyBytes_AS_STRING(data);
    int r = FAIL;
    if (c->out != NULL && c->dropped_ids != NULL && c->dropped_rules != NULL)
        r = walk(c, self->root, bytes, bytes + size, 0, 1);
    if (r == OK && _PyBytes_Resize(&c->out, c->pos) < 0) r = FAIL;
    PyObject *result = NULL, *drops = NULL;
    Records *records = NULL;
    if (r == OK && (drops = PyTuple_New(64)) != NULL) {
        for (int bit = 0; bit < 64 && drops != NULL; bit++) {
            PyObject *n = PyLong_FromSsize_t(c->n_drops[bit]);
            if (n == NULL) Py_CLEAR(drops);
            else PyTuple_SET_ITEM(drops, bit, n);
        }
    }
    if (r == OK && drops != NULL && (records = PyObject_New(Records, &RecordsType)) != NULL) {
        records->data = Py_NewRef(data);
        records->recs = c->recs; /* handed over, with the references of their dropped_by */
        records->nrecs = c->nrecs;
        records->keys = c->rec_keys;
        c->recs = NULL;
        c->rec_keys = NULL;
        c->nrecs = 0;
        result = Py_BuildValue("(OnnO(nnnnnOOO))", c->out, c->events_in, c->events_out, records, c->n_marketing,
                               c->n_private_whole, c->n_gone, c->n_wrong, c->n_unknown, drops, c->dropped_ids,
                               c->dropped_rules);
    } else if (r == FALLBACK) {
        result = Py_NewRef(Py_None);
    }
    Py_XDECREF(records);
    Py_XDECREF(drops);
    Py_XDECREF(c->dropped_ids);
    Py_XDECREF(c->dropped_rules);
    for (Py_ssize_t i = 0; i < c->nrecs; i++) Py_XDECREF(c->recs[i].dropped_by);
    PyMem_Free(c->recs);
    PyMem_Free(c->rec_keys);
    PyMem_Free(c->allowed_keys);
    PyMem_Free(c->allowed_fp);
    for (int i = 0; i < c->nmemo; i++) Py_DECREF(c->memo[i].resolved);
    Py_XDECREF(c->overflow);
    Py_XDECREF(c->out);
    PyMem_Free(c);
    return result;
}

static PyMethodDef plan_methods[] = {
    {"filter", (PyCFunction)plan_filter, METH_VARARGS, plan_filter_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PlanType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "telemetry_guard.policy._wirefilter.Plan",
    .tp_basicsize = sizeof(Plan),
    .tp_dealloc = (destructor)plan_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A kind's rules compiled for the wire: tables per message, see policy/fastpath.py.",
    .tp_methods = plan_methods,
    .tp_new = plan_new,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "telemetry_guard.policy._wirefilter", "The engine's fast path for RecordEvents payloads.", -1, NULL,
};

PyMODINIT_FUNC PyInit__wirefilter(void) {
    if (PyType_Ready(&PlanType) < 0 || PyType_Ready(&RecordsType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Plan", (PyObject *)&PlanType) < 0 || PyModule_AddIntConstant(m, "MAX_DEPTH", MAX_DEPTH) < 0 ||
        PyModule_AddIntConstant(m, "TAG_WIDTH", TAG_WIDTH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
