"""Sweep the fused op's row kernel over its tilings, to tune it on a GPU in one run.

The fused op's time beyond its three matmuls is the row kernel (P and T read, dP written: a
memory-bound pass), and its tiling (elements per tile, rows per program) was chosen from compiled
register counts, not from timings. For each teacher width C this times the row kernel alone on
one chunk of a real run (the rows ``default_chunk_rows`` gives for --rows), at every tiling of
--tiles x --rows-per-program (tilings that come out the same are run once), against a yardstick
that moves the same bytes: ``torch.add(P, T, out=P)`` (P and T read, P written). Before timing,
each tiling's loss and dP are checked against the autograd gradient of the registered distance
(fp32, on the same device); a tiling that disagrees is reported and not timed.

Writes rows_<device>.json / .md / .png under --out: per tiling the median time, the bandwidth
it reaches and its fraction of the yardstick's; the op's current default tiling is marked.
On CPU (``TRITON_INTERPRET=1``) it runs small sizes through the interpreter: the correctness
checks are real, the timings are not of any GPU.

    python benchmarks/tune_rows.py                  # GPU: C in 768 1024 1280, N = 65536
    TRITON_INTERPRET=1 python benchmarks/tune_rows.py --device cpu
"""
from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):  # the repository (lowres_kd) and bench_kernels, from any working directory
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_kernels import DTYPES, _fmt, _time, graph_replay  # noqa: E402
from lowres_kd_kernels import get_distance, linear_distill as ld, triton_usable  # noqa: E402
from lowres_kd.provenance import environment, write_results  # noqa: E402

ALPHA, BETA = 0.5, 1.0  # the distance's defaults (DESIGN 2.3)
GRAPHED = 10  # launches per CUDA graph replay
CPU_NOTE = "CPU run (Triton interpreter): the correctness checks are real, the timings are not of a GPU"
# (rows, widths, tiles, rows per program) when the command line does not say
DEFAULTS = {"cuda": (65536, (768, 1024, 1280), (1024, 2048, 4096, 8192), (8, 32, 128)),
            "cpu": (96, (40, 130), (256, 1024), (8, 32))}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="cpu runs the interpreter on small sizes (needs TRITON_INTERPRET=1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of P (the chunk's projection)")
    p.add_argument("--rows", type=int, help="rows of the whole batch; one chunk of them is timed (GPU 65536, CPU 96)")
    p.add_argument("--widths", type=int, nargs="+", help="teacher widths C (GPU 768 1024 1280)")
    p.add_argument("--tiles", type=int, nargs="+", help="elements per tile, powers of two (GPU 1024 ... 8192)")
    p.add_argument("--rows-per-program", type=int, nargs="+", help="rows each program loops over (GPU 8 32 128)")
    p.add_argument("--distance", default="cos_smoothl1", choices=sorted(ld._KERNEL_DISTANCES), help="row distance")
    p.add_argument("--warmup", type=int, default=3, help="untimed launches per tiling (compiling happens here)")
    p.add_argument("--repeats", type=int, default=30, help="timed launches per tiling")
    return p


def _launcher(p, t, dist, tiling, fold: bool):
    """(launch, table): the row kernel over all rows of P as a mean's forward runs it (dP written
    in place, bias column sums and the loss added to the table)."""
    table = torch.zeros(tiling.programs, p.shape[1] + 1, dtype=torch.float32, device=p.device)

    def launch():
        ld._launch_rows(p, t, None, None, None, table, dist, tiling, norm=1.0 / p.shape[0], fold=fold,
                        write_grad=True, col_sums=True)

    return launch, table


def _check(tiling, p_ref, t, dist, distance, fold: bool) -> float:
    """Largest error of one launch's loss, dP and bias column sums against fp32 autograd of the
    distance's mean, relative to the largest reference value (inf if anything is NaN). Without
    ``fold`` (fp16, as the op does it) dP is the gradient of the sum, not of the mean."""
    p = p_ref.clone()
    launch, table = _launcher(p, t, dist, tiling, fold)
    launch()
    pred = p_ref.to(torch.float32, copy=True).requires_grad_()  # a copy: fp32 p_ref must stay a plain leaf
    loss = get_distance(distance)(pred, t.float(), alpha=ALPHA, beta=BETA).mean()
    loss.backward()
    grad = pred.grad if fold else pred.grad * p.shape[0]
    sums, ref_loss = table.sum(0), loss.item()
    errors = [((p.float() - grad).abs().max() / grad.abs().max().clamp_min(1e-30)).item(),
              ((sums[:-1] - grad.sum(0)).abs().max() / grad.sum(0).abs().max().clamp_min(1e-30)).item(),
              abs(sums[-1].item() - ref_loss) / max(abs(ref_loss), 1e-30)]
    return math.inf if any(math.isnan(e) for e in errors) else max(errors)


def _device_ms(fn, device, args) -> Tuple[float, str]:
    """Median device ms of one ``fn()``. On CUDA, GRAPHED calls are captured in a CUDA graph and
    replayed, so that issuing the launches (Triton's host code, tens of microseconds) cannot hide
    a kernel of similar length; where capture fails, plain launches are timed and the row says so."""
    if device.type == "cuda":
        def calls():
            for _ in range(GRAPHED):
                fn()

        try:
            ms, _ = _time(graph_replay(calls, args.warmup), device, 1, args.repeats)
            return statistics.median(ms) / GRAPHED, "graph"
        except Exception as exc:  # noqa: BLE001 - fall back to plain launches, recorded in the row
            print(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); timing plain launches")
    ms, _ = _time(fn, device, args.warmup, args.repeats)
    return statistics.median(ms), "launches"


def sweep_width(n_cols, args, device, dtype) -> List[Dict]:
    rows = ld.default_chunk_rows(args.rows, n_cols)
    g = torch.Generator(device="cpu").manual_seed(n_cols)
    p_ref = torch.randn(rows, n_cols, generator=g).to(device, dtype)
    t = torch.randn(rows, n_cols, generator=g).to(device, dtype)
    dist = ld._distance(args.distance, ALPHA, BETA)
    fold = ld.folds_norm(dtype)  # as the op runs it
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # dP is stored in the input dtype
    default = ld._tiling(rows, n_cols, device.type, None)
    bytes_moved = 3 * p_ref.numel() * p_ref.element_size()

    p_add = p_ref.clone()
    add_ms, add_how = _device_ms(lambda: torch.add(p_add, t, out=p_add), device, args)
    results, seen = [], set()
    for tile, rpp in itertools.product(args.tiles, args.rows_per_program):
        tiling = ld._tiling(rows, n_cols, device.type, None, tile=tile, rows_per_program=rpp)
        if tiling in seen:
            continue
        seen.add(tiling)
        row = {"C": n_cols, "rows": rows, "tile": tiling.block_m * tiling.block_c, "rows_per_program": rpp,
               **tiling._asdict(), "default": tiling == default, "yardstick_ms": add_ms, "error": None}
        row["max_rel_err"] = err = _check(tiling, p_ref, t, dist, args.distance, fold)
        if not err <= tol:
            row["error"] = f"disagrees with the fp32 reference: relative error {err:.3g} > {tol}"
        else:
            launch, _ = _launcher(p_ref.clone(), t, dist, tiling, fold)
            ms, how = _device_ms(launch, device, args)
            row.update(median_ms=ms, timed_as=how if how == add_how else f"{how} (yardstick: {add_how})",
                       gb_per_s=bytes_moved / (ms * 1e-3) / 1e9, fraction_of_yardstick=add_ms / ms)
        results.append(row)
        print(f"C={n_cols} tile {row['tile']:>5} rows/program {rpp:>4} -> block {tiling.block_m}x{tiling.block_c}, "
              f"{tiling.num_warps} warps, {tiling.programs} programs: "
              + (row["error"] or f"{row['median_ms'] * 1e3:.1f} us, {row['fraction_of_yardstick']:.2f} of add")
              + (" (default)" if row["default"] else ""))
    return results


def write_markdown(path: Path, env: Dict, rows: List[Dict], note: Optional[str]):
    lines = [f"# Row kernel tilings ({env['device_name']})", "",
             f"torch {env['torch']}, triton {env['triton']}, git {env['git_sha']}; one chunk of the batch; "
             "yardstick: torch.add(P, T, out=P), the same bytes moved", ""]
    if note:
        lines += [f"**{note}.**", ""]
    lines += ["| C | rows | tile | rows/program | block | warps | programs | median us | GB/s | of yardstick | "
              "max rel. error | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        us = None if r.get("median_ms") is None else r["median_ms"] * 1e3
        note_col = "; ".join(x for x in ("default" if r["default"] else "", r["error"] or "") if x)
        lines.append(f"| {r['C']} | {r['rows']} | {r['tile']} | {r['rows_per_program']} | {r['block_m']}x{r['block_c']} | "
                     f"{r['num_warps']} | {r['programs']} | {_fmt(us, '.1f')} | {_fmt(r.get('gb_per_s'), '.0f')} | "
                     f"{_fmt(r.get('fraction_of_yardstick'))} | {r['max_rel_err']:.1e} | {note_col} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, env: Dict, rows: List[Dict], note: Optional[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 4))
    labels = [f"C{r['C']} t{r['tile']} r{r['rows_per_program']}" + (" *" if r["default"] else "") for r in rows]
    ax.bar(labels, [r.get("fraction_of_yardstick") or 0.0 for r in rows],
           color=["tab:orange" if r["default"] else "tab:blue" for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("yardstick time / kernel time")
    ax.set_title(f"row kernel tilings, {env['device_name']} (* = default)" + (f"\n{note}" if note else ""), fontsize=8)
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = _parser().parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    ok, why = triton_usable()
    if not ok:
        raise SystemExit(f"the row kernel needs Triton: {why}")
    n, widths, tiles, rpps = DEFAULTS[device.type]
    args.rows, args.widths = args.rows or n, args.widths or widths
    args.tiles, args.rows_per_program = args.tiles or tiles, args.rows_per_program or rpps
    for name, values in (("rows", [args.rows]), ("widths", args.widths), ("rows-per-program", args.rows_per_program)):
        if min(values) < 1:
            raise SystemExit(f"--{name}: values must be positive, got {values}")
    bad = [t for t in args.tiles if t < 1 or t & (t - 1)]
    if bad:
        raise SystemExit(f"--tiles: {bad} are not positive powers of two")
    dtype = DTYPES[args.dtype]
    env = environment(device, HERE.parent, modules=("triton",))
    note = CPU_NOTE if device.type == "cpu" else None
    if note:
        print(note)
    t0 = time.perf_counter()
    rows = [r for c in args.widths for r in sweep_width(c, args, device, dtype)]
    result = {"meta": {**env, "note": note, "dtype": args.dtype, "distance": args.distance, "batch_rows": args.rows,
                       "warmup": args.warmup, "repeats": args.repeats, "seconds": time.perf_counter() - t0},
              "rows": rows}
    write_results(args.out, "rows", env, result, lambda path: write_markdown(path, env, rows, note),
                  lambda path: write_plot(path, env, rows, note))
    return result


if __name__ == "__main__":
    main()
