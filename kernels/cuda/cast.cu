// cast.cu — dtype conversion among f32, bf16 and f16: y[i] = convert(x[i]).
//
// Every conversion goes through f32, which holds every bf16 and f16 value exactly, so each
// result is rounded once: to nearest, ties to even; NaN stays NaN (quieted), ±Inf and ±0 keep
// their sign, f16 overflow becomes ±Inf and denormals are kept (no flush to zero), matching the
// `half` crate on the CPU bit for bit except for NaN payloads.
//
// Layout: flat contiguous buffers of n elements, source and destination of different dtypes.
// Threads: a grid-stride loop. The vector version moves 8 elements per thread per step: a
// 16-byte load/store of 8 halves, or two 16-byte float4 accesses of f32; the first n % 8
// threads then convert the tail. The launcher picks it when both pointers are 16-byte aligned.
// Kernel names: cast_<from>_<to>[_v8], from/to in {f32, bf16, f16} (identity pairs included,
// so `cast_into` can copy without a host round trip).
// Versions:
//   v1 scalar grid-stride loop (any alignment)
//   v2 8 elements per thread through 16-byte vector accesses (current default where aligned)

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

// 16-bit storage types: 8 values travel as one uint4.
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

template <class S, class D>
__device__ __forceinline__ void cast_scalar(const typename S::T* __restrict__ x, typename D::T* __restrict__ y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = D::st(S::ld(x[i]));
}

template <class S, class D>
__device__ __forceinline__ void cast_vec8(const typename S::T* __restrict__ x, typename D::T* __restrict__ y, u64 n) {
    const u64 tid = blockIdx.x * (u64)blockDim.x + threadIdx.x, n8 = n / 8;
    for (u64 g = tid; g < n8; g += (u64)gridDim.x * blockDim.x) {
        float f[8];
        S::ld8(x, g, f);
        D::st8(y, g, f);
    }
    const u64 i = n8 * 8 + tid;
    if (i < n) y[i] = D::st(S::ld(x[i]));
}

#define SMELT_CAST_KERNELS(NAME, S, D)                                                              \
    extern "C" __global__ void cast_##NAME(const S::T* __restrict__ x, D::T* __restrict__ y, u64 n) { \
        cast_scalar<S, D>(x, y, n);                                                                 \
    }                                                                                               \
    extern "C" __global__ void cast_##NAME##_v8(const S::T* __restrict__ x, D::T* __restrict__ y, u64 n) { \
        cast_vec8<S, D>(x, y, n);                                                                   \
    }

SMELT_CAST_KERNELS(f32_bf16, F32T, BF16T)
SMELT_CAST_KERNELS(f32_f16, F32T, F16T)
SMELT_CAST_KERNELS(bf16_f32, BF16T, F32T)
SMELT_CAST_KERNELS(f16_f32, F16T, F32T)
SMELT_CAST_KERNELS(bf16_f16, BF16T, F16T)
SMELT_CAST_KERNELS(f16_bf16, F16T, BF16T)
SMELT_CAST_KERNELS(f32_f32, F32T, F32T)
SMELT_CAST_KERNELS(bf16_bf16, BF16T, BF16T)
SMELT_CAST_KERNELS(f16_f16, F16T, F16T)
