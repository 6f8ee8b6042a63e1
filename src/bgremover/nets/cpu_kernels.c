/* Fused CPU kernels for the dense block's BatchNorm-ReLU on bf16 channels-last tensors (bgremover.nets.cpu_kernels).
 *
 * Why: on a CPU the dense block's convolutions already run at the machine's bf16 peak, and what remained of a
 * training step was PyTorch's elementwise passes around them: a BN-ReLU forward of four passes through an fp32
 * scratch, and a backward of five (mask, dense copy, BN sums, scaled add, stat-gradient add), each one a trip
 * through memory. Each kernel here is one pass (statistics: two) that converts bf16 to fp32 in registers.
 *
 * Layout: every tensor is "pixel-major": P = N*H*W pixels, each holding C consecutive channel values, pixel p at
 * base + p * stride (a channels_last tensor or a channel slice of one). bf16 values are uint16 bit patterns.
 * Sums over pixels go through fp32 partial sums of PIXEL_BLOCK pixels added into fp64 per thread, so a 100k-pixel
 * sum keeps fp32-level accuracy. Threads: OpenMP, which resolves to the libgomp PyTorch has already loaded
 * (same soname), so these regions share PyTorch's thread pool; the caller passes torch.get_num_threads() as nt.
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

static inline float relu(float v) { return v < 0.0f ? 0.0f : v; } /* NaN passes, as in torch.relu; vectorizes */

static int threads_for(i64 values, int nt) { return values < MIN_PARALLEL || nt < 1 ? 1 : nt; }

static void split(i64 P, int t, int nt, i64 *lo, i64 *hi) {
    *lo = P * t / nt;
    *hi = P * (t + 1) / nt;
}

/* out = relu(x * scale + shift), out in bf16 (out_f32 = 0) or fp32 (out_f32 = 1). */
void bn_relu_fwd(const bf16 *x, i64 xs, void *out, i64 os, int out_f32, i64 P, i64 C, const float *scale,
                 const float *shift, int nt) {
#pragma omp parallel num_threads(threads_for(P * C, nt))
    {
        i64 lo, hi;
        split(P, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        for (i64 p = lo; p < hi; p++) {
            const bf16 *xp = x + p * xs;
            if (out_f32) {
                float *op = (float *)out + p * os;
                for (i64 c = 0; c < C; c++) op[c] = relu(fmaf(bf2f(xp[c]), scale[c], shift[c]));
            } else {
                bf16 *op = (bf16 *)out + p * os;
                for (i64 c = 0; c < C; c++) op[c] = f2bf(relu(fmaf(bf2f(xp[c]), scale[c], shift[c])));
            }
        }
    }
}

/* dst = src * mask[image, channel] (mask NULL: a copy), src bf16 or fp32 (src_f32), dst bf16; with sums != NULL
 * also sums[c] = sum over pixels of dst (as rounded). hw: pixels per image, to find a pixel's mask row. Serves a
 * dense layer's new maps (conv output -> dropout -> block buffer) and their gradient (buffer -> dropout -> dense
 * operand of the conv backward, plus the bias gradient). */
void scale_maps(const void *src, i64 ss, int src_f32, const float *mask, i64 hw, bf16 *dst, i64 ds, i64 P, i64 C,
                float *sums, int nt);

/* Per-thread sums of a pixel range: sums[c] += sum over pixels of f(p, c), blocked as described above. */
#define BLOCKED_SUMS(NSUMS, ...)                                                      \
    for (i64 p0 = lo; p0 < hi; p0 += PIXEL_BLOCK) {                                    \
        i64 p1 = p0 + PIXEL_BLOCK < hi ? p0 + PIXEL_BLOCK : hi;                        \
        memset(part, 0, sizeof(float) * (NSUMS) * C);                                  \
        for (i64 p = p0; p < p1; p++) { __VA_ARGS__ }                                       \
        for (i64 c = 0; c < (NSUMS) * C; c++) acc[c] += part[c];                       \
    }

/* Biased per-channel variance and mean over all pixels: a sum, then a sum of squared deviations. */
void channel_stats(const bf16 *x, i64 xs, i64 P, i64 C, float *mean, float *var, int nt) {
    double *total = calloc((size_t)C, sizeof(double));
    nt = threads_for(P * C, nt);
    for (int pass = 0; pass < 2; pass++) {
        memset(total, 0, sizeof(double) * C);
#pragma omp parallel num_threads(nt)
        {
            i64 lo, hi;
            split(P, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
            double *acc = calloc((size_t)C, sizeof(double));
            float *part = malloc(sizeof(float) * C);
            if (pass == 0) {
                BLOCKED_SUMS(1, const bf16 *xp = x + p * xs; for (i64 c = 0; c < C; c++) part[c] += bf2f(xp[c]);)
            } else {
                BLOCKED_SUMS(1, const bf16 *xp = x + p * xs; for (i64 c = 0; c < C; c++) {
                    float d = bf2f(xp[c]) - mean[c];
                    part[c] += d * d;
                })
            }
#pragma omp critical
            for (i64 c = 0; c < C; c++) total[c] += acc[c];
            free(acc);
            free(part);
        }
        for (i64 c = 0; c < C; c++) (pass == 0 ? mean : var)[c] = (float)(total[c] / (double)P);
    }
    free(total);
}

/* BN-ReLU backward of one dense layer's input channels, given the conv's input gradient g (bf16, pre-ReLU):
 * gm = g where x * scale + shift > 0 (the forward's ReLU mask, recomputed by the same fmaf instead of read from the
 * saved activation: one stream less) else 0;  sum_g[c] = sum gm;  sum_gxhat[c] = sum gm * (x - mean) * invstd;
 * grad += gm * scale (the direct part of BN's input gradient; the part through the batch statistics is
 * accumulated per channel by the caller and added once by stat_grad). grad is bf16, rounded once. */
void bn_relu_bwd(const bf16 *g, i64 gs, const bf16 *x, i64 xs, bf16 *grad, i64 grs, i64 P, i64 C, const float *scale,
                 const float *shift, const float *mean, const float *invstd, float *sum_g, float *sum_gxhat, int nt) {
    double *total = calloc((size_t)(2 * C), sizeof(double));
#pragma omp parallel num_threads(threads_for(P * C, nt))
    {
        i64 lo, hi;
        split(P, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        double *acc = calloc((size_t)(2 * C), sizeof(double));
        float *part = malloc(sizeof(float) * 2 * C);
        BLOCKED_SUMS(2, {
            const bf16 *gp = g + p * gs, *xp = x + p * xs;
            bf16 *dp = grad + p * grs;
            for (i64 c = 0; c < C; c++) {
                float xv = bf2f(xp[c]);
                float gm = fmaf(xv, scale[c], shift[c]) > 0.0f ? bf2f(gp[c]) : 0.0f;
                part[c] += gm;
                part[C + c] += gm * (xv - mean[c]);
                dp[c] = f2bf(fmaf(gm, scale[c], bf2f(dp[c])));
            }
        })
#pragma omp critical
        for (i64 c = 0; c < 2 * C; c++) total[c] += acc[c];
        free(acc);
        free(part);
    }
    for (i64 c = 0; c < C; c++) {
        sum_g[c] = (float)total[c];
        sum_gxhat[c] = (float)(total[C + c] * invstd[c]);
    }
    free(total);
}

/* grad += x * slope + offset per channel (the gradient through the batch statistics), rounded once to bf16. */
void stat_grad(bf16 *grad, i64 grs, const bf16 *x, i64 xs, i64 P, i64 C, const float *slope, const float *offset,
               int nt) {
#pragma omp parallel num_threads(threads_for(P * C, nt))
    {
        i64 lo, hi;
        split(P, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        for (i64 p = lo; p < hi; p++) {
            const bf16 *xp = x + p * xs;
            bf16 *dp = grad + p * grs;
            for (i64 c = 0; c < C; c++) dp[c] = f2bf(bf2f(dp[c]) + fmaf(bf2f(xp[c]), slope[c], offset[c]));
        }
    }
}

void scale_maps(const void *src, i64 ss, int src_f32, const float *mask, i64 hw, bf16 *dst, i64 ds, i64 P, i64 C,
                float *sums, int nt) {
    double *total = sums ? calloc((size_t)C, sizeof(double)) : NULL;
#pragma omp parallel num_threads(threads_for(P * C, nt))
    {
        i64 lo, hi;
        split(P, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        double *acc = calloc((size_t)C, sizeof(double));
        float *part = malloc(sizeof(float) * C);
        float *ones = malloc(sizeof(float) * C);
        for (i64 c = 0; c < C; c++) ones[c] = 1.0f;
        BLOCKED_SUMS(1, {
            const float *m = mask ? mask + (p / hw) * C : ones;
            bf16 *dp = dst + p * ds;
            if (src_f32) {
                const float *sp = (const float *)src + p * ss;
                for (i64 c = 0; c < C; c++) dp[c] = f2bf(sp[c] * m[c]);
            } else {
                const bf16 *sp = (const bf16 *)src + p * ss;
                for (i64 c = 0; c < C; c++) dp[c] = f2bf(bf2f(sp[c]) * m[c]);
            }
            if (total)
                for (i64 c = 0; c < C; c++) part[c] += bf2f(dp[c]);
        })
        if (total) {
#pragma omp critical
            for (i64 c = 0; c < C; c++) total[c] += acc[c];
        }
        free(acc);
        free(part);
        free(ones);
    }
    if (total) {
        for (i64 c = 0; c < C; c++) sums[c] = (float)total[c];
        free(total);
    }
}
