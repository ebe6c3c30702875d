// attention_inputs.cu — the path from the q/k/v projections to attention's inputs in one pass,
// for prefill and decode with a KV cache, and for training. Per token t and head:
//   q, k, v  += their bias                                   (Qwen2; skipped without one)
//   q, k      = w ∘ round_T(x · rstd) per head over head_dim  (Qwen3's q_norm / k_norm; skipped
//               without), rstd = 1/sqrt(mean(x²) + eps) in f32
//   q, k      = rope(q, k) at position pos[t]                 (HF rotate-half, sign +1)
//   q_out, k_out, v_out ← the results; with a cache also k_cache[slot[t], pos[t]] ← k and
//   v_cache[slot[t], pos[t]] ← v
// Each stage rounds to T where the unfused ops store their result (add_bias_, rmsnorm, rope),
// and uses the same expressions, so this kernel gives the bits of those ops in sequence wherever
// their reductions agree (the head norm's sum of squares is a warp_sum here, as in rmsnorm.cu).
// Inference replaces 7 launches per layer (3 bias adds, 2 ropes, 2 appends) by this one;
// training (no cache) uses it for models without head norms, whose backward needs nothing
// between the projections and the rotation (with head norms it keeps the separate ops).
//
// Layout: q [T, nh, d], k and v [T, nkv, d] (the projections' outputs), rows sq, sk, sv elements
// apart — nh·d and nkv·d for separate projections, (nh + 2·nkv)·d for the column blocks of one
// fused [q | k | v] projection; output rows oq, ok, ov elements apart (contiguous forward).
// Backward (attention_inputs_backward, no bias, norm or cache): the same kernels with sign = −1
// (the inverse rotation) take the gradients of q, k, v (contiguous) and write the gradient of
// the fused projection (output rows (nh + 2·nkv)·d apart). Biases [nh·d] /
// [nkv·d]; norm weights [d]; caches [n_slots, max_len, nkv, d]; pos and slot [T] u32; inv_freq
// [d/2] f32. T = f32 or bf16 for the activations, the biases and the caches; W = f32 or bf16 for
// the norm weights (as rmsnorm takes any mix). Null pointers mean "no bias", "no norm", "no cache".
// Threads: one warp per (token, head) over a token's nh + 2·nkv heads (q heads, then k, then v),
// grid-stride over T·(nh + 2·nkv) warps, 4 warps per block. Lane l owns the rotate-half pairs
// (i, i + d/2) for i = l, l + 32, … < d/2 (d ≤ 256, so at most 4 pairs), loaded as scalars: the
// rows are short and the kernel moves a few bytes per token, so launch count, not bandwidth,
// is what it saves. The head norm's sum of squares is one warp_sum.
// v2 (no head norms; rows of whole 16-byte chunks, 16-byte aligned; what Qwen2/2.5 prefill and
// training run): one warp per token, grid-stride over tokens. L = h/N lanes own a head's h/N
// chunks of N elements (N = 16 bytes of T: 8 bf16 or 4 f32), lane l chunk (l mod L), for both
// halves of the rotate-half pair; the warp's 32/L lane groups take the token's heads in turn
// (group g: heads g, g + 32/L, …). A lane's chunk is the same for every head, so it computes
// its N cos/sin once per token. Same expressions per element as v1: the same bits.
// Versions:
//   v1 warp per (token, head), scalar loads, any head_dim ≤ 256, head norms
//   v2 warp per token, 16-byte loads, cos/sin once per token (no head norms; L a power of two;
//      the launcher checks alignment; default where it fits)

#define AI_MAX_PAIRS 4  // pairs per lane: d/2 ≤ 32·AI_MAX_PAIRS, so head_dim ≤ 256

// The rows both versions read and write, and the strides between tokens.
template <typename T>
struct AiRows {
    const T *q, *k, *v, *bq, *bk, *bv;
    T *q_out, *k_out, *v_out, *k_cache, *v_cache;
    u64 sq, sk, sv, oq, ok, ov;
    u32 nh, nkv, d;
};

// Head hd of token t (q heads, then k, then v): its source row and bias, its output row, its
// cache row (k and v, with a cache at row `cache_row` of the token) and which kind it is.
template <typename T>
struct AiHead {
    const T *src, *bias;
    T *dst, *cdst;
    int kind;  // 0 q, 1 k, 2 v
};
template <typename T>
__device__ __forceinline__ AiHead<T> ai_head(const AiRows<T>& a, u64 t, u32 hd, u64 cache_row) {
    const u32 d = a.d;
    if (hd < a.nh) {
        return {a.q + t * a.sq + (u64)hd * d, a.bq ? a.bq + (u64)hd * d : nullptr, a.q_out + t * a.oq + (u64)hd * d,
                nullptr, 0};
    }
    if (hd < a.nh + a.nkv) {
        const u32 kh = hd - a.nh;
        return {a.k + t * a.sk + (u64)kh * d, a.bk ? a.bk + (u64)kh * d : nullptr, a.k_out + t * a.ok + (u64)kh * d,
                a.k_cache ? a.k_cache + (cache_row + kh) * d : nullptr, 1};
    }
    const u32 vh = hd - a.nh - a.nkv;
    return {a.v + t * a.sv + (u64)vh * d, a.bv ? a.bv + (u64)vh * d : nullptr, a.v_out + t * a.ov + (u64)vh * d,
            a.v_cache ? a.v_cache + (cache_row + vh) * d : nullptr, 2};
}

template <typename T, typename W>
__device__ __forceinline__ void attention_inputs_impl(T* q_out, T* k_out, T* v_out, T* k_cache, T* v_cache,
                                                      const T* q, const T* k, const T* v, const T* bq,
                                                      const T* bk, const T* bv, const W* wq, const W* wk,
                                                      const u32* __restrict__ pos, const u32* __restrict__ slot,
                                                      const float* __restrict__ inv_freq, u64 tokens, u32 nh,
                                                      u32 nkv, u32 h, u32 max_len, float eps, u64 sq, u64 sk,
                                                      u64 sv, u64 oq, u64 ok, u64 ov, float sign) {
    const u32 lane = threadIdx.x & 31;
    const u32 heads = nh + 2 * nkv, d = 2 * h;
    const u64 warps = tokens * heads;
    const AiRows<T> rows{q, k, v, bq, bk, bv, q_out, k_out, v_out, k_cache, v_cache, sq, sk, sv, oq, ok, ov,
                         nh, nkv, d};
    for (u64 w = blockIdx.x * (u64)(blockDim.x >> 5) + (threadIdx.x >> 5); w < warps;
         w += (u64)gridDim.x * (blockDim.x >> 5)) {
        const u64 t = w / heads;
        const u32 hd = (u32)(w - t * heads);
        const u64 cache_row = k_cache ? ((u64)slot[t] * max_len + pos[t]) * nkv : 0;
        const AiHead<T> x = ai_head(rows, t, hd, cache_row);
        const T *src = x.src, *bias = x.bias;
        T *dst = x.dst, *cdst = x.cdst;
        const W* nw = x.kind == 0 ? wq : x.kind == 1 ? wk : nullptr;
        const bool rotate = x.kind != 2;
        float a[AI_MAX_PAIRS], b[AI_MAX_PAIRS];
        float ss = 0.0f;
        #pragma unroll
        for (int j = 0; j < AI_MAX_PAIRS; ++j) {
            const u32 i = lane + 32 * j;
            a[j] = b[j] = 0.0f;
            if (i < h) {
                a[j] = ld1(src + i);
                b[j] = ld1(src + i + h);
                if (bias) {
                    // add_bias_: the sum rounded to T.
                    a[j] = round_to(__fadd_rn(a[j], ld1(bias + i)), src);
                    b[j] = round_to(__fadd_rn(b[j], ld1(bias + i + h)), src);
                }
                ss = __fmaf_rn(a[j], a[j], ss);
                ss = __fmaf_rn(b[j], b[j], ss);
            }
        }
        if (nw) {
            // rmsnorm.cu's expressions: rstd in f32, x·rstd rounded to T, then times the weight.
            ss = warp_sum(ss);
            const float rs = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)d), eps)));
            #pragma unroll
            for (int j = 0; j < AI_MAX_PAIRS; ++j) {
                const u32 i = lane + 32 * j;
                if (i < h) {
                    a[j] = round_to(__fmul_rn(ld1(nw + i), round_to(__fmul_rn(a[j], rs), src)), src);
                    b[j] = round_to(__fmul_rn(ld1(nw + i + h), round_to(__fmul_rn(b[j], rs), src)), src);
                }
            }
        }
        const float p = (float)pos[t];
        #pragma unroll
        for (int j = 0; j < AI_MAX_PAIRS; ++j) {
            const u32 i = lane + 32 * j;
            if (i >= h) continue;
            float lo = a[j], hi = b[j];
            if (rotate) {
                float cs, sn;
                rope_cos_sin<T, 1>(&cs, &sn, p, inv_freq + i, sign, src);
                rope_rotate<T, 1>(&lo, &hi, &a[j], &b[j], &cs, &sn, src);
            }
            st1(dst + i, lo);
            st1(dst + i + h, hi);
            if (cdst) {
                st1(cdst + i, lo);
                st1(cdst + i + h, hi);
            }
        }
    }
}

#define ATTENTION_INPUTS_KERNEL(NAME, T, W)                                                             \
    extern "C" __global__ void NAME(T* q_out, T* k_out, T* v_out, T* k_cache, T* v_cache, const T* q,  \
                                    const T* k, const T* v, const T* bq, const T* bk, const T* bv,      \
                                    const W* wq, const W* wk, const u32* pos, const u32* slot,          \
                                    const float* inv_freq, u64 tokens, u32 nh, u32 nkv, u32 h,          \
                                    u32 max_len, float eps, u64 sq, u64 sk, u64 sv, u64 oq, u64 ok,     \
                                    u64 ov, float sign) {                                               \
        attention_inputs_impl<T, W>(q_out, k_out, v_out, k_cache, v_cache, q, k, v, bq, bk, bv, wq, wk,   \
                                 pos, slot, inv_freq, tokens, nh, nkv, h, max_len, eps, sq, sk, sv, oq, \
                                 ok, ov, sign);                                                         \
    }

// attention_inputs_<x>_<norm weights>
ATTENTION_INPUTS_KERNEL(attention_inputs_f32_f32, float, float)
ATTENTION_INPUTS_KERNEL(attention_inputs_f32_bf16, float, bf16_t)
ATTENTION_INPUTS_KERNEL(attention_inputs_bf16_f32, bf16_t, float)
ATTENTION_INPUTS_KERNEL(attention_inputs_bf16_bf16, bf16_t, bf16_t)

template <typename T, int N>
__device__ __forceinline__ void attention_inputs_v2_impl(T* q_out, T* k_out, T* v_out, T* k_cache, T* v_cache,
                                                         const T* q, const T* k, const T* v, const T* bq,
                                                         const T* bk, const T* bv, const u32* __restrict__ pos,
                                                         const u32* __restrict__ slot,
                                                         const float* __restrict__ inv_freq, u64 tokens, u32 nh,
                                                         u32 nkv, u32 h, u32 max_len, u64 sq, u64 sk, u64 sv,
                                                         u64 oq, u64 ok, u64 ov, float sign) {
    const u32 lane = threadIdx.x & 31;
    const u32 L = h / N, G = 32 / L;  // lanes per head, heads per pass of the warp
    const u32 c = (lane % L) * N;     // this lane's chunk of either half
    const u32 heads = nh + 2 * nkv;
    const AiRows<T> rows{q, k, v, bq, bk, bv, q_out, k_out, v_out, k_cache, v_cache, sq, sk, sv, oq, ok, ov,
                         nh, nkv, 2 * h};
    float f[N];
    #pragma unroll
    for (int e = 0; e < N; ++e) f[e] = inv_freq[c + e];
    for (u64 t = blockIdx.x * (u64)(blockDim.x >> 5) + (threadIdx.x >> 5); t < tokens;
         t += (u64)gridDim.x * (blockDim.x >> 5)) {
        float cs[N], sn[N];
        rope_cos_sin<T, N>(cs, sn, (float)pos[t], f, sign, q);
        const u64 cache_row = k_cache ? ((u64)slot[t] * max_len + pos[t]) * nkv : 0;
        for (u32 hd = lane / L; hd < heads; hd += G) {
            const AiHead<T> x = ai_head(rows, t, hd, cache_row);
            const T *src = x.src, *bias = x.bias;
            T *dst = x.dst, *cdst = x.cdst;
            const bool rotate = x.kind != 2;
            float a[N], b[N];
            ldn<T, N>(src + c, a);
            ldn<T, N>(src + h + c, b);
            if (bias) {
                // add_bias_: the sum rounded to T.
                float ba[N], bb[N];
                ldn<T, N>(bias + c, ba);
                ldn<T, N>(bias + h + c, bb);
                #pragma unroll
                for (int e = 0; e < N; ++e) {
                    a[e] = round_to(__fadd_rn(a[e], ba[e]), src);
                    b[e] = round_to(__fadd_rn(b[e], bb[e]), src);
                }
            }
            float lo[N], hi[N];
            if (rotate) {
                rope_rotate<T, N>(lo, hi, a, b, cs, sn, src);
            } else {
                #pragma unroll
                for (int e = 0; e < N; ++e) {
                    lo[e] = a[e];
                    hi[e] = b[e];
                }
            }
            stn<T, N>(dst + c, lo);
            stn<T, N>(dst + h + c, hi);
            if (cdst) {
                stn<T, N>(cdst + c, lo);
                stn<T, N>(cdst + h + c, hi);
            }
        }
    }
}

#define ATTENTION_INPUTS_V2_KERNEL(NAME, T, N)                                                          \
    extern "C" __global__ void NAME(T* q_out, T* k_out, T* v_out, T* k_cache, T* v_cache, const T* q,  \
                                    const T* k, const T* v, const T* bq, const T* bk, const T* bv,      \
                                    const u32* pos, const u32* slot, const float* inv_freq, u64 tokens, \
                                    u32 nh, u32 nkv, u32 h, u32 max_len, u64 sq, u64 sk, u64 sv,        \
                                    u64 oq, u64 ok, u64 ov, float sign) {                               \
        attention_inputs_v2_impl<T, N>(q_out, k_out, v_out, k_cache, v_cache, q, k, v, bq, bk, bv, pos,  \
                                       slot, inv_freq, tokens, nh, nkv, h, max_len, sq, sk, sv, oq, ok, \
                                       ov, sign);                                                       \
    }

ATTENTION_INPUTS_V2_KERNEL(attention_inputs_v2_f32, float, 4)
ATTENTION_INPUTS_V2_KERNEL(attention_inputs_v2_bf16, bf16_t, 8)
