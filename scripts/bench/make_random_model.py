"""A Llama-family checkpoint with seeded random weights, for speed and memory benchmarks (speed does
not depend on the weight values). Both lorq and transformers load the folder.

Usage: python make_random_model.py SHAPE OUT_DIR TOKENIZER_DIR
  SHAPE: smollm2-135m | llama-3-8b
  TOKENIZER_DIR: a folder with tokenizer.json + tokenizer_config.json (any vocab <= the config's).
Weights are bf16, N(0, 0.02) (norms 1), written shard by shard without holding the model twice.
"""
import json, os, shutil, sys
import torch
from safetensors.torch import save_file

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
                       max_position_embeddings=8192, rms_norm_eps=1e-5),
}
shape, out, tok = sys.argv[1], sys.argv[2], sys.argv[3]
c = SHAPES[shape]
os.makedirs(out, exist_ok=True)
cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", attention_bias=False,
           mlp_bias=False, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16", **c)
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
for f in ["tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(os.path.join(tok, f), out)
g = torch.Generator().manual_seed(0)
h, i, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
hd = h // c["num_attention_heads"]
kv = c["num_key_value_heads"] * hd


def rnd(*s):
    return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)


index, shard = {}, 0


def flush(tensors):
    global shard
    name = f"model-{shard:05d}.safetensors"
    save_file(tensors, os.path.join(out, name), metadata={"format": "pt"})
    for k in tensors:
        index[k] = name
    shard += 1


flush({"model.embed_tokens.weight": rnd(c["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
       **({} if c["tie_word_embeddings"] else {"lm_head.weight": rnd(c["vocab_size"], h)})})
for l in range(L):
    p = f"model.layers.{l}."
    flush({p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
           p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
           p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
           p + "mlp.down_proj.weight": rnd(h, i),
           p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
           p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
json.dump({"metadata": {}, "weight_map": index}, open(os.path.join(out, "model.safetensors.index.json"), "w"))
print(out, shape, "layers", L)
