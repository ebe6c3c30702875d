//! Test helpers shared with other crates' tests: the committed fixture checkpoints, random
//! checkpoints of any Qwen shape, raw safetensors bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use smelt_engine::{DType, Rng};

use crate::{Config, Error, ModelType, Result};

/// A committed fixture model directory, `tests/fixtures/<name>` (see its README).
pub fn fixture(name: &str) -> PathBuf {
    smelt_kernels::testing::repo_path("tests/fixtures").join(name)
}

/// A temporary copy of a fixture directory's files (not its `reference/` folder), to break.
/// Panics on I/O errors: for tests only.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let src = fixture(name);
    for e in std::fs::read_dir(&src).unwrap_or_else(|e| panic!("read {}: {e}", src.display())) {
        let e = e.expect("directory entry");
        if e.file_type().expect("file type").is_file() {
            std::fs::copy(e.path(), tmp.path().join(e.file_name())).expect("copy fixture file");
        }
    }
    tmp
}

/// Safetensors bytes from a header string and `data_len` zero bytes of data.
pub fn raw_safetensors(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(0u8, data_len));
    out
}

/// Qwen2.5-0.5B-Instruct's architecture (tied embeddings, q/k/v bias, 24 layers, vocab 151,936).
pub fn qwen2_5_0_5b_config() -> Config {
    Config {
        model_type: ModelType::Qwen2,
        hidden_size: 896,
        intermediate_size: 4864,
        num_hidden_layers: 24,
        num_attention_heads: 14,
        num_key_value_heads: 2,
        head_dim: 64,
        rms_norm_eps: 1e-6,
        vocab_size: 151_936,
        max_position_embeddings: 32_768,
        tie_word_embeddings: true,
        qkv_bias: true,
        o_bias: false,
        qk_norm: false,
        rope_theta: 1_000_000.0,
        bos_token_id: Some(151_643),
        eos_token_ids: vec![151_645],
        pad_token_id: None,
        dtype: Some(DType::BF16),
    }
}

/// Qwen3-0.6B's architecture (tied embeddings, q/k norm, head_dim 128 ≠ 1024/16, 28 layers).
pub fn qwen3_0_6b_config() -> Config {
    Config {
        model_type: ModelType::Qwen3,
        hidden_size: 1024,
        intermediate_size: 3072,
        num_hidden_layers: 28,
        num_attention_heads: 16,
        num_key_value_heads: 8,
        head_dim: 128,
        rms_norm_eps: 1e-6,
        vocab_size: 151_936,
        max_position_embeddings: 40_960,
        tie_word_embeddings: true,
        qkv_bias: false,
        o_bias: false,
        qk_norm: true,
        rope_theta: 1_000_000.0,
        bos_token_id: Some(151_643),
        eos_token_ids: vec![151_645],
        pad_token_id: None,
        dtype: Some(DType::BF16),
    }
}

/// Writes a random checkpoint of `config`'s shapes into `dir` (created if needed):
/// `config.json`, `generation_config.json` and one `model.safetensors` in `dtype`, streamed
/// tensor by tensor so a 0.5B-parameter model needs no more memory than one chunk.
///
/// Values are uniform with scales that keep a forward pass well-conditioned and its output
/// far from uniform: norm weights in [0.8, 1.2], biases std 0.1, linear weights std
/// 1/√fan_in, embeddings and lm_head std 2/√hidden (logits of std ≈ 2). Each tensor's stream depends only on
/// `seed` and the tensor's position, so the same arguments give byte-identical files.
pub fn write_random_checkpoint(dir: impl AsRef<Path>, config: &Config, dtype: DType, seed: u64) -> Result<()> {
    let dir = dir.as_ref();
    if !dtype.is_float() {
        return Err(Error::Msg(format!("write_random_checkpoint: {dtype} is not a float dtype")));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "cannot create", e))?;
    config.save(dir.join("config.json"), dtype)?;
    let gen = serde_json::json!({"eos_token_id": config.eos_token_ids, "bos_token_id": config.bos_token_id, "do_sample": false});
    let gen_path = dir.join("generation_config.json");
    std::fs::write(&gen_path, gen.to_string()).map_err(|e| Error::io(&gen_path, "cannot write", e))?;

    let expected = config.expected_tensors();
    let entries: Vec<(String, DType, Vec<usize>)> =
        expected.iter().map(|(n, s)| (n.clone(), dtype, s.clone())).collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let path = dir.join("model.safetensors");
    crate::safetensors::write_atomic(&path, &entries, &meta, |i, w| {
        let (name, shape) = &expected[i];
        let (center, half_width) = scale(name, shape, config.hidden_size);
        let mut rng = Rng::new(Rng::new(seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64());
        let n: usize = shape.iter().product();
        let mut vals: Vec<f32> = Vec::with_capacity(CHUNK);
        let mut buf: Vec<u8> = Vec::with_capacity(CHUNK * 4);
        let mut left = n;
        while left > 0 {
            let k = left.min(CHUNK);
            vals.clear();
            // Two 24-bit uniforms per draw: this runs over half a billion values at 0.5B.
            for _ in 0..k / 2 {
                let r = rng.next_u64();
                vals.push((r >> 40) as f32 * (1.0 / (1u32 << 24) as f32));
                vals.push(((r >> 8) & 0xff_ffff) as f32 * (1.0 / (1u32 << 24) as f32));
            }
            if k % 2 == 1 {
                vals.push(rng.next_f32());
            }
            for v in vals.iter_mut() {
                *v = center + half_width * (2.0 * *v - 1.0);
            }
            buf.clear();
            match dtype {
                DType::BF16 => buf.extend(vals.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())),
                DType::F16 => buf.extend(vals.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes())),
                _ => buf.extend(vals.iter().flat_map(|&x| x.to_le_bytes())),
            }
            w.write_all(&buf).map_err(|e| Error::io(&path, "cannot write", e))?;
            left -= k;
        }
        Ok(())
    })
}

const CHUNK: usize = 1 << 16;

/// (center, half-width) of the uniform distribution for one tensor.
fn scale(name: &str, shape: &[usize], hidden: usize) -> (f32, f32) {
    let sqrt3 = 3f32.sqrt();
    let std = if name.ends_with("norm.weight") {
        return (1.0, 0.2);
    } else if name.ends_with(".bias") {
        0.1
    } else if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
        // The embedding doubles as lm_head when tied; RMSNorm makes its scale irrelevant
        // as an input.
        2.0 / (hidden as f32).sqrt()
    } else {
        1.0 / (shape.get(1).copied().unwrap_or(1).max(1) as f32).sqrt()
    };
    (0.0, std * sqrt3)
}
