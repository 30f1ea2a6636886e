#!/usr/bin/env bash
# `lorq bench generate` and transformers (PyTorch CPU) on the same model, prompt and protocol, in one run.
# Usage: scripts/bench/generate.sh [MODEL_DIR] [extra lorq/peer flags, e.g. --new-tokens 64]
#   PEER_PYTHON: a python with torch + transformers (default: .venv-ref/bin/python, made by
#   ../shared/reference/setup_envs.sh). Writes docs/bench/generate-<date>.json and prints a table.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-default}; shift || true
PEER_PYTHON=${PEER_PYTHON:-.venv-ref/bin/python}
cargo build --release -q
if [ "$MODEL" = default ]; then MODEL=$(./target/release/lorq pull); fi
out=docs/bench/generate-$(date +%Y-%m-%d).json
mkdir -p docs/bench
{
  echo '{"machine": '"$(printf '%s' "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" | python3 -c 'import json,sys;print(json.dumps(sys.stdin.read()))')"', "date": "'"$(date -u +%FT%TZ)"'", "runs": ['
  first=1
  for dtype in f32 bf16; do
    for engine in lorq peer; do
      [ $first = 1 ] || echo ','; first=0
      if [ $engine = lorq ]; then
        ./target/release/lorq bench generate --model "$MODEL" --dtype $dtype --json "$@"
      else
        "$PEER_PYTHON" scripts/bench/transformers_generate.py "$MODEL" --dtype $dtype "$@" 2>/dev/null
      fi
    done
  done
  echo ']}'
} > "$out"
python3 - "$out" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"machine: {d['machine']}  date: {d['date']}")
print("| engine | dtype | prefill tok/s (128) | decode tok/s b=1 | decode tok/s b=8 |")
print("| --- | --- | --- | --- | --- |")
for r in d["runs"]:
    rows = {(x["phase"], x["batch"]): x["tokens_per_s"] for x in r["rows"]}
    print(f"| {r['engine']} | {r['dtype']} | {rows.get(('prefill',1),0):.1f} | {rows.get(('decode',1),0):.1f} | {rows.get(('decode',8),0):.1f} |")
PY
echo "raw: $out"
