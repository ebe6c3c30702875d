//! Dtype casts among f32, bf16 and f16, on the tensor's own device (no host round trip).
//!
//! Rounding: every conversion goes through f32 (exact for every bf16/f16 value), so each result
//! is rounded once, to nearest with ties to even. NaN stays NaN, ±Inf and ±0 keep their sign,
//! f16 overflow becomes ±Inf, denormals are kept. On the CPU the results are `half`'s bit for
//! bit; the CUDA kernels match them bit for bit except for NaN payloads.
//!
//! No backward: a cast's gradient is the cast of the gradient back to the input dtype.

use rayon::prelude::*;
use smelt_engine::{bf16, f16, DType, Device, Error, Result, Tensor, WithDType};

crate::kernel_source!("cast");

/// `x` converted to `dtype` (f32, bf16 or f16). Casting to the tensor's own dtype returns a
/// clone that shares storage, as [`Tensor::to_dtype`] does; use [`cast_into`] for a copy.
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    check_dtype(x.dtype())?;
    check_dtype(dtype)?;
    if dtype == x.dtype() {
        return Ok(x.clone());
    }
    let out = Tensor::empty(x.shape(), dtype, x.device())?;
    run(x, &out)?;
    Ok(out)
}

/// Writes `x` converted to `out`'s dtype into `out` (same element count, same device, separate
/// storage). With equal dtypes this is a device-side copy.
pub fn cast_into(x: &Tensor, out: &Tensor) -> Result<()> {
    check_dtype(x.dtype())?;
    check_dtype(out.dtype())?;
    crate::ensure_shape!(
        x.elem_count() == out.elem_count(),
        "cast_into",
        "x {:?} {} vs out {:?} {}",
        x.shape(),
        x.dtype(),
        out.shape(),
        out.dtype()
    );
    if x.device() != out.device() {
        return Err(Error::DeviceMismatch { op: "cast_into", a: x.device(), b: out.device() });
    }
    if x.same_storage(out) {
        return Err(Error::Busy { op: "cast_into" });
    }
    run(x, out)
}

fn check_dtype(dt: DType) -> Result<()> {
    match dt {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        dt => Err(Error::UnsupportedDType { op: "cast", dtype: dt }),
    }
}

fn run(x: &Tensor, out: &Tensor) -> Result<()> {
    match out.device() {
        Device::Cpu => match x.dtype() {
            DType::F32 => run_cpu_from::<f32>(x, out),
            DType::BF16 => run_cpu_from::<bf16>(x, out),
            DType::F16 => run_cpu_from::<f16>(x, out),
            dt => Err(Error::UnsupportedDType { op: "cast", dtype: dt }),
        },
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::cast(ord, x, out),
        #[cfg(not(feature = "cuda"))]
        d => Err(Error::UnsupportedDevice { op: "cast", device: d }),
    }
}

fn run_cpu_from<S: cpu::CastElem>(x: &Tensor, out: &Tensor) -> Result<()> {
    let src = x.cpu_read::<S>()?;
    match out.dtype() {
        DType::F32 => cpu::cast(&src, &mut out.cpu_write::<f32>()?),
        DType::BF16 => cpu::cast(&src, &mut out.cpu_write::<bf16>()?),
        DType::F16 => cpu::cast(&src, &mut out.cpu_write::<f16>()?),
        dt => return Err(Error::UnsupportedDType { op: "cast", dtype: dt }),
    }
    Ok(())
}

/// Slice-level CPU implementations (the reference for the CUDA kernels).
pub mod cpu {
    use super::*;

    const CHUNK: usize = 1 << 15;

    /// A float storage type that converts exactly to f32 and rounds to nearest even from it.
    pub trait CastElem: WithDType {
        fn to_f32(self) -> f32;
        fn from_f32(f: f32) -> Self;
    }
    impl CastElem for f32 {
        #[inline]
        fn to_f32(self) -> f32 {
            self
        }
        #[inline]
        fn from_f32(f: f32) -> Self {
            f
        }
    }
    impl CastElem for bf16 {
        #[inline]
        fn to_f32(self) -> f32 {
            bf16::to_f32(self)
        }
        #[inline]
        fn from_f32(f: f32) -> Self {
            bf16::from_f32(f)
        }
    }
    impl CastElem for f16 {
        #[inline]
        fn to_f32(self) -> f32 {
            f16::to_f32(self)
        }
        #[inline]
        fn from_f32(f: f32) -> Self {
            f16::from_f32(f)
        }
    }

    /// `dst[i] = D(S(src[i]) as f32)`. Lengths must match (the Tensor-level functions check).
    pub fn cast<S: CastElem, D: CastElem>(src: &[S], dst: &mut [D]) {
        debug_assert_eq!(src.len(), dst.len());
        smelt_engine::cpu::pool().install(|| {
            dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| {
                for (d, s) in d.iter_mut().zip(s) {
                    *d = D::from_f32(s.to_f32());
                }
            })
        })
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{launch, Arg, LaunchCfg};

    pub fn cast(ord: usize, x: &Tensor, out: &Tensor) -> Result<()> {
        let n = out.elem_count() as u64;
        if n == 0 {
            return Ok(());
        }
        let (px, po) = (x.cuda_ptr()?, out.cuda_ptr()?);
        let vec8 = px % 16 == 0 && po % 16 == 0;
        let base = format!("cast_{}_{}", x.dtype().name(), out.dtype().name());
        let (func, count) = if vec8 { (format!("{base}_v8"), n / 8) } else { (base, n) };
        let block = 256u32;
        // The v8 tail is converted by the first n % 8 threads, so at least one block runs.
        let grid = count.div_ceil(block as u64).clamp(1, 132 * 16) as u32;
        let cfg = LaunchCfg { grid: (grid, 1, 1), block: (block, 1, 1), smem: 0 };
        launch(ord, &SRC, &func, cfg, &[Arg::Ptr(px), Arg::Ptr(po), Arg::U64(n)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use smelt_engine::Rng;

    const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

    fn bits(t: &Tensor) -> Vec<u32> {
        match t.dtype() {
            DType::F32 => t.to_vec::<f32>().unwrap().iter().map(|x| x.to_bits()).collect(),
            DType::BF16 => t.to_vec::<bf16>().unwrap().iter().map(|x| x.to_bits() as u32).collect(),
            _ => t.to_vec::<f16>().unwrap().iter().map(|x| x.to_bits() as u32).collect(),
        }
    }

    /// Equal bits, except that any NaN matches any NaN.
    #[track_caller]
    fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
        let (g, w) = (bits(got), bits(want));
        let (gf, wf) = (got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
        assert_eq!(g.len(), w.len(), "{what}: lengths");
        for i in 0..g.len() {
            let ok = g[i] == w[i] || (gf[i].is_nan() && wf[i].is_nan());
            assert!(ok, "{what}: element {i}: got {} ({:#x}), want {} ({:#x})", gf[i], g[i], wf[i], w[i]);
        }
    }

    /// Specials, denormals of every type, f16 overflow, and exact rounding ties.
    fn special_values() -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-40,   // f32 denormal: a bf16 denormal too
            -1e-45,  // smallest f32 denormal
            6e-8,    // f16 smallest denormal region
            3e-5,    // f16 denormal
            65504.0, // f16 max
            65519.0, // rounds down to f16 max
            65520.0, // f16 tie to even: overflows to Inf
            -70000.0,
            1e-9, // underflows to f16 zero
        ];
        // bf16 ties (7 stored mantissa bits): 1 + 2^-8 → 1, 1 + 3·2^-8 → 1 + 2^-6.
        v.extend([1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), -(1.0 + 2f32.powi(-8))]);
        // f16 ties (10 mantissa bits): 1 + 2^-11 → 1, 1 + 3·2^-11 → 1 + 2^-9.
        v.extend([1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 1024.0 + 0.5, 2048.0 + 1.0]);
        v
    }

    #[test]
    fn ties_and_specials_round_to_nearest_even() {
        let v = special_values();
        let x = Tensor::from_slice(&v, &[v.len()], Device::Cpu).unwrap();
        let b = cast(&x, DType::BF16).unwrap().to_vec_f32().unwrap();
        let h = cast(&x, DType::F16).unwrap().to_vec_f32().unwrap();
        let at = |val: f32| v.iter().position(|&y| y.to_bits() == val.to_bits()).unwrap();
        assert_eq!(b[at(1.0 + 2f32.powi(-8))], 1.0);
        assert_eq!(b[at(1.0 + 3.0 * 2f32.powi(-8))], 1.0 + 2f32.powi(-6));
        assert_eq!(b[at(-(1.0 + 2f32.powi(-8)))], -1.0);
        assert_eq!(h[at(1.0 + 2f32.powi(-11))], 1.0);
        assert_eq!(h[at(1.0 + 3.0 * 2f32.powi(-11))], 1.0 + 2f32.powi(-9));
        assert_eq!(h[at(1024.5)], 1024.0);
        assert_eq!(h[at(2049.0)], 2048.0);
        assert_eq!(h[at(65519.0)], 65504.0);
        assert_eq!(h[at(65520.0)], f32::INFINITY);
        assert_eq!(h[at(-70000.0)], f32::NEG_INFINITY);
        assert_eq!(h[at(1e-9)], 0.0);
        assert!(h[at(3e-5)] > 0.0 && h[at(6e-8)] > 0.0, "f16 denormals kept");
        assert!(b[at(1e-40)] > 0.0, "bf16 denormal kept");
        for out in [&b, &h] {
            assert!(out[at(f32::NAN)].is_nan() && out[at(-f32::NAN)].is_nan());
            assert_eq!(out[at(f32::INFINITY)], f32::INFINITY);
            assert_eq!(out[at(f32::NEG_INFINITY)], f32::NEG_INFINITY);
            assert!(out[at(-0.0)] == 0.0 && out[at(-0.0)].is_sign_negative());
            assert!(out[at(0.0)] == 0.0 && out[at(0.0)].is_sign_positive());
        }
        assert_eq!(b[at(f32::MAX)], f32::INFINITY, "f32::MAX is past bf16's largest finite value");
    }

    /// Independent check of round-to-nearest-even: the result is no farther from x (in f64)
    /// than either neighbouring representable value, and on a tie its last mantissa bit is 0.
    fn check_nearest_even(x: f32, r_bits: u16, to_f64: impl Fn(u16) -> f64, what: &str) {
        let r = to_f64(r_bits);
        if x.is_nan() || r.is_infinite() {
            return;
        }
        let xd = x as f64;
        let d = (xd - r).abs();
        for nb in [r_bits.wrapping_add(1), r_bits.wrapping_sub(1)] {
            let n = to_f64(nb);
            // Stepping the bits past ±0 or into NaN/Inf is not a neighbour.
            if n.is_nan() || n.is_infinite() || (n.signum() != r.signum() && n != 0.0 && r != 0.0) {
                continue;
            }
            let dn = (xd - n).abs();
            assert!(d <= dn, "{what}: {x} -> {r} but {n} is nearer");
            if d == dn {
                assert_eq!(r_bits & 1, 0, "{what}: tie {x} -> {r} is not even");
            }
        }
    }

    #[test]
    fn random_values_round_to_nearest_even_and_match_half() {
        let mut rng = Rng::new(11);
        // Magnitudes from f32 denormals (2^-149) to past f16 overflow, in a long row.
        let n: usize = 3 * 151_936;
        let v: Vec<f32> = (0..n)
            .map(|i| {
                let e = (i % 190) as i32 - 150;
                ((rng.normal() + 0.01) * 2f64.powi(e)) as f32
            })
            .chain(special_values())
            .collect();
        let x = Tensor::from_slice(&v, &[v.len()], Device::Cpu).unwrap();
        let b = cast(&x, DType::BF16).unwrap();
        let h = cast(&x, DType::F16).unwrap();
        assert_same(&b, &x.to_dtype(DType::BF16).unwrap(), "f32->bf16 vs half");
        assert_same(&h, &x.to_dtype(DType::F16).unwrap(), "f32->f16 vs half");
        let (bv, hv) = (b.to_vec::<bf16>().unwrap(), h.to_vec::<f16>().unwrap());
        for (i, &xi) in v.iter().enumerate().step_by(7) {
            check_nearest_even(xi, bv[i].to_bits(), |u| bf16::from_bits(u).to_f64(), "bf16");
            check_nearest_even(xi, hv[i].to_bits(), |u| f16::from_bits(u).to_f64(), "f16");
        }
        // Widening is exact; bf16 <-> f16 rounds once from the exact f32 value.
        assert_same(&cast(&b, DType::F32).unwrap(), &b.to_dtype(DType::F32).unwrap(), "bf16->f32");
        assert_same(&cast(&h, DType::F32).unwrap(), &h.to_dtype(DType::F32).unwrap(), "f16->f32");
        assert_same(&cast(&cast(&b, DType::F32).unwrap(), DType::BF16).unwrap(), &b, "bf16 round trip");
        assert_same(
            &cast(&b, DType::F16).unwrap(),
            &b.to_dtype(DType::F32).unwrap().to_dtype(DType::F16).unwrap(),
            "bf16->f16",
        );
        assert_same(
            &cast(&h, DType::BF16).unwrap(),
            &h.to_dtype(DType::F32).unwrap().to_dtype(DType::BF16).unwrap(),
            "f16->bf16",
        );
    }

    #[test]
    fn cast_into_copies_and_checks_shapes() {
        let x = Tensor::from_slice(&[1.5f32, -2.25, 3.0], &[3], Device::Cpu).unwrap();
        let out = Tensor::full(7.0, &[1, 3], DType::BF16, Device::Cpu).unwrap();
        cast_into(&x, &out).unwrap();
        assert_eq!(out.to_vec_f32().unwrap(), vec![1.5, -2.25, 3.0]);
        let same = Tensor::full(7.0, &[3], DType::F32, Device::Cpu).unwrap();
        cast_into(&x, &same).unwrap();
        assert_eq!(same.to_vec::<f32>().unwrap(), vec![1.5, -2.25, 3.0]);
        let wrong = Tensor::zeros(&[4], DType::F16, Device::Cpu).unwrap();
        let e = cast_into(&x, &wrong).unwrap_err().to_string();
        assert!(e.contains("cast_into") && e.contains("[3]") && e.contains("[4]"), "{e}");
        assert!(cast_into(&x, &x).is_err());
        let ids = Tensor::zeros(&[3], DType::I32, Device::Cpu).unwrap();
        assert!(matches!(cast(&ids, DType::F32), Err(Error::UnsupportedDType { .. })));
        assert!(matches!(cast(&x, DType::U32), Err(Error::UnsupportedDType { .. })));
        assert!(cast(&x, DType::F32).unwrap().same_storage(&x));
    }

    #[test]
    fn device_matches_cpu() {
        let Some(dev) = test_cuda_device() else { return };
        let mut rng = Rng::new(12);
        let specials = special_values();
        for n in [1usize, 7, 8, 9, 1023, 151_936, 3 * 151_936 + 5] {
            let mut v = randn(&mut rng, n, 3.0);
            for (i, s) in specials.iter().enumerate().take(n) {
                v[(i * 7919) % n] = *s;
            }
            let x32 = Tensor::from_slice(&v, &[n], Device::Cpu).unwrap();
            for from in FLOATS {
                let x = x32.to_dtype(from).unwrap();
                let xd = x.to_device(dev).unwrap();
                // A one-element offset view takes the unaligned (scalar) path.
                let (xv, xdv) = if n > 1 {
                    (x.narrow_rows(1, n - 1).unwrap(), xd.narrow_rows(1, n - 1).unwrap())
                } else {
                    (x.clone(), xd.clone())
                };
                for to in FLOATS {
                    for (src_cpu, src_dev, tag) in [(&x, &xd, "aligned"), (&xv, &xdv, "offset")] {
                        let want = Tensor::empty(src_cpu.shape(), to, Device::Cpu).unwrap();
                        cast_into(src_cpu, &want).unwrap();
                        let got = Tensor::full(-3.0, src_dev.shape(), to, dev).unwrap();
                        cast_into(src_dev, &got).unwrap();
                        assert_same(&got, &want, &format!("{from}->{to} n={n} {tag}"));
                    }
                }
            }
        }
    }
}
