//! Any text as config.json, tokenizer_config.json and generation_config.json: each parser must
//! return a value or an error, never panic. An accepted config must satisfy the invariants the
//! model code relies on and survive `to_json` → parse.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use smelt_engine::DType;
use smelt_models::{ChatTemplate, Config, GenerationConfig, TokenizerConfig};

fn close(a: f64, b: f64) -> bool {
    // serde_json's default float parser may be one ulp off on a round trip.
    a == b || (a - b).abs() <= 4.0 * f64::EPSILON * a.abs().max(b.abs())
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = Config::from_json_str(text) {
        assert!(c.hidden_size > 0 && c.intermediate_size > 0 && c.num_hidden_layers > 0);
        assert!(c.vocab_size > 0 && c.max_position_embeddings > 0);
        assert_eq!(c.num_attention_heads % c.num_key_value_heads, 0);
        assert!(c.head_dim > 0 && c.head_dim % 2 == 0);
        assert!(c.rms_norm_eps > 0.0 && c.rms_norm_eps < 1.0 && c.rope_theta.is_finite());
        // Products of the limits must not overflow (these are what allocations are sized by).
        let expected = c.expected_tensors();
        for (_, shape) in &expected {
            assert!(shape.iter().try_fold(4usize, |a, &d| a.checked_mul(d)).is_some(), "{shape:?}");
        }
        let again = Config::from_json_str(&c.to_json(DType::F32).to_string()).expect("to_json output must parse");
        assert!(close(again.rms_norm_eps, c.rms_norm_eps) && close(again.rope_theta, c.rope_theta));
        let same_floats = Config { rms_norm_eps: c.rms_norm_eps, rope_theta: c.rope_theta, ..again };
        assert_eq!(same_floats, Config { dtype: Some(DType::F32), ..c });
    }
    let path = Path::new("<fuzz>");
    if let Ok(tc) = TokenizerConfig::from_json_str(path, text) {
        // Compiles the template only: rendering arbitrary templates can loop for a long time.
        let _ = ChatTemplate::from_tokenizer_config(&tc);
    }
    let _ = GenerationConfig::from_json_str(path, text);
});
