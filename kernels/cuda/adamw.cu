// adamw.cu — fused AdamW step (PyTorch `torch.optim.AdamW` semantics) over a flat buffer:
//   g  = grad_scale · grad                         (clip / accumulation scale, same pass)
//   m  = β1·m + (1−β1)·g
//   v  = β2·v + (1−β2)·g²
//   p  = p·(1 − lr·wd) − step_size · m / (sqrt(v)·inv_bc2_sqrt + eps)
// with step_size = lr / (1 − β1^t) and inv_bc2_sqrt = 1 / sqrt(1 − β2^t) computed on the host
// in f64; optionally out[i] = bf16(p[i]) (round to nearest even) in the same pass.
//
// Layout: p, m, v f32 and grad f32 or bf16, flat contiguous buffers of n elements (a segment of
// a larger flat buffer: the launcher offsets the pointers); out is a bf16 buffer or null.
// Threads: a grid-stride loop, one element per thread per step (v1), or 4 consecutive elements
// through float4 accesses of p/m/v (16-byte), float4 or 8-byte loads of grad and an 8-byte
// store of out (v2, when every pointer is aligned; the first n % 4 threads do the tail). All
// math in f32, in the same order as the CPU reference.
// Kernels: adamw_<grad dtype>[_v4], grad dtype in {f32, bf16}.
// Versions:
//   v1 scalar grid-stride loop (any alignment)
//   v2 4 elements per thread through vector accesses (current default where aligned)
//
// adamw_multi_f32 ("adamw" version 2 of a tensor group; version 1 launches the kernels above per
// tensor): many tensors (a model's parameters) in one launch, f32 grads. A table in
// device memory holds per tensor 8 u64 {p, m, v, g, out, n, decay?, first chunk}; each tensor
// is cut into chunks of ADAMW_CHUNK elements, numbered across tensors (first chunk = the
// prefix sum). Block b takes chunks b, b + gridDim.x, …; for each it finds the tensor by a
// binary search on the first-chunk column, then its threads update the chunk's elements as v2
// does (4 at a time when the tensor's pointers allow, else one), with the tensor's decay.

struct AdamArgs {
    float beta1, beta2, eps, decay, step_size, inv_bc2_sqrt, grad_scale;
};

__device__ __forceinline__ float adamw_elem(float p, float& m, float& v, float g, const AdamArgs& a) {
    g *= a.grad_scale;
    m = a.beta1 * m + (1.0f - a.beta1) * g;
    v = a.beta2 * v + (1.0f - a.beta2) * (g * g);
    const float denom = sqrtf(v) * a.inv_bc2_sqrt + a.eps;
    return p * a.decay - a.step_size * (m / denom);
}

__device__ __forceinline__ float grad_ld(const float* g, u64 i) { return g[i]; }
__device__ __forceinline__ float grad_ld(const bf16_t* g, u64 i) { return bf16_to_f32(g[i]); }

__device__ __forceinline__ void grad_ld4(const float* g, u64 q, float* f) {
    float4 x = reinterpret_cast<const float4*>(g)[q];
    f[0] = x.x; f[1] = x.y; f[2] = x.z; f[3] = x.w;
}
__device__ __forceinline__ void grad_ld4(const bf16_t* g, u64 q, float* f) {
    uint2 u = reinterpret_cast<const uint2*>(g)[q];
    f[0] = bf16_to_f32((bf16_t)(u.x & 0xffffu)); f[1] = bf16_to_f32((bf16_t)(u.x >> 16));
    f[2] = bf16_to_f32((bf16_t)(u.y & 0xffffu)); f[3] = bf16_to_f32((bf16_t)(u.y >> 16));
}

template <class G>
__device__ __forceinline__ void adamw_scalar(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v,
                                             const G* __restrict__ g, bf16_t* __restrict__ out, u64 n,
                                             const AdamArgs a) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float mi = m[i], vi = v[i];
        const float pi = adamw_elem(p[i], mi, vi, grad_ld(g, i), a);
        p[i] = pi; m[i] = mi; v[i] = vi;
        if (out) out[i] = f32_to_bf16(pi);
    }
}

// Elements 4q .. 4q+3 through 16-byte accesses of p, m, v (and out's 8 bytes).
template <class G>
__device__ __forceinline__ void adamw_quad(float4* __restrict__ p4, float4* __restrict__ m4, float4* __restrict__ v4,
                                           const G* __restrict__ g, bf16_t* __restrict__ out, u64 q,
                                           const AdamArgs& a) {
    float4 pp = p4[q], mm = m4[q], vv = v4[q];
    float gg[4];
    grad_ld4(g, q, gg);
    pp.x = adamw_elem(pp.x, mm.x, vv.x, gg[0], a);
    pp.y = adamw_elem(pp.y, mm.y, vv.y, gg[1], a);
    pp.z = adamw_elem(pp.z, mm.z, vv.z, gg[2], a);
    pp.w = adamw_elem(pp.w, mm.w, vv.w, gg[3], a);
    p4[q] = pp; m4[q] = mm; v4[q] = vv;
    if (out) {
        uint2 o;
        o.x = (u32)f32_to_bf16(pp.x) | ((u32)f32_to_bf16(pp.y) << 16);
        o.y = (u32)f32_to_bf16(pp.z) | ((u32)f32_to_bf16(pp.w) << 16);
        reinterpret_cast<uint2*>(out)[q] = o;
    }
}

template <class G>
__device__ __forceinline__ void adamw_vec4(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v,
                                           const G* __restrict__ g, bf16_t* __restrict__ out, u64 n,
                                           const AdamArgs a) {
    const u64 tid = blockIdx.x * (u64)blockDim.x + threadIdx.x, n4 = n / 4;
    float4* p4 = reinterpret_cast<float4*>(p);
    float4* m4 = reinterpret_cast<float4*>(m);
    float4* v4 = reinterpret_cast<float4*>(v);
    for (u64 q = tid; q < n4; q += (u64)gridDim.x * blockDim.x) adamw_quad(p4, m4, v4, g, out, q, a);
    const u64 i = n4 * 4 + tid;
    if (i < n) {
        float mi = m[i], vi = v[i];
        const float pi = adamw_elem(p[i], mi, vi, grad_ld(g, i), a);
        p[i] = pi; m[i] = mi; v[i] = vi;
        if (out) out[i] = f32_to_bf16(pi);
    }
}

#define SMELT_ADAMW_KERNELS(DT, G)                                                                   \
    extern "C" __global__ void adamw_##DT(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v, \
                                          const G* __restrict__ g, bf16_t* __restrict__ out, u64 n,   \
                                          float beta1, float beta2, float eps, float decay,           \
                                          float step_size, float inv_bc2_sqrt, float grad_scale) {    \
        const AdamArgs a = {beta1, beta2, eps, decay, step_size, inv_bc2_sqrt, grad_scale};           \
        adamw_scalar<G>(p, m, v, g, out, n, a);                                                       \
    }                                                                                                 \
    extern "C" __global__ void adamw_##DT##_v4(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v, \
                                               const G* __restrict__ g, bf16_t* __restrict__ out, u64 n, \
                                               float beta1, float beta2, float eps, float decay,      \
                                               float step_size, float inv_bc2_sqrt, float grad_scale) { \
        const AdamArgs a = {beta1, beta2, eps, decay, step_size, inv_bc2_sqrt, grad_scale};           \
        adamw_vec4<G>(p, m, v, g, out, n, a);                                                         \
    }

SMELT_ADAMW_KERNELS(f32, float)
SMELT_ADAMW_KERNELS(bf16, bf16_t)

#define ADAMW_CHUNK 4096

extern "C" __global__ void adamw_multi_f32(const u64* __restrict__ table, u32 n_tensors, u64 total_chunks,
                                           float beta1, float beta2, float eps, float decay_on, float decay_off,
                                           float step_size, float inv_bc2_sqrt, float grad_scale) {
    for (u64 c = blockIdx.x; c < total_chunks; c += gridDim.x) {
        u32 lo = 0, hi = n_tensors - 1;
        while (lo < hi) {
            const u32 mid = (lo + hi + 1) / 2;
            if (table[(u64)mid * 8 + 7] <= c) lo = mid; else hi = mid - 1;
        }
        const u64* e = table + (u64)lo * 8;
        float* p = reinterpret_cast<float*>(e[0]);
        float* m = reinterpret_cast<float*>(e[1]);
        float* v = reinterpret_cast<float*>(e[2]);
        const float* g = reinterpret_cast<const float*>(e[3]);
        bf16_t* out = reinterpret_cast<bf16_t*>(e[4]);
        const u64 n = e[5];
        const AdamArgs a = {beta1, beta2, eps, e[6] ? decay_on : decay_off, step_size, inv_bc2_sqrt, grad_scale};
        const u64 start = (c - e[7]) * ADAMW_CHUNK;
        const u64 end = start + ADAMW_CHUNK < n ? start + ADAMW_CHUNK : n;
        const bool vec4 = ((e[0] | e[1] | e[2] | e[3]) & 15) == 0 && (e[4] & 7) == 0;
        u64 i = start + threadIdx.x;
        if (vec4) {
            // start is a multiple of 4; the whole quads of the chunk, then its tail.
            const u64 end4 = start + (end - start) / 4 * 4;
            float4* p4 = reinterpret_cast<float4*>(p);
            float4* m4 = reinterpret_cast<float4*>(m);
            float4* v4 = reinterpret_cast<float4*>(v);
            for (u64 q = start / 4 + threadIdx.x; q < end4 / 4; q += blockDim.x) adamw_quad(p4, m4, v4, g, out, q, a);
            i = end4 + threadIdx.x;
        }
        for (; i < end; i += blockDim.x) {
            float mi = m[i], vi = v[i];
            const float pi = adamw_elem(p[i], mi, vi, g[i], a);
            p[i] = pi; m[i] = mi; v[i] = vi;
            if (out) out[i] = f32_to_bf16(pi);
        }
    }
}
