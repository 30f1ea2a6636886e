#!/bin/sh
# Quantizes the default model (SmolLM2-135M-Instruct) with lorq's calibration-based methods and the
# RTN baseline, then measures WikiText-2 test perplexity of each written checkpoint.
#
# Usage (repo root): [GROUP=128] [METHODS="rtn4 gptq4 ..."] scripts/bench/calibrated_ppl.sh LORQ_BINARY DATA_DIR OUT_DIR RESULT_JSONL [SAMPLES SEQ_LEN]
#   DATA_DIR holds wikitext-2 valid.txt (calibration) and test.txt (evaluation).
# Appends one JSON line per method to RESULT_JSONL: {"name", "quantize": <lorq quantize --json
# without the per-linear list>, "ppl": <lorq eval ppl --json>}.
set -e
LORQ=$1; DATA=$2; OUT=$3; RES=$4; N=${5:-64}; L=${6:-512}; G=${GROUP:-128}
CAL="--calibration $DATA/valid.txt --calibration-samples $N --calibration-seq-len $L"
run() {
  name=$1; shift
  $LORQ quantize --model default --out "$OUT/$name" --force --json "$@" > "$OUT/$name.quantize.json"
  $LORQ eval ppl --model "$OUT/$name" --data "$DATA/test.txt" --max-tokens 8192 --json > "$OUT/$name.ppl.json"
  python3 - "$name" "$OUT/$name.quantize.json" "$OUT/$name.ppl.json" >> "$RES" <<'PY'
import json, sys
name, q, p = sys.argv[1:]
q = json.load(open(q)); lin = q.pop("linears", [])
if lin:
    q["mean_rel_error"] = sum(l["rel_error"] for l in lin) / len(lin)
    q["mean_rtn_rel_error"] = sum(l["rtn_rel_error"] for l in lin) / len(lin)
    q["linears_below_rtn"] = sum(l["rel_error"] < l["rtn_rel_error"] for l in lin)
q.pop("out", None)
p = json.load(open(p)); p.pop("model", None); p.pop("data", None)
print(json.dumps({"name": name, "quantize": q, "ppl": p}))
PY
  tail -1 "$RES"
}
for m in ${METHODS:-rtn4 rtn3 gptq4 gptq4-act gptq3-act awq4}; do
  case $m in
    rtn4) run rtn-int4-g$G --method rtn-int4 --group-size $G ;;
    rtn3) run rtn-3bit-g$G --method rtn-int4 --bits 3 --group-size $G ;;
    gptq4) run gptq-4bit-g$G --method gptq --group-size $G $CAL ;;
    gptq4-act) run gptq-4bit-g$G-act-order --method gptq --group-size $G --act-order $CAL ;;
    gptq3-act) run gptq-3bit-g$G-act-order --method gptq --bits 3 --group-size $G --act-order $CAL ;;
    awq4) run awq-4bit-g$G --method awq --group-size $G --awq-clip $CAL ;;
    awq4-duo) run awq-4bit-g$G-duo --method awq --group-size $G --awq-clip --awq-duo-scaling $CAL ;;
    gptq3) run gptq-3bit-g$G --method gptq --bits 3 --group-size $G $CAL ;;
  esac
done
