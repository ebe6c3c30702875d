// logprob_entropy.cu — the RL head's per-token statistics: log-prob of the target, entropy,
// log-sum-exp, rank of the target and argmax, plus the row kernel of their backward.
//
// With x = z / T (T the temperature, passed as inv_t = 1/T) and p = softmax(x), per row:
//   lse = log Σ exp(x), logp = x_y − lse, entropy = lse − Σ p·x,
//   rank = 1 + #{v ≠ y : x_v > x_y}, argmax = first index of max x.
//   dz_v = (g_logp·(1[v=y] − p_v) − g_entropy·p_v·(log p_v + entropy)) / T.
// A target of 0xffffffff (LE_IGNORE) marks a row without target: logp 0, rank 0, and its
// g_logp is ignored; entropy/lse/argmax are still computed.
//
// Masked logits (−inf, e.g. top-k or a banned token) have p = 0: le_push skips them (they add
// nothing to s or t) and le_dz gives them dz = 0 exactly (p·log p → 0; log p is clamped at
// LE_LP_MIN where p is zeroed, so 0·(−inf) never forms). A masked target gives logp = −inf,
// rank 1 + #finite logits, and dz_y = g_logp/T (the indicator term; the rest of the row stays
// finite). A row whose logits are all −inf is degenerate: lse = −inf, entropy NaN, logp NaN
// (0 when ignored), rank 1, argmax 0, and its dz is NaN throughout. Same as the CPU reference.
//
// Online state per row (LeState), relative to the running max m: s = Σ exp(x − m),
// t = Σ exp(x − m)·(x − m), cnt, amax. Entropy = log s − t/s, which avoids the cancellation of
// lse − E[x]. One exp per element: a new max rescales (s, t) with the exp it computes anyway.
//
// Layout: row-major. Fused head (launcher in kernels/src/logprob_entropy.rs): h [N,H] and
// W [V,H] (f32, or bf16 as raw u16), a cuBLAS GEMM writes one chunk of logits into an f32
// scratch [rows, ncols] (ncols = chunk width, col0 = its first vocabulary id); row state lives
// in separate [N] arrays (m, s, t f32; cnt, amax u32) and the scaled target logit xt [N].
// Materialised variant: logits [N,V] f32 or bf16, read once.
//
// Work mapping:
//   le_init_{f32,bf16}  one warp per row: xt = (h_i · W_y)/T (f32 accumulation), state reset.
//   le_chunk_update     one block per row of the scratch: each thread folds a strided subset
//                       of the row into a private LeState, block merge, thread 0 merges into
//                       the row's saved state (earlier chunks win argmax ties).
//   le_finalize         one thread per row: state → logp, entropy, lse, rank, argmax.
//   le_logits_fwd_*     one block per row of materialised logits, single pass, init and
//                       finalize fused in.
//   le_dz_*             one block per row: logits → dz (in place for f32 → f32, or f32 → bf16
//                       for the bf16 GEMMs of the fused backward; bf16 → bf16 for the
//                       materialised backward).
// Vector loads: 4 elements per access (float4 / 8-byte bf16x4) when the row length is a
// multiple of 4 and the row pointer is aligned; scalar otherwise.
//
// Versions:
//   v1 scalar loads, two passes (max, then sums)
//   v2 single pass with online rescaling, 4-wide vector loads
//   v3 v2 with le_dz exact (0, not NaN) for −inf logits
//   v4 forward scans (le_chunk_update_v4, le_logits_fwd_v4_*): 16-byte loads (8 bf16 / 4 f32),
//      two in flight per thread, and one max + at most one rescale per 8- or 4-element group
//      (le_push_group) instead of a branch per element; rows not 16-byte aligned or not a
//      multiple of the group fall back to v3's scan. The default; the backward kernels are v3's.
//      A +inf logit gives lse = NaN here (v3: +inf); both are degenerate rows.

#define LE_IGNORE 0xffffffffu

struct LeState {
    float m, s, t;
    u32 cnt, amax;
};

__device__ __forceinline__ LeState le_empty() {
    LeState st;
    st.m = -SMELT_INF;
    st.s = 0.f;
    st.t = 0.f;
    st.cnt = 0u;
    st.amax = 0u;
    return st;
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16_t x) { return bf16_to_f32(x); }
__device__ __forceinline__ void store1(float* p, u32 j, float v) { p[j] = v; }
__device__ __forceinline__ void store1(bf16_t* p, u32 j, float v) { p[j] = f32_to_bf16(v); }

__device__ __forceinline__ void load4(const float* p, u32 j, float v[4]) {
    float4 q = ((const float4*)p)[j];
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
}
__device__ __forceinline__ void load4(const bf16_t* p, u32 j, float v[4]) {
    uint2 q = ((const uint2*)p)[j];
    v[0] = bf16_to_f32((bf16_t)(q.x & 0xffffu));
    v[1] = bf16_to_f32((bf16_t)(q.x >> 16));
    v[2] = bf16_to_f32((bf16_t)(q.y & 0xffffu));
    v[3] = bf16_to_f32((bf16_t)(q.y >> 16));
}
__device__ __forceinline__ void store4(float* p, u32 j, const float v[4]) {
    ((float4*)p)[j] = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(bf16_t* p, u32 j, const float v[4]) {
    uint2 q;
    q.x = (u32)f32_to_bf16(v[0]) | ((u32)f32_to_bf16(v[1]) << 16);
    q.y = (u32)f32_to_bf16(v[2]) | ((u32)f32_to_bf16(v[3]) << 16);
    ((uint2*)p)[j] = q;
}

template <typename T>
__device__ __forceinline__ bool le_vec_ok(const T* p, u32 ncols) {
    return (ncols & 3u) == 0u && ((u64)p % (4 * sizeof(T))) == 0;
}

// Folds one scaled logit x of vocabulary id idx into the state. xt is the scaled target logit
// (NaN for an ignored row, so nothing counts).
__device__ __forceinline__ void le_push(LeState& st, float x, u32 idx, float xt, u32 y) {
    st.cnt += (u32)((x > xt) && (idx != y));
    if (x > st.m) {
        float d = st.m - x;              // -inf on the first element: a = 0
        float a = __expf(d);
        st.t = (st.s > 0.f) ? a * fmaf(d, st.s, st.t) : 0.f;
        st.s = fmaf(st.s, a, 1.f);
        st.m = x;
        st.amax = idx;
    } else if (x != -SMELT_INF) {       // masked logits add nothing; NaN propagates
        float d = x - st.m;
        float e = __expf(d);
        st.s += e;
        st.t = fmaf(e, d, st.t);
    }
}

// a ← a ∪ b. Ties for the max keep the smaller index.
__device__ __forceinline__ void le_merge(LeState& a, const LeState& b) {
    const u32 cnt = a.cnt + b.cnt;
    if (b.s == 0.f) { a.cnt = cnt; return; }
    if (a.s == 0.f) { a = b; a.cnt = cnt; return; }
    const bool take_b = b.m > a.m || (b.m == a.m && b.amax < a.amax);
    const float M = fmaxf(a.m, b.m);
    const float da = a.m - M, db = b.m - M;
    const float ea = __expf(da), eb = __expf(db);
    a.t = ea * fmaf(da, a.s, a.t) + eb * fmaf(db, b.s, b.t);
    a.s = a.s * ea + b.s * eb;
    a.amax = take_b ? b.amax : a.amax;
    a.m = M;
    a.cnt = cnt;
}

__device__ __forceinline__ LeState le_shfl_xor(const LeState& st, int o) {
    LeState r;
    r.m = __shfl_xor_sync(0xffffffffu, st.m, o);
    r.s = __shfl_xor_sync(0xffffffffu, st.s, o);
    r.t = __shfl_xor_sync(0xffffffffu, st.t, o);
    r.cnt = __shfl_xor_sync(0xffffffffu, st.cnt, o);
    r.amax = __shfl_xor_sync(0xffffffffu, st.amax, o);
    return r;
}

__device__ __forceinline__ LeState le_warp_reduce(LeState st) {
#ifdef SMELT_EMU  // the same butterfly in one warp rendezvous (cuda_emu.hpp)
    return smelt_emu::butterfly(st, [](LeState a, const LeState& b) { le_merge(a, b); return a; }, "le_warp_reduce");
#else
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) le_merge(st, le_shfl_xor(st, o));
    return st;
#endif
}

// Merge over the block; the result is valid in thread 0. blockDim.x: a multiple of 32, ≤ 1024.
__device__ __forceinline__ LeState le_block_reduce(LeState st) {
    __shared__ LeState sm[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    st = le_warp_reduce(st);
    if (lane == 0) sm[warp] = st;
    __syncthreads();
    if (warp == 0) {
        st = lane < nwarps ? sm[lane] : le_empty();
        st = le_warp_reduce(st);
    }
    return st;
}

// This thread's share of one row: columns threadIdx.x, +blockDim.x, … in ascending order, so
// strict > keeps the first index of a thread's max.
template <typename T>
__device__ __forceinline__ LeState le_scan_row(const T* zr, u32 ncols, u32 col0, float inv_t, float xt, u32 y) {
    LeState st = le_empty();
    if (le_vec_ok(zr, ncols)) {
        const u32 n4 = ncols >> 2;
        for (u32 j = threadIdx.x; j < n4; j += blockDim.x) {
            float v[4];
            load4(zr, j, v);
            #pragma unroll
            for (int k = 0; k < 4; ++k) le_push(st, v[k] * inv_t, col0 + 4 * j + k, xt, y);
        }
    } else {
        for (u32 j = threadIdx.x; j < ncols; j += blockDim.x) le_push(st, to_f32(zr[j]) * inv_t, col0 + j, xt, y);
    }
    return st;
}

// v4: folds K consecutive scaled logits (vocabulary ids idx0 … idx0+K−1) into the state with
// one max and at most one rescale per group instead of a branch per element. Ties keep the
// first index (strict >, and the group's ids come after every id the state has seen).
template <int K>
__device__ __forceinline__ void le_push_group(LeState& st, const float* x, u32 idx0, float xt, u32 y) {
    float gm = -SMELT_INF;  // not x[0]: a NaN there would hide the group's real max
    u32 gi = 0;
    #pragma unroll
    for (int k = 0; k < K; ++k) {
        st.cnt += (u32)((x[k] > xt) && (idx0 + k != y));
        if (x[k] > gm) {
            gm = x[k];
            gi = k;
        }
    }
    if (gm > st.m) {
        const float d = st.m - gm;  // -inf on the first finite group: a = 0
        const float a = __expf(d);
        st.t = (st.s > 0.f) ? a * fmaf(d, st.s, st.t) : 0.f;
        st.s *= a;
        st.m = gm;
        st.amax = idx0 + gi;
    }
    #pragma unroll
    for (int k = 0; k < K; ++k) {
        if (x[k] != -SMELT_INF) {  // masked logits add nothing; NaN propagates
            const float d = x[k] - st.m;
            const float e = __expf(d);
            st.s += e;
            st.t = fmaf(e, d, st.t);
        }
    }
}

// v4 share of one row: 16-byte loads (8 bf16 or 4 f32) folded as groups, two loads in flight
// per thread; rows that are not 16-byte aligned or a multiple of the group take v3's path.
template <typename T>
__device__ __forceinline__ LeState le_scan_row_v4(const T* zr, u32 ncols, u32 col0, float inv_t, float xt, u32 y) {
    constexpr u32 K = 16 / sizeof(T);
    if (ncols % K != 0 || (u64)zr % 16 != 0) return le_scan_row(zr, ncols, col0, inv_t, xt, y);
    LeState st = le_empty();
    const u32 ng = ncols / K;
    u32 j = threadIdx.x;
    // Groups j and j + blockDim.x: both loads issued before either is folded, in column order.
    for (; j + blockDim.x < ng; j += 2 * blockDim.x) {
        float a[K], b[K];
        ld16(zr + (u64)j * K, a);
        ld16(zr + (u64)(j + blockDim.x) * K, b);
        #pragma unroll
        for (u32 k = 0; k < K; ++k) {
            a[k] *= inv_t;
            b[k] *= inv_t;
        }
        le_push_group<K>(st, a, col0 + j * K, xt, y);
        le_push_group<K>(st, b, col0 + (j + blockDim.x) * K, xt, y);
    }
    if (j < ng) {
        float a[K];
        ld16(zr + (u64)j * K, a);
        #pragma unroll
        for (u32 k = 0; k < K; ++k) a[k] *= inv_t;
        le_push_group<K>(st, a, col0 + j * K, xt, y);
    }
    return st;
}

__device__ __forceinline__ void le_write(const LeState& st, u32 row, u32 y, float xt, float* logp, float* ent,
                                         float* lse, u32* rank, u32* argmax) {
    const float ls = logf(st.s);
    const float L = st.m + ls;
    const float e = ls - st.t / st.s;
    const bool ign = y == LE_IGNORE;
    lse[row] = L;
    ent[row] = e < 0.f ? 0.f : e;   // rounding can dip below 0 for a one-hot row; NaN stays
    logp[row] = ign ? 0.f : xt - L;
    if (rank) rank[row] = ign ? 0u : st.cnt + 1u;
    if (argmax) argmax[row] = st.amax;
}

// ---- fused head ------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void le_init_impl(const T* __restrict__ h, const T* __restrict__ w,
                                             const u32* __restrict__ targets, u32 n, u32 hd, float inv_t,
                                             float* __restrict__ xt, float* __restrict__ st_m,
                                             float* __restrict__ st_s, float* __restrict__ st_t,
                                             u32* __restrict__ st_cnt, u32* __restrict__ st_amax) {
    const u32 row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= n) return;   // whole warps leave together
    const u32 y = targets[row];
    float acc = 0.f;
    if (y != LE_IGNORE) {
        const T* hr = h + (u64)row * hd;
        const T* wr = w + (u64)y * hd;
        for (u32 k = lane; k < hd; k += 32) acc = fmaf(to_f32(hr[k]), to_f32(wr[k]), acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) {
        xt[row] = y == LE_IGNORE ? __int_as_float(0x7fc00000) : acc * inv_t;
        st_m[row] = -SMELT_INF;
        st_s[row] = 0.f;
        st_t[row] = 0.f;
        st_cnt[row] = 0u;
        st_amax[row] = 0u;
    }
}

extern "C" __global__ void le_init_f32(const float* h, const float* w, const u32* targets, u32 n, u32 hd,
                                       float inv_t, float* xt, float* st_m, float* st_s, float* st_t,
                                       u32* st_cnt, u32* st_amax) {
    le_init_impl(h, w, targets, n, hd, inv_t, xt, st_m, st_s, st_t, st_cnt, st_amax);
}

extern "C" __global__ void le_init_bf16(const bf16_t* h, const bf16_t* w, const u32* targets, u32 n, u32 hd,
                                        float inv_t, float* xt, float* st_m, float* st_s, float* st_t,
                                        u32* st_cnt, u32* st_amax) {
    le_init_impl(h, w, targets, n, hd, inv_t, xt, st_m, st_s, st_t, st_cnt, st_amax);
}

// z: the scratch [gridDim.x, ncols] of raw logits for vocabulary ids col0..col0+ncols; the
// state pointers are already offset to the scratch's first row.
template <int VER>
__device__ __forceinline__ void le_chunk_update_impl(const float* __restrict__ z, u32 ncols, u32 col0,
                                                     const u32* __restrict__ targets, const float* __restrict__ xt,
                                                     float inv_t, float* __restrict__ st_m, float* __restrict__ st_s,
                                                     float* __restrict__ st_t, u32* __restrict__ st_cnt,
                                                     u32* __restrict__ st_amax) {
    const u32 row = blockIdx.x;
    const u32 y = targets[row];
    const float x_t = xt[row];
    const float* zr = z + (u64)row * ncols;
    LeState st = VER >= 4 ? le_scan_row_v4(zr, ncols, col0, inv_t, x_t, y) : le_scan_row(zr, ncols, col0, inv_t, x_t, y);
    st = le_block_reduce(st);
    if (threadIdx.x == 0) {
        LeState a;
        a.m = st_m[row];
        a.s = st_s[row];
        a.t = st_t[row];
        a.cnt = st_cnt[row];
        a.amax = st_amax[row];
        le_merge(a, st);
        st_m[row] = a.m;
        st_s[row] = a.s;
        st_t[row] = a.t;
        st_cnt[row] = a.cnt;
        st_amax[row] = a.amax;
    }
}

#define LE_CHUNK_UPDATE(NAME, VER)                                                                          \
    extern "C" __global__ void NAME(const float* z, u32 ncols, u32 col0, const u32* targets, const float* xt, \
                                    float inv_t, float* st_m, float* st_s, float* st_t, u32* st_cnt,         \
                                    u32* st_amax) {                                                          \
        le_chunk_update_impl<VER>(z, ncols, col0, targets, xt, inv_t, st_m, st_s, st_t, st_cnt, st_amax);     \
    }
LE_CHUNK_UPDATE(le_chunk_update, 3)
LE_CHUNK_UPDATE(le_chunk_update_v4, 4)

// rank and argmax may be null (not requested).
extern "C" __global__ void le_finalize(u32 n, const u32* __restrict__ targets, const float* __restrict__ xt,
                                       const float* __restrict__ st_m, const float* __restrict__ st_s,
                                       const float* __restrict__ st_t, const u32* __restrict__ st_cnt,
                                       const u32* __restrict__ st_amax, float* __restrict__ logp,
                                       float* __restrict__ ent, float* __restrict__ lse, u32* __restrict__ rank,
                                       u32* __restrict__ argmax) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    LeState st;
    st.m = st_m[i];
    st.s = st_s[i];
    st.t = st_t[i];
    st.cnt = st_cnt[i];
    st.amax = st_amax[i];
    le_write(st, i, targets[i], xt[i], logp, ent, lse, rank, argmax);
}

// ---- materialised logits ---------------------------------------------------------------------

template <int VER, typename T>
__device__ __forceinline__ void le_logits_fwd_impl(const T* __restrict__ logits, u32 V,
                                                   const u32* __restrict__ targets, float inv_t,
                                                   float* __restrict__ logp, float* __restrict__ ent,
                                                   float* __restrict__ lse, u32* __restrict__ rank,
                                                   u32* __restrict__ argmax) {
    const u32 row = blockIdx.x;
    const T* zr = logits + (u64)row * V;
    const u32 y = targets[row];
    // Every thread reads the same address: one broadcast transaction.
    const float x_t = y == LE_IGNORE ? __int_as_float(0x7fc00000) : to_f32(zr[y]) * inv_t;
    LeState st = VER >= 4 ? le_scan_row_v4(zr, V, 0u, inv_t, x_t, y) : le_scan_row(zr, V, 0u, inv_t, x_t, y);
    st = le_block_reduce(st);
    if (threadIdx.x == 0) le_write(st, row, y, x_t, logp, ent, lse, rank, argmax);
}

#define LE_LOGITS_FWD(NAME, T, VER)                                                                   \
    extern "C" __global__ void NAME(const T* logits, u32 V, const u32* targets, float inv_t, float* logp, \
                                    float* ent, float* lse, u32* rank, u32* argmax) {                  \
        le_logits_fwd_impl<VER>(logits, V, targets, inv_t, logp, ent, lse, rank, argmax);              \
    }
LE_LOGITS_FWD(le_logits_fwd_f32, float, 3)
LE_LOGITS_FWD(le_logits_fwd_bf16, bf16_t, 3)
LE_LOGITS_FWD(le_logits_fwd_v4_f32, float, 4)
LE_LOGITS_FWD(le_logits_fwd_v4_bf16, bf16_t, 4)

// ---- backward row kernel ---------------------------------------------------------------------

// Below this log p, p is taken as exactly 0 (f32 exp underflows about here; the CPU's EXP_MIN).
#define LE_LP_MIN (-87.f)

// log p is clamped at LE_LP_MIN and p zeroed there, so a −inf logit (log p = −inf) gives
// p·(log p + H) = 0, its limit, instead of 0·(−inf) = NaN. NaN compares false and propagates.
__device__ __forceinline__ float le_dz(float x, bool is_y, float L, float H, float gl, float ge, float inv_t) {
    float lp = x - L;
    lp = lp < LE_LP_MIN ? LE_LP_MIN : lp;
    const float p = lp == LE_LP_MIN ? 0.f : __expf(lp);
    return (gl * ((is_y ? 1.f : 0.f) - p) - ge * p * (lp + H)) * inv_t;
}

// One block per row: z [rows, ncols] raw logits → out [rows, ncols] dz. `z` and `out` may be
// the same buffer (each element is read and written by the same thread), hence no restrict.
template <typename TI, typename TO>
__device__ __forceinline__ void le_dz_impl(const TI* z, TO* out, u32 ncols, u32 col0, const u32* targets,
                                           const float* lse, const float* ent, const float* g_logp,
                                           const float* g_ent, float inv_t) {
    const u32 row = blockIdx.x;
    const u32 y = targets[row];
    const float L = lse[row], H = ent[row], ge = g_ent[row];
    const float gl = y == LE_IGNORE ? 0.f : g_logp[row];   // logp ≡ 0 on an ignored row
    const u32 yl = y - col0;                               // wraps out of range when y ∉ chunk
    const TI* zr = z + (u64)row * ncols;
    TO* outr = out + (u64)row * ncols;
    if (le_vec_ok(zr, ncols) && le_vec_ok(outr, ncols)) {
        const u32 n4 = ncols >> 2;
        for (u32 j = threadIdx.x; j < n4; j += blockDim.x) {
            float v[4];
            load4(zr, j, v);
            #pragma unroll
            for (int k = 0; k < 4; ++k) v[k] = le_dz(v[k] * inv_t, 4 * j + k == yl, L, H, gl, ge, inv_t);
            store4(outr, j, v);
        }
    } else {
        for (u32 j = threadIdx.x; j < ncols; j += blockDim.x)
            store1(outr, j, le_dz(to_f32(zr[j]) * inv_t, j == yl, L, H, gl, ge, inv_t));
    }
}

extern "C" __global__ void le_dz_f32(const float* z, float* out, u32 ncols, u32 col0, const u32* targets,
                                     const float* lse, const float* ent, const float* g_logp, const float* g_ent,
                                     float inv_t) {
    le_dz_impl(z, out, ncols, col0, targets, lse, ent, g_logp, g_ent, inv_t);
}

extern "C" __global__ void le_dz_f32_to_bf16(const float* z, bf16_t* out, u32 ncols, u32 col0,
                                             const u32* targets, const float* lse, const float* ent,
                                             const float* g_logp, const float* g_ent, float inv_t) {
    le_dz_impl(z, out, ncols, col0, targets, lse, ent, g_logp, g_ent, inv_t);
}

extern "C" __global__ void le_dz_bf16(const bf16_t* z, bf16_t* out, u32 ncols, u32 col0, const u32* targets,
                                      const float* lse, const float* ent, const float* g_logp, const float* g_ent,
                                      float inv_t) {
    le_dz_impl(z, out, ncols, col0, targets, lse, ent, g_logp, g_ent, inv_t);
}
