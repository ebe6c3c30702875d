//! `config.json` of a Hugging Face Qwen2 / Qwen2.5 / Qwen3 checkpoint.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use smelt_engine::DType;

use crate::json::{self, Obj};
use crate::{Error, Result};

/// Upper bounds checked before any size from a file is used. Each is well above every
/// released Qwen model (vocab 151,936, hidden 8,192, 80 layers) and low enough that products
/// of them cannot overflow a `usize` or request an absurd allocation.
pub mod limits {
    pub const MAX_VOCAB: u64 = 1 << 24;
    pub const MAX_HIDDEN: u64 = 65_536;
    pub const MAX_INTERMEDIATE: u64 = 1 << 20;
    pub const MAX_LAYERS: u64 = 1_024;
    pub const MAX_HEADS: u64 = 1_024;
    pub const MAX_HEAD_DIM: u64 = 1_024;
    pub const MAX_POSITIONS: u64 = 1 << 24;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelType {
    Qwen2,
    Qwen3,
}

impl ModelType {
    pub fn name(self) -> &'static str {
        match self {
            ModelType::Qwen2 => "qwen2",
            ModelType::Qwen3 => "qwen3",
        }
    }
}

/// The architecture hyper-parameters smelt needs, validated.
///
/// Qwen2 and Qwen3 differ in three ways, all captured here: Qwen2 always has q/k/v biases
/// (`qkv_bias`), Qwen3 has them only with `attention_bias: true` and then o_proj gets one too
/// (`o_bias`), and Qwen3 RMS-normalises each head of q and k (`qk_norm`).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub model_type: ModelType,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Explicit `head_dim` when the file has one (Qwen3: need not equal hidden/heads), else
    /// hidden_size / num_attention_heads.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q_proj, k_proj and v_proj have biases (always for Qwen2; `attention_bias` for Qwen3).
    pub qkv_bias: bool,
    /// o_proj has a bias (Qwen3 with `attention_bias: true` only).
    pub o_bias: bool,
    /// Per-head RMSNorm on q and k (`q_norm`, `k_norm`; Qwen3).
    pub qk_norm: bool,
    pub rope_theta: f64,
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` (an id or a list of ids in HF files).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The dtype the checkpoint was saved in (`torch_dtype` or `dtype`), when it names one
    /// smelt knows. Informational: the loader converts whatever the files hold.
    pub dtype: Option<DType>,
}

impl Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        let text = crate::error::read_to_string(path)?;
        Self::parse(path, &text)
    }

    /// Parses config JSON from a string (errors name the file as `<config.json>`).
    pub fn from_json_str(text: &str) -> Result<Config> {
        Self::parse(Path::new("<config.json>"), text)
    }

    fn parse(path: &Path, text: &str) -> Result<Config> {
        let v = crate::error::parse_json(path, text)?;
        let o = json::as_object(path, &v, "<top level>")?;
        Self::from_object(path, o)
    }

    fn from_object(path: &Path, o: &Obj) -> Result<Config> {
        use limits::*;
        let model_type = match json::get(o, "model_type") {
            None => {
                return Err(Error::field(
                    path,
                    "model_type",
                    "required field is missing (expected \"qwen2\" or \"qwen3\")",
                ))
            }
            Some(Value::String(s)) if s == "qwen2" => ModelType::Qwen2,
            Some(Value::String(s)) if s == "qwen3" => ModelType::Qwen3,
            Some(v) => {
                return Err(Error::field(
                    path,
                    "model_type",
                    format!("{} is not supported (smelt runs \"qwen2\" and \"qwen3\")", json::kind(v)),
                ))
            }
        };
        refuse_unsupported(path, o)?;

        let hidden_size = json::req_size(path, o, "hidden_size", MAX_HIDDEN)?;
        let intermediate_size = json::req_size(path, o, "intermediate_size", MAX_INTERMEDIATE)?;
        let num_hidden_layers = json::req_size(path, o, "num_hidden_layers", MAX_LAYERS)?;
        let num_attention_heads = json::req_size(path, o, "num_attention_heads", MAX_HEADS)?;
        let num_key_value_heads =
            json::opt_size(path, o, "num_key_value_heads", MAX_HEADS)?.unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::field(
                path,
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
            ));
        }
        let head_dim = match json::opt_size(path, o, "head_dim", MAX_HEAD_DIM)? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(Error::field(
                        path,
                        "head_dim",
                        format!(
                            "absent, and hidden_size = {hidden_size} is not divisible by num_attention_heads = {num_attention_heads}"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(Error::field(
                path,
                "head_dim",
                format!("{head_dim} is odd; rotary embeddings need an even head_dim"),
            ));
        }
        let vocab_size = json::req_size(path, o, "vocab_size", MAX_VOCAB)?;
        let max_position_embeddings = json::req_size(path, o, "max_position_embeddings", MAX_POSITIONS)?;
        let rms_norm_eps = match json::opt_f64(path, o, "rms_norm_eps")? {
            None => return Err(Error::field(path, "rms_norm_eps", "required field is missing")),
            Some(e) if e.is_finite() && e > 0.0 && e < 1.0 => e,
            Some(e) => return Err(Error::field(path, "rms_norm_eps", format!("{e} is not in (0, 1)"))),
        };
        let tie_word_embeddings = json::opt_bool(path, o, "tie_word_embeddings")?.unwrap_or(false);
        let attention_bias = json::opt_bool(path, o, "attention_bias")?.unwrap_or(false);
        // transformers' Qwen2Attention hard-codes bias=True on q/k/v and ignores `attention_bias`.
        let (qkv_bias, o_bias, qk_norm) = match model_type {
            ModelType::Qwen2 => (true, false, false),
            ModelType::Qwen3 => (attention_bias, attention_bias, true),
        };
        match json::opt_str(path, o, "hidden_act")? {
            None | Some("silu") => {}
            Some(other) => {
                return Err(Error::field(path, "hidden_act", format!("{other:?} is not supported (only \"silu\")")))
            }
        }
        let rope_theta = rope_theta(path, o)?;
        let dtype = ["dtype", "torch_dtype"].iter().find_map(|f| json::get(o, f)).and_then(|v| match v.as_str() {
            Some("float32") => Some(DType::F32),
            Some("bfloat16") => Some(DType::BF16),
            Some("float16") => Some(DType::F16),
            _ => None,
        });
        let cfg = Config {
            model_type,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            vocab_size,
            max_position_embeddings,
            tie_word_embeddings,
            qkv_bias,
            o_bias,
            qk_norm,
            rope_theta,
            bos_token_id: json::opt_token_id(path, o, "bos_token_id")?,
            eos_token_ids: json::token_ids(path, o, "eos_token_id")?,
            pad_token_id: json::opt_token_id(path, o, "pad_token_id")?,
            dtype,
        };
        Ok(cfg)
    }

    /// Width of the concatenated query heads: num_attention_heads × head_dim.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    /// Width of the concatenated key (or value) heads: num_key_value_heads × head_dim.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
    /// Query heads per key/value head (grouped-query attention).
    pub fn gqa_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Every tensor a checkpoint of this config holds, with its shape, in the order
    /// [`crate::Weights::named_tensors`] yields them: embeddings, layers, final norm, lm_head.
    /// `lm_head.weight` is listed only for untied embeddings.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv, d) = (self.q_dim(), self.kv_dim(), self.head_dim);
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            out.push((p("input_layernorm.weight"), vec![h]));
            out.push((p("self_attn.q_proj.weight"), vec![q, h]));
            if self.qkv_bias {
                out.push((p("self_attn.q_proj.bias"), vec![q]));
            }
            out.push((p("self_attn.k_proj.weight"), vec![kv, h]));
            if self.qkv_bias {
                out.push((p("self_attn.k_proj.bias"), vec![kv]));
            }
            out.push((p("self_attn.v_proj.weight"), vec![kv, h]));
            if self.qkv_bias {
                out.push((p("self_attn.v_proj.bias"), vec![kv]));
            }
            out.push((p("self_attn.o_proj.weight"), vec![h, q]));
            if self.o_bias {
                out.push((p("self_attn.o_proj.bias"), vec![h]));
            }
            if self.qk_norm {
                out.push((p("self_attn.q_norm.weight"), vec![d]));
                out.push((p("self_attn.k_norm.weight"), vec![d]));
            }
            out.push((p("post_attention_layernorm.weight"), vec![h]));
            out.push((p("mlp.gate_proj.weight"), vec![i, h]));
            out.push((p("mlp.up_proj.weight"), vec![i, h]));
            out.push((p("mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        self.expected_tensors().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// An HF-style `config.json` for this config, readable by transformers 4.x (top-level
    /// `rope_theta`, `torch_dtype`) and 5.x (`rope_parameters`, `dtype`) alike.
    pub fn to_json(&self, dtype: DType) -> Value {
        let dtype_name = match dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        };
        let (arch, model_type) = match self.model_type {
            ModelType::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
            ModelType::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        };
        let mut v = json!({
            "architectures": [arch],
            "model_type": model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_scaling": null,
            "use_sliding_window": false,
            "sliding_window": null,
            "torch_dtype": dtype_name,
            "dtype": dtype_name,
            "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
        });
        let eos: Value = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        v["eos_token_id"] = eos;
        if self.model_type == ModelType::Qwen3 {
            v["attention_bias"] = json!(self.qkv_bias);
        }
        v
    }

    /// Writes [`Config::to_json`] to `path`.
    pub fn save(&self, path: impl AsRef<Path>, dtype: DType) -> Result<()> {
        let path = path.as_ref();
        let text = serde_json::to_string_pretty(&self.to_json(dtype)).map_err(|e| Error::Msg(e.to_string()))?;
        std::fs::write(path, text + "\n").map_err(|e| Error::io(path, "cannot write", e))
    }
}

/// Options smelt does not implement, refused by name rather than silently mis-run.
fn refuse_unsupported(path: &Path, o: &Obj) -> Result<()> {
    if json::opt_bool(path, o, "use_sliding_window")? == Some(true) {
        return Err(Error::field(
            path,
            "use_sliding_window",
            "sliding-window attention is not supported (set it to false to run with full attention)",
        ));
    }
    if let Some(v) = json::get(o, "layer_types") {
        let items = v.as_array().ok_or_else(|| {
            Error::field(path, "layer_types", format!("expected an array of strings, got {}", json::kind(v)))
        })?;
        for (i, t) in items.iter().enumerate() {
            if t.as_str() != Some("full_attention") {
                return Err(Error::field(
                    path,
                    format!("layer_types[{i}]"),
                    format!("{} is not supported (only \"full_attention\")", json::kind(t)),
                ));
            }
        }
    }
    if json::get(o, "quantization_config").is_some() {
        return Err(Error::field(path, "quantization_config", "quantized checkpoints are not supported"));
    }
    Ok(())
}

/// Rope theta from `rope_parameters.rope_theta` (transformers ≥ 5) or top-level `rope_theta`
/// (older files); the rope type, wherever given, must be "default".
fn rope_theta(path: &Path, o: &Obj) -> Result<f64> {
    let mut theta = json::opt_f64(path, o, "rope_theta")?;
    for field in ["rope_scaling", "rope_parameters"] {
        let Some(v) = json::get(o, field) else { continue };
        let p = json::as_object(path, v, field)?;
        for key in ["rope_type", "type"] {
            match json::get(p, key) {
                None => {}
                Some(Value::String(s)) if s == "default" => {}
                Some(t) => {
                    return Err(Error::field(
                        path,
                        format!("{field}.{key}"),
                        format!("rope type {} is not supported (only \"default\")", json::kind(t)),
                    ))
                }
            }
        }
        let sub = format!("{field}.rope_theta");
        let value = match json::get(p, "rope_theta") {
            None => None,
            Some(t) => Some(
                t.as_f64()
                    .ok_or_else(|| Error::field(path, &sub, format!("expected a number, got {}", json::kind(t))))?,
            ),
        };
        if let Some(t) = value {
            match theta {
                Some(prev) if prev != t => {
                    return Err(Error::field(path, sub, format!("{t} disagrees with rope_theta = {prev}")));
                }
                _ => theta = Some(t),
            }
        }
    }
    // transformers' Qwen2Config / Qwen3Config default.
    let theta = theta.unwrap_or(10_000.0);
    if !(theta.is_finite() && theta > 1.0) {
        return Err(Error::field(path, "rope_theta", format!("{theta} is not a finite number above 1")));
    }
    Ok(theta)
}

/// The path of `config.json` in a model directory.
pub fn config_path(dir: impl AsRef<Path>) -> PathBuf {
    dir.as_ref().join("config.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        json!({
            "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 400,
            "max_position_embeddings": 512, "rope_theta": 10000.0
        })
    }

    fn err(v: &Value) -> String {
        Config::from_json_str(&v.to_string()).unwrap_err().to_string()
    }

    #[test]
    fn roundtrip_through_to_json() {
        let c = Config::from_json_str(&base().to_string()).unwrap();
        assert_eq!(c.head_dim, 16);
        assert!(c.qkv_bias && !c.o_bias && !c.qk_norm && !c.tie_word_embeddings);
        let again = Config::from_json_str(&c.to_json(DType::F32).to_string()).unwrap();
        assert_eq!(again, Config { dtype: Some(DType::F32), ..c });
    }

    #[test]
    fn field_errors_name_the_field() {
        let mut v = base();
        v["hidden_size"] = json!("64");
        assert!(err(&v).contains("`hidden_size`"), "{}", err(&v));
        let mut v = base();
        v["vocab_size"] = json!(1u64 << 40);
        assert!(err(&v).contains("`vocab_size`") && err(&v).contains("implausibly large"));
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        assert!(err(&v).contains("`num_key_value_heads`"));
        let mut v = base();
        v["hidden_size"] = json!(0);
        assert!(err(&v).contains("must be positive"));
        let mut v = base();
        v["num_attention_heads"] = json!(5);
        v["num_key_value_heads"] = json!(5);
        assert!(err(&v).contains("`head_dim`"));
        let mut v = base();
        v["hidden_act"] = json!("gelu");
        assert!(err(&v).contains("`hidden_act`"));
        let mut v = base();
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 5.0});
        assert!(err(&v).contains("`rope_parameters.rope_theta`"));
        let mut v = base();
        v["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
        assert!(err(&v).contains("`rope_scaling.type`"));
        let mut v = base();
        v["layer_types"] = json!(["full_attention", "sliding_attention"]);
        assert!(err(&v).contains("`layer_types[1]`"));
        let mut v = base();
        v["eos_token_id"] = json!([1, "x"]);
        assert!(err(&v).contains("`eos_token_id[1]`"));
    }

    #[test]
    fn defaults_and_qwen3_bias() {
        let mut v = base();
        v["model_type"] = json!("qwen3");
        v.as_object_mut().unwrap().remove("rope_theta");
        v.as_object_mut().unwrap().remove("num_key_value_heads");
        v["attention_bias"] = json!(true);
        v["rope_scaling"] = Value::Null;
        v["sliding_window"] = json!(4096);
        v["eos_token_id"] = json!([3, 4]);
        let c = Config::from_json_str(&v.to_string()).unwrap();
        assert_eq!(c.rope_theta, 10_000.0);
        assert_eq!(c.num_key_value_heads, 4);
        assert!(c.qkv_bias && c.o_bias && c.qk_norm);
        assert_eq!(c.eos_token_ids, vec![3, 4]);
        assert!(c.expected_tensors().iter().any(|(n, s)| n == "model.layers.1.self_attn.o_proj.bias" && s == &[64]));
    }
}
