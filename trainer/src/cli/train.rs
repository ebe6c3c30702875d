//! `smelt train`: GRPO-family RL (accuracy, LASER/-D/-DE, PEAR or DRO rewards) from a TOML
//! configuration; see `smelt_trainer::config` for every key.

use std::path::PathBuf;

use anyhow::Result;
use smelt_trainer::config::TrainConfig;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// A TOML file of training settings (TRL / verl knob names; unknown keys are errors).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override any setting: `--set beta=0.04 --set laser.alpha=0.3` (repeatable; flags win
    /// over the file).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// The starting model (a Hugging Face directory); same as `--set model=DIR`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// f32, or bf16 on CUDA (fp32 master weights).
    #[arg(long)]
    pub dtype: Option<String>,
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Continue from `OUTPUT_DIR/checkpoint-<step>`.
    #[arg(long)]
    pub resume_from_checkpoint: Option<PathBuf>,
    /// Print the resolved configuration (every key: defaults < file < flags) as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let quote = |s: String| toml::Value::String(s).to_string();
    let path = |p: &PathBuf| quote(p.to_string_lossy().into_owned());
    let mut sets = args.set.clone();
    sets.extend(args.model.as_ref().map(|p| format!("model={}", path(p))));
    sets.extend(args.output_dir.as_ref().map(|p| format!("output_dir={}", path(p))));
    sets.extend(args.device.clone().map(|d| format!("device={}", quote(d))));
    sets.extend(args.dtype.clone().map(|d| format!("dtype={}", quote(d))));
    sets.extend(args.max_steps.map(|n| format!("max_steps={n}")));
    sets.extend(args.resume_from_checkpoint.as_ref().map(|p| format!("resume_from_checkpoint={}", path(p))));
    let cfg = TrainConfig::load(args.config.as_deref(), &sets)?;
    if args.print_config {
        // TOML has no null, so optional keys without a value are named in a comment.
        let json = serde_json::to_value(&cfg)?;
        let unset: Vec<&str> =
            json.as_object().into_iter().flatten().filter(|(_, v)| v.is_null()).map(|(k, _)| k.as_str()).collect();
        if !unset.is_empty() {
            println!("# optional, not set: {}", unset.join(", "));
        }
        print!("{}", toml::to_string(&cfg)?);
        return Ok(());
    }
    let out = cfg.output_dir.clone();
    let summary = smelt_trainer::train::train(cfg)?;
    let first = summary.evals.first().map_or(0.0, |e| e.1);
    let last = summary.evals.last().map_or(0.0, |e| e.1);
    eprintln!(
        "train: done; held-out accuracy {first:.3} -> {last:.3}; log {}; final checkpoint {}",
        out.join("log.jsonl").display(),
        summary.checkpoints.last().map_or_else(|| "-".into(), |p| p.display().to_string())
    );
    Ok(())
}
