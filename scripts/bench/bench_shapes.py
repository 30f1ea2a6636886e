"""The weight shapes the torch peer scripts time (torch_matmul.py, torch_scaled_mm.py,
peer_quant_kernels.py), named as `lorq bench kernels --shapes` names them."""

LLAMA3_8B = [("q_proj/o_proj", 4096, 4096), ("k_proj/v_proj", 1024, 4096),
             ("gate_proj/up_proj", 14336, 4096), ("down_proj", 4096, 14336)]


def parse_shapes(spec):
    """`llama3-8b` and/or `NxK` items, comma-separated -> [(name or None, n, k)]."""
    shapes = []
    for s in spec.split(","):
        if s == "llama3-8b":
            shapes += LLAMA3_8B
        else:
            n, k = s.lower().split("x")
            shapes.append((None, int(n), int(k)))
    return shapes
