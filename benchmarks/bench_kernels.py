"""Benchmark the fused linear + distillation op against what a careful user would run instead.

Per shape (N rows, K hidden width, C teacher width) it times one forward + backward of
  mixed    the headline baseline, the loss as careful mixed-precision training code writes it
           eagerly: the projection in 16 bits (bf16 autocast; for 16-bit inputs their own dtype),
           the loss on it in fp32 (``lowres_kd_kernels.distill_loss_reference``, the loss half of
           the one reference), TF32 matmuls allowed on CUDA
  compile  torch.compile of that same mixed version (skipped, with the error recorded, if it fails)
  fused    the chunked Triton op (lowres_kd_kernels, backend="triton")
  matmul   three plain matmuls with the FLOPs of forward + backward (P = H W^T, P W, P^T H:
           6 N K C), a roofline-ish yardstick
and reports median / p20 / p80 over repeats (after warmup; CUDA events), the median host time to
issue a run (CPU side, no sync: when it is close to the device time, host work bounds the run),
the peak extra GPU memory (torch.cuda.max_memory_allocated minus the memory held once inputs
exist, stats reset before each method; it includes the returned gradients), the accuracy of
each method against the oracle, and the ratios: fused speed-up over mixed eager and over compile,
fused memory / mixed-eager memory (and / compile), and the fused rate as a fraction of the matmul
rate.

The oracle is the reference itself, lowres_kd_kernels.fused_linear_distill_reference, in fp32 with
TF32 off (the loss as it is defined): each method's loss and gradients are compared with it
(relative error, the worst of dH, dW, db). It is not a speed baseline (nobody trains with fp32
GEMMs for bf16 inputs); ``--time-fp32`` also times it, as the row "fp32".

What the fused op keeps in memory: per row chunk of R rows (R * C <= 2^25 elements) one (R, C)
16-bit projection that becomes its gradient in place. At the recipes' shapes (a batch of 32-64
images, 256-1024 tokens each, C <= 1024: N * C <= 2^24) that chunk is the whole (N, C)
projection, in bf16: it is never materialised in fp32 and no fp32 (N, C) temporaries are saved for
backward, which is where the memory ratio comes from. Only above 2^25 elements (here: the
65536-row shapes) does it split into several chunks.

Without CUDA only the mixed version runs (bf16 autocast on the CPU), on tiny shapes: those
timings are of that eager path on CPU, memory is GPU-only (null), and no ratio is computed; the
outputs say so. ``--no-compile`` (or a CPU run) leaves out torch.compile.

``--graphs`` (CUDA) times the GPU side alone, where host work would bound a call (4k rows): the
fused op and the matmuls are captured once in a CUDA graph and replayed, compile runs with
mode="reduce-overhead" (its own CUDA graphs); mixed eager cannot be captured (its mean divides
by a tensor made from a Python number) and is left out.

``--device meta`` times nothing: it counts the peak extra allocation of the fp32 reference, mixed
eager and fused at the GPU shapes on the meta device (``lowres_kd.planner.memtrack.LiveBytes``,
what ``torch.cuda.max_memory_allocated`` counts before the allocator rounds blocks to 512 bytes),
on any machine with Triton installed. Its fp32-reference counts equal those measured on an H200
(``kernels_nvidia-h200.md``, where that row is named "eager"; a test checks all 18 shapes); the
mixed-eager counts are not yet checked against a GPU.

Writes to --out: kernels_<device>.json (rows with device, versions, git sha, shape, dtype,
quantiles, accuracy), kernels_<device>.md (tables with the ratios) and kernels_<device>.png
(ratios per shape).

    python benchmarks/bench_kernels.py --quick            # 3 shapes, on the GPU
    python benchmarks/bench_kernels.py --max-seconds 300  # all 18 shapes that fit in 5 minutes
    python benchmarks/bench_kernels.py --device meta      # memory only, no GPU needed
    python benchmarks/bench_kernels.py --graphs --quick   # GPU time alone, without host work
"""
from __future__ import annotations

import argparse
import contextlib
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

from lowres_kd.planner.memtrack import LiveBytes  # noqa: E402
from lowres_kd.provenance import environment, write_results  # noqa: E402
# the one reference (and its loss half, for the mixed baseline): no second one here
from lowres_kd_kernels import (  # noqa: E402
    distill_loss_reference, fused_linear_distill, fused_linear_distill_reference, triton_usable)

GPU_SHAPES = [(n, k, c) for n, k, c in itertools.product((4096, 16384, 65536), (768, 1024), (768, 1024, 1280))]
QUICK_SHAPES = [(4096, 768, 768), (16384, 1024, 1024), (65536, 1024, 1280)]
CPU_SHAPES = [(128, 48, 64), (256, 64, 96)]
METHODS = ("fp32", "mixed", "compile", "fused", "matmul")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CPU_NOTE = ("CPU run: timings are of the mixed eager path only (bf16 autocast on the CPU; no Triton, no compile, "
            "no ratios); memory is GPU-only")
META_NOTE = ("meta run: no timings; peak extra allocations counted on the meta device (LiveBytes), which "
             "for the fp32 reference equal those measured on an H200 (mixed eager: not yet checked on a GPU)")
CUDA_NOTE = ("baselines: mixed eager (bf16 projection, fp32 loss, TF32 on) and torch.compile of it; the fp32 "
             "reference (TF32 off) is the accuracy oracle")
NOTES = {"cpu": CPU_NOTE, "meta": META_NOTE, "cuda": CUDA_NOTE}
GRAPHS_NOTE = ("CUDA graphs: fused and matmul replay one captured forward + backward, compile is torch.compile "
               "of mixed eager, mode='reduce-overhead'; the times hold no host work; no memory column (graph pools)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output folder")
    p.add_argument("--device", choices=("auto", "cuda", "cpu", "meta"), default="auto",
                   help="auto: cuda when available; cpu runs tiny shapes with mixed eager only; meta counts "
                        "the fp32 reference's, mixed eager's and fused's memory at the GPU shapes, without timing")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of hidden, weight, bias, target")
    p.add_argument("--quick", action="store_true", help=f"GPU: only the shapes {QUICK_SHAPES}")
    p.add_argument("--shapes", nargs="+", metavar="NxKxC", help="explicit shapes, e.g. 4096x768x1024 (overrides --quick)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget: no new shape is started once this many seconds have passed")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per method and shape (compile happens here)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per method and shape")
    p.add_argument("--distance", default="cos_smoothl1", help="distance of the loss")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--time-fp32", action="store_true",
                   help="also time the fp32 reference (row 'fp32'; it is the accuracy oracle either way)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the comparison with the fp32 oracle")
    p.add_argument("--graphs", action="store_true",
                   help="CUDA only: time the GPU side alone; fused and matmul as CUDA graph replays, compile with "
                        "mode='reduce-overhead', no mixed eager (writes kernels_graphs_<device>.*)")
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


def allow_tf32(device: torch.device) -> None:
    """What a careful user sets for training on CUDA: fp32 matmuls may use TF32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")


@contextlib.contextmanager
def full_fp32():
    """TF32 off for the oracle: the loss as it is defined."""
    before, tf32 = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cuda.matmul.allow_tf32 = tf32


def mixed_eager(h, w, b, t, row_weight=None, distance="cos_smoothl1", alpha=0.5, beta=1.0, reduction="mean"):
    """The loss as careful mixed-precision training code writes it: the projection under bf16
    autocast (16-bit inputs stay in their dtype), the loss on it in fp32 through the reference's
    own loss half. Same arguments and result (to 16-bit rounding) as the reference."""
    device = h.device
    low = h.dtype if h.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    cast = (torch.autocast(device.type, dtype=low) if device.type in ("cuda", "cpu") and h.dtype != low
            else contextlib.nullcontext())  # meta has no autocast: its inputs are 16-bit (the default) or stay fp32
    with cast:
        pred = torch.nn.functional.linear(h, w, b)
    return distill_loss_reference(pred, t, row_weight, alpha=alpha, beta=beta, distance=distance, reduction=reduction)


def _fused(*a, **k):
    return fused_linear_distill(*a, **k, backend="triton")


def _loss_fns(device, use_compile, graphs, time_fp32) -> Dict[str, Callable]:
    """The timed losses of this run, by method name (all take the reference's arguments)."""
    if graphs:  # no mixed eager: its scalar tensor made from a Python number cannot be captured
        fns = {}
        if use_compile:
            torch._dynamo.reset()
            fns["compile"] = torch.compile(mixed_eager, mode="reduce-overhead")
        return {**fns, "fused": _fused}
    if device.type == "meta":  # the op's host code: it allocates as on a GPU, launches nothing
        from lowres_kd_kernels.linear_distill import fused_linear_distill_triton

        return {"fp32": fused_linear_distill_reference, "mixed": mixed_eager, "fused": fused_linear_distill_triton}
    fns = {"fp32": fused_linear_distill_reference} if time_fp32 else {}
    fns["mixed"] = mixed_eager
    if device.type != "cuda":
        return fns
    if use_compile:
        torch._dynamo.reset()  # a fresh compile per shape (and no recompile limit across shapes)
        fns["compile"] = torch.compile(mixed_eager)
    fns["fused"] = _fused
    return fns


def _methods(h, w, b, t, distance, device, use_compile, graphs=False, time_fp32=False):
    """(steps, losses): per method a no-argument forward + backward, and the loss function it runs."""
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

    fns = _loss_fns(device, use_compile, graphs, time_fp32)
    steps = {name: step(fn) for name, fn in fns.items()}
    if graphs:
        steps = {name: (graph_replay(fn) if name == "fused" else fn) for name, fn in steps.items()}
    if device.type == "cuda":
        steps["matmul"] = graph_replay(matmul) if graphs else matmul
    return steps, fns


def _loss_and_grads(loss_fn, h, w, b, t, distance):
    for x in (h, w, b):
        x.grad = None
    loss = loss_fn(h, w, b, t, None, distance=distance)
    loss.backward()
    out = [loss.detach().double()] + [x.grad.detach().double().clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    return out


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def accuracy(loss_fn, oracle, h, w, b, t, distance) -> Dict[str, float]:
    """Relative error of the loss and the worst of dH, dW, db against the oracle's."""
    got = _loss_and_grads(loss_fn, h, w, b, t, distance)
    return {"loss_rel_err": _rel_err(got[0], oracle[0]),
            "grad_rel_err": max(_rel_err(g, r) for g, r in zip(got[1:], oracle[1:]))}


def _note(args, device: torch.device) -> Optional[str]:
    """What every row and output file of this run says about how it was measured."""
    return GRAPHS_NOTE if args.graphs else NOTES[device.type]


def bench_shape(shape, dtype, device, args, env) -> List[Dict]:
    n, k, c = shape
    h, w, b, t = _make_inputs(n, k, c, dtype, device)
    flops = 6.0 * n * k * c
    note = _note(args, device)
    oracle = None
    if device.type != "meta" and not args.graphs and not args.no_accuracy:
        with full_fp32():
            oracle = _loss_and_grads(fused_linear_distill_reference, h, w, b, t, args.distance)
    steps, fns = _methods(h, w, b, t, args.distance, device, not args.no_compile, args.graphs, args.time_fp32)
    rows = []
    for name, fn in steps.items():
        row = {**env, "method": name, "N": n, "K": k, "C": c, "dtype": str(dtype).replace("torch.", ""),
               "distance": args.distance, "flops": flops, "error": None}
        if note:
            row["note"] = note
        try:
            if device.type != "meta":
                row.update(_quantiles(*_time(fn, device, args.warmup, args.repeats)))
                row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
            row["peak_extra_mib"] = None if args.graphs else _peak_extra_mib(fn, device, (h, w, b))
            if oracle is not None and name in fns:
                row.update(accuracy(fns[name], oracle, h, w, b, t, args.distance))
        except Exception as exc:  # e.g. torch.compile failing: record it, keep the other methods
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for x in (h, w, b):
            x.grad = None
        rows.append(row)
    return rows


def ratios(rows: List[Dict]) -> List[Dict]:
    """Per shape: fused speed-up over mixed eager and compile, fused memory over theirs (and the
    fp32 reference's, where counted), fused rate / matmul rate."""
    by_shape: Dict[tuple, Dict[str, Dict]] = {}
    for r in rows:
        by_shape.setdefault((r["N"], r["K"], r["C"]), {})[r["method"]] = r

    def ok(m, name):
        r = m.get(name)
        return r if r and not r.get("error") else {}

    def div(a, b):
        return a / b if a is not None and b else None

    out = []
    for (n, k, c), m in by_shape.items():
        f, mx, cp, mm, fp = (ok(m, x) for x in ("fused", "mixed", "compile", "matmul", "fp32"))
        fmem = f.get("peak_extra_mib")
        out.append({
            "N": n, "K": k, "C": c,
            "fused_vs_mixed_speedup": div(mx.get("median_ms"), f.get("median_ms")),
            "fused_vs_compile_speedup": div(cp.get("median_ms"), f.get("median_ms")),
            "fused_over_mixed_memory": div(fmem, mx.get("peak_extra_mib")),
            "fused_over_compile_memory": div(fmem, cp.get("peak_extra_mib")),
            "fused_over_fp32_memory": div(fmem, fp.get("peak_extra_mib")),
            "fused_fraction_of_matmul_rate": div(mm.get("median_ms"), f.get("median_ms")),
            "fused_grad_rel_err": f.get("grad_rel_err"),
            "mixed_grad_rel_err": mx.get("grad_rel_err"),
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
    lines += ["| N | K | C | dtype | method | median ms | p20 ms | p80 ms | host ms | TFLOP/s | peak extra MiB | "
              "loss err vs fp32 | grad err vs fp32 | error |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = (r["error"] or "").replace("|", "/").replace("\n", " ")[:80]
        lines.append(f"| {r['N']} | {r['K']} | {r['C']} | {r['dtype']} | {r['method']} | {_fmt(r.get('median_ms'), '.3f')} | "
                     f"{_fmt(r.get('p20_ms'), '.3f')} | {_fmt(r.get('p80_ms'), '.3f')} | {_fmt(r.get('host_median_ms'), '.3f')} | "
                     f"{_fmt(r.get('tflops'), '.3g')} | {_fmt(r.get('peak_extra_mib'), '.1f')} | "
                     f"{_fmt(r.get('loss_rel_err'), '.1e')} | {_fmt(r.get('grad_rel_err'), '.1e')} | {err} |")
    lines += ["", "Ratios (fused = chunked Triton op; mixed eager = bf16 projection, fp32 loss, TF32 on; compile = "
              "torch.compile of mixed eager; memory = peak extra allocation of one forward + backward; grad err = "
              "worst relative error of dH, dW, db against the fp32 reference with TF32 off):", "",
              "| N | K | C | speed-up vs mixed eager | vs compile | memory / mixed eager | memory / compile | "
              "memory / fp32 ref | fraction of matmul rate | fused grad err | mixed grad err |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rat:
        lines.append(f"| {r['N']} | {r['K']} | {r['C']} | {_fmt(r['fused_vs_mixed_speedup'])} | "
                     f"{_fmt(r['fused_vs_compile_speedup'])} | {_fmt(r['fused_over_mixed_memory'], '.3f')} | "
                     f"{_fmt(r['fused_over_compile_memory'], '.3f')} | {_fmt(r['fused_over_fp32_memory'], '.3f')} | "
                     f"{_fmt(r['fused_fraction_of_matmul_rate'])} | {_fmt(r['fused_grad_rel_err'], '.1e')} | "
                     f"{_fmt(r['mixed_grad_rel_err'], '.1e')} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, env: Dict, rows: List[Dict], rat: List[Dict], note: Optional[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rat) + 2), 4))
    labels = [f"{r['N']}x{r['K']}x{r['C']}" for r in rat]
    if env["device"] == "cpu":  # mixed eager's time only
        mixed = {(r["N"], r["K"], r["C"]): r.get("median_ms") for r in rows if r["method"] == "mixed"}
        ax.bar(labels, [mixed.get((r["N"], r["K"], r["C"])) or 0.0 for r in rat])
        ax.set_ylabel("mixed eager, median ms")
        ax.set_title(f"{env['device_name']}\n{note}", fontsize=8)
    else:
        keys = [("fused_vs_mixed_speedup", "speed-up vs mixed eager"), ("fused_vs_compile_speedup", "speed-up vs compile"),
                ("fused_over_mixed_memory", "memory / mixed eager"), ("fused_over_compile_memory", "memory / compile"),
                ("fused_fraction_of_matmul_rate", "fraction of matmul rate")]
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
    allow_tf32(device)  # the baselines' (and the fused op's) fp32 matmuls, as a careful user runs them
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
        new = bench_shape(shape, dtype, device, args, env)
        rows += new
        for r in new:
            print(f"{r['N']:>6}x{r['K']}x{r['C']} {r['method']:<8} median {_fmt(r.get('median_ms'), '.3f')} ms  "
                  f"peak extra {_fmt(r.get('peak_extra_mib'), '.1f')} MiB  grad err {_fmt(r.get('grad_rel_err'), '.1e')}"
                  + (f"  ERROR {r['error'][:120]}" if r["error"] else ""), flush=True)
    if skipped:
        print(f"--max-seconds {args.max_seconds}: skipped {len(skipped)} shapes: {skipped}")
    rat = ratios(rows)
    result = {"meta": {**env, "note": note, "graphs": args.graphs, "dtype": args.dtype, "warmup": args.warmup,
                       "repeats": args.repeats, "skipped_shapes": skipped,
                       "tf32": device.type == "cuda", "oracle": "fp32 reference, TF32 off", "seconds": time.perf_counter() - t0},
              "rows": rows, "ratios": rat}
    write_results(args.out, "kernels_graphs" if args.graphs else "kernels", env, result,
                  lambda path: write_markdown(path, env, rows, rat, note), lambda path: write_plot(path, env, rows, rat, note))
    return result


if __name__ == "__main__":
    main()
