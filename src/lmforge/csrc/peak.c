/* The rate at which the vector units do fp32 multiply-adds with nothing else in the way, for benchmarks to
 * put torch's matmul rate in proportion (bench/common.py, fma_peak_flops).
 *
 * Every thread of the OpenMP team runs `iters` rounds over 192 independent lanes, a[j] = a[j] * b + c: with
 * -march=native and -ffp-contract=fast GCC keeps them in registers as fused multiply-adds (12 AVX-512 or 24
 * AVX2 chains, enough to cover the FMA latency on both pipes). Returns the flops done by all threads (2 per
 * lane per round); the caller times the call. */
#define PEAK_LANES 192

double lmf_fma_loop(long iters) {
    double flops = 0;
    #pragma omp parallel reduction(+:flops)
    {
        float a[PEAK_LANES], b = 0.999999f, c = 1e-7f;
        for (int j = 0; j < PEAK_LANES; j++) a[j] = (float)j;
        for (long n = 0; n < iters; n++) {
            #pragma omp simd
            for (int j = 0; j < PEAK_LANES; j++) a[j] = a[j] * b + c;
        }
        float s = 0;
        for (int j = 0; j < PEAK_LANES; j++) s += a[j];
        volatile float sink = s; /* keeps the loop from being optimized away */
        (void)sink;
        flops += 2.0 * PEAK_LANES * (double)iters;
    }
    return flops;
}
