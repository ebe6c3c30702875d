//! Batched generation: prompts of different lengths share one KV cache (one slot per sample),
//! greedy or sampled, stopping on stop ids or at a token budget. A sequence that stops leaves
//! the decode batch (its slot is no longer computed or read); each sequence keeps its own slot
//! and random stream, so its tokens do not depend on when the others stop. Every sampled token's
//! log-prob and the entropy of its distribution (both under the sampling temperature, over the
//! full vocabulary) are recorded, so rollouts carry `logp_old` and `entropy_old` at no cost.

use smelt_kernels::sample::{sample_streams, SamplingConfig};

use crate::{Error, KvCache, Qwen, Result};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Completions per prompt.
    pub n_samples: usize,
    pub seed: u64,
    /// Generation of a sequence ends after it emits one of these (the stop token is kept).
    pub stop_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 256,
            sampling: SamplingConfig::default(),
            n_samples: 1,
            seed: 0,
            stop_ids: Vec::new(),
        }
    }
}

/// One completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Index of its prompt, and of the sample among that prompt's completions.
    pub prompt: usize,
    pub sample: usize,
    /// New token ids (the stop token included when it ended the sequence).
    pub ids: Vec<u32>,
    /// `log softmax(z/T)[token]` for each new token (T = 1 under greedy decoding).
    pub logp: Vec<f32>,
    /// Entropy of softmax(z/T) at each new token.
    pub entropy: Vec<f32>,
    /// True when it ended on a stop id, false when it ran out of budget.
    pub stopped: bool,
}

/// Generates `opts.n_samples` completions for each prompt. Results are ordered prompt-major.
pub fn generate(model: &Qwen, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<Vec<Generation>> {
    Ok(generate_with_cache(model, prompts, opts, 0)?.0)
}

/// [`generate`], also returning the KV cache it decoded with, for teacher-forcing tokens after
/// a completion's prefix without recomputing it ([`Qwen::decode_slots`]). Completion i (in
/// the returned order) is slot i, and the slot holds its prompt and every new token but the
/// last (`prompt.len() + ids.len() − 1` positions): the last token was sampled, never decoded.
/// Each slot has room for `room` positions past the longest prompt plus the token budget
/// (clamped to `max_position_embeddings`), for the tokens to be forced later. `None` when
/// nothing was generated.
pub fn generate_with_cache(
    model: &Qwen,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    room: usize,
) -> Result<(Vec<Generation>, Option<KvCache>)> {
    opts.sampling.validate()?;
    if prompts.is_empty() || opts.n_samples == 0 {
        return Ok((Vec::new(), None));
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::Msg(format!("generate: prompt {i} is empty")));
    }
    let max_pos = model.config.max_position_embeddings;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest >= max_pos {
        return Err(Error::Msg(format!(
            "generate: a prompt of {longest} tokens leaves no room under max_position_embeddings = {max_pos}"
        )));
    }
    let budget = opts.max_new_tokens.min(max_pos - longest);
    let seqs: Vec<(usize, usize)> = (0..prompts.len()).flat_map(|p| (0..opts.n_samples).map(move |s| (p, s))).collect();
    let mut out: Vec<Generation> = seqs
        .iter()
        .map(|&(prompt, sample)| Generation {
            prompt,
            sample,
            ids: vec![],
            logp: vec![],
            entropy: vec![],
            stopped: false,
        })
        .collect();
    if budget == 0 {
        return Ok((out, None));
    }
    let mut cache = model.new_kv_cache(seqs.len(), (longest + budget + room).min(max_pos))?;
    let mut hidden = model.prefill_samples(prompts, opts.n_samples, &mut cache)?;
    // Sequence i lives in cache slot i and draws from random stream i; `active` lists the
    // unfinished ones, which are the rows of `hidden`. Finished sequences leave the batch, so
    // their slots are neither computed nor read again.
    let mut active: Vec<u32> = (0..seqs.len() as u32).collect();
    for step in 0..budget {
        let logits = model.logits(&hidden)?;
        let s = sample_streams(&logits, &opts.sampling, opts.seed, step as u64, Some(&active))?;
        let (tokens, logp, ent) = (s.tokens.to_vec::<u32>()?, s.logp.to_vec::<f32>()?, s.entropy.to_vec::<f32>()?);
        for (r, &i) in active.iter().enumerate() {
            let g = &mut out[i as usize];
            g.ids.push(tokens[r]);
            g.logp.push(logp[r]);
            g.entropy.push(ent[r]);
            g.stopped = opts.stop_ids.contains(&tokens[r]);
        }
        let (slots, next): (Vec<u32>, Vec<u32>) =
            active.iter().zip(&tokens).filter(|&(&i, _)| !out[i as usize].stopped).map(|(&i, &t)| (i, t)).unzip();
        if step + 1 == budget || slots.is_empty() {
            break;
        }
        hidden = model.decode_slots(&slots, &next, &mut cache)?;
        active = slots;
    }
    Ok((out, Some(cache)))
}
