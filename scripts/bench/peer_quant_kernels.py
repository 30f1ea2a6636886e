"""The quantized peers of `lorq bench kernels --device cuda`: each peer library's own kernel for the
format lorq runs, on the same card, shapes and activation rows, timed as torch_matmul.py times
torch's bf16 matmul (CUDA events; eager us and, where the call can be captured, us_graph from a CUDA
graph; the quantized weights rotated over copies larger than the L2 cache). Merge the rows with
`lorq bench kernels --peer` (several files: concatenate their rows; see --merge).

Peers, each the path its library takes for that call (the fast backend its docs recommend):
- bitsandbytes NF4 / FP4 (blocksize 64, double quantization, as lorq's bitsandbytes-nf4/-fp4):
  `bitsandbytes.matmul_4bit` — its gemv_4bit kernel at one row, dequantize + matmul from two rows;
- bitsandbytes LLM.int8 (`Linear8bitLt`, threshold 6.0), beside lorq's `bitsandbytes`;
- torchao int4 weight-only, group 128 (`Int4WeightOnlyConfig`, tinygemm's tile-packed layout:
  `torch.ops.aten._weight_int4pack_mm`, what gpt-fast and torchao's int4 decode numbers run),
  beside lorq's GPTQ / AWQ 4-bit g128;
- hqq 4-bit, group 64 (`HQQLinear`), beside lorq's hqq-4bit: its default backend (dequantize +
  matmul), its `torchao_int4` backend (tinygemm) and GemLite (Triton; hqq's recommended backend,
  with GemLite's shipped H100 configs where the card has none of its own);
- GPTQ-Marlin (`gptq_marlin_gemm`, vLLM's kernel for GPTQ / AWQ checkpoints, built by
  scripts/bench/marlin_wheel.sh as `lorq_marlin_peer`), 4-bit symmetric g128, beside lorq's GPTQ.

A peer whose package is missing or fails is skipped with the reason printed and kept in the
report's "skipped" list. Each row carries the peer's output error against the bf16 product of the
same weight (`rel_err_vs_bf16`: the format's quantization error, ~0.1 for 4-bit codes; a broken
call is off by ~1 or NaN).

usage: python3 scripts/bench/peer_quant_kernels.py --shapes llama3-8b --m 1,4,16,64,128,512 --out peers.json
       python3 scripts/bench/peer_quant_kernels.py --merge torch.json peers.json --out all.json
"""
import argparse
import json
import traceback

import torch

from bench_shapes import parse_shapes
from cuda_timing import time_us
from peer_formats import (BNB4_BLOCKSIZE, MarlinLinear, gemlite_linear, hqq_linear, module_bytes,
                          quant_state_bytes, tensor_bytes, torchao_int4_config)

ROTATE_BYTES = 192 << 20  # > 3x the H100 / H200 L2 (50 / 60 MB)


def linear(w):
    # skip_init: no random init (and no draw on the CUDA generator) for a weight overwritten anyway.
    lin = torch.nn.utils.skip_init(torch.nn.Linear, w.shape[1], w.shape[0], bias=False, device=w.device,
                                   dtype=w.dtype)
    lin.weight.data.copy_(w)
    return lin


# (the row label lorq's report gives the format, peer, path, build(w) -> (callable x -> y, weight
# bytes)).
def bnb4(quant_type):
    def build(w):
        import bitsandbytes as bnb
        import bitsandbytes.functional as F

        packed, qs = F.quantize_4bit(w, blocksize=BNB4_BLOCKSIZE, compress_statistics=True, quant_type=quant_type)
        nbytes = tensor_bytes(packed) + quant_state_bytes(qs)
        return (lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=qs)), nbytes
    return build


def bnb_int8(w):
    import bitsandbytes as bnb

    lin = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, threshold=6.0)
    lin.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
    lin = lin.to(w.device)
    return lin, module_bytes(lin)


def torchao_int4(w):
    from torchao.quantization import quantize_

    lin = linear(w)
    quantize_(lin, torchao_int4_config())
    return lin, module_bytes(lin)


def marlin(w):
    lin = MarlinLinear(w)
    return lin, lin.nbytes


def hqq_default(w):
    h = hqq_linear(linear(w))
    return h, module_bytes(h)


def hqq_torchao(w):
    from hqq.backends.torchao import patch_hqq_to_aoint4

    h = patch_hqq_to_aoint4(hqq_linear(linear(w)), None)
    return h, module_bytes(h)


def hqq_gemlite(w):
    g = gemlite_linear(hqq_linear(linear(w)))
    return g, module_bytes(g)


PEERS = [
    ("nf4", "bitsandbytes", "matmul_4bit (gemv_4bit at one row)", bnb4("nf4")),
    ("fp4", "bitsandbytes", "matmul_4bit (gemv_4bit at one row)", bnb4("fp4")),
    ("gptq-4bit", "torchao", "Int4WeightOnlyConfig g128 (tinygemm)", torchao_int4),
    ("gptq-4bit", "marlin", "GPTQ-Marlin g128 (gptq_marlin_gemm, fp32 reduce)", marlin),
    ("hqq-4bit", "hqq", "HQQLinear g64 (default backend)", hqq_default),
    ("hqq-4bit", "hqq", "torchao_int4 backend (tinygemm)", hqq_torchao),
    ("hqq-4bit", "hqq", "GemLite A16W4 (Triton)", hqq_gemlite),
    # Last: its call cannot be captured in a CUDA graph (eager time only).
    ("int8", "bitsandbytes", "Linear8bitLt (LLM.int8, threshold 6)", bnb_int8),
]


def versions():
    out = {"torch": torch.__version__}
    for pkg in ("bitsandbytes", "torchao", "hqq", "gemlite", "lorq_marlin_peer"):
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            out[pkg] = f"not importable: {type(e).__name__}: {e}".splitlines()[0]
    return out


def run(a, save):
    """Times every peer; save(report) after each peer and shape, so a timeout keeps what ran."""
    shapes = parse_shapes(a.shapes)
    ms = [int(v) for v in a.m.split(",")]
    only = set(a.peers.split(",")) if a.peers else None
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows, skipped = [], []
    for name, n, k in shapes:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) * 0.02
        xs = {m: torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g) for m in ms}
        refs = {m: xs[m].float() @ w.float().T for m in ms}
        for fmt, peer, path, build in PEERS:
            if only and fmt not in only and peer not in only:
                continue
            label = f"{peer} {path} {n}x{k}"
            try:
                first, wbytes = build(w)
                copies = max(1, min(24, -(-ROTATE_BYTES // wbytes)))
                mods = [first] + [build(w)[0] for _ in range(copies - 1)]
            except Exception as e:  # noqa: BLE001 - a missing or failing peer is reported
                reason = f"{type(e).__name__}: {e}".splitlines()[0]
                print(f"skip {label}: {reason}", flush=True)
                traceback.print_exc()
                skipped.append({"format": fmt, "peer": peer, "path": path, "n": n, "k": k, "reason": reason})
                continue
            for m in ms:
                x = xs[m]
                try:
                    with torch.no_grad():
                        y = mods[0](x)
                        err = ((y.float() - refs[m]).norm() / refs[m].norm()).item()
                        iters = 50 if m <= 16 else 10
                        us, us_graph = time_us(lambda i: mods[i % copies](x), iters)
                except Exception as e:  # noqa: BLE001
                    reason = f"{type(e).__name__}: {e}".splitlines()[0]
                    print(f"skip {label} m={m}: {reason}", flush=True)
                    skipped.append({"format": fmt, "peer": peer, "path": path, "n": n, "k": k, "m": m,
                                    "reason": reason})
                    continue
                b = wbytes + (m * k + m * n) * 2
                rows.append({"format": fmt, "peer": peer, "path": f"{peer}: {path}", "n": n, "k": k, "m": m,
                             "us": us, "gbps": b / us / 1e3, "us_graph": us_graph, "weight_bytes": wbytes,
                             "rel_err_vs_bf16": err, "ok": bool(err == err and err < 0.5), "checked": False})
                graph = f"{us_graph:.2f} us" if us_graph is not None else "no"
                print(f"{label} m={m}: {us:.2f} us, graph {graph}, rel err vs bf16 {err:.3f}", flush=True)
            mods = first = None  # this peer's copies freed before the next one's
            torch.cuda.empty_cache()
            save(report(rows, skipped))
    return report(rows, skipped)


def report(rows, skipped):
    return {"card": torch.cuda.get_device_name(), "versions": versions(), "rows": rows, "skipped": skipped}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama3-8b")
    ap.add_argument("--m", default="1,4,16,64,128,512")
    ap.add_argument("--peers", help="comma list of lorq row labels (nf4, fp4, int8, gptq-4bit, hqq-4bit) "
                    "or peer libraries (bitsandbytes, torchao, hqq, marlin) (default: all)")
    ap.add_argument("--merge", nargs="+", help="peer JSON files to concatenate into --out instead of timing")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    def save(r):
        with open(a.out, "w") as f:
            json.dump(r, f, indent=1)

    if a.merge:
        parts = [json.load(open(p)) for p in a.merge]
        save({"card": parts[0].get("card"), "rows": [r for p in parts for r in p["rows"]],
              "versions": {k: v for p in parts for k, v in p.get("versions", {}).items()},
              "skipped": [s for p in parts for s in p.get("skipped", [])]})
    else:
        save(run(a, save))


if __name__ == "__main__":
    main()
