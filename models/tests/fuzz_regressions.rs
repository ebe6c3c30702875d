//! Inputs from fuzzing the loaders (fuzz/, `cargo fuzz`), and the numbers a file can use to
//! size an allocation: shape products, header lengths, offsets and config sizes at their
//! limits. Each must end in an error (or a correct, bounded load), never a panic, an
//! overflow or an allocation sized by an unchecked number.

use std::path::Path;

use serde_json::json;
use smelt_engine::DType;
use smelt_models::safetensors::{parse_header, SafetensorsFile, MAX_HEADER_BYTES};
use smelt_models::{limits, Checkpoint, Config, Error, GenerationConfig, LoadOptions, TokenizerConfig};

use smelt_models::testing::raw_safetensors as raw;

fn header_err(bytes: &[u8]) -> String {
    match parse_header(Path::new("f.safetensors"), bytes) {
        Err(e @ Error::Safetensors { .. }) => e.to_string(),
        other => panic!("expected a safetensors error, got {other:?}"),
    }
}

fn entry(shape: &str, offsets: &str) -> String {
    format!("{{\"t\":{{\"dtype\":\"F32\",\"shape\":{shape},\"data_offsets\":{offsets}}}}}")
}

// ---- shape products ----

#[test]
fn shape_product_overflow_is_an_error() {
    // 4 bytes × 2^62 × 4 wraps to 0 in unchecked arithmetic, which would match offsets [0, 0].
    let s = header_err(&raw(&entry("[4611686018427387904, 4]", "[0, 0]"), 0));
    assert!(s.contains("overflows") && s.contains("tensor `t`"), "{s}");
    // The byte count alone overflows although the element count fits.
    let s = header_err(&raw(&entry(&format!("[{}]", u64::MAX / 2), "[0, 0]"), 0));
    assert!(s.contains("overflows"), "{s}");
    // Many dimensions whose product wraps to exactly the span.
    let s = header_err(&raw(&entry(&format!("[{}, 65536, 65536, 65536, 2]", 1u64 << 15), "[0, 8]"), 8));
    assert!(s.contains("overflows"), "{s}");
}

#[test]
fn shape_sizes_beyond_u64_are_an_error() {
    for shape in ["[18446744073709551616]", "[1e30]", "[-1]", "[2.5]", "[\"3\"]", "[null]"] {
        let s = header_err(&raw(&entry(shape, "[0, 4]"), 4));
        assert!(s.contains("is not a list of sizes"), "{shape}: {s}");
    }
}

#[test]
fn zero_sized_tensor_with_huge_dims_loads_as_empty() {
    // A zero anywhere makes the tensor empty; the other dims must not be multiplied unchecked
    // when it is loaded.
    let header = format!(
        "{{\"z\":{{\"dtype\":\"BF16\",\"shape\":[0, {big}, {big}],\"data_offsets\":[0,0]}},\
         \"a\":{{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}}}",
        big = 1u64 << 62
    );
    let bytes = raw(&header, 4);
    let h = parse_header(Path::new("f.safetensors"), &bytes).unwrap();
    assert_eq!(h.tensors[0].elem_count(), 0);
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("f.safetensors");
    std::fs::write(&p, &bytes).unwrap();
    let f = SafetensorsFile::open(&p).unwrap();
    for dtype in [None, Some(DType::F32)] {
        let all = f.load_all(dtype, true).unwrap();
        assert_eq!(all[0].1.shape(), &[0, 1 << 62, 1 << 62]);
        assert_eq!(all[0].1.elem_count(), 0);
        assert_eq!(all[1].1.to_vec_f32().unwrap(), vec![0.0]);
    }
}

// ---- header length and offsets ----

#[test]
fn header_lengths_near_u64_max_are_refused_before_allocating() {
    for n in [u64::MAX, u64::MAX - 7, 1 << 63, MAX_HEADER_BYTES + 1, 9] {
        let mut b = raw("{}", 0);
        b[..8].copy_from_slice(&n.to_le_bytes());
        let s = header_err(&b);
        assert!(s.contains("header length"), "{n}: {s}");
    }
}

#[test]
fn header_length_over_the_limit_with_a_large_enough_buffer() {
    // The 100 MB limit is checked even when the bytes are there.
    let n = MAX_HEADER_BYTES + 1;
    let mut b = vec![b' '; 8 + n as usize];
    b[..8].copy_from_slice(&n.to_le_bytes());
    let s = header_err(&b);
    assert!(s.contains("exceeds") && s.contains(&MAX_HEADER_BYTES.to_string()), "{s}");
}

#[test]
fn offsets_near_u64_max_are_an_error() {
    let cases = [
        format!("[{}, {}]", u64::MAX - 3, u64::MAX),
        format!("[0, {}]", u64::MAX),
        "[0, 18446744073709551616]".to_string(),
        "[4, 0]".to_string(),
        "[0]".to_string(),
        "[0, 4, 8]".to_string(),
        "[0.0, 4.0]".to_string(),
    ];
    for offs in &cases {
        let s = header_err(&raw(&entry("[1]", offs), 4));
        assert!(s.contains("data_offsets"), "{offs}: {s}");
    }
}

// ---- config.json sizes ----

fn config_at_limits() -> serde_json::Value {
    json!({
        "model_type": "qwen3", "hidden_size": limits::MAX_HIDDEN, "intermediate_size": limits::MAX_INTERMEDIATE,
        "num_hidden_layers": limits::MAX_LAYERS, "num_attention_heads": limits::MAX_HEADS,
        "num_key_value_heads": 1, "head_dim": limits::MAX_HEAD_DIM, "rms_norm_eps": 1e-6,
        "vocab_size": limits::MAX_VOCAB, "max_position_embeddings": limits::MAX_POSITIONS,
        "tie_word_embeddings": false, "attention_bias": true
    })
}

#[test]
fn config_at_every_limit_has_no_overflowing_product() {
    let c = Config::from_json_str(&config_at_limits().to_string()).unwrap();
    for (name, shape) in c.expected_tensors() {
        let bytes = shape.iter().try_fold(4usize, |a, &d| a.checked_mul(d));
        assert!(bytes.is_some(), "{name} {shape:?} overflows");
    }
    assert!(c.num_parameters() > 0);
    // One past any limit is refused by name.
    for (field, max) in [
        ("hidden_size", limits::MAX_HIDDEN),
        ("intermediate_size", limits::MAX_INTERMEDIATE),
        ("num_hidden_layers", limits::MAX_LAYERS),
        ("num_attention_heads", limits::MAX_HEADS),
        ("head_dim", limits::MAX_HEAD_DIM),
        ("vocab_size", limits::MAX_VOCAB),
        ("max_position_embeddings", limits::MAX_POSITIONS),
    ] {
        let mut v = config_at_limits();
        v[field] = json!(max + 1);
        let e = Config::from_json_str(&v.to_string()).unwrap_err().to_string();
        assert!(e.contains(&format!("`{field}`")) && e.contains("implausibly large"), "{field}: {e}");
    }
}

#[test]
fn config_at_limits_with_a_tiny_file_fails_before_allocating() {
    // Sizes come from config.json, but nothing is allocated until the file's tensors match
    // them; a file cannot hold 2^40-element tensors, so this must fail fast and cheaply.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), config_at_limits().to_string()).unwrap();
    std::fs::write(tmp.path().join("model.safetensors"), raw(&entry("[1]", "[0, 4]"), 4)).unwrap();
    let ck = Checkpoint::open(tmp.path()).unwrap();
    let e = ck.load_weights(&LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("do not match config.json") && e.contains("missing: model.embed_tokens.weight"), "{e}");
}

#[test]
fn integer_like_floats_and_huge_numbers_in_configs() {
    let p = Path::new("generation_config.json");
    for (text, ok) in [
        (r#"{"max_new_tokens": 1e300}"#, false),
        (r#"{"max_new_tokens": 64.0}"#, true),
        (r#"{"max_new_tokens": 4294967296}"#, false),
        (r#"{"top_k": 18446744073709551615}"#, true),
        (r#"{"eos_token_id": [4294967296]}"#, false),
        (r#"{"temperature": -0.0}"#, true),
        (r#"{"top_p": 0}"#, false),
    ] {
        assert_eq!(GenerationConfig::from_json_str(p, text).is_ok(), ok, "{text}");
    }
    let mut v = config_at_limits();
    v["hidden_size"] = json!(1e300);
    let e = Config::from_json_str(&v.to_string()).unwrap_err().to_string();
    assert!(e.contains("`hidden_size`"), "{e}");
    v["hidden_size"] = json!(65536.0);
    assert!(Config::from_json_str(&v.to_string()).is_ok());
}

#[test]
fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(Config::from_json_str(&deep).is_err());
    assert!(TokenizerConfig::from_json_str(Path::new("t.json"), &deep).is_err());
    let s = header_err(&raw(&deep, 0));
    assert!(s.contains("not a valid JSON object"), "{s}");
    let nested_entry = format!("{{\"t\":{}1{}}}", "{\"a\":".repeat(50_000), "}".repeat(50_000));
    header_err(&raw(&nested_entry, 0));
}

// ---- the committed fuzz seeds stay meaningful ----

/// The seeds under fuzz/seeds/ (written by fuzz/make_seeds.py) are valid inputs, so a fuzz
/// run starts from a model that loads rather than from errors only.
#[test]
fn fuzz_seeds_are_valid_inputs() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    for name in ["mixed_dtypes", "empty", "tiny_qwen2_bf16", "tiny_qwen3_f32"] {
        let bytes = std::fs::read(seeds.join("safetensors_header").join(name)).unwrap();
        parse_header(Path::new(name), &bytes).unwrap();
    }
    for name in ["qwen2_tied_bf16", "qwen3_untied_f32_index"] {
        // mode: u8, config_len: u16 LE, config, [index_len: u16 LE, index], safetensors.
        let bytes = std::fs::read(seeds.join("model_dir").join(name)).unwrap();
        let take = |at: usize| -> (usize, usize) {
            let len = u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize;
            (at + 2, at + 2 + len)
        };
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = take(1);
        std::fs::write(tmp.path().join("config.json"), &bytes[a..b]).unwrap();
        if bytes[0] & 1 == 1 {
            let (c, d) = take(b);
            std::fs::write(tmp.path().join("model.safetensors.index.json"), &bytes[c..d]).unwrap();
            std::fs::write(tmp.path().join("s.safetensors"), &bytes[d..]).unwrap();
        } else {
            std::fs::write(tmp.path().join("model.safetensors"), &bytes[b..]).unwrap();
        }
        let ck = Checkpoint::open(tmp.path()).unwrap();
        let w = ck.load_weights(&LoadOptions::default()).unwrap();
        assert_eq!(w.num_parameters(), ck.config.num_parameters(), "{name}");
    }
}
