#!/usr/bin/env python3
"""The peer row of `lorq bench decode`: decode tokens/s of the same model shape with random weights
in PyTorch bf16 (transformers' LlamaForCausalLM from a config, N(0, 0.02) init), greedy, after a
prompt of --context tokens per sequence, per batch size. Decode time per step =
(time of generate(context -> context+N) - time of generate(context -> context+1)) / (N - 1), so the
prefill cancels. A static KV cache where transformers offers it (dynamic otherwise, said in the
row); torch.compile only with --compile (it may need minutes). Writes JSON rows like lorq's.

--quantize puts the linear layers of the decoder (not the LM head, as lorq's default) in a peer's
4-bit format first, one row per format: `bitsandbytes-nf4` (bitsandbytes' Linear4bit, blocksize 64,
double quantization, bf16 compute: what transformers' BitsAndBytesConfig loads), `torchao-int4`
(torchao's Int4WeightOnlyConfig, group 128, tinygemm's tile-packed layout), `hqq-4bit` (hqq's
HQQLinear, group 64, on GemLite, hqq's recommended backend; its torchao_int4 backend fails on
torch 2.11's int4 packing, see peer_quant_kernels.py). A format whose package is missing or fails
is skipped with the reason in the report.

  python3 scripts/bench/decode_torch.py --shape llama-3-8b --batch-sizes 1,32 --context 512 \
      --new-tokens 64 --json decode-torch.json
  python3 scripts/bench/decode_torch.py --quantize none,bitsandbytes-nf4,torchao-int4 --batch-sizes 1 --json peers.json

--adapters 0,8,64 adds PEFT LoRA adapters (rank --rank on --adapter-modules, all seven by default) and
spreads each batch's rows over them round-robin (`generate(adapter_names=...)`, PEFT's mixed-batch
inference): the peer of `lorq bench decode --adapters`.

  python3 scripts/bench/decode_torch.py --batch-sizes 32 --adapters 0,8,64 --new-tokens 16 --json peft.json
"""
import argparse
import json
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from peer_formats import BNB4_BLOCKSIZE, gemlite_linear, hqq_linear, tensor_bytes, torchao_int4_config

SHAPES = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                       tie_word_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
}


def timed_generate(model, ids, new, cache, compile_, extra=None):
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **(extra or {}))
    if cache:
        kw["cache_implementation"] = cache
    if not compile_:
        kw["disable_compile"] = True
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def decoder_linears(model):
    """(parent, attribute name, nn.Linear) of every linear layer of the decoder blocks."""
    out = []
    for parent in model.model.layers.modules():
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.Linear):
                out.append((parent, name, child))
    return out


def quantize(model, fmt):
    """Replaces the decoder's linear layers with fmt's (see the module doc); the LM head stays bf16."""
    if fmt == "bitsandbytes-nf4":
        import bitsandbytes as bnb

        for parent, name, lin in decoder_linears(model):
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, blocksize=BNB4_BLOCKSIZE,
                                         compress_statistics=True, quant_type="nf4").to("cuda")
            setattr(parent, name, q)
        return {"bitsandbytes": bnb.__version__}
    if fmt == "torchao-int4":
        import torchao
        from torchao.quantization import quantize_

        quantize_(model.model.layers, torchao_int4_config())
        return {"torchao": torchao.__version__}
    if fmt == "hqq-4bit":
        import gemlite
        import hqq

        for parent, name, lin in decoder_linears(model):
            setattr(parent, name, gemlite_linear(hqq_linear(lin)))
        return {"hqq": getattr(hqq, "__version__", "?"), "gemlite": gemlite.__version__, "hqq_backend": "gemlite"}
    raise ValueError(f"unknown --quantize format {fmt!r}")


def with_adapters(model, have, want, a):
    """The model holding `want` PEFT LoRA adapters (a0, a1, ...) where it holds `have`: rank
    --rank on --adapter-modules, B initialized at random (init_lora_weights=False) so that every
    adapter changes the output, as trained ones do."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                     target_modules=a.adapter_modules.split(","), init_lora_weights=False)
    for i in range(have, want):
        if i == 0:
            model = get_peft_model(model, cfg, adapter_name="a0")
        else:
            model.add_adapter(f"a{i}", cfg)
    model.eval()
    return model


def run_format(a, fmt, versions, rows, save):
    """Appends fmt's rows to rows, save()d after each (a timeout keeps what ran)."""
    torch.manual_seed(1234)
    cfg = LlamaConfig(**SHAPES[a.shape], initializer_range=0.02)
    t = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    model.eval()
    if fmt != "none":
        versions.update(quantize(model, fmt))
    build_s = time.perf_counter() - t
    weight_bytes = sum(tensor_bytes(p) for p in list(model.parameters()) + list(model.buffers()))
    have = 0
    for n_adapters in sorted(int(v) for v in a.adapters.split(",")):
        if n_adapters:
            import peft

            versions["peft"] = peft.__version__
            with torch.device("cuda"):
                model = with_adapters(model, have, n_adapters, a)
            have = n_adapters
        for batch in [int(b) for b in a.batch_sizes.split(",")]:
            ids = torch.randint(0, cfg.vocab_size, (batch, a.context), device="cuda")
            # The batch's rows spread over the adapters round-robin (PEFT's mixed-batch inference).
            extra = {"adapter_names": [f"a{i % n_adapters}" for i in range(batch)]} if n_adapters else {}
            with torch.no_grad():
                cache = "static"
                try:
                    timed_generate(model, ids, 2, cache, a.compile, extra)  # warm-up
                except Exception as e:  # older/newer transformers without it
                    print(f"static cache unavailable ({e}); dynamic cache", flush=True)
                    cache = None
                    timed_generate(model, ids, 2, cache, a.compile, extra)
                one = min(timed_generate(model, ids, 1, cache, a.compile, extra) for _ in range(2))
                full = min(timed_generate(model, ids, a.new_tokens + 1, cache, a.compile, extra) for _ in range(2))
            step = (full - one) / a.new_tokens
            row = {
                "engine": "transformers" + (" + peft" if n_adapters else ""),
                "format": "torch-bf16" if fmt == "none" else fmt,
                "batch": batch,
                "context": a.context,
                "adapters": n_adapters,
                "rank": a.rank if n_adapters else None,
                "adapter_modules": a.adapter_modules if n_adapters else None,
                "tokens_per_s": batch / step,
                "ms_per_step": step * 1e3,
                "weight_bytes": weight_bytes,
                "kv_cache": cache or "dynamic",
                "compiled": a.compile,
                "build_s": build_s,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
            save()
    del model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--quantize", default="none",
                    help="comma list: none, bitsandbytes-nf4, torchao-int4, hqq-4bit (one model each)")
    ap.add_argument("--adapters", default="0",
                    help="comma list of distinct PEFT LoRA adapter counts, the batch's rows spread over them "
                         "(0: the base model alone); one model per format, adapters added in increasing count")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapter-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows, skipped, versions = [], [], {}

    def save():
        report = {
            "engine": "transformers",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "card": torch.cuda.get_device_name(),
            "versions": versions,
            "skipped": skipped,
            "shape": a.shape,
            "rows": rows,
        }
        if a.json:
            with open(a.json, "w") as f:
                json.dump(report, f, indent=1)

    for fmt in a.quantize.split(","):
        try:
            run_format(a, fmt, versions, rows, save)
        except Exception as e:  # noqa: BLE001 - a missing or failing peer is reported, not fatal
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            print(f"skip {fmt}: {reason}", flush=True)
            skipped.append({"format": fmt, "reason": reason})
        torch.cuda.empty_cache()
        save()


if __name__ == "__main__":
    main()
