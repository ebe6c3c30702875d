// sample.cu — next-token selection per row of logits: greedy argmax, or temperature + top-k +
// top-p sampling with one uniform draw per row (rules and outputs: kernels/src/sample.rs, whose
// `cpu::sample_row` is the reference).
//
// Layout: logits [B, V] row-major (f32 or bf16 storage, f32 math); outputs tokens u32 [B],
// logp / logp_trunc / entropy f32 [B].
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
// The uniform u comes from the same SplitMix64 chain as `row_uniform` in sample.rs.
// Versions:
//   v1 one block per row, bisection thresholds over full-row passes (current)

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

__device__ __forceinline__ float smp_uniform(u64 seed, u64 step, u64 row) {
    const u64 h = smp_next(smp_next(smp_next(seed) ^ step) ^ row);
    return (float)(h >> 40) * (1.0f / 16777216.0f);
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
                                           float top_p, u64 seed, u64 step, u32* __restrict__ tokens,
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
    const float target = smp_uniform(seed, step, row) * sp;
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

extern "C" __global__ void __launch_bounds__(SMP_THREADS)
sample_f32(const float* __restrict__ logits, u32 V, float temp, u32 top_k, float top_p, u64 seed,
           u64 step, u32* __restrict__ tokens, float* __restrict__ logp, float* __restrict__ logp_trunc,
           float* __restrict__ entropy) {
    sample_row<float>(logits, V, temp, top_k, top_p, seed, step, tokens, logp, logp_trunc, entropy);
}

extern "C" __global__ void __launch_bounds__(SMP_THREADS)
sample_bf16(const bf16_t* __restrict__ logits, u32 V, float temp, u32 top_k, float top_p, u64 seed,
            u64 step, u32* __restrict__ tokens, float* __restrict__ logp, float* __restrict__ logp_trunc,
            float* __restrict__ entropy) {
    sample_row<bf16_t>(logits, V, temp, top_k, top_p, seed, step, tokens, logp, logp_trunc, entropy);
}
