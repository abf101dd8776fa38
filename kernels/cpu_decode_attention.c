/* Paged decode attention for CPUs: one new query token per request, keys and values read
 * in place from the KV cache through the request's row of req_to_token.
 *
 * The torch version has to gather every request's K/V into a padded copy before its
 * matmuls can run; at batch 32 that copy and the many tiny matmuls cost more than the
 * arithmetic. Here a task takes a span of one request's positions and streams each
 * position's whole K row (every KV head: one contiguous read) once, scoring every query
 * head against it, then does the same with V. A request's positions are cut into spans
 * (flash-decoding) so that a small batch still keeps every thread busy; the spans'
 * partial results (unnormalised output, max score, exp-sum per head) are merged at the
 * end. Tasks run on torch's own OpenMP thread pool (this library links the libgomp that
 * torch loaded).
 *
 * Scores are scaling * q.k, soft-capped to softcap * tanh(s / softcap) when softcap > 0;
 * with window > 0 the query at position p sees keys p - window < j <= p. Query head h
 * reads KV head h / (heads / kv_heads). With sinks (non-NULL, float32 [H]), sinks[h] is one more
 * logit in head h's softmax denominator that carries no value (gpt-oss attention sinks);
 * it is added once, when the spans are merged. q and out are contiguous float32 [B, H, D] /
 * [B, H, Dv]; K/V are float32 or bfloat16 rows [slots, H_kv, D] with a contiguous
 * [H_kv, D] block per slot.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* glibc's vector expf (libmvec), which math.h only declares under -ffast-math. */
__attribute__((__simd__("notinbranch"))) float expf(float);

static inline float bf16_to_float(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* One slot's K or V block as float32: in place for float32 caches, converted into tmp for bf16. */
static inline const float *row_f32(const void *buffer, int is_bf16, int64_t offset, int n, float *tmp) {
    if (!is_bf16) return (const float *)buffer + offset;
    const uint16_t *src = (const uint16_t *)buffer + offset;
#pragma omp simd
    for (int i = 0; i < n; i++) tmp[i] = bf16_to_float(src[i]);
    return tmp;
}

/* Ask for a slot's block a few positions ahead: slots follow the radix cache, not memory
 * order (descending, interleaved), and the hardware prefetcher misses such runs: measured
 * 2.7x faster on descending slots, 1.8x on shuffled ones. */
#define PREFETCH_AHEAD 8
static inline void prefetch_block(const void *buffer, int elem_size, int64_t offset, int n) {
    const char *start = (const char *)buffer + offset * elem_size;
    for (int byte = 0; byte < n * elem_size; byte += 64) __builtin_prefetch(start + byte, 0, 1);
}

typedef struct {
    const float *q;
    const void *k_buffer, *v_buffer;
    int is_bf16;
    int64_t k_stride_slot, v_stride_slot;
    int heads, group, head_dim, v_head_dim;
    float scaling, softcap;
} Problem;

/* Positions [first, last) of one request: acc[h] = sum_j exp(s_hj - max_h) v_j, max[h], sum[h]. */
static inline __attribute__((always_inline)) void attend_span_dims(
    const Problem *p, int b, const int64_t *slots, int64_t first, int64_t last,
    float *acc, float *max, float *sum, float *scores, float *tmp, const int d_k, const int d_v)
{
    const int64_t n = last - first;
    const int heads = p->heads, group = p->group, kv_heads = heads / group;
    const float *q = p->q + (int64_t)b * heads * d_k;
    const int elem = p->is_bf16 ? 2 : 4, k_block = kv_heads * d_k, v_block = kv_heads * d_v;
    /* Query head h = kv * group + g reads KV head kv (loops, not a division per head). */
    for (int64_t j = 0; j < n; j++) {
        if (j + PREFETCH_AHEAD < n) prefetch_block(p->k_buffer, elem, slots[first + j + PREFETCH_AHEAD] * p->k_stride_slot, k_block);
        const float *k = row_f32(p->k_buffer, p->is_bf16, slots[first + j] * p->k_stride_slot, k_block, tmp);
        for (int kv = 0, h = 0; kv < kv_heads; kv++) {
            const float *kh = k + (int64_t)kv * d_k;
            for (int g = 0; g < group; g++, h++) {
                const float *qh = q + (int64_t)h * d_k;
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int d = 0; d < d_k; d++) dot += qh[d] * kh[d];
                scores[h * n + j] = dot * p->scaling;
            }
        }
    }
    for (int h = 0; h < heads; h++) {
        float *s = scores + h * n;
        if (p->softcap > 0.f) {
            const float cap = p->softcap;
#pragma omp simd
            for (int64_t j = 0; j < n; j++) s[j] = cap * tanhf(s[j] / cap);
        }
        float m = -INFINITY;
        for (int64_t j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < n; j++) {
            s[j] = expf(s[j] - m);
            total += s[j];
        }
        max[h] = m;
        sum[h] = total;
    }
    memset(acc, 0, sizeof(float) * (size_t)heads * d_v);
    for (int64_t j = 0; j < n; j++) {
        if (j + PREFETCH_AHEAD < n) prefetch_block(p->v_buffer, elem, slots[first + j + PREFETCH_AHEAD] * p->v_stride_slot, v_block);
        const float *v = row_f32(p->v_buffer, p->is_bf16, slots[first + j] * p->v_stride_slot, v_block, tmp);
        for (int kv = 0, h = 0; kv < kv_heads; kv++) {
            const float *vh = v + (int64_t)kv * d_v;
            for (int g = 0; g < group; g++, h++) {
                const float w = scores[h * n + j];
                float *o = acc + (int64_t)h * d_v;
#pragma omp simd
                for (int d = 0; d < d_v; d++) o[d] += w * vh[d];
            }
        }
    }
}

/* The common head dims as compile-time constants: the dot and axpy loops then unroll
 * into a few full-width vector instructions, with no peeling or remainder (2x measured). */
static void attend_span(
    const Problem *p, int b, const int64_t *slots, int64_t first, int64_t last,
    float *acc, float *max, float *sum, float *scores, float *tmp)
{
#define SPAN(DK, DV) attend_span_dims(p, b, slots, first, last, acc, max, sum, scores, tmp, DK, DV)
    if (p->head_dim == 64 && p->v_head_dim == 64) SPAN(64, 64);
    else if (p->head_dim == 128 && p->v_head_dim == 128) SPAN(128, 128);
    else if (p->head_dim == 256 && p->v_head_dim == 256) SPAN(256, 256);
    else SPAN(p->head_dim, p->v_head_dim);
#undef SPAN
}

/* The first position a query at the end of a sequence of len tokens sees. */
static inline int64_t window_start(int64_t len, int64_t window) {
    return (window > 0 && len > window) ? len - window : 0;
}

/* Returns 0, or -1 when scratch memory could not be allocated. */
int srt_decode_attention(
    const float *q, float *out,
    const void *k_buffer, const void *v_buffer, int is_bf16,
    int64_t k_stride_slot, int64_t v_stride_slot,
    const int64_t *req_to_token, int64_t table_stride, const int64_t *rows, const int64_t *seq_lens,
    int batch, int heads, int kv_heads, int head_dim, int v_head_dim,
    float scaling, float softcap, int64_t window, int64_t span_len, const float *sinks)
{
    const Problem p = {q, k_buffer, v_buffer, is_bf16, k_stride_slot, v_stride_slot,
                       heads, heads / kv_heads, head_dim, v_head_dim, scaling, softcap};
    /* Request b's spans are tasks first_task[b] .. first_task[b + 1] - 1, in position order. */
    int64_t *first_task = malloc(sizeof(int64_t) * ((size_t)batch + 1));
    if (first_task == NULL) return -1;
    int64_t max_span = 0;
    first_task[0] = 0;
    for (int b = 0; b < batch; b++) {
        int64_t len = seq_lens[b] - window_start(seq_lens[b], window);
        int64_t spans = len > 0 ? (len + span_len - 1) / span_len : 1;
        int64_t longest = len < span_len ? len : span_len;
        max_span = longest > max_span ? longest : max_span;
        first_task[b + 1] = first_task[b] + spans;
    }
    const int64_t tasks = first_task[batch];
    const size_t per_task = (size_t)heads * ((size_t)v_head_dim + 2);
    float *partial = malloc(sizeof(float) * per_task * (size_t)tasks);
    int failed = partial == NULL;
    if (!failed) {
#pragma omp parallel
        {
            int block = kv_heads * (head_dim > v_head_dim ? head_dim : v_head_dim);
            float *scores = malloc(sizeof(float) * ((size_t)heads * (size_t)max_span + (size_t)block));
            int b = 0;
#pragma omp for schedule(dynamic)
            for (int64_t t = 0; t < tasks; t++) {
                if (scores == NULL) {
#pragma omp atomic write
                    failed = 1;
                    continue;
                }
                while (first_task[b + 1] <= t) b++;
                while (first_task[b] > t) b--;
                int64_t first = window_start(seq_lens[b], window) + (t - first_task[b]) * span_len;
                int64_t last = first + span_len < seq_lens[b] ? first + span_len : seq_lens[b];
                float *acc = partial + per_task * (size_t)t;
                attend_span(&p, b, req_to_token + rows[b] * table_stride, first, last,
                            acc, acc + (size_t)heads * v_head_dim, acc + (size_t)heads * (v_head_dim + 1),
                            scores, scores + (size_t)heads * (size_t)max_span);
            }
            free(scores);
#pragma omp barrier
            /* Merge each request's spans: rescale every span to the overall max score. */
#pragma omp for schedule(static)
            for (int64_t bh = 0; bh < (int64_t)batch * heads; bh++) {
                if (failed) continue;
                int rb = (int)(bh / heads), h = (int)(bh % heads);
                float m = sinks ? sinks[h] : -INFINITY, total = 0.f;
                for (int64_t t = first_task[rb]; t < first_task[rb + 1]; t++) {
                    float mt = partial[per_task * (size_t)t + (size_t)heads * v_head_dim + h];
                    m = mt > m ? mt : m;
                }
                float *o = out + bh * v_head_dim;
                memset(o, 0, sizeof(float) * v_head_dim);
                if (sinks) total = expf(sinks[h] - m);
                for (int64_t t = first_task[rb]; t < first_task[rb + 1]; t++) {
                    const float *acc = partial + per_task * (size_t)t;
                    float w = expf(acc[(size_t)heads * v_head_dim + h] - m);
                    total += w * acc[(size_t)heads * (v_head_dim + 1) + h];
#pragma omp simd
                    for (int d = 0; d < v_head_dim; d++) o[d] += w * acc[(size_t)h * v_head_dim + d];
                }
                float inv = 1.f / total;
#pragma omp simd
                for (int d = 0; d < v_head_dim; d++) o[d] *= inv;
            }
        }
    }
    free(partial);
    free(first_task);
    return failed ? -1 : 0;
}
