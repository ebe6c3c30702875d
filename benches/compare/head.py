#!/usr/bin/env python3
"""The peer of smelt's fused head (`smelt bench kernels --op logprob_entropy_fused`): per-token
log-prob and entropy from final hidden states the TRL way — full logits h·Wᵀ, then
selective_log_softmax + entropy_from_logits — forward, and forward + backward through autograd
(gradient w.r.t. h and W from a random per-token g_logp). Reports time and peak memory."""

import argparse
import sys
import time

from common import add_common_args, emit, header, median, peak_bytes, proc_mem, reset_peak, setup, sync


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--runs", type=int, default=5)
    add_common_args(p)
    args = p.parse_args()
    torch, device, dtype = setup(args)
    import trl_ops

    n, h, v = args.tokens, args.hidden, args.vocab
    g = torch.Generator().manual_seed(args.seed)
    hid = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) * (2.0 / h ** 0.5)).to(device, dtype).requires_grad_()
    tg = torch.randint(0, v, (n,), generator=g).to(device)
    g_logp = (torch.randn(n, generator=g) * 0.01).to(device)

    def fwd():
        logits = (hid @ w.T).unsqueeze(0) / 1.0
        logp = trl_ops.selective_log_softmax(logits, tg.unsqueeze(0))
        with torch.no_grad():
            ent = trl_ops.entropy_from_logits(logits)
        return logp, ent

    def timed(f):
        sync(torch, device)
        t0 = time.perf_counter()
        f()
        sync(torch, device)
        return time.perf_counter() - t0

    def fwd_only():
        with torch.no_grad():
            fwd()

    def fwd_bwd():
        logp, _ = fwd()
        (logp.squeeze(0) * g_logp).sum().backward()
        hid.grad = None
        w.grad = None

    rss_before = proc_mem()[0]
    reset_peak(torch, device)
    timed(fwd_only)
    tf = median([timed(fwd_only) for _ in range(args.runs)])
    peak_fwd, _ = peak_bytes(torch, device)
    reset_peak(torch, device)
    timed(fwd_bwd)
    tfb = median([timed(fwd_bwd) for _ in range(args.runs)])
    peak, src = peak_bytes(torch, device)
    flops = 2.0 * n * h * v
    rep = header("torch-bench-head", torch, device)
    rep.update({
        "tokens": n, "hidden": h, "vocab": v, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
        "threads": torch.get_num_threads(),
        "fwd_ms": tf * 1e3, "fwd_bwd_ms": tfb * 1e3, "bwd_ms": (tfb - tf) * 1e3,
        "fwd_tflop_s": flops / tf / 1e12, "fwd_bwd_tflop_s": 3 * flops / tfb / 1e12,
        "peak_bytes_fwd": peak_fwd, "peak_bytes": peak, "peak_bytes_source": src, "rss_before_bytes": rss_before,
        "logits_bytes": n * v * torch.tensor([], dtype=dtype).element_size(),
    })
    emit(rep, args.json)


if __name__ == "__main__":
    sys.exit(main())
