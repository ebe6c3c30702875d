// rope.cu — rotary position embedding, Hugging Face rotate-half convention:
//   out[i]   = x[i]·cos − x[i+h]·sin,   out[i+h] = x[i+h]·cos + x[i]·sin   (i < h = head_dim/2)
// with cos/sin of the f32 angle pos[token]·inv_freq[i] (HF's f32 product), computed here with
// the accurate sincosf. sign = −1 gives the inverse rotation (the backward). For bf16 the
// kernel rounds where HF's bf16 graph rounds: cos/sin to bf16, each product, then the sum.
//
// Layout: x, out [tokens, heads, 2h] row-major (out may equal x: in place is safe, each thread
// reads both halves of its elements before writing them); pos [tokens] u32; inv_freq [h] f32.
// A thread works on chunks of N consecutive i: it loads N elements of the first half and the N
// matching ones of the second half, N = 16 bytes of T through 16-byte loads when h % N == 0 and
// x/out are 16-byte aligned (the launcher checks), N = 1 otherwise.
// Threads:
//   v1/v2: a grid-stride loop over (token, head, chunk), one chunk per step. The angle does not
//     depend on the head, yet every step recomputes its N sincosf (heads times per token), and
//     splitting the flat index costs two 64-bit divisions per step.
//   v3: a 2-D grid — x over the chunks of i, y over tokens (looping when tokens exceed the
//     grid), z over groups of heads. A thread computes the N cos/sin of its (token, chunk) once
//     and applies them to every head of its group, loading ROPE_G heads before storing any so
//     that several loads are in flight. No division anywhere. The launcher splits the heads into
//     z groups only when tokens·chunks alone would leave the GPU idle (decode-sized batches);
//     each group recomputes the same cos/sin, so results never depend on the split.
// Every version evaluates the same expressions per element (same sincosf argument, same
// roundings, explicit _rn so nothing contracts into an FMA), so all give the same bits.
// Versions:
//   v1 scalar, one (i, i+h) pair per thread per step
//   v2 16-byte vector loads, N pairs per thread per step (needs the alignment above)
//   v3 cos/sin once per (token, chunk) for all heads, 2-D grid; vector loads where v2 could
//      use them, scalar otherwise (default for every shape)

// rope_rotate and rope_cos_sin (the per-element arithmetic) live in common.cuh, shared with
// attention_inputs.cu, so the fused kernel there rounds exactly as this file does.

template <typename T, int N>
__device__ __forceinline__ void rope_impl(T* out, const T* x, const u32* __restrict__ pos,
                                          const float* __restrict__ inv_freq, u64 tokens, u32 heads,
                                          u32 h, float sign) {
    const u32 cph = h / N;  // chunks per head
    const u64 total = tokens * heads * cph;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 th = i / cph;  // token·heads + head
        const u32 c = (u32)(i - th * cph) * N;
        const float p = (float)pos[th / heads];
        const u64 base = th * 2 * h;
        float a[N], b[N], lo[N], hi[N], cs[N], sn[N];
        ldn<T, N>(x + base + c, a);
        ldn<T, N>(x + base + h + c, b);
        rope_cos_sin<T, N>(cs, sn, p, inv_freq + c, sign, x);
        rope_rotate<T, N>(lo, hi, a, b, cs, sn, x);
        stn<T, N>(out + base + c, lo);
        stn<T, N>(out + base + h + c, hi);
    }
}

#define ROPE_KERNEL(NAME, T, N)                                                                    \
    extern "C" __global__ void NAME(T* out, const T* x, const u32* pos, const float* inv_freq,    \
                                    u64 tokens, u32 heads, u32 h, float sign) {                    \
        rope_impl<T, N>(out, x, pos, inv_freq, tokens, heads, h, sign);                            \
    }

ROPE_KERNEL(rope_f32, float, 1)
ROPE_KERNEL(rope_f32_v2, float, 4)
ROPE_KERNEL(rope_bf16, bf16_t, 1)
ROPE_KERNEL(rope_bf16_v2, bf16_t, 8)

// Heads a v3 thread loads before it stores any: enough loads in flight to cover memory latency
// (2·ROPE_G 16-byte loads), few enough registers to keep the SM full.
#define ROPE_G 4

// A chunk of N elements of T as loaded, unconverted: 16 raw bytes (4 registers, where 8 bf16 as
// floats would take 8) or one element. rope_unpack gives the floats ldn would.
template <typename T, int N> struct RopeRaw { uint4 v; };
template <typename T> struct RopeRaw<T, 1> { T v; };

template <typename T, int N> __device__ __forceinline__ void rope_ld(RopeRaw<T, N>& r, const T* p) {
    if constexpr (N == 1) r.v = *p;
    else r.v = *reinterpret_cast<const uint4*>(p);
}
template <typename T, int N> __device__ __forceinline__ void rope_unpack(const RopeRaw<T, N>& r, float* f) {
    if constexpr (N == 1) {
        f[0] = ld1(&r.v);
    } else if constexpr (sizeof(T) == 4) {
        f[0] = __uint_as_float(r.v.x); f[1] = __uint_as_float(r.v.y);
        f[2] = __uint_as_float(r.v.z); f[3] = __uint_as_float(r.v.w);
    } else {
        const u32 w[4] = {r.v.x, r.v.y, r.v.z, r.v.w};
        #pragma unroll
        for (int k = 0; k < 4; ++k) {
            f[2 * k] = bf16_to_f32((bf16_t)(w[k] & 0xffffu));
            f[2 * k + 1] = bf16_to_f32((bf16_t)(w[k] >> 16));
        }
    }
}

// v3. Grid: x·blockDim.x covers the h/N chunks, y·blockDim.y strides over tokens, z = groups of
// `hpg` heads. In place is safe: a thread reads all of a group's elements before it writes them,
// and no other thread touches them.
template <typename T, int N>
__device__ __forceinline__ void rope_v3_impl(T* out, const T* x, const u32* __restrict__ pos,
                                             const float* __restrict__ inv_freq, u64 tokens, u32 heads, u32 h,
                                             u32 hpg, float sign) {
    const u32 chunk = blockIdx.x * blockDim.x + threadIdx.x;
    if (chunk >= h / N) return;
    const u32 c = chunk * N;
    const u32 hd0 = blockIdx.z * hpg;
    const u32 hd1 = hd0 + hpg < heads ? hd0 + hpg : heads;
    float f[N];
    #pragma unroll
    for (int k = 0; k < N; ++k) f[k] = inv_freq[c + k];
    for (u64 t = blockIdx.y * (u64)blockDim.y + threadIdx.y; t < tokens; t += (u64)gridDim.y * blockDim.y) {
        const u64 row = t * heads * 2 * h + c;  // element c of head 0 of token t
        RopeRaw<T, N> a[ROPE_G], b[ROPE_G];
        // The first group's loads go out before the sincosf work that does not depend on them.
        #pragma unroll
        for (int g = 0; g < ROPE_G; ++g) {
            if (hd0 + g < hd1) {
                const T* src = x + row + (u64)(hd0 + g) * 2 * h;
                rope_ld<T, N>(a[g], src);
                rope_ld<T, N>(b[g], src + h);
            }
        }
        float cs[N], sn[N];
        rope_cos_sin<T, N>(cs, sn, (float)pos[t], f, sign, x);
        for (u32 hd = hd0; hd < hd1; hd += ROPE_G) {
            if (hd != hd0) {
                #pragma unroll
                for (int g = 0; g < ROPE_G; ++g) {
                    if (hd + g < hd1) {
                        const T* src = x + row + (u64)(hd + g) * 2 * h;
                        rope_ld<T, N>(a[g], src);
                        rope_ld<T, N>(b[g], src + h);
                    }
                }
            }
            #pragma unroll
            for (int g = 0; g < ROPE_G; ++g) {
                if (hd + g < hd1) {
                    float av[N], bv[N], lo[N], hi[N];
                    rope_unpack<T, N>(a[g], av);
                    rope_unpack<T, N>(b[g], bv);
                    rope_rotate<T, N>(lo, hi, av, bv, cs, sn, x);
                    T* dst = out + row + (u64)(hd + g) * 2 * h;
                    stn<T, N>(dst, lo);
                    stn<T, N>(dst + h, hi);
                }
            }
        }
    }
}

#define ROPE_V3_KERNEL(NAME, T, N)                                                                 \
    extern "C" __global__ void NAME(T* out, const T* x, const u32* pos, const float* inv_freq,    \
                                    u64 tokens, u32 heads, u32 h, u32 hpg, float sign) {           \
        rope_v3_impl<T, N>(out, x, pos, inv_freq, tokens, heads, h, hpg, sign);                    \
    }

ROPE_V3_KERNEL(rope_f32_v3_scalar, float, 1)
ROPE_V3_KERNEL(rope_f32_v3, float, 4)
ROPE_V3_KERNEL(rope_bf16_v3_scalar, bf16_t, 1)
ROPE_V3_KERNEL(rope_bf16_v3, bf16_t, 8)
