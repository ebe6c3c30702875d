// embedding.cu — token embedding: out[t, :] = table[ids[t], :] (a row gather), and its
// backward d_table[ids[t], :] += d_out[t, :] (scatter-add).
//
// Layout: ids [n] u32 (i32 ids are passed as their bits; the launcher has checked every id is
// in [0, V)); table [V, H] and out [n, H] row-major in any 2- or 4-byte dtype (the forward is a
// copy and never converts); d_out [n, H] f32 or bf16; d_table [V, H] f32.
// Threads:
//   forward v1-v3: a grid-stride loop over (token, unit) with units of 2, 4 or 16 bytes; each
//     step splits its flat index with a 64-bit division, which costs more than the copy of one
//     unit itself.
//   forward v4: a 2-D grid, x across one row's units and y across tokens (looping when tokens
//     exceed the grid): a thread reads its token's id once per row and copies one unit, no
//     division. Units are the widest of 16, 4 or 2 bytes that divides the row and the table/out
//     alignment (the launcher picks), so a warp still moves 512 contiguous bytes per step.
//   backward: one float atomicAdd per element — v1 over a grid-stride (token, column) loop, v2
//     over the same 2-D grid as forward v4 (columns across x). The order of additions for
//     repeated ids is therefore nondeterministic in both (last-bit differences between runs);
//     the CPU version is the deterministic one.
// Versions (the forward and backward are numbered separately):
//   forward v1 2-byte units (any bf16/f16/f32 row), v2 4-byte units, v3 16-byte units, v4 2-D
//     grid with the widest unit that fits (default for every shape)
//   backward v1 grid-stride loop, v2 2-D grid (default)
// (In kernel names v16/v4/v2 and u16/u4/u2 are the unit width in bytes, not versions.)

template <typename U>
__device__ __forceinline__ void gather_rows(U* __restrict__ out, const U* __restrict__ table,
                                            const u32* __restrict__ ids, u64 n, u64 units) {
    const u64 total = n * units;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 t = i / units, u = i - t * units;
        out[i] = table[(u64)ids[t] * units + u];
    }
}

extern "C" __global__ void embedding_fwd_v16(uint4* out, const uint4* table, const u32* ids, u64 n, u64 units) {
    gather_rows<uint4>(out, table, ids, n, units);
}
extern "C" __global__ void embedding_fwd_v4(u32* out, const u32* table, const u32* ids, u64 n, u64 units) {
    gather_rows<u32>(out, table, ids, n, units);
}
extern "C" __global__ void embedding_fwd_v2(unsigned short* out, const unsigned short* table, const u32* ids, u64 n,
                                            u64 units) {
    gather_rows<unsigned short>(out, table, ids, n, units);
}

// Forward v4: x·blockDim.x covers the row's `units`, y strides over tokens.
template <typename U>
__device__ __forceinline__ void gather_rows_2d(U* __restrict__ out, const U* __restrict__ table,
                                               const u32* __restrict__ ids, u64 n, u32 units) {
    const u32 u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= units) return;
    for (u64 t = blockIdx.y * (u64)blockDim.y + threadIdx.y; t < n; t += (u64)gridDim.y * blockDim.y)
        out[t * units + u] = table[(u64)ids[t] * units + u];
}

extern "C" __global__ void embedding_fwd_2d_u16(uint4* out, const uint4* table, const u32* ids, u64 n, u32 units) {
    gather_rows_2d<uint4>(out, table, ids, n, units);
}
extern "C" __global__ void embedding_fwd_2d_u4(u32* out, const u32* table, const u32* ids, u64 n, u32 units) {
    gather_rows_2d<u32>(out, table, ids, n, units);
}
extern "C" __global__ void embedding_fwd_2d_u2(unsigned short* out, const unsigned short* table, const u32* ids,
                                               u64 n, u32 units) {
    gather_rows_2d<unsigned short>(out, table, ids, n, units);
}


template <typename T>
__device__ __forceinline__ void scatter_add_rows(float* d_table, const T* __restrict__ d_out,
                                                 const u32* __restrict__ ids, u64 n, u64 h) {
    const u64 total = n * h;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 t = i / h, j = i - t * h;
        atomicAdd(d_table + (u64)ids[t] * h + j, ld1(d_out + i));
    }
}

extern "C" __global__ void embedding_bwd_f32(float* d_table, const float* d_out, const u32* ids, u64 n, u64 h) {
    scatter_add_rows<float>(d_table, d_out, ids, n, h);
}
extern "C" __global__ void embedding_bwd_bf16(float* d_table, const bf16_t* d_out, const u32* ids, u64 n, u64 h) {
    scatter_add_rows<bf16_t>(d_table, d_out, ids, n, h);
}

// Backward v2: x·blockDim.x covers the h columns, y strides over tokens.
template <typename T>
__device__ __forceinline__ void scatter_add_rows_2d(float* d_table, const T* __restrict__ d_out,
                                                    const u32* __restrict__ ids, u64 n, u32 h) {
    const u32 j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= h) return;
    for (u64 t = blockIdx.y * (u64)blockDim.y + threadIdx.y; t < n; t += (u64)gridDim.y * blockDim.y)
        atomicAdd(d_table + (u64)ids[t] * h + j, ld1(d_out + t * h + j));
}

extern "C" __global__ void embedding_bwd_2d_f32(float* d_table, const float* d_out, const u32* ids, u64 n, u32 h) {
    scatter_add_rows_2d<float>(d_table, d_out, ids, n, h);
}
extern "C" __global__ void embedding_bwd_2d_bf16(float* d_table, const bf16_t* d_out, const u32* ids, u64 n, u32 h) {
    scatter_add_rows_2d<bf16_t>(d_table, d_out, ids, n, h);
}
