"""Markdown summary of a `lorq bench kernels --device cuda` JSON report (docs/bench/kernels-*.json):
for each activation row count m, one table of the automatic path's speedup over bf16 cuBLAS per
format (rows) and Llama-3-8B shape (columns), the torch bf16 peer and the GB/s of the largest shape.

usage: python3 scripts/bench/kernels_table.py docs/bench/kernels-h100.json [--all] [--graph]
  --all: every row of the report (each GEMV launch shape, tensor cores, dequantize + cuBLAS).
  --graph: speedups from the GPU time of graph-replayed calls (`--gpu-time` reports), not wall time.
The quantized peers' rows (scripts/bench/peer_quant_kernels.py, merged with --peer) follow the
format they run, one line per peer path.
"""
import json
import signal
import sys

signal.signal(signal.SIGPIPE, signal.SIG_DFL)

r = json.load(open(sys.argv[1]))
rows = r["rows"]
print(f"Card: **{r['card']}**, date {r['date']}, command `{r['command']}`\n")
if "--all" in sys.argv:
    print("| format | path | shape [n x k] | m | us | speedup vs lorq bf16 | GB/s | rel. err vs CPU |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for x in rows:
        e = x.get("rel_err")
        print(f"| {x['format']} | {x['path']} | {x.get('shape', '')} | {x['m']} | {x['us']:.2f} | "
              f"{x.get('speedup_vs_bf16', float('nan')):.2f} | {x['gbps']:.0f} | {'-' if e is None else f'{e:.1e}'} |")
    sys.exit(0)

shapes = []
for x in rows:
    if x["format"] == "bf16" and x["shape"] not in shapes:
        shapes.append(x["shape"])
GRAPH = "--graph" in sys.argv
formats = []
for x in rows:
    if x["format"] not in ("bf16", "torch-bf16") and x["format"] not in formats:
        formats.append(x["format"])
peer_paths = {}
for x in rows:
    if x.get("peer"):
        paths = peer_paths.setdefault(x["format"], [])
        if x["path"] not in paths:
            paths.append(x["path"])


def speedup(x):
    """(speedup, mark): with --graph, a row without a graph time (a call that cannot be captured)
    falls back to its wall time, marked "(wall)"."""
    if GRAPH and x.get("speedup_vs_bf16_graph") is not None:
        return x["speedup_vs_bf16_graph"], ""
    v = x.get("speedup_vs_bf16")
    return (float("nan") if v is None else v), (" (wall)" if GRAPH else "")
ms = sorted({x["m"] for x in rows})


def find(fmt, path, shape, m):
    for x in rows:
        if x["format"] == fmt and x["path"] == path and x.get("shape") == shape and x["m"] == m:
            return x
    return None


for m in ms:
    print(f"\nm = {m}: speedup of the automatic path over lorq's bf16 cuBLAS (GB/s on the last shape)\n")
    print("| format | " + " | ".join(s for s in shapes) + " |")
    print("| --- |" + " ---: |" * len(shapes))
    base = [find("bf16", "cublas", s, m) for s in shapes]
    us = "us_graph" if GRAPH else "us"
    print("| bf16 cuBLAS us | " + " | ".join(f"{b[us]:.1f}" if b and b.get(us) else "-" for b in base) + " |")
    peer = [find("torch-bf16", "torch.matmul (cuBLAS)", s, m) for s in shapes]
    if any(peer):
        print("| torch bf16 us | " + " | ".join(f"{p[us]:.1f}" if p and p.get(us) else "-" for p in peer) + " |")

    def line(label, pick):
        cells = []
        for i, s in enumerate(shapes):
            x = pick(s)
            if x is None:
                cells.append("-")
                continue
            bad = "" if x.get("ok", True) else " FAILED"
            gb = f" ({x['gbps']:.0f} GB/s)" if i == len(shapes) - 1 else ""
            v, mark = speedup(x)
            cells.append(f"{v:.2f}x{mark}{gb}{bad}")
        if any(c != "-" for c in cells):
            print(f"| {label} | " + " | ".join(cells) + " |")

    for f in formats:
        line(f, lambda s: find(f, "auto", s, m) or find(f, "bnb4-gemv", s, m))
        for path in peer_paths.get(f, []):
            line(path, lambda s: find(f, path, s, m))
