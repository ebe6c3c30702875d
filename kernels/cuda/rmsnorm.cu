// rmsnorm.cu — RMSNorm over the last dim, as HF Qwen: rstd = 1/sqrt(mean(x²) + eps) in f32,
// y = w · round_T(x·rstd) (for bf16 x the normalised value is rounded to bf16 before the weight,
// like HF's `weight * hidden.to(input_dtype)`), and the backward
// dx = rstd·(dy·w) − x·(rstd³·Σ(dy·w·x)/D), dw = Σ_rows dy·(x·rstd).
//
// Layout: x, y, dy, dx row-major [rows, D] (T = f32 or bf16); w [D] (W = f32 or bf16, any mix);
// rstd [rows] f32; dw [D] f32; dw scratch [chunks, D] f32. The dx kernels optionally add a
// residual gradient res [rows, D] (T) to dx as they store it (null: none), which saves the
// decoder layer's backward a separate add per norm.
// Threads:
//   forward / dx, v1 and v2: one warp per row, 8 rows (warps) per 256-thread block. A lane
//     handles N consecutive elements per step (N = 16 bytes of T through one 16-byte load when
//     the launcher finds D % N == 0 and 16-byte aligned rows; N = 1 otherwise); warp_sum
//     reduces. Each step's loads feed the next dependent FMA, and the second pass re-reads the
//     row (from L1/L2), so a warp has little memory traffic in flight: latency-bound.
//   forward / dx, v3 (16-byte rows only): the row is held in registers. A group of L lanes owns
//     a row (L = 32, or 16 or 8 when the row has at most that many 16-byte chunks, so per-head
//     norms over head_dim 64/128 do not leave most of the warp idle); lane g holds chunks
//     g, g+L, g+2L, … (at most C of them, C = 1..16 picked by the launcher from D: D ≤ 4096 bf16
//     or 2048 f32), loading them all before any arithmetic. dx holds x and dy; w is re-read
//     from L1. Bit-identical to v2: each lane accumulates the same chunks in the same order,
//     and in v2 a row of ≤ L chunks leaves lanes ≥ L holding +0, so warp_sum's first steps
//     only add +0 to the lanes < L (group_sum says how it matches them).
//   dw: deterministic two-kernel reduction over fixed row chunks (the chunking depends only on
//     `rows`): dw_partial writes scratch[chunk, j] = Σ_{rows r of the chunk, in order}, dw_reduce
//     sums the chunks in order. v1/v2: one thread per column, grid (ceil(D/256), chunks), one
//     dependent 2- or 4-byte load per row. v3: a thread owns 2 adjacent columns (one 4- or 8-byte
//     load per row), a 2-D block (columns × chunks) so narrow D still fills blocks, and 8 rows
//     loaded ahead of their (still in-order) additions; its reduce loads 16 chunks ahead. Same
//     additions in the same order per column, so the same bits as v1/v2.
// add_rmsnorm (rmsnorm_add_fwd_*): the forward of s = round_T(x + r) — the residual add, whose
//   sum it also writes — in the same kernel, versions and thread mapping; only same-dtype
//   (x, w) pairs. It saves a launch and a pass over the rows per residual add in inference and
//   training forwards; its backward is add's and rmsnorm's.
// Arithmetic uses explicit _rn intrinsics where the CPU reference rounds, so the compiler does
// not contract into FMAs and CUDA follows the CPU's rounding steps.
// Versions:
//   v1 warp per row, scalar loads (any D / alignment)
//   v2 warp per row, 16-byte vector loads (needs D % N == 0 and aligned rows)
//   v3 row cached in registers, backward with the faster dw kernels (needs v2's alignment and
//      D ≤ 512 chunks of 16 bytes; default where it fits, else v2, else v1)

// N weights for a chunk of N activations of type T: one 16-byte load when W and T have the
// same width (the launcher checked w's alignment), scalar loads from cache otherwise.
template <typename W, typename T, int N> __device__ __forceinline__ void ldw(const W* p, float* f) {
    if constexpr (N > 1 && sizeof(W) == sizeof(T)) {
        ld16(p, f);
    } else {
        #pragma unroll
        for (int k = 0; k < N; ++k) f[k] = ld1(p + k);
    }
}

// R (add_rmsnorm): the row normalised is s = round_T(x + r), written to `s` on the way (the
// first pass stores it, the second re-reads it: the same lane, the same addresses).
template <typename T, typename W, int N, bool R = false>
__device__ __forceinline__ void rmsnorm_fwd(T* y, float* rstd, const T* x, const W* w, float eps, u64 rows, u32 d,
                                            T* s = nullptr, const T* r = nullptr) {
    const u32 lane = threadIdx.x & 31;
    const u64 row = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // the whole warp leaves together
    const T* xr = x + row * d;
    T* yr = y + row * d;
    float ss = 0.0f;
    for (u32 c = lane * N; c < d; c += 32 * N) {
        float v[N];
        ldn<T, N>(xr + c, v);
        if constexpr (R) {
            float rv[N];
            ldn<T, N>(r + row * d + c, rv);
            #pragma unroll
            for (int k = 0; k < N; ++k) v[k] = round_to(__fadd_rn(v[k], rv[k]), x);
            stn<T, N>(s + row * d + c, v);
        }
        #pragma unroll
        for (int k = 0; k < N; ++k) ss = __fmaf_rn(v[k], v[k], ss);
    }
    ss = warp_sum(ss);
    const float rs = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)d), eps)));
    if (lane == 0) rstd[row] = rs;
    const T* nr = R ? s + row * d : xr;
    for (u32 c = lane * N; c < d; c += 32 * N) {
        float v[N], wv[N], o[N];
        ldn<T, N>(nr + c, v);
        ldw<W, T, N>(w + c, wv);
        #pragma unroll
        for (int k = 0; k < N; ++k) o[k] = __fmul_rn(wv[k], round_to(__fmul_rn(v[k], rs), x));
        stn<T, N>(yr + c, o);
    }
}

// dx + residual (res non-null: the gradient reaching the norm's input from the residual
// stream): dx rounded to T first, then the sum in f32, rounded again by the store — the bits of
// add.cu's add(res, dx) after the plain backward.
template <typename T, int N>
__device__ __forceinline__ void add_residual(float* o, const T* res) {
    float r[N];
    ldn<T, N>(res, r);
    #pragma unroll
    for (int k = 0; k < N; ++k) o[k] = __fadd_rn(r[k], round_to(o[k], res));
}

template <typename T, typename W, int N>
__device__ __forceinline__ void rmsnorm_bwd_dx(T* dx, const T* x, const W* w, const float* rstd, const T* dy,
                                               const T* res, u64 rows, u32 d) {
    const u32 lane = threadIdx.x & 31;
    const u64 row = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const T* xr = x + row * d;
    const T* gr = dy + row * d;
    T* dxr = dx + row * d;
    float dot = 0.0f;
    for (u32 c = lane * N; c < d; c += 32 * N) {
        float v[N], g[N], wv[N];
        ldn<T, N>(xr + c, v);
        ldn<T, N>(gr + c, g);
        ldw<W, T, N>(w + c, wv);
        #pragma unroll
        for (int k = 0; k < N; ++k) dot = __fmaf_rn(__fmul_rn(g[k], wv[k]), v[k], dot);
    }
    dot = warp_sum(dot);
    const float rs = rstd[row];
    const float kk = __fdiv_rn(__fmul_rn(__fmul_rn(__fmul_rn(rs, rs), rs), dot), (float)d);
    for (u32 c = lane * N; c < d; c += 32 * N) {
        float v[N], g[N], wv[N], o[N];
        ldn<T, N>(xr + c, v);
        ldn<T, N>(gr + c, g);
        ldw<W, T, N>(w + c, wv);
        #pragma unroll
        for (int k = 0; k < N; ++k) o[k] = __fsub_rn(__fmul_rn(rs, __fmul_rn(g[k], wv[k])), __fmul_rn(v[k], kk));
        if (res) add_residual<T, N>(o, res + row * d + c);
        stn<T, N>(dxr + c, o);
    }
}

#define RMSNORM_KERNELS(SFX, T, W, N)                                                              \
    extern "C" __global__ void rmsnorm_fwd_##SFX(T* y, float* rstd, const T* x, const W* w,        \
                                                 float eps, u64 rows, u32 d) {                     \
        rmsnorm_fwd<T, W, N>(y, rstd, x, w, eps, rows, d);                                         \
    }                                                                                              \
    extern "C" __global__ void rmsnorm_bwd_dx_##SFX(T* dx, const T* x, const W* w,                 \
                                                    const float* rstd, const T* dy, const T* res,  \
                                                    u64 rows, u32 d) {                             \
        rmsnorm_bwd_dx<T, W, N>(dx, x, w, rstd, dy, res, rows, d);                                 \
    }

// v1 (scalar) and v2 (16-byte vectors) for each (x, w) dtype pair.
RMSNORM_KERNELS(f32_f32, float, float, 1)
RMSNORM_KERNELS(f32_bf16, float, bf16_t, 1)
RMSNORM_KERNELS(bf16_f32, bf16_t, float, 1)
RMSNORM_KERNELS(bf16_bf16, bf16_t, bf16_t, 1)
RMSNORM_KERNELS(f32_f32_v2, float, float, 4)
RMSNORM_KERNELS(f32_bf16_v2, float, bf16_t, 4)
RMSNORM_KERNELS(bf16_f32_v2, bf16_t, float, 8)
RMSNORM_KERNELS(bf16_bf16_v2, bf16_t, bf16_t, 8)

// add_rmsnorm (v1/v2): s = x + r, then the norm of s; w in x's dtype.
#define RMSNORM_ADD_KERNEL(SFX, T, N)                                                              \
    extern "C" __global__ void rmsnorm_add_fwd_##SFX(T* y, float* rstd, T* s, const T* x,          \
                                                     const T* r, const T* w, float eps, u64 rows,  \
                                                     u32 d) {                                      \
        rmsnorm_fwd<T, T, N, true>(y, rstd, x, w, eps, rows, d, s, r);                             \
    }
RMSNORM_ADD_KERNEL(f32_f32, float, 1)
RMSNORM_ADD_KERNEL(bf16_bf16, bf16_t, 1)
RMSNORM_ADD_KERNEL(f32_f32_v2, float, 4)
RMSNORM_ADD_KERNEL(bf16_bf16_v2, bf16_t, 8)

// ---- v3: row in registers ----------------------------------------------------------------

// A 16-byte chunk of T kept as raw bits (4 registers whatever T is), unpacked when used; the
// floats are those ld16 would give.
__device__ __forceinline__ void unpack16(const uint4& r, float* f, const float*) {
    f[0] = __uint_as_float(r.x); f[1] = __uint_as_float(r.y); f[2] = __uint_as_float(r.z); f[3] = __uint_as_float(r.w);
}
__device__ __forceinline__ void unpack16(const uint4& r, float* f, const bf16_t*) {
    const u32 w[4] = {r.x, r.y, r.z, r.w};
    #pragma unroll
    for (int k = 0; k < 4; ++k) {
        f[2 * k] = bf16_to_f32((bf16_t)(w[k] & 0xffffu));
        f[2 * k + 1] = bf16_to_f32((bf16_t)(w[k] >> 16));
    }
}
// The inverse of unpack16: N floats (already representable in T) back to 16 raw bytes.
__device__ __forceinline__ uint4 pack16(const float* f, const float*) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
}
__device__ __forceinline__ uint4 pack16(const float* f, const bf16_t*) {
    u32 w[4];
    #pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = (u32)f32_to_bf16(f[2 * k]) | ((u32)f32_to_bf16(f[2 * k + 1]) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Sum over the L lanes of a group (L divides 32, groups aligned), with the bits warp_sum gives
// when the other 32 − L lanes hold +0: its first 5 − log2(L) steps each add +0 to a group
// lane, which only turns −0 into +0 — one explicit +0 does the same — and its last log2(L)
// steps are this butterfly.
template <int L> __device__ __forceinline__ float group_sum(float v) {
    if constexpr (L == 32) {
        return warp_sum(v);
    } else {
        v = __fadd_rn(v, 0.0f);
        #pragma unroll
        for (int o = L / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        return v;
    }
}

// Row and lane-in-group of this thread. Lanes of a row past `rows` still take part in the
// shuffles (they hold nothing) and leave afterwards.
template <int L> __device__ __forceinline__ u64 v3_row(u32& g) {
    const u32 lane = threadIdx.x & 31;
    g = lane % L;
    return ((u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * (32 / L) + lane / L;
}

// R (add_rmsnorm): the row held is s = round_T(x + r), stored to `s` once computed.
template <typename T, typename W, int L, int C, bool R = false>
__device__ __forceinline__ void rmsnorm_fwd_v3(T* y, float* rstd, const T* x, const W* w, float eps, u64 rows, u32 d,
                                               T* s = nullptr, const T* r = nullptr) {
    constexpr int N = 16 / sizeof(T);
    u32 g;
    const u64 row = v3_row<L>(g);
    const bool live = row < rows;
    const T* xr = x + (live ? row * d : 0);
    uint4 xc[C] = {};
    #pragma unroll
    for (int i = 0; i < C; ++i) {
        const u32 c = (g + i * L) * N;
        if (live && c < d) xc[i] = *reinterpret_cast<const uint4*>(xr + c);
    }
    if constexpr (R) {
        uint4 rc[C] = {};
        #pragma unroll
        for (int i = 0; i < C; ++i) {
            const u32 c = (g + i * L) * N;
            if (live && c < d) rc[i] = *reinterpret_cast<const uint4*>(r + row * d + c);
        }
        #pragma unroll
        for (int i = 0; i < C; ++i) {
            const u32 c = (g + i * L) * N;
            if (live && c < d) {
                float v[N], rv[N];
                unpack16(xc[i], v, x);
                unpack16(rc[i], rv, x);
                #pragma unroll
                for (int k = 0; k < N; ++k) v[k] = round_to(__fadd_rn(v[k], rv[k]), x);
                st16(s + row * d + c, v);
                xc[i] = pack16(v, x);
            }
        }
    }
    float ss = 0.0f;
    #pragma unroll
    for (int i = 0; i < C; ++i) {
        const u32 c = (g + i * L) * N;
        if (live && c < d) {
            float v[N];
            unpack16(xc[i], v, x);
            #pragma unroll
            for (int k = 0; k < N; ++k) ss = __fmaf_rn(v[k], v[k], ss);
        }
    }
    ss = group_sum<L>(ss);
    if (!live) return;
    const float rs = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)d), eps)));
    if (g == 0) rstd[row] = rs;
    T* yr = y + row * d;
    #pragma unroll
    for (int i = 0; i < C; ++i) {
        const u32 c = (g + i * L) * N;
        if (c < d) {
            float v[N], wv[N], o[N];
            unpack16(xc[i], v, x);
            ldw<W, T, N>(w + c, wv);
            #pragma unroll
            for (int k = 0; k < N; ++k) o[k] = __fmul_rn(wv[k], round_to(__fmul_rn(v[k], rs), x));
            st16(yr + c, o);
        }
    }
}

template <typename T, typename W, int L, int C>
__device__ __forceinline__ void rmsnorm_bwd_dx_v3(T* dx, const T* x, const W* w, const float* rstd, const T* dy,
                                                  const T* res, u64 rows, u32 d) {
    constexpr int N = 16 / sizeof(T);
    u32 g;
    const u64 row = v3_row<L>(g);
    const bool live = row < rows;
    const u64 off = live ? row * d : 0;
    const T* xr = x + off;
    const T* gr = dy + off;
    const float rs = live ? rstd[row] : 0.0f;
    uint4 xc[C] = {}, gc[C] = {};
    #pragma unroll
    for (int i = 0; i < C; ++i) {
        const u32 c = (g + i * L) * N;
        if (live && c < d) {
            xc[i] = *reinterpret_cast<const uint4*>(xr + c);
            gc[i] = *reinterpret_cast<const uint4*>(gr + c);
        }
    }
    float dot = 0.0f;
    #pragma unroll
    for (int i = 0; i < C; ++i) {
        const u32 c = (g + i * L) * N;
        if (live && c < d) {
            float v[N], gv[N], wv[N];
            unpack16(xc[i], v, x);
            unpack16(gc[i], gv, x);
            ldw<W, T, N>(w + c, wv);
            #pragma unroll
            for (int k = 0; k < N; ++k) dot = __fmaf_rn(__fmul_rn(gv[k], wv[k]), v[k], dot);
        }
    }
    dot = group_sum<L>(dot);
    if (!live) return;
    const float kk = __fdiv_rn(__fmul_rn(__fmul_rn(__fmul_rn(rs, rs), rs), dot), (float)d);
    T* dxr = dx + off;
    #pragma unroll
    for (int i = 0; i < C; ++i) {
        const u32 c = (g + i * L) * N;
        if (c < d) {
            float v[N], gv[N], wv[N], o[N];
            unpack16(xc[i], v, x);
            unpack16(gc[i], gv, x);
            ldw<W, T, N>(w + c, wv);
            #pragma unroll
            for (int k = 0; k < N; ++k) o[k] = __fsub_rn(__fmul_rn(rs, __fmul_rn(gv[k], wv[k])), __fmul_rn(v[k], kk));
            if (res) add_residual<T, N>(o, res + off + c);
            st16(dxr + c, o);
        }
    }
}

// v3 kernels for one (x, w) dtype pair: rmsnorm_{fwd,bwd_dx}_<SFX>_v3_<L>x<C>. The launcher
// picks the smallest that holds the row (fewer registers, more warps per SM).
#define RMSNORM_V3_KERNELS_LC(SFX, T, W, L, C)                                                     \
    extern "C" __global__ void __launch_bounds__(256) rmsnorm_fwd_##SFX##_v3_##L##x##C(           \
        T* y, float* rstd, const T* x, const W* w, float eps, u64 rows, u32 d) {                   \
        rmsnorm_fwd_v3<T, W, L, C>(y, rstd, x, w, eps, rows, d);                                   \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) rmsnorm_bwd_dx_##SFX##_v3_##L##x##C(        \
        T* dx, const T* x, const W* w, const float* rstd, const T* dy, const T* res, u64 rows,     \
        u32 d) {                                                                                   \
        rmsnorm_bwd_dx_v3<T, W, L, C>(dx, x, w, rstd, dy, res, rows, d);                           \
    }
#define RMSNORM_V3_KERNELS(SFX, T, W)                                                              \
    RMSNORM_V3_KERNELS_LC(SFX, T, W, 8, 1)                                                         \
    RMSNORM_V3_KERNELS_LC(SFX, T, W, 16, 1)                                                        \
    RMSNORM_V3_KERNELS_LC(SFX, T, W, 32, 1)                                                        \
    RMSNORM_V3_KERNELS_LC(SFX, T, W, 32, 4)                                                        \
    RMSNORM_V3_KERNELS_LC(SFX, T, W, 32, 8)                                                        \
    RMSNORM_V3_KERNELS_LC(SFX, T, W, 32, 16)

RMSNORM_V3_KERNELS(f32_f32, float, float)
RMSNORM_V3_KERNELS(f32_bf16, float, bf16_t)
RMSNORM_V3_KERNELS(bf16_f32, bf16_t, float)
RMSNORM_V3_KERNELS(bf16_bf16, bf16_t, bf16_t)

// add_rmsnorm v3: rmsnorm_add_fwd_<SFX>_v3_<L>x<C>, same-dtype pairs only.
#define RMSNORM_ADD_V3_KERNEL_LC(SFX, T, L, C)                                                     \
    extern "C" __global__ void __launch_bounds__(256) rmsnorm_add_fwd_##SFX##_v3_##L##x##C(       \
        T* y, float* rstd, T* s, const T* x, const T* r, const T* w, float eps, u64 rows, u32 d) { \
        rmsnorm_fwd_v3<T, T, L, C, true>(y, rstd, x, w, eps, rows, d, s, r);                       \
    }
#define RMSNORM_ADD_V3_KERNELS(SFX, T)                                                             \
    RMSNORM_ADD_V3_KERNEL_LC(SFX, T, 8, 1)                                                         \
    RMSNORM_ADD_V3_KERNEL_LC(SFX, T, 16, 1)                                                        \
    RMSNORM_ADD_V3_KERNEL_LC(SFX, T, 32, 1)                                                        \
    RMSNORM_ADD_V3_KERNEL_LC(SFX, T, 32, 4)                                                        \
    RMSNORM_ADD_V3_KERNEL_LC(SFX, T, 32, 8)                                                        \
    RMSNORM_ADD_V3_KERNEL_LC(SFX, T, 32, 16)
RMSNORM_ADD_V3_KERNELS(f32_f32, float)
RMSNORM_ADD_V3_KERNELS(bf16_bf16, bf16_t)

// scratch[chunk, j] = Σ_{rows r of chunk, in order} dy[r, j]·(x[r, j]·rstd[r]).
template <typename T>
__device__ __forceinline__ void dw_partial(float* scratch, const T* x, const float* rstd, const T* dy,
                                           u64 rows, u32 d, u32 per) {
    const u32 j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    const u64 r0 = (u64)blockIdx.y * per;
    const u64 r1 = r0 + per < rows ? r0 + per : rows;
    float acc = 0.0f;
    for (u64 r = r0; r < r1; ++r)
        acc = __fadd_rn(acc, __fmul_rn(ld1(dy + r * d + j), __fmul_rn(ld1(x + r * d + j), rstd[r])));
    scratch[(u64)blockIdx.y * d + j] = acc;
}

extern "C" __global__ void rmsnorm_bwd_dw_partial_f32(float* scratch, const float* x, const float* rstd,
                                                      const float* dy, u64 rows, u32 d, u32 per) {
    dw_partial<float>(scratch, x, rstd, dy, rows, d, per);
}
extern "C" __global__ void rmsnorm_bwd_dw_partial_bf16(float* scratch, const bf16_t* x, const float* rstd,
                                                       const bf16_t* dy, u64 rows, u32 d, u32 per) {
    dw_partial<bf16_t>(scratch, x, rstd, dy, rows, d, per);
}

// dw[j] = Σ_{c in order} scratch[c, j], or with `add` dw[j] + that sum (a gradient
// accumulated in place).
extern "C" __global__ void rmsnorm_bwd_dw_reduce(float* dw, const float* scratch, u32 chunks, u32 d, u32 add) {
    const u32 j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    float acc = 0.0f;
    for (u32 c = 0; c < chunks; ++c) acc = __fadd_rn(acc, scratch[(u64)c * d + j]);
    dw[j] = add ? __fadd_rn(dw[j], acc) : acc;
}

// ---- v3 dw: two columns per thread, rows loaded ahead -------------------------------------

// Two adjacent elements of T (one 4- or 8-byte load; the launcher checked the alignment).
__device__ __forceinline__ void ld2(const float* p, float* f) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    f[0] = v.x; f[1] = v.y;
}
__device__ __forceinline__ void ld2(const bf16_t* p, float* f) {
    const u32 v = *reinterpret_cast<const u32*>(p);
    f[0] = bf16_to_f32((bf16_t)(v & 0xffffu));
    f[1] = bf16_to_f32((bf16_t)(v >> 16));
}

// Rows a dw_partial_v3 thread loads before adding them (in order) into its two sums.
#define DW_AHEAD 8

// scratch[chunk, j..j+2] as dw_partial computes it. Block (columns/2, chunks): threadIdx.x picks
// the column pair, y the chunk; d is even.
template <typename T>
__device__ __forceinline__ void dw_partial_v3(float* __restrict__ scratch, const T* __restrict__ x,
                                              const float* __restrict__ rstd, const T* __restrict__ dy, u64 rows,
                                              u32 d, u32 per, u32 chunks) {
    const u32 j = (blockIdx.x * blockDim.x + threadIdx.x) * 2;
    const u32 chunk = blockIdx.y * blockDim.y + threadIdx.y;
    if (j >= d || chunk >= chunks) return;
    const u64 r0 = (u64)chunk * per;
    const u64 r1 = r0 + per < rows ? r0 + per : rows;
    float a0 = 0.0f, a1 = 0.0f;
    u64 r = r0;
    for (; r + DW_AHEAD <= r1; r += DW_AHEAD) {
        float xv[DW_AHEAD][2], gv[DW_AHEAD][2], rs[DW_AHEAD];
        #pragma unroll
        for (int q = 0; q < DW_AHEAD; ++q) {
            ld2(x + (r + q) * d + j, xv[q]);
            ld2(dy + (r + q) * d + j, gv[q]);
            rs[q] = rstd[r + q];
        }
        #pragma unroll
        for (int q = 0; q < DW_AHEAD; ++q) {
            a0 = __fadd_rn(a0, __fmul_rn(gv[q][0], __fmul_rn(xv[q][0], rs[q])));
            a1 = __fadd_rn(a1, __fmul_rn(gv[q][1], __fmul_rn(xv[q][1], rs[q])));
        }
    }
    for (; r < r1; ++r) {
        float xv[2], gv[2];
        ld2(x + r * d + j, xv);
        ld2(dy + r * d + j, gv);
        const float rs = rstd[r];
        a0 = __fadd_rn(a0, __fmul_rn(gv[0], __fmul_rn(xv[0], rs)));
        a1 = __fadd_rn(a1, __fmul_rn(gv[1], __fmul_rn(xv[1], rs)));
    }
    *reinterpret_cast<float2*>(scratch + (u64)chunk * d + j) = make_float2(a0, a1);
}

extern "C" __global__ void rmsnorm_bwd_dw_partial_v3_f32(float* scratch, const float* x, const float* rstd,
                                                         const float* dy, u64 rows, u32 d, u32 per, u32 chunks) {
    dw_partial_v3<float>(scratch, x, rstd, dy, rows, d, per, chunks);
}
extern "C" __global__ void rmsnorm_bwd_dw_partial_v3_bf16(float* scratch, const bf16_t* x, const float* rstd,
                                                          const bf16_t* dy, u64 rows, u32 d, u32 per, u32 chunks) {
    dw_partial_v3<bf16_t>(scratch, x, rstd, dy, rows, d, per, chunks);
}

// dw[j] = Σ_{c in order} scratch[c, j] (+ dw[j] with `add`), as rmsnorm_bwd_dw_reduce, with 16
// chunks loaded ahead.
extern "C" __global__ void rmsnorm_bwd_dw_reduce_v3(float* __restrict__ dw, const float* __restrict__ scratch,
                                                    u32 chunks, u32 d, u32 add) {
    const u32 j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    float acc = 0.0f;
    u32 c = 0;
    for (; c + 16 <= chunks; c += 16) {
        float v[16];
        #pragma unroll
        for (int q = 0; q < 16; ++q) v[q] = scratch[(u64)(c + q) * d + j];
        #pragma unroll
        for (int q = 0; q < 16; ++q) acc = __fadd_rn(acc, v[q]);
    }
    for (; c < chunks; ++c) acc = __fadd_rn(acc, scratch[(u64)c * d + j]);
    dw[j] = add ? __fadd_rn(dw[j], acc) : acc;
}
