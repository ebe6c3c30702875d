//! Helpers shared by the op tests, the device tests and the benchmarks: float64 comparison
//! with dtype-scaled tolerances, finite differences, and the device-test gate.

use std::path::{Path, PathBuf};

use smelt_engine::{Device, Rng};

/// A path inside the repository (e.g. `tests/fixtures/qwen2-tiny`). Found from where the
/// crates were built; when a test binary runs on another machine (scripts/gpu-check runs
/// bundled binaries from the repository root of a copy of the tree), from `$SMELT_REPO` or
/// the current directory.
pub fn repo_path(rel: impl AsRef<Path>) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = match std::env::var_os("SMELT_REPO") {
        Some(r) => PathBuf::from(r),
        None if built.join("kernels/cuda").is_dir() => built,
        None => PathBuf::from("."),
    };
    root.join(rel)
}

/// Largest |got − want| and the index where it occurs.
pub fn max_abs_diff(got: &[f32], want: &[f64]) -> (f64, usize) {
    assert_eq!(got.len(), want.len(), "max_abs_diff: lengths differ");
    got.iter().zip(want).enumerate().fold((0.0, 0), |(m, mi), (i, (g, w))| {
        let d = if g.is_nan() || w.is_nan() { f64::INFINITY } else { (*g as f64 - w).abs() };
        if d > m {
            (d, i)
        } else {
            (m, mi)
        }
    })
}

/// Asserts |got − want| ≤ atol + rtol·|want| elementwise, naming `what` and the worst index.
#[track_caller]
pub fn assert_close(got: &[f32], want: &[f64], atol: f64, rtol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = (*g as f64 - w).abs() <= atol + rtol * w.abs();
        assert!(ok, "{what}: element {i}: got {g}, want {w} (atol {atol}, rtol {rtol})");
    }
}

/// Central finite differences of a scalar function of `x`, in float64.
pub fn finite_diff(f: impl Fn(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = x[i];
            x[i] = x0 + h;
            let fp = f(&x);
            x[i] = x0 - h;
            let fm = f(&x);
            x[i] = x0;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// Random f32 values with a nonzero mean and spread (never all zeros).
pub fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32 * std + 0.01).collect()
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The device for device tests, or `None` (after printing why) when there is no usable GPU.
/// `SMELT_REQUIRE_GPU=1` turns the absence into a panic, so a GPU run cannot silently skip.
pub fn test_cuda_device() -> Option<Device> {
    #[cfg(feature = "cuda")]
    {
        match smelt_engine::cuda::device(0) {
            Ok(_) => return Some(Device::Cuda(0)),
            Err(e) => {
                if std::env::var("SMELT_REQUIRE_GPU").as_deref() == Ok("1") {
                    panic!("SMELT_REQUIRE_GPU=1 but no CUDA device: {e}");
                }
                eprintln!("skipping device test: {e}");
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        if std::env::var("SMELT_REQUIRE_GPU").as_deref() == Ok("1") {
            panic!("SMELT_REQUIRE_GPU=1 but this build has no `cuda` feature");
        }
        eprintln!("skipping device test: built without the `cuda` feature");
    }
    None
}

/// Whether `dev` is the CUDA emulator (`SMELT_CUDA_EMULATOR=1`), for device tests whose full
/// size would take minutes on a CPU; they shrink or skip that part, saying so.
pub fn emulated(dev: Device) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(i) = dev {
        return smelt_engine::cuda::device(i).map(|d| d.is_emulated()).unwrap_or(false);
    }
    let _ = dev;
    false
}

/// `SMELT_TEST_REDUCED=1`: the device tests with the largest tables (attention backward,
/// sampling at V = 151,936) run a reduced one. `scripts/gpu-check` sets it for compute-sanitizer's
/// racecheck, which checks every shared-memory access and so runs those tables past its per-test
/// limit; the full tables run in the plain device-test step of the same visit. The reduced tables
/// keep every kernel version and several tiles per block, where a missing barrier would show.
pub fn reduced_tables() -> bool {
    std::env::var("SMELT_TEST_REDUCED").as_deref() == Ok("1")
}

/// For tests that need NVRTC and find none: prints why and returns (the test passes), unless
/// `SMELT_REQUIRE_NVRTC=1` (CI), where it panics.
pub fn skip_without_nvrtc(test: &str, why: impl std::fmt::Display) {
    if std::env::var("SMELT_REQUIRE_NVRTC").as_deref() == Ok("1") {
        panic!("{test}: SMELT_REQUIRE_NVRTC=1 but NVRTC is unavailable: {why}");
    }
    eprintln!("{test}: SKIPPED, NVRTC is unavailable: {why}");
}
