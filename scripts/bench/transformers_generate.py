"""The peer side of `lorq bench generate`: the same measurement with transformers (PyTorch, CPU).

Usage: python scripts/bench/transformers_generate.py MODEL_DIR --dtype f32|bf16 [--batch-sizes 1,8]
           [--prompt-tokens 128] [--new-tokens 64] [--repeats 3] [--threads N]
Prints one JSON object shaped like lorq's (`engine`, `dtype`, `rows` with phase/batch/tokens/seconds/tokens_per_s).
Same protocol as lorq: prompt = a fixed English text repeated and cut to --prompt-tokens; prefill = one
forward over it (batch 1); decode = --new-tokens greedy steps with the KV cache after a prefill of the
same prompt for every row; one untimed warm-up, best of --repeats.
"""
import argparse, json, os, time

TEXT = ("The history of the city begins with a small settlement on the river. Over the "
        "centuries merchants, farmers and craftsmen arrived, built bridges and markets, and the town grew "
        "into a busy centre of trade. ")

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
ap.add_argument("--batch-sizes", default="1,8")
ap.add_argument("--prompt-tokens", type=int, default=128)
ap.add_argument("--new-tokens", type=int, default=64)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--threads", type=int, default=os.cpu_count())
a = ap.parse_args()

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(a.threads)
dtype = torch.float32 if a.dtype == "f32" else torch.bfloat16
tok = AutoTokenizer.from_pretrained(a.model)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).eval()
ids = []
while len(ids) < a.prompt_tokens:
    ids += tok.encode(TEXT, add_special_tokens=False)
ids = torch.tensor([ids[: a.prompt_tokens]])

rows = []
with torch.inference_mode():
    best = float("inf")
    for rep in range(a.repeats + 1):
        t = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        if rep:
            best = min(best, time.perf_counter() - t)
    rows.append({"phase": "prefill", "batch": 1, "tokens": ids.shape[1], "seconds": best,
                 "tokens_per_s": ids.shape[1] / best})
    for b in [int(x) for x in a.batch_sizes.split(",")]:
        best = float("inf")
        for rep in range(a.repeats + 1):
            out = model(ids.repeat(b, 1), use_cache=True, logits_to_keep=1)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(a.new_tokens):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            if rep:
                best = min(best, time.perf_counter() - t)
        n = b * a.new_tokens
        rows.append({"phase": "decode", "batch": b, "tokens": n, "context": ids.shape[1], "seconds": best,
                     "tokens_per_s": n / best, "ms_per_step": best * 1e3 / a.new_tokens})

import transformers
print(json.dumps({"engine": f"transformers {transformers.__version__} (torch {torch.__version__})", "model": os.path.basename(os.path.normpath(a.model)),
                  "dtype": a.dtype, "threads": torch.get_num_threads(), "rows": rows}))
