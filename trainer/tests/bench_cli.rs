//! `smelt bench` through the real binary: the JSON reports carry their fields as positive,
//! finite numbers. Speed is never asserted here (benchmarks report, tests check).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn tmp_json(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("smelt-bench-cli-{}-{name}.json", std::process::id()))
}

fn run_json(args: &[&str], name: &str) -> Value {
    let path = tmp_json(name);
    let out = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(args)
        .arg("--json")
        .arg(&path)
        // Two threads keep the test's footprint the same on any machine.
        .env("SMELT_NUM_THREADS", "2")
        .output()
        .expect("run smelt");
    assert!(
        out.status.success(),
        "smelt {args:?} failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&path).expect("the JSON report was written");
    let _ = std::fs::remove_file(&path);
    serde_json::from_str(&text).expect("valid JSON")
}

fn positive(v: &Value, key: &str) -> f64 {
    let x = v.get(key).and_then(Value::as_f64).unwrap_or_else(|| panic!("`{key}` missing or not a number in {v}"));
    assert!(x.is_finite() && x > 0.0, "`{key}` = {x} is not a positive finite number");
    x
}

fn header_ok(v: &Value) {
    assert!(v["git_commit"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    assert!(v["machine"]["cpu_model"].is_string(), "{v}");
    positive(&v["machine"], "threads");
}

#[test]
fn bench_step_tiny_writes_positive_figures() {
    let v = run_json(&["bench", "step", "--shape", "tiny", "--steps", "1", "--warmup", "0"], "step");
    header_ok(&v);
    for k in ["tokens_per_s", "ms_per_step", "peak_bytes", "flops_per_step", "tflop_s", "model_bytes"] {
        positive(&v, k);
    }
    assert!(v["mfu"].is_null(), "MFU is for GPUs only: {}", v["mfu"]);
    assert_eq!(v["tokens_per_step"].as_u64(), Some(4 * 256));
    assert!(v["loss"].as_f64().is_some_and(f64::is_finite));
    for k in ["forward", "head", "loss", "backward", "optimizer"] {
        assert!(v["phases_ms"][k].as_f64().is_some_and(|x| x.is_finite() && x >= 0.0), "phase {k}: {v}");
    }
}

#[test]
fn bench_kernels_add_quick_writes_rows_and_ceilings() {
    let v = run_json(&["bench", "kernels", "--op", "add", "--quick", "--flush", "read,write"], "kernels");
    header_ok(&v);
    positive(&v["ceilings"], "copy_gb_s");
    positive(&v["ceilings"], "matmul_tflop_s");
    let rows = v["rows"].as_array().expect("rows");
    assert!(!rows.is_empty());
    // A memory-bound op: each shape timed after a read flush, then after a write flush.
    assert_eq!(rows.len() % 2, 0, "{rows:?}");
    for pair in rows.chunks(2) {
        assert_eq!((pair[0]["flush"].as_str(), pair[1]["flush"].as_str()), (Some("read"), Some("write")));
        assert_eq!(pair[0]["shape"], pair[1]["shape"]);
    }
    for r in rows {
        assert_eq!(r["op"], "add");
        assert_eq!(r["bound"], "memory");
        // One version: each shape's row is the one an unforced call runs.
        assert_eq!(r["default"], true, "{r}");
        for k in ["median_ms", "min_ms", "bytes", "gb_s", "pct_of_ceiling", "runs"] {
            positive(r, k);
        }
    }
}

#[test]
fn bench_generate_tiny_and_bad_flags() {
    let v = run_json(
        &[
            "bench",
            "generate",
            "--shape",
            "tiny",
            "--batch",
            "2",
            "--prompt-len",
            "8",
            "--new-tokens",
            "4",
            "--runs",
            "1",
            "--samples",
            "2",
            "--spread",
        ],
        "generate",
    );
    for k in [
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "tokens_per_s",
        "peak_bytes",
        "full_batch_total_ms",
        "first_run_total_ms",
        "unshared_prefill_ms",
        "decode_bound_bytes",
        "copy_gb_s",
        "decode_bound_ms",
        "decode_pct_of_bound",
    ] {
        positive(&v, k);
    }
    for bad in [
        &["bench", "kernels", "--op", "nonsense"][..],
        &["bench", "step", "--shape", "nonsense"][..],
        &["bench", "step", "--shape", "tiny", "--batch", "0"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_smelt")).args(bad).output().expect("run smelt");
        assert!(!out.status.success(), "{bad:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--op") || err.contains("--shape") || err.contains("--batch"), "{bad:?}: {err}");
    }
}

/// The emulator's dry run lays out a Qwen2.5-0.5B-shaped step in seconds: the profile's
/// `launch_fill` lists each kernel's launches and blocks as the launchers chose them.
#[cfg(feature = "cuda")]
#[test]
fn dry_run_reports_launch_fill_at_a_real_shape() {
    let path = tmp_json("dry");
    let out = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(["bench", "step", "--device", "cuda", "--shape", "qwen2.5-0.5b", "--batch", "1", "--seq", "128"])
        .args(["--steps", "1", "--warmup", "0", "--profile", "--json"])
        .arg(&path)
        .env("SMELT_CUDA_EMULATOR", "1")
        .env("SMELT_EMU_DRY", "1")
        .env("SMELT_NUM_THREADS", "2")
        .output()
        .expect("run smelt");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("launch fill (dry run"), "{stdout}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    let fill = v["profile"]["launch_fill"].as_array().expect("launch_fill rows");
    let row = |k: &str| fill.iter().find(|r| r["kernel"] == k).unwrap_or_else(|| panic!("no {k} in {fill:?}"));
    // 24 layers; at d 64 the forward is v2: 128 tokens are two 64-row query tiles per head (14 heads).
    let fwd = row("attention::attn_fwd_v2_bf16_d64");
    assert_eq!((fwd["launches"].as_u64(), fwd["blocks"][0].as_u64()), (Some(24), Some(28)), "{fwd}");
    // 2 key tiles × 2 KV heads = 4 blocks, far from filling an H100: 7 parts, one head each.
    let dkdv = row("attention::attn_bwd_dkdv_v4_bf16_d64");
    assert_eq!((dkdv["launches"].as_u64(), dkdv["blocks"][0].as_u64()), (Some(24), Some(28)), "{dkdv}");
}
