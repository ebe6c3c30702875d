// global_norm.cu — gradient clipping support: the global L2 norm sqrt(Σ_t Σ_i x_t[i]²) over
// many tensors (f32, bf16 or f16 storage), and an in-place scale x[i] *= s (f32 math).
//
// Precision: the sum of squares is accumulated in f64 — per thread, per block, across blocks
// and across tensors — so it stays exact to ~1e-16 relative however many elements there are
// (an f32 running sum over ~500M squares loses the small ones once it is large). Only the
// squares of one 4-element group of a vector step are summed in f32 first (≤ 4 roundings,
// relative ≤ 2.4e-7 of that group, so ≤ 1.2e-7 relative on the norm in the worst case); a
// group whose f32 sum overflows (|x| ≳ 1.8e19) is redone in f64, so, as on the CPU, squares
// that overflow f32 do not make the norm infinite. NaN and Inf elements propagate.
//
// Layout: each tensor a flat contiguous buffer of n elements; `partials` an f64 buffer with
// one slot per block of every sum-of-squares launch (the launcher offsets the pointer per
// tensor; it allocates the buffer as u32 pairs).
// Threads:
//   sumsq_<dt>_v8: used when the pointer is 16-byte aligned. One launch per tensor,
//     grid-stride over groups of 8 elements read with one or two 16-byte loads; each group
//     adds two f32 4-element sums of squares to the thread's f64 accumulator (one cvt and one
//     f64 add per 4 elements, so the f64 work stays far below the memory time even for bf16);
//     the first n % 8 threads add the tail element in f64. Then block_sum_f64 writes one f64
//     partial per block.
//   sumsq_<dt>: any alignment, grid-stride over single elements, each squared and accumulated
//     in f64; block_sum_f64 → one f64 partial per block.
//   The grid size and version depend only on n and on whether the pointer is 16-byte aligned
//   (never on the device), and every reduction has a fixed order, so the partials — and the
//   norm — are bitwise reproducible run to run for the same tensors (a view at another
//   offset may round differently).
//   sumsq_finish: one block of 1024 threads; thread t adds f64 partials t, t+1024, … in f64,
//     then a fixed-order f64 warp/shared-memory reduction; out[0] = sqrt(total) as f32
//     (NaN/Inf kept).
//   scale_<dt>[_v8]: grid-stride x[i] = s·x[i], 8 elements per step where 16-byte aligned.
// Versions:
//   v1 scalar grid-stride loops (any alignment)
//   v2 8 elements per thread through 16-byte vector accesses (default where aligned)
//   v3 f64 accumulation per thread, per block and across blocks (f64 partials); v2's loads
//      (current)

struct F32T {
    typedef float T;
    static __device__ __forceinline__ float ld(float x) { return x; }
    static __device__ __forceinline__ float st(float f) { return f; }
    static __device__ __forceinline__ void ld8(const float* p, u64 g, float* f) {
        const float4* q = reinterpret_cast<const float4*>(p) + 2 * g;
        float4 a = q[0], b = q[1];
        f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
        f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
    }
    static __device__ __forceinline__ void st8(float* p, u64 g, const float* f) {
        float4* q = reinterpret_cast<float4*>(p) + 2 * g;
        q[0] = make_float4(f[0], f[1], f[2], f[3]);
        q[1] = make_float4(f[4], f[5], f[6], f[7]);
    }
};

template <float (*LD)(unsigned short), unsigned short (*ST)(float)>
struct H16T {
    typedef unsigned short T;
    static __device__ __forceinline__ float ld(T x) { return LD(x); }
    static __device__ __forceinline__ T st(float f) { return ST(f); }
    static __device__ __forceinline__ void ld8(const T* p, u64 g, float* f) {
        uint4 u = reinterpret_cast<const uint4*>(p)[g];
        u32 w[4] = {u.x, u.y, u.z, u.w};
        #pragma unroll
        for (int k = 0; k < 4; ++k) {
            f[2 * k] = LD((T)(w[k] & 0xffffu));
            f[2 * k + 1] = LD((T)(w[k] >> 16));
        }
    }
    static __device__ __forceinline__ void st8(T* p, u64 g, const float* f) {
        u32 w[4];
        #pragma unroll
        for (int k = 0; k < 4; ++k) w[k] = (u32)ST(f[2 * k]) | ((u32)ST(f[2 * k + 1]) << 16);
        reinterpret_cast<uint4*>(p)[g] = make_uint4(w[0], w[1], w[2], w[3]);
    }
};
typedef H16T<bf16_to_f32, f32_to_bf16> BF16T;
typedef H16T<f16_to_f32, f32_to_f16> F16T;

// Σ f[k]² over 4 values: in f32 (≤ 4 roundings) unless that overflows to +inf, then again in
// f64. NaN stays NaN (it is not +inf, and the f32 sum is already NaN).
__device__ __forceinline__ double sumsq4(const float* f) {
    float s = f[0] * f[0];
    s = fmaf(f[1], f[1], s);
    s = fmaf(f[2], f[2], s);
    s = fmaf(f[3], f[3], s);
    if (s != SMELT_INF) return (double)s;
    double d = 0.0;
    #pragma unroll
    for (int k = 0; k < 4; ++k) d = fma((double)f[k], (double)f[k], d);
    return d;
}

template <class S>
__device__ __forceinline__ void sumsq_scalar(const typename S::T* __restrict__ x, u64 n, double* __restrict__ partials) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const double f = (double)S::ld(x[i]);
        acc = fma(f, f, acc);
    }
    acc = block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

template <class S>
__device__ __forceinline__ void sumsq_vec8(const typename S::T* __restrict__ x, u64 n, double* __restrict__ partials) {
    __shared__ double scratch[32];
    const u64 tid = blockIdx.x * (u64)blockDim.x + threadIdx.x, n8 = n / 8;
    double acc = 0.0;
    for (u64 g = tid; g < n8; g += (u64)gridDim.x * blockDim.x) {
        float f[8];
        S::ld8(x, g, f);
        acc += sumsq4(f) + sumsq4(f + 4);
    }
    const u64 i = n8 * 8 + tid;
    if (i < n) {
        const double f = (double)S::ld(x[i]);
        acc = fma(f, f, acc);
    }
    acc = block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

template <class S>
__device__ __forceinline__ void scale_scalar(typename S::T* __restrict__ x, float s, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        x[i] = S::st(s * S::ld(x[i]));
}

template <class S>
__device__ __forceinline__ void scale_vec8(typename S::T* __restrict__ x, float s, u64 n) {
    const u64 tid = blockIdx.x * (u64)blockDim.x + threadIdx.x, n8 = n / 8;
    for (u64 g = tid; g < n8; g += (u64)gridDim.x * blockDim.x) {
        float f[8];
        S::ld8(x, g, f);
        #pragma unroll
        for (int k = 0; k < 8; ++k) f[k] *= s;
        S::st8(x, g, f);
    }
    const u64 i = n8 * 8 + tid;
    if (i < n) x[i] = S::st(s * S::ld(x[i]));
}

#define SMELT_NORM_KERNELS(DT, S)                                                                    \
    extern "C" __global__ void sumsq_##DT(const S::T* __restrict__ x, u64 n, double* __restrict__ partials) { \
        sumsq_scalar<S>(x, n, partials);                                                             \
    }                                                                                                \
    extern "C" __global__ void sumsq_##DT##_v8(const S::T* __restrict__ x, u64 n, double* __restrict__ partials) { \
        sumsq_vec8<S>(x, n, partials);                                                               \
    }                                                                                                \
    extern "C" __global__ void scale_##DT(S::T* __restrict__ x, float s, u64 n) { scale_scalar<S>(x, s, n); } \
    extern "C" __global__ void scale_##DT##_v8(S::T* __restrict__ x, float s, u64 n) { scale_vec8<S>(x, s, n); }

SMELT_NORM_KERNELS(f32, F32T)
SMELT_NORM_KERNELS(bf16, BF16T)
SMELT_NORM_KERNELS(f16, F16T)

// Launched with exactly one block of 1024 threads.
extern "C" __global__ void sumsq_finish(const double* __restrict__ partials, u32 count, float* __restrict__ out) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (u32 i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
    acc = warp_sum_f64(acc);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) scratch[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        acc = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.0;
        acc = warp_sum_f64(acc);
        if (lane == 0) out[0] = (float)sqrt(acc);
    }
}
