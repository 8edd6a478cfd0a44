/* One decoding step of a decoder-only Transformer (lmforge.models.decoder.DecoderLM) for B rows of one new
 * token each, in a single OpenMP parallel region: the embedding, every block (norm, q/k/v product, QK-norm
 * and RoPE, the KV-cache write, attention over the cache, output product and residual, norm, MLP products
 * and activation, residual) and the final norm and output head. lmforge.fused describes the model to it and
 * checks it against the PyTorch forward, which stays the definition of what is computed here.
 *
 * Decoding a token reads every weight once and does two flops per weight, so a step is bound by how fast
 * the weights stream from memory; the work between the products is tiny but, done by PyTorch, costs an
 * operator call each (dozens per block). Here it is a few loops between team barriers, and the products run
 * on lmforge's streaming kernel (stream_linear.c) without leaving the parallel region.
 */
#include <math.h>
#include "kernels.h"

/* A linear layer: W [n, k] fp32, or int8 when scale [n] is set; bias [n] or NULL. */
typedef struct {
    const void *w;
    const float *scale;
    const float *bias;
    long n, k;
} lmf_lin;

typedef struct {
    const float *norm1_w, *norm1_b, *norm2_w, *norm2_b; /* a NULL bias: none (RMSNorm, or LayerNorm without) */
    const float *q_norm_w, *k_norm_w;                   /* QK-norm gains [D], or NULL */
    lmf_lin qkv, proj, fc1, fc2;                        /* qkv rows: H query heads, then KV keys, KV values */
    float *k_cache, *v_cache;                           /* [B, KV, cap, D] */
} lmf_layer;

enum { MLP_GELU_TANH, MLP_GELU, MLP_RELU, MLP_SILU, MLP_RELU2, MLP_SWIGLU };

typedef struct {
    long n_layers, C, H, KV, D, F, V, cap;
    long rmsnorm; /* 0: LayerNorm */
    long mlp;     /* MLP_* */
    float eps, emb_scale;
    const float *tok_emb;       /* [V_in, C] */
    const float *pos_emb;       /* learned positions [block, C], or NULL */
    const float *rope_inv_freq; /* [D / 2], or NULL */
    const float *normf_w, *normf_b;
    lmf_lin head;
    lmf_layer *layers;
    float *x, *h, *qkv, *att, *ff, *act; /* scratch: [B,C] [B,C] [B,(H+2KV)D] [B,HD] [B,F or 2F] [B,F] */
} lmf_model;

static void lin(const lmf_lin *l, const float *x, float *y, long M, int accumulate) {
    if (l->scale)
        lmf_linear_i8_team((const int8_t *)l->w, l->scale, x, l->bias, y, M, l->n, l->k, accumulate);
    else
        lmf_linear_f32_team((const float *)l->w, x, l->bias, y, M, l->n, l->k, accumulate);
}

/* LayerNorm (mean and variance in double, as a reference would) or RMSNorm, of one row of n. */
static void norm_row(const float *x, float *y, long n, const float *w, const float *b, int rms, float eps) {
    double mean = 0.0, var = 0.0;
    if (!rms) {
        for (long i = 0; i < n; i++) mean += x[i];
        mean /= n;
    }
    for (long i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    float inv = (float)(1.0 / sqrt(var / n + eps));
    for (long i = 0; i < n; i++) {
        float v = ((float)(x[i] - mean)) * inv * (w ? w[i] : 1.0f);
        y[i] = b ? v + b[i] : v;
    }
}

/* GPT-NeoX / Llama "rotate half" RoPE on one head: pairs (x[i], x[i + D/2]) turned by pos * inv_freq[i]. */
static void rope_head(float *x, long D, long pos, const float *inv_freq) {
    long half = D / 2;
    for (long i = 0; i < half; i++) {
        float a = (float)pos * inv_freq[i], c = cosf(a), s = sinf(a);
        float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
    }
}

static float dot(const float *a, const float *b, long n) {
    float s = 0.0f;
    #pragma omp simd reduction(+ : s)
    for (long i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* softmax(q K^T / sqrt(D)) V over cache slots [start, end) of one head, one pass with a running maximum
 * (the rescaling of Milakov & Gimelshein 2018 that flash attention uses). */
static void attend(const float *q, const float *K, const float *V, long start, long end, long D, float *out) {
    float acc[D];
    for (long d = 0; d < D; d++) acc[d] = 0.0f;
    const float scale = 1.0f / sqrtf((float)D);
    float m = -INFINITY, l = 0.0f;
    for (long s = start; s < end; s++) {
        float z = dot(q, K + s * D, D) * scale;
        if (z > m) {
            float c = s == start ? 0.0f : exp_approx(m - z);
            l *= c;
            for (long d = 0; d < D; d++) acc[d] *= c;
            m = z;
        }
        float p = exp_approx(z - m);
        l += p;
        const float *v = V + s * D;
        #pragma omp simd
        for (long d = 0; d < D; d++) acc[d] += p * v[d];
    }
    for (long d = 0; d < D; d++) out[d] = acc[d] / l;
}

static float activate(float v, long kind) {
    switch (kind) {
    case MLP_GELU_TANH: return v * sig2u(v);
    case MLP_GELU: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case MLP_RELU: return v > 0.0f ? v : 0.0f;
    case MLP_RELU2: return v > 0.0f ? v * v : 0.0f;
    default: return v / (1.0f + expf(-v)); /* SiLU */
    }
}

/* tokens [B]; pos [B]: each row's position; start [B]: each row's first visible cache slot (left padding),
 * or NULL for 0; end [B]: the cache slot each row's new key and value go to, its last visible slot (one
 * shared length for a batch decoded together, each slot's own length for the server's slot cache).
 * logits: [B, V]. */
void lmf_decode_step(const lmf_model *m, long B, const int64_t *tokens, const int64_t *pos, const int64_t *start,
                     const int64_t *end, float *logits) {
    const long C = m->C, H = m->H, KV = m->KV, D = m->D, F = m->F, QKV = (H + 2 * KV) * D;
    const long group = H / KV, FF = m->mlp == MLP_SWIGLU ? 2 * F : F;
    float *x = m->x, *h = m->h, *qkv = m->qkv, *att = m->att, *ff = m->ff;
    float *mlp_out = m->mlp == MLP_SWIGLU ? m->act : ff;
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (long b = 0; b < B; b++) {
            const float *e = m->tok_emb + tokens[b] * C, *p = m->pos_emb ? m->pos_emb + pos[b] * C : 0;
            for (long i = 0; i < C; i++) x[b * C + i] = p ? e[i] * m->emb_scale + p[i] : e[i] * m->emb_scale;
        }
        for (long layer = 0; layer < m->n_layers; layer++) {
            const lmf_layer *L = &m->layers[layer];
            #pragma omp for schedule(static)
            for (long b = 0; b < B; b++) norm_row(x + b * C, h + b * C, C, L->norm1_w, L->norm1_b, m->rmsnorm, m->eps);
            lin(&L->qkv, h, qkv, B, 0);
            /* Per head of each row: QK-norm and RoPE for queries and keys; keys and values into the cache. */
            #pragma omp for schedule(static)
            for (long i = 0; i < B * (H + KV); i++) {
                long b = i / (H + KV), j = i % (H + KV);
                float *v = qkv + b * QKV + j * D;
                if (L->q_norm_w) {
                    const float *g = j < H ? L->q_norm_w : L->k_norm_w;
                    norm_row(v, v, D, g, 0, 1, m->eps);
                }
                if (m->rope_inv_freq) rope_head(v, D, pos[b], m->rope_inv_freq);
                if (j >= H) {
                    long g = j - H, at = ((b * KV + g) * m->cap + end[b]) * D;
                    memcpy(L->k_cache + at, v, D * sizeof(float));
                    memcpy(L->v_cache + at, qkv + b * QKV + (H + KV + g) * D, D * sizeof(float));
                }
            }
            #pragma omp for schedule(static)
            for (long i = 0; i < B * H; i++) {
                long b = i / H, j = i % H, g = j / group, base = (b * KV + g) * m->cap * D;
                attend(qkv + b * QKV + j * D, L->k_cache + base, L->v_cache + base, start ? start[b] : 0, end[b] + 1,
                       D, att + b * H * D + j * D);
            }
            lin(&L->proj, att, x, B, 1);
            #pragma omp for schedule(static)
            for (long b = 0; b < B; b++) norm_row(x + b * C, h + b * C, C, L->norm2_w, L->norm2_b, m->rmsnorm, m->eps);
            lin(&L->fc1, h, ff, B, 0);
            #pragma omp for schedule(static)
            for (long i = 0; i < B * F; i++) {
                long b = i / F, j = i % F;
                if (m->mlp == MLP_SWIGLU) /* fc1 rows: gate, then up */
                    mlp_out[i] = activate(ff[b * FF + j], MLP_SILU) * ff[b * FF + F + j];
                else
                    ff[i] = activate(ff[i], m->mlp);
            }
            lin(&L->fc2, mlp_out, x, B, 1);
        }
        #pragma omp for schedule(static)
        for (long b = 0; b < B; b++) norm_row(x + b * C, h + b * C, C, m->normf_w, m->normf_b, m->rmsnorm, m->eps);
        lin(&m->head, h, logits, B, 0);
    }
}
