/* fedgma's compiled aggregation kernel (see native.py): fold K float32 client updates into the
 * running sums of the aggregation rules in one pass over memory.
 *
 *     total[i] += w_k * u_k[i]                 (weighted sum, every rule)
 *     signs[i] += s_k * sign(u_k[i])           (GMA's sign sum; skipped when signs is NULL)
 *
 * for i in [start, end), clients in order 0..K-1. The range is walked in blocks that stay in cache
 * while every client's slice of the block is read, four clients per sweep, so each update is read
 * from memory once and the running sums are loaded and stored once per four clients. Every
 * element gets the same operations in the same order as PyTorch's `total.add_(u, alpha=w)`
 * followed by `signs.add_(torch.sign(u), alpha=s)` (a fused multiply-add, as ATen's vectorised
 * add with alpha), so both paths give the same bits; tests/test_native.py checks it.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#if defined(FEDGMA_CLONES)
/* One build for every x86-64 machine: an AVX2+FMA version and a baseline one, picked at load. */
#define FEDGMA_TARGETS __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FEDGMA_TARGETS
#endif

#define SIGN(x) ((float)((0.0f < (x)) - ((x) < 0.0f))) /* torch.sign: -1, 0 or 1 (0 for ±0) */
#define BLOCK 16384                                     /* 64 KiB of each running sum per block */

FEDGMA_TARGETS
void fedgma_fold(int64_t k, const float *const *updates, const float *weights, const float *sign_weights,
                 float *total, float *signs, int64_t start, int64_t end)
{
    float *restrict t = total;
    float *restrict g = signs;
    for (int64_t b = start; b < end; b += BLOCK) {
        const int64_t e = b + BLOCK < end ? b + BLOCK : end;
        int64_t c = 0;
        for (; c + 4 <= k; c += 4) {
            const float *restrict u0 = updates[c], *restrict u1 = updates[c + 1];
            const float *restrict u2 = updates[c + 2], *restrict u3 = updates[c + 3];
            const float w0 = weights[c], w1 = weights[c + 1], w2 = weights[c + 2], w3 = weights[c + 3];
            if (g) {
                const float s0 = sign_weights[c], s1 = sign_weights[c + 1];
                const float s2 = sign_weights[c + 2], s3 = sign_weights[c + 3];
                for (int64_t i = b; i < e; i++) {
                    const float x0 = u0[i], x1 = u1[i], x2 = u2[i], x3 = u3[i];
                    t[i] = fmaf(w3, x3, fmaf(w2, x2, fmaf(w1, x1, fmaf(w0, x0, t[i]))));
                    g[i] = fmaf(s3, SIGN(x3), fmaf(s2, SIGN(x2), fmaf(s1, SIGN(x1), fmaf(s0, SIGN(x0), g[i]))));
                }
            } else {
                for (int64_t i = b; i < e; i++)
                    t[i] = fmaf(w3, u3[i], fmaf(w2, u2[i], fmaf(w1, u1[i], fmaf(w0, u0[i], t[i]))));
            }
        }
        for (; c < k; c++) {
            const float *restrict u = updates[c];
            const float w = weights[c];
            if (g) {
                const float s = sign_weights[c];
                for (int64_t i = b; i < e; i++) {
                    const float x = u[i];
                    t[i] = fmaf(w, x, t[i]);
                    g[i] = fmaf(s, SIGN(x), g[i]);
                }
            } else {
                for (int64_t i = b; i < e; i++)
                    t[i] = fmaf(w, u[i], t[i]);
            }
        }
    }
}
