#!/usr/bin/env python3
"""The peer of smelt's attention (`smelt bench kernels --op attention`): causal grouped-query
`scaled_dot_product_attention` (enable_gqa), forward and forward + backward, on the same packing
as smelt's benchmark (sequences of min(T, 4096) tokens). On CUDA the flash backend is forced
(bf16); on CPU PyTorch picks its own (its flash-attention CPU kernel for these inputs)."""

import argparse
import sys
import time

from common import add_common_args, emit, header, median, setup, sync


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    add_common_args(p)
    args = p.parse_args()
    torch, device, dtype = setup(args)
    import torch.nn.functional as F

    s = min(args.tokens, 4096)
    b = max(args.tokens // s, 1)
    hq, hk, d = args.heads, args.kv_heads, args.head_dim
    g = torch.Generator().manual_seed(args.seed)
    mk = lambda hh: torch.randn(b, hh, s, d, generator=g).to(device, dtype).requires_grad_()
    q, k, v = mk(hq), mk(hk), mk(hk)
    do = torch.randn(b, hq, s, d, generator=g).to(device, dtype)

    ctx = None
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        ctx = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)

    def attn():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def run(f):
        if ctx:
            with ctx():
                return f()
        return f()

    def fwd():
        with torch.no_grad():
            run(attn)

    def fwd_bwd():
        o = run(attn)
        o.backward(do)
        q.grad = k.grad = v.grad = None

    def timed(f):
        sync(torch, device)
        t0 = time.perf_counter()
        f()
        sync(torch, device)
        return time.perf_counter() - t0

    timed(fwd)
    tf = median([timed(fwd) for _ in range(args.runs)])
    timed(fwd_bwd)
    tfb = median([timed(fwd_bwd) for _ in range(args.runs)])
    flops = 4.0 * hq * d * b * s * (s + 1) / 2
    rep = header("torch-bench-attention", torch, device)
    rep.update({
        "tokens": b * s, "seqs": b, "seq": s, "heads": hq, "kv_heads": hk, "head_dim": d,
        "dtype": str(dtype).replace("torch.", ""), "device": str(device), "threads": torch.get_num_threads(),
        "fwd_ms": tf * 1e3, "bwd_ms": (tfb - tf) * 1e3, "fwd_bwd_ms": tfb * 1e3,
        "fwd_tflop_s": flops / tf / 1e12, "bwd_tflop_s": 2.5 * flops / max(tfb - tf, 1e-12) / 1e12,
    })
    emit(rep, args.json)


if __name__ == "__main__":
    sys.exit(main())
