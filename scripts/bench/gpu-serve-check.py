#!/usr/bin/env python3
"""`lorq serve` on the GPU against the CPU, with continuous batching and mixed adapters.

    python3 scripts/bench/gpu-serve-check.py BINARY [--model fixtures/llama/base] [--logs DIR]

Starts three servers on the committed tiny Llama in f32 — CPU, GPU (CUDA graphs, the default) and
GPU with --enforce-eager — sends the same concurrent greedy requests to each (different prompt
lengths, token budgets, adapters, repetition penalties and top_n_tokens, so batches grow, shrink
and change adapters between steps, and decode graphs are captured, replayed and dropped), and
compares every request's generated token ids and its alternatives' ids. Exit status 1 if any differ. Runs through scripts/gpu-run.sh (the CUDA libraries).
"""
import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

ADAPTERS = [None, "r8-all", "r4-rslora-qv-bf16", "r16-regex-layer1"]


RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gpu-run.sh")


def start(binary, model, port, device, extra, logs):
    cmd = ["sh", RUN, binary, "serve", "--model", model, "--dtype", "f32",
           "--device", device, "--port", str(port), "--adapter-dir", os.path.dirname(model.rstrip("/")) + "/adapters"] + extra
    log_path = os.path.join(logs, f"serve-{port}.log")
    log = open(log_path, "w")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return p
        except Exception:
            if p.poll() is not None:
                sys.exit(f"server on {device} {extra} exited: see {log_path}")
            time.sleep(0.5)
    p.kill()
    sys.exit(f"server on {device} {extra} did not come up")


def generate(port, i):
    words = " ".join(["the quick brown fox jumps over the lazy dog"] * (1 + i % 5))
    params = {"max_new_tokens": 8 + 8 * (i % 5), "details": True, "do_sample": False}
    if i % 3 == 1:
        # Greedy after a repetition penalty: the GPU penalizes its rows before the argmax.
        params["repetition_penalty"] = 1.3
    if i % 4 == 2:
        # Alternatives: the GPU ranks the five most likely tokens of each step itself.
        params["top_n_tokens"] = 5
    adapter = ADAPTERS[i % len(ADAPTERS)]
    if adapter:
        params["adapter_id"] = adapter
    body = json.dumps({"inputs": f"{i}: {words}", "parameters": params}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        d = json.loads(r.read())
    tokens = d["details"]["tokens"]
    return [t["id"] for t in tokens], [[a["id"] for a in t.get("alternative_tokens") or []] for t in tokens]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--model", default="fixtures/llama/base")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--logs", default=".", help="folder for the servers' logs")
    a = ap.parse_args()
    runs = {}
    for name, port, device, extra in [("cpu", 18181, "cpu", []),
                                      ("gpu graphs", 18182, "cuda", []),
                                      ("gpu eager", 18183, "cuda", ["--enforce-eager"])]:
        p = start(a.binary, a.model, port, device, extra, a.logs)
        try:
            with ThreadPoolExecutor(max_workers=a.requests) as ex:
                runs[name] = list(ex.map(lambda i: generate(port, i), range(a.requests)))
        finally:
            p.terminate()
            p.wait(timeout=30)
    ok = True
    for name in ("gpu graphs", "gpu eager"):
        same = sum(x == y for x, y in zip(runs["cpu"], runs[name]))
        print(f"{name} == cpu: {same}/{a.requests} requests' token ids and alternatives identical")
        ok &= same == a.requests
    same = sum(x == y for x, y in zip(runs["gpu graphs"], runs["gpu eager"]))
    print(f"gpu graphs == gpu eager: {same}/{a.requests}")
    ok &= same == a.requests
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
