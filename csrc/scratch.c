/* Per-thread scratch buffers that only grow, so steady-state training does no
 * allocation. Thread-local because CFFI releases the GIL: two Python threads may
 * run kernels at once. */
#include <stdlib.h>
#include "kernel.h"

#define SLOTS 7 /* 0: matmul packed B, 1: decode rows, 2: attention heads, 3: loss rows,
                 * 4: decode scores, 5: split-K partial sums,
                 * 6: matmul packed A */

static __thread float *buffers[SLOTS];
static __thread size_t sizes[SLOTS];

float *scratch(int slot, size_t nfloats) {
    if (nfloats > sizes[slot]) {
        free(buffers[slot]);
        buffers[slot] = aligned_alloc(64, ((nfloats * sizeof(float) + 63) / 64) * 64);
        if (!buffers[slot]) abort(); /* out of memory: nothing sane to return */
        sizes[slot] = nfloats;
    }
    return buffers[slot];
}
