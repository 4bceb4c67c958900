/* Per-thread scratch buffers that only grow, so steady-state training does no
 * allocation. A buffer that cannot grow is NULL: the caller skips its work
 * and the failure is noted for the entry point's status (the kernel runs
 * inside other people's processes, so it never aborts). Thread-local
 * because CFFI releases the GIL: two Python threads may run kernels at once. A thread's buffers are freed when it exits (a Python
 * thread that generated once, an OpenMP pool thread that was retired). */
#include <omp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include "kernel.h"

#define SLOTS SCRATCH_SLOTS /* kernel.h names each */

static __thread float *buffers[SLOTS];
static __thread size_t sizes[SLOTS];

static pthread_key_t exit_key;
static pthread_once_t exit_key_once = PTHREAD_ONCE_INIT;

/* Runs at thread exit with that thread's buffers (its TLS is still live). */
static void free_buffers(void *thread_buffers) {
    float **bufs = thread_buffers;
    for (int i = 0; i < SLOTS; i++) free(bufs[i]);
}

static int exit_key_failed;

static void make_exit_key(void) {
    exit_key_failed = pthread_key_create(&exit_key, free_buffers) != 0;
}

/* Set by any thread whose scratch could not grow; read and cleared by the
 * entry point that called into the kernel. Global, not per call: with two
 * callers at once, a failure in one may be reported by both. */
static int nomem;

void note_nomem(void) {
    __atomic_store_n(&nomem, 1, __ATOMIC_RELAXED);
}

int take_status(void) {
    return __atomic_exchange_n(&nomem, 0, __ATOMIC_RELAXED) ? SQLGPT_NOMEM : SQLGPT_OK;
}

float *scratch(int slot, size_t nfloats) {
    if (nfloats > sizes[slot]) {
        pthread_once(&exit_key_once, make_exit_key);
        if (!exit_key_failed)
            pthread_setspecific(exit_key, buffers); /* non-NULL: free_buffers runs at exit */
        free(buffers[slot]);
        sizes[slot] = 0;
        /* a size whose byte count overflows is as impossible as one that does not fit */
        buffers[slot] = nfloats < SIZE_MAX / 8
            ? aligned_alloc(64, ((nfloats * sizeof(float) + 63) / 64) * 64) : NULL;
        if (!buffers[slot]) {
            note_nomem();
            return NULL;
        }
        sizes[slot] = nfloats;
    }
    return buffers[slot];
}

