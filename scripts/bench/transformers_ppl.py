"""The peer side of `lorq eval ppl`: sliding-window perplexity with transformers (PyTorch, CPU).

Usage: python scripts/bench/transformers_ppl.py MODEL_DIR --data FILE [--ctx 512] [--stride 256]
           [--max-tokens N] [--dtype f32|bf16] [--threads N]
Prints one JSON object with the keys of `lorq eval ppl --json` (`engine`, `ctx`, `stride`, `tokens`,
`nll`, `ppl`, `seconds`, ...).

Same protocol as lorq (Hugging Face's "perplexity of fixed-length models"): the file is read as is and
tokenized without special tokens, cut to --max-tokens; windows of --ctx tokens start every --stride
tokens; a window scores only the tokens the previous window did not reach (the first window all but
its first token), so every token after the first is scored once. The NLL is the exact sum of the
per-token -log p (log-softmax in float64), not the docs' `loss * (trg_len - 1)` approximation.
"""
import argparse, json, math, os, time

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--data", required=True)
ap.add_argument("--ctx", type=int, default=512)
ap.add_argument("--stride", type=int, default=256)
ap.add_argument("--max-tokens", type=int, default=None)
ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
ap.add_argument("--threads", type=int, default=os.cpu_count())
a = ap.parse_args()
assert a.ctx >= 2 and 1 <= a.stride <= a.ctx

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(a.threads)
dtype = torch.float32 if a.dtype == "f32" else torch.bfloat16
tok = AutoTokenizer.from_pretrained(a.model)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).eval()
with open(a.data, encoding="utf-8") as f:
    text = f.read()
ids = tok(text, add_special_tokens=False)["input_ids"]
file_tokens = len(ids)
if a.max_tokens is not None:
    ids = ids[: a.max_tokens]
n = len(ids)
ids = torch.tensor([ids])

nll, scored, windows = 0.0, 0, 0
prev_end = 0
t0 = time.perf_counter()
with torch.inference_mode():
    for begin in range(0, n, a.stride):
        end = min(begin + a.ctx, n)
        first = max(prev_end, begin + 1)  # targets first..end-1
        logits = model(ids[:, begin:end], use_cache=False).logits[0]
        lp = logits[first - 1 - begin : end - 1 - begin].double().log_softmax(-1)
        targets = ids[0, first:end]
        nll -= lp.gather(-1, targets[:, None]).sum().item()
        scored += end - first
        windows += 1
        prev_end = end
        if end == n:
            break
seconds = time.perf_counter() - t0
print(json.dumps({
    "engine": "transformers", "model": os.path.basename(os.path.normpath(a.model)), "dtype": a.dtype,
    "data": os.path.basename(a.data), "ctx": a.ctx, "stride": a.stride, "input_tokens": n,
    "file_tokens": file_tokens, "windows": windows, "tokens": scored, "nll": nll,
    "mean_nll": nll / scored, "ppl": math.exp(nll / scored), "seconds": seconds,
    "tokens_per_s": n / seconds, "threads": a.threads,
    "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
}))
