// rmsnorm.cu — RMSNorm over the last dim, as HF Qwen: rstd = 1/sqrt(mean(x²) + eps) in f32,
// y = w · round_T(x·rstd) (for bf16 x the normalised value is rounded to bf16 before the weight,
// like HF's `weight * hidden.to(input_dtype)`), and the backward
// dx = rstd·(dy·w) − x·(rstd³·Σ(dy·w·x)/D), dw = Σ_rows dy·(x·rstd).
//
// Layout: x, y, dy, dx row-major [rows, D] (T = f32 or bf16); w [D] (W = f32 or bf16, any mix);
// rstd [rows] f32; dw [D] f32; dw scratch [chunks, D] f32.
// Threads:
//   forward / dx: one warp per row, 8 rows (warps) per 256-thread block. A lane handles N
//     consecutive elements per step (N = 16 bytes of T through one 16-byte load when the
//     launcher finds D % N == 0 and 16-byte aligned rows; N = 1 otherwise); warp_sum reduces.
//     The second pass re-reads the row (from L1/L2).
//   dw: deterministic two-kernel reduction. dw_partial: grid (ceil(D/256), chunks), one thread
//     per column j summing its chunk's rows in order into scratch[chunk, j]; dw_reduce: one
//     thread per column summing the chunks in order. The chunking depends only on `rows`.
// Arithmetic uses explicit _rn intrinsics where the CPU reference rounds, so the compiler does
// not contract into FMAs and CUDA follows the CPU's rounding steps.
// Versions:
//   v1 warp per row, scalar loads (any D / alignment)
//   v2 warp per row, 16-byte vector loads (default where D % N == 0 and aligned)

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

template <typename T, typename W, int N>
__device__ __forceinline__ void rmsnorm_fwd(T* y, float* rstd, const T* x, const W* w, float eps, u64 rows, u32 d) {
    const u32 lane = threadIdx.x & 31;
    const u64 row = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // the whole warp leaves together
    const T* xr = x + row * d;
    T* yr = y + row * d;
    float ss = 0.0f;
    for (u32 c = lane * N; c < d; c += 32 * N) {
        float v[N];
        ldn<T, N>(xr + c, v);
        #pragma unroll
        for (int k = 0; k < N; ++k) ss = __fmaf_rn(v[k], v[k], ss);
    }
    ss = warp_sum(ss);
    const float rs = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)d), eps)));
    if (lane == 0) rstd[row] = rs;
    for (u32 c = lane * N; c < d; c += 32 * N) {
        float v[N], wv[N], o[N];
        ldn<T, N>(xr + c, v);
        ldw<W, T, N>(w + c, wv);
        #pragma unroll
        for (int k = 0; k < N; ++k) o[k] = __fmul_rn(wv[k], round_to(__fmul_rn(v[k], rs), x));
        stn<T, N>(yr + c, o);
    }
}

template <typename T, typename W, int N>
__device__ __forceinline__ void rmsnorm_bwd_dx(T* dx, const T* x, const W* w, const float* rstd, const T* dy,
                                               u64 rows, u32 d) {
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
        stn<T, N>(dxr + c, o);
    }
}

#define RMSNORM_KERNELS(SFX, T, W, N)                                                              \
    extern "C" __global__ void rmsnorm_fwd_##SFX(T* y, float* rstd, const T* x, const W* w,        \
                                                 float eps, u64 rows, u32 d) {                     \
        rmsnorm_fwd<T, W, N>(y, rstd, x, w, eps, rows, d);                                         \
    }                                                                                              \
    extern "C" __global__ void rmsnorm_bwd_dx_##SFX(T* dx, const T* x, const W* w,                 \
                                                    const float* rstd, const T* dy, u64 rows,      \
                                                    u32 d) {                                       \
        rmsnorm_bwd_dx<T, W, N>(dx, x, w, rstd, dy, rows, d);                                      \
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

// dw[j] = Σ_{c in order} scratch[c, j].
extern "C" __global__ void rmsnorm_bwd_dw_reduce(float* dw, const float* scratch, u32 chunks, u32 d) {
    const u32 j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    float acc = 0.0f;
    for (u32 c = 0; c < chunks; ++c) acc = __fadd_rn(acc, scratch[(u64)c * d + j]);
    dw[j] = acc;
}
