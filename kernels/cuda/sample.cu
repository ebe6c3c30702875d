// sample.cu — next-token selection per row of logits: greedy argmax, or temperature + top-k +
// top-p sampling with one uniform draw per row (rules and outputs: kernels/src/sample.rs, whose
// `cpu::sample_row` is the reference).
//
// Layout: logits [B, V] row-major (f32 or bf16 storage, f32 math); streams u32 [B] or null;
// step_at: two u32 words (the step, low word first, read at run time; 4-byte aligned) or null
// (the `step` argument); outputs tokens u32 [B], logp / logp_trunc / entropy f32 [B].
// Threads: one block of 1024 threads per row; every pass strides over the row (V up to 151,936
// stays in L2 between passes). Passes, with s = z/T and e = exp(s − max):
//   1. max + first argmax (block reduction on (value, index));
//   2. Σe and Σe·(s − max) → log-sum-exp and entropy (greedy stops here);
//   3. top-k: bisection on the 32-bit order-preserving key of s for the k-th largest value
//      (32 passes, each a block count);
//   4. top-p: bisection on the bits of the threshold t ∈ [0, 1] (e ≥ 0, so bit order is
//      value order) for the largest t with Σ_{e ≥ t} e ≥ top_p·Σe over the top-k survivors
//      (~30 passes, each a block sum);
//   5. Σ survivor e, then a tiled block-wide inclusive scan in vocabulary order; the first
//      survivor where the running sum exceeds u·Σ is the token (block min of candidate indices).
// All reductions are fixed-shape trees (no atomics), so a row's result is deterministic.
// The uniform u comes from the same SplitMix64 chain as `row_uniform` in sample.rs, keyed by
// streams[row] when a stream list is given (null: by the row).
// Versions:
//   v1 one block per row, bisection thresholds over full-row passes, f32 block scans
//   v2 one block per row, radix selects on exact integer masses (below; the default)

#define SMP_THREADS 1024
#define SMP_NONE 0xffffffffu
#define SMP_GOLDEN 0x9E3779B97F4A7C15ull

__device__ __forceinline__ float smp_ld(const float* p, u64 i) { return p[i]; }
__device__ __forceinline__ float smp_ld(const bf16_t* p, u64 i) { return bf16_to_f32(p[i]); }

// Unsigned order of the key = float order (−0 < +0); mirrors `cpu::ord_key`.
__device__ __forceinline__ u32 smp_key(float x) {
    const u32 b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ u64 smp_mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Rng::new(x).next_u64()
__device__ __forceinline__ u64 smp_next(u64 x) { return smp_mix64(x + SMP_GOLDEN); }

// The row's uniform draw is u = h/2^24 with h the top 24 bits of the hash chain.
__device__ __forceinline__ u64 smp_hash24(u64 seed, u64 step, u64 row) {
    return smp_next(smp_next(smp_next(seed) ^ step) ^ row) >> 40;
}

__device__ __forceinline__ float smp_uniform(u64 seed, u64 step, u64 row) {
    return (float)smp_hash24(seed, step, row) * (1.0f / 16777216.0f);
}

// Warp-level pieces of the block reductions below. The emulator (cuda_emu.hpp) replays the
// same shuffle butterflies and scans in one warp rendezvous each.
__device__ __forceinline__ u32 smp_warp_sum_u32(u32 v) {
#ifdef SMELT_EMU
    return smelt_emu::butterfly(v, [](u32 a, u32 b) { return a + b; }, "smp_warp_sum_u32");
#else
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
#endif
}

__device__ __forceinline__ u32 smp_warp_min_u32(u32 v) {
#ifdef SMELT_EMU
    return smelt_emu::butterfly(v, [](u32 a, u32 b) { return min(a, b); }, "smp_warp_min_u32");
#else
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
#endif
}

__device__ __forceinline__ u32 smp_block_sum_u32(u32 v, u32* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = smp_warp_sum_u32(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < nwarps) ? scratch[lane] : 0u;
    return smp_warp_sum_u32(v);
}

__device__ __forceinline__ u32 smp_block_min_u32(u32 v, u32* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = smp_warp_min_u32(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < nwarps) ? scratch[lane] : SMP_NONE;
    return smp_warp_min_u32(v);
}

// Larger value wins; equal values: smaller index. Values are never NaN here.
struct SmpArg {
    float v;
    u32 i;
};
__device__ __forceinline__ SmpArg smp_argmax_step(SmpArg a, SmpArg b) {
    return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a;
}

__device__ __forceinline__ SmpArg smp_warp_argmax(SmpArg a) {
#ifdef SMELT_EMU
    return smelt_emu::butterfly(a, smp_argmax_step, "smp_warp_argmax");
#else
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        a = smp_argmax_step(a, {__shfl_xor_sync(0xffffffffu, a.v, o), __shfl_xor_sync(0xffffffffu, a.i, o)});
    return a;
#endif
}

__device__ __forceinline__ void smp_block_argmax(float& v, u32& i, float* sv, u32* si) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    SmpArg a = smp_warp_argmax({v, i});
    __syncthreads();
    if (lane == 0) {
        sv[warp] = a.v;
        si[warp] = a.i;
    }
    __syncthreads();
    a = (lane < nwarps) ? SmpArg{sv[lane], si[lane]} : SmpArg{-SMELT_INF, SMP_NONE};
    a = smp_warp_argmax(a);
    v = a.v;
    i = a.i;
}

// Inclusive scan over the warp in lane order.
__device__ __forceinline__ float smp_warp_scan(float s) {
#ifdef SMELT_EMU
    return smelt_emu::scan_up(s, [](float a, float b) { return a + b; }, "smp_warp_scan");
#else
    const int lane = threadIdx.x & 31;
    #pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float y = __shfl_up_sync(0xffffffffu, s, o);
        if (lane >= o) s += y;
    }
    return s;
#endif
}

// Inclusive scan over the block in thread order; *total gets the block's sum.
__device__ __forceinline__ float smp_block_scan(float x, float* scratch, float* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const float s = smp_warp_scan(x);
    __syncthreads();
    if (lane == 31) scratch[warp] = s;
    __syncthreads();
    if (warp == 0) scratch[lane] = smp_warp_scan((lane < nwarps) ? scratch[lane] : 0.0f);
    __syncthreads();
    *total = scratch[nwarps - 1];
    return s + (warp > 0 ? scratch[warp - 1] : 0.0f);
}

template <typename T>
__device__ __forceinline__ void sample_row(const T* __restrict__ logits, u32 V, float temp, u32 top_k,
                                           float top_p, u64 seed, u64 step, const u32* __restrict__ streams,
                                           u32* __restrict__ tokens,
                                           float* __restrict__ logp, float* __restrict__ logp_trunc,
                                           float* __restrict__ entropy) {
    __shared__ float sf[32];
    __shared__ u32 su[32];
    const u32 row = blockIdx.x;
    const T* z = logits + (u64)row * V;
    const bool greedy = temp == 0.0f;
    const float t = greedy ? 1.0f : temp;

    // 1. max and first argmax of s.
    float m = -SMELT_INF;
    u32 arg = SMP_NONE;
    for (u32 v = threadIdx.x; v < V; v += blockDim.x) {
        const float s = smp_ld(z, v) / t;
        if (s > m) {
            m = s;
            arg = v;
        }
    }
    smp_block_argmax(m, arg, sf, su);
    if (arg == SMP_NONE) arg = 0;

    // 2. log-sum-exp and entropy of the full tempered distribution.
    float zs = 0.0f, se = 0.0f;
    for (u32 v = threadIdx.x; v < V; v += blockDim.x) {
        const float d = smp_ld(z, v) / t - m;
        const float e = expf(d);
        if (e > 0.0f) {  // −inf logits: e = 0 and e·d must not become NaN
            zs += e;
            se += e * d;
        }
    }
    zs = block_sum(zs, sf);
    se = block_sum(se, sf);
    const float lnz = logf(zs);
    const float ent = lnz - se / zs;
    if (greedy) {
        if (threadIdx.x == 0) {
            tokens[row] = arg;
            logp[row] = (smp_ld(z, arg) / t - m) - lnz;
            logp_trunc[row] = 0.0f;
            entropy[row] = ent;
        }
        return;
    }

    // 3. top-k: the largest key with at least k keys >= it (the k-th largest s).
    u32 kth = 0;
    if (top_k < V) {
        u64 lo = 0, hi = 1ull << 32;
        while (hi - lo > 1) {
            const u64 mid = (lo + hi) >> 1;
            u32 c = 0;
            for (u32 v = threadIdx.x; v < V; v += blockDim.x) c += (u64)smp_key(smp_ld(z, v) / t) >= mid;
            c = smp_block_sum_u32(c, su);
            if (c >= top_k) lo = mid; else hi = mid;
        }
        kth = (u32)lo;
    }

    // 4. top-p over the top-k survivors: the largest threshold whose mass reaches top_p.
    u32 pth = 0;
    if (top_p < 1.0f) {
        float sk = 0.0f;
        for (u32 v = threadIdx.x; v < V; v += blockDim.x) {
            const float s = smp_ld(z, v) / t;
            if (smp_key(s) >= kth) sk += expf(s - m);
        }
        sk = block_sum(sk, sf);
        const float target = top_p * sk;
        u32 lo = 0, hi = 0x3f800001u;  // bits of 1.0 (= e at the max) + 1
        while (hi - lo > 1) {
            const u32 mid = lo + ((hi - lo) >> 1);
            float mass = 0.0f;
            for (u32 v = threadIdx.x; v < V; v += blockDim.x) {
                const float s = smp_ld(z, v) / t;
                const float e = expf(s - m);
                if (smp_key(s) >= kth && __float_as_uint(e) >= mid) mass += e;
            }
            mass = block_sum(mass, sf);
            if (mass >= target) lo = mid; else hi = mid;
        }
        pth = lo;
    }

    // 5. one draw, scanned over the survivors in vocabulary order.
    float sp = 0.0f;
    for (u32 v = threadIdx.x; v < V; v += blockDim.x) {
        const float s = smp_ld(z, v) / t;
        const float e = expf(s - m);
        if (smp_key(s) >= kth && __float_as_uint(e) >= pth) sp += e;
    }
    sp = block_sum(sp, sf);
    const float target = smp_uniform(seed, step, streams ? streams[row] : row) * sp;
    u32 tok = SMP_NONE;
    float carry = 0.0f;
    for (u32 base = 0; base < V; base += blockDim.x) {
        const u32 v = base + threadIdx.x;
        float x = 0.0f;
        if (v < V) {
            const float s = smp_ld(z, v) / t;
            const float e = expf(s - m);
            if (smp_key(s) >= kth && __float_as_uint(e) >= pth) x = e;
        }
        float total;
        const float incl = smp_block_scan(x, sf, &total);
        const u32 cand = smp_block_min_u32((x > 0.0f && carry + incl > target) ? v : SMP_NONE, su);
        if (cand != SMP_NONE) {
            tok = cand;
            break;
        }
        carry += total;
    }
    // Rounding left the scan short of the target: the argmax always survives (as on CPU).
    if (tok == SMP_NONE) tok = arg;
    if (threadIdx.x == 0) {
        const float d = smp_ld(z, tok) / t - m;
        tokens[row] = tok;
        logp[row] = d - lnz;
        logp_trunc[row] = d - logf(sp);
        entropy[row] = ent;
    }
}

// step_at: null, or where to read the step from (a replayed graph's step changes between
// replays, its arguments do not): two u32 words, low first, read as words because the caller
// packs them among u32 inputs, where they need not be 8-byte aligned (a u64 load there faults
// with "misaligned address").
__device__ __forceinline__ u64 smp_step(const u32* at) { return (u64)at[0] | ((u64)at[1] << 32); }

#define SMP_KERNEL(NAME, T, IMPL)                                                                   \
    extern "C" __global__ void __launch_bounds__(SMP_THREADS)                                         \
        NAME(const T* __restrict__ logits, u32 V, float temp, u32 top_k, float top_p, u64 seed, u64 step, \
             const u32* __restrict__ step_at, const u32* __restrict__ streams, u32* __restrict__ tokens,  \
             float* __restrict__ logp, float* __restrict__ logp_trunc, float* __restrict__ entropy) {     \
        IMPL<T>(logits, V, temp, top_k, top_p, seed, step_at ? smp_step(step_at) : step, streams, tokens, logp,    \
                logp_trunc, entropy);                                                                   \
    }
SMP_KERNEL(sample_f32, float, sample_row)
SMP_KERNEL(sample_bf16, bf16_t, sample_row)

// ---------------------------------------------------------------------------------------------
// v2: radix selection on exact integer masses. Same rules and outputs as v1, in ~5 passes over
// the row instead of ~35 plus 150 block-wide scans:
//   P1 max + first argmax (and, with top-k, the first radix round of the top-k select);
//   P2 Σe, Σe·(s − max) in f32 → log-sum-exp and entropy, exactly as v1 (and, with top-p and no
//      top-k, the first radix round of the top-p select); greedy stops here;
//   top-k: the k-th largest key by a 3-round radix select (11 + 11 + 10 bits) on 2,048 counting
//      bins in shared memory — the same key as v1's bisection, in 3 passes instead of 32;
//   top-p: τ by a 3-round radix select on the bits of e (e ∈ [0, 1], so bit order is value order)
//      with bins holding Σ q(e), q(e) = ⌊e·2⁴⁰⌋ as u64 — integer sums are exact whatever the
//      order the shared-memory atomics land in, so the result is deterministic without ordered
//      trees, and it is v1's τ up to the 2⁻⁴⁰ quantisation of each e;
//   draw: warp w owns a contiguous 1/32 of the row and sums its survivors' q (exact); thread 0
//      scans the 32 warp sums, takes U = ⌊u·Σq⌋, and the one warp whose range holds the crossing
//      walks it in 32-wide tiles with a warp scan: the token is the first survivor whose running
//      sum exceeds U. Exact integer sums cannot fall short, so there is no rounding fallback.
// Shared memory: 2,048 u64 bins (16 KiB) reused by every round.

#define SMP_BINS 2048
#define SMP_QSCALE 1099511627776.0f  // 2^40: Σq ≤ V·2^40 fits u64 for V < 2^24 (the launcher's rule)

// NaN (a row of −inf logits has m = −inf and e = NaN) converts to 0 here, not by undefined cast.
__device__ __forceinline__ u64 smp_q(float e) { return e > 0.f ? (u64)(e * SMP_QSCALE) : 0; }

__device__ __forceinline__ u64 smp_warp_sum_u64(u64 v) {
#ifdef SMELT_EMU
    return smelt_emu::butterfly(v, [](u64 a, u64 b) { return a + b; }, "smp_warp_sum_u64");
#else
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
#endif
}

__device__ __forceinline__ u64 smp_warp_scan_u64(u64 s) {
#ifdef SMELT_EMU
    return smelt_emu::scan_up(s, [](u64 a, u64 b) { return a + b; }, "smp_warp_scan_u64");
#else
    const int lane = threadIdx.x & 31;
    #pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u64 y = __shfl_up_sync(0xffffffffu, s, o);
        if (lane >= o) s += y;
    }
    return s;
#endif
}

// Radix round r (0, 1, 2) reads bits [shift, shift + width) of the 32-bit key: 11 + 11 + 10.
__device__ __forceinline__ int smp_shift(int r) { return r == 0 ? 21 : (r == 1 ? 10 : 0); }
__device__ __forceinline__ int smp_width(int r) { return r == 2 ? 10 : 11; }

__device__ __forceinline__ void smp_zero_bins(u64* bins) {
    for (u32 i = threadIdx.x; i < SMP_BINS; i += blockDim.x) bins[i] = 0;
    __syncthreads();
}

// Adds weight w to the bin of `key` in round r if the key's higher digits equal `prefix`.
__device__ __forceinline__ void smp_bin(u64* bins, int r, u32 prefix, u32 key, u64 w) {
    const int shift = smp_shift(r), width = smp_width(r);
    if (r > 0 && (key >> (shift + width)) != prefix) return;
    atomicAdd((unsigned long long*)&bins[(key >> shift) & ((1u << width) - 1u)], (unsigned long long)w);
}

// After round r's bins are complete: the largest digit d with above + Σ_{d' ≥ d} bins[d'] ≥ target
// (the selected value's digit), `above` advanced past the digits over d, and the prefix extended.
// Warp 0 does it: lane l sums a 1/32 slice of the bins, highest slice at lane 0; a warp scan finds
// the slice; that lane walks its bins from the top. Every thread returns with the new state.
__device__ void smp_select_digit(u64* bins, int r, u64 target, u64* above, u32* prefix, u64* bc) {
    __syncthreads();  // the bins are complete
    const int width = smp_width(r);
    const u32 nb = 1u << width, per = nb / 32;
    if (threadIdx.x < 32) {
        const u32 lane = threadIdx.x;
        const u32 hi = nb - per * lane;  // this lane's bins are [hi − per, hi)
        u64 sum = 0;
        for (u32 d = hi - per; d < hi; ++d) sum += bins[d];
        const u64 incl = smp_warp_scan_u64(sum);
        const u64 a = *above;
        const u32 first = smp_warp_min_u32(a + incl >= target ? lane : SMP_NONE);
        const u32 pick = first == SMP_NONE ? 31 : first;  // cannot happen: the total reaches target
        if (lane == pick) {
            u64 cum = a + (incl - sum);
            u32 digit = hi - per;
            for (u32 d = hi; d-- > hi - per;) {
                if (cum + bins[d] >= target) {
                    digit = d;
                    break;
                }
                cum += bins[d];
            }
            bc[0] = cum;
            bc[1] = digit;
        }
    }
    __syncthreads();
    *above = bc[0];
    *prefix = (*prefix << width) | (u32)bc[1];
    __syncthreads();  // bc and the bins are free for the next round
}

// q of token v if it survives top-k (key ≥ kth) and top-p (bits of e ≥ pth), else 0.
template <typename T>
__device__ __forceinline__ u64 smp_survivor_q(const T* z, u32 v, float t, float m, u32 kth, u32 pth) {
    const float s = smp_ld(z, v) / t;
    if (smp_key(s) < kth) return 0;
    const float e = expf(s - m);
    return __float_as_uint(e) >= pth ? smp_q(e) : 0;
}

// Top-p round r: token v's q into the bin of its e's bits, if it survives top-k.
template <typename T>
__device__ __forceinline__ void smp_topp_bin(u64* bins, int r, u32 prefix, const T* z, u32 v, float t, float m,
                                             u32 kth) {
    const float s = smp_ld(z, v) / t;
    if (smp_key(s) < kth) return;
    const float e = expf(s - m);
    const u64 q = smp_q(e);
    if (q) smp_bin(bins, r, prefix, __float_as_uint(e), q);
}

template <typename T>
__device__ __forceinline__ void sample_row_v2(const T* __restrict__ logits, u32 V, float temp, u32 top_k,
                                              float top_p, u64 seed, u64 step, const u32* __restrict__ streams,
                                           u32* __restrict__ tokens,
                                              float* __restrict__ logp, float* __restrict__ logp_trunc,
                                              float* __restrict__ entropy) {
    __shared__ u64 bins[SMP_BINS];
    __shared__ u64 bc[3];
    __shared__ u64 wsum[32];
    __shared__ float sf[32];
    __shared__ u32 su[32];
    const u32 row = blockIdx.x;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const T* z = logits + (u64)row * V;
    const bool greedy = temp == 0.0f;
    const float t = greedy ? 1.0f : temp;
    const bool use_k = !greedy && top_k < V;
    const bool use_p = !greedy && top_p < 1.0f;

    // P1: max and first argmax of s; the first top-k round.
    if (use_k) smp_zero_bins(bins);
    float m = -SMELT_INF;
    u32 arg = SMP_NONE;
    for (u32 v = threadIdx.x; v < V; v += blockDim.x) {
        const float s = smp_ld(z, v) / t;
        if (s > m) {
            m = s;
            arg = v;
        }
        if (use_k) smp_bin(bins, 0, 0, smp_key(s), 1);
    }
    smp_block_argmax(m, arg, sf, su);
    if (arg == SMP_NONE) arg = 0;

    // top-k: the largest key with at least k keys ≥ it.
    u32 kth = 0;
    if (use_k) {
        u64 above = 0;
        smp_select_digit(bins, 0, top_k, &above, &kth, bc);
        for (int r = 1; r < 3; ++r) {
            smp_zero_bins(bins);
            for (u32 v = threadIdx.x; v < V; v += blockDim.x) smp_bin(bins, r, kth, smp_key(smp_ld(z, v) / t), 1);
            smp_select_digit(bins, r, top_k, &above, &kth, bc);
        }
    }

    // P2: log-sum-exp and entropy of the full tempered distribution (as v1); the first top-p
    // round too when every token survives top-k.
    const bool p_in_p2 = use_p && !use_k;
    if (p_in_p2) smp_zero_bins(bins);
    float zs = 0.0f, se = 0.0f;
    for (u32 v = threadIdx.x; v < V; v += blockDim.x) {
        const float d = smp_ld(z, v) / t - m;
        const float e = expf(d);
        if (e > 0.0f) {  // −inf logits: e = 0 and e·d must not become NaN
            zs += e;
            se += e * d;
            if (p_in_p2) {
                const u64 q = smp_q(e);
                if (q) smp_bin(bins, 0, 0, __float_as_uint(e), q);
            }
        }
    }
    zs = block_sum(zs, sf);
    se = block_sum(se, sf);
    const float lnz = logf(zs);
    const float ent = lnz - se / zs;
    if (greedy) {
        if (threadIdx.x == 0) {
            tokens[row] = arg;
            logp[row] = (smp_ld(z, arg) / t - m) - lnz;
            logp_trunc[row] = 0.0f;
            entropy[row] = ent;
        }
        return;
    }

    // top-p over the top-k survivors: the largest e-threshold whose mass reaches top_p of theirs.
    u32 pth = 0;
    if (use_p) {
        if (!p_in_p2) {
            smp_zero_bins(bins);
            for (u32 v = threadIdx.x; v < V; v += blockDim.x) smp_topp_bin(bins, 0, 0, z, v, t, m, kth);
        }
        // The survivors' mass is the sum of the first round's bins.
        __syncthreads();
        u64 part = 0;
        for (u32 i = threadIdx.x; i < SMP_BINS; i += blockDim.x) part += bins[i];
        part = smp_warp_sum_u64(part);
        if (lane == 0) wsum[warp] = part;
        __syncthreads();
        u64 total = 0;
        for (u32 w = 0; w < nwarps; ++w) total += wsum[w];
        const u64 target = (u64)ceil((double)top_p * (double)total);
        u64 above = 0;
        smp_select_digit(bins, 0, target, &above, &pth, bc);
        for (int r = 1; r < 3; ++r) {
            smp_zero_bins(bins);
            for (u32 v = threadIdx.x; v < V; v += blockDim.x) smp_topp_bin(bins, r, pth, z, v, t, m, kth);
            smp_select_digit(bins, r, target, &above, &pth, bc);
        }
    }

    // Draw: warp sums over contiguous ranges, then one warp walks the range holding U.
    const u32 span = (V + 32 * nwarps - 1) / (32 * nwarps) * 32;
    const u32 lo = min(warp * span, V), hi = min(lo + span, V);
    u64 part = 0;
    for (u32 v = lo + lane; v < hi; v += 32) part += smp_survivor_q(z, v, t, m, kth, pth);
    part = smp_warp_sum_u64(part);
    __syncthreads();  // every thread has read wsum (top-p)
    if (lane == 0) wsum[warp] = part;
    __syncthreads();
    if (threadIdx.x == 0) {
        u64 total = 0;
        for (u32 w = 0; w < nwarps; ++w) total += wsum[w];
        // U = ⌊u·total⌋ with u = h/2^24, exactly (total < 2^58, so split it to stay in 64 bits).
        const u64 h = smp_hash24(seed, step, streams ? streams[row] : row);
        const u64 target = (total >> 24) * h + (((total & 0xffffffull) * h) >> 24);
        u64 before = 0;
        u32 w = 0;
        while (w + 1 < nwarps && before + wsum[w] <= target) before += wsum[w++];
        bc[0] = before;
        bc[1] = w;
        bc[2] = target;
        wsum[0] = total;  // read back below for logp_truncated
    }
    __syncthreads();
    if (warp == (u32)bc[1]) {
        const u64 target = bc[2];
        u64 carry = bc[0];
        u32 tok = SMP_NONE;
        for (u32 base = lo; base < hi; base += 32) {
            const u32 v = base + lane;
            const u64 x = v < hi ? smp_survivor_q(z, v, t, m, kth, pth) : 0;
            const u64 incl = smp_warp_scan_u64(x);
            const u32 cand = smp_warp_min_u32((x > 0 && carry + incl > target) ? v : SMP_NONE);
            if (cand != SMP_NONE) {
                tok = cand;
                break;
            }
            carry += __shfl_sync(0xffffffffu, incl, 31);
        }
        if (tok == SMP_NONE) tok = arg;  // unreachable: exact sums reach every U < total
        if (lane == 0) {
            const float d = smp_ld(z, tok) / t - m;
            tokens[row] = tok;
            logp[row] = d - lnz;
            // ln(total·2^-40)
            logp_trunc[row] = d - (float)(log((double)wsum[0]) - 40.0 * 0.69314718055994530942);
            entropy[row] = ent;
        }
    }
}

SMP_KERNEL(sample_v2_f32, float, sample_row_v2)
SMP_KERNEL(sample_v2_bf16, bf16_t, sample_row_v2)
