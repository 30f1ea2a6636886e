"""Markdown summary of a `lorq bench kernels --device cuda` JSON report (docs/bench/kernels-*.json):
for each activation row count m, one table of the automatic path's speedup over bf16 cuBLAS per
format (rows) and Llama-3-8B shape (columns), the torch bf16 peer and the GB/s of the largest shape.

usage: python3 scripts/bench/kernels_table.py docs/bench/kernels-h100.json [--all]
  --all: every row of the report (each GEMV launch shape, tensor cores, dequantize + cuBLAS).
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
formats = []
for x in rows:
    if x["format"] not in ("bf16", "torch-bf16") and x["format"] not in formats:
        formats.append(x["format"])
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
    print("| bf16 cuBLAS us | " + " | ".join(f"{b['us']:.1f}" if b else "-" for b in base) + " |")
    peer = [find("torch-bf16", "torch.matmul (cuBLAS)", s, m) for s in shapes]
    if any(peer):
        print("| torch bf16 us | " + " | ".join(f"{p['us']:.1f}" if p else "-" for p in peer) + " |")
    for f in formats:
        cells = []
        for i, s in enumerate(shapes):
            x = find(f, "auto", s, m) or find(f, "bnb4-gemv", s, m)
            if x is None:
                cells.append("-")
                continue
            bad = "" if x.get("ok", True) else " FAILED"
            gb = f" ({x['gbps']:.0f} GB/s)" if i == len(shapes) - 1 else ""
            cells.append(f"{x['speedup_vs_bf16']:.2f}x{gb}{bad}")
        print(f"| {f} | " + " | ".join(cells) + " |")
