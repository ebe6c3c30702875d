// matmul.cu — y = x·Wᵀ for a few rows of x: the linear layers of a decode step.
//
// x [M, K] bf16 (M ≤ 64: one new token per sequence of a batch), W [N, K] bf16 (a Linear
// weight, row-major), y [M, N] bf16; f32 accumulation on tensor cores (mma.sync m16n8k16).
// Everything else (and every matmul of training and prefill) runs on cuBLAS.
//
// Why: with few rows each weight element is used M times, so the product is bound by reading W
// once (e.g. 1 GB per decode step of Qwen2.5-0.5B). Whether cuBLAS, whose tiles are made for many
// rows, reaches that bound at these shapes is what `smelt bench kernels --op matmul_decode`
// measures (not yet on a GPU); this kernel is built for the bound.
//
// Work mapping (block = 8 warps; grid = ⌈N/(8·NT)⌉ blocks): a block owns 8·NT output columns
// (NT 8-column mma n-tiles, i.e. 8·NT rows of W) for all M rows; its warps split K in 64-column
// chunks (warp w takes chunks w, w+8, …). Per chunk, lane = 4·g + t loads 32 contiguous bytes of
// W row n0 + 8j + g (columns 16t..16t+15 of the chunk) for each n-tile j, so the 4 lanes of a row
// read its whole 128-byte line; and the same 32 bytes of x rows g and g+8 of each 16-row m-tile.
// x is small and shared by every block (L1/L2 hits); each x fragment feeds NT n-tiles, so the
// launcher takes NT = 4 where N leaves enough blocks (x traffic per W byte halves against NT = 2),
// and NT = 1 where N is small (twice the blocks of NT = 2, more SMs reading W).
// The chunk's k order inside the mma is permuted so that these registers are the fragments as
// loaded: mma step s (of 4) takes, in lane t, physical columns 16t+4s .. 16t+4s+3 as the logical
// k = 2t, 2t+1, 2t+8, 2t+9 (B regs b0, b1; A regs a0/a1 rows g/g+8, a2/a3 the same rows' +8
// columns). A dot product does not depend on the order of its terms, only its rounding does, and
// f32 accumulation keeps that within the tolerance of bf16 outputs. The next chunk's registers
// are loaded before this chunk's mma (double buffer), so each warp has 2 chunks in flight.
// The 8 warps' partial sums meet in shared memory and are added in warp order (deterministic),
// rounded to bf16 once.
//
// GLU form (matmul_few_rows_glu_*, for `matmul::linear_swiglu`): W = [gate; up] ([2N, K]), y =
// silu(x·W_gateᵀ)·(x·W_upᵀ) [M, N]. A block's first NT/2 n-tiles read gate rows, the others the
// matching up rows, so both products of an output column meet in its shared memory and the
// SwiGLU runs in the epilogue, rounding as the GEMM and swiglu.cu would (the [M, 2N] product is
// never stored, and a decode step has one launch fewer per layer).
//
// Requirements (the launcher checks, else cuBLAS): K % 8 == 0 (a 16-byte piece of a row is then
// wholly inside or outside K; outside pieces are zeros in both operands), x, W 16-byte aligned,
// y contiguous. Rows m ≥ M and n ≥ N load zeros and store nothing.
//
// Versions (op "matmul"): v1 cuBLAS (every matmul; the default), v2 this kernel for
// y = x·Wᵀ with M ≤ 64, bf16 — held back until measured against cuBLAS (`smelt bench kernels
// --op matmul_decode` times both). ptxas (NVRTC 13.0, sm_80 and sm_90, no spills): registers
// m1..m4 × n1: 94–96/100/144/178, × n2: 80/124/170/204, × n4: 124/172 (m1/m2); the GLU forms
// as their plain n2/n4 kernels.

#define MM_WARPS 8

// 16 bytes of a row at column `col`, or zeros when the row (`in` false) or the piece is outside
// the matrix.
__device__ __forceinline__ uint4 mm_ld16(const bf16_t* __restrict__ base, int row, bool in, int col, int K) {
    if (in && col + 8 <= K) return *reinterpret_cast<const uint4*>(base + (u64)row * K + col);
    return make_uint4(0u, 0u, 0u, 0u);
}

// One chunk's operands: W columns for NT n-tiles and x columns for MT m-tiles × 2 rows, each
// 32 bytes (8 u32) per lane.
template <int MT, int NT>
struct MmChunk {
    u32 w[NT][8];
    u32 x[MT][2][8];
};

// GLU: n-tiles j < NT/2 take gate rows n0 + 8j + g of W, the others the matching up rows N + …
// (W is [2N, K], gate rows then up rows; y has N columns).
template <int MT, int NT, bool GLU>
__device__ __forceinline__ void mm_load(MmChunk<MT, NT>& c, const bf16_t* __restrict__ x, const bf16_t* __restrict__ w,
                                        int M, int N, int K, int n0, int k0, int g, int t) {
    const int col = k0 + 16 * t;
    #pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int up = GLU && j >= NT / 2, n = n0 + 8 * (up ? j - NT / 2 : j) + g, row = up ? N + n : n;
        const uint4 a = mm_ld16(w, row, n < N, col, K), b = mm_ld16(w, row, n < N, col + 8, K);
        c.w[j][0] = a.x; c.w[j][1] = a.y; c.w[j][2] = a.z; c.w[j][3] = a.w;
        c.w[j][4] = b.x; c.w[j][5] = b.y; c.w[j][6] = b.z; c.w[j][7] = b.w;
    }
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = 16 * mt + 8 * h + g;
            const uint4 a = mm_ld16(x, m, m < M, col, K), b = mm_ld16(x, m, m < M, col + 8, K);
            c.x[mt][h][0] = a.x; c.x[mt][h][1] = a.y; c.x[mt][h][2] = a.z; c.x[mt][h][3] = a.w;
            c.x[mt][h][4] = b.x; c.x[mt][h][5] = b.y; c.x[mt][h][6] = b.z; c.x[mt][h][7] = b.w;
        }
    }
}

template <int MT, int NT>
__device__ __forceinline__ void mm_compute(float (*acc)[NT][4], const MmChunk<MT, NT>& c) {
    #pragma unroll
    for (int s = 0; s < 4; ++s) {
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const u32 a[4] = {c.x[mt][0][2 * s], c.x[mt][1][2 * s], c.x[mt][0][2 * s + 1], c.x[mt][1][2 * s + 1]};
            #pragma unroll
            for (int j = 0; j < NT; ++j) mma_bf16_16816(acc[mt][j], a, c.w[j][2 * s], c.w[j][2 * s + 1]);
        }
    }
}

// GLU: y = silu(x·W_gateᵀ)·(x·W_upᵀ) with the bits of the GEMM followed by swiglu.cu (both
// products rounded to bf16, silu rounded to bf16, the product rounded once more); a block owns
// 4·NT output columns, its first NT/2 n-tiles the gate rows and the rest the up rows.
template <int MT, int NT, bool GLU>
__device__ void matmul_few_rows(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w, bf16_t* __restrict__ y,
                                int M, int N, int K) {
    // Partial sums of every warp: [warp][row (MT·16)][column (NT·8)].
    __shared__ float part[MM_WARPS][MT * 16][NT * 8];
    constexpr int OUT = GLU ? NT * 4 : NT * 8;  // output columns per block
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * OUT;
    const int chunks = (K + 63) / 64;

    float acc[MT][NT][4];
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int j = 0; j < NT; ++j)
            #pragma unroll
            for (int i = 0; i < 4; ++i) acc[mt][j][i] = 0.0f;

    MmChunk<MT, NT> cur, next;
    int c = warp;
    if (c < chunks) mm_load<MT, NT, GLU>(cur, x, w, M, N, K, n0, 64 * c, g, t);
    while (c < chunks) {
        const int cn = c + MM_WARPS;
        if (cn < chunks) mm_load<MT, NT, GLU>(next, x, w, M, N, K, n0, 64 * cn, g, t);
        mm_compute<MT, NT>(acc, cur);
        if (cn < chunks) cur = next;
        c = cn;
    }

    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int j = 0; j < NT; ++j)
            #pragma unroll
            for (int i = 0; i < 4; ++i) part[warp][16 * mt + g + 8 * (i >> 1)][8 * j + 2 * t + (i & 1)] = acc[mt][j][i];
    __syncthreads();
    for (int e = threadIdx.x; e < MT * 16 * OUT; e += blockDim.x) {
        const int r = e / OUT, col = e % OUT, n = n0 + col;
        if (r >= M || n >= N) continue;
        float sum = 0.0f;
        #pragma unroll
        for (int v = 0; v < MM_WARPS; ++v) sum += part[v][r][col];
        if constexpr (GLU) {
            float up = 0.0f;
            #pragma unroll
            for (int v = 0; v < MM_WARPS; ++v) up += part[v][r][OUT + col];
            const float gate = bf16_to_f32(f32_to_bf16(sum));
            sum = __fmul_rn(round_to(silu(gate), y), bf16_to_f32(f32_to_bf16(up)));
        }
        y[(u64)r * N + n] = f32_to_bf16(sum);
    }
}

// matmul_few_rows_bf16_m<MT>_n<NT>: MT 16-row m-tiles (M ≤ 16·MT), NT n-tiles per block; NT = 4
// only up to MT = 2 (its double-buffered fragments and accumulators would spill at MT 3-4).
// matmul_few_rows_glu_bf16_m<MT>_n<NT>: the GLU form, NT = 2 or 4 (half gate, half up).
#define MATMUL_FEW_ROWS(MT, NT)                                                                           \
    extern "C" __global__ void __launch_bounds__(MM_WARPS * 32)                                           \
        matmul_few_rows_bf16_m##MT##_n##NT(const bf16_t* x, const bf16_t* w, bf16_t* y, int M, int N, int K) { \
        matmul_few_rows<MT, NT, false>(x, w, y, M, N, K);                                                 \
    }
#define MATMUL_FEW_ROWS_GLU(MT, NT)                                                                       \
    extern "C" __global__ void __launch_bounds__(MM_WARPS * 32) matmul_few_rows_glu_bf16_m##MT##_n##NT(  \
        const bf16_t* x, const bf16_t* w, bf16_t* y, int M, int N, int K) {                             \
        matmul_few_rows<MT, NT, true>(x, w, y, M, N, K);                                                  \
    }
MATMUL_FEW_ROWS(1, 1)
MATMUL_FEW_ROWS(2, 1)
MATMUL_FEW_ROWS(3, 1)
MATMUL_FEW_ROWS(4, 1)
MATMUL_FEW_ROWS(1, 2)
MATMUL_FEW_ROWS(2, 2)
MATMUL_FEW_ROWS(3, 2)
MATMUL_FEW_ROWS(4, 2)
MATMUL_FEW_ROWS(1, 4)
MATMUL_FEW_ROWS(2, 4)
MATMUL_FEW_ROWS_GLU(1, 2)
MATMUL_FEW_ROWS_GLU(2, 2)
MATMUL_FEW_ROWS_GLU(3, 2)
MATMUL_FEW_ROWS_GLU(4, 2)
MATMUL_FEW_ROWS_GLU(1, 4)
MATMUL_FEW_ROWS_GLU(2, 4)
