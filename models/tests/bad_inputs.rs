//! Every malformed input gives an error naming the file and the field, tensor or token —
//! never a panic, never a silent mis-load.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use smelt_engine::{DType, Device, Tensor};
use smelt_models::safetensors::{parse_header, SafetensorsFile};
use smelt_models::{
    save_safetensors, ChatTemplate, Checkpoint, Config, Error, LoadOptions, RenderOptions, Tokenizer, TokenizerConfig,
    Weights,
};

use smelt_models::testing::{copy_fixture, fixture, raw_safetensors as raw};

fn qwen2_config() -> Config {
    Config::from_file(fixture("qwen2-tiny/config.json")).unwrap()
}

fn fixture_tensors() -> Vec<(String, Tensor)> {
    SafetensorsFile::open(fixture("qwen2-tiny/model.safetensors")).unwrap().load_all(None, true).unwrap()
}

fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) {
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    save_safetensors(path, &refs).unwrap();
}

fn header_err(bytes: &[u8]) -> String {
    let e = parse_header(Path::new("shard.safetensors"), bytes).unwrap_err();
    assert!(matches!(e, Error::Safetensors { .. }), "{e:?}");
    let s = e.to_string();
    assert!(s.contains("shard.safetensors"), "{s}");
    s
}

fn load_err(dir: &Path) -> String {
    Weights::load(dir, &qwen2_config(), &LoadOptions::default()).unwrap_err().to_string()
}

// ---- safetensors structure ----

#[test]
fn truncated_file_shorter_than_8_bytes() {
    let s = header_err(&[1, 2, 3]);
    assert!(s.contains("shorter than the 8-byte header"), "{s}");
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("model.safetensors");
    std::fs::write(&p, b"").unwrap();
    let s = SafetensorsFile::open(&p).unwrap_err().to_string();
    assert!(s.contains("model.safetensors") && s.contains("0 bytes"), "{s}");
}

#[test]
fn header_length_larger_than_file() {
    let mut b = raw("{}", 0);
    b[..8].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    let s = header_err(&b);
    assert!(s.contains("header length"), "{s}");
    // A real file cut short mid-download.
    let full = std::fs::read(fixture("qwen2-tiny/model.safetensors")).unwrap();
    let s = header_err(&full[..100]);
    assert!(s.contains("truncated"), "{s}");
}

#[test]
fn truncated_data_section() {
    let full = std::fs::read(fixture("qwen2-tiny/model.safetensors")).unwrap();
    let s = header_err(&full[..full.len() - 10]);
    assert!(s.contains("out of range") || s.contains("cover"), "{s}");
}

#[test]
fn invalid_json_header() {
    let s = header_err(&raw("{\"a\": {\"dtype\": ", 0));
    assert!(s.contains("not a valid JSON object") && s.contains("line 1"), "{s}");
    let s = header_err(&raw("[1, 2]", 0));
    assert!(s.contains("not a valid JSON object"), "{s}");
    let s = header_err(&raw(r#"{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#, 4));
    assert!(s.contains("`a`") && s.contains("shape"), "{s}");
    let s = header_err(&raw(r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}"#, 4));
    assert!(s.contains("`a`") && s.contains("data_offsets"), "{s}");
}

#[test]
fn byte_count_disagrees_with_offsets() {
    let s = header_err(&raw(r#"{"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}"#, 20));
    assert!(s.contains("`w`") && s.contains("24 bytes") && s.contains("span 20"), "{s}");
    // A shape whose byte count overflows must not be trusted either.
    let s = header_err(&raw(
        r#"{"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 4294967296], "data_offsets": [0, 4]}}"#,
        4,
    ));
    assert!(s.contains("`w`") && s.contains("overflow"), "{s}");
}

#[test]
fn overlapping_offsets() {
    let h = r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}"#;
    let s = header_err(&raw(h, 12));
    assert!(s.contains("overlaps") && s.contains("`a`") && s.contains("`b`"), "{s}");
}

#[test]
fn out_of_order_offsets() {
    let h = r#"{"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}"#;
    let s = header_err(&raw(h, 8));
    assert!(s.contains("`a`") && s.contains("out of order"), "{s}");
}

#[test]
fn out_of_range_offsets() {
    let h = r#"{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#;
    let s = header_err(&raw(h, 8));
    assert!(s.contains("`a`") && s.contains("out of range"), "{s}");
    let h = r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#;
    let s = header_err(&raw(h, 8));
    assert!(s.contains("unused bytes before tensor `a`"), "{s}");
    let h = r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#;
    let s = header_err(&raw(h, 8));
    assert!(s.contains("trailing"), "{s}");
}

#[test]
fn duplicate_tensor_names() {
    let h = r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#;
    let s = header_err(&raw(h, 8));
    assert!(s.contains("\"a\" appears twice"), "{s}");
}

#[test]
fn unsupported_and_unknown_dtypes() {
    let s = header_err(&raw(r#"{"a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}"#, 8));
    assert!(s.contains("`a`") && s.contains("F64 is not supported"), "{s}");
    let s = header_err(&raw(r#"{"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}"#, 1));
    assert!(s.contains("unknown dtype \"Q4\""), "{s}");
}

#[test]
fn corrupt_file_in_a_model_dir_names_the_file() {
    let tmp = copy_fixture("qwen2-tiny");
    let p = tmp.path().join("model.safetensors");
    let full = std::fs::read(&p).unwrap();
    std::fs::write(&p, &full[..full.len() / 2]).unwrap();
    let s = load_err(tmp.path());
    assert!(s.contains("model.safetensors") && s.contains("invalid safetensors file"), "{s}");
}

// ---- tensors against the config ----

#[test]
fn missing_unexpected_and_misshaped_tensors_in_one_error() {
    let tmp = copy_fixture("qwen2-tiny");
    let mut ts = fixture_tensors();
    ts.retain(|(n, _)| n != "model.layers.1.self_attn.k_proj.bias" && n != "model.norm.weight");
    ts.push(("model.layers.0.mlp.extra.weight".into(), Tensor::zeros(&[2, 2], DType::F32, Device::Cpu).unwrap()));
    for (n, t) in ts.iter_mut() {
        if n == "model.layers.0.mlp.up_proj.weight" {
            *t = Tensor::zeros(&[64, 160], DType::F32, Device::Cpu).unwrap();
        }
    }
    write_tensors(&tmp.path().join("model.safetensors"), &ts);
    let e = Weights::load(tmp.path(), &qwen2_config(), &LoadOptions::default()).unwrap_err();
    let Error::TensorMismatch { problems, .. } = &e else { panic!("{e:?}") };
    let s = e.to_string();
    assert!(s.contains("missing: model.layers.1.self_attn.k_proj.bias (expected shape [32])"), "{s}");
    assert!(s.contains("missing: model.norm.weight"), "{s}");
    assert!(s.contains("unexpected: model.layers.0.mlp.extra.weight [2, 2] in model.safetensors"), "{s}");
    assert!(
        s.contains("mis-shaped: model.layers.0.mlp.up_proj.weight is [64, 160] in model.safetensors, config.json implies [160, 64]"),
        "{s}"
    );
    assert!(s.contains("2 missing, 1 unexpected, 1 mis-shaped"), "{s}");
    assert_eq!(problems.len(), 5);
}

#[test]
fn config_from_a_different_model_is_refused_before_allocation() {
    // qwen3 tensors against the qwen2 config: a long list, capped.
    let mut c = Config::from_file(fixture("qwen3-tiny/config.json")).unwrap();
    c.num_hidden_layers = 30;
    c.vocab_size = 1 << 24;
    let e = Weights::load(fixture("qwen3-tiny"), &c, &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("… and") && e.contains("mis-shaped: model.embed_tokens.weight"), "{e}");
}

#[test]
fn lm_head_present_while_tied_is_ignored() {
    let tmp = copy_fixture("qwen2-tiny");
    let mut ts = fixture_tensors();
    ts.push(("lm_head.weight".into(), Tensor::full(3.0, &[400, 64], DType::F32, Device::Cpu).unwrap()));
    write_tensors(&tmp.path().join("model.safetensors"), &ts);
    let w = Weights::load(tmp.path(), &qwen2_config(), &LoadOptions::default()).unwrap();
    assert!(w.lm_head.is_none());
    ts.last_mut().unwrap().1 = Tensor::zeros(&[3, 64], DType::F32, Device::Cpu).unwrap();
    write_tensors(&tmp.path().join("model.safetensors"), &ts);
    let s = load_err(tmp.path());
    assert!(s.contains("mis-shaped: lm_head.weight"), "{s}");
}

#[test]
fn integer_weight_is_refused() {
    let tmp = copy_fixture("qwen2-tiny");
    let mut ts = fixture_tensors();
    for (n, t) in ts.iter_mut() {
        if n == "model.norm.weight" {
            *t = Tensor::zeros(&[64], DType::I32, Device::Cpu).unwrap();
        }
    }
    write_tensors(&tmp.path().join("model.safetensors"), &ts);
    let s = load_err(tmp.path());
    assert!(s.contains("wrong dtype: model.norm.weight is i32"), "{s}");
}

#[test]
fn nan_or_inf_in_a_weight_names_the_tensor() {
    let tmp = copy_fixture("qwen2-tiny");
    let mut ts = fixture_tensors();
    for (n, t) in ts.iter_mut() {
        if n == "model.layers.1.mlp.down_proj.weight" {
            t.cpu_write::<f32>().unwrap()[77] = f32::NAN;
        }
    }
    write_tensors(&tmp.path().join("model.safetensors"), &ts);
    let s = load_err(tmp.path());
    assert!(s.contains("model.layers.1.mlp.down_proj.weight") && s.contains("NaN") && s.contains("index 77"), "{s}");
    assert!(s.contains("model.safetensors"), "{s}");
    // Skippable.
    let opts = LoadOptions { check_finite: false, ..Default::default() };
    let w = Weights::load(tmp.path(), &qwen2_config(), &opts).unwrap();
    assert!(w.layers[1].down_proj.to_vec_f32().unwrap()[77].is_nan());

    // bf16 shards: +Inf.
    let tmp = copy_fixture("qwen3-tiny");
    let shard = tmp.path().join("model-00002-of-00002.safetensors");
    let mut ts = SafetensorsFile::open(&shard).unwrap().load_all(None, true).unwrap();
    for (n, t) in ts.iter_mut() {
        if n == "model.norm.weight" {
            t.cpu_write::<smelt_engine::bf16>().unwrap()[3] = smelt_engine::bf16::INFINITY;
        }
    }
    write_tensors(&shard, &ts);
    let c = Config::from_file(tmp.path().join("config.json")).unwrap();
    let s = Weights::load(tmp.path(), &c, &LoadOptions::default()).unwrap_err().to_string();
    assert!(
        s.contains("model-00002-of-00002.safetensors") && s.contains("`model.norm.weight`") && s.contains("inf"),
        "{s}"
    );
}

// ---- shards ----

#[test]
fn absent_shard_is_named() {
    let tmp = copy_fixture("qwen3-tiny");
    std::fs::remove_file(tmp.path().join("model-00002-of-00002.safetensors")).unwrap();
    let c = Config::from_file(tmp.path().join("config.json")).unwrap();
    let s = Weights::load(tmp.path(), &c, &LoadOptions::default()).unwrap_err().to_string();
    assert!(s.contains("model.safetensors.index.json") && s.contains("shard model-00002-of-00002.safetensors"), "{s}");
}

#[test]
fn index_entry_not_in_its_shard() {
    let tmp = copy_fixture("qwen3-tiny");
    let p = tmp.path().join("model.safetensors.index.json");
    let mut idx: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    // The norm lives in shard 2; the index now claims shard 1.
    idx["weight_map"]["model.norm.weight"] = json!("model-00001-of-00002.safetensors");
    std::fs::write(&p, idx.to_string()).unwrap();
    let c = Config::from_file(tmp.path().join("config.json")).unwrap();
    let s = Weights::load(tmp.path(), &c, &LoadOptions::default()).unwrap_err().to_string();
    assert!(
        s.contains("`model.norm.weight`")
            && s.contains("model-00001-of-00002.safetensors")
            && s.contains("does not contain"),
        "{s}"
    );

    idx["weight_map"]["model.norm.weight"] = json!("../model.safetensors");
    std::fs::write(&p, idx.to_string()).unwrap();
    let s = Weights::load(tmp.path(), &c, &LoadOptions::default()).unwrap_err().to_string();
    assert!(s.contains("weight_map.model.norm.weight") && s.contains("not a plain file name"), "{s}");

    std::fs::write(&p, "{\"weight_map\": ").unwrap();
    let s = Weights::load(tmp.path(), &c, &LoadOptions::default()).unwrap_err().to_string();
    assert!(s.contains("model.safetensors.index.json") && s.contains("not valid JSON"), "{s}");
}

#[test]
fn tensor_in_shard_but_not_in_index() {
    let tmp = copy_fixture("qwen3-tiny");
    let p = tmp.path().join("model.safetensors.index.json");
    let mut idx: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    idx["weight_map"].as_object_mut().unwrap().remove("model.norm.weight");
    std::fs::write(&p, idx.to_string()).unwrap();
    let c = Config::from_file(tmp.path().join("config.json")).unwrap();
    let s = Weights::load(tmp.path(), &c, &LoadOptions::default()).unwrap_err().to_string();
    assert!(s.contains("`model.norm.weight`") && s.contains("not listed in the index"), "{s}");
}

#[test]
fn no_weights_at_all() {
    let tmp = tempfile::tempdir().unwrap();
    let s = load_err(tmp.path());
    assert!(s.contains("neither model.safetensors nor model.safetensors.index.json"), "{s}");
    let s = load_err(&tmp.path().join("nope"));
    assert!(s.contains("nope"), "{s}");
}

// ---- config.json ----

fn config_err(v: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("config.json");
    std::fs::write(&p, v).unwrap();
    let s = Config::from_file(&p).unwrap_err().to_string();
    assert!(s.contains("config.json"), "{s}");
    s
}

fn qwen2_config_json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("qwen2-tiny/config.json")).unwrap()).unwrap()
}

#[test]
fn config_not_json() {
    let s = config_err("{\n  \"model_type\": \"qwen2\",\n  oops\n}");
    assert!(s.contains("not valid JSON") && s.contains("line 3"), "{s}");
    let s = config_err("[]");
    assert!(s.contains("expected a JSON object"), "{s}");
    let s = Config::from_file("/definitely/not/here/config.json").unwrap_err().to_string();
    assert!(s.contains("/definitely/not/here/config.json") && s.contains("cannot read"), "{s}");
}

#[test]
fn config_missing_field() {
    for field in ["hidden_size", "vocab_size", "num_hidden_layers", "rms_norm_eps", "model_type"] {
        let mut v = qwen2_config_json();
        v.as_object_mut().unwrap().remove(field);
        let s = config_err(&v.to_string());
        assert!(s.contains(&format!("field `{field}`")) && s.contains("missing"), "{s}");
    }
}

#[test]
fn config_wrong_type_and_absurd_sizes() {
    let mut v = qwen2_config_json();
    v["num_attention_heads"] = json!("4");
    let s = config_err(&v.to_string());
    assert!(s.contains("`num_attention_heads`") && s.contains("string \"4\""), "{s}");
    let mut v = qwen2_config_json();
    v["vocab_size"] = json!(1u64 << 25);
    assert!(config_err(&v.to_string()).contains("`vocab_size`"));
    let mut v = qwen2_config_json();
    v["hidden_size"] = json!(65537);
    assert!(config_err(&v.to_string()).contains("`hidden_size`"));
    let mut v = qwen2_config_json();
    v["tie_word_embeddings"] = json!("yes");
    assert!(config_err(&v.to_string()).contains("`tie_word_embeddings`"));
}

#[test]
fn config_unknown_model_type() {
    let mut v = qwen2_config_json();
    v["model_type"] = json!("llama");
    let s = config_err(&v.to_string());
    assert!(s.contains("`model_type`") && s.contains("\"llama\" is not supported"), "{s}");
}

#[test]
fn config_sliding_window_refused() {
    let mut v = qwen2_config_json();
    v["use_sliding_window"] = json!(true);
    v["sliding_window"] = json!(4096);
    let s = config_err(&v.to_string());
    assert!(s.contains("`use_sliding_window`"), "{s}");
    // sliding_window alone (use_sliding_window false) is fine.
    v["use_sliding_window"] = json!(false);
    Config::from_json_str(&v.to_string()).unwrap();
}

#[test]
fn config_bad_rope_type() {
    let mut v = qwen2_config_json();
    v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
    let s = config_err(&v.to_string());
    assert!(s.contains("`rope_scaling.rope_type`") && s.contains("yarn"), "{s}");
    let mut v = qwen2_config_json();
    v["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 10000.0});
    let s = config_err(&v.to_string());
    assert!(s.contains("`rope_parameters.rope_type`"), "{s}");
    let mut v = qwen2_config_json();
    v["rope_scaling"] = json!({"rope_type": "default"});
    Config::from_json_str(&v.to_string()).unwrap();
}

// ---- tokenizer ----

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn tokenizer_garbage() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "tokenizer.json", "\u{1}\u{2}garbage");
    let s = Tokenizer::from_file(&p).unwrap_err().to_string();
    assert!(s.contains("tokenizer.json") && s.contains("not valid JSON"), "{s}");
    let s = Tokenizer::from_file(tmp.path().join("missing.json")).unwrap_err().to_string();
    assert!(s.contains("missing.json"), "{s}");
}

#[test]
fn tokenizer_from_a_newer_version() {
    let tmp = tempfile::tempdir().unwrap();
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("qwen2-tiny/tokenizer.json")).unwrap()).unwrap();
    v["version"] = json!("9.0");
    v["model"]["type"] = json!("HyperBPE");
    let p = write(tmp.path(), "tokenizer.json", &v.to_string());
    let s = Tokenizer::from_file(&p).unwrap_err().to_string();
    assert!(s.contains("tokenizer.json") && s.contains("newer tokenizers version") && s.contains("\"9.0\""), "{s}");
}

#[test]
fn tokenizer_bigger_than_model_vocab() {
    let tok = Tokenizer::from_file(fixture("qwen2-tiny/tokenizer.json")).unwrap();
    let s = tok.with_model_vocab(300).unwrap_err().to_string();
    assert!(s.contains("397") && s.contains("300") && s.contains("vocab_size"), "{s}");
    // The same through a model directory.
    let tmp = copy_fixture("qwen2-tiny");
    let mut v = qwen2_config_json();
    v["vocab_size"] = json!(300);
    write(tmp.path(), "config.json", &v.to_string());
    let s = Checkpoint::open(tmp.path()).unwrap_err().to_string();
    assert!(s.contains("397") && s.contains("300"), "{s}");
}

#[test]
fn missing_special_token() {
    let tok = Tokenizer::from_file(fixture("qwen2-tiny/tokenizer.json")).unwrap();
    let s = tok.token_id("<|fim_prefix|>").unwrap_err().to_string();
    assert!(s.contains("<|fim_prefix|>") && s.contains("tokenizer.json"), "{s}");
    // tokenizer_config.json names an eos token the tokenizer lacks.
    let tmp = copy_fixture("qwen2-tiny");
    let p = tmp.path().join("tokenizer_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["eos_token"] = json!("<|eot_id|>");
    v.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&p, v.to_string()).unwrap();
    let ck = Checkpoint::open(tmp.path()).unwrap();
    let s = ck.stop_token_ids().unwrap_err().to_string();
    assert!(s.contains("<|eot_id|>") && s.contains("eos_token"), "{s}");
    // No template: ChatML fallback, which works because the tokenizer has the ChatML tokens.
    assert!(ck.chat_template.is_fallback());
    let text = ck.render_chat(&[smelt_models::Message::user("hi")], &RenderOptions::default()).unwrap();
    assert_eq!(text, "<|im_start|>user\nhi<|im_end|>\n");
}

// ---- chat template ----

#[test]
fn broken_template_names_tokenizer_config() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "tokenizer_config.json", r#"{"chat_template": "{% for m in messages %}{{ m.content "}"#);
    let tc = TokenizerConfig::from_file(&p).unwrap();
    let s = ChatTemplate::from_tokenizer_config(&tc).unwrap_err().to_string();
    assert!(s.contains("tokenizer_config.json") && s.contains("does not compile"), "{s}");

    // Compiles, but fails while rendering.
    let p = write(
        tmp.path(),
        "tokenizer_config.json",
        r#"{"chat_template": "{% if messages[0].role != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}{{ 1 + 'x' }}"}"#,
    );
    let t = ChatTemplate::from_tokenizer_config(&TokenizerConfig::from_file(&p).unwrap()).unwrap();
    let s = t.render(&[smelt_models::Message::user("hi")], &RenderOptions::default()).unwrap_err().to_string();
    assert!(s.contains("tokenizer_config.json") && s.contains("first message must be system"), "{s}");
    let s = t.render(&[smelt_models::Message::system("hi")], &RenderOptions::default()).unwrap_err().to_string();
    assert!(s.contains("tokenizer_config.json") && s.contains("failed to render"), "{s}");

    let p = write(tmp.path(), "tokenizer_config.json", r#"{"chat_template": 3}"#);
    let s = TokenizerConfig::from_file(&p).unwrap_err().to_string();
    assert!(s.contains("`chat_template`"), "{s}");
}

#[test]
fn template_list_picks_default() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        tmp.path(),
        "tokenizer_config.json",
        r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ bos_token }}"}],
            "bos_token": {"content": "<s>", "special": true}}"#,
    );
    let t = ChatTemplate::from_tokenizer_config(&TokenizerConfig::from_file(&p).unwrap()).unwrap();
    assert_eq!(t.render::<smelt_models::Message>(&[], &RenderOptions::default()).unwrap(), "D<s>");
    let p = write(tmp.path(), "tokenizer_config.json", r#"{"chat_template": [{"name": "tool_use", "template": "T"}]}"#);
    let s = TokenizerConfig::from_file(&p).unwrap_err().to_string();
    assert!(s.contains("\"default\"") && s.contains("tool_use"), "{s}");
}

#[test]
fn chatml_fallback_without_chatml_tokens() {
    let tmp = copy_fixture("qwen2-tiny");
    std::fs::remove_file(tmp.path().join("tokenizer_config.json")).unwrap();
    // A tokenizer without <|im_start|>: drop it from the added tokens.
    let p = tmp.path().join("tokenizer.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["added_tokens"].as_array_mut().unwrap().retain(|t| t["content"] != "<|im_start|>");
    std::fs::write(&p, v.to_string()).unwrap();
    let ck = Checkpoint::open(tmp.path()).unwrap();
    let s = ck.render_chat(&[smelt_models::Message::user("hi")], &RenderOptions::default()).unwrap_err().to_string();
    assert!(s.contains("<|im_start|>") && s.contains("ChatML"), "{s}");
}

// ---- generation_config.json ----

#[test]
fn generation_config_errors() {
    let tmp = copy_fixture("qwen2-tiny");
    write(tmp.path(), "generation_config.json", r#"{"eos_token_id": [394, "x"]}"#);
    let s = Checkpoint::open(tmp.path()).unwrap_err().to_string();
    assert!(s.contains("generation_config.json") && s.contains("`eos_token_id[1]`"), "{s}");
    write(tmp.path(), "generation_config.json", r#"{"top_p": 1.5}"#);
    let s = Checkpoint::open(tmp.path()).unwrap_err().to_string();
    assert!(s.contains("`top_p`"), "{s}");
    write(
        tmp.path(),
        "generation_config.json",
        r#"{"eos_token_id": 7, "temperature": 0.6, "top_k": 20, "top_p": 0.95}"#,
    );
    let ck = Checkpoint::open(tmp.path()).unwrap();
    let g = &ck.generation_config;
    assert_eq!((g.eos_token_ids.clone(), g.temperature, g.top_k, g.top_p), (vec![7], Some(0.6), Some(20), Some(0.95)));
    assert_eq!(ck.stop_token_ids().unwrap(), vec![7, 394]);
}

// ---- random corruption: errors, never panics ----

#[test]
fn mutated_safetensors_and_configs_never_panic() {
    let mut rng = smelt_engine::Rng::new(2024);
    let full = std::fs::read(fixture("qwen2-tiny/model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
    let tmp = tempfile::tempdir().unwrap();
    let mut accepted = 0;
    for iter in 0..3000 {
        let mut b = full.clone();
        match iter % 4 {
            // Flip bytes inside the header (JSON structure, digits of offsets and shapes).
            0 | 1 => {
                for _ in 0..1 + rng.below(3) {
                    let i = 8 + rng.below(header_len as u64) as usize;
                    b[i] = b"0123456789[]{},:\" -eE.F16BF32I"[rng.below(30) as usize];
                }
            }
            // Corrupt the length prefix.
            2 => b[rng.below(8) as usize] = rng.next_u32() as u8,
            // Truncate anywhere.
            _ => b.truncate(rng.below(full.len() as u64) as usize),
        }
        if parse_header(Path::new("m.safetensors"), &b).is_ok() {
            accepted += 1;
            // Whatever the header claims now, loading stays within the file.
            let p = tmp.path().join("model.safetensors");
            std::fs::write(&p, &b).unwrap();
            if let Ok(f) = SafetensorsFile::open(&p) {
                let _ = f.load_all(Some(DType::F32), true);
            }
            let _ = Weights::load(tmp.path(), &qwen2_config(), &LoadOptions::default());
        }
    }
    assert!(accepted < 3000);

    let text = std::fs::read_to_string(fixture("qwen3-tiny/config.json")).unwrap().into_bytes();
    for _ in 0..3000 {
        let mut b = text.clone();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(b.len() as u64) as usize;
            b[i] = b"0123456789[]{},:\" -eEtruefalsn"[rng.below(30) as usize];
        }
        if let Ok(s) = std::str::from_utf8(&b) {
            let _ = Config::from_json_str(s);
            let _ = smelt_models::GenerationConfig::from_json_str(Path::new("g.json"), s);
            let _ = TokenizerConfig::from_json_str(Path::new("t.json"), s);
        }
    }
}
