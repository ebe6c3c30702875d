//! Criterion benchmarks for the CPU attention ops at small realistic shapes (Qwen2.5-0.5B
//! heads: 14 query / 2 KV heads, head_dim 64; Qwen2.5-1.5B heads: 12 / 2, head_dim 128).
//!
//! Throughput is set so criterion prints a physical rate:
//! - forward / backward: `Elements` = FLOPs, so "elem/s" reads as FLOP/s. Causal forward FLOPs
//!   = 4·Σ_b L_b(L_b+1)/2·H·d (QKᵀ and PV, 2 FLOPs per multiply-add); backward counted as 2.5×
//!   forward (the FlashAttention benchmark convention; ours recomputes P twice, so it does more).
//! - decode: `Bytes` = the K and V cache rows read (the bandwidth bound of decoding).
//!
//! The `T1024` rows are one causal sequence of 1,024 tokens, the packing of the PyTorch peer
//! `benches/compare/attention.py --tokens 1024` (add `--heads 12 --head-dim 128` for d128).
//!
//! The GPU figures (TFLOP/s against the H100's bf16 peak, PyTorch SDPA side by side) come from
//! the GPU runner, not from here.
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use smelt_engine::{DType, Device, Rng, Tensor};
use smelt_kernels::attention::{attention_backward, attention_decode, attention_forward, kv_cache_append};
use std::hint::black_box;

fn randt(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_slice(&rng.normal_vec(n, 1.0), shape, Device::Cpu).expect("tensor")
}

fn causal_flops(lens: &[usize], nh: usize, d: usize) -> u64 {
    lens.iter().map(|&l| 4 * (l * (l + 1) / 2 * nh * d) as u64).sum()
}

/// Forward (f32, and bf16 when `bf16`) and backward on packed sequences `lens`.
fn prefill(
    g: &mut BenchmarkGroup<WallTime>,
    rng: &mut Rng,
    lens: &[usize],
    nh: usize,
    nkv: usize,
    d: usize,
    bf16: bool,
) {
    let t: usize = lens.iter().sum();
    let cu: Vec<u32> = std::iter::once(0)
        .chain(lens.iter().scan(0u32, |s, &l| {
            *s += l as u32;
            Some(*s)
        }))
        .collect();
    let (q, k, v, d_o) =
        (randt(rng, &[t, nh, d]), randt(rng, &[t, nkv, d]), randt(rng, &[t, nkv, d]), randt(rng, &[t, nh, d]));
    let tag = format!("T{t}_h{nh}x{nkv}_d{d}");
    let fwd_flops = causal_flops(lens, nh, d);
    g.throughput(Throughput::Elements(fwd_flops));
    g.bench_function(format!("forward_f32_{tag}"), |b| {
        b.iter(|| black_box(attention_forward(&q, &k, &v, &cu, None).expect("fwd")))
    });
    let (o, lse) = attention_forward(&q, &k, &v, &cu, None).expect("fwd");
    g.throughput(Throughput::Elements(fwd_flops * 5 / 2));
    g.bench_function(format!("backward_f32_{tag}"), |b| {
        b.iter(|| black_box(attention_backward(&q, &k, &v, &o, &lse, &d_o, &cu, None).expect("bwd")))
    });
    if bf16 {
        let bf = |x: &Tensor| x.to_dtype(DType::BF16).expect("bf16");
        let (qh, kh, vh) = (bf(&q), bf(&k), bf(&v));
        g.throughput(Throughput::Elements(fwd_flops));
        g.bench_function(format!("forward_bf16_{tag}"), |b| {
            b.iter(|| black_box(attention_forward(&qh, &kh, &vh, &cu, None).expect("fwd")))
        });
    }
}

fn benches(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    let mut g = c.benchmark_group("attention_cpu");
    g.sample_size(10);

    // Prefill / training: two packed sequences of 256 and 192 tokens.
    prefill(&mut g, &mut rng, &[256, 192], 14, 2, 64, true);
    // The PyTorch peer's packing: one sequence of 1,024 tokens, d 64 and d 128.
    prefill(&mut g, &mut rng, &[1024], 14, 2, 64, false);
    prefill(&mut g, &mut rng, &[1024], 12, 2, 128, false);

    // Decode: 8 sequences, one new token each, caches of 1024 tokens.
    let (nkv, d) = (2usize, 64usize);
    let (bsz, max_len, cache_len) = (8usize, 1024usize, 1024u32);
    let kc = Tensor::zeros(&[bsz, max_len, nkv, d], DType::F32, Device::Cpu).expect("cache");
    let vc = Tensor::zeros(&[bsz, max_len, nkv, d], DType::F32, Device::Cpu).expect("cache");
    let n = bsz * max_len;
    let slots: Vec<u32> = (0..n).map(|i| (i / max_len) as u32).collect();
    let pos: Vec<u32> = (0..n).map(|i| (i % max_len) as u32).collect();
    kv_cache_append(&kc, &vc, &randt(&mut rng, &[n, nkv, d]), &randt(&mut rng, &[n, nkv, d]), &slots, &pos)
        .expect("append");
    let qd = randt(&mut rng, &[bsz, 14, d]);
    let lens_now = vec![cache_len; bsz];
    g.throughput(Throughput::Bytes((2 * bsz * cache_len as usize * nkv * d * 4) as u64));
    g.bench_function("decode_f32_B8_L1024_h14x2_d64", |b| {
        b.iter(|| black_box(attention_decode(&qd, &kc, &vc, &lens_now, None, None).expect("decode")))
    });
    g.finish();
}

criterion_group!(group, benches);
criterion_main!(group);
