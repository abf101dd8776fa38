/* Grammar masks for CPUs: logits[r, t] = -inf for every token t whose bit is clear in
 * bitmask[r] (bit t % 32 of 32-bit word t / 32, xgrammar's and llguidance's layout), for
 * the listed rows, in place.
 *
 * Masks are mostly whole words of one kind: inside a JSON string nearly every token is
 * allowed, between values nearly none. A word of all ones is skipped and a word of all
 * zeros is one run of -inf stores; only mixed words are read bit by bit.
 */
#include <math.h>
#include <stdint.h>

void srt_apply_token_bitmask(float *logits, int64_t row_stride, const int32_t *bitmask, int64_t words,
                             const int64_t *rows, int64_t n_rows, int64_t vocab) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n_rows; i++) {
        float *row = logits + rows[i] * row_stride;
        const uint32_t *mask = (const uint32_t *)(bitmask + rows[i] * words);
        for (int64_t w = 0; w < words; w++) {
            uint32_t bits = mask[w];
            if (bits == 0xFFFFFFFFu) continue;
            int64_t start = w * 32, end = start + 32 < vocab ? start + 32 : vocab;
            if (bits == 0) {
                for (int64_t t = start; t < end; t++) row[t] = -INFINITY;
                continue;
            }
            for (int64_t t = start; t < end; t++)
                if (!((bits >> (t - start)) & 1u)) row[t] = -INFINITY;
        }
    }
}
