//! Causal grouped-query attention: training/prefill forward, FlashAttention-2 backward, and
//! decode against a KV cache. CPU (the reference) and CUDA (`kernels/cuda/attention.cu`).
//!
//! # Layout (what the model uses)
//! Packed variable-length batches, no padding tokens:
//! - `q`: `[T, n_heads, head_dim]`; `k`, `v`: `[T, n_kv_heads, head_dim]`, all one dtype
//!   (f32, or bf16 storage with f32 accumulation).
//! - `cu_seqlens: &[u32]` (host), length B+1, cumulative offsets: sequence b holds tokens
//!   `cu[b]..cu[b+1]`; `cu[0] = 0`, non-decreasing, `cu[B] = T`. Empty sequences are allowed.
//! - Causal within each sequence; nothing crosses a sequence boundary.
//! - GQA: query head h reads KV head `h / (n_heads / n_kv_heads)` (HF `repeat_kv`).
//! - Outputs: `o` `[T, n_heads, head_dim]` (dtype of q) and `lse` `[n_heads, T]` f32, the
//!   per-row log-sum-exp of the *scaled* scores, which the backward reuses.
//! - `scale`: `None` means `1/sqrt(head_dim)`.
//!
//! # KV cache (decode)
//! Per layer one K and one V tensor `[n_slots, max_len, n_kv_heads, head_dim]`, so a slot's
//! cache is contiguous. The caller writes the new tokens' K/V with [`kv_cache_append`] first;
//! then [`attention_decode`] takes `q` `[B, n_new, n_heads, head_dim]` (or `[B, n_heads,
//! head_dim]` for one token) where batch row b uses slot b (B ≤ n_slots) or, given a slot list,
//! slot `slots[b]`, and `cache_lens[b]` = number of valid cache rows of that slot *including*
//! the n_new new ones. New token i of row b sits at position `cache_lens[b] - n_new + i` and
//! sees keys `0..=that position` (causal among the new tokens). Rows past `cache_lens[b]` are
//! never read.
//!
//! # Backward
//! FlashAttention-2: `Dᵢ = rowsum(dOᵢ ∘ Oᵢ)`, P recomputed from lse, `dS = P ∘ (dP − D)`,
//! `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q`, `dV = Pᵀ·dO`; dK/dV summed over the query heads that
//! share a KV head. Gradients come back in the dtype of q.
//!
//! # Head dims
//! CPU: any multiple of 8 up to 256. CUDA: 8, 16, 24, 32, 64 and 128 (`CUDA_HEAD_DIMS` in `attention/cuda.rs`;
//! others are a clear error), the tensor-core forward at 64 and 128.
//!
//! # CUDA versions (ops `attention_forward`, `attention_backward`, `attention_decode` in [`crate::versions`])
//! See `kernels/cuda/attention.cu` and `kernels/cuda/attention.md`.
//! - Forward: v1 naive (one warp per query row); v2 flash-tiled with `mma.sync` bf16 tensor
//!   cores; v3 the same with cp.async K/V staging overlapped with compute, `ldmatrix` operand
//!   loads and 32 query rows per warp at head_dim 64; v4 (head_dim 64 only) v3 with 16 rows per
//!   warp, as v2, which keeps it at v2's 128 registers.
//! - Backward: v1 tiled two-pass (dK/dV per KV tile, then dQ per Q tile; no atomics); v2 the same
//!   two passes on `mma.sync` bf16 tensor cores; v3 those with cp.async staging (double-buffered
//!   in dK/dV) and `ldmatrix` operands; v4 is v3 with a KV group's query heads split over more
//!   dK/dV blocks when (key tile, KV head) blocks alone would not fill the GPU (f32 partials,
//!   summed by a second kernel in a fixed order).
//! - Decode: v1 split-K (flash-decoding) with a combine kernel; v2 the same split with all query
//!   heads of a KV group in one block, so each cache row is read once (≤ 8 query heads per KV head);
//!   v3 (bf16) v2 with a warp's 32 V rows loaded into registers together with its K rows.
//!
//! The tensor-core versions take bf16 at head_dim 64/128 (16-byte aligned); other calls run v1.
//! Each call runs the newest version its shapes allow, unless [`crate::versions`] pins or caps it
//! (`SMELT_KERNEL_VERSIONS="attention_forward=2"`).

use smelt_engine::{bf16, DType, Device, Error, Result, Tensor};

pub mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(test)]
mod tests;

#[allow(dead_code)]
pub(crate) const SRC: crate::KernelSource =
    crate::KernelSource { name: "attention", src: include_str!("../../cuda/attention.cu") };

/// Largest head dim the CPU path accepts.
pub const MAX_HEAD_DIM_CPU: usize = 256;

/// The newest CUDA forward version worth running at `head_dim` when the shapes allow more: at
/// d 64, v3 (255 registers with a spill, 128 rows per block) measured slower than v2 on an
/// H200 (0.48 against 0.33 ms at 1×4096, 14/2 heads; 81.7 against 80.3 ms per Qwen2.5-0.5B
/// training step at 8×1024); at d 128 v3 is the faster (`kernels/cuda/attention.md`). v4 (v3's
/// staging at v2's registers, d 64) is not measured yet, so it runs only when pinned.
pub fn forward_version_limit(head_dim: usize) -> u32 {
    if head_dim == 64 {
        2
    } else {
        3
    }
}

/// The newest CUDA decode version a call runs unless pinned: v3 (v2 with each warp's 32 V rows
/// loaded with its K rows) is not measured on a GPU yet.
pub const DECODE_VERSION_LIMIT: u32 = 2;

/// `1/sqrt(head_dim)`, the default scale.
pub fn default_scale(head_dim: usize) -> f32 {
    1.0 / (head_dim as f32).sqrt()
}

/// Head counts and head dim of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl Dims {
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

/// Causal GQA forward over packed sequences: returns `(o [T, n_heads, d], lse [n_heads, T] f32)`.
pub fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &[u32],
    scale: Option<f32>,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "attention_forward";
    let dims = check_qkv(OP, q, k, v)?;
    let t = q.dim(0);
    check_cu(OP, cu_seqlens, t)?;
    let scale = scale.unwrap_or_else(|| default_scale(dims.head_dim));
    match q.device() {
        Device::Cpu => {
            check_cpu_head_dim(OP, dims.head_dim)?;
            let (qv, kv, vv) = (q.to_vec_f32()?, k.to_vec_f32()?, v.to_vec_f32()?);
            let mut o = vec![0f32; qv.len()];
            let mut lse = vec![0f32; dims.n_heads * t];
            cpu::forward(&qv, &kv, &vv, cu_seqlens, dims, scale, &mut o, &mut lse);
            Ok((from_f32(&o, q.shape(), q.dtype())?, Tensor::from_slice(&lse, &[dims.n_heads, t], Device::Cpu)?))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::forward(ord, q, k, v, cu_seqlens, dims, scale),
        #[cfg(not(feature = "cuda"))]
        d => Err(Error::UnsupportedDevice { op: OP, device: d }),
    }
}

/// Gradients `(dq, dk, dv)` of the causal GQA forward, from the saved `o` and `lse`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    cu_seqlens: &[u32],
    scale: Option<f32>,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "attention_backward";
    let dims = check_qkv(OP, q, k, v)?;
    let t = q.dim(0);
    check_cu(OP, cu_seqlens, t)?;
    for (name, x) in [("o", o), ("d_o", d_o)] {
        crate::ensure_shape!(
            x.shape() == q.shape() && x.dtype() == q.dtype(),
            "attention_backward",
            "{name} {:?} {} must match q {:?} {}",
            x.shape(),
            x.dtype(),
            q.shape(),
            q.dtype()
        );
    }
    crate::ensure_shape!(
        lse.shape() == [dims.n_heads, t] && lse.dtype() == DType::F32,
        "attention_backward",
        "lse {:?} {} must be [{}, {t}] f32",
        lse.shape(),
        lse.dtype(),
        dims.n_heads
    );
    for x in [o, lse, d_o] {
        same_device(OP, q, x)?;
    }
    let scale = scale.unwrap_or_else(|| default_scale(dims.head_dim));
    match q.device() {
        Device::Cpu => {
            check_cpu_head_dim(OP, dims.head_dim)?;
            let (qv, kv, vv) = (q.to_vec_f32()?, k.to_vec_f32()?, v.to_vec_f32()?);
            let (ov, lv, gv) = (o.to_vec_f32()?, lse.to_vec_f32()?, d_o.to_vec_f32()?);
            let mut dq = vec![0f32; qv.len()];
            let mut dk = vec![0f32; kv.len()];
            let mut dv = vec![0f32; vv.len()];
            cpu::backward(&qv, &kv, &vv, &ov, &lv, &gv, cu_seqlens, dims, scale, &mut dq, &mut dk, &mut dv);
            Ok((
                from_f32(&dq, q.shape(), q.dtype())?,
                from_f32(&dk, k.shape(), k.dtype())?,
                from_f32(&dv, v.shape(), v.dtype())?,
            ))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::backward(ord, q, k, v, o, lse, d_o, cu_seqlens, dims, scale),
        #[cfg(not(feature = "cuda"))]
        d => Err(Error::UnsupportedDevice { op: OP, device: d }),
    }
}

/// Checks that `k_cache` and `v_cache` are alike `[n_slots, max_len, n_kv_heads, d]` caches on
/// one device, sharing no storage.
pub(crate) fn check_caches(op: &'static str, k_cache: &Tensor, v_cache: &Tensor) -> Result<()> {
    if !(k_cache.rank() == 4 && k_cache.shape() == v_cache.shape() && k_cache.dtype() == v_cache.dtype()) {
        return Err(Error::shape(
            op,
            format!(
                "caches must be [n_slots, max_len, n_kv_heads, d] and alike: k {:?} {}, v {:?} {}",
                k_cache.shape(),
                k_cache.dtype(),
                v_cache.shape(),
                v_cache.dtype()
            ),
        ));
    }
    same_device(op, k_cache, v_cache)?;
    if k_cache.same_storage(v_cache) {
        return Err(Error::shape(op, "the K and V caches must not share storage"));
    }
    Ok(())
}

/// Checks that `n` new rows can go to (`slots[r]`, `positions[r]`) of a cache shaped like `cache`.
pub(crate) fn check_cache_rows(
    op: &'static str,
    cache: &Tensor,
    n: usize,
    slots: &[u32],
    positions: &[u32],
) -> Result<()> {
    let (n_slots, max_len) = (cache.dim(0), cache.dim(1));
    if slots.len() != n || positions.len() != n {
        return Err(Error::shape(op, format!("{n} rows but {} slots and {} positions", slots.len(), positions.len())));
    }
    for (r, (&s, &p)) in slots.iter().zip(positions).enumerate() {
        if s as usize >= n_slots || p as usize >= max_len {
            return Err(Error::shape(
                op,
                format!("row {r}: slot {s} / position {p} outside cache {:?}", cache.shape()),
            ));
        }
    }
    Ok(())
}

/// Writes `k_new`/`v_new` rows `[N, n_kv_heads, d]` into the caches `[n_slots, max_len,
/// n_kv_heads, d]`: row r goes to slot `slots[r]`, position `positions[r]`.
pub fn kv_cache_append(
    k_cache: &Tensor,
    v_cache: &Tensor,
    k_new: &Tensor,
    v_new: &Tensor,
    slots: &[u32],
    positions: &[u32],
) -> Result<()> {
    const OP: &str = "kv_cache_append";
    check_caches(OP, k_cache, v_cache)?;
    let (max_len, n_kv, d) = (k_cache.dim(1), k_cache.dim(2), k_cache.dim(3));
    crate::ensure_shape!(
        k_new.rank() == 3
            && k_new.shape() == v_new.shape()
            && k_new.dim(1) == n_kv
            && k_new.dim(2) == d
            && k_new.dtype() == k_cache.dtype()
            && v_new.dtype() == k_cache.dtype(),
        "kv_cache_append",
        "new rows k {:?} {} / v {:?} {} must be [N, {n_kv}, {d}] {}",
        k_new.shape(),
        k_new.dtype(),
        v_new.shape(),
        v_new.dtype(),
        k_cache.dtype()
    );
    let n = k_new.dim(0);
    check_cache_rows(OP, k_cache, n, slots, positions)?;
    for x in [k_new, v_new] {
        same_device(OP, k_cache, x)?;
    }
    if k_cache.same_storage(v_cache) || k_cache.same_storage(k_new) || v_cache.same_storage(v_new) {
        return Err(Error::shape(OP, "caches must not share storage with each other or with the new rows"));
    }
    if n == 0 {
        return Ok(());
    }
    match k_cache.device() {
        Device::Cpu => {
            let row = n_kv * d;
            match k_cache.dtype() {
                DType::F32 => {
                    cpu::kv_cache_append(
                        &mut k_cache.cpu_write::<f32>()?,
                        &k_new.cpu_read::<f32>()?,
                        max_len,
                        row,
                        slots,
                        positions,
                    );
                    cpu::kv_cache_append(
                        &mut v_cache.cpu_write::<f32>()?,
                        &v_new.cpu_read::<f32>()?,
                        max_len,
                        row,
                        slots,
                        positions,
                    );
                }
                DType::BF16 => {
                    cpu::kv_cache_append(
                        &mut k_cache.cpu_write::<bf16>()?,
                        &k_new.cpu_read::<bf16>()?,
                        max_len,
                        row,
                        slots,
                        positions,
                    );
                    cpu::kv_cache_append(
                        &mut v_cache.cpu_write::<bf16>()?,
                        &v_new.cpu_read::<bf16>()?,
                        max_len,
                        row,
                        slots,
                        positions,
                    );
                }
                dt => return Err(Error::UnsupportedDType { op: OP, dtype: dt }),
            }
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::kv_cache_append(ord, k_cache, v_cache, k_new, v_new, slots, positions),
        #[cfg(not(feature = "cuda"))]
        d => Err(Error::UnsupportedDevice { op: OP, device: d }),
    }
}

/// Decode attention of `q` (`[B, n_new, n_heads, d]` or `[B, n_heads, d]`) against the KV
/// cache; returns o shaped like q. See the module docs for the cache layout and `cache_lens`.
/// Batch row b reads slot `slots[b]`, or slot b when `slots` is `None` (so a batch can skip
/// the slots of finished sequences without moving any cache). Device lists
/// ([`crate::Indices::Device`]) are not value-checked, and on CUDA the split of the cache is
/// then sized for its capacity (`max_len`), since the lengths may grow after the call (a
/// captured graph).
pub fn attention_decode<'l>(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    cache_lens: impl Into<crate::Indices<'l>>,
    slots: Option<crate::Indices>,
    scale: Option<f32>,
) -> Result<Tensor> {
    const OP: &str = "attention_decode";
    let cache_lens: crate::Indices = cache_lens.into();
    crate::ensure_shape!(
        q.rank() == 3 || q.rank() == 4,
        "attention_decode",
        "q {:?} must be [B, n_new, n_heads, d] or [B, n_heads, d]",
        q.shape()
    );
    let (b, n_new) = (q.dim(0), if q.rank() == 4 { q.dim(1) } else { 1 });
    let (n_heads, d) = (q.dim(q.rank() - 2), q.dim(q.rank() - 1));
    crate::ensure_shape!(
        k_cache.rank() == 4 && k_cache.shape() == v_cache.shape(),
        "attention_decode",
        "caches k {:?} v {:?} must both be [n_slots, max_len, n_kv_heads, d]",
        k_cache.shape(),
        v_cache.shape()
    );
    let (n_slots, max_len, n_kv) = (k_cache.dim(0), k_cache.dim(1), k_cache.dim(2));
    crate::ensure_shape!(
        k_cache.dim(3) == d && n_kv > 0 && n_heads % n_kv == 0 && (slots.is_some() || b <= n_slots),
        "attention_decode",
        "q {:?} vs cache {:?}: need same head_dim, n_heads a multiple of n_kv_heads, B <= n_slots",
        q.shape(),
        k_cache.shape()
    );
    if let Some(slots) = slots {
        crate::ensure_shape!(
            slots.len() == b,
            "attention_decode",
            "{} slots for batch {b} (q {:?})",
            slots.len(),
            q.shape()
        );
        let host = slots.host().unwrap_or_default();
        if let Some(i) = host.iter().position(|&s| s as usize >= n_slots) {
            return Err(Error::shape(OP, format!("slots[{i}] = {} outside the cache's {n_slots} slots", host[i])));
        }
    }
    crate::ensure_shape!(
        q.dtype() == k_cache.dtype() && q.dtype() == v_cache.dtype(),
        "attention_decode",
        "dtypes q {} k_cache {} v_cache {} differ",
        q.dtype(),
        k_cache.dtype(),
        v_cache.dtype()
    );
    check_float(OP, q.dtype())?;
    crate::ensure_shape!(
        cache_lens.len() == b,
        "attention_decode",
        "{} cache_lens for batch {b} (q {:?})",
        cache_lens.len(),
        q.shape()
    );
    for (i, &l) in cache_lens.host().unwrap_or_default().iter().enumerate() {
        crate::ensure_shape!(
            (l as usize) >= n_new && (l as usize) <= max_len,
            "attention_decode",
            "cache_lens[{i}] = {l}: must hold the {n_new} new tokens and fit max_len {max_len}"
        );
    }
    for x in [k_cache, v_cache] {
        same_device(OP, q, x)?;
    }
    let dims = Dims { n_heads, n_kv_heads: n_kv, head_dim: d };
    let scale = scale.unwrap_or_else(|| default_scale(d));
    if q.elem_count() == 0 {
        return Tensor::zeros(q.shape(), q.dtype(), q.device());
    }
    match q.device() {
        Device::Cpu => {
            check_cpu_head_dim(OP, d)?;
            let qv = q.to_vec_f32()?;
            let mut o = vec![0f32; qv.len()];
            let (lens, slots) = (cache_lens.values()?, slots.map(|s| s.values()).transpose()?);
            let run = |kc: &[f32], vc: &[f32], o: &mut [f32]| {
                cpu::decode(&qv, n_new, kc, vc, max_len, &lens, slots.as_deref(), dims, scale, o)
            };
            match k_cache.dtype() {
                DType::F32 => run(&k_cache.cpu_read::<f32>()?, &v_cache.cpu_read::<f32>()?, &mut o),
                _ => run(&k_cache.to_vec_f32()?, &v_cache.to_vec_f32()?, &mut o),
            }
            from_f32(&o, q.shape(), q.dtype())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::decode(ord, q, n_new, k_cache, v_cache, cache_lens, slots, dims, scale),
        #[cfg(not(feature = "cuda"))]
        dev => Err(Error::UnsupportedDevice { op: OP, device: dev }),
    }
}

fn check_float(op: &'static str, dt: DType) -> Result<()> {
    match dt {
        DType::F32 | DType::BF16 => Ok(()),
        dt => Err(Error::UnsupportedDType { op, dtype: dt }),
    }
}

fn same_device(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.device() != b.device() {
        return Err(Error::DeviceMismatch { op, a: a.device(), b: b.device() });
    }
    Ok(())
}

fn check_cpu_head_dim(op: &'static str, d: usize) -> Result<()> {
    if d == 0 || d % 8 != 0 || d > MAX_HEAD_DIM_CPU {
        return Err(Error::shape(
            op,
            format!("head_dim {d}: the CPU path takes multiples of 8 up to {MAX_HEAD_DIM_CPU}"),
        ));
    }
    Ok(())
}

fn check_qkv(op: &'static str, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Dims> {
    if q.rank() != 3 || k.rank() != 3 || k.shape() != v.shape() || q.dim(0) != k.dim(0) || q.dim(2) != k.dim(2) {
        return Err(Error::shape(
            op,
            format!(
                "q {:?}, k {:?}, v {:?}: want q [T, n_heads, d], k = v [T, n_kv_heads, d]",
                q.shape(),
                k.shape(),
                v.shape()
            ),
        ));
    }
    let dims = Dims { n_heads: q.dim(1), n_kv_heads: k.dim(1), head_dim: q.dim(2) };
    if dims.n_kv_heads == 0 || dims.n_heads % dims.n_kv_heads != 0 {
        return Err(Error::shape(
            op,
            format!("n_heads {} is not a multiple of n_kv_heads {} (q {:?})", dims.n_heads, dims.n_kv_heads, q.shape()),
        ));
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        return Err(Error::shape(op, format!("dtypes q {} k {} v {} differ", q.dtype(), k.dtype(), v.dtype())));
    }
    check_float(op, q.dtype())?;
    same_device(op, q, k)?;
    same_device(op, q, v)?;
    Ok(dims)
}

fn check_cu(op: &'static str, cu: &[u32], t: usize) -> Result<()> {
    let ok = !cu.is_empty() && cu[0] == 0 && cu.windows(2).all(|w| w[0] <= w[1]) && cu[cu.len() - 1] as usize == t;
    if !ok {
        return Err(Error::shape(op, format!("cu_seqlens {cu:?} must start at 0, not decrease, and end at T = {t}")));
    }
    Ok(())
}

fn from_f32(v: &[f32], shape: &[usize], dtype: DType) -> Result<Tensor> {
    match dtype {
        DType::F32 => Tensor::from_slice(v, shape, Device::Cpu),
        DType::BF16 => {
            let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            Tensor::from_slice(&h, shape, Device::Cpu)
        }
        dt => Err(Error::UnsupportedDType { op: "attention", dtype: dt }),
    }
}
