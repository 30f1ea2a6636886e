"""The peer libraries' quantized formats as lorq's benchmarks set them up, shared by the kernel
peer (peer_quant_kernels.py) and the decode peer (decode_torch.py): one place for each library's
settings and for counting the bytes a quantized weight occupies.

- bitsandbytes NF4 / FP4: blocksize 64, double quantization (lorq's bitsandbytes-nf4 / -fp4);
- torchao int4 weight-only: group 128, tinygemm's tile-packed layout
  (`torch.ops.aten._weight_int4pack_mm`; torchao 0.18's default `plain` layout needs the mslk kernels);
- hqq 4-bit: group 64, axis 1 (lorq's hqq-4bit); GemLite, hqq's recommended backend, with its H100
  configs on an H200 (it ships none for the H200: same SM, else it autotunes every shape);
- GPTQ-Marlin (vLLM's kernel for GPTQ / AWQ checkpoints; scripts/bench/marlin_wheel.sh builds it):
  4-bit symmetric codes (stored q + 8), group 128, as lorq's GPTQ rows.
"""
import os

import torch

BNB4_BLOCKSIZE = 64
TORCHAO_INT4_GROUP = 128
HQQ_GROUP = 64
MARLIN_GROUP = 128
MARLIN_MIN_THREAD_N, MARLIN_MAX_PAR = 64, 16  # its workspace: a lock per 64 columns and parallel slice


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


class MarlinLinear:
    """y = x . W^T through GPTQ-Marlin: w (bf16 [N, K]) quantized to GPTQ's symmetric 4-bit codes in
    groups of 128 along K (s = max |w| / 7, q = round(w / s) + 8 in 0..15), packed as GPTQ
    checkpoints store them (int32 [K / 8, N], code k % 8 of column n at bits 4 (k % 8)), then
    turned into Marlin's tile layout by its own repack kernel; scales in x's dtype, permuted within
    each 64 columns as its kernel reads them (element 8 i + j of a 64-block from column i + 8 j)."""

    def __init__(self, w):
        import lorq_marlin_peer as mp

        n, k = w.shape
        g = MARLIN_GROUP
        wg = w.float().t().reshape(k // g, g, n)  # [groups, g, N]
        s = (wg.abs().amax(dim=1) / 7.0).clamp(min=1e-8)  # [groups, N]
        q = (torch.round(wg / s[:, None, :]) + 8).clamp(0, 15).to(torch.int32).reshape(k, n)
        q8 = q.reshape(k // 8, 8, n)
        packed = torch.zeros(k // 8, n, dtype=torch.int32, device=w.device)
        for j in range(8):
            packed |= q8[:, j, :] << (4 * j)
        empty = torch.empty(0, dtype=torch.int32, device=w.device)
        self.mp, self.n, self.k = mp, n, k
        self.qweight = mp.gptq_marlin_repack(packed, empty, k, n, 4)
        perm = torch.arange(64, device=w.device).view(8, 8).t().flatten()
        self.scales = s.to(w.dtype).reshape(-1, 64)[:, perm].reshape(-1, n).contiguous()
        self.zeros, self.g_idx, self.perm = empty, empty, empty
        self.workspace = torch.zeros(n // MARLIN_MIN_THREAD_N * MARLIN_MAX_PAR, dtype=torch.int32,
                                     device=w.device)
        self.nbytes = tensor_bytes(self.qweight) + tensor_bytes(self.scales)

    def __call__(self, x):
        return self.mp.gptq_marlin_gemm(x, self.qweight, self.scales, self.zeros, self.g_idx, self.perm,
                                        self.workspace, 4, x.shape[0], self.n, self.k, True, False, True)
