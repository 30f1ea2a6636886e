#!/bin/sh
# One GPU-machine run of the system benchmarks, each beside its peer in the same call, writing JSON
# under $OUT (or ./gpu-out):
#   scripts/bench/gpu-system.sh BINARY
# decode tokens/s of a Llama-3-8B-shaped model (bf16, NF4, HQQ 4-bit, FP8; batch 1 and 32) + transformers
# (bf16, bitsandbytes NF4, torchao int4, hqq + GemLite, where importable);
# prefill of 2048-token prompts with and without the query-tile attention + torch SDPA's causal attention;
# decode with 0/1/8/32/64 rank-16 adapters at batch 32 and 64 (+ transformers with PEFT's mixed-batch
# adapters, 0 and 8); the multi-adapter kernels alone;
# FP8 W8A8 through cuBLASLt + torch._scaled_mm. (Kernels and JIT quantization: gpu-check.sh.)
set -u
B=$1
O=${OUT:-gpu-out}
mkdir -p "$O"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$O/card.txt"
fail=0
step() { echo "== $1"; shift; timeout 240 "$@" >>"$O/system.log" 2>&1 || { echo "   failed ($?)"; fail=1; }; }
# lorq through scripts/gpu-run.sh (a command `timeout` can run: no shell function).
R="sh scripts/gpu-run.sh $B"
step "decode" $R bench decode --device cuda --shape llama-3-8b --quantize none,bitsandbytes-nf4,hqq-4bit,fp8 \
    --batch-sizes 1,32 --context 512 --new-tokens 64 --cuda-graphs both --json "$O/decode.json"
step "decode, transformers" python3 scripts/bench/decode_torch.py --shape llama-3-8b --batch-sizes 1,32 \
    --context 512 --new-tokens 64 --quantize none,bitsandbytes-nf4,torchao-int4,hqq-4bit --json "$O/decode-torch.json"
step "prefill" $R bench decode --device cuda --shape llama-3-8b --quantize none --batch-sizes 1,32 \
    --context 2048 --new-tokens 8 --compare-prefill-tiles --json "$O/prefill.json"
step "prefill attention, torch" python3 scripts/bench/torch_attention.py --prefill --batch 32,8 \
    --context 512,2048 --out "$O/prefill-torch.json"
step "decode with adapters" $R bench decode --device cuda --shape llama-3-8b --quantize none \
    --batch-sizes 32,64 --adapters 0,1,8,32,64 --rank 16 --context 512 --new-tokens 32 --repeats 1 --cuda-graphs both \
    --json "$O/decode-adapters.json"
step "decode with adapters, transformers + PEFT" python3 scripts/bench/decode_torch.py --shape llama-3-8b \
    --batch-sizes 32 --adapters 0,8 --rank 16 --context 512 --new-tokens 16 --json "$O/decode-peft-adapters.json"
step "adapter kernels" $R bench adapters --device cuda --batch-sizes 32,64 --adapters 1,8,32,64 \
    --rank 16 --json "$O/adapters.json"
step "fp8 peer" python3 scripts/bench/torch_scaled_mm.py --shapes llama3-8b --m 1,2,8,16,32,64,128,512 \
    --out "$O/torch_fp8.json"
step "fp8" $R bench fp8 --device cuda --shapes llama3-8b --m 1,2,8,16,32,64,128,512 --peer "$O/torch_fp8.json" \
    --json "$O/fp8.json"
exit $fail
