//! `smelt score` and `smelt generate` with `--device cuda` through the real binary, against the
//! same commands on the CPU. Skipped without a GPU; scripts/gpu-check runs them with
//! `$SMELT_BIN` pointing at the bundled binary (this test binary may run on another machine
//! than the one it was built on).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use smelt_kernels::testing::{repo_path, test_cuda_device};
use smelt_models::testing::fixture;

fn smelt(args: &[&str]) -> String {
    let bin = std::env::var_os("SMELT_BIN").map(PathBuf::from).unwrap_or_else(|| env!("CARGO_BIN_EXE_smelt").into());
    let out = Command::new(&bin).args(args).output().unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "smelt {args:?} failed ({}): {stderr}", out.status);
    stdout.into()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number")).collect()
}

/// Largest |a − b| over all lines' `key` arrays of two `smelt score` outputs.
fn max_diff(a: &str, b: &str, key: &str) -> f64 {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    assert_eq!(la.len(), lb.len(), "score outputs have {} and {} lines", la.len(), lb.len());
    let mut worst = 0f64;
    for (x, y) in la.iter().zip(&lb) {
        let (x, y): (Value, Value) = (serde_json::from_str(x).unwrap(), serde_json::from_str(y).unwrap());
        let (x, y) = (floats(&x[key]), floats(&y[key]));
        assert_eq!(x.len(), y.len(), "{key}: lengths");
        worst = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(worst, f64::max);
    }
    worst
}

#[test]
fn device_score_and_generate_match_cpu() {
    let Some(_) = test_cuda_device() else { return };
    let input = repo_path("tests/fixtures/score-example.jsonl");
    for name in ["qwen2-tiny", "qwen3-tiny"] {
        let model = fixture(name);
        let (model, input) = (model.to_str().unwrap(), input.to_str().unwrap());
        let score = |dev: &str, dtype: &str| {
            smelt(&[
                "score",
                "--model",
                model,
                "--input",
                input,
                "--device",
                dev,
                "--dtype",
                dtype,
                "--temperature",
                "0.8",
            ])
        };
        let cpu = score("cpu", "f32");
        for (dtype, tol) in [("f32", 1e-4), ("bf16", 1.0)] {
            let gpu = score("cuda", dtype);
            for key in ["logprobs", "entropy"] {
                let d = max_diff(&gpu, &cpu, key);
                eprintln!("{name} score --dtype {dtype}: {key} max |Δ| vs cpu {d:.2e}");
                assert!(d <= tol, "{name} score --device cuda --dtype {dtype}: {key} differs from cpu by {d}");
            }
        }
        let generate = |dev: &str| {
            let out = smelt(&[
                "generate",
                "--model",
                model,
                "--prompt-ids",
                "5,77,300,12,9",
                "--max-new-tokens",
                "12",
                "--temperature",
                "0",
                "--ignore-eos",
                "--json",
                "--device",
                dev,
            ]);
            serde_json::from_str::<Value>(out.trim()).unwrap()["ids"].clone()
        };
        assert_eq!(generate("cuda"), generate("cpu"), "{name}: greedy generate on cuda vs cpu");
    }
}
