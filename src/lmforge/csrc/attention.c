/* Causal self-attention softmax(Q K^T * scale + causal mask) V, forward and backward, in fp32, for the
 * short sequences of CPU training (lmforge.kernels.causal_attention).
 *
 * Each (batch, head) pair is one task for one thread. Within it, blocks of 8 query rows attend to the key
 * rows up to the block's last row, so the masked half of the scores is mostly never computed. Every product
 * keeps its 8-row block of results in vector registers (16 accumulators): the scores take 32 keys at a
 * time from K^T (K transposed once per task), the outputs 32 of the D columns at a time, so each vector
 * loaded serves 8 multiply-adds (4-row blocks left the multiply-add units waiting on loads; 12-row blocks
 * spill registers); the softmax's exponentials are vectorized. D must be a multiple of 16. The forward keeps each row's log-sum-exp; the backward recomputes the probabilities from it rather than
 * storing the T x T matrix (as flash attention does, Dao et al. 2022):
 *
 *     P = exp(S - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
 *     dQ = scale dS K,   dK = scale dS^T Q.
 *
 * Tensors are addressed by strides (in elements) for batch, head and position; the last dimension is
 * contiguous. Q, K and V may be the strided views of one fused projection.
 */
#include <math.h>
#include <stdlib.h>
#include "kernels.h"

typedef float v16 __attribute__((vector_size(64)));
typedef struct { long b, h, t; } lmf_strides;

#define R 8 /* query rows per block */
#define AT(p, s, bb, hh) ((p) + (bb) * (s).b + (hh) * (s).h)

static inline v16 ld(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* out[r][j] = scale * a_r . x_j for rows r < rows and keys j < n (16 at a time, up to T16), from X^T packed
 * as xt[d * T16 + j]. The block's rows are scaled once into qa. 32 keys at a time make 16 accumulators
 * (R rows x 2 vectors): each vector of X^T loaded serves the R rows, each broadcast element of a row two
 * vectors. A 32-key pass runs while 32 keys remain, or more than 16 with room for 32 in the packed width
 * (its padding is zeros); the last 16 or fewer take a 16-key pass. */
static void scores(const float *a, long as, long rows, const float *xt, long n, long T16, long D, float scale,
                   float *out) {
    float qa[R * D];
    for (long r = 0; r < R; r++)
        for (long d = 0; d < D; d++) qa[r * D + d] = r < rows ? a[r * as + d] * scale : 0.0f;
    long j = 0;
    for (; j + 32 <= n || (j + 16 < n && j + 32 <= T16); j += 32) {
        v16 acc[R][2] = {{0}};
        for (long d = 0; d < D; d++) {
            v16 w0 = ld(xt + d * T16 + j), w1 = ld(xt + d * T16 + j + 16);
            for (long r = 0; r < R; r++) {
                acc[r][0] += qa[r * D + d] * w0;
                acc[r][1] += qa[r * D + d] * w1;
            }
        }
        for (long r = 0; r < R; r++) {
            st(out + r * T16 + j, acc[r][0]);
            st(out + r * T16 + j + 16, acc[r][1]);
        }
    }
    if (j < n) { /* the last 16 keys */
        v16 acc[R] = {0};
        for (long d = 0; d < D; d++) {
            v16 w = ld(xt + d * T16 + j);
            for (long r = 0; r < R; r++) acc[r] += qa[r * D + d] * w;
        }
        for (long r = 0; r < R; r++) st(out + r * T16 + j, acc[r]);
    }
}

/* The two products over keys, for CB vectors (16 CB columns) from column c, all R rows in registers:
 * mix:   out[r][c..] = sum_{j < n} p[r][j] x_j[c..]   (x_j rows of D at stride xs);
 * mix_t: y_j[c..] += sum_{r < rows} p[r][j] a_r[c..]  (the transposed product, into rows of y). */
#define MIX(CB)                                                                                         \
static void mix_##CB(const float *p, long T16, long rows, long n, const float *x, long xs, long c,       \
                     float *out, long os) {                                                             \
    v16 acc[R][CB] = {{0}};                                                                             \
    for (long j = 0; j < n; j++) {                                                                      \
        v16 w[CB];                                                                                      \
        for (int i = 0; i < CB; i++) w[i] = ld(x + j * xs + c + 16 * i);                                \
        for (long r = 0; r < R; r++)                                                                    \
            for (int i = 0; i < CB; i++) acc[r][i] += p[r * T16 + j] * w[i];                            \
    }                                                                                                   \
    for (long r = 0; r < rows; r++)                                                                     \
        for (int i = 0; i < CB; i++) st(out + r * os + c + 16 * i, acc[r][i]);                          \
}                                                                                                       \
static void mix_t_##CB(const float *p, long T16, long rows, long n, const float *a, long as, long c,     \
                       float *y, long ys) {                                                             \
    v16 av[R][CB];                                                                                      \
    for (long r = 0; r < R; r++)                                                                        \
        for (int i = 0; i < CB; i++) av[r][i] = r < rows ? ld(a + r * as + c + 16 * i) : (v16){0};      \
    for (long j = 0; j < n; j++) {                                                                      \
        v16 yv[CB];                                                                                     \
        for (int i = 0; i < CB; i++) yv[i] = ld(y + j * ys + c + 16 * i);                               \
        for (long r = 0; r < R; r++)                                                                    \
            for (int i = 0; i < CB; i++) yv[i] += p[r * T16 + j] * av[r][i];                            \
        for (int i = 0; i < CB; i++) st(y + j * ys + c + 16 * i, yv[i]);                                \
    }                                                                                                   \
}
MIX(2)
MIX(1)

/* D columns as blocks of 32, then 16 (D is a multiple of 16). */
static void mix(const float *p, long T16, long rows, long n, const float *x, long xs, long D, float *out,
                long os) {
    long c = 0;
    for (; c + 32 <= D; c += 32) mix_2(p, T16, rows, n, x, xs, c, out, os);
    if (c < D) mix_1(p, T16, rows, n, x, xs, c, out, os);
}

static void mix_t(const float *p, long T16, long rows, long n, const float *a, long as, long D, float *y, long ys) {
    long c = 0;
    for (; c + 32 <= D; c += 32) mix_t_2(p, T16, rows, n, a, as, c, y, ys);
    if (c < D) mix_t_1(p, T16, rows, n, a, as, c, y, ys);
}

static void pack_transposed(const float *x, long xs, long T, long T16, long D, float *xt) {
    for (long d = 0; d < D; d++)
        for (long j = T; j < T16; j++) xt[d * T16 + j] = 0.0f;
    lmf_transpose_serial(x, T, D, xs, xt, T16); /* in 16 x 16 tiles: element by element, each write
                                                  * landed a row of T16 floats away from the last */
}

/* Scores of query rows i0.. (rows of them) against keys 0..n-1 (n = i0 + rows) become probabilities:
 * exp(s - m) with m the row's maximum (forward; lse gets m + log(sum)) or exp(s - lse) (backward). Keys
 * after a row's own position get 0. */
static void probabilities(float *s, long T16, long i0, long rows, long n, float *lse, int forward) {
    for (long r = 0; r < rows; r++) {
        float *row = s + r * T16;
        const long visible = i0 + r + 1;
        if (forward) {
            float m = row[0], l = 0.0f;
            #pragma omp simd reduction(max : m)
            for (long j = 1; j < visible; j++) m = row[j] > m ? row[j] : m;
            #pragma omp simd reduction(+ : l)
            for (long j = 0; j < visible; j++) {
                row[j] = exp_approx(row[j] - m);
                l += row[j];
            }
            const float inv = 1.0f / l;
            #pragma omp simd
            for (long j = 0; j < visible; j++) row[j] *= inv;
            lse[i0 + r] = m + logf(l);
        } else {
            const float z = lse[i0 + r];
            #pragma omp simd
            for (long j = 0; j < visible; j++) row[j] = exp_approx(row[j] - z);
        }
        for (long j = visible; j < n; j++) row[j] = 0.0f;
    }
    for (long r = rows; r < R; r++)
        for (long j = 0; j < n; j++) s[r * T16 + j] = 0.0f;
}

/* Each thread's scratch of n floats, or NULL (and *failed set) when out of memory; freed by the caller. */
static float *thread_scratch(long n, int *failed) {
    float *p = malloc(sizeof(float) * n);
    if (!p) {
        #pragma omp atomic write
        *failed = 1;
    }
    return p;
}

/* o and lse get the output and each row's log-sum-exp ([B, H, T], contiguous). Returns 0, or -1 when out of
 * memory. */
int lmf_causal_attention_fwd(const float *q, const float *k, const float *v, float *o, float *lse, long B,
                             long H, long T, long D, lmf_strides qs, lmf_strides ks, lmf_strides vs,
                             lmf_strides os, float scale) {
    const long T16 = (T + 15) & ~15L;
    int failed = 0;
    #pragma omp parallel
    {
        float *kt = thread_scratch(D * T16 + R * T16, &failed);
        #pragma omp for schedule(static)
        for (long task = 0; task < B * H; task++) {
            if (!kt) continue;
            long b = task / H, h = task % H;
            const float *Q = AT(q, qs, b, h), *K = AT(k, ks, b, h), *V = AT(v, vs, b, h);
            float *O = AT(o, os, b, h), *L = lse + task * T, *s = kt + D * T16;
            pack_transposed(K, ks.t, T, T16, D, kt);
            for (long i0 = 0; i0 < T; i0 += R) {
                const long rows = T - i0 < R ? T - i0 : R, n = i0 + rows;
                scores(Q + i0 * qs.t, qs.t, rows, kt, n, T16, D, scale, s);
                probabilities(s, T16, i0, rows, n, L, 1);
                mix(s, T16, rows, n, V, vs.t, D, O + i0 * os.t, os.t);
            }
        }
        free(kt);
    }
    return failed ? -1 : 0;
}

int lmf_causal_attention_bwd(const float *q, const float *k, const float *v, const float *o, const float *lse,
                             const float *dout, float *dq, float *dk, float *dv, long B, long H, long T, long D,
                             lmf_strides qs, lmf_strides ks, lmf_strides vs, lmf_strides os, lmf_strides gs,
                             lmf_strides dqs, lmf_strides dks, lmf_strides dvs, float scale) {
    const long T16 = (T + 15) & ~15L;
    int failed = 0;
    #pragma omp parallel
    {
        /* K^T and V^T, then a block's probabilities and dS; dK and dV accumulate in the outputs. */
        float *kt = thread_scratch(2 * D * T16 + 2 * R * T16, &failed);
        #pragma omp for schedule(static)
        for (long task = 0; task < B * H; task++) {
            if (!kt) continue;
            long b = task / H, h = task % H;
            const float *Q = AT(q, qs, b, h), *K = AT(k, ks, b, h), *V = AT(v, vs, b, h), *O = AT(o, os, b, h);
            const float *G = AT(dout, gs, b, h);
            float *dQ = AT(dq, dqs, b, h), *dK = AT(dk, dks, b, h), *dV = AT(dv, dvs, b, h);
            float *L = (float *)lse + task * T, *vt = kt + D * T16, *p = vt + D * T16, *ds = p + R * T16;
            pack_transposed(K, ks.t, T, T16, D, kt);
            pack_transposed(V, vs.t, T, T16, D, vt);
            for (long j = 0; j < T; j++)
                for (long d = 0; d < D; d++) dK[j * dks.t + d] = dV[j * dvs.t + d] = 0.0f;
            for (long i0 = 0; i0 < T; i0 += R) {
                const long rows = T - i0 < R ? T - i0 : R, n = i0 + rows;
                scores(Q + i0 * qs.t, qs.t, rows, kt, n, T16, D, scale, p);
                probabilities(p, T16, i0, rows, n, L, 0);
                scores(G + i0 * gs.t, gs.t, rows, vt, n, T16, D, 1.0f, ds); /* dP = dO V^T */
                for (long r = 0; r < rows; r++) {
                    const float *gi = G + (i0 + r) * gs.t, *oi = O + (i0 + r) * os.t;
                    float delta = 0.0f;
                    for (long d = 0; d < D; d++) delta += gi[d] * oi[d];
                    for (long j = 0; j < n; j++) ds[r * T16 + j] = p[r * T16 + j] * (ds[r * T16 + j] - delta) * scale;
                }
                for (long r = rows; r < R; r++)
                    for (long j = 0; j < n; j++) ds[r * T16 + j] = 0.0f;
                mix(ds, T16, rows, n, K, ks.t, D, dQ + i0 * dqs.t, dqs.t);    /* dQ = dS K */
                mix_t(ds, T16, rows, n, Q + i0 * qs.t, qs.t, D, dK, dks.t);   /* dK += dS^T Q */
                mix_t(p, T16, rows, n, G + i0 * gs.t, gs.t, D, dV, dvs.t);    /* dV += P^T dO */
            }
        }
        free(kt);
    }
    return failed ? -1 : 0;
}
