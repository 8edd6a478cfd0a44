/* Shared by lmforge's C kernels (compiled together into one library by lmforge.kernels). */
#ifndef LMFORGE_KERNELS_H
#define LMFORGE_KERNELS_H
#include <stdint.h>
#include <string.h>

/* exp(z) for |z| <= 88: z = k ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 Taylor polynomial (relative error
 * below 2e-7 there), times 2^k built in the exponent bits. Beyond +-88 the result is clamped, which only
 * matters where the callers' results are already 0 or 1 to fp32 precision. */
static inline float exp_approx(float z) {
    z = z < -87.0f ? -87.0f : (z > 87.0f ? 87.0f : z);
    float kf = (z * 1.44269504f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    float r = z - kf * 0.693145752f - kf * 1.42860677e-6f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.166666672f + r * (0.0416666679f + r * (0.00833333377f
              + r * 0.00138888892f)))));
    int32_t bits = ((int32_t)kf + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* sigmoid(2u) = 0.5 (1 + tanh(u)) with u = sqrt(2/pi) (v + 0.044715 v^3): GPT-2's GELU is v * sig2u(v). */
static inline float sig2u(float v) {
    float u = 0.7978845608f * (v + 0.044715f * v * v * v);
    return 1.0f / (1.0f + exp_approx(-2.0f * u));
}

/* y[M,N] = x[M,K] W[N,K]^T (+ b), W fp32 or int8 with per-row scales, for the threads of an OpenMP team:
 * called by every thread of a parallel region (or outside one, by one thread), it shares the rows of W
 * among them and returns after a barrier. accumulate != 0 adds the result to y (a residual connection). */
void lmf_linear_f32_team(const float *W, const float *x, const float *b, float *y, long M, long N, long K,
                         int accumulate);
void lmf_linear_i8_team(const int8_t *W, const float *scale, const float *x, const float *b, float *y, long M,
                        long N, long K, int accumulate);
/* dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols, by the calling thread alone (transpose.c). */
void lmf_transpose_serial(const float *src, long rows, long cols, long lds, float *dst, long ldd);
#endif
