//! `smelt doctor`: what this machine offers smelt. Never fails for lack of a GPU: a CPU-only
//! machine gets a clear "no CUDA device" line and exit code 0.

pub fn run() -> anyhow::Result<()> {
    println!("smelt {}", env!("CARGO_PKG_VERSION"));
    println!("cpu threads: {} (SMELT_NUM_THREADS overrides)", smelt_engine::cpu::num_threads());
    cuda_report();
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda_report() {
    println!("cuda: not compiled in (built with --no-default-features); no CUDA device will be used");
}

#[cfg(feature = "cuda")]
fn cuda_report() {
    use smelt_engine::cuda::probe;
    let p = probe();
    for lib in [&p.driver, &p.nvrtc, &p.cublas] {
        println!("{:<10} {lib}", format!("{}:", lib.name));
    }
    if p.devices.is_empty() {
        println!("no CUDA device: {}", p.no_device_reason.as_deref().unwrap_or("none found"));
        return;
    }
    for d in &p.devices {
        println!(
            "cuda:{}: {}, compute capability {}.{}, {:.1} GiB, {} SMs",
            d.ordinal,
            d.name,
            d.compute_capability.0,
            d.compute_capability.1,
            d.total_mem as f64 / (1u64 << 30) as f64,
            d.multiprocessors
        );
        match smelt_kernels::cuda::self_test(d.ordinal) {
            Ok(msg) => println!("cuda:{}: kernel self-test passed: {msg}", d.ordinal),
            Err(e) => println!("cuda:{}: kernel self-test FAILED: {e}", d.ordinal),
        }
    }
    if let Some(r) = &p.no_device_reason {
        println!("note: {r}");
    }
}
