/* dst[c * rows + r] = src[r * lds + c]: an fp32 matrix [rows, cols] (row stride lds) transposed into a
 * contiguous [cols, rows], and, where colsum is not NULL, colsum[c] = the sum of column c (a linear layer's
 * bias gradient, taken while the gradient passes through the registers). 16 x 16 tiles are transposed in
 * vector registers: four rounds, each swapping the off-diagonal s x s blocks (s = 8, 4, 2, 1) of every
 * 2s x 2s block with two-source shuffles, so a tile costs 16 loads, 64 shuffles and 16 stores; the edges go
 * element by element. The strips of 16 columns are shared among the threads. */
#include "kernels.h"

typedef float v16 __attribute__((vector_size(64)));

static inline v16 ld(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* Two-source shuffle with constant indices (0-15 from a, 16-31 from b): __builtin_shufflevector where the
 * compiler has it (clang, GCC 12 and later), GCC's older __builtin_shuffle elsewhere (LMF_OLD_SHUFFLE forces
 * it, for the tests). */
#if defined(__clang__) || (__GNUC__ >= 12 && !defined(LMF_OLD_SHUFFLE))
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t v16i __attribute__((vector_size(64)));
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (v16i){__VA_ARGS__})
#endif

/* Rows i and i + s of a round: lo keeps a's columns without bit s and takes b's shifted down, hi the rest. */
#define LO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define HI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define LO4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define HI4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define LO2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define HI2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define LO1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define HI1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
#define ROUND(s, LO, HI)                                                                 \
    for (int i = 0; i < 16; i++)                                                          \
        if (!(i & (s))) {                                                                 \
            v16 a = t[i], b = t[i + (s)];                                                 \
            t[i] = SHUFFLE(a, b, LO);                                                     \
            t[i + (s)] = SHUFFLE(a, b, HI);                                               \
        }

static inline void tile(const float *src, long lds, float *dst, long ldd, v16 *sum) {
    v16 t[16];
    for (int i = 0; i < 16; i++) t[i] = ld(src + i * lds);
    v16 s = t[0]; /* the tile's column sums, added to the running ones once per tile */
    for (int i = 1; i < 16; i++) s += t[i];
    *sum += s;
    ROUND(8, LO8, HI8)
    ROUND(4, LO4, HI4)
    ROUND(2, LO2, HI2)
    ROUND(1, LO1, HI1)
    for (int i = 0; i < 16; i++) st(dst + i * ldd, t[i]);
}

/* One strip of at most 16 columns: whole 16 x 16 tiles down the rows, then the rest element by element. */
static void strip(const float *src, long rows, long cn, long lds, float *dst, long ldd, float *colsum) {
    long r0 = 0;
    v16 sum = {0}, part = {0}; /* part: up to 16 tiles' sums, so long columns lose little to rounding */
    if (cn == 16)
        for (int n = 1; r0 + 16 <= rows; r0 += 16, n++) {
            tile(src + r0 * lds, lds, dst + r0, ldd, &part);
            if (n % 16 == 0) {
                sum += part;
                part = (v16){0};
            }
        }
    sum += part;
    for (long c = 0; c < cn; c++) {
        float tail = 0.0f;
        for (long r = r0; r < rows; r++) {
            float v = src[r * lds + c];
            dst[c * ldd + r] = v;
            tail += v;
        }
        if (colsum) colsum[c] = sum[c] + tail;
    }
}

void lmf_transpose_serial(const float *src, long rows, long cols, long lds, float *dst, long ldd) {
    for (long c0 = 0; c0 < cols; c0 += 16)
        strip(src + c0, rows, cols - c0 < 16 ? cols - c0 : 16, lds, dst + c0 * ldd, ldd, NULL);
}

void lmf_transpose_f32(const float *src, long rows, long cols, long lds, float *dst, float *colsum) {
    long strips = (cols + 15) / 16;
    #pragma omp parallel for schedule(static)
    for (long k = 0; k < strips; k++) {
        long c0 = k * 16;
        strip(src + c0, rows, cols - c0 < 16 ? cols - c0 : 16, lds, dst + c0 * rows, rows,
              colsum ? colsum + c0 : NULL);
    }
}
