"""The peer of `lorq bench fp8 --device cuda`: torch's FP8 matmul (`torch._scaled_mm`, cuBLASLt or
torch's own kernels) beside torch bf16 `x @ W.T` on the same card, shapes and activation rows.

Rows, bf16 activations in and bf16 out, e4m3 weights quantized once (per-channel or per-tensor):
  torch-bf16  torch.matmul                     the baseline
  torch-fp8   scaled_mm rowwise                per-token x scales, per-channel W scales, x pre-quantized
  torch-fp8   scaled_mm rowwise + quant        the same with x quantized per token in each call
                                               (abs().amax, divide, cast: eager torch ops)
  torch-fp8   scaled_mm tensorwise + static    per-tensor W scale, static x scale, x cast in each call
Timed with CUDA events (median of 7 samples of N calls, weights rotated over copies larger than
the L2 cache): `us` eager (Python's launch overhead included, as lorq's wall-clock timing includes
its own), `us_graph` the same N calls replayed from a CUDA graph (the GPU time). Writes {"card", "torch", "rows": [...]}; `lorq bench fp8 --peer FILE` merges them.

usage: python3 scripts/bench/torch_scaled_mm.py --shapes llama3-8b --m 16,64,128,512 --out torch_fp8.json
"""
import argparse
import json

import torch

from bench_shapes import parse_shapes
from cuda_timing import time_us

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max


def quant_rows(x):
    """Per-row (token / output channel) e4m3 quantization: scale = absmax / 448."""
    s = (x.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).clamp(min=1.0 / (E4M3_MAX * 512))
    return (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), s


def rowwise_quantized(x, w_t, w_s):
    """Per-token quantization of x in the call, then the rowwise scaled matmul."""
    xq, xs = quant_rows(x)
    return torch._scaled_mm(xq, w_t, scale_a=xs, scale_b=w_s, out_dtype=torch.bfloat16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama3-8b")
    ap.add_argument("--m", default="16,64,128,512")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    shapes = parse_shapes(a.shapes)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for name, n, k in shapes:
        copies = max(1, min(32, -(-(256 << 20) // (n * k))))
        dense = [torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) * 0.02
                 for _ in range(max(1, copies // 2))]
        # Per-channel e4m3 weights; _scaled_mm wants the second operand column-major: W_q.t().
        wq = [quant_rows(dense[i % len(dense)]) for i in range(copies)]
        wq_t = [(q.t(), s.t().contiguous()) for q, s in wq]
        wt = []
        for i in range(copies):
            w = dense[i % len(dense)]
            s = (w.abs().amax().float() / E4M3_MAX).reshape(1, 1)
            wt.append(((w.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).t(), s))
        static_s = torch.tensor([[5.0 / E4M3_MAX]], device=dev)
        for m in [int(v) for v in a.m.split(",")]:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
            iters = 50 if m <= 16 else 10
            ref = x @ dense[0].T
            xq, xs = quant_rows(x)

            def row(path, times, wbytes, y=None):
                us, us_graph = times
                b = wbytes + (m * k + m * n) * 2
                err = None
                if y is not None:
                    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                rows.append({"format": "torch-fp8" if "scaled_mm" in path else "torch-bf16",
                             "path": path, "n": n, "k": k, "m": m, "us": us, "us_graph": us_graph,
                             "gbps": b / us / 1e3,
                             "quant_err_vs_bf16": err, "checked": False, "torch": torch.__version__})
                g = f"{us_graph:.2f}" if us_graph is not None else "-"
                print(f"torch {path:<34} {n}x{k} m={m}: {us:.2f} us eager, {g} us graph",
                      flush=True)

            row("torch.matmul (cuBLAS bf16)",
                time_us(lambda i: x @ dense[i % len(dense)].T, iters), n * k * 2)
            cases = [
                ("scaled_mm rowwise", lambda i: torch._scaled_mm(
                    xq, wq_t[i % copies][0], scale_a=xs, scale_b=wq_t[i % copies][1],
                    out_dtype=torch.bfloat16)),
                ("scaled_mm rowwise + quant", lambda i: rowwise_quantized(x, *wq_t[i % copies])),
                ("scaled_mm tensorwise + static", lambda i: torch._scaled_mm(
                    (x.float() / static_s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), wt[i % copies][0],
                    scale_a=static_s, scale_b=wt[i % copies][1], out_dtype=torch.bfloat16)),
            ]
            for path, fn in cases:
                try:
                    y = fn(0)
                    row(path, time_us(fn, iters), n * k + 4 * n, y)
                except RuntimeError as e:  # e.g. rowwise scales unsupported by this torch/card
                    print(f"torch {path}: not supported here: {str(e).splitlines()[0]}", flush=True)
    json.dump({"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
              open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
