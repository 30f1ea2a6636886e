#!/bin/sh
# QLoRA of the default model (SmolLM2-135M-Instruct) on WikiText-2 valid.txt on the CPU, with
# WikiText-2 test perplexity before and after (same NF4 base, same windows).
#
# Usage (repo root): scripts/bench/train_cpu.sh LORQ_BINARY DATA_DIR OUT_DIR [STEPS] [EVAL_TOKENS]
#   DATA_DIR holds wikitext-2 valid.txt (training) and test.txt (evaluation).
# Extra `lorq train` flags can be passed in TRAIN_FLAGS. Writes OUT_DIR/{valid.jsonl, before.json,
# train.json, after.json, run/} and prints one JSON summary line.
set -e
LORQ=$1; DATA=$2; OUT=$3; STEPS=${4:-40}; EVAL_TOKENS=${5:-16384}
mkdir -p "$OUT"
# One JSONL row per article (articles start at " = Title = " lines), packed into fixed-length chunks.
python3 - "$DATA/valid.txt" "$OUT/valid.jsonl" <<'PY'
import json, re, sys
text = open(sys.argv[1], encoding="utf-8").read()
with open(sys.argv[2], "w") as f:
    for p in re.split(r"\n(?= = [^=].* = \n)", text):
        if len(p.strip()) > 20:
            f.write(json.dumps({"text": p.strip("\n")}) + "\n")
PY
EVAL="eval ppl --model default --quantize bitsandbytes-nf4 --data $DATA/test.txt --max-tokens $EVAL_TOKENS --json"
$LORQ $EVAL > "$OUT/before.json"
$LORQ train --model default --data "$OUT/valid.jsonl" --packing --max-seq-len 256 --batch-size 4 \
  --grad-accum 2 --max-steps "$STEPS" --warmup-steps 4 --lr 5e-4 --logging-steps 1 \
  --out "$OUT/run" --json $TRAIN_FLAGS > "$OUT/train.json"
$LORQ $EVAL --adapter "$OUT/run" > "$OUT/after.json"
python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
b, t, a = (json.load(open(f"{o}/{n}.json")) for n in ("before", "train", "after"))
print(json.dumps({"ppl_before": b["ppl"], "ppl_after": a["ppl"], "eval_tokens": b["tokens"],
                  "steps": t["steps"], "train_tokens": t["tokens"], "train_seconds": t["seconds"],
                  "tokens_per_s": t["tokens_per_s"], "loss_first": t["first_loss"], "loss_last": t["last_loss"],
                  "peak_rss_bytes": t["peak_rss_bytes"]}))
PY
