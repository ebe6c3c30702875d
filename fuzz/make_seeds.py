#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/seeds/<target>/ (small, committed; libFuzzer grows its own
corpus under fuzz/corpus/, which is not committed). Run from the repository root or fuzz/."""
import json
import os
import random
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "tests", "fixtures")
SEEDS = os.path.join(HERE, "seeds")
DTYPES = {"F32": ("<f", 4), "F16": ("<e", 2), "I32": ("<i", 4), "U32": ("<I", 4)}
rng = random.Random(0)


def put(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def bf16(x):
    return struct.pack("<I", struct.unpack("<I", struct.pack("<f", x))[0])[2:]


def safetensors(tensors, metadata=None):
    """tensors: list of (name, dtype, shape); values are small random numbers."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        n = 1
        for d in shape:
            n *= d
        if dtype == "BF16":
            blob = b"".join(bf16(rng.uniform(-1, 1)) for _ in range(n))
        else:
            fmt, _ = DTYPES[dtype]
            vals = [rng.randint(0, 9) if dtype in ("I32", "U32") else rng.uniform(-1, 1) for _ in range(n)]
            blob = b"".join(struct.pack(fmt, v) for v in vals)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def tiny_config(model_type, tie):
    c = {"model_type": model_type, "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 2, "rms_norm_eps": 1e-6,
         "vocab_size": 8, "max_position_embeddings": 16, "rope_theta": 10000.0, "tie_word_embeddings": tie,
         "eos_token_id": [1, 2], "torch_dtype": "bfloat16"}
    return c


def tiny_tensors(c, dtype):
    h, i, v, d = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    qwen3 = c["model_type"] == "qwen3"
    t = [("model.embed_tokens.weight", [v, h])]
    p = "model.layers.0."
    t.append((p + "input_layernorm.weight", [h]))
    for proj, rows in (("q", q), ("k", kv), ("v", kv)):
        t.append((p + f"self_attn.{proj}_proj.weight", [rows, h]))
        if not qwen3:
            t.append((p + f"self_attn.{proj}_proj.bias", [rows]))
    t.append((p + "self_attn.o_proj.weight", [h, q]))
    if qwen3:
        t += [(p + "self_attn.q_norm.weight", [d]), (p + "self_attn.k_norm.weight", [d])]
    t += [(p + "post_attention_layernorm.weight", [h]), (p + "mlp.gate_proj.weight", [i, h]),
          (p + "mlp.up_proj.weight", [i, h]), (p + "mlp.down_proj.weight", [h, i]), ("model.norm.weight", [h])]
    if not c["tie_word_embeddings"]:
        t.append(("lm_head.weight", [v, h]))
    return [(n, dtype, s) for n, s in t]


def model_dir_input(config, st, index=None):
    cfg = json.dumps(config).encode()
    out = bytes([1 if index is not None else 0]) + struct.pack("<H", len(cfg)) + cfg
    if index is not None:
        idx = json.dumps(index).encode()
        out += struct.pack("<H", len(idx)) + idx
    return out + st


# safetensors_header
put("safetensors_header", "mixed_dtypes", safetensors(
    [("a", "F32", [2, 3]), ("b", "BF16", [3]), ("c", "F16", [1, 1, 2]), ("d", "I32", [2]), ("e", "U32", []),
     ("z", "F32", [0, 5])], {"format": "pt"}))
put("safetensors_header", "empty", safetensors([]))
q2 = tiny_config("qwen2", True)
q3 = tiny_config("qwen3", False)
put("safetensors_header", "tiny_qwen2_bf16", safetensors(tiny_tensors(q2, "BF16"), {"format": "pt"}))
put("safetensors_header", "tiny_qwen3_f32", safetensors(tiny_tensors(q3, "F32")))
with open(os.path.join(FIX, "qwen3-tiny", "model-00002-of-00002.safetensors"), "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    put("safetensors_header", "fixture_header_only", struct.pack("<Q", n) + f.read(n))

# config_json
for model in ("qwen2-tiny", "qwen3-tiny"):
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        with open(os.path.join(FIX, model, name), "rb") as f:
            put("config_json", f"{model}_{name}", f.read())
put("config_json", "tiny_qwen2", json.dumps(q2))
put("config_json", "tiny_qwen3_rope_parameters", json.dumps(
    {**{k: v for k, v in q3.items() if k != "rope_theta"}, "rope_parameters": {"rope_type": "default",
     "rope_theta": 1e6}, "dtype": "float32", "layer_types": ["full_attention"], "attention_bias": True}))
put("config_json", "template_list", json.dumps(
    {"chat_template": [{"name": "default", "template": "{{ messages }}"}], "eos_token": {"content": "<e>"}}))

# model_dir
put("model_dir", "qwen2_tied_bf16", model_dir_input(q2, safetensors(tiny_tensors(q2, "BF16"), {"format": "pt"})))
t3 = tiny_tensors(q3, "F32")
put("model_dir", "qwen3_untied_f32_index", model_dir_input(
    q3, safetensors(t3), {"metadata": {}, "weight_map": {n: "s.safetensors" for n, _, _ in t3}}))

# jsonl_line: vocab 1 + 100*4 = 401, max_pos 1 + 63 = 64
with open(os.path.join(FIX, "score-example.jsonl"), "rb") as f:
    put("jsonl_line", "score_example", bytes([100, 63]) + f.read())
put("jsonl_line", "mixed", bytes([100, 63]) + (
    '{"input_ids": [1, 2, 3]}\n\n{"text": "hi"}\r\n{"input_ids": [400]}\n{"input_ids": [-1]}\n'
    '{"input_ids": []}\n{"text": 5}\n{"prompt": "x"}\n{"input_ids": [1, 2\n').encode())
