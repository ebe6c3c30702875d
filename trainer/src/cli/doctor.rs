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
    println!("cuda: (report being written)");
}
