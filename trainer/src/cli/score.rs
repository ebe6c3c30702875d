//! `smelt score`: per-token log-probs and entropies of each input line, exactly as the model
//! assigns them. Entry t of each output is about predicting token t+1 from tokens 0..=t.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use smelt_models::{Checkpoint, Packed};
use smelt_trainer::jsonl::parse_score_line;

use super::common::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL: one object per line with `input_ids` (array of ints) or `text` (tokenized
    /// without special tokens).
    #[arg(long)]
    pub input: PathBuf,
    /// Logits are divided by this before the softmax.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Tokens per forward pass (lines are packed together up to this many).
    #[arg(long, default_value_t = 4096)]
    pub batch_tokens: usize,
}

/// Reads and validates every line before any model work: the error names the line.
fn read_inputs(args: &ScoreArgs, ckpt: &Checkpoint) -> Result<Vec<Vec<u32>>> {
    let path = &args.input;
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let (vocab, max_pos) = (ckpt.config.vocab_size, ckpt.config.max_position_embeddings);
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let line = line.with_context(|| format!("{}: line {n}: cannot read", path.display()))?;
        let tokenize = |text: &str| Ok(ckpt.tokenizer()?.encode(text, false)?);
        match parse_score_line(&line, n, vocab, max_pos, tokenize) {
            Ok(Some(ids)) => out.push(ids),
            Ok(None) => {}
            Err(e) => bail!("{}: {e}", path.display()),
        }
    }
    if out.is_empty() {
        bail!("{}: no input lines", path.display());
    }
    Ok(out)
}

pub fn run(args: ScoreArgs) -> Result<()> {
    if !(args.temperature.is_finite() && args.temperature > 0.0) {
        bail!("--temperature {} must be a positive number", args.temperature);
    }
    if args.batch_tokens == 0 {
        bail!("--batch-tokens must be at least 1");
    }
    args.model.device()?;
    args.model.dtype()?;
    let ckpt = args.model.open()?;
    let inputs = read_inputs(&args, &ckpt)?;
    let model = args.model.load(&ckpt)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut start = 0;
    while start < inputs.len() {
        // Pack lines up to the token budget (always at least one line).
        let mut end = start + 1;
        let mut tokens = inputs[start].len();
        while end < inputs.len() && tokens + inputs[end].len() <= args.batch_tokens {
            tokens += inputs[end].len();
            end += 1;
        }
        let batch = Packed::new(&inputs[start..end]);
        let acts = model.forward(&batch)?;
        let head = model.head(&acts.hidden, &batch.next_token_targets(), args.temperature)?;
        let (logp, ent) = (head.logp.to_vec::<f32>()?, head.entropy.to_vec::<f32>()?);
        for w in batch.cu_seqlens.windows(2) {
            let (a, b) = (w[0] as usize, w[1] as usize - 1);
            let line = serde_json::json!({ "logprobs": &logp[a..b], "entropy": &ent[a..b] });
            writeln!(out, "{line}")?;
        }
        start = end;
    }
    out.flush()?;
    Ok(())
}
