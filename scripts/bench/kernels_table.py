"""Markdown table of a `lorq bench kernels --device cuda` JSON report (docs/bench/kernels-*.json).

usage: python3 scripts/bench/kernels_table.py docs/bench/kernels-h100.json
"""
import json
import sys

r = json.load(open(sys.argv[1]))
print(f"Card: **{r['card']}**, date {r['date']}, command `{r['command']}`\n")
print("| format | path | shape [n x k] | m | us | speedup vs lorq bf16 | GB/s | rel. err vs CPU |")
print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
for x in r["rows"]:
    e = x.get("rel_err")
    print(f"| {x['format']} | {x['path']} | {x.get('shape', '')} | {x['m']} | {x['us']:.2f} | "
          f"{x.get('speedup_vs_bf16', float('nan')):.2f} | {x['gbps']:.0f} | {'-' if e is None else f'{e:.1e}'} |")
