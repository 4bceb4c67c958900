/* The thread governor: how many threads a unit of work (a decode step, a
 * training step) runs on, chosen by measuring.
 *
 * Why: a step's threads meet at barriers many times. On a machine whose
 * cores are shared with other processes, the scheduler takes a thread away
 * for a time slice now and then, and every other thread of the step waits
 * for it at the next barrier: two threads can run several times slower
 * than one. Splitting work dynamically would not save it (the barrier still
 * waits for the preempted thread to arrive) and would cost the fixed shares
 * that keep each thread's weights in its own cache. So the count itself
 * adapts:
 * - every unit is timed: wall seconds per unit of work, a moving average per
 *   thread count;
 * - every LOOK_EVERY units, and at once when units turn much slower, it
 *   looks at the machine: where the calling thread waited for a core, or
 *   the tasks running beside ours leave fewer cores than our count, the
 *   next count down is probed; where they leave room for the next count
 *   up, that one. A probe runs the other count for at least
 *   PROBE_SECONDS; the faster count stays, and a probe that loses doubles
 *   the wait for the next. One unit on too many threads can cost dozens of
 *   units on the right count on a busy machine, so a probe unit much slower
 *   than the current count's ends the probe at once.
 * On a quiet machine no probe runs: the governor costs two clock reads a
 * unit and two small /proc reads every LOOK_EVERY units. Without Linux's
 * figure, counts are probed on the look's schedule, the interval doubling
 * while probes lose. set_threads(n) (the user's --threads) fixes the count.
 *
 * State is per calling thread (callers run in parallel, CFFI releases the
 * GIL), one governor per model: a draft model's steps and its target's
 * cost differently. */
#include <fcntl.h>
#include <math.h>
#include <omp.h>
#include <unistd.h>
#include <stdio.h>
#include <time.h>
#include "kernel.h"

#define GOVERNORS 8       /* per thread, least recently used replaced */
#define RUNGS 12          /* counts: ceiling, ceiling / 2, ... 1 */
#define BUCKETS 16        /* work sizes: floor(log2(work)), the last holding all larger */
#define LOOK_EVERY 32     /* units between looks at the machine */
#define PROBE_SECONDS 0.02 /* least time a probe measures: several scheduler slices,
                            * since a busy machine's units are fast or slow by
                            * whether all their threads hold a core at the time.
                            * A count's first unit (waking threads, cold caches) is
                            * not measured unless it is this long itself. */
#define MAX_INTERVAL 1024 /* most units between probes that keep losing */
#define ALPHA 0.25        /* weight of a new unit in the moving averages */
#define SLOWER 1.3        /* cost this much above the last decision's: look now */
#define WAITING 0.1       /* run-queue delay over wall time that says busy */
#define WIN 0.92          /* a probed count must be this much cheaper to win */
#define ABANDON 2.0       /* a probe unit this much costlier than the current count's loses */

typedef struct {
    const void *key;
    unsigned long used;   /* last use, for replacement */
    int ceiling, rungs;   /* the full count when made, and the ladder's length */
    int rung, probe, probe_units, probe_bucket;
    double others;        /* CPUs other tasks want (moving average over looks; -1: unknown) */
    long units, next_look, interval;
    /* seconds per unit of work at each rung (moving average), by work size:
     * a prompt's rows cost less each than single tokens */
    double cost[BUCKETS][RUNGS];
    int seen[BUCKETS][RUNGS]; /* units run; the cost is measured from the second */
    double probe_wall, probe_work; /* what the probe measured (after its first unit) */
    double reference[BUCKETS]; /* the current rung's cost when last decided */
    double looked_at;     /* when the machine was last looked at, and the delay then */
    unsigned long long waited;
} Governor;

static int ceiling_threads; /* 0: OpenMP's default */
static int fixed_threads;   /* the user's count; 0: governed */

static __thread Governor governors[GOVERNORS];
static __thread unsigned long clock_tick;
static __thread Governor *active;
static __thread int depth, active_threads;
static __thread int active_bucket;
static __thread double wall_start, active_work;

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

void set_threads(int n) {
    fixed_threads = ceiling_threads = n;
    omp_set_num_threads(n);
}

void set_thread_ceiling(int n) {
    fixed_threads = 0;
    ceiling_threads = n;
    omp_set_num_threads(n);
}

int max_threads(void) {
    return ceiling_threads ? ceiling_threads : omp_get_max_threads();
}

static int threads_at(const Governor *g, int rung) {
    int n = g->ceiling >> rung;
    return n > 1 ? n : 1;
}

/* 1 if this thread waited for a core more than WAITING of the time since
 * the last look (at the first, of its life), 0 if not, -1 if the system
 * does not say. */
static int busy_machine(Governor *g) {
    char text[96] = {0};
    int fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t got = read(fd, text, sizeof text - 1);
    close(fd);
    unsigned long long ran, waited;
    if (got <= 0 || sscanf(text, "%llu %llu", &ran, &waited) != 2) return -1;
    double now = seconds(), since = g->looked_at > 0.0 ? now - g->looked_at
                                                       : (ran + waited) * 1e-9;
    int busy = (waited - g->waited) * 1e-9 > WAITING * since;
    g->looked_at = now;
    g->waited = waited;
    return busy;
}

/* How many cores the other tasks leave us: Linux's count of running tasks
 * (/proc/loadavg) less `ours` (the threads of the unit just ended, running
 * or spinning), averaged over looks (one reading is a moment's), against
 * the online CPUs; -1 where the system does not say. Our run-queue delay
 * alone cannot tell: the scheduler may give the calling thread a core of
 * its own while the team's other threads share the rest. */
static int cores_left(Governor *g, int ours) {
    char text[128] = {0};
    int fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t got = read(fd, text, sizeof text - 1);
    close(fd);
    double averages[3];
    int running, tasks;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    if (got <= 0 || cpus <= 0 ||
        sscanf(text, "%lf %lf %lf %d/%d", &averages[0], &averages[1], &averages[2], &running,
               &tasks) != 5)
        return -1;
    int others = running > ours ? running - ours : 0;
    g->others = g->others < 0.0 ? others : 0.5 * (g->others + others);
    int wanted = (int)floor(g->others + 1e-9); /* a whole task, steadily */
    return wanted < cpus ? (int)(cpus - wanted) : 0;
}

static void reset(Governor *g, const void *key, int ceiling) {
    *g = (Governor){.key = key, .ceiling = ceiling, .probe = -1, .next_look = 2,
                    .interval = LOOK_EVERY, .others = -1.0};
    while (g->rungs < RUNGS && (g->rungs == 0 || threads_at(g, g->rungs - 1) > 1)) g->rungs++;
    if (busy_machine(g) == 1 && g->rungs > 1) g->rung = 1; /* busy all along: start lower */
}

/* This thread's governor for a key (the least recently used replaced). */
static Governor *governor_for(const void *key, int ceiling) {
    Governor *oldest = &governors[0];
    for (int i = 0; i < GOVERNORS; i++) {
        Governor *g = &governors[i];
        if (g->key == key && g->ceiling == ceiling) return g;
        if (g->used < oldest->used) oldest = g;
    }
    reset(oldest, key, ceiling);
    return oldest;
}

static int bucket_of(double work) {
    int b = ilogb(work);
    return b < BUCKETS ? b : BUCKETS - 1;
}

void threads_unit_begin(const void *key, double work) {
    if (depth++) return; /* a unit inside a unit is part of it */
    int ceiling = max_threads();
    active = NULL;
    if (fixed_threads || ceiling <= 1 || !(work >= 1.0)) {
        omp_set_num_threads(ceiling);
        return;
    }
    Governor *g = governor_for(key, ceiling);
    g->used = ++clock_tick;
    active = g;
    active_work = work;
    active_bucket = bucket_of(work);
    active_threads = threads_at(g, g->probe >= 0 ? g->probe : g->rung);
    omp_set_num_threads(active_threads);
    wall_start = seconds();
}

/* A finished probe: the faster count stays; a lost one (or an abandoned
 * one) doubles the wait for the next. */
static void decide(Governor *g, int lost) {
    int b = g->probe_bucket;
    double probed = lost ? 0.0 : g->probe_wall / g->probe_work;
    if (!lost && probed < WIN * g->cost[b][g->rung]) {
        g->cost[b][g->probe] = probed;
        g->seen[b][g->probe] = 2;
        g->rung = g->probe;
        g->interval = LOOK_EVERY;
    } else if (g->interval < MAX_INTERVAL) {
        g->interval *= 2;
    }
    g->probe = -1;
    g->reference[b] = g->cost[b][g->rung];
    g->next_look = g->units + g->interval;
}

/* Try `rung` on the coming units; units of the current bucket measure it. */
static void start_probe(Governor *g, int rung, int bucket) {
    g->probe = rung;
    g->probe_bucket = bucket;
    g->probe_units = 0;
    g->probe_wall = g->probe_work = 0.0;
}

static void look(Governor *g, int b) {
    if (g->seen[b][g->rung] < 2) return;
    if (g->reference[b] == 0.0) g->reference[b] = g->cost[b][g->rung];
    if (g->cost[b][g->rung] > SLOWER * g->reference[b]) { /* the machine changed: look now */
        g->reference[b] = g->cost[b][g->rung];
        g->interval = LOOK_EVERY;
        if (g->next_look > g->units) g->next_look = g->units;
    }
    if (g->units < g->next_look) return;
    int waited = busy_machine(g), left = cores_left(g, threads_at(g, g->rung));
    int crowded = waited == 1 || (left >= 0 && left < threads_at(g, g->rung));
    int room = waited != 1 && (left < 0 || (g->rung > 0 && left >= threads_at(g, g->rung - 1)));
    if (crowded && g->rung + 1 < g->rungs)
        start_probe(g, g->rung + 1, b);
    else if (!crowded && room && g->rung > 0)
        start_probe(g, g->rung - 1, b);
    else /* the machine would have us past the ladder's end, or stay */
        g->next_look = g->units + (waited < 0 && left < 0 ? g->interval : LOOK_EVERY);
}

void threads_unit_end(void) {
    if (--depth || !active) return;
    Governor *g = active;
    active = NULL;
    double wall = seconds() - wall_start, cost = wall / active_work;
    int b = active_bucket;
    g->units++;
    if (g->probe >= 0) {
        if (b == g->probe_bucket && (g->probe_units++ || wall >= PROBE_SECONDS)) {
            g->probe_wall += wall;
            g->probe_work += active_work;
        }
        if (g->seen[b][g->rung] >= 2 && cost > ABANDON * g->cost[b][g->rung])
            decide(g, 1);
        else if (g->probe_work > 0.0 && g->probe_wall >= PROBE_SECONDS)
            decide(g, 0);
    } else {
        double *average = &g->cost[b][g->rung];
        int seen = g->seen[b][g->rung]++;
        if (seen || wall >= PROBE_SECONDS)
            *average = seen > 1 ? (1 - ALPHA) * *average + ALPHA * cost : cost;
        if (!seen && wall >= PROBE_SECONDS) g->seen[b][g->rung]++; /* measured at once */
        look(g, b);
    }
    omp_set_num_threads(g->ceiling);
}

int governed_threads(const void *key) {
    int ceiling = max_threads();
    if (fixed_threads || ceiling <= 1) return ceiling;
    for (int i = 0; i < GOVERNORS; i++) {
        Governor *g = &governors[i];
        if (g->key == key && g->ceiling == ceiling) return threads_at(g, g->rung);
    }
    return ceiling;
}

int threads_unit_depth(void) {
    return depth;
}
