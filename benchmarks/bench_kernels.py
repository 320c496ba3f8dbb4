"""Benchmark the fused linear + distillation op against the plain PyTorch baseline.

Per shape (N rows, K hidden width, C teacher width) it times one forward + backward of
  eager    the one reference, lowres_kd.losses.fused_linear_distill_reference (fp32 maths,
           as the loss is defined: fp32 GEMMs for 16-bit inputs)
  mixed    the same loss as a training loop would write it eagerly: the projection in the input
           dtype (16-bit cuBLAS), the registered distance on its fp32 copy (GPU only)
  compile  torch.compile of that same reference (skipped, with the error recorded, if it fails)
  fused    the chunked Triton op (lowres_kd.kernels, backend="triton")
  matmul   three plain matmuls with the FLOPs of forward + backward (P = H W^T, P W, P^T H:
           6 N K C), a roofline-ish yardstick
and reports median / p20 / p80 over repeats (after warmup; CUDA events), the median host time to
issue a run (CPU side, no sync: when it is close to the device time, host work bounds the run),
the peak extra GPU memory
(torch.cuda.max_memory_allocated minus the memory held once inputs exist, stats reset before
each method; it includes the returned gradients), and the ratios: fused speed-up over eager,
mixed and compile, fused memory / eager memory, and the fused rate as a fraction of the matmul
rate.

Without CUDA only the eager reference runs, on tiny shapes: those timings are of the reference
path on CPU, memory is GPU-only (null), and no ratio is computed; the outputs say so.

``--graphs`` (CUDA) times the GPU side alone, where host work would bound a call (4k rows): the
fused op and the matmuls are captured once in a CUDA graph and replayed, compile runs with
mode="reduce-overhead" (its own CUDA graphs); eager cannot be captured and is left out.

``--device meta`` times nothing: it counts the peak extra allocation of eager and fused at the GPU
shapes on the meta device (``lowres_kd.planner.memtrack.LiveBytes``, what
``torch.cuda.max_memory_allocated`` counts before the allocator rounds blocks to 512 bytes), on
any machine with Triton installed. Its eager counts equal those measured on an H200 (``kernels_nvidia-h200.md``; a test
checks all 18 shapes), so its memory ratio stands for the GPU's where no GPU was at hand.

Writes to --out: kernels_<device>.json (rows with device, versions, git sha, shape, dtype,
quantiles), kernels_<device>.md (table with the ratios) and kernels_<device>.png (ratios per shape).

    python benchmarks/bench_kernels.py --quick            # 3 shapes, on the GPU
    python benchmarks/bench_kernels.py --max-seconds 300  # all 18 shapes that fit in 5 minutes
    python benchmarks/bench_kernels.py --device meta      # memory only, no GPU needed
    python benchmarks/bench_kernels.py --graphs --quick   # GPU time alone, without host work
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from lowres_kd.kernels import fused_linear_distill, triton_usable
from lowres_kd.planner.memtrack import LiveBytes  # noqa: E402
from lowres_kd.provenance import environment, write_results  # noqa: E402
from lowres_kd.losses import DISTANCES, fused_linear_distill_reference  # the one reference: no second one here

GPU_SHAPES = [(n, k, c) for n, k, c in itertools.product((4096, 16384, 65536), (768, 1024), (768, 1024, 1280))]
QUICK_SHAPES = [(4096, 768, 768), (16384, 1024, 1024), (65536, 1024, 1280)]
CPU_SHAPES = [(128, 48, 64), (256, 64, 96)]
METHODS = ("eager", "mixed", "compile", "fused", "matmul")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CPU_NOTE = "CPU run: timings are of the eager reference path only (no Triton, no ratios); memory is GPU-only"
META_NOTE = ("meta run: no timings; peak extra allocations counted on the meta device (LiveBytes), which "
             "for eager equal those measured on an H200")
NOTES = {"cpu": CPU_NOTE, "meta": META_NOTE, "cuda": None}
GRAPHS_NOTE = ("CUDA graphs: fused and matmul replay one captured forward + backward, compile is torch.compile "
               "mode='reduce-overhead'; the times hold no host work; no memory column (graph pools)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].rstrip(".") + ". Times forward+backward of the eager reference (fp32), "
        "a mixed-precision eager version (GPU), torch.compile(reference), the fused Triton op and a 3-matmul "
        "yardstick; writes JSON, Markdown and PNG.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output folder")
    p.add_argument("--device", choices=("auto", "cuda", "cpu", "meta"), default="auto",
                   help="auto: cuda when available; cpu runs tiny shapes with the reference only; meta counts "
                        "eager's and fused's memory at the GPU shapes, without timing")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of hidden, weight, bias, target")
    p.add_argument("--quick", action="store_true", help=f"GPU: only the shapes {QUICK_SHAPES}")
    p.add_argument("--shapes", nargs="+", metavar="NxKxC", help="explicit shapes, e.g. 4096x768x1024 (overrides --quick)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget: no new shape is started once this many seconds have passed")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per method and shape (compile happens here)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per method and shape")
    p.add_argument("--distance", default="cos_smoothl1", help="distance of the loss")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--graphs", action="store_true",
                   help="CUDA only: time the GPU side alone; fused and matmul as CUDA graph replays, compile with "
                        "mode='reduce-overhead', no eager (writes kernels_graphs_<device>.*)")
    return p


# ------------------------------------------------------------------------------ environment
def _env(device: torch.device) -> Dict:
    return environment(device, REPO, modules=("triton",))


# ------------------------------------------------------------------------------ measuring
def _quantiles(ms: List[float], host_ms: List[float]) -> Dict[str, float]:
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
    return {"median_ms": statistics.median(ms), "p20_ms": q[1], "p80_ms": q[7], "repeats": len(ms),
            "host_median_ms": statistics.median(host_ms)}


def _time(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int):
    """(device ms, host ms) per run. Host ms is the CPU time to issue the run (no sync on CUDA): a
    device time close to it means the run is bound by host work, not by the GPU. On CPU both are
    the wall time."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None
              for _ in range(repeats)]
    if cuda:
        torch.cuda.synchronize(device)
    host = []
    for pair in events:
        t0 = time.perf_counter()
        if pair:
            pair[0].record()
        fn()
        if pair:
            pair[1].record()
        host.append((time.perf_counter() - t0) * 1e3)
    if not cuda:
        return host, host
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events], host


def _peak_extra_mib(fn: Callable[[], None], device: torch.device, leaves) -> Optional[float]:
    for x in leaves:  # gradients of earlier runs would otherwise sit in the baseline
        x.grad = None
    if device.type == "meta":
        with LiveBytes() as live:
            fn()
        return live.peak / 2**20
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def graph_replay(fn: Callable[[], None], warmup: int = 3) -> Callable[[], None]:
    """A callable that replays ``fn`` captured in a CUDA graph. The capture happens on the first
    call, after ``warmup`` runs on a side stream (as PyTorch's whole-network capture does), so that
    a capture error surfaces where the benchmark records errors."""
    captured = []

    def replay():
        if not captured:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            captured.append(graph)
        captured[0].replay()

    return replay


def _make_inputs(n, k, c, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(n, k, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(c, k, generator=g) / k**0.5).to(device, dtype).requires_grad_()
    b = (0.1 * torch.randn(c, generator=g)).to(device, dtype).requires_grad_()
    t = torch.randn(n, c, generator=g).to(device, dtype)
    return h, w, b, t


def mixed_eager(h, w, b, t, row_weight, distance):
    """The loss as eager training code writes it: projection in the input dtype, distance in fp32.
    (Same arguments as the reference; the benchmark passes no row weights.)"""
    if row_weight is not None:
        raise ValueError("mixed_eager takes no row weights")
    pred = torch.nn.functional.linear(h, w, b)
    return DISTANCES.get(distance)(pred.float(), t.float()).mean()


def _methods(h, w, b, t, distance, device, use_compile, graphs=False) -> Dict[str, Callable[[], None]]:
    leaves = (h, w, b)

    def step(loss_fn):
        def run():
            for x in leaves:
                x.grad = None
            loss_fn(h, w, b, t, None, distance=distance).backward()
        return run

    hd, wd = h.detach(), w.detach()

    def matmul():
        p = hd @ wd.T
        p @ wd
        p.T @ hd

    fused = step(lambda *a, **k: fused_linear_distill(*a, **k, backend="triton"))
    if graphs:  # no eager: its scalar tensor made from a Python number cannot be captured
        ms = {}
        if use_compile:
            torch._dynamo.reset()
            ms["compile"] = step(torch.compile(fused_linear_distill_reference, mode="reduce-overhead"))
        return {**ms, "fused": graph_replay(fused), "matmul": graph_replay(matmul)}
    ms: Dict[str, Callable[[], None]] = {"eager": step(fused_linear_distill_reference)}
    if device.type == "meta":  # the op's host code: it allocates as on a GPU, launches nothing
        from lowres_kd.kernels.linear_distill import fused_linear_distill_triton

        return {**ms, "fused": step(fused_linear_distill_triton)}
    if device.type != "cuda":
        return ms
    ms["mixed"] = step(mixed_eager)
    if use_compile:
        torch._dynamo.reset()  # a fresh compile per shape (and no recompile limit across shapes)
        ms["compile"] = step(torch.compile(fused_linear_distill_reference))
    ms["fused"] = fused
    ms["matmul"] = matmul
    return ms


def _note(args, device: torch.device) -> Optional[str]:
    """What every row and output file of this run says about how it was measured."""
    return GRAPHS_NOTE if args.graphs else NOTES[device.type]


def bench_shape(shape, dtype, device, args, env) -> List[Dict]:
    n, k, c = shape
    h, w, b, t = _make_inputs(n, k, c, dtype, device)
    flops = 6.0 * n * k * c
    note = _note(args, device)
    rows = []
    for name, fn in _methods(h, w, b, t, args.distance, device, not args.no_compile, args.graphs).items():
        row = {**env, "method": name, "N": n, "K": k, "C": c, "dtype": str(dtype).replace("torch.", ""),
               "distance": args.distance, "flops": flops, "error": None}
        if note:
            row["note"] = note
        try:
            if device.type != "meta":
                row.update(_quantiles(*_time(fn, device, args.warmup, args.repeats)))
                row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
            row["peak_extra_mib"] = None if args.graphs else _peak_extra_mib(fn, device, (h, w, b))
        except Exception as exc:  # e.g. torch.compile failing: record it, keep the other methods
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for x in (h, w, b):
            x.grad = None
        rows.append(row)
    return rows


def ratios(rows: List[Dict]) -> List[Dict]:
    """Per shape: fused vs eager / compile speed-up, fused / eager memory, fused rate / matmul rate."""
    by_shape: Dict[tuple, Dict[str, Dict]] = {}
    for r in rows:
        by_shape.setdefault((r["N"], r["K"], r["C"]), {})[r["method"]] = r

    def med(m, name):
        r = m.get(name)
        return r.get("median_ms") if r and not r.get("error") else None

    out = []
    for (n, k, c), m in by_shape.items():
        f, e, mx, cp, mm = med(m, "fused"), med(m, "eager"), med(m, "mixed"), med(m, "compile"), med(m, "matmul")
        fm = m.get("fused", {}).get("peak_extra_mib")
        em = m.get("eager", {}).get("peak_extra_mib")
        out.append({
            "N": n, "K": k, "C": c,
            "fused_vs_eager_speedup": e / f if e and f else None,
            "fused_vs_mixed_speedup": mx / f if mx and f else None,
            "fused_vs_compile_speedup": cp / f if cp and f else None,
            "fused_over_eager_memory": fm / em if fm is not None and em else None,
            "fused_fraction_of_matmul_rate": mm / f if mm and f else None,
        })
    return out


# ------------------------------------------------------------------------------ writing
def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def write_markdown(path: Path, env: Dict, rows: List[Dict], rat: List[Dict], note: Optional[str]):
    lines = [f"# Fused linear + distillation: forward + backward ({env['device_name']})", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, git {env['git_sha']}", ""]
    if note:
        lines += [f"**{note}.**", ""]
    lines += ["| N | K | C | dtype | method | median ms | p20 ms | p80 ms | host ms | TFLOP/s | peak extra MiB | error |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = (r["error"] or "").replace("|", "/").replace("\n", " ")[:80]
        lines.append(f"| {r['N']} | {r['K']} | {r['C']} | {r['dtype']} | {r['method']} | {_fmt(r.get('median_ms'), '.3f')} | "
                     f"{_fmt(r.get('p20_ms'), '.3f')} | {_fmt(r.get('p80_ms'), '.3f')} | {_fmt(r.get('host_median_ms'), '.3f')} | "
                     f"{_fmt(r.get('tflops'), '.3g')} | "
                     f"{_fmt(r.get('peak_extra_mib'), '.1f')} | {err} |")
    lines += ["", "Ratios (fused = chunked Triton op; eager = the fp32 reference; mixed eager = 16-bit projection, "
              "fp32 distance; memory = peak extra allocation of one forward + backward):", "",
              "| N | K | C | speed-up vs eager | vs mixed eager | vs compile | memory / eager | fraction of matmul rate |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rat:
        lines.append(f"| {r['N']} | {r['K']} | {r['C']} | {_fmt(r['fused_vs_eager_speedup'])} | "
                     f"{_fmt(r.get('fused_vs_mixed_speedup'))} | {_fmt(r['fused_vs_compile_speedup'])} | {_fmt(r['fused_over_eager_memory'], '.3f')} | "
                     f"{_fmt(r['fused_fraction_of_matmul_rate'])} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, env: Dict, rows: List[Dict], rat: List[Dict], note: Optional[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rat) + 2), 4))
    labels = [f"{r['N']}x{r['K']}x{r['C']}" for r in rat]
    if env["device"] == "cpu":  # the reference's time only
        eager = {(r["N"], r["K"], r["C"]): r.get("median_ms") for r in rows if r["method"] == "eager"}
        ax.bar(labels, [eager.get((r["N"], r["K"], r["C"])) or 0.0 for r in rat])
        ax.set_ylabel("eager reference, median ms")
        ax.set_title(f"{env['device_name']}\n{note}", fontsize=8)
    else:
        keys = [("fused_vs_eager_speedup", "speed-up vs eager"), ("fused_vs_mixed_speedup", "speed-up vs mixed eager"),
                ("fused_vs_compile_speedup", "speed-up vs compile"),
                ("fused_over_eager_memory", "memory / eager"), ("fused_fraction_of_matmul_rate", "fraction of matmul rate")]
        keys = [(key, label) for key, label in keys if any(r.get(key) is not None for r in rat)]  # meta: memory only
        width = 0.8 / len(keys)
        for i, (key, label) in enumerate(keys):
            ax.bar([x + (i - (len(keys) - 1) / 2) * width for x in range(len(rat))], [r.get(key) or 0.0 for r in rat],
                   width, label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(rat)), labels)
        ax.set_ylabel("ratio")
        ax.legend(fontsize=8)
        ax.set_title(f"fused linear + distill, fwd+bwd, {env['device_name']}" + (f"\n{note}" if note else ""), fontsize=8)
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_shapes(items: List[str]):
    shapes = []
    for s in items:
        parts = s.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--shapes: {s!r} is not NxKxC with positive integers")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def main(argv: Optional[List[str]] = None) -> Dict:
    args = _parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        ok, why = triton_usable()
        if not ok:
            raise SystemExit(f"the fused op needs Triton: {why}")
    if args.graphs and device.type != "cuda":
        raise SystemExit("--graphs needs a CUDA device")
    if device.type == "meta" and importlib.util.find_spec("triton") is None:
        raise SystemExit("--device meta runs the fused op's host code, which needs Triton (the 'gpu' extra)")
    dtype = DTYPES[args.dtype]
    env = _env(device)
    note = _note(args, device)
    if args.shapes:
        shapes = _parse_shapes(args.shapes)
    elif device.type == "cpu":
        shapes = CPU_SHAPES
    else:
        shapes = QUICK_SHAPES if args.quick else GPU_SHAPES
    if note:
        print(note)
    t0 = time.perf_counter()
    rows: List[Dict] = []
    skipped = []
    for shape in shapes:
        if args.max_seconds is not None and time.perf_counter() - t0 > args.max_seconds:
            skipped.append(shape)
            continue
        rows += bench_shape(shape, dtype, device, args, env)
        for r in rows[-len(METHODS):]:
            if (r["N"], r["K"], r["C"]) == shape:
                print(f"{r['N']:>6}x{r['K']}x{r['C']} {r['method']:<8} median {_fmt(r.get('median_ms'), '.3f')} ms  "
                      f"peak extra {_fmt(r.get('peak_extra_mib'), '.1f')} MiB" + (f"  ERROR {r['error'][:120]}" if r["error"] else ""))
    if skipped:
        print(f"--max-seconds {args.max_seconds}: skipped {len(skipped)} shapes: {skipped}")
    rat = ratios(rows)
    result = {"meta": {**env, "note": note, "graphs": args.graphs, "dtype": args.dtype, "warmup": args.warmup,
                       "repeats": args.repeats, "skipped_shapes": skipped, "seconds": time.perf_counter() - t0},
              "rows": rows, "ratios": rat}
    write_results(args.out, "kernels_graphs" if args.graphs else "kernels", env, result,
                  lambda path: write_markdown(path, env, rows, rat, note), lambda path: write_plot(path, env, rows, rat, note))
    return result


if __name__ == "__main__":
    main()
