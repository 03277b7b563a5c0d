/* Fused cross-stitch mixing for float32: out[i] = x[0] * w[i, 0] + x[1] * w[i, 1] + ...
 *
 * One pass over memory instead of one per product and sum, with the same two roundings per
 * term as the elementwise torch ops (round(x * w), then round(acc + that)), in task order.
 * Build with -ffp-contract=off and without -ffast-math: a fused multiply-add or a reordered
 * sum would change the result. Plain C99 and pthreads; loaded with ctypes.
 *
 * The same pass also gives the weight's gradient for training: dw[i, j] = sum of g[i] * x[j]
 * over every element of a channel, one read of the output gradients and the inputs.
 */
#include <float.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "float expressions must be evaluated in float for the rounding to match torch"
#endif

/* Elements per task handled in one step: T inputs and T outputs of this size stay in cache
 * while every output accumulates its T terms. */
#define BLOCK 1024
#define MAX_THREADS 64

typedef struct {
    int tasks;
    const float *const *xs;
    float *const *outs; /* NULL: write into xs through `scratch` (tasks * BLOCK floats) */
    float *scratch;
    const float *weight;
    const float *const *grads; /* set: sum grads[i] * xs[j] into `sums` instead of mixing */
    double *sums;              /* [tasks, tasks, channels], this thread's own */
    int64_t channels;
    int64_t inner;
    int64_t row_len;
    int64_t blocks_per_row;
    int64_t first;
    int64_t last;
} Job;

static void scale(float *restrict out, const float *restrict x, float a, int64_t n)
{
    for (int64_t k = 0; k < n; k++)
        out[k] = x[k] * a;
}

static void accumulate(float *restrict out, const float *restrict x, float a, int64_t n)
{
    for (int64_t k = 0; k < n; k++) {
        float term = x[k] * a;
        out[k] = out[k] + term;
    }
}

static void scale_each(float *restrict out, const float *restrict x, const float *restrict a,
                       int64_t n)
{
    for (int64_t k = 0; k < n; k++)
        out[k] = x[k] * a[k];
}

static void accumulate_each(float *restrict out, const float *restrict x,
                            const float *restrict a, int64_t n)
{
    for (int64_t k = 0; k < n; k++) {
        float term = x[k] * a[k];
        out[k] = out[k] + term;
    }
}

/* Sum of g * x over n elements in float64: eight partial sums (vectorised without reordering
 * any one of them), then added in order. Exact products, so only the sums round. */
static double dot(const float *restrict g, const float *restrict x, int64_t n)
{
    double lanes[8] = {0};
    int64_t k = 0;
    for (; k + 8 <= n; k += 8)
        for (int l = 0; l < 8; l++)
            lanes[l] += (double)g[k + l] * x[k + l];
    double sum = 0.0;
    for (; k < n; k++)
        sum += (double)g[k] * x[k];
    for (int l = 0; l < 8; l++)
        sum += lanes[l];
    return sum;
}

static void dot_each(double *restrict sums, const float *restrict g, const float *restrict x,
                     int64_t n)
{
    for (int64_t k = 0; k < n; k++)
        sums[k] += (double)g[k] * x[k];
}

static void sum_products(const Job *job, int64_t offset, int64_t channel, int64_t n)
{
    for (int i = 0; i < job->tasks; i++)
        for (int j = 0; j < job->tasks; j++) {
            const float *g = job->grads[i] + offset, *x = job->xs[j] + offset;
            double *sums = job->sums + ((int64_t)i * job->tasks + j) * job->channels + channel;
            if (job->inner == 1)
                dot_each(sums, g, x, n);
            else
                *sums += dot(g, x, n);
        }
}

/* Rows are [outer, C] with inner > 1 (one weight per row), or [outer] with inner == 1 (one
 * weight per element along the row, which then runs over the channels). */
static void run_blocks(const Job *job)
{
    const int tasks = job->tasks;
    const int per_element = job->inner == 1;
    for (int64_t b = job->first; b < job->last; b++) {
        const int64_t row = b / job->blocks_per_row;
        const int64_t start = (b % job->blocks_per_row) * BLOCK;
        const int64_t n = job->row_len - start < BLOCK ? job->row_len - start : BLOCK;
        const int64_t offset = row * job->row_len + start;
        const int64_t channel = per_element ? start : row % job->channels;
        if (job->grads) {
            sum_products(job, offset, channel, n);
            continue;
        }
        for (int i = 0; i < tasks; i++) {
            float *out = job->outs ? job->outs[i] + offset : job->scratch + (int64_t)i * BLOCK;
            for (int j = 0; j < tasks; j++) {
                const float *x = job->xs[j] + offset;
                const float *w = job->weight + ((int64_t)i * tasks + j) * job->channels + channel;
                if (per_element && j == 0)
                    scale_each(out, x, w, n);
                else if (per_element)
                    accumulate_each(out, x, w, n);
                else if (j == 0)
                    scale(out, x, *w, n);
                else
                    accumulate(out, x, *w, n);
            }
        }
        /* In place: every output of this block is complete, so no input element is read again. */
        if (!job->outs)
            for (int i = 0; i < tasks; i++)
                memcpy((float *)job->xs[i] + offset, job->scratch + (int64_t)i * BLOCK,
                       (size_t)n * sizeof(float));
    }
}

static void *run_job(void *arg)
{
    run_blocks((const Job *)arg);
    return NULL;
}

static void run(int tasks, const float *const *xs, float *const *outs, float *scratch,
                const float *weight, const float *const *grads, double *sums, int64_t outer,
                int64_t channels, int64_t inner, int threads)
{
    Job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    const int64_t rows = inner == 1 ? outer : outer * channels;
    const int64_t row_len = inner == 1 ? channels : inner;
    const int64_t blocks_per_row = (row_len + BLOCK - 1) / BLOCK;
    const int64_t blocks = rows * blocks_per_row;
    int count = threads < MAX_THREADS ? threads : MAX_THREADS;
    if (count > blocks)
        count = (int)blocks;
    if (count < 1)
        count = 1;
    for (int t = 0; t < count; t++) {
        Job job = {tasks,
                   xs,
                   outs,
                   scratch ? scratch + (int64_t)t * tasks * BLOCK : NULL,
                   weight,
                   grads,
                   sums ? sums + (int64_t)t * tasks * tasks * channels : NULL,
                   channels,
                   inner,
                   row_len,
                   blocks_per_row,
                   blocks * t / count,
                   blocks * (t + 1) / count};
        jobs[t] = job;
    }
    for (int t = 1; t < count; t++)
        started[t] = pthread_create(&ids[t], NULL, run_job, &jobs[t]) == 0;
    run_blocks(&jobs[0]);
    for (int t = 1; t < count; t++) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            run_blocks(&jobs[t]);
    }
}

/* xs, outs: `tasks` contiguous float32 arrays viewed as [outer, channels, inner], none
 * overlapping another. weight: [tasks, tasks, channels] contiguous; for one weight per task
 * pair pass channels = 1 (and the whole tensor as inner). Splits the blocks over `threads`
 * threads (at most 64), the caller's included; a thread that cannot be started has its share
 * run by the caller. */
void crossstitch_mix(int tasks, const float *const *xs, float *const *outs,
                     const float *weight, int64_t outer, int64_t channels, int64_t inner,
                     int threads)
{
    run(tasks, xs, outs, NULL, weight, NULL, NULL, outer, channels, inner, threads);
}

/* As crossstitch_mix, with each output written over its task's input: xs must not overlap.
 * scratch: threads * tasks * crossstitch_block() floats, where a block's outputs wait until
 * every output of that block is complete. */
void crossstitch_mix_inplace(int tasks, float *const *xs, float *scratch, const float *weight,
                             int64_t outer, int64_t channels, int64_t inner, int threads)
{
    run(tasks, (const float *const *)xs, NULL, scratch, weight, NULL, NULL, outer, channels,
        inner, threads);
}

/* The weight's gradient: sums[t, i, j, c] = sum of grads[i] * xs[j] over the elements of
 * channel c in thread t's share (channels = 1: over all). sums: threads * tasks * tasks *
 * channels doubles, zeroed; the caller adds the threads' rows. */
void crossstitch_weight_grad(int tasks, const float *const *grads, const float *const *xs,
                             double *sums, int64_t outer, int64_t channels, int64_t inner,
                             int threads)
{
    run(tasks, xs, NULL, NULL, NULL, grads, sums, outer, channels, inner, threads);
}

/* Elements per task in one block, for sizing the in-place scratch. */
int crossstitch_block(void)
{
    return BLOCK;
}
