use super::*;
use crate::testing::*;
use smelt_engine::Rng;

/// Naive float64 attention with an explicit masked softmax, per (sequence, head).
/// Returns (o [T, H, d], lse [H, T]).
fn naive_forward(q: &[f64], k: &[f64], v: &[f64], cu: &[u32], dims: Dims, scale: f64) -> (Vec<f64>, Vec<f64>) {
    let (nh, nkv, d) = (dims.n_heads, dims.n_kv_heads, dims.head_dim);
    let t = q.len() / (nh * d);
    let mut o = vec![0.0; q.len()];
    let mut lse = vec![0.0; nh * t];
    for w in cu.windows(2) {
        let (s, len) = (w[0] as usize, (w[1] - w[0]) as usize);
        for h in 0..nh {
            let g = h / (nh / nkv);
            for i in 0..len {
                let qi = &q[((s + i) * nh + h) * d..][..d];
                let scores: Vec<f64> = (0..len)
                    .map(|j| {
                        if j > i {
                            f64::NEG_INFINITY
                        } else {
                            scale * (0..d).map(|x| qi[x] * k[((s + j) * nkv + g) * d + x]).sum::<f64>()
                        }
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|x| (x - mx).exp()).sum();
                lse[h * t + s + i] = mx + z.ln();
                for j in 0..len {
                    let p = (scores[j] - mx).exp() / z;
                    for x in 0..d {
                        o[((s + i) * nh + h) * d + x] += p * v[((s + j) * nkv + g) * d + x];
                    }
                }
            }
        }
    }
    (o, lse)
}

/// Naive float64 backward through the explicit softmax Jacobian. Returns (dq, dk, dv).
#[allow(clippy::too_many_arguments)]
fn naive_backward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    d_o: &[f64],
    cu: &[u32],
    dims: Dims,
    scale: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (nh, nkv, d) = (dims.n_heads, dims.n_kv_heads, dims.head_dim);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    let qi = |t: usize, h: usize| (t * nh + h) * d;
    let ki = |t: usize, g: usize| (t * nkv + g) * d;
    for w in cu.windows(2) {
        let (s, len) = (w[0] as usize, (w[1] - w[0]) as usize);
        for h in 0..nh {
            let g = h / (nh / nkv);
            for i in 0..len {
                let dotqk = |j: usize| (0..d).map(|x| q[qi(s + i, h) + x] * k[ki(s + j, g) + x]).sum::<f64>();
                let sc: Vec<f64> = (0..=i).map(|j| scale * dotqk(j)).collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                let p: Vec<f64> = sc.iter().map(|x| (x - mx).exp() / z).collect();
                let dp: Vec<f64> =
                    (0..=i).map(|j| (0..d).map(|x| d_o[qi(s + i, h) + x] * v[ki(s + j, g) + x]).sum()).collect();
                let pdp: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for j in 0..=i {
                    let ds = p[j] * (dp[j] - pdp);
                    for x in 0..d {
                        dq[qi(s + i, h) + x] += scale * ds * k[ki(s + j, g) + x];
                        dk[ki(s + j, g) + x] += scale * ds * q[qi(s + i, h) + x];
                        dv[ki(s + j, g) + x] += p[j] * d_o[qi(s + i, h) + x];
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

fn cu_of(lens: &[u32]) -> Vec<u32> {
    let mut cu = vec![0u32];
    for &l in lens {
        cu.push(cu.last().copied().unwrap_or(0) + l);
    }
    cu
}

struct Case {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
    cu: Vec<u32>,
    dims: Dims,
    t: usize,
}

fn case(rng: &mut Rng, lens: &[u32], nh: usize, nkv: usize, d: usize) -> Case {
    let cu = cu_of(lens);
    let t = *cu.last().unwrap_or(&0) as usize;
    Case {
        q: randn(rng, t * nh * d, 1.0),
        k: randn(rng, t * nkv * d, 1.0),
        v: randn(rng, t * nkv * d, 1.0),
        d_o: randn(rng, t * nh * d, 1.0),
        cu,
        dims: Dims { n_heads: nh, n_kv_heads: nkv, head_dim: d },
        t,
    }
}

impl Case {
    fn tensors(&self, dt: DType, dev: Device) -> [Tensor; 4] {
        let (t, nh, nkv, d) = (self.t, self.dims.n_heads, self.dims.n_kv_heads, self.dims.head_dim);
        let mk = |x: &[f32], h: usize| {
            Tensor::from_slice(x, &[t, h, d], Device::Cpu).unwrap().to_dtype(dt).unwrap().to_device(dev).unwrap()
        };
        [mk(&self.q, nh), mk(&self.k, nkv), mk(&self.v, nkv), mk(&self.d_o, nh)]
    }
}

/// The shape table shared by the CPU tests: lengths 1, 17, 64, 513 packed (the 513 only once),
/// GQA ratios 1, 2, 7, head dims 64 and odd multiples of 8.
fn shape_table() -> Vec<(Vec<u32>, usize, usize, usize)> {
    vec![
        (vec![1, 17, 64, 513], 7, 1, 64),
        (vec![17, 1, 0, 64], 4, 2, 24),
        (vec![64, 17, 1], 3, 3, 40),
        (vec![33, 5], 2, 1, 128),
    ]
}

#[test]
fn forward_matches_f64_masked_softmax() {
    let mut rng = Rng::new(11);
    for (lens, nh, nkv, d) in shape_table() {
        let c = case(&mut rng, &lens, nh, nkv, d);
        let [q, k, v, _] = c.tensors(DType::F32, Device::Cpu);
        let (o, lse) = attention_forward(&q, &k, &v, &c.cu, None).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let (wo, wl) = naive_forward(&to_f64(&c.q), &to_f64(&c.k), &to_f64(&c.v), &c.cu, c.dims, scale);
        let what = format!("lens {lens:?} heads {nh}/{nkv} d {d}");
        assert_close(&o.to_vec_f32().unwrap(), &wo, 2e-5, 1e-4, &format!("o {what}"));
        assert_close(&lse.to_vec_f32().unwrap(), &wl, 2e-5, 1e-5, &format!("lse {what}"));
        assert_eq!(o.shape(), q.shape());
        assert_eq!(lse.shape(), &[nh, c.t]);

        // bf16 storage: one bf16 rounding of the f32-accumulated result of the rounded inputs.
        let [qh, kh, vh, _] = c.tensors(DType::BF16, Device::Cpu);
        let (oh, lh) = attention_forward(&qh, &kh, &vh, &c.cu, None).unwrap();
        assert_eq!(oh.dtype(), DType::BF16);
        let f = |t: &Tensor| to_f64(&t.to_vec_f32().unwrap());
        let (wo, wl) = naive_forward(&f(&qh), &f(&kh), &f(&vh), &c.cu, c.dims, scale);
        assert_close(&oh.to_vec_f32().unwrap(), &wo, 1e-3, DType::BF16.epsilon(), &format!("o bf16 {what}"));
        assert_close(&lh.to_vec_f32().unwrap(), &wl, 1e-4, 1e-5, &format!("lse bf16 {what}"));
    }
}

#[test]
fn forward_respects_custom_scale_and_single_token() {
    let mut rng = Rng::new(12);
    let c = case(&mut rng, &[1], 2, 1, 16);
    let [q, k, v, _] = c.tensors(DType::F32, Device::Cpu);
    let (o, lse) = attention_forward(&q, &k, &v, &c.cu, Some(0.3)).unwrap();
    // One key: o is v, lse is the single scaled score.
    let want_o: Vec<f64> = (0..2).flat_map(|_| to_f64(&c.v)).collect();
    assert_close(&o.to_vec_f32().unwrap(), &want_o, 1e-6, 1e-6, "o = v");
    for h in 0..2 {
        let s: f64 = (0..16).map(|x| c.q[h * 16 + x] as f64 * c.k[x] as f64).sum::<f64>() * 0.3;
        assert_close(&lse.to_vec_f32().unwrap()[h..h + 1], &[s], 1e-5, 1e-5, "lse = score");
    }
}

#[test]
fn backward_matches_f64() {
    let mut rng = Rng::new(13);
    for (lens, nh, nkv, d) in shape_table() {
        let c = case(&mut rng, &lens, nh, nkv, d);
        let [q, k, v, d_o] = c.tensors(DType::F32, Device::Cpu);
        let (o, lse) = attention_forward(&q, &k, &v, &c.cu, None).unwrap();
        let (dq, dk, dv) = attention_backward(&q, &k, &v, &o, &lse, &d_o, &c.cu, None).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let (wq, wk, wv) =
            naive_backward(&to_f64(&c.q), &to_f64(&c.k), &to_f64(&c.v), &to_f64(&c.d_o), &c.cu, c.dims, scale);
        let what = format!("lens {lens:?} heads {nh}/{nkv} d {d}");
        assert_close(&dq.to_vec_f32().unwrap(), &wq, 1e-4, 1e-3, &format!("dq {what}"));
        assert_close(&dk.to_vec_f32().unwrap(), &wk, 1e-4, 1e-3, &format!("dk {what}"));
        assert_close(&dv.to_vec_f32().unwrap(), &wv, 1e-4, 1e-3, &format!("dv {what}"));
        assert_eq!((dq.shape(), dk.shape(), dv.shape()), (q.shape(), k.shape(), v.shape()));
    }
}

#[test]
fn backward_by_finite_differences() {
    let mut rng = Rng::new(14);
    // GQA 2 and 1, sequence boundaries, a length-1 sequence.
    for (lens, nh, nkv, d) in [(vec![3u32, 1, 5], 4usize, 2usize, 8usize), (vec![4, 2], 1, 1, 16)] {
        let c = case(&mut rng, &lens, nh, nkv, d);
        let [q, k, v, d_o] = c.tensors(DType::F32, Device::Cpu);
        let scale = 0.45f64;
        let (o, lse) = attention_forward(&q, &k, &v, &c.cu, Some(scale as f32)).unwrap();
        let (dq, dk, dv) = attention_backward(&q, &k, &v, &o, &lse, &d_o, &c.cu, Some(scale as f32)).unwrap();
        let (q64, k64, v64, g64) = (to_f64(&c.q), to_f64(&c.k), to_f64(&c.v), to_f64(&c.d_o));
        // L = Σ dO ∘ O(q, k, v)
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            naive_forward(q, k, v, &c.cu, c.dims, scale).0.iter().zip(&g64).map(|(a, b)| a * b).sum()
        };
        let h = 1e-5;
        let what = format!("lens {lens:?} heads {nh}/{nkv}");
        let fq = finite_diff(|x| loss(x, &k64, &v64), &q64, h);
        let fk = finite_diff(|x| loss(&q64, x, &v64), &k64, h);
        let fv = finite_diff(|x| loss(&q64, &k64, x), &v64, h);
        assert_close(&dq.to_vec_f32().unwrap(), &fq, 1e-4, 1e-3, &format!("dq fd {what}"));
        assert_close(&dk.to_vec_f32().unwrap(), &fk, 1e-4, 1e-3, &format!("dk fd {what}"));
        assert_close(&dv.to_vec_f32().unwrap(), &fv, 1e-4, 1e-3, &format!("dv fd {what}"));
    }
}

/// Builds caches `[n_slots, max_len, n_kv, d]` poisoned with NaN, then appends every token of
/// each sequence (the future rows too: decode must not read past cache_lens).
fn filled_cache(c: &Case, lens: &[u32], n_slots: usize, max_len: usize, dt: DType, dev: Device) -> (Tensor, Tensor) {
    let (nkv, d) = (c.dims.n_kv_heads, c.dims.head_dim);
    let kc = Tensor::full(f64::NAN, &[n_slots, max_len, nkv, d], dt, dev).unwrap();
    let vc = Tensor::full(f64::NAN, &[n_slots, max_len, nkv, d], dt, dev).unwrap();
    let [_, k, v, _] = c.tensors(dt, dev);
    let (mut slots, mut pos) = (vec![], vec![]);
    for (b, &l) in lens.iter().enumerate() {
        for p in 0..l {
            slots.push(b as u32);
            pos.push(p);
        }
    }
    kv_cache_append(&kc, &vc, &k, &v, &slots, &pos).unwrap();
    (kc, vc)
}

/// q rows `[B, n_new, H, d]` for every batch row b: the n_new rows ending at cache_lens[b].
fn gather_q(c: &Case, lens_now: &[u32], n_new: usize) -> Vec<f32> {
    let row = c.dims.n_heads * c.dims.head_dim;
    let mut out = vec![];
    for (b, &l) in lens_now.iter().enumerate() {
        let s = c.cu[b] as usize;
        for i in 0..n_new {
            let tok = s + l as usize - n_new + i;
            out.extend_from_slice(&c.q[tok * row..(tok + 1) * row]);
        }
    }
    out
}

/// The decode result at every position of every sequence must equal the matching rows of the
/// full causal forward, with several sequences of different cache lengths batched together.
#[test]
fn decode_matches_forward_rows_at_every_position() {
    let mut rng = Rng::new(15);
    for (lens, n_new, nh, nkv, d) in [
        ([1u32, 9, 33, 70], 1usize, 7usize, 1usize, 24usize),
        ([3, 9, 33, 70], 3, 4, 2, 64),
        ([70, 3, 20, 5], 1, 4, 2, 64),
    ] {
        let c = case(&mut rng, &lens, nh, nkv, d);
        let [q, k, v, _] = c.tensors(DType::F32, Device::Cpu);
        let (o, _) = attention_forward(&q, &k, &v, &c.cu, None).unwrap();
        let o = o.to_vec_f32().unwrap();
        let (kc, vc) = filled_cache(&c, &lens, 5, 80, DType::F32, Device::Cpu);
        let row = nh * d;
        for step in n_new as u32..=70 {
            let lens_now: Vec<u32> = lens.iter().map(|&l| step.min(l)).collect();
            let qv = gather_q(&c, &lens_now, n_new);
            let qt = Tensor::from_slice(&qv, &[lens.len(), n_new, nh, d], Device::Cpu).unwrap();
            let got = attention_decode(&qt, &kc, &vc, &lens_now, None, None).unwrap().to_vec_f32().unwrap();
            let mut want = vec![];
            for (b, &l) in lens_now.iter().enumerate() {
                for i in 0..n_new {
                    let tok = c.cu[b] as usize + l as usize - n_new + i;
                    want.extend(to_f64(&o[tok * row..(tok + 1) * row]));
                }
            }
            assert_close(&got, &want, 1e-5, 1e-4, &format!("decode n_new {n_new} step {step} heads {nh}/{nkv}"));
        }
        // Single-token rank-3 q.
        let lens_now: Vec<u32> = lens.iter().map(|&l| l.min(5)).collect();
        let qt = Tensor::from_slice(&gather_q(&c, &lens_now, 1), &[4, nh, d], Device::Cpu).unwrap();
        assert_eq!(attention_decode(&qt, &kc, &vc, &lens_now, None, None).unwrap().shape(), &[4, nh, d]);
    }
}

/// The rows `rows` of a row-major list of `len`-element rows.
fn pick_rows(v: &[f32], rows: &[u32], len: usize) -> Vec<f32> {
    rows.iter().flat_map(|&r| v[r as usize * len..(r as usize + 1) * len].iter().copied()).collect()
}

/// With a slot list, batch row i reads slot `slots[i]`: any subset of the slots, in any order,
/// gives exactly the rows that decoding every slot in order gives.
#[test]
fn decode_reads_the_given_slots() {
    let mut rng = Rng::new(18);
    let lens = [4u32, 9, 33, 70];
    for (n_new, nh, nkv, d) in [(1usize, 4usize, 2usize, 64usize), (3, 7, 1, 24)] {
        let c = case(&mut rng, &lens, nh, nkv, d);
        let (kc, vc) = filled_cache(&c, &lens, 4, 80, DType::F32, Device::Cpu);
        let qv = gather_q(&c, &lens, n_new);
        let qt = Tensor::from_slice(&qv, &[4, n_new, nh, d], Device::Cpu).unwrap();
        let all = attention_decode(&qt, &kc, &vc, &lens, None, None).unwrap().to_vec_f32().unwrap();
        let row = n_new * nh * d;
        for slots in [vec![3u32, 1], vec![2], vec![0, 3, 2, 1]] {
            let q =
                Tensor::from_slice(&pick_rows(&qv, &slots, row), &[slots.len(), n_new, nh, d], Device::Cpu).unwrap();
            let lens_now: Vec<u32> = slots.iter().map(|&s| lens[s as usize]).collect();
            let got = attention_decode(&q, &kc, &vc, &lens_now, Some((&slots).into()), None).unwrap();
            assert_eq!(got.to_vec_f32().unwrap(), pick_rows(&all, &slots, row), "slots {slots:?} n_new {n_new}");
        }
    }
}

#[test]
fn decode_with_four_new_tokens() {
    let mut rng = Rng::new(16);
    let lens = [9u32, 33];
    let c = case(&mut rng, &lens, 2, 2, 8);
    let [q, k, v, _] = c.tensors(DType::F32, Device::Cpu);
    let (o, _) = attention_forward(&q, &k, &v, &c.cu, None).unwrap();
    let o = o.to_vec_f32().unwrap();
    let (kc, vc) = filled_cache(&c, &lens, 2, 40, DType::F32, Device::Cpu);
    let lens_now = [9u32, 4];
    let qv = gather_q(&c, &lens_now, 4);
    let qt = Tensor::from_slice(&qv, &[2, 4, 2, 8], Device::Cpu).unwrap();
    let got = attention_decode(&qt, &kc, &vc, &lens_now, None, None).unwrap().to_vec_f32().unwrap();
    let mut want = vec![];
    for (b, &l) in lens_now.iter().enumerate() {
        for i in 0..4 {
            let tok = c.cu[b] as usize + l as usize - 4 + i;
            want.extend(to_f64(&o[tok * 16..(tok + 1) * 16]));
        }
    }
    assert_close(&got, &want, 1e-5, 1e-4, "decode n_new 4");
}

#[test]
fn decode_bf16_cache_matches_f32_reference() {
    let mut rng = Rng::new(17);
    let lens = [5u32, 40];
    let c = case(&mut rng, &lens, 4, 2, 32);
    let (kc, vc) = filled_cache(&c, &lens, 2, 48, DType::BF16, Device::Cpu);
    let lens_now = [5u32, 40];
    let qv = gather_q(&c, &lens_now, 2);
    let qt = Tensor::from_slice(&qv, &[2, 2, 4, 32], Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
    let got = attention_decode(&qt, &kc, &vc, &lens_now, None, None).unwrap();
    assert_eq!(got.dtype(), DType::BF16);
    // Reference: f32 forward on the bf16-rounded inputs.
    let [qh, kh, vh, _] = c.tensors(DType::BF16, Device::Cpu);
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let (o, _) = attention_forward(&f(&qh), &f(&kh), &f(&vh), &c.cu, None).unwrap();
    let o = o.to_vec_f32().unwrap();
    let mut want = vec![];
    for (b, &l) in lens_now.iter().enumerate() {
        for i in 0..2 {
            let tok = c.cu[b] as usize + l as usize - 2 + i;
            want.extend(to_f64(&o[tok * 128..(tok + 1) * 128]));
        }
    }
    assert_close(&got.to_vec_f32().unwrap(), &want, 1e-3, DType::BF16.epsilon(), "decode bf16");
}

#[test]
fn errors_name_the_op_and_shapes() {
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, Device::Cpu).unwrap();
    let e = attention_forward(&z(&[4, 3, 8]), &z(&[4, 2, 8]), &z(&[4, 2, 8]), &[0, 4], None).unwrap_err().to_string();
    assert!(e.contains("attention_forward") && e.contains("multiple"), "{e}");
    let e = attention_forward(&z(&[4, 2, 8]), &z(&[4, 1, 8]), &z(&[4, 1, 8]), &[0, 3], None).unwrap_err().to_string();
    assert!(e.contains("cu_seqlens") && e.contains("T = 4"), "{e}");
    let e =
        attention_forward(&z(&[4, 2, 12]), &z(&[4, 1, 12]), &z(&[4, 1, 12]), &[0, 4], None).unwrap_err().to_string();
    assert!(e.contains("head_dim 12"), "{e}");
    let e = attention_forward(&z(&[4, 2, 8]), &z(&[5, 1, 8]), &z(&[5, 1, 8]), &[0, 4], None).unwrap_err().to_string();
    assert!(e.contains("[4, 2, 8]") && e.contains("[5, 1, 8]"), "{e}");
    let (q, k) = (z(&[4, 2, 8]), z(&[4, 1, 8]));
    let (o, lse) = attention_forward(&q, &k, &k, &[0, 1, 4], None).unwrap();
    let e = attention_backward(&q, &k, &k, &o, &z(&[4, 2]), &q, &[0, 4], None).unwrap_err().to_string();
    assert!(e.contains("attention_backward") && e.contains("lse"), "{e}");
    assert!(attention_backward(&q, &k, &k, &o, &lse, &q, &[0, 1, 4], None).is_ok());
    let cache = z(&[2, 8, 1, 8]);
    let e = attention_decode(&z(&[2, 2, 8]), &cache, &z(&[2, 8, 1, 8]), &[3, 9], None, None).unwrap_err().to_string();
    assert!(e.contains("attention_decode") && e.contains("cache_lens[1] = 9"), "{e}");
    let e =
        attention_decode(&z(&[1, 2, 8]), &cache, &cache, &[3], Some((&[2u32]).into()), None).unwrap_err().to_string();
    assert!(e.contains("attention_decode") && e.contains("slots[0] = 2"), "{e}");
    let e = attention_decode(&z(&[1, 2, 8]), &cache, &cache, &[3], Some((&[0u32, 1]).into()), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("attention_decode") && e.contains("2 slots for batch 1"), "{e}");
    let e =
        kv_cache_append(&cache, &z(&[2, 8, 1, 8]), &z(&[1, 1, 8]), &z(&[1, 1, 8]), &[2], &[0]).unwrap_err().to_string();
    assert!(e.contains("kv_cache_append") && e.contains("slot 2"), "{e}");
    // Empty batch.
    let (o, lse) = attention_forward(&z(&[0, 2, 8]), &z(&[0, 1, 8]), &z(&[0, 1, 8]), &[0], None).unwrap();
    assert_eq!((o.shape(), lse.shape()), (&[0usize, 2, 8][..], &[2usize, 0][..]));
}

// ---- device tests (GPU only) ----

/// Fills and frees NaN buffers of the outputs' sizes so the caching allocator hands the
/// kernels poisoned memory: an element a kernel forgets to write shows up as NaN.
fn poison(dev: Device, outs: &[(&[usize], DType)]) {
    for &(shape, dt) in outs {
        drop(Tensor::full(f64::NAN, shape, dt, dev).unwrap());
    }
}

fn close_to_cpu(got: &Tensor, want: &Tensor, dt: DType, what: &str) {
    let want = to_f64(&want.to_vec_f32().unwrap());
    let got = got.to_vec_f32().unwrap();
    let (atol, rtol) = if dt == DType::F32 { (2e-5, 1e-4) } else { (2e-2, 2.0 * DType::BF16.epsilon()) };
    assert_close(&got, &want, atol, rtol, what);
}

/// Device shapes: Qwen's head dims 64 and 128, and the small ones test models use (8, 16, and 24,
/// which does not divide the 128 threads of the backward kernels); lengths not multiples of
/// any tile size.
fn device_table() -> Vec<(Vec<u32>, usize, usize, usize)> {
    vec![
        (vec![1, 17, 64, 513], 7, 1, 64),
        (vec![130, 1, 0, 67], 4, 2, 128),
        (vec![200, 33], 2, 2, 64),
        (vec![5, 70, 33], 4, 2, 16),
        (vec![9, 41], 3, 1, 24),
        (vec![3, 20], 2, 1, 8),
    ]
}

/// The versions a call can run: all of `all` for bf16 at head_dim 64/128 (the tensor-core
/// kernels), else v1 only.
fn tensor_core_versions(dt: DType, d: usize, all: &'static [u32]) -> &'static [u32] {
    if dt == DType::BF16 && matches!(d, 64 | 128) {
        all
    } else {
        &[1]
    }
}

#[test]
fn forward_device_matches_cpu() {
    let Some(dev) = test_cuda_device() else { return };
    let mut rng = Rng::new(21);
    for (lens, nh, nkv, d) in device_table() {
        let c = case(&mut rng, &lens, nh, nkv, d);
        for dt in [DType::F32, DType::BF16] {
            let [q, k, v, _] = c.tensors(dt, Device::Cpu);
            // Reference: f32 CPU forward of the (rounded) inputs.
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let (wo, wl) = attention_forward(&f(&q), &f(&k), &f(&v), &c.cu, None).unwrap();
            let [qd, kd, vd, _] = c.tensors(dt, dev);
            // v4 (v3 with one m-tile per warp) exists at head dim 64 only.
            let all: &'static [u32] = if d == 64 { &[1, 2, 3, 4] } else { &[1, 2, 3] };
            for &version in tensor_core_versions(dt, d, all) {
                let _v = crate::versions::scoped("attention_forward", version);
                poison(dev, &[(q.shape(), dt), (&[nh, c.t], DType::F32)]);
                let (o, lse) = attention_forward(&qd, &kd, &vd, &c.cu, None).unwrap();
                let what = format!("fwd v{version} {dt} lens {lens:?} heads {nh}/{nkv} d {d}");
                close_to_cpu(&o, &wo, dt, &format!("o {what}"));
                assert_close(&lse.to_vec_f32().unwrap(), &to_f64(&wl.to_vec_f32().unwrap()), 1e-3, 1e-4, &what);
            }
        }
    }
}

#[test]
fn forcing_a_tensor_core_version_on_f32_is_an_error() {
    let Some(dev) = test_cuda_device() else { return };
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, dev).unwrap();
    let (q, k) = (z(&[4, 2, 64]), z(&[4, 1, 64]));
    let _f = crate::versions::scoped("attention_forward", 3);
    let e = attention_forward(&q, &k, &k, &[0, 4], None).unwrap_err().to_string();
    assert!(e.contains("attention_forward") && e.contains("version 3") && e.contains("[1]"), "{e}");
    let (o, lse) = (z(&[4, 2, 64]), z(&[2, 4]));
    let _b = crate::versions::scoped("attention_backward", 2);
    let e = attention_backward(&q, &k, &k, &o, &lse, &q, &[0, 4], None).unwrap_err().to_string();
    assert!(e.contains("attention_backward") && e.contains("version 2"), "{e}");
}

#[cfg(feature = "cuda")]
#[test]
fn backward_v4_splits_heads_until_the_blocks_fill_an_h100() {
    use super::cuda::dkdv_parts;
    // Qwen2.5-0.5B, 8 × 1024 tokens: 16 key tiles × 8 sequences × 2 KV heads = 256 blocks.
    assert_eq!(dkdv_parts(256, 7), 3);
    assert_eq!(dkdv_parts(12, 7), 7, "at most one head per part");
    assert_eq!(dkdv_parts(528, 7), 1, "blocks enough already: v3's kernel");
    assert_eq!(dkdv_parts(4, 1), 1, "one head per KV head cannot split");
    assert_eq!(dkdv_parts(0, 4), 4);
}

/// The backward's table under `SMELT_TEST_REDUCED` (racecheck): both tensor-core head dims and
/// one v1-only dim, several query and key tiles per sequence, GQA 7/1 (v4's uneven parts) and 2/1.
fn reduced_backward_table() -> Vec<(Vec<u32>, usize, usize, usize)> {
    vec![(vec![70, 1, 130], 7, 1, 64), (vec![130, 67], 4, 2, 128), (vec![9, 41], 3, 1, 24)]
}

#[test]
fn backward_device_matches_cpu() {
    let Some(dev) = test_cuda_device() else { return };
    let mut rng = Rng::new(22);
    let table = if crate::testing::reduced_tables() { reduced_backward_table() } else { device_table() };
    for (lens, nh, nkv, d) in table {
        let c = case(&mut rng, &lens, nh, nkv, d);
        for dt in [DType::F32, DType::BF16] {
            let [q, k, v, d_o] = c.tensors(dt, Device::Cpu);
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let (o, lse) = attention_forward(&f(&q), &f(&k), &f(&v), &c.cu, None).unwrap();
            let (wq, wk, wv) = attention_backward(&f(&q), &f(&k), &f(&v), &o, &lse, &f(&d_o), &c.cu, None).unwrap();
            let od = o.to_dtype(dt).unwrap().to_device(dev).unwrap();
            let [qd, kd, vd, dod] = c.tensors(dt, dev);
            let lsed = lse.to_device(dev).unwrap();
            // v4 at its own split (one head per part on these small shapes) and at 3 parts
            // (uneven for 7 heads per KV head).
            let runs = tensor_core_versions(dt, d, &[1, 2, 3, 4]).iter().flat_map(|&v| {
                if v == 4 {
                    vec![(v, None), (v, Some(3))]
                } else {
                    vec![(v, None)]
                }
            });
            for (version, parts) in runs {
                let _v = crate::versions::scoped("attention_backward", version);
                set_dkdv_parts(parts);
                poison(dev, &[(q.shape(), dt), (k.shape(), dt), (v.shape(), dt)]);
                let (dq, dk, dv) = attention_backward(&qd, &kd, &vd, &od, &lsed, &dod, &c.cu, None).unwrap();
                set_dkdv_parts(None);
                let what = format!("bwd v{version} (parts {parts:?}) {dt} lens {lens:?} heads {nh}/{nkv} d {d}");
                close_to_cpu(&dq, &wq, dt, &format!("dq {what}"));
                close_to_cpu(&dk, &wk, dt, &format!("dk {what}"));
                close_to_cpu(&dv, &wv, dt, &format!("dv {what}"));
            }
        }
    }
}

#[test]
fn decode_device_matches_cpu() {
    let Some(dev) = test_cuda_device() else { return };
    let mut rng = Rng::new(23);
    // Long caches (split along the length) and short ones, batched together. The cache holds
    // valid rows up to the longest length any step below reads (row 0 reaches 5); rows past
    // that stay NaN.
    let lens = [5u32, 70, 1000, 3000];
    // v2 takes head dims 64/128 with ≤ 8 query heads per KV head: 7/1 (one token per block),
    // 8/1 (a full block of rows), 4/2 (4 tokens per block, then 1); d 24 runs v1 only.
    for (nh, nkv, d) in [(7usize, 1usize, 64usize), (8, 1, 128), (4, 2, 128), (4, 2, 24)] {
        let c = case(&mut rng, &lens, nh, nkv, d);
        for dt in [DType::F32, DType::BF16] {
            let (kc, vc) = filled_cache(&c, &lens, 4, 3001, dt, Device::Cpu);
            let (kd, vd) = filled_cache(&c, &lens, 4, 3001, dt, dev);
            // n_new 5 > DEC_MAXQ (4): the decode kernel splits the new tokens into query groups.
            let steps = [
                (1usize, [1u32, 70, 1000, 3000]),
                (1, [1, 3, 513, 2049]),
                (3, [3, 67, 999, 2500]),
                (5, [5, 67, 999, 2500]),
            ];
            for (n_new, lens_now) in steps {
                let qv = gather_q(&c, &lens_now, n_new);
                let q = Tensor::from_slice(&qv, &[4, n_new, nh, d], Device::Cpu).unwrap().to_dtype(dt).unwrap();
                let want = attention_decode(&q, &kc, &vc, &lens_now, None, None).unwrap();
                let versions: &[u32] = match (d, dt) {
                    (24, _) => &[1],
                    (_, DType::BF16) => &[1, 2, 3],
                    _ => &[1, 2],
                };
                for &version in versions {
                    let _v = crate::versions::scoped("attention_decode", version);
                    poison(dev, &[(q.shape(), dt)]);
                    let got = attention_decode(&q.to_device(dev).unwrap(), &kd, &vd, &lens_now, None, None).unwrap();
                    close_to_cpu(
                        &got,
                        &want,
                        dt,
                        &format!("decode v{version} {dt} n_new {n_new} lens {lens_now:?} heads {nh}/{nkv} d {d}"),
                    );
                    // Lengths on the device (a replayed graph's; bf16, as generation runs): the
                    // splits are sized for the capacity and each row cuts its own length into them.
                    if dt == DType::BF16 {
                        let lens_d = Tensor::from_slice(&lens_now, &[4], dev).unwrap();
                        poison(dev, &[(q.shape(), dt)]);
                        let qd = q.to_device(dev).unwrap();
                        let lens_d = crate::Indices::Device(&lens_d);
                        let got = attention_decode(&qd, &kd, &vd, lens_d, None, None).unwrap();
                        let what = format!("decode v{version} device lens {lens_now:?} n_new {n_new} heads {nh}/{nkv}");
                        close_to_cpu(&got, &want, dt, &what);
                    }
                    // Rows 3 and 1 only, through the slot list.
                    let slots = [3u32, 1];
                    let row = n_new * nh * d;
                    let sub = |v: &[f32], dev| {
                        let t = Tensor::from_slice(&pick_rows(v, &slots, row), &[2, n_new, nh, d], Device::Cpu);
                        t.unwrap().to_dtype(dt).unwrap().to_device(dev).unwrap()
                    };
                    let lens_sub = [lens_now[3], lens_now[1]];
                    let got =
                        attention_decode(&sub(&qv, dev), &kd, &vd, &lens_sub, Some((&slots).into()), None).unwrap();
                    let want_sub = sub(&want.to_vec_f32().unwrap(), Device::Cpu);
                    close_to_cpu(&got, &want_sub, dt, &format!("decode v{version} {dt} slots {slots:?} d {d}"));
                }
            }
        }
    }
    // d 24 cannot run v2: forcing it is an error naming the op, not a silent v1.
    let _v = crate::versions::scoped("attention_decode", 2);
    let c = case(&mut rng, &[5], 4, 2, 24);
    let (kd, vd) = filled_cache(&c, &[5], 1, 8, DType::F32, dev);
    let q = Tensor::zeros(&[1, 1, 4, 24], DType::F32, dev).unwrap();
    let e = attention_decode(&q, &kd, &vd, &[5], None, None).unwrap_err().to_string();
    assert!(e.contains("attention_decode") && e.contains("version 2"), "{e}");
}

#[test]
fn device_rejects_unsupported_head_dim() {
    let Some(dev) = test_cuda_device() else { return };
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, dev).unwrap();
    let e =
        attention_forward(&z(&[4, 2, 40]), &z(&[4, 1, 40]), &z(&[4, 1, 40]), &[0, 4], None).unwrap_err().to_string();
    assert!(e.contains("head_dim 40"), "{e}");
}

/// Forces attention backward v4's split into `parts` (`None`: the launcher's choice).
fn set_dkdv_parts(parts: Option<usize>) {
    #[cfg(feature = "cuda")]
    super::cuda::DKDV_PARTS.with(|p| p.set(parts));
    #[cfg(not(feature = "cuda"))]
    let _ = parts;
}
