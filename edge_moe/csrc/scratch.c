/* The calling thread's kept scratch blocks (scratch.h): a few slots, each a block and its capacity. */
#include "scratch.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#define SCRATCH_SLOTS 32 /* a layer's call frees up to about 25 blocks */
#define SCRATCH_MIN_BYTES ((size_t)64 << 10) /* smaller ones glibc serves from its heap, pages already in */
#define SCRATCH_KEPT_BYTES ((size_t)64 << 20) /* a 512-token prefill's buffers on the models we measure */
#define HEADER 64                              /* the capacity, before the block; keeps it 64-byte aligned */

typedef struct {
    void *block[SCRATCH_SLOTS];
    size_t kept;
} kept_blocks;

static pthread_key_t key;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static size_t capacity(void *block) { return *(size_t *)((char *)block - HEADER); }

static void release(kept_blocks *k) {
    for (int i = 0; i < SCRATCH_SLOTS; i++)
        if (k->block[i]) free((char *)k->block[i] - HEADER), k->block[i] = NULL;
    k->kept = 0;
}

static void at_exit(void *k) {
    release(k);
    free(k);
}

static void make_key(void) { pthread_key_create(&key, at_exit); }

static kept_blocks *mine(void) {
    pthread_once(&once, make_key);
    kept_blocks *k = pthread_getspecific(key);
    if (!k && (k = calloc(1, sizeof *k))) pthread_setspecific(key, k);
    return k;
}

void *edge_moe_scratch(size_t bytes) {
    kept_blocks *k = bytes >= SCRATCH_MIN_BYTES ? mine() : NULL;
    int best = -1;
    for (int i = 0; k && i < SCRATCH_SLOTS; i++) /* the smallest kept block that is large enough */
        if (k->block[i] && capacity(k->block[i]) >= bytes &&
            (best < 0 || capacity(k->block[i]) < capacity(k->block[best])))
            best = i;
    if (best >= 0) {
        void *block = k->block[best];
        k->block[best] = NULL, k->kept -= capacity(block);
        return block;
    }
    if (bytes > SIZE_MAX / 2) return NULL; /* a size that wrapped in the caller's arithmetic */
    bytes = (bytes + 63) & ~(size_t)63;
    char *raw = aligned_alloc(64, bytes + HEADER);
    if (!raw) return NULL;
    *(size_t *)raw = bytes;
    return raw + HEADER;
}

void edge_moe_scratch_free(void *block) {
    if (!block) return;
    size_t size = capacity(block);
    kept_blocks *k = size >= SCRATCH_MIN_BYTES ? mine() : NULL;
    /* make room: the smallest kept blocks go while they are smaller than this one */
    while (k) {
        int free_slot = -1, smallest = -1;
        for (int i = 0; i < SCRATCH_SLOTS; i++) {
            if (!k->block[i]) free_slot = i;
            else if (smallest < 0 || capacity(k->block[i]) < capacity(k->block[smallest])) smallest = i;
        }
        if (free_slot >= 0 && k->kept + size <= SCRATCH_KEPT_BYTES) {
            k->block[free_slot] = block, k->kept += size;
            return;
        }
        if (smallest < 0 || capacity(k->block[smallest]) >= size) break;
        k->kept -= capacity(k->block[smallest]);
        free((char *)k->block[smallest] - HEADER), k->block[smallest] = NULL;
    }
    free((char *)block - HEADER);
}

size_t edge_moe_scratch_release(void) {
    pthread_once(&once, make_key);
    kept_blocks *k = pthread_getspecific(key); /* a thread that never kept a block has nothing to make */
    size_t kept = k ? k->kept : 0;
    if (k) release(k);
    return kept;
}
