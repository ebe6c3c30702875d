//! Every bad input to the real `smelt` binary ends in a clear error: a non-zero exit, no panic,
//! and a message naming the file, line, field or tensor at fault.

use std::path::{Path, PathBuf};
use std::process::Command;

use smelt_models::testing::{copy_fixture, fixture, raw_safetensors};

fn write(dir: &Path, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn smelt(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_smelt")).args(args).env("SMELT_NUM_THREADS", "1").output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Runs smelt, expects failure without a panic, and that stderr names every `needle`.
#[track_caller]
fn fails_naming(args: &[&str], needles: &[&str]) {
    let (code, _, err) = smelt(args);
    assert_ne!(code, 0, "smelt {args:?} should fail; stderr: {err}");
    assert!(!err.contains("panicked at"), "smelt {args:?} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "smelt {args:?}: stderr does not name {n:?}: {err}");
    }
}

const GOOD_INPUT: &str = "{\"input_ids\": [1, 2, 3]}\n";

fn score_fails_naming(model: &Path, needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let input = write(tmp.path(), "in.jsonl", GOOD_INPUT);
    fails_naming(&["score", "--model", model.to_str().unwrap(), "--input", input.to_str().unwrap()], needles);
}

#[test]
fn good_inputs_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write(tmp.path(), "in.jsonl", GOOD_INPUT);
    let m = fixture("qwen2-tiny");
    let (code, out, err) = smelt(&["score", "--model", m.to_str().unwrap(), "--input", input.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["logprobs"].as_array().unwrap().len(), 2);
    assert_eq!(v["entropy"].as_array().unwrap().len(), 2);
    let (code, out, err) = smelt(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt-ids",
        "1,2,3",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ids"].as_array().unwrap().len(), 4);
    let (code, out, _) = smelt(&["doctor"]);
    assert_eq!(code, 0);
    assert!(out.contains("cpu threads"), "{out}");
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let m = copy_fixture("qwen2-tiny");
    let st = m.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    // Truncated download: the data section is cut short.
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    score_fails_naming(m.path(), &["model.safetensors"]);
    // Shorter than the 8-byte length prefix.
    std::fs::write(&st, [1u8, 2, 3]).unwrap();
    score_fails_naming(m.path(), &["model.safetensors"]);
    // Header length larger than the file.
    let mut b = (1u64 << 40).to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&st, b).unwrap();
    score_fails_naming(m.path(), &["model.safetensors", "header"]);
    // Invalid JSON header.
    std::fs::write(&st, raw_safetensors("{not json", 0)).unwrap();
    score_fails_naming(m.path(), &["model.safetensors"]);
    // Offsets out of range, byte count disagreeing with dtype × shape, overlap, duplicates.
    for header in [
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,80]}}"#,
        r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
    ] {
        std::fs::write(&st, raw_safetensors(header, 16)).unwrap();
        score_fails_naming(m.path(), &["model.safetensors"]);
    }
}

#[test]
fn tensors_that_do_not_match_the_config() {
    // The qwen3 fixture's shards under the qwen2 config: missing, unexpected and mis-shaped.
    let m = copy_fixture("qwen3-tiny");
    std::fs::copy(fixture("qwen2-tiny/config.json"), m.path().join("config.json")).unwrap();
    score_fails_naming(m.path(), &["model.layers.0.self_attn.q_proj.bias", "q_norm"]);
}

#[test]
fn absent_shard_is_named() {
    let m = copy_fixture("qwen3-tiny");
    std::fs::remove_file(m.path().join("model-00002-of-00002.safetensors")).unwrap();
    score_fails_naming(m.path(), &["model-00002-of-00002.safetensors"]);
}

#[test]
fn bad_config_json() {
    let m = copy_fixture("qwen2-tiny");
    write(m.path(), "config.json", "{ this is not json");
    score_fails_naming(m.path(), &["config.json", "line 1"]);
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("qwen2-tiny/config.json")).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("hidden_size");
    write(m.path(), "config.json", cfg.to_string());
    score_fails_naming(m.path(), &["config.json", "hidden_size"]);
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("qwen2-tiny/config.json")).unwrap()).unwrap();
    cfg["model_type"] = "llama".into();
    write(m.path(), "config.json", cfg.to_string());
    score_fails_naming(m.path(), &["config.json", "model_type", "llama"]);
}

#[test]
fn nan_in_weights_names_the_tensor_unless_skipped() {
    use smelt_engine::{Device, Tensor};
    use smelt_models::safetensors::SafetensorsFile;
    let m = copy_fixture("qwen2-tiny");
    let st = m.path().join("model.safetensors");
    let mut tensors = SafetensorsFile::open(&st).unwrap().load_all(None, false).unwrap();
    let (name, t) = tensors.iter_mut().find(|(n, _)| n == "model.layers.1.mlp.up_proj.weight").unwrap();
    let mut v = t.to_vec::<f32>().unwrap();
    v[17] = f32::NAN;
    *t = Tensor::from_slice(&v, t.shape(), Device::Cpu).unwrap();
    let name = name.clone();
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    smelt_models::save_safetensors(&st, &refs).unwrap();
    score_fails_naming(m.path(), &[&name]);
    // With the check off the load succeeds (and the NaN propagates into the output).
    let tmp = tempfile::tempdir().unwrap();
    let input = write(tmp.path(), "in.jsonl", GOOD_INPUT);
    let (code, _, err) = smelt(&[
        "score",
        "--model",
        m.path().to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--no-check-weights",
    ]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn bad_tokenizer_files() {
    let m = copy_fixture("qwen2-tiny");
    write(m.path(), "tokenizer.json", "{\"version\": \"9.0\", \"model\": {\"type\": \"Quantum\"}}");
    score_fails_naming(m.path(), &["tokenizer.json"]);
    // A tokenizer with more tokens than the model's embedding table.
    let m = copy_fixture("qwen2-tiny");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m.path().join("config.json")).unwrap()).unwrap();
    cfg["vocab_size"] = 300.into();
    write(m.path(), "config.json", cfg.to_string());
    score_fails_naming(m.path(), &["tokenizer.json", "300"]);
}

#[test]
fn missing_special_token_and_broken_template() {
    let m = copy_fixture("qwen2-tiny");
    let mut tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m.path().join("tokenizer_config.json")).unwrap()).unwrap();
    tc["chat_template"] = "{% for m in messages %}{{ m.content | no_such_filter }}{% endfor %}".into();
    write(m.path(), "tokenizer_config.json", tc.to_string());
    fails_naming(&["generate", "--model", m.path().to_str().unwrap(), "--chat", "hi"], &["tokenizer_config.json"]);
    let mut tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("qwen2-tiny/tokenizer_config.json")).unwrap()).unwrap();
    tc["eos_token"] = "<|no_such_token|>".into();
    write(m.path(), "tokenizer_config.json", tc.to_string());
    fails_naming(&["generate", "--model", m.path().to_str().unwrap(), "--prompt", "hi"], &["<|no_such_token|>"]);
}

#[test]
fn bad_jsonl_input() {
    let m = fixture("qwen2-tiny");
    let m = m.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str])] = &[
        ("{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, 2\n", &["line 2", "JSON"]),
        ("{\"input_ids\": [1, 2]}\n\n{\"input_ids\": [1, 400]}\n", &["line 3", "400", "vocab"]),
        ("{\"input_ids\": [1, -2]}\n", &["line 1", "input_ids[1]"]),
        ("{\"input_ids\": []}\n", &["line 1", "empty"]),
        ("{\"prompt\": \"x\"}\n", &["line 1", "input_ids"]),
        ("", &["no input lines"]),
    ];
    for (content, needles) in cases {
        let input = write(tmp.path(), "in.jsonl", content);
        fails_naming(&["score", "--model", m, "--input", input.to_str().unwrap()], needles);
    }
    // Longer than max_position_embeddings (512).
    let long: Vec<u32> = (0..600).map(|i| i % 300).collect();
    let input = write(tmp.path(), "long.jsonl", format!("{}\n", serde_json::json!({ "input_ids": long })));
    fails_naming(&["score", "--model", m, "--input", input.to_str().unwrap()], &["line 1", "max_position_embeddings"]);
    fails_naming(&["score", "--model", m, "--input", "/no/such/file.jsonl"], &["/no/such/file.jsonl"]);
}

#[test]
fn bad_flags_fail_before_work() {
    let m = fixture("qwen2-tiny");
    let m = m.to_str().unwrap();
    fails_naming(&["generate", "--model", m, "--prompt", "hi", "--temperature", "-0.5"], &["--temperature"]);
    fails_naming(&["generate", "--model", m, "--prompt", "hi", "--top-p", "1.5"], &["--top-p"]);
    fails_naming(&["generate", "--model", m, "--prompt", "hi", "--top-p", "0"], &["--top-p"]);
    fails_naming(&["generate", "--model", m, "--prompt-ids", "1,999"], &["999", "vocab"]);
    fails_naming(&["generate", "--model", m, "--prompt", "hi", "--device", "tpu"], &["tpu"]);
    fails_naming(&["generate", "--model", m, "--prompt", "hi", "--dtype", "bf16"], &["--dtype", "CPU", "f32"]);
    fails_naming(&["score", "--model", m, "--input", "x.jsonl", "--dtype", "f8"], &["--dtype", "f8"]);
    fails_naming(&["bench", "step", "--dtype", "bf16"], &["--dtype", "CPU"]);
    fails_naming(&["generate", "--model", "/no/such/model", "--prompt", "hi"], &["/no/such/model"]);
}

#[test]
fn cuda_without_a_gpu_says_what_is_missing() {
    #[cfg(feature = "cuda")]
    if smelt_engine::cuda::device(0).is_ok() {
        eprintln!("skipping: this machine has a CUDA device");
        return;
    }
    let m = fixture("qwen2-tiny");
    fails_naming(&["generate", "--model", m.to_str().unwrap(), "--prompt", "hi", "--device", "cuda"], &["CUDA"]);
}

#[test]
fn bad_training_configs_and_data() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixture("qwen2-tiny");
    let m = m.to_str().unwrap();
    let out = tmp.path().join("out");
    let out = out.to_str().unwrap();
    let cfg = |name: &str, text: &str| write(tmp.path(), name, text).to_str().unwrap().to_string();
    let train = |extra: &[&str]| {
        let mut a = vec!["train", "--model", m, "--output-dir", out, "--set", "quiet=true", "--max-steps", "1"];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>, needles: &[&str]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_naming(&a, needles)
    };
    let typo = cfg("typo.toml", "learning_rat = 1e-6\n");
    run(train(&["--config", &typo]), &["typo.toml", "learning_rat"]);
    let bad = cfg("bad.toml", "beta = [\n");
    run(train(&["--config", &bad]), &["bad.toml"]);
    run(train(&["--config", "/no/such.toml"]), &["/no/such.toml"]);
    run(vec!["train".into(), "--set".into(), "max_steps=1".into()], &["model"]);
    run(train(&["--set", "top_p=0"]), &["top_p"]);
    run(train(&["--set", "num_generations=0"]), &["num_generations"]);
    run(train(&["--set", "reward=vibes"]), &["reward", "vibes"]);
    run(train(&["--set", "dtype=bf16"]), &["dtype = \"bf16\"", "CPU"]);
    run(train(&["--device", "tpu"]), &["device = ", "tpu"]);
    run(train(&["--set", "laser"]), &["key=value"]);
    run(vec!["train".into(), "--model".into(), "/no/such/model".into()], &["/no/such/model"]);
    let data = write(tmp.path(), "d.jsonl", "{\"prompt\": \"1+1?\", \"answer\": 2}\n{\"prompt\": \"x\"}\n");
    run(train(&["--set", &format!("dataset={:?}", data.to_str().unwrap())]), &["d.jsonl:2", "answer"]);
    run(train(&["--set", "dataset=\"builtin:mul\""]), &["builtin:mul"]);
    run(train(&["--set", "max_completion_length=600"]), &["max_position_embeddings"]);
    let no_solutions =
        write(tmp.path(), "n.jsonl", "{\"prompt\": \"a\", \"answer\": 1}\n{\"prompt\": \"b\", \"answer\": 2}\n");
    let no_solutions = format!("dataset={:?}", no_solutions.to_str().unwrap());
    run(train(&["--set", "sft_steps=1", "--set", &no_solutions]), &["sft_steps", "n.jsonl", "solution"]);
    run(train(&["--set", "ahpo.enabled=true", "--set", &no_solutions]), &["ahpo.enabled", "n.jsonl", "solution"]);
    run(train(&["--set", "ahpo.enabled=true", "--set", "ahpo.success_threshold=9"]), &["ahpo.success_threshold"]);
    run(
        train(&["--set", "early_rejection.enabled=true", "--set", "early_rejection.keep=1"]),
        &["early_rejection.keep"],
    );
    run(
        train(&["--set", "early_rejection.enabled=true", "--set", "early_rejection.prefix_tokens=256"]),
        &["early_rejection.prefix_tokens", "max_completion_length"],
    );
    run(train(&["--set", "reward=rubric"]), &["reward = \"rubric\"", "has no \"rubric\""]);
    let rubric =
        write(tmp.path(), "r.jsonl", "{\"prompt\": \"a\", \"answer\": 1, \"rubric\": [{\"criterion\": \"says 1\"}]}\n");
    let rubric = format!("dataset={:?}", rubric.to_str().unwrap());
    run(train(&["--set", "reward=rubric", "--set", &rubric, "--set", "eval_size=0"]), &["says 1", "pattern"]);
    let judge = "rubric.judge_command=[\"/no/such/judge\"]";
    run(
        train(&["--set", "reward=rubric", "--set", &rubric, "--set", "eval_size=0", "--set", judge]),
        &["/no/such/judge"],
    );
    run(train(&["--set", "ahpo.enabled=true", "--set", "ahpo.coef=-1"]), &["ahpo.coef"]);
    // A new run into an output_dir that holds one is refused (nothing is overwritten).
    std::fs::create_dir_all(out).unwrap();
    write(Path::new(out), "log.jsonl", "{}\n");
    run(train(&[]), &["already holds a run", "overwrite_output_dir"]);
    std::fs::remove_file(Path::new(out).join("log.jsonl")).unwrap();
    // A checkpoint whose trainer state is corrupt is refused, naming the file.
    let ck = copy_fixture("qwen2-tiny");
    std::fs::create_dir_all(ck.path().join("trainer_state")).unwrap();
    write(&ck.path().join("trainer_state"), "state.json", "{\"step\": 3}");
    run(train(&["--resume-from-checkpoint", ck.path().to_str().unwrap()]), &["state.json"]);
    write(&ck.path().join("trainer_state"), "state.json", "not json");
    run(train(&["--resume-from-checkpoint", ck.path().to_str().unwrap()]), &["state.json", "JSON"]);
}
