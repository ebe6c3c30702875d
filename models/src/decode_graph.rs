//! Decoding with CUDA graphs: one decode step, its logits and the sampling of the next token,
//! captured once per batch size and replayed with a single launch per step, instead of ~250
//! launches from the host (each a few microseconds of host work, more than the GPU needs for
//! most of them at decode batch sizes).
//!
//! A graph's launch shapes and addresses are fixed, so a step's inputs (token ids, slots,
//! positions, lengths, the sampling step) live in one device buffer per batch size, written
//! with one copy before each replay, and the kernels read them when they run
//! ([`Qwen::decode_step_device`], [`sample_into_device`]); the attention's split of the cache
//! is sized for the cache's capacity. Sequences leave the batch as they stop, so the batch size
//! changes: a step of n rows replays the graph of the next power of two (at most the number of
//! sequences), and the extra rows decode into slots of sequences that have stopped, past
//! their ends (positions nothing reads: a later decode of that slot overwrites them), and their
//! samples are discarded. So a generation captures at most log2(sequences) + 1 graphs.
//!
//! Each replay gives the same tokens, log-probs and entropies as the eager step: the same
//! kernels on the same values (a test holds it on the CUDA emulator).

use smelt_engine::cuda::Graph;
use smelt_engine::{DType, Device, Tensor};
use smelt_kernels::sample::{sample_into_device, SampleOutput, SamplingConfig};

use crate::generate::Sampled;
use crate::{Error, KvCache, Qwen, Result};

static REPLAYS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The captured decode steps of one generation, by batch size.
pub struct DecodeGraphs {
    sampling: SamplingConfig,
    seed: u64,
    buckets: Vec<Bucket>,
    /// The KV cache's buffers and the model's weights the graphs were captured with: their
    /// addresses are in the graphs, so every call must pass the same ones (and these clones
    /// keep them alive while the graphs are).
    bound: Option<(Vec<Tensor>, crate::Weights)>,
}

struct Bucket {
    rows: usize,
    /// u32 `[5·rows + 2]`: ids, slots, random streams, positions, lengths after the step, then
    /// the step (u64).
    inputs: Tensor,
    /// The samples, parts of one buffer, so a step downloads once.
    outputs: SampleOutput,
    graph: Graph,
}

impl DecodeGraphs {
    pub fn new(sampling: &SamplingConfig, seed: u64) -> DecodeGraphs {
        DecodeGraphs { sampling: *sampling, seed, buckets: Vec::new(), bound: None }
    }

    /// Drops every graph and the cache and model they were bound to: the next call captures
    /// anew, with any cache.
    pub fn forget(&mut self) {
        self.buckets.clear();
        self.bound = None;
    }

    /// Graphs captured so far (one per batch size used).
    pub fn captured(&self) -> usize {
        self.buckets.len()
    }

    /// Replays by every `DecodeGraphs` of the process so far (what tests and benchmarks check
    /// to know the graph path ran, since generation falls back to eager decoding).
    pub fn replays() -> u64 {
        REPLAYS.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Decodes `tokens[i]` into slot `slots[i]` (distinct slots with room for one more token),
    /// then samples each row's next token at `step` from random stream `streams[i]`, as
    /// [`Qwen::decode_slots`] followed by `sample_streams(…, step, Some(streams))` would. `spare`
    /// lists slots whose sequences have ended (any order), for the padding rows.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_sample(
        &mut self,
        model: &Qwen,
        cache: &mut KvCache,
        slots: &[u32],
        streams: &[u32],
        tokens: &[u32],
        spare: &[u32],
        step: u64,
    ) -> Result<Sampled> {
        let n = slots.len();
        let Device::Cuda(ord) = model.device() else {
            return Err(Error::Msg("decode graphs need a CUDA device".into()));
        };
        let dev = smelt_engine::cuda::device(ord)?;
        let every: Vec<u32> = slots.iter().chain(spare).copied().collect();
        if n == 0 || tokens.len() != n || streams.len() != n || !cache.distinct_slots(&every, |len| len < cache.max_len)
        {
            return Err(Error::Msg(format!(
                "decode graphs: {} tokens and {} streams for slots {slots:?} (spare {spare:?}) of a cache with \
                 lengths {:?}, max {}",
                tokens.len(),
                streams.len(),
                cache.lens,
                cache.max_len
            )));
        }
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= model.config.vocab_size) {
            return Err(Error::Msg(format!("token id {id} is outside the vocabulary")));
        }
        let buffers: Vec<&Tensor> = cache.buffers().collect();
        match &self.bound {
            None => self.bound = Some((buffers.into_iter().cloned().collect(), model.weights.clone())),
            Some((bufs, weights)) => {
                let same_cache =
                    bufs.len() == buffers.len() && bufs.iter().zip(&buffers).all(|(a, b)| a.same_storage(b));
                if !same_cache || !weights.embed_tokens.same_storage(&model.weights.embed_tokens) {
                    return Err(Error::Msg(
                        "decode graphs: called with another KV cache or model than they were captured with \
                         (their addresses are in the graphs): make a new DecodeGraphs"
                            .into(),
                    ));
                }
            }
        }
        let rows = n.next_power_of_two().min(n + spare.len());
        let pad = &spare[..rows - n];
        let all_slots: Vec<u32> = slots.iter().chain(pad).copied().collect();
        let mut host = Vec::with_capacity(5 * rows + 2);
        host.extend(tokens.iter().copied().chain(std::iter::repeat_n(0, rows - n)));
        host.extend(&all_slots);
        // The padding rows' streams are theirs to waste: their samples are dropped.
        host.extend(streams.iter().chain(pad));
        host.extend(all_slots.iter().map(|&s| cache.lens[s as usize]));
        host.extend(all_slots.iter().map(|&s| cache.lens[s as usize] + 1));
        host.extend([step as u32, (step >> 32) as u32]);
        let at = match self.buckets.iter().position(|b| b.rows == rows) {
            Some(i) => i,
            None => {
                self.buckets.push(self.capture(model, cache, &dev, rows)?);
                self.buckets.len() - 1
            }
        };
        let b = &self.buckets[at];
        b.inputs.copy_from(&Tensor::from_slice(&host, &[host.len()], Device::Cpu)?)?;
        b.graph.launch()?;
        REPLAYS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The padding rows' samples are dropped.
        let (tokens, logp, entropy) = b.outputs.to_host()?;
        let out = (tokens[..n].to_vec(), logp[..n].to_vec(), entropy[..n].to_vec());
        for &s in slots {
            cache.lens[s as usize] += 1;
        }
        Ok(out)
    }

    fn capture(
        &self,
        model: &Qwen,
        cache: &KvCache,
        dev: &std::sync::Arc<smelt_engine::cuda::CudaDevice>,
        rows: usize,
    ) -> Result<Bucket> {
        let device = model.device();
        let inputs = Tensor::zeros(&[5 * rows + 2], DType::U32, device)?;
        let outputs = SampleOutput::empty(rows, device)?;
        let part = |i: usize| inputs.narrow_rows(i * rows, rows);
        let (ids, slots, streams, positions, lens) = (part(0)?, part(1)?, part(2)?, part(3)?, part(4)?);
        let step = inputs.narrow_rows(5 * rows, 2)?;
        // Built on first use with an upload, which a capture cannot hold: built before.
        model.rope()?;
        // The body's own errors come back as its result (the half-captured graph is dropped).
        let (graph, body) = dev.capture(|| {
            Ok((|| {
                let hidden = model.decode_step_device([&ids, &slots, &positions, &lens], cache)?;
                let logits = model.logits(&hidden)?;
                sample_into_device(&logits, &self.sampling, self.seed, &step, &streams, &outputs)?;
                Ok::<_, Error>(())
            })())
        })?;
        body?;
        Ok(Bucket { rows, inputs, outputs, graph })
    }
}
