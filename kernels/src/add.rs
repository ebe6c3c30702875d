//! Elementwise residual ops: `add` (out = a + b), `scale` (out = s·x), and the fused
//! `axpby` (out = sa·a + sb·b) they share, plus the in-place `add_scaled_` (dst += s·src) used
//! for residual streams and gradient accumulation.
//!
//! Also the row-broadcast `add_bias_` (x[r, :] += b, for Qwen2's q/k/v biases) and its
//! backward `bias_grad` (db = Σ_rows dout).
//!
//! Backward: for out = sa·a + sb·b, da = sa·dout and db = sb·dout — see [`add_backward`].
//! Dtypes: f32, and bf16/f16 storage with f32 math (f16 on CPU only).

use rayon::prelude::*;
use smelt_engine::{bf16, f16, DType, Device, Error, Result, Tensor};

crate::kernel_source!("add");

/// out = a + b.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    axpby(1.0, a, 1.0, b)
}

/// out = s·x.
pub fn scale(x: &Tensor, s: f32) -> Result<Tensor> {
    axpby(s, x, 0.0, x)
}

/// dst += s·src, in place (dst must not share storage with src).
pub fn add_scaled_(dst: &Tensor, s: f32, src: &Tensor) -> Result<()> {
    check("add_scaled_", dst, src)?;
    run(1.0, dst, s, src, dst)
}

/// Gradients of out = sa·a + sb·b: (sa·dout, sb·dout).
pub fn add_backward(dout: &Tensor, sa: f32, sb: f32) -> Result<(Tensor, Tensor)> {
    Ok((scale(dout, sa)?, scale(dout, sb)?))
}

/// out = sa·a + sb·b.
pub fn axpby(sa: f32, a: &Tensor, sb: f32, b: &Tensor) -> Result<Tensor> {
    check("add", a, b)?;
    let out = Tensor::empty(a.shape(), a.dtype(), a.device())?;
    run(sa, a, sb, b, &out)?;
    Ok(out)
}

/// `x[r, :] += bias` for every row r, in place. `x` is `[rows, D]` (any leading dims), `bias` is `[D]`
/// of the same dtype.
pub fn add_bias_(x: &Tensor, bias: &Tensor) -> Result<()> {
    let (rows, d) = x.rows_cols();
    if bias.elem_count() != d || bias.dtype() != x.dtype() {
        return Err(Error::shape(
            "add_bias_",
            format!("x {:?} {} vs bias {:?} {}", x.shape(), x.dtype(), bias.shape(), bias.dtype()),
        ));
    }
    if x.device() != bias.device() {
        return Err(Error::DeviceMismatch { op: "add_bias_", a: x.device(), b: bias.device() });
    }
    match x.device() {
        Device::Cpu => {
            let b = bias.to_vec_f32()?;
            match x.dtype() {
                DType::F32 => cpu::add_bias_(&mut x.cpu_write::<f32>()?, &b, rows, d),
                DType::BF16 => cpu::add_bias_via(&mut x.cpu_write::<bf16>()?, &b, d, |v| v.to_f32(), bf16::from_f32),
                DType::F16 => cpu::add_bias_via(&mut x.cpu_write::<f16>()?, &b, d, |v| v.to_f32(), f16::from_f32),
                dt => return Err(Error::UnsupportedDType { op: "add_bias_", dtype: dt }),
            }
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda_bias::add_bias_(ord, x, bias, rows, d),
        #[cfg(not(feature = "cuda"))]
        d => Err(Error::UnsupportedDevice { op: "add_bias_", device: d }),
    }
}

/// Gradient of a broadcast bias: Σ over rows of `dout` `[rows, D]`, as f32 `[D]`.
///
/// On CUDA this is a column-sum kernel; the sum is taken in f32 per column (deterministic).
pub fn bias_grad(dout: &Tensor) -> Result<Tensor> {
    let (rows, d) = dout.rows_cols();
    match dout.device() {
        Device::Cpu => {
            let g = dout.to_vec_f32()?;
            Tensor::from_slice(&cpu::column_sum(&g, rows, d), &[d], Device::Cpu)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => {
            let out = Tensor::empty(&[d], DType::F32, dout.device())?;
            cuda_bias::bias_grad(ord, dout, rows, d, &out, false)?;
            Ok(out)
        }
        #[cfg(not(feature = "cuda"))]
        dev => Err(Error::UnsupportedDevice { op: "bias_grad", device: dev }),
    }
}

/// `db += bias_grad(dout)` for an f32 `[D]` gradient `db` accumulated in place (on CUDA in the
/// column sum's last pass: no separate add).
pub fn bias_grad_into(dout: &Tensor, db: &Tensor) -> Result<()> {
    let (rows, d) = dout.rows_cols();
    crate::check_accumulator("bias_grad_into", "db", db, d, dout.device())?;
    match dout.device() {
        Device::Cpu => {
            let sums = cpu::column_sum(&dout.to_vec_f32()?, rows, d);
            db.cpu_write::<f32>()?.iter_mut().zip(sums).for_each(|(a, s)| *a += s);
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda_bias::bias_grad(ord, dout, rows, d, db, true),
        #[cfg(not(feature = "cuda"))]
        dev => Err(Error::UnsupportedDevice { op: "bias_grad_into", device: dev }),
    }
}

fn check(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() || a.dtype() != b.dtype() {
        return Err(Error::shape(op, format!("{:?} {} vs {:?} {}", a.shape(), a.dtype(), b.shape(), b.dtype())));
    }
    if a.device() != b.device() {
        return Err(Error::DeviceMismatch { op, a: a.device(), b: b.device() });
    }
    Ok(())
}

fn run(sa: f32, a: &Tensor, sb: f32, b: &Tensor, out: &Tensor) -> Result<()> {
    match out.device() {
        Device::Cpu => {
            // `out` may be `a` (in-place): read a copy of a first in that case.
            let a_owned;
            let a_vals: Vec<f32>;
            let a_ref: &[f32] = if out.same_storage(a) {
                a_owned = a.to_vec_f32()?;
                &a_owned
            } else {
                a_vals = a.to_vec_f32()?;
                &a_vals
            };
            let b_vals = b.to_vec_f32()?;
            match out.dtype() {
                DType::F32 => cpu::axpby(sa, a_ref, sb, &b_vals, &mut out.cpu_write::<f32>()?),
                DType::BF16 => cpu::axpby_to(sa, a_ref, sb, &b_vals, &mut out.cpu_write::<bf16>()?, bf16::from_f32),
                DType::F16 => cpu::axpby_to(sa, a_ref, sb, &b_vals, &mut out.cpu_write::<f16>()?, f16::from_f32),
                dt => return Err(Error::UnsupportedDType { op: "add", dtype: dt }),
            }
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::axpby(ord, sa, a, sb, b, out),
        #[cfg(not(feature = "cuda"))]
        d => Err(Error::UnsupportedDevice { op: "add", device: d }),
    }
}

/// Slice-level CPU implementations (the reference for the CUDA kernels).
pub mod cpu {
    use super::*;

    const CHUNK: usize = 1 << 14;

    pub fn axpby(sa: f32, a: &[f32], sb: f32, b: &[f32], out: &mut [f32]) {
        axpby_to(sa, a, sb, b, out, |x| x)
    }

    pub fn add_bias_(x: &mut [f32], b: &[f32], _rows: usize, d: usize) {
        add_bias_via(x, b, d, |v| v, |v| v)
    }

    /// Generic over the conversions (not `fn` pointers) so the f32 case compiles to a plain
    /// vectorised loop.
    pub fn add_bias_via<T: Copy + Send>(
        x: &mut [T],
        b: &[f32],
        d: usize,
        load: impl Fn(T) -> f32 + Sync,
        store: impl Fn(f32) -> T + Sync,
    ) {
        if d == 0 {
            return;
        }
        // Whole rows per task, about CHUNK elements each: one task per row drowns short rows
        // in scheduling overhead.
        let rows_per_task = (CHUNK / d).max(1);
        smelt_engine::cpu::pool().install(|| {
            x.par_chunks_mut(d * rows_per_task).for_each(|rows| {
                for row in rows.chunks_exact_mut(d) {
                    for (v, b) in row.iter_mut().zip(b) {
                        *v = store(load(*v) + b);
                    }
                }
            })
        })
    }

    /// Σ over rows of a [rows, d] matrix, accumulated in f64 per column. Each task sums a
    /// block of rows into its own f64 column vector (reading rows contiguously), then the
    /// blocks' vectors are added in block order, so the result does not depend on threads.
    pub fn column_sum(g: &[f32], rows: usize, d: usize) -> Vec<f32> {
        if d == 0 {
            return Vec::new();
        }
        let rows_per_task = (CHUNK / d).max(1);
        let partials: Vec<Vec<f64>> = smelt_engine::cpu::pool().install(|| {
            g[..rows * d]
                .par_chunks(d * rows_per_task)
                .map(|block| {
                    let mut acc = vec![0f64; d];
                    for row in block.chunks_exact(d) {
                        for (a, &x) in acc.iter_mut().zip(row) {
                            *a += x as f64;
                        }
                    }
                    acc
                })
                .collect()
        });
        let mut sum = vec![0f64; d];
        for p in &partials {
            for (s, x) in sum.iter_mut().zip(p) {
                *s += x;
            }
        }
        sum.into_iter().map(|x| x as f32).collect()
    }

    pub fn axpby_to<T: Send>(sa: f32, a: &[f32], sb: f32, b: &[f32], out: &mut [T], conv: impl Fn(f32) -> T + Sync) {
        smelt_engine::cpu::pool().install(|| {
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
                let base = c * CHUNK;
                for (i, o) in o.iter_mut().enumerate() {
                    *o = conv(sa * a[base + i] + sb * b[base + i]);
                }
            })
        })
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{launch, Arg, LaunchCfg};

    pub fn axpby(ord: usize, sa: f32, a: &Tensor, sb: f32, b: &Tensor, out: &Tensor) -> Result<()> {
        let n = out.elem_count() as u64;
        if n == 0 {
            return Ok(());
        }
        let (pa, pb, po) = (a.cuda_ptr()?, b.cuda_ptr()?, out.cuda_ptr()?);
        let aligned = n % 4 == 0 && [pa, pb, po].iter().all(|p| p % 16 == 0);
        let (func, count) = match (out.dtype(), aligned) {
            (DType::F32, true) => ("add_f32_v4", n / 4),
            (DType::F32, false) => ("add_f32", n),
            (DType::BF16, true) => ("add_bf16_v4", n / 4),
            (DType::BF16, false) => ("add_bf16", n),
            (dt, _) => return Err(Error::UnsupportedDType { op: "add (cuda)", dtype: dt }),
        };
        let block = 256u32;
        let grid = count.div_ceil(block as u64).clamp(1, 132 * 16) as u32;
        let cfg = LaunchCfg { grid: (grid, 1, 1), block: (block, 1, 1), smem: 0 };
        launch(
            ord,
            &SRC,
            func,
            cfg,
            &[Arg::Ptr(po), Arg::Ptr(pa), Arg::Ptr(pb), Arg::F32(sa), Arg::F32(sb), Arg::U64(count)],
        )
    }
}

#[cfg(feature = "cuda")]
mod cuda_bias {
    use super::*;
    use crate::cuda::{launch, Arg, LaunchCfg};

    pub fn add_bias_(ord: usize, x: &Tensor, bias: &Tensor, rows: usize, d: usize) -> Result<()> {
        let n = (rows * d) as u64;
        if n == 0 {
            return Ok(());
        }
        let func = match x.dtype() {
            DType::F32 => "add_bias_f32",
            DType::BF16 => "add_bias_bf16",
            dt => return Err(Error::UnsupportedDType { op: "add_bias_ (cuda)", dtype: dt }),
        };
        let grid = n.div_ceil(256).clamp(1, 132 * 16) as u32;
        let cfg = LaunchCfg { grid: (grid, 1, 1), block: (256, 1, 1), smem: 0 };
        launch(
            ord,
            &SRC,
            func,
            cfg,
            &[Arg::Ptr(x.cuda_ptr()?), Arg::Ptr(bias.cuda_ptr()?), Arg::U64(n), Arg::U32(d as u32)],
        )
    }

    /// The column sums of `dout` into `out` (`add`: added to what it holds).
    pub fn bias_grad(ord: usize, dout: &Tensor, rows: usize, d: usize, out: &Tensor, add: bool) -> Result<()> {
        if d == 0 {
            return Ok(());
        }
        let func = match dout.dtype() {
            DType::F32 => "column_sum_partial_f32",
            DType::BF16 => "column_sum_partial_bf16",
            dt => return Err(Error::UnsupportedDType { op: "bias_grad (cuda)", dtype: dt }),
        };
        let too_big = || Error::shape("bias_grad (cuda)", format!("dout {:?} exceeds u32 indexing", dout.shape()));
        let (rows32, d32) = (u32::try_from(rows).map_err(|_| too_big())?, u32::try_from(d).map_err(|_| too_big())?);
        // v2: fixed row chunks summed in parallel (one thread per column, 128 columns per block,
        // coalesced row reads), then an ordered sum of the chunks. The v1 kernel (one thread per
        // column over every row) has only d threads in all: a few warps for d = 128, so it is
        // latency-bound on long inputs. Chunking depends on `rows` only: deterministic.
        let (chunks, per) = column_chunks(rows);
        let partial = Tensor::empty(&[chunks, d], DType::F32, dout.device())?;
        let block = 128u32;
        let cols = d32.div_ceil(block);
        let cfg = LaunchCfg { grid: (cols, chunks as u32, 1), block: (block, 1, 1), smem: 0 };
        let args = [
            Arg::Ptr(partial.cuda_ptr()?),
            Arg::Ptr(dout.cuda_ptr()?),
            Arg::U32(rows32),
            Arg::U32(d32),
            Arg::U32(per as u32),
        ];
        launch(ord, &SRC, func, cfg, &args)?;
        let cfg = LaunchCfg { grid: (cols, 1, 1), block: (block, 1, 1), smem: 0 };
        let args = [
            Arg::Ptr(out.cuda_ptr()?),
            Arg::Ptr(partial.cuda_ptr()?),
            Arg::U32(chunks as u32),
            Arg::U32(d32),
            Arg::U32(add as u32),
        ];
        launch(ord, &SRC, "column_sum_reduce", cfg, &args)
    }

    /// `(chunks, rows per chunk)` for the column sum: at most 256 chunks of at least 64 rows
    /// (one chunk of one empty row when `rows` is 0).
    pub(super) fn column_chunks(rows: usize) -> (usize, usize) {
        let chunks = rows.div_ceil(64).clamp(1, 256);
        let per = rows.div_ceil(chunks).max(1);
        (rows.div_ceil(per).max(1), per)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use smelt_engine::Rng;

    fn reference(sa: f32, a: &[f32], sb: f32, b: &[f32]) -> Vec<f64> {
        a.iter().zip(b).map(|(x, y)| sa as f64 * *x as f64 + sb as f64 * *y as f64).collect()
    }

    #[test]
    fn add_scale_axpby_match_f64_on_odd_shapes() {
        let mut rng = Rng::new(3);
        for shape in [vec![1usize], vec![7, 33], vec![3, 1, 151_936], vec![1000, 9]] {
            let n: usize = shape.iter().product();
            let (av, bv) = (randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
            let a = Tensor::from_slice(&av, &shape, Device::Cpu).unwrap();
            let b = Tensor::from_slice(&bv, &shape, Device::Cpu).unwrap();
            assert_close(&add(&a, &b).unwrap().to_vec().unwrap(), &reference(1.0, &av, 1.0, &bv), 1e-6, 1e-6, "add");
            assert_close(
                &scale(&a, -0.37).unwrap().to_vec().unwrap(),
                &reference(-0.37, &av, 0.0, &bv),
                1e-6,
                1e-6,
                "scale",
            );
            let want = reference(1.0, &av, 2.5, &bv);
            add_scaled_(&a, 2.5, &b).unwrap();
            assert_close(&a.to_vec().unwrap(), &want, 1e-6, 1e-6, "add_scaled_");
            // bf16 storage, f32 math: one rounding of the exact result.
            let (ah, bh) = (a.to_dtype(DType::BF16).unwrap(), b.to_dtype(DType::BF16).unwrap());
            let want = reference(1.0, &ah.to_vec_f32().unwrap(), 1.0, &bh.to_vec_f32().unwrap());
            assert_close(
                &add(&ah, &bh).unwrap().to_vec_f32().unwrap(),
                &want,
                1e-30,
                DType::BF16.epsilon() / 2.0,
                "add bf16",
            );
        }
    }

    #[test]
    fn add_backward_by_finite_differences() {
        let mut rng = Rng::new(4);
        let (av, bv, gv) = (randn(&mut rng, 5, 1.0), randn(&mut rng, 5, 1.0), randn(&mut rng, 5, 1.0));
        let (sa, sb) = (0.7f32, -1.3f32);
        let g = Tensor::from_slice(&gv, &[5], Device::Cpu).unwrap();
        let (da, db) = add_backward(&g, sa, sb).unwrap();
        // L = Σ g·(sa·a + sb·b)
        let loss = |a: &[f64], b: &[f64]| -> f64 {
            (0..5).map(|i| gv[i] as f64 * (sa as f64 * a[i] + sb as f64 * b[i])).sum()
        };
        let (a64, b64) = (to_f64(&av), to_f64(&bv));
        assert_close(&da.to_vec().unwrap(), &finite_diff(|a| loss(a, &b64), &a64, 1e-5), 1e-6, 1e-6, "da");
        assert_close(&db.to_vec().unwrap(), &finite_diff(|b| loss(&a64, b), &b64, 1e-5), 1e-6, 1e-6, "db");
    }

    #[test]
    fn add_bias_and_bias_grad_match_f64() {
        let mut rng = Rng::new(6);
        for (rows, d) in [(1usize, 1usize), (7, 37), (64, 100)] {
            let xv = randn(&mut rng, rows * d, 1.0);
            let bv = randn(&mut rng, d, 1.0);
            let x = Tensor::from_slice(&xv, &[rows, d], Device::Cpu).unwrap();
            add_bias_(&x, &Tensor::from_slice(&bv, &[d], Device::Cpu).unwrap()).unwrap();
            let want: Vec<f64> = (0..rows * d).map(|i| xv[i] as f64 + bv[i % d] as f64).collect();
            assert_close(&x.to_vec().unwrap(), &want, 1e-6, 1e-6, "add_bias_");
            // L = Σ g ∘ (x + b) ⇒ dL/db = column sums of g; checked by finite differences.
            let g = randn(&mut rng, rows * d, 1.0);
            let loss = |b: &[f64]| (0..rows * d).map(|i| g[i] as f64 * (xv[i] as f64 + b[i % d])).sum::<f64>();
            let gt = Tensor::from_slice(&g, &[rows, d], Device::Cpu).unwrap();
            let db = bias_grad(&gt).unwrap();
            assert_close(&db.to_vec().unwrap(), &finite_diff(loss, &to_f64(&bv), 1e-4), 1e-4, 1e-5, "bias_grad");
            // Accumulated into a gradient: what it held plus the same sums.
            let acc = Tensor::full(2.0, &[d], DType::F32, Device::Cpu).unwrap();
            bias_grad_into(&gt, &acc).unwrap();
            let want: Vec<f32> = db.to_vec::<f32>().unwrap().iter().map(|x| 2.0 + x).collect();
            assert_eq!(acc.to_vec::<f32>().unwrap(), want, "bias_grad_into");
            let e = bias_grad_into(&gt, &Tensor::zeros(&[d + 1], DType::F32, Device::Cpu).unwrap()).unwrap_err();
            assert!(e.to_string().contains("bias_grad_into"), "{e}");
        }
        let x = Tensor::zeros(&[2, 3], DType::F32, Device::Cpu).unwrap();
        let e = add_bias_(&x, &Tensor::zeros(&[4], DType::F32, Device::Cpu).unwrap()).unwrap_err().to_string();
        assert!(e.contains("add_bias_") && e.contains("[4]"), "{e}");
    }

    #[test]
    fn shape_mismatch_names_the_op() {
        let a = Tensor::zeros(&[2, 3], DType::F32, Device::Cpu).unwrap();
        let b = Tensor::zeros(&[3, 2], DType::F32, Device::Cpu).unwrap();
        let e = add(&a, &b).unwrap_err().to_string();
        assert!(e.contains("add") && e.contains("[2, 3]"), "{e}");
    }

    /// The CUDA column sum's row chunks cover every row once, none empty, at most 256 of them.
    #[cfg(feature = "cuda")]
    #[test]
    fn column_chunks_cover_the_rows() {
        for rows in [0usize, 1, 63, 64, 65, 300, 16_383, 16_384, 16_385, 1 << 20, (1 << 20) + 7] {
            let (chunks, per) = cuda_bias::column_chunks(rows);
            assert!((1..=256).contains(&chunks) && per >= 1, "rows {rows}: {chunks} x {per}");
            assert!(chunks * per >= rows && (chunks - 1) * per < rows.max(1), "rows {rows}: {chunks} x {per}");
        }
    }

    #[test]
    fn device_matches_cpu() {
        let Some(dev) = test_cuda_device() else { return };
        let mut rng = Rng::new(5);
        for n in [1usize, 3, 4, 1023, 151_936] {
            for dt in [DType::F32, DType::BF16] {
                let a = Tensor::from_slice(&randn(&mut rng, n, 1.0), &[n], Device::Cpu).unwrap().to_dtype(dt).unwrap();
                let b = Tensor::from_slice(&randn(&mut rng, n, 1.0), &[n], Device::Cpu).unwrap().to_dtype(dt).unwrap();
                let want = axpby(0.5, &a, -2.0, &b).unwrap().to_vec_f32().unwrap();
                let got = axpby(0.5, &a.to_device(dev).unwrap(), -2.0, &b.to_device(dev).unwrap()).unwrap();
                assert_close(
                    &got.to_vec_f32().unwrap(),
                    &to_f64(&want),
                    1e-6,
                    dt.epsilon(),
                    &format!("add {dt} n={n}"),
                );
            }
        }
        for (rows, d) in [(1usize, 1usize), (33, 37), (300, 896), (16_385, 128)] {
            for dt in [DType::F32, DType::BF16] {
                let x = Tensor::from_slice(&randn(&mut rng, rows * d, 1.0), &[rows, d], Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let b = Tensor::from_slice(&randn(&mut rng, d, 1.0), &[d], Device::Cpu).unwrap().to_dtype(dt).unwrap();
                let xd = x.to_device(dev).unwrap();
                add_bias_(&x, &b).unwrap();
                add_bias_(&xd, &b.to_device(dev).unwrap()).unwrap();
                let want = to_f64(&x.to_vec_f32().unwrap());
                assert_close(
                    &xd.to_vec_f32().unwrap(),
                    &want,
                    1e-6,
                    dt.epsilon(),
                    &format!("add_bias_ {dt} {rows}x{d}"),
                );
                let g = Tensor::from_slice(&randn(&mut rng, rows * d, 1.0), &[rows, d], Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let want = to_f64(&bias_grad(&g).unwrap().to_vec::<f32>().unwrap());
                let got = bias_grad(&g.to_device(dev).unwrap()).unwrap().to_vec::<f32>().unwrap();
                // f32 sums over `rows` (fixed chunks on CUDA) against the CPU's f64 sum.
                let atol = 1e-4 + 8e-6 * (rows as f64).sqrt();
                assert_close(&got, &want, atol, 1e-5, &format!("bias_grad {dt} {rows}x{d}"));
                // Accumulated in the column sum's last pass: acc + the same sums.
                let start: Vec<f32> = (0..d).map(|j| j as f32 - 3.0).collect();
                let acc = Tensor::from_slice(&start, &[d], dev).unwrap();
                bias_grad_into(&g.to_device(dev).unwrap(), &acc).unwrap();
                let sum: Vec<f32> = start.iter().zip(&got).map(|(a, b)| a + b).collect();
                assert_eq!(acc.to_vec::<f32>().unwrap(), sum, "bias_grad_into {dt} {rows}x{d}");
            }
        }
    }
}
