// common.cuh — prepended by smelt's NVRTC build to every kernel source (sources include no
// toolkit headers, so a GPU machine needs only the driver and libnvrtc).
//
// Provides: bf16 as raw 16-bit values with round-to-nearest-even conversion (NaN kept quiet),
// f16 conversions via the PTX cvt instruction, warp and block reductions, fixed-width integer
// names, the bf16 tensor-core mma (sm_80+) that attention and matmul share, and silu (swiglu
// and matmul's GLU epilogue).

typedef unsigned short bf16_t;   // raw bfloat16 bits
typedef unsigned short f16_t;    // raw IEEE half bits
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;

#define SMELT_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float bf16_to_f32(bf16_t h) {
    return __uint_as_float(((u32)h) << 16);
}

__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x0040u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return (bf16_t)(u >> 16);
}

#ifndef SMELT_EMU
__device__ __forceinline__ float f16_to_f32(f16_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ f16_t f32_to_f16(float f) {
    f16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#else  // the CPU emulator (kernels/emu/cuda_emu.hpp): the compiler's IEEE half, same rounding
__device__ __forceinline__ float f16_to_f32(f16_t h) { return (float)smelt_bits<_Float16>(h); }
__device__ __forceinline__ f16_t f32_to_f16(float f) { return smelt_bits<f16_t>((_Float16)f); }
#endif

#ifdef SMELT_EMU
// The emulator runs the same xor butterfly in one warp rendezvous instead of five (same bits).
__device__ __forceinline__ float warp_sum(float v) {
    return smelt_emu::butterfly(v, [](float a, float b) { return a + b; }, "warp_sum");
}
__device__ __forceinline__ float warp_max(float v) {
    return smelt_emu::butterfly(v, [](float a, float b) { return fmaxf(a, b); }, "warp_max");
}
__device__ __forceinline__ double warp_sum_f64(double v) {
    return smelt_emu::butterfly(v, [](double a, double b) { return a + b; }, "warp_sum_f64");
}
#else
__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ double warp_sum_f64(double v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
#endif

// Sum over the whole block in f64, in a fixed order (deterministic); every thread gets the
// result. `scratch` holds >= 32 doubles; blockDim.x must be a multiple of 32.
__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum_f64(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < nwarps) ? scratch[lane] : 0.0;
    return warp_sum_f64(v);
}

// Sum over the whole block; every thread gets the result. `scratch` holds >= 32 floats.
// blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < nwarps) ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < nwarps) ? scratch[lane] : -SMELT_INF;
    return warp_max(v);
}

// Row-op loads and stores shared by rmsnorm, rope, swiglu and embedding: ld1/st1 move one
// element of T (f32 or bf16) as f32; ld16/st16 move 16 bytes (4 f32 or 8 bf16); ldn/stn pick
// between them by N at compile time; round_to rounds an f32 result to T's precision.
__device__ __forceinline__ float ld1(const float* p) { return *p; }
__device__ __forceinline__ float ld1(const bf16_t* p) { return bf16_to_f32(*p); }
__device__ __forceinline__ void st1(float* p, float v) { *p = v; }
__device__ __forceinline__ void st1(bf16_t* p, float v) { *p = f32_to_bf16(v); }
__device__ __forceinline__ float round_to(float v, const float*) { return v; }
__device__ __forceinline__ float round_to(float v, const bf16_t*) { return bf16_to_f32(f32_to_bf16(v)); }

__device__ __forceinline__ void ld16(const float* p, float* f) {
    float4 v = *reinterpret_cast<const float4*>(p);
    f[0] = v.x; f[1] = v.y; f[2] = v.z; f[3] = v.w;
}
__device__ __forceinline__ void ld16(const bf16_t* p, float* f) {
    uint4 v = *reinterpret_cast<const uint4*>(p);
    u32 w[4] = {v.x, v.y, v.z, v.w};
    #pragma unroll
    for (int k = 0; k < 4; ++k) {
        f[2 * k] = bf16_to_f32((bf16_t)(w[k] & 0xffffu));
        f[2 * k + 1] = bf16_to_f32((bf16_t)(w[k] >> 16));
    }
}
__device__ __forceinline__ void st16(float* p, const float* f) {
    *reinterpret_cast<float4*>(p) = make_float4(f[0], f[1], f[2], f[3]);
}
__device__ __forceinline__ void st16(bf16_t* p, const float* f) {
    u32 w[4];
    #pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = (u32)f32_to_bf16(f[2 * k]) | ((u32)f32_to_bf16(f[2 * k + 1]) << 16);
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

template <typename T, int N> __device__ __forceinline__ void ldn(const T* p, float* f) {
    if constexpr (N == 1) f[0] = ld1(p); else ld16(p, f);
}
template <typename T, int N> __device__ __forceinline__ void stn(T* p, const float* f) {
    if constexpr (N == 1) st1(p, f[0]); else st16(p, f);
}

// RoPE arithmetic (rotate-half, HF's bf16 rounding points), shared by rope.cu and
// attention_inputs.cu; rope.cu's header explains the rounding.
// One chunk of N pairs rotated with precomputed cos/sin (already rounded to T, sign applied).
template <typename T, int N>
__device__ __forceinline__ void rope_rotate(float* lo, float* hi, const float* a, const float* b, const float* cs,
                                            const float* sn, const T* tag) {
    #pragma unroll
    for (int k = 0; k < N; ++k) {
        lo[k] = __fadd_rn(round_to(__fmul_rn(a[k], cs[k]), tag), round_to(__fmul_rn(-b[k], sn[k]), tag));
        hi[k] = __fadd_rn(round_to(__fmul_rn(b[k], cs[k]), tag), round_to(__fmul_rn(a[k], sn[k]), tag));
    }
}

// cos/sin of p·inv_freq[k] for N frequencies, rounded to T as HF's cos.to(dtype), sign applied.
template <typename T, int N>
__device__ __forceinline__ void rope_cos_sin(float* cs, float* sn, float p, const float* f, float sign, const T* tag) {
    #pragma unroll
    for (int k = 0; k < N; ++k) {
        float s, c;
        sincosf(__fmul_rn(p, f[k]), &s, &c);
        cs[k] = round_to(c, tag);
        sn[k] = sign * round_to(s, tag);
    }
}

// Tensor-core operand staging (sm_80+): ldmatrix loads four 8×8 b16 matrices from shared memory
// into mma fragments (lane i addresses row i % 8 of matrix i / 8; 16-byte aligned rows), .trans
// transposing each; cp.async copies 16 (or 4) bytes global → shared without a register round trip
// (fill = false zero-fills instead of reading), retired in commit groups by cp_async_wait<N>
// (at most N newest groups still in flight). The emulator performs each copy at its wait.
#ifdef SMELT_EMU
__device__ __forceinline__ void ldmatrix_x4(u32* r, const void* row) { smelt_emu_ldmatrix_x4(r, row, false); }
__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const void* row) { smelt_emu_ldmatrix_x4(r, row, true); }
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool fill) { smelt_emu_cp_async(dst, src, 16, fill); }
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool fill) { smelt_emu_cp_async(dst, src, 4, fill); }
__device__ __forceinline__ void cp_async_commit() { smelt_emu_cp_async_commit(); }
template <int N> __device__ __forceinline__ void cp_async_wait() { smelt_emu_cp_async_wait(N); }
#else
__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void ldmatrix_x4(u32* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(row)) : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(row)) : "memory");
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool fill) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(fill ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool fill) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(fill ? 4 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
#endif

// c += a·b on tensor cores: mma.sync m16n8k16, bf16 operands, f32 accumulators (sm_80+).
// Fragments (lane = 4·gid + tig): A regs {row gid | gid+8} × {cols 2tig,2tig+1 | +8}; B regs:
// k = 2tig,2tig+1 (+8), n = gid; C: rows gid / gid+8, cols 2tig, 2tig+1.
__device__ __forceinline__ void mma_bf16_16816(float* c, const u32* a, u32 b0, u32 b1) {
#ifdef SMELT_EMU
    smelt_emu_mma_m16n8k16_bf16(c, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// silu(g) = g / (1 + e^-g): the same formula as PyTorch's f32 silu (accurate expf, IEEE
// division), for swiglu.cu and matmul.cu's GLU epilogue alike (their bits must agree).
__device__ __forceinline__ float silu(float g) { return __fdiv_rn(g, 1.0f + expf(-g)); }
