//! Rotary position embedding in Hugging Face's rotate-half convention (Qwen2/Qwen3).
//!
//! For `x [tokens, heads, head_dim]` (any rank ≥ 2: first dim tokens, last dim head_dim, the
//! dims between are heads), h = head_dim/2, token t at position p = `positions[t]`:
//! `out[i] = x[i]·cos − x[i+h]·sin`, `out[i+h] = x[i+h]·cos + x[i]·sin` (i < h), with
//! cos/sin of `p·inv_freq[i]`. Positions are per token, so packed sequences restart at 0.
//!
//! Precision follows HF: `inv_freq = 1.0 / (theta ** (arange(0, d, 2).float() / d))` in f32
//! ([`cpu::inv_freq`]), the angle `p·inv_freq[i]` as one f32 product (HF's `inv_freq @
//! position_ids` with k = 1), cos/sin in f32. For bf16 `x`, HF casts cos/sin to bf16 and computes
//! `q*cos + rotate_half(q)*sin` as three bf16 ops; we round at the same three places.
//!
//! Tables: [`RopeTable`] holds only `inv_freq` (head_dim/2 floats) on the tensor's device; cos and
//! sin are computed in the kernel from the f32 angle (accurate `sincosf` on CUDA, `f32::sin_cos`
//! on CPU), so no `max_pos` is needed and positions can be anything. Build one table per model
//! and use its methods to avoid re-uploading `inv_freq` on every call; the free functions build
//! a table per call.
//!
//! Backward is the inverse rotation (sin → −sin): [`rope_backward`]. In-place variants:
//! [`rope_`], [`RopeTable::forward_`], [`RopeTable::backward_`].
//! Dtypes: f32, and bf16 storage with f32 math. Positions: u32.
//!
//! CUDA kernel versions (thread mappings in `rope.cu`; pin one with
//! `crate::versions::force("rope", ..)` or `scoped`): v1 scalar and v2 16-byte vectors, one (token, head,
//! chunk) per step; v3 (the default) computes each (token, chunk)'s cos/sin once for all heads
//! on a 2-D grid, with vectors where v2 could use them. All give the same bits.

use rayon::prelude::*;
use smelt_engine::{bf16, DType, Device, Error, Result, Tensor, WithDType};

crate::kernel_source!("rope");

/// Rotates `x [tokens, .., head_dim]` by `positions [tokens]` (u32) with base `theta`.
pub fn rope(x: &Tensor, positions: &Tensor, theta: f32) -> Result<Tensor> {
    RopeTable::new(head_dim_of("rope", x)?, theta, x.device())?.forward(x, positions)
}

/// The gradient of [`rope`]: `dy` rotated back (the transpose of a rotation is its inverse).
pub fn rope_backward(dy: &Tensor, positions: &Tensor, theta: f32) -> Result<Tensor> {
    RopeTable::new(head_dim_of("rope_backward", dy)?, theta, dy.device())?.backward(dy, positions)
}

/// [`rope`] in place.
pub fn rope_(x: &Tensor, positions: &Tensor, theta: f32) -> Result<()> {
    RopeTable::new(head_dim_of("rope_", x)?, theta, x.device())?.forward_(x, positions)
}

fn head_dim_of(op: &'static str, x: &Tensor) -> Result<usize> {
    match x.shape().last() {
        Some(&d) if x.rank() >= 2 => Ok(d),
        _ => Err(Error::shape(op, format!("x {:?} must be [tokens, .., head_dim]", x.shape()))),
    }
}

/// HF's `inv_freq` for one head_dim and theta, resident on a device.
#[derive(Clone, Debug)]
pub struct RopeTable {
    head_dim: usize,
    theta: f32,
    /// `[head_dim/2]` f32 on `device`.
    inv_freq: Tensor,
}

impl RopeTable {
    /// Fails unless `head_dim` is even and positive.
    pub fn new(head_dim: usize, theta: f32, device: Device) -> Result<RopeTable> {
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::shape("rope", format!("head_dim {head_dim} must be even and positive")));
        }
        let inv = cpu::inv_freq(head_dim, theta);
        Ok(RopeTable { head_dim, theta, inv_freq: Tensor::from_slice(&inv, &[head_dim / 2], device)? })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    pub fn theta(&self) -> f32 {
        self.theta
    }
    /// `[head_dim/2]` f32.
    pub fn inv_freq(&self) -> &Tensor {
        &self.inv_freq
    }

    pub fn forward(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        self.run_new("rope", x, positions, 1.0)
    }
    pub fn backward(&self, dy: &Tensor, positions: &Tensor) -> Result<Tensor> {
        self.run_new("rope_backward", dy, positions, -1.0)
    }
    pub fn forward_(&self, x: &Tensor, positions: &Tensor) -> Result<()> {
        self.run("rope_", x, positions, 1.0, None)
    }
    pub fn backward_(&self, dy: &Tensor, positions: &Tensor) -> Result<()> {
        self.run("rope_backward_", dy, positions, -1.0, None)
    }

    fn run_new(&self, op: &'static str, x: &Tensor, positions: &Tensor, sign: f32) -> Result<Tensor> {
        let out = Tensor::empty(x.shape(), x.dtype(), x.device())?;
        self.run(op, x, positions, sign, Some(&out))?;
        Ok(out)
    }

    /// Writes the rotation of `x` into `out`, or into `x` itself when `out` is `None`.
    fn run(&self, op: &'static str, x: &Tensor, positions: &Tensor, sign: f32, out: Option<&Tensor>) -> Result<()> {
        let tokens = x.shape().first().copied().unwrap_or(0);
        if x.rank() < 2 || x.shape().last() != Some(&self.head_dim) || positions.shape() != [tokens] {
            return Err(Error::shape(
                op,
                format!(
                    "x {:?} must be [tokens, .., {}] with positions [tokens], got positions {:?}",
                    x.shape(),
                    self.head_dim,
                    positions.shape()
                ),
            ));
        }
        if positions.dtype() != DType::U32 {
            return Err(Error::DType { op, expected: DType::U32, got: positions.dtype() });
        }
        if !matches!(x.dtype(), DType::F32 | DType::BF16) {
            return Err(Error::UnsupportedDType { op, dtype: x.dtype() });
        }
        for t in [positions, &self.inv_freq] {
            if t.device() != x.device() {
                return Err(Error::DeviceMismatch { op, a: x.device(), b: t.device() });
            }
        }
        let heads = if tokens == 0 { 0 } else { x.elem_count() / (tokens * self.head_dim) };
        match x.device() {
            Device::Cpu => {
                fn go<T: WithDType>(
                    x: &Tensor,
                    pos: &Tensor,
                    inv: &Tensor,
                    heads: usize,
                    sign: f32,
                    out: Option<&Tensor>,
                ) -> Result<()> {
                    let (p, f) = (pos.cpu_read::<u32>()?, inv.cpu_read::<f32>()?);
                    match out {
                        Some(o) => cpu::rope(&x.cpu_read::<T>()?, &p, &f, heads, sign, &mut o.cpu_write::<T>()?),
                        None => cpu::rope_inplace(&mut x.cpu_write::<T>()?, &p, &f, heads, sign),
                    }
                    Ok(())
                }
                match x.dtype() {
                    DType::F32 => go::<f32>(x, positions, &self.inv_freq, heads, sign, out),
                    _ => go::<bf16>(x, positions, &self.inv_freq, heads, sign, out),
                }
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(ord) => cuda::rope(ord, x, positions, &self.inv_freq, tokens, heads, sign, out.unwrap_or(x)),
            #[cfg(not(feature = "cuda"))]
            device => Err(Error::UnsupportedDevice { op, device }),
        }
    }
}

/// Slice-level CPU implementations (the reference for the CUDA kernels).
pub mod cpu {
    use super::*;

    /// HF's `1.0 / (theta ** (torch.arange(0, d, 2).float() / d))`, every step in f32.
    pub fn inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
        (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect()
    }

    #[inline(always)]
    fn round_to<T: WithDType>(v: f32) -> f32 {
        T::from_f64(v as f64).to_f64() as f32
    }

    /// cos and sin of `pos·inv_freq[i]` (f32 angle), rounded to `T` as HF's `cos.to(x.dtype)`.
    /// `sign = -1` gives the inverse rotation.
    pub fn cos_sin<T: WithDType>(pos: u32, inv_freq: &[f32], sign: f32, cos: &mut [f32], sin: &mut [f32]) {
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
            let (sn, cs) = (pos as f32 * f).sin_cos();
            *c = round_to::<T>(cs);
            *s = sign * round_to::<T>(sn);
        }
    }

    /// Rotates one head vector `src [2h]` into `dst [2h]`.
    #[inline]
    fn rotate<T: WithDType>(src: &[T], dst: &mut [T], cos: &[f32], sin: &[f32]) {
        let h = cos.len();
        for i in 0..h {
            let (a, b) = (src[i].to_f64() as f32, src[i + h].to_f64() as f32);
            // HF: (q * cos) + (rotate_half(q) * sin), each op rounded to the storage type.
            let lo = round_to::<T>(a * cos[i]) + round_to::<T>(-b * sin[i]);
            let hi = round_to::<T>(b * cos[i]) + round_to::<T>(a * sin[i]);
            dst[i] = T::from_f64(lo as f64);
            dst[i + h] = T::from_f64(hi as f64);
        }
    }

    /// `out = rope(x)` for `x [tokens, heads, 2h]` (h = `inv_freq.len()`).
    pub fn rope<T: WithDType>(x: &[T], positions: &[u32], inv_freq: &[f32], heads: usize, sign: f32, out: &mut [T]) {
        let (h, row) = (inv_freq.len(), heads * 2 * inv_freq.len());
        if row == 0 {
            return;
        }
        smelt_engine::cpu::pool().install(|| {
            out.par_chunks_mut(row).zip(x.par_chunks(row)).zip(positions.par_iter()).for_each_init(
                || (vec![0f32; h], vec![0f32; h]),
                |(cos, sin), ((o, xr), &p)| {
                    cos_sin::<T>(p, inv_freq, sign, cos, sin);
                    for (oh, xh) in o.chunks_mut(2 * h).zip(xr.chunks(2 * h)) {
                        rotate(xh, oh, cos, sin);
                    }
                },
            )
        })
    }

    /// [`rope`] in place.
    pub fn rope_inplace<T: WithDType>(x: &mut [T], positions: &[u32], inv_freq: &[f32], heads: usize, sign: f32) {
        let (h, row) = (inv_freq.len(), heads * 2 * inv_freq.len());
        if row == 0 {
            return;
        }
        smelt_engine::cpu::pool().install(|| {
            x.par_chunks_mut(row).zip(positions.par_iter()).for_each_init(
                || (vec![0f32; h], vec![0f32; h], Vec::<T>::with_capacity(2 * h)),
                |(cos, sin, tmp), (xr, &p)| {
                    cos_sin::<T>(p, inv_freq, sign, cos, sin);
                    for xh in xr.chunks_mut(2 * h) {
                        tmp.clear();
                        tmp.extend_from_slice(xh);
                        rotate(tmp, xh, cos, sin);
                    }
                },
            )
        })
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{launch, Arg, LaunchCfg};

    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        ord: usize,
        x: &Tensor,
        positions: &Tensor,
        inv_freq: &Tensor,
        tokens: usize,
        heads: usize,
        sign: f32,
        out: &Tensor,
    ) -> Result<()> {
        let h = inv_freq.elem_count();
        let pairs = tokens * heads * h;
        if pairs == 0 {
            return Ok(());
        }
        let (px, po, pp, pf) = (x.cuda_ptr()?, out.cuda_ptr()?, positions.cuda_ptr()?, inv_freq.cuda_ptr()?);
        let n = 16 / x.dtype().size_in_bytes();
        let vec = h % n == 0 && px % 16 == 0 && po % 16 == 0;
        let dt = match x.dtype() {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            dtype => return Err(Error::UnsupportedDType { op: "rope (cuda)", dtype }),
        };
        // The versions this call can run (see rope.cu): v2 needs the vector alignment.
        let allowed: &[u32] = if vec { &[1, 2, 3] } else { &[1, 3] };
        let version = crate::versions::pick("rope", allowed)?;
        let (tokens64, heads32, h32) = (tokens as u64, heads as u32, h as u32);
        if version == 3 {
            let per = if vec { n } else { 1 };
            let func = format!("rope_{dt}_v3{}", if vec { "" } else { "_scalar" });
            let (cfg, hpg) = v3_cfg(tokens, heads, h / per);
            let args = [
                Arg::Ptr(po),
                Arg::Ptr(px),
                Arg::Ptr(pp),
                Arg::Ptr(pf),
                Arg::U64(tokens64),
                Arg::U32(heads32),
                Arg::U32(h32),
                Arg::U32(hpg),
                Arg::F32(sign),
            ];
            return launch(ord, &SRC, &func, cfg, &args);
        }
        let (func, per) = if version == 2 { (format!("rope_{dt}_v2"), n) } else { (format!("rope_{dt}"), 1) };
        let block = 256u32;
        let grid = ((pairs / per) as u64).div_ceil(block as u64).clamp(1, 132 * 16) as u32;
        let cfg = LaunchCfg { grid: (grid, 1, 1), block: (block, 1, 1), smem: 0 };
        let args = [
            Arg::Ptr(po),
            Arg::Ptr(px),
            Arg::Ptr(pp),
            Arg::Ptr(pf),
            Arg::U64(tokens64),
            Arg::U32(heads32),
            Arg::U32(h32),
            Arg::F32(sign),
        ];
        launch(ord, &SRC, &func, cfg, &args)
    }

    /// v3's launch shape for `chunks` chunks per head half, and the heads per z group.
    ///
    /// Blocks hold up to 256 threads: `chunks` across x (split over several blocks when wider),
    /// tokens across y. Tokens beyond 65,535 rows of blocks are looped over in the kernel. The
    /// heads are split into z groups only when tokens·chunks threads would not fill the GPU
    /// (about 2^17 threads keep an H100's 132 SMs busy), since each group recomputes cos/sin.
    pub(super) fn v3_cfg(tokens: usize, heads: usize, chunks: usize) -> (LaunchCfg, u32) {
        let (max_grid_y, fill) = v3_limits();
        let bx = chunks.clamp(1, 256);
        let by = (256 / bx).max(1);
        let grid_x = chunks.div_ceil(bx);
        let grid_y = tokens.div_ceil(by).clamp(1, max_grid_y);
        let threads = (tokens * chunks).max(1);
        let groups = fill.div_ceil(threads).clamp(1, heads.clamp(1, 65_535));
        let hpg = heads.div_ceil(groups).max(1);
        let grid_z = heads.div_ceil(hpg).max(1);
        let cfg = LaunchCfg {
            grid: (grid_x as u32, grid_y as u32, grid_z as u32),
            block: (bx as u32, by as u32, 1),
            smem: 0,
        };
        (cfg, hpg as u32)
    }

    /// (most blocks along y, threads that fill the GPU) for [`v3_cfg`]. Tests shrink them to
    /// reach the token loop and multi-head groups at emulator-sized shapes.
    #[cfg(not(test))]
    fn v3_limits() -> (usize, usize) {
        (65_535, 1 << 17)
    }
    #[cfg(test)]
    pub(super) static V3_LIMITS: std::sync::Mutex<(usize, usize)> = std::sync::Mutex::new((65_535, 1 << 17));
    #[cfg(test)]
    fn v3_limits() -> (usize, usize) {
        *V3_LIMITS.lock().unwrap_or_else(|e| e.into_inner())
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
    fn pos_t(p: &[u32]) -> Tensor {
        Tensor::from_slice(p, &[p.len()], Device::Cpu).unwrap()
    }

    /// float64 rotation, with the angle taken as HF forms it (f32 inv_freq, one f32 product),
    /// or exactly in f64 when `exact_angle`.
    fn reference(x: &[f64], pos: &[u32], heads: usize, d: usize, theta: f32, sign: f64, exact_angle: bool) -> Vec<f64> {
        let h = d / 2;
        let inv = cpu::inv_freq(d, theta);
        let mut out = vec![0f64; x.len()];
        for (tk, &p) in pos.iter().enumerate() {
            for hd in 0..heads {
                let base = (tk * heads + hd) * d;
                for i in 0..h {
                    let ang = if exact_angle {
                        p as f64 / (theta as f64).powf(2.0 * i as f64 / d as f64)
                    } else {
                        (p as f32 * inv[i]) as f64
                    };
                    let (s, c) = (sign * ang.sin(), ang.cos());
                    let (a, b) = (x[base + i], x[base + i + h]);
                    out[base + i] = a * c - b * s;
                    out[base + i + h] = b * c + a * s;
                }
            }
        }
        out
    }

    #[test]
    fn inv_freq_matches_hf_formula() {
        for (d, theta) in [(64usize, 10_000f32), (128, 1_000_000.0), (2, 10_000.0), (74, 500_000.0)] {
            let inv = cpu::inv_freq(d, theta);
            assert_eq!(inv.len(), d / 2);
            assert_eq!(inv[0], 1.0);
            let want: Vec<f64> = (0..d / 2).map(|i| (theta as f64).powf(-(2.0 * i as f64) / d as f64)).collect();
            assert_close(&inv, &want, 0.0, 4.0 * f32::EPSILON as f64, &format!("inv_freq d={d}"));
        }
    }

    #[test]
    fn rope_matches_f64_on_odd_shapes() {
        let mut rng = Rng::new(31);
        for (tokens, heads, d) in [(1usize, 1usize, 2usize), (5, 3, 74), (3, 1, 200), (300, 2, 64), (7, 14, 128)] {
            let x = randn(&mut rng, tokens * heads * d, 1.0);
            let pos: Vec<u32> = (0..tokens).map(|_| rng.below(3000) as u32).collect();
            let theta = 1_000_000f32;
            let xt = t(&x, &[tokens, heads, d]);
            let got = rope(&xt, &pos_t(&pos), theta).unwrap();
            assert_eq!(got.shape(), &[tokens, heads, d]);
            let got = got.to_vec::<f32>().unwrap();
            let want = reference(&to_f64(&x), &pos, heads, d, theta, 1.0, false);
            assert_close(&got, &want, 2e-6, 2e-6, &format!("rope [{tokens},{heads},{d}]"));
            // Against the exact angle, the f32 angle HF uses is off by up to ~pos·2^-24.
            let want = reference(&to_f64(&x), &pos, heads, d, theta, 1.0, true);
            assert_close(&got, &want, 3000.0 * 1.2e-7 * 4.0, 1e-5, "rope vs exact angle");

            // In place gives the same bits.
            let xi = t(&x, &[tokens, heads, d]);
            rope_(&xi, &pos_t(&pos), theta).unwrap();
            assert_eq!(xi.to_vec::<f32>().unwrap(), got, "rope_ == rope");

            // bf16: four roundings (cos/sin, two products, the sum); the exact order has its own test.
            let xh = xt.to_dtype(DType::BF16).unwrap();
            let got = rope(&xh, &pos_t(&pos), theta).unwrap().to_vec_f32().unwrap();
            let want = reference(&to_f64(&xh.to_vec_f32().unwrap()), &pos, heads, d, theta, 1.0, false);
            assert_close(&got, &want, 2.0 * DType::BF16.epsilon(), 2.0 * DType::BF16.epsilon(), "rope bf16");
        }
    }

    #[test]
    fn rope_bf16_follows_hf_rounding_order() {
        let mut rng = Rng::new(32);
        let (tokens, d) = (4usize, 8usize);
        let x = t(&randn(&mut rng, tokens * d, 1.0), &[tokens, 1, d]).to_dtype(DType::BF16).unwrap();
        let pos = [5u32, 17, 0, 1234];
        let got = rope(&x, &pos_t(&pos), 10_000.0).unwrap().to_vec::<bf16>().unwrap();
        let xv = x.to_vec_f32().unwrap();
        let inv = cpu::inv_freq(d, 10_000.0);
        let b = |v: f32| bf16::from_f32(v).to_f32();
        for (tk, &p) in pos.iter().enumerate() {
            for i in 0..d / 2 {
                let ang = p as f32 * inv[i];
                let (c, s) = (b(ang.cos()), b(ang.sin()));
                let (x1, x2) = (xv[tk * d + i], xv[tk * d + i + d / 2]);
                assert_eq!(got[tk * d + i], bf16::from_f32(b(x1 * c) + b(-x2 * s)));
                assert_eq!(got[tk * d + i + d / 2], bf16::from_f32(b(x2 * c) + b(x1 * s)));
            }
        }
    }

    #[test]
    fn packed_positions_restart_at_zero() {
        let mut rng = Rng::new(33);
        let (heads, d) = (2usize, 16usize);
        let x = randn(&mut rng, 5 * heads * d, 1.0);
        let pos = [0u32, 1, 2, 0, 1];
        let got = rope(&t(&x, &[5, heads, d]), &pos_t(&pos), 10_000.0).unwrap().to_vec::<f32>().unwrap();
        let row = heads * d;
        // Position 0 is the identity; equal positions give equal rotations.
        assert_eq!(&got[..row], &x[..row]);
        assert_eq!(&got[3 * row..4 * row], &x[3 * row..4 * row]);
        let again =
            rope(&t(&x[row..2 * row], &[1, heads, d]), &pos_t(&[1]), 10_000.0).unwrap().to_vec::<f32>().unwrap();
        let x4 = rope(&t(&x[4 * row..], &[1, heads, d]), &pos_t(&[1]), 10_000.0).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(&got[row..2 * row], &again[..]);
        assert_eq!(&got[4 * row..], &x4[..]);
    }

    #[test]
    fn rope_backward_by_finite_differences() {
        let mut rng = Rng::new(34);
        let (tokens, heads, d) = (3usize, 2usize, 6usize);
        let n = tokens * heads * d;
        let (x, g) = (randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
        let pos = [3u32, 0, 41];
        let theta = 10_000f32;
        let loss = |x: &[f64]| -> f64 {
            reference(x, &pos, heads, d, theta, 1.0, false).iter().zip(&g).map(|(y, g)| y * *g as f64).sum()
        };
        let want = finite_diff(loss, &to_f64(&x), 1e-5);
        let dx = rope_backward(&t(&g, &[tokens, heads, d]), &pos_t(&pos), theta).unwrap();
        assert_close(&dx.to_vec::<f32>().unwrap(), &want, 1e-5, 1e-4, "rope dx");
        // In-place backward, and backward undoes forward.
        let table = RopeTable::new(d, theta, Device::Cpu).unwrap();
        let gi = t(&g, &[tokens, heads, d]);
        table.backward_(&gi, &pos_t(&pos)).unwrap();
        assert_eq!(gi.to_vec::<f32>().unwrap(), dx.to_vec::<f32>().unwrap());
        let y = table.forward(&t(&x, &[tokens, heads, d]), &pos_t(&pos)).unwrap();
        let back = table.backward(&y, &pos_t(&pos)).unwrap();
        assert_close(&back.to_vec::<f32>().unwrap(), &to_f64(&x), 1e-6, 1e-6, "rope⁻¹(rope(x))");
    }

    #[test]
    fn rope_errors_name_op_and_shapes() {
        let x = Tensor::zeros(&[3, 2, 5], DType::F32, Device::Cpu).unwrap();
        let e = rope(&x, &pos_t(&[0, 1, 2]), 1e4).unwrap_err().to_string();
        assert!(e.contains("rope") && e.contains("head_dim 5"), "{e}");
        let x = Tensor::zeros(&[3, 2, 4], DType::F32, Device::Cpu).unwrap();
        let e = rope(&x, &pos_t(&[0, 1]), 1e4).unwrap_err().to_string();
        assert!(e.contains("rope") && e.contains("[3, 2, 4]") && e.contains("[2]"), "{e}");
        let ip = Tensor::from_slice(&[0i32, 1, 2], &[3], Device::Cpu).unwrap();
        let e = rope(&x, &ip, 1e4).unwrap_err().to_string();
        assert!(e.contains("rope") && e.contains("u32"), "{e}");
    }

    /// Resets v3's test limits when a device test ends, even by a panic.
    #[cfg(feature = "cuda")]
    struct Restore;
    #[cfg(feature = "cuda")]
    impl Drop for Restore {
        fn drop(&mut self) {
            *cuda::V3_LIMITS.lock().unwrap_or_else(|e| e.into_inner()) = (65_535, 1 << 17);
        }
    }

    #[test]
    fn rope_device_matches_cpu() {
        let Some(dev) = test_cuda_device() else { return };
        #[cfg(feature = "cuda")]
        let _restore = Restore;
        let mut rng = Rng::new(35);
        // (tokens, heads, d, v3 limits: most blocks along y, threads that fill the GPU). The last
        // two shrink the limits so v3 loops over tokens (2 and 1 rows of blocks) and gives one
        // thread all heads (14 = 4+4+4+2 and 5 = 4+1 in flight); (37, 3, 74) splits heads over z.
        let shapes = [
            (1usize, 1usize, 2usize, None),
            (37, 3, 74, None),
            (513, 14, 64, None),
            (300, 16, 128, None),
            (64, 2, 100, None),
            (300, 14, 64, Some((2usize, 1usize))),
            (77, 5, 100, Some((1, 1))),
        ];
        for (tokens, heads, d, limits) in shapes {
            #[cfg(feature = "cuda")]
            {
                *cuda::V3_LIMITS.lock().unwrap() = limits.unwrap_or((65_535, 1 << 17));
            }
            let _ = limits;
            for dt in [DType::F32, DType::BF16] {
                let x = t(&randn(&mut rng, tokens * heads * d, 1.0), &[tokens, heads, d]).to_dtype(dt).unwrap();
                let pos: Vec<u32> = (0..tokens).map(|i| if i % 7 == 0 { 0 } else { rng.below(32768) as u32 }).collect();
                let (xg, pg) = (x.to_device(dev).unwrap(), pos_t(&pos).to_device(dev).unwrap());
                let tol = if dt == DType::F32 { 2e-6 } else { dt.epsilon() };
                // CUDA's sincosf (≤ 2 ulp) and the CPU's sin_cos can differ in the last bit; for
                // bf16 that occasionally moves cos or sin across a bf16 rounding boundary (one
                // bf16 ulp, ≤ 2^-8 below 1), shifting an output by up to (|x_i| + |x_i+h|)·2^-8
                // — more than eps·(1 + |out|) when the two products cancel. Allow that much.
                let flip = if dt == DType::F32 { 4.0 * f32::EPSILON as f64 } else { 1.0 / 256.0 };
                let xv = x.to_vec_f32().unwrap();
                let h = d / 2;
                let pair_mag = |e: usize| {
                    let (base, j) = (e - e % d, (e % d) % h);
                    (xv[base + j].abs() + xv[base + j + h].abs()) as f64
                };
                let want_fwd = rope(&x, &pos_t(&pos), 1e6).unwrap();
                let want_bwd = rope_backward(&x, &pos_t(&pos), 1e6).unwrap();
                let poison = || drop(Tensor::full(f64::NAN, x.shape(), dt, dev).unwrap());
                // v2 needs h % (16 bytes of T) == 0 (device buffers are 256-byte aligned).
                let vec_ok = h % (16 / dt.size_in_bytes()) == 0;
                // Every version's outputs, bit for bit, must equal v1's.
                let mut first: Option<[Vec<u8>; 3]> = None;
                for v in [1u32, 2, 3] {
                    let _v = crate::versions::scoped("rope", v);
                    let what = format!("v{v} {dt} [{tokens},{heads},{d}]");
                    if v == 2 && !vec_ok {
                        let e = rope(&xg, &pg, 1e6).unwrap_err().to_string();
                        assert!(e.contains("rope") && e.contains("version 2") && e.contains("[1, 3]"), "{what}: {e}");
                        continue;
                    }
                    let cmp = |got: &Tensor, want: &Tensor, w: &str| {
                        let (got, want) = (got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
                        for (e, (&g, &wv)) in got.iter().zip(&want).enumerate() {
                            let bound = tol * (1.0 + (wv as f64).abs()) + flip * pair_mag(e);
                            assert!(
                                ((g - wv) as f64).abs() <= bound,
                                "{w} {what}: element {e}: got {g}, want {wv} (bound {bound})"
                            );
                        }
                    };
                    poison();
                    let fwd = rope(&xg, &pg, 1e6).unwrap();
                    cmp(&fwd, &want_fwd, "rope");
                    poison();
                    let bwd = rope_backward(&xg, &pg, 1e6).unwrap();
                    cmp(&bwd, &want_bwd, "rope_backward");
                    let xi = x.to_device(dev).unwrap();
                    rope_(&xi, &pg, 1e6).unwrap();
                    cmp(&xi, &want_fwd, "rope_");
                    let bits = [fwd.to_bytes().unwrap(), bwd.to_bytes().unwrap(), xi.to_bytes().unwrap()];
                    match &first {
                        None => first = Some(bits),
                        Some(b1) => {
                            for (k, name) in ["rope", "rope_backward", "rope_"].iter().enumerate() {
                                assert!(bits[k] == b1[k], "{name} {what}: bits differ from v1");
                            }
                        }
                    }
                }
            }
        }
    }
}
