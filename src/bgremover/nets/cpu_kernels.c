/* Fused CPU kernels for the dense block's BatchNorm-ReLU on channels-last tensors (bgremover.nets.cpu_kernels).
 *
 * Why: on a CPU the dense block's convolutions run near the machine's peak, and what remained of a training step
 * was PyTorch's elementwise passes around them: a BN-ReLU forward of two to four passes (through an fp32 scratch
 * for bf16 data), and a backward of three to five (ReLU mask, BN sums, scaled add, stat-gradient add), each one a
 * trip through memory. Each kernel here is one pass (statistics: two) with fp32 maths in registers.
 *
 * Layout: every tensor is "pixel-major": P = N*H*W pixels, each holding C consecutive channel values, pixel p at
 * base + p * stride (a channels_last tensor or a channel slice of one). Each tensor is bf16 (uint16 bit patterns)
 * or fp32, said by one bit of `types` (bit k: the k-th tensor argument is fp32); every combination is compiled
 * (the macros below) so the inner loops see fixed types and vectorize. Sums over pixels go through fp32 partial
 * sums of PIXEL_BLOCK pixels added into fp64 per thread, so a 100k-pixel sum keeps fp32-level accuracy. Threads:
 * OpenMP, which resolves to the libgomp PyTorch has already loaded (same soname), so these regions share
 * PyTorch's thread pool; the caller passes torch.get_num_threads() as nt.
 *
 * Compiled on first use with `cc -O3 -march=native -fopenmp` (AVX2 or AVX-512, whichever this CPU has); fmaf is
 * written out so that the forward and the backward round the BN affine the same way (the ReLU mask must agree).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;
typedef int64_t i64;

#define PIXEL_BLOCK 64          /* pixels per fp32 partial sum before it is added to fp64 */
#define MIN_PARALLEL (1 << 15)  /* values below which one thread does the work: a region costs microseconds */

static inline float bf2f(bf16 b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f2bf(float f) { /* round to nearest even, as PyTorch does; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (bf16)0x7FC0 : (bf16)r;
}

/* Storage types by letter: B = bf16, F = fp32; LD widens a stored value to fp32, ST rounds an fp32 value once. */
#define T_B bf16
#define T_F float
#define LD_B(v) bf2f(v)
#define LD_F(v) (v)
#define ST_B(v) f2bf(v)
#define ST_F(v) (v)

static inline float relu(float v) { return v < 0.0f ? 0.0f : v; } /* NaN passes, as in torch.relu; vectorizes */

static int threads_for(i64 values, int nt) { return values < MIN_PARALLEL || nt < 1 ? 1 : nt; }

static void split(i64 P, int t, int nt, i64 *lo, i64 *hi) {
    *lo = P * t / nt;
    *hi = P * (t + 1) / nt;
}

/* A parallel region over pixels with per-thread fp64 sums (NSUMS per channel) merged into `total` at the end;
 * the body runs per pixel p with `part` (fp32 partial sums of the current pixel block) to add into. */
#define PIXEL_SUMS(NSUMS, total, ...)                                                          \
    _Pragma("omp parallel num_threads(threads_for(P * C, nt))") {                              \
        i64 lo, hi;                                                                            \
        split(P, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);                       \
        double *acc = calloc((size_t)((NSUMS) * C), sizeof(double));                           \
        float *part = malloc(sizeof(float) * (NSUMS) * C);                                     \
        for (i64 p0 = lo; p0 < hi; p0 += PIXEL_BLOCK) {                                        \
            i64 p1 = p0 + PIXEL_BLOCK < hi ? p0 + PIXEL_BLOCK : hi;                            \
            memset(part, 0, sizeof(float) * (NSUMS) * C);                                      \
            for (i64 p = p0; p < p1; p++) { __VA_ARGS__ }                                      \
            for (i64 c = 0; c < (NSUMS) * C; c++) acc[c] += part[c];                           \
        }                                                                                      \
        if ((total) != NULL) {                                                                 \
            _Pragma("omp critical") for (i64 c = 0; c < (NSUMS) * C; c++) (total)[c] += acc[c]; \
        }                                                                                      \
        free(acc);                                                                             \
        free(part);                                                                            \
    }

/* A parallel region over pixels without sums. */
#define PIXELS(...)                                                                            \
    _Pragma("omp parallel num_threads(threads_for(P * C, nt))") {                              \
        i64 lo, hi;                                                                            \
        split(P, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);                       \
        for (i64 p = lo; p < hi; p++) { __VA_ARGS__ }                                          \
    }

/* The exported functions pick the instance for their tensors' types (bit k of `types`: the k-th tensor is fp32;
 * an instance's letters name its tensors in argument order). */
#define SWITCH2(fn, types, ...)                                  \
    switch (types) {                                             \
    case 0: fn##_BB(__VA_ARGS__); break;                         \
    case 1: fn##_FB(__VA_ARGS__); break;                         \
    case 2: fn##_BF(__VA_ARGS__); break;                         \
    default: fn##_FF(__VA_ARGS__);                               \
    }

/* out = relu(x * scale + shift) per channel. */
#define BN_RELU_FWD(X, O)                                                                                         \
    static void bn_relu_fwd_##X##O(const T_##X *x, i64 xs, T_##O *out, i64 os, i64 P, i64 C, const float *scale, \
                                   const float *shift, int nt) {                                                  \
        PIXELS(const T_##X *xp = x + p * xs; T_##O *op = out + p * os;                                            \
               for (i64 c = 0; c < C; c++) op[c] = ST_##O(relu(fmaf(LD_##X(xp[c]), scale[c], shift[c])));)       \
    }
BN_RELU_FWD(B, B)
BN_RELU_FWD(B, F)
BN_RELU_FWD(F, B)
BN_RELU_FWD(F, F)

void bn_relu_fwd(const void *x, i64 xs, void *out, i64 os, int types, i64 P, i64 C, const float *scale,
                 const float *shift, int nt) {
    SWITCH2(bn_relu_fwd, types, x, xs, out, os, P, C, scale, shift, nt)
}

/* Biased per-channel variance and mean over all pixels: a sum, then a sum of squared deviations. */
#define CHANNEL_STATS(X)                                                                                          \
    static void channel_stats_##X(const T_##X *x, i64 xs, i64 P, i64 C, float *mean, float *var, int nt) {       \
        double *total = calloc((size_t)C, sizeof(double));                                                        \
        PIXEL_SUMS(1, total, const T_##X *xp = x + p * xs; for (i64 c = 0; c < C; c++) part[c] += LD_##X(xp[c]);) \
        for (i64 c = 0; c < C; c++) mean[c] = (float)(total[c] / (double)P);                                      \
        memset(total, 0, sizeof(double) * C);                                                                     \
        PIXEL_SUMS(1, total, const T_##X *xp = x + p * xs; for (i64 c = 0; c < C; c++) {                          \
            float d = LD_##X(xp[c]) - mean[c];                                                                     \
            part[c] += d * d;                                                                                      \
        })                                                                                                        \
        for (i64 c = 0; c < C; c++) var[c] = (float)(total[c] / (double)P);                                       \
        free(total);                                                                                              \
    }
CHANNEL_STATS(B)
CHANNEL_STATS(F)

void channel_stats(const void *x, i64 xs, int types, i64 P, i64 C, float *mean, float *var, int nt) {
    if (types & 1)
        channel_stats_F(x, xs, P, C, mean, var, nt);
    else
        channel_stats_B(x, xs, P, C, mean, var, nt);
}

/* BN-ReLU backward of one dense layer's input channels, given the conv's input gradient g (pre-ReLU):
 * gm = g where x * scale + shift > 0 (the forward's ReLU mask, recomputed by the same fmaf instead of read from the
 * saved activation: one stream less) else 0;  sum_g[c] = sum gm;  sum_gxhat[c] = sum gm * (x - mean) * invstd;
 * grad += gm * scale (the direct part of BN's input gradient; the part through the batch statistics is
 * accumulated per channel by the caller and added once by stat_grad), rounded once. */
#define BN_RELU_BWD(G, X, D)                                                                                      \
    static void bn_relu_bwd_##D##_##G##X(const T_##G *g, i64 gs, const T_##X *x, i64 xs, T_##D *grad, i64 grs, i64 P, \
                                      i64 C, const float *scale, const float *shift, const float *mean,           \
                                      double *total, int nt) {                                                    \
        PIXEL_SUMS(2, total, {                                                                                    \
            const T_##G *gp = g + p * gs;                                                                         \
            const T_##X *xp = x + p * xs;                                                                         \
            T_##D *dp = grad + p * grs;                                                                           \
            for (i64 c = 0; c < C; c++) {                                                                         \
                float xv = LD_##X(xp[c]);                                                                         \
                float gm = fmaf(xv, scale[c], shift[c]) > 0.0f ? LD_##G(gp[c]) : 0.0f;                            \
                part[c] += gm;                                                                                    \
                part[C + c] += gm * (xv - mean[c]);                                                               \
                dp[c] = ST_##D(fmaf(gm, scale[c], LD_##D(dp[c])));                                                \
            }                                                                                                     \
        })                                                                                                        \
    }
BN_RELU_BWD(B, B, B)
BN_RELU_BWD(B, B, F)
BN_RELU_BWD(B, F, B)
BN_RELU_BWD(B, F, F)
BN_RELU_BWD(F, B, B)
BN_RELU_BWD(F, B, F)
BN_RELU_BWD(F, F, B)
BN_RELU_BWD(F, F, F)

void bn_relu_bwd(const void *g, i64 gs, const void *x, i64 xs, void *grad, i64 grs, int types, i64 P, i64 C,
                 const float *scale, const float *shift, const float *mean, const float *invstd, float *sum_g,
                 float *sum_gxhat, int nt) {
    double *total = calloc((size_t)(2 * C), sizeof(double));
    if (types & 4) { /* grad fp32: the same switch over (g, x) as the two-tensor kernels, with an F suffix */
        SWITCH2(bn_relu_bwd_F, types & 3, g, gs, x, xs, grad, grs, P, C, scale, shift, mean, total, nt)
    } else {
        SWITCH2(bn_relu_bwd_B, types & 3, g, gs, x, xs, grad, grs, P, C, scale, shift, mean, total, nt)
    }
    for (i64 c = 0; c < C; c++) {
        sum_g[c] = (float)total[c];
        sum_gxhat[c] = (float)(total[C + c] * invstd[c]);
    }
    free(total);
}

/* grad += x * slope + offset per channel (the gradient through the batch statistics), rounded once. */
#define STAT_GRAD(D, X)                                                                                           \
    static void stat_grad_##D##X(T_##D *grad, i64 grs, const T_##X *x, i64 xs, i64 P, i64 C, const float *slope,  \
                                 const float *offset, int nt) {                                                   \
        PIXELS(const T_##X *xp = x + p * xs; T_##D *dp = grad + p * grs; for (i64 c = 0; c < C; c++)             \
                   dp[c] = ST_##D(LD_##D(dp[c]) + fmaf(LD_##X(xp[c]), slope[c], offset[c]));)                    \
    }
STAT_GRAD(B, B)
STAT_GRAD(B, F)
STAT_GRAD(F, B)
STAT_GRAD(F, F)

void stat_grad(void *grad, i64 grs, const void *x, i64 xs, int types, i64 P, i64 C, const float *slope,
               const float *offset, int nt) {
    SWITCH2(stat_grad, types, grad, grs, x, xs, P, C, slope, offset, nt)
}

/* dst = src * mask[image, channel] (mask NULL: a copy), rounded once; with sums != NULL also sums[c] = sum over
 * pixels of dst (as stored). hw: pixels per image, to find a pixel's mask row. Serves a dense layer's new maps
 * (conv output -> dropout -> block buffer) and their gradient (buffer -> dropout -> dense operand of the conv
 * backward, plus the bias gradient). */
#define SCALE_MAPS(S, D)                                                                                          \
    static void scale_maps_##S##D(const T_##S *src, i64 ss, const float *mask, const float *ones, i64 hw,         \
                                  T_##D *dst, i64 ds, i64 P, i64 C, double *total, int nt) {                      \
        PIXEL_SUMS(1, total, {                                                                                    \
            const float *m = mask ? mask + (p / hw) * C : ones;                                                   \
            const T_##S *sp = src + p * ss;                                                                       \
            T_##D *dp = dst + p * ds;                                                                             \
            for (i64 c = 0; c < C; c++) dp[c] = ST_##D(LD_##S(sp[c]) * m[c]);                                     \
            if (total != NULL)                                                                                    \
                for (i64 c = 0; c < C; c++) part[c] += LD_##D(dp[c]);                                             \
        })                                                                                                        \
    }
SCALE_MAPS(B, B)
SCALE_MAPS(B, F)
SCALE_MAPS(F, B)
SCALE_MAPS(F, F)

void scale_maps(const void *src, i64 ss, const float *mask, i64 hw, void *dst, i64 ds, int types, i64 P, i64 C,
                float *sums, int nt) {
    double *total = calloc((size_t)C, sizeof(double));
    float *ones = malloc(sizeof(float) * C);
    for (i64 c = 0; c < C; c++) ones[c] = 1.0f;
    double *t = sums ? total : NULL;
    SWITCH2(scale_maps, types, src, ss, mask, ones, hw, dst, ds, P, C, t, nt)
    if (sums)
        for (i64 c = 0; c < C; c++) sums[c] = (float)total[c];
    free(ones);
    free(total);
}
