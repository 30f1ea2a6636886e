"""The peer for `lorq train` on a GPU: HF transformers + PEFT + bitsandbytes QLoRA (NF4 double-quant base,
bf16 compute, LoRA on all linears, paged 8-bit AdamW, gradient checkpointing), timed over N steps of
random token batches. Prints one JSON line: tokens/s and peak GPU memory (torch's allocator peak).

Usage: python peft_qlora.py MODEL_DIR --steps 10 --batch-size 4 --seq-len 512 --r 64
"""
import argparse, json, time
import torch
import bitsandbytes as bnb
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--warmup", type=int, default=2)
ap.add_argument("--batch-size", type=int, default=4)
ap.add_argument("--seq-len", type=int, default=512)
ap.add_argument("--r", type=int, default=64)
a = ap.parse_args()
torch.manual_seed(0)
qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.bfloat16)
t0 = time.time()
m = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=qc, dtype=torch.bfloat16, device_map="cuda:0")
load_s = time.time() - t0
m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True)
m = get_peft_model(m, LoraConfig(r=a.r, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM"))
m.train()  # as HF Trainer does: gradient checkpointing and dropout act only in train mode
opt = bnb.optim.PagedAdamW8bit([p for p in m.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.001)
vocab = m.config.vocab_size
torch.cuda.reset_peak_memory_stats()


def step():
    ids = torch.randint(0, min(vocab, 400), (a.batch_size, a.seq_len), device="cuda")
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], 0.3)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


for _ in range(a.warmup):
    step()
torch.cuda.synchronize()
t = time.time()
for _ in range(a.steps):
    loss = step()
torch.cuda.synchronize()
dt = time.time() - t
print(json.dumps({"peer": "transformers+peft+bitsandbytes", "model": a.model, "batch_size": a.batch_size,
                  "seq_len": a.seq_len, "r": a.r, "steps": a.steps, "seconds": dt,
                  "tokens_per_s": a.steps * a.batch_size * a.seq_len / dt,
                  "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                  "peak_reserved_bytes": torch.cuda.max_memory_reserved(), "load_seconds": load_s,
                  "last_loss": loss.item(), "torch": torch.__version__, "bitsandbytes": bnb.__version__,
                  "card": torch.cuda.get_device_name()}))
