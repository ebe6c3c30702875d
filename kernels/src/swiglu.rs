//! SwiGLU, the activation of Qwen's MLP: out = silu(gate) · up, with silu(g) = g / (1 + e^−g).
//!
//! Two layouts:
//! - [`swiglu`]: `gate` and `up` are separate tensors of the same shape.
//! - [`swiglu_fused`]: one `[rows, 2·I]` tensor holding the concatenated gate|up projection
//!   output (first half of each row gate, second half up), giving `[rows, I]`.
//!
//! Backward: with σ = sigmoid(g), dgate = dy · up · σ·(1 + g·(1 − σ)) and dup = dy · silu(g).
//!
//! Dtypes: f32, and bf16 storage with f32 math. For bf16 the forward rounds silu(gate) to bf16
//! before multiplying by up, as Hugging Face's `act_fn(gate_proj(x)) * up_proj(x)` does in a
//! bf16 model (two bf16 ops, two roundings).

use rayon::prelude::*;
use smelt_engine::{bf16, DType, Device, Error, Result, Tensor, WithDType};

crate::kernel_source!("swiglu");

/// out = silu(gate) · up (same shape and dtype).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    check_same("swiglu", &[("gate", gate), ("up", up)])?;
    let out = Tensor::empty(gate.shape(), gate.dtype(), gate.device())?;
    let n = gate.elem_count();
    let l = Layout { fused: false, rows: 1, cols: n, gate_off: 0, up_off: 0, in_stride: n, out_stride: n };
    forward(gate, up, &out, l)?;
    Ok(out)
}

/// Gradients of [`swiglu`]: `(dgate, dup)` in the inputs' dtype.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    check_same("swiglu_backward", &[("gate", gate), ("up", up), ("dy", dy)])?;
    let dgate = Tensor::empty(gate.shape(), gate.dtype(), gate.device())?;
    let dup = Tensor::empty(gate.shape(), gate.dtype(), gate.device())?;
    let n = gate.elem_count();
    let l = Layout { fused: false, rows: 1, cols: n, gate_off: 0, up_off: 0, in_stride: n, out_stride: n };
    backward(gate, up, dy, &dgate, &dup, l)?;
    Ok((dgate, dup))
}

/// `gate_up [.., 2·I]` (gate | up along the last dim) → `silu(gate) · up` of shape `[.., I]`.
pub fn swiglu_fused(gate_up: &Tensor) -> Result<Tensor> {
    let (rows, i) = fused_dims("swiglu_fused", gate_up)?;
    let mut shape = gate_up.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = i;
    }
    let out = Tensor::empty(&shape, gate_up.dtype(), gate_up.device())?;
    let l = Layout { fused: true, rows, cols: i, gate_off: 0, up_off: i, in_stride: 2 * i, out_stride: i };
    forward(gate_up, gate_up, &out, l)?;
    Ok(out)
}

/// Gradient of [`swiglu_fused`]: `d_gate_up` with the shape of `gate_up` (dgate | dup).
pub fn swiglu_fused_backward(gate_up: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let (rows, i) = fused_dims("swiglu_fused_backward", gate_up)?;
    let (dy_rows, dy_cols) = dy.rows_cols();
    crate::ensure_shape!(
        dy_rows == rows && dy_cols == i && dy.dtype() == gate_up.dtype(),
        "swiglu_fused_backward",
        "gate_up {:?} {} needs dy [{rows}, {i}] {}, got {:?} {}",
        gate_up.shape(),
        gate_up.dtype(),
        gate_up.dtype(),
        dy.shape(),
        dy.dtype()
    );
    same_device("swiglu_fused_backward", gate_up, dy)?;
    let d = Tensor::empty(gate_up.shape(), gate_up.dtype(), gate_up.device())?;
    let l = Layout { fused: true, rows, cols: i, gate_off: 0, up_off: i, in_stride: 2 * i, out_stride: 2 * i };
    backward(gate_up, gate_up, dy, &d, &d, l)?;
    Ok(d)
}

/// Row layout shared by the plain and fused forms: element (r, j) of gate is at
/// `gate_off + r·in_stride + j`, of up at `up_off + r·in_stride + j`, of an output at
/// `r·out_stride + j` (+ `up_off` for dup in the fused backward).
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Layout {
    fused: bool,
    rows: usize,
    cols: usize,
    gate_off: usize,
    up_off: usize,
    in_stride: usize,
    out_stride: usize,
}

fn fused_dims(op: &'static str, gate_up: &Tensor) -> Result<(usize, usize)> {
    let (rows, cols) = gate_up.rows_cols();
    if gate_up.rank() == 0 || cols % 2 != 0 {
        return Err(Error::shape(op, format!("gate_up {:?}: last dim must be even (gate | up)", gate_up.shape())));
    }
    check_dtype(op, gate_up.dtype())?;
    Ok((rows, cols / 2))
}

fn check_dtype(op: &'static str, dt: DType) -> Result<()> {
    match dt {
        DType::F32 | DType::BF16 => Ok(()),
        dtype => Err(Error::UnsupportedDType { op, dtype }),
    }
}

fn same_device(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.device() != b.device() {
        return Err(Error::DeviceMismatch { op, a: a.device(), b: b.device() });
    }
    Ok(())
}

fn check_same(op: &'static str, ts: &[(&str, &Tensor)]) -> Result<()> {
    let (n0, t0) = ts[0];
    for &(n, t) in &ts[1..] {
        if t.shape() != t0.shape() || t.dtype() != t0.dtype() {
            return Err(Error::shape(
                op,
                format!("{n0} {:?} {} vs {n} {:?} {}", t0.shape(), t0.dtype(), t.shape(), t.dtype()),
            ));
        }
        same_device(op, t0, t)?;
    }
    check_dtype(op, t0.dtype())
}

fn forward(gate: &Tensor, up: &Tensor, out: &Tensor, l: Layout) -> Result<()> {
    match out.device() {
        Device::Cpu => {
            fn go<T: WithDType>(gate: &Tensor, up: &Tensor, out: &Tensor, l: Layout) -> Result<()> {
                let g = gate.cpu_read::<T>()?;
                let mut o = out.cpu_write::<T>()?;
                if l.fused {
                    cpu::swiglu_fused(&g, l.cols, &mut o);
                } else {
                    // swiglu(x, x) is legal: both read guards may coexist.
                    let u = up.cpu_read::<T>()?;
                    cpu::swiglu(&g, &u, &mut o);
                }
                Ok(())
            }
            match out.dtype() {
                DType::F32 => go::<f32>(gate, up, out, l),
                DType::BF16 => go::<bf16>(gate, up, out, l),
                dtype => Err(Error::UnsupportedDType { op: "swiglu", dtype }),
            }
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::forward(ord, gate, up, out, l),
        #[cfg(not(feature = "cuda"))]
        device => Err(Error::UnsupportedDevice { op: "swiglu", device }),
    }
}

fn backward(gate: &Tensor, up: &Tensor, dy: &Tensor, dgate: &Tensor, dup: &Tensor, l: Layout) -> Result<()> {
    match dgate.device() {
        Device::Cpu => {
            fn go<T: WithDType>(
                gate: &Tensor,
                up: &Tensor,
                dy: &Tensor,
                dgate: &Tensor,
                dup: &Tensor,
                l: Layout,
            ) -> Result<()> {
                let dyv = dy.cpu_read::<T>()?;
                if !l.fused {
                    let (g, u) = (gate.cpu_read::<T>()?, up.cpu_read::<T>()?);
                    let (mut dg, mut du) = (dgate.cpu_write::<T>()?, dup.cpu_write::<T>()?);
                    cpu::swiglu_backward(&g, &u, &dyv, &mut dg, &mut du);
                } else {
                    let g = gate.cpu_read::<T>()?;
                    let mut d = dgate.cpu_write::<T>()?;
                    cpu::swiglu_fused_backward(&g, &dyv, l.cols, &mut d);
                }
                Ok(())
            }
            match dgate.dtype() {
                DType::F32 => go::<f32>(gate, up, dy, dgate, dup, l),
                DType::BF16 => go::<bf16>(gate, up, dy, dgate, dup, l),
                dtype => Err(Error::UnsupportedDType { op: "swiglu_backward", dtype }),
            }
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::backward(ord, gate, up, dy, dgate, dup, l),
        #[cfg(not(feature = "cuda"))]
        device => Err(Error::UnsupportedDevice { op: "swiglu_backward", device }),
    }
}

/// Slice-level CPU implementations (the reference for the CUDA kernels). Generic over the
/// storage type; all math in f32.
pub mod cpu {
    use super::*;

    const CHUNK: usize = 1 << 14;

    /// Rounds an f32 to the storage precision of `T` (identity for f32).
    #[inline(always)]
    fn round_to<T: WithDType>(v: f32) -> f32 {
        T::from_f64(v as f64).to_f64() as f32
    }

    #[inline(always)]
    fn ld<T: WithDType>(v: T) -> f32 {
        v.to_f64() as f32
    }

    #[inline(always)]
    fn st<T: WithDType>(v: f32) -> T {
        T::from_f64(v as f64)
    }

    /// silu(g) as PyTorch computes it in f32: g / (1 + e^−g).
    #[inline(always)]
    pub fn silu(g: f32) -> f32 {
        g / (1.0 + (-g).exp())
    }

    #[inline(always)]
    fn fwd1<T: WithDType>(g: T, u: T) -> T {
        st::<T>(round_to::<T>(silu(ld(g))) * ld(u))
    }

    /// (dgate, dup) for one element.
    #[inline(always)]
    pub fn bwd1(g: f32, u: f32, dy: f32) -> (f32, f32) {
        let sig = 1.0 / (1.0 + (-g).exp());
        let silu = g * sig;
        (dy * u * (sig * (1.0 + g * (1.0 - sig))), dy * silu)
    }

    /// out = silu(gate) · up, elementwise.
    pub fn swiglu<T: WithDType>(gate: &[T], up: &[T], out: &mut [T]) {
        smelt_engine::cpu::pool().install(|| {
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
                let base = c * CHUNK;
                let (g, u) = (&gate[base..base + o.len()], &up[base..base + o.len()]);
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = fwd1(g, u);
                }
            })
        })
    }

    /// `gate_up [rows, 2·cols]` → `out [rows, cols]`.
    pub fn swiglu_fused<T: WithDType>(gate_up: &[T], cols: usize, out: &mut [T]) {
        if cols == 0 {
            return;
        }
        let rows_per_task = (CHUNK / cols).max(1);
        smelt_engine::cpu::pool().install(|| {
            out.par_chunks_mut(rows_per_task * cols).enumerate().for_each(|(c, o)| {
                let r0 = c * rows_per_task;
                for (r, orow) in o.chunks_mut(cols).enumerate() {
                    let row = &gate_up[(r0 + r) * 2 * cols..(r0 + r + 1) * 2 * cols];
                    let (g, u) = row.split_at(cols);
                    for ((o, &g), &u) in orow.iter_mut().zip(g).zip(u) {
                        *o = fwd1(g, u);
                    }
                }
            })
        })
    }

    /// dgate = dy·up·silu′(gate), dup = dy·silu(gate).
    pub fn swiglu_backward<T: WithDType>(gate: &[T], up: &[T], dy: &[T], dgate: &mut [T], dup: &mut [T]) {
        smelt_engine::cpu::pool().install(|| {
            dgate.par_chunks_mut(CHUNK).zip(dup.par_chunks_mut(CHUNK)).enumerate().for_each(|(c, (dg, du))| {
                let base = c * CHUNK;
                for i in 0..dg.len() {
                    let (a, b) = bwd1(ld(gate[base + i]), ld(up[base + i]), ld(dy[base + i]));
                    dg[i] = st(a);
                    du[i] = st(b);
                }
            })
        })
    }

    /// `d_gate_up [rows, 2·cols]` (dgate | dup) from `gate_up [rows, 2·cols]`, `dy [rows, cols]`.
    pub fn swiglu_fused_backward<T: WithDType>(gate_up: &[T], dy: &[T], cols: usize, d_gate_up: &mut [T]) {
        if cols == 0 {
            return;
        }
        let rows_per_task = (CHUNK / (2 * cols)).max(1);
        smelt_engine::cpu::pool().install(|| {
            d_gate_up.par_chunks_mut(rows_per_task * 2 * cols).enumerate().for_each(|(c, d)| {
                let r0 = c * rows_per_task;
                for (r, drow) in d.chunks_mut(2 * cols).enumerate() {
                    let row = &gate_up[(r0 + r) * 2 * cols..(r0 + r + 1) * 2 * cols];
                    let dyr = &dy[(r0 + r) * cols..(r0 + r + 1) * cols];
                    let (dg, du) = drow.split_at_mut(cols);
                    for j in 0..cols {
                        let (a, b) = bwd1(ld(row[j]), ld(row[cols + j]), ld(dyr[j]));
                        dg[j] = st(a);
                        du[j] = st(b);
                    }
                }
            })
        })
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{launch, Arg, LaunchCfg};

    fn names(dt: DType, vec: bool, fwd: bool) -> Result<(&'static str, usize)> {
        Ok(match (dt, vec, fwd) {
            (DType::F32, false, true) => ("swiglu_f32", 1),
            (DType::F32, true, true) => ("swiglu_f32_v4", 4),
            (DType::BF16, false, true) => ("swiglu_bf16", 1),
            (DType::BF16, true, true) => ("swiglu_bf16_v8", 8),
            (DType::F32, false, false) => ("swiglu_bwd_f32", 1),
            (DType::F32, true, false) => ("swiglu_bwd_f32_v4", 4),
            (DType::BF16, false, false) => ("swiglu_bwd_bf16", 1),
            (DType::BF16, true, false) => ("swiglu_bwd_bf16_v8", 8),
            (dtype, _, _) => return Err(Error::UnsupportedDType { op: "swiglu (cuda)", dtype }),
        })
    }

    /// 16-byte vector access works when every row start of every operand is 16-byte aligned.
    fn vec_ok(dt: DType, l: Layout, ptrs: &[u64]) -> bool {
        let n = 16 / dt.size_in_bytes();
        [l.cols, l.in_stride, l.out_stride, l.up_off].iter().all(|v| v % n == 0) && ptrs.iter().all(|p| p % 16 == 0)
    }

    fn cfg(chunks: u64) -> LaunchCfg {
        let block = 256u32;
        let grid = chunks.div_ceil(block as u64).clamp(1, 132 * 16) as u32;
        LaunchCfg { grid: (grid, 1, 1), block: (block, 1, 1), smem: 0 }
    }

    pub fn forward(ord: usize, gate: &Tensor, up: &Tensor, out: &Tensor, l: Layout) -> Result<()> {
        if l.rows * l.cols == 0 {
            return Ok(());
        }
        let es = gate.dtype().size_in_bytes() as u64;
        let pg = gate.cuda_ptr()? + l.gate_off as u64 * es;
        let pu = up.cuda_ptr()? + l.up_off as u64 * es;
        let po = out.cuda_ptr()?;
        let v = vec_ok(gate.dtype(), l, &[pg, pu, po]);
        let (func, n) = names(gate.dtype(), v, true)?;
        let args = [
            Arg::Ptr(po),
            Arg::Ptr(pg),
            Arg::Ptr(pu),
            Arg::U64(l.rows as u64),
            Arg::U64(l.cols as u64),
            Arg::U64(l.in_stride as u64),
            Arg::U64(l.out_stride as u64),
        ];
        launch(ord, &SRC, func, cfg((l.rows * l.cols / n) as u64), &args)
    }

    pub fn backward(
        ord: usize,
        gate: &Tensor,
        up: &Tensor,
        dy: &Tensor,
        dgate: &Tensor,
        dup: &Tensor,
        l: Layout,
    ) -> Result<()> {
        if l.rows * l.cols == 0 {
            return Ok(());
        }
        let es = gate.dtype().size_in_bytes() as u64;
        let pg = gate.cuda_ptr()? + l.gate_off as u64 * es;
        let pu = up.cuda_ptr()? + l.up_off as u64 * es;
        let pdy = dy.cuda_ptr()?;
        // dgate/dup share the gate/up offsets (the fused gradient has the input's layout).
        let pdg = dgate.cuda_ptr()? + l.gate_off as u64 * es;
        let pdu = dup.cuda_ptr()? + l.up_off as u64 * es;
        // dy is [rows, cols] contiguous; the gradient outputs use the input stride.
        let v = vec_ok(gate.dtype(), l, &[pg, pu, pdy, pdg, pdu]);
        let (func, n) = names(gate.dtype(), v, false)?;
        let args = [
            Arg::Ptr(pdg),
            Arg::Ptr(pdu),
            Arg::Ptr(pg),
            Arg::Ptr(pu),
            Arg::Ptr(pdy),
            Arg::U64(l.rows as u64),
            Arg::U64(l.cols as u64),
            Arg::U64(l.in_stride as u64),
            Arg::U64(l.out_stride as u64),
        ];
        launch(ord, &SRC, func, cfg((l.rows * l.cols / n) as u64), &args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use smelt_engine::Rng;

    fn silu64(g: f64) -> f64 {
        g / (1.0 + (-g).exp())
    }

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, Device::Cpu).unwrap()
    }

    #[test]
    fn swiglu_matches_f64_on_odd_shapes() {
        let mut rng = Rng::new(11);
        for (rows, cols) in [(1usize, 1usize), (3, 37), (5, 100), (700, 9), (2, 4864)] {
            let n = rows * cols;
            let (g, u) = (randn(&mut rng, n, 3.0), randn(&mut rng, n, 1.0));
            let want: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| silu64(g as f64) * u as f64).collect();
            let got = swiglu(&t(&g, &[rows, cols]), &t(&u, &[rows, cols])).unwrap();
            assert_eq!(got.shape(), &[rows, cols]);
            assert_close(&got.to_vec::<f32>().unwrap(), &want, 1e-6, 1e-5, "swiglu f32");

            // Fused: rows of [gate | up].
            let gu: Vec<f32> =
                (0..rows).flat_map(|r| [&g[r * cols..(r + 1) * cols], &u[r * cols..(r + 1) * cols]].concat()).collect();
            let got = swiglu_fused(&t(&gu, &[rows, 2 * cols])).unwrap();
            assert_eq!(got.shape(), &[rows, cols]);
            assert_close(&got.to_vec::<f32>().unwrap(), &want, 1e-6, 1e-5, "swiglu_fused f32");

            // bf16: silu rounded to bf16, then the product rounded: within ~2 bf16 ulps of exact.
            let (gh, uh) = (
                t(&g, &[rows, cols]).to_dtype(DType::BF16).unwrap(),
                t(&u, &[rows, cols]).to_dtype(DType::BF16).unwrap(),
            );
            let (g2, u2) = (gh.to_vec_f32().unwrap(), uh.to_vec_f32().unwrap());
            let want: Vec<f64> = g2.iter().zip(&u2).map(|(&g, &u)| silu64(g as f64) * u as f64).collect();
            let got = swiglu(&gh, &uh).unwrap();
            assert_close(&got.to_vec_f32().unwrap(), &want, 1e-30, 2.0 * DType::BF16.epsilon(), "swiglu bf16");
            let guh = t(&gu, &[rows, 2 * cols]).to_dtype(DType::BF16).unwrap();
            assert_eq!(
                swiglu_fused(&guh).unwrap().to_bytes().unwrap(),
                got.to_bytes().unwrap(),
                "fused bf16 == plain bf16"
            );
        }
    }

    #[test]
    fn swiglu_backward_by_finite_differences() {
        let mut rng = Rng::new(12);
        let (rows, cols) = (3usize, 5usize);
        let n = rows * cols;
        let (g, u, dy) = (randn(&mut rng, n, 2.0), randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
        let loss = |g: &[f64], u: &[f64]| -> f64 { (0..n).map(|i| dy[i] as f64 * silu64(g[i]) * u[i]).sum() };
        let (g64, u64_) = (to_f64(&g), to_f64(&u));
        let want_dg = finite_diff(|x| loss(x, &u64_), &g64, 1e-5);
        let want_du = finite_diff(|x| loss(&g64, x), &u64_, 1e-5);
        let (dg, du) = swiglu_backward(&t(&g, &[rows, cols]), &t(&u, &[rows, cols]), &t(&dy, &[rows, cols])).unwrap();
        assert_close(&dg.to_vec::<f32>().unwrap(), &want_dg, 1e-5, 1e-4, "dgate");
        assert_close(&du.to_vec::<f32>().unwrap(), &want_du, 1e-5, 1e-4, "dup");

        let gu: Vec<f32> =
            (0..rows).flat_map(|r| [&g[r * cols..(r + 1) * cols], &u[r * cols..(r + 1) * cols]].concat()).collect();
        let loss_fused = |gu: &[f64]| -> f64 {
            (0..rows)
                .flat_map(|r| (0..cols).map(move |j| (r, j)))
                .map(|(r, j)| dy[r * cols + j] as f64 * silu64(gu[r * 2 * cols + j]) * gu[r * 2 * cols + cols + j])
                .sum()
        };
        let want = finite_diff(loss_fused, &to_f64(&gu), 1e-5);
        let d = swiglu_fused_backward(&t(&gu, &[rows, 2 * cols]), &t(&dy, &[rows, cols])).unwrap();
        assert_eq!(d.shape(), &[rows, 2 * cols]);
        assert_close(&d.to_vec::<f32>().unwrap(), &want, 1e-5, 1e-4, "d_gate_up");
    }

    #[test]
    fn swiglu_extreme_gates_stay_finite() {
        let g = [-100.0f32, -30.0, 0.0, 30.0, 100.0];
        let (dg, du) = swiglu_backward(&t(&g, &[5]), &t(&[1.5; 5], &[5]), &t(&[1.0; 5], &[5])).unwrap();
        assert!(dg.to_vec::<f32>().unwrap().iter().chain(&du.to_vec::<f32>().unwrap()).all(|v| v.is_finite()));
        let y = swiglu(&t(&g, &[5]), &t(&[1.5; 5], &[5])).unwrap().to_vec::<f32>().unwrap();
        assert!(y.iter().all(|v| v.is_finite()), "{y:?}");
    }

    #[test]
    fn swiglu_errors_name_op_and_shapes() {
        let a = Tensor::zeros(&[2, 3], DType::F32, Device::Cpu).unwrap();
        let b = Tensor::zeros(&[3, 2], DType::F32, Device::Cpu).unwrap();
        let e = swiglu(&a, &b).unwrap_err().to_string();
        assert!(e.contains("swiglu") && e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
        let e = swiglu_fused(&a).unwrap_err().to_string();
        assert!(e.contains("swiglu_fused") && e.contains("[2, 3]"), "{e}");
        let e = swiglu_fused_backward(&b, &a).unwrap_err().to_string();
        assert!(e.contains("swiglu_fused_backward"), "{e}");
    }

    #[test]
    fn swiglu_device_matches_cpu() {
        let Some(dev) = test_cuda_device() else { return };
        let mut rng = Rng::new(13);
        for (rows, cols) in [(1usize, 1usize), (7, 37), (33, 896), (64, 4864), (5, 4867)] {
            for dt in [DType::F32, DType::BF16] {
                let mk = |rng: &mut Rng, c: usize| t(&randn(rng, rows * c, 2.0), &[rows, c]).to_dtype(dt).unwrap();
                let (g, u, dy, gu) =
                    (mk(&mut rng, cols), mk(&mut rng, cols), mk(&mut rng, cols), mk(&mut rng, 2 * cols));
                let d = |x: &Tensor| x.to_device(dev).unwrap();
                let tol = if dt == DType::F32 { 2e-6 } else { dt.epsilon() };
                let cmp = |got: &Tensor, want: &Tensor, what: &str| {
                    assert_close(
                        &got.to_vec_f32().unwrap(),
                        &to_f64(&want.to_vec_f32().unwrap()),
                        tol,
                        tol,
                        &format!("{what} {dt} [{rows},{cols}]"),
                    );
                };
                // Outputs come from Tensor::empty: fill same-sized blocks with NaN and free them
                // first, so the caching allocator hands poisoned memory to the op.
                let poison = |shapes: &[&[usize]]| {
                    let p: Vec<Tensor> = shapes.iter().map(|s| Tensor::full(f64::NAN, s, dt, dev).unwrap()).collect();
                    drop(p);
                };
                poison(&[&[rows, cols]]);
                cmp(&swiglu(&d(&g), &d(&u)).unwrap(), &swiglu(&g, &u).unwrap(), "swiglu");
                poison(&[&[rows, cols]]);
                cmp(&swiglu_fused(&d(&gu)).unwrap(), &swiglu_fused(&gu).unwrap(), "swiglu_fused");
                poison(&[&[rows, cols], &[rows, cols]]);
                let (a, b) = swiglu_backward(&d(&g), &d(&u), &d(&dy)).unwrap();
                let (wa, wb) = swiglu_backward(&g, &u, &dy).unwrap();
                cmp(&a, &wa, "dgate");
                cmp(&b, &wb, "dup");
                poison(&[&[rows, 2 * cols]]);
                cmp(
                    &swiglu_fused_backward(&d(&gu), &d(&dy)).unwrap(),
                    &swiglu_fused_backward(&gu, &dy).unwrap(),
                    "d_gate_up",
                );
            }
        }
    }
}
