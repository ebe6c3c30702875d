"""Shared helpers for the PyTorch peer benchmarks: model shapes (kept equal to
`trainer/src/cli/bench.rs::shape_config`), thread control, memory, timing, report header.

Every script prints one JSON object on stdout with the same field names as the matching
`smelt bench ...` report, so `compare.py` can divide one by the other.
"""

import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone

# Same shapes as `smelt bench step --shape NAME` (trainer/src/cli/bench.rs, shape_config).
_BASE = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=151936,
    tie_word_embeddings=True,
    attention_bias=True,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    max_position_embeddings=32768,
)
SHAPES = {
    "tiny": {**_BASE, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 4096,
             "max_position_embeddings": 4096},
    "small-cpu": {**_BASE, "hidden_size": 256, "intermediate_size": 1408, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen2.5-0.5b": dict(_BASE),
    "qwen2.5-1.5b": {**_BASE, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "head_dim": 128},
    "qwen2.5-7b": {**_BASE, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "head_dim": 128,
                   "vocab_size": 152064, "tie_word_embeddings": False},
}


def add_common_args(p):
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the report here")


def model_config(args):
    """The shape as a dict: --config JSON (from a smelt report) wins over --shape NAME."""
    if getattr(args, "config", None):
        cfg = json.loads(args.config)
        return {k: cfg[k] for k in _BASE if k in cfg}
    if args.shape not in SHAPES:
        sys.exit(f"--shape {args.shape!r}: expected one of {', '.join(SHAPES)}")
    return dict(SHAPES[args.shape])


def setup(args):
    """Imports torch with the thread count applied; returns (torch, device, dtype)."""
    if args.threads:
        for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(v, str(args.threads))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    else:
        dtype = {"float32": torch.float32, "f32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16}[args.dtype]
    return torch, device, dtype


def hf_model(torch, cfg, device, dtype, use_cache=False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qc = Qwen2Config(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        head_dim=cfg["head_dim"],
        max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg["rope_theta"],
        tie_word_embeddings=cfg["tie_word_embeddings"],
        use_cache=use_cache,
    )
    qc._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(qc).to(device=device, dtype=dtype)
    return model


def proc_mem():
    """(VmRSS, VmHWM) of this process in bytes, or (None, None) off Linux."""
    try:
        text = open("/proc/self/status").read()
    except OSError:
        return None, None
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out.get("VmRSS"), out.get("VmHWM")


def reset_peak(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_bytes(torch, device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    return proc_mem()[1], "process peak RSS (VmHWM, reset after setup)"


def sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    if n == 0:
        return float("nan")
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def train_step_flops(cfg, seq_lens):
    """Same count as smelt_trainer::step::train_step_flops."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    matmul_params = per_layer * cfg["num_hidden_layers"] + cfg["vocab_size"] * h
    pairs = sum(s * (s + 1) / 2 for s in seq_lens)
    attn_fwd = 4 * cfg["num_attention_heads"] * cfg["head_dim"] * pairs
    return 6 * matmul_params * sum(seq_lens) + 3 * attn_fwd * cfg["num_hidden_layers"]


def nominal_bf16_peak(torch, device):
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    if any(s in name for s in ("H100", "H200")):
        return 989.0, f"{name}: 989 TFLOP/s dense bf16 (SXM datasheet)"
    if "A100" in name:
        return 312.0, f"{name}: 312 TFLOP/s dense bf16 (datasheet)"
    return None, None


def header(kind, torch, device):
    now = datetime.now(timezone.utc)
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    import transformers

    return {
        "kind": kind,
        "peer": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "git_commit": commit,
        "date": now.strftime("%Y-%m-%d"),
        "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": {
            "hostname": socket.gethostname(),
            "cpu_model": cpu,
            "cpu_cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "threads": torch.get_num_threads(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        },
    }


def emit(report, path=None):
    text = json.dumps(report, indent=2, sort_keys=True)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


class Timer:
    """Wall-clock phases, synchronizing the device at each boundary."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self.t = time.perf_counter()

    def lap(self):
        sync(self.torch, self.device)
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
