//! `generation_config.json`: the sampling defaults and stop tokens a checkpoint ships.

use std::path::Path;

use crate::json;
use crate::{Config, Result};

/// The fields smelt uses; all optional in the file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    /// `eos_token_id`, an id or a list of ids.
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub max_new_tokens: Option<usize>,
    pub repetition_penalty: Option<f64>,
}

impl GenerationConfig {
    pub fn from_file(path: impl AsRef<Path>) -> Result<GenerationConfig> {
        let path = path.as_ref();
        Self::from_json_str(path, &crate::error::read_to_string(path)?)
    }

    /// Reads `dir/generation_config.json`, or the default (no stop ids, no sampling
    /// defaults) when the file does not exist.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<GenerationConfig> {
        let p = dir.as_ref().join("generation_config.json");
        if p.exists() {
            Self::from_file(p)
        } else {
            Ok(GenerationConfig::default())
        }
    }

    pub fn from_json_str(path: &Path, text: &str) -> Result<GenerationConfig> {
        let v = crate::error::parse_json(path, text)?;
        let o = json::as_object(path, &v, "<top level>")?;
        let temperature = json::opt_f64(path, o, "temperature")?;
        if let Some(t) = temperature {
            if !(t.is_finite() && t >= 0.0) {
                return Err(crate::Error::field(path, "temperature", format!("{t} is not a non-negative number")));
            }
        }
        let top_p = json::opt_f64(path, o, "top_p")?;
        if let Some(p) = top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(crate::Error::field(path, "top_p", format!("{p} is not in (0, 1]")));
            }
        }
        // top_k 0 means "disabled" in transformers.
        let top_k = json::opt_u64(path, o, "top_k")?.map(|k| usize::try_from(k).unwrap_or(usize::MAX));
        Ok(GenerationConfig {
            eos_token_ids: json::token_ids(path, o, "eos_token_id")?,
            bos_token_id: json::opt_token_id(path, o, "bos_token_id")?,
            pad_token_id: json::opt_token_id(path, o, "pad_token_id")?,
            do_sample: json::opt_bool(path, o, "do_sample")?,
            temperature,
            top_p,
            top_k,
            max_new_tokens: json::opt_size(path, o, "max_new_tokens", u32::MAX as u64)?,
            repetition_penalty: json::opt_f64(path, o, "repetition_penalty")?,
        })
    }
}

/// The ids that end generation: generation_config.json's `eos_token_id`(s), then
/// config.json's, then the tokenizer's eos token (`tokenizer_eos`, resolved from
/// tokenizer_config.json's `eos_token`), without duplicates, in that order.
pub fn stop_token_ids(generation: &GenerationConfig, config: &Config, tokenizer_eos: Option<u32>) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    for id in generation.eos_token_ids.iter().chain(&config.eos_token_ids).copied().chain(tokenizer_eos) {
        if !out.contains(&id) {
            out.push(id);
        }
    }
    out
}
