"""The peer of lorq's decode attention (`kernels/paged_attention.cu`, timed per layer by Nsight
Compute in a `lorq bench decode` step): torch's scaled_dot_product_attention of one new token per
sequence over a contiguous KV cache (the best case for it: no pages), Llama-3-8B's heads (32 query,
8 KV, head dim 128), bf16, on the same card. Each SDPA backend that takes the GQA heads shared
(enable_gqa: flash, cuDNN, math; torch 2.11's memory-efficient kernel does not) is timed; KV
copies rotated past the L2 cache; CUDA events, replayed from a CUDA graph (cuda_timing.py). GB/s
counts the keys and values read once; the error is against an f32 product of the same inputs.
--prefill: the peer of the prefill attention (`paged_prefill_*`) instead: every sequence's whole
prompt of `context` tokens at once, causal (is_causal), TFLOP/s counting the causal half of the
scores and outputs (4 * batch * heads * context^2 / 2 * head_dim); the error on the first sequence.

usage: python3 scripts/bench/torch_attention.py --batch 1,32,64 --context 512,2048 --out attn.json
       python3 scripts/bench/torch_attention.py --prefill --batch 32,8 --context 512,2048 --out pf.json
"""
import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cuda_timing import time_us

HEADS, KV_HEADS, HD = 32, 8, 128
BACKENDS = [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,32,64")
    ap.add_argument("--context", default="512,2048")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prefill", action="store_true")
    a = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    if a.prefill:
        rows = prefill_rows(a, dev, g)
        json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, open(a.out, "w"), indent=1)
        return
    for ctx in [int(v) for v in a.context.split(",")]:
        for b in [int(v) for v in a.batch.split(",")]:
            kv_bytes = 2 * b * KV_HEADS * ctx * HD * 2
            copies = max(2, min(16, -(-(1 << 30) // kv_bytes)))
            q = torch.randn(b, HEADS, 1, HD, device=dev, dtype=torch.bfloat16, generator=g)
            kvs = [(torch.randn(b, KV_HEADS, ctx, HD, device=dev, dtype=torch.bfloat16, generator=g),
                    torch.randn(b, KV_HEADS, ctx, HD, device=dev, dtype=torch.bfloat16, generator=g))
                   for _ in range(copies)]
            k0, v0 = (t.repeat_interleave(HEADS // KV_HEADS, dim=1).float() for t in kvs[0])
            want = F.scaled_dot_product_attention(q.float(), k0, v0)
            del k0, v0
            for name, backend in BACKENDS:
                def call(i):
                    k, v = kvs[i % copies]
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                try:
                    with sdpa_kernel([backend]):
                        err = (call(0).float() - want).abs().max().item()
                        us, us_graph = time_us(call, 20)
                except RuntimeError as e:
                    print(f"sdpa {name} b={b} ctx={ctx}: not run ({str(e).splitlines()[0][:100]})", flush=True)
                    continue
                t = us_graph if us_graph is not None else us
                rows.append({"peer": f"torch-sdpa-{name}", "batch": b,
                             "context": ctx, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HD,
                             "us": us, "us_graph": us_graph, "kv_bytes": kv_bytes, "gbps": kv_bytes / t / 1e3,
                             "max_abs_diff_vs_f32": err, "torch": torch.__version__})
                print(f"sdpa {name} b={b} ctx={ctx}: {us:.1f} us eager, "
                      f"{t:.1f} us graph, {kv_bytes / t / 1e3:.0f} GB/s", flush=True)
            del kvs
    json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, open(a.out, "w"), indent=1)


def prefill_rows(a, dev, g):
    """Causal attention of whole prompts: batch b of ctx tokens each (pairs of --batch and
    --context taken in order)."""
    rows = []
    for b, ctx in zip([int(v) for v in a.batch.split(",")], [int(v) for v in a.context.split(",")]):
        q = torch.randn(b, HEADS, ctx, HD, device=dev, dtype=torch.bfloat16, generator=g)
        k = torch.randn(b, KV_HEADS, ctx, HD, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(b, KV_HEADS, ctx, HD, device=dev, dtype=torch.bfloat16, generator=g)
        rep = HEADS // KV_HEADS
        want = F.scaled_dot_product_attention(q[:1].float(), k[:1].repeat_interleave(rep, dim=1).float(),
                                              v[:1].repeat_interleave(rep, dim=1).float(), is_causal=True)
        flops = 4 * b * HEADS * ctx * ctx / 2 * HD
        for name, backend in BACKENDS:
            def call(i):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            try:
                with sdpa_kernel([backend]):
                    err = (call(0)[:1].float() - want).abs().max().item()
                    us, us_graph = time_us(call, 10)
            except (RuntimeError, torch.OutOfMemoryError) as e:
                print(f"prefill sdpa {name} b={b} ctx={ctx}: not run ({str(e).splitlines()[0][:100]})", flush=True)
                continue
            t = us_graph if us_graph is not None else us
            rows.append({"peer": f"torch-sdpa-{name}", "phase": "prefill", "batch": b, "context": ctx,
                         "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HD, "us": us, "us_graph": us_graph,
                         "tflops": flops / t / 1e6, "max_abs_diff_vs_f32": err, "torch": torch.__version__})
            print(f"prefill sdpa {name} b={b} ctx={ctx}: {us:.1f} us eager, {t:.1f} us graph, "
                  f"{flops / t / 1e6:.0f} TFLOP/s", flush=True)
    return rows


if __name__ == "__main__":
    main()
