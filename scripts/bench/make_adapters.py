"""Writes N random PEFT LoRA adapters for a model folder (benchmark input, not a fixture).

Usage: make_adapters.py MODEL_DIR OUT_ROOT N [--r 16] [--targets all-linear|q_proj,v_proj]
Each adapter OUT_ROOT/bench/a<k> targets every decoder linear (or the listed ones) with rank r,
A ~ N(0, 1/in), B ~ N(0, 0.02), in float32, named as PEFT saves them. Needs numpy.
"""

import argparse
import json
import os
import struct

import numpy as np

LINEARS = {
    "q_proj": ("self_attn", lambda c: (c["hidden_size"], c["num_attention_heads"] * hd(c))),
    "k_proj": ("self_attn", lambda c: (c["hidden_size"], c["num_key_value_heads"] * hd(c))),
    "v_proj": ("self_attn", lambda c: (c["hidden_size"], c["num_key_value_heads"] * hd(c))),
    "o_proj": ("self_attn", lambda c: (c["num_attention_heads"] * hd(c), c["hidden_size"])),
    "gate_proj": ("mlp", lambda c: (c["hidden_size"], c["intermediate_size"])),
    "up_proj": ("mlp", lambda c: (c["hidden_size"], c["intermediate_size"])),
    "down_proj": ("mlp", lambda c: (c["intermediate_size"], c["hidden_size"])),
}


def hd(c):
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def save_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        b = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("n", type=int)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--targets", default="all-linear")
    a = p.parse_args()
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    targets = list(LINEARS) if a.targets == "all-linear" else a.targets.split(",")
    for k in range(a.n):
        rng = np.random.default_rng(1000 + k)
        d = os.path.join(a.out, "bench", f"a{k}")
        os.makedirs(d, exist_ok=True)
        tensors = {}
        for layer in range(cfg["num_hidden_layers"]):
            for t in targets:
                block, shape = LINEARS[t]
                fin, fout = shape(cfg)
                pre = f"base_model.model.model.layers.{layer}.{block}.{t}"
                tensors[f"{pre}.lora_A.weight"] = rng.normal(0, 1 / np.sqrt(fin), (a.r, fin))
                tensors[f"{pre}.lora_B.weight"] = rng.normal(0, 0.02, (fout, a.r))
        save_safetensors(os.path.join(d, "adapter_model.safetensors"), tensors)
        json.dump(
            {"peft_type": "LORA", "r": a.r, "lora_alpha": 2 * a.r, "target_modules": targets,
             "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"},
            open(os.path.join(d, "adapter_config.json"), "w"),
        )
    print(f"wrote {a.n} adapters (r={a.r}, {','.join(targets)}) under {a.out}/bench")


if __name__ == "__main__":
    main()
