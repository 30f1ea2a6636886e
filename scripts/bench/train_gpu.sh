#!/bin/sh
# `lorq train` beside transformers + PEFT + bitsandbytes QLoRA on one GPU, same shapes, same batch, same
# card, same run: NF4 double-quant base, bf16 compute, LoRA r=64 on every linear, paged 8-bit AdamW,
# gradient checkpointing. Models are Llama-family checkpoints with seeded random weights (speed does
# not depend on the values), written here by make_random_model.py.
#
# Usage (repo root, on the GPU machine; bitsandbytes importable):
#   scripts/bench/train_gpu.sh LORQ_BINARY OUT_DIR [SHAPES] [BATCH] [SEQ] [STEPS]
#   SHAPES: "smollm2-135m llama-3-8b" (default); BATCH 4, SEQ 512, STEPS 6 (the first 2 are warm-up).
# Writes OUT_DIR/<shape>.json: {"peft": <peft_qlora.py>, "lorq": <lorq train --json>, "lorq_steps":
# [metrics lines], "smi_peak_mib": {"peft", "lorq"}} (nvidia-smi's used memory, polled every 100 ms,
# CUDA context included, the same measure for both).
set -u
LORQ=$1; OUT=$2; SHAPES=${3:-"smollm2-135m llama-3-8b"}; B=${4:-4}; L=${5:-512}; N=${6:-6}
mkdir -p "$OUT"
HERE=$(dirname "$0")
# Text rows for `lorq train --packing` (every micro-batch is B full sequences of L tokens).
python3 - /tmp/lorq-bench-data.jsonl <<'PY'
import json, random, sys
random.seed(0)
words = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
with open(sys.argv[1], "w") as f:
    for _ in range(400):
        f.write(json.dumps({"text": " ".join(random.choice(words) for _ in range(600))}) + "\n")
PY
smi_peak() {  # runs "$@" while polling nvidia-smi; prints the peak used MiB on fd 3
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/smi.txt &
  p=$!
  "$@"
  rc=$?
  kill $p 2>/dev/null; wait $p 2>/dev/null
  sort -n /tmp/smi.txt | tail -1 >&3
  return $rc
}
for s in $SHAPES; do
  m=/tmp/model-$s
  [ -d "$m" ] || python3 "$HERE/make_random_model.py" "$s" "$m" fixtures/llama/base
  smi_peak timeout 300 python3 "$HERE/peft_qlora.py" "$m" --steps $((N - 2)) --warmup 2 --batch-size $B --seq-len $L --r 64 \
    > "$OUT/$s.peft.json" 3> "$OUT/$s.peft.smi" || echo "peft $s failed" >&2
  rm -rf /tmp/run-$s
  smi_peak timeout 420 "$LORQ" train --model "$m" --device cuda --dtype bf16 --data /tmp/lorq-bench-data.jsonl \
    --packing --max-seq-len $L --batch-size $B --grad-accum 1 --max-steps $N --warmup-steps 1 --logging-steps 1 \
    --out /tmp/run-$s --json > "$OUT/$s.lorq.json" 3> "$OUT/$s.lorq.smi" || echo "lorq $s failed" >&2
  python3 - "$OUT" "$s" "$B" "$L" <<'PY'
import json, os, sys
out, s, b, l = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def load(p):
    try:
        return json.load(open(p))
    except Exception as e:
        return {"error": str(e)}
def smi(p):
    try:
        return int(open(p).read().strip())
    except Exception:
        return None
steps = []
mp = f"/tmp/run-{s}/metrics.jsonl"
if os.path.exists(mp):
    steps = [json.loads(x) for x in open(mp)]
timed = [x for x in steps if x.get("step", 0) > 2 and "tokens_per_s" in x]
res = {"shape": s, "batch_size": b, "seq_len": l, "peft": load(f"{out}/{s}.peft.json"), "lorq": load(f"{out}/{s}.lorq.json"),
       "lorq_steps": steps, "lorq_tokens_per_s_after_warmup": (sum(x["tokens_per_s"] for x in timed) / len(timed)) if timed else None,
       "smi_peak_mib": {"peft": smi(f"{out}/{s}.peft.smi"), "lorq": smi(f"{out}/{s}.lorq.smi")}}
json.dump(res, open(f"{out}/{s}.json", "w"), indent=1)
print(json.dumps({k: res[k] for k in ("shape", "lorq_tokens_per_s_after_warmup", "smi_peak_mib")},),
      "peft tok/s", res["peft"].get("tokens_per_s"))
PY
done
