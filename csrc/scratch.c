/* Per-thread scratch buffers that only grow, so steady-state training does no
 * allocation. Thread-local because CFFI releases the GIL: two Python threads may
 * run kernels at once. A thread's buffers are freed when it exits (a Python
 * thread that generated once, an OpenMP pool thread that was retired). */
#include <pthread.h>
#include <stdlib.h>
#include "kernel.h"

#define SLOTS 7 /* 0: matmul packed B, 1: decode rows, 2: attention heads, 3: loss rows,
                 * 4: decode scores, 5: split-K partial sums, 6: matmul packed A */

static __thread float *buffers[SLOTS];
static __thread size_t sizes[SLOTS];

static pthread_key_t exit_key;
static pthread_once_t exit_key_once = PTHREAD_ONCE_INIT;

/* Runs at thread exit with that thread's buffers (its TLS is still live). */
static void free_buffers(void *thread_buffers) {
    float **bufs = thread_buffers;
    for (int i = 0; i < SLOTS; i++) free(bufs[i]);
}

static void make_exit_key(void) {
    if (pthread_key_create(&exit_key, free_buffers)) abort();
}

float *scratch(int slot, size_t nfloats) {
    if (nfloats > sizes[slot]) {
        pthread_once(&exit_key_once, make_exit_key);
        pthread_setspecific(exit_key, buffers); /* non-NULL: free_buffers runs at exit */
        free(buffers[slot]);
        buffers[slot] = aligned_alloc(64, ((nfloats * sizeof(float) + 63) / 64) * 64);
        if (!buffers[slot]) abort(); /* out of memory: nothing sane to return */
        sizes[slot] = nfloats;
    }
    return buffers[slot];
}
