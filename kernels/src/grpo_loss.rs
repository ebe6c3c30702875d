//! `grpo_loss`: the fused GRPO-family policy loss (GRPO, DAPO, Dr. GRPO) over per-token arrays.
//!
//! One pass over N tokens computes, exactly as ALGORITHMS.md ("GRPO family") states:
//!
//! ```text
//! δ = clamp(ℓ − ℓ_old, −20, 20),  ρ = e^δ
//! L   = max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high));  dual clip (A < 0): L = min(L, −A·c)
//! KL  = k1: ℓ−ℓ_ref | k2: ½(ℓ−ℓ_ref)² | k3: clamp(e^d − d − 1, −10, 10), d = clamp(ℓ_ref−ℓ, −20, 20)
//! Loss = Σ_t w_t·m_t·(L_t + β·KL_t − c_H·H_t)
//! g_logp[t]    = ∂Loss/∂ℓ_t = w_t·m_t·(−A_t·ρ_t·1[unclipped] + β·k′(ℓ_t))
//! g_entropy[t] = ∂Loss/∂H_t = −c_H·w_t·m_t
//! ```
//!
//! Inputs are per-token f32 tensors of shape `[N]`: the advantage is **per token** (the caller
//! broadcasts each sequence's advantage to its tokens), the mask is f32 0/1, and the
//! aggregation weights `w` come from [`aggregation_weights`] (grpo / dapo / dr_grpo).
//! Masked tokens (`m = 0`) are skipped entirely, so NaN or ±inf padding in any input there
//! cannot leak into the loss or the gradients.
//!
//! ## Kinks and ties (why the gradient is what it is at the boundaries)
//! `g_logp` is the derivative PyTorch autograd gives for TRL/verl's formulation of the same
//! forward, with the tie rules made explicit:
//! - `1[unclipped]` = (A > 0 and ρ ≤ 1+ε_high) or (A < 0 and ρ ≥ 1−ε_low and, with dual clip,
//!   ρ ≤ c). A ratio *exactly* at 1±ε counts as unclipped. That is what torch computes there:
//!   `torch.max(a, b)` (= `maximum`) sends half the gradient to each side of a tie, and
//!   `torch.clamp` passes the gradient at its bound (its mask is `min ≤ x ≤ max`), so both
//!   halves carry −A·ρ and the sum is the unclipped gradient. The statistics use the same
//!   rule (a token at the boundary is not counted as clipped; TRL counts `ρ < 1−ε`, `ρ > 1+ε`).
//! - At ρ exactly c under dual clip, the other branch of verl's `torch.min` is a constant, so
//!   torch would give −A·ρ/2 there; we follow ALGORITHMS.md (`ρ ≤ c` is unclipped) and give the
//!   left derivative −A·ρ. It is a single point; away from it the two agree.
//! - The clamp of ℓ−ℓ_old to [−20, 20] is differentiated like torch.clamp: outside the range
//!   the surrogate gradient is 0 (it matters only for A < 0 without dual clip, where the
//!   unclamped formula would give −A·e^20), at the bound it passes.
//! - k3: the gradient 1 − e^d is zeroed where either clamp binds strictly (verl's clamps), and
//!   passes at the bounds. k1 and k2 are not clamped (as in verl).
//!
//! Statistics are means over unmasked tokens (weighted by the mask, not by `w`):
//! `clip_frac_low` = A < 0 and ρ < 1−ε_low; `clip_frac_high` = A > 0 and ρ > 1+ε_high;
//! `clip_frac_dual` = dual clip on, A < 0 and ρ > c; `mean_ratio` = mean ρ; `mean_kl` = mean of
//! the configured estimator's (clamped) value, reported whenever `logp_ref` is given, even
//! with β = 0.
//!
//! Precision: per-token math in f32 (identical formulas on CPU and CUDA), the loss and the
//! statistics accumulated in f64 in a fixed order, so both devices are deterministic.

use rayon::prelude::*;
use smelt_engine::{DType, Device, Error, Result, Tensor};

crate::kernel_source!("grpo_loss");

/// KL estimator for the β·KL(π_θ ‖ π_ref) term (Schulman's k1/k2/k3; k3 is GRPO's Eq. 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Kl {
    /// ℓ − ℓ_ref (verl `kl`).
    K1,
    /// ½(ℓ − ℓ_ref)² (verl `mse`).
    K2,
    /// e^d − d − 1 with d = ℓ_ref − ℓ, d clamped to [−20, 20] and the value to [−10, 10]
    /// (verl `low_var_kl`, the GRPO default).
    #[default]
    K3,
}

/// Hyperparameters of the loss. Defaults are ALGORITHMS.md's: ε_low 0.2, ε_high 0.28 (DAPO's
/// clip-higher), no dual clip, β = 0, k3, no entropy bonus.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GrpoLossConfig {
    pub eps_low: f32,
    pub eps_high: f32,
    /// Dual-clip constant c (verl's `clip_ratio_c`, 3.0) for A < 0 tokens; `None` = off.
    pub dual_clip: Option<f32>,
    /// KL coefficient β; > 0 requires `logp_ref`.
    pub beta: f32,
    pub kl: Kl,
    /// Entropy bonus coefficient c_H; ≠ 0 requires `entropy`.
    pub entropy_coef: f32,
}

impl Default for GrpoLossConfig {
    fn default() -> Self {
        GrpoLossConfig { eps_low: 0.2, eps_high: 0.28, dual_clip: None, beta: 0.0, kl: Kl::K3, entropy_coef: 0.0 }
    }
}

impl GrpoLossConfig {
    /// Checks ranges: 0 ≤ ε_low < 1, ε_high ≥ 0, c > 1 (as verl asserts), β ≥ 0, all finite.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::msg(format!("grpo_loss: invalid config: {what}")));
        if !(self.eps_low.is_finite() && (0.0..1.0).contains(&self.eps_low)) {
            return bad(format!("eps_low = {} must be in [0, 1)", self.eps_low));
        }
        if !(self.eps_high.is_finite() && self.eps_high >= 0.0) {
            return bad(format!("eps_high = {} must be finite and >= 0", self.eps_high));
        }
        if let Some(c) = self.dual_clip {
            if !(c.is_finite() && c > 1.0) {
                return bad(format!("dual_clip = {c} must be finite and > 1"));
            }
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad(format!("beta = {} must be finite and >= 0", self.beta));
        }
        if !self.entropy_coef.is_finite() {
            return bad(format!("entropy_coef = {} must be finite", self.entropy_coef));
        }
        Ok(())
    }
}

/// Per-token inputs, all f32 `[N]` on one device.
#[derive(Clone, Copy, Debug)]
pub struct GrpoLossInputs<'a> {
    /// ℓ: log-prob of each token under the current policy (the value the gradient is for).
    pub logp: &'a Tensor,
    /// ℓ_old: log-prob under the sampling policy.
    pub logp_old: &'a Tensor,
    /// ℓ_ref: log-prob under the frozen reference; required when β > 0, used for `mean_kl`.
    pub logp_ref: Option<&'a Tensor>,
    /// Per-token advantage (the sequence's advantage broadcast to its tokens).
    pub advantages: &'a Tensor,
    /// 1 for loss tokens, 0 for prompt / padding / masked-out tokens.
    pub mask: &'a Tensor,
    /// Aggregation weights from [`aggregation_weights`].
    pub weights: &'a Tensor,
    /// Per-token entropy H_t; required when `entropy_coef` ≠ 0.
    pub entropy: Option<&'a Tensor>,
}

/// Statistics the trainer logs: means over unmasked tokens (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GrpoStats {
    pub clip_frac_low: f32,
    pub clip_frac_high: f32,
    pub clip_frac_dual: f32,
    pub mean_ratio: f32,
    pub mean_kl: f32,
    /// Σ mask: the number of loss tokens.
    pub num_tokens: f32,
}

#[derive(Debug)]
pub struct GrpoLossOutput {
    /// Σ_t w·m·(L + β·KL − c_H·H), accumulated in f64.
    pub loss: f32,
    /// ∂loss/∂ℓ, f32 `[N]`, on the inputs' device.
    pub g_logp: Tensor,
    /// ∂loss/∂H = −c_H·w·m, f32 `[N]`, on the inputs' device.
    pub g_entropy: Tensor,
    pub stats: GrpoStats,
}

/// How per-token losses are aggregated (TRL's `loss_type`; verl's `loss_agg_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LossType {
    /// Mean over sequences of each sequence's token mean: w = 1/(S·n_i).
    Grpo,
    /// Token mean over the batch (TRL's default): w = 1/Σm.
    #[default]
    Dapo,
    /// Token sum over a constant: w = 1/(S·max_completion_length).
    DrGrpo,
}

/// Per-token aggregation weights for a packed batch of S sequences.
///
/// `cu_seqlens` has S+1 non-decreasing offsets from 0 to N (sequence i owns tokens
/// `cu_seqlens[i]..cu_seqlens[i+1]`); `mask` has N entries. n_i = Σ mask over sequence i.
/// - `Grpo`: w = 1/(S·max(n_i, 1)) — like TRL's `(L·m).sum(-1) / m.sum(-1).clamp(min=1)).mean()`,
///   a sequence with no loss tokens still counts in S.
/// - `Dapo`: w = 1/max(Σm, 1).
/// - `DrGrpo`: w = 1/(S·max_completion_length); `max_completion_length` must be > 0.
///
/// Weights are returned for every token (masked ones too); the loss multiplies by the mask.
/// Gradient accumulation over micro-batches is the caller's business (scale the weights).
pub fn aggregation_weights(
    cu_seqlens: &[usize],
    mask: &[f32],
    loss_type: LossType,
    max_completion_length: usize,
) -> Result<Vec<f32>> {
    let n = mask.len();
    crate::ensure_shape!(
        !cu_seqlens.is_empty()
            && cu_seqlens[0] == 0
            && cu_seqlens[cu_seqlens.len() - 1] == n
            && cu_seqlens.windows(2).all(|p| p[0] <= p[1]),
        "aggregation_weights",
        "cu_seqlens must rise from 0 to the mask length {n}, got {cu_seqlens:?}"
    );
    let s = (cu_seqlens.len() - 1) as f64;
    let mut w = vec![0f32; n];
    match loss_type {
        LossType::Grpo => {
            for seq in cu_seqlens.windows(2) {
                let count: f64 = mask[seq[0]..seq[1]].iter().map(|&m| m as f64).sum();
                let wi = (1.0 / (s * count.max(1.0))) as f32;
                w[seq[0]..seq[1]].fill(wi);
            }
        }
        LossType::Dapo => {
            let count: f64 = mask.iter().map(|&m| m as f64).sum();
            w.fill((1.0 / count.max(1.0)) as f32);
        }
        LossType::DrGrpo => {
            if max_completion_length == 0 {
                return Err(Error::msg("aggregation_weights: dr_grpo needs max_completion_length > 0"));
            }
            if s > 0.0 {
                w.fill((1.0 / (s * max_completion_length as f64)) as f32);
            }
        }
    }
    Ok(w)
}

/// The fused GRPO loss: loss, ∂loss/∂logp, ∂loss/∂entropy and statistics in one pass.
pub fn grpo_loss(x: &GrpoLossInputs, cfg: &GrpoLossConfig) -> Result<GrpoLossOutput> {
    let n = x.logp.elem_count();
    let g_logp = Tensor::empty(&[n], DType::F32, x.logp.device())?;
    let g_entropy = Tensor::empty(&[n], DType::F32, x.logp.device())?;
    let (loss, stats) = grpo_loss_into(x, cfg, &g_logp, &g_entropy)?;
    Ok(GrpoLossOutput { loss, g_logp, g_entropy, stats })
}

/// [`grpo_loss`] writing the gradients into caller-owned f32 `[N]` tensors (reused across
/// steps by the trainer); every element is overwritten. Returns (loss, stats).
pub fn grpo_loss_into(
    x: &GrpoLossInputs,
    cfg: &GrpoLossConfig,
    g_logp: &Tensor,
    g_entropy: &Tensor,
) -> Result<(f32, GrpoStats)> {
    cfg.validate()?;
    check(x, cfg)?;
    let n = x.logp.elem_count();
    if n == 0 {
        return Ok((0.0, GrpoStats::default()));
    }
    for (name, t) in [("g_logp", g_logp), ("g_entropy", g_entropy)] {
        crate::ensure_shape!(
            t.rank() == 1 && t.elem_count() == n && t.dtype() == DType::F32,
            "grpo_loss",
            "output {name} is {:?} {}, expected [{n}] f32",
            t.shape(),
            t.dtype()
        );
        if t.device() != x.logp.device() {
            return Err(Error::DeviceMismatch { op: "grpo_loss", a: x.logp.device(), b: t.device() });
        }
    }
    match x.logp.device() {
        Device::Cpu => {
            let logp = x.logp.cpu_read::<f32>()?;
            let logp_old = x.logp_old.cpu_read::<f32>()?;
            let logp_ref = x.logp_ref.map(|t| t.cpu_read::<f32>()).transpose()?;
            let adv = x.advantages.cpu_read::<f32>()?;
            let mask = x.mask.cpu_read::<f32>()?;
            let w = x.weights.cpu_read::<f32>()?;
            let entropy = x.entropy.map(|t| t.cpu_read::<f32>()).transpose()?;
            let s = cpu::GrpoSlices {
                logp: &logp,
                logp_old: &logp_old,
                logp_ref: logp_ref.as_deref(),
                advantages: &adv,
                mask: &mask,
                weights: &w,
                entropy: entropy.as_deref(),
            };
            let mut gl = g_logp.cpu_write::<f32>()?;
            let mut ge = g_entropy.cpu_write::<f32>()?;
            Ok(cpu::grpo_loss(&s, cfg, &mut gl, &mut ge))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::grpo_loss(ord, x, cfg, g_logp, g_entropy),
        #[cfg(not(feature = "cuda"))]
        d => Err(Error::UnsupportedDevice { op: "grpo_loss", device: d }),
    }
}

fn check(x: &GrpoLossInputs, cfg: &GrpoLossConfig) -> Result<()> {
    if cfg.beta > 0.0 && x.logp_ref.is_none() {
        return Err(Error::msg(format!("grpo_loss: beta = {} > 0 needs logp_ref", cfg.beta)));
    }
    if cfg.entropy_coef != 0.0 && x.entropy.is_none() {
        return Err(Error::msg(format!("grpo_loss: entropy_coef = {} needs entropy", cfg.entropy_coef)));
    }
    let n = x.logp.elem_count();
    let named = [
        ("logp", Some(x.logp)),
        ("logp_old", Some(x.logp_old)),
        ("logp_ref", x.logp_ref),
        ("advantages", Some(x.advantages)),
        ("mask", Some(x.mask)),
        ("weights", Some(x.weights)),
        ("entropy", x.entropy),
    ];
    for (name, t) in named {
        let Some(t) = t else { continue };
        crate::ensure_shape!(
            t.rank() == 1 && t.elem_count() == n,
            "grpo_loss",
            "{name} has shape {:?}, expected [{n}] like logp {:?}",
            t.shape(),
            x.logp.shape()
        );
        if t.dtype() != DType::F32 {
            return Err(Error::DType { op: "grpo_loss", expected: DType::F32, got: t.dtype() });
        }
        if t.device() != x.logp.device() {
            return Err(Error::DeviceMismatch { op: "grpo_loss", a: x.logp.device(), b: t.device() });
        }
    }
    Ok(())
}

/// Slice-level CPU implementation (the reference for the CUDA kernel).
pub mod cpu {
    use super::*;

    /// The per-token inputs as slices, all of length N.
    #[derive(Clone, Copy, Debug)]
    pub struct GrpoSlices<'a> {
        pub logp: &'a [f32],
        pub logp_old: &'a [f32],
        pub logp_ref: Option<&'a [f32]>,
        pub advantages: &'a [f32],
        pub mask: &'a [f32],
        pub weights: &'a [f32],
        pub entropy: Option<&'a [f32]>,
    }

    /// One token's unweighted terms. `kernels/cuda/grpo_loss.cu` mirrors this line by line.
    #[derive(Clone, Copy, Debug, Default, PartialEq)]
    pub struct TokenTerms {
        /// L (after the ratio clip and the dual clip).
        pub surrogate: f32,
        /// ∂L/∂ℓ: −A·ρ when unclipped, else 0.
        pub g_surrogate: f32,
        pub ratio: f32,
        /// The estimator's value (0 without a reference).
        pub kl: f32,
        /// ∂KL/∂ℓ.
        pub g_kl: f32,
        pub clipped_low: bool,
        pub clipped_high: bool,
        pub clipped_dual: bool,
    }

    /// `x.clamp(lo, hi)` keeping NaN, with the comparison order the CUDA code uses.
    #[inline]
    fn clampf(x: f32, lo: f32, hi: f32) -> f32 {
        if x < lo {
            lo
        } else if x > hi {
            hi
        } else {
            x
        }
    }

    #[inline]
    pub fn token_terms(lp: f32, lp_old: f32, lp_ref: Option<f32>, a: f32, cfg: &GrpoLossConfig) -> TokenTerms {
        let raw = lp - lp_old;
        // torch.clamp passes the gradient at its bounds and stops it strictly outside.
        let in_range = (-20.0..=20.0).contains(&raw);
        let ratio = clampf(raw, -20.0, 20.0).exp();
        let (lo, hi) = (1.0 - cfg.eps_low, 1.0 + cfg.eps_high);
        let mut surrogate = (-a * ratio).max(-a * clampf(ratio, lo, hi));
        let (mut clipped_low, mut clipped_high, mut clipped_dual) = (false, false, false);
        let active = if a > 0.0 {
            clipped_high = ratio > hi;
            !clipped_high
        } else if a < 0.0 {
            clipped_low = ratio < lo;
            if let Some(c) = cfg.dual_clip {
                clipped_dual = ratio > c;
                surrogate = surrogate.min(-a * c);
            }
            !clipped_low && !clipped_dual
        } else {
            false
        };
        let g_surrogate = if active && in_range { -a * ratio } else { 0.0 };
        let (kl, g_kl) = match lp_ref {
            None => (0.0, 0.0),
            Some(r) => match cfg.kl {
                Kl::K1 => (lp - r, 1.0),
                Kl::K2 => {
                    let diff = lp - r;
                    (0.5 * diff * diff, diff)
                }
                Kl::K3 => {
                    let d = r - lp;
                    let dc = clampf(d, -20.0, 20.0);
                    // expm1 keeps e^d − 1 − d accurate for small d (the common case).
                    let em1 = dc.exp_m1();
                    let v = em1 - dc;
                    let g = if (-20.0..=20.0).contains(&d) && (-10.0..=10.0).contains(&v) { -em1 } else { 0.0 };
                    (clampf(v, -10.0, 10.0), g)
                }
            },
        };
        TokenTerms { surrogate, g_surrogate, ratio, kl, g_kl, clipped_low, clipped_high, clipped_dual }
    }

    /// Running sums in the order the CUDA kernel keeps them.
    #[derive(Clone, Copy, Debug, Default)]
    struct Acc {
        loss: f64,
        mask: f64,
        low: f64,
        high: f64,
        dual: f64,
        ratio: f64,
        kl: f64,
    }

    impl Acc {
        fn add(self, o: Acc) -> Acc {
            Acc {
                loss: self.loss + o.loss,
                mask: self.mask + o.mask,
                low: self.low + o.low,
                high: self.high + o.high,
                dual: self.dual + o.dual,
                ratio: self.ratio + o.ratio,
                kl: self.kl + o.kl,
            }
        }
    }

    const CHUNK: usize = 4096;

    /// Fills `g_logp` and `g_entropy` and returns (loss, stats). Chunks run in parallel and
    /// their f64 partial sums are combined in chunk order, so the result is deterministic.
    pub fn grpo_loss(
        x: &GrpoSlices,
        cfg: &GrpoLossConfig,
        g_logp: &mut [f32],
        g_entropy: &mut [f32],
    ) -> (f32, GrpoStats) {
        let parts: Vec<Acc> = smelt_engine::cpu::pool().install(|| {
            g_logp
                .par_chunks_mut(CHUNK)
                .zip(g_entropy.par_chunks_mut(CHUNK))
                .enumerate()
                .map(|(c, (gl, ge))| {
                    let base = c * CHUNK;
                    let mut acc = Acc::default();
                    for (j, (gl, ge)) in gl.iter_mut().zip(ge.iter_mut()).enumerate() {
                        let i = base + j;
                        let m = x.mask[i];
                        if m == 0.0 {
                            *gl = 0.0;
                            *ge = 0.0;
                            continue;
                        }
                        let w = x.weights[i];
                        let t = token_terms(x.logp[i], x.logp_old[i], x.logp_ref.map(|r| r[i]), x.advantages[i], cfg);
                        *gl = w * m * (t.g_surrogate + cfg.beta * t.g_kl);
                        *ge = -cfg.entropy_coef * w * m;
                        let mut tok = t.surrogate as f64;
                        if cfg.beta != 0.0 {
                            tok += cfg.beta as f64 * t.kl as f64;
                        }
                        if cfg.entropy_coef != 0.0 {
                            if let Some(h) = x.entropy {
                                tok -= cfg.entropy_coef as f64 * h[i] as f64;
                            }
                        }
                        let m64 = m as f64;
                        acc.loss += w as f64 * m64 * tok;
                        acc.mask += m64;
                        acc.low += if t.clipped_low { m64 } else { 0.0 };
                        acc.high += if t.clipped_high { m64 } else { 0.0 };
                        acc.dual += if t.clipped_dual { m64 } else { 0.0 };
                        acc.ratio += m64 * t.ratio as f64;
                        acc.kl += m64 * t.kl as f64;
                    }
                    acc
                })
                .collect()
        });
        let acc = parts.into_iter().fold(Acc::default(), Acc::add);
        (acc.loss as f32, finish_stats([acc.mask, acc.low, acc.high, acc.dual, acc.ratio, acc.kl]))
    }

    /// Stats from the sums [Σm, Σm·low, Σm·high, Σm·dual, Σm·ρ, Σm·KL] (shared with CUDA).
    pub(crate) fn finish_stats(s: [f64; 6]) -> GrpoStats {
        let [mask, low, high, dual, ratio, kl] = s;
        let mean = |v: f64| if mask > 0.0 { (v / mask) as f32 } else { 0.0 };
        GrpoStats {
            clip_frac_low: mean(low),
            clip_frac_high: mean(high),
            clip_frac_dual: mean(dual),
            mean_ratio: mean(ratio),
            mean_kl: mean(kl),
            num_tokens: mask as f32,
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{launch, Arg, LaunchCfg};

    const THREADS: u32 = 256;
    /// Enough blocks to fill an H100 at 64k tokens; the partials stay tiny.
    const MAX_BLOCKS: u64 = 264;
    /// f64 slots per block partial (7 used).
    const SLOTS: u64 = 8;

    pub fn grpo_loss(
        ord: usize,
        x: &GrpoLossInputs,
        cfg: &GrpoLossConfig,
        g_logp: &Tensor,
        g_entropy: &Tensor,
    ) -> Result<(f32, GrpoStats)> {
        let n = x.logp.elem_count();
        let dev = x.logp.device();
        let n32 = u32::try_from(n).map_err(|_| Error::shape("grpo_loss (cuda)", format!("{n} tokens exceed u32")))?;
        let blocks = (n as u64).div_ceil(THREADS as u64 * 4).clamp(1, MAX_BLOCKS);
        // f64 buffers held as u32 pairs: the engine has no f64 dtype.
        let partials = Tensor::empty(&[(blocks * SLOTS * 2) as usize], DType::U32, dev)?;
        let sums = Tensor::empty(&[(SLOTS * 2) as usize], DType::U32, dev)?;
        let opt = |t: Option<&Tensor>| -> Result<u64> { t.map(|t| t.cuda_ptr()).transpose().map(|p| p.unwrap_or(0)) };
        let kl = match cfg.kl {
            Kl::K1 => 1,
            Kl::K2 => 2,
            Kl::K3 => 3,
        };
        let flags = (x.logp_ref.is_some() as i32)
            | ((x.entropy.is_some() as i32) << 1)
            | ((cfg.dual_clip.is_some() as i32) << 2);
        let cfg1 = LaunchCfg { grid: (blocks as u32, 1, 1), block: (THREADS, 1, 1), smem: 0 };
        launch(
            ord,
            &SRC,
            "grpo_loss_tokens",
            cfg1,
            &[
                Arg::Ptr(x.logp.cuda_ptr()?),
                Arg::Ptr(x.logp_old.cuda_ptr()?),
                Arg::Ptr(opt(x.logp_ref)?),
                Arg::Ptr(x.advantages.cuda_ptr()?),
                Arg::Ptr(x.mask.cuda_ptr()?),
                Arg::Ptr(x.weights.cuda_ptr()?),
                Arg::Ptr(opt(x.entropy)?),
                Arg::Ptr(g_logp.cuda_ptr()?),
                Arg::Ptr(g_entropy.cuda_ptr()?),
                Arg::Ptr(partials.cuda_ptr()?),
                Arg::U32(n32),
                Arg::F32(cfg.eps_low),
                Arg::F32(cfg.eps_high),
                Arg::F32(cfg.dual_clip.unwrap_or(0.0)),
                Arg::F32(cfg.beta),
                Arg::I32(kl),
                Arg::F32(cfg.entropy_coef),
                Arg::I32(flags),
            ],
        )?;
        let cfg2 = LaunchCfg { grid: (1, 1, 1), block: (THREADS, 1, 1), smem: 0 };
        launch(
            ord,
            &SRC,
            "grpo_loss_finish",
            cfg2,
            &[Arg::Ptr(partials.cuda_ptr()?), Arg::U32(blocks as u32), Arg::Ptr(sums.cuda_ptr()?)],
        )?;
        let s: Vec<f64> = bytemuck::pod_collect_to_vec(&sums.to_bytes()?);
        let stats = cpu::finish_stats([s[1], s[2], s[3], s[4], s[5], s[6]]);
        Ok((s[0] as f32, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use smelt_engine::Rng;

    /// ALGORITHMS.md's formulas written out in f64, independently of `token_terms`.
    struct Ref {
        loss: f64,
        g: Vec<f64>,
        low: f64,
        high: f64,
        dual: f64,
        ratio: f64,
        kl: f64,
    }

    struct Case {
        logp: Vec<f32>,
        old: Vec<f32>,
        rf: Option<Vec<f32>>,
        adv: Vec<f32>,
        mask: Vec<f32>,
        w: Vec<f32>,
        ent: Option<Vec<f32>>,
    }

    fn ref_token_loss(lp: f64, c: &Case, i: usize, cfg: &GrpoLossConfig) -> (f64, f64, f64) {
        let a = c.adv[i] as f64;
        let rho = (lp - c.old[i] as f64).clamp(-20.0, 20.0).exp();
        let (lo, hi) = (1.0 - cfg.eps_low as f64, 1.0 + cfg.eps_high as f64);
        let mut l = (-a * rho).max(-a * rho.clamp(lo, hi));
        if let (Some(cc), true) = (cfg.dual_clip, a < 0.0) {
            l = l.min(-a * cc as f64);
        }
        let kl = c.rf.as_ref().map_or(0.0, |r| {
            let r = r[i] as f64;
            match cfg.kl {
                Kl::K1 => lp - r,
                Kl::K2 => 0.5 * (lp - r) * (lp - r),
                Kl::K3 => {
                    let d = (r - lp).clamp(-20.0, 20.0);
                    (d.exp() - d - 1.0).clamp(-10.0, 10.0)
                }
            }
        });
        let h = c.ent.as_ref().map_or(0.0, |e| e[i] as f64);
        (l + cfg.beta as f64 * kl - cfg.entropy_coef as f64 * h, rho, kl)
    }

    fn reference(c: &Case, cfg: &GrpoLossConfig) -> Ref {
        let mut r = Ref { loss: 0.0, g: vec![0.0; c.logp.len()], low: 0.0, high: 0.0, dual: 0.0, ratio: 0.0, kl: 0.0 };
        let mut msum = 0.0;
        for i in 0..c.logp.len() {
            let m = c.mask[i] as f64;
            if m == 0.0 {
                continue;
            }
            let (lp, a, w) = (c.logp[i] as f64, c.adv[i] as f64, c.w[i] as f64);
            let (tok, rho, kl) = ref_token_loss(lp, c, i, cfg);
            r.loss += w * m * tok;
            let (lo, hi) = (1.0 - cfg.eps_low as f64, 1.0 + cfg.eps_high as f64);
            let dual_ok = cfg.dual_clip.is_none_or(|cc| rho <= cc as f64);
            let unclipped = (a > 0.0 && rho <= hi) || (a < 0.0 && rho >= lo && dual_ok);
            let raw = lp - c.old[i] as f64;
            let mut g = if unclipped && raw.abs() <= 20.0 { -a * rho } else { 0.0 };
            if let Some(rf) = &c.rf {
                let rr = rf[i] as f64;
                let d = rr - lp;
                g += cfg.beta as f64
                    * match cfg.kl {
                        Kl::K1 => 1.0,
                        Kl::K2 => lp - rr,
                        Kl::K3 => {
                            if d.abs() <= 20.0 && d.exp() - d - 1.0 <= 10.0 {
                                1.0 - d.exp()
                            } else {
                                0.0
                            }
                        }
                    };
            }
            r.g[i] = w * m * g;
            msum += m;
            r.low += m * (a < 0.0 && rho < lo) as u8 as f64;
            r.high += m * (a > 0.0 && rho > hi) as u8 as f64;
            r.dual += m * (a < 0.0 && cfg.dual_clip.is_some_and(|cc| rho > cc as f64)) as u8 as f64;
            r.ratio += m * rho;
            r.kl += m * kl;
        }
        if msum > 0.0 {
            for v in [&mut r.low, &mut r.high, &mut r.dual, &mut r.ratio, &mut r.kl] {
                *v /= msum;
            }
        }
        r
    }

    fn ref_loss_of_logp(c: &Case, cfg: &GrpoLossConfig, logp: &[f64]) -> f64 {
        (0..logp.len())
            .filter(|&i| c.mask[i] != 0.0)
            .map(|i| c.w[i] as f64 * c.mask[i] as f64 * ref_token_loss(logp[i], c, i, cfg).0)
            .sum()
    }

    /// Random tokens spread over every branch: ratios from ~e^-0.6 to ~e^1.4 (both clip sides
    /// and beyond the dual clip c = 3), advantages of both signs and some zeros, 1/5 masked.
    fn random_case(rng: &mut Rng, n: usize, with_ref: bool, with_ent: bool) -> Case {
        let old: Vec<f32> = (0..n).map(|_| -(rng.next_f32() * 4.0 + 0.05)).collect();
        let logp: Vec<f32> = old.iter().map(|&o| o + (rng.next_f32() * 2.0 - 0.6)).collect();
        let adv: Vec<f32> = (0..n).map(|i| if i % 13 == 5 { 0.0 } else { rng.normal() as f32 }).collect();
        let mask: Vec<f32> = (0..n).map(|i| if i % 5 == 3 { 0.0 } else { 1.0 }).collect();
        let cu = [0, n / 3, n / 3 + 1, n];
        let w = aggregation_weights(&cu, &mask, LossType::Grpo, 0).unwrap();
        let rf = with_ref.then(|| logp.iter().map(|&l| l + rng.normal() as f32 * 0.7).collect());
        let ent = with_ent.then(|| (0..n).map(|_| rng.next_f32() * 3.0).collect());
        Case { logp, old, rf, adv, mask, w, ent }
    }

    fn tensors(c: &Case, dev: Device) -> Vec<Option<Tensor>> {
        let t = |v: &Vec<f32>| Tensor::from_slice(v, &[v.len()], Device::Cpu).unwrap().to_device(dev).unwrap();
        vec![
            Some(t(&c.logp)),
            Some(t(&c.old)),
            c.rf.as_ref().map(t),
            Some(t(&c.adv)),
            Some(t(&c.mask)),
            Some(t(&c.w)),
            c.ent.as_ref().map(t),
        ]
    }

    fn run(c: &Case, cfg: &GrpoLossConfig, dev: Device) -> GrpoLossOutput {
        let ts = tensors(c, dev);
        let x = GrpoLossInputs {
            logp: ts[0].as_ref().unwrap(),
            logp_old: ts[1].as_ref().unwrap(),
            logp_ref: ts[2].as_ref(),
            advantages: ts[3].as_ref().unwrap(),
            mask: ts[4].as_ref().unwrap(),
            weights: ts[5].as_ref().unwrap(),
            entropy: ts[6].as_ref(),
        };
        // Outputs poisoned with NaN so an element the op forgets to write shows.
        let g_logp = Tensor::full(f64::NAN, &[c.logp.len()], DType::F32, dev).unwrap();
        let g_entropy = Tensor::full(f64::NAN, &[c.logp.len()], DType::F32, dev).unwrap();
        let (loss, stats) = grpo_loss_into(&x, cfg, &g_logp, &g_entropy).unwrap();
        GrpoLossOutput { loss, g_logp, g_entropy, stats }
    }

    fn check_against_reference(c: &Case, cfg: &GrpoLossConfig, what: &str) {
        let out = run(c, cfg, Device::Cpu);
        let r = reference(c, cfg);
        assert_close(&[out.loss], &[r.loss], 1e-7, 1e-5, &format!("{what}: loss"));
        assert_close(&out.g_logp.to_vec::<f32>().unwrap(), &r.g, 1e-9, 1e-5, &format!("{what}: g_logp"));
        let want_ge: Vec<f64> =
            (0..c.w.len()).map(|i| -(cfg.entropy_coef as f64) * c.w[i] as f64 * c.mask[i] as f64).collect();
        assert_close(&out.g_entropy.to_vec::<f32>().unwrap(), &want_ge, 1e-12, 1e-6, &format!("{what}: g_entropy"));
        let s = out.stats;
        let got = [s.clip_frac_low, s.clip_frac_high, s.clip_frac_dual, s.mean_ratio, s.mean_kl];
        assert_close(&got, &[r.low, r.high, r.dual, r.ratio, r.kl], 1e-6, 1e-5, &format!("{what}: stats"));
    }

    #[test]
    fn every_branch_matches_f64_reference() {
        let mut rng = Rng::new(11);
        let base = GrpoLossConfig::default();
        let c = random_case(&mut rng, 1001, false, false);
        let r = reference(&c, &base);
        // The random case must exercise both clip sides and the dual-clip region.
        assert!(r.low > 0.02 && r.high > 0.02, "low {} high {}", r.low, r.high);
        check_against_reference(&c, &base, "default");
        check_against_reference(&c, &GrpoLossConfig { dual_clip: Some(3.0), ..base }, "dual clip");
        let d = reference(&c, &GrpoLossConfig { dual_clip: Some(1.5), ..base });
        assert!(d.dual > 0.02, "dual {}", d.dual);
        check_against_reference(&c, &GrpoLossConfig { dual_clip: Some(1.5), ..base }, "dual clip 1.5");
        check_against_reference(&c, &GrpoLossConfig { eps_low: 0.1, eps_high: 0.1, ..base }, "symmetric eps");
        let c = random_case(&mut rng, 777, true, true);
        for kl in [Kl::K1, Kl::K2, Kl::K3] {
            for beta in [0.0, 0.04] {
                let cfg = GrpoLossConfig { beta, kl, entropy_coef: 0.01, dual_clip: Some(3.0), ..base };
                check_against_reference(&c, &cfg, &format!("{kl:?} beta {beta} + entropy"));
            }
        }
        let cfg = GrpoLossConfig { beta: 0.1, kl: Kl::K3, entropy_coef: -0.003, ..base };
        check_against_reference(&c, &cfg, "negative entropy coef");
    }

    #[test]
    fn k3_clamps_and_ratio_clamp() {
        // d = ref − logp beyond 20 (value clamp and d clamp), around ln(11)+ (value > 10),
        // and ratios beyond e^±20.
        let logp = vec![-1.0f32, -30.0, -1.0, -5.0, -1.0, -1.0, -40.0, -1.0];
        let old = vec![-1.5f32, -1.0, -25.0, -5.2, -1.0, -1.0, -1.0, -30.0];
        let rf = vec![-1.0f32, -1.0, -1.0, -2.4, -30.0, -1.3, -1.0, -1.0];
        let adv = vec![-1.0f32, -1.0, -1.0, 1.0, 1.0, -2.0, 1.0, -1.0];
        let n = logp.len();
        let c = Case { logp, old, rf: Some(rf), adv, mask: vec![1.0; n], w: vec![0.25; n], ent: None };
        for kl in [Kl::K1, Kl::K2, Kl::K3] {
            let cfg = GrpoLossConfig { beta: 0.5, kl, ..Default::default() };
            check_against_reference(&c, &cfg, &format!("clamps {kl:?}"));
        }
        let cfg = GrpoLossConfig { beta: 0.5, ..Default::default() };
        let out = run(&c, &cfg, Device::Cpu);
        let g = out.g_logp.to_vec::<f32>().unwrap();
        // Token 2: δ = 24 > 20, A < 0, no dual clip: the clamp stops the gradient (torch.clamp);
        // k3 with d = 0 adds nothing.
        assert_eq!(g[2], 0.0);
        // Token 1: d = 29 → clamped → k3 gradient 0; δ = −29 < −20 → surrogate gradient 0.
        assert_eq!(g[1], 0.0);
        // Token 4: d = −29 → clamped, value = e^-20 + 19 → clamped to 10: KL grad 0,
        // surrogate unclipped (ρ = 1, A > 0).
        assert_eq!(g[4], -0.25);
        assert!(out.stats.mean_kl > 0.0);
    }

    #[test]
    fn tokens_exactly_at_the_clip_boundaries_are_unclipped() {
        let cfg = GrpoLossConfig { dual_clip: Some(3.0), ..Default::default() };
        // Find f32 inputs whose ratio lands exactly on each bound, as the op computes it.
        let exact = |target: f32| -> (f32, f32) {
            for lp_old in [-1.25f32, -0.5, 0.0] {
                let center = (lp_old as f64 + (target as f64).ln()) as f32;
                for k in -400i32..=400 {
                    let lp = f32::from_bits((center.to_bits() as i64 + k as i64) as u32);
                    if (lp - lp_old).exp() == target {
                        return (lp, lp_old);
                    }
                }
            }
            panic!("no f32 ratio exactly {target}");
        };
        let hi = 1.0 + cfg.eps_high;
        let lo = 1.0 - cfg.eps_low;
        let (h_lp, h_old) = exact(hi);
        let (l_lp, l_old) = exact(lo);
        let (c_lp, c_old) = exact(3.0);
        let c = Case {
            logp: vec![h_lp, l_lp, c_lp, -0.5],
            old: vec![h_old, l_old, c_old, -0.5],
            rf: None,
            adv: vec![1.5, -0.5, -2.0, 0.7],
            mask: vec![1.0; 4],
            w: vec![0.5, 0.25, 0.125, 1.0],
            ent: None,
        };
        let out = run(&c, &cfg, Device::Cpu);
        let g = out.g_logp.to_vec::<f32>().unwrap();
        assert_eq!(g[0], 0.5 * 1.5 * -hi, "A > 0 at ρ = 1+ε_high");
        assert_eq!(g[1], 0.25 * 0.5 * lo, "A < 0 at ρ = 1−ε_low");
        assert_eq!(g[2], 0.125 * 2.0 * 3.0, "A < 0 at ρ = c under dual clip");
        // ρ = 1 exactly (first step of an on-policy update): g = −w·A.
        assert_eq!(g[3], -0.7);
        let s = out.stats;
        assert_eq!((s.clip_frac_low, s.clip_frac_high, s.clip_frac_dual), (0.0, 0.0, 0.0));
        // Both branches agree on the value at a tie; the loss is continuous there.
        let want = 0.5 * -1.5 * hi as f64 + 0.25 * 0.5 * lo as f64 + 0.125 * 2.0 * 3.0 + -0.7;
        assert_close(&[out.loss], &[want], 1e-7, 1e-6, "loss at ties");
        // With ε = 0 both bounds sit at ρ = 1 exactly: still the unclipped gradient.
        let cfg0 = GrpoLossConfig { eps_low: 0.0, eps_high: 0.0, ..Default::default() };
        let c = Case { adv: vec![1.0, -1.0, 2.0, -2.0], logp: vec![-0.5; 4], old: vec![-0.5; 4], ..c };
        let g = run(&c, &cfg0, Device::Cpu).g_logp.to_vec::<f32>().unwrap();
        assert_eq!(g, vec![-0.5, 0.25, -0.25, 2.0]);
        // The left/right one-sided derivatives: the unclipped side matches g exactly.
        let cfgd = GrpoLossConfig::default();
        let c = Case {
            logp: vec![h_lp],
            old: vec![h_old],
            adv: vec![1.0],
            mask: vec![1.0],
            w: vec![1.0],
            rf: None,
            ent: None,
        };
        let x0 = c.logp[0] as f64;
        let h = 1e-6;
        let left = (ref_loss_of_logp(&c, &cfgd, &[x0]) - ref_loss_of_logp(&c, &cfgd, &[x0 - h])) / h;
        let g = run(&c, &cfgd, Device::Cpu).g_logp.to_vec::<f32>().unwrap();
        assert_close(&g, &[left], 1e-5, 1e-4, "left derivative at 1+ε_high");
    }

    #[test]
    fn g_logp_matches_finite_differences_away_from_kinks() {
        let mut rng = Rng::new(12);
        for (kl, dual) in [(Kl::K1, None), (Kl::K2, Some(3.0)), (Kl::K3, Some(1.6))] {
            let cfg = GrpoLossConfig { beta: 0.2, kl, dual_clip: dual, entropy_coef: 0.05, ..Default::default() };
            let mut c = random_case(&mut rng, 61, true, true);
            // Move tokens away from kinks (ratio within 1e-3 of a bound) so FD is valid.
            for i in 0..c.logp.len() {
                let rho = ((c.logp[i] - c.old[i]) as f64).exp();
                let kinks = [0.8, 1.28, dual.unwrap_or(100.0) as f64];
                if kinks.iter().any(|k| (rho - k).abs() < 1e-3) {
                    c.logp[i] += 0.01;
                }
            }
            let out = run(&c, &cfg, Device::Cpu);
            let x: Vec<f64> = to_f64(&c.logp);
            let fd = finite_diff(|l| ref_loss_of_logp(&c, &cfg, l), &x, 1e-6);
            assert_close(&out.g_logp.to_vec::<f32>().unwrap(), &fd, 1e-7, 1e-4, &format!("fd {kl:?} {dual:?}"));
            // The entropy path: ∂loss/∂H by finite differences too.
            let hv = to_f64(c.ent.as_ref().unwrap());
            let fd_h = finite_diff(
                |h| {
                    let c2 = Case { ent: Some(h.iter().map(|&v| v as f32).collect()), ..clone_case(&c) };
                    ref_loss_of_logp(&c2, &cfg, &x)
                },
                &hv,
                1e-3,
            );
            assert_close(&out.g_entropy.to_vec::<f32>().unwrap(), &fd_h, 1e-6, 1e-3, "fd entropy");
        }
    }

    fn clone_case(c: &Case) -> Case {
        Case {
            logp: c.logp.clone(),
            old: c.old.clone(),
            rf: c.rf.clone(),
            adv: c.adv.clone(),
            mask: c.mask.clone(),
            w: c.w.clone(),
            ent: c.ent.clone(),
        }
    }

    #[test]
    fn masked_tokens_contribute_nothing_even_when_garbage() {
        let mut rng = Rng::new(13);
        let cfg = GrpoLossConfig { beta: 0.1, entropy_coef: 0.01, dual_clip: Some(3.0), ..Default::default() };
        let c = random_case(&mut rng, 50, true, true);
        let clean = run(&c, &cfg, Device::Cpu);
        let mut dirty = clone_case(&c);
        for i in 0..50 {
            if c.mask[i] == 0.0 {
                dirty.logp[i] = f32::NAN;
                dirty.old[i] = f32::NEG_INFINITY;
                dirty.rf.as_mut().unwrap()[i] = f32::INFINITY;
                dirty.adv[i] = 1e30;
                dirty.ent.as_mut().unwrap()[i] = f32::NAN;
            }
        }
        let out = run(&dirty, &cfg, Device::Cpu);
        assert_eq!(out.loss, clean.loss);
        assert_eq!(out.stats, clean.stats);
        let g = out.g_logp.to_vec::<f32>().unwrap();
        assert_eq!(g, clean.g_logp.to_vec::<f32>().unwrap());
        assert!((0..50).all(|i| c.mask[i] != 0.0 || (g[i] == 0.0 && out.g_entropy.to_vec::<f32>().unwrap()[i] == 0.0)));
        // An all-masked batch: zero loss and zero stats, no NaN.
        let none = Case { mask: vec![0.0; 50], ..clone_case(&dirty) };
        let out = run(&none, &cfg, Device::Cpu);
        assert_eq!((out.loss, out.stats), (0.0, GrpoStats::default()));
    }

    #[test]
    fn aggregation_weights_follow_the_three_modes() {
        // Sequences of 3, 0 and 4 tokens; the middle token of the first is masked.
        let cu = [0usize, 3, 3, 7];
        let mask = [1.0f32, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0];
        let w = aggregation_weights(&cu, &mask, LossType::Grpo, 0).unwrap();
        let want = [1.0 / 6.0, 1.0 / 6.0, 1.0 / 6.0, 1.0 / 9.0, 1.0 / 9.0, 1.0 / 9.0, 1.0 / 9.0];
        assert_close(&w, &want, 0.0, 1e-7, "grpo");
        let w = aggregation_weights(&cu, &mask, LossType::Dapo, 0).unwrap();
        assert_close(&w, &[0.2; 7], 0.0, 1e-7, "dapo");
        let w = aggregation_weights(&cu, &mask, LossType::DrGrpo, 10).unwrap();
        assert_close(&w, &[1.0 / 30.0; 7], 0.0, 1e-7, "dr_grpo");
        assert!(aggregation_weights(&cu, &mask, LossType::DrGrpo, 0).is_err());
        assert!(aggregation_weights(&[0, 8], &mask, LossType::Dapo, 0).is_err());
        assert!(aggregation_weights(&[0, 4, 3, 7], &mask, LossType::Dapo, 0).is_err());
        // Each mode's loss equals its definition on per-token losses: grpo = mean over
        // sequences of token means, dapo = token mean, dr_grpo = sum / (S·L_max).
        let mut rng = Rng::new(14);
        let n = 7;
        let old: Vec<f32> = (0..n).map(|_| -1.0 - rng.next_f32()).collect();
        let logp: Vec<f32> = old.iter().map(|&o| o + 0.3 * (rng.next_f32() - 0.5)).collect();
        let adv: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let cfg = GrpoLossConfig::default();
        let per_tok: Vec<f64> = (0..n)
            .map(|i| {
                let c = Case {
                    logp: logp.clone(),
                    old: old.clone(),
                    rf: None,
                    adv: adv.clone(),
                    mask: mask.to_vec(),
                    w: vec![1.0; n],
                    ent: None,
                };
                ref_token_loss(logp[i] as f64, &c, i, &cfg).0 * mask[i] as f64
            })
            .collect();
        let grpo = ((per_tok[0] + per_tok[2]) / 2.0 + 0.0 + per_tok[3..].iter().sum::<f64>() / 3.0) / 3.0;
        let total: f64 = per_tok.iter().sum();
        for (lt, want) in [(LossType::Grpo, grpo), (LossType::Dapo, total / 5.0), (LossType::DrGrpo, total / 30.0)] {
            let w = aggregation_weights(&cu, &mask, lt, 10).unwrap();
            let c = Case {
                logp: logp.clone(),
                old: old.clone(),
                rf: None,
                adv: adv.clone(),
                mask: mask.to_vec(),
                w,
                ent: None,
            };
            let out = run(&c, &cfg, Device::Cpu);
            assert_close(&[out.loss], &[want], 1e-7, 1e-5, &format!("{lt:?} loss"));
        }
    }

    #[test]
    fn errors_name_the_op() {
        let t = Tensor::zeros(&[4], DType::F32, Device::Cpu).unwrap();
        let short = Tensor::zeros(&[3], DType::F32, Device::Cpu).unwrap();
        let x = GrpoLossInputs {
            logp: &t,
            logp_old: &t,
            logp_ref: None,
            advantages: &short,
            mask: &t,
            weights: &t,
            entropy: None,
        };
        let e = grpo_loss(&x, &GrpoLossConfig::default()).unwrap_err().to_string();
        assert!(e.contains("grpo_loss") && e.contains("advantages") && e.contains("[3]"), "{e}");
        let x = GrpoLossInputs { advantages: &t, ..x };
        let e = grpo_loss(&x, &GrpoLossConfig { beta: 0.1, ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("logp_ref"), "{e}");
        let e = grpo_loss(&x, &GrpoLossConfig { entropy_coef: 0.1, ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("entropy"), "{e}");
        let e = grpo_loss(&x, &GrpoLossConfig { dual_clip: Some(0.5), ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("dual_clip"), "{e}");
        let e = grpo_loss(&x, &GrpoLossConfig { eps_low: 1.0, ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("eps_low"), "{e}");
        let b = t.to_dtype(DType::BF16).unwrap();
        let x = GrpoLossInputs { mask: &b, ..x };
        assert!(grpo_loss(&x, &GrpoLossConfig::default()).is_err());
    }

    #[test]
    fn device_matches_cpu() {
        let Some(dev) = test_cuda_device() else { return };
        let mut rng = Rng::new(15);
        for n in [1usize, 7, 1000, 4097, 65_537] {
            let c = random_case(&mut rng, n, true, true);
            for (kl, dual) in [(Kl::K1, None), (Kl::K2, Some(3.0)), (Kl::K3, Some(1.5))] {
                let cfg = GrpoLossConfig { beta: 0.04, kl, dual_clip: dual, entropy_coef: 0.01, ..Default::default() };
                let want = run(&c, &cfg, Device::Cpu);
                let got = run(&c, &cfg, dev);
                let what = format!("grpo_loss cuda n={n} {kl:?}");
                // expf/expm1f may differ from the CPU's by an ulp or two, which can move a
                // token sitting within rounding of a kink to the other side: skip those.
                let near_kink = |i: usize| {
                    let rho = ((c.logp[i] - c.old[i]) as f64).exp();
                    let d = (c.rf.as_ref().unwrap()[i] - c.logp[i]) as f64;
                    let k3 = d.exp() - d - 1.0;
                    [1.0 - cfg.eps_low as f64, 1.0 + cfg.eps_high as f64, dual.unwrap_or(1e9) as f64]
                        .iter()
                        .any(|&k| (rho - k).abs() < 1e-5)
                        || (k3 - 10.0).abs() < 1e-4
                };
                let skipped = (0..n).filter(|&i| near_kink(i)).count();
                let keep = |v: Vec<f32>| -> Vec<f32> { (0..n).filter(|&i| !near_kink(i)).map(|i| v[i]).collect() };
                let ref_g = to_f64(&keep(want.g_logp.to_vec::<f32>().unwrap()));
                let tol = 16.0 * DType::F32.epsilon();
                assert_close(&keep(got.g_logp.to_vec::<f32>().unwrap()), &ref_g, 1e-9, tol, &what);
                let ref_ge = to_f64(&want.g_entropy.to_vec::<f32>().unwrap());
                assert_close(&got.g_entropy.to_vec::<f32>().unwrap(), &ref_ge, 0.0, 0.0, &what);
                assert_close(&[got.loss], &[want.loss as f64], 1e-7, 1e-5, &what);
                let (gs, ws) = (got.stats, want.stats);
                let frac_tol = (skipped as f64 + 0.01) / ws.num_tokens.max(1.0) as f64;
                let fr = |s: GrpoStats| [s.clip_frac_low, s.clip_frac_high, s.clip_frac_dual];
                assert_close(&fr(gs), &to_f64(&fr(ws)), frac_tol + 1e-6, 0.0, &format!("{what}: clip fractions"));
                let means = |s: GrpoStats| [s.mean_ratio, s.mean_kl, s.num_tokens];
                assert_close(&means(gs), &to_f64(&means(ws)), 1e-6, 1e-5, &format!("{what}: means"));
                // Deterministic: a second run gives identical bits.
                let again = run(&c, &cfg, dev);
                assert_eq!(again.loss.to_bits(), got.loss.to_bits(), "{what}: nondeterministic loss");
            }
        }
    }
}
