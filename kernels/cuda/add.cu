// add.cu — elementwise residual ops: out = sa·a + sb·b (add, scale, in-place dst += s·src), the
// row-broadcast bias add x[r,:] += b, and its backward, the column sum Σ_r g[r,:].
//
// Layout: flat contiguous buffers of n elements (f32, or bf16 storage with f32 math).
// Threads: a grid-stride loop; each thread handles 4 consecutive elements per step through one
// 16-byte (f32) or 8-byte (bf16) vector load when the buffer is aligned (the launcher checks
// n % 4 == 0 and 16-byte aligned pointers), scalar otherwise.
// Versions:
//   v1 scalar grid-stride loop (any alignment)
//   v2 4-wide vector loads (current default where aligned)

extern "C" __global__ void add_f32(float* __restrict__ out, const float* __restrict__ a,
                                   const float* __restrict__ b, float sa, float sb, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = sa * a[i] + sb * b[i];
}

extern "C" __global__ void add_f32_v4(float4* __restrict__ out, const float4* __restrict__ a,
                                      const float4* __restrict__ b, float sa, float sb, u64 n4) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n4; i += (u64)gridDim.x * blockDim.x) {
        float4 x = a[i], y = b[i];
        out[i] = make_float4(sa * x.x + sb * y.x, sa * x.y + sb * y.y, sa * x.z + sb * y.z, sa * x.w + sb * y.w);
    }
}

extern "C" __global__ void add_bf16(bf16_t* __restrict__ out, const bf16_t* __restrict__ a,
                                    const bf16_t* __restrict__ b, float sa, float sb, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(sa * bf16_to_f32(a[i]) + sb * bf16_to_f32(b[i]));
}

// 4 bf16 per thread through one 8-byte load (uint2).
extern "C" __global__ void add_bf16_v4(uint2* __restrict__ out, const uint2* __restrict__ a,
                                       const uint2* __restrict__ b, float sa, float sb, u64 n4) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n4; i += (u64)gridDim.x * blockDim.x) {
        uint2 x = a[i], y = b[i], r;
        u32 xs[2] = {x.x, x.y}, ys[2] = {y.x, y.y}, rs[2];
        #pragma unroll
        for (int k = 0; k < 2; ++k) {
            float lo = sa * bf16_to_f32((bf16_t)(xs[k] & 0xffff)) + sb * bf16_to_f32((bf16_t)(ys[k] & 0xffff));
            float hi = sa * bf16_to_f32((bf16_t)(xs[k] >> 16)) + sb * bf16_to_f32((bf16_t)(ys[k] >> 16));
            rs[k] = (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
        }
        r.x = rs[0]; r.y = rs[1];
        out[i] = r;
    }
}

// x[r, c] += bias[c] over a flat [rows, d] buffer (grid-stride; the modulo is cheap next to
// the memory traffic).
extern "C" __global__ void add_bias_f32(float* __restrict__ x, const float* __restrict__ bias, u64 n, u32 d) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        x[i] += bias[i % d];
}

extern "C" __global__ void add_bias_bf16(bf16_t* __restrict__ x, const bf16_t* __restrict__ bias, u64 n, u32 d) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(bias[i % d]));
}

// out[c] = Σ_r g[r, c]: one thread per column, a warp covers 32 adjacent columns so each row
// read is one coalesced 128-byte segment. Sequential over rows ⇒ deterministic.
extern "C" __global__ void column_sum_f32(float* __restrict__ out, const float* __restrict__ g, u32 rows, u32 d) {
    u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float s = 0.0f;
    for (u32 r = 0; r < rows; ++r) s += g[(u64)r * d + c];
    out[c] = s;
}

extern "C" __global__ void column_sum_bf16(float* __restrict__ out, const bf16_t* __restrict__ g, u32 rows, u32 d) {
    u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float s = 0.0f;
    for (u32 r = 0; r < rows; ++r) s += bf16_to_f32(g[(u64)r * d + c]);
    out[c] = s;
}
