//! Fused AdamW step over flat parameter buffers, with PyTorch's `torch.optim.AdamW` semantics:
//!
//! ```text
//! g = grad_scale · grad
//! p ← p − lr·wd·p                       (decoupled weight decay, applied first)
//! m ← β1·m + (1−β1)·g
//! v ← β2·v + (1−β2)·g²
//! p ← p − lr · m̂ / (sqrt(v̂) + eps),    m̂ = m / (1−β1^t),  v̂ = v / (1−β2^t)
//! ```
//!
//! Master weights `p` and moments `m`, `v` are f32; the gradient is f32 or bf16; an optional
//! bf16 tensor receives the updated weights (rounded to nearest even) in the same pass, so the
//! model's bf16 copy needs no separate cast. `t` is the 1-based step (PyTorch increments its
//! `step` before the update). `grad_scale` folds the clip factor ([`crate::global_norm::clip_scale`])
//! and gradient-accumulation averaging into the same pass.
//!
//! API choice: the optimizer state lives in a few flat buffers (one tensor each for p, m, v,
//! grads), and the model's parameters are ranges of them. [`adamw_step_segments`] takes those
//! ranges as [`Segment`]s with a per-segment decay flag (off for norms and biases), so one call
//! updates everything; adjacent segments with the same flag are merged, so a layout that puts
//! decayed parameters first and the rest after costs two kernel launches. Elements outside every
//! segment are left untouched (frozen). [`adamw_step`] is the one-segment form with an explicit
//! decay value. The per-step scalars (bias corrections) are computed in f64 on the host
//! ([`AdamW::step_consts`]); the element math is f32 on both devices, in the same order.

use rayon::prelude::*;
use smelt_engine::{bf16, DType, Device, Error, Result, Tensor};

use crate::cast::cpu::CastElem;

crate::kernel_source!("adamw");

/// AdamW hyperparameters. Defaults are PyTorch's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay for segments whose `decay` flag is set.
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// The scalars one step's kernel uses (see the module formula).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepConsts {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1 − lr·wd.
    pub decay: f32,
    /// lr / (1 − β1^t).
    pub step_size: f32,
    /// 1 / sqrt(1 − β2^t).
    pub inv_bc2_sqrt: f32,
    pub grad_scale: f32,
}

impl AdamW {
    /// The kernel scalars for 1-based step `step` with decay `weight_decay`, in f64 then
    /// rounded to f32. Fails on step 0 or hyperparameters PyTorch would reject.
    pub fn step_consts(&self, step: u64, weight_decay: f32, grad_scale: f32) -> Result<StepConsts> {
        let bad = |what: &str| Err(Error::msg(format!("adamw: {what} (config {self:?}, step {step})")));
        if step == 0 {
            return bad("step is 1-based; got 0");
        }
        if !(self.lr >= 0.0 && self.lr.is_finite() && self.eps >= 0.0 && self.eps.is_finite()) {
            return bad("lr and eps must be finite and non-negative");
        }
        if !((0.0..1.0).contains(&self.beta1) && (0.0..1.0).contains(&self.beta2)) {
            return bad("betas must be in [0, 1)");
        }
        if !(weight_decay >= 0.0 && weight_decay.is_finite() && grad_scale.is_finite()) {
            return bad(&format!("weight decay {weight_decay} and grad_scale {grad_scale} must be finite, decay >= 0"));
        }
        let (lr, t) = (self.lr as f64, step as f64);
        let bc1 = 1.0 - (self.beta1 as f64).powf(t);
        let bc2 = 1.0 - (self.beta2 as f64).powf(t);
        Ok(StepConsts {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            decay: (1.0 - lr * weight_decay as f64) as f32,
            step_size: (lr / bc1) as f32,
            inv_bc2_sqrt: (1.0 / bc2.sqrt()) as f32,
            grad_scale,
        })
    }
}

/// A range `start..start+len` of the flat buffers, with or without weight decay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
    /// Apply `AdamW::weight_decay` (false for norms and biases).
    pub decay: bool,
}

/// One AdamW step over whole tensors, in place: `params`, `m`, `v` f32, `grads` f32 or bf16,
/// all with the same element count on one device, each its own storage. `weight_decay` is used
/// instead of `cfg.weight_decay` (0 for norms and biases). `bf16_out`, when given, receives
/// bf16(updated params).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    params: &Tensor,
    grads: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: u64,
    cfg: &AdamW,
    weight_decay: f32,
    grad_scale: f32,
    bf16_out: Option<&Tensor>,
) -> Result<()> {
    let k = cfg.step_consts(step, weight_decay, grad_scale)?;
    check(params, grads, m, v, bf16_out)?;
    run(params, grads, m, v, bf16_out, &[(0, params.elem_count(), k)])
}

/// One AdamW step over the given segments of flat buffers (see the module docs). Segments must
/// be sorted by `start`, must not overlap and must lie inside the buffers; elements outside
/// every segment are not touched. Decayed segments use `cfg.weight_decay`, the others 0.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_segments(
    params: &Tensor,
    grads: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: u64,
    cfg: &AdamW,
    segments: &[Segment],
    grad_scale: f32,
    bf16_out: Option<&Tensor>,
) -> Result<()> {
    let with = cfg.step_consts(step, cfg.weight_decay, grad_scale)?;
    let without = cfg.step_consts(step, 0.0, grad_scale)?;
    check(params, grads, m, v, bf16_out)?;
    let n = params.elem_count();
    let mut runs: Vec<(usize, usize, bool)> = Vec::with_capacity(segments.len());
    let mut end = 0usize;
    for (i, s) in segments.iter().enumerate() {
        let s_end = s.start.checked_add(s.len).filter(|&e| e <= n);
        let Some(s_end) = s_end.filter(|_| s.start >= end) else {
            return Err(Error::shape(
                "adamw",
                format!("segment {i} {s:?} overlaps the previous one, is out of order, or exceeds {n} elements"),
            ));
        };
        end = s_end;
        if s.len == 0 {
            continue;
        }
        match runs.last_mut() {
            Some((st, len, d)) if *st + *len == s.start && *d == s.decay => *len += s.len,
            _ => runs.push((s.start, s.len, s.decay)),
        }
    }
    let runs: Vec<(usize, usize, StepConsts)> =
        runs.into_iter().map(|(st, len, d)| (st, len, if d { with } else { without })).collect();
    run(params, grads, m, v, bf16_out, &runs)
}

/// One tensor's AdamW state, for [`AdamwGroup`].
#[derive(Clone)]
pub struct AdamwTensor {
    /// f32 master weights, updated in place.
    pub param: Tensor,
    /// f32 or bf16 gradient.
    pub grad: Tensor,
    pub m: Tensor,
    pub v: Tensor,
    /// Receives bf16(updated param) when given.
    pub bf16_out: Option<Tensor>,
    /// Apply `AdamW::weight_decay` (false for norms and biases).
    pub decay: bool,
}

/// Many tensors (a model's parameters) updated by one AdamW step: on CUDA with f32 gradients
/// in a single launch (`adamw_multi_f32`) over a table of their addresses uploaded once, as
/// PyTorch's fused optimizers and apex's multi_tensor_apply do, instead of a launch per tensor
/// (~300 for a Qwen model, most of them for small norm and bias vectors). Elsewhere tensor by
/// tensor. The group keeps its tensors (their addresses are in the table).
pub struct AdamwGroup {
    tensors: Vec<AdamwTensor>,
    /// CUDA: the u64 table (8 per tensor, see `adamw.cu`) as u32 pairs, and the chunk count.
    table: Option<(Tensor, u64)>,
}

/// Elements per chunk of `adamw_multi_f32` (`ADAMW_CHUNK` in adamw.cu).
#[cfg(feature = "cuda")]
const MULTI_CHUNK: usize = 4096;

impl AdamwGroup {
    /// Checks every tensor's state (as [`adamw_step`] does) and, on CUDA with f32 gradients,
    /// uploads the address table. All tensors must be on one device.
    pub fn new(tensors: Vec<AdamwTensor>) -> Result<AdamwGroup> {
        for (i, t) in tensors.iter().enumerate() {
            check(&t.param, &t.grad, &t.m, &t.v, t.bf16_out.as_ref())
                .map_err(|e| Error::msg(format!("adamw group, tensor {i}: {e}")))?;
            if t.param.device() != tensors[0].param.device() {
                return Err(Error::DeviceMismatch {
                    op: "adamw group",
                    a: tensors[0].param.device(),
                    b: t.param.device(),
                });
            }
        }
        // One launch needs CUDA tensors (only the cuda feature makes any) and f32 gradients.
        #[cfg(feature = "cuda")]
        let table = match tensors.first() {
            Some(t) if !t.param.device().is_cpu() && tensors.iter().all(|t| t.grad.dtype() == DType::F32) => {
                Some(Self::table(&tensors)?)
            }
            _ => None,
        };
        #[cfg(not(feature = "cuda"))]
        let table = None;
        Ok(AdamwGroup { tensors, table })
    }

    #[cfg(feature = "cuda")]
    fn table(tensors: &[AdamwTensor]) -> Result<(Tensor, u64)> {
        let mut words: Vec<u32> = Vec::with_capacity(tensors.len() * 16);
        let mut chunks = 0u64;
        for t in tensors {
            let n = t.param.elem_count();
            let out = t.bf16_out.as_ref().map(|o| o.cuda_ptr()).transpose()?.unwrap_or(0);
            let row = [
                t.param.cuda_ptr()?,
                t.m.cuda_ptr()?,
                t.v.cuda_ptr()?,
                t.grad.cuda_ptr()?,
                out,
                n as u64,
                t.decay as u64,
                chunks,
            ];
            words.extend(row.iter().flat_map(|&x| [x as u32, (x >> 32) as u32]));
            chunks += n.div_ceil(MULTI_CHUNK) as u64;
        }
        let device = tensors[0].param.device();
        Ok((Tensor::from_slice(&words, &[words.len()], device)?, chunks))
    }

    pub fn tensors(&self) -> &[AdamwTensor] {
        &self.tensors
    }

    /// One AdamW step (1-based `step`) over every tensor; decayed ones use `cfg.weight_decay`.
    pub fn step(&self, step: u64, cfg: &AdamW, grad_scale: f32) -> Result<()> {
        let with = cfg.step_consts(step, cfg.weight_decay, grad_scale)?;
        let without = cfg.step_consts(step, 0.0, grad_scale)?;
        match &self.table {
            // Version 2: one launch for the group; 1: a launch per tensor (`SMELT_KERNEL_VERSIONS`
            // can cap "adamw" at 1).
            #[cfg(feature = "cuda")]
            Some((table, chunks)) if crate::versions::pick("adamw", &[1, 2])? == 2 => {
                cuda::adamw_multi(table, self.tensors.len(), *chunks, &with, &without)
            }
            _ => {
                for t in &self.tensors {
                    let k = if t.decay { with } else { without };
                    run(&t.param, &t.grad, &t.m, &t.v, t.bf16_out.as_ref(), &[(0, t.param.elem_count(), k)])?;
                }
                Ok(())
            }
        }
    }
}

fn check(params: &Tensor, grads: &Tensor, m: &Tensor, v: &Tensor, out: Option<&Tensor>) -> Result<()> {
    for t in [params, m, v] {
        if t.dtype() != DType::F32 {
            return Err(Error::DType { op: "adamw", expected: DType::F32, got: t.dtype() });
        }
    }
    if !matches!(grads.dtype(), DType::F32 | DType::BF16) {
        return Err(Error::UnsupportedDType { op: "adamw (grads)", dtype: grads.dtype() });
    }
    if let Some(o) = out {
        if o.dtype() != DType::BF16 {
            return Err(Error::DType { op: "adamw (bf16_out)", expected: DType::BF16, got: o.dtype() });
        }
    }
    let all: Vec<&Tensor> = [params, grads, m, v].into_iter().chain(out).collect();
    let n = params.elem_count();
    if all.iter().any(|t| t.elem_count() != n) {
        let shapes: Vec<&[usize]> = all.iter().map(|t| t.shape()).collect();
        return Err(Error::shape("adamw", format!("params, grads, m, v[, bf16_out] sizes differ: {shapes:?}")));
    }
    for t in &all {
        if t.device() != params.device() {
            return Err(Error::DeviceMismatch { op: "adamw", a: params.device(), b: t.device() });
        }
    }
    for (i, a) in all.iter().enumerate() {
        if all[i + 1..].iter().any(|b| a.same_storage(b)) {
            return Err(Error::msg("adamw: params, grads, m, v and bf16_out must each have their own storage"));
        }
    }
    Ok(())
}

/// Runs the update over `(start, len, consts)` segments (disjoint, in range).
fn run(
    params: &Tensor,
    grads: &Tensor,
    m: &Tensor,
    v: &Tensor,
    out: Option<&Tensor>,
    segs: &[(usize, usize, StepConsts)],
) -> Result<()> {
    match params.device() {
        Device::Cpu => match grads.dtype() {
            DType::F32 => run_cpu::<f32>(params, grads, m, v, out, segs),
            DType::BF16 => run_cpu::<bf16>(params, grads, m, v, out, segs),
            dt => Err(Error::UnsupportedDType { op: "adamw (grads)", dtype: dt }),
        },
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::adamw(ord, params, grads, m, v, out, segs),
        #[cfg(not(feature = "cuda"))]
        d => Err(Error::UnsupportedDevice { op: "adamw", device: d }),
    }
}

fn run_cpu<G: CastElem>(
    params: &Tensor,
    grads: &Tensor,
    m: &Tensor,
    v: &Tensor,
    out: Option<&Tensor>,
    segs: &[(usize, usize, StepConsts)],
) -> Result<()> {
    let (mut p, mut mm, mut vv) = (params.cpu_write::<f32>()?, m.cpu_write::<f32>()?, v.cpu_write::<f32>()?);
    let g = grads.cpu_read::<G>()?;
    let mut o = out.map(|o| o.cpu_write::<bf16>()).transpose()?;
    for &(s, len, k) in segs {
        let r = s..s + len;
        let o = o.as_mut().map(|o| &mut o[r.clone()]);
        cpu::adamw(&mut p[r.clone()], &mut mm[r.clone()], &mut vv[r.clone()], &g[r], o, &k);
    }
    Ok(())
}

/// Slice-level CPU implementations (the reference for the CUDA kernels).
pub mod cpu {
    use super::*;

    const CHUNK: usize = 1 << 13;

    /// One element, in exactly the CUDA kernel's order of f32 operations.
    #[inline(always)]
    pub fn update(p: f32, m: &mut f32, v: &mut f32, g: f32, k: &StepConsts) -> f32 {
        let g = g * k.grad_scale;
        *m = k.beta1 * *m + (1.0 - k.beta1) * g;
        *v = k.beta2 * *v + (1.0 - k.beta2) * (g * g);
        let denom = v.sqrt() * k.inv_bc2_sqrt + k.eps;
        p * k.decay - k.step_size * (*m / denom)
    }

    fn chunk<G: CastElem>(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[G], k: &StepConsts) {
        for (((p, m), v), g) in p.iter_mut().zip(m).zip(v).zip(g) {
            *p = update(*p, m, v, g.to_f32(), k);
        }
    }

    /// The AdamW update in place over equal-length slices; `out[i] = bf16(p[i])` when given.
    pub fn adamw<G: CastElem>(
        p: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        g: &[G],
        out: Option<&mut [bf16]>,
        k: &StepConsts,
    ) {
        debug_assert!(m.len() == p.len() && v.len() == p.len() && g.len() == p.len());
        smelt_engine::cpu::pool().install(|| {
            let it = p.par_chunks_mut(CHUNK).zip(m.par_chunks_mut(CHUNK)).zip(v.par_chunks_mut(CHUNK));
            let it = it.zip(g.par_chunks(CHUNK));
            match out {
                None => it.for_each(|(((p, m), v), g)| chunk(p, m, v, g, k)),
                Some(out) => it.zip(out.par_chunks_mut(CHUNK)).for_each(|((((p, m), v), g), o)| {
                    chunk(p, m, v, g, k);
                    for (o, p) in o.iter_mut().zip(p.iter()) {
                        *o = bf16::from_f32(*p);
                    }
                }),
            }
        })
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{launch, Arg, LaunchCfg};

    pub fn adamw_multi(
        table: &Tensor,
        tensors: usize,
        chunks: u64,
        with: &StepConsts,
        without: &StepConsts,
    ) -> Result<()> {
        let Device::Cuda(ord) = table.device() else { unreachable!("a CUDA table") };
        if chunks == 0 {
            return Ok(());
        }
        let grid = chunks.min(132 * 8) as u32;
        let cfg = LaunchCfg { grid: (grid, 1, 1), block: (256, 1, 1), smem: 0 };
        let args = [
            Arg::Ptr(table.cuda_ptr()?),
            Arg::U32(tensors as u32),
            Arg::U64(chunks),
            Arg::F32(with.beta1),
            Arg::F32(with.beta2),
            Arg::F32(with.eps),
            Arg::F32(with.decay),
            Arg::F32(without.decay),
            Arg::F32(with.step_size),
            Arg::F32(with.inv_bc2_sqrt),
            Arg::F32(with.grad_scale),
        ];
        launch(ord, &SRC, "adamw_multi_f32", cfg, &args)
    }

    pub fn adamw(
        ord: usize,
        params: &Tensor,
        grads: &Tensor,
        m: &Tensor,
        v: &Tensor,
        out: Option<&Tensor>,
        segs: &[(usize, usize, StepConsts)],
    ) -> Result<()> {
        let gsz = grads.dtype().size_in_bytes() as u64;
        let (pp, pm, pv, pg) = (params.cuda_ptr()?, m.cuda_ptr()?, v.cuda_ptr()?, grads.cuda_ptr()?);
        let po = out.map(|o| o.cuda_ptr()).transpose()?;
        for &(start, len, k) in segs {
            if len == 0 {
                continue;
            }
            let (s, n) = (start as u64, len as u64);
            let (p, mm, vv, g) = (pp + 4 * s, pm + 4 * s, pv + 4 * s, pg + gsz * s);
            let o = po.map(|o| o + 2 * s).unwrap_or(0);
            // Vector path: float4 for p, m, v (and f32 grads); 8-byte accesses of bf16.
            let vec4 = [p, mm, vv].iter().all(|x| x % 16 == 0) && g % (4 * gsz) == 0 && o % 8 == 0;
            let name = format!("adamw_{}{}", grads.dtype().name(), if vec4 { "_v4" } else { "" });
            let count = if vec4 { n / 4 } else { n };
            let block = 256u32;
            let grid = count.div_ceil(block as u64).clamp(1, 132 * 16) as u32;
            let cfg = LaunchCfg { grid: (grid, 1, 1), block: (block, 1, 1), smem: 0 };
            let args = [
                Arg::Ptr(p),
                Arg::Ptr(mm),
                Arg::Ptr(vv),
                Arg::Ptr(g),
                Arg::Ptr(o),
                Arg::U64(n),
                Arg::F32(k.beta1),
                Arg::F32(k.beta2),
                Arg::F32(k.eps),
                Arg::F32(k.decay),
                Arg::F32(k.step_size),
                Arg::F32(k.inv_bc2_sqrt),
                Arg::F32(k.grad_scale),
            ];
            launch(ord, &SRC, &name, cfg, &args)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use smelt_engine::Rng;

    struct State {
        p: Vec<f32>,
        m: Vec<f32>,
        v: Vec<f32>,
    }

    fn state(rng: &mut Rng, n: usize, warm: bool) -> State {
        let p = randn(rng, n, 1.0);
        // A resumed run has non-zero moments (v > 0); a fresh one starts at zero.
        let (m, v) = if warm {
            (randn(rng, n, 0.1), randn(rng, n, 0.1).iter().map(|x| x * x + 1e-6).collect())
        } else {
            (vec![0.0; n], vec![0.0; n])
        };
        State { p, m, v }
    }

    /// PyTorch AdamW in f64, from `first_step` on, one gradient per step.
    fn reference(s: &State, grads: &[Vec<f32>], first_step: u64, cfg: &AdamW, wd: f32, gs: f32) -> [Vec<f64>; 3] {
        let (mut p, mut m, mut v) = (to_f64(&s.p), to_f64(&s.m), to_f64(&s.v));
        let (lr, b1, b2, eps, wd, gs) =
            (cfg.lr as f64, cfg.beta1 as f64, cfg.beta2 as f64, cfg.eps as f64, wd as f64, gs as f64);
        for (i, grad) in grads.iter().enumerate() {
            let t = (first_step + i as u64) as i32;
            for j in 0..p.len() {
                let g = gs * grad[j] as f64;
                p[j] -= lr * wd * p[j];
                m[j] = b1 * m[j] + (1.0 - b1) * g;
                v[j] = b2 * v[j] + (1.0 - b2) * g * g;
                let mh = m[j] / (1.0 - b1.powi(t));
                let vh = v[j] / (1.0 - b2.powi(t));
                p[j] -= lr * mh / (vh.sqrt() + eps);
            }
        }
        [p, m, v]
    }

    fn tensors(s: &State, device: Device) -> [Tensor; 3] {
        let n = s.p.len();
        [&s.p, &s.m, &s.v].map(|x| Tensor::from_slice(x, &[n], device).unwrap())
    }

    #[test]
    fn matches_f64_reference_over_steps() {
        let mut rng = Rng::new(31);
        let cfg = AdamW { lr: 1e-2, weight_decay: 0.1, ..AdamW::default() };
        let n = 1037;
        for (steps, first, warm) in [(1usize, 1u64, false), (2, 1, false), (10, 1, false), (3, 7, true)] {
            for (wd, gs, gdt) in [(0.1f32, 1.0f32, DType::F32), (0.0, 0.37, DType::F32), (0.1, 0.5, DType::BF16)] {
                let s = state(&mut rng, n, warm);
                let [p, m, v] = tensors(&s, Device::Cpu);
                let out = Tensor::full(-7.0, &[n], DType::BF16, Device::Cpu).unwrap();
                let mut gs_used = Vec::new();
                for i in 0..steps {
                    let g =
                        Tensor::from_slice(&randn(&mut rng, n, 1.0), &[n], Device::Cpu).unwrap().to_dtype(gdt).unwrap();
                    gs_used.push(g.to_vec_f32().unwrap());
                    adamw_step(&p, &g, &m, &v, first + i as u64, &cfg, wd, gs, Some(&out)).unwrap();
                }
                let [wp, wm, wv] = reference(&s, &gs_used, first, &cfg, wd, gs);
                let what = format!("steps={steps} from {first} wd={wd} gs={gs} grads {gdt}");
                assert_close(&p.to_vec().unwrap(), &wp, 2e-6, 1e-6, &format!("p {what}"));
                assert_close(&m.to_vec().unwrap(), &wm, 1e-7, 1e-5, &format!("m {what}"));
                assert_close(&v.to_vec().unwrap(), &wv, 1e-10, 1e-5, &format!("v {what}"));
                let want_out: Vec<bf16> = p.to_vec::<f32>().unwrap().iter().map(|&x| bf16::from_f32(x)).collect();
                assert_eq!(out.to_vec::<bf16>().unwrap(), want_out, "bf16 copy {what}");
            }
        }
    }

    #[test]
    fn first_step_moves_each_weight_by_about_lr() {
        // Step 1 from zero moments: m̂ = g, v̂ = g², so p ← p(1 − lr·wd) − lr·g/(|g| + eps).
        let cfg = AdamW::default();
        let p = Tensor::from_slice(&[1.0f32, -2.0, 0.5], &[3], Device::Cpu).unwrap();
        let g = Tensor::from_slice(&[0.3f32, -4.0, 1e-3], &[3], Device::Cpu).unwrap();
        let (m, v) = (
            Tensor::zeros(&[3], DType::F32, Device::Cpu).unwrap(),
            Tensor::zeros(&[3], DType::F32, Device::Cpu).unwrap(),
        );
        adamw_step(&p, &g, &m, &v, 1, &cfg, cfg.weight_decay, 1.0, None).unwrap();
        let want: Vec<f64> = [(1.0f64, 0.3f64), (-2.0, -4.0), (0.5, 1e-3)]
            .iter()
            .map(|&(p, g)| p * (1.0 - 1e-3 * 0.01) - 1e-3 * g / (g.abs() + 1e-8))
            .collect();
        assert_close(&p.to_vec().unwrap(), &want, 1e-7, 1e-6, "first step");
    }

    #[test]
    fn segments_decay_per_flag_and_leave_gaps_untouched() {
        let mut rng = Rng::new(32);
        let cfg = AdamW { lr: 5e-3, weight_decay: 0.2, ..AdamW::default() };
        let n = 300;
        let segs = [
            Segment { start: 0, len: 100, decay: true },
            Segment { start: 100, len: 33, decay: true },
            Segment { start: 133, len: 67, decay: false },
            // 200..250 is frozen.
            Segment { start: 250, len: 0, decay: false },
            Segment { start: 250, len: 50, decay: true },
        ];
        let s = state(&mut rng, n, true);
        let [p, m, v] = tensors(&s, Device::Cpu);
        let gv = randn(&mut rng, n, 1.0);
        let g = Tensor::from_slice(&gv, &[n], Device::Cpu).unwrap();
        adamw_step_segments(&p, &g, &m, &v, 4, &cfg, &segs, 0.8, None).unwrap();
        let (gp, gm, gvv) = (p.to_vec::<f32>().unwrap(), m.to_vec::<f32>().unwrap(), v.to_vec::<f32>().unwrap());
        for (r, wd) in [(0..133, 0.2f32), (133..200, 0.0), (250..300, 0.2)] {
            let sub = State { p: s.p[r.clone()].to_vec(), m: s.m[r.clone()].to_vec(), v: s.v[r.clone()].to_vec() };
            let [wp, wm, wv] = reference(&sub, &[gv[r.clone()].to_vec()], 4, &cfg, wd, 0.8);
            assert_close(&gp[r.clone()], &wp, 2e-6, 1e-6, &format!("p {r:?}"));
            assert_close(&gm[r.clone()], &wm, 1e-7, 1e-5, &format!("m {r:?}"));
            assert_close(&gvv[r.clone()], &wv, 1e-10, 1e-5, &format!("v {r:?}"));
        }
        assert_eq!(&gp[200..250], &s.p[200..250]);
        assert_eq!(&gm[200..250], &s.m[200..250]);
        assert_eq!(&gvv[200..250], &s.v[200..250]);

        let overlap = [Segment { start: 0, len: 10, decay: true }, Segment { start: 5, len: 10, decay: false }];
        assert!(adamw_step_segments(&p, &g, &m, &v, 5, &cfg, &overlap, 1.0, None).is_err());
        let outside = [Segment { start: 290, len: 11, decay: true }];
        let e = adamw_step_segments(&p, &g, &m, &v, 5, &cfg, &outside, 1.0, None).unwrap_err().to_string();
        assert!(e.contains("adamw") && e.contains("300"), "{e}");
    }

    #[test]
    fn invalid_inputs_are_errors() {
        let cfg = AdamW::default();
        let t = |n: usize, dt: DType| Tensor::zeros(&[n], dt, Device::Cpu).unwrap();
        let (p, g, m, v) = (t(8, DType::F32), t(8, DType::F32), t(8, DType::F32), t(8, DType::F32));
        assert!(adamw_step(&p, &g, &m, &v, 0, &cfg, 0.0, 1.0, None).is_err(), "step 0");
        let e = adamw_step(&p, &t(9, DType::F32), &m, &v, 1, &cfg, 0.0, 1.0, None).unwrap_err().to_string();
        assert!(e.contains("adamw") && e.contains("[9]"), "{e}");
        assert!(adamw_step(&p, &g, &t(8, DType::BF16), &v, 1, &cfg, 0.0, 1.0, None).is_err(), "bf16 moments");
        assert!(adamw_step(&p, &t(8, DType::F16), &m, &v, 1, &cfg, 0.0, 1.0, None).is_err(), "f16 grads");
        assert!(adamw_step(&p, &g, &m, &v, 1, &cfg, 0.0, 1.0, Some(&t(8, DType::F32))).is_err(), "f32 out");
        assert!(adamw_step(&p, &g, &m, &m, 1, &cfg, 0.0, 1.0, None).is_err(), "aliased m and v");
        let bad = AdamW { beta2: 1.0, ..cfg };
        assert!(adamw_step(&p, &g, &m, &v, 1, &bad, 0.0, 1.0, None).is_err(), "beta2 = 1");
        assert!(adamw_step(&p, &g, &m, &v, 1, &cfg, 0.0, f32::NAN, None).is_err(), "NaN grad_scale");
    }

    #[test]
    fn device_matches_cpu() {
        let Some(dev) = test_cuda_device() else { return };
        let mut rng = Rng::new(33);
        let cfg = AdamW { lr: 1e-2, weight_decay: 0.1, ..AdamW::default() };
        for n in [1usize, 3, 4, 5, 1023, (1 << 20) + 3] {
            for gdt in [DType::F32, DType::BF16] {
                for (with_out, offset) in [(true, false), (false, false), (true, true)] {
                    let s = state(&mut rng, n + 1, true);
                    let [cp, cm, cv] = tensors(&s, Device::Cpu);
                    let [dp, dm, dv] = tensors(&s, dev);
                    let gv = Tensor::from_slice(&randn(&mut rng, n + 1, 1.0), &[n + 1], Device::Cpu).unwrap();
                    let (cg, dg) = (gv.to_dtype(gdt).unwrap(), gv.to_dtype(gdt).unwrap().to_device(dev).unwrap());
                    let co = Tensor::full(-7.0, &[n + 1], DType::BF16, Device::Cpu).unwrap();
                    let dout = Tensor::full(-7.0, &[n + 1], DType::BF16, dev).unwrap();
                    // Offset views (one element in) take the scalar path; aligned ones the vector path.
                    let start = usize::from(offset);
                    let view = |t: &Tensor| t.narrow_rows(start, n).unwrap();
                    for step in 1..=3u64 {
                        let (oc, od) = (with_out.then(|| view(&co)), with_out.then(|| view(&dout)));
                        let segs = [
                            Segment { start: 0, len: n / 2, decay: true },
                            Segment { start: n / 2, len: n - n / 2, decay: false },
                        ];
                        adamw_step_segments(
                            &view(&cp),
                            &view(&cg),
                            &view(&cm),
                            &view(&cv),
                            step,
                            &cfg,
                            &segs,
                            0.7,
                            oc.as_ref(),
                        )
                        .unwrap();
                        adamw_step_segments(
                            &view(&dp),
                            &view(&dg),
                            &view(&dm),
                            &view(&dv),
                            step,
                            &cfg,
                            &segs,
                            0.7,
                            od.as_ref(),
                        )
                        .unwrap();
                    }
                    let what = format!("n={n} grads {gdt} out={with_out} offset={offset}");
                    for (c, d, name) in [(&cp, &dp, "p"), (&cm, &dm, "m"), (&cv, &dv, "v")] {
                        let want = to_f64(&c.to_vec::<f32>().unwrap());
                        assert_close(&d.to_vec::<f32>().unwrap(), &want, 1e-7, 1e-5, &format!("{name} {what}"));
                    }
                    let want = to_f64(&co.to_vec_f32().unwrap());
                    assert_close(
                        &dout.to_vec_f32().unwrap(),
                        &want,
                        0.0,
                        DType::BF16.epsilon(),
                        &format!("bf16 out {what}"),
                    );
                }
            }
        }
    }

    /// A group's tensors: odd sizes (several chunks, one element, exactly one chunk, empty),
    /// decayed or not, with and without a bf16 copy, aligned and offset by one element (the
    /// scalar path), as views into a few shared buffers. Returns them and the buffers.
    fn group_state(rng: &mut Rng, device: Device) -> (Vec<AdamwTensor>, Vec<Tensor>) {
        let sizes = [9000usize, 1, 4096, 0, 4101, 37];
        let total: usize = sizes.iter().map(|n| n + 1).sum();
        let s = state(rng, total, true);
        let [p, m, v] = tensors(&s, device);
        let g = Tensor::from_slice(&randn(rng, total, 1.0), &[total], device).unwrap();
        let out = Tensor::full(-7.0, &[total], DType::BF16, device).unwrap();
        let mut at = 0;
        let mut ts = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let start = at + i % 2;
            let view = |t: &Tensor| t.narrow_rows(start, n).unwrap();
            ts.push(AdamwTensor {
                param: view(&p),
                grad: view(&g),
                m: view(&m),
                v: view(&v),
                bf16_out: (i % 3 != 1).then(|| view(&out)),
                decay: i % 2 == 0,
            });
            at += n + 1;
        }
        (ts, vec![p, m, v, out])
    }

    /// On CPU a group is its tensors' `adamw_step`s, bit for bit.
    #[test]
    fn group_equals_its_tensors_steps() {
        let cfg = AdamW { lr: 1e-2, weight_decay: 0.1, ..AdamW::default() };
        let (group, bufs) = group_state(&mut Rng::new(35), Device::Cpu);
        let (each, each_bufs) = group_state(&mut Rng::new(35), Device::Cpu);
        let group = AdamwGroup::new(group).unwrap();
        for step in 1..=2 {
            group.step(step, &cfg, 0.6).unwrap();
            for t in &each {
                let wd = if t.decay { cfg.weight_decay } else { 0.0 };
                adamw_step(&t.param, &t.grad, &t.m, &t.v, step, &cfg, wd, 0.6, t.bf16_out.as_ref()).unwrap();
            }
        }
        for (a, b) in bufs.iter().zip(&each_bufs) {
            assert_eq!(a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
        }
        let bad = AdamwTensor { m: Tensor::zeros(&[3], DType::F32, Device::Cpu).unwrap(), ..each[0].clone() };
        let e = AdamwGroup::new(vec![each[1].clone(), bad]).err().expect("mismatched sizes");
        assert!(e.to_string().contains("tensor 1"), "{e}");
    }

    /// One launch for the whole group on CUDA (the gaps between the views stay untouched).
    #[test]
    fn device_group_matches_cpu() {
        let Some(dev) = test_cuda_device() else { return };
        let cfg = AdamW { lr: 1e-2, weight_decay: 0.1, ..AdamW::default() };
        let (cpu, cpu_bufs) = group_state(&mut Rng::new(36), Device::Cpu);
        let (gpu, gpu_bufs) = group_state(&mut Rng::new(36), dev);
        let (cpu, gpu) = (AdamwGroup::new(cpu).unwrap(), AdamwGroup::new(gpu).unwrap());
        // Steps 1 and 3 in one launch, step 2 a launch per tensor (version 1).
        for step in 1..=3 {
            cpu.step(step, &cfg, 0.6).unwrap();
            let _v = crate::versions::scoped("adamw", if step == 2 { 1 } else { 2 });
            gpu.step(step, &cfg, 0.6).unwrap();
        }
        for ((c, d), name) in cpu_bufs.iter().zip(&gpu_bufs).zip(["p", "m", "v", "bf16 out"]) {
            let want = to_f64(&c.to_vec_f32().unwrap());
            let tol = if name == "bf16 out" { DType::BF16.epsilon() } else { 1e-5 };
            assert_close(&d.to_vec_f32().unwrap(), &want, 1e-7, tol, &format!("group {name}"));
        }
    }
}
