#!/usr/bin/env bash
# Serving benchmark (docs/benchmarks.md): `lorq serve` on the default model (SmolLM2-135M-Instruct),
# the same load (REQUESTS streaming requests, CONCURRENCY at a time, MAX_NEW tokens each, EOS
# ignored) with no adapter and with 1, 8 and 64 distinct adapters (r=16 on every linear).
# Needs: python3 with numpy (to write the random adapters). Prints one JSON line per case.
set -euo pipefail
cd "$(dirname "$0")/../.."
REQUESTS="${REQUESTS:-64}" CONCURRENCY="${CONCURRENCY:-16}" MAX_NEW="${MAX_NEW:-32}"
PY="${LORQ_BENCH_PYTHON:-python3}"
cargo build --release --locked
lorq=target/release/lorq
model_dir=$("$lorq" pull 2>/dev/null | tail -1)
work=$(mktemp -d)
trap 'kill $server 2>/dev/null; rm -rf "$work"' EXIT
"$PY" scripts/bench/make_adapters.py "$model_dir" "$work" 64 >&2
port="${LORQ_PORT:-8091}"
"$lorq" serve --model default --adapter-dir "$work" --port "$port" "$@" 2>"$work/log" &
server=$!
for _ in $(seq 1 300); do grep -q "listening on" "$work/log" && break; sleep 0.2; done
url="http://127.0.0.1:$port"
ids() { seq 0 $(($1 - 1)) | sed 's#^#bench/a#' | paste -sd, -; }
# Warm-up (loads every adapter once, so load time is not measured as serving time).
"$PY" scripts/bench/serve_load.py "$url" --requests 64 --concurrency 16 --max-new-tokens 2 --adapters "$(ids 64)" >/dev/null
for n in 0 1 8 64; do
    adapters=""
    [ "$n" -gt 0 ] && adapters=$(ids "$n")
    "$PY" scripts/bench/serve_load.py "$url" --requests "$REQUESTS" --concurrency "$CONCURRENCY" \
        --max-new-tokens "$MAX_NEW" --adapters "$adapters"
done
