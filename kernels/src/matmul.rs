//! Matrix multiplication: `C = op(A)·op(B)` in row-major layout, and its backward.
//!
//! Layouts: `A` is `[..., m, k]` (leading dimensions flattened into rows), or a 2-D `[k, m]`
//! when `trans_a`; `B` is 2-D `[k, n]`, or `[n, k]` when `trans_b` — the layout of a PyTorch
//! `Linear` weight, so a linear layer `y = x·Wᵀ` is `matmul(x, w, false, true)`.
//!
//! Backward of `C = A·B`: `dA = dC·Bᵀ`, `dB = Aᵀ·dC`; of `y = x·Wᵀ`: `dx = dy·W`,
//! `dW = dyᵀ·x` — see [`matmul_backward`].
//!
//! Dtypes: f32; bf16 and f16 inputs are multiplied with f32 accumulation (on the CPU through
//! an f32 copy, on CUDA by cuBLAS with `CUBLAS_COMPUTE_32F`). The output of [`matmul`] has the
//! inputs' dtype; [`matmul_into`] may write f32 from 16-bit inputs (e.g. fp32 logits or
//! gradient accumulation).
//!
//! CUDA versions (op `"matmul"` of `crate::versions`): v1 cuBLAS, every call and the default;
//! v2 `matmul.cu`'s kernel for `y = x·Wᵀ` with at most 64 rows of x, bf16 (a decode step's
//! linear layers, bound by reading W), held back until measured against cuBLAS: it runs when
//! pinned (`versions::force`, `smelt bench kernels --op matmul_decode`) or under
//! `SMELT_KERNEL_VERSIONS=matmul=2`. With v2, [`linear_swiglu`] (the MLP's `silu(gate)·up` from
//! a fused `[gate; up]` weight) runs the SwiGLU in the kernel's epilogue.

use smelt_engine::{bf16, f16, DType, Device, Error, Result, Tensor};

/// `op(A)·op(B)`; see the module docs for layouts. The result has `a`'s dtype and device, and
/// shape `a.shape()[..-1] + [n]` (or `[m, n]` when `trans_a`).
pub fn matmul(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    let d = dims(a, b, trans_a, trans_b)?;
    let out = Tensor::empty(&d.out_shape, a.dtype(), a.device())?;
    run(a, b, trans_a, trans_b, &out, false, &d)?;
    Ok(out)
}

/// `y = x·Wᵀ` for a `Linear` weight `w` of shape `[out_features, in_features]`.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    matmul(x, w, false, true)
}

/// `silu(x·W_gateᵀ)·(x·W_upᵀ)` for a fused `[gate; up]` weight `w` `[2·I, K]` (gate rows, then
/// up rows): the MLP's activation, `[.., I]` in x's dtype. It is `swiglu::swiglu_fused` of
/// `linear(x, w)`, with the same bits; on CUDA when the few-rows kernel (matmul v2) takes the
/// call, the SwiGLU runs in its epilogue, so the `[.., 2I]` product is never stored.
pub fn linear_swiglu(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let d = dims(x, w, false, true)?;
    if d.n % 2 != 0 {
        return Err(Error::shape(
            "linear_swiglu",
            format!("w {:?} must hold gate and up rows (an even count) for x {:?}", w.shape(), x.shape()),
        ));
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(ord) = x.device() {
        if d.m > 0 && cuda::uses_few_rows(x, w, false, true, x.dtype(), false, d.m, d.k)? {
            let mut shape = d.out_shape.clone();
            if let Some(last) = shape.last_mut() {
                *last = d.n / 2;
            }
            let out = Tensor::empty(&shape, x.dtype(), x.device())?;
            cuda::few_rows(ord, x, w, &out, d.m, d.n / 2, d.k, true)?;
            return Ok(out);
        }
    }
    crate::swiglu::swiglu_fused(&linear(x, w)?)
}

/// Writes `op(A)·op(B)` into `out` (or adds it to `out` when `accumulate`). `out` must have
/// `m·n` elements with last dimension `n`, and must not share storage with `a` or `b`. Its
/// dtype may be f32 whatever the inputs' dtype, or the inputs' dtype.
pub fn matmul_into(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool, out: &Tensor, accumulate: bool) -> Result<()> {
    let d = dims(a, b, trans_a, trans_b)?;
    let (rows, cols) = out.rows_cols();
    if out.elem_count() != d.m * d.n || (d.m * d.n > 0 && cols != d.n) || (rows * cols != out.elem_count()) {
        return Err(Error::shape(
            "matmul_into",
            format!("out {:?} cannot hold [{}, {}] (a {:?}, b {:?})", out.shape(), d.m, d.n, a.shape(), b.shape()),
        ));
    }
    if out.device() != a.device() {
        return Err(Error::DeviceMismatch { op: "matmul_into", a: a.device(), b: out.device() });
    }
    if out.dtype() != a.dtype() && out.dtype() != DType::F32 {
        return Err(Error::shape(
            "matmul_into",
            format!("out dtype {} for {} inputs (want {} or f32)", out.dtype(), a.dtype(), a.dtype()),
        ));
    }
    if out.same_storage(a) || out.same_storage(b) {
        return Err(Error::shape("matmul_into", "out must not share storage with an input"));
    }
    run(a, b, trans_a, trans_b, out, accumulate, &d)
}

/// Gradients of `C = A·B` (`trans_b = false`) or of `y = x·Wᵀ` (`trans_b = true`, `b = W`):
/// returns `(dA, dB)` with the shapes and dtype of `a` and `b`.
///
/// - `trans_b = false`: `dA = dC·Bᵀ`, `dB = Aᵀ·dC`;
/// - `trans_b = true`:  `dx = dy·W`,  `dW = dyᵀ·x`.
///
/// `a` may be N-D (rows flattened); `trans_a` is not supported here.
pub fn matmul_backward(a: &Tensor, b: &Tensor, dc: &Tensor, trans_b: bool) -> Result<(Tensor, Tensor)> {
    let (a2, dc2) = backward_views(a, b, dc, trans_b)?;
    let da = if trans_b { matmul(&dc2, b, false, false)? } else { matmul(&dc2, b, false, true)? };
    let db = if trans_b { matmul(&dc2, &a2, true, false)? } else { matmul(&a2, &dc2, true, false)? };
    Ok((da.reshape(a.shape())?, db))
}

/// Like [`matmul_backward`], writing (or with `accumulate`, adding) the gradients into
/// existing tensors — e.g. f32 gradient buffers for bf16 weights. Either may be skipped.
pub fn matmul_backward_into(
    a: &Tensor,
    b: &Tensor,
    dc: &Tensor,
    trans_b: bool,
    da: Option<&Tensor>,
    db: Option<&Tensor>,
    accumulate: bool,
) -> Result<()> {
    let (a2, dc2) = backward_views(a, b, dc, trans_b)?;
    if let Some(da) = da {
        if da.shape() != a.shape() {
            return Err(Error::shape("matmul_backward", format!("da {:?} vs a {:?}", da.shape(), a.shape())));
        }
        let da2 = da.reshape(a2.shape())?;
        matmul_into(&dc2, b, false, !trans_b, &da2, accumulate)?;
    }
    if let Some(db) = db {
        if db.shape() != b.shape() {
            return Err(Error::shape("matmul_backward", format!("db {:?} vs b {:?}", db.shape(), b.shape())));
        }
        if trans_b {
            matmul_into(&dc2, &a2, true, false, db, accumulate)?;
        } else {
            matmul_into(&a2, &dc2, true, false, db, accumulate)?;
        }
    }
    Ok(())
}

/// `a` as `[M, k]` and `dc` as `[M, n]`, after checking the shapes agree.
fn backward_views(a: &Tensor, b: &Tensor, dc: &Tensor, trans_b: bool) -> Result<(Tensor, Tensor)> {
    let d = dims(a, b, false, trans_b)?;
    if dc.elem_count() != d.m * d.n || (d.m * d.n > 0 && dc.shape().last().copied().unwrap_or(0) != d.n) {
        return Err(Error::shape(
            "matmul_backward",
            format!(
                "dc {:?} does not match output [{}, {}] of a {:?}, b {:?}",
                dc.shape(),
                d.m,
                d.n,
                a.shape(),
                b.shape()
            ),
        ));
    }
    Ok((a.reshape(&[d.m, d.k])?, dc.reshape(&[d.m, d.n])?))
}

struct Dims {
    m: usize,
    n: usize,
    k: usize,
    out_shape: Vec<usize>,
}

fn dims(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Dims> {
    let bad = |why: &str| {
        Error::shape(
            "matmul",
            format!("{why}: a {:?} (trans_a={trans_a}) b {:?} (trans_b={trans_b})", a.shape(), b.shape()),
        )
    };
    if a.dtype() != b.dtype() {
        return Err(Error::shape("matmul", format!("dtypes differ: a {} b {}", a.dtype(), b.dtype())));
    }
    if !a.dtype().is_float() {
        return Err(Error::UnsupportedDType { op: "matmul", dtype: a.dtype() });
    }
    if a.device() != b.device() {
        return Err(Error::DeviceMismatch { op: "matmul", a: a.device(), b: b.device() });
    }
    if b.rank() != 2 {
        return Err(bad("b must be 2-D"));
    }
    let (bk, n) = if trans_b { (b.dim(1), b.dim(0)) } else { (b.dim(0), b.dim(1)) };
    let (m, k, out_shape) = if trans_a {
        if a.rank() != 2 {
            return Err(bad("a must be 2-D when transposed"));
        }
        (a.dim(1), a.dim(0), vec![a.dim(1), n])
    } else {
        if a.rank() == 0 {
            return Err(bad("a must have at least one dimension"));
        }
        let k = a.dim(a.rank() - 1);
        let m = a.shape()[..a.rank() - 1].iter().product();
        let mut s = a.shape()[..a.rank() - 1].to_vec();
        s.push(n);
        (m, k, s)
    };
    if k != bk {
        return Err(bad(&format!("inner dimensions differ ({k} vs {bk})")));
    }
    Ok(Dims { m, n, k, out_shape })
}

fn run(a: &Tensor, b: &Tensor, ta: bool, tb: bool, out: &Tensor, acc: bool, d: &Dims) -> Result<()> {
    match out.device() {
        Device::Cpu => cpu_run(a, b, ta, tb, out, acc, d),
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::run(ord, a, b, ta, tb, out, acc, d.m, d.n, d.k),
        #[cfg(not(feature = "cuda"))]
        dev => Err(Error::UnsupportedDevice { op: "matmul", device: dev }),
    }
}

fn cpu_run(a: &Tensor, b: &Tensor, ta: bool, tb: bool, out: &Tensor, acc: bool, d: &Dims) -> Result<()> {
    let (m, n, k) = (d.m, d.n, d.k);
    // f32 operands are read in place; 16-bit ones go through an f32 copy.
    let (a_guard, a_vec);
    let av: &[f32] = if a.dtype() == DType::F32 {
        a_guard = a.cpu_read::<f32>()?;
        &a_guard
    } else {
        a_vec = a.to_vec_f32()?;
        &a_vec
    };
    let (b_guard, b_vec);
    let bv: &[f32] = if b.dtype() == DType::F32 {
        b_guard = b.cpu_read::<f32>()?;
        &b_guard
    } else {
        b_vec = b.to_vec_f32()?;
        &b_vec
    };
    match out.dtype() {
        DType::F32 => cpu::matmul(av, bv, &mut out.cpu_write::<f32>()?, m, n, k, ta, tb, acc),
        DType::BF16 => {
            let mut o = out.cpu_write::<bf16>()?;
            let mut c: Vec<f32> = if acc { o.iter().map(|x| x.to_f32()).collect() } else { vec![0.0; m * n] };
            cpu::matmul(av, bv, &mut c, m, n, k, ta, tb, acc)?;
            o.iter_mut().zip(&c).for_each(|(o, &c)| *o = bf16::from_f32(c));
            Ok(())
        }
        DType::F16 => {
            let mut o = out.cpu_write::<f16>()?;
            let mut c: Vec<f32> = if acc { o.iter().map(|x| x.to_f32()).collect() } else { vec![0.0; m * n] };
            cpu::matmul(av, bv, &mut c, m, n, k, ta, tb, acc)?;
            o.iter_mut().zip(&c).for_each(|(o, &c)| *o = f16::from_f32(c));
            Ok(())
        }
        dt => Err(Error::UnsupportedDType { op: "matmul", dtype: dt }),
    }
}

/// Slice-level CPU implementation (the reference for the CUDA path).
pub mod cpu {
    use smelt_engine::Result;

    /// Row-major f32 `C = op(A)·op(B)` (or `C += …`), multi-threaded through the `gemm` crate
    /// on smelt's CPU pool.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
    ) -> Result<()> {
        smelt_engine::cpu::matmul_f32(a, b, c, m, n, k, trans_a, trans_b, accumulate)
    }
}

crate::kernel_source!("matmul");

/// Rows of x that `matmul.cu`'s few-rows kernel takes (4 m-tiles of 16).
pub const FEW_ROWS_MAX: usize = 64;

/// The newest CUDA version an unforced call runs: cuBLAS until the few-rows kernel (v2) is
/// measured faster on a GPU.
pub const VERSION_LIMIT: u32 = 1;

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{launch, Arg, LaunchCfg};
    use smelt_engine::cuda::{device, Gemm};

    /// Versions that can take this call: the few-rows kernel (v2) for a bf16 `x·Wᵀ` into a fresh
    /// bf16 output with at most [`FEW_ROWS_MAX`] rows, K a multiple of 8 and 16-byte aligned
    /// operands (see `matmul.cu`), cuBLAS (v1) for everything.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn versions_for(
        a: &Tensor,
        b: &Tensor,
        ta: bool,
        tb: bool,
        out: DType,
        acc: bool,
        m: usize,
        k: usize,
    ) -> Result<&'static [u32]> {
        let few_rows = !ta
            && tb
            && !acc
            && (1..=FEW_ROWS_MAX).contains(&m)
            && k % 8 == 0
            && k <= i32::MAX as usize - 128
            && b.dim(0) <= i32::MAX as usize
            && [a.dtype(), b.dtype(), out].iter().all(|&d| d == DType::BF16)
            && a.cuda_ptr()? % 16 == 0
            && b.cuda_ptr()? % 16 == 0;
        Ok(if few_rows { &[1, 2] } else { &[1] })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn run(
        ord: usize,
        a: &Tensor,
        b: &Tensor,
        ta: bool,
        tb: bool,
        out: &Tensor,
        acc: bool,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let dev = device(ord)?;
        let g = Gemm::new(m, n, k, a.dtype(), out.dtype()).trans(ta, tb).accumulate(acc);
        if m == 0 || n == 0 {
            return Ok(());
        }
        if uses_few_rows(a, b, ta, tb, out.dtype(), acc, m, k)? {
            return few_rows(ord, a, b, out, m, n, k, false);
        }
        let (pa, pb, pc) = (a.cuda_ptr()?, b.cuda_ptr()?, out.cuda_ptr()?);
        dev.gemm(&g, pa, pb, pc)
    }

    /// Whether this call runs the few-rows kernel (v2): it can, and the version picked is 2.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn uses_few_rows(
        a: &Tensor,
        b: &Tensor,
        ta: bool,
        tb: bool,
        out: DType,
        acc: bool,
        m: usize,
        k: usize,
    ) -> Result<bool> {
        Ok(crate::versions::pick_up_to("matmul", versions_for(a, b, ta, tb, out, acc, m, k)?, VERSION_LIMIT)? == 2)
    }

    /// `out = a·bᵀ` by `matmul.cu`'s few-rows kernel, for a call [`versions_for`] lets it take;
    /// with `glu`, `out = swiglu(a·bᵀ)` (`b` holds `2n` rows, gate then up).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn few_rows(
        ord: usize,
        a: &Tensor,
        b: &Tensor,
        out: &Tensor,
        m: usize,
        n: usize,
        k: usize,
        glu: bool,
    ) -> Result<()> {
        let (mt, nt) = (m.div_ceil(16), few_rows_n_tiles(m, n, glu));
        let per_block = if glu { 4 * nt } else { 8 * nt };
        let cfg = LaunchCfg { grid: (n.div_ceil(per_block) as u32, 1, 1), block: (256, 1, 1), smem: 0 };
        let args = [
            Arg::Ptr(a.cuda_ptr()?),
            Arg::Ptr(b.cuda_ptr()?),
            Arg::Ptr(out.cuda_ptr()?),
            Arg::I32(m as i32),
            Arg::I32(n as i32),
            Arg::I32(k as i32),
        ];
        let glu_tag = if glu { "glu_" } else { "" };
        launch(ord, &SRC, &format!("matmul_few_rows_{glu_tag}bf16_m{mt}_n{nt}"), cfg, &args)
    }

    /// 8-column n-tiles per block: the most (4 up to 32 rows, else 2) that still leave two blocks
    /// per SM of a 132-SM GPU, at least 1 (2 with `glu`: a gate and an up tile); `n` output
    /// columns.
    pub(super) fn few_rows_n_tiles(m: usize, n: usize, glu: bool) -> usize {
        let (most, least) = (if m <= 32 { 4 } else { 2 }, if glu { 2 } else { 1 });
        let cols = |nt: usize| if glu { 4 * nt } else { 8 * nt };
        [4, 2, 1].into_iter().find(|&nt| nt <= most && nt >= least && n.div_ceil(cols(nt)) >= 264).unwrap_or(least)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use smelt_engine::Rng;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| {
                        let av = if ta { a[p * m + i] } else { a[i * k + p] };
                        let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                        av as f64 * bv as f64
                    })
                    .sum();
            }
        }
        c
    }

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, Device::Cpu).unwrap()
    }

    const SHAPES: [(usize, usize, usize); 5] = [(1, 7, 13), (33, 65, 17), (1, 1, 1), (5, 3, 1), (70, 1, 129)];

    #[test]
    fn matches_f64_on_odd_shapes_all_transposes() {
        let mut rng = Rng::new(11);
        for (m, n, k) in SHAPES {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let (av, bv) = (randn(&mut rng, m * k, 1.0), randn(&mut rng, k * n, 1.0));
                let a = t(&av, &if ta { [k, m] } else { [m, k] });
                let b = t(&bv, &if tb { [n, k] } else { [k, n] });
                let c = matmul(&a, &b, ta, tb).unwrap();
                assert_eq!(c.shape(), &[m, n]);
                let tol = 2e-6 * (k as f64).sqrt();
                let what = format!("m{m} n{n} k{k} ta{ta} tb{tb}");
                assert_close(&c.to_vec().unwrap(), &naive(&av, &bv, m, n, k, ta, tb), tol, tol, &what);
            }
        }
    }

    #[test]
    fn leading_dims_flatten_and_linear() {
        let mut rng = Rng::new(12);
        let (xv, wv) = (randn(&mut rng, 2 * 3 * 5, 1.0), randn(&mut rng, 4 * 5, 1.0));
        let y = linear(&t(&xv, &[2, 3, 5]), &t(&wv, &[4, 5])).unwrap();
        assert_eq!(y.shape(), &[2, 3, 4]);
        assert_close(&y.to_vec().unwrap(), &naive(&xv, &wv, 6, 4, 5, false, true), 1e-5, 1e-5, "linear");
        let v = matmul(&t(&xv[..5], &[5]), &t(&wv, &[4, 5]), false, true).unwrap();
        assert_eq!(v.shape(), &[4]);
    }

    #[test]
    fn half_inputs_accumulate_in_f32_and_round_once() {
        let mut rng = Rng::new(13);
        let (m, n, k) = (9, 31, 257);
        for dt in [DType::BF16, DType::F16] {
            let a = t(&randn(&mut rng, m * k, 1.0), &[m, k]).to_dtype(dt).unwrap();
            let b = t(&randn(&mut rng, k * n, 1.0), &[k, n]).to_dtype(dt).unwrap();
            let want = naive(&a.to_vec_f32().unwrap(), &b.to_vec_f32().unwrap(), m, n, k, false, false);
            let c = matmul(&a, &b, false, false).unwrap();
            assert_eq!(c.dtype(), dt);
            assert_close(&c.to_vec_f32().unwrap(), &want, 1e-4, dt.epsilon(), &format!("{dt} out"));
            let c32 = Tensor::full(f64::NAN, &[m, n], DType::F32, Device::Cpu).unwrap();
            matmul_into(&a, &b, false, false, &c32, false).unwrap();
            assert_close(&c32.to_vec().unwrap(), &want, 1e-4, 1e-5, &format!("{dt} -> f32"));
        }
    }

    #[test]
    fn matmul_into_accumulates() {
        let mut rng = Rng::new(14);
        let (m, n, k) = (6, 5, 7);
        let (av, bv, cv) = (randn(&mut rng, m * k, 1.0), randn(&mut rng, n * k, 1.0), randn(&mut rng, m * n, 1.0));
        let out = t(&cv, &[m, n]);
        matmul_into(&t(&av, &[m, k]), &t(&bv, &[n, k]), false, true, &out, true).unwrap();
        let want: Vec<f64> =
            naive(&av, &bv, m, n, k, false, true).iter().zip(&cv).map(|(x, &c)| x + c as f64).collect();
        assert_close(&out.to_vec().unwrap(), &want, 1e-5, 1e-5, "accumulate");
        // bf16 output accumulates in f32, rounds once.
        let outh = t(&cv, &[m, n]).to_dtype(DType::BF16).unwrap();
        let (ah, bh) = (t(&av, &[m, k]).to_dtype(DType::BF16).unwrap(), t(&bv, &[n, k]).to_dtype(DType::BF16).unwrap());
        let base = outh.to_vec_f32().unwrap();
        matmul_into(&ah, &bh, false, true, &outh, true).unwrap();
        let prod = naive(&ah.to_vec_f32().unwrap(), &bh.to_vec_f32().unwrap(), m, n, k, false, true);
        let want: Vec<f64> = prod.iter().zip(&base).map(|(x, &c)| x + c as f64).collect();
        assert_close(&outh.to_vec_f32().unwrap(), &want, 1e-5, DType::BF16.epsilon(), "bf16 accumulate");
    }

    #[test]
    fn backward_by_finite_differences() {
        let mut rng = Rng::new(15);
        let (batch, m, n, k) = (2, 3, 4, 5);
        let rows = batch * m;
        for tb in [false, true] {
            let (av, bv, gv) =
                (randn(&mut rng, rows * k, 1.0), randn(&mut rng, k * n, 1.0), randn(&mut rng, rows * n, 1.0));
            let a = t(&av, &[batch, m, k]);
            let b = t(&bv, &if tb { [n, k] } else { [k, n] });
            let g = t(&gv, &[batch, m, n]);
            let (da, db) = matmul_backward(&a, &b, &g, tb).unwrap();
            assert_eq!(da.shape(), a.shape());
            assert_eq!(db.shape(), b.shape());
            // L = Σ G ⊙ (A·op(B))
            let loss = |a: &[f64], b: &[f64]| -> f64 {
                let mut s = 0.0;
                for i in 0..rows {
                    for j in 0..n {
                        let c: f64 = (0..k).map(|p| a[i * k + p] * if tb { b[j * k + p] } else { b[p * n + j] }).sum();
                        s += gv[i * n + j] as f64 * c;
                    }
                }
                s
            };
            let (a64, b64) = (to_f64(&av), to_f64(&bv));
            let what = if tb { "linear" } else { "matmul" };
            assert_close(
                &da.to_vec().unwrap(),
                &finite_diff(|x| loss(x, &b64), &a64, 1e-4),
                1e-5,
                1e-5,
                &format!("{what} da"),
            );
            assert_close(
                &db.to_vec().unwrap(),
                &finite_diff(|x| loss(&a64, x), &b64, 1e-4),
                1e-5,
                1e-5,
                &format!("{what} db"),
            );
            // The _into form accumulates onto existing gradients.
            let da2 = Tensor::full(1.0, a.shape(), DType::F32, Device::Cpu).unwrap();
            let db2 = Tensor::full(-1.0, b.shape(), DType::F32, Device::Cpu).unwrap();
            matmul_backward_into(&a, &b, &g, tb, Some(&da2), Some(&db2), true).unwrap();
            let plus = |v: Vec<f32>, s: f64| v.iter().map(|&x| x as f64 + s).collect::<Vec<_>>();
            assert_close(&da2.to_vec().unwrap(), &plus(da.to_vec().unwrap(), 1.0), 1e-6, 1e-6, "da accumulate");
            assert_close(&db2.to_vec().unwrap(), &plus(db.to_vec().unwrap(), -1.0), 1e-6, 1e-6, "db accumulate");
        }
    }

    #[test]
    fn shape_errors_name_the_op_and_shapes() {
        let a = Tensor::zeros(&[2, 3], DType::F32, Device::Cpu).unwrap();
        let b = Tensor::zeros(&[4, 5], DType::F32, Device::Cpu).unwrap();
        let e = matmul(&a, &b, false, false).unwrap_err().to_string();
        assert!(e.contains("matmul") && e.contains("[2, 3]") && e.contains("[4, 5]"), "{e}");
        let bh = Tensor::zeros(&[3, 5], DType::BF16, Device::Cpu).unwrap();
        assert!(matmul(&a, &bh, false, false).is_err());
        let b3 = Tensor::zeros(&[3, 5], DType::F32, Device::Cpu).unwrap();
        let wrong = Tensor::zeros(&[2, 4], DType::F32, Device::Cpu).unwrap();
        assert!(matmul_into(&a, &b3, false, false, &wrong, false).is_err());
        assert!(matmul_into(&a, &b3, false, false, &a, false).is_err());
        let dc = Tensor::zeros(&[2, 4], DType::F32, Device::Cpu).unwrap();
        assert!(matmul_backward(&a, &b3, &dc, false).unwrap_err().to_string().contains("matmul_backward"));
        // k = 0 gives zeros (or leaves `out` alone when accumulating).
        let a0 = Tensor::zeros(&[2, 0], DType::F32, Device::Cpu).unwrap();
        let b0 = Tensor::zeros(&[0, 3], DType::F32, Device::Cpu).unwrap();
        assert_eq!(matmul(&a0, &b0, false, false).unwrap().to_vec::<f32>().unwrap(), vec![0.0; 6]);
    }

    #[test]
    fn device_matches_cpu() {
        let Some(dev) = test_cuda_device() else { return };
        let mut rng = Rng::new(16);
        let shapes = [(1, 7, 13), (33, 65, 17), (5, 3, 1), (257, 129, 1031), (128, 256, 64)];
        for (m, n, k) in shapes {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                for dt in [DType::F32, DType::BF16] {
                    let a = t(&randn(&mut rng, m * k, 1.0), &if ta { [k, m] } else { [m, k] }).to_dtype(dt).unwrap();
                    let b = t(&randn(&mut rng, k * n, 1.0), &if tb { [n, k] } else { [k, n] }).to_dtype(dt).unwrap();
                    let what = format!("{dt} m{m} n{n} k{k} ta{ta} tb{tb}");
                    // Reference: the CPU in f32 from the same (rounded) inputs.
                    let c32 = Tensor::zeros(&[m, n], DType::F32, Device::Cpu).unwrap();
                    matmul_into(&a, &b, ta, tb, &c32, false).unwrap();
                    let want = to_f64(&c32.to_vec().unwrap());
                    let (ad, bd) = (a.to_device(dev).unwrap(), b.to_device(dev).unwrap());
                    // Same dtype out.
                    let got = matmul(&ad, &bd, ta, tb).unwrap();
                    assert_eq!((got.device(), got.dtype()), (dev, dt));
                    let tol = 1e-6 * (k as f64).sqrt() * 4.0;
                    let rtol = if dt == DType::F32 { tol } else { dt.epsilon() };
                    assert_close(&got.to_vec_f32().unwrap(), &want, tol * 4.0, rtol, &what);
                    // f32 out, poisoned first, then accumulate onto it.
                    let out = Tensor::full(f64::NAN, &[m, n], DType::F32, dev).unwrap();
                    matmul_into(&ad, &bd, ta, tb, &out, false).unwrap();
                    assert_close(&out.to_vec().unwrap(), &want, tol * 4.0, tol, &format!("{what} -> f32"));
                    matmul_into(&ad, &bd, ta, tb, &out, true).unwrap();
                    let twice: Vec<f64> = want.iter().map(|x| 2.0 * x).collect();
                    assert_close(&out.to_vec().unwrap(), &twice, tol * 8.0, tol, &format!("{what} accumulate"));
                }
            }
        }
        // N-D input and the backward on device.
        let (x, w, g) = (
            t(&randn(&mut rng, 2 * 3 * 40, 1.0), &[2, 3, 40]),
            t(&randn(&mut rng, 24 * 40, 1.0), &[24, 40]),
            t(&randn(&mut rng, 2 * 3 * 24, 1.0), &[2, 3, 24]),
        );
        let (dx, dw) = matmul_backward(&x, &w, &g, true).unwrap();
        let (dxd, dwd) =
            matmul_backward(&x.to_device(dev).unwrap(), &w.to_device(dev).unwrap(), &g.to_device(dev).unwrap(), true)
                .unwrap();
        assert_eq!(dxd.shape(), &[2, 3, 40]);
        assert_close(&dxd.to_vec().unwrap(), &to_f64(&dx.to_vec().unwrap()), 1e-4, 1e-5, "dx device");
        assert_close(&dwd.to_vec().unwrap(), &to_f64(&dw.to_vec().unwrap()), 1e-4, 1e-5, "dw device");
    }

    /// A random normal bf16 tensor on the CPU.
    #[cfg(feature = "cuda")]
    fn rand_bf16(rng: &mut Rng, shape: &[usize]) -> Tensor {
        t(&randn(rng, shape.iter().product(), 1.0), shape).to_dtype(DType::BF16).unwrap()
    }

    /// v2, the few-rows kernel, against the CPU from the same bf16 inputs: row counts across 1–4
    /// m-tiles and their edges, N not a multiple of 16, K with a partial last 64-column chunk and
    /// K below one chunk; the output poisoned first. The kernel is called directly: pinning
    /// version 2 (process-wide) would make parallel tests' other matmuls fail. Which calls it may
    /// take is checked apart.
    #[cfg(feature = "cuda")]
    #[test]
    fn few_rows_device_matches_cpu() {
        let Some(dev) = test_cuda_device() else { return };
        let Device::Cuda(ord) = dev else { return };
        let mut rng = Rng::new(17);
        // n-tiles per block: 4 at (1, 8500) and (32, 8450), 2 at (5, 5000) and (40, 4300)
        // (33+ rows take at most 2), 1 elsewhere.
        let shapes = [
            (1, 16, 64),
            (7, 40, 200),
            (16, 13, 8),
            (17, 1000, 72),
            (32, 96, 896),
            (33, 24, 136),
            (64, 31, 520),
            (1, 8500, 16),
            (32, 8450, 16),
            (5, 5000, 8),
            (40, 4300, 24),
        ];
        let tiles: Vec<usize> = shapes.iter().map(|&(m, n, _)| cuda::few_rows_n_tiles(m, n, false)).collect();
        assert_eq!(tiles, [1, 1, 1, 1, 1, 1, 1, 4, 4, 2, 2]);
        for (m, n, k) in shapes {
            let (x, w) = (rand_bf16(&mut rng, &[m, k]), rand_bf16(&mut rng, &[n, k]));
            let c32 = Tensor::zeros(&[m, n], DType::F32, Device::Cpu).unwrap();
            matmul_into(&x, &w, false, true, &c32, false).unwrap();
            let want = to_f64(&c32.to_vec().unwrap());
            let (xd, wd) = (x.to_device(dev).unwrap(), w.to_device(dev).unwrap());
            let out = Tensor::full(f64::NAN, &[m, n], DType::BF16, dev).unwrap();
            assert_eq!(cuda::versions_for(&xd, &wd, false, true, DType::BF16, false, m, k).unwrap(), &[1, 2]);
            cuda::few_rows(ord, &xd, &wd, &out, m, n, k, false).unwrap();
            let tol = 1e-5 * (k as f64).sqrt();
            assert_close(&out.to_vec_f32().unwrap(), &want, tol, DType::BF16.epsilon(), &format!("v2 m{m} n{n} k{k}"));
        }
        // What it cannot take: 65 rows, K not a multiple of 8, f32 out or in, accumulation, x at
        // an offset that is not 16-byte aligned.
        let z = |shape: &[usize], dt| Tensor::zeros(shape, dt, dev).unwrap();
        let w = z(&[16, 64], DType::BF16);
        let only_cublas: &[u32] = &[1];
        let vf =
            |x: &Tensor, w: &Tensor, out, acc, m, k| cuda::versions_for(x, w, false, true, out, acc, m, k).unwrap();
        assert_eq!(vf(&z(&[65, 64], DType::BF16), &w, DType::BF16, false, 65, 64), only_cublas);
        assert_eq!(vf(&z(&[2, 12], DType::BF16), &z(&[16, 12], DType::BF16), DType::BF16, false, 2, 12), only_cublas);
        assert_eq!(vf(&z(&[2, 64], DType::BF16), &w, DType::F32, false, 2, 64), only_cublas);
        assert_eq!(vf(&z(&[2, 64], DType::F32), &z(&[16, 64], DType::F32), DType::F32, false, 2, 64), only_cublas);
        assert_eq!(vf(&z(&[2, 64], DType::BF16), &w, DType::BF16, true, 2, 64), only_cublas);
        let shifted = z(&[3 * 64 + 1], DType::BF16).narrow_rows(1, 3 * 64).unwrap().reshape(&[3, 64]).unwrap();
        assert_eq!(vf(&shifted, &w, DType::BF16, false, 3, 64), only_cublas);
    }

    /// `linear_swiglu` is `swiglu_fused ∘ linear`, bit for bit, and refuses an odd row count.
    #[test]
    fn linear_swiglu_is_swiglu_of_linear() {
        let mut rng = Rng::new(18);
        for dt in [DType::F32, DType::BF16] {
            let x = t(&randn(&mut rng, 3 * 2 * 24, 1.0), &[3, 2, 24]).to_dtype(dt).unwrap();
            let w = t(&randn(&mut rng, 2 * 10 * 24, 1.0), &[20, 24]).to_dtype(dt).unwrap();
            let got = linear_swiglu(&x, &w).unwrap();
            assert_eq!(got.shape(), &[3, 2, 10]);
            let want = crate::swiglu::swiglu_fused(&linear(&x, &w).unwrap()).unwrap();
            assert_eq!(got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap(), "{dt}");
        }
        let x = t(&randn(&mut rng, 24, 1.0), &[1, 24]);
        let e = linear_swiglu(&x, &t(&randn(&mut rng, 9 * 24, 1.0), &[9, 24])).unwrap_err().to_string();
        assert!(e.contains("linear_swiglu") && e.contains("[9, 24]"), "{e}");
    }

    /// The few-rows kernel's GLU form gives the bits of its plain form followed by
    /// `swiglu_fused` on the device (so the epilogue rounds as the two ops do), at m-tile and
    /// n-tile edges, 2 and 4 n-tiles per block, and a ragged I.
    #[cfg(feature = "cuda")]
    #[test]
    fn few_rows_glu_device_is_gemm_then_swiglu() {
        let Some(dev) = test_cuda_device() else { return };
        let Device::Cuda(ord) = dev else { return };
        let mut rng = Rng::new(19);
        // (m, I, k): 2 n-tiles per block except (3, 4300, 16) and (32, 4400, 8), which take 4.
        let shapes = [
            (1, 8, 64),
            (5, 37, 136),
            (16, 100, 8),
            (17, 64, 200),
            (33, 50, 72),
            (64, 29, 520),
            (3, 4300, 16),
            (32, 4400, 8),
        ];
        let tiles: Vec<usize> = shapes.iter().map(|&(m, i, _)| cuda::few_rows_n_tiles(m, i, true)).collect();
        assert_eq!(tiles, [2, 2, 2, 2, 2, 2, 4, 4]);
        for (m, i, k) in shapes {
            let x = rand_bf16(&mut rng, &[m, k]).to_device(dev).unwrap();
            let w = rand_bf16(&mut rng, &[2 * i, k]).to_device(dev).unwrap();
            let gate_up = Tensor::full(f64::NAN, &[m, 2 * i], DType::BF16, dev).unwrap();
            cuda::few_rows(ord, &x, &w, &gate_up, m, 2 * i, k, false).unwrap();
            let want = crate::swiglu::swiglu_fused(&gate_up).unwrap().to_vec_f32().unwrap();
            let got = Tensor::full(f64::NAN, &[m, i], DType::BF16, dev).unwrap();
            cuda::few_rows(ord, &x, &w, &got, m, i, k, true).unwrap();
            assert_eq!(got.to_vec_f32().unwrap(), want, "glu m{m} i{i} k{k}");
        }
    }
}
