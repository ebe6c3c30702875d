#!/usr/bin/env python3
"""The peer of `smelt bench generate`: transformers' `generate` on a batch of random prompts of
equal length (no padding), greedy, no stop tokens, KV cache on. Time to first token is one
`generate(max_new_tokens=1)`; the total is `generate(max_new_tokens=N, min_new_tokens=N)`.
Prints prefill, decode and overall tokens/s with the same fields as smelt's report."""

import argparse
import sys
import time

from common import add_common_args, emit, header, hf_model, median, model_config, peak_bytes, reset_peak, setup, sync


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="small-cpu")
    p.add_argument("--config", default=None, help="model dims as JSON (the `config` of a smelt report)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    add_common_args(p)
    args = p.parse_args()
    torch, device, dtype = setup(args)
    cfg = model_config(args)
    model = hf_model(torch, cfg, device, dtype, use_cache=True).eval()
    if args.compile:
        model.forward = torch.compile(model.forward)
    gc = model.generation_config
    gc.eos_token_id = None
    gc.pad_token_id = 0
    gc.do_sample = False
    b, pl, n = args.batch, args.prompt_len, args.new_tokens
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg["vocab_size"], (b, pl), generator=g).to(device)
    attn = torch.ones_like(ids)

    def gen(k):
        sync(torch, device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=k, min_new_tokens=k,
                             do_sample=False, use_cache=True)
        sync(torch, device)
        assert out.shape == (b, pl + k), out.shape
        return time.perf_counter() - t0

    reset_peak(torch, device)
    with torch.inference_mode():
        for _ in range(args.warmup):
            gen(min(4, n))
        ttft, total = [], []
        for _ in range(args.runs):
            ttft.append(gen(1))
            total.append(gen(n))
    peak, peak_src = peak_bytes(torch, device)
    f, t = median(ttft), median(total)
    rep = header("torch-bench-generate", torch, device)
    rep.update({
        "model": args.shape if not args.config else "from --config",
        "config": cfg,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "mode": "torch.compile" if args.compile else "eager",
        "batch": b,
        "prompt_len": pl,
        "new_tokens": n,
        "runs": args.runs,
        "threads": torch.get_num_threads(),
        "ttft_ms": f * 1e3,
        "total_ms": t * 1e3,
        "prefill_tokens_per_s": b * pl / f,
        "decode_tokens_per_s": b * (n - 1) / max(t - f, 1e-9),
        "tokens_per_s": b * n / t,
        "peak_bytes": peak,
        "peak_bytes_source": peak_src,
        "definition": "greedy, no stop tokens; prefill = generate(max_new_tokens=1); decode = the other "
                      "new_tokens-1 steps (total - ttft); tokens_per_s = all new tokens over the total time",
    })
    emit(rep, args.json)


if __name__ == "__main__":
    sys.exit(main())
