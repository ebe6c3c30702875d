//! `smelt train`: the GRPO-family loop (DESIGN.md "Trainer").
//!
//! ```text
//! (optional) supervised warm-up on the examples' solutions
//! per step: prompts → G rollouts each (logp_old, entropy recorded) → reward
//!           (accuracy | LASER/-D/-DE | PEAR | DRO R3, + DAPO overlong) → advantages
//!           → [dynamic sampling] → micro-batches → num_iterations × (accumulate, clip, AdamW)
//!           → one JSON line in log.jsonl; eval every eval_steps; checkpoint every save_steps
//! ```
//!
//! Checkpoints are Hugging Face model directories (`checkpoint-<step>/`) plus
//! `trainer_state/` (AdamW moments, master weights, step, data position, LASER targets),
//! written to a temporary directory and renamed into place. `resume_from_checkpoint` continues
//! a run from one.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use smelt_engine::Rng;
use smelt_kernels::adamw::AdamW;
use smelt_kernels::grpo_loss::LossType;
use smelt_kernels::logprob_entropy::LogprobEntropyOpts;
use smelt_kernels::sample::SamplingConfig;
use smelt_models::{
    generate, generate_pruned, generate_with_cache, Checkpoint, GenerateOptions, Generation, KvCache, LoadOptions,
    Message, Packed, Qwen, RenderOptions,
};

use crate::advantage::{advantages, groups_with_signal, RewardStats};
use crate::config::{compute_dtype, parse_device, DroRewardModel, RewardKind, TrainConfig};
use crate::data::{self, Example, Sampler};
use crate::reward::correctness::{judge, CorrectnessConfig, Outcome};
use crate::reward::laser::{adapt_targets, Difficulty, LaserTargets, MonitorResponse, TargetSearch};
use crate::reward::rubric::{rubric_reward, CommandJudge, ContainsJudge, Judge, JudgeRequest};
use crate::step::{PolicyStep, StepBatch, StepConfig, StepStats};

/// What a finished run reports (also the last lines of `log.jsonl`).
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Mean reward of each RL step's rollouts, in order.
    pub step_rewards: Vec<f32>,
    /// Fraction of correct rollouts per RL step.
    pub step_accuracy: Vec<f32>,
    /// (step, greedy accuracy on the held-out set).
    pub evals: Vec<(usize, f32)>,
    /// Mean NLL of each supervised warm-up step.
    pub sft_nll: Vec<f32>,
    /// Checkpoint directories written.
    pub checkpoints: Vec<PathBuf>,
}

/// One completion with everything the rewards read.
#[derive(Clone)]
struct Rollout {
    /// Index into the step's prompt list.
    prompt: usize,
    gen: Generation,
    outcome: Outcome,
    /// Index of the first `</think>` in the completion.
    think_end: Option<usize>,
    /// Completion tokens excluding the stop token.
    len: usize,
    truncated: bool,
    /// A success for AHPO: the answer is correct, or with rubric rewards every factual
    /// criterion passed (reward 1).
    solved: bool,
    /// The completion's text (special tokens kept), for judges.
    text: String,
    reward: f32,
    /// Reflection phrases in the thinking phase (logged, not rewarded).
    reflections: usize,
}

/// Per-sequence scores without gradient (see [`Trainer::score`]).
struct Scored {
    logp: Vec<Vec<f32>>,
    /// Empty unless ranks were asked for.
    rank: Vec<Vec<u32>>,
}

/// A training run: the model, its optimizer state, data and bookkeeping.
pub struct Trainer {
    pub cfg: TrainConfig,
    ckpt: Checkpoint,
    pub model: Qwen,
    /// The frozen model RL starts from: the KL reference (β > 0) and DRO's
    /// `dro.reward_model = "reference"`.
    reference: Option<Qwen>,
    /// DRO's `dro.reward_model = "lagged"`: a copy of the policy, refreshed every
    /// `dro.lag_steps` steps.
    lagged: Option<Qwen>,
    policy: PolicyStep,
    train: Vec<Example>,
    eval: Vec<Example>,
    /// Chat-rendered, tokenized prompts of `train` / `eval`.
    train_ids: Vec<Vec<u32>>,
    eval_ids: Vec<Vec<u32>>,
    /// Tokenized `solution` + eos of each `train` example that has one, when the warm-up or
    /// AHPO needs them (empty otherwise).
    solution_ids: Vec<Option<Vec<u32>>>,
    stop_ids: Vec<u32>,
    think_end_id: Option<u32>,
    /// Indices into `train` that RL samples prompts from (all, unless DRO's filter narrowed
    /// them); `sampler` walks positions of this list.
    active: Vec<usize>,
    sampler: Sampler,
    correctness: CorrectnessConfig,
    laser_targets: LaserTargets,
    /// The rubric judge (`reward = "rubric"`); a RefCell because judging happens inside the
    /// `&self` reward pass and an external judge's pipes need `&mut`.
    judge: Option<RefCell<Box<dyn Judge>>>,
    /// RL steps done.
    pub step: usize,
    log: File,
    started: Instant,
}

/// Runs a whole training job: warm-up, RL steps, evaluations, checkpoints.
pub fn train(cfg: TrainConfig) -> Result<Summary> {
    let mut t = Trainer::new(cfg)?;
    t.run()
}

impl Trainer {
    pub fn new(cfg: TrainConfig) -> Result<Trainer> {
        cfg.validate()?;
        let kind = cfg.reward_kind()?;
        let resume = cfg.resume_from_checkpoint.clone();
        let model_dir = resume.clone().or_else(|| cfg.model.clone()).context("model: required")?;
        let ckpt = Checkpoint::open(&model_dir).with_context(|| format!("model {}", model_dir.display()))?;
        let device = parse_device(&cfg.device).map_err(|e| anyhow::anyhow!("device = {e:#}"))?;
        let dtype = compute_dtype(&cfg.dtype, device).map_err(|e| anyhow::anyhow!("dtype = {e:#}"))?;
        let load = LoadOptions { dtype, device, check_finite: true };
        let mut model = Qwen::new(ckpt.config.clone(), ckpt.load_weights(&load)?);
        model.recompute = cfg.gradient_checkpointing;
        smelt_models::set_cuda_graphs(cfg.cuda_graphs);
        let dro_model = if kind == RewardKind::Dro { Some(cfg.dro_reward_model()?) } else { None };
        let reference = if cfg.beta > 0.0 || dro_model == Some(DroRewardModel::Reference) {
            // The reference is the model RL starts from: `model`, or after a supervised
            // warm-up the warmed-up model, which the run saves as checkpoint-0.
            let base = match (&resume, cfg.sft_steps > 0) {
                (Some(_), true) => cfg.output_dir.join("checkpoint-0"),
                _ => cfg.model.clone().unwrap_or_else(|| model_dir.clone()),
            };
            let rc = Checkpoint::open(&base).with_context(|| format!("reference model {}", base.display()))?;
            Some(Qwen::new(rc.config.clone(), rc.load_weights(&load)?))
        } else {
            None
        };

        let lagged = match dro_model {
            // A resumed run takes the copy its checkpoint saved, so it scores as the run would
            // have without the interruption; a checkpoint without one (written before it was
            // saved, or by a run with another scorer) starts from the policy.
            Some(DroRewardModel::Lagged) => {
                let saved = resume.as_ref().map(|d| d.join(LAGGED_DIR)).filter(|d| d.is_dir());
                let weights = match &saved {
                    Some(d) => smelt_models::Weights::load(d, &model.config, &load)
                        .with_context(|| format!("DRO's lagged model {}", d.display()))?,
                    None => deep_copy(&model.weights)?,
                };
                if let (None, Some(dir), false) = (&saved, &resume, cfg.quiet) {
                    eprintln!(
                        "warning: {} holds no DRO lagged model; it starts as a copy of the policy",
                        dir.display()
                    );
                }
                Some(Qwen::new(model.config.clone(), weights))
            }
            _ => None,
        };

        let tok = ckpt.tokenizer()?;
        let think_end_id = tok.token_id("</think>").ok();
        let needs_think = cfg.require_think || matches!(kind, RewardKind::Pear | RewardKind::Dro);
        if needs_think && think_end_id.is_none() {
            bail!(
                "{}: the tokenizer has no `</think>` token, which reward = {:?} / require_think need",
                ckpt.dir.display(),
                cfg.reward
            );
        }
        let stop_ids = ckpt.stop_token_ids()?;
        let eos_id = match &ckpt.tokenizer_config.eos_token {
            Some(t) => tok.token_id(t)?,
            None => {
                *stop_ids.first().context("the model names no eos token (generation_config / config / tokenizer)")?
            }
        };

        let all = data::load(&cfg.dataset).with_context(|| format!("dataset {:?}", cfg.dataset))?;
        let split = data::split(all, cfg.eval_dataset.as_deref(), cfg.eval_size, cfg.seed)?;
        let max_pos = ckpt.config.max_position_embeddings;
        let render = |examples: &[Example], what: &str| -> Result<Vec<Vec<u32>>> {
            examples
                .iter()
                .enumerate()
                .map(|(i, ex)| {
                    let mut msgs = Vec::new();
                    if let Some(s) = &cfg.system_prompt {
                        msgs.push(Message::system(s.clone()));
                    }
                    msgs.push(Message::user(ex.prompt.clone()));
                    let text = ckpt.render_chat(&msgs, &RenderOptions { add_generation_prompt: true, enable_thinking: None })?;
                    let ids = tok.encode(&text, false)?;
                    if ids.len() > cfg.max_prompt_length {
                        bail!(
                            "{what} example {i} {}: prompt is {} tokens, over max_prompt_length = {}",
                            ex.label(),
                            ids.len(),
                            cfg.max_prompt_length
                        );
                    }
                    if ids.len() + cfg.max_completion_length > max_pos {
                        bail!(
                            "{what} example {i} {}: prompt ({} tokens) + max_completion_length ({}) exceeds the model's max_position_embeddings = {max_pos}",
                            ex.label(),
                            ids.len(),
                            cfg.max_completion_length
                        );
                    }
                    Ok(ids)
                })
                .collect()
        };
        let train_ids = render(&split.train, "dataset")?;
        if kind == RewardKind::Dro {
            // R3 scores prompt + reasoning (up to max_completion_length, + `</think>`) + answer.
            for (i, (ex, ids)) in split.train.iter().zip(&train_ids).enumerate() {
                let n = ids.len() + cfg.max_completion_length + 1 + tok.encode(&ex.answer, false)?.len();
                if n > max_pos {
                    bail!(
                        "dataset example {i} {}: DRO scores prompt + max_completion_length + `</think>` + answer = \
                         {n} tokens, over max_position_embeddings = {max_pos}",
                        ex.label()
                    );
                }
            }
        }
        let eval_ids = render(&split.eval, "eval")?;
        let judge = if kind == RewardKind::Rubric {
            let builtin = cfg.rubric.judge_command.is_empty();
            for (i, ex) in split.train.iter().enumerate() {
                let Some(rubric) = &ex.rubric else {
                    bail!("reward = \"rubric\": training example {i} {} has no \"rubric\"", ex.label());
                };
                if let Some(c) = rubric.iter().find(|c| builtin && c.pattern.is_none()) {
                    bail!(
                        "reward = \"rubric\" with the built-in judge (rubric.judge_command empty): training example \
                         {i} {}, criterion {:?} has no \"pattern\"",
                        ex.label(),
                        c.criterion
                    );
                }
            }
            let judge: Box<dyn Judge> = if builtin {
                Box::new(ContainsJudge)
            } else {
                Box::new(CommandJudge::spawn(&cfg.rubric.judge_command, Duration::from_secs_f64(cfg.rubric.timeout_s))?)
            };
            Some(RefCell::new(judge))
        } else {
            None
        };
        let solution_ids = if cfg.sft_steps > 0 || cfg.ahpo.enabled {
            let ids = solutions(&split.train, &train_ids, tok, eos_id, max_pos)?;
            if ids.iter().all(Option::is_none) {
                let who =
                    if cfg.sft_steps > 0 { format!("sft_steps = {}", cfg.sft_steps) } else { "ahpo.enabled".into() };
                bail!("{who}: no training example of dataset {:?} has a \"solution\"", cfg.dataset);
            }
            ids
        } else {
            Vec::new()
        };

        let step_cfg = StepConfig {
            loss: cfg.loss_config()?,
            loss_type: cfg.loss_type()?,
            max_completion_length: cfg.max_completion_length,
            temperature: cfg.temperature,
            optim: AdamW {
                lr: cfg.learning_rate,
                beta1: cfg.adam_beta1,
                beta2: cfg.adam_beta2,
                eps: cfg.adam_epsilon,
                weight_decay: cfg.weight_decay,
            },
            max_grad_norm: (cfg.max_grad_norm > 0.0).then_some(cfg.max_grad_norm),
            sync_phases: false,
        };
        let mut policy = PolicyStep::new(&model, step_cfg)?;
        let correctness = CorrectnessConfig {
            correct: cfg.correct_reward,
            incorrect: cfg.incorrect_reward,
            bad_format: cfg.format_reward,
            require_think: cfg.require_think,
            rel_tol: cfg.answer_rel_tol,
        };
        let l = cfg.laser.target_length;
        let mut laser_targets = LaserTargets::uniform(l);
        let mut sampler = Sampler::new(split.train.len(), cfg.seed);
        let mut active: Vec<usize> = (0..split.train.len()).collect();
        let mut step = 0;

        if resume.is_none() && !cfg.overwrite_output_dir && cfg.output_dir.join("log.jsonl").exists() {
            bail!(
                "output_dir {} already holds a run (log.jsonl); resume it with resume_from_checkpoint, or set \
                 overwrite_output_dir = true, or choose another output_dir",
                cfg.output_dir.display()
            );
        }
        std::fs::create_dir_all(&cfg.output_dir)
            .with_context(|| format!("creating output_dir {}", cfg.output_dir.display()))?;
        if let Some(dir) = &resume {
            let state = TrainerState::read(&dir.join("trainer_state"))?;
            if state.train_size != split.train.len() || state.data_fingerprint != fingerprint(cfg.seed, &split.train) {
                bail!(
                    "{}: the run trained on other data ({} examples, fingerprint {}); this configuration's dataset, \
                     eval split or seed gives {} examples, fingerprint {}",
                    dir.display(),
                    state.train_size,
                    state.data_fingerprint,
                    split.train.len(),
                    fingerprint(cfg.seed, &split.train)
                );
            }
            policy.load_state(&dir.join("trainer_state").join("optimizer.safetensors"), state.optimizer_steps)?;
            sampler = state.sampler;
            active = state.active;
            laser_targets = state.laser_targets;
            step = state.step;
        }
        let log_path = cfg.output_dir.join("log.jsonl");
        // A resumed run continues its log; a new one (overwrite_output_dir) starts it afresh.
        let log = OpenOptions::new()
            .create(true)
            .append(resume.is_some())
            .write(true)
            .truncate(resume.is_none())
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let resolved = toml::to_string(&cfg).context("serialising the configuration")?;
        std::fs::write(cfg.output_dir.join("config.toml"), resolved)
            .with_context(|| format!("writing {}", cfg.output_dir.join("config.toml").display()))?;
        Ok(Trainer {
            cfg,
            ckpt,
            model,
            reference,
            lagged,
            policy,
            train: split.train,
            eval: split.eval,
            train_ids,
            eval_ids,
            solution_ids,
            stop_ids,
            think_end_id,
            active,
            sampler,
            correctness,
            laser_targets,
            judge,
            step,
            log,
            started: Instant::now(),
        })
    }

    pub fn run(&mut self) -> Result<Summary> {
        let mut summary = Summary::default();
        let kind = self.cfg.reward_kind()?;
        if self.step == 0 && self.cfg.sft_steps > 0 {
            summary.sft_nll = self.sft()?;
            // RL starts from here: fresh AdamW moments (SFT's gradient scale would damp RL's
            // steps for ~1/(1−β2) steps), the warmed-up model as the KL reference, and a
            // checkpoint a resumed run can take that reference from.
            self.policy.reset_optimizer()?;
            if let Some(r) = &self.reference {
                copy_weights(&r.weights, &self.model.weights)?;
            }
            summary.checkpoints.push(self.save()?);
        }
        let acc = self.evaluate()?;
        summary.evals.push((self.step, acc));
        while self.step < self.cfg.max_steps {
            if matches!(kind, RewardKind::LaserD | RewardKind::LaserDe) && self.step % self.cfg.laser.monitor_every == 0
            {
                self.monitor_laser_targets()?;
            }
            if let Some(lagged) = &self.lagged {
                if self.step % self.cfg.dro.lag_steps == 0 {
                    copy_weights(&lagged.weights, &self.model.weights)?;
                }
            }
            if kind == RewardKind::Dro && self.cfg.dro.filter && self.step % self.cfg.dro.filter_every == 0 {
                self.dro_filter()?;
            }
            let (reward, accuracy) = self.rl_step()?;
            summary.step_rewards.push(reward);
            summary.step_accuracy.push(accuracy);
            if self.cfg.eval_steps > 0 && self.step % self.cfg.eval_steps == 0 && self.step < self.cfg.max_steps {
                let acc = self.evaluate()?;
                summary.evals.push((self.step, acc));
            }
            if self.cfg.save_steps > 0 && self.step % self.cfg.save_steps == 0 && self.step < self.cfg.max_steps {
                summary.checkpoints.push(self.save()?);
            }
        }
        let acc = self.evaluate()?;
        summary.evals.push((self.step, acc));
        summary.checkpoints.push(self.save()?);
        Ok(summary)
    }

    fn emit(&mut self, mut v: Value) -> Result<()> {
        v["elapsed_s"] = json!(self.started.elapsed().as_secs_f64());
        let line = serde_json::to_string(&v)?;
        writeln!(self.log, "{line}").context("writing log.jsonl")?;
        if !self.cfg.quiet {
            eprintln!("{line}");
        }
        Ok(())
    }

    /// Supervised warm-up: token-mean NLL of each example's solution (and eos) given its
    /// prompt. The policy loss with advantage 1 and ratio 1 has exactly the NLL's gradient,
    /// so the same step does it. Returns each step's mean NLL (before its update).
    pub fn sft(&mut self) -> Result<Vec<f32>> {
        let with_solution: Vec<usize> =
            (0..self.solution_ids.len()).filter(|&i| self.solution_ids[i].is_some()).collect();
        if with_solution.is_empty() {
            bail!(
                "supervised warm-up: no solutions loaded (no training example has a \"solution\", or the trainer \
                 was built with sft_steps = 0 and AHPO off)"
            );
        }
        let mut sampler = Sampler::new(with_solution.len(), self.cfg.seed ^ 0x5f7);
        let mut nll = Vec::with_capacity(self.cfg.sft_steps);
        let saved = self.policy.config.clone();
        self.policy.config.loss_type = LossType::Dapo;
        self.policy.config.temperature = 1.0;
        self.policy.config.optim.lr = self.cfg.sft_lr();
        for s in 0..self.cfg.sft_steps {
            let picks: Vec<usize> =
                sampler.take(self.cfg.sft_batch_size).into_iter().map(|k| with_solution[k]).collect();
            let micro = self.supervised_batches(&picks, 1.0)?;
            let st = self.policy.step_accumulated(&self.model, &micro)?;
            nll.push(-st.mean_logp);
            self.emit(json!({"phase": "sft", "sft_step": s + 1, "nll": -st.mean_logp, "grad_norm": st.grad_norm}))?;
        }
        self.policy.config = saved;
        Ok(nll)
    }

    fn sampling(&self) -> SamplingConfig {
        SamplingConfig {
            temperature: self.cfg.temperature,
            top_k: (self.cfg.top_k > 0).then_some(self.cfg.top_k),
            top_p: self.cfg.top_p,
        }
    }

    /// G rollouts of each prompt (prompt-major), judged; with `room = Some(r)` also the
    /// generation's KV cache (rollout i in slot i, `r` spare positions per slot), for
    /// teacher-forcing tokens after the rollouts.
    fn rollout(&self, prompts: &[usize], seed: u64, room: Option<usize>) -> Result<(Vec<Rollout>, Option<KvCache>)> {
        let ids: Vec<Vec<u32>> = prompts.iter().map(|&i| self.train_ids[i].clone()).collect();
        let opts = self.rollout_options(seed);
        let (gens, cache) = match room {
            Some(r) => generate_with_cache(&self.model, &ids, &opts, r)?,
            None => (generate(&self.model, &ids, &opts)?, None),
        };
        let rs = gens.into_iter().map(|g| self.judge(g, prompts)).collect::<Result<_>>()?;
        Ok((rs, cache))
    }

    /// How rollouts are generated: G samples per prompt of up to `max_completion_length` tokens.
    fn rollout_options(&self, seed: u64) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.cfg.max_completion_length,
            sampling: self.sampling(),
            n_samples: self.cfg.num_generations,
            seed,
            stop_ids: self.stop_ids.clone(),
        }
    }

    /// The model that scores DRO's reference answers (`dro.reward_model`).
    fn dro_scorer(&self) -> Result<&Qwen> {
        Ok(match self.cfg.dro_reward_model()? {
            DroRewardModel::Policy => &self.model,
            DroRewardModel::Reference => self.reference.as_ref().context("DRO: the reference model is not loaded")?,
            DroRewardModel::Lagged => self.lagged.as_ref().context("DRO: the lagged model is not loaded")?,
        })
    }

    /// Whether DRO's teacher forcing runs on the rollouts' KV cache: only the policy made it.
    fn dro_on_cache(&self) -> Result<bool> {
        Ok(self.cfg.dro_reward_model()? == DroRewardModel::Policy)
    }

    /// Spare cache positions DRO's teacher forcing needs after the rollouts of `prompts`: the
    /// longest reference answer, plus one (see [`Trainer::teacher_force`]); `None` when it does
    /// not run on the rollouts' cache ([`Trainer::dro_on_cache`]).
    fn dro_room(&self, prompts: &[usize]) -> Result<Option<usize>> {
        if !self.dro_on_cache()? {
            return Ok(None);
        }
        let mut room = 0;
        for &ex in prompts {
            room = room.max(self.answer_ids(ex)?.len() + 1);
        }
        Ok(Some(room))
    }

    /// Example `ex`'s reference answer, tokenized (DRO's y); an error when that is empty.
    fn answer_ids(&self, ex: usize) -> Result<Vec<u32>> {
        let answer = &self.train[ex].answer;
        let y = self.ckpt.tokenizer()?.encode(answer, false)?;
        if y.is_empty() {
            bail!(
                "DRO: dataset example {ex} {}: the reference answer {answer:?} tokenizes to nothing",
                self.train[ex].label()
            );
        }
        Ok(y)
    }

    /// The RL step's rollouts: [`Trainer::rollout`], or with early rejection G samples per
    /// prompt generated for `prefix_tokens`, of which the `keep` best (by mean log-prob) are
    /// finished, in the same generation (no second prefill). Also returns the tokens the
    /// rejected samples generated, and given `room`, the generation's KV cache (see
    /// [`Trainer::rollout`]; with early rejection it holds the survivors only, rollout i in
    /// slot i).
    fn rollout_rl(
        &self,
        prompts: &[usize],
        seed: u64,
        room: Option<usize>,
    ) -> Result<(Vec<Rollout>, usize, Option<KvCache>)> {
        use crate::early_rejection::{prefix_score, survivors};
        let er = &self.cfg.early_rejection;
        if !er.enabled {
            let (rs, cache) = self.rollout(prompts, seed, room)?;
            return Ok((rs, 0, cache));
        }
        let ids: Vec<Vec<u32>> = prompts.iter().map(|&i| self.train_ids[i].clone()).collect();
        let opts = self.rollout_options(seed);
        let g = self.cfg.num_generations;
        let mut keep = |gens: &[Generation]| {
            let scores: Vec<f32> = gens.iter().map(|g| prefix_score(&g.logp)).collect();
            survivors(&scores, g, er.keep)
        };
        let (gens, cache, kept) =
            generate_pruned(&self.model, &ids, &opts, room.unwrap_or(0), er.prefix_tokens, &mut keep)?;
        let generated: usize = gens.iter().map(|g| g.ids.len()).sum();
        let mut gens: Vec<Option<Generation>> = gens.into_iter().map(Some).collect();
        let kept: Vec<Generation> = kept.iter().filter_map(|&i| gens[i].take()).collect();
        let rejected_tokens = generated - kept.iter().map(|g| g.ids.len()).sum::<usize>();
        let rollouts = kept.into_iter().map(|h| self.judge(h, prompts)).collect::<Result<Vec<_>>>()?;
        Ok((rollouts, rejected_tokens, cache.filter(|_| room.is_some())))
    }

    fn judge(&self, gen: Generation, prompts: &[usize]) -> Result<Rollout> {
        let tok = self.ckpt.tokenizer()?;
        let (len, text) = completion_text(tok, &gen)?;
        let truncated = !gen.stopped;
        let ex = &self.train[prompts[gen.prompt]];
        let outcome = judge(&text, &ex.answer, truncated, &self.correctness);
        let think_end = self.think_end_id.and_then(|t| gen.ids[..len].iter().position(|&x| x == t));
        let reflections = crate::reward::reflection::reflection_count(&text);
        let solved = outcome.is_correct();
        Ok(Rollout {
            prompt: gen.prompt,
            gen,
            outcome,
            think_end,
            len,
            truncated,
            solved,
            text,
            reward: 0.0,
            reflections,
        })
    }

    /// One RL step; returns (mean reward, accuracy) of its rollouts.
    pub fn rl_step(&mut self) -> Result<(f32, f32)> {
        let t0 = Instant::now();
        let g = self.cfg.group_size();
        let want = self.cfg.prompts_per_step();
        let kind = self.cfg.reward_kind()?;
        let mut prompts: Vec<usize> = Vec::new();
        let mut rollouts: Vec<Rollout> = Vec::new();
        // Every sampled completion, dropped groups included: the log's rollout statistics
        // describe what the policy generated, not the subset dynamic sampling kept.
        let mut sampled: Vec<Rollout> = Vec::new();
        // AHPO: training examples whose group had too few correct outputs (dropped groups too:
        // the expert term does not need the group's rewards to differ).
        let mut experts: Vec<usize> = Vec::new();
        let mut experts_missing = 0usize;
        let mut dropped_groups = 0usize;
        let mut rejected_tokens = 0usize;
        let mut terms: BTreeMap<&'static str, f64> = BTreeMap::new();
        let mut no_signal: Vec<bool> = Vec::new();
        let mut reward_s = 0.0;
        for round in 0..=self.cfg.max_resample {
            let need = want - prompts.len();
            let picks: Vec<usize> = self.sampler.take(need).into_iter().map(|k| self.active[k]).collect();
            let seed = mix(&[self.cfg.seed, self.step as u64, round as u64]);
            // DRO teacher-forces the reference answers after the rollouts' reasoning, on top of
            // the generation's cache.
            let room = if kind == RewardKind::Dro { self.dro_room(&picks)? } else { None };
            let (mut rs, rejected, mut cache) = self.rollout_rl(&picks, seed, room)?;
            rejected_tokens += rejected;
            let t_reward = Instant::now();
            let groups_no_signal = self.rewards(kind, &picks, &mut rs, &mut terms, cache.as_mut())?;
            drop(cache);
            reward_s += t_reward.elapsed().as_secs_f64();
            let rewards: Vec<f32> = rs.iter().map(|r| r.reward).collect();
            let signal = groups_with_signal(&rewards, g);
            for (p, chunk) in rs.chunks(g).enumerate() {
                let ahpo = &self.cfg.ahpo;
                if ahpo.enabled && chunk.iter().filter(|r| r.solved).count() < ahpo.success_threshold {
                    // Once per example, at most one group's worth per prompt of the step.
                    match self.solution_ids[picks[p]] {
                        Some(_) if experts.len() < want && !experts.contains(&picks[p]) => experts.push(picks[p]),
                        Some(_) => {}
                        None => experts_missing += 1,
                    }
                }
                if self.cfg.dynamic_sampling && (!signal[p] || groups_no_signal[p]) {
                    dropped_groups += 1;
                    continue;
                }
                let base = prompts.len();
                prompts.push(picks[p]);
                no_signal.push(groups_no_signal[p]);
                rollouts.extend(chunk.iter().map(|r| Rollout { prompt: base, ..r.clone() }));
            }
            sampled.extend(rs);
            if !self.cfg.dynamic_sampling || prompts.len() >= want {
                break;
            }
        }
        // Generation and rewards, every resampling round; reward_s is the rewards' share.
        let rollout_s = t0.elapsed().as_secs_f64();
        let mean = |v: &[f32]| if v.is_empty() { 0.0 } else { v.iter().sum::<f32>() / v.len() as f32 };
        let frac =
            |f: &dyn Fn(&Rollout) -> bool| sampled.iter().filter(|r| f(r)).count() as f32 / sampled.len().max(1) as f32;
        let reward_stats = RewardStats::of(&sampled.iter().map(|r| r.reward).collect::<Vec<_>>());
        let mean_reward = reward_stats.mean;
        let accuracy = frac(&|r| r.outcome.is_correct());

        let lr = self.cfg.lr_at(self.step);
        self.policy.config.optim.lr = lr;
        let mut stats: Option<StepStats> = None;
        let t1 = Instant::now();
        let mut micro = Vec::new();
        if !rollouts.is_empty() {
            let rewards: Vec<f32> = rollouts.iter().map(|r| r.reward).collect();
            let mut adv = advantages(&rewards, g, self.cfg.scale()?).map_err(|e| anyhow::anyhow!("advantages: {e}"))?;
            for (p, &ns) in no_signal.iter().enumerate() {
                if ns {
                    adv[p * g..(p + 1) * g].fill(0.0);
                }
            }
            let seqs: Vec<Vec<u32>> =
                rollouts.iter().map(|r| [self.train_ids[prompts[r.prompt]].as_slice(), &r.gen.ids].concat()).collect();
            let prompt_lens: Vec<usize> = rollouts.iter().map(|r| self.train_ids[prompts[r.prompt]].len()).collect();
            let keep: Vec<bool> =
                rollouts.iter().map(|r| !(self.cfg.mask_truncated_completions && r.truncated)).collect();
            let old: Vec<&[f32]> = rollouts.iter().map(|r| r.gen.logp.as_slice()).collect();
            micro = self.micro_batches(&seqs, &prompt_lens, &adv, Some(&old), &keep, false)?;
        }
        // The expert term rides in its own micro-batches (ℓ_old = ℓ: ratio 1 in every pass);
        // the loss aggregates its tokens with the rollouts'.
        micro.extend(self.supervised_batches(&experts, self.cfg.ahpo.coef)?);
        let tokens: usize = micro.iter().map(|b| b.packed.num_tokens()).sum();
        if !micro.is_empty() {
            // Log the first pass's loss (on-policy) and the last pass's clipping and KL; an
            // update skipped in any pass shows as update_applied = false.
            let mut applied = true;
            for it in 0..self.cfg.num_iterations {
                let s = self.policy.step_accumulated(&self.model, &micro)?;
                applied &= s.applied;
                let first_loss = stats.map_or(s.loss, |f| f.loss);
                stats = Some(StepStats { loss: if it == 0 { s.loss } else { first_loss }, applied, ..s });
            }
        }
        let update_s = t1.elapsed().as_secs_f64();
        self.step += 1;

        let lens: Vec<f32> = sampled.iter().map(|r| r.len as f32).collect();
        let think: Vec<f32> = sampled.iter().filter_map(|r| r.think_end.map(|k| k as f32)).collect();
        let answer: Vec<f32> = sampled.iter().filter_map(|r| r.think_end.map(|k| (r.len - k - 1) as f32)).collect();
        let ent: Vec<f32> = sampled.iter().flat_map(|r| r.gen.entropy.iter().copied()).collect();
        let n = sampled.len().max(1) as f64;
        let mut line = json!({
            "phase": "rl",
            "step": self.step,
            "lr": lr,
            "reward": mean_reward,
            "reward_std": reward_stats.std,
            "accuracy": accuracy,
            "bad_format": frac(&|r| r.outcome == Outcome::BadFormat),
            "truncated": frac(&|r| r.truncated),
            "response_length": mean(&lens),
            "think_length": mean(&think),
            "answer_length": mean(&answer),
            "reflections": mean(&sampled.iter().map(|r| r.reflections as f32).collect::<Vec<_>>()),
            "rollout_entropy": mean(&ent),
            "groups_dropped": dropped_groups,
            "trained_sequences": rollouts.len() + experts.len(),
            "groups_without_signal": no_signal.iter().filter(|&&x| x).count(),
            "rollout_s": rollout_s,
            "reward_s": reward_s,
            "update_s": update_s,
            "tokens_per_s": tokens as f64 * self.cfg.num_iterations as f64 / update_s.max(1e-9),
            "peak_bytes": crate::memory::peak_bytes(self.model.device()).0,
        });
        for (k, v) in terms {
            line[format!("reward_{k}")] = json!(v / n);
        }
        if self.cfg.early_rejection.enabled {
            line["early_rejected_tokens"] = json!(rejected_tokens);
        }
        if self.cfg.ahpo.enabled {
            line["ahpo_experts"] = json!(experts.len());
            line["ahpo_without_solution"] = json!(experts_missing);
        }
        if kind.is_laser() {
            line["laser_targets"] = targets_json(&self.laser_targets);
        }
        match &stats {
            Some(s) => {
                line["loss"] = json!(s.loss);
                line["grad_norm"] = json!(s.grad_norm);
                line["clip_frac_low"] = json!(s.grpo.clip_frac_low);
                line["clip_frac_high"] = json!(s.grpo.clip_frac_high);
                line["mean_ratio"] = json!(s.grpo.mean_ratio);
                line["kl"] = json!(s.grpo.mean_kl);
                line["entropy"] = json!(s.mean_entropy);
                line["update_applied"] = json!(s.applied);
            }
            None => line["skipped"] = json!("every group's rewards were equal (dynamic_sampling)"),
        }
        self.emit(line)?;
        Ok((mean_reward, accuracy))
    }

    /// Fills each rollout's reward; returns per group whether it carries no signal (DRO's
    /// all-σ-zero case). `terms` accumulates per-term sums for the log.
    fn rewards(
        &self,
        kind: RewardKind,
        picks: &[usize],
        rs: &mut [Rollout],
        terms: &mut BTreeMap<&'static str, f64>,
        cache: Option<&mut KvCache>,
    ) -> Result<Vec<bool>> {
        use crate::reward::{laser, pear};
        let g = self.cfg.group_size();
        let mut no_signal = vec![false; picks.len()];
        // The correctness score is a term of accuracy and LASER only; PEAR, DRO and rubric
        // rewards replace it (accuracy is logged for every reward anyway).
        let base_term = kind == RewardKind::Accuracy || kind.is_laser();
        for r in rs.iter_mut() {
            let base = self.correctness.score(r.outcome);
            if base_term {
                *terms.entry("correctness").or_default() += base as f64;
            }
            r.reward = base;
        }
        match kind {
            RewardKind::Accuracy => {}
            RewardKind::Laser | RewardKind::LaserD | RewardKind::LaserDe => {
                let mode: laser::LengthShaping = self.cfg.reward.parse().map_err(|e| anyhow::anyhow!("reward: {e}"))?;
                let rule = self.cfg.laser_repetition()?;
                for chunk in rs.chunks_mut(g) {
                    let correct = chunk.iter().filter(|r| r.outcome.is_correct()).count();
                    let d = Difficulty::from_counts(correct, chunk.len());
                    let target =
                        if mode.is_adaptive() { self.laser_targets.get(d) } else { self.cfg.laser.target_length };
                    for r in chunk.iter_mut() {
                        let repetitive = mode.needs_repetition_check() && rule.is_repetitive(&r.gen.ids[..r.len]);
                        let shaped = laser::shaped_reward(
                            r.reward,
                            r.outcome,
                            r.len,
                            target,
                            repetitive,
                            self.cfg.laser.alpha,
                            mode,
                        );
                        *terms.entry("length").or_default() += (shaped - r.reward) as f64;
                        r.reward = shaped;
                    }
                }
            }
            RewardKind::Pear => {
                for r in rs.iter_mut() {
                    let (ht, ha) = pear::phase_entropy(&r.gen.entropy[..r.len], r.think_end);
                    *terms.entry("h_think").or_default() += ht as f64;
                    *terms.entry("h_answer").or_default() += ha as f64;
                    let p = &self.cfg.pear;
                    r.reward = pear::pear_reward(r.outcome.is_correct(), ht, ha, p.s, p.alpha, p.format_score);
                }
            }
            RewardKind::Dro => no_signal = self.dro_rewards(picks, rs, terms, cache)?,
            RewardKind::Rubric => {
                let judge = self.judge.as_ref().context("rubric reward without a judge")?;
                let mut requests = Vec::with_capacity(rs.len());
                for r in rs.iter() {
                    let ex = &self.train[picks[r.prompt]];
                    let criteria = ex.rubric.as_deref().with_context(|| format!("{} has no rubric", ex.label()))?;
                    requests.push(JudgeRequest { prompt: &ex.prompt, response: &r.text, answer: &ex.answer, criteria });
                }
                let verdicts = judge.borrow_mut().judge(&requests)?;
                let rewards: Vec<f32> =
                    requests.iter().zip(&verdicts).map(|(q, v)| rubric_reward(q.criteria, v)).collect();
                for (r, reward) in rs.iter_mut().zip(rewards) {
                    *terms.entry("rubric").or_default() += reward as f64;
                    r.reward = reward;
                    r.solved = reward >= 1.0;
                }
            }
        }
        if self.cfg.overlong_buffer > 0 {
            for r in rs.iter_mut() {
                let pen =
                    crate::reward::overlong_penalty(r.len, self.cfg.max_completion_length, self.cfg.overlong_buffer);
                *terms.entry("overlong").or_default() += pen as f64;
                r.reward += pen;
            }
        }
        Ok(no_signal)
    }

    /// DRO's R3: each rollout's reasoning (through `</think>`, which is appended when the
    /// rollout has none) followed by the reference answer, teacher-forced through the current
    /// policy without gradient; R = R3 + λ·(length term).
    fn dro_rewards(
        &self,
        picks: &[usize],
        rs: &mut [Rollout],
        terms: &mut BTreeMap<&'static str, f64>,
        cache: Option<&mut KvCache>,
    ) -> Result<Vec<bool>> {
        use crate::reward::dro::{baseline_shift, dro_reward, length_term, r3_rewards};
        let g = self.cfg.group_size();
        let weighting = self.cfg.dro_weighting()?;
        let mut no_signal = Vec::with_capacity(picks.len());
        let forced = self.teacher_force(picks, rs, false, cache)?;
        let baseline = if self.cfg.dro.masked_baseline { Some(self.masked_baseline(picks)?) } else { None };
        for (p, (chunk, forced)) in rs.chunks_mut(g).zip(forced).enumerate() {
            let (y_len, logp_y) = (forced.logp[0].len(), forced.logp);
            let group = r3_rewards(&logp_y, weighting);
            no_signal.push(!group.signal);
            let shift = baseline.as_ref().map_or(0.0, |b| baseline_shift(&group, &b[p]));
            for (r, r3) in chunk.iter_mut().zip(&group.rewards) {
                // No `</think>`: the whole output is reasoning and the answer is empty.
                let answer_len = r.think_end.map_or(0, |k| r.len.saturating_sub(k + 1));
                let r_len = length_term(y_len, answer_len, self.cfg.dro.length_beta);
                *terms.entry("r3").or_default() += (*r3 - shift) as f64;
                *terms.entry("dro_length").or_default() += r_len as f64;
                if baseline.is_some() {
                    *terms.entry("r3_baseline").or_default() += shift as f64;
                }
                r.reward = dro_reward(*r3 - shift, r_len, self.cfg.dro.length_lambda);
            }
        }
        Ok(no_signal)
    }

    /// DRO's masked-reasoning baseline: per example, the log-probs of its reference answer y
    /// teacher-forced right after the prompt (no reasoning), under `dro.reward_model`.
    fn masked_baseline(&self, exs: &[usize]) -> Result<Vec<Vec<f32>>> {
        let (mut seqs, mut last) = (Vec::with_capacity(exs.len()), Vec::with_capacity(exs.len()));
        for &ex in exs {
            let y = self.answer_ids(ex)?;
            last.push(y.len());
            seqs.push([self.train_ids[ex].as_slice(), &y].concat());
        }
        Ok(self.score(self.dro_scorer()?, &seqs, false, &last)?.logp)
    }

    /// Teacher-forces each example's reference answer y after the reasoning of each of its
    /// group's rollouts (through `</think>`, appended when the rollout has none), without
    /// gradient. `rs` holds the groups of `exs` in order, G rollouts each. Per group, per
    /// rollout: the log-probs ℓ^y_j and (when asked) the ranks of y's tokens.
    ///
    /// With `cache` (the generation's, with max |y| + 1 spare positions; rollout i in slot i,
    /// as [`Trainer::rollout`] and [`Trainer::rollout_rl`] return them) the prompt and
    /// reasoning are not run again: each slot is cut back to all but the last two tokens
    /// before its y, then decodes |y| + 1 tokens (those two, and y without its last
    /// token), and the outputs at the last |y| of them predict y. Re-decoding one token more than
    /// needed keeps the count the same for a whole group: a rollout cut off by the budget never
    /// decoded its last token into the cache. All slots decode together, in one call: slots
    /// whose y is shorter than the longest decode filler tokens after it, which come later in
    /// their sequence and so change nothing before them (the cache is dropped afterwards).
    /// Without a cache, a forward pass of `dro.reward_model` over prompt + reasoning + y.
    fn teacher_force(
        &self,
        exs: &[usize],
        rs: &[Rollout],
        ranks: bool,
        cache: Option<&mut KvCache>,
    ) -> Result<Vec<Scored>> {
        let think_end = self.think_end_id.context("DRO needs `</think>`")?;
        let g = rs.len() / exs.len().max(1);
        if g * exs.len() != rs.len() {
            bail!("DRO teacher forcing: {} rollouts for {} groups", rs.len(), exs.len());
        }
        let ys = exs.iter().map(|&ex| self.answer_ids(ex)).collect::<Result<Vec<_>>>()?;
        let mut seqs = Vec::with_capacity(rs.len());
        for (i, r) in rs.iter().enumerate() {
            let reasoning = match r.think_end {
                Some(k) => &r.gen.ids[..=k],
                None => &r.gen.ids[..r.len],
            };
            let close: &[u32] = if r.think_end.is_some() { &[] } else { &[think_end] };
            seqs.push([self.train_ids[exs[i / g]].as_slice(), reasoning, close, &ys[i / g]].concat());
        }
        let y_len = |i: usize| ys[i / g].len();
        let (logp, rank) = match cache {
            None => {
                // Entry t predicts token t+1: only the entries of y's tokens are needed.
                let last: Vec<usize> = (0..seqs.len()).map(y_len).collect();
                let scored = self.score(self.dro_scorer()?, &seqs, ranks, &last)?;
                (scored.logp, scored.rank)
            }
            Some(cache) => {
                if !self.dro_on_cache()? {
                    bail!(
                        "internal: DRO teacher forcing on the policy's cache with dro.reward_model = {:?}",
                        self.cfg.dro.reward_model
                    );
                }
                let n = ys.iter().map(Vec::len).max().unwrap_or(0) + 1;
                let mut slots = Vec::with_capacity(seqs.len());
                let mut tokens = Vec::with_capacity(seqs.len() * n);
                let (mut rows, mut targets) = (Vec::new(), Vec::new());
                for (i, seq) in seqs.iter().enumerate() {
                    let y = &ys[i / g];
                    let start = seq.len() - y.len() - 2;
                    // Rollout i sits in the generation's slot i.
                    cache.truncate(i, start)?;
                    slots.push(i as u32);
                    tokens.extend_from_slice(&seq[start..seq.len() - 1]);
                    tokens.extend(std::iter::repeat_n(y[y.len() - 1], n - y.len() - 1));
                    // Row 0 of each slot's block predicts y's predecessor, which is not scored.
                    rows.extend((i * n + 1..i * n + 1 + y.len()).map(|r| r as u32));
                    targets.extend_from_slice(y);
                }
                let hidden = self.model.decode_slots(&slots, &tokens, cache)?;
                let (lp, rk) = self.head_rows(&self.model, &hidden, Some(&rows), &targets, ranks)?;
                let lens: Vec<usize> = (0..seqs.len()).map(y_len).collect();
                (split_into(&lp, &lens), if ranks { split_into(&rk, &lens) } else { Vec::new() })
            }
        };
        let mut rank = rank.into_iter();
        let mut logp = logp.into_iter();
        Ok((0..exs.len())
            .map(|_| Scored { logp: logp.by_ref().take(g).collect(), rank: rank.by_ref().take(g).collect() })
            .collect())
    }

    /// The fused head without gradient on rows `rows` of `hidden` (every row when `None`), whose
    /// targets are `targets`: per row the log-prob, and the rank when asked (else none).
    fn head_rows(
        &self,
        model: &Qwen,
        hidden: &smelt_engine::Tensor,
        rows: Option<&[u32]>,
        targets: &[u32],
        ranks: bool,
    ) -> Result<(Vec<f32>, Vec<u32>)> {
        let picked = rows.map(|r| smelt_kernels::embedding::embedding_from_host(r, hidden)).transpose()?;
        let opts = LogprobEntropyOpts { rank: ranks, ..Default::default() };
        let head = model.head_with(picked.as_ref().unwrap_or(hidden), targets, self.cfg.temperature, &opts)?;
        let rank = head.rank.map(|r| r.to_vec()).transpose()?.unwrap_or_default();
        Ok((head.logp.to_vec()?, rank))
    }

    /// Log-probs, without gradient, of the final `last[i]` tokens of each sequence `seqs[i]`
    /// (each predicted from the tokens before it), and their ranks when asked, in micro-batches.
    /// Only the hidden states that predict those tokens go through the head (the vocabulary
    /// projection, most of a small model's forward cost) and come back.
    fn score(&self, model: &Qwen, seqs: &[Vec<u32>], ranks: bool, last: &[usize]) -> Result<Scored> {
        if let Some((i, s)) = seqs.iter().enumerate().find(|&(i, s)| s.len() <= last[i]) {
            bail!("scoring the last {} tokens of sequence {i}, which has only {}", last[i], s.len());
        }
        let (mut lps, mut rks) = (Vec::with_capacity(seqs.len()), Vec::new());
        let b = self.cfg.per_device_train_batch_size;
        for (chunk, last) in seqs.chunks(b).zip(last.chunks(b)) {
            let packed = Packed::new(chunk);
            // Entry t predicts token t+1: the hidden-state rows each sequence sends through the head.
            let spans: Vec<std::ops::Range<usize>> = packed
                .cu_seqlens
                .windows(2)
                .zip(last)
                .map(|(w, &k)| w[1] as usize - k - 1..w[1] as usize - 1)
                .collect();
            let rows: Vec<u32> = spans.iter().flat_map(|r| r.clone()).map(|r| r as u32).collect();
            let (lp, rk) = if rows.is_empty() {
                (Vec::new(), Vec::new())
            } else {
                let acts = model.forward(&packed)?;
                let targets = packed.next_token_targets();
                let targets: Vec<u32> = rows.iter().map(|&r| targets[r as usize]).collect();
                self.head_rows(model, &acts.hidden, Some(&rows), &targets, ranks)?
            };
            let mut at = 0;
            for span in spans {
                let rows = at..at + span.len();
                at = rows.end;
                lps.push(lp[rows.clone()].to_vec());
                if ranks {
                    rks.push(rk[rows].to_vec());
                }
            }
        }
        Ok(Scored { logp: lps, rank: rks })
    }

    /// DRO's R3 data filter (ALGORITHMS.md): samples G outputs for every training prompt;
    /// stage 1 keeps prompts where some output brings the mean of its worst `worst_frac` of
    /// reference-token ranks within `rank_k`; stage 2 drops the `sigma_drop` of survivors with
    /// the lowest max_j σ_j; `carry_over` of the previous active set is kept too. The result
    /// becomes the set RL samples prompts from. If nothing survives, the set is unchanged.
    fn dro_filter(&mut self) -> Result<()> {
        use crate::reward::dro::{max_sigma, next_active, rank_filter_keep, sigma_filter, token_sigma};
        let t0 = Instant::now();
        let d = self.cfg.dro.clone();
        let all: Vec<usize> = (0..self.train.len()).collect();
        let (mut survivors, mut sigmas) = (Vec::new(), Vec::new());
        for (c, chunk) in all.chunks(self.cfg.prompts_per_step()).enumerate() {
            let seed = mix(&[self.cfg.seed, self.step as u64, 0xf117e2, c as u64]);
            let (rs, mut cache) = self.rollout(chunk, seed, self.dro_room(chunk)?)?;
            let forced = self.teacher_force(chunk, &rs, true, cache.as_mut())?;
            for (p, forced) in forced.into_iter().enumerate() {
                if rank_filter_keep(&forced.rank, d.rank_k, d.worst_frac) {
                    survivors.push(chunk[p]);
                    sigmas.push(max_sigma(&token_sigma(&forced.logp)));
                }
            }
        }
        let keep = sigma_filter(&sigmas, d.sigma_drop);
        let new_set: Vec<usize> = survivors.iter().zip(&keep).filter(|(_, &k)| k).map(|(&i, _)| i).collect();
        let mut previous = self.active.clone();
        data::shuffle(&mut previous, &mut Rng::new(mix(&[self.cfg.seed, self.step as u64, 0xca77])));
        let next = next_active(&new_set, &previous, d.carry_over);
        let line = json!({
            "phase": "dro_filter",
            "step": self.step,
            "candidates": all.len(),
            "stage1_kept": survivors.len(),
            "stage2_kept": new_set.len(),
            "carried_over": next.as_ref().map_or(0, |n| n.len() - new_set.len()),
            "active": next.as_ref().map_or(self.active.len(), Vec::len),
            "unchanged": next.is_none(),
            "filter_s": t0.elapsed().as_secs_f64(),
        });
        if let Some(next) = next {
            self.sampler = Sampler::new(next.len(), mix(&[self.cfg.seed, self.step as u64, 0xac71]));
            self.active = next;
        }
        self.emit(line)
    }

    /// Packs sequences (prompt + completion) into micro-batches of
    /// `per_device_train_batch_size`, with per-token advantages, the completion mask, the
    /// rollout log-probs as ℓ_old, and for rollouts the reference model's log-probs when β > 0.
    /// `supervised` marks demonstrations (see [`StepBatch::supervised`]).
    fn micro_batches(
        &self,
        seqs: &[Vec<u32>],
        prompt_lens: &[usize],
        adv: &[f32],
        old: Option<&[&[f32]]>,
        keep: &[bool],
        supervised: bool,
    ) -> Result<Vec<StepBatch>> {
        let b = self.cfg.per_device_train_batch_size;
        let mut out = Vec::new();
        for start in (0..seqs.len()).step_by(b) {
            let end = (start + b).min(seqs.len());
            let part = &seqs[start..end];
            let (mut a, mut m, mut o) = (Vec::new(), Vec::new(), Vec::new());
            for i in start..end {
                let (p, n) = (prompt_lens[i], seqs[i].len());
                for t in 0..n {
                    // Entry t predicts token t+1: completion tokens are p..n.
                    let in_completion = t + 1 >= p && t + 1 < n;
                    a.push(adv[i]);
                    m.push(if in_completion && keep[i] { 1.0 } else { 0.0 });
                    if let Some(old) = old {
                        o.push(if in_completion { old[i][t + 1 - p] } else { 0.0 });
                    }
                }
            }
            // The reference model scores the completions only (the loss tokens are among them).
            let logp_ref = match &self.reference {
                Some(r) if !supervised => {
                    let comp: Vec<usize> = (start..end).map(|i| seqs[i].len() - prompt_lens[i]).collect();
                    let scored = self.score(r, part, false, &comp)?;
                    let mut full = Vec::with_capacity(a.len());
                    for (i, lp) in (start..end).zip(scored.logp) {
                        full.extend(std::iter::repeat_n(0.0, prompt_lens[i] - 1));
                        full.extend(lp);
                        full.push(0.0);
                    }
                    Some(full)
                }
                _ => None,
            };
            out.push(StepBatch {
                packed: Packed::new(part),
                advantages: a,
                mask: m,
                logp_old: old.map(|_| o),
                logp_ref,
                supervised,
            });
        }
        Ok(out)
    }

    /// Micro-batches of the given training examples' prompt + solution, every solution token a
    /// loss token with advantage `coef` and ratio 1 (ℓ_old = ℓ), without KL or entropy terms:
    /// the NLL gradient (at the step's temperature) times `coef`.
    fn supervised_batches(&self, examples: &[usize], coef: f32) -> Result<Vec<StepBatch>> {
        let mut seqs = Vec::with_capacity(examples.len());
        for &i in examples {
            let sol = self.solution_ids.get(i).and_then(Option::as_ref);
            let sol = sol.with_context(|| format!("training example {i} {} has no solution", self.train[i].label()))?;
            seqs.push([self.train_ids[i].as_slice(), sol].concat());
        }
        let prompt_lens: Vec<usize> = examples.iter().map(|&i| self.train_ids[i].len()).collect();
        let adv = vec![coef; seqs.len()];
        self.micro_batches(&seqs, &prompt_lens, &adv, None, &vec![true; seqs.len()], true)
    }

    /// Greedy accuracy on the held-out set (logged); 0 when there is none.
    pub fn evaluate(&mut self) -> Result<f32> {
        if self.eval.is_empty() {
            return Ok(0.0);
        }
        let t0 = Instant::now();
        let opts = GenerateOptions {
            max_new_tokens: self.cfg.max_completion_length,
            sampling: SamplingConfig { temperature: 0.0, top_k: None, top_p: 1.0 },
            n_samples: 1,
            seed: 0,
            stop_ids: self.stop_ids.clone(),
        };
        // In slices, so a large eval set does not need one KV cache for all of it.
        let mut gens = Vec::with_capacity(self.eval_ids.len());
        let per = self.cfg.generation_batch_size;
        for (c, chunk) in self.eval_ids.chunks(per).enumerate() {
            let part = generate(&self.model, chunk, &opts)?;
            gens.extend(part.into_iter().map(|g| Generation { prompt: c * per + g.prompt, ..g }));
        }
        let tok = self.ckpt.tokenizer()?;
        let (mut correct, mut bad, mut len) = (0usize, 0usize, 0usize);
        for g in &gens {
            let (n, text) = completion_text(tok, g)?;
            match judge(&text, &self.eval[g.prompt].answer, !g.stopped, &self.correctness) {
                Outcome::Correct => correct += 1,
                Outcome::BadFormat => bad += 1,
                Outcome::Incorrect => {}
            }
            len += n;
        }
        let k = gens.len().max(1) as f32;
        let acc = correct as f32 / k;
        self.emit(json!({
            "phase": "eval",
            "step": self.step,
            "accuracy": acc,
            "bad_format": bad as f32 / k,
            "response_length": len as f32 / k,
            "examples": gens.len(),
            "eval_s": t0.elapsed().as_secs_f64(),
        }))?;
        Ok(acc)
    }

    /// LASER-D: samples `monitor_samples` outputs for each of the first `monitor_size`
    /// training prompts, buckets the prompts by accuracy and re-chooses each bucket's target.
    fn monitor_laser_targets(&mut self) -> Result<()> {
        let k = self.cfg.laser.monitor_samples;
        let picks: Vec<usize> = (0..self.cfg.laser.monitor_size.min(self.train.len())).collect();
        let ids: Vec<Vec<u32>> = picks.iter().map(|&i| self.train_ids[i].clone()).collect();
        let opts = GenerateOptions {
            max_new_tokens: self.cfg.max_completion_length,
            sampling: self.sampling(),
            n_samples: k,
            seed: mix(&[self.cfg.seed, self.step as u64, 0x1a5e_0000]),
            stop_ids: self.stop_ids.clone(),
        };
        let gens = generate(&self.model, &ids, &opts)?;
        let rs: Vec<Rollout> = gens.into_iter().map(|g| self.judge(g, &picks)).collect::<Result<_>>()?;
        let groups: Vec<Vec<MonitorResponse>> = rs
            .chunks(k)
            .map(|c| c.iter().map(|r| MonitorResponse { len: r.len, correct: r.outcome.is_correct() }).collect())
            .collect();
        let search = TargetSearch {
            lower: self.cfg.laser.target_length,
            interval: self.cfg.laser.target_interval,
            max_len: self.cfg.max_completion_length,
        };
        let targets = adapt_targets(&groups, &search);
        if targets != self.laser_targets {
            self.laser_targets = targets;
            let v = json!({"phase": "laser_monitor", "step": self.step, "laser_targets": targets_json(&targets)});
            self.emit(v)?;
        }
        Ok(())
    }

    /// Writes `output_dir/checkpoint-<step>/`: a Hugging Face model directory plus
    /// `trainer_state/`, built in a temporary directory and renamed into place.
    pub fn save(&mut self) -> Result<PathBuf> {
        let name = format!("checkpoint-{}", self.step);
        let dest = self.cfg.output_dir.join(&name);
        let tmp = self.cfg.output_dir.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
        }
        let state_dir = tmp.join("trainer_state");
        std::fs::create_dir_all(&state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
        self.model.weights.save(tmp.join("model.safetensors"))?;
        for f in MODEL_FILES {
            let src = self.ckpt.dir.join(f);
            if src.is_file() {
                copy_synced(&src, &tmp.join(f))?;
            }
        }
        self.policy.save_state(&state_dir.join("optimizer.safetensors"))?;
        if let Some(lagged) = &self.lagged {
            let d = tmp.join(LAGGED_DIR);
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            lagged.weights.save(d.join("model.safetensors"))?;
            sync_dir(&d)?;
        }
        let state = TrainerState {
            step: self.step,
            optimizer_steps: self.policy.step,
            train_size: self.train.len(),
            data_fingerprint: fingerprint(self.cfg.seed, &self.train),
            active: self.active.clone(),
            sampler: self.sampler.clone(),
            laser_targets: self.laser_targets,
        };
        write_synced(&state_dir.join("state.json"), serde_json::to_string_pretty(&state.to_json())?.as_bytes())?;
        // The directory entries too, so after a crash the renamed checkpoint is complete.
        sync_dir(&state_dir)?;
        sync_dir(&tmp)?;
        if dest.exists() {
            let old = self.cfg.output_dir.join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(&dest, &old).with_context(|| format!("moving aside {}", dest.display()))?;
            if let Err(e) = std::fs::rename(&tmp, &dest) {
                // Put the previous checkpoint back rather than leave neither in place.
                let _ = std::fs::rename(&old, &dest);
                return Err(e).with_context(|| format!("renaming into {}", dest.display()));
            }
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        } else {
            std::fs::rename(&tmp, &dest).with_context(|| format!("renaming into {}", dest.display()))?;
        }
        sync_dir(&self.cfg.output_dir)?;
        let removed = self.prune_checkpoints()?;
        self.emit(json!({"phase": "checkpoint", "step": self.step, "path": dest, "removed": removed}))?;
        Ok(dest)
    }

    /// Keeps the newest `save_total_limit` checkpoints (0 = all). checkpoint-0 stays while a
    /// resumed run needs it as the KL reference (β > 0 after a warm-up).
    fn prune_checkpoints(&self) -> Result<Vec<PathBuf>> {
        let limit = self.cfg.save_total_limit;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let keep_zero = self.reference.is_some() && self.cfg.sft_steps > 0;
        let dir = &self.cfg.output_dir;
        let mut steps: Vec<usize> = std::fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("checkpoint-")?.parse().ok())
            .filter(|&n| !(keep_zero && n == 0))
            .collect();
        steps.sort_unstable();
        let mut removed = Vec::new();
        for n in &steps[..steps.len().saturating_sub(limit)] {
            let p = dir.join(format!("checkpoint-{n}"));
            std::fs::remove_dir_all(&p).with_context(|| format!("removing old checkpoint {}", p.display()))?;
            removed.push(p);
        }
        Ok(removed)
    }
}

/// Where a checkpoint keeps DRO's lagged model (`dro.reward_model = "lagged"`).
const LAGGED_DIR: &str = "trainer_state/dro_lagged";

/// Files of a model directory a checkpoint carries over unchanged (the weights are written
/// fresh).
const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
];

/// Each example's `solution` tokens followed by eos (`None` without a solution); errors name an
/// example whose prompt + solution would not fit the model's positions.
fn solutions(
    train: &[Example],
    prompts: &[Vec<u32>],
    tok: &smelt_models::Tokenizer,
    eos_id: u32,
    max_pos: usize,
) -> Result<Vec<Option<Vec<u32>>>> {
    let mut out = Vec::with_capacity(train.len());
    for (i, (ex, prompt)) in train.iter().zip(prompts).enumerate() {
        let Some(sol) = &ex.solution else {
            out.push(None);
            continue;
        };
        let mut ids = tok.encode(sol, false)?;
        ids.push(eos_id);
        let n = prompt.len() + ids.len();
        if n > max_pos {
            bail!(
                "dataset example {i} {}: prompt + solution is {n} tokens, over max_position_embeddings = {max_pos}",
                ex.label()
            );
        }
        out.push(Some(ids));
    }
    Ok(out)
}

/// A copy of `w` in new buffers on its device.
fn deep_copy(w: &smelt_models::Weights) -> Result<smelt_models::Weights> {
    Ok(w.try_map(|_, t| {
        let c = smelt_engine::Tensor::empty(t.shape(), t.dtype(), t.device())?;
        c.copy_from(t)?;
        Ok(c)
    })?)
}

/// `dst` ← `src`, tensor by tensor (the same model).
fn copy_weights(dst: &smelt_models::Weights, src: &smelt_models::Weights) -> Result<()> {
    for ((_, d), (_, s)) in dst.named_tensors().iter().zip(src.named_tensors()) {
        d.copy_from(s)?;
    }
    Ok(())
}

/// `v` cut into consecutive pieces of the given lengths.
fn split_into<T: Clone>(v: &[T], lens: &[usize]) -> Vec<Vec<T>> {
    let mut at = 0;
    lens.iter()
        .map(|&n| {
            at += n;
            v[at - n..at].to_vec()
        })
        .collect()
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing directory {}", dir.display()))
}

fn copy_synced(src: &Path, dst: &Path) -> Result<()> {
    let bytes = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
    write_synced(dst, &bytes)
}

/// A seed from several values (splitmix64 steps), so no two (seed, step, round) collide in
/// practice.
fn mix(parts: &[u64]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for &p in parts {
        h = (h ^ p).wrapping_add(0x9e37_79b9_7f4a_7c15);
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
    }
    h
}

/// FNV-1a over the seed and every training prompt and answer, in order.
fn fingerprint(seed: u64, train: &[Example]) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |b: &[u8]| {
        for &x in b.iter().chain(&[0xff]) {
            h = (h ^ x as u64).wrapping_mul(0x100_0000_01b3);
        }
    };
    eat(&seed.to_le_bytes());
    for ex in train {
        eat(ex.prompt.as_bytes());
        eat(ex.answer.as_bytes());
    }
    format!("{h:016x}")
}

fn targets_json(t: &LaserTargets) -> Value {
    json!({"easy": t.easy, "medium": t.medium, "hard": t.hard})
}

/// A completion's token count without its stop token, and its text (special tokens kept, so
/// `</think>` is visible to the answer extractor).
fn completion_text(tok: &smelt_models::Tokenizer, gen: &Generation) -> Result<(usize, String)> {
    let len = gen.ids.len() - usize::from(gen.stopped);
    Ok((len, tok.decode(&gen.ids[..len], false)?))
}

/// `trainer_state/state.json`.
struct TrainerState {
    step: usize,
    optimizer_steps: u64,
    train_size: usize,
    /// Hash of the seed and the training examples, so a resume with other data is refused.
    data_fingerprint: String,
    active: Vec<usize>,
    sampler: Sampler,
    laser_targets: LaserTargets,
}

impl TrainerState {
    fn to_json(&self) -> Value {
        json!({
            "step": self.step,
            "optimizer_steps": self.optimizer_steps,
            "train_size": self.train_size,
            "data_fingerprint": self.data_fingerprint,
            "active": self.active,
            "sampler": {"order": self.sampler.order, "pos": self.sampler.pos, "epoch": self.sampler.epoch, "seed": self.sampler.seed},
            "laser_targets": targets_json(&self.laser_targets),
        })
    }

    fn read(dir: &Path) -> Result<TrainerState> {
        let path = dir.join("state.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        let field = |k: &str| v.get(k).with_context(|| format!("{}: missing {k:?}", path.display()));
        let uint =
            |x: &Value, k: &str| x.as_u64().with_context(|| format!("{}: {k:?} must be an integer", path.display()));
        let s = field("sampler")?;
        let sget = |k: &str| s.get(k).with_context(|| format!("{}: missing sampler.{k}", path.display()));
        let order: Vec<usize> = serde_json::from_value(sget("order")?.clone())
            .with_context(|| format!("{}: sampler.order must be a list of indices", path.display()))?;
        let train_size = uint(field("train_size")?, "train_size")? as usize;
        let pos = uint(sget("pos")?, "sampler.pos")? as usize;
        let active: Vec<usize> = serde_json::from_value(field("active")?.clone())
            .with_context(|| format!("{}: active must be a list of example indices", path.display()))?;
        if active.is_empty() || active.iter().any(|&i| i >= train_size) {
            bail!("{}: active holds no examples or an index past train_size = {train_size}", path.display());
        }
        // The sampler walks a permutation of the active set's positions; checked without
        // allocating from the file's numbers.
        let mut sorted = order.clone();
        sorted.sort_unstable();
        if order.len() != active.len() || sorted.iter().enumerate().any(|(i, &x)| i != x) || pos > order.len() {
            bail!("{}: sampler state is not a permutation of the {} active examples", path.display(), active.len());
        }
        Ok(TrainerState {
            step: uint(field("step")?, "step")? as usize,
            optimizer_steps: uint(field("optimizer_steps")?, "optimizer_steps")?,
            train_size,
            active,
            sampler: Sampler {
                order,
                pos,
                epoch: uint(sget("epoch")?, "sampler.epoch")?,
                seed: uint(sget("seed")?, "sampler.seed")?,
            },
            data_fingerprint: field("data_fingerprint")?
                .as_str()
                .with_context(|| format!("{}: data_fingerprint must be a string", path.display()))?
                .to_string(),
            laser_targets: {
                let t = field("laser_targets")?;
                let get = |k: &str| {
                    let x = t.get(k).with_context(|| format!("{}: missing laser_targets.{k}", path.display()))?;
                    uint(x, &format!("laser_targets.{k}"))
                };
                LaserTargets {
                    easy: get("easy")? as usize,
                    medium: get("medium")? as usize,
                    hard: get("hard")? as usize,
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quiet run of the tiny fixture model writing into `dir`, with 12-token completions.
    fn tiny(dir: &Path) -> TrainConfig {
        TrainConfig {
            model: Some(smelt_models::testing::fixture("qwen2-tiny")),
            output_dir: dir.to_path_buf(),
            eval_size: 2,
            max_completion_length: 12,
            quiet: true,
            ..Default::default()
        }
    }

    /// With a KL penalty, each micro-batch carries the reference model's log-probs of its
    /// completion tokens, at the entries that predict them (the reference scores those rows
    /// only), checked against the head over every row of each sequence on its own.
    #[test]
    fn reference_log_probs_sit_at_the_completion_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TrainConfig { beta: 0.04, per_device_train_batch_size: 2, ..tiny(dir.path()) };
        let t = Trainer::new(cfg).unwrap();
        let seqs: Vec<Vec<u32>> =
            (0..3).map(|i| (0..9 + 4 * i).map(|j| (7 * j + 3 * i + 1) as u32 % 50).collect()).collect();
        let prompt_lens = [4, 1, 7];
        let micro = t.micro_batches(&seqs, &prompt_lens, &[0.5; 3], None, &[true; 3], false).unwrap();
        assert_eq!(micro.len(), 2);
        let refs: Vec<f32> = micro.iter().flat_map(|b| b.logp_ref.clone().unwrap()).collect();
        let mut at = 0;
        for (seq, &p) in seqs.iter().zip(&prompt_lens) {
            let packed = Packed::new(std::slice::from_ref(seq));
            let acts = t.model.forward(&packed).unwrap();
            let full = t.model.head(&acts.hidden, &packed.next_token_targets(), 1.0).unwrap();
            let full: Vec<f32> = full.logp.to_vec().unwrap();
            for (j, &want) in full.iter().enumerate() {
                let got = refs[at + j];
                if j + 1 >= p && j + 1 < seq.len() {
                    assert!((got - want).abs() < 1e-5, "entry {j} of a {}-token sequence: {got} vs {want}", seq.len());
                } else {
                    assert_eq!(got, 0.0, "entry {j} outside the completion");
                }
            }
            at += seq.len();
        }
        assert_eq!(at, refs.len());
    }

    /// DRO's lagged scorer is saved with each checkpoint: a resumed run scores with the copy the
    /// interrupted run had (here the policy of one step before the checkpoint), not with its
    /// own current policy; a checkpoint without one starts it from the policy.
    #[test]
    fn dro_lagged_model_resumes_from_its_checkpoint() {
        let values = |w: &smelt_models::Weights| -> Vec<Vec<f32>> {
            w.named_tensors().iter().map(|(_, t)| t.to_vec_f32().unwrap()).collect()
        };
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = TrainConfig { reward: "dro".into(), max_steps: 3, ..tiny(dir.path()) };
        cfg.dro.reward_model = "lagged".into();
        cfg.dro.lag_steps = 2;
        cfg.dro.filter = false;
        let mut t = Trainer::new(cfg.clone()).unwrap();
        let ck = t.run().unwrap().checkpoints.pop().unwrap();
        let (lagged, policy) = (values(&t.lagged.as_ref().unwrap().weights), values(&t.model.weights));
        assert_ne!(lagged, policy, "the lagged copy is the policy of step 2, the checkpoint is step 3's");
        drop(t);
        let resume = TrainConfig { resume_from_checkpoint: Some(ck.clone()), max_steps: 4, ..cfg };
        let resumed = Trainer::new(resume.clone()).unwrap();
        assert_eq!(values(&resumed.lagged.as_ref().unwrap().weights), lagged);
        assert_eq!(values(&resumed.model.weights), policy);
        drop(resumed);
        std::fs::remove_dir_all(ck.join(LAGGED_DIR)).unwrap();
        let without = Trainer::new(resume).unwrap();
        assert_eq!(values(&without.lagged.as_ref().unwrap().weights), policy);
    }

    /// With early rejection the survivors move into a cache of their own (`keep` slots per
    /// prompt, rollout i in slot i): teacher forcing on it gives what a full forward pass gives.
    #[test]
    fn early_rejection_survivors_teacher_force_on_their_cache() {
        let dir = tempfile::tempdir().unwrap();
        let er = crate::config::EarlyRejectionConfig { enabled: true, prefix_tokens: 3, keep: 3 };
        let cfg = TrainConfig { reward: "dro".into(), early_rejection: er, ..tiny(dir.path()) };
        let t = Trainer::new(cfg).unwrap();
        let exs = [4, 9];
        let (rs, rejected, cache) = t.rollout_rl(&exs, 5, t.dro_room(&exs).unwrap()).unwrap();
        assert_eq!(rs.len(), 6);
        assert!(rejected > 0);
        // Survivors come from every position of their group, not only the first `keep` slots.
        assert!(rs.iter().any(|r| r.gen.sample >= 3), "{:?}", rs.iter().map(|r| r.gen.sample).collect::<Vec<_>>());
        let mut cache = cache.unwrap();
        assert_eq!(cache.lens.len(), rs.len(), "the survivors' cache");
        let full = t.teacher_force(&exs, &rs, true, None).unwrap();
        let cached = t.teacher_force(&exs, &rs, true, Some(&mut cache)).unwrap();
        for (f, c) in full.iter().zip(&cached) {
            assert_eq!(f.rank, c.rank);
            for (a, b) in f.logp.iter().flatten().zip(c.logp.iter().flatten()) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
    }

    /// DRO's teacher forcing picks exactly the reference tokens' log-probs and ranks: checked
    /// against log-softmax and ranks of the materialised logits of each full sequence,
    /// computed independently of the packing and slicing the trainer does.
    #[test]
    fn teacher_forcing_scores_the_reference_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TrainConfig { reward: "dro".into(), per_device_train_batch_size: 3, ..tiny(dir.path()) };
        let t = Trainer::new(cfg).unwrap();
        // Two groups whose reference answers differ in length: they decode together, the
        // shorter y followed by filler tokens.
        let tok = t.ckpt.tokenizer().unwrap();
        let y_of = |ex: usize| tok.encode(&t.train[ex].answer, false).unwrap();
        let first = 5;
        let other = (0..t.train.len()).find(|&e| y_of(e).len() != y_of(first).len()).expect("answers of two lengths");
        let exs = [other, first];
        let (mut rs, cache) = t.rollout(&exs, 11, t.dro_room(&exs).unwrap()).unwrap();
        let mut cache = cache.unwrap();
        assert_eq!(rs.len(), 16);
        // The tiny model never writes `</think>`: mark reasoning ends by index instead (the token
        // there is what it is), including the last token of a rollout, which the generation
        // never decoded into the cache.
        for i in [0, 8] {
            rs[i].think_end = Some(3);
            rs[i + 1].think_end = Some(rs[i + 1].len - 1);
            assert!(rs[i + 1].gen.ids.len() == rs[i + 1].len, "rollout {} ran out of budget", i + 1);
        }
        let full = t.teacher_force(&exs, &rs, true, None).unwrap();
        let cached = t.teacher_force(&exs, &rs, true, Some(&mut cache)).unwrap();
        assert_eq!((full.len(), cached.len()), (2, 2));
        let think_end = t.think_end_id.unwrap();
        let each = rs.iter().enumerate().flat_map(|(i, r)| [(i, r, &full[i / 8]), (i, r, &cached[i / 8])]);
        for (k, r, forced) in each {
            let (ex, i) = (exs[k / 8], k % 8);
            let y = y_of(ex);
            let mut seq = t.train_ids[ex].clone();
            match r.think_end {
                Some(k) => seq.extend_from_slice(&r.gen.ids[..=k]),
                None => seq.extend(r.gen.ids[..r.len].iter().copied().chain([think_end])),
            }
            let start = seq.len();
            seq.extend_from_slice(&y);
            let acts = t.model.forward(&Packed::new(&[seq.clone()])).unwrap();
            let logits: Vec<f32> = t.model.logits(&acts.hidden).unwrap().to_vec().unwrap();
            let v = t.model.config.vocab_size;
            assert_eq!(forced.logp[i].len(), y.len());
            for (j, &yj) in y.iter().enumerate() {
                // Token start + j is predicted from position start + j − 1.
                let row = &logits[(start + j - 1) * v..(start + j) * v];
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let lse = m + row.iter().map(|&z| (z as f64 - m).exp()).sum::<f64>().ln();
                let want = row[yj as usize] as f64 - lse;
                assert!((forced.logp[i][j] as f64 - want).abs() < 1e-4, "rollout {i} token {j}");
                let rank = 1 + row.iter().filter(|&&z| z > row[yj as usize]).count() as u32;
                assert_eq!(forced.rank[i][j], rank, "rollout {i} token {j}");
            }
        }
    }
}
