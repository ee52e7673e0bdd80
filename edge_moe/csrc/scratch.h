/* Scratch memory of edge_moe's kernel calls, kept for the calling thread's next calls. A prefill's buffers are
 * megabytes, which glibc maps fresh for each call and unmaps after it, so every call faulted its pages in again, on
 * every thread at once (q3-q4b8r, 64 tokens on 2 threads: 1,780 tok/s, 2,900 with the pages kept). Freed blocks
 * stay with the thread that allocated them (up to SCRATCH_KEPT_BYTES, the largest kept), and go at its exit or at
 * edge_moe_scratch_release(). Blocks are 64-byte aligned. */
#ifndef EDGE_MOE_SCRATCH_H
#define EDGE_MOE_SCRATCH_H
#include <stddef.h>

/* At least `bytes` (a kept block where one is large enough), or NULL without memory. */
void *edge_moe_scratch(size_t bytes);

/* Back to the calling thread's kept blocks (NULL: nothing). */
void edge_moe_scratch_free(void *block);

/* The calling thread's kept blocks back to the system; the bytes it kept. */
size_t edge_moe_scratch_release(void);

#endif
