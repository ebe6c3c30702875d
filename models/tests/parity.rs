//! Parity with transformers on the tiny fixtures (tests/fixtures/README.md): per-token
//! log-probs and entropies, greedy continuations, and every parameter's gradient of the
//! mean NLL.

use std::path::PathBuf;

use serde_json::Value;
use smelt_engine::{DType, Device, Tensor};
use smelt_models::safetensors::SafetensorsFile;
use smelt_models::{Config, LoadOptions, Packed, Qwen, Weights};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

fn load(name: &str, recompute: bool) -> Qwen {
    let dir = fixture(name);
    let config = Config::from_file(dir.join("config.json")).expect("config");
    let weights = Weights::load(&dir, &config, &LoadOptions::default()).expect("weights");
    let mut m = Qwen::new(config, weights);
    m.recompute = recompute;
    m
}

fn json(path: PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json")
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().expect("floats").iter().map(|x| x.as_f64().expect("float")).collect()
}

/// Scores every reference sequence in one packed batch and compares with transformers.
fn check_scores(name: &str, tol: f64) {
    let model = load(name, false);
    let scores = json(fixture(name).join("reference/scores.json"));
    let seqs: Vec<&Value> = scores["sequences"].as_array().unwrap().iter().collect();
    let ids: Vec<Vec<u32>> = seqs.iter().map(|s| ids_of(&s["ids"])).collect();
    let batch = Packed::new(&ids);
    let acts = model.forward(&batch).unwrap();
    for (key, temp) in [("", 1.0f32), ("_t0.7", 0.7)] {
        let out = model.head(&acts.hidden, &batch.next_token_targets(), temp).unwrap();
        let (logp, ent) = (out.logp.to_vec::<f32>().unwrap(), out.entropy.to_vec::<f32>().unwrap());
        for (b, s) in seqs.iter().enumerate() {
            let (a, e) = (batch.cu_seqlens[b] as usize, batch.cu_seqlens[b + 1] as usize);
            let want_lp = floats(&s[format!("logprobs{key}").as_str()]);
            let want_h = floats(&s[format!("entropy{key}").as_str()]);
            assert_eq!(want_lp.len(), e - a - 1);
            for t in 0..e - a - 1 {
                let (gl, gh) = (logp[a + t] as f64, ent[a + t] as f64);
                assert!(
                    (gl - want_lp[t]).abs() <= tol,
                    "{name} {} T{temp} logprob[{t}]: {gl} vs {}",
                    s["name"],
                    want_lp[t]
                );
                assert!(
                    (gh - want_h[t]).abs() <= tol,
                    "{name} {} T{temp} entropy[{t}]: {gh} vs {}",
                    s["name"],
                    want_h[t]
                );
            }
        }
    }
}

#[test]
fn qwen2_scores_match_transformers() {
    check_scores("qwen2-tiny", 1e-4);
}

#[test]
fn qwen3_scores_match_transformers() {
    check_scores("qwen3-tiny", 1e-3);
}

/// Mean NLL over the three random sequences, backward through the model, every parameter's
/// gradient compared with PyTorch's by relative norm.
fn check_grads(name: &str, recompute: bool) {
    let model = load(name, recompute);
    let inputs = json(fixture(name).join("reference/inputs.json"));
    let seqs: Vec<Vec<u32>> = inputs["sequences"].as_array().unwrap()[..3].iter().map(|s| ids_of(&s["ids"])).collect();
    let batch = Packed::new(&seqs);
    let targets = batch.next_token_targets();
    let n_pred = targets.iter().filter(|&&t| t != u32::MAX).count();
    let acts = model.forward(&batch).unwrap();
    let out = model.head(&acts.hidden, &targets, 1.0).unwrap();
    let logp = out.logp.to_vec::<f32>().unwrap();
    let loss: f64 =
        -logp.iter().zip(&targets).filter(|(_, &t)| t != u32::MAX).map(|(l, _)| *l as f64).sum::<f64>() / n_pred as f64;
    let want_loss = json(fixture(name).join("reference/loss.json"))["loss"].as_f64().unwrap();
    assert!((loss - want_loss).abs() < 1e-4 * want_loss.abs().max(1.0), "{name}: loss {loss} vs {want_loss}");

    // dL/dlogp = −1/n on predicted tokens; entropy carries no gradient here.
    let g: Vec<f32> = targets.iter().map(|&t| if t == u32::MAX { 0.0 } else { -1.0 / n_pred as f32 }).collect();
    let n = g.len();
    let g_logp = Tensor::from_slice(&g, &[n], Device::Cpu).unwrap();
    let g_ent = Tensor::zeros(&[n], DType::F32, Device::Cpu).unwrap();
    let grads = Weights::zeros(&model.config, DType::F32, Device::Cpu).unwrap();
    model.backward(&acts, &out, 1.0, &g_logp, &g_ent, &grads).unwrap();

    let reference = SafetensorsFile::open(fixture(name).join("reference/grads.safetensors")).unwrap();
    let mine = grads.named_tensors();
    assert_eq!(mine.len(), reference.tensors().len(), "{name}: number of gradient tensors");
    for (pname, t) in mine {
        let want = reference.load(&pname, Some(DType::F32), true).unwrap().to_vec::<f32>().unwrap();
        let got = t.to_vec::<f32>().unwrap();
        assert_eq!(got.len(), want.len(), "{name} {pname}: size");
        let diff: f64 = got.iter().zip(&want).map(|(a, b)| ((*a - *b) as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
        assert!(norm > 0.0, "{name} {pname}: reference gradient is zero");
        assert!(diff / norm < 1e-4, "{name} {pname}: relative error {:.3e}", diff / norm);
    }
}

#[test]
fn qwen2_gradients_match_pytorch() {
    check_grads("qwen2-tiny", false);
}

#[test]
fn qwen3_gradients_match_pytorch() {
    check_grads("qwen3-tiny", false);
}

#[test]
fn recomputation_gives_the_same_gradients() {
    check_grads("qwen3-tiny", true);
}

/// Greedy decoding with the KV cache reproduces transformers' `generate` (eos disabled), for
/// both prompts batched together (different lengths).
fn check_greedy(name: &str) {
    let model = load(name, false);
    let greedy = json(fixture(name).join("reference/greedy.json"));
    let cases: Vec<&Value> = greedy["generations"].as_array().expect("greedy generations").iter().collect();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids_of(&c["prompt_ids"])).collect();
    let want: Vec<Vec<u32>> = cases.iter().map(|c| ids_of(&c["new_ids"])).collect();
    let steps = want[0].len();
    let max_len = prompts.iter().map(Vec::len).max().unwrap() + steps;
    let mut cache = model.new_kv_cache(prompts.len(), max_len).unwrap();
    let mut hidden = model.prefill(&prompts, &mut cache).unwrap();
    let mut got = vec![Vec::new(); prompts.len()];
    for _ in 0..steps {
        let logits = model.logits(&hidden).unwrap().to_vec::<f32>().unwrap();
        let v = model.config.vocab_size;
        let next: Vec<u32> = logits
            .chunks(v)
            .map(|row| {
                row.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32
            })
            .collect();
        for (g, &t) in got.iter_mut().zip(&next) {
            g.push(t);
        }
        hidden = model.decode_step(&next, &mut cache).unwrap();
    }
    assert_eq!(got, want, "{name}: greedy continuations");
}

#[test]
fn qwen2_greedy_matches_transformers() {
    check_greedy("qwen2-tiny");
}

#[test]
fn qwen3_greedy_matches_transformers() {
    check_greedy("qwen3-tiny");
}

/// Sampled generation records log-probs and entropies that equal a fresh scoring pass over the
/// same tokens (decode path vs full forward), and the same seed gives the same tokens.
#[test]
fn sampled_generation_logp_equals_rescoring() {
    use smelt_kernels::sample::SamplingConfig;
    use smelt_models::{generate, GenerateOptions};
    for name in ["qwen2-tiny", "qwen3-tiny"] {
        let model = load(name, false);
        let prompts = vec![vec![5u32, 77, 300, 12, 9], vec![42u32, 7]];
        let opts = GenerateOptions {
            max_new_tokens: 10,
            sampling: SamplingConfig { temperature: 0.8, top_k: None, top_p: 1.0 },
            n_samples: 2,
            seed: 1234,
            stop_ids: vec![],
        };
        let gens = generate(&model, &prompts, &opts).unwrap();
        assert_eq!(gens.len(), 4);
        assert_eq!(gens, generate(&model, &prompts, &opts).unwrap(), "{name}: same seed, same output");
        let other = generate(&model, &prompts, &GenerateOptions { seed: 99, ..opts.clone() }).unwrap();
        assert_ne!(gens.iter().map(|g| &g.ids).collect::<Vec<_>>(), other.iter().map(|g| &g.ids).collect::<Vec<_>>());
        let full: Vec<Vec<u32>> = gens.iter().map(|g| [prompts[g.prompt].clone(), g.ids.clone()].concat()).collect();
        let batch = Packed::new(&full);
        let acts = model.forward(&batch).unwrap();
        let out = model.head(&acts.hidden, &batch.next_token_targets(), 0.8).unwrap();
        let (logp, ent) = (out.logp.to_vec::<f32>().unwrap(), out.entropy.to_vec::<f32>().unwrap());
        for (b, g) in gens.iter().enumerate() {
            let start = batch.cu_seqlens[b] as usize + prompts[g.prompt].len() - 1;
            for (t, (&lp, &h)) in g.logp.iter().zip(&g.entropy).enumerate() {
                assert!(
                    (lp - logp[start + t]).abs() < 1e-4,
                    "{name} seq {b} token {t}: logp {lp} vs rescored {}",
                    logp[start + t]
                );
                assert!(
                    (h - ent[start + t]).abs() < 1e-4,
                    "{name} seq {b} token {t}: entropy {h} vs rescored {}",
                    ent[start + t]
                );
            }
        }
    }
}

/// `generate` with greedy sampling gives transformers' continuations too (eos disabled).
#[test]
fn greedy_generate_matches_transformers() {
    use smelt_kernels::sample::SamplingConfig;
    use smelt_models::{generate, GenerateOptions};
    let model = load("qwen2-tiny", false);
    let greedy = json(fixture("qwen2-tiny").join("reference/greedy.json"));
    let cases = greedy["generations"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids_of(&c["prompt_ids"])).collect();
    let opts = GenerateOptions { max_new_tokens: 12, sampling: SamplingConfig::greedy(), ..Default::default() };
    let gens = generate(&model, &prompts, &opts).unwrap();
    for (g, c) in gens.iter().zip(cases) {
        assert_eq!(g.ids, ids_of(&c["new_ids"]));
    }
    // With the eos ids as stop ids, the sequence that hits <|im_end|> stops there.
    let stop = GenerateOptions { stop_ids: vec![394, 392], ..opts };
    let gens = generate(&model, &prompts, &stop).unwrap();
    for (g, c) in gens.iter().zip(cases) {
        assert_eq!(g.ids, ids_of(&c["new_ids_eos_enabled"]));
    }
}
