/* The covariance tap's backward for one split candidate pool, float32 on the CPU, in one call.
 *
 * Loaded by pbp_fx/native.py (compiled at first use); covariance_tap.candidate_gradient is its
 * reference and the fallback. One call replaces about forty small torch ops, whose dispatch cost
 * (150-400 us a site and step) was a fifth of a small model's dendrite-phase step.
 *
 * c, d and g share one dense layout: `nd` dims in memory order, sizes `sizes`, and each dim's
 * role: 0 a position (batch, spatial, token), 1 the pool member p, 2 the channel. An element's
 * row is p * channels + channel. d is the site error dealt to the members (split), already
 * strided; g receives the candidates' gradient.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DIMS 8

/* The elements in runs: each run is the innermost memory dim (`inner` elements from `base`), over
 * which the row steps by 0 (positions), 1 (channels) or `channels` (members); the outer dims are
 * counted as an odometer. RUN(base, row0, step) handles one run. */
#define FOR_EACH_RUN(RUN)                                                                    \
    do {                                                                                     \
        int64_t idx[MAX_DIMS] = {0};                                                         \
        int64_t step = roles[nd - 1] == 0 ? 0 : (roles[nd - 1] == 2 ? 1 : channels);         \
        int64_t p = 0, ch = 0;                                                               \
        for (int64_t base = 0; base < total; base += inner) {                                \
            int64_t row0 = roles[nd - 1] == 0 ? p * channels + ch                            \
                         : (roles[nd - 1] == 2 ? p * channels : ch);                         \
            RUN(base, row0, step);                                                           \
            for (int k = nd - 2; k >= 0; k--) {                                              \
                if (++idx[k] < sizes[k]) {                                                   \
                    if (roles[k] == 1) p = idx[k]; else if (roles[k] == 2) ch = idx[k];      \
                    break;                                                                   \
                }                                                                            \
                idx[k] = 0;                                                                  \
                if (roles[k] == 1) p = 0; else if (roles[k] == 2) ch = 0;                    \
            }                                                                                \
        }                                                                                    \
    } while (0)

/* sum[row] += d * mul - sub[row] over one run (sub NULL: 0) */
static inline void run_sum(const float *restrict d, int64_t len, int64_t row0, int64_t step, float mul,
                           const float *restrict sub, double *restrict sum) {
    if (step == 0) {
        float m = sub ? sub[row0] : 0.0f;
        double acc = 0.0;
        for (int64_t j = 0; j < len; j++) acc += (double)(d[j] * mul - m);
        sum[row0] += acc;
    } else {
        for (int64_t j = 0; j < len; j++) {
            int64_t r = row0 + j * step;
            sum[r] += (double)(d[j] * mul - (sub ? sub[r] : 0.0f));
        }
    }
}

/* e = (d * mul - m1) - m2 into g, cov[row] += c * e, over one run */
static inline void run_cov(const float *restrict c, const float *restrict d, float *restrict g, int64_t len,
                           int64_t row0, int64_t step, float mul, const float *restrict m1,
                           const float *restrict m2, double *restrict cov) {
    if (step == 0) {
        float a = m1[row0], b = m2[row0];
        double acc = 0.0;
        for (int64_t j = 0; j < len; j++) {
            float e = (d[j] * mul - a) - b;
            g[j] = e;
            acc += (double)(c[j] * e);
        }
        cov[row0] += acc;
    } else {
        for (int64_t j = 0; j < len; j++) {
            int64_t r = row0 + j * step;
            float e = (d[j] * mul - m1[r]) - m2[r];
            g[j] = e;
            cov[r] += (double)(c[j] * e);  /* (the product in float32, as the torch ops form it) */
        }
    }
}

/* g *= k[row] over one run */
static inline void run_scale(float *restrict g, int64_t len, int64_t row0, int64_t step, const float *restrict k) {
    if (step == 0) {
        float f = k[row0];
        for (int64_t j = 0; j < len; j++) g[j] *= f;
    } else {
        for (int64_t j = 0; j < len; j++) g[j] *= k[row0 + j * step];
    }
}

/* Where the innermost memory dim holds positions (a conv's spatial dims): each row's positions as
 * blocks of `inner` contiguous elements, one block per combination of the outer position dims, at
 * offsets `blocks` (from the row's start). A row's sums then run in registers over long stretches;
 * the runs of FOR_EACH_RUN were as short as 4 elements (a stride-2 conv's 2 x 2 outputs). */
static int64_t position_blocks(int nd, const int64_t *sizes, const int *roles, int64_t **blocks,
                               int64_t *member_stride, int64_t *channel_stride) {
    int64_t strides[MAX_DIMS], count = 1;
    strides[nd - 1] = 1;
    for (int k = nd - 2; k >= 0; k--) strides[k] = strides[k + 1] * sizes[k + 1];
    *member_stride = *channel_stride = 0;
    for (int k = 0; k < nd; k++) {
        if (roles[k] == 1) *member_stride = strides[k];
        else if (roles[k] == 2) *channel_stride = strides[k];
        else if (k < nd - 1) count *= sizes[k];
    }
    *blocks = malloc(sizeof(int64_t) * count);
    if (!*blocks) return -1;
    int64_t idx[MAX_DIMS] = {0};
    for (int64_t b = 0; b < count; b++) {
        int64_t off = 0;
        for (int k = 0; k < nd - 1; k++) off += roles[k] == 0 ? idx[k] * strides[k] : 0;
        (*blocks)[b] = off;
        for (int k = nd - 2; k >= 0; k--) {
            if (roles[k] != 0) continue;
            if (++idx[k] < sizes[k]) break;
            idx[k] = 0;
        }
    }
    return count;
}

static float lerp(float start, float end, float w) {
    /* torch.lerp's formula (exact at w = 0 and 1) */
    return w < 0.5f ? start + w * (end - start) : end - (end - start) * (1.0f - w);
}

/* Returns 1 when the batch was counted, 0 when its covariance was not finite (nothing but `seen`
 * changed; g untouched), -1 for an argument it cannot take.
 *
 * stats: ema, ema_sq, best [rows]; the counters steps, seen, last_improved (int64 scalars).
 * snapshots/row_tensors: `n_rows` tensors whose leading dims are [members, channels]; row r of
 * tensor t is row_sizes[t] contiguous floats.
 * scale: the loss scale (0: none); left_out: positions per position seen (the stride).
 */
int pbp_candidate_gradient(const float *c, const float *d, float *g, int nd, const int64_t *sizes,
                           const int *roles, int64_t members, int64_t channels, float *ema,
                           float *ema_sq, float *best, int64_t *steps_seen, int64_t *batches_seen,
                           int64_t *last_improved, double decay,
                           int64_t warmup, double threshold, int bias_correction, double scale,
                           double left_out, int n_rows, float **snapshots, float **row_tensors,
                           const int64_t *row_sizes, double *work /* 3 x rows */) {
    if (nd < 1 || nd > MAX_DIMS || members < 1 || channels < 1) return -1;
    int64_t rows = members * channels, total = 1, inner = sizes[nd - 1];
    for (int k = 0; k < nd; k++) total *= sizes[k];
    if (total % rows) return -1;
    double n = (double)(total / rows);
    double *sum = work, *cov = work + rows;
    float *m1 = (float *)(work + 2 * rows), *m2 = m1 + rows;
    /* the loss scale divided out of d (as a multiplication: the same to float32 rounding) */
    const float mul = scale > 0.0 ? (float)(1.0 / scale) : 1.0f;

    /* e = d - mean d, centred a second time (as batch_covariance: float32's mean is off by up to
     * half a unit of d's offset); cov = sum c * e, in whole-batch units */
#define SUM1(base, row0, step) run_sum(d + (base), inner, row0, step, mul, NULL, sum)
#define SUM2(base, row0, step) run_sum(d + (base), inner, row0, step, mul, m1, sum)
#define COV(base, row0, step) run_cov(c + (base), d + (base), g + (base), inner, row0, step, mul, m1, m2, cov)
#define SCALE(base, row0, step) run_scale(g + (base), inner, row0, step, m1)
    int64_t *blocks = NULL, n_blocks = 0, member_stride = 0, channel_stride = 0;
    if (roles[nd - 1] == 0) {  /* positions innermost: row by row, over blocks */
        n_blocks = position_blocks(nd, sizes, roles, &blocks, &member_stride, &channel_stride);
        if (n_blocks < 0) return -1;
    }
#define ROW_START(r) (((r) / channels) * member_stride + ((r) % channels) * channel_stride)
#define FOR_EACH_BLOCK(r, BLOCK) for (int64_t b_ = 0; b_ < n_blocks; b_++) { int64_t at = ROW_START(r) + blocks[b_]; BLOCK; }
    memset(sum, 0, sizeof(double) * rows);
    memset(cov, 0, sizeof(double) * rows);
    if (blocks) {
        for (int64_t r = 0; r < rows; r++) {
            /* float sums within a block (vectorised), float64 across blocks */
            double acc = 0.0;
            FOR_EACH_BLOCK(r, {
                float part = 0.0f;
                for (int64_t j = 0; j < inner; j++) part += d[at + j] * mul;
                acc += part;
            });
            float a = m1[r] = (float)(acc / n);
            acc = 0.0;
            FOR_EACH_BLOCK(r, {
                float part = 0.0f;
                for (int64_t j = 0; j < inner; j++) part += d[at + j] * mul - a;
                acc += part;
            });
            float b = m2[r] = (float)(acc / n);
            acc = 0.0;
            FOR_EACH_BLOCK(r, {
                float part = 0.0f;
                for (int64_t j = 0; j < inner; j++) {
                    float e = (d[at + j] * mul - a) - b;
                    g[at + j] = e;
                    part += c[at + j] * e;
                }
                acc += part;
            });
            cov[r] = acc;
        }
    } else {
        FOR_EACH_RUN(SUM1);
        for (int64_t r = 0; r < rows; r++) m1[r] = (float)(sum[r] / n);
        memset(sum, 0, sizeof(double) * rows);
        FOR_EACH_RUN(SUM2);
        for (int64_t r = 0; r < rows; r++) m2[r] = (float)(sum[r] / n);
        FOR_EACH_RUN(COV);
    }
    /* in float32, as the torch ops scale it: a covariance that overflows float32 only once scaled must
     * make the batch not counted here too (scaled in float64, it passed, and became inf as the EMA's input) */
    double whole = (double)members * left_out, check = 0.0;
    for (int64_t r = 0; r < rows; r++) {
        float scaled = (float)cov[r] * (float)members;
        if (left_out != 1.0) scaled *= (float)left_out;
        cov[r] = scaled;
        check += cov[r];
    }

    /* fold the batch into the statistics (covariance_tap.fold_batch, decided on the host) */
    *batches_seen += 1;
    if (!isfinite(check)) {
        free(blocks);
        return 0;
    }
    int64_t steps = ++*steps_seen;
    float w = bias_correction ? (float)((1.0 - decay) / (1.0 - pow(decay, (double)steps)))
                              : (float)(1.0 - decay);
    for (int64_t r = 0; r < rows; r++) {
        float cv = (float)cov[r];
        ema_sq[r] = lerp(ema_sq[r], cv * cv, w);
        ema[r] = lerp(ema[r], cv, w);
    }
    if (steps > warmup) {
        int any = 0;
        for (int64_t r = 0; r < rows; r++) {
            float score = fabsf(ema[r]);
            if (score > best[r] * (float)(1.0 + threshold)) {
                best[r] = score;
                for (int t = 0; t < n_rows; t++)
                    memcpy(snapshots[t] + r * row_sizes[t], row_tensors[t] + r * row_sizes[t],
                           sizeof(float) * row_sizes[t]);
                any = 1;
            }
        }
        if (any) *last_improved = steps;
    }

    /* g = e * k, k = -sign(ema) x (scale, members, left_out): dC/dc in whole-batch units */
    float *k = m1;
    for (int64_t r = 0; r < rows; r++) {
        float s = ema[r] > 0.0f ? 1.0f : (ema[r] < 0.0f ? -1.0f : 0.0f);
        k[r] = s * (float)(-(scale > 0.0 ? scale : 1.0) * whole);
    }
    if (blocks) {
        for (int64_t r = 0; r < rows; r++) {
            float f = k[r];
            FOR_EACH_BLOCK(r, for (int64_t j = 0; j < inner; j++) g[at + j] *= f);
        }
        free(blocks);
    } else {
        FOR_EACH_RUN(SCALE);
    }
    return 1;
}
