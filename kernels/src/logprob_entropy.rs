//! The RL head: per-token log-prob of a target token, entropy, and optionally the target's rank
//! and the argmax, computed from final hidden states **without materialising the [N, V] logits**
//! (`logprob_entropy`), plus the same statistics over logits that already exist
//! (`logprob_entropy_from_logits`, the memory-bound baseline).
//!
//! With z = h·Wᵀ and x = z / T (T the temperature), per row i:
//! - `lse`     = log Σ_v exp(x_v)                (saved for the backward)
//! - `logp`    = x_y − lse
//! - `entropy` = lse − Σ_v p_v·x_v,  p = softmax(x)
//! - `rank`    = 1 + #{v ≠ y : z_v > z_y}       (1 when y is the top token)
//! - `argmax`  = the first index of the largest logit
//!
//! The fused head walks the vocabulary in chunks of `opts.chunk` rows of W (and the tokens in
//! tiles of `opts.row_tile` rows): one matmul into an [rows, chunk] scratch, then an online
//! update of per-row (max, Σ exp(x − max), Σ exp(x − max)·(x − max)), then the scratch is
//! reused. Keeping the Σ p·x term relative to the running max makes the entropy `log s − t/s`
//! free of the cancellation in `lse − E[x]`. Extra memory is the scratch plus O(N) row state:
//! see [`fused_scratch_bytes`]; it does not grow with V.
//!
//! The target logit z_y is computed once per row as a dot product (f64 on CPU, f32 on CUDA)
//! rather than picked out of a chunk, so rank can be counted while streaming.
//!
//! Ignored tokens: a target equal to [`IGNORE`] (`u32::MAX`) marks a row whose target does not
//! exist (e.g. the last position of a sequence). Its `logp` is 0, its `rank` 0, its `g_logp`
//! is ignored in the backward; `entropy`, `lse` and `argmax` are computed as usual, so prompt
//! positions can still report entropy. Any other target ≥ V is an error naming the row.
//!
//! Masked logits: a −inf logit (top-k masking, a banned token) has p = 0 and contributes 0 to
//! Σ p·x and to the entropy, and its dz is exactly 0 (the limit of p·log p as p → 0; below
//! log p = −87, where f32 exp underflows, p is taken as exactly 0 and log p clamped, so
//! 0·(−inf) never forms). A masked *target* gives logp = −inf (a legitimate value) and rank
//! 1 + #finite logits; its gradient is not defined, and the backward returns the usual formula
//! with p_y = 0: dz_y = g_logp/T, every other entry finite. A row whose logits are *all* −inf
//! has no distribution: lse = −inf, entropy NaN, logp NaN (0 when ignored), rank 1, argmax 0,
//! and its d_logits are NaN throughout (loud, not silently zero); other rows are unaffected.
//! NaN logits propagate. The fused head computes its logits as h·Wᵀ, finite for finite inputs.
//!
//! Backward: with p_v = exp(x_v − lse) and H the entropy,
//! dz_v = (g_logp·(1[v=y] − p_v) − g_entropy·p_v·(log p_v + H)) / T;
//! dh = dz·W and dW = dzᵀ·h, accumulated chunk by chunk from recomputed logits.
//!
//! Dtypes: h and W both f32 or both bf16 (f32 math, f32 accumulation); logits f32 or bf16.
//! Outputs are f32 (u32 for rank/argmax); dh and dW are f32; d_logits has the logits' dtype.

use rayon::prelude::*;
use smelt_engine::{bf16, CpuRef, DType, Device, Error, Result, Tensor};

crate::kernel_source!("logprob_entropy");

/// The target id that marks a row without a target (see the module docs).
pub const IGNORE: u32 = u32::MAX;

/// Default vocabulary chunk (columns of logits materialised at once).
pub const DEFAULT_CHUNK: usize = 4096;
/// Default CPU row tile; on CUDA the default is all rows in one tile.
pub const DEFAULT_CPU_ROW_TILE: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogprobEntropyOpts {
    /// Vocabulary columns per chunk (≥ 1).
    pub chunk: usize,
    /// Token rows per tile; `None` = the device default (CPU: 256, CUDA: all rows).
    pub row_tile: Option<usize>,
    /// Return the rank of each target.
    pub rank: bool,
    /// Return the argmax of each row.
    pub argmax: bool,
}

impl Default for LogprobEntropyOpts {
    fn default() -> Self {
        LogprobEntropyOpts { chunk: DEFAULT_CHUNK, row_tile: None, rank: false, argmax: false }
    }
}

impl LogprobEntropyOpts {
    fn row_tile_for(&self, n: usize, device: Device) -> usize {
        let default = if device.is_cpu() { DEFAULT_CPU_ROW_TILE } else { n };
        self.row_tile.unwrap_or(default).clamp(1, n.max(1))
    }
}

/// Per-token outputs of the head, all `[N]` on the input's device.
#[derive(Debug)]
pub struct LogprobEntropy {
    pub logp: Tensor,
    pub entropy: Tensor,
    /// log-sum-exp of z/T, saved for the backward.
    pub lse: Tensor,
    pub rank: Option<Tensor>,
    pub argmax: Option<Tensor>,
}

/// Fused head forward: h `[N,H]`, lm_head `w` `[V,H]`, targets u32 `[N]`.
pub fn logprob_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    temperature: f32,
    opts: &LogprobEntropyOpts,
) -> Result<LogprobEntropy> {
    const OP: &str = "logprob_entropy";
    let (n, hd, v) = check_head(OP, h, w, targets, temperature, opts)?;
    let tg = check_targets(OP, targets, v)?;
    match h.device() {
        Device::Cpu => {
            let (hg, wg) = (CpuMat::of(OP, h)?, CpuMat::of(OP, w)?);
            let rt = opts.row_tile_for(n, Device::Cpu);
            let head = cpu::Head {
                h: hg.rows(),
                w: wg.rows(),
                targets: &tg,
                n,
                hd,
                v,
                temperature,
                chunk: opts.chunk,
                row_tile: rt,
            };
            cpu::fused_forward(&head)?.into_tensors(opts)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::fused_forward(ord, h, w, targets, n, hd, v, temperature, opts),
        #[cfg(not(feature = "cuda"))]
        d => Err(Error::UnsupportedDevice { op: OP, device: d }),
    }
}

/// Fused head backward: returns (dh `[N,H]` f32, dW `[V,H]` f32).
#[allow(clippy::too_many_arguments)]
pub fn logprob_entropy_backward(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    temperature: f32,
    lse: &Tensor,
    entropy: &Tensor,
    g_logp: &Tensor,
    g_entropy: &Tensor,
    opts: &LogprobEntropyOpts,
) -> Result<(Tensor, Tensor)> {
    let (v, hd) = (w.shape().first().copied().unwrap_or(0), w.shape().get(1).copied().unwrap_or(0));
    let dw = match w.device() {
        Device::Cpu => Tensor::zeros(&[v, hd], DType::F32, w.device())?,
        // The CUDA path overwrites dW on its first pass instead of accumulating.
        _ => Tensor::empty(&[v, hd], DType::F32, w.device())?,
    };
    let dh = backward_impl(h, w, targets, temperature, lse, entropy, g_logp, g_entropy, &dw, false, opts)?;
    Ok((dh, dw))
}

/// Fused head backward accumulating into an existing f32 `dw` `[V,H]` (tied embeddings,
/// gradient accumulation): dw += dW. Returns dh `[N,H]` f32.
#[allow(clippy::too_many_arguments)]
pub fn logprob_entropy_backward_acc(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    temperature: f32,
    lse: &Tensor,
    entropy: &Tensor,
    g_logp: &Tensor,
    g_entropy: &Tensor,
    dw: &Tensor,
    opts: &LogprobEntropyOpts,
) -> Result<Tensor> {
    backward_impl(h, w, targets, temperature, lse, entropy, g_logp, g_entropy, dw, true, opts)
}

#[allow(clippy::too_many_arguments)]
fn backward_impl(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    temperature: f32,
    lse: &Tensor,
    entropy: &Tensor,
    g_logp: &Tensor,
    g_entropy: &Tensor,
    dw: &Tensor,
    accumulate: bool,
    opts: &LogprobEntropyOpts,
) -> Result<Tensor> {
    const OP: &str = "logprob_entropy_backward";
    let (n, hd, v) = check_head(OP, h, w, targets, temperature, opts)?;
    check_row_vecs(
        OP,
        n,
        h.device(),
        &[("lse", lse), ("entropy", entropy), ("g_logp", g_logp), ("g_entropy", g_entropy)],
    )?;
    crate::ensure_shape!(
        dw.shape() == [v, hd] && dw.dtype() == DType::F32,
        "logprob_entropy_backward",
        "dw must be f32 [{v}, {hd}], got {:?} {}",
        dw.shape(),
        dw.dtype()
    );
    if dw.device() != h.device() {
        return Err(Error::DeviceMismatch { op: OP, a: h.device(), b: dw.device() });
    }
    let tg = check_targets(OP, targets, v)?;
    match h.device() {
        Device::Cpu => {
            let dh = Tensor::zeros(&[n, hd], DType::F32, Device::Cpu)?;
            {
                let (hg, wg) = (CpuMat::of(OP, h)?, CpuMat::of(OP, w)?);
                let rt = opts.row_tile_for(n, Device::Cpu);
                let head = cpu::Head {
                    h: hg.rows(),
                    w: wg.rows(),
                    targets: &tg,
                    n,
                    hd,
                    v,
                    temperature,
                    chunk: opts.chunk,
                    row_tile: rt,
                };
                let (l, e) = (lse.cpu_read::<f32>()?, entropy.cpu_read::<f32>()?);
                let (gl, ge) = (g_logp.cpu_read::<f32>()?, g_entropy.cpu_read::<f32>()?);
                let mut dhw = dh.cpu_write::<f32>()?;
                let mut dww = dw.cpu_write::<f32>()?;
                cpu::fused_backward(&head, &l, &e, &gl, &ge, &mut dhw, &mut dww)?;
            }
            Ok(dh)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => {
            let grads = cuda::Grads { lse, entropy, g_logp, g_entropy };
            cuda::fused_backward(ord, h, w, targets, n, hd, v, temperature, &grads, dw, accumulate, opts)
        }
        #[cfg(not(feature = "cuda"))]
        d => {
            let _ = accumulate;
            Err(Error::UnsupportedDevice { op: OP, device: d })
        }
    }
}

/// The same statistics over materialised logits `[N,V]` (f32 or bf16). Single pass per row.
/// `opts.chunk`/`row_tile` are unused; `rank`/`argmax` select the optional outputs.
pub fn logprob_entropy_from_logits(
    logits: &Tensor,
    targets: &Tensor,
    temperature: f32,
    opts: &LogprobEntropyOpts,
) -> Result<LogprobEntropy> {
    const OP: &str = "logprob_entropy_from_logits";
    let (n, v) = check_logits(OP, logits, targets, temperature)?;
    let tg = check_targets(OP, targets, v)?;
    match logits.device() {
        Device::Cpu => {
            let g = CpuMat::of(OP, logits)?;
            cpu::logits_forward(g.rows(), &tg, n, v, temperature).into_tensors(opts)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::logits_forward(ord, logits, targets, n, v, temperature, opts),
        #[cfg(not(feature = "cuda"))]
        d => Err(Error::UnsupportedDevice { op: OP, device: d }),
    }
}

/// Backward of [`logprob_entropy_from_logits`]: d_logits `[N,V]` in the logits' dtype.
#[allow(clippy::too_many_arguments)]
pub fn logprob_entropy_from_logits_backward(
    logits: &Tensor,
    targets: &Tensor,
    temperature: f32,
    lse: &Tensor,
    entropy: &Tensor,
    g_logp: &Tensor,
    g_entropy: &Tensor,
) -> Result<Tensor> {
    const OP: &str = "logprob_entropy_from_logits_backward";
    let (n, v) = check_logits(OP, logits, targets, temperature)?;
    check_row_vecs(
        OP,
        n,
        logits.device(),
        &[("lse", lse), ("entropy", entropy), ("g_logp", g_logp), ("g_entropy", g_entropy)],
    )?;
    let tg = check_targets(OP, targets, v)?;
    let out = Tensor::empty(&[n, v], logits.dtype(), logits.device())?;
    match logits.device() {
        Device::Cpu => {
            let g = CpuMat::of(OP, logits)?;
            let (l, e) = (lse.cpu_read::<f32>()?, entropy.cpu_read::<f32>()?);
            let (gl, ge) = (g_logp.cpu_read::<f32>()?, g_entropy.cpu_read::<f32>()?);
            let rows = cpu::RowGrads { lse: &l, entropy: &e, g_logp: &gl, g_entropy: &ge };
            match logits.dtype() {
                DType::F32 => {
                    cpu::logits_backward(g.rows(), &tg, v, temperature, &rows, cpu::RowsMut::F32(&mut out.cpu_write()?))
                }
                _ => cpu::logits_backward(
                    g.rows(),
                    &tg,
                    v,
                    temperature,
                    &rows,
                    cpu::RowsMut::BF16(&mut out.cpu_write()?),
                ),
            }
            Ok(out)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => {
            let grads = cuda::Grads { lse, entropy, g_logp, g_entropy };
            cuda::logits_backward(ord, logits, targets, n, v, temperature, &grads, &out)?;
            Ok(out)
        }
        #[cfg(not(feature = "cuda"))]
        d => Err(Error::UnsupportedDevice { op: OP, device: d }),
    }
}

/// Bytes of scratch the fused head allocates beyond its inputs and outputs (forward when
/// `backward` is false). Independent of V: the logits scratch [row_tile, chunk], O(N) row
/// state, converted bf16 tiles (CPU), the packed copy of the dz chunk the CPU matmul makes for
/// dW = dzᵀ·h (CPU backward), the bf16 copy of dz (CUDA bf16 backward).
pub fn fused_scratch_bytes(
    n: usize,
    hd: usize,
    v: usize,
    dtype: DType,
    device: Device,
    opts: &LogprobEntropyOpts,
    backward: bool,
) -> usize {
    let c = opts.chunk.clamp(1, v.max(1));
    let rt = opts.row_tile_for(n, device);
    let logits = rt * c * 4;
    if device.is_cpu() {
        let convert = if dtype == DType::BF16 { (c + rt) * hd * 4 } else { 0 };
        if backward {
            2 * logits + convert
        } else {
            // Row state: m (f32), s and t (f64), count and argmax (u32), target logit (f32).
            logits + convert + n * (std::mem::size_of::<cpu::RowState>() + 4)
        }
    } else {
        let dz16 = if backward && dtype == DType::BF16 { rt * c * 2 } else { 0 };
        let state = if backward { 0 } else { n * 24 };
        logits + dz16 + state
    }
}

// ---------------------------------------------------------------------------------------------
// Checks shared by the entry points.

fn check_temperature(op: &'static str, t: f32) -> Result<()> {
    if !(t.is_finite() && t > 0.0) {
        return Err(Error::msg(format!("{op}: temperature must be finite and > 0, got {t}")));
    }
    Ok(())
}

fn check_head(
    op: &'static str,
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    temperature: f32,
    opts: &LogprobEntropyOpts,
) -> Result<(usize, usize, usize)> {
    check_temperature(op, temperature)?;
    if h.rank() != 2 || w.rank() != 2 || targets.rank() != 1 || h.dim(1) != w.dim(1) || targets.dim(0) != h.dim(0) {
        return Err(Error::shape(
            op,
            format!(
                "want h [N,H], w [V,H], targets [N]; got h {:?}, w {:?}, targets {:?}",
                h.shape(),
                w.shape(),
                targets.shape()
            ),
        ));
    }
    if h.dtype() != w.dtype() || !matches!(h.dtype(), DType::F32 | DType::BF16) {
        return Err(Error::msg(format!(
            "{op}: h and w must both be f32 or both bf16, got {} and {}",
            h.dtype(),
            w.dtype()
        )));
    }
    if targets.dtype() != DType::U32 {
        return Err(Error::DType { op, expected: DType::U32, got: targets.dtype() });
    }
    for t in [w, targets] {
        if t.device() != h.device() {
            return Err(Error::DeviceMismatch { op, a: h.device(), b: t.device() });
        }
    }
    if opts.chunk == 0 || opts.row_tile == Some(0) {
        return Err(Error::msg(format!("{op}: chunk and row_tile must be ≥ 1, got {opts:?}")));
    }
    let (n, hd, v) = (h.dim(0), h.dim(1), w.dim(0));
    if v == 0 || v >= IGNORE as usize || n > i32::MAX as usize || hd > i32::MAX as usize {
        return Err(Error::shape(op, format!("unsupported sizes N={n} H={hd} V={v}")));
    }
    Ok((n, hd, v))
}

fn check_logits(op: &'static str, logits: &Tensor, targets: &Tensor, temperature: f32) -> Result<(usize, usize)> {
    check_temperature(op, temperature)?;
    if logits.rank() != 2 || targets.rank() != 1 || targets.dim(0) != logits.dim(0) {
        return Err(Error::shape(
            op,
            format!("want logits [N,V], targets [N]; got logits {:?}, targets {:?}", logits.shape(), targets.shape()),
        ));
    }
    if !matches!(logits.dtype(), DType::F32 | DType::BF16) {
        return Err(Error::UnsupportedDType { op, dtype: logits.dtype() });
    }
    if targets.dtype() != DType::U32 {
        return Err(Error::DType { op, expected: DType::U32, got: targets.dtype() });
    }
    if targets.device() != logits.device() {
        return Err(Error::DeviceMismatch { op, a: logits.device(), b: targets.device() });
    }
    let (n, v) = (logits.dim(0), logits.dim(1));
    if v == 0 || v >= IGNORE as usize || n > i32::MAX as usize {
        return Err(Error::shape(op, format!("unsupported sizes N={n} V={v}")));
    }
    Ok((n, v))
}

fn check_row_vecs(op: &'static str, n: usize, device: Device, vecs: &[(&str, &Tensor)]) -> Result<()> {
    for (name, t) in vecs {
        if t.shape() != [n] || t.dtype() != DType::F32 {
            return Err(Error::shape(op, format!("{name} must be f32 [{n}], got {:?} {}", t.shape(), t.dtype())));
        }
        if t.device() != device {
            return Err(Error::DeviceMismatch { op, a: device, b: t.device() });
        }
    }
    Ok(())
}

/// Host copy of the targets, each checked to be < V or [`IGNORE`].
fn check_targets(op: &'static str, targets: &Tensor, v: usize) -> Result<Vec<u32>> {
    let tg = targets.to_vec::<u32>()?;
    if let Some((i, &y)) = tg.iter().enumerate().find(|(_, &y)| y != IGNORE && y as usize >= v) {
        return Err(Error::shape(op, format!("targets[{i}] = {y} is out of range for a vocabulary of {v}")));
    }
    Ok(tg)
}

/// A read guard over an f32 or bf16 CPU tensor.
enum CpuMat<'a> {
    F32(CpuRef<'a, f32>),
    BF16(CpuRef<'a, bf16>),
}

impl<'a> CpuMat<'a> {
    fn of(op: &'static str, t: &'a Tensor) -> Result<Self> {
        match t.dtype() {
            DType::F32 => Ok(CpuMat::F32(t.cpu_read()?)),
            DType::BF16 => Ok(CpuMat::BF16(t.cpu_read()?)),
            dt => Err(Error::UnsupportedDType { op, dtype: dt }),
        }
    }
    fn rows(&self) -> cpu::Rows<'_> {
        match self {
            CpuMat::F32(g) => cpu::Rows::F32(g),
            CpuMat::BF16(g) => cpu::Rows::BF16(g),
        }
    }
}

impl cpu::Stats {
    fn into_tensors(self, opts: &LogprobEntropyOpts) -> Result<LogprobEntropy> {
        let n = self.logp.len();
        let d = Device::Cpu;
        Ok(LogprobEntropy {
            logp: Tensor::from_slice(&self.logp, &[n], d)?,
            entropy: Tensor::from_slice(&self.entropy, &[n], d)?,
            lse: Tensor::from_slice(&self.lse, &[n], d)?,
            rank: if opts.rank { Some(Tensor::from_slice(&self.rank, &[n], d)?) } else { None },
            argmax: if opts.argmax { Some(Tensor::from_slice(&self.argmax, &[n], d)?) } else { None },
        })
    }
}

/// Slice-level CPU implementations (the reference for the CUDA kernels).
pub mod cpu {
    use super::*;
    use smelt_engine::cpu::{matmul_f32, pool};

    /// A row-major matrix of f32 or bf16 values.
    #[derive(Clone, Copy)]
    pub enum Rows<'a> {
        F32(&'a [f32]),
        BF16(&'a [bf16]),
    }

    impl<'a> Rows<'a> {
        /// Rows `r0..r0+nr` of a matrix with `cols` columns as f32: borrowed when already f32,
        /// converted into `buf` otherwise.
        pub fn f32_rows<'b>(&'b self, r0: usize, nr: usize, cols: usize, buf: &'b mut Vec<f32>) -> &'b [f32] {
            self.f32_span(r0 * cols, nr * cols, buf)
        }
        /// Elements `start..start+len` as f32 (borrowed or converted into `buf`).
        pub fn f32_span<'b>(&'b self, start: usize, len: usize, buf: &'b mut Vec<f32>) -> &'b [f32] {
            let range = start..start + len;
            match self {
                Rows::F32(s) => &s[range],
                Rows::BF16(s) => {
                    buf.clear();
                    buf.extend(s[range].iter().map(|x| x.to_f32()));
                    buf
                }
            }
        }
        #[inline]
        fn at(&self, i: usize) -> f32 {
            match self {
                Rows::F32(s) => s[i],
                Rows::BF16(s) => s[i].to_f32(),
            }
        }
    }

    pub enum RowsMut<'a> {
        F32(&'a mut [f32]),
        BF16(&'a mut [bf16]),
    }

    /// The fused head's inputs. `h` is `[n, hd]`, `w` is `[v, hd]`.
    pub struct Head<'a> {
        pub h: Rows<'a>,
        pub w: Rows<'a>,
        pub targets: &'a [u32],
        pub n: usize,
        pub hd: usize,
        pub v: usize,
        pub temperature: f32,
        pub chunk: usize,
        pub row_tile: usize,
    }

    /// Per-row saved values and upstream gradients for a backward.
    pub struct RowGrads<'a> {
        pub lse: &'a [f32],
        pub entropy: &'a [f32],
        pub g_logp: &'a [f32],
        pub g_entropy: &'a [f32],
    }

    /// Per-row outputs (rank and argmax always computed; the Tensor API drops them on request).
    pub struct Stats {
        pub logp: Vec<f32>,
        pub entropy: Vec<f32>,
        pub lse: Vec<f32>,
        pub rank: Vec<u32>,
        pub argmax: Vec<u32>,
    }

    /// Online softmax statistics of one row, relative to the running max `m` of x = z/T:
    /// s = Σ exp(x − m), t = Σ exp(x − m)·(x − m), `cnt` = #{v ≠ y : x_v > x_y}.
    #[derive(Clone, Copy, Debug)]
    pub struct RowState {
        pub m: f32,
        pub s: f64,
        pub t: f64,
        pub cnt: u32,
        pub amax: u32,
    }

    impl Default for RowState {
        fn default() -> Self {
            RowState { m: f32::NEG_INFINITY, s: 0.0, t: 0.0, cnt: 0, amax: 0 }
        }
    }

    impl RowState {
        /// Folds in raw logits `z` of vocabulary columns `col0..col0+z.len()`; `xt` is the
        /// scaled target logit (NaN for an ignored row) and `y` the target.
        pub fn push(&mut self, z: &[f32], col0: usize, inv_t: f32, xt: f32, y: u32) {
            // Pass 1: chunk max; rescale the state once if it moved, and only then look for
            // the max's first index.
            let cm = super::lanes::max_scaled(z, inv_t);
            if cm > self.m {
                if self.s > 0.0 {
                    let d = (self.m - cm) as f64;
                    let a = d.exp();
                    self.t = a * (self.t + d * self.s);
                    self.s *= a;
                }
                self.m = cm;
                let ci = z.iter().position(|&zj| zj * inv_t == cm).unwrap_or(0);
                self.amax = (col0 + ci) as u32;
            }
            if self.m == f32::NEG_INFINITY {
                return;
            }
            // Pass 2 (the chunk is in cache): sums relative to the max.
            let (s, t, mut cnt) = super::lanes::sums(z, inv_t, self.m, xt);
            // The target itself is not "larger than itself", but its chunk value may differ
            // from the separately computed xt by rounding.
            let yi = y as usize;
            if y != IGNORE && yi >= col0 && yi < col0 + z.len() && z[yi - col0] * inv_t > xt {
                cnt -= 1;
            }
            self.s += s;
            self.t += t;
            self.cnt += cnt;
        }

        /// (lse, entropy).
        pub fn finish(&self) -> (f32, f32) {
            let ls = self.s.ln();
            let lse = (self.m as f64 + ls) as f32;
            let e = ls - self.t / self.s;
            (lse, if e < 0.0 { 0.0 } else { e as f32 })
        }
    }

    fn finalize(states: &[RowState], xt: &[f32], targets: &[u32]) -> Stats {
        let n = states.len();
        let mut st = Stats {
            logp: vec![0.0; n],
            entropy: vec![0.0; n],
            lse: vec![0.0; n],
            rank: vec![0; n],
            argmax: vec![0; n],
        };
        for i in 0..n {
            let (lse, ent) = states[i].finish();
            st.lse[i] = lse;
            st.entropy[i] = ent;
            st.argmax[i] = states[i].amax;
            if targets[i] != IGNORE {
                st.logp[i] = xt[i] - lse;
                st.rank[i] = states[i].cnt + 1;
            }
        }
        st
    }

    /// Scaled target logits x_y = (h_i · w_y) / T, accumulated in f64; NaN for ignored rows.
    fn target_logits(head: &Head) -> Vec<f32> {
        let (hd, inv_t) = (head.hd, 1.0 / head.temperature as f64);
        (0..head.n)
            .map(|i| {
                let y = head.targets[i];
                if y == IGNORE {
                    return f32::NAN;
                }
                let (hi, wy) = (i * hd, y as usize * hd);
                let dot: f64 = (0..hd).map(|k| head.h.at(hi + k) as f64 * head.w.at(wy + k) as f64).sum();
                (dot * inv_t) as f32
            })
            .collect()
    }

    /// Fused forward. Loops over vocabulary chunks (outer, so each W chunk is read and, for
    /// bf16, converted once) and row tiles (inner); scratch is `row_tile × chunk` f32.
    pub fn fused_forward(head: &Head) -> Result<Stats> {
        let (n, hd, v) = (head.n, head.hd, head.v);
        let inv_t = 1.0 / head.temperature;
        let xt = target_logits(head);
        let mut states = vec![RowState::default(); n];
        let c = head.chunk.clamp(1, v);
        let rt = head.row_tile.clamp(1, n.max(1));
        let mut scratch = vec![0f32; rt * c];
        let (mut wbuf, mut hbuf) = (Vec::new(), Vec::new());
        for v0 in (0..v).step_by(c) {
            let cw = c.min(v - v0);
            let wc = head.w.f32_rows(v0, cw, hd, &mut wbuf);
            for r0 in (0..n).step_by(rt) {
                let rn = rt.min(n - r0);
                let hc = head.h.f32_rows(r0, rn, hd, &mut hbuf);
                let z = &mut scratch[..rn * cw];
                matmul_f32(hc, wc, z, rn, cw, hd, false, true, false)?;
                let (st, xs, ys) = (&mut states[r0..r0 + rn], &xt[r0..r0 + rn], &head.targets[r0..r0 + rn]);
                pool().install(|| {
                    z.par_chunks(cw).zip(st.par_iter_mut()).enumerate().with_min_len(4).for_each(|(i, (zr, s))| {
                        s.push(zr, v0, inv_t, xs[i], ys[i]);
                    })
                });
            }
        }
        Ok(finalize(&states, &xt, head.targets))
    }

    /// Turns raw logits of columns `col0..` of one row into dz in place.
    #[allow(clippy::too_many_arguments)]
    fn dz_row(z: &mut [f32], col0: usize, y: u32, lse: f32, ent: f32, gl: f32, ge: f32, inv_t: f32) {
        // An ignored row has logp ≡ 0: its g_logp contributes nothing.
        let gl = if y == IGNORE { 0.0 } else { gl };
        super::lanes::dz(z, inv_t, lse, ent, gl, ge);
        // The 1[v=y] term, added to the one element of this chunk that is the target.
        let yl = (y as usize).wrapping_sub(col0);
        if let Some(d) = z.get_mut(yl) {
            *d += gl * inv_t;
        }
    }

    /// Fused backward: dh += dz·W and dw += dzᵀ·h over recomputed chunks. `dh` `[n,hd]` and
    /// `dw` `[v,hd]` are accumulated into (pass zeros for plain gradients).
    pub fn fused_backward(
        head: &Head,
        lse: &[f32],
        entropy: &[f32],
        g_logp: &[f32],
        g_entropy: &[f32],
        dh: &mut [f32],
        dw: &mut [f32],
    ) -> Result<()> {
        let (n, hd, v) = (head.n, head.hd, head.v);
        let inv_t = 1.0 / head.temperature;
        let c = head.chunk.clamp(1, v);
        let rt = head.row_tile.clamp(1, n.max(1));
        let mut scratch = vec![0f32; rt * c];
        let (mut wbuf, mut hbuf) = (Vec::new(), Vec::new());
        // Chunk-outer: the dW chunk being accumulated stays hot across row tiles.
        for v0 in (0..v).step_by(c) {
            let cw = c.min(v - v0);
            let wc = head.w.f32_rows(v0, cw, hd, &mut wbuf);
            for r0 in (0..n).step_by(rt) {
                let rn = rt.min(n - r0);
                let hc = head.h.f32_rows(r0, rn, hd, &mut hbuf);
                let z = &mut scratch[..rn * cw];
                matmul_f32(hc, wc, z, rn, cw, hd, false, true, false)?;
                pool().install(|| {
                    z.par_chunks_mut(cw).enumerate().with_min_len(4).for_each(|(i, zr)| {
                        let r = r0 + i;
                        dz_row(zr, v0, head.targets[r], lse[r], entropy[r], g_logp[r], g_entropy[r], inv_t);
                    })
                });
                let z = &scratch[..rn * cw];
                matmul_f32(z, wc, &mut dh[r0 * hd..(r0 + rn) * hd], rn, hd, cw, false, false, true)?;
                matmul_f32(z, hc, &mut dw[v0 * hd..(v0 + cw) * hd], cw, hd, rn, true, false, true)?;
            }
        }
        Ok(())
    }

    /// Columns per pass over a materialised row: small enough that pass 2 of
    /// [`RowState::push`] reads from L1/L2.
    const ROW_PIECE: usize = 2048;

    /// Forward over materialised logits `[n, v]`.
    pub fn logits_forward(logits: Rows, targets: &[u32], n: usize, v: usize, temperature: f32) -> Stats {
        let inv_t = 1.0 / temperature;
        let mut states = vec![RowState::default(); n];
        let xt: Vec<f32> = (0..n)
            .map(|i| if targets[i] == IGNORE { f32::NAN } else { logits.at(i * v + targets[i] as usize) * inv_t })
            .collect();
        pool().install(|| {
            states.par_iter_mut().enumerate().for_each(|(i, st)| {
                let mut buf = Vec::with_capacity(ROW_PIECE);
                for c0 in (0..v).step_by(ROW_PIECE) {
                    let cw = ROW_PIECE.min(v - c0);
                    let z = logits.f32_span(i * v + c0, cw, &mut buf);
                    st.push(z, c0, inv_t, xt[i], targets[i]);
                }
            })
        });
        finalize(&states, &xt, targets)
    }

    /// Backward over materialised logits: writes d_logits `[n, v]`.
    pub fn logits_backward(logits: Rows, targets: &[u32], v: usize, temperature: f32, g: &RowGrads, out: RowsMut) {
        let inv_t = 1.0 / temperature;
        let row = |i: usize, c0: usize, d: &mut [f32]| {
            dz_row(d, c0, targets[i], g.lse[i], g.entropy[i], g.g_logp[i], g.g_entropy[i], inv_t);
        };
        pool().install(|| match out {
            RowsMut::F32(o) => o.par_chunks_mut(v).enumerate().for_each(|(i, r)| {
                let mut buf = Vec::new();
                r.copy_from_slice(logits.f32_span(i * v, v, &mut buf));
                row(i, 0, r);
            }),
            RowsMut::BF16(o) => o.par_chunks_mut(v).enumerate().for_each(|(i, r)| {
                let mut buf = vec![0f32; ROW_PIECE];
                for (c0, piece) in (0..v).step_by(ROW_PIECE).zip(r.chunks_mut(ROW_PIECE)) {
                    let d = &mut buf[..piece.len()];
                    for (j, x) in d.iter_mut().enumerate() {
                        *x = logits.at(i * v + c0 + j);
                    }
                    row(i, c0, d);
                    for (o, x) in piece.iter_mut().zip(d.iter()) {
                        *o = bf16::from_f32(*x);
                    }
                }
            }),
        })
    }
}

/// Row passes written as 8 independent lanes of straight-line f32 code, so LLVM vectorises
/// them; compiled for the baseline target and again for AVX2, picked at run time.
mod lanes {
    const W: usize = 8;
    /// Lane sums are flushed to f64 every this many elements, bounding f32 rounding growth.
    const FLUSH: usize = 512;
    use crate::fastmath::{exp_neg, EXP_MIN};

    #[inline(always)]
    fn max_scaled_body(z: &[f32], inv_t: f32) -> f32 {
        let mut m = [f32::NEG_INFINITY; W];
        let blocks = z.chunks_exact(W);
        let rem = blocks.remainder();
        for b in blocks {
            for k in 0..W {
                let x = b[k] * inv_t;
                m[k] = if x > m[k] { x } else { m[k] };
            }
        }
        let mut r = rem.iter().fold(f32::NEG_INFINITY, |a, &zj| if zj * inv_t > a { zj * inv_t } else { a });
        for mk in m {
            r = if mk > r { mk } else { r };
        }
        r
    }

    /// (exp(d), d) for d = x − max ≤ 0, with d clamped at [`EXP_MIN`] and exp(d) exactly 0
    /// there: f32 exp underflows at about that point anyway, and a −inf logit (d = −inf) then
    /// adds 0 to Σ e and Σ e·d instead of 0·(−inf) = NaN. NaN compares false and propagates.
    /// The zeroing selects on the *clamped* d: selecting on `d < EXP_MIN` (the clamp's own
    /// condition, used twice) stopped LLVM vectorising `sums_body` (6× slower forward).
    #[inline(always)]
    fn exp_term(d: f32) -> (f32, f32) {
        let d = if d < EXP_MIN { EXP_MIN } else { d };
        let e = exp_neg(d);
        (if d == EXP_MIN { 0.0 } else { e }, d)
    }

    #[inline(always)]
    fn sums_body(z: &[f32], inv_t: f32, m: f32, xt: f32) -> (f64, f64, u32) {
        let (mut s64, mut t64, mut cnt) = (0f64, 0f64, 0u32);
        for piece in z.chunks(FLUSH) {
            let (mut s, mut t, mut c) = ([0f32; W], [0f32; W], [0u32; W]);
            let blocks = piece.chunks_exact(W);
            let rem = blocks.remainder();
            for b in blocks {
                for k in 0..W {
                    let x = b[k] * inv_t;
                    let (e, d) = exp_term(x - m);
                    s[k] += e;
                    t[k] += e * d;
                    c[k] += (x > xt) as u32;
                }
            }
            for &zj in rem {
                let x = zj * inv_t;
                let (e, d) = exp_term(x - m);
                s[0] += e;
                t[0] += e * d;
                c[0] += (x > xt) as u32;
            }
            for k in 0..W {
                s64 += s[k] as f64;
                t64 += t[k] as f64;
                cnt += c[k];
            }
        }
        (s64, t64, cnt)
    }

    /// dz for every element, without the 1[v=y] term (the caller adds g_logp/T at y).
    /// Where log p < [`EXP_MIN`] (a −inf logit included) p is exactly 0 and log p is clamped,
    /// so p·(log p + H) is 0 (its limit) rather than 0·(−inf) = NaN: a masked logit gets dz = 0.
    #[inline(always)]
    fn dz_body(z: &mut [f32], inv_t: f32, lse: f32, ent: f32, gl: f32, ge: f32) {
        for zj in z.iter_mut() {
            let (p, lp) = exp_term(*zj * inv_t - lse);
            *zj = (-gl * p - ge * p * (lp + ent)) * inv_t;
        }
    }

    macro_rules! dispatch {
        ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
            pub fn $name($($arg: $ty),*) -> $ret {
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn avx2($($arg: $ty),*) -> $ret {
                        $body($($arg),*)
                    }
                    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                        // SAFETY: the CPU supports the features `avx2` was compiled for.
                        return unsafe { avx2($($arg),*) };
                    }
                }
                $body($($arg),*)
            }
        };
    }

    dispatch!(max_scaled, max_scaled_body, (z: &[f32], inv_t: f32) -> f32);
    dispatch!(sums, sums_body, (z: &[f32], inv_t: f32, m: f32, xt: f32) -> (f64, f64, u32));
    dispatch!(dz, dz_body, (z: &mut [f32], inv_t: f32, lse: f32, ent: f32, gl: f32, ge: f32) -> ());
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{launch, Arg, LaunchCfg};

    const ROW_THREADS: u32 = 256;
    const LOGITS_THREADS: u32 = 512;

    pub struct Grads<'a> {
        pub lse: &'a Tensor,
        pub entropy: &'a Tensor,
        pub g_logp: &'a Tensor,
        pub g_entropy: &'a Tensor,
    }

    /// The forward scans' version: 3, or 4 (the default; `logprob_entropy.cu` lists both).
    fn forward_version() -> Result<u32> {
        crate::versions::pick("logprob_entropy", &[3, 4])
    }

    fn rows_cfg(rows: usize, threads: u32) -> LaunchCfg {
        LaunchCfg { grid: (rows as u32, 1, 1), block: (threads, 1, 1), smem: 0 }
    }

    /// Row-major C[m,n] = op(A)·op(B) (+ C when `accumulate`), A and B of dtype `ab`, C f32,
    /// f32 accumulation; `trans_*` as in `smelt_engine::cpu::matmul_f32`. Pointers are raw
    /// device addresses.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        ord: usize,
        a: u64,
        b: u64,
        c: u64,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
        ab: DType,
    ) -> Result<()> {
        let g = smelt_engine::cuda::Gemm::new(m, n, k, ab, DType::F32).trans(trans_a, trans_b).accumulate(accumulate);
        smelt_engine::cuda::device(ord)?.gemm(&g, a, b, c)
    }

    fn f32_buf(n: usize, dev: Device) -> Result<Tensor> {
        Tensor::empty(&[n.max(1)], DType::F32, dev)
    }
    fn u32_buf(n: usize, dev: Device) -> Result<Tensor> {
        Tensor::empty(&[n.max(1)], DType::U32, dev)
    }

    fn outputs(n: usize, dev: Device, opts: &LogprobEntropyOpts) -> Result<LogprobEntropy> {
        Ok(LogprobEntropy {
            logp: Tensor::empty(&[n], DType::F32, dev)?,
            entropy: Tensor::empty(&[n], DType::F32, dev)?,
            lse: Tensor::empty(&[n], DType::F32, dev)?,
            rank: if opts.rank { Some(Tensor::empty(&[n], DType::U32, dev)?) } else { None },
            argmax: if opts.argmax { Some(Tensor::empty(&[n], DType::U32, dev)?) } else { None },
        })
    }

    fn opt_ptr(t: &Option<Tensor>) -> Result<u64> {
        t.as_ref().map(|t| t.cuda_ptr()).transpose().map(|p| p.unwrap_or(0))
    }

    fn suffix(dt: DType) -> &'static str {
        if dt == DType::BF16 {
            "bf16"
        } else {
            "f32"
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn fused_forward(
        ord: usize,
        h: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        n: usize,
        hd: usize,
        v: usize,
        temperature: f32,
        opts: &LogprobEntropyOpts,
    ) -> Result<LogprobEntropy> {
        let dev = h.device();
        let out = outputs(n, dev, opts)?;
        if n == 0 {
            return Ok(out);
        }
        let dt = h.dtype();
        let es = dt.size_in_bytes() as u64;
        let inv_t = 1.0 / temperature;
        let c = opts.chunk.clamp(1, v);
        let rt = opts.row_tile_for(n, dev);
        // Row state: scaled target logit, running max, Σexp, Σexp·(x−max), count, argmax.
        let (xt, sm, ss, stt) = (f32_buf(n, dev)?, f32_buf(n, dev)?, f32_buf(n, dev)?, f32_buf(n, dev)?);
        let (cnt, amax) = (u32_buf(n, dev)?, u32_buf(n, dev)?);
        let scratch = f32_buf(rt * c, dev)?;
        let (ph, pw, py) = (h.cuda_ptr()?, w.cuda_ptr()?, targets.cuda_ptr()?);
        let (pxt, pm, ps, pt, pc, pa) =
            (xt.cuda_ptr()?, sm.cuda_ptr()?, ss.cuda_ptr()?, stt.cuda_ptr()?, cnt.cuda_ptr()?, amax.cuda_ptr()?);
        let pz = scratch.cuda_ptr()?;
        let warps_per_block = (ROW_THREADS / 32) as usize;
        launch(
            ord,
            &SRC,
            &format!("le_init_{}", suffix(dt)),
            LaunchCfg { grid: (n.div_ceil(warps_per_block) as u32, 1, 1), block: (ROW_THREADS, 1, 1), smem: 0 },
            &[
                Arg::Ptr(ph),
                Arg::Ptr(pw),
                Arg::Ptr(py),
                Arg::U32(n as u32),
                Arg::U32(hd as u32),
                Arg::F32(inv_t),
                Arg::Ptr(pxt),
                Arg::Ptr(pm),
                Arg::Ptr(ps),
                Arg::Ptr(pt),
                Arg::Ptr(pc),
                Arg::Ptr(pa),
            ],
        )?;
        let update = if forward_version()? == 4 { "le_chunk_update_v4" } else { "le_chunk_update" };
        for v0 in (0..v).step_by(c) {
            let cw = c.min(v - v0);
            for r0 in (0..n).step_by(rt) {
                let rn = rt.min(n - r0);
                let (o4, oh) = (r0 as u64 * 4, (r0 * hd) as u64 * es);
                gemm(ord, ph + oh, pw + (v0 * hd) as u64 * es, pz, rn, cw, hd, false, true, false, dt)?;
                launch(
                    ord,
                    &SRC,
                    update,
                    rows_cfg(rn, ROW_THREADS),
                    &[
                        Arg::Ptr(pz),
                        Arg::U32(cw as u32),
                        Arg::U32(v0 as u32),
                        Arg::Ptr(py + o4),
                        Arg::Ptr(pxt + o4),
                        Arg::F32(inv_t),
                        Arg::Ptr(pm + o4),
                        Arg::Ptr(ps + o4),
                        Arg::Ptr(pt + o4),
                        Arg::Ptr(pc + o4),
                        Arg::Ptr(pa + o4),
                    ],
                )?;
            }
        }
        launch(
            ord,
            &SRC,
            "le_finalize",
            LaunchCfg { grid: (n.div_ceil(256) as u32, 1, 1), block: (256, 1, 1), smem: 0 },
            &[
                Arg::U32(n as u32),
                Arg::Ptr(py),
                Arg::Ptr(pxt),
                Arg::Ptr(pm),
                Arg::Ptr(ps),
                Arg::Ptr(pt),
                Arg::Ptr(pc),
                Arg::Ptr(pa),
                Arg::Ptr(out.logp.cuda_ptr()?),
                Arg::Ptr(out.entropy.cuda_ptr()?),
                Arg::Ptr(out.lse.cuda_ptr()?),
                Arg::Ptr(opt_ptr(&out.rank)?),
                Arg::Ptr(opt_ptr(&out.argmax)?),
            ],
        )?;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn fused_backward(
        ord: usize,
        h: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        n: usize,
        hd: usize,
        v: usize,
        temperature: f32,
        g: &Grads,
        dw: &Tensor,
        accumulate: bool,
        opts: &LogprobEntropyOpts,
    ) -> Result<Tensor> {
        let dev = h.device();
        let dh = Tensor::empty(&[n, hd], DType::F32, dev)?;
        if n == 0 {
            if !accumulate {
                smelt_engine::cuda::device(ord)?.memset_zero(dw.cuda_ptr()?, dw.size_in_bytes())?;
            }
            return Ok(dh);
        }
        let dt = h.dtype();
        let es = dt.size_in_bytes() as u64;
        let inv_t = 1.0 / temperature;
        let c = opts.chunk.clamp(1, v);
        let rt = opts.row_tile_for(n, dev);
        let scratch = f32_buf(rt * c, dev)?;
        // bf16 inputs: cuBLAS wants A and B of one type, so dz goes to a bf16 copy.
        let dz16 = if dt == DType::BF16 { Some(Tensor::empty(&[rt * c], DType::BF16, dev)?) } else { None };
        let (ph, pw, py) = (h.cuda_ptr()?, w.cuda_ptr()?, targets.cuda_ptr()?);
        let (pl, pe, pgl, pge) =
            (g.lse.cuda_ptr()?, g.entropy.cuda_ptr()?, g.g_logp.cuda_ptr()?, g.g_entropy.cuda_ptr()?);
        let (pz, pdh, pdw) = (scratch.cuda_ptr()?, dh.cuda_ptr()?, dw.cuda_ptr()?);
        let pdz = match &dz16 {
            Some(t) => t.cuda_ptr()?,
            None => pz,
        };
        let dz_func = if dt == DType::BF16 { "le_dz_f32_to_bf16" } else { "le_dz_f32" };
        for v0 in (0..v).step_by(c) {
            let cw = c.min(v - v0);
            let pwc = pw + (v0 * hd) as u64 * es;
            for r0 in (0..n).step_by(rt) {
                let rn = rt.min(n - r0);
                let o4 = r0 as u64 * 4;
                let phc = ph + (r0 * hd) as u64 * es;
                gemm(ord, phc, pwc, pz, rn, cw, hd, false, true, false, dt)?;
                launch(
                    ord,
                    &SRC,
                    dz_func,
                    rows_cfg(rn, ROW_THREADS),
                    &[
                        Arg::Ptr(pz),
                        Arg::Ptr(pdz),
                        Arg::U32(cw as u32),
                        Arg::U32(v0 as u32),
                        Arg::Ptr(py + o4),
                        Arg::Ptr(pl + o4),
                        Arg::Ptr(pe + o4),
                        Arg::Ptr(pgl + o4),
                        Arg::Ptr(pge + o4),
                        Arg::F32(inv_t),
                    ],
                )?;
                // dh_tile (+)= dz·W_c ; dW_c (+)= dzᵀ·h_tile.
                gemm(ord, pdz, pwc, pdh + (r0 * hd) as u64 * 4, rn, hd, cw, false, false, v0 > 0, dt)?;
                gemm(ord, pdz, phc, pdw + (v0 * hd) as u64 * 4, cw, hd, rn, true, false, accumulate || r0 > 0, dt)?;
            }
        }
        Ok(dh)
    }

    pub fn logits_forward(
        ord: usize,
        logits: &Tensor,
        targets: &Tensor,
        n: usize,
        v: usize,
        temperature: f32,
        opts: &LogprobEntropyOpts,
    ) -> Result<LogprobEntropy> {
        let out = outputs(n, logits.device(), opts)?;
        if n == 0 {
            return Ok(out);
        }
        launch(
            ord,
            &SRC,
            &format!("le_logits_fwd{}_{}", if forward_version()? == 4 { "_v4" } else { "" }, suffix(logits.dtype())),
            rows_cfg(n, LOGITS_THREADS),
            &[
                Arg::Ptr(logits.cuda_ptr()?),
                Arg::U32(v as u32),
                Arg::Ptr(targets.cuda_ptr()?),
                Arg::F32(1.0 / temperature),
                Arg::Ptr(out.logp.cuda_ptr()?),
                Arg::Ptr(out.entropy.cuda_ptr()?),
                Arg::Ptr(out.lse.cuda_ptr()?),
                Arg::Ptr(opt_ptr(&out.rank)?),
                Arg::Ptr(opt_ptr(&out.argmax)?),
            ],
        )?;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn logits_backward(
        ord: usize,
        logits: &Tensor,
        targets: &Tensor,
        n: usize,
        v: usize,
        temperature: f32,
        g: &Grads,
        out: &Tensor,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let func = if logits.dtype() == DType::BF16 { "le_dz_bf16" } else { "le_dz_f32" };
        launch(
            ord,
            &SRC,
            func,
            rows_cfg(n, LOGITS_THREADS),
            &[
                Arg::Ptr(logits.cuda_ptr()?),
                Arg::Ptr(out.cuda_ptr()?),
                Arg::U32(v as u32),
                Arg::U32(0),
                Arg::Ptr(targets.cuda_ptr()?),
                Arg::Ptr(g.lse.cuda_ptr()?),
                Arg::Ptr(g.entropy.cuda_ptr()?),
                Arg::Ptr(g.g_logp.cuda_ptr()?),
                Arg::Ptr(g.g_entropy.cuda_ptr()?),
                Arg::F32(1.0 / temperature),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use smelt_engine::Rng;

    struct RefRow {
        logp: f64,
        entropy: f64,
        lse: f64,
        rank: u32,
        argmax: u32,
        /// Some other logit lies within rounding distance of the target's / the max.
        rank_ambiguous: bool,
        argmax_ambiguous: bool,
    }

    fn ref_row(z: &[f64], y: u32, t: f64) -> RefRow {
        let x: Vec<f64> = z.iter().map(|v| v / t).collect();
        let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let se: f64 = x.iter().map(|v| (v - m).exp()).sum();
        let lse = m + se.ln();
        // A −inf logit has p = 0 and adds nothing (not 0·(−inf)); NaN and +inf still propagate.
        let ex: f64 = x.iter().map(|&v| if v == f64::NEG_INFINITY { 0.0 } else { (v - lse).exp() * v }).sum();
        let amax = x.iter().position(|&v| v == m).unwrap() as u32;
        let close = |a: f64, b: f64| (a - b).abs() < 1e-4 * (1.0 + a.abs());
        let argmax_ambiguous = x.iter().enumerate().any(|(j, &v)| j as u32 != amax && close(v, m));
        let (logp, rank, rank_ambiguous) = if y == IGNORE {
            (0.0, 0, false)
        } else {
            let zy = z[y as usize];
            let rank = 1 + z.iter().filter(|&&v| v > zy).count() as u32;
            let amb = z.iter().enumerate().any(|(j, &v)| j as u32 != y && close(v, zy));
            (x[y as usize] - lse, rank, amb)
        };
        RefRow { logp, entropy: lse - ex, lse, rank, argmax: amax, rank_ambiguous, argmax_ambiguous }
    }

    /// Naive f64 reference: the full logits materialised.
    fn reference(h: &[f64], w: &[f64], tg: &[u32], n: usize, hd: usize, v: usize, t: f64) -> Vec<RefRow> {
        (0..n)
            .map(|i| {
                let z: Vec<f64> = (0..v).map(|j| (0..hd).map(|k| h[i * hd + k] * w[j * hd + k]).sum::<f64>()).collect();
                ref_row(&z, tg[i], t)
            })
            .collect()
    }

    struct Case {
        h: Vec<f32>,
        w: Vec<f32>,
        tg: Vec<u32>,
    }

    /// Random head with logits of std ~2 and one ignored row (when n > 2).
    fn case(rng: &mut Rng, n: usize, hd: usize, v: usize, dt: DType) -> Case {
        let round = |x: Vec<f32>| -> Vec<f32> {
            if dt == DType::BF16 {
                x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
            } else {
                x
            }
        };
        let h = round(randn(rng, n * hd, 1.0));
        let w = round(randn(rng, v * hd, 2.0 / (hd as f32).sqrt()));
        let mut tg: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
        if n > 2 {
            tg[1] = IGNORE;
        }
        Case { h, w, tg }
    }

    fn tensors(c: &Case, n: usize, hd: usize, v: usize, dt: DType, dev: Device) -> (Tensor, Tensor, Tensor) {
        let h = Tensor::from_slice(&c.h, &[n, hd], Device::Cpu).unwrap().to_dtype(dt).unwrap().to_device(dev).unwrap();
        let w = Tensor::from_slice(&c.w, &[v, hd], Device::Cpu).unwrap().to_dtype(dt).unwrap().to_device(dev).unwrap();
        let y = Tensor::from_slice(&c.tg, &[n], dev).unwrap();
        (h, w, y)
    }

    fn check_against_reference(out: &LogprobEntropy, want: &[RefRow], tol: f64, what: &str) {
        let f = |sel: fn(&RefRow) -> f64| want.iter().map(sel).collect::<Vec<_>>();
        assert_close(&out.logp.to_vec_f32().unwrap(), &f(|r| r.logp), tol, tol, &format!("{what} logp"));
        assert_close(&out.entropy.to_vec_f32().unwrap(), &f(|r| r.entropy), tol, tol, &format!("{what} entropy"));
        assert_close(&out.lse.to_vec_f32().unwrap(), &f(|r| r.lse), tol, tol, &format!("{what} lse"));
        let (rank, amax) = (
            out.rank.as_ref().unwrap().to_vec::<u32>().unwrap(),
            out.argmax.as_ref().unwrap().to_vec::<u32>().unwrap(),
        );
        let mut exact = 0;
        for (i, r) in want.iter().enumerate() {
            if !r.rank_ambiguous {
                assert_eq!(rank[i], r.rank, "{what} rank row {i}");
                exact += 1;
            }
            if !r.argmax_ambiguous {
                assert_eq!(amax[i], r.argmax, "{what} argmax row {i}");
            }
        }
        assert!(
            want.len() < 10 || exact * 10 >= want.len() * 8,
            "{what}: too few unambiguous rows ({exact}/{})",
            want.len()
        );
    }

    fn all_opts(chunk: usize, row_tile: Option<usize>) -> LogprobEntropyOpts {
        LogprobEntropyOpts { chunk, row_tile, rank: true, argmax: true }
    }

    #[test]
    fn fused_matches_f64_reference() {
        let mut rng = Rng::new(11);
        // (n, hd, v, chunk, row_tile): N not a multiple of the row tile, V not of the chunk.
        let shapes = [
            (37, 16, 1003, 128, Some(8)),
            (5, 64, 1003, 4096, None),
            (70, 33, 1003, 1000, Some(64)),
            (1, 1, 7, 3, None),
        ];
        for &(n, hd, v, chunk, rt) in &shapes {
            for dt in [DType::F32, DType::BF16] {
                let c = case(&mut rng, n, hd, v, dt);
                let (h, w, y) = tensors(&c, n, hd, v, dt, Device::Cpu);
                for t in [0.6f32, 1.0, 1.3] {
                    let want = reference(&to_f64(&c.h), &to_f64(&c.w), &c.tg, n, hd, v, t as f64);
                    let out = logprob_entropy(&h, &w, &y, t, &all_opts(chunk, rt)).unwrap();
                    check_against_reference(&out, &want, 2e-5, &format!("n{n} h{hd} v{v} c{chunk} {dt} T{t}"));
                }
            }
        }
    }

    #[test]
    fn fused_full_qwen_vocab() {
        let (n, hd, v) = (3, 8, 151_936);
        let mut rng = Rng::new(12);
        let c = case(&mut rng, n, hd, v, DType::F32);
        let (h, w, y) = tensors(&c, n, hd, v, DType::F32, Device::Cpu);
        let want = reference(&to_f64(&c.h), &to_f64(&c.w), &c.tg, n, hd, v, 0.6);
        let out = logprob_entropy(&h, &w, &y, 0.6, &all_opts(DEFAULT_CHUNK, None)).unwrap();
        // Rank over 151,936 random logits is ambiguous in some rows; value checks are the point.
        let f = |sel: fn(&RefRow) -> f64| want.iter().map(sel).collect::<Vec<_>>();
        assert_close(&out.logp.to_vec_f32().unwrap(), &f(|r| r.logp), 5e-5, 1e-5, "logp");
        assert_close(&out.entropy.to_vec_f32().unwrap(), &f(|r| r.entropy), 5e-5, 1e-5, "entropy");
        let rank = out.rank.unwrap().to_vec::<u32>().unwrap();
        let amax = out.argmax.unwrap().to_vec::<u32>().unwrap();
        for (i, r) in want.iter().enumerate() {
            if !r.rank_ambiguous {
                assert_eq!(rank[i], r.rank, "rank row {i}");
            }
            if !r.argmax_ambiguous {
                assert_eq!(amax[i], r.argmax, "argmax row {i}");
            }
        }
    }

    #[test]
    fn rank_and_argmax_exact_on_distinct_logits() {
        // Logits on a grid (distinct by far more than rounding), with ties for the max placed
        // in different chunks so "first index" is tested.
        let (n, v) = (4, 50);
        let mut z = vec![0f32; n * v];
        for i in 0..n {
            for j in 0..v {
                z[i * v + j] = ((j * 7 + i * 3) % v) as f32 * 0.25 - 3.0;
            }
        }
        z[2 * v + 45] = 100.0;
        z[2 * v + 5] = 100.0;
        let tg = vec![0u32, 13, 45, IGNORE];
        let logits = Tensor::from_slice(&z, &[n, v], Device::Cpu).unwrap();
        let y = Tensor::from_slice(&tg, &[n], Device::Cpu).unwrap();
        let out = logprob_entropy_from_logits(&logits, &y, 1.0, &all_opts(8, None)).unwrap();
        let rank = out.rank.unwrap().to_vec::<u32>().unwrap();
        let amax = out.argmax.unwrap().to_vec::<u32>().unwrap();
        for i in 0..n {
            let row = &z[i * v..(i + 1) * v];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(amax[i] as usize, row.iter().position(|&x| x == m).unwrap(), "argmax row {i}");
            if tg[i] == IGNORE {
                assert_eq!(rank[i], 0);
            } else {
                let zy = row[tg[i] as usize];
                assert_eq!(rank[i], 1 + row.iter().filter(|&&x| x > zy).count() as u32, "rank row {i}");
            }
        }
        assert_eq!(amax[2], 5);
        assert_eq!(rank[2], 1, "a tie with the target does not count as larger");
        // The fused head with a chunk boundary between the two maxima agrees. Build W so that
        // h·Wᵀ reproduces the logits exactly: h = one-hot rows, W = logits transposed.
        let (hd, nn) = (n, n);
        let h: Vec<f32> = (0..nn * hd).map(|k| if k / hd == k % hd { 1.0 } else { 0.0 }).collect();
        let w: Vec<f32> = (0..v * hd).map(|k| z[(k % hd) * v + k / hd]).collect();
        let h = Tensor::from_slice(&h, &[nn, hd], Device::Cpu).unwrap();
        let w = Tensor::from_slice(&w, &[v, hd], Device::Cpu).unwrap();
        let fused = logprob_entropy(&h, &w, &y, 1.0, &all_opts(8, Some(3))).unwrap();
        assert_eq!(fused.rank.unwrap().to_vec::<u32>().unwrap(), rank);
        assert_eq!(fused.argmax.unwrap().to_vec::<u32>().unwrap(), amax);
    }

    #[test]
    fn from_logits_matches_reference_and_fused() {
        let mut rng = Rng::new(13);
        let (n, hd, v) = (29, 24, 1003);
        for t in [0.6f32, 1.0, 1.3] {
            let c = case(&mut rng, n, hd, v, DType::F32);
            let (h, w, y) = tensors(&c, n, hd, v, DType::F32, Device::Cpu);
            let opts = all_opts(100, Some(7));
            let fused = logprob_entropy(&h, &w, &y, t, &opts).unwrap();
            let mut z = vec![0f32; n * v];
            smelt_engine::cpu::matmul_f32(&c.h, &c.w, &mut z, n, v, hd, false, true, false).unwrap();
            let logits = Tensor::from_slice(&z, &[n, v], Device::Cpu).unwrap();
            let mat = logprob_entropy_from_logits(&logits, &y, t, &opts).unwrap();
            let want: Vec<RefRow> =
                (0..n).map(|i| ref_row(&to_f64(&z[i * v..(i + 1) * v]), c.tg[i], t as f64)).collect();
            check_against_reference(&mat, &want, 2e-5, &format!("from_logits T{t}"));
            let f64v = |x: &Tensor| to_f64(&x.to_vec_f32().unwrap());
            assert_close(&mat.logp.to_vec_f32().unwrap(), &f64v(&fused.logp), 2e-5, 2e-5, "materialised vs fused logp");
            assert_close(
                &mat.entropy.to_vec_f32().unwrap(),
                &f64v(&fused.entropy),
                2e-5,
                2e-5,
                "materialised vs fused entropy",
            );
            // bf16 logits: the reference is the bf16-rounded logits.
            let lb = logits.to_dtype(DType::BF16).unwrap();
            let zb = lb.to_vec_f32().unwrap();
            let out = logprob_entropy_from_logits(&lb, &y, t, &opts).unwrap();
            let want: Vec<RefRow> =
                (0..n).map(|i| ref_row(&to_f64(&zb[i * v..(i + 1) * v]), c.tg[i], t as f64)).collect();
            let f = |sel: fn(&RefRow) -> f64| want.iter().map(sel).collect::<Vec<_>>();
            assert_close(&out.logp.to_vec_f32().unwrap(), &f(|r| r.logp), 2e-5, 2e-5, "bf16 logits logp");
            assert_close(&out.entropy.to_vec_f32().unwrap(), &f(|r| r.entropy), 2e-5, 2e-5, "bf16 logits entropy");
        }
    }

    /// L = Σ g_logp·logp + g_entropy·entropy, in f64 from the naive reference.
    #[allow(clippy::too_many_arguments)]
    fn loss64(h: &[f64], w: &[f64], tg: &[u32], n: usize, hd: usize, v: usize, t: f64, gl: &[f32], ge: &[f32]) -> f64 {
        reference(h, w, tg, n, hd, v, t)
            .iter()
            .enumerate()
            .map(|(i, r)| gl[i] as f64 * r.logp + ge[i] as f64 * r.entropy)
            .sum()
    }

    #[test]
    fn fused_backward_by_finite_differences() {
        let mut rng = Rng::new(14);
        let (n, hd, v) = (4, 5, 11);
        for (t, paths) in [(0.6f32, (1.0f32, 0.0f32)), (1.3, (0.0, 1.0)), (1.0, (1.0, 1.0))] {
            let c = case(&mut rng, n, hd, v, DType::F32);
            let (h, w, y) = tensors(&c, n, hd, v, DType::F32, Device::Cpu);
            let gl: Vec<f32> = randn(&mut rng, n, 1.0).iter().map(|x| x * paths.0).collect();
            let ge: Vec<f32> = randn(&mut rng, n, 1.0).iter().map(|x| x * paths.1).collect();
            let opts = all_opts(4, Some(3));
            let fwd = logprob_entropy(&h, &w, &y, t, &opts).unwrap();
            let glt = Tensor::from_slice(&gl, &[n], Device::Cpu).unwrap();
            let get = Tensor::from_slice(&ge, &[n], Device::Cpu).unwrap();
            let (dh, dw) = logprob_entropy_backward(&h, &w, &y, t, &fwd.lse, &fwd.entropy, &glt, &get, &opts).unwrap();
            let (h64, w64) = (to_f64(&c.h), to_f64(&c.w));
            let t64 = t as f64;
            let want_dh = finite_diff(|x| loss64(x, &w64, &c.tg, n, hd, v, t64, &gl, &ge), &h64, 1e-5);
            let want_dw = finite_diff(|x| loss64(&h64, x, &c.tg, n, hd, v, t64, &gl, &ge), &w64, 1e-5);
            let what = format!("T{t} paths {paths:?}");
            assert_close(&dh.to_vec_f32().unwrap(), &want_dh, 1e-4, 1e-3, &format!("dh {what}"));
            assert_close(&dw.to_vec_f32().unwrap(), &want_dw, 1e-4, 1e-3, &format!("dw {what}"));
            // The accumulating variant adds onto what dw held; bf16 inputs give the same
            // gradients up to bf16 rounding of h and W (here exact: the case is pre-rounded).
            let base = randn(&mut rng, v * hd, 1.0);
            let acc = Tensor::from_slice(&base, &[v, hd], Device::Cpu).unwrap();
            let dh2 =
                logprob_entropy_backward_acc(&h, &w, &y, t, &fwd.lse, &fwd.entropy, &glt, &get, &acc, &opts).unwrap();
            assert_eq!(dh2.to_vec_f32().unwrap(), dh.to_vec_f32().unwrap());
            let want_acc: Vec<f64> = want_dw.iter().zip(&base).map(|(a, b)| a + *b as f64).collect();
            assert_close(&acc.to_vec_f32().unwrap(), &want_acc, 1e-4, 1e-3, &format!("dw acc {what}"));
        }
    }

    /// A materialised-head backward case: logits `z` [n × v] (n = targets), random upstream
    /// gradients g_logp, g_entropy, the kernel's d_logits, and the finite-difference gradient
    /// of Σ g_logp·logp + g_entropy·entropy computed by the f64 reference forward.
    struct FromLogitsFd {
        logits: Tensor,
        y: Tensor,
        fwd: LogprobEntropy,
        gl: Vec<f32>,
        ge: Vec<f32>,
        glt: Tensor,
        get: Tensor,
        d: Vec<f32>,
        fd: Vec<f64>,
    }

    fn from_logits_fd_case(rng: &mut Rng, z: &[f32], tg: &[u32], v: usize, t: f32) -> FromLogitsFd {
        let n = tg.len();
        let gl = randn(rng, n, 1.0);
        let ge = randn(rng, n, 1.0);
        let logits = Tensor::from_slice(z, &[n, v], Device::Cpu).unwrap();
        let y = Tensor::from_slice(tg, &[n], Device::Cpu).unwrap();
        let fwd = logprob_entropy_from_logits(&logits, &y, t, &LogprobEntropyOpts::default()).unwrap();
        let glt = Tensor::from_slice(&gl, &[n], Device::Cpu).unwrap();
        let get = Tensor::from_slice(&ge, &[n], Device::Cpu).unwrap();
        let d = logprob_entropy_from_logits_backward(&logits, &y, t, &fwd.lse, &fwd.entropy, &glt, &get).unwrap();
        let loss = |zz: &[f64]| -> f64 {
            (0..n)
                .map(|i| {
                    let r = ref_row(&zz[i * v..(i + 1) * v], tg[i], t as f64);
                    gl[i] as f64 * r.logp + ge[i] as f64 * r.entropy
                })
                .sum()
        };
        let fd = finite_diff(loss, &to_f64(z), 1e-5);
        FromLogitsFd { logits, y, fwd, gl, ge, glt, get, d: d.to_vec_f32().unwrap(), fd }
    }

    #[test]
    fn from_logits_backward_by_finite_differences() {
        let mut rng = Rng::new(15);
        let (n, v) = (3, 13);
        for t in [0.6f32, 1.3] {
            let z = randn(&mut rng, n * v, 2.0);
            let c = from_logits_fd_case(&mut rng, &z, &[3, IGNORE, 12], v, t);
            let want = c.fd;
            assert_close(&c.d, &want, 1e-5, 1e-4, &format!("d_logits T{t}"));
            let bf = c.logits.to_dtype(DType::BF16).unwrap();
            let db =
                logprob_entropy_from_logits_backward(&bf, &c.y, t, &c.fwd.lse, &c.fwd.entropy, &c.glt, &c.get).unwrap();
            assert_eq!(db.dtype(), DType::BF16);
            assert_close(&db.to_vec_f32().unwrap(), &want, 0.05, 0.05, &format!("d_logits bf16 T{t}"));
        }
    }

    #[test]
    fn fused_backward_matches_materialised_backward() {
        // dh = d_logits·W and dW = d_logitsᵀ·h with d_logits from the materialised variant.
        let mut rng = Rng::new(16);
        let (n, hd, v) = (19, 16, 1003);
        let c = case(&mut rng, n, hd, v, DType::F32);
        let (h, w, y) = tensors(&c, n, hd, v, DType::F32, Device::Cpu);
        let gl = randn(&mut rng, n, 1.0);
        let ge = randn(&mut rng, n, 1.0);
        let (glt, get) =
            (Tensor::from_slice(&gl, &[n], Device::Cpu).unwrap(), Tensor::from_slice(&ge, &[n], Device::Cpu).unwrap());
        let opts = all_opts(256, Some(5));
        let fwd = logprob_entropy(&h, &w, &y, 0.8, &opts).unwrap();
        let (dh, dw) = logprob_entropy_backward(&h, &w, &y, 0.8, &fwd.lse, &fwd.entropy, &glt, &get, &opts).unwrap();
        let mut z = vec![0f32; n * v];
        smelt_engine::cpu::matmul_f32(&c.h, &c.w, &mut z, n, v, hd, false, true, false).unwrap();
        let logits = Tensor::from_slice(&z, &[n, v], Device::Cpu).unwrap();
        let dz = logprob_entropy_from_logits_backward(&logits, &y, 0.8, &fwd.lse, &fwd.entropy, &glt, &get).unwrap();
        let dz = dz.to_vec_f32().unwrap();
        let (mut want_dh, mut want_dw) = (vec![0f32; n * hd], vec![0f32; v * hd]);
        smelt_engine::cpu::matmul_f32(&dz, &c.w, &mut want_dh, n, hd, v, false, false, false).unwrap();
        smelt_engine::cpu::matmul_f32(&dz, &c.h, &mut want_dw, v, hd, n, true, false, false).unwrap();
        assert_close(&dh.to_vec_f32().unwrap(), &to_f64(&want_dh), 1e-5, 1e-4, "dh");
        assert_close(&dw.to_vec_f32().unwrap(), &to_f64(&want_dw), 1e-5, 1e-4, "dw");
    }

    #[test]
    fn errors_name_the_op_and_the_row() {
        let h = Tensor::zeros(&[3, 4], DType::F32, Device::Cpu).unwrap();
        let w = Tensor::zeros(&[10, 4], DType::F32, Device::Cpu).unwrap();
        let y = Tensor::from_slice(&[1u32, 10, 2], &[3], Device::Cpu).unwrap();
        let e = logprob_entropy(&h, &w, &y, 1.0, &LogprobEntropyOpts::default()).unwrap_err().to_string();
        assert!(e.contains("logprob_entropy") && e.contains("targets[1]") && e.contains("10"), "{e}");
        let w5 = Tensor::zeros(&[10, 5], DType::F32, Device::Cpu).unwrap();
        let y = Tensor::from_slice(&[1u32, 2, 3], &[3], Device::Cpu).unwrap();
        let e = logprob_entropy(&h, &w5, &y, 1.0, &LogprobEntropyOpts::default()).unwrap_err().to_string();
        assert!(e.contains("logprob_entropy") && e.contains("[10, 5]"), "{e}");
        let e = logprob_entropy(&h, &w, &y, 0.0, &LogprobEntropyOpts::default()).unwrap_err().to_string();
        assert!(e.contains("temperature"), "{e}");
        let logits = Tensor::zeros(&[3, 10], DType::F32, Device::Cpu).unwrap();
        let bad = Tensor::from_slice(&[0u32, 1, 11], &[3], Device::Cpu).unwrap();
        let e =
            logprob_entropy_from_logits(&logits, &bad, 1.0, &LogprobEntropyOpts::default()).unwrap_err().to_string();
        assert!(e.contains("targets[2]"), "{e}");
    }

    /// Analytic f64 gradient of g_logp·logp + g_entropy·entropy with respect to the logits of
    /// one row: dz_v = (g_logp·(1[v=y] − p_v) − g_entropy·p_v·(log p_v + H)) / T, where a −inf
    /// logit has p_v = 0 and p_v·log p_v = 0. Defined (finite) even when the target is masked.
    fn ref_dz(z: &[f64], y: u32, t: f64, gl: f64, ge: f64) -> Vec<f64> {
        let r = ref_row(z, y, t);
        let gl = if y == IGNORE { 0.0 } else { gl };
        z.iter()
            .enumerate()
            .map(|(j, &zj)| {
                let ind = if j as u32 == y { 1.0 } else { 0.0 };
                if zj == f64::NEG_INFINITY {
                    return gl * ind / t;
                }
                let lp = zj / t - r.lse;
                let p = lp.exp();
                (gl * (ind - p) - ge * p * (lp + r.entropy)) / t
            })
            .collect()
    }

    /// [`assert_close`] that also accepts equal infinities and NaN where NaN is wanted.
    #[track_caller]
    fn assert_close_nonfinite(got: &[f32], want: &[f64], atol: f64, rtol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let ok = if w.is_nan() {
                g.is_nan()
            } else if w.is_infinite() {
                g as f64 == w
            } else {
                (g as f64 - w).abs() <= atol + rtol * w.abs()
            };
            assert!(ok, "{what}: element {i}: got {g}, want {w} (atol {atol}, rtol {rtol})");
        }
    }

    /// Rows of `v` (≥ 1000) random logits with −inf entries (top-k / banned-token masking), in
    /// the patterns that exercise the row passes: 0 scattered (1/3 masked); 1 scattered (1/2),
    /// target ignored; 2 one whole aligned 8-lane block, an unaligned run of 17 and the last 5
    /// columns (the vector remainder when V is odd); 3 scattered with the target masked; 4 the
    /// first 2048 columns (a whole CPU row piece; all but the tail when V < 2048), so the
    /// running max starts at −inf; 5 a whole middle span (columns 2048..4096 when V > 4096, a
    /// whole 512-column flush block or tail otherwise); 6 one finite logit, the target; 7 one
    /// finite logit, target masked. Targets are finite logits except in rows 3 and 7.
    fn masked_case(rng: &mut Rng, v: usize) -> (Vec<f32>, Vec<u32>) {
        const ROWS: usize = 8;
        assert!(v >= 1000);
        let ninf = f32::NEG_INFINITY;
        let mut z = randn(rng, ROWS * v, 3.0);
        let mut tg = vec![0u32; ROWS];
        for (i, r) in z.chunks_mut(v).enumerate() {
            let mut mask = |lo: usize, hi: usize| r[lo..hi].iter_mut().for_each(|x| *x = ninf);
            match i {
                2 => {
                    mask(8, 16);
                    mask(101, 118);
                    mask(v - 5, v);
                }
                4 => mask(0, 2048.min(v - 7)),
                5 => {
                    let lo = if v > 4096 { 2048 } else { 512 };
                    mask(lo, (lo + 2048).min(v));
                }
                6 | 7 => mask(0, v),
                _ => {}
            }
            let every = [3, 2, 0, 4, 0, 0, 0, 0][i];
            if every > 0 {
                r.iter_mut().for_each(|x| {
                    if rng.below(every) == 0 {
                        *x = ninf
                    }
                });
            }
            if i >= 6 {
                let j = rng.below(v as u64) as usize;
                r[j] = rng.normal() as f32;
            }
            let pick = |rng: &mut Rng, finite: bool| loop {
                let y = rng.below(v as u64) as usize;
                if r[y].is_finite() == finite {
                    return y as u32;
                }
            };
            tg[i] = match i {
                1 => IGNORE,
                3 | 7 => pick(rng, false),
                _ => pick(rng, true),
            };
        }
        (z, tg)
    }

    /// Forward and backward of the materialised head on `z` [n, v] against the f64 reference
    /// (−inf logits have p = 0), with the given temperature; `z` holds what the `dt` tensor
    /// stores (pre-rounded for bf16).
    fn check_masked_from_logits(z: &[f32], tg: &[u32], v: usize, t: f32, dt: DType, rng: &mut Rng) {
        let n = tg.len();
        let what = format!("masked from_logits v{v} {dt} T{t}");
        let logits = Tensor::from_slice(z, &[n, v], Device::Cpu).unwrap().to_dtype(dt).unwrap();
        assert_eq!(logits.to_vec_f32().unwrap(), z, "{what}: logits not pre-rounded");
        let y = Tensor::from_slice(tg, &[n], Device::Cpu).unwrap();
        let out = logprob_entropy_from_logits(&logits, &y, t, &all_opts(DEFAULT_CHUNK, None)).unwrap();
        let rows: Vec<Vec<f64>> = z.chunks(v).map(to_f64).collect();
        let want: Vec<RefRow> = rows.iter().zip(tg).map(|(r, &yi)| ref_row(r, yi, t as f64)).collect();
        let f = |sel: fn(&RefRow) -> f64| want.iter().map(sel).collect::<Vec<_>>();
        let logp = out.logp.to_vec_f32().unwrap();
        assert_close_nonfinite(&logp, &f(|r| r.logp), 2e-5, 2e-5, &format!("{what} logp"));
        assert_eq!(logp[3], f32::NEG_INFINITY, "{what}: masked target");
        assert_eq!(logp[7], f32::NEG_INFINITY, "{what}: masked target");
        let ent = out.entropy.to_vec_f32().unwrap();
        assert_close(&ent, &f(|r| r.entropy), 2e-5, 2e-5, &format!("{what} entropy"));
        assert_eq!((ent[6], ent[7], logp[6]), (0.0, 0.0, 0.0), "{what}: one finite logit");
        assert_close(&out.lse.to_vec_f32().unwrap(), &f(|r| r.lse), 2e-5, 2e-5, &format!("{what} lse"));
        let (rank, amax) = (out.rank.unwrap().to_vec::<u32>().unwrap(), out.argmax.unwrap().to_vec::<u32>().unwrap());
        for (i, r) in want.iter().enumerate() {
            if !r.rank_ambiguous {
                assert_eq!(rank[i], r.rank, "{what} rank row {i}");
            }
            if !r.argmax_ambiguous {
                assert_eq!(amax[i], r.argmax, "{what} argmax row {i}");
            }
        }

        let gl = randn(rng, n, 1.0);
        let ge = randn(rng, n, 1.0);
        let (glt, get) =
            (Tensor::from_slice(&gl, &[n], Device::Cpu).unwrap(), Tensor::from_slice(&ge, &[n], Device::Cpu).unwrap());
        let d = logprob_entropy_from_logits_backward(&logits, &y, t, &out.lse, &out.entropy, &glt, &get).unwrap();
        assert_eq!(d.dtype(), dt);
        let d = d.to_vec_f32().unwrap();
        let want_d: Vec<f64> =
            rows.iter().enumerate().flat_map(|(i, r)| ref_dz(r, tg[i], t as f64, gl[i] as f64, ge[i] as f64)).collect();
        assert!(d.iter().all(|x| x.is_finite()), "{what}: d_logits not finite");
        // A masked non-target logit gets exactly 0; a masked target gets g_logp/T.
        for (k, &zk) in z.iter().enumerate() {
            if zk == f32::NEG_INFINITY && tg[k / v] != (k % v) as u32 {
                assert_eq!(d[k], 0.0, "{what}: d_logits[{k}] of a masked logit");
            }
        }
        let rtol = if dt == DType::BF16 { 1e-2 } else { 1e-4 };
        assert_close(&d, &want_d, 1e-6, rtol, &format!("{what} d_logits"));
    }

    #[test]
    fn from_logits_neg_inf_matches_f64_reference() {
        let mut rng = Rng::new(19);
        for v in [1003usize, 4096, 5000] {
            for dt in [DType::F32, DType::BF16] {
                let (z, tg) = masked_case(&mut rng, v);
                let z: Vec<f32> =
                    z.iter().map(|&x| if dt == DType::BF16 { bf16::from_f32(x).to_f32() } else { x }).collect();
                for t in [0.7f32, 1.0] {
                    check_masked_from_logits(&z, &tg, v, t, dt, &mut rng);
                }
            }
        }
    }

    #[test]
    fn from_logits_neg_inf_backward_by_finite_differences() {
        // The analytic reference (and the kernel) against finite differences of the f64
        // forward: a masked logit stays −inf under perturbation, so its derivative is 0.
        let mut rng = Rng::new(20);
        let (n, v) = (3, 13);
        let ninf = f32::NEG_INFINITY;
        let mut z = randn(&mut rng, n * v, 2.0);
        for k in [0usize, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 20, 25, 26, 27, 28, 29, 30, 31, 32] {
            z[k] = ninf;
        }
        let tg = vec![2u32, IGNORE, 33 - 26];
        for t in [0.6f32, 1.3] {
            let c = from_logits_fd_case(&mut rng, &z, &tg, v, t);
            let z64 = to_f64(&z);
            let analytic: Vec<f64> = (0..n)
                .flat_map(|i| ref_dz(&z64[i * v..(i + 1) * v], tg[i], t as f64, c.gl[i] as f64, c.ge[i] as f64))
                .collect();
            let analytic32: Vec<f32> = analytic.iter().map(|&x| x as f32).collect();
            assert_close(&analytic32, &c.fd, 1e-6, 1e-5, &format!("ref_dz vs finite differences T{t}"));
            assert_close(&c.d, &c.fd, 1e-5, 1e-4, &format!("masked d_logits T{t}"));
        }
    }

    #[test]
    fn from_logits_all_neg_inf_row_is_degenerate() {
        // A row with every logit −inf has no distribution: lse = −inf, entropy NaN, logp NaN
        // (0 when ignored), rank 1, argmax 0, and its d_logits are all NaN. Other rows are
        // unaffected. (The fused head never sees this: h·Wᵀ is finite for finite inputs.)
        let v = 1003;
        let mut rng = Rng::new(21);
        let mut z = randn(&mut rng, 3 * v, 2.0);
        z[..2 * v].iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
        let tg = vec![5u32, IGNORE, 7];
        for dt in [DType::F32, DType::BF16] {
            let logits = Tensor::from_slice(&z, &[3, v], Device::Cpu).unwrap().to_dtype(dt).unwrap();
            let y = Tensor::from_slice(&tg, &[3], Device::Cpu).unwrap();
            let out = logprob_entropy_from_logits(&logits, &y, 0.9, &all_opts(DEFAULT_CHUNK, None)).unwrap();
            let (logp, ent, lse) =
                (out.logp.to_vec_f32().unwrap(), out.entropy.to_vec_f32().unwrap(), out.lse.to_vec_f32().unwrap());
            assert!(logp[0].is_nan() && logp[1] == 0.0 && logp[2].is_finite(), "{dt} logp {logp:?}");
            assert!(ent[0].is_nan() && ent[1].is_nan() && ent[2].is_finite(), "{dt} entropy {ent:?}");
            assert!(lse[0] == f32::NEG_INFINITY && lse[1] == f32::NEG_INFINITY && lse[2].is_finite(), "{dt}");
            assert_eq!(out.rank.unwrap().to_vec::<u32>().unwrap()[..2], [1, 0]);
            assert_eq!(out.argmax.unwrap().to_vec::<u32>().unwrap()[..2], [0, 0]);
            let g = Tensor::full(0.5, &[3], DType::F32, Device::Cpu).unwrap();
            let d = logprob_entropy_from_logits_backward(&logits, &y, 0.9, &out.lse, &out.entropy, &g, &g).unwrap();
            let d = d.to_vec_f32().unwrap();
            assert!(d[..2 * v].iter().all(|x| x.is_nan()), "{dt}: degenerate rows give NaN");
            assert!(d[2 * v..].iter().all(|x| x.is_finite()), "{dt}: other rows unaffected");
        }
    }

    /// Drops a NaN-filled buffer of `bytes` so the caching allocator hands poisoned memory to
    /// the next allocations of that size.
    fn poison(dev: Device, elems: usize) {
        drop(Tensor::full(f64::NAN, &[elems], DType::F32, dev).unwrap());
    }

    #[test]
    fn device_fused_matches_cpu() {
        let Some(dev) = test_cuda_device() else { return };
        let mut rng = Rng::new(17);
        for &(n, hd, v, chunk, rt) in &[
            (37usize, 64usize, 1003usize, 256usize, None),
            (300, 128, 151_936, 8192, Some(128)),
            (1, 8, 5, 4096, None),
        ] {
            for dt in [DType::F32, DType::BF16] {
                let c = case(&mut rng, n, hd, v, dt);
                let (h, w, y) = tensors(&c, n, hd, v, dt, Device::Cpu);
                let (hg, wg, yg) = (h.to_device(dev).unwrap(), w.to_device(dev).unwrap(), y.to_device(dev).unwrap());
                let opts = all_opts(chunk, rt);
                let t = 0.7;
                let want = logprob_entropy(&h, &w, &y, t, &opts).unwrap();
                // Both forward scan versions (v3 per element, v4 grouped) against the CPU.
                for version in [3, 4] {
                    let _v = crate::versions::scoped("logprob_entropy", version);
                    poison(dev, n);
                    let got = logprob_entropy(&hg, &wg, &yg, t, &opts).unwrap();
                    let what = format!("device fused v{version} n{n} h{hd} v{v} {dt}");
                    // GEMM rounding differs from the CPU's; bf16 inputs are exact in both.
                    let tol = 1e-4 * (hd as f64).sqrt();
                    let f64v = |x: &Tensor| to_f64(&x.to_vec_f32().unwrap());
                    assert_close(
                        &got.logp.to_vec_f32().unwrap(),
                        &f64v(&want.logp),
                        tol,
                        1e-5,
                        &format!("{what} logp"),
                    );
                    assert_close(
                        &got.entropy.to_vec_f32().unwrap(),
                        &f64v(&want.entropy),
                        tol,
                        1e-5,
                        &format!("{what} entropy"),
                    );
                    assert_close(&got.lse.to_vec_f32().unwrap(), &f64v(&want.lse), tol, 1e-5, &format!("{what} lse"));
                    let (gr, wr) = (
                        got.rank.unwrap().to_vec::<u32>().unwrap(),
                        want.rank.as_ref().unwrap().to_vec::<u32>().unwrap(),
                    );
                    let (ga, wa) = (
                        got.argmax.unwrap().to_vec::<u32>().unwrap(),
                        want.argmax.as_ref().unwrap().to_vec::<u32>().unwrap(),
                    );
                    // Near-ties resolve differently under different GEMM rounding: at V = 151,936 a
                    // few % of rows have a competitor within ~1e-6 of z_y. Rank may move by a
                    // tie or two there, nowhere else.
                    let rank_off = gr.iter().zip(&wr).filter(|(a, b)| a != b).count();
                    let rank_far = gr.iter().zip(&wr).filter(|(a, b)| a.abs_diff(**b) > 3).count();
                    let amax_off = ga.iter().zip(&wa).filter(|(a, b)| a != b).count();
                    assert!(rank_far == 0 && rank_off * 10 <= n.max(10), "{what}: rank differs in {rank_off}/{n} rows");
                    assert!(amax_off * 50 <= n.max(50), "{what}: argmax differs in {amax_off}/{n} rows");
                }
                let what = format!("device fused n{n} h{hd} v{v} {dt}");
                let f64v = |x: &Tensor| to_f64(&x.to_vec_f32().unwrap());
                let gl = randn(&mut rng, n, 1.0);
                let ge = randn(&mut rng, n, 1.0);
                let (glt, get) = (
                    Tensor::from_slice(&gl, &[n], Device::Cpu).unwrap(),
                    Tensor::from_slice(&ge, &[n], Device::Cpu).unwrap(),
                );
                let (dh, dw) =
                    logprob_entropy_backward(&h, &w, &y, t, &want.lse, &want.entropy, &glt, &get, &opts).unwrap();
                poison(dev, n * hd);
                poison(dev, v * hd);
                let (dhg, dwg) = logprob_entropy_backward(
                    &hg,
                    &wg,
                    &yg,
                    t,
                    &want.lse.to_device(dev).unwrap(),
                    &want.entropy.to_device(dev).unwrap(),
                    &glt.to_device(dev).unwrap(),
                    &get.to_device(dev).unwrap(),
                    &opts,
                )
                .unwrap();
                // bf16 path rounds dz to bf16 before the two GEMMs.
                let gtol = if dt == DType::BF16 { 2e-2 } else { 1e-4 };
                let dh_w = f64v(&dh);
                let scale = dh_w.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-3);
                assert_close(&dhg.to_vec_f32().unwrap(), &dh_w, gtol * scale, gtol, &format!("{what} dh"));
                let dw_w = f64v(&dw);
                let scale = dw_w.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-3);
                assert_close(&dwg.to_vec_f32().unwrap(), &dw_w, gtol * scale, gtol, &format!("{what} dw"));
                // Accumulating variant.
                let base = randn(&mut rng, v * hd, 1.0);
                let acc = Tensor::from_slice(&base, &[v, hd], dev).unwrap();
                logprob_entropy_backward_acc(
                    &hg,
                    &wg,
                    &yg,
                    t,
                    &want.lse.to_device(dev).unwrap(),
                    &want.entropy.to_device(dev).unwrap(),
                    &glt.to_device(dev).unwrap(),
                    &get.to_device(dev).unwrap(),
                    &acc,
                    &opts,
                )
                .unwrap();
                let want_acc: Vec<f64> = dw_w.iter().zip(&base).map(|(a, b)| a + *b as f64).collect();
                assert_close(&acc.to_vec_f32().unwrap(), &want_acc, gtol * scale, gtol, &format!("{what} dw acc"));
            }
        }
    }

    /// Runs the materialised-logits head forward and backward on CPU and on `dev` (outputs
    /// poisoned first) for logits `z` [n × v] and targets `tg`; checks the forward outputs
    /// (non-finite values must match in place) and returns (device d_logits, CPU d_logits).
    #[allow(clippy::too_many_arguments)]
    fn device_from_logits_case(
        dev: Device,
        rng: &mut Rng,
        z: &[f32],
        tg: &[u32],
        v: usize,
        dt: DType,
        t: f32,
        what: &str,
    ) -> (Vec<f32>, Vec<f64>) {
        let n = tg.len();
        let logits = Tensor::from_slice(z, &[n, v], Device::Cpu).unwrap().to_dtype(dt).unwrap();
        let y = Tensor::from_slice(tg, &[n], Device::Cpu).unwrap();
        let opts = all_opts(DEFAULT_CHUNK, None);
        let want = logprob_entropy_from_logits(&logits, &y, t, &opts).unwrap();
        let (lg, yg) = (logits.to_device(dev).unwrap(), y.to_device(dev).unwrap());
        poison(dev, n);
        let got = logprob_entropy_from_logits(&lg, &yg, t, &opts).unwrap();
        let f64v = |x: &Tensor| to_f64(&x.to_vec_f32().unwrap());
        for (name, g, w) in
            [("logp", &got.logp, &want.logp), ("entropy", &got.entropy, &want.entropy), ("lse", &got.lse, &want.lse)]
        {
            assert_close_nonfinite(&g.to_vec_f32().unwrap(), &f64v(w), 2e-5, 1e-5, &format!("{what} {name}"));
        }
        // Same stored logits on both sides: rank and argmax are exact.
        let u32v = |x: Option<Tensor>| x.unwrap().to_vec::<u32>().unwrap();
        assert_eq!(u32v(got.rank), u32v(want.rank), "{what} rank");
        assert_eq!(u32v(got.argmax), u32v(want.argmax), "{what} argmax");

        let gl = Tensor::from_slice(&randn(rng, n, 1.0), &[n], Device::Cpu).unwrap();
        let ge = Tensor::from_slice(&randn(rng, n, 1.0), &[n], Device::Cpu).unwrap();
        let d = logprob_entropy_from_logits_backward(&logits, &y, t, &want.lse, &want.entropy, &gl, &ge).unwrap();
        poison(dev, n * v);
        let on = |x: &Tensor| x.to_device(dev).unwrap();
        let dg =
            logprob_entropy_from_logits_backward(&lg, &yg, t, &on(&want.lse), &on(&want.entropy), &on(&gl), &on(&ge))
                .unwrap();
        (dg.to_vec_f32().unwrap(), f64v(&d))
    }

    #[test]
    fn device_from_logits_matches_cpu() {
        let Some(dev) = test_cuda_device() else { return };
        let mut rng = Rng::new(18);
        for &(n, v) in &[(5usize, 1003usize), (64, 151_936), (3, 1), (7, 4096)] {
            for dt in [DType::F32, DType::BF16] {
                let z = randn(&mut rng, n * v, 3.0);
                let tg: Vec<u32> = (0..n).map(|i| if i == 1 { IGNORE } else { rng.below(v as u64) as u32 }).collect();
                for version in [3, 4] {
                    let _v = crate::versions::scoped("logprob_entropy", version);
                    let what = format!("device from_logits v{version} n{n} v{v} {dt}");
                    let (dg, d) = device_from_logits_case(dev, &mut rng, &z, &tg, v, dt, 1.3, &what);
                    assert_close(&dg, &d, 1e-6, 1e-4 + dt.epsilon(), &format!("{what} d_logits"));
                }
            }
        }
    }

    #[test]
    fn device_from_logits_neg_inf_matches_cpu() {
        let Some(dev) = test_cuda_device() else { return };
        let mut rng = Rng::new(22);
        // V = 1003 takes the scalar loads, 4096 and 5000 the vector loads (v4: whole groups,
        // some all −inf); forward scan versions 3 and 4.
        for (v, version) in [1003usize, 4096, 5000].into_iter().flat_map(|v| [(v, 3), (v, 4)]) {
            let _v = crate::versions::scoped("logprob_entropy", version);
            for dt in [DType::F32, DType::BF16] {
                let (mut z, mut tg) = masked_case(&mut rng, v);
                // Plus two degenerate rows (every logit −inf), one ignored: NaN in the same places.
                z.extend(std::iter::repeat_n(f32::NEG_INFINITY, 2 * v));
                tg.extend([3, IGNORE]);
                let n = tg.len();
                let what = format!("device masked from_logits fwd v{version} V={v} {dt}");
                let (dg, d) = device_from_logits_case(dev, &mut rng, &z, &tg, v, dt, 0.8, &what);
                let live = (n - 2) * v;
                assert!(dg[..live].iter().all(|x| x.is_finite()), "{what}: d_logits not finite");
                for (k, &zk) in z[..live].iter().enumerate() {
                    if zk == f32::NEG_INFINITY && tg[k / v] != (k % v) as u32 {
                        assert_eq!(dg[k], 0.0, "{what}: d_logits[{k}] of a masked logit");
                    }
                }
                assert_close_nonfinite(&dg, &d, 1e-6, 1e-4 + dt.epsilon(), &format!("{what} d_logits"));
            }
        }
    }
}
