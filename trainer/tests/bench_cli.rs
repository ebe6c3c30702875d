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
    let v = run_json(&["bench", "kernels", "--op", "add", "--quick"], "kernels");
    header_ok(&v);
    positive(&v["ceilings"], "copy_gb_s");
    positive(&v["ceilings"], "matmul_tflop_s");
    let rows = v["rows"].as_array().expect("rows");
    assert!(!rows.is_empty());
    for r in rows {
        assert_eq!(r["op"], "add");
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
        ],
        "generate",
    );
    for k in ["prefill_tokens_per_s", "decode_tokens_per_s", "tokens_per_s", "peak_bytes"] {
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
