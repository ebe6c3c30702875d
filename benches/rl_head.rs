//! CPU benchmarks of the RL head (`smelt::kernels::logprob_entropy`): the fused head from
//! hidden states (forward, backward) and the materialised-logits baseline (forward, backward).
//!
//! Sizes are chosen so each bench finishes in seconds on a few cores: the fused head at
//! Qwen2.5-0.5B's hidden size (H = 896) with N = 128 tokens and a 32k vocabulary slice
//! (7.5 GFLOP per forward), and the materialised variant at the full Qwen vocabulary
//! (V = 151,936). Throughput: the fused head reports FLOPs as "elements" (forward 2·N·H·V,
//! backward 6·N·H·V: the recomputed logits plus dh and dW); the materialised variant reports
//! the bytes it must move (forward: read logits; backward: read logits + write d_logits).
//!
//! `SMELT_BENCH_FULL=1` adds the fused head at the full Qwen vocabulary (slow on small CPUs).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use smelt::engine::{DType, Device, Rng, Tensor};
use smelt::kernels::logprob_entropy::{
    logprob_entropy, logprob_entropy_backward, logprob_entropy_from_logits, logprob_entropy_from_logits_backward,
    LogprobEntropyOpts,
};

fn tensor(rng: &mut Rng, shape: &[usize], std: f32, dt: DType) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_slice(&rng.normal_vec(n, std), shape, Device::Cpu).unwrap().to_dtype(dt).unwrap()
}

fn targets(n: usize, v: usize) -> Tensor {
    let t: Vec<u32> = (0..n).map(|i| ((i as u64 * 2_654_435_761) % v as u64) as u32).collect();
    Tensor::from_slice(&t, &[n], Device::Cpu).unwrap()
}

fn fused(c: &mut Criterion) {
    let mut shapes = vec![(128usize, 896usize, 32_768usize)];
    if std::env::var("SMELT_BENCH_FULL").as_deref() == Ok("1") {
        shapes.push((256, 896, 151_936));
    }
    let mut g = c.benchmark_group("rl_head_fused");
    g.sample_size(10);
    for &(n, hd, v) in &shapes {
        for dt in [DType::F32, DType::BF16] {
            let mut rng = Rng::new(1);
            let h = tensor(&mut rng, &[n, hd], 1.0, dt);
            let w = tensor(&mut rng, &[v, hd], 0.05, dt);
            let y = targets(n, v);
            let opts = LogprobEntropyOpts::default();
            let id = format!("{dt}/N{n}_H{hd}_V{v}");
            g.throughput(Throughput::Elements((2 * n * hd * v) as u64));
            g.bench_function(BenchmarkId::new("forward_flops", &id), |b| {
                b.iter(|| logprob_entropy(&h, &w, &y, 1.0, &opts).unwrap())
            });
            let out = logprob_entropy(&h, &w, &y, 1.0, &opts).unwrap();
            let gl = Tensor::full(-1.0 / n as f64, &[n], DType::F32, Device::Cpu).unwrap();
            let ge = Tensor::full(0.001, &[n], DType::F32, Device::Cpu).unwrap();
            g.throughput(Throughput::Elements((6 * n * hd * v) as u64));
            g.bench_function(BenchmarkId::new("backward_flops", &id), |b| {
                b.iter(|| logprob_entropy_backward(&h, &w, &y, 1.0, &out.lse, &out.entropy, &gl, &ge, &opts).unwrap())
            });
        }
    }
    g.finish();
}

fn materialised(c: &mut Criterion) {
    let (n, v) = (128usize, 151_936usize);
    let mut g = c.benchmark_group("rl_head_from_logits");
    g.sample_size(10);
    for dt in [DType::F32, DType::BF16] {
        let mut rng = Rng::new(2);
        let logits = tensor(&mut rng, &[n, v], 3.0, dt);
        let y = targets(n, v);
        let opts = LogprobEntropyOpts::default();
        let bytes = n * v * dt.size_in_bytes();
        let id = format!("{dt}/N{n}_V{v}");
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(BenchmarkId::new("forward_bytes", &id), |b| {
            b.iter(|| logprob_entropy_from_logits(&logits, &y, 1.0, &opts).unwrap())
        });
        let out = logprob_entropy_from_logits(&logits, &y, 1.0, &opts).unwrap();
        let gl = Tensor::full(-1.0 / n as f64, &[n], DType::F32, Device::Cpu).unwrap();
        let ge = Tensor::full(0.001, &[n], DType::F32, Device::Cpu).unwrap();
        g.throughput(Throughput::Bytes(2 * bytes as u64));
        g.bench_function(BenchmarkId::new("backward_bytes", &id), |b| {
            b.iter(|| logprob_entropy_from_logits_backward(&logits, &y, 1.0, &out.lse, &out.entropy, &gl, &ge).unwrap())
        });
    }
    g.finish();
}

criterion_group!(group, fused, materialised);
criterion_main!(group);
