/* A candidate pool's own work in a dendrite-phase step, float32 on the CPU, one call each:
 *
 * - pbp_candidate_gradient: the covariance tap's backward for a split pool (its reference and
 *   fallback: covariance_tap.candidate_gradient). It replaces about forty small torch ops, whose
 *   dispatch cost (150-400 us a site and step) was a fifth of a small model's dendrite-phase step.
 * - pbp_norm_sigmoid_forward / _backward: the candidates' BatchNorm (batch statistics) and
 *   sigmoid, forward and backward (reference and fallback: F.batch_norm then torch.sigmoid).
 * - pbp_candidate_norm_backward: pbp_candidate_gradient and pbp_norm_sigmoid_backward as one walk,
 *   where positions are innermost (reference and fallback: the two calls).
 * - pbp_norm_cascade_sigmoid: the installed dendrites' BatchNorm, cascade and sigmoid, forward only.
 * - pbp_columns_1d: a split pool's input columns for a 1-D conv (reference: layers.split_columns).
 *
 * Loaded by pbp_fx/native.py, which compiles this file at first use.
 *
 * c, d and g share one dense layout: `nd` dims in memory order, sizes `sizes`, and each dim's
 * role: 0 a position (batch, spatial, token), 1 the pool member p, 2 the channel. An element's
 * row is p * channels + channel. d is the site error dealt to the members (split), already
 * strided; g receives the candidates' gradient.
 *
 * Every call returns -1 for arguments it cannot take and NO_MEMORY where its work space could not be had.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DIMS 8
#define NO_MEMORY (-2)

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

/* sum[row] += d * mul over one run, in float64 */
static inline void run_sum(const float *restrict d, int64_t len, int64_t row0, int64_t step, float mul,
                           double *restrict sum) {
    if (step == 0) {
        double acc = 0.0;
        for (int64_t j = 0; j < len; j++) acc += (double)(d[j] * mul);
        sum[row0] += acc;
    } else {
        for (int64_t j = 0; j < len; j++) sum[row0 + j * step] += (double)(d[j] * mul);
    }
}

/* e = d * mul - mean (the float64 mean, the difference rounded once to float32) into g, cov[row] += c * e,
 * over one run. (One subtraction: the library is built with -fassociative-math, under which a mean split into
 * float32 parts, (d - a) - b, was computed as d - (a + b) = d - a, and C lost half a unit of d's offset.) */
static inline void run_cov(const float *restrict c, const float *restrict d, float *restrict g, int64_t len,
                           int64_t row0, int64_t step, float mul, const double *restrict mean,
                           double *restrict cov) {
    if (step == 0) {
        double m = mean[row0], acc = 0.0;
        for (int64_t j = 0; j < len; j++) {
            float e = (float)((double)(d[j] * mul) - m);
            g[j] = e;
            acc += (double)(c[j] * e);
        }
        cov[row0] += acc;
    } else {
        for (int64_t j = 0; j < len; j++) {
            int64_t r = row0 + j * step;
            float e = (float)((double)(d[j] * mul) - mean[r]);
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
static int64_t position_blocks(int nd, const int64_t *sizes, const int *roles, const int64_t *given_strides,
                               int64_t **blocks, int64_t *member_stride, int64_t *channel_stride) {
    /* the strides of the dense layout, or `given_strides` (a tensor read in that layout's order) */
    int64_t strides[MAX_DIMS], count = 1;
    strides[nd - 1] = 1;
    for (int k = nd - 2; k >= 0; k--) strides[k] = strides[k + 1] * sizes[k + 1];
    if (given_strides)
        for (int k = 0; k < nd; k++) strides[k] = given_strides[k];
    *member_stride = *channel_stride = 0;
    for (int k = 0; k < nd; k++) {
        if (roles[k] == 1) *member_stride = strides[k];
        else if (roles[k] == 2) *channel_stride = strides[k];
        else if (k < nd - 1) count *= sizes[k];
    }
    *blocks = malloc(sizeof(int64_t) * count);
    if (!*blocks) return NO_MEMORY;
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

/* A pool's statistics, their settings and the rows they snapshot (pbp_candidate_gradient's arguments) */
typedef struct {
    float *ema, *ema_sq, *best;
    int64_t *steps_seen, *batches_seen, *last_improved;
    double decay, threshold, scale, left_out;
    int64_t warmup;
    int bias_correction, n_rows;
    float **snapshots, **row_tensors;
    const int64_t *row_sizes;
} Statistics;

/* One batch's covariance cov [rows] (as summed: scaled here to whole-batch float32 units) folded into the
 * statistics (covariance_tap.fold_batch, decided on the host), and each row's factor k of dC/dc = e * k.
 * Returns 1, or 0 when the covariance is not finite (nothing but batches_seen changed, k not written). */
static int fold_covariance(const Statistics *s, double *cov, int64_t rows, int64_t members, float *k) {
    /* in float32, as the torch ops scale it: a covariance that overflows float32 only once scaled must
     * make the batch not counted here too (scaled in float64, it passed, and became inf as the EMA's input) */
    double whole = (double)members * s->left_out, check = 0.0;
    for (int64_t r = 0; r < rows; r++) {
        float scaled = (float)cov[r] * (float)members;
        if (s->left_out != 1.0) scaled *= (float)s->left_out;
        cov[r] = scaled;
        check += cov[r];
    }
    *s->batches_seen += 1;
    if (!isfinite(check)) return 0;
    int64_t steps = ++*s->steps_seen;
    float w = s->bias_correction ? (float)((1.0 - s->decay) / (1.0 - pow(s->decay, (double)steps)))
                                 : (float)(1.0 - s->decay);
    for (int64_t r = 0; r < rows; r++) {
        float cv = (float)cov[r];
        s->ema_sq[r] = lerp(s->ema_sq[r], cv * cv, w);
        s->ema[r] = lerp(s->ema[r], cv, w);
    }
    if (steps > s->warmup) {
        int any = 0;
        for (int64_t r = 0; r < rows; r++) {
            float score = fabsf(s->ema[r]);
            if (score > s->best[r] * (float)(1.0 + s->threshold)) {
                s->best[r] = score;
                for (int t = 0; t < s->n_rows; t++)
                    memcpy(s->snapshots[t] + r * s->row_sizes[t], s->row_tensors[t] + r * s->row_sizes[t],
                           sizeof(float) * s->row_sizes[t]);
                any = 1;
            }
        }
        if (any) *s->last_improved = steps;
    }
    /* k = -sign(ema) x (scale, members, left_out): dC/dc in whole-batch units */
    for (int64_t r = 0; r < rows; r++) {
        float sign = s->ema[r] > 0.0f ? 1.0f : (s->ema[r] < 0.0f ? -1.0f : 0.0f);
        k[r] = sign * (float)(-(s->scale > 0.0 ? s->scale : 1.0) * whole);
    }
    return 1;
}

/* Where positions are innermost (roles[nd - 1] == 0): each row's blocks of positions in c's layout (that of g, z
 * and dz too) and in d's (its own strides, or c's) */
typedef struct {
    int64_t *blocks, *d_blocks, n_blocks, member_stride, channel_stride, d_member_stride, d_channel_stride;
} RowWalk;

static int row_walk(RowWalk *w, int nd, const int64_t *sizes, const int *roles, const int64_t *d_strides) {
    w->n_blocks = position_blocks(nd, sizes, roles, NULL, &w->blocks, &w->member_stride, &w->channel_stride);
    if (w->n_blocks < 0) return (int)w->n_blocks;
    w->d_blocks = w->blocks, w->d_member_stride = w->member_stride, w->d_channel_stride = w->channel_stride;
    if (d_strides && position_blocks(nd, sizes, roles, d_strides, &w->d_blocks, &w->d_member_stride,
                                     &w->d_channel_stride) < 0) {
        free(w->blocks);
        return NO_MEMORY;
    }
    return 0;
}

static void row_walk_free(RowWalk *w) {
    if (w->d_blocks != w->blocks) free(w->d_blocks);
    free(w->blocks);
}

/* the block (the variadic part) once for each of row r's blocks, with `at` its start in c's layout and `dat` in d's */
#define FOR_EACH_BLOCK(w, r, ...) for (int64_t b_ = 0; b_ < (w).n_blocks; b_++) { \
    int64_t at = ((r) / channels) * (w).member_stride + ((r) % channels) * (w).channel_stride + (w).blocks[b_]; \
    int64_t dat = ((r) / channels) * (w).d_member_stride + ((r) % channels) * (w).d_channel_stride + (w).d_blocks[b_]; \
    (void)at; (void)dat; __VA_ARGS__; }

/* mean[r]: row r's mean of d * mul, from one float64 sum (batch_covariance centres d twice instead: float32's
 * mean is off by up to half a unit of d's offset) */
static void error_means(const RowWalk *w, const float *d, int64_t inner, int64_t rows, int64_t channels, float mul,
                        double n, double *mean) {
    for (int64_t r = 0; r < rows; r++) {
        double acc = 0.0;  /* (a vectorised float64 sum) */
        FOR_EACH_BLOCK(*w, r, {
            double part = 0.0;
            for (int64_t j = 0; j < inner; j++) part += (double)(d[dat + j] * mul);
            acc += part;
        });
        mean[r] = acc / n;
    }
}

/* e = d * mul - mean, the float64 mean and the difference rounded once to float32. (One subtraction: the library
 * is built with -fassociative-math, under which a mean split into float32 parts, (d - a) - b, was computed as
 * d - (a + b) = d - a, and C lost half a unit of d's offset.) */
#define CENTRED(dv, m) ((float)((double)((dv) * mul) - (m)))

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
                           const int64_t *row_sizes, const int64_t *d_strides, double *work /* 3 x rows */) {
    if (nd < 1 || nd > MAX_DIMS || members < 1 || channels < 1) return -1;
    /* d in a layout of its own (a split site error's view: no copy): positions innermost, contiguous there */
    if (d_strides && (roles[nd - 1] != 0 || d_strides[nd - 1] != 1)) return -1;
    int64_t rows = members * channels, total = 1, inner = sizes[nd - 1];
    for (int k = 0; k < nd; k++) total *= sizes[k];
    if (total % rows) return -1;
    double n = (double)(total / rows);
    double *sum = work, *cov = work + rows, *mean = sum; /* (each row's sum becomes its mean) */
    float *k = (float *)(work + 2 * rows);
    /* the loss scale divided out of d (as a multiplication: the same to float32 rounding) */
    const float mul = scale > 0.0 ? (float)(1.0 / scale) : 1.0f;
    Statistics stats = {ema, ema_sq, best, steps_seen, batches_seen, last_improved, decay, threshold, scale,
                        left_out, warmup, bias_correction, n_rows, snapshots, row_tensors, row_sizes};

    /* e = d - mean d; cov = sum c * e, in whole-batch units */
#define SUM(base, row0, step) run_sum(d + (base), inner, row0, step, mul, sum)
#define COV(base, row0, step) run_cov(c + (base), d + (base), g + (base), inner, row0, step, mul, mean, cov)
#define SCALE(base, row0, step) run_scale(g + (base), inner, row0, step, k)
    RowWalk walk = {0};
    memset(sum, 0, sizeof(double) * rows);
    memset(cov, 0, sizeof(double) * rows);
    if (roles[nd - 1] == 0) {  /* positions innermost: row by row, over blocks */
        int status = row_walk(&walk, nd, sizes, roles, d_strides);
        if (status < 0) return status;
        error_means(&walk, d, inner, rows, channels, mul, n, mean);
        for (int64_t r = 0; r < rows; r++) {
            double m = mean[r], acc = 0.0;
            FOR_EACH_BLOCK(walk, r, {
                float part = 0.0f;
                for (int64_t j = 0; j < inner; j++) {
                    float e = CENTRED(d[dat + j], m);
                    g[at + j] = e;
                    part += c[at + j] * e;
                }
                acc += part;
            });
            cov[r] = acc;
        }
    } else {
        FOR_EACH_RUN(SUM);
        for (int64_t r = 0; r < rows; r++) mean[r] = sum[r] / n;
        FOR_EACH_RUN(COV);
    }
    if (!fold_covariance(&stats, cov, rows, members, k)) {
        row_walk_free(&walk);
        return 0;
    }
    /* g = e * k */
    if (walk.blocks) {
        for (int64_t r = 0; r < rows; r++) {
            float f = k[r];
            FOR_EACH_BLOCK(walk, r, for (int64_t j = 0; j < inner; j++) g[at + j] *= f);
        }
        row_walk_free(&walk);
    } else {
        FOR_EACH_RUN(SCALE);
    }
    return 1;
}

/* pbp_candidate_gradient and then pbp_norm_sigmoid_backward in one walk, for candidates c = sigmoid(norm(z)
 * (+ extra)) (the forward kernel's out, with its mean_z and invstd) whose positions are innermost: the gradient of
 * c, e * k, is never written: the pass that takes the covariance also takes the norm's sums of e * c (1 - c)
 * (kept in dz) before k is known, and they are scaled by k after (three passes over c's size instead of five,
 * and one call). The two calls' arithmetic to float32 rounding: the product by k comes after the sums instead of
 * before (the same where k is a power of two), and the norm's sums run in this walk's order, not that kernel's.
 * dz, g (the gradient before the sigmoid, that of `extra`; NULL: not wanted), dgamma and dbeta (NULL without an
 * affine norm) as pbp_norm_sigmoid_backward gives them. Returns as pbp_candidate_gradient; on 0 (not counted)
 * only dz is written (scratch). work: 5 x rows doubles. */
int pbp_candidate_norm_backward(const float *c, const float *d, const float *z, float *g, float *dz, int nd,
                                const int64_t *sizes, const int *roles, int64_t members, int64_t channels,
                                float *ema, float *ema_sq, float *best, int64_t *steps_seen,
                                int64_t *batches_seen, int64_t *last_improved, double decay, int64_t warmup,
                                double threshold, int bias_correction, double scale, double left_out, int n_rows,
                                float **snapshots, float **row_tensors, const int64_t *row_sizes,
                                const int64_t *d_strides, const float *gamma, const float *mean_z,
                                const float *invstd, float *dgamma, float *dbeta, double *work) {
    if (nd < 1 || nd > MAX_DIMS || members < 1 || channels < 1 || roles[nd - 1] != 0) return -1;
    if (d_strides && d_strides[nd - 1] != 1) return -1;
    int64_t rows = members * channels, total = 1, inner = sizes[nd - 1];
    for (int k = 0; k < nd; k++) total *= sizes[k];
    if (total % rows) return -1;
    double n = (double)(total / rows);
    double *mean = work, *cov = work + rows, *s1 = work + 2 * rows, *s2 = work + 3 * rows;
    float *k = (float *)(work + 4 * rows);
    const float mul = scale > 0.0 ? (float)(1.0 / scale) : 1.0f;
    Statistics stats = {ema, ema_sq, best, steps_seen, batches_seen, last_improved, decay, threshold, scale,
                        left_out, warmup, bias_correction, n_rows, snapshots, row_tensors, row_sizes};
    RowWalk walk;
    int status = row_walk(&walk, nd, sizes, roles, d_strides);
    if (status < 0) return status;
    error_means(&walk, d, inner, rows, channels, mul, n, mean);
    /* cov = sum c * e; s1, s2: the norm's sums of v = e * c (1 - c) and of v * xhat, before k; v kept in dz */
    for (int64_t r = 0; r < rows; r++) {
        double m = mean[r], acc = 0.0, acc1 = 0.0, acc2 = 0.0;
        float mz = mean_z[r], is = invstd[r];
        FOR_EACH_BLOCK(walk, r, {
            float part = 0.0f, p1 = 0.0f, p2 = 0.0f;
            for (int64_t j = 0; j < inner; j++) {
                float e = CENTRED(d[dat + j], m), cv = c[at + j];
                part += cv * e;
                float v = e * (cv * (1.0f - cv));
                dz[at + j] = v;
                p1 += v;
                p2 += v * ((z[at + j] - mz) * is);
            }
            acc += part;
            acc1 += p1;
            acc2 += p2;
        });
        cov[r] = acc;
        s1[r] = acc1;
        s2[r] = acc2;
    }
    if (!fold_covariance(&stats, cov, rows, members, k)) {
        row_walk_free(&walk);
        return 0;
    }
    /* dz = w (v k - m1 - xhat m2), as pbp_norm_sigmoid_backward */
    for (int64_t r = 0; r < rows; r++) {
        float kr = k[r], mz = mean_z[r], is = invstd[r], f = gamma ? gamma[r] * is : is;
        s1[r] *= kr;
        s2[r] *= kr;
        if (dgamma) {
            dgamma[r] = (float)s2[r];
            dbeta[r] = (float)s1[r];
        }
        float a = (float)(s1[r] / n), b = (float)(s2[r] / n);
        FOR_EACH_BLOCK(walk, r, {
            for (int64_t j = 0; j < inner; j++) {
                float v = dz[at + j] * kr;
                if (g) g[at + j] = v;
                dz[at + j] = (v - a - ((z[at + j] - mz) * is) * b) * f;
            }
        });
    }
    row_walk_free(&walk);
    return 1;
}


/* ---- the candidates' BatchNorm and sigmoid ------------------------------------------------
 *
 * z (the candidates' layer output), extra (the cascade's input from installed dendrites, or
 * NULL), out, dc, dz and g share one dense layout, described as above; a row (member, channel)
 * is one BatchNorm channel, normalised over its positions. */

/* e^x for the sigmoid: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor series to r^7 (relative
 * error below 1e-7 before rounding), 2^n built in the exponent bits. Branch-free, so that the loops
 * calling it run vectorised; x is clamped to [-87, 89]: e^x is a normal float or, from x ~ 88.4 (n = 128,
 * the exponent field all ones), inf, so that sigmoid(x) is 0 from x ~ -88.4 down to -inf as torch's is at
 * -inf (a clamp at 88 left 6e-39 there); NaN stays NaN. */
static inline float exp_approx(float x) {
    x = x > 89.0f ? 89.0f : x;
    x = x < -87.0f ? -87.0f : x;
    /* n + 128 = round(x / ln2) + 128, read from the mantissa of x / ln2 + 2^23 + 128 (one ulp there is 1):
     * no float-to-integer conversion, which is undefined behaviour for NaN (a guard around it made the
     * compiler evaluate the polynomial twice and blend: 1.7x the sigmoid's time; r stays NaN for NaN) */
    union { float f; uint32_t u; } shifted;
    shifted.f = x * 1.4426950408889634f + 8388736.0f;
    int32_t i = (int32_t)(shifted.u & 0x7fffffu);
    float n = (float)(i - 128);
    float r = (x - n * 0.693145751953125f) - n * 1.4286068203094172e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { uint32_t u; float f; } scale;
    scale.u = ((uint32_t)i - 1u) << 23;  /* 2^n: the exponent field n + 127 */
    return p * scale.f;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

/* sum[row] += z over one run */
static inline void run_total(const float *restrict z, int64_t len, int64_t row0, int64_t step, double *restrict sum) {
    if (step == 0) {
        float part = 0.0f;
        for (int64_t j = 0; j < len; j++) part += z[j];
        sum[row0] += part;
    } else {
        for (int64_t j = 0; j < len; j++) sum[row0 + j * step] += z[j];
    }
}

/* sum[row] += (z - mean[row])^2 over one run */
static inline void run_squares(const float *restrict z, int64_t len, int64_t row0, int64_t step,
                               const float *restrict mean, double *restrict sum) {
    if (step == 0) {
        float m = mean[row0], part = 0.0f;
        for (int64_t j = 0; j < len; j++) part += (z[j] - m) * (z[j] - m);
        sum[row0] += part;
    } else {
        for (int64_t j = 0; j < len; j++) {
            float v = z[j] - mean[row0 + j * step];
            sum[row0 + j * step] += v * v;
        }
    }
}

/* out = sigmoid(z * alpha[row] + beta[row] (+ extra)) over one run (BatchNorm's transform in
 * torch's alpha/beta form) */
static inline void run_activate(const float *restrict z, const float *restrict extra, float *restrict out,
                                int64_t len, int64_t row0, int64_t step, const float *restrict alpha,
                                const float *restrict beta) {
    if (step == 0) {
        float a = alpha[row0], b = beta[row0];
        if (extra)
            for (int64_t j = 0; j < len; j++) out[j] = sigmoid((z[j] * a + b) + extra[j]);
        else
            for (int64_t j = 0; j < len; j++) out[j] = sigmoid(z[j] * a + b);
    } else {
        for (int64_t j = 0; j < len; j++) {
            int64_t r = row0 + j * step;
            float pre = z[j] * alpha[r] + beta[r];
            out[j] = sigmoid(extra ? pre + extra[j] : pre);
        }
    }
}

/* g = dc * out * (1 - out) (the gradient before the sigmoid), s1[row] += g, s2[row] += g * xhat */
static inline void run_grad_sums(const float *restrict dc, const float *restrict out, const float *restrict z,
                                 float *restrict g, int64_t len, int64_t row0, int64_t step,
                                 const float *restrict mean, const float *restrict invstd,
                                 double *restrict s1, double *restrict s2) {
    if (step == 0) {
        float m = mean[row0], k = invstd[row0], p1 = 0.0f, p2 = 0.0f;
        for (int64_t j = 0; j < len; j++) {
            float v = dc[j] * (out[j] * (1.0f - out[j]));
            g[j] = v;
            p1 += v;
            p2 += v * ((z[j] - m) * k);
        }
        s1[row0] += p1;
        s2[row0] += p2;
    } else {
        for (int64_t j = 0; j < len; j++) {
            int64_t r = row0 + j * step;
            float v = dc[j] * (out[j] * (1.0f - out[j]));
            g[j] = v;
            s1[r] += v;
            s2[r] += v * ((z[j] - mean[r]) * invstd[r]);
        }
    }
}

/* dz = w[row] * (g - m1[row] - xhat * m2[row]), w = gamma * invstd (torch's BatchNorm backward);
 * dz may be g itself */
static inline void run_grad_input(const float *g, const float *restrict z, float *dz,
                                  int64_t len, int64_t row0, int64_t step, const float *restrict mean,
                                  const float *restrict invstd, const float *restrict w,
                                  const float *restrict m1, const float *restrict m2) {
    if (step == 0) {
        float m = mean[row0], k = invstd[row0], f = w[row0], a = m1[row0], b = m2[row0];
        for (int64_t j = 0; j < len; j++) dz[j] = (g[j] - a - ((z[j] - m) * k) * b) * f;
    } else {
        for (int64_t j = 0; j < len; j++) {
            int64_t r = row0 + j * step;
            dz[j] = (g[j] - m1[r] - ((z[j] - mean[r]) * invstd[r]) * m2[r]) * w[r];
        }
    }
}

/* Short runs (a strided conv's 2 x 2 outputs: runs of 4) leave the loops above scalar. Where the
 * member and channel dims lie within a block of at most BLOCK_LIMIT elements repeated over outer
 * position dims (a grouped conv's [b][M, C, S], a Linear's [b][M, C]), the passes instead run over
 * whole blocks, with each row's coefficient spread to the block's elements. Returns the block's size
 * (0: the layout has no such block) with the outer count and each block element's row. */
#define BLOCK_LIMIT 65536
static int64_t block_layout(int nd, const int64_t *sizes, const int *roles, int64_t channels, int64_t *outer,
                            int64_t **row_of) {
    int first = 0;
    while (first < nd && roles[first] == 0) first++;
    int64_t size = 1;
    *outer = 1;
    for (int k = 0; k < nd; k++) {
        if (k < first) *outer *= sizes[k];
        else size *= sizes[k];
    }
    if (size > BLOCK_LIMIT || (roles[nd - 1] == 0 ? sizes[nd - 1] >= 32 : *outer == 1)) return 0;
    *row_of = malloc(sizeof(int64_t) * size);
    if (!*row_of) return 0;
    int64_t idx[MAX_DIMS] = {0}, p = 0, ch = 0;
    for (int64_t j = 0; j < size; j++) {
        (*row_of)[j] = p * channels + ch;
        for (int k = nd - 1; k >= first; k--) {
            if (++idx[k] < sizes[k]) {
                if (roles[k] == 1) p = idx[k]; else if (roles[k] == 2) ch = idx[k];
                break;
            }
            idx[k] = 0;
            if (roles[k] == 1) p = 0; else if (roles[k] == 2) ch = 0;
        }
    }
    return size;
}

/* block_layout with `arrays` zeroed work arrays of the block's size in *space; 0 (the row walk, which needs
 * none) where the layout has no block or the memory cannot be had. */
static int64_t block_space(int nd, const int64_t *sizes, const int *roles, int64_t channels, int arrays,
                           int64_t *outer, int64_t **row_of, float **space) {
    int64_t size = block_layout(nd, sizes, roles, channels, outer, row_of);
    *space = size ? calloc(arrays * size, sizeof(float)) : NULL;
    if (size && !*space) {
        free(*row_of);
        *row_of = NULL;
        return 0;
    }
    return size;
}

/* spread[j] = per_row[row_of[j]] */
static void spread(float *restrict spread_out, const float *restrict per_row, const int64_t *row_of, int64_t size) {
    for (int64_t j = 0; j < size; j++) spread_out[j] = per_row[row_of[j]];
}

/* per_row[row_of[j]] += acc[j] */
static void gather_sums(double *restrict per_row, const float *restrict acc, const int64_t *row_of, int64_t size) {
    for (int64_t j = 0; j < size; j++) per_row[row_of[j]] += acc[j];
}

/* A BatchNorm's batch sums over `outer` blocks of `size` elements: sum[row] += z, then (mean spread to the
 * block in `spread_mean`, computed from sum by the caller in between) sq[row] += (z - mean)^2. acc: size floats. */
static void block_total(const float *restrict z, int64_t outer, int64_t size, const int64_t *row_of,
                        float *restrict acc, double *restrict sum) {
    memset(acc, 0, sizeof(float) * size);
    for (int64_t o = 0; o < outer; o++) {
        const float *zo = z + o * size;
        for (int64_t j = 0; j < size; j++) acc[j] += zo[j];
    }
    gather_sums(sum, acc, row_of, size);
}

static void block_squares(const float *restrict z, int64_t outer, int64_t size, const int64_t *row_of,
                          const float *restrict spread_mean, float *restrict acc, double *restrict sq) {
    memset(acc, 0, sizeof(float) * size);
    for (int64_t o = 0; o < outer; o++) {
        const float *zo = z + o * size;
        for (int64_t j = 0; j < size; j++) acc[j] += (zo[j] - spread_mean[j]) * (zo[j] - spread_mean[j]);
    }
    gather_sums(sq, acc, row_of, size);
}

/* Returns 0, or -1 for an argument it cannot take (fewer than two positions a row: BatchNorm's
 * batch variance needs two).
 * gamma, beta: the norm's affine weight and bias [rows], or NULL; running_mean/var [rows] are
 * updated as nn.BatchNorm does (momentum; the variance unbiased), or NULL. mean and invstd [rows]
 * receive the batch's, for the backward. work: 2 x rows doubles. */
int pbp_norm_sigmoid_forward(const float *z, const float *extra, float *out, int nd, const int64_t *sizes,
                             const int *roles, int64_t members, int64_t channels, const float *gamma,
                             const float *beta, float *running_mean, float *running_var, double momentum,
                             double eps, float *mean, float *invstd, double *work) {
    if (nd < 1 || nd > MAX_DIMS || members < 1 || channels < 1) return -1;
    int64_t rows = members * channels, total = 1, inner = sizes[nd - 1];
    for (int k = 0; k < nd; k++) total *= sizes[k];
    if (total % rows || total / rows < 2) return -1;
    double n = (double)(total / rows);
    double *sum = work, *sq = work + rows;
    memset(work, 0, sizeof(double) * 2 * rows);
    int64_t outer = 1, *row_of = NULL;
    float *acc = NULL, *a = NULL, *b = NULL;
    int64_t size = block_space(nd, sizes, roles, channels, 3, &outer, &row_of, &acc);
    if (size) {
        a = acc + size;
        b = a + size;
        block_total(z, outer, size, row_of, acc, sum);
    } else {
#define TOTAL(base, row0, step) run_total(z + (base), inner, row0, step, sum)
        FOR_EACH_RUN(TOTAL);
    }
    for (int64_t r = 0; r < rows; r++) mean[r] = (float)(sum[r] / n);
    if (size) {
        spread(a, mean, row_of, size);
        block_squares(z, outer, size, row_of, a, acc, sq);
    } else {
#define SQUARES(base, row0, step) run_squares(z + (base), inner, row0, step, mean, sq)
        FOR_EACH_RUN(SQUARES);
    }
    /* alpha and beta of the transform, in the work space (floats) */
    float *alpha = (float *)sum, *shift = alpha + rows;
    for (int64_t r = 0; r < rows; r++) {
        double var = sq[r] / n;
        invstd[r] = (float)(1.0 / sqrt(var + eps));
        if (running_mean) {
            running_mean[r] = (float)(momentum * mean[r] + (1.0 - momentum) * running_mean[r]);
            running_var[r] = (float)(momentum * var * n / (n - 1.0) + (1.0 - momentum) * running_var[r]);
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        alpha[r] = gamma ? invstd[r] * gamma[r] : invstd[r];
        shift[r] = (beta ? beta[r] : 0.0f) - mean[r] * alpha[r];
    }
    if (size) {
        spread(a, alpha, row_of, size);
        spread(b, shift, row_of, size);
        for (int64_t o = 0; o < outer; o++) {
            const float *zo = z + o * size, *eo = extra ? extra + o * size : NULL;
            float *outo = out + o * size;
            if (eo)
                for (int64_t j = 0; j < size; j++) outo[j] = sigmoid((zo[j] * a[j] + b[j]) + eo[j]);
            else
                for (int64_t j = 0; j < size; j++) outo[j] = sigmoid(zo[j] * a[j] + b[j]);
        }
        free(acc);
        free(row_of);
        return 0;
    }
#define ACTIVATE(base, row0, step) run_activate(z + (base), extra ? extra + (base) : NULL, out + (base), inner, row0, step, alpha, shift)
    FOR_EACH_RUN(ACTIVATE);
    return 0;
}

/* From dc (the gradient of out): dz; g, the gradient before the sigmoid (that of `extra`; NULL:
 * not wanted); dgamma and dbeta [rows] (NULL without an affine norm). work: 2 x rows doubles.
 * Returns 0 or -1. */
int pbp_norm_sigmoid_backward(const float *dc, const float *out, const float *z, float *g, float *dz,
                              int nd, const int64_t *sizes, const int *roles, int64_t members, int64_t channels,
                              const float *gamma, const float *mean, const float *invstd, float *dgamma,
                              float *dbeta, double *work) {
    if (nd < 1 || nd > MAX_DIMS || members < 1 || channels < 1) return -1;
    int64_t rows = members * channels, total = 1, inner = sizes[nd - 1];
    for (int k = 0; k < nd; k++) total *= sizes[k];
    if (total % rows) return -1;
    double n = (double)(total / rows);
    double *s1 = work, *s2 = work + rows;
    memset(work, 0, sizeof(double) * 2 * rows);
    if (!g) g = dz;  /* (then overwritten in place by dz) */
    int64_t outer = 1, *row_of = NULL;
    float *acc = NULL, *acc2 = NULL, *sm = NULL, *sk = NULL;
    int64_t size = block_space(nd, sizes, roles, channels, 7, &outer, &row_of, &acc);
    if (size) {
        acc2 = acc + size;
        sm = acc2 + size;
        sk = sm + size;
        spread(sm, mean, row_of, size);
        spread(sk, invstd, row_of, size);
        for (int64_t o = 0; o < outer; o++) {
            int64_t at = o * size;
            for (int64_t j = 0; j < size; j++) {
                float v = dc[at + j] * (out[at + j] * (1.0f - out[at + j]));
                g[at + j] = v;
                acc[j] += v;
                acc2[j] += v * ((z[at + j] - sm[j]) * sk[j]);
            }
        }
        gather_sums(s1, acc, row_of, size);
        gather_sums(s2, acc2, row_of, size);
    } else {
#define GRAD_SUMS(base, row0, step) run_grad_sums(dc + (base), out + (base), z + (base), g + (base), inner, row0, step, mean, invstd, s1, s2)
        FOR_EACH_RUN(GRAD_SUMS);
    }
    if (dgamma)
        for (int64_t r = 0; r < rows; r++) {
            dgamma[r] = (float)s2[r];
            dbeta[r] = (float)s1[r];
        }
    float *w = malloc(sizeof(float) * 3 * rows);
    if (!w) {
        free(acc);
        free(row_of);
        return NO_MEMORY;
    }
    float *m1 = w + rows, *m2 = w + 2 * rows;
    for (int64_t r = 0; r < rows; r++) {
        w[r] = gamma ? gamma[r] * invstd[r] : invstd[r];
        m1[r] = (float)(s1[r] / n);
        m2[r] = (float)(s2[r] / n);
    }
    if (size) {
        float *sw = acc, *s1e = acc2, *s2e = sk + size;  /* (the sums are spent) */
        spread(sw, w, row_of, size);
        spread(s1e, m1, row_of, size);
        spread(s2e, m2, row_of, size);
        for (int64_t o = 0; o < outer; o++) {
            int64_t at = o * size;
            for (int64_t j = 0; j < size; j++)
                dz[at + j] = (g[at + j] - s1e[j] - ((z[at + j] - sm[j]) * sk[j]) * s2e[j]) * sw[j];
        }
        free(w);
        free(acc);
        free(row_of);
        return 0;
    }
#define GRAD_INPUT(base, row0, step) run_grad_input(g + (base), z + (base), dz + (base), inner, row0, step, mean, invstd, w, m1, m2)
    FOR_EACH_RUN(GRAD_INPUT);
    free(w);
    return 0;
}

/* ---- installed dendrites: norm, cascade and sigmoid, forward only ---------------------------
 *
 * z: K dendrites' layer outputs, contiguous [outer, K, C, inner] (a conv's [B, K, C, *S], a Linear's
 * [..., K, C] with inner 1); out receives s_k = sigmoid(norm_k(z_k) + sum_{j<k} U[k, c, j] s_j), the
 * cascade U [K, C, K] (NULL: none), in the same layout. training: the batch's statistics (and the
 * running ones updated as nn.BatchNorm does); else the running ones. Nothing here needs a gradient
 * (the dendrites are frozen, their input detached), so nothing is saved. Returns 0, or -1 for fewer
 * than two positions a channel in training. work: 2 x K x C doubles. */
int pbp_norm_cascade_sigmoid(const float *z, float *out, int64_t outer, int64_t copies, int64_t channels,
                             int64_t inner, const float *gamma, const float *beta, float *running_mean,
                             float *running_var, int training, double momentum, double eps, const float *cascade,
                             double *work) {
    int64_t rows = copies * channels, count = outer * inner;
    if (outer < 1 || copies < 1 || channels < 1 || inner < 1 || (training && count < 2)) return -1;
    double n = (double)count, *sum = work, *sq = work + rows;
    float *alpha = malloc(sizeof(float) * 2 * rows);
    if (!alpha) return NO_MEMORY;
    float *shift = alpha + rows;
    /* Short rows (a Linear's, inner 1) leave per-row loops scalar: there the passes run over each sample's
     * whole [K, C, inner] block, with the per-row values spread to its elements. */
    int64_t block = rows * inner;
    int spread_rows = inner < 16 && block * (copies + 3) <= (1 << 22);
    float *per = spread_rows ? malloc(sizeof(float) * block * (copies + 3)) : NULL;
    if (spread_rows && !per) spread_rows = 0;
    int64_t *row_of = NULL;
    if (spread_rows) {
        row_of = malloc(sizeof(int64_t) * block);
        if (!row_of) {
            free(per);
            per = NULL;
            spread_rows = 0;
        } else {
            for (int64_t e = 0; e < block; e++) row_of[e] = e / inner;
        }
    }
    if (training) {
        memset(work, 0, sizeof(double) * 2 * rows);
        if (spread_rows) {
            block_total(z, outer, block, row_of, per, sum);
        } else {
            for (int64_t o = 0; o < outer; o++) {
                const float *zo = z + o * rows * inner;
                for (int64_t r = 0; r < rows; r++) {
                    float part = 0.0f;
                    for (int64_t s = 0; s < inner; s++) part += zo[r * inner + s];
                    sum[r] += part;
                }
            }
        }
        for (int64_t r = 0; r < rows; r++) shift[r] = (float)(sum[r] / n);  /* (the mean, for now) */
        if (spread_rows) {
            spread(per + block, shift, row_of, block);
            block_squares(z, outer, block, row_of, per + block, per, sq);
        } else {
            for (int64_t o = 0; o < outer; o++) {
                const float *zo = z + o * rows * inner;
                for (int64_t r = 0; r < rows; r++) {
                    float m = shift[r], part = 0.0f;
                    for (int64_t s = 0; s < inner; s++) part += (zo[r * inner + s] - m) * (zo[r * inner + s] - m);
                    sq[r] += part;
                }
            }
        }
        for (int64_t r = 0; r < rows; r++) {
            double var = sq[r] / n;
            float mean = shift[r], invstd = (float)(1.0 / sqrt(var + eps));
            if (running_mean) {
                running_mean[r] = (float)(momentum * mean + (1.0 - momentum) * running_mean[r]);
                running_var[r] = (float)(momentum * var * n / (n - 1.0) + (1.0 - momentum) * running_var[r]);
            }
            alpha[r] = gamma ? invstd * gamma[r] : invstd;
            shift[r] = (beta ? beta[r] : 0.0f) - mean * alpha[r];
        }
    } else {
        for (int64_t r = 0; r < rows; r++) {
            float invstd = (float)(1.0 / sqrt((double)running_var[r] + eps));
            alpha[r] = gamma ? invstd * gamma[r] : invstd;
            shift[r] = (beta ? beta[r] : 0.0f) - running_mean[r] * alpha[r];
        }
    }
    if (spread_rows) {
        /* per: alpha, shift, then U[k, c, j] spread over copy k's elements for each j < k (at row (j, c)) */
        float *a = per, *b = per + block, *u = per + 2 * block;
        spread(a, alpha, row_of, block);
        spread(b, shift, row_of, block);
        int64_t part = channels * inner;
        if (cascade)
            for (int64_t k = 1; k < copies; k++)
                for (int64_t j = 0; j < k; j++)
                    for (int64_t e = 0; e < part; e++)
                        u[j * block + k * part + e] = cascade[(k * channels + e / inner) * copies + j];
        for (int64_t o = 0; o < outer; o++) {
            const float *zo = z + o * block;
            float *outo = out + o * block;
            for (int64_t k = 0; k < copies; k++) {
                int64_t at = k * part;
                if (k == 0 || !cascade) {
                    for (int64_t e = at; e < at + part; e++) outo[e] = sigmoid(zo[e] * a[e] + b[e]);
                    continue;
                }
                for (int64_t e = at; e < at + part; e++) outo[e] = zo[e] * a[e] + b[e];
                for (int64_t j = 0; j < k; j++) {
                    const float *uj = u + j * block, *sj = outo + j * part - at;
                    for (int64_t e = at; e < at + part; e++) outo[e] += uj[e] * sj[e];
                }
                for (int64_t e = at; e < at + part; e++) outo[e] = sigmoid(outo[e]);
            }
        }
        free(per);
        free(row_of);
        free(alpha);
        return 0;
    }
    /* copy k after copies 0..k-1 at each position: its cascade reads their outputs */
    for (int64_t o = 0; o < outer; o++) {
        for (int64_t k = 0; k < copies; k++) {
            for (int64_t c = 0; c < channels; c++) {
                int64_t r = k * channels + c;
                const float *zr = z + (o * rows + r) * inner;
                float *outr = out + (o * rows + r) * inner, a = alpha[r], b = shift[r];
                if (k == 0 || !cascade) {
                    for (int64_t s = 0; s < inner; s++) outr[s] = sigmoid(zr[s] * a + b);
                    continue;
                }
                for (int64_t s = 0; s < inner; s++) outr[s] = zr[s] * a + b;
                for (int64_t j = 0; j < k; j++) {
                    const float *sj = out + (o * rows + j * channels + c) * inner;
                    float u = cascade[r * copies + j];
                    for (int64_t s = 0; s < inner; s++) outr[s] += u * sj[s];
                }
                for (int64_t s = 0; s < inner; s++) outr[s] = sigmoid(outr[s]);
            }
        }
    }
    free(alpha);
    return 0;
}

/* The columns of a 1-D convolution for a split pool, in one pass (reference and fallback:
 * layers.split_columns' pad, unfold and copy, which took two passes over strided views).
 *
 * x: [members * b (+ samples left out), cin, length] at element strides sb, sc, sl. out: contiguous
 * [members, cin, k, b, lout], out[m, c, j, i, l] = x[m * b + i, c, l * stride + j - pad], 0 where that
 * position is padding. */
int pbp_columns_1d(const float *x, int64_t sb, int64_t sc, int64_t sl, float *out, int64_t members, int64_t b,
                   int64_t cin, int64_t length, int64_t k, int64_t stride, int64_t pad, int64_t lout) {
    if (members < 1 || b < 1 || cin < 1 || length < 1 || k < 1 || stride < 1 || pad < 0 || lout < 1) return -1;
    for (int64_t m = 0; m < members; m++) {
        for (int64_t c = 0; c < cin; c++) {
            for (int64_t j = 0; j < k; j++) {
                int64_t off = j - pad; /* input position of output position 0 */
                /* Output positions lo <= l < hi read the input; the rest are padding. */
                int64_t lo = off >= 0 ? 0 : (-off + stride - 1) / stride;
                int64_t hi = length - off <= 0 ? 0 : (length - off + stride - 1) / stride;
                if (hi > lout) hi = lout;
                if (lo > hi) lo = hi;
                float *dst = out + ((m * cin + c) * k + j) * b * lout;
                for (int64_t i = 0; i < b; i++, dst += lout) {
                    const float *row = x + (m * b + i) * sb + c * sc;
                    for (int64_t l = 0; l < lo; l++) dst[l] = 0.0f;
                    if (sl == 1 && stride == 1) {
                        memcpy(dst + lo, row + lo + off, sizeof(float) * (hi - lo));
                    } else {
                        int64_t step = stride * sl;
                        const float *src = row + (lo * stride + off) * sl;
                        for (int64_t l = lo; l < hi; l++, src += step) dst[l] = *src;
                    }
                    for (int64_t l = hi; l < lout; l++) dst[l] = 0.0f;
                }
            }
        }
    }
    return 0;
}
