"""The peer libraries' quantized formats as lorq's benchmarks set them up, shared by the kernel
peer (peer_quant_kernels.py) and the decode peer (decode_torch.py): one place for each library's
settings and for counting the bytes a quantized weight occupies.

- bitsandbytes NF4 / FP4: blocksize 64, double quantization (lorq's bitsandbytes-nf4 / -fp4);
- torchao int4 weight-only: group 128, tinygemm's tile-packed layout
  (`torch.ops.aten._weight_int4pack_mm`; torchao 0.18's default `plain` layout needs the mslk kernels);
- hqq 4-bit: group 64, axis 1 (lorq's hqq-4bit); GemLite, hqq's recommended backend, with its H100
  configs on an H200 (it ships none for the H200: same SM, else it autotunes every shape).
"""
import os

import torch

BNB4_BLOCKSIZE = 64
TORCHAO_INT4_GROUP = 128
HQQ_GROUP = 64


def tensor_bytes(t):
    """Bytes a tensor holds: through tensor subclasses (torchao) to their inner tensors, and with a
    bitsandbytes Params4bit's quantization state."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    n = t.numel() * t.element_size()
    qs = getattr(t, "quant_state", None)
    return n + (quant_state_bytes(qs) if qs is not None else 0)


def quant_state_bytes(qs):
    """A bitsandbytes QuantState's tensors (absmax, nested absmax, quant maps)."""
    return sum(v.numel() * v.element_size() for v in qs.as_dict(packed=True).values() if torch.is_tensor(v))


def module_bytes(mod):
    """Bytes of a module's parameters and buffers, each tensor once."""
    seen, total = set(), 0
    for t in list(mod.parameters()) + list(mod.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def torchao_int4_config():
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=TORCHAO_INT4_GROUP, int4_packing_format="tile_packed_to_4d")


def hqq_linear(lin):
    """lin (bf16 nn.Linear) as hqq's HQQLinear, 4-bit, group 64, on the GPU."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=4, group_size=HQQ_GROUP, axis=1)
    return HQQLinear(lin, quant_config=cfg, compute_dtype=torch.bfloat16, device="cuda")


_GEMLITE_READY = False


def gemlite_linear(hqq_layer):
    """An HQQLinear on GemLite's A16W4 kernels (the H100's tuned configs loaded once on an H200)."""
    global _GEMLITE_READY
    import gemlite
    from gemlite.helper import A16Wn

    if not _GEMLITE_READY:
        if "h200" in torch.cuda.get_device_name().lower():
            gemlite.core.GemLiteLinear.load_config(
                os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json"))
        _GEMLITE_READY = True
    return A16Wn(device="cuda").from_hqqlinear(hqq_layer)
