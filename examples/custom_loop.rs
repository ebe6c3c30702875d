//! A custom RL loop on smelt as a library: sample completions with the KV-cache generator,
//! score them with your own reward, turn rewards into group-relative advantages, and take a
//! GRPO-family policy step — the pieces `smelt train` is built from.
//!
//! ```sh
//! cargo run --release --example custom_loop -- tests/fixtures/qwen2-tiny
//! ```
//!
//! The toy reward is the fraction of completion tokens from the lower half of the vocabulary
//! (something a tiny random model can learn in a few steps); put your verifier there.

use anyhow::{Context, Result};
use smelt::engine::{DType, Device};
use smelt::kernels::adamw::AdamW;
use smelt::kernels::sample::SamplingConfig;
use smelt::models::{generate, Checkpoint, GenerateOptions, LoadOptions, Packed, Qwen};
use smelt::trainer::step::{PolicyStep, StepBatch, StepConfig};

fn reward(completion: &[u32], vocab: usize) -> f32 {
    completion.iter().filter(|&&t| (t as usize) < vocab / 2).count() as f32 / completion.len().max(1) as f32
}

fn main() -> Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "tests/fixtures/qwen2-tiny".into());
    let ckpt = Checkpoint::open(&dir).with_context(|| format!("open {dir}"))?;
    let weights = ckpt.load_weights(&LoadOptions { dtype: DType::F32, device: Device::Cpu, check_finite: true })?;
    let model = Qwen::new(ckpt.config.clone(), weights);
    let tok = ckpt.tokenizer()?;
    let prompts: Vec<Vec<u32>> =
        ["What is 2 + 3?", "Name a prime number."].iter().map(|p| tok.encode(p, false)).collect::<Result<_, _>>()?;

    let temperature = 1.0;
    let group = 8;
    let gen_opts = GenerateOptions {
        max_new_tokens: 16,
        sampling: SamplingConfig { temperature, top_k: None, top_p: 1.0 },
        n_samples: group,
        seed: 0,
        stop_ids: ckpt.stop_token_ids()?,
    };
    let optim = AdamW { lr: 3e-3, ..AdamW::default() };
    let mut step = PolicyStep::new(&model, StepConfig { temperature, optim, ..StepConfig::default() })?;

    for it in 0..8 {
        let gens = generate(&model, &prompts, &GenerateOptions { seed: it, ..gen_opts.clone() })?;
        let rewards: Vec<f32> = gens.iter().map(|g| reward(&g.ids, model.config.vocab_size)).collect();

        // Group-relative advantages: each prompt's completions against their own mean and std.
        let mut advantages = vec![0f32; gens.len()];
        for (p, chunk) in rewards.chunks(group).enumerate() {
            let mean = chunk.iter().sum::<f32>() / group as f32;
            let std = (chunk.iter().map(|r| (r - mean).powi(2)).sum::<f32>() / group as f32).sqrt();
            for (j, r) in chunk.iter().enumerate() {
                advantages[p * group + j] = (r - mean) / (std + 1e-4);
            }
        }

        // Pack prompt + completion; per-token entry t is about predicting token t+1, so the
        // completion's tokens are entries prompt_len − 1 ..; their logp_old comes from sampling.
        let seqs: Vec<Vec<u32>> = gens.iter().map(|g| [prompts[g.prompt].clone(), g.ids.clone()].concat()).collect();
        let packed = Packed::new(&seqs);
        let (mut adv, mut mask, mut old) = (vec![], vec![], vec![]);
        for (g, a) in gens.iter().zip(&advantages) {
            let (p, c) = (prompts[g.prompt].len(), g.ids.len());
            for t in 0..p + c {
                let in_completion = t + 1 >= p && t + 1 < p + c;
                adv.push(*a);
                mask.push(if in_completion { 1.0 } else { 0.0 });
                old.push(if in_completion { g.logp[t + 1 - p] } else { 0.0 });
            }
        }
        let batch = StepBatch { packed, advantages: adv, mask, logp_old: Some(old), logp_ref: None, supervised: false };
        let s = step.step(&model, &batch)?;
        let mean_r = rewards.iter().sum::<f32>() / rewards.len() as f32;
        println!(
            "iter {it}: mean reward {mean_r:+.3}, loss {:+.4}, |g| {:.3}, mean entropy {:.3}, ratio {:.4}",
            s.loss, s.grad_norm, s.mean_entropy, s.grpo.mean_ratio
        );
    }
    Ok(())
}
