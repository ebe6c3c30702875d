//! RMSNorm over the last dimension, exactly as Hugging Face's `Qwen2RMSNorm` / `Qwen3RMSNorm`:
//! `rstd = 1/sqrt(mean(x²) + eps)` computed in f32, `y = w · (x·rstd)`.
//!
//! In a bf16 model HF casts the normalised `x·rstd` back to bf16 before multiplying by the
//! weight, and the product is rounded to bf16 again; we do the same for bf16 `x`, so a bf16
//! forward matches HF's rounding order. f32 `x` has no intermediate rounding.
//!
//! Per-head use (Qwen3's `q_norm` / `k_norm` over head_dim) is the same op on `x` reshaped to
//! `[tokens·heads, head_dim]` — only the caller's view changes.
//!
//! Backward ([`rmsnorm_backward`]): with n = x·rstd and dn = dy·w,
//! `dx = rstd·dn − x·rstd³·Σ(dn·x)/D` and `dw = Σ_rows dy·n` (f32). The straight-through
//! treatment of the bf16 intermediate rounding is the usual one.
//!
//! Dtypes: `x`/`y`/`dy`/`dx` f32 or bf16; `w` f32 or bf16 (independently of `x`); `rstd` and
//! `dw` always f32. Both the CPU and CUDA `dw` reductions are deterministic (fixed-order partial
//! sums over fixed row chunks, then an ordered sum of the partials).
//!
//! CUDA kernel versions (thread mappings in `rmsnorm.cu`; pin one with
//! `crate::versions::force("rmsnorm", ..)`, which applies to the forward and the backward):
//! v1 warp per row with scalar loads (any row), v2 the same with 16-byte loads (rows of whole
//! 16-byte chunks, aligned), v3 (the default where it fits) the row held in registers — rows
//! of v2's kind up to 4096 bf16 / 2048 f32 — plus faster dw kernels. v3 gives v2's bits; dw has
//! the same bits in every version.

use rayon::prelude::*;
use smelt_engine::{bf16, DType, Device, Error, Result, Tensor, WithDType};

crate::kernel_source!("rmsnorm");

/// `(y, rstd)`: `y` has the shape and dtype of `x` (`[.., D]`); `rstd` is `[rows]` f32 (rows =
/// product of the leading dims), kept for the backward.
pub fn rmsnorm(x: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let (rows, d) = check("rmsnorm", x, w)?;
    let y = Tensor::empty(x.shape(), x.dtype(), x.device())?;
    let rstd = Tensor::empty(&[rows], DType::F32, x.device())?;
    match x.device() {
        Device::Cpu => {
            fn go<T: WithDType, W: WithDType>(x: &Tensor, w: &Tensor, eps: f32, y: &Tensor, r: &Tensor) -> Result<()> {
                let (xv, wv) = (x.cpu_read::<T>()?, w.cpu_read::<W>()?);
                cpu::rmsnorm(&xv, &wv, eps, &mut y.cpu_write::<T>()?, &mut r.cpu_write::<f32>()?);
                Ok(())
            }
            match (x.dtype(), w.dtype()) {
                (DType::F32, DType::F32) => go::<f32, f32>(x, w, eps, &y, &rstd)?,
                (DType::F32, DType::BF16) => go::<f32, bf16>(x, w, eps, &y, &rstd)?,
                (DType::BF16, DType::F32) => go::<bf16, f32>(x, w, eps, &y, &rstd)?,
                (DType::BF16, DType::BF16) => go::<bf16, bf16>(x, w, eps, &y, &rstd)?,
                _ => unreachable!("dtypes checked in check()"),
            }
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::forward(ord, x, w, eps, &y, &rstd, rows, d, None)?,
        #[cfg(not(feature = "cuda"))]
        device => return Err(Error::UnsupportedDevice { op: "rmsnorm", device }),
    }
    let _ = d;
    Ok((y, rstd))
}

/// `(s, y, rstd)`: the residual add `s = x + r` (rounded to x's dtype, as [`crate::add::add`])
/// and `(y, rstd) = rmsnorm(s, w)`, in one pass on CUDA — one launch and one read of `x` and `r`
/// where the two ops take two launches and read `s` back twice (on the CPU, a row at a time while
/// it is in cache). The bits of `add` followed by `rmsnorm` on either device. `r` is like `x`.
/// A `w` of another dtype than `x` runs the two ops (the fused kernels take one dtype). The
/// backward is the two ops' (the gradient reaching `s` goes to both `x` and `r`).
pub fn add_rmsnorm(x: &Tensor, r: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor, Tensor)> {
    let (rows, d) = check("add_rmsnorm", x, w)?;
    if r.shape() != x.shape() || r.dtype() != x.dtype() {
        return Err(Error::shape(
            "add_rmsnorm",
            format!("r {:?} {} must match x {:?} {}", r.shape(), r.dtype(), x.shape(), x.dtype()),
        ));
    }
    if r.device() != x.device() {
        return Err(Error::DeviceMismatch { op: "add_rmsnorm", a: x.device(), b: r.device() });
    }
    if w.dtype() != x.dtype() {
        let s = crate::add::add(x, r)?;
        let (y, rstd) = rmsnorm(&s, w, eps)?;
        return Ok((s, y, rstd));
    }
    match x.device() {
        Device::Cpu => {
            let s = Tensor::empty(x.shape(), x.dtype(), x.device())?;
            let y = Tensor::empty(x.shape(), x.dtype(), x.device())?;
            let rstd = Tensor::empty(&[rows], DType::F32, x.device())?;
            fn go<T: WithDType>(x: &Tensor, r: &Tensor, w: &Tensor, eps: f32, out: [&Tensor; 3]) -> Result<()> {
                let (xv, rv, wv) = (x.cpu_read::<T>()?, r.cpu_read::<T>()?, w.cpu_read::<T>()?);
                let (mut s, mut y) = (out[0].cpu_write::<T>()?, out[1].cpu_write::<T>()?);
                cpu::add_rmsnorm(&xv, &rv, &wv, eps, &mut s, &mut y, &mut out[2].cpu_write::<f32>()?);
                Ok(())
            }
            match x.dtype() {
                DType::F32 => go::<f32>(x, r, w, eps, [&s, &y, &rstd])?,
                _ => go::<bf16>(x, r, w, eps, [&s, &y, &rstd])?,
            }
            Ok((s, y, rstd))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => {
            let s = Tensor::empty(x.shape(), x.dtype(), x.device())?;
            let y = Tensor::empty(x.shape(), x.dtype(), x.device())?;
            let rstd = Tensor::empty(&[rows], DType::F32, x.device())?;
            cuda::forward(ord, x, w, eps, &y, &rstd, rows, d, Some((r, &s)))?;
            Ok((s, y, rstd))
        }
        #[cfg(not(feature = "cuda"))]
        device => {
            let _ = (rows, d);
            Err(Error::UnsupportedDevice { op: "add_rmsnorm", device })
        }
    }
}

/// `(dx, dw)`: `dx` like `x`; `dw` `[D]` f32, summed over rows. `rstd` is the forward's.
pub fn rmsnorm_backward(x: &Tensor, w: &Tensor, rstd: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    backward_impl(x, w, rstd, dy, None, None)
}

/// [`rmsnorm_backward`] adding dw into `dw_acc` (`[D]` f32, a weight's gradient accumulated
/// over layers or micro-batches): `dw_acc += dw`, in the reduction's last pass on CUDA (no
/// separate add, no dw buffer). Returns dx.
pub fn rmsnorm_backward_into(x: &Tensor, w: &Tensor, rstd: &Tensor, dy: &Tensor, dw_acc: &Tensor) -> Result<Tensor> {
    backward_into("rmsnorm_backward_into", x, w, rstd, dy, dw_acc, None)
}

/// [`rmsnorm_backward_into`] returning `residual + dx`: the gradient of a decoder layer's
/// input, which reaches it through the norm and along the residual stream. On CUDA the dx
/// kernel adds it as it stores dx (no separate add); the bits of `add(residual, dx)` either way.
pub fn rmsnorm_backward_add_into(
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    dw_acc: &Tensor,
    residual: &Tensor,
) -> Result<Tensor> {
    backward_into("rmsnorm_backward_add_into", x, w, rstd, dy, dw_acc, Some(residual))
}

fn backward_into(
    op: &'static str,
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    dw_acc: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (_, d) = check(op, x, w)?;
    crate::check_accumulator(op, "dw_acc", dw_acc, d, x.device())?;
    if let Some(r) = residual.filter(|r| r.shape() != x.shape() || r.dtype() != x.dtype() || r.device() != x.device()) {
        return Err(Error::shape(
            op,
            format!(
                "residual {:?} {} on {} must match x {:?} {} on {}",
                r.shape(),
                r.dtype(),
                r.device(),
                x.shape(),
                x.dtype(),
                x.device()
            ),
        ));
    }
    Ok(backward_impl(x, w, rstd, dy, Some(dw_acc), residual)?.0)
}

fn backward_impl(
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    acc: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (rows, d) = check("rmsnorm_backward", x, w)?;
    if dy.shape() != x.shape() || dy.dtype() != x.dtype() {
        return Err(Error::shape(
            "rmsnorm_backward",
            format!("dy {:?} {} must match x {:?} {}", dy.shape(), dy.dtype(), x.shape(), x.dtype()),
        ));
    }
    if rstd.elem_count() != rows || rstd.dtype() != DType::F32 {
        return Err(Error::shape(
            "rmsnorm_backward",
            format!("rstd {:?} {} must be [{rows}] f32 for x {:?}", rstd.shape(), rstd.dtype(), x.shape()),
        ));
    }
    for t in [rstd, dy] {
        if t.device() != x.device() {
            return Err(Error::DeviceMismatch { op: "rmsnorm_backward", a: x.device(), b: t.device() });
        }
    }
    let dx = Tensor::empty(x.shape(), x.dtype(), x.device())?;
    let dw = match acc {
        #[cfg(feature = "cuda")]
        Some(a) if !x.device().is_cpu() => a.clone(),
        _ => Tensor::empty(&[d], DType::F32, x.device())?,
    };
    match x.device() {
        Device::Cpu => {
            fn go<T: WithDType, W: WithDType>(
                x: &Tensor,
                w: &Tensor,
                rstd: &Tensor,
                dy: &Tensor,
                dx: &Tensor,
                dw: &Tensor,
            ) -> Result<()> {
                let (xv, wv, rv, dyv) =
                    (x.cpu_read::<T>()?, w.cpu_read::<W>()?, rstd.cpu_read::<f32>()?, dy.cpu_read::<T>()?);
                cpu::rmsnorm_backward(&xv, &wv, &rv, &dyv, &mut dx.cpu_write::<T>()?, &mut dw.cpu_write::<f32>()?);
                Ok(())
            }
            match (x.dtype(), w.dtype()) {
                (DType::F32, DType::F32) => go::<f32, f32>(x, w, rstd, dy, &dx, &dw)?,
                (DType::F32, DType::BF16) => go::<f32, bf16>(x, w, rstd, dy, &dx, &dw)?,
                (DType::BF16, DType::F32) => go::<bf16, f32>(x, w, rstd, dy, &dx, &dw)?,
                (DType::BF16, DType::BF16) => go::<bf16, bf16>(x, w, rstd, dy, &dx, &dw)?,
                _ => unreachable!("dtypes checked in check()"),
            }
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::backward(ord, x, w, rstd, dy, residual, &dx, &dw, rows, d, acc.is_some())?,
        #[cfg(not(feature = "cuda"))]
        device => return Err(Error::UnsupportedDevice { op: "rmsnorm_backward", device }),
    }
    if let (Some(a), Device::Cpu) = (acc, x.device()) {
        // dw_acc + dw, as the CUDA reduction adds it.
        let (mut av, dv) = (a.cpu_write::<f32>()?, dw.cpu_read::<f32>()?);
        av.iter_mut().zip(dv.iter()).for_each(|(a, &d)| *a += d);
    }
    if let (Some(r), Device::Cpu) = (residual, x.device()) {
        crate::add::add_scaled_(&dx, 1.0, r)?;
    }
    Ok((dx, dw))
}

/// `(rows, D)` after checking shapes, dtypes and devices.
fn check(op: &'static str, x: &Tensor, w: &Tensor) -> Result<(usize, usize)> {
    let (rows, d) = x.rows_cols();
    if x.rank() == 0 || w.shape() != [d] {
        return Err(Error::shape(op, format!("x {:?} needs w [{d}], got w {:?}", x.shape(), w.shape())));
    }
    for dt in [x.dtype(), w.dtype()] {
        if !matches!(dt, DType::F32 | DType::BF16) {
            return Err(Error::UnsupportedDType { op, dtype: dt });
        }
    }
    if x.device() != w.device() {
        return Err(Error::DeviceMismatch { op, a: x.device(), b: w.device() });
    }
    Ok((rows, d))
}

/// Slice-level CPU implementations (the reference for the CUDA kernels). Row length is
/// `w.len()`; all math in f32.
pub mod cpu {
    use super::*;

    /// Elements of work per rayon task.
    const CHUNK: usize = 1 << 14;

    #[inline(always)]
    fn ld<T: WithDType>(v: T) -> f32 {
        v.to_f64() as f32
    }

    #[inline(always)]
    fn st<T: WithDType>(v: f32) -> T {
        T::from_f64(v as f64)
    }

    /// Σ v² in f32 with 8 independent accumulators (vectorises, and the error grows like a
    /// pairwise sum's rather than a sequential one's).
    #[inline]
    fn sum_sq<T: WithDType>(x: &[T]) -> f32 {
        let mut acc = [0f32; 8];
        let mut it = x.chunks_exact(8);
        for c in &mut it {
            for k in 0..8 {
                let v = ld(c[k]);
                acc[k] += v * v;
            }
        }
        for (k, &v) in it.remainder().iter().enumerate() {
            let v = ld(v);
            acc[k] += v * v;
        }
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
    }

    /// 1/sqrt(mean(x²) + eps) of one row, in f32 as `torch.rsqrt(variance + eps)`.
    #[inline]
    pub fn row_rstd<T: WithDType>(x: &[T], eps: f32) -> f32 {
        1.0 / (sum_sq(x) / x.len() as f32 + eps).sqrt()
    }

    /// `y = w · round_T(x·rstd)` per row of `x [rows, D]`; `rstd [rows]`.
    pub fn rmsnorm<T: WithDType, W: WithDType>(x: &[T], w: &[W], eps: f32, y: &mut [T], rstd: &mut [f32]) {
        let d = w.len();
        if d == 0 {
            return;
        }
        let rpt = (CHUNK / d).max(1);
        smelt_engine::cpu::pool().install(|| {
            y.par_chunks_mut(rpt * d).zip(rstd.par_chunks_mut(rpt)).enumerate().for_each(|(c, (yc, rc))| {
                for (i, (yr, r)) in yc.chunks_mut(d).zip(rc.iter_mut()).enumerate() {
                    let row = (c * rpt + i) * d;
                    *r = norm_row(&x[row..row + d], w, eps, yr);
                }
            })
        })
    }

    /// One row of [`rmsnorm`]; returns its rstd.
    #[inline]
    fn norm_row<T: WithDType, W: WithDType>(xr: &[T], w: &[W], eps: f32, yr: &mut [T]) -> f32 {
        let rs = row_rstd(xr, eps);
        for ((y, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
            // HF: weight * hidden.to(input_dtype).
            let n = ld(st::<T>(ld(xv) * rs));
            *y = st(ld(wv) * n);
        }
        rs
    }

    /// `s = round_T(x + r)` then [`rmsnorm`] of `s`, a row at a time (the sum is normalised
    /// while still in cache): the bits of `crate::add::add` followed by `rmsnorm`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rmsnorm<T: WithDType>(x: &[T], r: &[T], w: &[T], eps: f32, s: &mut [T], y: &mut [T], rstd: &mut [f32]) {
        let d = w.len();
        if d == 0 {
            return;
        }
        let rpt = (CHUNK / d).max(1);
        smelt_engine::cpu::pool().install(|| {
            (s.par_chunks_mut(rpt * d), y.par_chunks_mut(rpt * d), rstd.par_chunks_mut(rpt))
                .into_par_iter()
                .enumerate()
                .for_each(|(c, (sc, yc, rc))| {
                    for (i, ((sr, yr), rs)) in sc.chunks_mut(d).zip(yc.chunks_mut(d)).zip(rc.iter_mut()).enumerate() {
                        let row = (c * rpt + i) * d;
                        for ((sv, &a), &b) in sr.iter_mut().zip(&x[row..row + d]).zip(&r[row..row + d]) {
                            *sv = st(ld(a) + ld(b));
                        }
                        *rs = norm_row(sr, w, eps, yr);
                    }
                })
        })
    }

    /// `dx` (like `x`) and `dw` (f32, summed over rows in a fixed order).
    pub fn rmsnorm_backward<T: WithDType, W: WithDType>(
        x: &[T],
        w: &[W],
        rstd: &[f32],
        dy: &[T],
        dx: &mut [T],
        dw: &mut [f32],
    ) {
        let d = w.len();
        if d == 0 {
            return;
        }
        let wf: Vec<f32> = w.iter().map(|&v| ld(v)).collect();
        // Row chunks depend only on the shape, so the dw summation order (and result) does not
        // depend on the thread count.
        let rpt = (CHUNK / d).max(1);
        let partials: Vec<Vec<f32>> = smelt_engine::cpu::pool().install(|| {
            dx.par_chunks_mut(rpt * d)
                .enumerate()
                .map(|(c, dxc)| {
                    let mut part = vec![0f32; d];
                    for (i, dxr) in dxc.chunks_mut(d).enumerate() {
                        let r = c * rpt + i;
                        let (xr, dyr, rs) = (&x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d], rstd[r]);
                        let mut dot = 0f32;
                        for j in 0..d {
                            let (xv, g) = (ld(xr[j]), ld(dyr[j]));
                            dot += g * wf[j] * xv;
                            part[j] += g * (xv * rs);
                        }
                        let k = rs * rs * rs * dot / d as f32;
                        for j in 0..d {
                            dxr[j] = st(rs * (ld(dyr[j]) * wf[j]) - ld(xr[j]) * k);
                        }
                    }
                    part
                })
                .collect()
        });
        dw.fill(0.0);
        for p in &partials {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += b;
            }
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{launch, Arg, LaunchCfg};

    /// Rows per block in the warp-per-row kernels (one warp per row, 8 warps per block).
    const ROWS_PER_BLOCK: usize = 8;

    /// 16-byte chunks per row that v3 can hold in registers (32 lanes × 16 chunks).
    const V3_MAX_CHUNKS: usize = 512;

    fn suffix(x: DType, w: DType) -> &'static str {
        match (x, w) {
            (DType::F32, DType::F32) => "f32_f32",
            (DType::F32, _) => "f32_bf16",
            (_, DType::F32) => "bf16_f32",
            _ => "bf16_bf16",
        }
    }

    /// 16-byte vector loads along a row need D % (16/elem) == 0 and 16-byte aligned bases.
    fn vec_ok(x: &Tensor, d: usize, ptrs: &[u64]) -> bool {
        d % (16 / x.dtype().size_in_bytes()) == 0 && ptrs.iter().all(|p| p % 16 == 0)
    }

    /// The versions a row kernel can run for this call (rmsnorm.cu): v1 always, v2 with vector
    /// rows, v3 with vector rows of at most [`V3_MAX_CHUNKS`] chunks.
    fn allowed(x: &Tensor, d: usize, ptrs: &[u64]) -> Vec<u32> {
        let chunks = d * x.dtype().size_in_bytes() / 16;
        match vec_ok(x, d, ptrs) {
            false => vec![1],
            true if chunks <= V3_MAX_CHUNKS => vec![1, 2, 3],
            true => vec![1, 2],
        }
    }

    fn row_cfg(rows: usize) -> LaunchCfg {
        let grid = rows.div_ceil(ROWS_PER_BLOCK) as u32;
        LaunchCfg { grid: (grid, 1, 1), block: (32 * ROWS_PER_BLOCK as u32, 1, 1), smem: 0 }
    }

    /// v3's kernel name suffix `v3_<L>x<C>` (L lanes per row, C chunks per lane: the smallest
    /// instantiated that holds `chunks`) and its launch (8 warps, 32/L rows per warp).
    fn v3_kernel(rows: usize, chunks: usize) -> (String, LaunchCfg) {
        let (l, c) = match chunks {
            0..=8 => (8, 1),
            9..=16 => (16, 1),
            17..=32 => (32, 1),
            33..=128 => (32, 4),
            129..=256 => (32, 8),
            _ => (32, 16),
        };
        let rows_per_block = ROWS_PER_BLOCK * 32 / l;
        let grid = rows.div_ceil(rows_per_block) as u32;
        (format!("v3_{l}x{c}"), LaunchCfg { grid: (grid, 1, 1), block: (32 * ROWS_PER_BLOCK as u32, 1, 1), smem: 0 })
    }

    /// The row kernel `rmsnorm_<kind>_<x>_<w>[_v2|_v3_LxC]` of `version` and its launch.
    fn row_kernel(kind: &str, version: u32, x: &Tensor, w: &Tensor, rows: usize, d: usize) -> (String, LaunchCfg) {
        let sfx = suffix(x.dtype(), w.dtype());
        match version {
            3 => {
                let (v, cfg) = v3_kernel(rows, d * x.dtype().size_in_bytes() / 16);
                (format!("rmsnorm_{kind}_{sfx}_{v}"), cfg)
            }
            2 => (format!("rmsnorm_{kind}_{sfx}_v2"), row_cfg(rows)),
            _ => (format!("rmsnorm_{kind}_{sfx}"), row_cfg(rows)),
        }
    }

    /// The forward; with `residual = Some((r, s))`, [`super::add_rmsnorm`]'s kernels, which
    /// normalise `s = x + r` and write `s` too.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        ord: usize,
        x: &Tensor,
        w: &Tensor,
        eps: f32,
        y: &Tensor,
        rstd: &Tensor,
        rows: usize,
        d: usize,
        residual: Option<(&Tensor, &Tensor)>,
    ) -> Result<()> {
        if rows == 0 || d == 0 {
            return Ok(());
        }
        let (px, pw, py, pr) = (x.cuda_ptr()?, w.cuda_ptr()?, y.cuda_ptr()?, rstd.cuda_ptr()?);
        // Pointers the vector loads need aligned, and the kernel's leading arguments.
        let mut rows_at = vec![px, py, pw];
        let mut args = vec![Arg::Ptr(py), Arg::Ptr(pr)];
        let kind = match residual {
            Some((r, s)) => {
                let (p_r, p_s) = (r.cuda_ptr()?, s.cuda_ptr()?);
                rows_at.extend([p_r, p_s]);
                args.extend([Arg::Ptr(p_s), Arg::Ptr(px), Arg::Ptr(p_r)]);
                "add_fwd"
            }
            None => {
                args.push(Arg::Ptr(px));
                "fwd"
            }
        };
        args.extend([Arg::Ptr(pw), Arg::F32(eps), Arg::U64(rows as u64), Arg::U32(d as u32)]);
        let version = crate::versions::pick("rmsnorm", &allowed(x, d, &rows_at))?;
        let (func, cfg) = row_kernel(kind, version, x, w, rows, d);
        launch(ord, &SRC, &func, cfg, &args)
    }

    /// Row chunks of the dw partial sums: a function of `rows` only, so the summation order
    /// (and so dw, bit for bit) does not depend on the device or the version.
    pub(super) fn dw_chunks(rows: usize) -> (usize, usize) {
        let chunks = rows.div_ceil(32).clamp(1, 1024);
        let per = rows.div_ceil(chunks);
        (rows.div_ceil(per), per)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        ord: usize,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
        residual: Option<&Tensor>,
        dx: &Tensor,
        dw: &Tensor,
        rows: usize,
        d: usize,
        add: bool,
    ) -> Result<()> {
        if d == 0 {
            return Ok(());
        }
        let (px, pw, pr, pdy, pdx, pdw) =
            (x.cuda_ptr()?, w.cuda_ptr()?, rstd.cuda_ptr()?, dy.cuda_ptr()?, dx.cuda_ptr()?, dw.cuda_ptr()?);
        if rows == 0 {
            // dw of an empty batch is zero (and adds nothing).
            if !add {
                dw.copy_from(&Tensor::zeros(&[d], DType::F32, dw.device())?)?;
            }
            return Ok(());
        }
        let pres = residual.map_or(Ok(0), Tensor::cuda_ptr)?;
        let version = crate::versions::pick("rmsnorm", &allowed(x, d, &[px, pdy, pdx, pw, pres]))?;
        let (func, cfg) = row_kernel("bwd_dx", version, x, w, rows, d);
        let args = [
            Arg::Ptr(pdx),
            Arg::Ptr(px),
            Arg::Ptr(pw),
            Arg::Ptr(pr),
            Arg::Ptr(pdy),
            Arg::Ptr(pres),
            Arg::U64(rows as u64),
            Arg::U32(d as u32),
        ];
        launch(ord, &SRC, &func, cfg, &args)?;

        let (chunks, per) = dw_chunks(rows);
        let partial = Tensor::empty(&[chunks, d], DType::F32, x.device())?;
        let pp = partial.cuda_ptr()?;
        let xdt = if x.dtype() == DType::F32 { "f32" } else { "bf16" };
        if version == 3 {
            // Column pairs across x (whole warps, blocks of up to 256 threads split evenly), row
            // chunks across y, so a narrow D still gives full blocks. v3 rows are 16-byte
            // vectors, so d is even and the pairs are 4/8-byte aligned.
            let pairs = d / 2;
            let nbx = pairs.div_ceil(256);
            let bx = pairs.div_ceil(nbx).next_multiple_of(32);
            let by = (256 / bx).max(1);
            let cfg = LaunchCfg {
                grid: (pairs.div_ceil(bx) as u32, chunks.div_ceil(by) as u32, 1),
                block: (bx as u32, by as u32, 1),
                smem: 0,
            };
            let args = [
                Arg::Ptr(pp),
                Arg::Ptr(px),
                Arg::Ptr(pr),
                Arg::Ptr(pdy),
                Arg::U64(rows as u64),
                Arg::U32(d as u32),
                Arg::U32(per as u32),
                Arg::U32(chunks as u32),
            ];
            launch(ord, &SRC, &format!("rmsnorm_bwd_dw_partial_v3_{xdt}"), cfg, &args)?;
            let block = 128u32;
            let cfg = LaunchCfg { grid: (d.div_ceil(block as usize) as u32, 1, 1), block: (block, 1, 1), smem: 0 };
            let args = [Arg::Ptr(pdw), Arg::Ptr(pp), Arg::U32(chunks as u32), Arg::U32(d as u32), Arg::U32(add as u32)];
            return launch(ord, &SRC, "rmsnorm_bwd_dw_reduce_v3", cfg, &args);
        }
        let block = 256u32;
        let cols = d.div_ceil(block as usize) as u32;
        let cfg = LaunchCfg { grid: (cols, chunks as u32, 1), block: (block, 1, 1), smem: 0 };
        let args = [
            Arg::Ptr(pp),
            Arg::Ptr(px),
            Arg::Ptr(pr),
            Arg::Ptr(pdy),
            Arg::U64(rows as u64),
            Arg::U32(d as u32),
            Arg::U32(per as u32),
        ];
        launch(ord, &SRC, &format!("rmsnorm_bwd_dw_partial_{xdt}"), cfg, &args)?;
        let cfg = LaunchCfg { grid: (cols, 1, 1), block: (block, 1, 1), smem: 0 };
        launch(
            ord,
            &SRC,
            "rmsnorm_bwd_dw_reduce",
            cfg,
            &[Arg::Ptr(pdw), Arg::Ptr(pp), Arg::U32(chunks as u32), Arg::U32(d as u32), Arg::U32(add as u32)],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use smelt_engine::Rng;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, Device::Cpu).unwrap()
    }

    /// float64 forward: y[r, j] = w[j]·x[r, j]/sqrt(mean(x²)+eps).
    fn reference(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
        let d = w.len();
        x.chunks(d)
            .flat_map(|r| {
                let rs = 1.0 / (r.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
                r.iter().zip(w).map(move |(v, w)| v * rs * w)
            })
            .collect()
    }

    #[test]
    fn rmsnorm_matches_f64_on_odd_shapes() {
        let mut rng = Rng::new(21);
        for (rows, d) in [(1usize, 1usize), (3, 37), (5, 100), (2000, 7), (4, 896), (1, 4099)] {
            let (x, w) = (randn(&mut rng, rows * d, 2.0), randn(&mut rng, d, 1.0));
            let eps = 1e-6f32;
            let want = reference(&to_f64(&x), &to_f64(&w), eps as f64);
            let (y, rstd) = rmsnorm(&t(&x, &[rows, d]), &t(&w, &[d]), eps).unwrap();
            assert_eq!((y.shape(), rstd.shape()), (&[rows, d][..], &[rows][..]));
            assert_close(&y.to_vec::<f32>().unwrap(), &want, 1e-6, 1e-5, &format!("rmsnorm f32 [{rows},{d}]"));
            let want_r: Vec<f64> = to_f64(&x)
                .chunks(d)
                .map(|r| 1.0 / (r.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps as f64).sqrt())
                .collect();
            assert_close(&rstd.to_vec::<f32>().unwrap(), &want_r, 0.0, 1e-5, "rstd");

            // bf16 x and w: two roundings (x·rstd, then ·w) — within 2 bf16 ulps of exact.
            let (xh, wh) =
                (t(&x, &[rows, d]).to_dtype(DType::BF16).unwrap(), t(&w, &[d]).to_dtype(DType::BF16).unwrap());
            let want = reference(&to_f64(&xh.to_vec_f32().unwrap()), &to_f64(&wh.to_vec_f32().unwrap()), eps as f64);
            let got = rmsnorm(&xh, &wh, eps).unwrap().0;
            assert_eq!(got.dtype(), DType::BF16);
            assert_close(&got.to_vec_f32().unwrap(), &want, 1e-30, 2.0 * DType::BF16.epsilon(), "rmsnorm bf16");
            // bf16 x with an f32 weight.
            let got = rmsnorm(&xh, &t(&w, &[d]), eps).unwrap().0;
            let want = reference(&to_f64(&xh.to_vec_f32().unwrap()), &to_f64(&w), eps as f64);
            assert_close(&got.to_vec_f32().unwrap(), &want, 1e-30, 2.0 * DType::BF16.epsilon(), "rmsnorm bf16/f32 w");
        }
    }

    #[test]
    fn rmsnorm_bf16_follows_hf_rounding_order() {
        // y = bf16(w · bf16(x·rstd)): exactly, not merely within tolerance.
        let mut rng = Rng::new(22);
        let d = 64;
        let xh = t(&randn(&mut rng, 3 * d, 1.0), &[3, d]).to_dtype(DType::BF16).unwrap();
        let wh = t(&randn(&mut rng, d, 1.0), &[d]).to_dtype(DType::BF16).unwrap();
        let (y, rstd) = rmsnorm(&xh, &wh, 1e-6).unwrap();
        let (xv, wv, rv) = (xh.to_vec_f32().unwrap(), wh.to_vec_f32().unwrap(), rstd.to_vec::<f32>().unwrap());
        let want: Vec<bf16> =
            (0..3 * d).map(|i| bf16::from_f32(wv[i % d] * bf16::from_f32(xv[i] * rv[i / d]).to_f32())).collect();
        assert_eq!(y.to_vec::<bf16>().unwrap(), want);
    }

    #[test]
    fn rmsnorm_per_head_is_a_reshape() {
        // Qwen3 q_norm: x [tokens, heads, head_dim] normalised over head_dim with one w.
        let mut rng = Rng::new(26);
        let (tokens, heads, hd) = (5usize, 3usize, 8usize);
        let x = randn(&mut rng, tokens * heads * hd, 1.0);
        let w = t(&randn(&mut rng, hd, 1.0), &[hd]);
        let (y3, r3) = rmsnorm(&t(&x, &[tokens, heads, hd]), &w, 1e-6).unwrap();
        let (y2, r2) = rmsnorm(&t(&x, &[tokens * heads, hd]), &w, 1e-6).unwrap();
        assert_eq!(y3.shape(), &[tokens, heads, hd]);
        assert_eq!(r3.shape(), &[tokens * heads]);
        assert_eq!(y3.to_vec::<f32>().unwrap(), y2.to_vec::<f32>().unwrap());
        assert_eq!(r3.to_vec::<f32>().unwrap(), r2.to_vec::<f32>().unwrap());
    }

    #[test]
    fn rmsnorm_backward_by_finite_differences() {
        let mut rng = Rng::new(23);
        for (rows, d) in [(3usize, 5usize), (2, 37), (4, 1)] {
            let (x, w, g) = (randn(&mut rng, rows * d, 1.5), randn(&mut rng, d, 1.0), randn(&mut rng, rows * d, 1.0));
            let eps = 1e-5f32;
            let loss = |x: &[f64], w: &[f64]| -> f64 {
                reference(x, w, eps as f64).iter().zip(&g).map(|(y, g)| y * *g as f64).sum()
            };
            let (x64, w64) = (to_f64(&x), to_f64(&w));
            let want_dx = finite_diff(|v| loss(v, &w64), &x64, 1e-5);
            let want_dw = finite_diff(|v| loss(&x64, v), &w64, 1e-5);
            let (xt, wt) = (t(&x, &[rows, d]), t(&w, &[d]));
            let (_, rstd) = rmsnorm(&xt, &wt, eps).unwrap();
            let (dx, dw) = rmsnorm_backward(&xt, &wt, &rstd, &t(&g, &[rows, d])).unwrap();
            assert_eq!(dw.dtype(), DType::F32);
            assert_close(&dx.to_vec::<f32>().unwrap(), &want_dx, 1e-5, 1e-4, &format!("dx [{rows},{d}]"));
            assert_close(&dw.to_vec::<f32>().unwrap(), &want_dw, 1e-5, 1e-4, &format!("dw [{rows},{d}]"));
            // The accumulating form adds dw to what the gradient holds, and gives the same dx.
            let acc = t(&vec![0.5; d], &[d]);
            let dx2 = rmsnorm_backward_into(&xt, &wt, &rstd, &t(&g, &[rows, d]), &acc).unwrap();
            assert_eq!(dx2.to_vec::<f32>().unwrap(), dx.to_vec::<f32>().unwrap());
            let want: Vec<f32> = dw.to_vec::<f32>().unwrap().iter().map(|w| 0.5 + w).collect();
            assert_eq!(acc.to_vec::<f32>().unwrap(), want, "dw accumulated [{rows},{d}]");
            // With a residual gradient: residual + dx, in f64 against the finite differences.
            let res = randn(&mut rng, rows * d, 1.0);
            let acc = t(&vec![0.0; d], &[d]);
            let dxr =
                rmsnorm_backward_add_into(&xt, &wt, &rstd, &t(&g, &[rows, d]), &acc, &t(&res, &[rows, d])).unwrap();
            let want_r: Vec<f64> = want_dx.iter().zip(&res).map(|(a, &b)| a + b as f64).collect();
            assert_close(&dxr.to_vec::<f32>().unwrap(), &want_r, 1e-5, 1e-4, &format!("dx + residual [{rows},{d}]"));
            let e = rmsnorm_backward_add_into(&xt, &wt, &rstd, &t(&g, &[rows, d]), &acc, &t(&res, &[rows * d]))
                .unwrap_err()
                .to_string();
            assert!(e.contains("rmsnorm_backward_add_into") && e.contains("residual"), "{e}");
            let bad = t(&vec![0.0; d + 1], &[d + 1]);
            let e = rmsnorm_backward_into(&xt, &wt, &rstd, &t(&g, &[rows, d]), &bad).unwrap_err().to_string();
            assert!(e.contains("rmsnorm_backward_into") && e.contains("dw_acc"), "{e}");
        }
    }

    #[test]
    fn rmsnorm_backward_many_rows_matches_f64() {
        // The analytic backward in float64 against ours on a big shape (dw sums 3000 rows).
        let mut rng = Rng::new(24);
        let (rows, d) = (3000usize, 100usize);
        let (x, w, g) = (randn(&mut rng, rows * d, 1.0), randn(&mut rng, d, 1.0), randn(&mut rng, rows * d, 1.0));
        let (xt, wt) = (t(&x, &[rows, d]), t(&w, &[d]));
        let (_, rstd) = rmsnorm(&xt, &wt, 1e-6).unwrap();
        let (dx, dw) = rmsnorm_backward(&xt, &wt, &rstd, &t(&g, &[rows, d])).unwrap();
        let mut want_dx = vec![0f64; rows * d];
        let mut want_dw = vec![0f64; d];
        for r in 0..rows {
            let xr = &x[r * d..(r + 1) * d];
            let rs = 1.0 / (xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64 + 1e-6).sqrt();
            let dot: f64 = (0..d).map(|j| g[r * d + j] as f64 * w[j] as f64 * xr[j] as f64).sum();
            for j in 0..d {
                want_dx[r * d + j] =
                    rs * g[r * d + j] as f64 * w[j] as f64 - xr[j] as f64 * rs.powi(3) * dot / d as f64;
                want_dw[j] += g[r * d + j] as f64 * xr[j] as f64 * rs;
            }
        }
        assert_close(&dx.to_vec::<f32>().unwrap(), &want_dx, 1e-5, 1e-4, "dx");
        assert_close(&dw.to_vec::<f32>().unwrap(), &want_dw, 1e-3, 1e-4, "dw");
    }

    #[test]
    fn rmsnorm_errors_name_op_and_shapes() {
        let x = Tensor::zeros(&[2, 3], DType::F32, Device::Cpu).unwrap();
        let w = Tensor::zeros(&[4], DType::F32, Device::Cpu).unwrap();
        let e = rmsnorm(&x, &w, 1e-6).unwrap_err().to_string();
        assert!(e.contains("rmsnorm") && e.contains("[2, 3]") && e.contains("[4]"), "{e}");
        let w = Tensor::zeros(&[3], DType::F32, Device::Cpu).unwrap();
        let rstd = Tensor::zeros(&[5], DType::F32, Device::Cpu).unwrap();
        let e = rmsnorm_backward(&x, &w, &rstd, &x).unwrap_err().to_string();
        assert!(e.contains("rmsnorm_backward") && e.contains("rstd"), "{e}");
    }

    #[test]
    fn rmsnorm_device_matches_cpu() {
        let Some(dev) = test_cuda_device() else { return };
        let mut rng = Rng::new(25);
        // Hidden 896/1536/3584 and per-head 64/128, odd rows, a row not a multiple of 8, a dim
        // of 1. v3's register cache (16-byte chunks per row: D/8 bf16, D/4 f32): lane groups of
        // 8 (D 32, 64 bf16; 4096 and 77 rows leave groups of the last warp idle), 16 (128 bf16,
        // 64 f32), whole warps holding 1/4/8/16 chunks a lane with a partial last round (896,
        // 1000, 1536, 3584 bf16; 1000 and 1536 f32), 16 full (4096 bf16); above the cache
        // (3584 and 4096 f32, 5120 bf16) only v1/v2 fit.
        let shapes = [
            (1usize, 1usize),
            (7, 37),
            (33, 896),
            (1000, 128),
            (4096, 64),
            (77, 64),
            (13, 32),
            (5, 4099),
            (3, 3584),
            (9, 1000),
            (6, 1536),
            (5, 4096),
            (2, 5120),
        ];
        let pairs = [
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::BF16, DType::F32),
            (DType::F32, DType::BF16),
        ];
        for (rows, d) in shapes {
            for (xdt, wdt) in pairs {
                let x = t(&randn(&mut rng, rows * d, 2.0), &[rows, d]).to_dtype(xdt).unwrap();
                let w = t(&randn(&mut rng, d, 1.0), &[d]).to_dtype(wdt).unwrap();
                let dy = t(&randn(&mut rng, rows * d, 1.0), &[rows, d]).to_dtype(xdt).unwrap();
                let (xg, wg, dyg) = (x.to_device(dev).unwrap(), w.to_device(dev).unwrap(), dy.to_device(dev).unwrap());
                let poison = |shapes: &[(&[usize], DType)]| {
                    let p: Vec<Tensor> =
                        shapes.iter().map(|(s, dt)| Tensor::full(f64::NAN, s, *dt, dev).unwrap()).collect();
                    drop(p);
                };
                // bf16: rstd summed in another order than the CPU's can move x·rstd across a bf16
                // rounding boundary (1 ulp), which the rounding of w·n can make 2 ulps of y.
                let (tol, rtol) = if xdt == DType::F32 { (2e-6, 2e-6) } else { (xdt.epsilon(), 2.0 * xdt.epsilon()) };
                let (yc, rc) = rmsnorm(&x, &w, 1e-6).unwrap();
                let (dxc, dwc) = rmsnorm_backward(&x, &w, &rc, &dy).unwrap();
                let rcg = rc.to_device(dev).unwrap();
                // Device buffers are 256-byte aligned: the row length decides the versions.
                let chunks = d * xdt.size_in_bytes() / 16;
                let vec = d % (16 / xdt.size_in_bytes()) == 0;
                // v3 must give v2's bits (same per-lane sums, same butterfly); v1's lanes sum other
                // elements, so its y/rstd/dx may differ in the last bits. dw is one kernel order
                // for all versions: the same bits everywhere.
                let mut v2_bits: Option<[Vec<u8>; 3]> = None;
                let mut dw_bits: Option<Vec<u8>> = None;
                for v in [1u32, 2, 3] {
                    let _v = crate::versions::scoped("rmsnorm", v);
                    let what = format!("v{v} {xdt}/{wdt} [{rows},{d}]");
                    let fits = match v {
                        2 => vec,
                        3 => vec && chunks <= 512,
                        _ => true,
                    };
                    if !fits {
                        let e = rmsnorm(&xg, &wg, 1e-6).unwrap_err().to_string();
                        assert!(e.contains("rmsnorm") && e.contains(&format!("version {v}")), "{what}: {e}");
                        let e = rmsnorm_backward(&xg, &wg, &rcg, &dyg).unwrap_err().to_string();
                        assert!(e.contains("rmsnorm") && e.contains(&format!("version {v}")), "{what}: {e}");
                        continue;
                    }
                    poison(&[(&[rows, d], xdt), (&[rows], DType::F32)]);
                    let (yg, rg) = rmsnorm(&xg, &wg, 1e-6).unwrap();
                    assert_close(
                        &yg.to_vec_f32().unwrap(),
                        &to_f64(&yc.to_vec_f32().unwrap()),
                        tol,
                        rtol,
                        &format!("y {what}"),
                    );
                    assert_close(
                        &rg.to_vec_f32().unwrap(),
                        &to_f64(&rc.to_vec_f32().unwrap()),
                        0.0,
                        2e-6,
                        &format!("rstd {what}"),
                    );

                    poison(&[(&[rows, d], xdt), (&[d], DType::F32), (&[rows.div_ceil(32).min(1024), d], DType::F32)]);
                    let (dxg, dwg) = rmsnorm_backward(&xg, &wg, &rcg, &dyg).unwrap();
                    let dtol = if xdt == DType::F32 { 1e-5 } else { xdt.epsilon() };
                    assert_close(
                        &dxg.to_vec_f32().unwrap(),
                        &to_f64(&dxc.to_vec_f32().unwrap()),
                        dtol,
                        dtol,
                        &format!("dx {what}"),
                    );
                    // dw: f32 sums over `rows` in a different order than the CPU's.
                    let dwtol = 1e-6 * (rows as f64).sqrt() * 8.0;
                    assert_close(
                        &dwg.to_vec_f32().unwrap(),
                        &to_f64(&dwc.to_vec_f32().unwrap()),
                        dwtol,
                        1e-5,
                        &format!("dw {what}"),
                    );
                    // Deterministic: a second run gives the same bits.
                    let (_, dwg2) = rmsnorm_backward(&xg, &wg, &rcg, &dyg).unwrap();
                    assert_eq!(dwg.to_bytes().unwrap(), dwg2.to_bytes().unwrap(), "dw deterministic {what}");
                    // Accumulated in the reduction: acc + dw, the same dx.
                    let start: Vec<f32> = (0..d).map(|j| j as f32 * 0.25 - 1.0).collect();
                    let acc = Tensor::from_slice(&start, &[d], dev).unwrap();
                    let dxi = rmsnorm_backward_into(&xg, &wg, &rcg, &dyg, &acc).unwrap();
                    assert_eq!(dxi.to_bytes().unwrap(), dxg.to_bytes().unwrap(), "dx of the accumulating form {what}");
                    let want: Vec<f32> = start.iter().zip(dwg.to_vec_f32().unwrap()).map(|(a, b)| a + b).collect();
                    assert_eq!(acc.to_vec_f32().unwrap(), want, "dw accumulated {what}");
                    // With a residual gradient: add(residual, dx)'s bits, dw as before.
                    let res =
                        t(&randn(&mut rng, rows * d, 1.0), &[rows, d]).to_dtype(xdt).unwrap().to_device(dev).unwrap();
                    let acc2 = Tensor::zeros(&[d], DType::F32, dev).unwrap();
                    poison(&[(&[rows, d], xdt)]);
                    let dxr = rmsnorm_backward_add_into(&xg, &wg, &rcg, &dyg, &acc2, &res).unwrap();
                    let sum = crate::add::add(&res, &dxg).unwrap();
                    assert_eq!(dxr.to_bytes().unwrap(), sum.to_bytes().unwrap(), "dx + residual {what}");
                    assert_eq!(acc2.to_bytes().unwrap(), dwg.to_bytes().unwrap(), "dw with a residual {what}");
                    let bits = [yg.to_bytes().unwrap(), rg.to_bytes().unwrap(), dxg.to_bytes().unwrap()];
                    match (v, &v2_bits) {
                        (2, _) => v2_bits = Some(bits),
                        (3, Some(b2)) => {
                            for (k, name) in ["y", "rstd", "dx"].iter().enumerate() {
                                assert!(bits[k] == b2[k], "{name} {what}: bits differ from v2");
                            }
                        }
                        (3, None) => panic!("{what}: v3 ran where v2 could not"),
                        _ => {}
                    }
                    let dwb = dwg.to_bytes().unwrap();
                    match &dw_bits {
                        None => dw_bits = Some(dwb),
                        Some(b1) => assert!(&dwb == b1, "dw {what}: bits differ from v1"),
                    }
                }
            }
        }
    }

    #[test]
    fn add_rmsnorm_matches_f64_and_the_separate_ops() {
        let mut rng = Rng::new(26);
        for (rows, d) in [(1usize, 1usize), (7, 37), (33, 896), (5, 4099)] {
            let (x, r, w) = (randn(&mut rng, rows * d, 2.0), randn(&mut rng, rows * d, 2.0), randn(&mut rng, d, 1.0));
            let (s, y, rstd) = add_rmsnorm(&t(&x, &[rows, d]), &t(&r, &[rows, d]), &t(&w, &[d]), 1e-6).unwrap();
            let sum: Vec<f64> = x.iter().zip(&r).map(|(&a, &b)| a as f64 + b as f64).collect();
            assert_close(&s.to_vec::<f32>().unwrap(), &sum, 0.0, f32::EPSILON as f64, "add_rmsnorm s");
            let mut want_y = vec![0f64; rows * d];
            let mut want_r = vec![0f64; rows];
            for i in 0..rows {
                let row = &sum[i * d..(i + 1) * d];
                let rs = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + 1e-6).sqrt();
                want_r[i] = rs;
                for j in 0..d {
                    want_y[i * d + j] = row[j] * rs * w[j] as f64;
                }
            }
            assert_close(&y.to_vec::<f32>().unwrap(), &want_y, 2e-6, 2e-6, "add_rmsnorm y");
            assert_close(&rstd.to_vec::<f32>().unwrap(), &want_r, 0.0, 2e-6, "add_rmsnorm rstd");
            // Exactly add, then rmsnorm, in f32 and bf16.
            for dt in [DType::F32, DType::BF16] {
                let b = |v: &[f32], shape: &[usize]| t(v, shape).to_dtype(dt).unwrap();
                let (xb, rb, wb) = (b(&x, &[rows, d]), b(&r, &[rows, d]), b(&w, &[d]));
                let (s, y, rstd) = add_rmsnorm(&xb, &rb, &wb, 1e-6).unwrap();
                let s2 = crate::add::add(&xb, &rb).unwrap();
                let (y2, r2) = rmsnorm(&s2, &wb, 1e-6).unwrap();
                assert_eq!(s.to_bytes().unwrap(), s2.to_bytes().unwrap(), "{dt} s [{rows},{d}]");
                assert_eq!(y.to_bytes().unwrap(), y2.to_bytes().unwrap(), "{dt} y [{rows},{d}]");
                assert_eq!(rstd.to_bytes().unwrap(), r2.to_bytes().unwrap(), "{dt} rstd [{rows},{d}]");
            }
        }
        let x = t(&[1.0; 8], &[2, 4]);
        let e = add_rmsnorm(&x, &t(&[1.0; 4], &[1, 4]), &t(&[1.0; 4], &[4]), 1e-6).unwrap_err().to_string();
        assert!(e.contains("add_rmsnorm") && e.contains("[1, 4]") && e.contains("[2, 4]"), "{e}");
        // Mixed dtypes run the two ops.
        let wb = t(&[1.0, 2.0, 0.5, 3.0], &[4]).to_dtype(DType::BF16).unwrap();
        let xs = t(&[1.0, -2.0, 3.0, 0.25, 5.0, 6.0, -7.0, 8.0], &[2, 4]);
        let (s, y, _) = add_rmsnorm(&xs, &xs, &wb, 1e-6).unwrap();
        let s2 = crate::add::add(&xs, &xs).unwrap();
        assert_eq!(s.to_vec::<f32>().unwrap(), s2.to_vec::<f32>().unwrap());
        assert_eq!(y.to_vec::<f32>().unwrap(), rmsnorm(&s2, &wb, 1e-6).unwrap().0.to_vec::<f32>().unwrap());
    }

    /// On the device the fused kernel must give, for every version, the bits of the device's own
    /// add followed by its rmsnorm at that version (same per-lane order), and stay within the
    /// rmsnorm tolerance of the CPU.
    #[test]
    fn add_rmsnorm_device_is_add_then_rmsnorm() {
        let Some(dev) = test_cuda_device() else { return };
        let mut rng = Rng::new(27);
        for (rows, d) in [(1usize, 1usize), (7, 37), (33, 896), (77, 64), (6, 1536), (5, 4096), (2, 5120)] {
            for dt in [DType::F32, DType::BF16] {
                let mk = |std: f32, shape: &[usize], rng: &mut Rng| {
                    t(&randn(rng, shape.iter().product(), std), shape).to_dtype(dt).unwrap()
                };
                let (x, r, w) = (mk(2.0, &[rows, d], &mut rng), mk(2.0, &[rows, d], &mut rng), mk(1.0, &[d], &mut rng));
                let (sc, yc, _) = add_rmsnorm(&x, &r, &w, 1e-6).unwrap();
                let (xg, rg, wg) = (x.to_device(dev).unwrap(), r.to_device(dev).unwrap(), w.to_device(dev).unwrap());
                let chunks = d * dt.size_in_bytes() / 16;
                let vec = d % (16 / dt.size_in_bytes()) == 0;
                for v in [1u32, 2, 3] {
                    let _v = crate::versions::scoped("rmsnorm", v);
                    let what = format!("v{v} {dt} [{rows},{d}]");
                    if !(v == 1 || (vec && (v == 2 || chunks <= 512))) {
                        let e = add_rmsnorm(&xg, &rg, &wg, 1e-6).unwrap_err().to_string();
                        assert!(e.contains("rmsnorm") && e.contains(&format!("version {v}")), "{what}: {e}");
                        continue;
                    }
                    drop(Tensor::full(f64::NAN, &[3 * rows * d], dt, dev).unwrap());
                    let (s, y, rstd) = add_rmsnorm(&xg, &rg, &wg, 1e-6).unwrap();
                    let s2 = crate::add::add(&xg, &rg).unwrap();
                    let (y2, r2) = rmsnorm(&s2, &wg, 1e-6).unwrap();
                    assert_eq!(s.to_bytes().unwrap(), sc.to_bytes().unwrap(), "s {what} vs CPU");
                    assert_eq!(s.to_bytes().unwrap(), s2.to_bytes().unwrap(), "s {what} vs add");
                    assert_eq!(y.to_bytes().unwrap(), y2.to_bytes().unwrap(), "y {what} vs rmsnorm");
                    assert_eq!(rstd.to_bytes().unwrap(), r2.to_bytes().unwrap(), "rstd {what} vs rmsnorm");
                    let (tol, rtol) = if dt == DType::F32 { (2e-6, 2e-6) } else { (dt.epsilon(), 2.0 * dt.epsilon()) };
                    let want = to_f64(&yc.to_vec_f32().unwrap());
                    assert_close(&y.to_vec_f32().unwrap(), &want, tol, rtol, &format!("y {what} vs CPU"));
                }
            }
        }
    }
}
