//! Criterion benchmarks (CPU) for the RL per-token ops: the fused GRPO loss and the sampler.
//!
//! - `grpo_loss`: N = 4k, 16k, 64k tokens with every term on (k3 KL to a reference, dual clip,
//!   entropy bonus), into preallocated gradients. Throughput is `Bytes` = the bytes the op must
//!   move: 7 f32 inputs read and 2 f32 gradients written per token (36 B/token), so criterion's
//!   B/s compares with the machine's memory bandwidth.
//! - `sample`: B = 8 and 64 rows of Qwen's 151,936-entry vocabulary, f32 logits: greedy,
//!   plain temperature sampling, and top-k 50 + top-p 0.95. Throughput is `Bytes` = the logits
//!   read once (B·V·4); the sampler makes several passes, so this is a floor on its traffic.
//!
//! The CUDA versions are timed by the GPU benchmark runner, not here.
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use smelt_engine::{DType, Device, Rng, Tensor};
use smelt_kernels::grpo_loss::{aggregation_weights, grpo_loss_into, GrpoLossConfig, GrpoLossInputs, Kl, LossType};
use smelt_kernels::sample::{sample_into, SampleOutput, SamplingConfig};

const VOCAB: usize = 151_936;

fn tensor(v: &[f32]) -> Tensor {
    Tensor::from_slice(v, &[v.len()], Device::Cpu).expect("bench tensor")
}

fn bench_grpo_loss(c: &mut Criterion) {
    let mut g = c.benchmark_group("grpo_loss_cpu");
    g.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    let mut rng = Rng::new(1);
    let cfg =
        GrpoLossConfig { beta: 0.04, kl: Kl::K3, dual_clip: Some(3.0), entropy_coef: 0.001, ..Default::default() };
    for n in [4096usize, 16_384, 65_536] {
        let old: Vec<f32> = (0..n).map(|_| -3.0 * rng.next_f32()).collect();
        let logp: Vec<f32> = old.iter().map(|&o| o + 0.4 * (rng.next_f32() - 0.5)).collect();
        let lref: Vec<f32> = logp.iter().map(|&l| l + 0.2 * (rng.next_f32() - 0.5)).collect();
        // 16 sequences of equal length; per-token advantages broadcast from each sequence.
        let seq = n / 16;
        let adv_seq: Vec<f32> = (0..16).map(|_| rng.normal() as f32).collect();
        let adv: Vec<f32> = (0..n).map(|i| adv_seq[i / seq]).collect();
        let mask: Vec<f32> = (0..n).map(|i| if i % seq < seq / 8 { 0.0 } else { 1.0 }).collect();
        let cu: Vec<usize> = (0..=16).map(|s| s * seq).collect();
        let w = aggregation_weights(&cu, &mask, LossType::Grpo, 0).expect("weights");
        let ent: Vec<f32> = (0..n).map(|_| 2.0 * rng.next_f32()).collect();
        let ts: Vec<Tensor> = [&logp, &old, &lref, &adv, &mask, &w, &ent].iter().map(|v| tensor(v)).collect();
        let x = GrpoLossInputs {
            logp: &ts[0],
            logp_old: &ts[1],
            logp_ref: Some(&ts[2]),
            advantages: &ts[3],
            mask: &ts[4],
            weights: &ts[5],
            entropy: Some(&ts[6]),
        };
        let g_logp = Tensor::zeros(&[n], DType::F32, Device::Cpu).expect("g_logp");
        let g_ent = Tensor::zeros(&[n], DType::F32, Device::Cpu).expect("g_entropy");
        g.throughput(Throughput::Bytes(n as u64 * 36));
        g.bench_function(BenchmarkId::new("k3_dual_entropy", n), |b| {
            b.iter(|| grpo_loss_into(black_box(&x), &cfg, &g_logp, &g_ent).expect("grpo_loss"))
        });
    }
    g.finish();
}

fn bench_sample(c: &mut Criterion) {
    let mut g = c.benchmark_group("sample_cpu");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let mut rng = Rng::new(2);
    let configs = [
        ("greedy", SamplingConfig::greedy()),
        ("t1", SamplingConfig { temperature: 1.0, top_k: None, top_p: 1.0 }),
        ("t0.7_k50_p0.95", SamplingConfig { temperature: 0.7, top_k: Some(50), top_p: 0.95 }),
        ("t1_p0.95", SamplingConfig { temperature: 1.0, top_k: None, top_p: 0.95 }),
    ];
    for rows in [8usize, 64] {
        // Logits with an LLM-like spread (std 3): a few hundred tokens carry most of the mass.
        let logits =
            Tensor::from_slice(&rng.normal_vec(rows * VOCAB, 3.0), &[rows, VOCAB], Device::Cpu).expect("logits");
        let out = SampleOutput::empty(rows, Device::Cpu).expect("outputs");
        g.throughput(Throughput::Bytes((rows * VOCAB * 4) as u64));
        for (name, cfg) in configs {
            let mut step = 0u64;
            g.bench_function(BenchmarkId::new(name, format!("{rows}x{VOCAB}")), |b| {
                b.iter(|| {
                    step += 1;
                    sample_into(black_box(&logits), &cfg, 7, step, None, &out).expect("sample")
                })
            });
        }
    }
    g.finish();
}

criterion_group!(group, bench_grpo_loss, bench_sample);
criterion_main!(group);
