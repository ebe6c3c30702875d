// rope.cu — rotary position embedding, Hugging Face rotate-half convention:
//   out[i]   = x[i]·cos − x[i+h]·sin,   out[i+h] = x[i+h]·cos + x[i]·sin   (i < h = head_dim/2)
// with cos/sin of the f32 angle pos[token]·inv_freq[i] (HF's f32 product), computed here with
// the accurate sincosf. sign = −1 gives the inverse rotation (the backward). For bf16 the
// kernel rounds where HF's bf16 graph rounds: cos/sin to bf16, each product, then the sum.
//
// Layout: x, out [tokens, heads, 2h] row-major (out may equal x: in place is safe, each thread
// reads both halves of its elements before writing them); pos [tokens] u32; inv_freq [h] f32.
// Threads: a grid-stride loop over (token, head, chunk of N consecutive i); a thread loads N
// elements of the first half and the N matching ones of the second half, N = 16 bytes of T
// through 16-byte loads when h % N == 0 and x/out are 16-byte aligned, N = 1 otherwise.
// Versions:
//   v1 scalar, one (i, i+h) pair per thread per step
//   v2 16-byte vector loads, N pairs per thread per step (default where aligned)


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
        float a[N], b[N], lo[N], hi[N];
        ldn<T, N>(x + base + c, a);
        ldn<T, N>(x + base + h + c, b);
        #pragma unroll
        for (int k = 0; k < N; ++k) {
            float sn, cs;
            sincosf(__fmul_rn(p, inv_freq[c + k]), &sn, &cs);
            cs = round_to(cs, x);
            sn = sign * round_to(sn, x);
            lo[k] = __fadd_rn(round_to(__fmul_rn(a[k], cs), x), round_to(__fmul_rn(-b[k], sn), x));
            hi[k] = __fadd_rn(round_to(__fmul_rn(b[k], cs), x), round_to(__fmul_rn(a[k], sn), x));
        }
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
