// add.cu — elementwise residual ops: out = sa·a + sb·b (add, scale, in-place dst += s·src), the
// row-broadcast bias add x[r,:] += b, and its backward, the column sum Σ_r g[r,:].
//
// Layout: flat contiguous buffers of n elements (f32, or bf16 storage with f32 math); the column
// sum reads g [rows, d] and writes f32 [d] (through an f32 [chunks, d] scratch).
// Threads: a grid-stride loop; each thread handles 4 consecutive elements per step through one
// 16-byte (f32) or 8-byte (bf16) vector load when the buffer is aligned (the launcher checks
// n % 4 == 0 and 16-byte aligned pointers), scalar otherwise.
// Column sum: one thread per column, a warp covering 32 adjacent columns so each row read is
// coalesced. v1 sums all rows in one thread (d threads in all: a few warps for d = 128, so it is
// latency-bound for long inputs); v2 splits the rows into fixed chunks — column_sum_partial,
// grid (ceil(d/128), chunks), writes scratch[chunk, j] = Σ_{rows of the chunk, in order}, and
// column_sum_reduce sums the chunks in order. The chunking depends only on `rows`, and there
// are no atomics, so both are deterministic.
// Versions:
//   v1 scalar grid-stride loop (any alignment); column sum: one thread per column over all rows
//   v2 4-wide vector loads (current default where aligned); column sum: row chunks + ordered
//      reduction (current default)

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

// v2 column sum, pass 1: scratch[chunk, j] = Σ_{r in [chunk·per, min((chunk+1)·per, rows)), in order} g[r, j].
template <typename T>
__device__ __forceinline__ void column_sum_partial(float* __restrict__ scratch, const T* __restrict__ g, u32 rows,
                                                   u32 d, u32 per) {
    const u32 j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    const u64 r0 = (u64)blockIdx.y * per;
    const u64 r1 = r0 + per < rows ? r0 + per : rows;
    float s = 0.0f;
    for (u64 r = r0; r < r1; ++r) s += ld1(g + r * d + j);
    scratch[(u64)blockIdx.y * d + j] = s;
}

extern "C" __global__ void column_sum_partial_f32(float* __restrict__ scratch, const float* __restrict__ g, u32 rows,
                                                  u32 d, u32 per) {
    column_sum_partial<float>(scratch, g, rows, d, per);
}

extern "C" __global__ void column_sum_partial_bf16(float* __restrict__ scratch, const bf16_t* __restrict__ g,
                                                   u32 rows, u32 d, u32 per) {
    column_sum_partial<bf16_t>(scratch, g, rows, d, per);
}

// v2 column sum, pass 2: out[j] = Σ_{c in order} scratch[c, j], or with `add` out[j] + that sum
// (a bias gradient accumulated in place).
extern "C" __global__ void column_sum_reduce(float* __restrict__ out, const float* __restrict__ scratch, u32 chunks,
                                             u32 d, u32 add) {
    const u32 j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    float s = 0.0f;
    for (u32 c = 0; c < chunks; ++c) s += scratch[(u64)c * d + j];
    out[j] = add ? out[j] + s : s;
}
