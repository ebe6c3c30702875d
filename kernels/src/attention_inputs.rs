//! The path from the q/k/v projections to attention's inputs, fused: the projection
//! biases (Qwen2), Qwen3's per-head `q_norm` / `k_norm`, RoPE on q and k, and the KV-cache
//! append — one launch per layer where the separate ops take seven (three bias adds, two ropes,
//! two appends; nine with the head norms). Decoding a token is a few hundred launches of tiny
//! kernels, so at decode sizes the launch count, not bandwidth, sets the time per token.
//!
//! The result is exactly what the separate ops give in sequence — [`crate::add::add_bias_`],
//! [`crate::rmsnorm::rmsnorm`] per head, [`crate::rope::RopeTable::forward`],
//! [`crate::attention::kv_cache_append`] — with the same rounding to the storage dtype after each
//! stage. The CPU implementation *is* that sequence, and the CUDA kernel is tested against it.
//!
//! Training uses it too for models without head norms, whose backward needs nothing between the
//! projections and the rotation: [`attention_inputs_backward`] turns the gradients of q, k, v
//! into the fused projection's (the inverse rotation, packed as its column blocks). With head
//! norms the backward needs the intermediate q/k, so the model keeps the separate ops there.
//!
//! Dtypes: f32, or bf16 storage with f32 math; biases in the activations' dtype, head-norm weights
//! in f32 or bf16 (as [`crate::rmsnorm::rmsnorm`] takes them).
//! CUDA: head_dim ≤ 256 (any even head_dim on CPU). Versions (op `attention_inputs`, thread
//! mappings in `attention_inputs.cu`): v1 a warp per (token, head) with scalar loads, any shape;
//! v2 a warp per token with 16-byte loads and cos/sin once per token, without head norms and
//! with 16-byte rows (the default where it fits). Both give the same bits.

use crate::Indices;
use smelt_engine::{bf16, DType, Device, Error, Result, Tensor, WithDType};

use crate::attention::{check_cache_rows, check_caches};
use crate::rope::RopeTable;
use crate::{add, rmsnorm};

crate::kernel_source!("attention_inputs");

/// The optional per-layer parameters between the projections and attention.
#[derive(Clone, Copy, Debug, Default)]
pub struct Extras<'a> {
    /// `[n_heads·d]`, `[n_kv·d]`, `[n_kv·d]` (Qwen2, or Qwen3 with `attention_bias`).
    pub q_bias: Option<&'a Tensor>,
    pub k_bias: Option<&'a Tensor>,
    pub v_bias: Option<&'a Tensor>,
    /// `[d]`, applied to each query / key head (Qwen3).
    pub q_norm: Option<&'a Tensor>,
    pub k_norm: Option<&'a Tensor>,
    /// The head norms' epsilon.
    pub eps: f32,
}

/// Where the new K/V rows go: row r to slot `slots[r]` at its position (the RoPE position).
#[derive(Clone, Copy, Debug)]
pub struct CacheAppend<'a> {
    /// `[n_slots, max_len, n_kv, d]` each.
    pub k_cache: &'a Tensor,
    pub v_cache: &'a Tensor,
    /// One per token.
    pub slots: Indices<'a>,
}

/// The projections attention_inputs starts from.
#[derive(Clone, Copy, Debug)]
pub enum Qkv<'a> {
    /// `q [T, n_heads·d]`, `k` and `v [T, n_kv·d]`.
    Separate(&'a Tensor, &'a Tensor, &'a Tensor),
    /// One fused projection's output `[T, (n_heads + 2·n_kv)·d]`: q, k, v as column blocks.
    Packed { qkv: &'a Tensor, n_heads: usize, n_kv: usize },
}

/// From the projections (unbiased) to attention's inputs `(q, k, v)`, shaped `[T, heads, d]`:
/// biased, head-normed (when given), q and k rotated to `positions` (one per token); with
/// `cache`, k and v are also written into it.
/// Device `positions` and slots ([`Indices::Device`]) are not value-checked.
pub fn attention_inputs<'p>(
    qkv: Qkv,
    extras: &Extras,
    rope: &RopeTable,
    positions: impl Into<Indices<'p>>,
    cache: Option<CacheAppend>,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "attention_inputs";
    let positions: Indices = positions.into();
    let d = rope.head_dim();
    let (q, k, v, nh, nkv) = match qkv {
        Qkv::Separate(q, k, v) => {
            let (t, q_cols) = q.rows_cols();
            let (kt, kv_cols) = k.rows_cols();
            crate::ensure_shape!(
                q_cols % d == 0
                    && kv_cols % d == 0
                    && q_cols > 0
                    && kv_cols > 0
                    && kt == t
                    && v.rows_cols() == (t, kv_cols),
                "attention_inputs",
                "q {:?}, k {:?}, v {:?} must be [T, n_heads·{d}], [T, n_kv·{d}], [T, n_kv·{d}]",
                q.shape(),
                k.shape(),
                v.shape()
            );
            (q, k, v, q_cols / d, kv_cols / d)
        }
        Qkv::Packed { qkv, n_heads, n_kv } => {
            crate::ensure_shape!(
                n_heads > 0 && n_kv > 0 && qkv.rows_cols().1 == (n_heads + 2 * n_kv) * d,
                "attention_inputs",
                "packed qkv {:?} must be [T, ({n_heads} + 2·{n_kv})·{d}]",
                qkv.shape()
            );
            (qkv, qkv, qkv, n_heads, n_kv)
        }
    };
    let packed = matches!(qkv, Qkv::Packed { .. });
    let t = q.rows_cols().0;
    let (q_cols, kv_cols) = (nh * d, nkv * d);
    let dt = q.dtype();
    if !matches!(dt, DType::F32 | DType::BF16) {
        return Err(Error::UnsupportedDType { op: OP, dtype: dt });
    }
    let params = [
        ("k", Some(k), kv_cols),
        ("v", Some(v), kv_cols),
        ("q_bias", extras.q_bias, q_cols),
        ("k_bias", extras.k_bias, kv_cols),
        ("v_bias", extras.v_bias, kv_cols),
        ("q_norm", extras.q_norm, d),
        ("k_norm", extras.k_norm, d),
    ];
    // The head norms' weights may be f32 or bf16 (both the same), as rmsnorm's; all else has q's dtype.
    let norm_dt = extras.q_norm.or(extras.k_norm).map_or(dt, |w| w.dtype());
    for (name, x, cols) in params {
        let Some(x) = x else { continue };
        let want = if name.ends_with("_norm") { norm_dt } else { dt };
        if x.dtype() != want || !matches!(want, DType::F32 | DType::BF16) {
            let of = if name.ends_with("_norm") { "the other head norm" } else { "q" };
            return Err(Error::shape(OP, format!("{name} is {} but {of} is {want}", x.dtype())));
        }
        if x.device() != q.device() {
            return Err(Error::DeviceMismatch { op: OP, a: q.device(), b: x.device() });
        }
        if !matches!(name, "k" | "v") && x.elem_count() != cols {
            return Err(Error::shape(OP, format!("{name} {:?} must hold {cols} elements", x.shape())));
        }
    }
    crate::ensure_shape!(positions.len() == t, "attention_inputs", "{} positions for {t} tokens", positions.len());
    if let Some(c) = &cache {
        check_caches(OP, c.k_cache, c.v_cache)?;
        crate::ensure_shape!(
            c.k_cache.dim(2) == nkv && c.k_cache.dim(3) == d && c.k_cache.dtype() == dt,
            "attention_inputs",
            "cache {:?} {} must be [n_slots, max_len, {nkv}, {d}] {dt}",
            c.k_cache.shape(),
            c.k_cache.dtype()
        );
        crate::ensure_shape!(c.slots.len() == t, "attention_inputs", "{} cache slots for {t} tokens", c.slots.len());
        if let (Some(slots), Some(pos)) = (c.slots.host(), positions.host()) {
            check_cache_rows(OP, c.k_cache, t, slots, pos)?;
        }
        if [q, k, v].iter().any(|x| x.same_storage(c.k_cache) || x.same_storage(c.v_cache)) {
            return Err(Error::shape(OP, "the caches must not share storage with q, k or v"));
        }
        if c.k_cache.device() != q.device() {
            return Err(Error::DeviceMismatch { op: OP, a: q.device(), b: c.k_cache.device() });
        }
    }
    if rope.inv_freq().device() != q.device() {
        return Err(Error::DeviceMismatch { op: OP, a: q.device(), b: rope.inv_freq().device() });
    }
    match q.device() {
        Device::Cpu => {
            let positions = positions.values()?;
            let pos = Tensor::from_slice(&positions, &[t], Device::Cpu)?;
            let stage = |x: &Tensor, heads: usize, bias: Option<&Tensor>, norm: Option<&Tensor>, rotate: bool| {
                let y = Tensor::empty(&[t, heads, d], dt, Device::Cpu)?;
                y.copy_from(&x.reshape(&[t, heads, d])?)?;
                if let Some(b) = bias {
                    add::add_bias_(&y.reshape(&[t, heads * d])?, b)?;
                }
                let y = match norm {
                    Some(w) => {
                        rmsnorm::rmsnorm(&y.reshape(&[t * heads, d])?, w, extras.eps)?.0.reshape(&[t, heads, d])?
                    }
                    None => y,
                };
                if rotate {
                    rope.forward_(&y, &pos)?;
                }
                Ok::<_, Error>(y)
            };
            let (q, k, v) =
                if packed { split_columns(q, &[q_cols, kv_cols, kv_cols])? } else { (q.clone(), k.clone(), v.clone()) };
            let qo = stage(&q, nh, extras.q_bias, extras.q_norm, true)?;
            let ko = stage(&k, nkv, extras.k_bias, extras.k_norm, true)?;
            let vo = stage(&v, nkv, extras.v_bias, None, false)?;
            if let Some(c) = cache {
                crate::attention::kv_cache_append(c.k_cache, c.v_cache, &ko, &vo, &c.slots.values()?, &positions)?;
            }
            Ok((qo, ko, vo))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => {
            // Element offsets of k and v within a packed row, and each input's row stride.
            let (offs, strides) = if packed {
                ([0, q_cols, q_cols + kv_cols], [q_cols + 2 * kv_cols; 3])
            } else {
                ([0; 3], [q_cols, kv_cols, kv_cols])
            };
            let qo = Tensor::empty(&[t, nh, d], dt, q.device())?;
            let ko = Tensor::empty(&[t, nkv, d], dt, q.device())?;
            let vo = Tensor::empty(&[t, nkv, d], dt, q.device())?;
            let io = cuda::Io {
                ins: [(q, offs[0]), (k, offs[1]), (v, offs[2])],
                in_strides: strides,
                outs: [(&qo, 0), (&ko, 0), (&vo, 0)],
                out_strides: [q_cols, kv_cols, kv_cols],
            };
            cuda::launch_inputs(ord, io, extras, norm_dt, rope, positions, cache, (t, nh, nkv, d), 1.0)?;
            Ok((qo, ko, vo))
        }
        #[cfg(not(feature = "cuda"))]
        device => Err(Error::UnsupportedDevice { op: OP, device }),
    }
}

/// Backward of [`attention_inputs`] from one fused projection without head norms (Qwen2/2.5
/// training): from the gradients of attention's inputs — `dq [T, n_heads, d]` and `dk`, `dv
/// [T, n_kv, d]`, q and k after the rotation — the gradient of the packed projection output,
/// `[T, (n_heads + 2·n_kv)·d]`: q and k rotated back to `positions`, v as it is, side by side as
/// the projection's column blocks. The biases' gradient is its column sum. The same bits as
/// [`RopeTable::backward`] on dq and dk.
pub fn attention_inputs_backward<'p>(
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    rope: &RopeTable,
    positions: impl Into<Indices<'p>>,
) -> Result<Tensor> {
    const OP: &str = "attention_inputs_backward";
    let positions: Indices = positions.into();
    let d = rope.head_dim();
    let dim = |x: &Tensor, i: usize| x.shape().get(i).copied().unwrap_or(0);
    let (t, nh, nkv) = (dim(dq, 0), dim(dq, 1), dim(dk, 1));
    crate::ensure_shape!(
        dq.rank() == 3 && dq.dim(2) == d && dk.shape() == [t, nkv, d] && dv.shape() == dk.shape() && nh > 0 && nkv > 0,
        "attention_inputs_backward",
        "dq {:?}, dk {:?}, dv {:?} must be [T, n_heads, {d}], [T, n_kv, {d}], [T, n_kv, {d}]",
        dq.shape(),
        dk.shape(),
        dv.shape()
    );
    let dt = dq.dtype();
    if !matches!(dt, DType::F32 | DType::BF16) {
        return Err(Error::UnsupportedDType { op: OP, dtype: dt });
    }
    for (name, x) in [("dk", dk), ("dv", dv)] {
        if x.dtype() != dt {
            return Err(Error::shape(OP, format!("{name} is {} but dq is {dt}", x.dtype())));
        }
    }
    for x in [dk, dv, rope.inv_freq()] {
        if x.device() != dq.device() {
            return Err(Error::DeviceMismatch { op: OP, a: dq.device(), b: x.device() });
        }
    }
    crate::ensure_shape!(
        positions.len() == t,
        "attention_inputs_backward",
        "{} positions for {t} tokens",
        positions.len()
    );
    let (q_cols, kv_cols) = (nh * d, nkv * d);
    match dq.device() {
        Device::Cpu => {
            let pos = Tensor::from_slice(&positions.values()?, &[t], Device::Cpu)?;
            let (gq, gk) = (rope.backward(dq, &pos)?, rope.backward(dk, &pos)?);
            concat_columns([&gq, &gk, dv], t, [q_cols, kv_cols, kv_cols])
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => {
            let width = q_cols + 2 * kv_cols;
            let packed = Tensor::empty(&[t, width], dt, dq.device())?;
            let io = cuda::Io {
                ins: [(dq, 0), (dk, 0), (dv, 0)],
                in_strides: [q_cols, kv_cols, kv_cols],
                outs: [(&packed, 0), (&packed, q_cols), (&packed, q_cols + kv_cols)],
                out_strides: [width; 3],
            };
            let none = Extras::default();
            cuda::launch_inputs(ord, io, &none, dt, rope, positions, None, (t, nh, nkv, d), -1.0)?;
            Ok(packed)
        }
        #[cfg(not(feature = "cuda"))]
        device => Err(Error::UnsupportedDevice { op: OP, device }),
    }
}

/// Three CPU tensors of `t` rows each, side by side: `[t, Σ widths]`.
fn concat_columns(parts: [&Tensor; 3], t: usize, widths: [usize; 3]) -> Result<Tensor> {
    fn go<T: WithDType>(parts: [&Tensor; 3], t: usize, widths: [usize; 3]) -> Result<Tensor> {
        let reads = [parts[0].cpu_read::<T>()?, parts[1].cpu_read::<T>()?, parts[2].cpu_read::<T>()?];
        let mut out = Vec::with_capacity(t * widths.iter().sum::<usize>());
        for r in 0..t {
            for (v, &w) in reads.iter().zip(&widths) {
                out.extend_from_slice(&v[r * w..(r + 1) * w]);
            }
        }
        Tensor::from_slice(&out, &[t, widths.iter().sum()], Device::Cpu)
    }
    match parts[0].dtype() {
        DType::F32 => go::<f32>(parts, t, widths),
        _ => go::<bf16>(parts, t, widths),
    }
}

/// A CPU `[T, Σ widths]` tensor's three column blocks as contiguous `[T, width]` tensors.
fn split_columns(x: &Tensor, widths: &[usize; 3]) -> Result<(Tensor, Tensor, Tensor)> {
    fn go<T: WithDType>(x: &Tensor, widths: &[usize; 3]) -> Result<Vec<Tensor>> {
        let (t, cols) = x.rows_cols();
        let v = x.cpu_read::<T>()?;
        let mut start = 0;
        let mut out = Vec::with_capacity(3);
        for &w in widths {
            let part: Vec<T> = (0..t).flat_map(|r| v[r * cols + start..r * cols + start + w].iter().copied()).collect();
            out.push(Tensor::from_slice(&part, &[t, w], Device::Cpu)?);
            start += w;
        }
        Ok(out)
    }
    let mut parts = match x.dtype() {
        DType::F32 => go::<f32>(x, widths)?,
        _ => go::<bf16>(x, widths)?,
    }
    .into_iter();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(q), Some(k), Some(v)) => Ok((q, k, v)),
        _ => Err(Error::msg("attention_inputs: splitting the packed projection failed")),
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{launch, Arg, LaunchCfg};

    /// Most head_dim the kernel takes (`AI_MAX_PAIRS` pairs per lane).
    const MAX_HEAD_DIM: usize = 256;

    /// Where the kernel reads and writes: three (tensor, element offset) inputs and outputs,
    /// and the elements between consecutive rows of each.
    pub struct Io<'a> {
        pub ins: [(&'a Tensor, usize); 3],
        pub in_strides: [usize; 3],
        pub outs: [(&'a Tensor, usize); 3],
        pub out_strides: [usize; 3],
    }

    /// Runs the attention_inputs kernel (rotation sign `sign`: −1 for the backward).
    #[allow(clippy::too_many_arguments)]
    pub fn launch_inputs(
        ord: usize,
        io: Io,
        extras: &Extras,
        norm_dt: DType,
        rope: &RopeTable,
        positions: Indices,
        cache: Option<CacheAppend>,
        (t, nh, nkv, d): (usize, usize, usize, usize),
        sign: f32,
    ) -> Result<()> {
        const OP: &str = "attention_inputs (cuda)";
        if d > MAX_HEAD_DIM {
            return Err(Error::shape(OP, format!("head_dim {d}: the CUDA kernel takes head_dim <= {MAX_HEAD_DIM}")));
        }
        if t == 0 {
            return Ok(());
        }
        let dt = io.ins[0].0.dtype();
        let name = |t: DType| if t == DType::F32 { "f32" } else { "bf16" };
        let es = dt.size_in_bytes();
        let ptr = |x: Option<&Tensor>| x.map(Tensor::cuda_ptr).transpose().map(|p| p.unwrap_or(0));
        // v2: no head norms, whole 16-byte chunks of n elements per half-row (h/n lanes per head,
        // a power of two ≤ 32) and every row 16-byte aligned.
        let (n, h) = (16 / es, d / 2);
        let pos_d = positions.on_device(OP, ord)?;
        let (kc, vc, slots_d, max_len) = match &cache {
            Some(c) => {
                (c.k_cache.cuda_ptr()?, c.v_cache.cuda_ptr()?, Some(c.slots.on_device(OP, ord)?), c.k_cache.dim(1))
            }
            None => (0, 0, None, 0),
        };
        let at = |(x, o): (&Tensor, usize)| x.cuda_ptr().map(|p| p + (o * es) as u64);
        let [pq, pk, pv] = io.ins.map(at);
        let [oq, ok, ov] = io.outs.map(at);
        let [bq, bk, bv] = [extras.q_bias, extras.k_bias, extras.v_bias].map(ptr);
        let ins = [pq?, pk?, pv?, bq?, bk?, bv?];
        let outs = [oq?, ok?, ov?, kc, vc];
        let strides = io.in_strides;
        let v2_fits = extras.q_norm.is_none()
            && extras.k_norm.is_none()
            && h % n == 0
            && (h / n).is_power_of_two()
            && h / n <= 32
            && strides.iter().chain(&io.out_strides).all(|s| s % n == 0)
            && ins.iter().chain(&outs).all(|p| p % 16 == 0);
        let version = crate::versions::pick("attention_inputs", if v2_fits { &[1, 2] } else { &[1] })?;
        let func = match version {
            2 => format!("attention_inputs_v2_{}", name(dt)),
            _ => format!("attention_inputs_{}_{}", name(dt), name(norm_dt)),
        };
        // v1: a warp per (token, head); v2: a warp per token.
        let warps = if version == 2 { t } else { t * (nh + 2 * nkv) };
        let grid = warps.div_ceil(4).clamp(1, 132 * 16) as u32;
        let cfg = LaunchCfg { grid: (grid, 1, 1), block: (128, 1, 1), smem: 0 };
        let u32_arg = |n: usize, what: &str| {
            u32::try_from(n).map(Arg::U32).map_err(|_| Error::shape(OP, format!("{what} {n} exceeds u32")))
        };
        let mut args: Vec<Arg> = outs.iter().chain(&ins).map(|&p| Arg::Ptr(p)).collect();
        if version == 1 {
            args.extend([Arg::Ptr(ptr(extras.q_norm)?), Arg::Ptr(ptr(extras.k_norm)?)]);
        }
        args.extend([
            Arg::Ptr(pos_d.cuda_ptr()?),
            Arg::Ptr(ptr(slots_d.as_ref())?),
            Arg::Ptr(rope.inv_freq().cuda_ptr()?),
            Arg::U64(t as u64),
            u32_arg(nh, "n_heads")?,
            u32_arg(nkv, "n_kv_heads")?,
            Arg::U32(h as u32),
            u32_arg(max_len, "max_len")?,
        ]);
        if version == 1 {
            args.push(Arg::F32(extras.eps));
        }
        args.extend(strides.iter().chain(&io.out_strides).map(|&s| Arg::U64(s as u64)));
        args.push(Arg::F32(sign));
        launch(ord, &SRC, &func, cfg, &args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use smelt_engine::Rng;

    /// One layer's worth of inputs: projections, biases, head-norm weights.
    struct Case {
        t: usize,
        nh: usize,
        nkv: usize,
        d: usize,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        bias: Option<[Vec<f32>; 3]>,
        norm: Option<[Vec<f32>; 2]>,
        pos: Vec<u32>,
    }

    impl Case {
        fn new(rng: &mut Rng, (t, nh, nkv, d): (usize, usize, usize, usize), bias: bool, norm: bool) -> Case {
            let (qn, kn) = (t * nh * d, t * nkv * d);
            Case {
                t,
                nh,
                nkv,
                d,
                q: randn(rng, qn, 1.0),
                k: randn(rng, kn, 1.0),
                v: randn(rng, kn, 1.0),
                bias: bias.then(|| [randn(rng, nh * d, 0.5), randn(rng, nkv * d, 0.5), randn(rng, nkv * d, 0.5)]),
                norm: norm.then(|| [randn(rng, d, 0.3).iter().map(|w| 1.0 + w).collect(), randn(rng, d, 0.3)]),
                pos: (0..t).map(|i| if i % 5 == 0 { 0 } else { rng.below(4000) as u32 }).collect(),
            }
        }

        /// The inputs as tensors of `dt` on `dev`: q, k, v, then biases and norm weights.
        /// The head-norm weights in `norm_dt`, everything else in `dt`.
        fn tensors(&self, dt: DType, norm_dt: DType, dev: Device) -> (Vec<Tensor>, Vec<Option<Tensor>>) {
            let mk_as = |v: &[f32], shape: &[usize], dt: DType| {
                Tensor::from_slice(v, shape, Device::Cpu).unwrap().to_dtype(dt).unwrap().to_device(dev).unwrap()
            };
            let mk = |v: &[f32], shape: &[usize]| mk_as(v, shape, dt);
            let (t, hq, hkv) = (self.t, self.nh * self.d, self.nkv * self.d);
            let main = vec![mk(&self.q, &[t, hq]), mk(&self.k, &[t, hkv]), mk(&self.v, &[t, hkv])];
            let b = self.bias.as_ref();
            let n = self.norm.as_ref();
            let opt = vec![
                b.map(|b| mk(&b[0], &[hq])),
                b.map(|b| mk(&b[1], &[hkv])),
                b.map(|b| mk(&b[2], &[hkv])),
                n.map(|n| mk_as(&n[0], &[self.d], norm_dt)),
                n.map(|n| mk_as(&n[1], &[self.d], norm_dt)),
            ];
            (main, opt)
        }

        /// float64: bias, head norm, rotation, with the angle as HF forms it (f32 product).
        fn reference(&self, theta: f32) -> [Vec<f64>; 3] {
            let (d, h) = (self.d, self.d / 2);
            let inv = crate::rope::cpu::inv_freq(d, theta);
            let run = |x: &[f32], heads: usize, bias: Option<&Vec<f32>>, norm: Option<&Vec<f32>>, rotate: bool| {
                let mut out = vec![0f64; x.len()];
                for tk in 0..self.t {
                    for hd in 0..heads {
                        let base = (tk * heads + hd) * d;
                        let mut y: Vec<f64> =
                            (0..d).map(|i| x[base + i] as f64 + bias.map_or(0.0, |b| b[hd * d + i] as f64)).collect();
                        if let Some(w) = norm {
                            let rstd = 1.0 / (y.iter().map(|v| v * v).sum::<f64>() / d as f64 + 1e-6).sqrt();
                            y = y.iter().zip(w).map(|(v, &w)| v * rstd * w as f64).collect();
                        }
                        for i in 0..h {
                            let (a, b) = (y[i], y[i + h]);
                            let (s, c) = if rotate {
                                let ang = (self.pos[tk] as f32 * inv[i]) as f64;
                                (ang.sin(), ang.cos())
                            } else {
                                (0.0, 1.0)
                            };
                            out[base + i] = a * c - b * s;
                            out[base + i + h] = b * c + a * s;
                        }
                    }
                }
                out
            };
            let (b, n) = (self.bias.as_ref(), self.norm.as_ref());
            [
                run(&self.q, self.nh, b.map(|b| &b[0]), n.map(|n| &n[0]), true),
                run(&self.k, self.nkv, b.map(|b| &b[1]), n.map(|n| &n[1]), true),
                run(&self.v, self.nkv, b.map(|b| &b[2]), None, false),
            ]
        }
    }

    fn extras(opt: &[Option<Tensor>]) -> Extras<'_> {
        Extras {
            q_bias: opt[0].as_ref(),
            k_bias: opt[1].as_ref(),
            v_bias: opt[2].as_ref(),
            q_norm: opt[3].as_ref(),
            k_norm: opt[4].as_ref(),
            eps: 1e-6,
        }
    }

    const SHAPES: [(usize, usize, usize, usize); 5] =
        [(1, 1, 1, 2), (5, 14, 2, 64), (3, 7, 1, 200), (17, 16, 8, 128), (33, 4, 2, 40)];

    #[test]
    fn attention_inputs_match_f64_on_odd_shapes() {
        let mut rng = Rng::new(71);
        for shape in SHAPES {
            for (bias, norm) in [(true, false), (false, true), (true, true), (false, false)] {
                let c = Case::new(&mut rng, shape, bias, norm);
                let (main, opt) = c.tensors(DType::F32, DType::F32, Device::Cpu);
                let rope = RopeTable::new(c.d, 1e6, Device::Cpu).unwrap();
                let got =
                    attention_inputs(Qkv::Separate(&main[0], &main[1], &main[2]), &extras(&opt), &rope, &c.pos, None)
                        .unwrap();
                let want = c.reference(1e6);
                for (name, (g, w)) in ["q", "k", "v"].iter().zip([got.0, got.1, got.2].iter().zip(&want)) {
                    let what = format!("{name} {shape:?} bias {bias} norm {norm}");
                    assert_close(&g.to_vec::<f32>().unwrap(), w, 1e-5, 1e-5, &what);
                }
            }
        }
    }

    /// The fused op is defined as the separate ops in sequence: on the CPU (which runs that
    /// sequence) and on CUDA (one kernel) it must give what they give, and fill the cache.
    fn check_against_separate_ops(dev: Device, dt: DType) {
        let mut rng = Rng::new(72);
        for shape in SHAPES {
            if dev.is_cuda() && shape.3 > 256 {
                continue;
            }
            // The last case has head-norm weights of the other float dtype.
            for (bias, norm, mixed) in [
                (true, false, false),
                (false, false, false),
                (false, true, false),
                (true, true, false),
                (false, true, true),
            ] {
                let c = Case::new(&mut rng, shape, bias, norm);
                let (t, nh, nkv, d) = shape;
                let norm_dt = match (mixed, dt) {
                    (false, _) => dt,
                    (true, DType::F32) => DType::BF16,
                    (true, _) => DType::F32,
                };
                let what = format!("{dev} {dt} {shape:?} bias {bias} norm {norm} (weights {norm_dt})");
                // The separate ops on the CPU.
                let (main, opt) = c.tensors(dt, norm_dt, Device::Cpu);
                let e = extras(&opt);
                let rope = RopeTable::new(d, 1e6, Device::Cpu).unwrap();
                let pos_t = Tensor::from_slice(&c.pos, &[t], Device::Cpu).unwrap();
                let step = |x: &Tensor, heads: usize, b: Option<&Tensor>, w: Option<&Tensor>, rot: bool| {
                    let y = add::scale(x, 1.0).unwrap();
                    if let Some(b) = b {
                        add::add_bias_(&y, b).unwrap();
                    }
                    let y = match w {
                        Some(w) => rmsnorm::rmsnorm(&y.reshape(&[t * heads, d]).unwrap(), w, 1e-6).unwrap().0,
                        None => y,
                    };
                    let y = y.reshape(&[t, heads, d]).unwrap();
                    if rot {
                        rope.forward(&y, &pos_t).unwrap()
                    } else {
                        y
                    }
                };
                let want = [
                    step(&main[0], nh, e.q_bias, e.q_norm, true),
                    step(&main[1], nkv, e.k_bias, e.k_norm, true),
                    step(&main[2], nkv, e.v_bias, None, false),
                ];
                // Distinct slots in reverse order, the cache longer than the positions need.
                let (n_slots, max_len) = (t + 2, 4001);
                let slots: Vec<u32> = (0..t as u32).map(|i| n_slots as u32 - 1 - i).collect();
                let cache = || Tensor::full(f64::NAN, &[n_slots, max_len, nkv, d], dt, dev).unwrap();
                let (main_d, opt_d) = c.tensors(dt, norm_dt, dev);
                let rope_d = RopeTable::new(d, 1e6, dev).unwrap();
                let run = |qkv: Qkv| {
                    let (kc, vc) = (cache(), cache());
                    drop(Tensor::full(f64::NAN, &[t * (nh + 2 * nkv) * d], dt, dev).unwrap());
                    let to_cache = CacheAppend { k_cache: &kc, v_cache: &vc, slots: (&slots).into() };
                    let (q, k, v) = attention_inputs(qkv, &extras(&opt_d), &rope_d, &c.pos, Some(to_cache)).unwrap();
                    ([q, k, v], kc, vc)
                };
                let (got, kc, vc) = run(Qkv::Separate(&main_d[0], &main_d[1], &main_d[2]));
                // Without head norms CUDA runs v2 where the rows allow (head_dim 64 and 128
                // here): v1's expressions per element, so v1's bits.
                if dev.is_cuda() && !norm {
                    let _v1 = crate::versions::scoped("attention_inputs", 1);
                    let (got1, kc1, vc1) = run(Qkv::Separate(&main_d[0], &main_d[1], &main_d[2]));
                    for (name, (a, b)) in ["q", "k", "v", "k cache", "v cache"]
                        .iter()
                        .zip(got.iter().chain([&kc, &vc]).zip(got1.iter().chain([&kc1, &vc1])))
                    {
                        assert_eq!(a.to_bytes().unwrap(), b.to_bytes().unwrap(), "v1 against default: {name} {what}");
                    }
                }
                // The same projections as the column blocks of one fused output: the same bits.
                let packed = {
                    let (qv, kv, vv) =
                        (main[0].to_vec_f32().unwrap(), main[1].to_vec_f32().unwrap(), main[2].to_vec_f32().unwrap());
                    let (qd, kvd) = (nh * d, nkv * d);
                    let rows: Vec<f32> = (0..t)
                        .flat_map(|r| {
                            qv[r * qd..(r + 1) * qd]
                                .iter()
                                .chain(&kv[r * kvd..(r + 1) * kvd])
                                .chain(&vv[r * kvd..(r + 1) * kvd])
                                .copied()
                                .collect::<Vec<_>>()
                        })
                        .collect();
                    Tensor::from_slice(&rows, &[t, qd + 2 * kvd], Device::Cpu)
                        .unwrap()
                        .to_dtype(dt)
                        .unwrap()
                        .to_device(dev)
                        .unwrap()
                };
                let (got_p, kc_p, vc_p) = run(Qkv::Packed { qkv: &packed, n_heads: nh, n_kv: nkv });
                for (name, (a, b)) in ["q", "k", "v", "k cache", "v cache"]
                    .iter()
                    .zip(got.iter().chain([&kc, &vc]).zip(got_p.iter().chain([&kc_p, &vc_p])))
                {
                    assert_eq!(a.to_bytes().unwrap(), b.to_bytes().unwrap(), "packed {name} {what}");
                }
                // CUDA's sincosf and the CPU's sin_cos may differ in the last bit, which for bf16
                // can move cos or sin across a rounding boundary (see rope's device test); the
                // head norm's sum of squares is reduced in another order. Both stay within a few
                // ulps of the output scale; the CPU must match exactly.
                let tol = if dev.is_cpu() {
                    0.0
                } else if dt == DType::F32 {
                    1e-5
                } else {
                    4.0 / 256.0
                };
                for (name, (g, w)) in ["q", "k", "v"].iter().zip(got.iter().zip(&want)) {
                    assert_eq!(g.shape(), w.shape(), "{name} {what}");
                    let (gv, wv) = (g.to_vec_f32().unwrap(), w.to_vec_f32().unwrap());
                    let scale = wv.iter().fold(1f32, |m, x| m.max(x.abs())) as f64;
                    for (i, (&a, &b)) in gv.iter().zip(&wv).enumerate() {
                        assert!(
                            ((a - b) as f64).abs() <= tol * scale,
                            "{name} {what}: element {i}: got {a}, want {b} (scale {scale})"
                        );
                    }
                    // Those last-bit differences are rare once rounded to bf16, while a missed
                    // rounding step moves many elements by one bf16 ulp: nearly all must match.
                    let differ = gv.iter().zip(&wv).filter(|(a, b)| a != b).count();
                    if dt == DType::BF16 {
                        assert!(differ <= gv.len() / 100, "{name} {what}: {differ} of {} elements differ", gv.len());
                    }
                }
                // The cache holds k and v at (slot, position) and nothing else changed.
                let row = nkv * d;
                for (name, cache, new) in [("k cache", &kc, &got[1]), ("v cache", &vc, &got[2])] {
                    let (cv, nv) = (cache.to_vec_f32().unwrap(), new.to_vec_f32().unwrap());
                    let mut written = vec![false; n_slots * max_len];
                    for r in 0..t {
                        let at = slots[r] as usize * max_len + c.pos[r] as usize;
                        written[at] = true;
                        assert_eq!(&cv[at * row..(at + 1) * row], &nv[r * row..(r + 1) * row], "{name} row {r} {what}");
                    }
                    let untouched = written
                        .iter()
                        .enumerate()
                        .filter(|(_, &w)| !w)
                        .all(|(at, _)| cv[at * row..(at + 1) * row].iter().all(|x| x.is_nan()));
                    assert!(untouched, "{name} {what}: a row outside (slot, position) was written");
                }
            }
        }
    }

    #[test]
    fn attention_inputs_cpu_is_the_separate_ops() {
        for dt in [DType::F32, DType::BF16] {
            check_against_separate_ops(Device::Cpu, dt);
        }
    }

    #[test]
    fn attention_inputs_device_matches_separate_ops() {
        let Some(dev) = test_cuda_device() else { return };
        for dt in [DType::F32, DType::BF16] {
            check_against_separate_ops(dev, dt);
        }
    }

    /// Without biases the forward is linear in the packed projection, so its backward must be
    /// its transpose: ⟨forward(x), g⟩ = ⟨x, backward(g)⟩ for random x and g (in f64).
    #[test]
    fn backward_is_the_forwards_transpose() {
        let mut rng = Rng::new(73);
        for (t, nh, nkv, d) in [(5, 14, 2, 64), (3, 7, 1, 200), (9, 4, 2, 40), (1, 1, 1, 2)] {
            let width = (nh + 2 * nkv) * d;
            let x = randn(&mut rng, t * width, 1.0);
            let pos: Vec<u32> = (0..t as u32).map(|i| (i * 37 + 5) % 4000).collect();
            let rope = RopeTable::new(d, 1e6, Device::Cpu).unwrap();
            let xt = Tensor::from_slice(&x, &[t, width], Device::Cpu).unwrap();
            let packed = Qkv::Packed { qkv: &xt, n_heads: nh, n_kv: nkv };
            let (q, k, v) = attention_inputs(packed, &Extras::default(), &rope, &pos, None).unwrap();
            let g: [Vec<f32>; 3] = [nh, nkv, nkv].map(|h| randn(&mut rng, t * h * d, 1.0));
            let gt = |i: usize, h: usize| Tensor::from_slice(&g[i], &[t, h, d], Device::Cpu).unwrap();
            let back = attention_inputs_backward(&gt(0, nh), &gt(1, nkv), &gt(2, nkv), &rope, &pos).unwrap();
            assert_eq!(back.shape(), &[t, width]);
            let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();
            let lhs: f64 = [q, k, v].iter().zip(&g).map(|(y, g)| dot(&y.to_vec_f32().unwrap(), g)).sum();
            let rhs = dot(&x, &back.to_vec_f32().unwrap());
            let scale = (t * width) as f64;
            assert!((lhs - rhs).abs() <= 1e-5 * scale.sqrt() * 4.0, "{t}x{nh}/{nkv}x{d}: {lhs} vs {rhs}");
        }
    }

    /// CUDA against the CPU, v1 and v2 (where the rows allow it) alike, bf16 and f32.
    #[test]
    fn backward_device_matches_cpu() {
        let Some(dev) = test_cuda_device() else { return };
        let mut rng = Rng::new(74);
        for (t, nh, nkv, d) in [(5, 14, 2, 64), (17, 16, 8, 128), (9, 4, 2, 40), (6, 4, 2, 16)] {
            let pos: Vec<u32> = (0..t as u32).map(|i| (i * 37 + 5) % 4000).collect();
            for dt in [DType::F32, DType::BF16] {
                let host = [nh, nkv, nkv].map(|h| {
                    let v = randn(&mut rng, t * h * d, 1.0);
                    Tensor::from_slice(&v, &[t, h, d], Device::Cpu).unwrap().to_dtype(dt).unwrap()
                });
                let on_dev = host.clone().map(|x| x.to_device(dev).unwrap());
                let rope = RopeTable::new(d, 1e6, Device::Cpu).unwrap();
                let want = attention_inputs_backward(&host[0], &host[1], &host[2], &rope, &pos).unwrap();
                let rope_d = RopeTable::new(d, 1e6, dev).unwrap();
                let run = || {
                    drop(Tensor::full(f64::NAN, &[t * (nh + 2 * nkv) * d], dt, dev).unwrap());
                    attention_inputs_backward(&on_dev[0], &on_dev[1], &on_dev[2], &rope_d, &pos).unwrap()
                };
                let got = run();
                let what = format!("{dt} {t}x{nh}/{nkv}x{d}");
                let (gv, wv) = (got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
                // sincosf against the CPU's sin_cos: a last-bit difference can move a bf16 cos or
                // sin across a rounding boundary (as in rope's device test).
                let tol = if dt == DType::F32 { 1e-5 } else { 4.0 / 256.0 };
                let scale = wv.iter().fold(1f32, |m, x| m.max(x.abs())) as f64;
                for (i, (&a, &b)) in gv.iter().zip(&wv).enumerate() {
                    assert!(((a - b) as f64).abs() <= tol * scale, "{what}: element {i}: got {a}, want {b}");
                }
                let _v1 = crate::versions::scoped("attention_inputs", 1);
                assert_eq!(run().to_bytes().unwrap(), got.to_bytes().unwrap(), "v1 against default: {what}");
            }
        }
    }

    #[test]
    fn attention_inputs_errors_name_op_and_shapes() {
        let dev = Device::Cpu;
        let z = |s: &[usize]| Tensor::zeros(s, DType::F32, dev).unwrap();
        let rope = RopeTable::new(8, 1e4, dev).unwrap();
        let (q, k, v) = (z(&[3, 16]), z(&[3, 8]), z(&[3, 8]));
        let run = |q: &Tensor, k: &Tensor, e: &Extras, pos: &[u32], c: Option<CacheAppend>| {
            attention_inputs(Qkv::Separate(q, k, &v), e, &rope, pos, c).unwrap_err().to_string()
        };
        let e = run(&z(&[3, 12]), &k, &Extras::default(), &[0, 1, 2], None);
        assert!(e.contains("attention_inputs") && e.contains("[3, 12]") && e.contains("n_heads·8"), "{e}");
        let e = run(&q, &z(&[2, 8]), &Extras::default(), &[0, 1, 2], None);
        assert!(e.contains("k [2, 8]"), "{e}");
        let (g2, g1) = (z(&[3, 2, 8]), z(&[3, 1, 8]));
        let e = attention_inputs_backward(&g2, &g1, &z(&[2, 1, 8]), &rope, &[0, 1, 2]).unwrap_err().to_string();
        assert!(e.contains("attention_inputs_backward") && e.contains("dv [2, 1, 8]"), "{e}");
        let e = attention_inputs_backward(&g2, &g1, &g1, &rope, &[0, 1]).unwrap_err().to_string();
        assert!(e.contains("2 positions for 3 tokens"), "{e}");
        let packed = Qkv::Packed { qkv: &q, n_heads: 1, n_kv: 1 };
        let e = attention_inputs(packed, &Extras::default(), &rope, &[0, 1, 2], None).unwrap_err().to_string();
        assert!(e.contains("packed qkv [3, 16] must be [T, (1 + 2·1)·8]"), "{e}");
        let e = run(&q, &k, &Extras::default(), &[0, 1], None);
        assert!(e.contains("2 positions for 3 tokens"), "{e}");
        let b = z(&[8]);
        let e = run(&q, &k, &Extras { q_bias: Some(&b), ..Default::default() }, &[0, 1, 2], None);
        assert!(e.contains("q_bias [8] must hold 16"), "{e}");
        let bb = Tensor::zeros(&[16], DType::BF16, dev).unwrap();
        let e = run(&q, &k, &Extras { q_bias: Some(&bb), ..Default::default() }, &[0, 1, 2], None);
        assert!(e.contains("q_bias is bf16 but q is f32"), "{e}");
        let (nb, nf) = (Tensor::zeros(&[8], DType::BF16, dev).unwrap(), z(&[8]));
        let e = run(&q, &k, &Extras { q_norm: Some(&nb), k_norm: Some(&nf), ..Default::default() }, &[0, 1, 2], None);
        assert!(e.contains("k_norm is f32 but the other head norm is bf16"), "{e}");
        let slots = [0u32, 1, 1];
        let with_cache = |kc: &Tensor, vc: &Tensor, pos: &[u32]| {
            run(&q, &k, &Extras::default(), pos, Some(CacheAppend { k_cache: kc, v_cache: vc, slots: (&slots).into() }))
        };
        let (kc, vc) = (z(&[2, 4, 1, 8]), z(&[2, 4, 1, 8]));
        let e = with_cache(&kc, &vc, &[0, 1, 4]);
        assert!(e.contains("row 2: slot 1 / position 4 outside cache [2, 4, 1, 8]"), "{e}");
        let (kc2, vc2) = (z(&[2, 4, 2, 8]), z(&[2, 4, 2, 8]));
        let e = with_cache(&kc2, &kc2, &[0, 1, 2]);
        assert!(e.contains("share storage"), "{e}");
        let e = with_cache(&kc2, &vc2, &[0, 1, 2]);
        assert!(e.contains("[n_slots, max_len, 1, 8]"), "{e}");
    }
}
