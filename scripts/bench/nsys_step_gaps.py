#!/usr/bin/env python3
"""Where the time of a decode step goes between kernels, from an Nsight Systems trace.

    nsys profile -t cuda --cuda-graph-trace=node -o prof ./lorq bench decode ... --batch-sizes 1
    nsys stats --report cuda_gpu_trace --format csv --output trace prof.nsys-rep
    python3 scripts/bench/nsys_step_gaps.py trace_cuda_gpu_trace.csv [--boundary argmax_rows]

A step is the kernels from one `--boundary` kernel (the greedy argmax that ends every step) to the
next. For the last `--steps` steps: wall time (first kernel start to boundary end), time with a
kernel running, the idle rest, the kernel count, and the summed idle time before each kernel
name (the launch gap the kernel waited for) and the kernel time per name over those steps.
"""
import argparse
import collections
import csv


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--boundary", default="argmax_rows")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    rows = []
    with open(a.trace) as f:
        for r in csv.DictReader(f):
            name = r.get("Name", "")
            start = r.get("Start (ns)")
            dur = r.get("Duration (ns)")
            if not start or not dur or "[CUDA mem" in name:
                continue
            rows.append((int(start), int(dur), name))
    rows.sort()
    ends = [i for i, r in enumerate(rows) if a.boundary in r[2]]
    if len(ends) < 2:
        raise SystemExit(f"fewer than two '{a.boundary}' kernels in {a.trace}")
    gap_by_name = collections.Counter()
    count_by_name = collections.Counter()
    dur_by_name = collections.Counter()
    steps = list(zip(ends[:-1], ends[1:]))[-a.steps:]
    for i0, i1 in steps:
        ks = rows[i0 + 1 : i1 + 1]
        t0 = ks[0][0]
        t_end = ks[-1][0] + ks[-1][1]
        busy = 0
        cursor = t0
        for s, d, name in ks:
            if s > cursor:
                gap_by_name[short(name)] += s - cursor
            busy += max(0, s + d - max(s, cursor))
            cursor = max(cursor, s + d)
            count_by_name[short(name)] += 1
            dur_by_name[short(name)] += d
        wall = t_end - t0
        print(f"step: wall {wall / 1e3:.1f} us, kernels busy {busy / 1e3:.1f} us, "
              f"idle {(wall - busy) / 1e3:.1f} us, {len(ks)} kernels")
    n = len(steps)
    print(f"\nidle before each kernel, summed per step (mean of {n} steps):")
    for name, g in gap_by_name.most_common(a.top):
        print(f"  {g / n / 1e3:8.1f} us over {count_by_name[name] / n:5.0f} launches  {name}")
    print(f"\nkernel time per step by name (mean of {n} steps):")
    for name, d in dur_by_name.most_common(a.top):
        print(f"  {d / n / 1e3:8.1f} us over {count_by_name[name] / n:5.0f} launches  {name}")


def short(name):
    return name.split("(")[0][:80]


if __name__ == "__main__":
    main()
