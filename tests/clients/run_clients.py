"""Drives a running `lorq serve` with the real client libraries (lorax-client, text-generation,
openai) and prints, as one JSON object, what each call returned.

Usage: run_clients.py BASE_URL CASES.json
CASES.json: a list of {"name", "client": "lorax"|"tgi"|"openai", "call": ..., "args": {...}}.
Calls: lorax/tgi: generate, generate_stream; openai: completion, completion_stream, chat,
chat_stream, models. Each result is {"text": ..., plus call-specific fields} or {"error": ...}.
"""

import json
import sys


def lorax_call(base, call, args):
    from lorax import Client

    c = Client(base, timeout=120)
    if call == "generate":
        r = c.generate(**args)
        d = r.details
        return {
            "text": r.generated_text,
            "finish_reason": d.finish_reason.value if d else None,
            "token_ids": [t.id for t in d.tokens] if d else None,
            "logprobs": [t.logprob for t in d.tokens] if d else None,
            "prompt_tokens": d.prompt_tokens if d else None,
            "prefill": [[p.id, p.logprob] for p in d.prefill] if d else None,
            "alternatives": [
                [[a.id, a.logprob] for a in (t.alternative_tokens or [])] for t in d.tokens
            ]
            if d
            else None,
        }
    if call == "generate_stream":
        pieces, ids, final = [], [], None
        for ev in c.generate_stream(**args):
            pieces.append(ev.token.text)
            ids.append(ev.token.id)
            if ev.generated_text is not None:
                final = ev.generated_text
        return {"text": "".join(pieces), "token_ids": ids, "final_text": final}
    raise ValueError(call)


def tgi_call(base, call, args):
    from text_generation import Client

    c = Client(base, timeout=120)
    if call == "generate":
        r = c.generate(**args)
        return {
            "text": r.generated_text,
            "finish_reason": r.details.finish_reason.value,
            "token_ids": [t.id for t in r.details.tokens],
        }
    if call == "generate_stream":
        pieces, ids = [], []
        for ev in c.generate_stream(**args):
            pieces.append(ev.token.text)
            ids.append(ev.token.id)
        return {"text": "".join(pieces), "token_ids": ids}
    raise ValueError(call)


def openai_call(base, call, args):
    from openai import OpenAI

    c = OpenAI(base_url=base + "/v1", api_key=args.pop("api_key", "EMPTY"), timeout=120)
    if call == "completion":
        r = c.completions.create(**args)
        return {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason,
                "usage": r.usage.model_dump() if r.usage else None}
    if call == "completion_stream":
        pieces = []
        for ch in c.completions.create(stream=True, **args):
            if ch.choices:
                pieces.append(ch.choices[0].text)
        return {"text": "".join(pieces)}
    if call == "chat":
        r = c.chat.completions.create(**args)
        return {"text": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason,
                "usage": r.usage.model_dump() if r.usage else None}
    if call == "chat_stream":
        pieces = []
        for ch in c.chat.completions.create(stream=True, **args):
            if ch.choices and ch.choices[0].delta.content:
                pieces.append(ch.choices[0].delta.content)
        return {"text": "".join(pieces)}
    if call == "models":
        return {"ids": [m.id for m in c.models.list()]}
    raise ValueError(call)


def main():
    base, cases_path = sys.argv[1], sys.argv[2]
    with open(cases_path) as f:
        cases = json.load(f)
    out = {}
    for case in cases:
        fn = {"lorax": lorax_call, "tgi": tgi_call, "openai": openai_call}[case["client"]]
        try:
            out[case["name"]] = fn(base, case["call"], dict(case.get("args", {})))
        except Exception as e:  # reported, the Rust test decides
            out[case["name"]] = {"error": f"{type(e).__name__}: {e}"}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
