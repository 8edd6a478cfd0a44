/* One chunk of the chunked output-head loss (lmforge/models/head_loss.py), in place.
 *
 * E [rows, cols] holds the logits of `rows` vocabulary entries (one row each) for `cols` tokens (one column
 * each). m [cols] and s [cols] are each token's running maximum and running sum of exp(logit - maximum) over
 * the chunks before this one (m = -inf, s = 0 before the first). For every column:
 *
 *     m' = max(m, max_r E[r]);   s' = s * exp(m - m') + sum_r exp(E[r] - m');   E[r] = exp(E[r] - m')
 *
 * and m, s become m', s'. torch needs five passes over the chunk for this (amax, subtract, exp, sum, and a
 * temporary); here it is two: the maximum, then the exponentials and their sum. Columns are split among the
 * threads in blocks of 64, so each thread walks its block's rows with four vectors' worth of columns; the
 * sums are taken per 64 rows and then added, which keeps their rounding error near that of a pairwise sum.
 */
#include <math.h>
#include "kernels.h"

#define SOFTMAX_COLS 64
#define SOFTMAX_ROWS 64

void lmf_softmax_chunk_f32(float *E, long rows, long cols, float *m, float *s) {
    long blocks = (cols + SOFTMAX_COLS - 1) / SOFTMAX_COLS;
    #pragma omp parallel for schedule(static)
    for (long bk = 0; bk < blocks; bk++) {
        long c0 = bk * SOFTMAX_COLS, w = cols - c0 < SOFTMAX_COLS ? cols - c0 : SOFTMAX_COLS;
        float mx[SOFTMAX_COLS], acc[SOFTMAX_COLS], part[SOFTMAX_COLS];
        for (long j = 0; j < w; j++) mx[j] = m[c0 + j];
        for (long r = 0; r < rows; r++) {
            const float *e = E + r * cols + c0;
            #pragma omp simd
            for (long j = 0; j < w; j++) mx[j] = e[j] > mx[j] ? e[j] : mx[j];
        }
        /* exp(m - m') is 0 before the first chunk (m = -inf, s = 0) and for any column never seen */
        for (long j = 0; j < w; j++) acc[j] = s[c0 + j] > 0.0f ? s[c0 + j] * expf(m[c0 + j] - mx[j]) : 0.0f;
        for (long r0 = 0; r0 < rows; r0 += SOFTMAX_ROWS) {
            long r1 = r0 + SOFTMAX_ROWS < rows ? r0 + SOFTMAX_ROWS : rows;
            for (long j = 0; j < w; j++) part[j] = 0.0f;
            for (long r = r0; r < r1; r++) {
                float *e = E + r * cols + c0;
                #pragma omp simd
                for (long j = 0; j < w; j++) {
                    float v = exp_approx(e[j] - mx[j]);
                    e[j] = v;
                    part[j] += v;
                }
            }
            for (long j = 0; j < w; j++) acc[j] += part[j];
        }
        for (long j = 0; j < w; j++) {
            m[c0 + j] = mx[j];
            s[c0 + j] = acc[j];
        }
    }
}
