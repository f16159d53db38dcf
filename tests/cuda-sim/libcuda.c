/*
 * A stand-in for the CUDA driver (libcuda.so.1), for cwm's tests only. It implements just the
 * driver entry points cwm calls, so `cwm serve` runs its whole GPU code path on a machine with
 * no GPU. It proves call sequences and byte placement, not GPU speed.
 *
 * - "Device memory" is host POSIX shared memory: an IPC memory handle is "CWMSIMMH" followed by
 *   the shm name the test (the engine) created. cuIpcOpenMemHandle maps it; the device address
 *   is the mapping's address in cwm's process.
 * - An engine event handle is "CWMSIMEV" + the CLOCK_MONOTONIC time (ns) it fires at.
 * - Streams are queues run by a worker thread, in order: waits on engine events, copies (each
 *   takes `copy_delay_us` before its bytes land) and event records.
 * - Everything the test sets and checks is in a shared state file, /dev/shm/<$CWM_CUDA_SIM>
 *   (layout: struct sim_state; tests/cuda_sim.rs mirrors the offsets).
 *
 * Violations (counted, first one described in `violation`): engine memory copied before
 * `engine_busy_until_ns` (the engine's event had not fired), a copy outside a mapping, a copy
 * spanning two host registrations, a mapping opened twice, an exported event destroyed before
 * it completed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct { char reserved[64]; } CUipcMemHandle;
typedef struct { char reserved[64]; } CUipcEventHandle;
typedef struct { char bytes[16]; } CUuuid;

enum {
    OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, NOT_INITIALIZED = 3, NO_DEVICE = 100,
    INVALID_DEVICE = 101, INVALID_CONTEXT = 201, ALREADY_MAPPED = 208, INVALID_HANDLE = 400,
    HOST_MEMORY_ALREADY_REGISTERED = 712, HOST_MEMORY_NOT_REGISTERED = 713, UNKNOWN = 999,
};

#define MAX_EXPORTED 1024
struct sim_state {
    uint64_t magic;                /*   0 */
    uint64_t driver_version;       /*   8 */
    uint64_t num_devices;          /*  16 */
    uint8_t uuids[4][16];          /*  24 */
    uint64_t copy_delay_us;        /*  88 */
    uint64_t reserved0;            /*  96 */
    uint64_t engine_busy_until_ns; /* 104 */
    uint64_t violations;           /* 112 */
    uint64_t open_mappings;        /* 120 */
    uint64_t opens;                /* 128 */
    uint64_t closes;               /* 136 */
    uint64_t pinned_bytes;         /* 144 */
    uint64_t host_registers;       /* 152 */
    uint64_t pageable_copies;      /* 160 */
    uint64_t copies_done;          /* 168 */
    uint64_t copies_pending;       /* 176 */
    uint64_t batch_calls;          /* 184 */
    uint64_t engine_waits;         /* 192 */
    uint64_t exported_events;      /* 200 */
    int64_t inject_code;           /* 208 */
    uint64_t inject_count;         /* 216 */
    char inject_fn[64];            /* 224 */
    char violation[256];           /* 288 */
    uint64_t exported_done[MAX_EXPORTED]; /* 544 */
};

static struct sim_state *S;
static pthread_mutex_t G = PTHREAD_MUTEX_INITIALIZER;
static __thread void *current_ctx;
static char ctxs[4];

#define ADD(field, n) __atomic_add_fetch(&S->field, (n), __ATOMIC_SEQ_CST)
#define GET(field) __atomic_load_n(&S->field, __ATOMIC_SEQ_CST)

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void sleep_until(uint64_t t) {
    for (uint64_t n; (n = now_ns()) < t;) {
        struct timespec d = {(time_t)((t - n) / 1000000000ull), (long)((t - n) % 1000000000ull)};
        nanosleep(&d, NULL);
    }
}

static void violation(const char *fmt, unsigned long long a, unsigned long long b) {
    if (ADD(violations, 1) == 1) snprintf(S->violation, sizeof S->violation, fmt, a, b);
    fprintf(stderr, "cuda-sim VIOLATION: ");
    fprintf(stderr, fmt, a, b);
    fprintf(stderr, "\n");
}

/* Return the injected error if the test armed one for `fn`. */
static CUresult injected(const char *fn) {
    if (!S) return NOT_INITIALIZED;
    pthread_mutex_lock(&G);
    CUresult r = OK;
    if (S->inject_count > 0 && strncmp(S->inject_fn, fn, sizeof S->inject_fn) == 0) {
        S->inject_count--;
        r = (CUresult)S->inject_code;
    }
    pthread_mutex_unlock(&G);
    return r;
}

#define ENTER(fn, need_ctx)                                 \
    do {                                                    \
        CUresult _r = injected(fn);                         \
        if (_r != OK) return _r;                            \
        if ((need_ctx) && !current_ctx) return INVALID_CONTEXT; \
    } while (0)

/* ---- mappings and host registrations ---- */
struct region { uintptr_t base; size_t len; char key[64]; struct region *next; };
static struct region *mappings, *registered;

static struct region *find(struct region *l, uintptr_t p, size_t n) {
    for (; l; l = l->next)
        if (p >= l->base && p + n <= l->base + l->len) return l;
    return NULL;
}

/* Remove and return the region of `l` starting at `base` (caller holds G), or NULL. */
static struct region *unlink_region(struct region **l, uintptr_t base) {
    for (; *l; l = &(*l)->next)
        if ((*l)->base == base) {
            struct region *x = *l;
            *l = x->next;
            return x;
        }
    return NULL;
}

static int touches(struct region *l, uintptr_t p, size_t n) {
    for (; l; l = l->next)
        if (p < l->base + l->len && l->base < p + n) return 1;
    return 0;
}

/* ---- events and streams ---- */
struct event { int engine; uint64_t fire_at; int done; int flags; long slot; int destroyed; };
enum { OP_WAIT, OP_COPY, OP_RECORD };
struct op { int kind; uint64_t fire_at; void *dst; const void *src; size_t n; uintptr_t dev; struct event *ev; struct op *next; };
struct stream { pthread_t th; pthread_mutex_t m; pthread_cond_t c; struct op *head, *tail; int busy, stop; };

static void run_copy(struct op *o) {
    usleep((useconds_t)GET(copy_delay_us));
    pthread_mutex_lock(&G);
    int mapped = find(mappings, o->dev, o->n) != NULL;
    uintptr_t host = (uintptr_t)(o->dev == (uintptr_t)o->dst ? o->src : o->dst);
    int pinned = find(registered, host, o->n) != NULL;
    int partly = touches(registered, host, o->n);
    pthread_mutex_unlock(&G);
    if (!mapped) violation("copy of %llu bytes at device address %#llx outside every mapping", o->n, o->dev);
    uint64_t busy = GET(engine_busy_until_ns), t = now_ns();
    if (t < busy)
        violation("engine memory at %#llx touched %llu ns before the engine's event fired", o->dev, busy - t);
    if (!pinned && partly) violation("a copy of %llu bytes at %#llx spans two host registrations", o->n, host);
    if (!pinned && !partly) ADD(pageable_copies, 1);
    if (mapped) memcpy(o->dst, o->src, o->n);
    ADD(copies_done, 1);
    __atomic_sub_fetch(&S->copies_pending, 1, __ATOMIC_SEQ_CST);
}

static void *worker(void *arg) {
    struct stream *s = arg;
    pthread_mutex_lock(&s->m);
    for (;;) {
        while (!s->head && !s->stop) pthread_cond_wait(&s->c, &s->m);
        if (!s->head) break;
        struct op *o = s->head;
        s->busy = 1;
        pthread_mutex_unlock(&s->m);
        if (o->kind == OP_WAIT) {
            sleep_until(o->fire_at);
            ADD(engine_waits, 1);
        } else if (o->kind == OP_COPY) {
            run_copy(o);
        } else {
            __atomic_store_n(&o->ev->done, 1, __ATOMIC_SEQ_CST);
            if (o->ev->slot >= 0) __atomic_store_n(&S->exported_done[o->ev->slot], 1, __ATOMIC_SEQ_CST);
        }
        pthread_mutex_lock(&s->m);
        s->head = o->next;
        if (!s->head) s->tail = NULL;
        s->busy = 0;
        free(o);
        pthread_cond_broadcast(&s->c);
    }
    pthread_mutex_unlock(&s->m);
    return NULL;
}

static void push(struct stream *s, struct op *o) {
    o->next = NULL;
    pthread_mutex_lock(&s->m);
    if (s->tail) s->tail->next = o; else s->head = o;
    s->tail = o;
    pthread_cond_broadcast(&s->c);
    pthread_mutex_unlock(&s->m);
}

static void drain(struct stream *s) {
    pthread_mutex_lock(&s->m);
    while (s->head || s->busy) pthread_cond_wait(&s->c, &s->m);
    pthread_mutex_unlock(&s->m);
}

/* ---- entry points ---- */
CUresult cuGetErrorString(CUresult e, const char **s) {
    switch (e) {
    case OK: *s = "no error"; break;
    case INVALID_VALUE: *s = "invalid argument"; break;
    case NO_DEVICE: *s = "no CUDA-capable device is detected"; break;
    case INVALID_CONTEXT: *s = "invalid device context"; break;
    case ALREADY_MAPPED: *s = "resource already mapped"; break;
    case INVALID_HANDLE: *s = "invalid resource handle"; break;
    default: *s = "cuda-sim error"; break;
    }
    return OK;
}

CUresult cuInit(unsigned flags) {
    (void)flags;
    if (S) return OK;
    const char *name = getenv("CWM_CUDA_SIM");
    if (!name) return NO_DEVICE;
    int fd = shm_open(name, O_RDWR, 0);
    if (fd < 0) return NO_DEVICE;
    void *p = mmap(NULL, sizeof(struct sim_state), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return NO_DEVICE;
    S = p;
    if (memcmp(&S->magic, "CWMCUSIM", 8) != 0) { S = NULL; return NO_DEVICE; }
    return injected("cuInit");
}

CUresult cuDriverGetVersion(int *v) { ENTER("cuDriverGetVersion", 0); *v = (int)S->driver_version; return OK; }
CUresult cuDeviceGetCount(int *n) { ENTER("cuDeviceGetCount", 0); *n = (int)S->num_devices; return OK; }
CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    ENTER("cuDeviceGet", 0);
    if (ordinal < 0 || (uint64_t)ordinal >= S->num_devices) return INVALID_DEVICE;
    *d = ordinal;
    return OK;
}
CUresult cuDeviceGetUuid_v2(CUuuid *u, CUdevice d) { ENTER("cuDeviceGetUuid_v2", 0); memcpy(u->bytes, S->uuids[d], 16); return OK; }
CUresult cuDeviceGetName(char *name, int len, CUdevice d) { ENTER("cuDeviceGetName", 0); snprintf(name, (size_t)len, "cwm cuda-sim GPU %d", d); return OK; }
CUresult cuDeviceTotalMem_v2(size_t *b, CUdevice d) { (void)d; ENTER("cuDeviceTotalMem_v2", 0); *b = 80ull << 30; return OK; }
CUresult cuDevicePrimaryCtxRetain(void **ctx, CUdevice d) { ENTER("cuDevicePrimaryCtxRetain", 0); *ctx = &ctxs[d]; return OK; }
CUresult cuCtxSetCurrent(void *ctx) { ENTER("cuCtxSetCurrent", 0); current_ctx = ctx; return OK; }

CUresult cuStreamCreate(struct stream **out, unsigned flags) {
    (void)flags;
    ENTER("cuStreamCreate", 1);
    struct stream *s = calloc(1, sizeof *s);
    pthread_mutex_init(&s->m, NULL);
    pthread_cond_init(&s->c, NULL);
    pthread_create(&s->th, NULL, worker, s);
    *out = s;
    return OK;
}
CUresult cuStreamSynchronize(struct stream *s) { ENTER("cuStreamSynchronize", 1); drain(s); return OK; }
CUresult cuStreamDestroy_v2(struct stream *s) {
    ENTER("cuStreamDestroy_v2", 1);
    drain(s);
    pthread_mutex_lock(&s->m);
    s->stop = 1;
    pthread_cond_broadcast(&s->c);
    pthread_mutex_unlock(&s->m);
    pthread_join(s->th, NULL);
    free(s);
    return OK;
}

CUresult cuEventCreate(struct event **out, unsigned flags) {
    ENTER("cuEventCreate", 1);
    struct event *e = calloc(1, sizeof *e);
    e->flags = (int)flags;
    e->slot = -1;
    e->done = 1;
    *out = e;
    return OK;
}
CUresult cuEventRecord(struct event *e, struct stream *s) {
    ENTER("cuEventRecord", 1);
    if (e->engine) return INVALID_HANDLE;
    struct op *o = calloc(1, sizeof *o);
    o->kind = OP_RECORD;
    o->ev = e;
    __atomic_store_n(&e->done, 0, __ATOMIC_SEQ_CST);
    if (e->slot >= 0) __atomic_store_n(&S->exported_done[e->slot], 0, __ATOMIC_SEQ_CST);
    push(s, o);
    return OK;
}
CUresult cuEventSynchronize(struct event *e) {
    ENTER("cuEventSynchronize", 1);
    if (e->engine) { sleep_until(e->fire_at); ADD(engine_waits, 1); return OK; }
    while (!__atomic_load_n(&e->done, __ATOMIC_SEQ_CST)) usleep(100);
    return OK;
}
CUresult cuEventDestroy_v2(struct event *e) {
    ENTER("cuEventDestroy_v2", 1);
    if (e->slot >= 0 && !__atomic_load_n(&e->done, __ATOMIC_SEQ_CST))
        violation("exported event %llu destroyed before it completed%llu", (unsigned long long)e->slot, 0);
    e->destroyed = 1; /* kept: a queued record may still point at it */
    return OK;
}
CUresult cuIpcGetEventHandle(CUipcEventHandle *h, struct event *e) {
    ENTER("cuIpcGetEventHandle", 1);
    if ((e->flags & 6) != 6 || e->engine) return INVALID_VALUE; /* Interprocess | DisableTiming */
    if (e->slot < 0) {
        e->slot = (long)((ADD(exported_events, 1) - 1) % MAX_EXPORTED);
        __atomic_store_n(&S->exported_done[e->slot], (uint64_t)e->done, __ATOMIC_SEQ_CST);
    }
    memset(h, 0, sizeof *h);
    memcpy(h->reserved, "CWMSIMXE", 8);
    uint64_t slot = (uint64_t)e->slot;
    memcpy(h->reserved + 8, &slot, 8);
    return OK;
}
CUresult cuIpcOpenEventHandle(struct event **out, CUipcEventHandle h) {
    ENTER("cuIpcOpenEventHandle", 1);
    if (memcmp(h.reserved, "CWMSIMEV", 8) != 0) return INVALID_HANDLE;
    struct event *e = calloc(1, sizeof *e);
    e->engine = 1;
    e->slot = -1;
    memcpy(&e->fire_at, h.reserved + 8, 8);
    *out = e;
    return OK;
}
CUresult cuStreamWaitEvent(struct stream *s, struct event *e, unsigned flags) {
    (void)flags;
    ENTER("cuStreamWaitEvent", 1);
    if (!e->engine) return INVALID_HANDLE; /* cwm only waits on engine events */
    struct op *o = calloc(1, sizeof *o);
    o->kind = OP_WAIT;
    o->fire_at = e->fire_at;
    push(s, o);
    return OK;
}

CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *p, CUipcMemHandle h, unsigned flags) {
    ENTER("cuIpcOpenMemHandle_v2", 1);
    if (flags != 1 || memcmp(h.reserved, "CWMSIMMH", 8) != 0) return INVALID_VALUE;
    char name[64] = {0};
    memcpy(name, h.reserved + 8, 56);
    pthread_mutex_lock(&G);
    for (struct region *r = mappings; r; r = r->next)
        if (memcmp(r->key, h.reserved, 64) == 0) {
            pthread_mutex_unlock(&G);
            violation("allocation %s opened twice in one process%llu", 0, 0);
            return ALREADY_MAPPED;
        }
    int fd = shm_open(name, O_RDWR, 0);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) { if (fd >= 0) close(fd); pthread_mutex_unlock(&G); return INVALID_HANDLE; }
    void *m = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) { pthread_mutex_unlock(&G); return OUT_OF_MEMORY; }
    struct region *r = calloc(1, sizeof *r);
    r->base = (uintptr_t)m;
    r->len = (size_t)st.st_size;
    memcpy(r->key, h.reserved, 64);
    r->next = mappings;
    mappings = r;
    pthread_mutex_unlock(&G);
    ADD(open_mappings, 1);
    ADD(opens, 1);
    *p = (CUdeviceptr)(uintptr_t)m;
    return OK;
}
CUresult cuMemGetAddressRange_v2(CUdeviceptr *base, size_t *size, CUdeviceptr p) {
    ENTER("cuMemGetAddressRange_v2", 1);
    pthread_mutex_lock(&G);
    struct region *r = find(mappings, (uintptr_t)p, 1);
    if (r) { *base = r->base; *size = r->len; }
    pthread_mutex_unlock(&G);
    return r ? OK : INVALID_VALUE;
}
CUresult cuIpcCloseMemHandle(CUdeviceptr p) {
    ENTER("cuIpcCloseMemHandle", 1);
    pthread_mutex_lock(&G);
    struct region *x = unlink_region(&mappings, (uintptr_t)p);
    pthread_mutex_unlock(&G);
    if (!x) return INVALID_VALUE;
    munmap((void *)x->base, x->len);
    free(x);
    __atomic_sub_fetch(&S->open_mappings, 1, __ATOMIC_SEQ_CST);
    ADD(closes, 1);
    return OK;
}

CUresult cuMemHostRegister_v2(void *p, size_t n, unsigned flags) {
    ENTER("cuMemHostRegister_v2", 1);
    if (flags != 1) return INVALID_VALUE; /* PORTABLE only: never write-combined */
    pthread_mutex_lock(&G);
    if (touches(registered, (uintptr_t)p, n)) { pthread_mutex_unlock(&G); return HOST_MEMORY_ALREADY_REGISTERED; }
    struct region *r = calloc(1, sizeof *r);
    r->base = (uintptr_t)p;
    r->len = n;
    r->next = registered;
    registered = r;
    pthread_mutex_unlock(&G);
    ADD(pinned_bytes, n);
    ADD(host_registers, 1);
    return OK;
}
CUresult cuMemHostUnregister(void *p) {
    ENTER("cuMemHostUnregister", 1);
    pthread_mutex_lock(&G);
    struct region *x = unlink_region(&registered, (uintptr_t)p);
    pthread_mutex_unlock(&G);
    if (!x) return HOST_MEMORY_NOT_REGISTERED;
    __atomic_sub_fetch(&S->pinned_bytes, x->len, __ATOMIC_SEQ_CST);
    free(x);
    return OK;
}

static CUresult enqueue_copy(void *dst, const void *src, size_t n, uintptr_t dev, struct stream *s) {
    struct op *o = calloc(1, sizeof *o);
    o->kind = OP_COPY;
    o->dst = dst;
    o->src = src;
    o->n = n;
    o->dev = dev;
    ADD(copies_pending, 1);
    push(s, o);
    return OK;
}
CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, struct stream *s) {
    ENTER("cuMemcpyDtoHAsync_v2", 1);
    return enqueue_copy(dst, (const void *)(uintptr_t)src, n, (uintptr_t)src, s);
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, struct stream *s) {
    ENTER("cuMemcpyHtoDAsync_v2", 1);
    return enqueue_copy((void *)(uintptr_t)dst, src, n, (uintptr_t)dst, s);
}
/* 12.8 ABI: dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs, failIdx, stream. */
CUresult cuMemcpyBatchAsync(CUdeviceptr *dsts, CUdeviceptr *srcs, size_t *sizes, size_t count,
                            void *attrs, size_t *attr_idxs, size_t num_attrs, size_t *fail_idx,
                            struct stream *s) {
    ENTER("cuMemcpyBatchAsync", 1);
    if (S->driver_version < 12080) return UNKNOWN; /* not in this "driver" */
    if (!attrs || !attr_idxs || num_attrs == 0 || attr_idxs[0] != 0) { if (fail_idx) *fail_idx = 0; return INVALID_VALUE; }
    ADD(batch_calls, 1);
    for (size_t i = 0; i < count; i++) {
        pthread_mutex_lock(&G);
        int dst_dev = find(mappings, (uintptr_t)dsts[i], sizes[i]) != NULL;
        pthread_mutex_unlock(&G);
        uintptr_t dev = dst_dev ? (uintptr_t)dsts[i] : (uintptr_t)srcs[i];
        enqueue_copy((void *)(uintptr_t)dsts[i], (const void *)(uintptr_t)srcs[i], sizes[i], dev, s);
    }
    return OK;
}
