"""Load generator for `lorq serve`: N streaming requests at a fixed concurrency, each with an
adapter from a list (round-robin) or none; reports throughput and latency percentiles as JSON.

Usage: serve_load.py URL --requests 64 --concurrency 16 --max-new-tokens 32 [--adapters a,b,...]
       [--temperature T --top-p P --top-k K]  (sampled requests; default greedy)
       [--repetition-penalty R] [--top-n N]  (a penalty; N alternatives per token)
Uses only the standard library (http.client), so it measures the server, not a client library.
"""

import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse

PROMPTS = [
    "Write a short note about the history of the printing press and its effect on",
    "Explain to a new engineer why continuous batching raises the throughput of",
    "List three reasons people choose small language models when they deploy",
    "The weather report for tomorrow says that the coastal towns will see",
]


def one(url, body, out):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/generate_stream", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    first, n, buf = None, 0, b""
    while True:
        line = resp.readline()
        if not line:
            break
        if line.startswith(b"data:"):
            ev = json.loads(line[5:])
            if "error" in ev:
                raise RuntimeError(ev["error"])
            n += 1
            if first is None:
                first = time.perf_counter()
            if ev.get("generated_text") is not None:
                break
    t1 = time.perf_counter()
    conn.close()
    out.append({"ttft": first - t0, "total": t1 - t0, "tokens": n,
                "tpot": (t1 - first) / max(n - 1, 1)})


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--adapters", default="")
    ap.add_argument("--temperature", type=float, help="sample (do_sample) at this temperature; default greedy")
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--repetition-penalty", type=float, help="alone: greedy after the penalty")
    ap.add_argument("--top-n", type=int, help="report each token's N most likely alternatives (top_n_tokens)")
    a = ap.parse_args()
    sampling = {k: v for k, v in [("temperature", a.temperature), ("top_p", a.top_p), ("top_k", a.top_k)]
                if v is not None}
    if sampling:
        sampling["do_sample"] = True
    if a.repetition_penalty is not None:
        sampling["repetition_penalty"] = a.repetition_penalty
    if a.top_n:
        sampling["top_n_tokens"] = a.top_n
    adapters = [x for x in a.adapters.split(",") if x]
    bodies = []
    for i in range(a.requests):
        params = {"max_new_tokens": a.max_new_tokens, "ignore_eos_token": True, **sampling}
        if adapters:
            params["adapter_id"] = adapters[i % len(adapters)]
        bodies.append({"inputs": PROMPTS[i % len(PROMPTS)] + f" case {i}", "parameters": params})
    results, lock, idx = [], threading.Lock(), [0]

    def worker():
        while True:
            with lock:
                if idx[0] >= len(bodies):
                    return
                b = bodies[idx[0]]
                idx[0] += 1
            one(a.url, b, results)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results]
    print(json.dumps({
        "adapters": len(adapters), "sampling": sampling or "greedy", "requests": len(results), "concurrency": a.concurrency,
        "max_new_tokens": a.max_new_tokens, "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1), "requests_per_s": round(len(results) / wall, 2),
        "ttft_p50_ms": round(pct(ttft, 50) * 1e3), "ttft_p90_ms": round(pct(ttft, 90) * 1e3),
        "tpot_p50_ms": round(pct(tpot, 50) * 1e3, 1), "tpot_p90_ms": round(pct(tpot, 90) * 1e3, 1),
        "mean_latency_s": round(statistics.mean(r["total"] for r in results), 2),
    }))


if __name__ == "__main__":
    main()
