//! Criterion benchmarks (CPU) for matmul through the `gemm` crate on smelt's CPU pool.
//!
//! Throughput is counted in FLOPs (2·m·n·k per matmul) as criterion "elements", so its
//! `Gelem/s` reads directly as GFLOP/s. Shapes: a tiny one (call overhead), Qwen2.5-0.5B-like
//! linear layers (hidden 896, MLP 4864) over 128 tokens, and the 1024³ square the README quotes.
//! bf16 inputs include their conversion to f32 (that is what the CPU path does).
//! Thread count: `SMELT_NUM_THREADS`, default all cores. GPU matmul is timed by the GPU runner.
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use smelt_engine::{DType, Device, Rng, Tensor};
use smelt_kernels::matmul::matmul_into;

fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_slice(&rng.normal_vec(n, 1.0), shape, Device::Cpu).expect("bench tensor")
}

fn bench_matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul_cpu");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let mut rng = Rng::new(1);
    // (label, m, n, k, trans_b, dtype)
    let cases = [
        ("f32", 64, 64, 64, false, DType::F32),
        ("f32_linear_qkv", 128, 896, 896, true, DType::F32),
        ("f32_linear_mlp_up", 128, 4864, 896, true, DType::F32),
        ("bf16_linear_mlp_up", 128, 4864, 896, true, DType::BF16),
        ("f32", 1024, 1024, 1024, false, DType::F32),
    ];
    for (label, m, n, k, tb, dt) in cases {
        let a = randn(&mut rng, &[m, k]).to_dtype(dt).expect("cast");
        let b = randn(&mut rng, &if tb { [n, k] } else { [k, n] }).to_dtype(dt).expect("cast");
        let out = Tensor::zeros(&[m, n], dt, Device::Cpu).expect("out");
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        g.bench_function(BenchmarkId::new(label, format!("{m}x{n}x{k}")), |bch| {
            bch.iter(|| matmul_into(&a, &b, false, tb, &out, false).expect("matmul"))
        });
    }
    g.finish();
}

criterion_group!(group, bench_matmul);
criterion_main!(group);
