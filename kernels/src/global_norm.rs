//! Gradient clipping: the global L2 norm over many tensors, and clip-by-global-norm.
//!
//! - [`global_norm`]: `sqrt(Σ_t Σ_i x_t[i]²)` over f32, bf16 or f16 tensors on one device. Both
//!   devices accumulate the squares in f64, so the norm of ~500M parameters is as precise as
//!   the f32 result can hold (an f32 running sum drops the small squares once it is large), and
//!   squares that overflow f32 (|x| ≳ 1.8e19) do not make it infinite. CPU: exact f64 squares,
//!   eight f64 lanes per fixed chunk, chunk sums combined in chunk order. CUDA: per thread in
//!   f64 (an aligned tensor's squares are first summed in f32 four at a time, ≤ 1.2e-7 relative
//!   on the norm, redone in f64 on overflow), one f64 partial per block (the grid sized by the
//!   tensor's length and pointer alignment only), partials reduced in f64 in a fixed order.
//!   Both are bitwise reproducible run to run.
//! - [`clip_grad_norm`]: PyTorch's `clip_grad_norm_` — scale every tensor in place by
//!   `max_norm / (norm + 1e-6)` when the norm exceeds `max_norm` — except that a NaN or
//!   infinite norm is returned *without* scaling anything, so the caller decides (skip the step,
//!   lower the loss scale, abort) instead of silently writing NaNs into every gradient.
//! - [`clip_scale`] gives the same factor without touching the tensors, for passing to the
//!   optimizer as its gradient pre-scale (`adamw`'s `grad_scale`) so clipping costs no pass.
//! - [`scale_`]: x *= s in place.

use rayon::prelude::*;
use smelt_engine::{bf16, f16, DType, Device, Error, Result, Tensor};

crate::kernel_source!("global_norm");

/// sqrt(Σ x²) over every element of every tensor (f32, bf16 or f16; all on one device).
/// An empty list, or only empty tensors, gives 0. NaN/Inf in any element propagate to the result.
pub fn global_norm(tensors: &[&Tensor]) -> Result<f32> {
    let Some(device) = check("global_norm", tensors)? else { return Ok(0.0) };
    match device {
        Device::Cpu => {
            let mut total = 0.0f64;
            for t in tensors {
                total += match t.dtype() {
                    DType::F32 => cpu::sum_squares(&t.cpu_read::<f32>()?),
                    DType::BF16 => cpu::sum_squares(&t.cpu_read::<bf16>()?),
                    DType::F16 => cpu::sum_squares(&t.cpu_read::<f16>()?),
                    dt => return Err(Error::UnsupportedDType { op: "global_norm", dtype: dt }),
                };
            }
            Ok(total.sqrt() as f32)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::global_norm(ord, tensors),
        #[cfg(not(feature = "cuda"))]
        d => Err(Error::UnsupportedDevice { op: "global_norm", device: d }),
    }
}

/// The factor clipping to `max_norm` applies: `max_norm / (norm + 1e-6)` when `norm > max_norm`
/// (PyTorch's `clip_grad_norm_` coefficient), else 1. A NaN or infinite norm gives 1: the
/// caller must check the norm itself (see [`clip_grad_norm`]).
pub fn clip_scale(norm: f32, max_norm: f32) -> f32 {
    if norm.is_finite() && norm > max_norm {
        (max_norm as f64 / (norm as f64 + 1e-6)) as f32
    } else {
        1.0
    }
}

/// Clips the global norm of `tensors` to `max_norm` in place. Returns `(norm_before, scale)`,
/// where `scale` is the factor applied (1 when the norm was within bounds).
///
/// A NaN or infinite norm is returned with `scale` = 1 and nothing modified: check
/// `norm_before.is_finite()` and skip the optimizer step (or stop) as your policy dictates.
/// `max_norm` must be positive and finite.
pub fn clip_grad_norm(tensors: &[&Tensor], max_norm: f32) -> Result<(f32, f32)> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::msg(format!("clip_grad_norm: max_norm must be positive and finite, got {max_norm}")));
    }
    let norm = global_norm(tensors)?;
    let s = clip_scale(norm, max_norm);
    if s != 1.0 {
        for t in tensors {
            scale_(t, s)?;
        }
    }
    Ok((norm, s))
}

/// x *= s in place (f32, bf16 or f16; half types round the product to nearest even).
pub fn scale_(x: &Tensor, s: f32) -> Result<()> {
    match x.device() {
        Device::Cpu => {
            match x.dtype() {
                DType::F32 => cpu::scale(&mut x.cpu_write::<f32>()?, s),
                DType::BF16 => cpu::scale(&mut x.cpu_write::<bf16>()?, s),
                DType::F16 => cpu::scale(&mut x.cpu_write::<f16>()?, s),
                dt => return Err(Error::UnsupportedDType { op: "scale_", dtype: dt }),
            }
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::scale(ord, x, s),
        #[cfg(not(feature = "cuda"))]
        d => Err(Error::UnsupportedDevice { op: "scale_", device: d }),
    }
}

/// Checks dtypes and devices; the common device, or `None` when there is nothing to sum.
fn check(op: &'static str, tensors: &[&Tensor]) -> Result<Option<Device>> {
    let Some(first) = tensors.first() else { return Ok(None) };
    for t in tensors {
        if !matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::UnsupportedDType { op, dtype: t.dtype() });
        }
        if t.device() != first.device() {
            return Err(Error::DeviceMismatch { op, a: first.device(), b: t.device() });
        }
    }
    Ok(Some(first.device()))
}

/// Slice-level CPU implementations (the reference for the CUDA kernels).
pub mod cpu {
    use super::*;
    use crate::cast::cpu::CastElem;

    const CHUNK: usize = 1 << 14;

    /// Σ x² in f64. Chunk sums are combined in chunk order, so the result does not depend on
    /// the thread count.
    pub fn sum_squares<T: CastElem>(x: &[T]) -> f64 {
        let partials: Vec<f64> =
            smelt_engine::cpu::pool().install(|| x.par_chunks(CHUNK).map(chunk_sum_squares).collect());
        partials.iter().sum()
    }

    /// Eight independent accumulators, so the adds pipeline and vectorise instead of forming
    /// one serial dependency chain.
    fn chunk_sum_squares<T: CastElem>(c: &[T]) -> f64 {
        let mut acc = [0.0f64; 8];
        let mut it = c.chunks_exact(8);
        for w in &mut it {
            for k in 0..8 {
                let f = w[k].to_f32() as f64;
                acc[k] += f * f;
            }
        }
        for (k, v) in it.remainder().iter().enumerate() {
            let f = v.to_f32() as f64;
            acc[k] += f * f;
        }
        acc.iter().sum()
    }

    /// x *= s, in f32 math.
    pub fn scale<T: CastElem>(x: &mut [T], s: f32) {
        smelt_engine::cpu::pool().install(|| {
            x.par_chunks_mut(CHUNK).for_each(|c| {
                for v in c {
                    *v = T::from_f32(s * v.to_f32());
                }
            })
        })
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{launch, Arg, LaunchCfg};

    const BLOCK: u32 = 256;
    /// Most partials per tensor. Fixed (not derived from the SM count) so results are identical
    /// on every device; 1024 blocks of 256 threads saturate HBM on an H100.
    const MAX_BLOCKS: u64 = 1024;

    fn plan(t: &Tensor) -> Result<(u64, bool, u32)> {
        let n = t.elem_count() as u64;
        let vec8 = t.cuda_ptr()? % 16 == 0;
        let per_step = if vec8 { 8 } else { 1 };
        let blocks = n.div_ceil(per_step * BLOCK as u64).clamp(1, MAX_BLOCKS) as u32;
        Ok((n, vec8, blocks))
    }

    pub fn global_norm(ord: usize, tensors: &[&Tensor]) -> Result<f32> {
        let mut plans = Vec::with_capacity(tensors.len());
        for t in tensors {
            if t.elem_count() > 0 {
                plans.push((*t, plan(t)?));
            }
        }
        if plans.is_empty() {
            return Ok(0.0);
        }
        let total: u64 = plans.iter().map(|(_, (_, _, b))| *b as u64).sum();
        let count = u32::try_from(total)
            .map_err(|_| Error::msg(format!("global_norm: {} tensors need {total} partials", tensors.len())))?;
        let dev = Device::Cuda(ord);
        // f64 partials; there is no f64 dtype, so a pair of u32 per slot (8-byte aligned).
        let partials = Tensor::empty(&[2 * total as usize], DType::U32, dev)?;
        let out = Tensor::empty(&[1], DType::F32, dev)?;
        let pp = partials.cuda_ptr()?;
        let mut slot = 0u64;
        for (t, (n, vec8, blocks)) in plans {
            let func = format!("sumsq_{}{}", t.dtype().name(), if vec8 { "_v8" } else { "" });
            let cfg = LaunchCfg { grid: (blocks, 1, 1), block: (BLOCK, 1, 1), smem: 0 };
            launch(ord, &SRC, &func, cfg, &[Arg::Ptr(t.cuda_ptr()?), Arg::U64(n), Arg::Ptr(pp + 8 * slot)])?;
            slot += blocks as u64;
        }
        let cfg = LaunchCfg { grid: (1, 1, 1), block: (1024, 1, 1), smem: 0 };
        launch(ord, &SRC, "sumsq_finish", cfg, &[Arg::Ptr(pp), Arg::U32(count), Arg::Ptr(out.cuda_ptr()?)])?;
        let v = out.to_vec::<f32>()?;
        Ok(v[0])
    }

    pub fn scale(ord: usize, x: &Tensor, s: f32) -> Result<()> {
        let n = x.elem_count() as u64;
        if n == 0 {
            return Ok(());
        }
        if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::UnsupportedDType { op: "scale_ (cuda)", dtype: x.dtype() });
        }
        let px = x.cuda_ptr()?;
        let vec8 = px % 16 == 0;
        let (suffix, count) = if vec8 { ("_v8", n / 8) } else { ("", n) };
        let func = format!("scale_{}{suffix}", x.dtype().name());
        let grid = count.div_ceil(BLOCK as u64).clamp(1, 132 * 16) as u32;
        let cfg = LaunchCfg { grid: (grid, 1, 1), block: (BLOCK, 1, 1), smem: 0 };
        launch(ord, &SRC, &func, cfg, &[Arg::Ptr(px), Arg::F32(s), Arg::U64(n)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use smelt_engine::Rng;

    /// A mix of dtypes and odd shapes: a dim of 1, rows not a multiple of 32, a long row.
    fn tensors(rng: &mut Rng, device: Device) -> Vec<Tensor> {
        let specs: [(&[usize], DType); 6] = [
            (&[1], DType::F32),
            (&[7, 33], DType::BF16),
            (&[3, 1, 151_936], DType::F32),
            (&[1000, 9], DType::F16),
            (&[2, 151_936], DType::BF16),
            (&[0, 5], DType::F32),
        ];
        specs
            .iter()
            .map(|(shape, dt)| {
                let n = shape.iter().product();
                let t = Tensor::from_slice(&randn(rng, n, 0.5), shape, Device::Cpu).unwrap().to_dtype(*dt).unwrap();
                t.to_device(device).unwrap()
            })
            .collect()
    }

    fn reference(ts: &[Tensor]) -> f64 {
        ts.iter().flat_map(|t| t.to_vec_f32().unwrap()).map(|x| x as f64 * x as f64).sum::<f64>().sqrt()
    }

    #[test]
    fn global_norm_matches_f64_over_mixed_dtypes() {
        let mut rng = Rng::new(21);
        let ts = tensors(&mut rng, Device::Cpu);
        let refs: Vec<&Tensor> = ts.iter().collect();
        let got = global_norm(&refs).unwrap();
        assert_close(&[got], &[reference(&ts)], 0.0, 1e-7, "global_norm");
        assert_eq!(global_norm(&refs).unwrap().to_bits(), got.to_bits(), "reproducible");
        assert_eq!(global_norm(&[]).unwrap(), 0.0);
        let one = Tensor::from_slice(&[3.0f32, -4.0], &[2], Device::Cpu).unwrap();
        assert_eq!(global_norm(&[&one]).unwrap(), 5.0);
    }

    #[test]
    fn clip_scales_only_above_max_norm() {
        let mut rng = Rng::new(22);
        let ts = tensors(&mut rng, Device::Cpu);
        let refs: Vec<&Tensor> = ts.iter().collect();
        let before: Vec<Vec<f32>> = ts.iter().map(|t| t.to_vec_f32().unwrap()).collect();
        let norm = reference(&ts);

        // Within bounds: nothing changes, bit for bit.
        let (n0, s0) = clip_grad_norm(&refs, norm as f32 * 2.0).unwrap();
        assert_eq!(s0, 1.0);
        assert_close(&[n0], &[norm], 0.0, 1e-7, "norm");
        for (t, b) in ts.iter().zip(&before) {
            assert_eq!(&t.to_vec_f32().unwrap(), b);
        }

        // Above: every tensor scaled by max / (norm + 1e-6); the new norm is max_norm.
        let max = norm as f32 / 3.0;
        let (n1, s1) = clip_grad_norm(&refs, max).unwrap();
        let want_s = max as f64 / (n1 as f64 + 1e-6);
        assert_close(&[s1], &[want_s], 0.0, 1e-7, "scale");
        for (t, b) in ts.iter().zip(&before) {
            let want: Vec<f64> = b.iter().map(|&x| x as f64 * s1 as f64).collect();
            // atol: half of f16's denormal spacing (2^-24).
            assert_close(&t.to_vec_f32().unwrap(), &want, 3e-8, t.dtype().epsilon() / 2.0, "scaled");
        }
        assert_close(&[global_norm(&refs).unwrap()], &[max as f64], 0.0, 1e-3, "norm after clip");
        assert!(clip_grad_norm(&refs, 0.0).is_err() && clip_grad_norm(&refs, f32::NAN).is_err());
    }

    #[test]
    fn non_finite_norm_is_reported_not_applied() {
        for bad in [f32::NAN, f32::INFINITY] {
            let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0], &[3], Device::Cpu).unwrap();
            let b = Tensor::from_slice(&[bf16::from_f32(bad), bf16::ONE], &[2], Device::Cpu).unwrap();
            let (n, s) = clip_grad_norm(&[&a, &b], 1.0).unwrap();
            assert!(!n.is_finite() && (bad.is_nan() == n.is_nan()), "{bad}: norm {n}");
            assert_eq!(s, 1.0);
            assert_eq!(a.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
            assert_eq!(clip_scale(n, 1.0), 1.0);
        }
        // Squares overflow f32 but not the f64 accumulator.
        let big = Tensor::from_slice(&[1e30f32, 1e30], &[2], Device::Cpu).unwrap();
        assert_close(&[global_norm(&[&big]).unwrap()], &[2f64.sqrt() * 1e30], 0.0, 1e-6, "large");
    }

    /// 2^25 f32 values where an f32 running sum of squares fails: 1.0 at every 8th element of
    /// the first 2^21 (the first element each CUDA thread reads: 1024 blocks × 256 threads × 8
    /// per step), 2^-12.5 everywhere else, whose square 2^-25 is under half an f32 ulp of any
    /// sum ≥ 1. Per-thread f32 accumulation drops all of them (the norm comes out ~30 ulp low).
    fn large_and_small() -> (Tensor, f64) {
        let n = 1usize << 25;
        let small = 2f32.powf(-12.5);
        let x: Vec<f32> = (0..n).map(|i| if i % 8 == 0 && i < 1 << 21 { 1.0 } else { small }).collect();
        let want = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        (Tensor::from_slice(&x, &[n], Device::Cpu).unwrap(), want)
    }

    #[test]
    fn global_norm_keeps_small_squares_beside_large_ones() {
        // The CPU sums exact f64 squares (8 lanes per 16k chunk, chunks in order): ~1e-12
        // relative at 500M elements, so the f32 result is the correctly rounded norm.
        let (x, want) = large_and_small();
        assert_eq!(global_norm(&[&x]).unwrap(), want as f32);
        let (a, b) = (x.narrow_rows(0, 1000).unwrap(), x.narrow_rows(1000, (1 << 25) - 1000).unwrap());
        assert_eq!(global_norm(&[&a, &b]).unwrap(), want as f32, "split across tensors");
    }

    #[test]
    fn errors_name_the_op() {
        let a = Tensor::zeros(&[2], DType::F32, Device::Cpu).unwrap();
        let ids = Tensor::zeros(&[2], DType::I32, Device::Cpu).unwrap();
        let e = global_norm(&[&a, &ids]).unwrap_err().to_string();
        assert!(e.contains("global_norm") && e.contains("i32"), "{e}");
    }

    #[test]
    fn device_matches_cpu() {
        let Some(dev) = test_cuda_device() else { return };
        let mut rng = Rng::new(23);
        let cpu_ts = tensors(&mut rng, Device::Cpu);
        let dev_ts: Vec<Tensor> = cpu_ts.iter().map(|t| t.to_device(dev).unwrap()).collect();
        // One-element offset views of the flattened tensors take the unaligned (scalar) path.
        let offset = |t: &Tensor| {
            let n = t.elem_count();
            t.reshape(&[n]).unwrap().narrow_rows(1, n - 1).unwrap()
        };
        let views: Vec<Tensor> = dev_ts.iter().filter(|t| t.elem_count() > 1).map(offset).collect();
        let cpu_views: Vec<Tensor> = cpu_ts.iter().filter(|t| t.elem_count() > 1).map(offset).collect();
        for (d, c, tag) in [(&dev_ts, &cpu_ts, "aligned"), (&views, &cpu_views, "offset")] {
            let dr: Vec<&Tensor> = d.iter().collect();
            let got = global_norm(&dr).unwrap();
            // f64 accumulation: only 4-element f32 groups round (≤ 1.2e-7) plus the f32 result.
            assert_close(&[got], &[reference(c)], 0.0, 3e-7, &format!("global_norm {tag}"));
            assert_eq!(global_norm(&dr).unwrap().to_bits(), got.to_bits(), "deterministic ({tag})");
        }
        // Clipping on device = clipping on the CPU (same f32 scale, same rounding).
        let max = reference(&cpu_ts) as f32 / 2.0;
        let dr: Vec<&Tensor> = dev_ts.iter().collect();
        let (_, sd) = clip_grad_norm(&dr, max).unwrap();
        for t in &cpu_ts {
            scale_(t, sd).unwrap();
        }
        for (d, c) in dev_ts.iter().zip(&cpu_ts) {
            assert_eq!(d.to_bytes().unwrap(), c.to_bytes().unwrap(), "scale_ {:?} {}", d.shape(), d.dtype());
        }
        // Odd lengths and an unaligned view for scale_.
        for n in [1usize, 9, 1023] {
            let x = Tensor::from_slice(&randn(&mut rng, n + 1, 1.0), &[n + 1], Device::Cpu).unwrap();
            let xd = x.to_device(dev).unwrap();
            let (v, vd) = (x.narrow_rows(1, n).unwrap(), xd.narrow_rows(1, n).unwrap());
            scale_(&v, -0.3).unwrap();
            scale_(&vd, -0.3).unwrap();
            assert_eq!(xd.to_vec::<f32>().unwrap(), x.to_vec::<f32>().unwrap(), "scale_ offset n={n}");
        }
        // A NaN on device is reported and nothing is scaled.
        let bad = Tensor::from_slice(&[1.0f32, f32::NAN, 2.0], &[3], Device::Cpu).unwrap().to_device(dev).unwrap();
        let (n, s) = clip_grad_norm(&[&bad], 1.0).unwrap();
        assert!(n.is_nan() && s == 1.0);
        assert_eq!(bad.to_vec::<f32>().unwrap()[2], 2.0);
    }

    #[test]
    fn device_global_norm_accumulates_in_f64() {
        let Some(dev) = test_cuda_device() else { return };
        // Small squares beside large ones: an f32 per-thread sum is 1.9e-6 low here; the f64
        // path's worst case is ~1.8e-7 (4-element f32 groups plus the f32 result), and a
        // host simulation of its arithmetic on this data gives 1.04e-7.
        let (x, want) = large_and_small();
        let xd = x.to_device(dev).unwrap();
        let got = global_norm(&[&xd]).unwrap();
        assert_close(&[got], &[want], 0.0, 2e-7, "aligned (vector path)");
        let n = x.elem_count();
        let (v, vd) = (x.narrow_rows(1, n - 1).unwrap(), xd.narrow_rows(1, n - 1).unwrap());
        let want_v = v.to_vec_f32().unwrap().iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt();
        assert_close(&[global_norm(&[&vd]).unwrap()], &[want_v], 0.0, 2e-7, "offset (scalar path)");
        // Squares that overflow f32 give a finite norm, as on the CPU, in both paths.
        let mut big = vec![0.5f32; 17];
        big[3] = 1e30;
        big[12] = -2e30;
        for dt in [DType::F32, DType::BF16] {
            let t = Tensor::from_slice(&big, &[17], Device::Cpu).unwrap().to_dtype(dt).unwrap();
            let td = t.to_device(dev).unwrap();
            let want = global_norm(&[&t]).unwrap();
            assert!(want.is_finite() && want > 2e30, "{dt}: cpu {want}");
            assert_close(&[global_norm(&[&td]).unwrap()], &[want as f64], 0.0, 1e-6, &format!("big {dt} aligned"));
            let (o, od) = (t.narrow_rows(1, 16).unwrap(), td.narrow_rows(1, 16).unwrap());
            let want = global_norm(&[&o]).unwrap();
            assert_close(&[global_norm(&[&od]).unwrap()], &[want as f64], 0.0, 1e-6, &format!("big {dt} offset"));
        }
    }
}
