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
 * - cuMemAlloc gives private host memory, registered like a mapping (copies to and from it are
 *   checked the same way); cuMemcpyDtoH / cuMemcpyHtoD copy synchronously. Only `cwm bench
 *   tiers` allocates device memory (its GPU figures, next to the plain cuMemcpy limit).
 * - Devices are named "cwm cuda-sim GPU <n>", which is how `cwm bench tiers` tells the stand-in
 *   from a GPU and labels its figures "CUDA driver stand-in".
 * - Everything the test sets and checks is in a shared state file, /dev/shm/<$CWM_CUDA_SIM>
 *   (layout: struct sim_state; tests/cuda_sim.rs mirrors the offsets).
 *
 * As strict as the driver's documented rules, or stricter:
 * - An engine event handle whose fire time is UINT64_MAX never fires (a dead or stalled engine).
 * - A second cuIpcOpenMemHandle of one allocation returns the same pointer and takes a
 *   reference; the mapping goes away with the last cuIpcCloseMemHandle (the driver's refcount).
 * - Contexts: cuCtxSetCurrent of a context never retained, and any call on a stream, event or
 *   mapping made while another device's context is current, is a violation. Retains and the
 *   flags set before the first retain are counted per device (ctx_retains, ctx_flags).
 * - cuMemcpyBatchAsync: more than `max_batch` copies in one call (when non-zero) is refused
 *   (and counted as a violation: real drivers crash or hang there); attrs / attrsIdxs /
 *   numAttrs / srcAccessOrder are validated; the copies of one batch run in random order.
 * - Attribute 91 (CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM) per device from the environment
 *   variable CWM_CUDA_SIM_ATTR91 ("1,0": device 0 can, device 1 cannot; default 1); a batch
 *   copy from or to registered host memory on a device where it is 0 is a violation (the
 *   driver's illegal-address error).
 * - cuStreamDestroy returns at once (queued work still runs, as in the driver).
 * - A cuMemcpy{DtoH,HtoD}Async with pageable (unregistered) host memory blocks the caller until
 *   the stream's earlier work and the copy itself are done (the driver documents pageable copies
 *   as synchronous); counted in `pageable_blocking`.
 * - cuMemHostRegister costs what the driver's does: it commits every page of the range
 *   (MADV_POPULATE_WRITE, as pinning faults each page in); and it waits while the test holds
 *   `pin_hold` non-zero (counting the waiting call in `pin_waiting`), so a test can see who
 *   stalls behind pinning.
 * - An engine event handle may name its owner process (bytes 16..20, a pid; 0: none). Opening
 *   it after the owner exited fails (CUDA_ERROR_INVALID_HANDLE); an event whose owner exits
 *   before it fired never fires (`dead_owner_events` counts such events seen).
 * - An exported event destroyed by cwm is marked in `exported_done` (2); using a destroyed
 *   event inside cwm is a violation.
 *
 * Violations (counted, first one described in `violation`): engine memory copied before
 * `engine_busy_until_ns` (the engine's event had not fired), a copy outside a mapping, a copy
 * spanning two host registrations, an exported event destroyed before it completed, and the
 * rules above. Blocking waits (cuStreamSynchronize, cuEventSynchronize) are counted.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
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
    INVALID_DEVICE = 101, INVALID_CONTEXT = 201, ALREADY_MAPPED = 208, INVALID_HANDLE = 400, NOT_READY = 600,
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
    uint64_t exported_done[MAX_EXPORTED]; /* 544: 0 pending, 1 done, 2 destroyed */
    uint64_t max_batch;            /* 8736 */
    uint64_t blocking_waits;       /* 8744 */
    uint64_t ctx_retains[4];       /* 8752 */
    uint64_t ctx_flags[4];         /* 8784 */
    uint64_t batch_max_seen;       /* 8816 */
    uint64_t pageable_blocking;    /* 8824 */
    uint64_t pin_hold;             /* 8832 */
    uint64_t pin_waiting;          /* 8840 */
    uint64_t event_opens;          /* 8848 */
    uint64_t dead_owner_events;    /* 8856 */
};

static struct sim_state *S;
static pthread_mutex_t G = PTHREAD_MUTEX_INITIALIZER;
static __thread void *current_ctx;
static char ctxs[4];
static unsigned primary_flags[4];

static int ctx_device(void *ctx) { return ctx ? (int)((char *)ctx - ctxs) : -1; }

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
struct region { uintptr_t base; size_t len; char key[64]; long refs; void *ctx; struct region *next; };
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
struct event { int engine; uint64_t fire_at; int done; int flags; long slot; int destroyed; void *ctx; int owner; int owner_dead; };

/* Whether `pid` (an engine event's owner; 0: none) has exited. */
static int owner_gone(int pid) { return pid > 0 && kill(pid, 0) != 0 && errno == ESRCH; }
enum { OP_WAIT, OP_COPY, OP_RECORD };
struct op { int kind; uint64_t fire_at; void *dst; const void *src; size_t n; uintptr_t dev; struct event *ev; struct op *next; };
struct stream { pthread_t th; pthread_mutex_t m; pthread_cond_t c; struct op *head, *tail; int busy, stop; void *ctx; };

/* The driver refuses work on an object of another context than the current one. */
static int wrong_ctx(void *owner, const char *what) {
    if (owner == current_ctx) return 0;
    violation(what, (unsigned long long)ctx_device(owner), (unsigned long long)ctx_device(current_ctx));
    return 1;
}

static int destroyed_event(struct event *e, const char *fn) {
    if (!e->destroyed) return 0;
    violation("%s on an event cwm already destroyed (slot %lld)", 0, (unsigned long long)e->slot);
    (void)fn;
    return 1;
}

static int attr91(int dev) {
    const char *v = getenv("CWM_CUDA_SIM_ATTR91");
    for (int i = 0; v && *v; i++) {
        if (i == dev) return *v != '0';
        const char *c = strchr(v, ',');
        if (!c) break;
        v = c + 1;
    }
    return 1;
}

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
        if (!s->head) break; /* stopped and drained */
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
    free(s);
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
    case NOT_READY: *s = "device not ready"; break;
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
CUresult cuDeviceGetAttribute(int *v, int attrib, CUdevice d) {
    ENTER("cuDeviceGetAttribute", 0);
    if (d < 0 || (uint64_t)d >= S->num_devices) return INVALID_DEVICE;
    if (attrib != 91) return INVALID_VALUE; /* the only attribute cwm reads */
    *v = attr91(d);
    return OK;
}
CUresult cuDevicePrimaryCtxSetFlags_v2(CUdevice d, unsigned flags) {
    ENTER("cuDevicePrimaryCtxSetFlags_v2", 0);
    if (d < 0 || (uint64_t)d >= S->num_devices) return INVALID_DEVICE;
    primary_flags[d] = flags;
    return OK;
}
CUresult cuDevicePrimaryCtxRetain(void **ctx, CUdevice d) {
    ENTER("cuDevicePrimaryCtxRetain", 0);
    if (d < 0 || (uint64_t)d >= S->num_devices) return INVALID_DEVICE;
    if (ADD(ctx_retains[d], 1) == 1) __atomic_store_n(&S->ctx_flags[d], primary_flags[d], __ATOMIC_SEQ_CST);
    *ctx = &ctxs[d];
    return OK;
}
CUresult cuCtxSetCurrent(void *ctx) {
    ENTER("cuCtxSetCurrent", 0);
    int d = ctx_device(ctx);
    if (ctx && (d < 0 || d >= 4 || GET(ctx_retains[d]) == 0)) {
        violation("cuCtxSetCurrent of a context never retained (device %llu)%llu", (unsigned long long)d, 0);
        return INVALID_CONTEXT;
    }
    current_ctx = ctx;
    return OK;
}

CUresult cuStreamCreate(struct stream **out, unsigned flags) {
    (void)flags;
    ENTER("cuStreamCreate", 1);
    struct stream *s = calloc(1, sizeof *s);
    pthread_mutex_init(&s->m, NULL);
    pthread_cond_init(&s->c, NULL);
    s->ctx = current_ctx;
    pthread_create(&s->th, NULL, worker, s);
    pthread_detach(s->th);
    *out = s;
    return OK;
}
CUresult cuStreamSynchronize(struct stream *s) {
    ENTER("cuStreamSynchronize", 1);
    if (wrong_ctx(s->ctx, "stream of device %llu synchronized with device %llu's context current")) return INVALID_CONTEXT;
    ADD(blocking_waits, 1);
    drain(s);
    return OK;
}
CUresult cuStreamQuery(struct stream *s) {
    ENTER("cuStreamQuery", 1);
    if (wrong_ctx(s->ctx, "stream of device %llu queried with device %llu's context current")) return INVALID_CONTEXT;
    pthread_mutex_lock(&s->m);
    int idle = !s->head && !s->busy;
    pthread_mutex_unlock(&s->m);
    return idle ? OK : NOT_READY;
}
/* Returns at once; the worker runs what is queued, then frees the stream (as the driver does). */
CUresult cuStreamDestroy_v2(struct stream *s) {
    ENTER("cuStreamDestroy_v2", 1);
    if (wrong_ctx(s->ctx, "stream of device %llu destroyed with device %llu's context current")) return INVALID_CONTEXT;
    pthread_mutex_lock(&s->m);
    s->stop = 1;
    pthread_cond_broadcast(&s->c);
    pthread_mutex_unlock(&s->m);
    return OK;
}

CUresult cuEventCreate(struct event **out, unsigned flags) {
    ENTER("cuEventCreate", 1);
    struct event *e = calloc(1, sizeof *e);
    e->flags = (int)flags;
    e->slot = -1;
    e->done = 1;
    e->ctx = current_ctx;
    *out = e;
    return OK;
}
CUresult cuEventRecord(struct event *e, struct stream *s) {
    ENTER("cuEventRecord", 1);
    if (e->engine) return INVALID_HANDLE;
    if (destroyed_event(e, "cuEventRecord")) return INVALID_HANDLE;
    if (wrong_ctx(s->ctx, "stream of device %llu used with device %llu's context current")) return INVALID_CONTEXT;
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
    if (destroyed_event(e, "cuEventSynchronize")) return INVALID_HANDLE;
    ADD(blocking_waits, 1);
    if (e->engine) { sleep_until(e->fire_at); ADD(engine_waits, 1); return OK; }
    while (!__atomic_load_n(&e->done, __ATOMIC_SEQ_CST)) usleep(100);
    return OK;
}
CUresult cuEventQuery(struct event *e) {
    ENTER("cuEventQuery", 1);
    if (destroyed_event(e, "cuEventQuery")) return INVALID_HANDLE;
    if (wrong_ctx(e->ctx, "event of device %llu queried with device %llu's context current")) return INVALID_CONTEXT;
    if (e->engine) {
        if (!e->owner_dead && owner_gone(e->owner)) {
            e->owner_dead = 1; /* died before its event fired (or it would have been seen) */
            ADD(dead_owner_events, 1);
        }
        if (e->owner_dead || now_ns() < e->fire_at) return NOT_READY;
        ADD(engine_waits, 1);
        return OK;
    }
    return __atomic_load_n(&e->done, __ATOMIC_SEQ_CST) ? OK : NOT_READY;
}
CUresult cuEventDestroy_v2(struct event *e) {
    ENTER("cuEventDestroy_v2", 1);
    if (destroyed_event(e, "cuEventDestroy_v2")) return INVALID_HANDLE;
    if (wrong_ctx(e->ctx, "event of device %llu destroyed with device %llu's context current")) return INVALID_CONTEXT;
    if (e->slot >= 0) __atomic_store_n(&S->exported_done[e->slot], 2, __ATOMIC_SEQ_CST);
    if (e->slot >= 0 && !__atomic_load_n(&e->done, __ATOMIC_SEQ_CST))
        violation("exported event %llu destroyed before it completed%llu", (unsigned long long)e->slot, 0);
    e->destroyed = 1; /* kept: a queued record may still point at it */
    return OK;
}
CUresult cuIpcGetEventHandle(CUipcEventHandle *h, struct event *e) {
    ENTER("cuIpcGetEventHandle", 1);
    if ((e->flags & 6) != 6 || e->engine) return INVALID_VALUE; /* Interprocess | DisableTiming */
    if (destroyed_event(e, "cuIpcGetEventHandle")) return INVALID_HANDLE;
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
    uint32_t owner;
    memcpy(&owner, h.reserved + 16, 4);
    if (owner_gone((int)owner)) return INVALID_HANDLE; /* its exporter is gone */
    struct event *e = calloc(1, sizeof *e);
    e->engine = 1;
    e->slot = -1;
    e->ctx = current_ctx;
    e->owner = (int)owner;
    memcpy(&e->fire_at, h.reserved + 8, 8);
    ADD(event_opens, 1);
    *out = e;
    return OK;
}
CUresult cuStreamWaitEvent(struct stream *s, struct event *e, unsigned flags) {
    (void)flags;
    ENTER("cuStreamWaitEvent", 1);
    if (!e->engine) return INVALID_HANDLE; /* cwm only waits on engine events */
    if (destroyed_event(e, "cuStreamWaitEvent")) return INVALID_HANDLE;
    if (wrong_ctx(s->ctx, "stream of device %llu used with device %llu's context current")) return INVALID_CONTEXT;
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
            /* The driver keeps one mapping per process and allocation, refcounted. */
            r->refs++;
            *p = (CUdeviceptr)r->base;
            pthread_mutex_unlock(&G);
            ADD(opens, 1);
            return OK;
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
    r->refs = 1;
    r->ctx = current_ctx;
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
    struct region *m = find(mappings, (uintptr_t)p, 1);
    if (m && m->base == (uintptr_t)p && wrong_ctx(m->ctx, "mapping of device %llu closed with device %llu's context current")) {
        pthread_mutex_unlock(&G);
        return INVALID_CONTEXT;
    }
    if (m && m->base == (uintptr_t)p && --m->refs > 0) { pthread_mutex_unlock(&G); ADD(closes, 1); return OK; }
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
    if (GET(pin_hold)) {
        ADD(pin_waiting, 1);
        while (GET(pin_hold)) usleep(1000);
        __atomic_sub_fetch(&S->pin_waiting, 1, __ATOMIC_SEQ_CST);
    }
    /* Pinning faults in and commits every page of the range (MADV_POPULATE_WRITE, Linux 5.14;
       changes no byte); older kernels: a read per page. */
    uintptr_t page = (uintptr_t)p & ~(uintptr_t)4095;
    if (madvise((void *)page, n + ((uintptr_t)p - page), 23) != 0)
        for (size_t i = 0; i < n; i += 4096) (void)*(volatile const char *)((const char *)p + i);
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

/* Device memory of cwm's own (`cwm bench tiers`): private memory, listed with the mappings so
   copies are checked like copies to engine memory; the key marks it as no IPC allocation. */
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) {
    ENTER("cuMemAlloc_v2", 1);
    if (n == 0) return INVALID_VALUE;
    void *m = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return OUT_OF_MEMORY;
    struct region *r = calloc(1, sizeof *r);
    r->base = (uintptr_t)m;
    r->len = n;
    r->refs = 1;
    r->ctx = current_ctx;
    snprintf(r->key, sizeof r->key, "CWMSIMAL%p", m);
    pthread_mutex_lock(&G);
    r->next = mappings;
    mappings = r;
    pthread_mutex_unlock(&G);
    *p = (CUdeviceptr)(uintptr_t)m;
    return OK;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    ENTER("cuMemFree_v2", 1);
    pthread_mutex_lock(&G);
    struct region *m = find(mappings, (uintptr_t)p, 1);
    struct region *x = m && m->base == (uintptr_t)p && memcmp(m->key, "CWMSIMAL", 8) == 0
                           ? unlink_region(&mappings, (uintptr_t)p) : NULL;
    pthread_mutex_unlock(&G);
    if (!x) return INVALID_VALUE;
    munmap((void *)x->base, x->len);
    free(x);
    return OK;
}
/* Synchronous copies (no stream): checked and counted like a stream's copies. */
static CUresult sync_copy(void *dst, const void *src, size_t n, uintptr_t dev) {
    struct op o = {.kind = OP_COPY, .dst = dst, .src = src, .n = n, .dev = dev};
    ADD(copies_pending, 1);
    run_copy(&o);
    return OK;
}
CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
    ENTER("cuMemcpyDtoH_v2", 1);
    return sync_copy(dst, (const void *)(uintptr_t)src, n, (uintptr_t)src);
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) {
    ENTER("cuMemcpyHtoD_v2", 1);
    return sync_copy((void *)(uintptr_t)dst, src, n, (uintptr_t)dst);
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
/* A copy with pageable host memory runs in the caller, after the stream's earlier work. */
static CUresult async_copy(void *dst, const void *src, size_t n, uintptr_t dev, uintptr_t host, struct stream *s) {
    pthread_mutex_lock(&G);
    int pageable = !touches(registered, host, n);
    pthread_mutex_unlock(&G);
    if (!pageable) return enqueue_copy(dst, src, n, dev, s);
    drain(s);
    sync_copy(dst, src, n, dev);
    ADD(pageable_blocking, 1);
    return OK;
}
CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, struct stream *s) {
    ENTER("cuMemcpyDtoHAsync_v2", 1);
    if (wrong_ctx(s->ctx, "stream of device %llu used with device %llu's context current")) return INVALID_CONTEXT;
    return async_copy(dst, (const void *)(uintptr_t)src, n, (uintptr_t)src, (uintptr_t)dst, s);
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, struct stream *s) {
    ENTER("cuMemcpyHtoDAsync_v2", 1);
    if (wrong_ctx(s->ctx, "stream of device %llu used with device %llu's context current")) return INVALID_CONTEXT;
    return async_copy((void *)(uintptr_t)dst, src, n, (uintptr_t)dst, (uintptr_t)src, s);
}
/* CUmemcpyAttributes (12.8): srcAccessOrder, srcLocHint {type, id}, dstLocHint, flags. */
struct memcpy_attrs { int src_access_order; int src_loc[2]; int dst_loc[2]; unsigned flags; };
static uint64_t shuffle_state = 0x9e3779b97f4a7c15ull;

/* 12.8 ABI: dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs, failIdx, stream. */
CUresult cuMemcpyBatchAsync(CUdeviceptr *dsts, CUdeviceptr *srcs, size_t *sizes, size_t count,
                            struct memcpy_attrs *attrs, size_t *attr_idxs, size_t num_attrs,
                            size_t *fail_idx, struct stream *s) {
    ENTER("cuMemcpyBatchAsync", 1);
    if (S->driver_version < 12080) return UNKNOWN; /* not in this "driver" */
    if (fail_idx) *fail_idx = (size_t)-1;
    if (wrong_ctx(s->ctx, "stream of device %llu used with device %llu's context current")) return INVALID_CONTEXT;
    /* The documented argument rules: 1 <= numAttrs <= count, attrsIdxs[0] == 0, strictly
       increasing and < count, each srcAccessOrder one of STREAM (1), DURING_API_CALL (2),
       ANY (3). */
    if (count == 0 || !attrs || !attr_idxs || num_attrs == 0 || num_attrs > count || attr_idxs[0] != 0)
        return INVALID_VALUE;
    for (size_t a = 0; a < num_attrs; a++) {
        if (a > 0 && attr_idxs[a] <= attr_idxs[a - 1]) return INVALID_VALUE;
        if (attr_idxs[a] >= count) return INVALID_VALUE;
        if (attrs[a].src_access_order < 1 || attrs[a].src_access_order > 3) return INVALID_VALUE;
    }
    uint64_t limit = GET(max_batch);
    if (limit && count > limit) {
        violation("cuMemcpyBatchAsync with %llu copies, over this driver's %llu", count, limit);
        return INVALID_VALUE;
    }
    for (uint64_t seen = GET(batch_max_seen); count > seen;)
        if (__atomic_compare_exchange_n(&S->batch_max_seen, &seen, count, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) break;
    int dev_id = ctx_device(s->ctx);
    int host_ptr_ok = attr91(dev_id);
    ADD(batch_calls, 1);
    /* The batch's copies run in any order (the driver promises none): shuffle them. */
    size_t *order = malloc(count * sizeof *order);
    for (size_t i = 0; i < count; i++) order[i] = i;
    pthread_mutex_lock(&G);
    for (size_t i = count; i > 1; i--) {
        shuffle_state ^= shuffle_state << 13;
        shuffle_state ^= shuffle_state >> 7;
        shuffle_state ^= shuffle_state << 17;
        size_t j = (size_t)(shuffle_state % i), t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
    pthread_mutex_unlock(&G);
    for (size_t k = 0; k < count; k++) {
        size_t i = order[k];
        pthread_mutex_lock(&G);
        int dst_dev = find(mappings, (uintptr_t)dsts[i], sizes[i]) != NULL;
        uintptr_t host = dst_dev ? (uintptr_t)srcs[i] : (uintptr_t)dsts[i];
        int registered_host = touches(registered, host, sizes[i]);
        pthread_mutex_unlock(&G);
        if (registered_host && !host_ptr_ok)
            violation("batch copy through registered host memory at %#llx on device %llu, which "
                      "cannot use host pointers for registered memory (illegal address)",
                      (unsigned long long)host, (unsigned long long)dev_id);
        uintptr_t dev = dst_dev ? (uintptr_t)dsts[i] : (uintptr_t)srcs[i];
        enqueue_copy((void *)(uintptr_t)dsts[i], (const void *)(uintptr_t)srcs[i], sizes[i], dev, s);
    }
    free(order);
    return OK;
}
