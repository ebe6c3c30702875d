//! Batched generation: prompts of different lengths share one KV cache (one slot per sample),
//! greedy or sampled, stopping on stop ids or at a token budget. A sequence that stops leaves
//! the decode batch (its slot is no longer computed or read); each sequence keeps its own
//! random stream (and its slot, unless pruning moves the survivors into a cache of their own),
//! so its tokens do not depend on when the others stop or are pruned. Every sampled token's
//! log-prob and the entropy of its distribution (both under the sampling temperature, over the
//! full vocabulary) are recorded, so rollouts carry `logp_old` and `entropy_old` at no cost.

use smelt_kernels::sample::{sample_streams, SamplingConfig};

use crate::{Error, KvCache, Qwen, Result};

/// Whether generation on CUDA decodes with CUDA graphs ([`crate::DecodeGraphs`]): off unless
/// `SMELT_CUDA_GRAPHS=1` or [`set_cuda_graphs`] (the trainer turns it on, `cuda_graphs` in its
/// config). Off by default here because a capture takes the device's stream as a whole, which a
/// multi-threaded program may not expect. GPU-verified (H200, 2026-11-28): 1.7–2.2× eager
/// decoding at the Qwen2.5-0.5B shape. Where a capture fails, generation warns once and decodes
/// eagerly.
pub fn cuda_graphs() -> bool {
    match GRAPHS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => std::env::var("SMELT_CUDA_GRAPHS").as_deref() == Ok("1"),
        v => v == 2,
    }
}

/// Switches [`cuda_graphs`] for the rest of the process (overrides `SMELT_CUDA_GRAPHS`).
pub fn set_cuda_graphs(on: bool) {
    GRAPHS.store(if on { 2 } else { 1 }, std::sync::atomic::Ordering::Relaxed);
}

/// 0: unset (the environment decides), 1: off, 2: on.
static GRAPHS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// One decoded and sampled step: per active row, the token, its log-prob and the entropy.
pub type Sampled = (Vec<u32>, Vec<f32>, Vec<f32>);

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
    let (gens, cache, _) = run(model, prompts, opts, room, None)?;
    Ok((gens, cache))
}

/// The sequences to finish, chosen by [`generate_pruned`]'s caller from the generations so far.
pub type Prune<'a> = &'a mut dyn FnMut(&[Generation]) -> Vec<usize>;

/// [`generate_with_cache`] with pruning: once the sequences have `at` new tokens (or, when
/// every one stops sooner, at the end), `keep` gets the generations so far and returns the
/// indices (ascending) of those to finish. The others end there (neither stopped nor decoded
/// further). The kept sequences then move into a cache of their own, with the room
/// [`generate_with_cache`] gives (kept sequence j in slot j of the returned cache; until the
/// pruning every slot had room for `at` new tokens only), and go on with their own random
/// streams, so each is exactly what it would have been without pruning. Returns the kept
/// indices too. Early rejection uses it: every sample's prefix costs one generation, the
/// survivors are not prefilled again, and the rejected samples never hold full-length slots.
pub fn generate_pruned(
    model: &Qwen,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    room: usize,
    at: usize,
    keep: Prune<'_>,
) -> Result<(Vec<Generation>, Option<KvCache>, Vec<usize>)> {
    if at == 0 {
        return Err(Error::Msg("generate_pruned: the pruning point `at` must be at least 1 token".into()));
    }
    run(model, prompts, opts, room, Some((at, keep)))
}

fn run(
    model: &Qwen,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    room: usize,
    mut prune: Option<(usize, Prune<'_>)>,
) -> Result<(Vec<Generation>, Option<KvCache>, Vec<usize>)> {
    opts.sampling.validate()?;
    if prompts.is_empty() || opts.n_samples == 0 {
        return Ok((Vec::new(), None, Vec::new()));
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
    let mut done = vec![false; out.len()];
    let mut kept: Option<Vec<usize>> = None;
    if budget == 0 {
        kept = ask(&out, &mut done, &mut prune)?;
        return Ok((out, None, kept.unwrap_or_default()));
    }
    let full = (longest + budget + room).min(max_pos);
    // Until the pruning, the slots need room for the prefixes only; the survivors then move
    // into a cache of their own with room for everything, so a rejected sample never holds a
    // full-length share of memory.
    let first = prune.as_ref().map_or(full, |(at, _)| (longest + at).min(full));
    let mut cache = model.new_kv_cache(seqs.len(), first)?;
    let mut hidden = model.prefill_samples(prompts, opts.n_samples, &mut cache)?;
    // Sequence i draws from random stream i and lives in cache slot `slot[i]` (i until the
    // pruning, then its place among the survivors). `active` lists the unfinished sequences,
    // which are the rows of `hidden`. Finished sequences leave the batch, so their slots are
    // neither computed nor read again.
    let mut slot: Vec<u32> = (0..seqs.len() as u32).collect();
    let mut active: Vec<u32> = (0..seqs.len() as u32).collect();
    let mut graphs = Graphs::new(model, opts);
    // A step's samples, when the graph path already drew them with its decode.
    let mut drawn: Option<Sampled> = None;
    for step in 0..budget {
        let (tokens, logp, ent) = match drawn.take() {
            Some(s) => s,
            None => {
                let logits = model.logits(&hidden)?;
                sample_streams(&logits, &opts.sampling, opts.seed, step as u64, Some(&active))?.to_host()?
            }
        };
        for (r, &i) in active.iter().enumerate() {
            let g = &mut out[i as usize];
            g.ids.push(tokens[r]);
            g.logp.push(logp[r]);
            g.entropy.push(ent[r]);
            g.stopped = opts.stop_ids.contains(&tokens[r]);
            done[i as usize] = g.stopped;
        }
        if prune.as_ref().is_some_and(|(at, _)| step + 1 == *at) {
            kept = ask(&out, &mut done, &mut prune)?;
            if let Some(k) = &kept {
                // The graphs hold the old cache's addresses: they start again.
                graphs.forget();
                cache = move_survivors(&cache, k, full, &mut slot)?;
            }
        }
        let (going, next): (Vec<u32>, Vec<u32>) =
            active.iter().zip(&tokens).filter(|&(&i, _)| !done[i as usize]).map(|(&i, &t)| (i, t)).unzip();
        if step + 1 == budget || going.is_empty() {
            break;
        }
        let slots: Vec<u32> = going.iter().map(|&i| slot[i as usize]).collect();
        // Slots of finished sequences, for the graph path's padding rows.
        let spare = || (0..done.len()).filter(|&i| done[i] && slot[i] != u32::MAX).map(|i| slot[i]).collect();
        // The first decode step runs eagerly, so every kernel is loaded before a capture.
        match graphs.decode_sample(step > 0, model, &mut cache, &slots, &going, &next, spare, step as u64 + 1) {
            Some(s) => drawn = Some(s),
            None => hidden = model.decode_slots(&slots, &next, &mut cache)?,
        }
        active = going;
    }
    // Every sequence stopped, or the budget ran out, before the pruning point: it is now.
    if let Some(k) = ask(&out, &mut done, &mut prune)? {
        cache = move_survivors(&cache, &k, full, &mut slot)?;
        kept = Some(k);
    }
    Ok((out, Some(cache), kept.unwrap_or_default()))
}

/// A cache of the kept sequences `k` alone (kept sequence j in slot j), each with room for
/// `max_len` positions; `slot` then maps each sequence to its new slot (`u32::MAX`: none).
fn move_survivors(cache: &KvCache, k: &[usize], max_len: usize, slot: &mut [u32]) -> Result<KvCache> {
    let from: Vec<u32> = k.iter().map(|&i| slot[i]).collect();
    let moved = cache.gather(&from, max_len)?;
    slot.iter_mut().for_each(|s| *s = u32::MAX);
    k.iter().enumerate().for_each(|(j, &i)| slot[i] = j as u32);
    Ok(moved)
}

/// Asks the pruner (once: it is taken) which sequences to finish, checks its answer and marks
/// the others done. `None` when there is no pruner (left).
fn ask(out: &[Generation], done: &mut [bool], prune: &mut Option<(usize, Prune<'_>)>) -> Result<Option<Vec<usize>>> {
    let Some((_, keep)) = prune.take() else { return Ok(None) };
    let k = keep(out);
    if k.windows(2).any(|w| w[0] >= w[1]) || k.last().is_some_and(|&i| i >= out.len()) {
        return Err(Error::Msg(format!(
            "generate_pruned: the kept indices {k:?} must be ascending and below {}",
            out.len()
        )));
    }
    let mut keep_it = vec![false; out.len()];
    k.iter().for_each(|&i| keep_it[i] = true);
    done.iter_mut().zip(&keep_it).for_each(|(d, &k)| *d |= !k);
    Ok(Some(k))
}

/// The graph path of [`generate_with_cache`], when [`cuda_graphs`] is on and the model is on a
/// CUDA device (and nothing is being profiled: a capture cannot hold the profiler's events).
struct Graphs {
    #[cfg(feature = "cuda")]
    inner: Option<crate::DecodeGraphs>,
}

impl Graphs {
    #[allow(unused_variables)]
    fn new(model: &Qwen, opts: &GenerateOptions) -> Graphs {
        #[cfg(feature = "cuda")]
        {
            let on = cuda_graphs() && model.device().is_cuda() && !smelt_engine::cuda::profile::enabled();
            Graphs { inner: on.then(|| crate::DecodeGraphs::new(&opts.sampling, opts.seed)) }
        }
        #[cfg(not(feature = "cuda"))]
        Graphs {}
    }

    /// Drops the captured graphs (they hold a cache's addresses): later steps capture anew,
    /// unless graphs are off.
    fn forget(&mut self) {
        #[cfg(feature = "cuda")]
        if let Some(g) = &mut self.inner {
            g.forget();
        }
    }

    /// One decode step and the next step's samples through a graph, or `None` for the eager
    /// path (graphs off, not `ready`, or a failed capture, after which they stay off). Row i
    /// decodes into slot `slots[i]` and samples from stream `streams[i]`; `spare` gives the
    /// slots of finished sequences, for the padding rows.
    #[allow(clippy::too_many_arguments, unused_variables)]
    fn decode_sample(
        &mut self,
        ready: bool,
        model: &Qwen,
        cache: &mut KvCache,
        slots: &[u32],
        streams: &[u32],
        tokens: &[u32],
        spare: impl FnOnce() -> Vec<u32>,
        step: u64,
    ) -> Option<Sampled> {
        #[cfg(feature = "cuda")]
        if let Some(g) = self.inner.as_mut().filter(|_| ready) {
            match g.decode_sample(model, cache, slots, streams, tokens, &spare(), step) {
                Ok(s) => return Some(s),
                Err(e) => {
                    tracing::warn!("CUDA graph decoding failed, decoding eagerly from here on: {e}");
                    self.inner = None;
                }
            }
        }
        None
    }
}
