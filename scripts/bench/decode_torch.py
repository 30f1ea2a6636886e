#!/usr/bin/env python3
"""The peer row of `lorq bench decode`: decode tokens/s of the same model shape with random weights
in PyTorch bf16 (transformers' LlamaForCausalLM from a config, N(0, 0.02) init), greedy, after a
prompt of --context tokens per sequence, per batch size. Decode time per step =
(time of generate(context -> context+N) - time of generate(context -> context+1)) / (N - 1), so the
prefill cancels. A static KV cache where transformers offers it (dynamic otherwise, said in the
row); torch.compile only with --compile (it may need minutes). Writes JSON rows like lorq's.

  python3 scripts/bench/decode_torch.py --shape llama-3-8b --batch-sizes 1,32 --context 512 \
      --new-tokens 64 --json decode-torch.json
"""
import argparse
import json
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                       tie_word_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
}


def timed_generate(model, ids, new, cache, compile_):
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if cache:
        kw["cache_implementation"] = cache
    if not compile_:
        kw["disable_compile"] = True
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(1234)
    cfg = LlamaConfig(**SHAPES[a.shape], initializer_range=0.02)
    t = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    model.eval()
    build_s = time.perf_counter() - t
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for batch in [int(b) for b in a.batch_sizes.split(",")]:
        ids = torch.randint(0, cfg.vocab_size, (batch, a.context), device="cuda")
        with torch.no_grad():
            cache = "static"
            try:
                timed_generate(model, ids, 2, cache, a.compile)  # warm-up
            except Exception as e:  # older/newer transformers without it
                print(f"static cache unavailable ({e}); dynamic cache", flush=True)
                cache = None
                timed_generate(model, ids, 2, cache, a.compile)
            one = min(timed_generate(model, ids, 1, cache, a.compile) for _ in range(2))
            full = min(timed_generate(model, ids, a.new_tokens + 1, cache, a.compile) for _ in range(2))
        step = (full - one) / a.new_tokens
        row = {
            "engine": "transformers",
            "format": "torch-bf16",
            "batch": batch,
            "context": a.context,
            "tokens_per_s": batch / step,
            "ms_per_step": step * 1e3,
            "weight_bytes": weight_bytes,
            "kv_cache": cache or "dynamic",
            "compiled": a.compile,
            "build_s": build_s,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    report = {
        "engine": "transformers",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "card": torch.cuda.get_device_name(),
        "shape": a.shape,
        "rows": rows,
    }
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
