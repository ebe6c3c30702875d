//! Launchers for `kernels/cuda/attention.cu`. Host-side index lists (cu_seqlens, tile lists,
//! cache slots) are uploaded as small u32 tensors per call.
use super::*;
use crate::cuda::{launch, upload, Arg, LaunchCfg};

/// Forward query-tile rows of the tensor-core versions (must match `BR` in the kernels: 64 for
/// v2, 64·MT for v3 and v4, whose MT is 2 for v3 at head dim 64, else 1).
fn fwd_tile_rows(version: u32, head_dim: usize) -> usize {
    if version == 3 && head_dim == 64 {
        128
    } else {
        64
    }
}
/// Backward v1 key / query tile sizes (must match `BWD_BK` / `BWD_BQ`).
const BWD_BK: usize = 32;
const BWD_BQ: usize = 8;
/// Backward v2/v3 key tile (dK/dV) and query tile (dQ) rows.
const BWD_TC_TILE: usize = 64;
/// New tokens per decode block (must match `DEC_MAXQ`).
const DEC_MAXQ: usize = 4;
/// Decode aims at this many blocks (about 2 per SM on an H100) before splitting the cache.
const DEC_TARGET_BLOCKS: usize = 264;
/// Shortest cache chunk one decode block handles.
const DEC_MIN_CHUNK: usize = 128;
/// Query rows (heads of one KV group × new tokens) per decode v2 block (must match `DEC2_R`).
const DEC_V2_ROWS: usize = 8;

/// Head dims the CUDA kernels are instantiated for (`ATT_*_DIMS` in attention.cu): Qwen's 64 and
/// 128, and small ones for test-sized models. The v2 forward takes 64 and 128; others run v1.
pub const CUDA_HEAD_DIMS: [usize; 6] = [8, 16, 24, 32, 64, 128];

fn suffix(op: &'static str, dt: DType, d: usize) -> Result<String> {
    let t = match dt {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        dt => return Err(Error::UnsupportedDType { op, dtype: dt }),
    };
    if !CUDA_HEAD_DIMS.contains(&d) {
        return Err(Error::shape(op, format!("head_dim {d}: the CUDA kernels take {CUDA_HEAD_DIMS:?}")));
    }
    Ok(format!("{t}_d{d}"))
}

/// (sequence, tile start) pairs flattened, heaviest first. Query tiles (forward, dQ) see keys
/// up to their end, so the latest tile of a sequence is the heaviest; key tiles (dK/dV) see the
/// query rows from their start on, so the earliest is the heaviest (`key_tiles`).
fn tiles_by(cu: &[u32], size: usize, work: impl Fn(usize, usize) -> usize) -> Vec<u32> {
    let mut t: Vec<(u32, u32, usize)> = vec![];
    for (b, w) in cu.windows(2).enumerate() {
        let len = (w[1] - w[0]) as usize;
        for s in (0..len).step_by(size) {
            t.push((b as u32, s as u32, work(len, s)));
        }
    }
    t.sort_by_key(|&(_, _, w)| std::cmp::Reverse(w));
    t.into_iter().flat_map(|(b, s, _)| [b, s]).collect()
}

fn tiles(cu: &[u32], size: usize) -> Vec<u32> {
    tiles_by(cu, size, |_, s| s)
}

fn key_tiles(cu: &[u32], size: usize) -> Vec<u32> {
    tiles_by(cu, size, |len, s| len - s)
}

/// dK/dV blocks (key tile, KV head) backward v4 aims at before splitting a KV group's query
/// heads over more blocks: 4 per SM of an H100, two waves at the two blocks an SM holds.
const DKDV_TARGET_BLOCKS: usize = 4 * 132;

#[cfg(test)]
thread_local! {
    /// Tests set the number of parts backward v4 splits a KV group's query heads into.
    pub(super) static DKDV_PARTS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Parts backward v4 splits each KV group's `rep` query heads into, for `blocks` (key tile, KV
/// head) blocks: enough that the blocks reach [`DKDV_TARGET_BLOCKS`], at most one head each.
pub(super) fn dkdv_parts(blocks: usize, rep: usize) -> usize {
    #[cfg(test)]
    if let Some(p) = DKDV_PARTS.with(|p| p.get()) {
        return p.clamp(1, rep.max(1));
    }
    DKDV_TARGET_BLOCKS.div_ceil(blocks.max(1)).clamp(1, rep.max(1))
}

/// Whether the tensor-core (mma.sync) kernels, forward and backward v2/v3, take these
/// tensors: bf16, head_dim 64 or 128, and 16-byte aligned rows; otherwise only v1 can.
fn tensor_cores_fit(dims: Dims, ts: &[&Tensor]) -> Result<bool> {
    if ts[0].dtype() != DType::BF16 || !matches!(dims.head_dim, 64 | 128) {
        return Ok(false);
    }
    for t in ts {
        if t.cuda_ptr()? % 16 != 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

fn i32_arg(op: &'static str, x: usize) -> Result<Arg> {
    i32::try_from(x).map(Arg::I32).map_err(|_| Error::shape(op, format!("size {x} exceeds i32")))
}

#[allow(clippy::too_many_arguments)]
pub fn forward(
    ord: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu: &[u32],
    dims: Dims,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "attention_forward (cuda)";
    let suf = suffix(OP, q.dtype(), dims.head_dim)?;
    let t = q.dim(0);
    let dev = Device::Cuda(ord);
    let o = Tensor::empty(q.shape(), q.dtype(), dev)?;
    let lse = Tensor::empty(&[dims.n_heads, t], DType::F32, dev)?;
    if t == 0 {
        return Ok((o, lse));
    }
    let cu_d = upload(ord, cu)?;
    let (pq, pk, pv, po) = (q.cuda_ptr()?, k.cuda_ptr()?, v.cuda_ptr()?, o.cuda_ptr()?);
    let tensor_cores = tensor_cores_fit(dims, &[q, k, v, &o])?;
    // v4 is v3 with one m-tile per warp at head dim 64; at 128 v3 already is that kernel.
    let allowed: &[u32] = match (tensor_cores, dims.head_dim) {
        (false, _) => &[1],
        (true, 64) => &[1, 2, 3, 4],
        (true, _) => &[1, 2, 3],
    };
    let version =
        crate::versions::pick_up_to("attention_forward", allowed, super::forward_version_limit(dims.head_dim))?;
    let (nh, nkv) = (i32_arg(OP, dims.n_heads)?, i32_arg(OP, dims.n_kv_heads)?);
    // v1: one block per 4 query rows, finding each row's sequence in cu; v2–v4: one block per
    // (sequence, query tile) of a host-made list.
    let tile_list;
    let (blocks, index_args) = if version == 1 {
        (t.div_ceil(4), [Arg::Ptr(cu_d.cuda_ptr()?), i32_arg(OP, cu.len() - 1)?])
    } else {
        let tl = tiles(cu, fwd_tile_rows(version, dims.head_dim));
        tile_list = upload(ord, &tl)?;
        (tl.len() / 2, [Arg::Ptr(tile_list.cuda_ptr()?), Arg::Ptr(cu_d.cuda_ptr()?)])
    };
    let cfg = LaunchCfg { grid: (blocks as u32, dims.n_heads as u32, 1), block: (128, 1, 1), smem: 0 };
    let [ia, ib] = index_args;
    let args = [
        Arg::Ptr(pq),
        Arg::Ptr(pk),
        Arg::Ptr(pv),
        ia,
        ib,
        i32_arg(OP, t)?,
        nh,
        nkv,
        Arg::F32(scale),
        Arg::Ptr(po),
        Arg::Ptr(lse.cuda_ptr()?),
    ];
    launch(ord, &SRC, &format!("attn_fwd_v{version}_{suf}"), cfg, &args)?;
    Ok((o, lse))
}

#[allow(clippy::too_many_arguments)]
pub fn backward(
    ord: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    cu: &[u32],
    dims: Dims,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "attention_backward (cuda)";
    let suf = suffix(OP, q.dtype(), dims.head_dim)?;
    let tensor_cores = tensor_cores_fit(dims, &[q, k, v, o, d_o])?;
    let version = crate::versions::pick("attention_backward", if tensor_cores { &[1, 2, 3, 4] } else { &[1] })?;
    let t = q.dim(0);
    let dev = Device::Cuda(ord);
    let dq = Tensor::empty(q.shape(), q.dtype(), dev)?;
    let dk = Tensor::empty(k.shape(), k.dtype(), dev)?;
    let dv = Tensor::empty(v.shape(), v.dtype(), dev)?;
    if t == 0 {
        return Ok((dq, dk, dv));
    }
    // Keys no query sees cannot occur (causal always includes the diagonal), so the kernels
    // write every row of dk/dv; empty sequences own no rows.
    let delta = Tensor::empty(&[dims.n_heads, t], DType::F32, dev)?;
    let cu_d = upload(ord, cu)?;
    let (nh, nkv, nt) = (i32_arg(OP, dims.n_heads)?, i32_arg(OP, dims.n_kv_heads)?, i32_arg(OP, t)?);
    let rows = t * dims.n_heads;
    launch(
        ord,
        &SRC,
        &format!("attn_bwd_delta_{suf}"),
        LaunchCfg { grid: (rows.div_ceil(4) as u32, 1, 1), block: (128, 1, 1), smem: 0 },
        &[Arg::Ptr(o.cuda_ptr()?), Arg::Ptr(d_o.cuda_ptr()?), nt, nh, Arg::Ptr(delta.cuda_ptr()?)],
    )?;
    let head = [
        Arg::Ptr(q.cuda_ptr()?),
        Arg::Ptr(k.cuda_ptr()?),
        Arg::Ptr(v.cuda_ptr()?),
        Arg::Ptr(d_o.cuda_ptr()?),
        Arg::Ptr(lse.cuda_ptr()?),
        Arg::Ptr(delta.cuda_ptr()?),
    ];
    // v4 is v3 with the dK/dV heads split (below); its dQ kernel is v3's.
    let (kv_tile, q_tile, tag) = match version {
        1 => (BWD_BK, BWD_BQ, String::new()),
        4 => (BWD_TC_TILE, BWD_TC_TILE, "v3_".to_string()),
        v => (BWD_TC_TILE, BWD_TC_TILE, format!("v{v}_")),
    };
    let kt = key_tiles(cu, kv_tile);
    let kt_d = upload(ord, &kt)?;
    let key_blocks = kt.len() / 2;
    let parts = if version == 4 { dkdv_parts(key_blocks * dims.n_kv_heads, dims.n_heads / dims.n_kv_heads) } else { 1 };
    let mut args = head.to_vec();
    args.extend([Arg::Ptr(kt_d.cuda_ptr()?), Arg::Ptr(cu_d.cuda_ptr()?), nt, nh, nkv, Arg::F32(scale)]);
    if parts == 1 {
        let cfg = LaunchCfg { grid: (key_blocks as u32, dims.n_kv_heads as u32, 1), block: (128, 1, 1), smem: 0 };
        args.extend([Arg::Ptr(dk.cuda_ptr()?), Arg::Ptr(dv.cuda_ptr()?)]);
        launch(ord, &SRC, &format!("attn_bwd_dkdv_{tag}{suf}"), cfg, &args)?;
    } else {
        let blocks = u32::try_from(key_blocks * dims.n_kv_heads * parts)
            .map_err(|_| Error::shape(OP, format!("{t} tokens need too many dK/dV blocks")))?;
        let cfg = LaunchCfg { grid: (blocks, 1, 1), block: (128, 1, 1), smem: 0 };
        // Every (token, KV head) row of each part is written: each part's blocks cover all key
        // tiles of all sequences.
        let n = k.elem_count();
        let pdk = Tensor::empty(&[parts, n], DType::F32, dev)?;
        let pdv = Tensor::empty(&[parts, n], DType::F32, dev)?;
        args.extend([Arg::Ptr(pdk.cuda_ptr()?), Arg::Ptr(pdv.cuda_ptr()?), i32_arg(OP, parts)?]);
        launch(ord, &SRC, &format!("attn_bwd_dkdv_v4_{suf}"), cfg, &args)?;
        let groups = 2 * n / 4;
        let cfg = LaunchCfg::for_items(groups, 256);
        let cfg = LaunchCfg { grid: (cfg.grid.0.min(4 * 132 * 8), 1, 1), ..cfg };
        let args = [
            Arg::Ptr(pdk.cuda_ptr()?),
            Arg::Ptr(pdv.cuda_ptr()?),
            i32_arg(OP, parts)?,
            Arg::I64(n as i64),
            Arg::Ptr(dk.cuda_ptr()?),
            Arg::Ptr(dv.cuda_ptr()?),
        ];
        launch(ord, &SRC, "attn_bwd_dkdv_reduce_bf16", cfg, &args)?;
    }

    let qt = tiles(cu, q_tile);
    let qt_d = upload(ord, &qt)?;
    let mut args = head.to_vec();
    args.extend([
        Arg::Ptr(qt_d.cuda_ptr()?),
        Arg::Ptr(cu_d.cuda_ptr()?),
        nt,
        nh,
        nkv,
        Arg::F32(scale),
        Arg::Ptr(dq.cuda_ptr()?),
    ]);
    let cfg = LaunchCfg { grid: ((qt.len() / 2) as u32, dims.n_heads as u32, 1), block: (128, 1, 1), smem: 0 };
    launch(ord, &SRC, &format!("attn_bwd_dq_{tag}{suf}"), cfg, &args)?;
    Ok((dq, dk, dv))
}

pub fn kv_cache_append(
    ord: usize,
    k_cache: &Tensor,
    v_cache: &Tensor,
    k_new: &Tensor,
    v_new: &Tensor,
    slots: &[u32],
    positions: &[u32],
) -> Result<()> {
    const OP: &str = "kv_cache_append (cuda)";
    let func = match k_cache.dtype() {
        DType::F32 => "kv_cache_append_f32",
        DType::BF16 => "kv_cache_append_bf16",
        dt => return Err(Error::UnsupportedDType { op: OP, dtype: dt }),
    };
    let (n, row, max_len) = (k_new.dim(0), k_new.dim(1) * k_new.dim(2), k_cache.dim(1));
    let (s_d, p_d) = (upload(ord, slots)?, upload(ord, positions)?);
    let grid = ((n * row).div_ceil(256) as u64).clamp(1, 132 * 16) as u32;
    let cfg = LaunchCfg { grid: (grid, 1, 1), block: (256, 1, 1), smem: 0 };
    for (cache, fresh) in [(k_cache, k_new), (v_cache, v_new)] {
        launch(
            ord,
            &SRC,
            func,
            cfg,
            &[
                Arg::Ptr(cache.cuda_ptr()?),
                Arg::Ptr(fresh.cuda_ptr()?),
                Arg::Ptr(s_d.cuda_ptr()?),
                Arg::Ptr(p_d.cuda_ptr()?),
                Arg::U64(n as u64),
                Arg::U64(row as u64),
                Arg::U64(max_len as u64),
            ],
        )?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn decode(
    ord: usize,
    q: &Tensor,
    n_new: usize,
    k_cache: &Tensor,
    v_cache: &Tensor,
    cache_lens: crate::Indices,
    slots: Option<crate::Indices>,
    dims: Dims,
    scale: f32,
) -> Result<Tensor> {
    const OP: &str = "attention_decode (cuda)";
    let suf = suffix(OP, q.dtype(), dims.head_dim)?;
    let dev = Device::Cuda(ord);
    let b = q.dim(0);
    let max_len = k_cache.dim(1);
    // Device lengths may grow up to the capacity before the kernel runs (a replayed graph).
    let longest = match cache_lens.host() {
        Some(lens) => lens.iter().copied().max().unwrap_or(0) as usize,
        None => max_len,
    };
    let group = dims.n_heads / dims.n_kv_heads;
    // v2 reads K rows with 16-byte loads (q with scalar ones).
    let aligned = [k_cache.cuda_ptr()?, v_cache.cuda_ptr()?].iter().all(|p| p % 16 == 0);
    let v2_fits = matches!(dims.head_dim, 64 | 128) && group <= DEC_V2_ROWS && aligned;
    let allowed: &[u32] = match (v2_fits, q.dtype()) {
        (false, _) => &[1],
        (true, DType::BF16) => &[1, 2, 3],
        (true, _) => &[1, 2],
    };
    let version = crate::versions::pick_up_to("attention_decode", allowed, super::DECODE_VERSION_LIMIT)?;
    // Blocks per (batch row, KV head or query head): v2 and v3 take a KV group's heads for `tq`
    // new tokens together, v1 one query head for DEC_MAXQ new tokens.
    let (tq, per_row) = if version >= 2 {
        let tq = (DEC_V2_ROWS / group).min(n_new).max(1);
        (tq, dims.n_kv_heads)
    } else {
        (DEC_MAXQ, dims.n_heads)
    };
    let qg = n_new.div_ceil(tq);
    let base_blocks = b * per_row * qg;
    let mut nsplit = DEC_TARGET_BLOCKS.div_ceil(base_blocks.max(1)).min(longest.div_ceil(DEC_MIN_CHUNK)).max(1);
    let mut chunk = longest.div_ceil(nsplit).max(1);
    if version >= 2 {
        // Whole 128-key steps of the block's 4 warps.
        chunk = chunk.next_multiple_of(128);
        nsplit = longest.div_ceil(chunk).max(1);
    }
    if cache_lens.host().is_none() {
        // Lengths known only when the kernel runs: each row splits its own length (chunk 0),
        // so the splits sized for the capacity all have keys once the row is long enough.
        chunk = 0;
    }
    let rows = b * n_new * dims.n_heads;
    let part_o = Tensor::empty(&[rows, nsplit, dims.head_dim], DType::F32, dev)?;
    let part_ml = Tensor::empty(&[rows, nsplit, 2], DType::F32, dev)?;
    let o = Tensor::empty(q.shape(), q.dtype(), dev)?;
    // Two lists, so each can be the upload memo's hit: the slots stay the same from step to step,
    // and these lengths are the next step's positions (attention_inputs uploads those).
    let lens_d = cache_lens.on_device(OP, ord)?;
    let slots_d = slots.map(|s| s.on_device(OP, ord)).transpose()?;
    let (lens_ptr, slots_ptr) = (lens_d.cuda_ptr()?, slots_d.as_ref().map_or(Ok(0), Tensor::cuda_ptr)?);
    let grid_z = u32::try_from(b * qg).ok().filter(|&z| z <= 65_535);
    let grid_z =
        grid_z.ok_or_else(|| Error::shape("attention_decode", format!("batch {b} × {qg} token groups too large")))?;
    let cfg = LaunchCfg { grid: (nsplit as u32, per_row as u32, grid_z), block: (128, 1, 1), smem: 0 };
    let mut args = vec![
        Arg::Ptr(q.cuda_ptr()?),
        Arg::Ptr(k_cache.cuda_ptr()?),
        Arg::Ptr(v_cache.cuda_ptr()?),
        Arg::Ptr(lens_ptr),
        Arg::Ptr(slots_ptr),
        i32_arg(OP, n_new)?,
        i32_arg(OP, dims.n_heads)?,
        i32_arg(OP, dims.n_kv_heads)?,
        i32_arg(OP, max_len)?,
        i32_arg(OP, chunk)?,
        i32_arg(OP, nsplit)?,
        Arg::F32(scale),
    ];
    let func = if version >= 2 {
        args.push(i32_arg(OP, tq)?);
        format!("attn_decode_v{version}_partial_{suf}")
    } else {
        format!("attn_decode_partial_{suf}")
    };
    args.extend([Arg::Ptr(part_o.cuda_ptr()?), Arg::Ptr(part_ml.cuda_ptr()?)]);
    launch(ord, &SRC, &func, cfg, &args)?;
    let cfg = LaunchCfg { grid: (rows as u32, 1, 1), block: (dims.head_dim as u32, 1, 1), smem: 0 };
    launch(
        ord,
        &SRC,
        &format!("attn_decode_combine_{suf}"),
        cfg,
        &[Arg::Ptr(part_o.cuda_ptr()?), Arg::Ptr(part_ml.cuda_ptr()?), i32_arg(OP, nsplit)?, Arg::Ptr(o.cuda_ptr()?)],
    )?;
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_lists_cover_every_row_heaviest_first() {
        let cu = [0u32, 1, 1, 130, 200];
        let tl = tiles(&cu, 64);
        let pairs: Vec<(u32, u32)> = tl.chunks(2).map(|c| (c[0], c[1])).collect();
        assert_eq!(pairs, vec![(2, 128), (2, 64), (3, 64), (0, 0), (2, 0), (3, 0)]);
        // Key tiles: the earliest tile of the longest sequence first (stable among equals).
        let kt = key_tiles(&cu, 64);
        let pairs: Vec<(u32, u32)> = kt.chunks(2).map(|c| (c[0], c[1])).collect();
        assert_eq!(pairs, vec![(2, 0), (3, 0), (2, 64), (3, 64), (0, 0), (2, 128)]);
        assert!(suffix("x", DType::BF16, 40).unwrap_err().to_string().contains("head_dim 40"));
        assert_eq!(suffix("x", DType::F32, 128).unwrap(), "f32_d128");
    }
}
