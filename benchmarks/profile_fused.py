"""Where the time of one fused forward+backward goes (CUDA): torch.profiler's tables for the fused
op and the eager reference at one shape, by GPU time (what the kernels cost) and by host time (what
issuing them costs: at 4k rows this bounds the op). A diagnostic for tuning, not a benchmark."""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from lowres_kd_kernels import fused_linear_distill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="65536x1024x1280", help="NxKxC")
    parser.add_argument("--rows", type=int, default=15, help="table rows per method")
    args = parser.parse_args()
    n, k, c = map(int, args.shape.split("x"))
    dev, dt = torch.device("cuda"), torch.bfloat16
    h = torch.randn(n, k, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(c, k, device=dev, dtype=dt) / k**0.5).requires_grad_()
    b = torch.zeros(c, device=dev, dtype=dt, requires_grad=True)
    t = torch.randn(n, c, device=dev, dtype=dt)
    for backend in ("triton", "torch"):
        def step():  # as the benchmark runs it: fresh gradients each time, no accumulation
            for x in (h, w, b):
                x.grad = None
            fused_linear_distill(h, w, b, t, backend=backend).backward()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        for key in ("cuda_time_total", "self_cpu_time_total"):
            print(f"== {backend} {args.shape} (5 steps), by {key}")
            print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
