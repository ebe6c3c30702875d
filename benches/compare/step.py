#!/usr/bin/env python3
"""The peer of `smelt bench step`: one GRPO policy update with transformers' Qwen2ForCausalLM in
PyTorch eager (or torch.compile with --compile), on random weights and random token ids:

    logits = model(ids).logits[:, :-1] / T     (full [B, T-1, V] logits, as TRL does)
    logp = selective_log_softmax(logits, ids[:, 1:]); entropy = entropy_from_logits (no grad)
    loss = GRPO clipped surrogate, dapo aggregation, on-policy (old = logp.detach())
    loss.backward(); clip_grad_norm_(1.0); AdamW(lr 1e-6, wd 0.01 except norms and biases)

Same shape, batch, seq and thread count as smelt's; prints the same JSON fields.
"""

import argparse
import sys
import time

from common import (add_common_args, emit, header, hf_model, median, model_config, nominal_bf16_peak,
                    peak_bytes, proc_mem, reset_peak, setup, sync, train_step_flops, Timer)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small-cpu")
    p.add_argument("--config", default=None, help="model dims as JSON (the `config` of a smelt report)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    add_common_args(p)
    args = p.parse_args()
    torch, device, dtype = setup(args)
    import trl_ops

    cfg = model_config(args)
    model = hf_model(torch, cfg, device, dtype)
    model.train()
    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        (no_decay if name.endswith(".bias") or name.endswith("norm.weight") else decay).append(prm)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-6)
    fwd = torch.compile(model) if args.compile else model
    b, t = args.batch, args.seq
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg["vocab_size"], (b, t), generator=g).to(device)
    adv = torch.randn(b, generator=g).to(device)
    mask = torch.ones(b, t - 1, device=device)
    n_params = sum(x.numel() for x in model.parameters())
    model_bytes = sum(x.numel() * x.element_size() for x in model.parameters())

    def step():
        tm = Timer(torch, device)
        logits = fwd(input_ids=ids).logits
        ph = {"forward": tm.lap()}
        logits = logits[:, :-1, :] / 1.0
        logps = trl_ops.selective_log_softmax(logits, ids[:, 1:])
        with torch.no_grad():
            entropy = trl_ops.entropy_from_logits(logits)
        ph["head"] = tm.lap()
        loss = trl_ops.grpo_loss(logps, logps.detach(), adv, mask)
        ph["loss"] = tm.lap()
        loss.backward()
        ph["backward"] = tm.lap()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ph["optimizer"] = tm.lap()
        del logits, logps
        return ph, float(loss.detach()), float(gn), float((entropy * mask).sum() / mask.sum())

    sync(torch, device)
    rss_before = proc_mem()[0]
    reset_peak(torch, device)
    for _ in range(args.warmup):
        step()
    times, phases = [], {}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        ph, loss, gn, ent = step()
        sync(torch, device)
        times.append(time.perf_counter() - t0)
        for k, v in ph.items():
            phases.setdefault(k, []).append(v)
    peak, peak_src = peak_bytes(torch, device)
    med = median(times)
    flops = train_step_flops(cfg, [t] * b)
    tflop_s = flops / med / 1e12
    peak_tf, peak_tf_src = nominal_bf16_peak(torch, device)
    rep = header("torch-bench-step", torch, device)
    rep.update({
        "model": args.shape if not args.config else "from --config",
        "config": {**cfg, "num_parameters": n_params},
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "mode": "torch.compile" if args.compile else "eager",
        "batch": b,
        "seq": t,
        "tokens_per_step": b * t,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "ms_per_step": med * 1e3,
        "ms_per_step_all": [x * 1e3 for x in times],
        "tokens_per_s": b * t / med,
        "flops_per_step": flops,
        "tflop_s": tflop_s,
        "mfu": tflop_s / peak_tf if peak_tf else None,
        "mfu_peak_tflops": peak_tf,
        "mfu_peak_source": peak_tf_src,
        "peak_bytes": peak,
        "peak_bytes_source": peak_src,
        "rss_before_bytes": rss_before,
        "model_bytes": model_bytes,
        "phases_ms": {k: median(v) * 1e3 for k, v in phases.items()},
        "phases_note": "forward includes the lm_head matmul (smelt counts it in head)",
        "loss": loss,
        "grad_norm": gn,
        "mean_entropy": ent,
    })
    emit(rep, args.json)


if __name__ == "__main__":
    sys.exit(main())
