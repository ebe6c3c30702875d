//! Criterion benchmarks (CPU) for the optimizer-side ops: dtype casts, the global gradient
//! norm, and the fused AdamW step. Throughput is the bytes each op must move (reads + writes),
//! so criterion's GB/s compares directly with the machine's memory bandwidth.
//!
//! Sizes: casts over rows of Qwen's 151,936-entry vocabulary (logits blocks); global_norm and
//! AdamW over 4M and 16M parameters (Qwen2.5-0.5B has 494M: these keep a run quick while
//! staying far beyond the caches). The GPU versions are timed by the GPU benchmark runner.
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use smelt_engine::{DType, Device, Rng, Tensor};
use smelt_kernels::adamw::{adamw_step, AdamW};
use smelt_kernels::cast::{cast, cast_into};
use smelt_kernels::global_norm::global_norm;

const VOCAB: usize = 151_936;

fn randn(rng: &mut Rng, n: usize, std: f32) -> Tensor {
    Tensor::from_slice(&rng.normal_vec(n, std), &[n], Device::Cpu).expect("bench tensor")
}

fn bench_cast(c: &mut Criterion) {
    let mut g = c.benchmark_group("cast");
    g.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    let mut rng = Rng::new(1);
    for rows in [8usize, 64] {
        let n = rows * VOCAB;
        let x32 = randn(&mut rng, n, 1.0).reshape(&[rows, VOCAB]).expect("reshape");
        let x16 = cast(&x32, DType::BF16).expect("cast");
        let label = format!("{rows}x{VOCAB}");
        // Into preallocated outputs: the conversion itself, not the allocator's page faults.
        for (name, x, to, bytes) in [
            ("f32_to_bf16", &x32, DType::BF16, 6),
            ("bf16_to_f32", &x16, DType::F32, 6),
            ("bf16_to_f16", &x16, DType::F16, 4),
        ] {
            let out = Tensor::zeros(&[n], to, Device::Cpu).expect("out");
            g.throughput(Throughput::Bytes((n * bytes) as u64));
            g.bench_function(BenchmarkId::new(name, &label), |b| b.iter(|| cast_into(x, &out).expect("cast")));
        }
    }
    g.finish();
}

fn bench_global_norm(c: &mut Criterion) {
    let mut g = c.benchmark_group("global_norm");
    g.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    let mut rng = Rng::new(2);
    for m in [4usize, 16] {
        let n = m << 20;
        let x32 = randn(&mut rng, n, 1e-3);
        let x16 = cast(&x32, DType::BF16).expect("cast");
        for (x, dt) in [(&x32, "f32"), (&x16, "bf16")] {
            g.throughput(Throughput::Bytes(x.size_in_bytes() as u64));
            g.bench_with_input(BenchmarkId::new(dt, format!("{m}M")), x, |b, x| {
                b.iter(|| black_box(global_norm(&[x]).expect("global_norm")))
            });
        }
    }
    g.finish();
}

fn bench_adamw(c: &mut Criterion) {
    let mut g = c.benchmark_group("adamw");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let mut rng = Rng::new(3);
    let cfg = AdamW::default();
    for m in [4usize, 16] {
        let n = m << 20;
        let p = randn(&mut rng, n, 0.02);
        let mm = randn(&mut rng, n, 1e-4);
        let v = Tensor::full(1e-8, &[n], DType::F32, Device::Cpu).expect("v");
        let g32 = randn(&mut rng, n, 1e-3);
        let g16 = cast(&g32, DType::BF16).expect("cast");
        let out = Tensor::zeros(&[n], DType::BF16, Device::Cpu).expect("out");
        // p, m, v read and written (24 B), the gradient read, the bf16 copy written.
        let cases: [(&str, &Tensor, Option<&Tensor>, usize); 3] = [
            ("f32_grads", &g32, None, 28),
            ("f32_grads_bf16_out", &g32, Some(&out), 30),
            ("bf16_grads", &g16, None, 26),
        ];
        for (name, grads, o, bytes) in cases {
            g.throughput(Throughput::Bytes((n * bytes) as u64));
            let mut step = 0u64;
            g.bench_function(BenchmarkId::new(name, format!("{m}M")), |b| {
                b.iter(|| {
                    step += 1;
                    adamw_step(&p, grads, &mm, &v, step, &cfg, cfg.weight_decay, 0.5, o).expect("adamw")
                })
            });
        }
    }
    g.finish();
}

criterion_group!(group, bench_cast, bench_global_norm, bench_adamw);
criterion_main!(group);
