//! End to end (DESIGN.md testing tier 5): supervised warm-up + GRPO on the built-in task
//! must raise reward; checkpoints are loadable model directories and resume continues the
//! run. Plus one short run per reward (LASER-D, LASER-DE, PEAR, DRO, with DAPO's dynamic
//! sampling and overlong shaping, AHPO, rubric rewards with the built-in and an external judge,
//! and a KL reference) to prove each path runs and logs,
//! and AHPO against plain GRPO from an untrained model.

use std::path::Path;

use serde_json::Value;
use smelt_models::testing::fixture;
use smelt_models::Checkpoint;
use smelt_trainer::config::{AhpoConfig, TrainConfig};
use smelt_trainer::train::{train, Trainer};

fn demo(out: &Path) -> TrainConfig {
    let text = std::fs::read_to_string(smelt_kernels::testing::repo_path("examples/train-add.toml")).unwrap();
    let mut cfg: TrainConfig = toml::from_str(&text).unwrap();
    cfg.model = Some(fixture("qwen2-tiny"));
    cfg.output_dir = out.to_path_buf();
    cfg.quiet = true;
    cfg
}

fn log(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("log.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Names in `dir` starting with '.': where checkpoint saving puts its temporary and
/// set-aside directories.
fn hidden_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with('.'))
        .collect()
}

fn mean(v: &[f32]) -> f32 {
    v.iter().sum::<f32>() / v.len() as f32
}

#[test]
fn sft_then_grpo_raises_reward_and_checkpoints_resume() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo(dir.path());
    let s = train(cfg.clone()).unwrap();

    // The warm-up learns the format: NLL falls by far.
    assert_eq!(s.sft_nll.len(), 60);
    assert!(s.sft_nll[59] < s.sft_nll[0] / 4.0, "sft nll {:?}", s.sft_nll);
    // RL raises rollout accuracy and reward (seeded run: 0.20 -> 0.40 accuracy, 10-step windows, when written).
    assert_eq!(s.step_rewards.len(), 80);
    let (first, last) = (mean(&s.step_accuracy[..20]), mean(&s.step_accuracy[60..]));
    assert!(last > first + 0.1, "rollout accuracy {first} -> {last}");
    assert!(mean(&s.step_rewards[60..]) > mean(&s.step_rewards[..20]) + 0.1);
    assert_eq!(s.evals.len(), 3, "start, step 40, end: {:?}", s.evals);

    // The log has one line per SFT step, RL step and eval, with the fields the design names.
    let lines = log(dir.path());
    let rl: Vec<&Value> = lines.iter().filter(|l| l["phase"] == "rl").collect();
    assert_eq!(rl.len(), 80);
    for key in
        ["reward", "accuracy", "response_length", "entropy", "clip_frac_low", "kl", "grad_norm", "lr", "tokens_per_s"]
    {
        assert!(rl[0][key].is_number(), "{key} missing from {}", rl[0]);
    }
    // On-policy (one iteration): the rollout's log-probs equal the update's, ratio 1.
    assert!((rl[0]["mean_ratio"].as_f64().unwrap() - 1.0).abs() < 1e-4, "{}", rl[0]);

    // The checkpoint is a model directory transformers (and smelt) can open.
    let ck = s.checkpoints.last().unwrap();
    assert_eq!(ck, &dir.path().join("checkpoint-80"));
    let opened = Checkpoint::open(ck).unwrap();
    opened.load_weights(&Default::default()).unwrap();
    assert!(ck.join("tokenizer.json").is_file() && ck.join("trainer_state/optimizer.safetensors").is_file());
    assert!(dir.path().join("config.toml").is_file());
    let stray = hidden_entries(dir.path());
    assert!(stray.is_empty(), "temporary directories left behind: {stray:?}");

    // Resume: two more steps continue from step 80 with the saved optimizer and data position.
    let resumed = TrainConfig { resume_from_checkpoint: Some(ck.clone()), max_steps: 82, sft_steps: 0, ..cfg };
    // Other data (here: another seed, so another split and order) is refused, naming it.
    let other = TrainConfig { seed: 7, ..resumed.clone() };
    let err = format!("{:#}", Trainer::new(other).err().expect("resume with another seed must fail"));
    assert!(err.contains("other data") && err.contains("checkpoint-80"), "{err}");
    let mut t = Trainer::new(resumed).unwrap();
    assert_eq!(t.step, 80);
    let s2 = t.run().unwrap();
    assert_eq!(s2.step_rewards.len(), 2);
    assert!(dir.path().join("checkpoint-82").is_dir());

    // Saving over an existing checkpoint (resume at 82 with nothing left to do) replaces it
    // whole and leaves no temporary or set-aside directory behind.
    let again = TrainConfig { resume_from_checkpoint: Some(dir.path().join("checkpoint-82")), ..t.cfg.clone() };
    let s3 = Trainer::new(again).unwrap().run().unwrap();
    assert!(s3.step_rewards.is_empty());
    Checkpoint::open(dir.path().join("checkpoint-82")).unwrap().load_weights(&Default::default()).unwrap();
    let stray = hidden_entries(dir.path());
    assert!(stray.is_empty(), "left behind: {stray:?}");
}

/// With a KL penalty, the reference is the model RL starts from — after the warm-up — so the
/// first step's KL is 0; the warmed-up model is saved as checkpoint-0 for a resumed run.
#[test]
fn kl_reference_is_the_warmed_up_model() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig { beta: 0.04, sft_steps: 10, max_steps: 2, eval_size: 4, ..demo(dir.path()) };
    let s = train(cfg.clone()).unwrap();
    assert_eq!(s.checkpoints.first(), Some(&dir.path().join("checkpoint-0")));
    let lines = log(dir.path());
    let rl: Vec<&Value> = lines.iter().filter(|l| l["phase"] == "rl").collect();
    assert!(rl[0]["kl"].as_f64().unwrap().abs() < 1e-6, "{}", rl[0]);
    assert!(rl[1]["kl"].as_f64().unwrap() > 0.0, "{}", rl[1]);

    // A new run over it (overwrite_output_dir) starts a fresh log rather than appending.
    let again = TrainConfig { overwrite_output_dir: true, beta: 0.0, sft_steps: 0, max_steps: 1, ..cfg };
    train(again).unwrap();
    let phases: Vec<String> = log(dir.path()).iter().map(|l| l["phase"].as_str().unwrap().to_string()).collect();
    assert_eq!(phases.iter().filter(|p| *p == "rl").count(), 1, "{phases:?}");
    assert!(!phases.iter().any(|p| p == "sft"), "{phases:?}");
}

/// Each reward path on a short run from the warmed-up demo model.
#[test]
fn every_reward_runs_and_logs_its_terms() {
    let dir = tempfile::tempdir().unwrap();
    let warm = TrainConfig { max_steps: 0, eval_size: 4, ..demo(&dir.path().join("warm")) };
    let s = train(warm).unwrap();
    let start = s.checkpoints.last().unwrap().clone();
    // The addition task with a rubric: the final answer right after the reasoning (factual,
    // the gate) and the sum restated in the reasoning.
    let mut jsonl = String::new();
    for (a, b) in (0..10).flat_map(|a| (0..10).map(move |b| (a, b))) {
        let rubric = serde_json::json!([
            {"criterion": "gives the sum as the answer", "factual": true, "pattern": format!("</think>{}", a + b)},
            {"criterion": "restates the sum", "weight": 0.5, "pattern": format!("{a}+{b}=")},
        ]);
        let line = serde_json::json!({"prompt": format!("What is {a}+{b}?"), "answer": a + b, "rubric": rubric});
        jsonl.push_str(&format!("{line}\n"));
    }
    let rubric_data = dir.path().join("add-rubric.jsonl");
    std::fs::write(&rubric_data, jsonl).unwrap();
    let rubric_data = format!("dataset={:?}", rubric_data.to_str().unwrap());
    // An external judge (here a shell loop) that fails the factual criterion and passes the other.
    let judge = r#"rubric.judge_command=["sh", "-c", "while read l; do echo '{\"passed\": [false, true]}'; done"]"#;
    for (i, (reward, sets, term)) in [
        ("laser_d", vec!["laser.target_length=6", "laser.target_interval=4", "laser.monitor_every=2"], "reward_length"),
        ("laser_de", vec!["laser.target_length=6", "laser.monitor_size=4"], "reward_length"),
        ("pear", vec![], "reward_h_think"),
        ("dro", vec![], "reward_r3"),
        ("dro", vec!["dro.reward_model=\"reference\"", "dro.masked_baseline=true"], "reward_r3_baseline"),
        ("dro", vec!["dro.reward_model=\"lagged\"", "dro.lag_steps=2", "dro.filter=false"], "reward_r3"),
        (
            "accuracy",
            vec!["dynamic_sampling=true", "overlong_buffer=4", "beta=0.04", "ahpo.enabled=true"],
            "reward_overlong",
        ),
        ("rubric", vec![rubric_data.as_str()], "reward_rubric"),
        ("rubric", vec![rubric_data.as_str(), judge], "reward_rubric"),
    ]
    .into_iter()
    .enumerate()
    {
        let external = sets.contains(&judge);
        let out = dir.path().join(format!("{i}-{reward}"));
        let mut sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        sets.extend([
            format!("reward={reward:?}"),
            format!("model={:?}", start.to_str().unwrap()),
            format!("output_dir={:?}", out.to_str().unwrap()),
            "max_steps=3".into(),
            "sft_steps=0".into(),
            "eval_size=4".into(),
            "generation_batch_size=16".into(),
            "per_device_train_batch_size=5".into(),
            "num_iterations=2".into(),
            "quiet=true".into(),
        ]);
        let cfg = TrainConfig::load(None, &sets).unwrap_or_else(|e| panic!("{reward}: {e:#}"));
        let s = train(cfg).unwrap_or_else(|e| panic!("{reward}: {e:#}"));
        assert_eq!(s.step_rewards.len(), 3, "{reward}");
        let lines = log(&out);
        let rl: Vec<&Value> = lines.iter().filter(|l| l["phase"] == "rl").collect();
        assert!(rl.iter().all(|l| l[term].is_number()), "{reward}: no {term} in {}", rl[0]);
        assert!(rl.iter().all(|l| l["reward"].as_f64().is_some_and(f64::is_finite)), "{reward}");
        // The correctness score is logged as a reward term only where it is one.
        let base_term = reward == "accuracy" || reward.starts_with("laser");
        assert!(rl.iter().all(|l| l["reward_correctness"].is_number() == base_term), "{reward}: {}", rl[0]);
        if reward.starts_with("laser") {
            assert!(rl.iter().all(|l| l["laser_targets"]["hard"].is_u64()), "{reward}: {}", rl[0]);
        }
        if reward == "dro" && !sets.iter().any(|s| s == "dro.filter=false") {
            // The R3 data filter ran before the first step over every training prompt.
            let f = lines.iter().find(|l| l["phase"] == "dro_filter").expect("no dro_filter line");
            let n = |k: &str| f[k].as_u64().unwrap();
            assert!(n("candidates") == 96 && n("stage2_kept") <= n("stage1_kept") && n("active") >= 1, "{f}");
        }
        if reward == "rubric" {
            // Built-in judge: each of the 16 completions scores 1 (gate passed), 1/3 (only the
            // restated sum) or 0, so the mean is a multiple of 1/48; the external judge's
            // fixed verdicts give every completion 0.5 / 1.5.
            for l in &rl {
                let r = l["reward"].as_f64().unwrap();
                if external {
                    assert!((r - 1.0 / 3.0).abs() < 1e-6, "{l}");
                } else {
                    assert!((0.0..=1.0).contains(&r) && (r * 48.0 - (r * 48.0).round()).abs() < 1e-4, "{l}");
                }
            }
        }
        if reward == "accuracy" {
            assert!(rl.iter().all(|l| l["ahpo_experts"].is_u64()), "{}", rl[0]);
            // Step 1 starts at the reference; once the policy has moved, the KL is positive.
            assert!(rl[1..].iter().any(|l| l["kl"].as_f64().unwrap() > 0.0), "β > 0: {rl:?}");
        }
    }
}

/// AHPO: from the untrained fixture almost every group fails, so the dataset's solutions of
/// those groups join each update. Scored afterwards, the model has learned them (NLL 13.9 →
/// 2.4 when written), which plain GRPO from the same start does not (13.9).
#[test]
fn ahpo_learns_the_solutions_of_failed_groups() {
    let dir = tempfile::tempdir().unwrap();
    let nll_after = |name: &str, enabled: bool| -> f32 {
        let out = dir.path().join(name);
        let ahpo = AhpoConfig { enabled, ..Default::default() };
        let cfg = TrainConfig { sft_steps: 0, max_steps: 30, learning_rate: 2e-3, eval_size: 4, ahpo, ..demo(&out) };
        let s = train(cfg).unwrap();
        let rl: Vec<Value> = log(&out).into_iter().filter(|l| l["phase"] == "rl").collect();
        let experts: Vec<u64> = rl.iter().map(|l| l["ahpo_experts"].as_u64().unwrap_or(0)).collect();
        if enabled {
            assert!(experts.iter().all(|&e| e >= 1), "failed groups each step: {experts:?}");
            assert_eq!(rl[0]["trained_sequences"], 64 + experts[0], "{}", rl[0]);
        } else {
            assert!(rl.iter().all(|l| l.get("ahpo_experts").is_none()));
        }
        // One supervised step over all 96 training examples reports their NLL before it updates.
        let score = TrainConfig {
            model: s.checkpoints.last().cloned(),
            sft_steps: 1,
            sft_batch_size: 96,
            max_steps: 0,
            eval_size: 4,
            ..demo(&dir.path().join(format!("{name}-score")))
        };
        Trainer::new(score).unwrap().sft().unwrap()[0]
    };
    let (with, without) = (nll_after("ahpo", true), nll_after("grpo", false));
    assert!(with < without / 3.0, "solution NLL after 30 steps: with AHPO {with}, without {without}");
}

/// Early rejection: 8 prefixes of 4 tokens per prompt, the best 3 finished in the same
/// generation. The survivors are the groups (3 per prompt), and their log-probs are the
/// model's own: the first update's ratio is 1.
#[test]
fn early_rejection_finishes_the_best_prefixes() {
    let dir = tempfile::tempdir().unwrap();
    let er = smelt_trainer::config::EarlyRejectionConfig { enabled: true, prefix_tokens: 4, keep: 3 };
    let cfg = TrainConfig { sft_steps: 0, max_steps: 2, eval_size: 4, early_rejection: er, ..demo(dir.path()) };
    train(cfg).unwrap();
    let lines = log(dir.path());
    for l in lines.iter().filter(|l| l["phase"] == "rl") {
        assert_eq!(l["trained_sequences"], 8 * 3, "{l}");
        assert!(l["early_rejected_tokens"].as_u64().unwrap() > 0, "{l}");
        assert!(l["response_length"].as_f64().unwrap() > 4.0, "survivors were finished past the prefix: {l}");
        assert!((l["mean_ratio"].as_f64().unwrap() - 1.0).abs() < 1e-4, "{l}");
    }
}

/// On a GPU: the supervised warm-up (no sampling, same data order) follows the CPU run's NLL
/// step by step in f32 and within bf16 rounding in bf16, and a few GRPO steps run with finite
/// rewards and losses. Skips without a GPU (scripts/gpu-check runs it).
#[test]
fn device_training_tracks_cpu() {
    let Some(dev) = smelt_kernels::testing::test_cuda_device() else { return };
    let dir = tempfile::tempdir().unwrap();
    let short = |name: &str, device: String, dtype: &str| TrainConfig {
        device,
        dtype: dtype.into(),
        sft_steps: 20,
        max_steps: 3,
        eval_size: 4,
        ..demo(&dir.path().join(name))
    };
    let cpu = train(short("cpu", "cpu".into(), "f32")).unwrap();
    for (dtype, tol) in [("f32", 1e-3f32), ("bf16", 0.1)] {
        let gpu = train(short(dtype, dev.to_string(), dtype)).unwrap();
        for (i, (a, b)) in cpu.sft_nll.iter().zip(&gpu.sft_nll).enumerate() {
            assert!((a - b).abs() <= tol * a.abs().max(1.0), "{dtype} sft step {i}: cpu nll {a}, gpu {b}");
        }
        assert!(gpu.step_rewards.iter().all(|r| r.is_finite()), "{dtype}: {:?}", gpu.step_rewards);
        let lines = log(&dir.path().join(dtype));
        assert!(lines.iter().filter(|l| l["phase"] == "rl").all(|l| l["loss"].as_f64().is_some_and(f64::is_finite)));
    }
}

/// The command line: the example config plus flags (flags win over the file), exit 0, a
/// checkpoint and the resolved config written.
#[test]
fn smelt_train_runs_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = smelt_kernels::testing::repo_path("examples/train-add.toml");
    let model = fixture("qwen2-tiny");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(["train", "--config", config.to_str().unwrap(), "--model", model.to_str().unwrap()])
        .args(["--output-dir", dir.path().to_str().unwrap(), "--max-steps", "2", "--device", "cpu"])
        .args(["--set", "sft_steps=2", "--set", "eval_size=4", "--set", "laser.alpha=0.25"])
        .args(["--set", "save_steps=1", "--set", "save_total_limit=1"])
        .env("SMELT_NUM_THREADS", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "smelt train failed: {err}");
    assert!(err.contains("train: done") && !err.contains("panicked"), "{err}");
    assert_eq!(log(dir.path()).iter().filter(|l| l["phase"] == "rl").count(), 2, "one log line per RL step");
    assert!(dir.path().join("checkpoint-2/model.safetensors").is_file());
    // save_total_limit = 1: checkpoint-0 (after the warm-up) and -1 were removed as newer ones came.
    assert!(!dir.path().join("checkpoint-0").exists() && !dir.path().join("checkpoint-1").exists());
    let resolved: TrainConfig =
        toml::from_str(&std::fs::read_to_string(dir.path().join("config.toml")).unwrap()).unwrap();
    assert_eq!((resolved.max_steps, resolved.sft_steps, resolved.laser.alpha), (2, 2, 0.25));
    assert_eq!(resolved.learning_rate, 3e-4, "from the file");
}

/// `--print-config` shows every key with its resolved value and trains nothing.
#[test]
fn print_config_shows_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(["train", "--model", "m", "--output-dir", dir.path().join("o").to_str().unwrap()])
        .args(["--set", "beta=0.04", "--print-config"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let printed: TrainConfig = toml::from_str(&text).unwrap();
    assert_eq!(printed.beta, 0.04);
    assert_eq!(printed.epsilon_high, TrainConfig::default().epsilon_high);
    for key in ["num_generations", "loss_type", "[laser]", "[pear]", "[dro]", "filter_every", "[ahpo]", "[rubric]"] {
        assert!(text.contains(key), "{key} missing from:\n{text}");
    }
    // Optional keys without a value (TOML has no null) are named in the leading comment.
    let first = text.lines().next().unwrap();
    assert!(first.starts_with("# optional, not set:") && first.contains("eval_dataset"), "{first}");
    assert!(first.contains("sft_learning_rate") && !first.contains(" model"), "{first}");
    assert!(!dir.path().join("o").exists(), "--print-config must not start a run");
}
