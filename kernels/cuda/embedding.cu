// embedding.cu — token embedding: out[t, :] = table[ids[t], :] (a row gather), and its
// backward d_table[ids[t], :] += d_out[t, :] (scatter-add).
//
// Layout: ids [n] u32 (i32 ids are passed as their bits; the launcher has checked every id is
// in [0, V)); table [V, H] and out [n, H] row-major in any 2- or 4-byte dtype (the forward is a
// copy and never converts); d_out [n, H] f32 or bf16; d_table [V, H] f32.
// Threads:
//   forward: a grid-stride loop over (token, unit) with units of 16, 4 or 2 bytes — the widest
//     that divides the row and the table/out alignment (the launcher picks) — so a warp reads
//     512 contiguous bytes of one row per step with 16-byte loads.
//   backward: a grid-stride loop over (token, column); one float atomicAdd per element. The
//     order of additions for repeated ids is therefore nondeterministic (last-bit differences
//     between runs); the CPU version is the deterministic one.
// Versions:
//   v1 forward 2-byte units (any bf16/f16 row), backward scalar atomicAdd
//   v2 forward 4-byte units
//   v3 forward 16-byte units (default where rows and pointers allow)

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
