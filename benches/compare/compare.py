#!/usr/bin/env python3
"""Runs smelt and its PyTorch peer on identical settings and prints smelt/peer ratios.

    /work/venv/bin/python benches/compare/compare.py --device cpu --threads 2
    python3 benches/compare/compare.py --device cuda --suite step,generate,head,attention --compile

For each comparison the smelt command runs with SMELT_NUM_THREADS=N and the peer with
torch.set_num_threads(N) (and OMP/MKL_NUM_THREADS=N). With --repeat R the two alternate R times
and the best run of each side is kept (a shared machine's background load only ever slows a
run down). The dated report goes to benches/results/<YYYY-MM-DD>-<machine>-<device>.json.

Ratios: `speedup` = smelt throughput / peer throughput (> 1: smelt faster); `memory` = smelt
peak / peer peak (< 1: smelt smaller).
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def run_json(cmd, env, what):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        print(f"  $ {' '.join(cmd)} --json {path}", file=sys.stderr, flush=True)
        r = subprocess.run(cmd + ["--json", path], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{what} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        with open(path) as f:
            return json.load(f)
    finally:
        if os.path.exists(path):
            os.unlink(path)


def best_of(runs, key, higher=True):
    pick = max if higher else min
    return pick(runs, key=lambda r: r[key])


def runs_by_default(report, op):
    """The `smelt bench kernels` row of `op` that a call without a forced version runs (its
    `default` flag); reports written before the flag existed: the newest version. Memory-bound
    rows timed after a write flush as well (`--flush read,write`) count once, read."""
    rows = [r for r in report["rows"] if r["op"] == op and r.get("flush") != "write"]
    marked = [r for r in rows if r.get("default")]
    return marked[0] if marked else max(rows, key=lambda r: r["version"])


def machine_slug(device, threads):
    if device.startswith("cuda"):
        try:
            import torch

            name = torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001 - any failure just means "unknown GPU"
            name = "gpu"
    else:
        try:
            name = next(l.split(":", 1)[1] for l in open("/proc/cpuinfo") if l.startswith("model name"))
        except (OSError, StopIteration):
            name = socket.gethostname()
        name = f"{name}-{threads}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smelt", default=os.path.join(ROOT, "target", "release", "smelt"))
    p.add_argument("--python", default=sys.executable, help="the Python with torch + transformers")
    p.add_argument("--suite", default="step,generate", help="comma list of step, generate, head, attention")
    p.add_argument("--shape", default=None, help="model shape (default small-cpu on CPU, qwen2.5-0.5b on CUDA)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--head-tokens", type=int, default=None, help="default 256 on CPU, 4096 on CUDA")
    p.add_argument("--attn-tokens", type=int, default=None, help="default 1024 on CPU, 4096 on CUDA")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also run the peer with torch.compile (GPU)")
    p.add_argument("--machine", default=None)
    p.add_argument("--out", default=os.path.join(ROOT, "benches", "results"))
    args = p.parse_args()

    cuda = args.device.startswith("cuda")
    shape = args.shape or ("qwen2.5-0.5b" if cuda else "small-cpu")
    batch = args.batch or (8 if cuda else 4)
    seq = args.seq or (1024 if cuda else 256)
    if not os.path.exists(args.smelt):
        sys.exit(f"{args.smelt} not found: build it with `cargo build --release -p smelt-trainer`")
    env = dict(os.environ)
    env.update(SMELT_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    py = [args.python]
    common_peer = ["--device", args.device, "--threads", str(args.threads)]
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    comparisons = []

    def pair(name, smelt_cmd, peer_cmds, settings, ratios):
        print(f"== {name}", file=sys.stderr)
        smelt_runs, peer_runs = {}, {}
        for _ in range(args.repeat):
            smelt_runs.setdefault("smelt", []).append(run_json(smelt_cmd, env, "smelt"))
            for label, cmd in peer_cmds.items():
                peer_runs.setdefault(label, []).append(run_json(cmd, env, label))
        entry = {"name": name, "settings": settings, "repeat": args.repeat,
                 "smelt_command": " ".join(smelt_cmd), "peers": {}}
        smelt_best = ratios["pick"](smelt_runs["smelt"])
        entry["smelt"] = smelt_best
        for label, runs in peer_runs.items():
            peer_best = ratios["pick"](runs)
            entry["peers"][label] = {"command": " ".join(peer_cmds[label]), "report": peer_best,
                                     "ratios": ratios["fn"](smelt_best, peer_best)}
        comparisons.append(entry)

    def ratio(a, b):
        return a / b if (a is not None and b not in (None, 0)) else None

    if "step" in suites:
        sm = [args.smelt, "bench", "step", "--shape", shape, "--batch", str(batch), "--seq", str(seq),
              "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        peer = [*py, os.path.join(HERE, "step.py"), "--shape", shape, "--batch", str(batch), "--seq", str(seq),
                "--steps", str(args.steps), "--warmup", str(args.warmup), *common_peer]
        peers = {"torch-eager": peer}
        if args.compile:
            peers["torch-compile"] = peer + ["--compile"]
        pair("train step", sm, peers, {"shape": shape, "batch": batch, "seq": seq, "threads": args.threads},
             {"pick": lambda rs: best_of(rs, "tokens_per_s"),
              "fn": lambda s, q: {"speedup_tokens_per_s": ratio(s["tokens_per_s"], q["tokens_per_s"]),
                                  "memory_peak_bytes": ratio(s["peak_bytes"], q["peak_bytes"]),
                                  "phases_ms": {k: [s["phases_ms"].get(k), q["phases_ms"].get(k)]
                                                for k in q["phases_ms"]}}})
    if "generate" in suites:
        sm = [args.smelt, "bench", "generate", "--shape", shape, "--batch", str(args.gen_batch),
              "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--device", args.device]
        peer = [*py, os.path.join(HERE, "generate.py"), "--shape", shape, "--batch", str(args.gen_batch),
                "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), *common_peer]
        peers = {"transformers-generate": peer}
        if args.compile:
            peers["transformers-generate-compile"] = peer + ["--compile"]
        pair("generate", sm, peers,
             {"shape": shape, "batch": args.gen_batch, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "threads": args.threads},
             {"pick": lambda rs: best_of(rs, "tokens_per_s"),
              "fn": lambda s, q: {k: ratio(s[k], q[k]) for k in
                                  ("tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s")}
              | {"memory_peak_bytes": ratio(s["peak_bytes"], q["peak_bytes"])}})
    if "head" in suites:
        n = args.head_tokens or (4096 if cuda else 256)
        sm = [args.smelt, "bench", "kernels", "--op", "logprob_entropy_fused", "--shape", "qwen2.5-0.5b",
              "--tokens", str(n), "--device", args.device]
        peer = [*py, os.path.join(HERE, "head.py"), "--tokens", str(n), "--hidden", "896", "--vocab", "151936",
                *common_peer]

        def head_ratios(s, q):
            f = runs_by_default(s, "logprob_entropy_fused_fwd")["median_ms"]
            b = runs_by_default(s, "logprob_entropy_fused_bwd")["median_ms"]
            return {"speedup_fwd": ratio(q["fwd_ms"], f), "speedup_fwd_bwd": ratio(q["fwd_bwd_ms"], f + b),
                    "smelt_fwd_ms": f, "smelt_fwd_bwd_ms": f + b, "peer_logits_bytes": q["logits_bytes"]}

        pair("fused head vs TRL logits", sm, {"torch-trl": peer}, {"tokens": n, "hidden": 896, "vocab": 151936},
             {"pick": lambda rs: rs[0] if "rows" in rs[0] else best_of(rs, "fwd_bwd_ms", higher=False),
              "fn": head_ratios})
    if "attention" in suites:
        n = args.attn_tokens or (4096 if cuda else 1024)
        sm = [args.smelt, "bench", "kernels", "--op", "attention", "--shape", "qwen2.5-0.5b", "--tokens", str(n),
              "--device", args.device]
        peer = [*py, os.path.join(HERE, "attention.py"), "--tokens", str(n), "--heads", "14", "--kv-heads", "2",
                "--head-dim", "64", *common_peer]

        def attn_ratios(s, q):
            f, b = runs_by_default(s, "attention_fwd"), runs_by_default(s, "attention_bwd")
            return {"speedup_fwd": ratio(q["fwd_ms"], f["median_ms"]), "speedup_bwd": ratio(q["bwd_ms"], b["median_ms"]),
                    "smelt_fwd_ms": f["median_ms"], "smelt_bwd_ms": b["median_ms"],
                    "smelt_fwd_version": f["version"], "smelt_bwd_version": b["version"]}

        pair("attention vs SDPA", sm, {"torch-sdpa": peer}, {"tokens": n, "heads": 14, "kv_heads": 2, "head_dim": 64},
             {"pick": lambda rs: rs[0] if "rows" in rs[0] else best_of(rs, "fwd_bwd_ms", higher=False),
              "fn": attn_ratios})

    now = datetime.now(timezone.utc)
    machine = args.machine or machine_slug(args.device, args.threads)
    dev = "cuda" if cuda else "cpu"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", None
    report = {"kind": "smelt-vs-peer", "date": now.strftime("%Y-%m-%d"), "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
              "machine": machine, "device": dev, "threads": args.threads, "git_commit": commit,
              "worktree_dirty": dirty, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "comparisons": comparisons}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{report['date']}-{machine}-{dev}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
        f.write("\n")

    print(f"\nsmelt vs peers on {machine} ({dev}, {args.threads} threads), commit {commit[:10]}"
          f"{' (dirty tree)' if dirty else ''}, {report['date']}")
    print("| comparison | settings | peer | smelt | peer | ratio |")
    print("|---|---|---|---|---|---|")
    for c in comparisons:
        st = ", ".join(f"{k} {v}" for k, v in c["settings"].items())
        for label, pe in c["peers"].items():
            s, q, r = c["smelt"], pe["report"], pe["ratios"]
            if c["name"] == "train step":
                print(f"| train step tokens/s | {st} | {label} | {s['tokens_per_s']:.0f} | {q['tokens_per_s']:.0f} "
                      f"| {r['speedup_tokens_per_s']:.2f}x |")
                print(f"| train step peak memory | | {label} | {s['peak_bytes'] / 2**20:.0f} MiB "
                      f"| {q['peak_bytes'] / 2**20:.0f} MiB | {r['memory_peak_bytes']:.2f}x |")
            elif c["name"] == "generate":
                for k in ("tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
                    print(f"| generate {k.replace('_', ' ')} | {st} | {label} | {s[k]:.0f} | {q[k]:.0f} "
                          f"| {r[k]:.2f}x |")
            elif c["name"].startswith("fused head"):
                print(f"| head fwd+bwd ms | {st} | {label} | {r['smelt_fwd_bwd_ms']:.1f} | {q['fwd_bwd_ms']:.1f} "
                      f"| {r['speedup_fwd_bwd']:.2f}x |")
                print(f"| head peak memory | | {label} | (no logits) | {q['peak_bytes'] / 2**20:.0f} MiB | |")
            else:
                print(f"| attention fwd ms | {st} | {label} | {r['smelt_fwd_ms']:.2f} | {q['fwd_ms']:.2f} "
                      f"| {r['speedup_fwd']:.2f}x |")
                print(f"| attention bwd ms | | {label} | {r['smelt_bwd_ms']:.2f} | {q['bwd_ms']:.2f} "
                      f"| {r['speedup_bwd']:.2f}x |")
    print(f"\nreport: {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
