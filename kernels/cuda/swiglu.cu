// swiglu.cu — SwiGLU: out = silu(gate) · up, silu(g) = g / (1 + e^-g), and its backward
// dgate = dy · up · s·(1 + g·(1 − s)) (s = sigmoid(g)), dup = dy · silu(g).
//
// Layout: `rows` rows of `cols` elements. gate/up element (r, j) is at r·in_stride + j from its
// own base pointer; outputs at r·out_stride + j; dy (backward) at r·cols + j. The plain op is
// rows = 1 over the whole buffer; the fused op reads one [rows, 2·cols] gate|up tensor (gate
// base = row start, up base = row start + cols, in_stride = 2·cols). f32, or bf16 storage with
// f32 math; for bf16 the forward rounds silu(gate) to bf16 before the product (as HF does).
// Threads: a grid-stride loop over chunks of N consecutive elements of a row; N = 16 bytes'
// worth (4 f32 / 8 bf16) through one 16-byte load per operand when the launcher finds every
// row start 16-byte aligned (cols, strides, offsets % N == 0, pointers % 16 == 0), N = 1 otherwise.
// Versions:
//   v1 scalar grid-stride loop (any alignment)
//   v2 16-byte vector loads, N elements per thread per step (default where aligned)


// silu (common.cuh): PyTorch's f32 formula, shared with matmul.cu's GLU epilogue.

template <typename T, int N>
__device__ __forceinline__ void swiglu_fwd(T* out, const T* gate, const T* up, u64 rows, u64 cols,
                                           u64 in_stride, u64 out_stride) {
    const u64 cpr = cols / N, total = rows * cpr;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / cpr, c = (i - r * cpr) * N;
        float g[N], u[N], o[N];
        ldn<T, N>(gate + r * in_stride + c, g);
        ldn<T, N>(up + r * in_stride + c, u);
        #pragma unroll
        for (int k = 0; k < N; ++k) o[k] = __fmul_rn(round_to(silu(g[k]), gate), u[k]);
        stn<T, N>(out + r * out_stride + c, o);
    }
}

template <typename T, int N>
__device__ __forceinline__ void swiglu_bwd(T* dgate, T* dup, const T* gate, const T* up, const T* dy,
                                           u64 rows, u64 cols, u64 in_stride, u64 out_stride) {
    const u64 cpr = cols / N, total = rows * cpr;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / cpr, c = (i - r * cpr) * N;
        float g[N], u[N], d[N], dg[N], du[N];
        ldn<T, N>(gate + r * in_stride + c, g);
        ldn<T, N>(up + r * in_stride + c, u);
        ldn<T, N>(dy + r * cols + c, d);
        #pragma unroll
        for (int k = 0; k < N; ++k) {
            const float s = __fdiv_rn(1.0f, 1.0f + expf(-g[k]));
            dg[k] = d[k] * u[k] * (s * (1.0f + g[k] * (1.0f - s)));
            du[k] = d[k] * (g[k] * s);
        }
        stn<T, N>(dgate + r * out_stride + c, dg);
        stn<T, N>(dup + r * out_stride + c, du);
    }
}

#define SWIGLU_FWD(NAME, T, N)                                                                     \
    extern "C" __global__ void NAME(T* out, const T* gate, const T* up, u64 rows, u64 cols,        \
                                    u64 in_stride, u64 out_stride) {                               \
        swiglu_fwd<T, N>(out, gate, up, rows, cols, in_stride, out_stride);                        \
    }
#define SWIGLU_BWD(NAME, T, N)                                                                     \
    extern "C" __global__ void NAME(T* dgate, T* dup, const T* gate, const T* up, const T* dy,     \
                                    u64 rows, u64 cols, u64 in_stride, u64 out_stride) {           \
        swiglu_bwd<T, N>(dgate, dup, gate, up, dy, rows, cols, in_stride, out_stride);             \
    }

SWIGLU_FWD(swiglu_f32, float, 1)
SWIGLU_FWD(swiglu_f32_v4, float, 4)
SWIGLU_FWD(swiglu_bf16, bf16_t, 1)
SWIGLU_FWD(swiglu_bf16_v8, bf16_t, 8)
SWIGLU_BWD(swiglu_bwd_f32, float, 1)
SWIGLU_BWD(swiglu_bwd_f32_v4, float, 4)
SWIGLU_BWD(swiglu_bwd_bf16, bf16_t, 1)
SWIGLU_BWD(swiglu_bwd_bf16_v8, bf16_t, 8)
