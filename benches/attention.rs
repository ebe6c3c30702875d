//! Criterion benchmarks for the CPU attention ops at small realistic shapes (Qwen2.5-0.5B
//! heads: 14 query / 2 KV heads, head_dim 64).
//!
//! Throughput is set so criterion prints a physical rate:
//! - forward / backward: `Elements` = FLOPs, so "elem/s" reads as FLOP/s. Causal forward FLOPs
//!   = 4·Σ_b L_b(L_b+1)/2·H·d (QKᵀ and PV, 2 FLOPs per multiply-add); backward counted as 2.5×
//!   forward (the FlashAttention benchmark convention; ours recomputes P twice, so it does more).
//! - decode: `Bytes` = the K and V cache rows read (the bandwidth bound of decoding).
//!
//! The GPU figures (TFLOP/s against the H100's bf16 peak, PyTorch SDPA side by side) come from
//! the GPU runner, not from here.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use smelt_engine::{DType, Device, Rng, Tensor};
use smelt_kernels::attention::{attention_backward, attention_decode, attention_forward, kv_cache_append};
use std::hint::black_box;

const NH: usize = 14;
const NKV: usize = 2;
const D: usize = 64;

fn randt(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_slice(&rng.normal_vec(n, 1.0), shape, Device::Cpu).expect("tensor")
}

fn causal_flops(lens: &[usize]) -> u64 {
    lens.iter().map(|&l| 4 * (l * (l + 1) / 2 * NH * D) as u64).sum()
}

fn benches(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    let mut g = c.benchmark_group("attention_cpu");
    g.sample_size(10);

    // Prefill / training: two packed sequences of 256 and 192 tokens.
    let lens = [256usize, 192];
    let t: usize = lens.iter().sum();
    let cu: Vec<u32> = std::iter::once(0)
        .chain(lens.iter().scan(0u32, |s, &l| {
            *s += l as u32;
            Some(*s)
        }))
        .collect();
    let (q, k, v, d_o) = (
        randt(&mut rng, &[t, NH, D]),
        randt(&mut rng, &[t, NKV, D]),
        randt(&mut rng, &[t, NKV, D]),
        randt(&mut rng, &[t, NH, D]),
    );
    let fwd_flops = causal_flops(&lens);
    g.throughput(Throughput::Elements(fwd_flops));
    g.bench_function("forward_f32_T448_h14x2_d64", |b| {
        b.iter(|| black_box(attention_forward(&q, &k, &v, &cu, None).expect("fwd")))
    });
    let (o, lse) = attention_forward(&q, &k, &v, &cu, None).expect("fwd");
    g.throughput(Throughput::Elements(fwd_flops * 5 / 2));
    g.bench_function("backward_f32_T448_h14x2_d64", |b| {
        b.iter(|| black_box(attention_backward(&q, &k, &v, &o, &lse, &d_o, &cu, None).expect("bwd")))
    });
    let bf = |x: &Tensor| x.to_dtype(DType::BF16).expect("bf16");
    let (qh, kh, vh) = (bf(&q), bf(&k), bf(&v));
    g.throughput(Throughput::Elements(fwd_flops));
    g.bench_function("forward_bf16_T448_h14x2_d64", |b| {
        b.iter(|| black_box(attention_forward(&qh, &kh, &vh, &cu, None).expect("fwd")))
    });

    // Decode: 8 sequences, one new token each, caches of 1024 tokens.
    let (bsz, max_len, cache_len) = (8usize, 1024usize, 1024u32);
    let kc = Tensor::zeros(&[bsz, max_len, NKV, D], DType::F32, Device::Cpu).expect("cache");
    let vc = Tensor::zeros(&[bsz, max_len, NKV, D], DType::F32, Device::Cpu).expect("cache");
    let n = bsz * max_len;
    let slots: Vec<u32> = (0..n).map(|i| (i / max_len) as u32).collect();
    let pos: Vec<u32> = (0..n).map(|i| (i % max_len) as u32).collect();
    kv_cache_append(&kc, &vc, &randt(&mut rng, &[n, NKV, D]), &randt(&mut rng, &[n, NKV, D]), &slots, &pos)
        .expect("append");
    let qd = randt(&mut rng, &[bsz, NH, D]);
    let lens_now = vec![cache_len; bsz];
    g.throughput(Throughput::Bytes((2 * bsz * cache_len as usize * NKV * D * 4) as u64));
    g.bench_function("decode_f32_B8_L1024_h14x2_d64", |b| {
        b.iter(|| black_box(attention_decode(&qd, &kc, &vc, &lens_now, None).expect("decode")))
    });
    g.finish();
}

criterion_group!(group, benches);
criterion_main!(group);
