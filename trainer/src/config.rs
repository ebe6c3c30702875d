//! `smelt train`'s configuration: built-in defaults < a TOML file < `--set key=value` flags.
//!
//! Knob names follow TRL's `GRPOConfig` (and verl where TRL has none: `clip_ratio_c`,
//! `entropy_coeff`, `kl_loss_type`) so a config carries over. Unknown keys are errors, as is
//! every value out of range; [`TrainConfig::validate`] runs before any file is read.
//! Defaults are ALGORITHMS.md's; those marked "ours" are our choices where papers are silent.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use smelt_engine::{DType, Device};
use smelt_kernels::grpo_loss::{GrpoLossConfig, Kl, LossType};

/// Everything a training run reads. `Serialize` so the run directory records the resolved
/// configuration next to its log.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    // ── run ──
    /// The Hugging Face model directory to start from (required).
    pub model: Option<PathBuf>,
    /// Where checkpoints, `log.jsonl` and `config.toml` go.
    pub output_dir: PathBuf,
    /// Start a new run in an `output_dir` that already holds one (its log is appended to and
    /// its checkpoints may be replaced); without it that is an error, unless resuming.
    pub overwrite_output_dir: bool,
    /// cpu, cuda or cuda:N.
    pub device: String,
    /// Compute dtype: f32 (CPU and CUDA) or bf16 (CUDA; fp32 master weights are kept).
    pub dtype: String,
    pub seed: u64,
    /// Recompute each layer's activations in backward (less memory, ~1 more forward).
    pub gradient_checkpointing: bool,
    /// Decode rollouts on CUDA through CUDA graphs (`smelt_models::DecodeGraphs`): on by default
    /// (2.17× eager decoding for 16 prompts × 8 samples at the Qwen2.5-0.5B shape on an H200);
    /// `false` decodes eagerly. A capture that fails warns and decodes eagerly. The setting is
    /// process-wide (`smelt_models::set_cuda_graphs`) and wins over `SMELT_CUDA_GRAPHS`.
    pub cuda_graphs: bool,
    /// Continue a run from one of its `checkpoint-<step>` directories (weights, optimizer
    /// state, step, data position); `model` is then the run's starting model (the KL
    /// reference when β > 0).
    pub resume_from_checkpoint: Option<PathBuf>,

    // ── data ──
    /// A JSONL file (one `{"prompt": …, "answer": …}` per line) or `builtin:add`.
    pub dataset: String,
    /// Held-out set; `None` holds out `eval_size` examples of `dataset` instead.
    pub eval_dataset: Option<String>,
    pub eval_size: usize,
    /// A system message put before every prompt (none by default; the template may add its own).
    pub system_prompt: Option<String>,
    /// Prompts longer than this (in tokens, after the chat template) are an error.
    pub max_prompt_length: usize,

    // ── rollout ──
    /// G: completions per prompt.
    pub num_generations: usize,
    /// Completions per training step (prompts per step = this / num_generations).
    pub generation_batch_size: usize,
    pub max_completion_length: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,

    // ── optimisation ──
    pub max_steps: usize,
    /// Completions per micro-batch; gradients accumulate over the step's micro-batches.
    pub per_device_train_batch_size: usize,
    /// Policy updates per rollout batch (μ in GRPO); ℓ_old is the rollout's log-prob.
    pub num_iterations: usize,
    pub learning_rate: f32,
    /// constant, linear or cosine (after `warmup_steps` of linear warm-up).
    pub lr_scheduler_type: String,
    pub warmup_steps: usize,
    pub weight_decay: f32,
    pub adam_beta1: f32,
    pub adam_beta2: f32,
    pub adam_epsilon: f32,
    /// 0 = no clipping.
    pub max_grad_norm: f32,

    // ── loss ──
    /// dapo (token mean, the default), grpo (sequence mean) or dr_grpo.
    pub loss_type: String,
    pub epsilon: f32,
    pub epsilon_high: f32,
    /// Dual-clip constant c for A < 0 (verl); 0 = off.
    pub clip_ratio_c: f32,
    /// KL coefficient; > 0 loads a frozen copy of the starting model as the reference.
    pub beta: f32,
    /// k1, k2 or k3 (verl's kl, mse, low_var_kl).
    pub kl_loss_type: String,
    /// Entropy bonus c_H (verl); 0 = off.
    pub entropy_coeff: f32,
    /// group (GRPO), batch, or none (Dr. GRPO: centre only).
    pub scale_rewards: String,
    /// Truncated completions get no loss (DAPO).
    pub mask_truncated_completions: bool,
    /// DAPO dynamic sampling: drop groups whose rewards are all equal and roll out more
    /// prompts, up to `max_resample` extra rounds per step.
    pub dynamic_sampling: bool,
    pub max_resample: usize,
    /// DAPO overlong shaping buffer in tokens; 0 = off.
    pub overlong_buffer: usize,

    // ── reward ──
    /// accuracy, laser, laser_d, laser_de, pear, dro or rubric.
    pub reward: String,
    pub correct_reward: f32,
    pub incorrect_reward: f32,
    pub format_reward: f32,
    /// A completion without `</think>` is badly formatted.
    pub require_think: bool,
    /// Relative tolerance of numeric answer comparison.
    pub answer_rel_tol: f64,
    pub laser: LaserConfig,
    pub pear: PearConfig,
    pub dro: DroConfig,
    pub ahpo: AhpoConfig,
    pub rubric: RubricConfig,
    pub early_rejection: EarlyRejectionConfig,

    // ── supervised warm-up ──
    /// Steps of supervised fine-tuning on each example's `solution` before RL (0 = none).
    pub sft_steps: usize,
    /// Examples per SFT step.
    pub sft_batch_size: usize,
    /// `None` = `learning_rate`.
    pub sft_learning_rate: Option<f32>,

    // ── logging, evaluation, checkpoints ──
    /// Evaluate (greedy) on the held-out set every this many steps, and at the end; 0 = only
    /// at start and end.
    pub eval_steps: usize,
    /// Save a checkpoint every this many steps; 0 = only at the end.
    pub save_steps: usize,
    /// Keep only the newest this many checkpoints; 0 = keep all.
    pub save_total_limit: usize,
    /// Print a progress line per step on stderr (the JSON log is always written).
    pub quiet: bool,
}

/// LASER length shaping (ALGORITHMS.md "LASER, LASER-D, LASER-DE").
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LaserConfig {
    pub alpha: f32,
    /// L_T: the (initial) target length in tokens. Default 128 (ours, sized for the default
    /// 256-token completion budget; the paper's targets are in the thousands at 8k–32k budgets).
    pub target_length: usize,
    /// I: the step between candidate targets of LASER-D. Default 32 (ours, for the same reason;
    /// the paper's code steps by 1024).
    pub target_interval: usize,
    /// Re-estimate the difficulty-bucket targets every this many steps (LASER-D/-DE).
    pub monitor_every: usize,
    /// Prompts in the monitor set, and K samples for each.
    pub monitor_size: usize,
    pub monitor_samples: usize,
    /// LASER-DE's repetition rule: `runs` (back-to-back copies of a block, ours) or `ngram`
    /// (the n-gram detector of LASER's released code, to reproduce the paper).
    pub repetition: String,
}

/// PEAR phase-entropy reward.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PearConfig {
    pub s: f32,
    pub alpha: f32,
    /// Reward of an incorrect output.
    pub format_score: f32,
}

/// Which model scores DRO's reference answers (`dro.reward_model`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DroRewardModel {
    Policy,
    Reference,
    Lagged,
}

/// DRO's reasoning-reflection reward R3.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DroConfig {
    /// normalized (w = σ/Σσ, ours), softmax or top_quantile.
    pub weighting: String,
    /// softmax's temperature: w = softmax(σ/τ).
    pub tau: f32,
    /// top_quantile's q: uniform weights over the **top fraction q** of reference tokens by σ
    /// (the ⌈q·|y|⌉ highest; q = 0.1 keeps the 10 % most reasoning-sensitive tokens). Some write
    /// "the top-q quantile" for 1[σ ≥ quantile_q(σ)], which keeps the top 1 − q instead; the two
    /// agree at the default 0.5.
    pub quantile: f32,
    /// β of the length term 1 − β·| |y| − |ŷ| | / |y| (ours).
    pub length_beta: f32,
    /// λ: R = R3 + λ·r_len (ours).
    pub length_lambda: f32,
    /// The model that teacher-forces y: `policy` (the current policy, DRO's self-contained
    /// setting; it reuses the rollouts' KV cache), `reference` (frozen: the model RL starts
    /// from, after the warm-up if any) or `lagged` (a copy of the policy, refreshed every
    /// `lag_steps` steps). The data filter scores with it too.
    pub reward_model: String,
    /// `lagged`: steps between refreshes (ours). Checkpoints save the copy
    /// (`trainer_state/dro_lagged`), and a resumed run goes on with it.
    pub lag_steps: usize,
    /// Subtract the masked-reasoning baseline from R3: y teacher-forced right after the prompt,
    /// without any reasoning, weighted like R3 (Σ_j w_j·ℓ^base_j). R3 then says what the
    /// reasoning adds. A constant per group, so group-centred advantages do not change; the
    /// logged reward does (`reward_r3_baseline` logs the mean baseline).
    pub masked_baseline: bool,
    /// Run the R3 data filter at the start and every `filter_every` steps.
    pub filter: bool,
    pub filter_every: usize,
    /// Stage 1: keep a prompt when some output's worst `worst_frac` of reference-token ranks
    /// average ≤ `rank_k`.
    pub rank_k: u32,
    pub worst_frac: f32,
    /// Stage 2: drop this fraction of survivors with the lowest max σ.
    pub sigma_drop: f32,
    /// Fraction of the previous active set kept on top.
    pub carry_over: f32,
}

/// Rubric rewards (`reward = "rubric"`): each training example's `rubric` criteria, judged per
/// completion (see `reward::rubric`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RubricConfig {
    /// The external judge's command line as an array (`["python3", "judge.py"]`), started once
    /// and fed JSON lines; empty = the built-in judge, which passes a criterion when the
    /// completion contains its `pattern`.
    pub judge_command: Vec<String>,
    /// The longest wait for any one reply of the external judge, in seconds.
    pub timeout_s: f64,
}

impl Default for RubricConfig {
    fn default() -> Self {
        RubricConfig { judge_command: Vec::new(), timeout_s: 300.0 }
    }
}

/// Early rejection of rollouts (see `early_rejection`): each of a group's `num_generations`
/// samples is generated for `prefix_tokens` tokens, and only the `keep` whose prefixes have the
/// highest mean log-prob are finished and trained on. Defaults are ours.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EarlyRejectionConfig {
    pub enabled: bool,
    /// τ: tokens generated before the prefixes are scored.
    pub prefix_tokens: usize,
    /// Samples per group that survive (2..=num_generations); the group size for advantages.
    pub keep: usize,
}

impl Default for EarlyRejectionConfig {
    fn default() -> Self {
        EarlyRejectionConfig { enabled: false, prefix_tokens: 64, keep: 4 }
    }
}

/// Hybrid offline + online training (MM-HELIX's AHPO): when too few of a group's outputs are
/// correct for RL to learn from, the prompt's dataset `solution` joins that step's update as an
/// off-policy supervised term (once per example, at most one per prompt of the step; no KL or
/// entropy term on its tokens). "Correct" is the answer check, or with rubric rewards every
/// factual criterion passing. It works with every reward; its threshold and weight are ours.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AhpoConfig {
    pub enabled: bool,
    /// A group with fewer correct outputs than this gets its expert solution (1 = only groups
    /// where every output failed, the case in which group-relative advantages carry nothing).
    pub success_threshold: usize,
    /// Weight of the expert term: its tokens enter the loss with advantage `coef` and ratio 1
    /// (the negative log-likelihood's gradient, scaled), aggregated with the rollouts' tokens.
    pub coef: f32,
}

impl Default for AhpoConfig {
    fn default() -> Self {
        AhpoConfig { enabled: false, success_threshold: 1, coef: 1.0 }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: None,
            output_dir: PathBuf::from("runs/smelt"),
            overwrite_output_dir: false,
            device: "cpu".into(),
            dtype: "f32".into(),
            seed: 0,
            gradient_checkpointing: false,
            cuda_graphs: true,
            resume_from_checkpoint: None,
            dataset: "builtin:add".into(),
            eval_dataset: None,
            eval_size: 32,
            system_prompt: None,
            max_prompt_length: 512,
            num_generations: 8,
            generation_batch_size: 32,
            max_completion_length: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_steps: 100,
            per_device_train_batch_size: 8,
            num_iterations: 1,
            learning_rate: 1e-6,
            lr_scheduler_type: "constant".into(),
            warmup_steps: 0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            loss_type: "dapo".into(),
            epsilon: 0.2,
            epsilon_high: 0.28,
            clip_ratio_c: 0.0,
            beta: 0.0,
            kl_loss_type: "k3".into(),
            entropy_coeff: 0.0,
            scale_rewards: "group".into(),
            mask_truncated_completions: false,
            dynamic_sampling: false,
            max_resample: 3,
            overlong_buffer: 0,
            reward: "accuracy".into(),
            correct_reward: 1.0,
            incorrect_reward: -0.5,
            format_reward: -1.0,
            require_think: false,
            answer_rel_tol: 1e-6,
            laser: LaserConfig::default(),
            pear: PearConfig::default(),
            dro: DroConfig::default(),
            ahpo: AhpoConfig::default(),
            rubric: RubricConfig::default(),
            early_rejection: EarlyRejectionConfig::default(),
            sft_steps: 0,
            sft_batch_size: 16,
            sft_learning_rate: None,
            eval_steps: 0,
            save_steps: 0,
            save_total_limit: 0,
            quiet: false,
        }
    }
}

impl Default for LaserConfig {
    fn default() -> Self {
        LaserConfig {
            alpha: 0.5,
            target_length: 128,
            target_interval: 32,
            monitor_every: 20,
            monitor_size: 16,
            monitor_samples: 8,
            repetition: "runs".into(),
        }
    }
}

impl Default for PearConfig {
    fn default() -> Self {
        PearConfig { s: 1.0, alpha: 1.0, format_score: 0.0 }
    }
}

impl Default for DroConfig {
    fn default() -> Self {
        DroConfig {
            weighting: "normalized".into(),
            tau: 1.0,
            quantile: 0.5,
            length_beta: 0.5,
            length_lambda: 0.5,
            reward_model: "policy".into(),
            lag_steps: 50,
            masked_baseline: false,
            filter: true,
            filter_every: 50,
            rank_k: 10,
            worst_frac: 0.1,
            sigma_drop: 0.2,
            carry_over: 0.1,
        }
    }
}

/// The device named `name` (cpu, cuda, cuda:N), checked to be usable by this build and machine.
pub fn parse_device(name: &str) -> Result<Device> {
    let device: Device = name.parse()?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(i) = device {
        smelt_engine::cuda::device(i)?;
    }
    #[cfg(not(feature = "cuda"))]
    if device.is_cuda() {
        bail!("{device}: this smelt was built without CUDA support (--no-default-features)");
    }
    Ok(device)
}

/// The compute dtype named `name` on `device`: f32 anywhere, bf16 on CUDA (the CPU path
/// computes in f32). Errors say why without naming the setting; callers prefix it.
pub fn compute_dtype(name: &str, device: Device) -> Result<DType> {
    match name {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" if device.is_cuda() => Ok(DType::BF16),
        "bf16" | "bfloat16" => bail!("{name:?}: the CPU path computes in f32 (use f32)"),
        other => bail!("{other:?}: expected f32 or bf16"),
    }
}

/// Ceiling of every count setting (batch sizes, samples, retries): far above any real run,
/// low enough that no allocation sized by one can overflow.
pub const MAX_COUNT: usize = 1 << 20;

/// The reward a run optimises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewardKind {
    Accuracy,
    Laser,
    LaserD,
    LaserDe,
    Pear,
    Dro,
    Rubric,
}

impl RewardKind {
    /// LASER, LASER-D or LASER-DE (length shaping on top of the correctness score).
    pub fn is_laser(self) -> bool {
        matches!(self, RewardKind::Laser | RewardKind::LaserD | RewardKind::LaserDe)
    }
}

impl TrainConfig {
    /// Defaults, then the TOML file (if any), then each `key=value` override (the value is
    /// parsed as TOML, or taken as a string when it does not parse: `--set reward=pear`).
    /// Dotted keys reach into tables: `--set laser.alpha=0.3`.
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<TrainConfig> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                text.parse::<toml::Table>().with_context(|| format!("{}: not valid TOML", path.display()))?
            }
            None => toml::Table::new(),
        };
        for o in overrides {
            let (key, value) =
                o.split_once('=').with_context(|| format!("--set {o:?}: expected key=value (e.g. beta=0.04)"))?;
            let value = parse_value(value.trim());
            set_path(&mut table, key.trim(), value).with_context(|| format!("--set {o:?}"))?;
        }
        // Deserialise from text (the merged table re-serialised) so an error shows the
        // offending `key = value` line.
        let origin = file.map_or_else(|| "the --set flags".to_string(), |p| p.display().to_string());
        let merged = toml::to_string(&table).context("re-serialising the merged configuration")?;
        let cfg: TrainConfig = toml::from_str(&merged).map_err(|e| anyhow::anyhow!("{origin} (after --set): {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value's range and spelling; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.model.is_none() && self.resume_from_checkpoint.is_none() {
            bail!("model: required (a Hugging Face model directory; in the file or --model DIR)");
        }
        let pos = |name: &str, v: usize| -> Result<()> {
            if v == 0 {
                bail!("{name}: must be at least 1");
            }
            Ok(())
        };
        pos("num_generations", self.num_generations)?;
        pos("generation_batch_size", self.generation_batch_size)?;
        pos("max_completion_length", self.max_completion_length)?;
        pos("per_device_train_batch_size", self.per_device_train_batch_size)?;
        pos("num_iterations", self.num_iterations)?;
        pos("max_prompt_length", self.max_prompt_length)?;
        pos("sft_batch_size", self.sft_batch_size)?;
        // Upper bounds: each of these sizes an allocation or a generation batch.
        for (name, v) in [
            ("num_generations", self.num_generations),
            ("generation_batch_size", self.generation_batch_size),
            ("per_device_train_batch_size", self.per_device_train_batch_size),
            ("sft_batch_size", self.sft_batch_size),
            ("num_iterations", self.num_iterations),
            ("max_resample", self.max_resample),
            ("eval_size", self.eval_size),
            ("laser.monitor_size", self.laser.monitor_size),
            ("laser.monitor_samples", self.laser.monitor_samples),
        ] {
            if v > MAX_COUNT {
                bail!("{name} = {v}: more than {MAX_COUNT}");
            }
        }
        if self.num_generations < 2 {
            bail!("num_generations = 1: group-relative advantages of a group of one are 0, nothing would be learned");
        }
        if self.beta > 0.0 && self.resume_from_checkpoint.is_some() && self.model.is_none() {
            bail!(
                "beta > 0 with resume_from_checkpoint: also set `model` (the run's starting model, the KL reference)"
            );
        }
        if self.generation_batch_size % self.num_generations != 0 {
            bail!(
                "generation_batch_size = {} must be a multiple of num_generations = {}",
                self.generation_batch_size,
                self.num_generations
            );
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!("temperature = {}: must be > 0 (RL samples; greedy rollouts give no signal)", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p = {}: must be in (0, 1]", self.top_p);
        }
        for (name, v) in [("learning_rate", self.learning_rate), ("sft_learning_rate", self.sft_lr())] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{name} = {v}: must be finite and >= 0");
            }
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            bail!("max_grad_norm = {}: must be >= 0 (0 = no clipping)", self.max_grad_norm);
        }
        if !(0.0..1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) {
            bail!("adam_beta1 / adam_beta2 = {} / {}: must be in [0, 1)", self.adam_beta1, self.adam_beta2);
        }
        if !(self.adam_epsilon.is_finite() && self.adam_epsilon > 0.0) {
            bail!("adam_epsilon = {}: must be > 0 (0 turns untouched weights into NaN)", self.adam_epsilon);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("weight_decay = {}: must be finite and >= 0", self.weight_decay);
        }
        for (name, v) in [
            ("correct_reward", self.correct_reward),
            ("incorrect_reward", self.incorrect_reward),
            ("format_reward", self.format_reward),
            ("laser.alpha", self.laser.alpha),
            ("pear.s", self.pear.s),
            ("pear.alpha", self.pear.alpha),
            ("pear.format_score", self.pear.format_score),
            ("dro.length_beta", self.dro.length_beta),
            ("dro.length_lambda", self.dro.length_lambda),
        ] {
            if !v.is_finite() {
                bail!("{name} = {v}: must be finite");
            }
        }
        if !(self.answer_rel_tol.is_finite() && self.answer_rel_tol >= 0.0) {
            bail!("answer_rel_tol = {}: must be >= 0", self.answer_rel_tol);
        }
        self.lr_schedule_check()?;
        self.loss_config()?;
        self.loss_type()?;
        self.scale()?;
        let kind = self.reward_kind()?;
        if matches!(kind, RewardKind::LaserD | RewardKind::LaserDe) {
            pos("laser.monitor_every", self.laser.monitor_every)?;
            pos("laser.monitor_size", self.laser.monitor_size)?;
            pos("laser.monitor_samples", self.laser.monitor_samples)?;
            pos("laser.target_interval", self.laser.target_interval)?;
        }
        if kind.is_laser() {
            pos("laser.target_length", self.laser.target_length)?;
            // Read by every LASER mode's reward code (only LASER-DE acts on it).
            self.laser_repetition()?;
        }
        if kind == RewardKind::Dro {
            self.dro_weighting()?;
            if self.dro_reward_model()? == DroRewardModel::Lagged {
                pos("dro.lag_steps", self.dro.lag_steps)?;
            }
            if self.dro.filter {
                pos("dro.filter_every", self.dro.filter_every)?;
            }
            for (name, v) in [
                ("dro.worst_frac", self.dro.worst_frac),
                ("dro.sigma_drop", self.dro.sigma_drop),
                ("dro.carry_over", self.dro.carry_over),
            ] {
                if !(0.0..=1.0).contains(&v) {
                    bail!("{name} = {v}: must be in [0, 1]");
                }
            }
        }
        if kind != RewardKind::Rubric && !self.rubric.judge_command.is_empty() {
            bail!(
                "rubric.judge_command is set but reward = {:?}: the judge runs only with reward = \"rubric\"",
                self.reward
            );
        }
        if !(self.rubric.timeout_s.is_finite() && self.rubric.timeout_s > 0.0 && self.rubric.timeout_s < 1e9) {
            bail!("rubric.timeout_s = {}: must be > 0 seconds", self.rubric.timeout_s);
        }
        if self.ahpo.enabled {
            if !(1..=self.num_generations).contains(&self.ahpo.success_threshold) {
                bail!(
                    "ahpo.success_threshold = {}: must be in 1..=num_generations ({})",
                    self.ahpo.success_threshold,
                    self.num_generations
                );
            }
            if !(self.ahpo.coef.is_finite() && self.ahpo.coef > 0.0) {
                bail!("ahpo.coef = {}: must be > 0", self.ahpo.coef);
            }
        }
        if self.early_rejection.enabled {
            let e = &self.early_rejection;
            if !(2..=self.num_generations).contains(&e.keep) {
                bail!("early_rejection.keep = {}: must be in 2..=num_generations ({})", e.keep, self.num_generations);
            }
            if !(1..self.max_completion_length).contains(&e.prefix_tokens) {
                bail!(
                    "early_rejection.prefix_tokens = {}: must be in 1..max_completion_length ({})",
                    e.prefix_tokens,
                    self.max_completion_length
                );
            }
            if self.ahpo.enabled && self.ahpo.success_threshold > e.keep {
                bail!(
                    "ahpo.success_threshold = {} exceeds early_rejection.keep = {} (the group size after rejection)",
                    self.ahpo.success_threshold,
                    e.keep
                );
            }
        }
        if self.overlong_buffer > self.max_completion_length {
            bail!(
                "overlong_buffer = {} exceeds max_completion_length = {}",
                self.overlong_buffer,
                self.max_completion_length
            );
        }
        Ok(())
    }

    pub fn sft_lr(&self) -> f32 {
        self.sft_learning_rate.unwrap_or(self.learning_rate)
    }

    /// Completions per prompt that are rewarded and trained on: `num_generations`, or
    /// `early_rejection.keep` when early rejection is on.
    pub fn group_size(&self) -> usize {
        if self.early_rejection.enabled {
            self.early_rejection.keep
        } else {
            self.num_generations
        }
    }

    pub fn prompts_per_step(&self) -> usize {
        self.generation_batch_size / self.num_generations
    }

    pub fn reward_kind(&self) -> Result<RewardKind> {
        Ok(match self.reward.as_str() {
            "accuracy" => RewardKind::Accuracy,
            "laser" => RewardKind::Laser,
            "laser_d" => RewardKind::LaserD,
            "laser_de" => RewardKind::LaserDe,
            "pear" => RewardKind::Pear,
            "dro" => RewardKind::Dro,
            "rubric" => RewardKind::Rubric,
            other => bail!("reward = {other:?}: expected accuracy, laser, laser_d, laser_de, pear, dro or rubric"),
        })
    }

    pub fn loss_type(&self) -> Result<LossType> {
        Ok(match self.loss_type.as_str() {
            "dapo" | "token_mean" => LossType::Dapo,
            "grpo" => LossType::Grpo,
            "dr_grpo" => LossType::DrGrpo,
            other => bail!("loss_type = {other:?}: expected dapo, grpo or dr_grpo"),
        })
    }

    pub fn scale(&self) -> Result<crate::advantage::ScaleRewards> {
        self.scale_rewards.parse().map_err(|e| anyhow::anyhow!("scale_rewards = {:?}: {e}", self.scale_rewards))
    }

    pub fn laser_repetition(&self) -> Result<crate::reward::laser::RepetitionRule> {
        self.laser.repetition.parse().map_err(|e| anyhow::anyhow!("laser.repetition = {e}"))
    }

    pub fn dro_weighting(&self) -> Result<crate::reward::dro::R3Weighting> {
        use crate::reward::dro::R3Weighting;
        Ok(match self.dro.weighting.as_str() {
            "normalized" => R3Weighting::Normalized,
            "softmax" if self.dro.tau > 0.0 => R3Weighting::Softmax { tau: self.dro.tau },
            "top_quantile" if self.dro.quantile > 0.0 && self.dro.quantile <= 1.0 => {
                R3Weighting::TopQuantile { q: self.dro.quantile }
            }
            "softmax" => bail!("dro.tau = {}: must be > 0", self.dro.tau),
            "top_quantile" => bail!("dro.quantile = {}: must be in (0, 1]", self.dro.quantile),
            other => bail!("dro.weighting = {other:?}: expected normalized, softmax or top_quantile"),
        })
    }

    /// `dro.reward_model`, parsed.
    pub fn dro_reward_model(&self) -> Result<DroRewardModel> {
        Ok(match self.dro.reward_model.as_str() {
            "policy" => DroRewardModel::Policy,
            "reference" => DroRewardModel::Reference,
            "lagged" => DroRewardModel::Lagged,
            other => bail!("dro.reward_model = {other:?}: expected policy, reference or lagged"),
        })
    }

    /// The policy loss's knobs, checked.
    pub fn loss_config(&self) -> Result<GrpoLossConfig> {
        let kl = match self.kl_loss_type.as_str() {
            "k1" | "kl" => Kl::K1,
            "k2" | "mse" => Kl::K2,
            "k3" | "low_var_kl" => Kl::K3,
            other => bail!("kl_loss_type = {other:?}: expected k1, k2 or k3"),
        };
        let c = GrpoLossConfig {
            eps_low: self.epsilon,
            eps_high: self.epsilon_high,
            dual_clip: (self.clip_ratio_c > 0.0).then_some(self.clip_ratio_c),
            beta: self.beta,
            kl,
            entropy_coef: self.entropy_coeff,
        };
        c.validate()
            .map_err(|e| anyhow::anyhow!("epsilon / epsilon_high / clip_ratio_c / beta / entropy_coeff: {e}"))?;
        Ok(c)
    }

    fn lr_schedule_check(&self) -> Result<()> {
        match self.lr_scheduler_type.as_str() {
            "constant" | "linear" | "cosine" => Ok(()),
            other => bail!("lr_scheduler_type = {other:?}: expected constant, linear or cosine"),
        }
    }

    /// Learning rate at RL step `step` (0-based) of `max_steps`: linear warm-up over
    /// `warmup_steps`, then the schedule from `learning_rate` down to 0 at `max_steps`.
    pub fn lr_at(&self, step: usize) -> f32 {
        let base = self.learning_rate;
        if step < self.warmup_steps {
            return base * (step + 1) as f32 / self.warmup_steps as f32;
        }
        let span = self.max_steps.saturating_sub(self.warmup_steps).max(1) as f32;
        let progress = ((step - self.warmup_steps) as f32 / span).min(1.0);
        match self.lr_scheduler_type.as_str() {
            "linear" => base * (1.0 - progress),
            "cosine" => base * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos()),
            _ => base,
        }
    }
}

/// A `--set` value: TOML when it parses as one (numbers, booleans, quoted strings, arrays),
/// else the raw text as a string.
fn parse_value(text: &str) -> toml::Value {
    format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

fn set_path(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let mut parts = key.split('.').peekable();
    let mut cur = table;
    while let Some(part) = parts.next() {
        if part.is_empty() {
            bail!("empty key segment in {key:?}");
        }
        if parts.peek().is_none() {
            cur.insert(part.to_string(), value);
            return Ok(());
        }
        let entry = cur.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().with_context(|| format!("{part:?} is not a table"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, sets: &[&str]) -> Result<TrainConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, text).unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        TrainConfig::load(Some(&path), &sets)
    }

    #[test]
    fn defaults_then_file_then_flags() {
        let c = load("model = \"m\"\nbeta = 0.04\n[laser]\nalpha = 0.3\n", &["beta=0.1", "reward=laser_d"]).unwrap();
        assert_eq!(c.model.as_deref(), Some(Path::new("m")));
        assert_eq!(c.beta, 0.1, "flag beats file");
        assert_eq!(c.laser.alpha, 0.3, "file beats default");
        assert_eq!(c.laser.monitor_every, 20, "default kept");
        assert_eq!(c.reward_kind().unwrap(), RewardKind::LaserD);
        assert_eq!(c.epsilon_high, 0.28);
        let c = load("model = \"m\"", &["laser.alpha=0.7", "system_prompt=Think step by step."]).unwrap();
        assert_eq!(c.laser.alpha, 0.7);
        assert_eq!(c.system_prompt.as_deref(), Some("Think step by step."));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let err = |text: &str, sets: &[&str]| format!("{:#}", load(text, sets).unwrap_err());
        assert!(err("model = \"m\"\nlearning_rat = 1e-6\n", &[]).contains("learning_rat"));
        assert!(err("model = \"m\"\n[laser]\nalpah = 1\n", &[]).contains("alpah"));
        assert!(err("model = \"m\"\n", &["top_p=1.5"]).contains("top_p"));
        assert!(err("model = \"m\"\n", &["num_generations=3"]).contains("generation_batch_size"));
        assert!(err("model = \"m\"\n", &["loss_type=ppo"]).contains("loss_type"));
        assert!(err("model = \"m\"\n", &["reward=vibes"]).contains("reward"));
        assert!(err("model = \"m\"\n", &["epsilon=1.5"]).contains("epsilon"));
        assert!(err("model = \"m\"\n", &["scale_rewards=max"]).contains("scale_rewards"));
        assert!(err("model = \"m\"\n", &["beta"]).contains("key=value"));
        assert!(err("model = \"m\"\n", &["temperature=0"]).contains("temperature"));
        assert!(err("model = \"m\"\n", &["adam_epsilon=0"]).contains("adam_epsilon"));
        assert!(err("model = \"m\"\n", &["weight_decay=-1"]).contains("weight_decay"));
        assert!(err("model = \"m\"\n", &["laser.alpha=nan"]).contains("laser.alpha"));
        let e = err("model = \"m\"\n", &["reward=\"dro\"", "dro.reward_model=\"teacher\""]);
        assert!(e.contains("dro.reward_model") && e.contains("lagged"), "{e}");
        let e = err("model = \"m\"\n", &["reward=\"dro\"", "dro.reward_model=\"lagged\"", "dro.lag_steps=0"]);
        assert!(e.contains("dro.lag_steps"), "{e}");
        for reward in ["laser", "laser_de"] {
            let e = err("model = \"m\"\n", &[&format!("reward=\"{reward}\""), "laser.repetition=\"verl\""]);
            assert!(e.contains("laser.repetition") && e.contains("ngram"), "{e}");
        }
        let e = err("model = \"m\"\n[rubric]\njudge_command = [\"python3\", \"j.py\"]\n", &[]);
        assert!(e.contains("rubric.judge_command") && e.contains("\"accuracy\""), "{e}");
        assert!(err("model = \"m\"\n", &["num_generations=1", "generation_batch_size=4"]).contains("num_generations"));
        assert!(
            err("model = \"m\"\n", &["generation_batch_size=4611686018427387904"]).contains("generation_batch_size")
        );
        assert!(err("", &["resume_from_checkpoint=\"c\"", "beta=0.1"]).contains("model"));
        assert!(err("model = \"m\"\nbeta = \"high\"\n", &[]).contains("beta = \"high\""));
        assert!(err("", &[]).contains("model"));
        assert!(err("model = [", &[]).contains("run.toml"));
    }

    #[test]
    fn learning_rate_schedules() {
        let c = TrainConfig { learning_rate: 1.0, max_steps: 10, warmup_steps: 2, ..Default::default() };
        assert_eq!(c.lr_at(0), 0.5);
        assert_eq!(c.lr_at(1), 1.0);
        assert_eq!(c.lr_at(9), 1.0);
        let lin = TrainConfig { lr_scheduler_type: "linear".into(), ..c.clone() };
        assert_eq!(lin.lr_at(2), 1.0);
        assert!((lin.lr_at(6) - 0.5).abs() < 1e-6);
        let cos = TrainConfig { lr_scheduler_type: "cosine".into(), ..c };
        assert!((cos.lr_at(6) - 0.5).abs() < 1e-6);
        assert!(cos.lr_at(9) < 0.05);
    }
}
