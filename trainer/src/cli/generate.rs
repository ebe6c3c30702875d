//! `smelt generate`: sample a continuation of a prompt, a chat message or token ids.

use anyhow::{bail, Context, Result};
use smelt_kernels::sample::SamplingConfig;
use smelt_models::{generate, GenerateOptions, Message, RenderOptions};

use super::common::ModelArgs;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "chat", "prompt_ids"])))]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Raw text prompt (tokenized without special tokens).
    #[arg(long)]
    pub prompt: Option<String>,
    /// A user message, rendered with the model's chat template and the assistant prompt.
    #[arg(long)]
    pub chat: Option<String>,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 means greedy. Default: generation_config.json's (greedy when it says do_sample false).
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Completions to sample.
    #[arg(long, default_value_t = 1)]
    pub num_samples: usize,
    /// Do not stop at end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print `{"ids": [...], "text": "..."}` per completion instead of the text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    // Flag checks first, before any file is read.
    if let Some(t) = args.temperature {
        if !(t.is_finite() && t >= 0.0) {
            bail!("--temperature {t} must be >= 0 (0 = greedy)");
        }
    }
    if let Some(p) = args.top_p {
        if !(p > 0.0 && p <= 1.0) {
            bail!("--top-p {p} must be in (0, 1]");
        }
    }
    if args.top_k == Some(0) {
        bail!("--top-k must be at least 1");
    }
    if args.num_samples == 0 {
        bail!("--num-samples must be at least 1");
    }
    args.model.device()?;
    args.model.dtype()?;
    let ckpt = args.model.open()?;
    let gc = &ckpt.generation_config;
    let greedy_default = gc.do_sample == Some(false);
    let sampling = SamplingConfig {
        temperature: args.temperature.unwrap_or(if greedy_default {
            0.0
        } else {
            gc.temperature.unwrap_or(1.0) as f32
        }),
        top_p: args.top_p.unwrap_or(gc.top_p.unwrap_or(1.0) as f32),
        top_k: args.top_k.or(gc.top_k),
    };
    sampling.validate()?;

    let prompt: Vec<u32> = if let Some(ids) = &args.prompt_ids {
        if ids.is_empty() {
            bail!("--prompt-ids is empty");
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= ckpt.config.vocab_size) {
            bail!("--prompt-ids: id {bad} is outside the vocabulary (vocab_size {})", ckpt.config.vocab_size);
        }
        ids.clone()
    } else if let Some(text) = &args.prompt {
        ckpt.tokenizer()?.encode(text, false)?
    } else if let Some(msg) = &args.chat {
        let rendered = ckpt.render_chat(
            &[Message::user(msg.as_str())],
            &RenderOptions { add_generation_prompt: true, ..Default::default() },
        )?;
        ckpt.tokenizer()?.encode(&rendered, false)?
    } else {
        unreachable!("clap requires one of --prompt, --chat, --prompt-ids")
    };
    if prompt.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    if prompt.len() >= ckpt.config.max_position_embeddings {
        bail!(
            "the prompt has {} tokens, which leaves no room under max_position_embeddings = {}",
            prompt.len(),
            ckpt.config.max_position_embeddings
        );
    }
    let stop_ids = if args.ignore_eos { Vec::new() } else { ckpt.stop_token_ids()? };
    let model = args.model.load(&ckpt)?;
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        n_samples: args.num_samples,
        seed: args.seed,
        stop_ids: stop_ids.clone(),
    };
    let gens = generate(&model, &[prompt], &opts)?;
    for g in gens {
        let shown: &[u32] = match g.ids.last() {
            Some(last) if g.stopped && stop_ids.contains(last) => &g.ids[..g.ids.len() - 1],
            _ => &g.ids,
        };
        let text = match &ckpt.tokenizer {
            Some(tok) => tok.decode(shown, false).context("decoding the output")?,
            None => String::new(),
        };
        if args.json {
            println!("{}", serde_json::json!({ "ids": g.ids, "text": text }));
        } else {
            println!("{text}");
        }
    }
    Ok(())
}
