"""The peer of `lorq bench kernels --device cuda`: torch bf16 `x @ W.T` (cuBLAS) on the same card,
shapes and activation rows, timed with CUDA events (median of 7 samples of N calls, weights rotated
over copies larger than the L2 cache), eagerly (us) and replayed from a CUDA graph (us_graph). Writes {"card","rows":[{"format":"torch-bf16",...}]}.

usage: python3 scripts/bench/torch_matmul.py --shapes llama3-8b --m 1,4,16,64,128,512 --out torch.json
"""
import argparse
import json

import torch

from bench_shapes import parse_shapes
from cuda_timing import time_us



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama3-8b")
    ap.add_argument("--m", default="1,4,16,64,128,512")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    shapes = parse_shapes(a.shapes)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for name, n, k in shapes:
        copies = max(1, min(32, -(-(256 << 20) // (n * k * 2))))
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(copies)]
        for m in [int(v) for v in a.m.split(",")]:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
            iters = 50 if m <= 16 else 10
            us, us_graph = time_us(lambda i: x @ ws[i % copies].T, iters)
            b = n * k * 2 + (m * k + m * n) * 2
            rows.append({"format": "torch-bf16", "path": "torch.matmul (cuBLAS)", "n": n, "k": k, "m": m,
                         "us": us, "gbps": b / us / 1e3, "us_graph": us_graph, "checked": False,
                         "torch": torch.__version__})
            graph = f"{us_graph:.2f} us" if us_graph is not None else "no"
            print(f"torch bf16 {n}x{k} m={m}: {us:.2f} us, {graph} from a CUDA graph", flush=True)
    json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
