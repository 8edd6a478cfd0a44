/* y[M,N] = x[M,K] W[N,K]^T (+ b[N]) for a few rows of x: lmforge's decoding matmul, with W in fp32 or in
 * int8 with one fp32 scale per row (y[m,n] = scale[n] * sum_k W[n,k] x[m,k] + b[n]; x stays fp32).
 *
 * With one to a few rows the product is bound by how fast W streams from memory, not by arithmetic. Each
 * thread takes a contiguous band of W's rows; within it, blocks of R rows are read once, while R x MB dot
 * products accumulate in vector registers (block shapes at the end of the file). Each block's rows are read
 * side by side, so several streams of W are in flight, and software prefetch fetches the blocks ahead.
 * GCC's vector extensions keep it portable: -march=native turns v16 into AVX-512, AVX2 pairs or NEON quads.
 * Built by lmforge.kernels; the OpenMP runtime is the one torch has already loaded.
 */
#include "kernels.h"

typedef float v16 __attribute__((vector_size(64)));
typedef int8_t c16 __attribute__((vector_size(16)));

static inline v16 load16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
/* 16 int8 weights as fp32. GCC scalarizes __builtin_convertvector from bytes, so x86 gets intrinsics. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline v16 load16_i8(const int8_t *p) {
    return (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif defined(__AVX2__)
#include <immintrin.h>
static inline v16 load16_i8(const int8_t *p) {
    __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))));
    v16 v;
    memcpy(&v, &lo, sizeof lo);
    memcpy((char *)&v + sizeof lo, &hi, sizeof hi);
    return v;
}
#else
static inline v16 load16_i8(const int8_t *p) { c16 c; memcpy(&c, p, sizeof c); return __builtin_convertvector(c, v16); }
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

static inline float hsum(v16 v) {
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* Bytes [at, at + n) of the block `blocks` ahead of w (blocks of `block` bytes), into L1 or into L2. Past
 * the end of W a prefetch is a hint to nothing: it never faults. */
static inline void prefetch_l1(const void *w, long blocks, long block, long at, long n) {
    const char *ahead = (const char *)w + blocks * block + at;
    for (long l = 0; l < n; l += 64) __builtin_prefetch(ahead + l, 0, 3);
}

static inline void prefetch_l2(const void *w, long blocks, long block, long at, long n) {
    const char *ahead = (const char *)w + blocks * block + at;
    for (long l = 0; l < n; l += 64) __builtin_prefetch(ahead + l, 0, 1);
}

/* R rows of W against MB rows of x: y[m, n0 + r]. K16 = K rounded down to a multiple of 16. Software
 * prefetch (measured with python -m bench.gemv, docs/benchmarks.md): int8 rows are short streams (768 bytes
 * for GPT-2 small), too short for the hardware prefetcher to ramp up on, so the block two ahead is fetched
 * into L1 while this one is computed; for fp32 the next block is fetched into L2 while the first group of
 * rows of x (m0 == 0) computes with this one, and the other groups find their block in cache (fetching
 * into L1 instead was slower). */
#define BLOCK(NAME, T, LOAD, R, MB)                                                                \
static void NAME##_##R##_##MB(const T *W, const float *scale, const float *x, const float *b,     \
                             float *y, long n0, long m0, long N, long K, int accumulate) {       \
    v16 acc[MB][R];                                                                               \
    memset(acc, 0, sizeof acc);                                                                   \
    const long K16 = K & ~15L;                                                                    \
    const T *w = W + n0 * K;                                                                      \
    for (long k = 0; k < K16; k += 16) {                                                          \
        if (sizeof(T) == 1) prefetch_l1(w, 2, R * K, k * R, R * 16);                             \
        else if (m0 == 0) prefetch_l2(w, 1, R * K * 4, k * R * 4, R * 64);                        \
        if (MB == 1) { /* each weight vector is used once: load, convert and multiply in turn */   \
            v16 xv = load16(x + m0 * K + k);                                                     \
            for (int r = 0; r < R; r++) acc[0][r] += LOAD(w + r * K + k) * xv;                   \
            continue;                                                                             \
        }                                                                                         \
        v16 wv[R];                                                                                \
        for (int r = 0; r < R; r++) wv[r] = LOAD(w + r * K + k);                                  \
        for (int m = 0; m < MB; m++) {                                                            \
            v16 xv = load16(x + (m0 + m) * K + k);                                               \
            for (int r = 0; r < R; r++) acc[m][r] += wv[r] * xv;                                 \
        }                                                                                         \
    }                                                                                             \
    for (int m = 0; m < MB; m++)                                                                  \
        for (int r = 0; r < R; r++) {                                                             \
            float s = hsum(acc[m][r]);                                                            \
            for (long k = K16; k < K; k++) s += (float)w[r * K + k] * x[(m0 + m) * K + k];       \
            if (scale) s *= scale[n0 + r];                                                        \
            float v = s + (b ? b[n0 + r] : 0.f);                                                  \
            float *out = y + (m0 + m) * N + n0 + r;                                               \
            *out = accumulate ? *out + v : v;                                                     \
        }                                                                                         \
}

/* Whether rows of this many bytes, read 16 side by side, would fall into a few L1 sets: with 64-byte lines
 * and 64 sets (32-48 KB L1s), rows a multiple of 2 KB apart share at most 2 sets, more streams than their
 * ways hold (GPT-2's fc2, 3072 wide, ran slower with 16 rows than with 8; the 768-wide matrices faster). */
static inline int crowded(long row_bytes) {
    return row_bytes % 64 == 0 && (row_bytes / 64) % 32 == 0;
}

/* The whole product for one weight type, shared among the threads of a team: blocks of R1 (16 or 8) rows
 * of W for one row of x, 8 where 16 would crowd the cache; for several rows of x, blocks of RM rows of W
 * against MBX rows of x at a time (then 4, 2 and 1); the last N % R rows one by one, in the same loop. */
#define LINEAR(NAME, T, R1, RM, MBX)                                                               \
static void NAME(const T *W, const float *scale, const float *x, const float *b, float *y,        \
                 long M, long N, long K, int acc) {                                               \
    const long R = M > 1 ? RM : (R1 == 16 && !crowded(K * (long)sizeof(T)) ? 16 : 8);            \
    const long blocks = N / R, rest = N - blocks * R;                                             \
    _Pragma("omp for schedule(static)")                                                           \
    for (long i = 0; i < blocks + rest; i++) {                                                    \
        if (i >= blocks) { /* one of the last N % R rows */                                       \
            for (long m = 0; m < M; m++) NAME##_1_1(W, scale, x, b, y, blocks * R + i - blocks, m, N, K, acc); \
            continue;                                                                             \
        }                                                                                         \
        long n0 = i * R, m = 0;                                                                   \
        if (M == 1) {                                                                             \
            if (R == R1) NAME##_##R1##_1(W, scale, x, b, y, n0, 0, N, K, acc);                    \
            else NAME##_8_1(W, scale, x, b, y, n0, 0, N, K, acc);                                 \
            continue;                                                                             \
        }                                                                                         \
        for (; m + MBX <= M; m += MBX) NAME##_##RM##_##MBX(W, scale, x, b, y, n0, m, N, K, acc);  \
        if (MBX > 4 && m + 4 <= M) { NAME##_##RM##_4(W, scale, x, b, y, n0, m, N, K, acc); m += 4; } \
        for (; m + 2 <= M; m += 2) NAME##_##RM##_2(W, scale, x, b, y, n0, m, N, K, acc);          \
        if (m < M) NAME##_##RM##_1(W, scale, x, b, y, n0, m, N, K, acc);                          \
    }                                                                                             \
}

#define LOAD_linear_f32 load16
#define LOAD_linear_i8 load16_i8
/* One row of x: 16 rows of W read side by side for fp32 (more concurrent streams keep more memory reads in
 * flight; 24 or 32 spill registers) unless the rows crowd the L1 sets, 8 for int8, whose conversions need
 * the registers. Several rows: 3 rows of W x 8 of x for fp32 (24 accumulators: the most that fit AVX-512's
 * 32 registers beside the operands; one pass over each block), 6 x 4 for int8 (more streams in flight; the
 * second group of 4 rows converts the block again from cache). Measured with python -m bench.gemv. */
#define BLOCKS(NAME, T, RM)                                                                        \
    BLOCK(NAME, T, LOAD_##NAME, 8, 1) BLOCK(NAME, T, LOAD_##NAME, 1, 1)                           \
    BLOCK(NAME, T, LOAD_##NAME, RM, 2) BLOCK(NAME, T, LOAD_##NAME, RM, 1)
BLOCKS(linear_f32, float, 3)
BLOCK(linear_f32, float, LOAD_linear_f32, 16, 1)
BLOCK(linear_f32, float, LOAD_linear_f32, 3, 8)
BLOCK(linear_f32, float, LOAD_linear_f32, 3, 4)
LINEAR(linear_f32, float, 16, 3, 8)
BLOCKS(linear_i8, int8_t, 6)
BLOCK(linear_i8, int8_t, LOAD_linear_i8, 6, 4)
LINEAR(linear_i8, int8_t, 8, 6, 4)

void lmf_linear_f32_team(const float *W, const float *x, const float *b, float *y, long M, long N, long K,
                         int accumulate) {
    linear_f32(W, 0, x, b, y, M, N, K, accumulate);
}

void lmf_linear_i8_team(const int8_t *W, const float *scale, const float *x, const float *b, float *y, long M,
                        long N, long K, int accumulate) {
    linear_i8(W, scale, x, b, y, M, N, K, accumulate);
}

void lmf_stream_linear_f32(const float *W, const float *x, const float *b, float *y, long M, long N, long K) {
    #pragma omp parallel
    linear_f32(W, 0, x, b, y, M, N, K, 0);
}

void lmf_stream_linear_i8(const int8_t *W, const float *scale, const float *x, const float *b, float *y,
                          long M, long N, long K) {
    #pragma omp parallel
    linear_i8(W, scale, x, b, y, M, N, K, 0);
}
