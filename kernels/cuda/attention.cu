// attention.cu — causal grouped-query attention over packed variable-length sequences:
// forward (saves the row log-sum-exp), FlashAttention-2 backward, decode against a KV cache.
//
// Layout (row-major, no padding tokens):
//   q, o, dq, dO: [T, n_heads, D]; k, v, dk, dv: [T, n_kv_heads, D]; lse, delta: [n_heads, T] f32.
//   cu: u32[B+1] cumulative sequence offsets. Query head h reads KV head h / (n_heads/n_kv_heads).
//   KV cache: [n_slots, max_len, n_kv_heads, D]; decode batch row b uses slot slots[b] (slot b
//   when slots is null); cache_lens[b] counts that slot's valid rows including the n_new new
//   tokens, the last n_new of which are the queries.
//   Element type T: float or bf16_t (bf16 storage, f32 accumulation). D (head_dim): 8, 16, 24,
//   32, 64 or 128 (v2 forward: 64 and 128). Where lanes split D, a D that is not a multiple of 32
//   leaves the last lanes idle (att_in: compile-time true for 64 and 128).
// Scores are kept in log2 units (q·k·scale·log2 e) so exponentials are exp2f; lse is stored in
// natural-log units.
//
// Work mapping:
//   fwd v1 (attn_fwd_v1_*): 4 warps per block, one warp per (query row, head); lanes split D;
//     online softmax over every visible key, one key at a time. grid (ceil(T/4), n_heads).
//   fwd v2 (attn_fwd_v2_bf16_*): one block of 4 warps per (64-row query tile of one sequence,
//     head); each warp owns 16 query rows (Q fragments in registers) and streams 64-key K/V
//     tiles through shared memory, S = Q·Kᵀ and O += P·V with mma.sync m16n8k16 bf16 → f32.
//     The host passes the (sequence, tile start) list, heaviest (latest) tiles first.
//     Budget per block: 128 threads; smem 2·64·(D+8)·2 B = 34,816 B (D=128) / 18,432 B (D=64)
//     static; registers ≈ 4·D/8 O + D/4 Q-fragment + 32 S per thread.
//   fwd v3 (attn_fwd_v3_bf16_*): v2's mapping with MT m-tiles per warp (MT = 2 at D=64: 128-row
//     query tiles, 32 rows per warp; MT = 1 at D=128), K and V tiles staged by cp.async (V(j)
//     lands during S(j) and the softmax, K(j+1) during P·V(j)), B fragments by ldmatrix(.trans).
//     Budget per block: 128 threads; smem as v2 (one K and one V tile); registers (sm_90) 255
//     with 4 B spilled at D=64, 230 at D=128.
//   fwd v4 (attn_fwd_v4_bf16_d64): v3 with MT = 1 at D=64 (v2's 64-row tiles, 16 rows per warp):
//     v3's staging at v2's 128 registers, no spill (sm_80 and sm_90). D=64 only.
//   bwd: delta kernel (one warp per (row, head): D = rowsum(dO∘O)); dK/dV kernel: one block per
//     (32-key tile, KV head), K/V tile in smem, loops over the group's query heads and the query
//     rows ≥ tile start in steps of 8, recomputing P from lse; dQ kernel: one block per (8-row
//     query tile, head), loops over key tiles of 32. No atomics (deterministic); f32 FMA.
//     Budget per block: 128 threads; smem 2·32·(D+1)·4 + 2·8·D·4 + 2·8·32·4 + 64 B
//     = 43,328 B (D=128) / 22,848 B (D=64) static.
//   bwd v2 (attn_bwd_{dkdv,dq}_v2_bf16_*): the same two passes on mma.sync. dK/dV: one block of
//     4 warps per (64-key tile, KV head), each warp owns 16 keys (K, V fragments in registers)
//     and streams BQ-row Q/dO tiles (BQ 64 at D=64, 32 at D=128; smem 2·BQ·(D+8)·2 B) of every
//     query head of the group. dQ: one block per (64-row query tile, head), 16 rows per warp
//     (Q, dO fragments in registers), 64-key K/V tiles in smem (2·64·(D+8)·2 B). The delta
//     kernel is v1's.
//   bwd v3 (attn_bwd_{dkdv,dq}_v3_bf16_*): v2's blocks and tiles; dK/dV double-buffers the Q,
//     dO, lse and delta tiles of its flat (query head, query tile) sequence with cp.async (smem
//     2·2·BQ·(D+8)·2 + 4·BQ·4 B = 37,888 B at D=64, 35,328 B at D=128); dQ stages V(j) then
//     K(j) (single buffers, as the v3 forward). B fragments by ldmatrix(.trans). Registers
//     (sm_90): dK/dV 248 / 255 (36 B spilled at D=128), dQ 221 / 255 (36 B spilled at D=128).
//   bwd v4 (attn_bwd_dkdv_v4_bf16_*): v3, with the query heads of a KV group split over
//     `parts` blocks per (key tile, KV head) when those blocks alone would not fill the GPU
//     (Qwen2.5-0.5B at 8 × 1024 tokens: 256 blocks of 7 heads each for 264 block slots on an
//     H100, and the first key tile of each sequence does 16× the last's work). Each part writes
//     f32 partial dK/dV ([parts, T, n_kv_heads, D]); attn_bwd_dkdv_reduce_bf16 sums them in a
//     fixed order (deterministic). A 1-D grid over (key tile, KV head, part), part fastest and
//     key tiles heaviest first, so the long blocks start in the first wave. dQ and delta are v3's.
//   decode: split-K (flash-decoding). attn_decode_partial: one block (4 warps) per (split of the
//     cache length, head, batch row × group of ≤4 new tokens); warps take keys round-robin,
//     lanes split D; the 4 warps merge in smem (4·4·D·4 B ≤ 8 KiB) and write an unnormalised
//     partial (m, l, acc[D]). attn_decode_combine: one block of D threads per (row, head)
//     merges the splits. kv_cache_append: grid-stride copy of new rows into the cache.
//   decode v2: one block (4 warps) per (split, KV head, batch row × group of new tokens), all
//     query heads of the KV group together (≤ 8 rows), so each K/V row is read once instead of
//     once per query head; a warp takes 32 keys, lane j scores key j for every row from a
//     whole K row (16-byte loads), then lanes split D over the 32 V rows. Splits are multiples
//     of 128 keys. smem (8·D + 4·8·32 + 4·8·D)·4 B + 256 B = 24.8 KiB (D=128) static.
//   decode v3 (bf16): v2's blocks, with each lane's slice of the warp's 32 V rows loaded into
//     registers (32·D/64 words) before the scores, so a warp has all 64 K/V rows in flight at
//     once. Registers (sm_90) 144 at D=64, 168 at D=128 (48 B spilled).
// Versions:
//   fwd v1 naive warp-per-row, f32 and bf16 (correctness baseline)
//   fwd v2 flash-tiled, mma.sync bf16 tensor cores, 64×64 tiles (bf16 only; f32 runs v1)
//   fwd v3 v2 + cp.async staging overlapped with compute, ldmatrix operands, 32 rows per warp at
//     D=64 (bf16, D 64/128)
//   fwd v4 v3 with 16 rows per warp at D=64 (bf16, D 64 only)
//   bwd v1 tiled FMA, two passes (dK/dV per KV tile, then dQ per Q tile), f32 and bf16
//   bwd v2 the same passes on mma.sync bf16 tensor cores, 64-row tiles (bf16, D 64/128 only)
//   bwd v3 v2 + cp.async staging overlapped with compute (double-buffered in dK/dV), ldmatrix
//     operands (bf16, D 64/128)
//   bwd v4 v3 with a KV group's query heads split over blocks in dK/dV, f32 partials summed by a
//     second kernel (bf16, D 64/128)
//   decode v1 split-K partial + combine, f32 and bf16
//   decode v2 the same split-K with a KV group per block, key-parallel scores (D 64/128, ≤ 8
//     query heads per KV head; others run v1)
//   decode v3 v2 with the V rows loaded together with the K rows (bf16 only)

// Instantiates kernel family M for every head dim the launchers accept (CUDA_HEAD_DIMS in
// kernels/src/attention/cuda.rs): M(<dtype>_d<D>, T, D).
#define ATT_FOR_EACH_DIM(M, T, SUF) \
    M(SUF##_d8, T, 8) M(SUF##_d16, T, 16) M(SUF##_d24, T, 24) M(SUF##_d32, T, 32) M(SUF##_d64, T, 64) M(SUF##_d128, T, 128)

// A comma inside a macro argument (template argument lists passed through ATT_BWD_TC).
#define COMMA ,

#define ATT_LOG2E 1.4426950408889634f
#define ATT_LN2 0.6931471805599453f

// Whether element `i` of a row of D exists (lanes split D in steps of 32).
template <int D> __device__ __forceinline__ bool att_in(int i) { return D % 32 == 0 || i < D; }

__device__ __forceinline__ float att_ld(const float* p) { return *p; }
__device__ __forceinline__ float att_ld(const bf16_t* p) { return bf16_to_f32(*p); }
__device__ __forceinline__ void att_st(float* p, float v) { *p = v; }
__device__ __forceinline__ void att_st(bf16_t* p, float v) { *p = f32_to_bf16(v); }

// Index of the sequence holding token t: the b with cu[b] <= t < cu[b+1].
__device__ __forceinline__ int att_seq_of(const u32* cu, int nseq, u32 t) {
    int lo = 0, hi = nseq;
    while (hi - lo > 1) {
        int mid = (lo + hi) >> 1;
        if (cu[mid] <= t) lo = mid; else hi = mid;
    }
    return lo;
}

// ---------------------------------------------------------------- forward v1 (naive)
template <typename T, int D>
__device__ void attn_fwd_v1(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            const u32* __restrict__ cu, int nseq, int ntok, int nh, int nkv, float scale,
                            T* __restrict__ o, float* __restrict__ lse) {
    constexpr int E = (D + 31) / 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = blockIdx.x * 4 + warp;
    const int h = blockIdx.y;
    if (t >= ntok) return;  // warp-uniform; no block-wide sync below
    const int g = h / (nh / nkv);
    const int start = (int)cu[att_seq_of(cu, nseq, (u32)t)];
    const float sl2 = scale * ATT_LOG2E;
    float qf[E], acc[E];
    const T* qr = q + ((size_t)t * nh + h) * D;
    #pragma unroll
    for (int e = 0; e < E; ++e) { qf[e] = att_in<D>(lane + 32 * e) ? att_ld(qr + lane + 32 * e) * sl2 : 0.f; acc[e] = 0.f; }
    float m = -SMELT_INF, l = 0.f;
    for (int j = start; j <= t; ++j) {
        const T* kr = k + ((size_t)j * nkv + g) * D;
        const T* vr = v + ((size_t)j * nkv + g) * D;
        float s = 0.f;
        #pragma unroll
        for (int e = 0; e < E; ++e) s += att_in<D>(lane + 32 * e) ? qf[e] * att_ld(kr + lane + 32 * e) : 0.f;
        s = warp_sum(s);
        float mn = fmaxf(m, s);
        float alpha = exp2f(m - mn), p = exp2f(s - mn);
        l = l * alpha + p;
        #pragma unroll
        for (int e = 0; e < E; ++e)
            if (att_in<D>(lane + 32 * e)) acc[e] = acc[e] * alpha + p * att_ld(vr + lane + 32 * e);
        m = mn;
    }
    const float inv = 1.f / l;
    T* orow = o + ((size_t)t * nh + h) * D;
    #pragma unroll
    for (int e = 0; e < E; ++e)
        if (att_in<D>(lane + 32 * e)) att_st(orow + lane + 32 * e, acc[e] * inv);
    if (lane == 0) lse[(size_t)h * ntok + t] = (m + log2f(l)) * ATT_LN2;
}

#define ATT_FWD_V1(SUF, T, D)                                                                           \
    extern "C" __global__ void __launch_bounds__(128) attn_fwd_v1_##SUF(                                \
        const T* q, const T* k, const T* v, const u32* cu, int nseq, int ntok, int nh, int nkv,         \
        float scale, T* o, float* lse) {                                                                \
        attn_fwd_v1<T, D>(q, k, v, cu, nseq, ntok, nh, nkv, scale, o, lse);                             \
    }
ATT_FOR_EACH_DIM(ATT_FWD_V1, float, f32)
ATT_FOR_EACH_DIM(ATT_FWD_V1, bf16_t, bf16)

// ---------------------------------------------------------------- forward v2 (mma.sync bf16)
__device__ __forceinline__ u32 att_pack_bf16(float lo, float hi) {
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
}

// mma.m16n8k16 fragments (lane = 4·gid + tig): A regs {row gid | gid+8} × {cols 2tig,2tig+1 |
// +8}; B regs: k = 2tig,2tig+1 (+8), n = gid; C: rows gid / gid+8, cols 2tig, 2tig+1.
template <int D>
__device__ void attn_fwd_v2(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                            const bf16_t* __restrict__ v, const u32* __restrict__ tiles,
                            const u32* __restrict__ cu, int ntok, int nh, int nkv, float scale,
                            bf16_t* __restrict__ o, float* __restrict__ lse) {
    constexpr int BR = 64, BC = 64, KS = D + 8;  // KS: padded smem row (bank-conflict free)
    constexpr int NT = BC / 8;                   // n-tiles of S per warp
    constexpr int DT = D / 8;                    // n-tiles of O per warp
    constexpr int KC = D / 16;                   // k-chunks of Q·Kᵀ
    __shared__ __align__(16) bf16_t Ks[BC * KS];
    __shared__ __align__(16) bf16_t Vs[BC * KS];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int b = (int)tiles[2 * blockIdx.x], r0 = (int)tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y, g = h / (nh / nkv);
    const int s0 = (int)cu[b], len = (int)cu[b + 1] - s0;
    const int ra = r0 + warp * 16 + gid, rb = ra + 8;  // this thread's two query rows
    const float sl2 = scale * ATT_LOG2E;

    u32 qa[KC][4];
    {
        const u32 zero = 0u;
        const u32* qra = (const u32*)(q + ((size_t)(s0 + ra) * nh + h) * D);
        const u32* qrb = (const u32*)(q + ((size_t)(s0 + rb) * nh + h) * D);
        #pragma unroll
        for (int kc = 0; kc < KC; ++kc) {
            qa[kc][0] = ra < len ? qra[kc * 8 + tig] : zero;
            qa[kc][1] = rb < len ? qrb[kc * 8 + tig] : zero;
            qa[kc][2] = ra < len ? qra[kc * 8 + 4 + tig] : zero;
            qa[kc][3] = rb < len ? qrb[kc * 8 + 4 + tig] : zero;
        }
    }
    float acc[DT][4];
    #pragma unroll
    for (int dt = 0; dt < DT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
    float ma = -SMELT_INF, mb = -SMELT_INF, la = 0.f, lb = 0.f;  // l: this thread's partial sums

    const int kmax = min(len, r0 + BR);
    for (int kt = 0; kt < kmax; kt += BC) {
        __syncthreads();  // previous tile fully consumed
        constexpr int CH = BC * D / 8;  // 16-byte chunks per tile
        for (int c = tid; c < CH; c += 128) {
            const int r = c / (D / 8), col = (c % (D / 8)) * 8;
            uint4 kv4 = make_uint4(0u, 0u, 0u, 0u), vv4 = make_uint4(0u, 0u, 0u, 0u);
            if (kt + r < len) {
                const size_t off = ((size_t)(s0 + kt + r) * nkv + g) * D + col;
                kv4 = *(const uint4*)(k + off);
                vv4 = *(const uint4*)(v + off);
            }
            *(uint4*)(Ks + r * KS + col) = kv4;
            *(uint4*)(Vs + r * KS + col) = vv4;
        }
        __syncthreads();

        float sc[NT][4];
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
            const bf16_t* kr = Ks + (nt * 8 + gid) * KS + tig * 2;
            #pragma unroll
            for (int kc = 0; kc < KC; ++kc) {
                const u32 b0 = *(const u32*)(kr + kc * 16);
                const u32 b1 = *(const u32*)(kr + kc * 16 + 8);
                mma_bf16_16816(sc[nt], qa[kc], b0, b1);
            }
        }
        // Scale, causal and sequence-end mask, row max over the quad.
        float mxa = -SMELT_INF, mxb = -SMELT_INF;
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = kt + nt * 8 + tig * 2 + (e & 1);
                const int row = e < 2 ? ra : rb;
                float x = sc[nt][e] * sl2;
                if (key > row || key >= len) x = -SMELT_INF;
                sc[nt][e] = x;
                if (e < 2) mxa = fmaxf(mxa, x); else mxb = fmaxf(mxb, x);
            }
        }
        #pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, off));
            mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, off));
        }
        const float mna = fmaxf(ma, mxa), mnb = fmaxf(mb, mxb);
        const float ua = mna == -SMELT_INF ? 0.f : mna, ub = mnb == -SMELT_INF ? 0.f : mnb;
        const float alpha_a = exp2f(ma - ua), alpha_b = exp2f(mb - ub);
        ma = mna; mb = mnb;
        la *= alpha_a; lb *= alpha_b;
        #pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            acc[dt][0] *= alpha_a; acc[dt][1] *= alpha_a;
            acc[dt][2] *= alpha_b; acc[dt][3] *= alpha_b;
        }
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            sc[nt][0] = exp2f(sc[nt][0] - ua); sc[nt][1] = exp2f(sc[nt][1] - ua);
            sc[nt][2] = exp2f(sc[nt][2] - ub); sc[nt][3] = exp2f(sc[nt][3] - ub);
            la += sc[nt][0] + sc[nt][1];
            lb += sc[nt][2] + sc[nt][3];
        }
        // O += P·V: two S n-tiles form one A fragment (k = 16 keys).
        #pragma unroll
        for (int kc = 0; kc < BC / 16; ++kc) {
            u32 pa[4];
            pa[0] = att_pack_bf16(sc[2 * kc][0], sc[2 * kc][1]);
            pa[1] = att_pack_bf16(sc[2 * kc][2], sc[2 * kc][3]);
            pa[2] = att_pack_bf16(sc[2 * kc + 1][0], sc[2 * kc + 1][1]);
            pa[3] = att_pack_bf16(sc[2 * kc + 1][2], sc[2 * kc + 1][3]);
            const bf16_t* v0 = Vs + (kc * 16 + tig * 2) * KS + gid;
            #pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                const bf16_t* vp = v0 + dt * 8;
                const u32 b0 = (u32)vp[0] | ((u32)vp[KS] << 16);
                const u32 b1 = (u32)vp[8 * KS] | ((u32)vp[9 * KS] << 16);
                mma_bf16_16816(acc[dt], pa, b0, b1);
            }
        }
    }
    #pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        la += __shfl_xor_sync(0xffffffffu, la, off);
        lb += __shfl_xor_sync(0xffffffffu, lb, off);
    }
    const float ia = 1.f / la, ib = 1.f / lb;
    if (ra < len) {
        u32* orow = (u32*)(o + ((size_t)(s0 + ra) * nh + h) * D);
        #pragma unroll
        for (int dt = 0; dt < DT; ++dt) orow[dt * 4 + tig] = att_pack_bf16(acc[dt][0] * ia, acc[dt][1] * ia);
        if (tig == 0) lse[(size_t)h * ntok + s0 + ra] = (ma + log2f(la)) * ATT_LN2;
    }
    if (rb < len) {
        u32* orow = (u32*)(o + ((size_t)(s0 + rb) * nh + h) * D);
        #pragma unroll
        for (int dt = 0; dt < DT; ++dt) orow[dt * 4 + tig] = att_pack_bf16(acc[dt][2] * ib, acc[dt][3] * ib);
        if (tig == 0) lse[(size_t)h * ntok + s0 + rb] = (mb + log2f(lb)) * ATT_LN2;
    }
}

// Forward tensor-core kernel of version V (2, 3, 4) at head dim D, running device function F;
// the rest are F's template arguments.
#define ATT_FWD_TC(V, F, D, ...)                                                                        \
    extern "C" __global__ void __launch_bounds__(128) attn_fwd_v##V##_bf16_d##D(                        \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const u32* tiles, const u32* cu, int ntok,   \
        int nh, int nkv, float scale, bf16_t* o, float* lse) {                                          \
        F<__VA_ARGS__>(q, k, v, tiles, cu, ntok, nh, nkv, scale, o, lse);                               \
    }
ATT_FWD_TC(2, attn_fwd_v2, 64, 64)
ATT_FWD_TC(2, attn_fwd_v2, 128, 128)

// ---------------------------------------------------------------- backward v1 (tiled FMA)
// delta[h, t] = Σ_d dO[t,h,d]·O[t,h,d]; one warp per (t, h).
template <typename T, int D>
__device__ void attn_bwd_delta(const T* __restrict__ o, const T* __restrict__ d_o, int ntok, int nh,
                               float* __restrict__ delta) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * 4 + (threadIdx.x >> 5);
    if (row >= (long long)ntok * nh) return;
    const T* a = o + row * D;
    const T* b = d_o + row * D;
    float s = 0.f;
    #pragma unroll
    for (int e = 0; e < (D + 31) / 32; ++e)
        if (att_in<D>(lane + 32 * e)) s += att_ld(a + lane + 32 * e) * att_ld(b + lane + 32 * e);
    s = warp_sum(s);
    const int t = (int)(row / nh), h = (int)(row % nh);
    if (lane == 0) delta[(size_t)h * ntok + t] = s;
}

#define BWD_BK 32  // keys per tile
#define BWD_BQ 8   // query rows per step

// Shared tiles of the two backward kernels.
template <int D>
struct AttBwdSmem {
    float K[BWD_BK][D + 1];  // +1: rows read by the 32 lanes at one d fall in distinct banks
    float V[BWD_BK][D + 1];
    float Q[BWD_BQ][D];
    float dO[BWD_BQ][D];
    float P[BWD_BQ][BWD_BK];
    float dS[BWD_BQ][BWD_BK];
    float lse[BWD_BQ];
    float del[BWD_BQ];
};

// Loads BWD_BQ query rows i0.. (relative to the sequence at s0) of head h into smem.
template <typename T, int D>
__device__ __forceinline__ void att_bwd_load_q(AttBwdSmem<D>& sm, const T* q, const T* d_o, const float* lse,
                                               const float* delta, int s0, int len, int i0, int h, int nh,
                                               int ntok) {
    for (int c = threadIdx.x; c < BWD_BQ * D; c += blockDim.x) {
        const int r = c / D, d = c % D, i = i0 + r;
        const size_t off = ((size_t)(s0 + i) * nh + h) * D + d;
        sm.Q[r][d] = i < len ? att_ld(q + off) : 0.f;
        sm.dO[r][d] = i < len ? att_ld(d_o + off) : 0.f;
    }
    if (threadIdx.x < BWD_BQ) {
        const int i = i0 + threadIdx.x;
        sm.lse[threadIdx.x] = i < len ? lse[(size_t)h * ntok + s0 + i] : 0.f;
        sm.del[threadIdx.x] = i < len ? delta[(size_t)h * ntok + s0 + i] : 0.f;
    }
}

template <typename T, int D>
__device__ __forceinline__ void att_bwd_load_kv(AttBwdSmem<D>& sm, const T* k, const T* v, int s0, int len, int c0,
                                                int g, int nkv) {
    for (int c = threadIdx.x; c < BWD_BK * D; c += blockDim.x) {
        const int r = c / D, d = c % D, j = c0 + r;
        const size_t off = ((size_t)(s0 + j) * nkv + g) * D + d;
        sm.K[r][d] = j < len ? att_ld(k + off) : 0.f;
        sm.V[r][d] = j < len ? att_ld(v + off) : 0.f;
    }
}

// P and dS for the BWD_BQ × BWD_BK pairs (query rows i0.., keys c0..); 128 threads, 2 pairs each.
template <int D>
__device__ __forceinline__ void att_bwd_pairs(AttBwdSmem<D>& sm, int len, int i0, int c0, float scale) {
    for (int p = threadIdx.x; p < BWD_BQ * BWD_BK; p += blockDim.x) {
        const int r = p / BWD_BK, j = p % BWD_BK;
        const int i = i0 + r, key = c0 + j;
        float s = 0.f, dp = 0.f;
        #pragma unroll 8
        for (int d = 0; d < D; ++d) {
            s += sm.Q[r][d] * sm.K[j][d];
            dp += sm.dO[r][d] * sm.V[j][d];
        }
        const bool valid = i < len && key < len && key <= i;
        const float pr = valid ? expf(scale * s - sm.lse[r]) : 0.f;
        sm.P[r][j] = pr;
        sm.dS[r][j] = pr * (dp - sm.del[r]);
    }
}

// dK, dV for one (32-key tile, KV head): grid (n_key_tiles, n_kv_heads), 128 threads.
template <typename T, int D>
__device__ void attn_bwd_dkdv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                              const T* __restrict__ d_o, const float* __restrict__ lse,
                              const float* __restrict__ delta, const u32* __restrict__ tiles,
                              const u32* __restrict__ cu, int ntok, int nh, int nkv, float scale,
                              T* __restrict__ dk, T* __restrict__ dv) {
    __shared__ AttBwdSmem<D> sm;
    constexpr int JS = 128 / D;                    // key rows sharing one column d across the block
    constexpr int NJ = (BWD_BK + JS - 1) / JS;     // keys per thread (the last may be past the tile)
    const int b = (int)tiles[2 * blockIdx.x], c0 = (int)tiles[2 * blockIdx.x + 1];
    const int g = blockIdx.y, rep = nh / nkv;
    const int s0 = (int)cu[b], len = (int)cu[b + 1] - s0;
    const int d = threadIdx.x % D, j0 = threadIdx.x / D;
    const bool active = j0 < JS;  // 128 % D threads are idle when D does not divide 128
    float adk[NJ], adv[NJ];
    #pragma unroll
    for (int e = 0; e < NJ; ++e) adk[e] = adv[e] = 0.f;
    att_bwd_load_kv<T, D>(sm, k, v, s0, len, c0, g, nkv);
    for (int hh = 0; hh < rep; ++hh) {
        const int h = g * rep + hh;
        for (int i0 = c0; i0 < len; i0 += BWD_BQ) {
            __syncthreads();  // previous step's Q/dO/P/dS consumed (and K/V loaded)
            att_bwd_load_q<T, D>(sm, q, d_o, lse, delta, s0, len, i0, h, nh, ntok);
            __syncthreads();
            att_bwd_pairs<D>(sm, len, i0, c0, scale);
            __syncthreads();
            #pragma unroll
            for (int e = 0; e < NJ; ++e) {
                const int j = j0 + JS * e;
                if (!active || j >= BWD_BK) continue;
                #pragma unroll
                for (int r = 0; r < BWD_BQ; ++r) {
                    adv[e] += sm.P[r][j] * sm.dO[r][d];
                    adk[e] += sm.dS[r][j] * sm.Q[r][d];
                }
            }
        }
    }
    #pragma unroll
    for (int e = 0; e < NJ; ++e) {
        const int j = c0 + j0 + JS * e;
        if (active && j0 + JS * e < BWD_BK && j < len) {
            const size_t off = ((size_t)(s0 + j) * nkv + g) * D + d;
            att_st(dk + off, adk[e] * scale);
            att_st(dv + off, adv[e]);
        }
    }
}

// dQ for one (8-row query tile, head): grid (n_query_tiles, n_heads), 128 threads.
template <typename T, int D>
__device__ void attn_bwd_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            const T* __restrict__ d_o, const float* __restrict__ lse,
                            const float* __restrict__ delta, const u32* __restrict__ tiles,
                            const u32* __restrict__ cu, int ntok, int nh, int nkv, float scale,
                            T* __restrict__ dq) {
    __shared__ AttBwdSmem<D> sm;
    constexpr int RS = 128 / D;                    // query rows sharing one column d across the block
    constexpr int NR = (BWD_BQ + RS - 1) / RS;     // rows per thread (the last may be past the tile)
    const int b = (int)tiles[2 * blockIdx.x], i0 = (int)tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y, g = h / (nh / nkv);
    const int s0 = (int)cu[b], len = (int)cu[b + 1] - s0;
    const int d = threadIdx.x % D, rr0 = threadIdx.x / D;
    const bool active = rr0 < RS;  // 128 % D threads are idle when D does not divide 128
    float adq[NR];
    #pragma unroll
    for (int e = 0; e < NR; ++e) adq[e] = 0.f;
    att_bwd_load_q<T, D>(sm, q, d_o, lse, delta, s0, len, i0, h, nh, ntok);
    const int kmax = min(len, i0 + BWD_BQ);
    for (int c0 = 0; c0 < kmax; c0 += BWD_BK) {
        __syncthreads();  // previous K/V/dS consumed (and Q loaded)
        att_bwd_load_kv<T, D>(sm, k, v, s0, len, c0, g, nkv);
        __syncthreads();
        att_bwd_pairs<D>(sm, len, i0, c0, scale);
        __syncthreads();
        #pragma unroll
        for (int e = 0; e < NR; ++e) {
            const int r = rr0 + RS * e;
            if (!active || r >= BWD_BQ) continue;
            float a = 0.f;
            #pragma unroll 8
            for (int j = 0; j < BWD_BK; ++j) a += sm.dS[r][j] * sm.K[j][d];
            adq[e] += a;
        }
    }
    #pragma unroll
    for (int e = 0; e < NR; ++e) {
        const int i = i0 + rr0 + RS * e;
        if (active && rr0 + RS * e < BWD_BQ && i < len) att_st(dq + ((size_t)(s0 + i) * nh + h) * D + d, adq[e] * scale);
    }
}

#define ATT_BWD(SUF, T, D)                                                                              \
    extern "C" __global__ void __launch_bounds__(128) attn_bwd_delta_##SUF(                             \
        const T* o, const T* d_o, int ntok, int nh, float* delta) {                                     \
        attn_bwd_delta<T, D>(o, d_o, ntok, nh, delta);                                                  \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(128) attn_bwd_dkdv_##SUF(                              \
        const T* q, const T* k, const T* v, const T* d_o, const float* lse, const float* delta,         \
        const u32* tiles, const u32* cu, int ntok, int nh, int nkv, float scale, T* dk, T* dv) {        \
        attn_bwd_dkdv<T, D>(q, k, v, d_o, lse, delta, tiles, cu, ntok, nh, nkv, scale, dk, dv);         \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(128) attn_bwd_dq_##SUF(                                \
        const T* q, const T* k, const T* v, const T* d_o, const float* lse, const float* delta,         \
        const u32* tiles, const u32* cu, int ntok, int nh, int nkv, float scale, T* dq) {               \
        attn_bwd_dq<T, D>(q, k, v, d_o, lse, delta, tiles, cu, ntok, nh, nkv, scale, dq);               \
    }
ATT_FOR_EACH_DIM(ATT_BWD, float, f32)
ATT_FOR_EACH_DIM(ATT_BWD, bf16_t, bf16)

// ---------------------------------------------------------------- backward v2 (mma.sync bf16)
// The same FlashAttention-2 products as v1 on tensor cores, with the fragment layouts of the v2
// forward (see mma_bf16_16816). P and dS are rounded to bf16 as mma operands (as FlashAttention
// does); every sum is f32.

// Loads rows r0..r0+ROWS of one head of a [T, heads, D] bf16 tensor (sequence offset s0) into a
// padded smem tile with 16-byte copies; rows at or past `len` become zeros.
template <int D, int ROWS>
__device__ __forceinline__ void att_tile_load(bf16_t* dst, const bf16_t* src, int s0, int r0, int len, int heads,
                                              int head) {
    constexpr int S = D + 8, CPR = D / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < ROWS * CPR; c += 128) {
        const int r = c / CPR, col = (c % CPR) * 8;
        uint4 x = make_uint4(0u, 0u, 0u, 0u);
        if (r0 + r < len) x = *(const uint4*)(src + ((size_t)(s0 + r0 + r) * heads + head) * D + col);
        *(uint4*)(dst + r * S + col) = x;
    }
}

// A fragments (16 rows ra = base+gid, rb = ra+8, all D columns) of one head's rows from global.
template <int D>
__device__ __forceinline__ void att_frag_rows(u32 (*f)[4], const bf16_t* src, int s0, int ra, int len, int heads,
                                              int head) {
    const int tig = threadIdx.x & 3, rb = ra + 8;
    const u32* pa = (const u32*)(src + ((size_t)(s0 + ra) * heads + head) * D);
    const u32* pb = (const u32*)(src + ((size_t)(s0 + rb) * heads + head) * D);
    #pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
        f[kc][0] = ra < len ? pa[kc * 8 + tig] : 0u;
        f[kc][1] = rb < len ? pb[kc * 8 + tig] : 0u;
        f[kc][2] = ra < len ? pa[kc * 8 + 4 + tig] : 0u;
        f[kc][3] = rb < len ? pb[kc * 8 + 4 + tig] : 0u;
    }
}

// acc[nt] = A(16×D, fragments) · (smem tile rows nt·8..nt·8+8)ᵀ for NT n-tiles.
template <int D, int NT>
__device__ __forceinline__ void att_mma_abt(float (*acc)[4], const u32 (*a)[4], const bf16_t* tile) {
    constexpr int S = D + 8;
    const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
        const bf16_t* r = tile + (nt * 8 + gid) * S + tig * 2;
        #pragma unroll
        for (int kc = 0; kc < D / 16; ++kc)
            mma_bf16_16816(acc[nt], a[kc], *(const u32*)(r + kc * 16), *(const u32*)(r + kc * 16 + 8));
    }
}

// out(16×D) += X(16×16·KT, C fragments of KT·2 n-tiles, rounded to bf16) · tile rows 0..16·KT.
template <int D, int KT>
__device__ __forceinline__ void att_mma_ab(float (*out)[4], float (*x)[4], const bf16_t* tile) {
    constexpr int S = D + 8;
    const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    #pragma unroll
    for (int kc = 0; kc < KT; ++kc) {
        u32 xa[4];
        xa[0] = att_pack_bf16(x[2 * kc][0], x[2 * kc][1]);
        xa[1] = att_pack_bf16(x[2 * kc][2], x[2 * kc][3]);
        xa[2] = att_pack_bf16(x[2 * kc + 1][0], x[2 * kc + 1][1]);
        xa[3] = att_pack_bf16(x[2 * kc + 1][2], x[2 * kc + 1][3]);
        const bf16_t* t0 = tile + (kc * 16 + tig * 2) * S + gid;
        #pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            const bf16_t* tp = t0 + dt * 8;
            mma_bf16_16816(out[dt], xa, (u32)tp[0] | ((u32)tp[S] << 16), (u32)tp[8 * S] | ((u32)tp[9 * S] << 16));
        }
    }
}

// Stores rows ra and ra+8 of a 16×D C-fragment accumulator, times `mul`, as bf16.
template <int D>
__device__ __forceinline__ void att_store_rows(bf16_t* dst, const float (*acc)[4], float mul, int s0, int ra, int len,
                                               int heads, int head) {
    const int tig = threadIdx.x & 3;
    #pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = ra + 8 * half;
        if (r >= len) continue;
        u32* row = (u32*)(dst + ((size_t)(s0 + r) * heads + head) * D);
        #pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
            row[dt * 4 + tig] = att_pack_bf16(acc[dt][2 * half] * mul, acc[dt][2 * half + 1] * mul);
    }
}

// att_store_rows in f32 (v4's partial sums).
template <int D>
__device__ __forceinline__ void att_store_rows_f32(float* dst, const float (*acc)[4], float mul, int s0, int ra,
                                                   int len, int heads, int head) {
    const int tig = threadIdx.x & 3;
    #pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = ra + 8 * half;
        if (r >= len) continue;
        float2* row = (float2*)(dst + ((size_t)(s0 + r) * heads + head) * D);
        #pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
            row[dt * 4 + tig] = make_float2(acc[dt][2 * half] * mul, acc[dt][2 * half + 1] * mul);
    }
}

// dK, dV for one (64-key tile, KV head): each warp owns 16 keys (K and V fragments in
// registers) and streams BQ-row tiles of Q and dO (every query head of the group, query rows
// from the tile start on) through shared memory: Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ, Pᵀ from lse,
// dSᵀ = Pᵀ∘(dPᵀ − D), dV += Pᵀ·dO, dK += dSᵀ·Q.
template <int D, int BQ>
__device__ void attn_bwd_dkdv_v2(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                 const bf16_t* __restrict__ v, const bf16_t* __restrict__ d_o,
                                 const float* __restrict__ lse, const float* __restrict__ delta,
                                 const u32* __restrict__ tiles, const u32* __restrict__ cu, int ntok, int nh, int nkv,
                                 float scale, bf16_t* __restrict__ dk, bf16_t* __restrict__ dv) {
    constexpr int S = D + 8, NT = BQ / 8, DT = D / 8, KC = D / 16;
    __shared__ __align__(16) bf16_t Qs[BQ * S];
    __shared__ __align__(16) bf16_t Os[BQ * S];
    __shared__ float Ls[BQ], Ds[BQ];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
    const int b = (int)tiles[2 * blockIdx.x], k0 = (int)tiles[2 * blockIdx.x + 1];
    const int g = blockIdx.y, rep = nh / nkv;
    const int s0 = (int)cu[b], len = (int)cu[b + 1] - s0;
    const int ka = k0 + warp * 16 + gid, kb = ka + 8;
    const float sl2 = scale * ATT_LOG2E;
    u32 kf[KC][4], vf[KC][4];
    att_frag_rows<D>(kf, k, s0, ka, len, nkv, g);
    att_frag_rows<D>(vf, v, s0, ka, len, nkv, g);
    float adk[DT][4], adv[DT][4];
    #pragma unroll
    for (int dt = 0; dt < DT; ++dt)
        #pragma unroll
        for (int e = 0; e < 4; ++e) adk[dt][e] = adv[dt][e] = 0.f;

    for (int hh = 0; hh < rep; ++hh) {
        const int h = g * rep + hh;
        for (int q0 = k0; q0 < len; q0 += BQ) {
            __syncthreads();  // the previous tile is consumed
            att_tile_load<D, BQ>(Qs, q, s0, q0, len, nh, h);
            att_tile_load<D, BQ>(Os, d_o, s0, q0, len, nh, h);
            if (tid < BQ) {
                const bool in = q0 + tid < len;
                Ls[tid] = in ? lse[(size_t)h * ntok + s0 + q0 + tid] * ATT_LOG2E : 0.f;
                Ds[tid] = in ? delta[(size_t)h * ntok + s0 + q0 + tid] : 0.f;
            }
            __syncthreads();
            float st[NT][4], dpt[NT][4];
            att_mma_abt<D, NT>(st, kf, Qs);
            att_mma_abt<D, NT>(dpt, vf, Os);
            #pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                #pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = nt * 8 + tig * 2 + (e & 1), row = q0 + qi, key = e < 2 ? ka : kb;
                    const float p = row < len && key <= row ? exp2f(st[nt][e] * sl2 - Ls[qi]) : 0.f;
                    st[nt][e] = p;
                    dpt[nt][e] = p * (dpt[nt][e] - Ds[qi]);
                }
            }
            att_mma_ab<D, BQ / 16>(adv, st, Os);
            att_mma_ab<D, BQ / 16>(adk, dpt, Qs);
        }
    }
    att_store_rows<D>(dk, adk, scale, s0, ka, len, nkv, g);
    att_store_rows<D>(dv, adv, 1.f, s0, ka, len, nkv, g);
}

// dQ for one (64-row query tile, head): each warp owns 16 query rows (Q and dO fragments in
// registers) and streams 64-key tiles of K and V through shared memory: S = Q·Kᵀ, dP = dO·Vᵀ,
// P from lse, dS = P∘(dP − D), dQ += dS·K.
template <int D>
__device__ void attn_bwd_dq_v2(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                               const bf16_t* __restrict__ v, const bf16_t* __restrict__ d_o,
                               const float* __restrict__ lse, const float* __restrict__ delta,
                               const u32* __restrict__ tiles, const u32* __restrict__ cu, int ntok, int nh, int nkv,
                               float scale, bf16_t* __restrict__ dq) {
    constexpr int BK = 64, S = D + 8, NT = BK / 8, DT = D / 8, KC = D / 16;
    __shared__ __align__(16) bf16_t Ks[BK * S];
    __shared__ __align__(16) bf16_t Vs[BK * S];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
    const int b = (int)tiles[2 * blockIdx.x], q0 = (int)tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y, g = h / (nh / nkv);
    const int s0 = (int)cu[b], len = (int)cu[b + 1] - s0;
    const int ra = q0 + warp * 16 + gid, rb = ra + 8;
    const float sl2 = scale * ATT_LOG2E;
    u32 qf[KC][4], of[KC][4];
    att_frag_rows<D>(qf, q, s0, ra, len, nh, h);
    att_frag_rows<D>(of, d_o, s0, ra, len, nh, h);
    const float la = ra < len ? lse[(size_t)h * ntok + s0 + ra] * ATT_LOG2E : 0.f;
    const float lb = rb < len ? lse[(size_t)h * ntok + s0 + rb] * ATT_LOG2E : 0.f;
    const float da = ra < len ? delta[(size_t)h * ntok + s0 + ra] : 0.f;
    const float db = rb < len ? delta[(size_t)h * ntok + s0 + rb] : 0.f;
    float adq[DT][4];
    #pragma unroll
    for (int dt = 0; dt < DT; ++dt) adq[dt][0] = adq[dt][1] = adq[dt][2] = adq[dt][3] = 0.f;

    const int kmax = min(len, q0 + 64);
    for (int kt = 0; kt < kmax; kt += BK) {
        __syncthreads();  // the previous tile is consumed
        att_tile_load<D, BK>(Ks, k, s0, kt, len, nkv, g);
        att_tile_load<D, BK>(Vs, v, s0, kt, len, nkv, g);
        __syncthreads();
        float st[NT][4], dp[NT][4];
        att_mma_abt<D, NT>(st, qf, Ks);
        att_mma_abt<D, NT>(dp, of, Vs);
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = kt + nt * 8 + tig * 2 + (e & 1), row = e < 2 ? ra : rb;
                const float p = row < len && key <= row ? exp2f(st[nt][e] * sl2 - (e < 2 ? la : lb)) : 0.f;
                st[nt][e] = p * (dp[nt][e] - (e < 2 ? da : db));
            }
        }
        att_mma_ab<D, BK / 16>(adq, st, Ks);
    }
    att_store_rows<D>(dq, adq, scale, s0, ra, len, nh, h);
}

// Backward tensor-core kernels of version V (2, 3) at head dim D, dK/dV query tile BQ; DKDV_T
// is v3's extra template argument and trailing arguments (empty for v2).
#define ATT_BWD_TC(V, D, BQ, DKDV_T, DKDV_A)                                                            \
    extern "C" __global__ void __launch_bounds__(128) attn_bwd_dkdv_v##V##_bf16_d##D(                   \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* d_o, const float* lse,         \
        const float* delta, const u32* tiles, const u32* cu, int ntok, int nh, int nkv, float scale,    \
        bf16_t* dk, bf16_t* dv) {                                                                       \
        attn_bwd_dkdv_v##V<D, BQ DKDV_T>(q, k, v, d_o, lse, delta, tiles, cu, ntok, nh, nkv, scale, dk, \
                                         dv DKDV_A);                                                    \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(128) attn_bwd_dq_v##V##_bf16_d##D(                     \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* d_o, const float* lse,         \
        const float* delta, const u32* tiles, const u32* cu, int ntok, int nh, int nkv, float scale,    \
        bf16_t* dq) {                                                                                   \
        attn_bwd_dq_v##V<D>(q, k, v, d_o, lse, delta, tiles, cu, ntok, nh, nkv, scale, dq);             \
    }
ATT_BWD_TC(2, 64, 64, , )
ATT_BWD_TC(2, 128, 32, , )

// ---------------------------------------------------------------- ldmatrix mma helpers (v3)
// Tiles in smem are row-major with rows padded to S = D + 8 bf16 (16-byte aligned, and the 8 rows
// one ldmatrix phase reads fall in distinct bank groups). MT m-tiles of 16 rows share each B
// fragment read from smem.

// acc[mt][nt] = A[mt] (16×D, fragments) · (tile rows 8·nt..8·nt+8)ᵀ for NT n-tiles. Lane i
// addresses row i % 8 of the 8×8 matrix at column 32·kc2 + 8·(i / 8): registers 0, 1 are B for
// k-chunk 2·kc2, registers 2, 3 for 2·kc2 + 1.
template <int D, int NT, int MT>
__device__ __forceinline__ void att_ldm_abt(float (&acc)[MT][NT][4], const u32 (&a)[MT][D / 16][4],
                                            const bf16_t* tile) {
    constexpr int S = D + 8;
    const int lane = threadIdx.x & 31;
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;
        const bf16_t* r = tile + (nt * 8 + (lane & 7)) * S + (lane >> 3) * 8;
        #pragma unroll
        for (int kc2 = 0; kc2 < D / 32; ++kc2) {
            u32 b[4];
            ldmatrix_x4(b, r + kc2 * 32);
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_bf16_16816(acc[mt][nt], a[mt][2 * kc2], b[0], b[1]);
                mma_bf16_16816(acc[mt][nt], a[mt][2 * kc2 + 1], b[2], b[3]);
            }
        }
    }
}

// out[mt] (16×D) += X[mt] (16×16·KT, bf16 A fragments) · tile rows 0..16·KT. Lane i addresses
// row 16·kc + i % 16 at column 16·dt2 + 8·(i / 16); transposed, matrices 0, 1 are B of n-tile
// 2·dt2 and matrices 2, 3 of n-tile 2·dt2 + 1.
template <int D, int KT, int MT>
__device__ __forceinline__ void att_ldm_ab(float (&out)[MT][D / 8][4], const u32 (&x)[MT][KT][4],
                                           const bf16_t* tile) {
    constexpr int S = D + 8;
    const int lane = threadIdx.x & 31;
    #pragma unroll
    for (int kc = 0; kc < KT; ++kc) {
        const bf16_t* t = tile + (kc * 16 + (lane & 15)) * S + (lane >> 4) * 8;
        #pragma unroll
        for (int dt2 = 0; dt2 < D / 16; ++dt2) {
            u32 b[4];
            ldmatrix_x4_trans(b, t + dt2 * 16);
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_bf16_16816(out[mt][2 * dt2], x[mt][kc], b[0], b[1]);
                mma_bf16_16816(out[mt][2 * dt2 + 1], x[mt][kc], b[2], b[3]);
            }
        }
    }
}

// C fragments of 2·KT n-tiles (16 rows × 16·KT columns, f32) as bf16 A fragments.
template <int KT>
__device__ __forceinline__ void att_pack_a(u32 (&x)[KT][4], const float (*c)[4]) {
    #pragma unroll
    for (int kc = 0; kc < KT; ++kc) {
        x[kc][0] = att_pack_bf16(c[2 * kc][0], c[2 * kc][1]);
        x[kc][1] = att_pack_bf16(c[2 * kc][2], c[2 * kc][3]);
        x[kc][2] = att_pack_bf16(c[2 * kc + 1][0], c[2 * kc + 1][1]);
        x[kc][3] = att_pack_bf16(c[2 * kc + 1][2], c[2 * kc + 1][3]);
    }
}

// Copies rows r0..r0+ROWS of one head of a [T, heads, D] bf16 tensor (sequence offset s0) into
// a padded smem tile with cp.async (the caller commits); rows at or past `len` are zero-filled.
template <int D, int ROWS>
__device__ __forceinline__ void att_tile_stage(bf16_t* dst, const bf16_t* src, int s0, int r0, int len, int heads,
                                               int head) {
    constexpr int S = D + 8, CPR = D / 8, RS = 128 / CPR;  // RS rows per pass of the 128 threads
    static_assert(ROWS * CPR % 128 == 0, "tile chunks must be a multiple of the block");
    const int r = threadIdx.x / CPR, col = (threadIdx.x % CPR) * 8;
    const bf16_t* p = src + ((size_t)(s0 + r0 + r) * heads + head) * D + col;
    bf16_t* d = dst + r * S + col;
    #pragma unroll
    for (int i = 0; i < ROWS * CPR / 128; ++i) {
        const bool in = r0 + r + RS * i < len;
        cp_async16(d, in ? p : src, in);
        p += (size_t)RS * heads * D;
        d += RS * S;
    }
}

// ---------------------------------------------------------------- forward v3 (cp.async, ldmatrix)
// v2's algorithm with FlashAttention-2's staging. K and V tiles are copied with cp.async, one
// buffer each, so V(j) lands while S = Q·K(j)ᵀ and the softmax run, and K(j+1) lands while
// O += P·V(j). B fragments come from smem by ldmatrix (.trans for V): one instruction per four
// fragment registers instead of v2's four 32-bit or eight 16-bit loads. At head_dim 64 each
// warp owns MT = 2 m-tiles (32 rows, 128 per block), so every K/V fragment read from smem
// feeds two mma (half the smem traffic per FLOP). A warp whose rows all precede a key tile
// skips it, and only tiles that cross the diagonal or the sequence end are masked.
template <int D, int MT>
__device__ void attn_fwd_v3(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                            const bf16_t* __restrict__ v, const u32* __restrict__ tiles,
                            const u32* __restrict__ cu, int ntok, int nh, int nkv, float scale,
                            bf16_t* __restrict__ o, float* __restrict__ lse) {
    constexpr int BR = 64 * MT, BC = 64, KS = D + 8;  // KS: padded smem row (conflict-free ldmatrix)
    constexpr int NT = BC / 8, DT = D / 8, KC = D / 16;
    __shared__ __align__(16) bf16_t Ks[BC * KS];
    __shared__ __align__(16) bf16_t Vs[BC * KS];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int b = (int)tiles[2 * blockIdx.x], r0 = (int)tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y, g = h / (nh / nkv);
    const int s0 = (int)cu[b], len = (int)cu[b + 1] - s0;
    const int w0 = r0 + warp * 16 * MT;             // this warp's first row
    const int wlast = min(w0 + 16 * MT, len) - 1;   // its last row inside the sequence
    const float sl2 = scale * ATT_LOG2E;

    att_tile_stage<D, BC>(Ks, k, s0, 0, len, nkv, g);  // K(0) lands while Q is read
    cp_async_commit();
    u32 qa[MT][KC][4];
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) att_frag_rows<D>(qa[mt], q, s0, w0 + mt * 16 + gid, len, nh, h);
    float acc[MT][DT][4], m[MT][2], l[MT][2];  // [.][0]: row gid, [.][1]: row gid + 8
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        m[mt][0] = m[mt][1] = -SMELT_INF;
        l[mt][0] = l[mt][1] = 0.f;
        #pragma unroll
        for (int dt = 0; dt < DT; ++dt) acc[mt][dt][0] = acc[mt][dt][1] = acc[mt][dt][2] = acc[mt][dt][3] = 0.f;
    }

    const int kmax = min(len, r0 + BR);
    for (int kt = 0; kt < kmax; kt += BC) {
        cp_async_wait<0>();
        __syncthreads();  // K(kt) visible to all; every warp is past P·V of the previous V tile
        att_tile_stage<D, BC>(Vs, v, s0, kt, len, nkv, g);
        cp_async_commit();
        const bool active = w0 < len && kt <= wlast;
        const bool edge = kt + BC - 1 > w0 || kt + BC > len;  // some key of the tile is masked
        u32 pa[MT][BC / 16][4];  // P as bf16 A fragments, packed as soon as it is known
        if (active) {
            float sc[MT][NT][4];
            att_ldm_abt<D, NT, MT>(sc, qa, Ks);
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int ra = w0 + mt * 16 + gid, rb = ra + 8;
                float mxa = -SMELT_INF, mxb = -SMELT_INF;
                #pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    #pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int key = kt + nt * 8 + tig * 2 + (e & 1);
                        float x = sc[mt][nt][e] * sl2;
                        if (edge && (key > (e < 2 ? ra : rb) || key >= len)) x = -SMELT_INF;
                        sc[mt][nt][e] = x;
                        if (e < 2) mxa = fmaxf(mxa, x); else mxb = fmaxf(mxb, x);
                    }
                }
                #pragma unroll
                for (int off = 1; off < 4; off <<= 1) {
                    mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, off));
                    mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, off));
                }
                const float mna = fmaxf(m[mt][0], mxa), mnb = fmaxf(m[mt][1], mxb);
                const float ua = mna == -SMELT_INF ? 0.f : mna, ub = mnb == -SMELT_INF ? 0.f : mnb;
                const float alpha_a = exp2f(m[mt][0] - ua), alpha_b = exp2f(m[mt][1] - ub);
                m[mt][0] = mna; m[mt][1] = mnb;
                l[mt][0] *= alpha_a; l[mt][1] *= alpha_b;
                #pragma unroll
                for (int dt = 0; dt < DT; ++dt) {
                    acc[mt][dt][0] *= alpha_a; acc[mt][dt][1] *= alpha_a;
                    acc[mt][dt][2] *= alpha_b; acc[mt][dt][3] *= alpha_b;
                }
                #pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    sc[mt][nt][0] = exp2f(sc[mt][nt][0] - ua); sc[mt][nt][1] = exp2f(sc[mt][nt][1] - ua);
                    sc[mt][nt][2] = exp2f(sc[mt][nt][2] - ub); sc[mt][nt][3] = exp2f(sc[mt][nt][3] - ub);
                    l[mt][0] += sc[mt][nt][0] + sc[mt][nt][1];
                    l[mt][1] += sc[mt][nt][2] + sc[mt][nt][3];
                }
                att_pack_a<BC / 16>(pa[mt], sc[mt]);
            }
        }
        cp_async_wait<0>();
        __syncthreads();  // V(kt) visible to all; every warp is done reading K(kt)
        if (kt + BC < kmax) {
            att_tile_stage<D, BC>(Ks, k, s0, kt + BC, len, nkv, g);
            cp_async_commit();
        }
        if (active) att_ldm_ab<D, BC / 16, MT>(acc, pa, Vs);
    }
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float la = l[mt][0], lb = l[mt][1];
        #pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            la += __shfl_xor_sync(0xffffffffu, la, off);
            lb += __shfl_xor_sync(0xffffffffu, lb, off);
        }
        const int ra = w0 + mt * 16 + gid, rb = ra + 8;
        const float ia = 1.f / la, ib = 1.f / lb;
        if (ra < len) {
            u32* orow = (u32*)(o + ((size_t)(s0 + ra) * nh + h) * D);
            #pragma unroll
            for (int dt = 0; dt < DT; ++dt) orow[dt * 4 + tig] = att_pack_bf16(acc[mt][dt][0] * ia, acc[mt][dt][1] * ia);
            if (tig == 0) lse[(size_t)h * ntok + s0 + ra] = (m[mt][0] + log2f(la)) * ATT_LN2;
        }
        if (rb < len) {
            u32* orow = (u32*)(o + ((size_t)(s0 + rb) * nh + h) * D);
            #pragma unroll
            for (int dt = 0; dt < DT; ++dt) orow[dt * 4 + tig] = att_pack_bf16(acc[mt][dt][2] * ib, acc[mt][dt][3] * ib);
            if (tig == 0) lse[(size_t)h * ntok + s0 + rb] = (m[mt][1] + log2f(lb)) * ATT_LN2;
        }
    }
}

ATT_FWD_TC(3, attn_fwd_v3, 64, 64, 2)
ATT_FWD_TC(3, attn_fwd_v3, 128, 128, 1)
// v4: v3 with one m-tile per warp at head dim 64 too (64-row query tiles, as v2), for v3's
// staging without its second set of Q fragments and accumulators (255 registers and a spill at
// d 64). At d 128 v3 already has one m-tile: there v4 is v3's kernel.
ATT_FWD_TC(4, attn_fwd_v3, 64, 64, 1)

// ---------------------------------------------------------------- backward v3 (cp.async, ldmatrix)
// v2's two passes with forward v3's operand path: smem tiles staged by cp.async, every B
// fragment read by ldmatrix. dK/dV: the (query head, BQ-row tile) steps of a key tile form one
// flat sequence whose Q, dO, lse and delta tiles are double-buffered, so step i + 1 lands while
// step i computes. dQ: V(j) lands first; dP = dO·V(j)ᵀ runs while K(j) lands, S, dS and
// dQ += dS·K(j) while V(j+1) lands, and K(j+1) is copied once every warp is done with K(j).
// Warps whose keys (dK/dV) or rows (dQ) no row of a tile sees skip it; only tiles that cross the
// diagonal or the sequence end are masked.
// PART (v4): a 1-D grid over (key tile, KV head, part), part fastest, so the heaviest key
// tiles of every part start first; the block takes part `part` of `parts` of the group's query
// heads and writes f32 partial sums to that part of pdk, pdv ([parts, ntok, nkv, D]; dk, dv
// unused), which attn_bwd_dkdv_reduce_bf16 adds up.
template <int D, int BQ, bool PART>
__device__ void attn_bwd_dkdv_v3(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                 const bf16_t* __restrict__ v, const bf16_t* __restrict__ d_o,
                                 const float* __restrict__ lse, const float* __restrict__ delta,
                                 const u32* __restrict__ tiles, const u32* __restrict__ cu, int ntok, int nh, int nkv,
                                 float scale, bf16_t* __restrict__ dk, bf16_t* __restrict__ dv,
                                 float* __restrict__ pdk, float* __restrict__ pdv, int parts) {
    constexpr int S = D + 8, NT = BQ / 8, DT = D / 8, KC = D / 16;
    __shared__ __align__(16) bf16_t Qs[2][BQ * S];
    __shared__ __align__(16) bf16_t Os[2][BQ * S];
    __shared__ __align__(16) float Ls[2][BQ];
    __shared__ __align__(16) float Ds[2][BQ];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
    const int part = PART ? (int)blockIdx.x % parts : 0;
    const int tile = PART ? (int)blockIdx.x / parts / nkv : (int)blockIdx.x;
    const int g = PART ? (int)blockIdx.x / parts % nkv : (int)blockIdx.y, rep = nh / nkv;
    const int b = (int)tiles[2 * tile], k0 = (int)tiles[2 * tile + 1];
    const int s0 = (int)cu[b], len = (int)cu[b + 1] - s0;
    const int kw = k0 + warp * 16, ka = kw + gid, kb = ka + 8;  // the warp's first key; this thread's two
    const float sl2 = scale * ATT_LOG2E;
    // This block's query heads: all of the group's, or part `part` of `parts` of them.
    const int h_lo = g * rep + rep * part / parts, h_hi = g * rep + rep * (part + 1) / parts;
    const int nq = (len - k0 + BQ - 1) / BQ, steps = (h_hi - h_lo) * nq;  // query tiles per head, in all
    // Step i: query head h_lo + i / nq, rows from k0 + BQ·(i % nq), into buffer i % 2.
    auto stage = [&](int i) {
        const int h = h_lo + i / nq, q0 = k0 + BQ * (i % nq), buf = i & 1;
        att_tile_stage<D, BQ>(Qs[buf], q, s0, q0, len, nh, h);
        att_tile_stage<D, BQ>(Os[buf], d_o, s0, q0, len, nh, h);
        if (tid < BQ) {
            const bool in = q0 + tid < len;
            const size_t at = (size_t)h * ntok + s0 + (in ? q0 + tid : 0);
            cp_async4(&Ls[buf][tid], lse + at, in);
            cp_async4(&Ds[buf][tid], delta + at, in);
        }
        cp_async_commit();
    };
    stage(0);  // lands while K and V are read
    u32 kf[1][KC][4], vf[1][KC][4];
    att_frag_rows<D>(kf[0], k, s0, ka, len, nkv, g);
    att_frag_rows<D>(vf[0], v, s0, ka, len, nkv, g);
    float adk[1][DT][4], adv[1][DT][4];
    #pragma unroll
    for (int dt = 0; dt < DT; ++dt)
        #pragma unroll
        for (int e = 0; e < 4; ++e) adk[0][dt][e] = adv[0][dt][e] = 0.f;
    for (int i = 0; i < steps; ++i) {
        const int buf = i & 1, q0 = k0 + BQ * (i % nq);
        if (i + 1 < steps) {
            stage(i + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        if (tid < BQ) Ls[buf][tid] *= ATT_LOG2E;  // this thread's own copy, landed at its wait
        __syncthreads();  // step i's tiles are visible to all
        if (kw < len && kw <= q0 + BQ - 1) {
            const bool edge = kw + 15 > q0 || q0 + BQ > len;  // some (row, key) of the tile is masked
            float st[1][NT][4], dpt[1][NT][4];
            att_ldm_abt<D, NT, 1>(st, kf, Qs[buf]);
            att_ldm_abt<D, NT, 1>(dpt, vf, Os[buf]);
            #pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                #pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = nt * 8 + tig * 2 + (e & 1), row = q0 + qi, key = e < 2 ? ka : kb;
                    const bool seen = !edge || (row < len && key <= row);
                    const float p = seen ? exp2f(st[0][nt][e] * sl2 - Ls[buf][qi]) : 0.f;
                    st[0][nt][e] = p;
                    dpt[0][nt][e] = p * (dpt[0][nt][e] - Ds[buf][qi]);
                }
            }
            u32 pa[1][BQ / 16][4], sa[1][BQ / 16][4];
            att_pack_a<BQ / 16>(pa[0], st[0]);
            att_pack_a<BQ / 16>(sa[0], dpt[0]);
            att_ldm_ab<D, BQ / 16, 1>(adv, pa, Os[buf]);
            att_ldm_ab<D, BQ / 16, 1>(adk, sa, Qs[buf]);
        }
        __syncthreads();  // buffer i % 2 is free for step i + 2
    }
    if (PART) {
        const size_t at = (size_t)part * ntok * nkv * D;
        att_store_rows_f32<D>(pdk + at, adk[0], scale, s0, ka, len, nkv, g);
        att_store_rows_f32<D>(pdv + at, adv[0], 1.f, s0, ka, len, nkv, g);
    } else {
        att_store_rows<D>(dk, adk[0], scale, s0, ka, len, nkv, g);
        att_store_rows<D>(dv, adv[0], 1.f, s0, ka, len, nkv, g);
    }
}

template <int D>
__device__ void attn_bwd_dq_v3(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                               const bf16_t* __restrict__ v, const bf16_t* __restrict__ d_o,
                               const float* __restrict__ lse, const float* __restrict__ delta,
                               const u32* __restrict__ tiles, const u32* __restrict__ cu, int ntok, int nh, int nkv,
                               float scale, bf16_t* __restrict__ dq) {
    constexpr int BK = 64, S = D + 8, NT = BK / 8, DT = D / 8, KC = D / 16;
    __shared__ __align__(16) bf16_t Ks[BK * S];
    __shared__ __align__(16) bf16_t Vs[BK * S];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
    const int b = (int)tiles[2 * blockIdx.x], q0 = (int)tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y, g = h / (nh / nkv);
    const int s0 = (int)cu[b], len = (int)cu[b + 1] - s0;
    const int w0 = q0 + warp * 16, wlast = min(w0 + 16, len) - 1;  // this warp's rows
    const int ra = w0 + gid, rb = ra + 8;
    const float sl2 = scale * ATT_LOG2E;
    att_tile_stage<D, BK>(Vs, v, s0, 0, len, nkv, g);  // V(0), K(0) land while Q and dO are read
    cp_async_commit();
    att_tile_stage<D, BK>(Ks, k, s0, 0, len, nkv, g);
    cp_async_commit();
    u32 qf[1][KC][4], of[1][KC][4];
    att_frag_rows<D>(qf[0], q, s0, ra, len, nh, h);
    att_frag_rows<D>(of[0], d_o, s0, ra, len, nh, h);
    const float la = ra < len ? lse[(size_t)h * ntok + s0 + ra] * ATT_LOG2E : 0.f;
    const float lb = rb < len ? lse[(size_t)h * ntok + s0 + rb] * ATT_LOG2E : 0.f;
    const float da = ra < len ? delta[(size_t)h * ntok + s0 + ra] : 0.f;
    const float db = rb < len ? delta[(size_t)h * ntok + s0 + rb] : 0.f;
    float adq[1][DT][4];
    #pragma unroll
    for (int dt = 0; dt < DT; ++dt) adq[0][dt][0] = adq[0][dt][1] = adq[0][dt][2] = adq[0][dt][3] = 0.f;

    const int kmax = min(len, q0 + 64);
    for (int kt = 0; kt < kmax; kt += BK) {
        cp_async_wait<1>();
        __syncthreads();  // V(kt) is visible to all (K(kt) may still be in flight)
        const bool active = w0 < len && kt <= wlast;
        const bool edge = kt + BK - 1 > w0 || kt + BK > len;  // some key of the tile is masked
        float dp[1][NT][4];
        if (active) att_ldm_abt<D, NT, 1>(dp, of, Vs);
        cp_async_wait<0>();
        __syncthreads();  // K(kt) is visible to all; every warp is done with V(kt)
        const bool more = kt + BK < kmax;
        if (more) {
            att_tile_stage<D, BK>(Vs, v, s0, kt + BK, len, nkv, g);
            cp_async_commit();
        }
        if (active) {
            float st[1][NT][4];
            att_ldm_abt<D, NT, 1>(st, qf, Ks);
            #pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                #pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = kt + nt * 8 + tig * 2 + (e & 1), row = e < 2 ? ra : rb;
                    const bool seen = !edge || (row < len && key <= row);
                    const float p = seen ? exp2f(st[0][nt][e] * sl2 - (e < 2 ? la : lb)) : 0.f;
                    st[0][nt][e] = p * (dp[0][nt][e] - (e < 2 ? da : db));
                }
            }
            u32 sa[1][BK / 16][4];
            att_pack_a<BK / 16>(sa[0], st[0]);
            att_ldm_ab<D, BK / 16, 1>(adq, sa, Ks);
        }
        if (more) {
            __syncthreads();  // every warp is done with K(kt)
            att_tile_stage<D, BK>(Ks, k, s0, kt + BK, len, nkv, g);
            cp_async_commit();
        }
    }
    att_store_rows<D>(dq, adq[0], scale, s0, ra, len, nh, h);
}

ATT_BWD_TC(3, 64, 64, COMMA false, COMMA nullptr COMMA nullptr COMMA 1)
ATT_BWD_TC(3, 128, 32, COMMA false, COMMA nullptr COMMA nullptr COMMA 1)

// v4's dK/dV: v3's with the group's query heads split into `parts` (f32 partials).
#define ATT_BWD_DKDV_V4(D, BQ)                                                                          \
    extern "C" __global__ void __launch_bounds__(128) attn_bwd_dkdv_v4_bf16_d##D(                       \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* d_o, const float* lse,         \
        const float* delta, const u32* tiles, const u32* cu, int ntok, int nh, int nkv, float scale,    \
        float* pdk, float* pdv, int parts) {                                                            \
        attn_bwd_dkdv_v3<D, BQ, true>(q, k, v, d_o, lse, delta, tiles, cu, ntok, nh, nkv, scale, nullptr, \
                                      nullptr, pdk, pdv, parts);                                        \
    }
ATT_BWD_DKDV_V4(64, 64)
ATT_BWD_DKDV_V4(128, 32)

// dk, dv = the sums of v4's `parts` f32 partials ([parts, n] each, n % 4 == 0), as bf16.
// Grid-stride over groups of 4 elements.
extern "C" __global__ void attn_bwd_dkdv_reduce_bf16(const float* __restrict__ pdk, const float* __restrict__ pdv,
                                                     int parts, long long n, bf16_t* __restrict__ dk,
                                                     bf16_t* __restrict__ dv) {
    const long long n4 = n / 4;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < 2 * n4;
         i += (long long)gridDim.x * blockDim.x) {
        const bool is_v = i >= n4;
        const long long j = is_v ? i - n4 : i;
        const float4* src = (const float4*)(is_v ? pdv : pdk) + j;
        float4 a = src[0];
        for (int p = 1; p < parts; ++p) {
            const float4 b = src[(long long)p * n4];
            a.x += b.x; a.y += b.y; a.z += b.z; a.w += b.w;
        }
        uint2 out;
        out.x = att_pack_bf16(a.x, a.y);
        out.y = att_pack_bf16(a.z, a.w);
        ((uint2*)(is_v ? dv : dk))[j] = out;
    }
}

// ---------------------------------------------------------------- decode (split-K)
#define DEC_MAXQ 4  // new tokens per block

// Merges the block's 4 warps' (m, l, acc) of query row r (in shared memory) and writes them as
// split `split` of output row `row`: acc unnormalised, m in log2 units, l.
template <int D, int RR>
__device__ __forceinline__ void attn_decode_write_partial(const float (*sm_m)[RR], const float (*sm_l)[RR],
                                                          const float (*sm_acc)[RR][D], int r, size_t row, int split,
                                                          int nsplit, float* __restrict__ part_o,
                                                          float* __restrict__ part_ml) {
    const float M = fmaxf(fmaxf(sm_m[0][r], sm_m[1][r]), fmaxf(sm_m[2][r], sm_m[3][r]));
    const float Mu = M == -SMELT_INF ? 0.f : M;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float a = 0.f;
        #pragma unroll
        for (int w = 0; w < 4; ++w) a += sm_acc[w][r][d] * exp2f(sm_m[w][r] - Mu);
        part_o[(row * nsplit + split) * D + d] = a;
    }
    if (threadIdx.x == 0) {
        float ls = 0.f;
        #pragma unroll
        for (int w = 0; w < 4; ++w) ls += sm_l[w][r] * exp2f(sm_m[w][r] - Mu);
        part_ml[(row * nsplit + split) * 2] = M;
        part_ml[(row * nsplit + split) * 2 + 1] = ls;
    }
}

// Keys per split: `chunk` when it is given (> 0, from the host, which knows the lengths), else
// (0: lengths only on the device, as in a replayed graph) the row's own length L cut into
// nsplit whole 128-key steps, so every split of a row that has grown since has work.
__device__ __forceinline__ int dec_chunk(int chunk, int L, int nsplit) {
    if (chunk > 0) return chunk;
    const int c = (L + nsplit - 1) / nsplit;
    return max(128, (c + 127) / 128 * 128);
}

// Partial attention of ≤4 new tokens of batch row b, head h, over keys
// [split·chunk, min((split+1)·chunk, limit)). Writes unnormalised acc and (m in log2 units, l).
template <typename T, int D>
__device__ void attn_decode_partial(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
                                    const u32* __restrict__ cache_lens, const u32* __restrict__ slots, int n_new,
                                    int nh, int nkv, int max_len, int chunk, int nsplit, float scale,
                                    float* __restrict__ part_o,
                                    float* __restrict__ part_ml) {
    constexpr int E = (D + 31) / 32;  // elements lane·E .. lane·E + E − 1 (those < D)
    __shared__ float sm_m[4][DEC_MAXQ], sm_l[4][DEC_MAXQ];
    __shared__ float sm_acc[4][DEC_MAXQ][D];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int split = blockIdx.x, h = blockIdx.y;
    const int qg = (n_new + DEC_MAXQ - 1) / DEC_MAXQ;
    const int b = blockIdx.z / qg, i0 = (blockIdx.z % qg) * DEC_MAXQ;
    const int nq = min(DEC_MAXQ, n_new - i0);
    const int g = h / (nh / nkv);
    const int L = (int)cache_lens[b];
    const int first = L - n_new;  // position of new token 0
    const int ck = dec_chunk(chunk, L, nsplit);
    const int kbeg = split * ck;
    const int kend = min(kbeg + ck, L);
    const float sl2 = scale * ATT_LOG2E;

    float qf[DEC_MAXQ][E], acc[DEC_MAXQ][E], m[DEC_MAXQ], l[DEC_MAXQ];
    #pragma unroll
    for (int r = 0; r < DEC_MAXQ; ++r) {
        const int rr = min(r, nq - 1);  // clamp: rows ≥ nq are computed but never stored
        const T* qr = q + (((size_t)b * n_new + i0 + rr) * nh + h) * D + lane * E;
        #pragma unroll
        for (int e = 0; e < E; ++e) { qf[r][e] = att_in<D>(lane * E + e) ? att_ld(qr + e) * sl2 : 0.f; acc[r][e] = 0.f; }
        m[r] = -SMELT_INF;
        l[r] = 0.f;
    }
    const size_t slot = slots ? slots[b] : (u32)b;
    const T* kbase = kc + (slot * max_len * nkv + g) * D + lane * E;
    const T* vbase = vc + (slot * max_len * nkv + g) * D + lane * E;
    for (int j = kbeg + warp; j < kend; j += 4) {
        float kr[E], vr[E];
        #pragma unroll
        for (int e = 0; e < E; ++e) {
            const bool in = att_in<D>(lane * E + e);
            kr[e] = in ? att_ld(kbase + (size_t)j * nkv * D + e) : 0.f;
            vr[e] = in ? att_ld(vbase + (size_t)j * nkv * D + e) : 0.f;
        }
        #pragma unroll
        for (int r = 0; r < DEC_MAXQ; ++r) {
            if (r < nq && j <= first + i0 + r) {  // warp-uniform condition
                float s = 0.f;
                #pragma unroll
                for (int e = 0; e < E; ++e) s += qf[r][e] * kr[e];
                s = warp_sum(s);
                const float mn = fmaxf(m[r], s);
                const float alpha = exp2f(m[r] - mn), p = exp2f(s - mn);
                l[r] = l[r] * alpha + p;
                #pragma unroll
                for (int e = 0; e < E; ++e) acc[r][e] = acc[r][e] * alpha + p * vr[e];
                m[r] = mn;
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < DEC_MAXQ; ++r) {
        if (lane == 0) { sm_m[warp][r] = m[r]; sm_l[warp][r] = l[r]; }
        #pragma unroll
        for (int e = 0; e < E; ++e)
            if (att_in<D>(lane * E + e)) sm_acc[warp][r][lane * E + e] = acc[r][e];
    }
    __syncthreads();
    for (int r = 0; r < nq; ++r)
        attn_decode_write_partial<D, DEC_MAXQ>(sm_m, sm_l, sm_acc, r, ((size_t)b * n_new + i0 + r) * nh + h, split,
                                               nsplit, part_o, part_ml);
}

// One block of D threads per (row, head): merges the splits and normalises.
template <typename T, int D>
__device__ void attn_decode_combine(const float* __restrict__ part_o, const float* __restrict__ part_ml, int nsplit,
                                    T* __restrict__ o) {
    const size_t row = blockIdx.x;
    const int d = threadIdx.x;
    float M = -SMELT_INF;
    for (int s = 0; s < nsplit; ++s) M = fmaxf(M, part_ml[(row * nsplit + s) * 2]);
    float ls = 0.f, a = 0.f;
    for (int s = 0; s < nsplit; ++s) {
        const float ms = part_ml[(row * nsplit + s) * 2];
        if (ms == -SMELT_INF) continue;  // split holds no visible key
        const float w = exp2f(ms - M);
        ls += part_ml[(row * nsplit + s) * 2 + 1] * w;
        a += part_o[(row * nsplit + s) * D + d] * w;
    }
    att_st(o + row * D + d, a / ls);
}

#define ATT_DEC(SUF, T, D)                                                                              \
    extern "C" __global__ void __launch_bounds__(128) attn_decode_partial_##SUF(                        \
        const T* q, const T* kc, const T* vc, const u32* cache_lens, const u32* slots, int n_new, int nh, \
        int nkv, int max_len, int chunk, int nsplit, float scale, float* part_o, float* part_ml) {      \
        attn_decode_partial<T, D>(q, kc, vc, cache_lens, slots, n_new, nh, nkv, max_len, chunk, nsplit, \
                                  scale, part_o, part_ml);                                              \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(128) attn_decode_combine_##SUF(                        \
        const float* part_o, const float* part_ml, int nsplit, T* o) {                                  \
        attn_decode_combine<T, D>(part_o, part_ml, nsplit, o);                                          \
    }
ATT_FOR_EACH_DIM(ATT_DEC, float, f32)
ATT_FOR_EACH_DIM(ATT_DEC, bf16_t, bf16)

// ---------------------------------------------------------------- decode v2 (grouped, key-parallel)
#define DEC2_R 8  // query rows (heads of one KV group × new tokens) per block

// Partial attention of every query head of KV head g for nt ≤ tq new tokens of batch row b
// (R = group·nt ≤ 8 rows, row r = token r / group, head g·group + r % group), over keys
// [split·chunk, min((split+1)·chunk, L)). Each K/V row is read once for all R rows. A warp takes
// 32 keys at a time: lane j computes the R scores of key j from a whole K row (16-byte loads)
// against the queries in shared memory, the warp updates the R online softmaxes, then lanes
// split D and stream the 32 V rows (coalesced) into acc. Writes v1's partial layout, so v1's
// combine kernel finishes the job.
// VPRE (v3, bf16 only): each lane loads its slice of all 32 V rows into registers before the
// scores are computed, so the V loads are in flight together with the K loads; v2 issues them
// four rows at a time after the softmax, which leaves the memory system mostly idle.
template <int W>
__device__ __forceinline__ void dec_ldw(const bf16_t* p, u32 (&w)[W]) {
    if constexpr (W == 1) {
        w[0] = *reinterpret_cast<const u32*>(p);
    } else {
        const uint2 v = *reinterpret_cast<const uint2*>(p);
        w[0] = v.x;
        w[1] = v.y;
    }
}
// acc[r] += p[r][jj]·v for the block's R rows: key jj's V row v (a lane's E elements).
template <int E>
__device__ __forceinline__ void dec_accumulate(float (&acc)[DEC2_R][E], const float (&p)[DEC2_R][32], int jj,
                                               const float (&v)[E], int R) {
    #pragma unroll
    for (int r = 0; r < DEC2_R; ++r) {
        if (r < R) {
            const float pr = p[r][jj];
            #pragma unroll
            for (int e = 0; e < E; ++e) acc[r][e] += pr * v[e];
        }
    }
}
template <typename T, int D, bool VPRE>
__device__ void attn_decode_v2_partial(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
                                       const u32* __restrict__ cache_lens, const u32* __restrict__ slots, int n_new,
                                       int nh, int nkv, int max_len, int chunk, int nsplit, float scale, int tq,
                                       float* __restrict__ part_o,
                                       float* __restrict__ part_ml) {
    constexpr int E = D / 32;              // V elements per lane
    constexpr int NV = 16 / sizeof(T);     // K elements per 16-byte load
    __shared__ float sq[DEC2_R][D];        // queries, pre-scaled to log2 units
    __shared__ float sp[4][DEC2_R][32];    // each warp's probabilities for its current 32 keys
    __shared__ float sm_m[4][DEC2_R], sm_l[4][DEC2_R];
    __shared__ float sacc[4][DEC2_R][D];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int split = blockIdx.x, g = blockIdx.y;
    const int group = nh / nkv;
    const int ntg = (n_new + tq - 1) / tq;
    const int b = blockIdx.z / ntg, i0 = (blockIdx.z % ntg) * tq;
    const int R = group * min(tq, n_new - i0);
    const int L = (int)cache_lens[b];
    const int first = L - n_new;  // position of new token 0
    const int ck = dec_chunk(chunk, L, nsplit);
    const int kbeg = split * ck;
    const int kend = min(kbeg + ck, L);
    const float sl2 = scale * ATT_LOG2E;

    for (int x = threadIdx.x; x < R * D; x += blockDim.x) {
        const int r = x / D, d = x - r * D;
        sq[r][d] = att_ld(q + (((size_t)b * n_new + i0 + r / group) * nh + g * group + r % group) * D + d) * sl2;
    }
    __syncthreads();

    float acc[DEC2_R][E], m[DEC2_R], l[DEC2_R];
    #pragma unroll
    for (int r = 0; r < DEC2_R; ++r) {
        m[r] = -SMELT_INF;
        l[r] = 0.f;
        #pragma unroll
        for (int e = 0; e < E; ++e) acc[r][e] = 0.f;
    }
    const size_t stride = (size_t)nkv * D;  // between consecutive cache positions
    const size_t slot = slots ? slots[b] : (u32)b;
    const T* kb = kc + (slot * max_len * nkv + g) * D;
    const T* vb = vc + (slot * max_len * nkv + g) * D + lane * E;
    constexpr int VW = VPRE ? E / 2 : 1;  // 32-bit words of a lane's V slice (bf16 pairs)
    for (int j0 = kbeg + 32 * warp; j0 < kend; j0 += 128) {
        const int j = j0 + lane;
        const int nj = min(32, kend - j0);
        u32 vw[VPRE ? 32 : 1][VW];
        if constexpr (VPRE) {
            #pragma unroll
            for (int jj = 0; jj < 32; ++jj)
                if (jj < nj) dec_ldw<VW>(reinterpret_cast<const bf16_t*>(vb) + (size_t)(j0 + jj) * stride, vw[jj]);
        }
        float s[DEC2_R];
        #pragma unroll
        for (int r = 0; r < DEC2_R; ++r) s[r] = 0.f;
        if (j < kend) {
            const T* kr = kb + (size_t)j * stride;
            #pragma unroll
            for (int c = 0; c < D; c += NV) {
                float kf[NV];
                ld16(kr + c, kf);
                #pragma unroll
                for (int r = 0; r < DEC2_R; ++r) {
                    if (r < R) {
                        #pragma unroll
                        for (int e = 0; e < NV; ++e) s[r] += sq[r][c + e] * kf[e];
                    }
                }
            }
        }
        #pragma unroll
        for (int r = 0; r < DEC2_R; ++r) {
            if (r >= R) continue;  // block-uniform
            const bool vis = j < kend && j <= first + i0 + r / group;
            const float sr = vis ? s[r] : -SMELT_INF;
            const float mt = warp_max(sr);
            float p = 0.f;
            if (mt != -SMELT_INF) {  // warp-uniform: some key of these 32 is visible to row r
                const float mn = fmaxf(m[r], mt);
                const float alpha = exp2f(m[r] - mn);
                p = vis ? exp2f(sr - mn) : 0.f;
                l[r] = l[r] * alpha + warp_sum(p);
                #pragma unroll
                for (int e = 0; e < E; ++e) acc[r][e] *= alpha;
                m[r] = mn;
            }
            sp[warp][r][lane] = p;
        }
        __syncwarp();
        if constexpr (VPRE) {
            #pragma unroll
            for (int jj = 0; jj < 32; ++jj) {
                if (jj >= nj) break;
                float vf[E];
                #pragma unroll
                for (int w = 0; w < VW; ++w) {
                    vf[2 * w] = bf16_to_f32((bf16_t)(vw[jj][w] & 0xffffu));
                    vf[2 * w + 1] = bf16_to_f32((bf16_t)(vw[jj][w] >> 16));
                }
                dec_accumulate<E>(acc, sp[warp], jj, vf, R);
            }
        } else {
            #pragma unroll 4
            for (int jj = 0; jj < nj; ++jj) {
                const T* vr = vb + (size_t)(j0 + jj) * stride;
                float vf[E];
                #pragma unroll
                for (int e = 0; e < E; ++e) vf[e] = att_ld(vr + e);
                dec_accumulate<E>(acc, sp[warp], jj, vf, R);
            }
        }
        __syncwarp();  // sp is rewritten by the next 32 keys
    }
    #pragma unroll
    for (int r = 0; r < DEC2_R; ++r) {
        if (r >= R) continue;
        if (lane == 0) { sm_m[warp][r] = m[r]; sm_l[warp][r] = l[r]; }
        #pragma unroll
        for (int e = 0; e < E; ++e) sacc[warp][r][lane * E + e] = acc[r][e];
    }
    __syncthreads();
    for (int r = 0; r < R; ++r)
        attn_decode_write_partial<D, DEC2_R>(sm_m, sm_l, sacc, r,
                                             ((size_t)b * n_new + i0 + r / group) * nh + g * group + r % group,
                                             split, nsplit, part_o, part_ml);
}

#define ATT_DEC_V2(V, SUF, T, D, VPRE)                                                                 \
    extern "C" __global__ void __launch_bounds__(128) attn_decode_v##V##_partial_##SUF(                \
        const T* q, const T* kc, const T* vc, const u32* cache_lens, const u32* slots, int n_new, int nh, \
        int nkv, int max_len, int chunk, int nsplit, float scale, int tq, float* part_o, float* part_ml) { \
        attn_decode_v2_partial<T, D, VPRE>(q, kc, vc, cache_lens, slots, n_new, nh, nkv, max_len, chunk, \
                                           nsplit, scale, tq, part_o, part_ml);                        \
    }
ATT_DEC_V2(2, f32_d64, float, 64, false)
ATT_DEC_V2(2, f32_d128, float, 128, false)
ATT_DEC_V2(2, bf16_d64, bf16_t, 64, false)
ATT_DEC_V2(2, bf16_d128, bf16_t, 128, false)
ATT_DEC_V2(3, bf16_d64, bf16_t, 64, true)
ATT_DEC_V2(3, bf16_d128, bf16_t, 128, true)

// ---------------------------------------------------------------- KV cache append
// Row r of new [N, row] goes to cache[(slots[r]·max_len + positions[r])·row ...].
template <typename T>
__device__ void kv_cache_append(T* __restrict__ cache, const T* __restrict__ fresh, const u32* __restrict__ slots,
                                const u32* __restrict__ positions, u64 n_rows, u64 row, u64 max_len) {
    const u64 n = n_rows * row;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / row, c = i % row;
        cache[((u64)slots[r] * max_len + positions[r]) * row + c] = fresh[i];
    }
}
extern "C" __global__ void kv_cache_append_f32(float* cache, const float* fresh, const u32* slots, const u32* positions,
                                               u64 n_rows, u64 row, u64 max_len) {
    kv_cache_append<float>(cache, fresh, slots, positions, n_rows, row, max_len);
}
extern "C" __global__ void kv_cache_append_bf16(bf16_t* cache, const bf16_t* fresh, const u32* slots,
                                                const u32* positions, u64 n_rows, u64 row, u64 max_len) {
    kv_cache_append<bf16_t>(cache, fresh, slots, positions, n_rows, row, max_len);
}
