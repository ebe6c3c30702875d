//! One GRPO-family policy update on a packed batch, as a reusable library piece:
//!
//! ```text
//! forward → fused head (logp, entropy) → grpo_loss (loss, g_logp) → backward
//!         → global grad norm → clip factor → AdamW over every parameter
//! ```
//!
//! `smelt bench step` times exactly this, and the trainer calls it per micro-batch.
//!
//! Per-token arrays follow the head's convention: entry t of `advantages`, `mask` and
//! `logp_old` is about predicting token t+1 from tokens 0..=t of the same sequence. The last
//! token of every sequence has no target and is always masked out.
//!
//! Optimizer state: fp32 master weights, AdamW moments `m`, `v` and fp32 gradients, each a
//! [`Weights`] mirroring the model. When the model computes in f32 (the CPU path) its own
//! tensors are the master weights and are updated in place; when it computes in bf16 (CUDA)
//! a separate f32 master copy is kept and AdamW writes the rounded bf16 weights into the
//! model's tensors in the same pass. Norm weights and biases get no weight decay.
//!
//! Clipping costs no extra pass over the gradients: the clip factor is folded into AdamW's
//! `grad_scale`. A non-finite gradient norm skips the update (the step reports it).

use std::path::Path;
use std::time::Instant;

use smelt_engine::{DType, Device, Tensor};
use smelt_kernels::adamw::{AdamW, AdamwGroup, AdamwTensor};
use smelt_kernels::global_norm::{clip_scale, global_norm};
use smelt_kernels::grpo_loss::{aggregation_weights, grpo_loss, GrpoLossConfig, GrpoLossInputs, GrpoStats, LossType};
use smelt_kernels::logprob_entropy::IGNORE;
use smelt_models::{Config, Error, Packed, Qwen, Result, Weights};

/// Hyperparameters of one policy update.
#[derive(Clone, Debug)]
pub struct StepConfig {
    pub loss: GrpoLossConfig,
    pub loss_type: LossType,
    /// Only for `LossType::DrGrpo` (its constant denominator).
    pub max_completion_length: usize,
    /// Logits are divided by this in the head (the sampling temperature).
    pub temperature: f32,
    pub optim: AdamW,
    /// Clip the global gradient norm to this; `None` = no clipping.
    pub max_grad_norm: Option<f32>,
    /// Synchronize the device after each phase so [`StepStats::phases`] are exact (costs a
    /// little on CUDA; free on CPU, where every op is synchronous anyway).
    pub sync_phases: bool,
}

impl Default for StepConfig {
    fn default() -> Self {
        StepConfig {
            loss: GrpoLossConfig::default(),
            loss_type: LossType::Dapo,
            max_completion_length: 0,
            temperature: 1.0,
            optim: AdamW { lr: 1e-6, ..AdamW::default() },
            max_grad_norm: Some(1.0),
            sync_phases: false,
        }
    }
}

/// A packed batch with its per-token RL inputs (all of length `packed.num_tokens()`).
#[derive(Clone, Debug)]
pub struct StepBatch {
    pub packed: Packed,
    /// Per-token advantage (each sequence's advantage broadcast to its tokens).
    pub advantages: Vec<f32>,
    /// 1 for loss tokens (completion), 0 for prompt tokens.
    pub mask: Vec<f32>,
    /// Log-probs under the sampling policy; `None` = on-policy (ℓ_old = ℓ, the first of
    /// `num_iterations` passes), which makes every ratio 1.
    pub logp_old: Option<Vec<f32>>,
    /// Log-probs under the frozen reference model; required when β > 0 (unless supervised).
    pub logp_ref: Option<Vec<f32>>,
    /// A supervised batch (demonstrations, not samples of the policy): with `logp_old: None`
    /// and advantage a, its gradient is exactly a × the NLL's. No KL penalty or entropy bonus
    /// applies to it (both are about the policy's own samples), and it stays out of the
    /// ratio / clipping / KL statistics.
    pub supervised: bool,
}

/// Wall time of each phase of a step, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhaseTimes {
    pub forward: f64,
    pub head: f64,
    pub loss: f64,
    pub backward: f64,
    /// Zeroing the gradients, the global norm and AdamW.
    pub optimizer: f64,
}

impl PhaseTimes {
    pub fn total(&self) -> f64 {
        self.forward + self.head + self.loss + self.backward + self.optimizer
    }
    /// `(name, seconds)` pairs in step order.
    pub fn named(&self) -> [(&'static str, f64); 5] {
        [
            ("forward", self.forward),
            ("head", self.head),
            ("loss", self.loss),
            ("backward", self.backward),
            ("optimizer", self.optimizer),
        ]
    }
}

/// What one step reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepStats {
    /// The aggregated loss.
    pub loss: f32,
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f32,
    /// The clip factor applied (1 when not clipped).
    pub clip_scale: f32,
    /// False when the update was skipped: a NaN/inf gradient norm, or no loss tokens.
    pub applied: bool,
    /// Mean entropy over loss tokens (under the head's temperature).
    pub mean_entropy: f32,
    /// Mean log-prob of the loss tokens before the update (−NLL for supervised batches).
    pub mean_logp: f32,
    pub grpo: GrpoStats,
    pub phases: PhaseTimes,
}

/// Optimizer state for one model, and the step that updates it.
pub struct PolicyStep {
    pub config: StepConfig,
    /// f32 gradients, zeroed at the start of every step: views into `grads_flat`.
    pub grads: Weights,
    /// The one buffer behind `grads` (zeroed, and its norm taken, in one launch each).
    grads_flat: Tensor,
    /// f32 master weights when the model's own are not f32; `None` = the model's tensors.
    master: Option<Weights>,
    m: Weights,
    v: Weights,
    /// AdamW over every parameter (one launch on CUDA), for the model's tensors it was built
    /// with; rebuilt when a step gets a model with other tensors.
    optim: AdamwGroup,
    /// AdamW steps taken (1-based inside the update).
    pub step: u64,
}

/// Norm weights and biases are not decayed (as HF Trainer and TRL do).
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.ends_with("norm.weight"))
}

impl PolicyStep {
    /// Allocates gradients, moments and (for non-f32 models) f32 master weights on the model's
    /// device.
    pub fn new(model: &Qwen, config: StepConfig) -> Result<PolicyStep> {
        config.loss.validate()?;
        let dev = model.device();
        let (grads, grads_flat) = Weights::zeros_flat(&model.config, DType::F32, dev)?;
        let m = Weights::zeros(&model.config, DType::F32, dev)?;
        let v = Weights::zeros(&model.config, DType::F32, dev)?;
        let master = if model.weights.embed_tokens.dtype() == DType::F32 {
            None
        } else {
            Some(model.weights.try_map(|_, t| Ok(smelt_kernels::cast::cast(t, DType::F32)?))?)
        };
        let optim = adamw_group(model, master.as_ref(), &grads, &m, &v)?;
        Ok(PolicyStep { config, grads, grads_flat, master, m, v, optim, step: 0 })
    }

    /// Bytes of optimizer state this holds (gradients, moments, master copy).
    pub fn state_bytes(&self) -> usize {
        let b = |w: &Weights| w.named_tensors().iter().map(|(_, t)| t.size_in_bytes()).sum::<usize>();
        self.grads_flat.size_in_bytes() + b(&self.m) + b(&self.v) + self.master.as_ref().map_or(0, b)
    }

    /// Writes the AdamW moments (and the f32 master weights when kept) to `path` as
    /// safetensors (`m.<name>`, `v.<name>`, `master.<name>`), atomically.
    pub fn save_state(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, &Tensor)> = Vec::new();
        for (prefix, w) in [("m", Some(&self.m)), ("v", Some(&self.v)), ("master", self.master.as_ref())] {
            if let Some(w) = w {
                named.extend(w.named_tensors().into_iter().map(|(n, t)| (format!("{prefix}.{n}"), t)));
            }
        }
        smelt_models::save_safetensors(path, &named)
    }

    /// Restores what [`PolicyStep::save_state`] wrote (into the existing tensors, on their
    /// device) and the AdamW step count. Every tensor must be present with its shape.
    pub fn load_state(&mut self, path: &Path, step: u64) -> Result<()> {
        let file = smelt_models::safetensors::SafetensorsFile::open(path)?;
        for (prefix, w) in [("m", Some(&self.m)), ("v", Some(&self.v)), ("master", self.master.as_ref())] {
            let Some(w) = w else { continue };
            for (n, t) in w.named_tensors() {
                let key = format!("{prefix}.{n}");
                let src = file.load(&key, Some(DType::F32), true).map_err(|e| match file.get(&key) {
                    None => Error::Msg(format!("{}: optimizer state lacks tensor {key}", path.display())),
                    Some(_) => e,
                })?;
                if src.shape() != t.shape() {
                    return Err(Error::Msg(format!(
                        "{}: {key} has shape {:?}, the model needs {:?}",
                        path.display(),
                        src.shape(),
                        t.shape()
                    )));
                }
                t.copy_from(&src.to_device(t.device())?)?;
            }
        }
        self.step = step;
        Ok(())
    }

    /// Forgets the AdamW moments and step count (e.g. between a supervised warm-up and RL,
    /// whose gradient scales differ). The master weights are kept.
    pub fn reset_optimizer(&mut self) -> Result<()> {
        for (_, t) in self.m.named_tensors().into_iter().chain(self.v.named_tensors()) {
            zero_(t)?;
        }
        self.step = 0;
        Ok(())
    }

    /// One policy update of `model` on `batch`.
    pub fn step(&mut self, model: &Qwen, batch: &StepBatch) -> Result<StepStats> {
        self.step_accumulated(model, std::slice::from_ref(batch))
    }

    /// One policy update from several micro-batches: each is forwarded and backpropagated in
    /// turn (only one micro-batch's activations are alive at a time), their gradients add up,
    /// and AdamW runs once. The aggregation weights are those of the whole batch, so the
    /// update equals [`PolicyStep::step`] on the concatenated batch (up to float rounding).
    pub fn step_accumulated(&mut self, model: &Qwen, micro: &[StepBatch]) -> Result<StepStats> {
        if micro.is_empty() {
            return Err(Error::Msg("policy step: no micro-batches".into()));
        }
        let cfg = self.config.clone();
        let masks = micro.iter().map(loss_mask).collect::<Result<Vec<_>>>()?;
        let total_seqs: usize = micro.iter().map(|b| b.packed.num_seqs()).sum();
        let total_mask: f64 = masks.iter().flat_map(|m| m.iter()).map(|&m| m as f64).sum();
        let dev = model.device();
        let sync = |t: &mut f64, start: Instant| -> Result<()> {
            if cfg.sync_phases {
                synchronize(dev)?;
            }
            *t += start.elapsed().as_secs_f64();
            Ok(())
        };
        let mut ph = PhaseTimes::default();
        let t0 = Instant::now();
        zero_(&self.grads_flat)?;
        sync(&mut ph.optimizer, t0)?;

        let (mut loss, mut ent_sum, mut logp_sum) = (0f64, 0f64, 0f64);
        let mut stats = GrpoStats::default();
        for (batch, mask) in micro.iter().zip(&masks) {
            // The head, the loss and their gradients cover the loss tokens only (the rows of
            // the others get no gradient): prompts and each sequence's last token skip the
            // vocabulary projection, most of a small model's step. A micro-batch without loss
            // tokens adds nothing.
            let rows: Vec<u32> = (0..mask.len() as u32).filter(|&i| mask[i as usize] != 0.0).collect();
            if rows.is_empty() {
                continue;
            }
            let pick = |v: &[f32]| -> Vec<f32> { rows.iter().map(|&r| v[r as usize]).collect() };
            let t0 = Instant::now();
            let acts = model.forward(&batch.packed)?;
            sync(&mut ph.forward, t0)?;

            let t0 = Instant::now();
            let targets = batch.packed.next_token_targets();
            let targets: Vec<u32> = rows.iter().map(|&r| targets[r as usize]).collect();
            let head = model.head_at(&acts.hidden, &rows, &targets, cfg.temperature)?;
            sync(&mut ph.head, t0)?;

            let t0 = Instant::now();
            let n = rows.len();
            let cu: Vec<usize> = batch.packed.cu_seqlens.iter().map(|&c| c as usize).collect();
            let mut w = aggregation_weights(&cu, mask, cfg.loss_type, cfg.max_completion_length)?;
            // Rescale this micro-batch's weights to the whole batch's denominator.
            let share = match cfg.loss_type {
                LossType::Dapo => n as f64 / total_mask.max(1.0),
                LossType::Grpo | LossType::DrGrpo => batch.packed.num_seqs() as f64 / total_seqs.max(1) as f64,
            } as f32;
            w.iter_mut().for_each(|x| *x *= share);
            let vec = |v: &[f32]| Tensor::from_slice(&pick(v), &[n], dev);
            let (adv, mask_t, w_t) = (vec(&batch.advantages)?, Tensor::full(1.0, &[n], DType::F32, dev)?, vec(&w)?);
            let old = batch.logp_old.as_deref().map(vec).transpose()?;
            let reference = batch.logp_ref.as_deref().map(vec).transpose()?;
            let inputs = GrpoLossInputs {
                logp: &head.logp,
                logp_old: old.as_ref().unwrap_or(&head.logp),
                logp_ref: reference.as_ref(),
                advantages: &adv,
                mask: &mask_t,
                weights: &w_t,
                entropy: Some(&head.entropy),
            };
            let supervised_loss = GrpoLossConfig { beta: 0.0, entropy_coef: 0.0, ..cfg.loss };
            let out = grpo_loss(&inputs, if batch.supervised { &supervised_loss } else { &cfg.loss })?;
            sync(&mut ph.loss, t0)?;

            let t0 = Instant::now();
            model.backward(&acts, &head, cfg.temperature, &out.g_logp, &out.g_entropy, &self.grads)?;
            drop(acts);
            sync(&mut ph.backward, t0)?;

            loss += out.loss as f64;
            // Every row of the head's outputs is a loss token.
            ent_sum += head.entropy.to_vec::<f32>()?.iter().map(|&e| e as f64).sum::<f64>();
            logp_sum += head.logp.to_vec::<f32>()?.iter().map(|&l| l as f64).sum::<f64>();
            if batch.supervised {
                continue;
            }
            // The kernel's statistics are means over this micro-batch's loss tokens.
            let k = out.stats.num_tokens;
            stats.clip_frac_low += out.stats.clip_frac_low * k;
            stats.clip_frac_high += out.stats.clip_frac_high * k;
            stats.clip_frac_dual += out.stats.clip_frac_dual * k;
            stats.mean_ratio += out.stats.mean_ratio * k;
            stats.mean_kl += out.stats.mean_kl * k;
            stats.num_tokens += k;
        }
        let k = stats.num_tokens.max(1.0);
        for s in [
            &mut stats.clip_frac_low,
            &mut stats.clip_frac_high,
            &mut stats.clip_frac_dual,
            &mut stats.mean_ratio,
            &mut stats.mean_kl,
        ] {
            *s /= k;
        }

        let t0 = Instant::now();
        let norm = global_norm(&[&self.grads_flat])?;
        let scale = cfg.max_grad_norm.map_or(1.0, |max| clip_scale(norm, max));
        // Nothing to learn from (every token masked): no AdamW step, so momentum and weight
        // decay do not move the weights either.
        let applied = norm.is_finite() && total_mask > 0.0;
        if applied {
            self.step += 1;
            if !updates(&self.optim, model) {
                self.optim = adamw_group(model, self.master.as_ref(), &self.grads, &self.m, &self.v)?;
            }
            self.optim.step(self.step, &cfg.optim, scale)?;
        }
        sync(&mut ph.optimizer, t0)?;

        Ok(StepStats {
            loss: loss as f32,
            grad_norm: norm,
            clip_scale: scale,
            applied,
            mean_entropy: (ent_sum / total_mask.max(1.0)) as f32,
            mean_logp: (logp_sum / total_mask.max(1.0)) as f32,
            grpo: stats,
            phases: ph,
        })
    }
}

/// AdamW's state for every parameter of `model`: the master weights (or, without them, the
/// model's own f32 tensors) updated in place, writing the model's bf16 tensors when there are
/// masters. Norm weights and biases are not decayed.
fn adamw_group(
    model: &Qwen,
    master: Option<&Weights>,
    grads: &Weights,
    m: &Weights,
    v: &Weights,
) -> Result<AdamwGroup> {
    let params = model.weights.named_tensors();
    let masters = master.map(|w| w.named_tensors());
    let (gs, ms, vs) = (grads.named_tensors(), m.named_tensors(), v.named_tensors());
    let mut tensors = Vec::with_capacity(params.len());
    for (i, (name, p)) in params.iter().enumerate() {
        let (param, bf16_out) = match &masters {
            Some(ms) => (ms[i].1.clone(), Some((*p).clone())),
            None => ((*p).clone(), None),
        };
        tensors.push(AdamwTensor {
            param,
            grad: gs[i].1.clone(),
            m: ms[i].1.clone(),
            v: vs[i].1.clone(),
            bf16_out,
            decay: decays(name),
        });
    }
    Ok(AdamwGroup::new(tensors)?)
}

/// Whether `group` writes `model`'s own parameter tensors (a group built for this model).
fn updates(group: &AdamwGroup, model: &Qwen) -> bool {
    let params = model.weights.named_tensors();
    let ours = group.tensors();
    let same = |t: &AdamwTensor, p: &Tensor| {
        let t = t.bf16_out.as_ref().unwrap_or(&t.param);
        t.same_storage(p) && t.shape() == p.shape()
    };
    ours.len() == params.len() && ours.iter().zip(&params).all(|(t, (_, p))| same(t, p))
}

/// Checks a micro-batch's per-token arrays and returns its loss mask: 1 where the caller's
/// mask is set and the token has a next-token target (never the last token of a sequence).
fn loss_mask(batch: &StepBatch) -> Result<Vec<f32>> {
    let n = batch.packed.num_tokens();
    for (name, len) in [("advantages", batch.advantages.len()), ("mask", batch.mask.len())]
        .into_iter()
        .chain(batch.logp_old.as_ref().map(|v| ("logp_old", v.len())))
        .chain(batch.logp_ref.as_ref().map(|v| ("logp_ref", v.len())))
    {
        if len != n {
            return Err(Error::Msg(format!("policy step: {name} has {len} entries for a batch of {n} tokens")));
        }
    }
    let targets = batch.packed.next_token_targets();
    Ok(batch.mask.iter().zip(&targets).map(|(&m, &t)| if t == IGNORE || m == 0.0 { 0.0 } else { 1.0 }).collect())
}

/// Sets every element of a float tensor to 0.
pub fn zero_(t: &Tensor) -> Result<()> {
    match t.device() {
        Device::Cpu => match t.dtype() {
            DType::F32 => t.cpu_write::<f32>()?.fill(0.0),
            _ => t.copy_from(&Tensor::zeros(t.shape(), t.dtype(), Device::Cpu)?)?,
        },
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => smelt_engine::cuda::device(i)?.memset_zero(t.cuda_ptr()?, t.size_in_bytes())?,
        #[cfg(not(feature = "cuda"))]
        d => return Err(smelt_engine::Error::UnsupportedDevice { op: "zero_", device: d }.into()),
    }
    Ok(())
}

/// Waits for all queued work on `device` (a no-op on CPU).
pub fn synchronize(device: Device) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => Ok(smelt_engine::cuda::device(i)?.synchronize()?),
        #[cfg(not(feature = "cuda"))]
        d => Err(smelt_engine::Error::UnsupportedDevice { op: "synchronize", device: d }.into()),
    }
}

/// Matmul FLOPs of one training step (forward + backward = 3× forward) on a packed batch:
/// 6·P·tokens over every matmul parameter (layers and lm_head; the embedding lookup is not a
/// matmul) plus causal attention, 3 × 4·heads·head_dim·Σ_b s_b(s_b+1)/2.
pub fn train_step_flops(config: &Config, seq_lens: &[usize]) -> f64 {
    let tokens: usize = seq_lens.iter().sum();
    let (h, i) = (config.hidden_size as f64, config.intermediate_size as f64);
    let (q, kv) = (config.q_dim() as f64, config.kv_dim() as f64);
    let per_layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * i;
    let matmul_params = per_layer * config.num_hidden_layers as f64 + config.vocab_size as f64 * h;
    let pairs: f64 = seq_lens.iter().map(|&s| s as f64 * (s as f64 + 1.0) / 2.0).sum();
    let attn_fwd = 4.0 * config.num_attention_heads as f64 * config.head_dim as f64 * pairs;
    6.0 * matmul_params * tokens as f64 + 3.0 * attn_fwd * config.num_hidden_layers as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_engine::Rng;
    use smelt_kernels::adamw::adamw_step;
    use smelt_models::testing::qwen2_5_0_5b_config;

    fn tiny() -> Config {
        Config {
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            vocab_size: 97,
            max_position_embeddings: 128,
            ..qwen2_5_0_5b_config()
        }
    }

    fn model(config: &Config, seed: u64) -> Qwen {
        let mut rng = Rng::new(seed);
        let named = config
            .expected_tensors()
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let vals: Vec<f32> = if name.ends_with("norm.weight") {
                    (0..n).map(|_| 1.0 + 0.1 * rng.normal() as f32).collect()
                } else {
                    rng.normal_vec(n, 0.2)
                };
                (name, Tensor::from_slice(&vals, &shape, Device::Cpu).unwrap())
            })
            .collect();
        Qwen::new(config.clone(), Weights::from_named(config, named).unwrap())
    }

    fn batch(config: &Config, rng: &mut Rng) -> StepBatch {
        let seqs: Vec<Vec<u32>> = [7usize, 12, 5]
            .iter()
            .map(|&l| (0..l).map(|_| rng.below(config.vocab_size as u64) as u32).collect())
            .collect();
        let packed = Packed::new(&seqs);
        let mut advantages = Vec::new();
        let mut mask = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            advantages.extend(std::iter::repeat_n([1.0, -0.5, 0.7][i], s.len()));
            // First two tokens play the prompt.
            mask.extend((0..s.len()).map(|t| if t < 2 { 0.0 } else { 1.0 }));
        }
        StepBatch { packed, advantages, mask, logp_old: None, logp_ref: None, supervised: false }
    }

    /// The gradient the step computes is the derivative of the loss it reports: a directional
    /// finite difference through the whole model agrees, and the update lowers the loss.
    #[test]
    fn step_gradient_matches_finite_difference_and_update_lowers_loss() {
        let config = tiny();
        let m = model(&config, 3);
        let mut rng = Rng::new(9);
        let b = batch(&config, &mut rng);
        // Fixed ℓ_old so the loss is a genuine function of the weights (on-policy it is
        // constant at ratio 1 but its gradient is not zero; fixed ℓ_old tests both).
        let acts = m.forward(&b.packed).unwrap();
        let h = m.head(&acts.hidden, &b.packed.next_token_targets(), 1.0).unwrap();
        let lp: Vec<f32> = h.logp.to_vec().unwrap();
        let b = StepBatch { logp_old: Some(lp.iter().map(|x| x + 0.05).collect()), ..b };

        let lr = 1e-3;
        let cfg = StepConfig {
            optim: AdamW { lr, weight_decay: 0.0, ..AdamW::default() },
            max_grad_norm: None,
            ..Default::default()
        };
        let mut st = PolicyStep::new(&m, cfg.clone()).unwrap();
        let before: Vec<Vec<f32>> = m.weights.named_tensors().iter().map(|(_, t)| t.to_vec().unwrap()).collect();
        let s = st.step(&m, &b).unwrap();
        assert!(s.applied && s.loss.is_finite() && s.grad_norm > 0.0, "{s:?}");
        assert_eq!(st.step, 1);

        // Loss at the original weights moved along the gradient direction.
        let grads: Vec<Vec<f32>> = st.grads.named_tensors().iter().map(|(_, t)| t.to_vec().unwrap()).collect();
        let loss_at = |eps: f32| -> f64 {
            let named = m
                .weights
                .named_tensors()
                .iter()
                .enumerate()
                .map(|(i, (name, t))| {
                    let v: Vec<f32> = before[i].iter().zip(&grads[i]).map(|(w, g)| w + eps * g).collect();
                    (name.clone(), Tensor::from_slice(&v, t.shape(), Device::Cpu).unwrap())
                })
                .collect();
            let mm = Qwen::new(config.clone(), Weights::from_named(&config, named).unwrap());
            let mut probe =
                PolicyStep::new(&mm, StepConfig { optim: AdamW { lr: 0.0, ..cfg.optim }, ..cfg.clone() }).unwrap();
            probe.step(&mm, &b).unwrap().loss as f64
        };
        let eps = 1e-3;
        let fd = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps as f64);
        let g2: f64 = grads.iter().flatten().map(|&g| g as f64 * g as f64).sum();
        assert!((fd - g2).abs() <= 0.02 * g2 + 1e-6, "finite difference {fd} vs |g|² {g2}");

        // AdamW's first step moves each weight by about lr·sign(g); the loss goes down.
        let after: Vec<Vec<f32>> = m.weights.named_tensors().iter().map(|(_, t)| t.to_vec().unwrap()).collect();
        let moved = before.iter().flatten().zip(after.iter().flatten()).filter(|(a, b)| a != b).count();
        assert!(moved > 0);
        let mut st2 = PolicyStep::new(&m, StepConfig { optim: AdamW { lr: 0.0, ..cfg.optim }, ..cfg }).unwrap();
        let s2 = st2.step(&m, &b).unwrap();
        assert!(s2.loss < s.loss, "loss {} -> {}", s.loss, s2.loss);
    }

    /// [`batch`] with ℓ_old and ℓ_ref offset from model 5's own log-probs (ratio e^−0.1, so
    /// clipping and a nonzero KL are in play).
    fn off_policy_batch(config: &Config, rng: &mut Rng) -> StepBatch {
        let b = batch(config, rng);
        let m0 = model(config, 5);
        let acts = m0.forward(&b.packed).unwrap();
        let lp: Vec<f32> = m0.head(&acts.hidden, &b.packed.next_token_targets(), 1.0).unwrap().logp.to_vec().unwrap();
        StepBatch {
            logp_old: Some(lp.iter().map(|x| x + 0.1).collect()),
            logp_ref: Some(lp.iter().map(|x| x - 0.2).collect()),
            ..b
        }
    }

    /// Splits a batch into per-sequence micro-batches.
    fn split(b: &StepBatch) -> Vec<StepBatch> {
        let cu = &b.packed.cu_seqlens;
        (0..b.packed.num_seqs())
            .map(|i| {
                let (s, e) = (cu[i] as usize, cu[i + 1] as usize);
                let part = |v: &Option<Vec<f32>>| v.as_ref().map(|v| v[s..e].to_vec());
                StepBatch {
                    packed: Packed::new(&[b.packed.ids[s..e].to_vec()]),
                    advantages: b.advantages[s..e].to_vec(),
                    mask: b.mask[s..e].to_vec(),
                    logp_old: part(&b.logp_old),
                    logp_ref: part(&b.logp_ref),
                    supervised: b.supervised,
                }
            })
            .collect()
    }

    /// Accumulating over micro-batches is the same update as one step on the whole batch, for
    /// every aggregation mode, with a reference model's log-probs (β > 0) in the loss.
    #[test]
    fn micro_batches_accumulate_to_the_full_batch_step() {
        let config = tiny();
        let b = off_policy_batch(&config, &mut Rng::new(4));
        let micro = split(&b);
        assert_eq!(micro.len(), 3);
        for loss_type in [LossType::Dapo, LossType::Grpo, LossType::DrGrpo] {
            let cfg = StepConfig {
                loss: GrpoLossConfig { beta: 0.04, ..Default::default() },
                loss_type,
                max_completion_length: 16,
                optim: AdamW { lr: 1e-3, ..AdamW::default() },
                ..Default::default()
            };
            let (whole, parts) = (model(&config, 5), model(&config, 5));
            let (mut p1, mut p2) =
                (PolicyStep::new(&whole, cfg.clone()).unwrap(), PolicyStep::new(&parts, cfg).unwrap());
            let s1 = p1.step(&whole, &b).unwrap();
            let s2 = p2.step_accumulated(&parts, &micro).unwrap();
            assert!((s1.loss - s2.loss).abs() <= 1e-5 * s1.loss.abs().max(1.0), "{loss_type:?}: {s1:?} vs {s2:?}");
            assert!((s1.grad_norm - s2.grad_norm).abs() <= 1e-4 * s1.grad_norm, "{loss_type:?}");
            assert!(s1.grpo.mean_kl > 0.0 && (s1.grpo.mean_kl - s2.grpo.mean_kl).abs() <= 1e-5, "{loss_type:?}");
            assert_eq!(s1.grpo.num_tokens, s2.grpo.num_tokens);
            assert!((s1.mean_entropy - s2.mean_entropy).abs() <= 1e-5);
            // Gradients agree to float rounding (AdamW's first step, ≈ lr·sign(g), would magnify
            // rounding in near-zero components, so the weights are not compared).
            for ((n, a), (_, b)) in p1.grads.named_tensors().iter().zip(p2.grads.named_tensors().iter()) {
                let (a, b): (Vec<f32>, Vec<f32>) = (a.to_vec().unwrap(), b.to_vec().unwrap());
                let d: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f32>().sqrt();
                let r: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!(d <= 1e-5 * r.max(1e-6), "{loss_type:?} {n}: |Δg| {d} vs |g| {r}");
            }
        }
        // β > 0 without reference log-probs is refused by the loss, naming β.
        let no_ref = StepBatch { logp_ref: None, ..b.clone() };
        let cfg = StepConfig { loss: GrpoLossConfig { beta: 0.04, ..Default::default() }, ..Default::default() };
        let m = model(&config, 5);
        let err = PolicyStep::new(&m, cfg).unwrap().step(&m, &no_ref).unwrap_err().to_string();
        assert!(err.contains("logp_ref") || err.contains("beta") || err.contains("β"), "{err}");
    }

    /// A supervised micro-batch next to a rollout one: with β > 0 and an entropy bonus it needs
    /// no reference, gets neither term (its gradient is the plain policy gradient at ratio 1,
    /// i.e. a × NLL's), and stays out of the ratio / KL statistics.
    #[test]
    fn supervised_batches_get_no_kl_or_entropy_term() {
        let config = tiny();
        let mut rng = Rng::new(9);
        let rollout = off_policy_batch(&config, &mut rng);
        let demo = StepBatch { supervised: true, ..batch(&config, &mut rng) };
        let grads = |loss: GrpoLossConfig, micro: &[StepBatch]| {
            let m = model(&config, 5);
            let mut p = PolicyStep::new(&m, StepConfig { loss, ..Default::default() }).unwrap();
            let s = p.step_accumulated(&m, micro).unwrap();
            let g: Vec<f32> = p.grads.named_tensors().iter().flat_map(|(_, t)| t.to_vec::<f32>().unwrap()).collect();
            (s, g)
        };
        let with_terms = GrpoLossConfig { beta: 0.1, entropy_coef: 0.05, ..Default::default() };
        let (s_mixed, g_mixed) = grads(with_terms, &[rollout.clone(), demo.clone()]);
        let (s_roll, g_roll) = grads(with_terms, std::slice::from_ref(&rollout));
        // The demo's part: the same batch as an ordinary one under a loss without β and c_H.
        let plain = StepBatch { supervised: false, ..demo.clone() };
        let (_, g_demo) = grads(GrpoLossConfig::default(), std::slice::from_ref(&plain));
        // dapo: each part's token mean is rescaled to the whole batch's token count.
        let (n_roll, n_demo) = (s_roll.grpo.num_tokens, s_mixed.grpo.num_tokens);
        assert_eq!(n_roll, n_demo, "the demo's tokens are not in the GRPO statistics");
        let n_demo_tokens: f32 = loss_mask(&demo).unwrap().iter().sum();
        let total = n_roll + n_demo_tokens;
        let (mut d, mut r) = (0f32, 0f32);
        for ((m, a), b) in g_mixed.iter().zip(&g_roll).zip(&g_demo) {
            let want = a * n_roll / total + b * n_demo_tokens / total;
            d += (m - want).powi(2);
            r += want * want;
        }
        assert!(d.sqrt() <= 1e-5 * r.sqrt(), "|Δg| {} vs |g| {}", d.sqrt(), r.sqrt());
        assert_eq!(s_mixed.grpo.mean_kl, s_roll.grpo.mean_kl);
        assert_eq!(s_mixed.grpo.mean_ratio, s_roll.grpo.mean_ratio);
    }

    #[test]
    fn clipping_and_decay_flags_and_bad_lengths() {
        assert!(decays("model.layers.0.mlp.up_proj.weight"));
        assert!(decays("model.embed_tokens.weight"));
        assert!(!decays("model.layers.0.self_attn.q_proj.bias"));
        assert!(!decays("model.layers.3.input_layernorm.weight"));
        assert!(!decays("model.norm.weight"));
        let config = tiny();
        let m = model(&config, 5);
        let mut rng = Rng::new(1);
        let b = batch(&config, &mut rng);
        let mut st = PolicyStep::new(&m, StepConfig { max_grad_norm: Some(1e-4), ..Default::default() }).unwrap();
        let s = st.step(&m, &b).unwrap();
        assert!(s.grad_norm > 1e-4 && s.clip_scale < 1.0, "{s:?}");
        assert!(s.phases.total() > 0.0);
        let bad = StepBatch { mask: vec![1.0; 3], ..b };
        let e = st.step(&m, &bad).unwrap_err().to_string();
        assert!(e.contains("mask"), "{e}");
    }

    /// Runs one step of a copy of `base` (the weights before any step) in `dtype` on `dev`,
    /// and checks it against `cpu_stats`/`cpu_grads` (the f32 step on the CPU): the loss
    /// (absolute) and the gradient norm (relative) within `tol.0`, every parameter's gradient
    /// within `tol.1` (relative norm of the difference), and the weights it wrote equal
    /// to AdamW applied on the CPU to the step's own gradients (so the optimizer is checked
    /// exactly, independently of how far the gradients moved).
    #[allow(clippy::too_many_arguments)]
    fn check_step_on(
        base: &Qwen,
        b: &StepBatch,
        cfg: &StepConfig,
        cpu_stats: &StepStats,
        cpu_grads: &[Vec<f32>],
        dtype: DType,
        dev: Device,
        tol: (f64, f64),
    ) {
        let config = &base.config;
        let m = Qwen::new(config.clone(), copy_weights(&base.weights, dtype, dev));
        let before: Vec<Vec<f32>> = m.weights.named_tensors().iter().map(|(_, t)| t.to_vec_f32().unwrap()).collect();
        let mut st = PolicyStep::new(&m, cfg.clone()).unwrap();
        let s = st.step(&m, b).unwrap();
        let what = format!("{dtype} step on {dev}");
        let rel = |a: f32, b: f32| ((a - b) as f64).abs() / (b as f64).abs().max(1e-6);
        assert!(s.applied, "{what}: {s:?}");
        // The loss is a sum of terms of both signs (advantages ±1): relative to 1, not to itself.
        assert!(((s.loss - cpu_stats.loss) as f64).abs() < tol.0, "{what}: loss {} vs cpu {}", s.loss, cpu_stats.loss);
        assert!(
            rel(s.grad_norm, cpu_stats.grad_norm) < tol.0,
            "{what}: |g| {} vs {}",
            s.grad_norm,
            cpu_stats.grad_norm
        );
        let names: Vec<String> = m.weights.named_tensors().into_iter().map(|(n, _)| n).collect();
        let grads: Vec<Vec<f32>> = st.grads.named_tensors().iter().map(|(_, t)| t.to_vec_f32().unwrap()).collect();
        let mut worst = (0f64, "");
        for ((name, g), want) in names.iter().zip(&grads).zip(cpu_grads) {
            let d: f64 = g.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
            let n: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum::<f64>().sqrt();
            assert!(d <= tol.1 * n, "{what}: gradient of {name}: relative error {:.2e}", d / n);
            if d / n > worst.0 {
                worst = (d / n, name);
            }
        }
        eprintln!(
            "{what}: loss {} vs {}, |g| {} vs {}, worst gradient {} at {:.2e}",
            s.loss, cpu_stats.loss, s.grad_norm, cpu_stats.grad_norm, worst.1, worst.0
        );
        // AdamW on the CPU from the same start (the f32 master copy of `dtype`'s weights).
        for (i, (name, t)) in m.weights.named_tensors().into_iter().enumerate() {
            let cpu = |v: &[f32]| Tensor::from_slice(v, t.shape(), Device::Cpu).unwrap();
            let (p, g) = (cpu(&before[i]), cpu(&grads[i]));
            let (mm, vv) = (cpu(&vec![0.0; before[i].len()]), cpu(&vec![0.0; before[i].len()]));
            let out16 = (dtype != DType::F32).then(|| Tensor::zeros(t.shape(), dtype, Device::Cpu).unwrap());
            let wd = if decays(&name) { cfg.optim.weight_decay } else { 0.0 };
            adamw_step(&p, &g, &mm, &vv, 1, &cfg.optim, wd, s.clip_scale, out16.as_ref()).unwrap();
            let want = out16.as_ref().unwrap_or(&p).to_vec_f32().unwrap();
            let got = t.to_vec_f32().unwrap();
            // f32: the same arithmetic up to fused multiply-adds; bf16: one ulp either way.
            let ulp = if dtype == DType::F32 { 1e-6 } else { 1.0 / 128.0 };
            for (j, (a, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - w).abs() <= ulp * w.abs().max(1e-3),
                    "{what}: {name}[{j}] updated to {a}, AdamW gives {w}"
                );
            }
        }
    }

    /// A copy that shares no storage with `w` (a step updates its weights in place).
    fn copy_weights(w: &Weights, dtype: DType, dev: Device) -> Weights {
        w.try_map(|_, t| {
            let fresh = Tensor::from_slice(&t.to_vec_f32()?, t.shape(), Device::Cpu)?;
            Ok(fresh.to_dtype(dtype)?.to_device(dev)?)
        })
        .unwrap()
    }

    /// The f32 step on the CPU that the other dtypes and devices are compared with.
    fn reference_step(config: &Config) -> (Qwen, StepBatch, StepConfig, StepStats, Vec<Vec<f32>>) {
        let base = model(config, 3);
        let mut rng = Rng::new(9);
        let b = batch(config, &mut rng);
        let acts = base.forward(&b.packed).unwrap();
        let lp: Vec<f32> = base.head(&acts.hidden, &b.packed.next_token_targets(), 1.0).unwrap().logp.to_vec().unwrap();
        // ℓ_old off by ±0.1 so both clip sides and the unclipped region all occur.
        let old: Vec<f32> = lp.iter().enumerate().map(|(i, x)| x + [0.1, -0.1, 0.0][i % 3]).collect();
        let b = StepBatch { logp_old: Some(old), ..b };
        let cfg = StepConfig {
            optim: AdamW { lr: 1e-3, weight_decay: 0.1, ..AdamW::default() },
            max_grad_norm: Some(0.5),
            ..Default::default()
        };
        let cpu = Qwen::new(config.clone(), copy_weights(&base.weights, DType::F32, Device::Cpu));
        let mut st = PolicyStep::new(&cpu, cfg.clone()).unwrap();
        let stats = st.step(&cpu, &b).unwrap();
        let grads = st.grads.named_tensors().iter().map(|(_, t)| t.to_vec_f32().unwrap()).collect();
        (base, b, cfg, stats, grads)
    }

    /// bf16 tolerances (loss and |g|, per-tensor gradient) for the GPU; the CPU's bf16 path
    /// meets half. Measured on the CPU: loss −0.05688 vs −0.06013, |g| 4.181 vs 4.218, worst
    /// gradient 7.1e-2 relative (layer 0's input_layernorm).
    const BF16_STEP_TOL: (f64, f64) = (0.02, 0.3);

    /// A bf16 model on the CPU (f32 master weights, bf16 copy written by AdamW — the GPU's
    /// layout) tracks the f32 step; a fresh f32 copy repeats it exactly.
    #[test]
    fn bf16_step_tracks_f32() {
        let config = tiny();
        let (base, b, cfg, stats, grads) = reference_step(&config);
        check_step_on(&base, &b, &cfg, &stats, &grads, DType::F32, Device::Cpu, (1e-7, 1e-7));
        let half = (BF16_STEP_TOL.0 / 2.0, BF16_STEP_TOL.1 / 2.0);
        check_step_on(&base, &b, &cfg, &stats, &grads, DType::BF16, Device::Cpu, half);
    }

    /// The same step on the GPU: f32 matches the CPU tightly, bf16 within the bf16 bound.
    #[test]
    fn device_step_matches_cpu() {
        let _g = device_lock();
        let Some(dev) = smelt_kernels::testing::test_cuda_device() else { return };
        let config = tiny();
        let (base, b, cfg, stats, grads) = reference_step(&config);
        check_step_on(&base, &b, &cfg, &stats, &grads, DType::F32, dev, (1e-4, 1e-4));
        check_step_on(&base, &b, &cfg, &stats, &grads, DType::BF16, dev, BF16_STEP_TOL);
    }

    /// Every host↔device copy drains the stream, so a device step makes a fixed handful of them
    /// (inputs, the loss, statistics) however deep the model: the same count at 2 and 5 layers.
    /// (A dtype conversion through the host, or an upload per layer, once made 571 per step at
    /// the 0.5B shape.)
    /// The device tests here run one at a time: the copy count reads the process-wide profiler.
    fn device_lock() -> std::sync::MutexGuard<'static, ()> {
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        LOCK.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The test device (real or emulated) and its handle for the profiler, if any.
    #[cfg(feature = "cuda")]
    fn profiled_device() -> Option<(Device, std::sync::Arc<smelt_engine::cuda::CudaDevice>)> {
        let dev = smelt_kernels::testing::test_cuda_device()?;
        let Device::Cuda(ord) = dev else { unreachable!() };
        Some((dev, smelt_engine::cuda::device(ord).unwrap()))
    }

    /// The tiny model at `layers` layers in bf16 on `dev`.
    #[cfg(feature = "cuda")]
    fn bf16_model(layers: usize, dev: Device) -> (Config, Qwen) {
        let config = Config { num_hidden_layers: layers, ..tiny() };
        let m = Qwen::new(config.clone(), copy_weights(&model(&config, 3).weights, DType::BF16, dev));
        (config, m)
    }

    /// Calls summed over the profile rows whose names `keep` accepts.
    #[cfg(feature = "cuda")]
    fn calls(rows: &[smelt_engine::cuda::profile::ProfileRow], keep: impl Fn(&str) -> bool) -> usize {
        rows.iter().filter(|r| keep(&r.name)).map(|r| r.calls).sum()
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn device_step_copies_do_not_grow_with_depth() {
        use smelt_engine::cuda::profile;
        let _g = device_lock();
        let Some((dev, cuda)) = profiled_device() else { return };
        let copies = |layers: usize| {
            let (config, m) = bf16_model(layers, dev);
            let b = batch(&config, &mut Rng::new(9));
            let mut st = PolicyStep::new(&m, StepConfig::default()).unwrap();
            st.step(&m, &b).unwrap(); // warm-up: kernel builds, allocator
            let (r, rows) = profile::record(&cuda, || st.step(&m, &b)).unwrap();
            r.unwrap();
            (calls(&rows, |n| n == "copy host→device" || n == "copy device→host"), rows)
        };
        let ((two, rows2), (five, rows5)) = (copies(2), copies(5));
        assert_eq!(two, five, "copies per step grow with depth:\n2 layers: {rows2:?}\n5 layers: {rows5:?}");
        assert!(two <= 20, "{two} host↔device copies in one step: {rows2:?}");
        // The gradients live in one buffer: zeroing them and their norm are one launch each, and
        // AdamW is one launch over them all, however many tensors the model has (the other memset
        // clears the hidden states' gradient, into which the head's rows are scattered).
        for rows in [&rows2, &rows5] {
            assert_eq!(calls(rows, |n| n.contains("memset")), 2, "{rows:?}");
            assert_eq!(calls(rows, |n| n.contains("global_norm::sumsq_f32")), 1, "{rows:?}");
            assert_eq!(calls(rows, |n| n.contains("adamw")), 1, "AdamW over every parameter: {rows:?}");
        }
    }

    /// Decoding is launch-bound, so a decode step's launches per layer are pinned down: the
    /// input norm (fused with the previous layer's residual add), one q|k|v GEMM,
    /// attention_inputs (bias, RoPE, cache append), decode attention (partial + combine), the
    /// o GEMM, add_rmsnorm, one gate|up GEMM, swiglu and the down GEMM — and no copy per layer.
    /// (On the emulator and on a GPU alike: it counts launches, not time.)
    #[cfg(feature = "cuda")]
    #[test]
    fn device_decode_launches_per_layer() {
        use smelt_engine::cuda::profile;
        let _g = device_lock();
        let Some((dev, cuda)) = profiled_device() else { return };
        let count = |layers: usize| {
            let (_, m) = bf16_model(layers, dev);
            let prompts = vec![vec![3u32, 9, 27], vec![5u32]];
            let mut cache = m.new_kv_cache(2, 8).unwrap();
            m.prefill(&prompts, &mut cache).unwrap();
            m.decode_step(&[1, 2], &mut cache).unwrap(); // warm-up: kernel builds, allocator
            let (r, rows) = profile::record(&cuda, || m.decode_step(&[4, 6], &mut cache)).unwrap();
            r.unwrap();
            let launches = calls(&rows, |n| n.contains("::") || n.starts_with("cublas"));
            (launches, calls(&rows, |n| n.starts_with("copy")), rows)
        };
        let ((l2, c2, rows2), (l3, c3, rows3)) = (count(2), count(3));
        assert_eq!(l3 - l2, 10, "launches per decoded layer:\n2 layers: {rows2:?}\n3 layers: {rows3:?}");
        // The tokens' upload (checked on the host, nothing copied back), and the positions'
        // unless an earlier call uploaded the same list (attention's memo is process-wide).
        for (c, rows) in [(c2, &rows2), (c3, &rows3)] {
            assert!(c <= 2, "{c} copies in one decode step: {rows:?}");
        }
    }

    #[test]
    fn flops_count_matches_hand_count() {
        let c = tiny();
        // per layer: q 32·32 + k,v 2·32·16 + o 32·32 + mlp 3·32·48 = 7680; ×2 layers + lm_head 97·32.
        let p = 7680.0 * 2.0 + 97.0 * 32.0;
        let attn = 3.0 * 4.0 * 4.0 * 8.0 * (10.0 * 11.0 / 2.0) * 2.0;
        assert_eq!(train_step_flops(&c, &[10]), 6.0 * p * 10.0 + attn);
    }
}
