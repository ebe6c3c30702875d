//! The CUDA smoke test: allocation and copies, an NVRTC-compiled kernel, cuBLAS matmul against
//! the CPU, and allocator reuse. Every test skips with a printed reason when there is no GPU
//! (`SMELT_REQUIRE_GPU=1` makes that a failure); `scripts/gpu-check` runs them on a GPU.
//!
//! The tests share one device and its allocator counters, so they take a lock and run one at a
//! time. Without the `cuda` feature there is nothing to test and the file compiles to nothing.
#![cfg(feature = "cuda")]

use std::sync::Mutex;

use smelt_engine::{bf16, DType, Device, Rng, Tensor};
use smelt_kernels::testing::{assert_close, randn, test_cuda_device, to_f64};

static SERIAL: Mutex<()> = Mutex::new(());

/// Under the CUDA emulator the NVRTC module path and the driver probe are not exercised (the
/// emulator compiles with the host compiler and has no driver); those checks need a GPU.
fn emulated(ord: usize) -> bool {
    let e = smelt_kernels::testing::emulated(Device::Cuda(ord));
    if e {
        eprintln!("skipping the driver/NVRTC part of this test: cuda:{ord} is the CPU emulator");
    }
    e
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn device_alloc_and_copy_round_trip() {
    let _g = serial();
    let Some(dev) = test_cuda_device() else { return };
    let mut rng = Rng::new(1);
    for n in [1usize, 3, 1000, 1 << 20] {
        let v = randn(&mut rng, n, 1.0);
        let t = Tensor::from_slice(&v, &[n], dev).unwrap();
        assert_eq!(t.device(), dev);
        assert_eq!(t.to_vec::<f32>().unwrap(), v, "f32 n={n}");
        let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        assert_eq!(Tensor::from_slice(&h, &[n], dev).unwrap().to_vec::<bf16>().unwrap(), h, "bf16 n={n}");
        let i: Vec<i32> = (0..n as i32).map(|x| x * 7 - 3).collect();
        assert_eq!(Tensor::from_slice(&i, &[n], dev).unwrap().to_vec::<i32>().unwrap(), i, "i32 n={n}");
    }
    // Views and device→device→host.
    let v: Vec<f32> = (0..60).map(|x| x as f32).collect();
    let t = Tensor::from_slice(&v, &[6, 10], dev).unwrap();
    assert_eq!(t.narrow_rows(2, 3).unwrap().to_vec::<f32>().unwrap(), v[20..50]);
    assert_eq!(t.to_device(Device::Cpu).unwrap().to_vec::<f32>().unwrap(), v);
    let z = Tensor::zeros(&[5, 7], DType::BF16, dev).unwrap();
    assert!(z.to_vec_f32().unwrap().iter().all(|&x| x == 0.0));
    let empty = Tensor::from_slice::<f32>(&[], &[0, 4], dev).unwrap();
    assert!(empty.to_vec::<f32>().unwrap().is_empty());
}

#[test]
fn device_nvrtc_compile_and_launch() {
    let _g = serial();
    let Some(dev) = test_cuda_device() else { return };
    let Device::Cuda(ord) = dev else { unreachable!() };
    if emulated(ord) {
        return;
    }
    println!("{}", smelt_kernels::cuda::nvrtc_status().unwrap());
    let msg = smelt_kernels::cuda::self_test(ord).unwrap();
    println!("{msg}");
    // A real op through the launcher, against its CPU implementation.
    let mut rng = Rng::new(2);
    let n = 100_003;
    let (a, b) = (randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
    let (ac, bc) =
        (Tensor::from_slice(&a, &[n], Device::Cpu).unwrap(), Tensor::from_slice(&b, &[n], Device::Cpu).unwrap());
    let want = smelt_kernels::add::add(&ac, &bc).unwrap().to_vec::<f32>().unwrap();
    let got = smelt_kernels::add::add(&ac.to_device(dev).unwrap(), &bc.to_device(dev).unwrap()).unwrap();
    assert_close(&got.to_vec::<f32>().unwrap(), &to_f64(&want), 1e-6, 1e-6, "add on device");
    // A launch error names the kernel instead of panicking.
    let cfg = smelt_kernels::cuda::LaunchCfg { grid: (1, 1, 1), block: (2048, 1, 1), smem: 0 };
    static SRC: smelt_kernels::KernelSource =
        smelt_kernels::KernelSource { name: "add", src: include_str!("../cuda/add.cu") };
    let src = &SRC;
    let e = smelt_kernels::cuda::launch(ord, src, "add_f32", cfg, &[]).unwrap_err().to_string();
    assert!(e.contains("add_f32"), "{e}");
    let e =
        smelt_kernels::cuda::launch(ord, src, "no_such_kernel", smelt_kernels::cuda::LaunchCfg::for_items(1, 32), &[])
            .unwrap_err()
            .to_string();
    assert!(e.contains("no_such_kernel"), "{e}");
}

#[test]
fn device_cublas_matmul_matches_cpu() {
    let _g = serial();
    let Some(dev) = test_cuda_device() else { return };
    let mut rng = Rng::new(3);
    for (m, n, k) in [(1, 1, 1), (7, 13, 33), (64, 896, 896), (129, 4864, 896)] {
        for dt in [DType::F32, DType::BF16] {
            let x =
                Tensor::from_slice(&randn(&mut rng, m * k, 1.0), &[m, k], Device::Cpu).unwrap().to_dtype(dt).unwrap();
            let w =
                Tensor::from_slice(&randn(&mut rng, n * k, 0.05), &[n, k], Device::Cpu).unwrap().to_dtype(dt).unwrap();
            let want = smelt_kernels::matmul::linear(&x, &w).unwrap().to_vec_f32().unwrap();
            let got = smelt_kernels::matmul::linear(&x.to_device(dev).unwrap(), &w.to_device(dev).unwrap()).unwrap();
            let atol = 1e-5 * (k as f64).sqrt();
            let rtol = if dt == DType::F32 { 1e-5 } else { dt.epsilon() };
            assert_close(&got.to_vec_f32().unwrap(), &to_f64(&want), atol, rtol, &format!("linear {dt} {m}x{n}x{k}"));
        }
    }
}

#[test]
fn device_allocator_reuses_blocks() {
    let _g = serial();
    let Some(Device::Cuda(ord)) = test_cuda_device() else { return };
    let dev = smelt_engine::cuda::device(ord).unwrap();
    dev.synchronize().unwrap();
    let base = dev.bytes_in_use();
    let bytes = 3 << 20;
    let class = smelt_engine::cuda::size_class(bytes);
    drop(dev.alloc(bytes).unwrap());
    dev.reset_peak();
    let allocs = dev.alloc_stats().device_allocs;
    for _ in 0..50 {
        let t = Tensor::zeros(&[bytes / 4], DType::F32, Device::Cuda(ord)).unwrap();
        assert!(dev.bytes_in_use() >= base + class);
        drop(t);
    }
    let s = dev.alloc_stats();
    assert_eq!(s.device_allocs, allocs, "repeated same-size allocations must come from the cache: {s:?}");
    assert_eq!(s.in_use, base, "bytes_in_use must return to its baseline: {s:?}");
    assert!(s.peak <= base + class, "peak grew past one block: {s:?} (class {class})");
    println!("allocator: {s:?}");
    dev.empty_cache().unwrap();
    assert_eq!(dev.alloc_stats().cached, 0);
    // Out of memory is an error naming the sizes, not a panic; the device stays usable.
    let huge = dev.total_mem() * 2;
    let e = dev.alloc(huge).unwrap_err();
    assert!(matches!(e, smelt_engine::Error::OutOfMemory { .. }), "{e}");
    assert!(e.to_string().contains(&huge.to_string()), "{e}");
    let t = Tensor::from_slice(&[1f32, 2.0], &[2], Device::Cuda(ord)).unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.0, 2.0]);
}

#[test]
fn device_errors_are_errors() {
    let _g = serial();
    let Some(_) = test_cuda_device() else { return };
    let e = smelt_engine::cuda::device(1 << 20).unwrap_err().to_string();
    assert!(e.contains("requested"), "{e}");
    if emulated(0) {
        return;
    }
    let p = smelt_engine::cuda::probe();
    println!("{p}");
    assert!(!p.devices.is_empty() && p.nvrtc.found && p.cublas.found, "{p}");
}

/// The profiler (`smelt_engine::cuda::profile`, behind `smelt bench step --profile`) sees each
/// kernel launch, cuBLAS call and copy under its name, with GPU times from CUDA events on a GPU
/// (host times only on the emulator), and records nothing while off.
#[test]
fn device_profile_names_and_times_operations() {
    use smelt_engine::cuda::profile;
    let _g = serial();
    let Some(dev) = test_cuda_device() else { return };
    let Device::Cuda(ord) = dev else { unreachable!() };
    let cuda = smelt_engine::cuda::device(ord).unwrap();
    let mut rng = Rng::new(5);
    let a = Tensor::from_slice(&randn(&mut rng, 37 * 19, 1.0), &[37, 19], dev).unwrap();
    let b = Tensor::from_slice(&randn(&mut rng, 23 * 19, 1.0), &[23, 19], dev).unwrap();
    let run = || {
        let s = smelt_kernels::add::add(&a, &a).unwrap();
        smelt_kernels::matmul::matmul(&s, &b, false, true).unwrap().to_vec::<f32>().unwrap()
    };
    profile::take(&cuda).unwrap();
    run();
    let off = profile::take(&cuda).unwrap();
    let ((x, y), rows) = profile::record(&cuda, || (run(), run())).unwrap();
    assert_eq!(x, y);
    assert!(off.is_empty(), "profiling was off, yet it recorded {off:?}");
    let row = |prefix: &str| {
        rows.iter()
            .find(|r| r.name.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}…` operation in the profile {rows:?}"))
    };
    let gpu = !smelt_kernels::testing::emulated(dev);
    for (prefix, calls) in [("add::add_f32", 2), ("cublas gemm f32→f32 NT", 2), ("copy device→host", 2)] {
        let r = row(prefix);
        assert_eq!(r.calls, calls, "{r:?}");
        assert!(r.host_ms > 0.0, "{r:?}");
        assert_eq!(r.gpu_ms.is_some(), gpu, "GPU time only on a GPU: {r:?}");
        assert!(r.gpu_ms.is_none_or(|ms| ms > 0.0 && ms < 1e3), "{r:?}");
    }
}

/// Attention's index lists (cu_seqlens, tile lists) are uploaded once and reused by later calls
/// with the same lists (every layer of a step): an upload drains the stream. Same results, and
/// no host→device copy on the repeat; a new list is uploaded.
#[test]
fn device_attention_reuses_uploaded_index_lists() {
    use smelt_engine::cuda::profile;
    use smelt_kernels::attention::{attention_backward, attention_forward};
    let _g = serial();
    let Some(dev) = test_cuda_device() else { return };
    let Device::Cuda(ord) = dev else { unreachable!() };
    let cuda = smelt_engine::cuda::device(ord).unwrap();
    let mut rng = Rng::new(9);
    let (t, nh, nkv, d) = (45usize, 4usize, 2usize, 64usize);
    let mk = |rng: &mut Rng, h: usize| {
        let v = randn(rng, t * h * d, 1.0);
        Tensor::from_slice(&v, &[t, h, d], Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap().to_device(dev).unwrap()
    };
    let (q, k, v, d_o) = (mk(&mut rng, nh), mk(&mut rng, nkv), mk(&mut rng, nkv), mk(&mut rng, nh));
    let run = |cu: &[u32]| {
        let (o, lse) = attention_forward(&q, &k, &v, cu, None).unwrap();
        let (dq, dk, dv) = attention_backward(&q, &k, &v, &o, &lse, &d_o, cu, None).unwrap();
        [o, dq, dk, dv].map(|x| x.to_vec_f32().unwrap())
    };
    let uploads =
        |rows: &[profile::ProfileRow]| rows.iter().find(|r| r.name == "copy host→device").map_or(0, |r| r.calls);
    let cu = [0u32, 13, 45];
    let first = run(&cu);
    let (again, repeat) = profile::record(&cuda, || run(&cu)).unwrap();
    let (other, fresh) = profile::record(&cuda, || run(&[0, 30, 45])).unwrap();
    assert_eq!(first, again, "the same inputs gave different results on the repeat");
    assert_eq!(uploads(&repeat), 0, "the repeat uploaded again: {repeat:?}");
    assert!(uploads(&fresh) >= 1, "a new cu_seqlens was not uploaded: {fresh:?}");
    assert_ne!(other, first);
}
