//! The `smelt` command-line tool.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

/// smelt — a framework-free engine for RL training of reasoning LLMs.
#[derive(Parser)]
#[command(name = "smelt", version, about, long_about = None)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Report the CPU threads, the CUDA libraries found, each GPU, and a kernel self-test.
    Doctor,
    /// Per-token log-probs and entropies of each line of a JSONL file.
    Score(cli::score::ScoreArgs),
    /// Generate a continuation of a prompt, a chat message or token ids.
    Generate(cli::generate::GenerateArgs),
    /// Benchmarks: kernels against measured ceilings, the training step, generation.
    Bench(cli::bench::BenchArgs),
    /// RL-train a model (GRPO family; accuracy, LASER, PEAR or DRO rewards) from a TOML config.
    Train(cli::train::TrainArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Doctor => cli::doctor::run(),
        Command::Score(a) => cli::score::run(a),
        Command::Generate(a) => cli::generate::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Train(a) => cli::train::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
