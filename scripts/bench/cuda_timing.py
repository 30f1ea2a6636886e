"""CUDA-event timing shared by the torch peer scripts (torch_matmul.py, torch_scaled_mm.py): the
median of 7 samples of `iters` calls, eagerly and replayed from one CUDA graph."""
import torch


def median_us(run, iters):
    samples = []
    for _ in range(7):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        run()
        e.record()
        e.synchronize()
        samples.append(s.elapsed_time(e) * 1e3 / iters)
    return sorted(samples)[len(samples) // 2]


def time_us(fn, iters):
    """(eager µs per call, µs per call replayed from a CUDA graph of `iters` calls or None): eager
    includes Python's launch overhead, the graph shows the GPU time."""
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()

    def eager():
        for i in range(iters):
            fn(i)
    us = median_us(eager, iters)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(3):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            eager()
        g.replay()
        torch.cuda.synchronize()
        return us, median_us(g.replay, iters)
    except RuntimeError as e:
        print(f"  no CUDA graph: {str(e).splitlines()[0]}", flush=True)
        return us, None
