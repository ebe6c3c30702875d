//! Criterion benchmarks for the CPU layer ops — embedding, RMSNorm (and the fused residual add +
//! RMSNorm), RoPE, SwiGLU, forward and backward, and the residual/bias ops (axpby, bias add, bias gradient) — at Qwen2.5-0.5B shapes (hidden 896, 14 heads × head_dim 64, intermediate 4864)
//! for 512 and 4096 tokens, f32.
//!
//! These ops are memory-bound, so throughput is `Bytes` = the bytes each call must move
//! (every input read once, every output written once; gathered/scattered rows counted once per
//! token) and criterion's B/s reads against the machine's memory bandwidth. The CUDA versions
//! are timed by the GPU benchmark runner, not here.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use smelt_engine::Rng;
use smelt_kernels::{add, embedding, rmsnorm, rope, swiglu};
use std::hint::black_box;
use std::time::Duration;

const HIDDEN: usize = 896;
const HEADS: usize = 14;
const HEAD_DIM: usize = 64;
const INTER: usize = 4864;
/// A reduced vocabulary keeps the table (and the benchmark's memory) small; gather cost does
/// not depend on V.
const VOCAB: usize = 32_768;
const TOKENS: [usize; 2] = [512, 4096];
const F: u64 = 4; // bytes per f32

fn benches(c: &mut Criterion) {
    let mut rng = Rng::new(7);

    let mut g = c.benchmark_group("embedding_cpu");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    let table = rng.normal_vec(VOCAB * HIDDEN, 1.0);
    let mut d_table = vec![0f32; VOCAB * HIDDEN];
    for n in TOKENS {
        let ids: Vec<u32> = (0..n).map(|_| rng.below(VOCAB as u64) as u32).collect();
        let mut out = vec![0f32; n * HIDDEN];
        let bytes = (n * HIDDEN) as u64 * F * 2 + n as u64 * 4;
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(BenchmarkId::new("forward", format!("{n}x{HIDDEN}")), |b| {
            b.iter(|| embedding::cpu::embedding(black_box(&ids), &table, HIDDEN, &mut out))
        });
        // d_out read, and each token's d_table row read and written.
        g.throughput(Throughput::Bytes((n * HIDDEN) as u64 * F * 3 + n as u64 * 4));
        g.bench_function(BenchmarkId::new("backward", format!("{n}x{HIDDEN}")), |b| {
            b.iter(|| embedding::cpu::embedding_backward(black_box(&ids), &out, HIDDEN, &mut d_table))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("rmsnorm_cpu");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    let w = rng.normal_vec(HIDDEN, 1.0);
    for n in TOKENS {
        let x = rng.normal_vec(n * HIDDEN, 1.0);
        let dy = rng.normal_vec(n * HIDDEN, 1.0);
        let (mut y, mut rstd, mut dx, mut dw) =
            (vec![0f32; n * HIDDEN], vec![0f32; n], vec![0f32; n * HIDDEN], vec![0f32; HIDDEN]);
        let rows = (n * HIDDEN) as u64 * F;
        g.throughput(Throughput::Bytes(2 * rows + (HIDDEN + n) as u64 * F));
        g.bench_function(BenchmarkId::new("forward", format!("{n}x{HIDDEN}")), |b| {
            b.iter(|| rmsnorm::cpu::rmsnorm(black_box(&x), &w, 1e-6, &mut y, &mut rstd))
        });
        g.throughput(Throughput::Bytes(3 * rows + (2 * HIDDEN + n) as u64 * F));
        g.bench_function(BenchmarkId::new("backward", format!("{n}x{HIDDEN}")), |b| {
            b.iter(|| rmsnorm::cpu::rmsnorm_backward(black_box(&x), &w, &rstd, &dy, &mut dx, &mut dw))
        });
        // add_rmsnorm: x and the residual read, the sum and y written.
        let mut s = vec![0f32; n * HIDDEN];
        g.throughput(Throughput::Bytes(4 * rows + (HIDDEN + n) as u64 * F));
        g.bench_function(BenchmarkId::new("add_forward", format!("{n}x{HIDDEN}")), |b| {
            b.iter(|| rmsnorm::cpu::add_rmsnorm(black_box(&x), &dy, &w, 1e-6, &mut s, &mut y, &mut rstd))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("rope_cpu");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    let inv = rope::cpu::inv_freq(HEAD_DIM, 1_000_000.0);
    for n in TOKENS {
        let x = rng.normal_vec(n * HEADS * HEAD_DIM, 1.0);
        let pos: Vec<u32> = (0..n as u32).collect();
        let mut out = vec![0f32; x.len()];
        g.throughput(Throughput::Bytes(2 * x.len() as u64 * F + n as u64 * 4));
        let shape = format!("{n}x{HEADS}x{HEAD_DIM}");
        g.bench_function(BenchmarkId::new("forward", &shape), |b| {
            b.iter(|| rope::cpu::rope(black_box(&x), &pos, &inv, HEADS, 1.0, &mut out))
        });
        g.bench_function(BenchmarkId::new("backward", &shape), |b| {
            b.iter(|| rope::cpu::rope(black_box(&x), &pos, &inv, HEADS, -1.0, &mut out))
        });
        g.bench_function(BenchmarkId::new("forward_inplace", &shape), |b| {
            b.iter(|| rope::cpu::rope_inplace(black_box(&mut out), &pos, &inv, HEADS, 1.0))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("swiglu_cpu");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for n in TOKENS {
        let m = n * INTER;
        let (gate, up, dy) = (rng.normal_vec(m, 2.0), rng.normal_vec(m, 1.0), rng.normal_vec(m, 1.0));
        let gate_up = rng.normal_vec(2 * m, 1.5);
        let (mut out, mut dg, mut du, mut dgu) = (vec![0f32; m], vec![0f32; m], vec![0f32; m], vec![0f32; 2 * m]);
        let shape = format!("{n}x{INTER}");
        g.throughput(Throughput::Bytes(3 * m as u64 * F));
        g.bench_function(BenchmarkId::new("forward", &shape), |b| {
            b.iter(|| swiglu::cpu::swiglu(black_box(&gate), &up, &mut out))
        });
        g.bench_function(BenchmarkId::new("forward_fused", &shape), |b| {
            b.iter(|| swiglu::cpu::swiglu_fused(black_box(&gate_up), INTER, &mut out))
        });
        g.throughput(Throughput::Bytes(5 * m as u64 * F));
        g.bench_function(BenchmarkId::new("backward", &shape), |b| {
            b.iter(|| swiglu::cpu::swiglu_backward(black_box(&gate), &up, &dy, &mut dg, &mut du))
        });
        g.bench_function(BenchmarkId::new("backward_fused", &shape), |b| {
            b.iter(|| swiglu::cpu::swiglu_fused_backward(black_box(&gate_up), &dy, INTER, &mut dgu))
        });
    }
    g.finish();

    // The residual stream: out = a + b (axpby), the q/k/v bias add and its gradient.
    let mut g = c.benchmark_group("add_cpu");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    let bias = rng.normal_vec(HIDDEN, 1.0);
    for n in TOKENS {
        let m = n * HIDDEN;
        let (a, bb) = (rng.normal_vec(m, 1.0), rng.normal_vec(m, 1.0));
        let (mut out, mut x) = (vec![0f32; m], rng.normal_vec(m, 1.0));
        let shape = format!("{n}x{HIDDEN}");
        g.throughput(Throughput::Bytes(3 * m as u64 * F));
        g.bench_function(BenchmarkId::new("axpby", &shape), |b| {
            b.iter(|| add::cpu::axpby(1.0, black_box(&a), 1.0, &bb, &mut out))
        });
        g.throughput(Throughput::Bytes(2 * m as u64 * F + HIDDEN as u64 * F));
        g.bench_function(BenchmarkId::new("bias_add", &shape), |b| {
            b.iter(|| add::cpu::add_bias_(black_box(&mut x), &bias, n, HIDDEN))
        });
        g.throughput(Throughput::Bytes(m as u64 * F + HIDDEN as u64 * F));
        g.bench_function(BenchmarkId::new("bias_grad", &shape), |b| {
            b.iter(|| add::cpu::column_sum(black_box(&a), n, HIDDEN))
        });
    }
    g.finish();
}

criterion_group!(group, benches);
criterion_main!(group);
