"""Benchmark low-memory teachers: bits 16 / 8 / 4 x offload off / on, against the plain teacher.

Teachers: ViT-S/B/L-shaped timm models with random weights (seed 0; the numbers that matter here,
bytes and speed, do not depend on the weights; fidelity does: a random ViT is not a pretrained one) and the real
shipped MobileNetV2 / EfficientNet-Lite0. Per teacher and variant it reports

  weight bytes       every distinct tensor of the teacher, quantization state included, and its
                     ratio to the fp32 teacher (targets: int8 <= 0.3x, nf4 <= 0.18x)
  device bytes       weight bytes kept on the device between forwards (offload: outside the
                     block list) and the most block bytes staged at once during a forward
  peak memory        GPU: torch.cuda.max_memory_allocated during one forward, minus what was
                     allocated before the variant was built (weights + activations + staged
                     blocks). CPU: the rise of the process's peak RSS (VmHWM, reset through
                     /proc/self/clear_refs) during one forward over the RSS before the variant
                     was built: approximate (the allocator keeps freed memory), and on CPU an
                     offloaded block's "device copy" is a second CPU copy, so offload cannot
                     save memory there
  images/s           median over --repeats timed forwards (after --warmup), with p20 / p80
  fidelity           cosine (global rows, dense tokens) and relative error vs the fp32 teacher
                     on the same images (real photos; targets on ViTs: int8 >= 0.99, nf4 >= 0.97)

and ratios against the baseline from the same run: the plain fp32 teacher on CPU, the plain bf16
teacher (weights cast, bf16 inputs) on the GPU. bits=16 means "not quantized" (weights as stored,
fp32). Targets are reported as met / missed, never enforced.

Without CUDA the defaults are small: ViT-S and ViT-B only, batch 2 at 224 px, two timed repeats,
and --max-seconds stops starting new teachers/variants once spent.

Shipped real ViT (``--shipped-vit dinov2``): a hook for the real DINOv2 ViT-S/14 that ships inside
a package (family ``dinov2`` with ``weights: shipped``, being added beside this script). When that
family is registered with shipped weights and its package is installed, it is benchmarked like
the others (its cosine is then a real teacher's, unlike the random ViTs'); otherwise one row says
why it was skipped and the rest runs on.

Writes to --out: teachers_<device>.json (rows with device, versions, git sha), teachers_<device>.md
(table + targets) and teachers_<device>.png (weight ratio, speed, cosine per variant).

    python benchmarks/bench_teachers.py                          # all defaults for this machine
    python benchmarks/bench_teachers.py --teachers vit_small_patch16_224 --bits 16 4 --img 112
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from lowres_kd.config import TeacherConfig  # noqa: E402
from lowres_kd.provenance import environment, write_results  # noqa: E402
from lowres_kd.lowmem import enable_offload, quantize_teacher, teacher_fidelity, tensor_bytes  # noqa: E402
from lowres_kd.teachers import TEACHERS, Features, build_teacher, ships_weights  # noqa: E402

GPU_TEACHERS = ["vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224", "mobilenet_v2", "efficientnet_lite0"]
CPU_TEACHERS = ["vit_small_patch16_224", "vit_base_patch16_224", "mobilenet_v2", "efficientnet_lite0"]
WEIGHT_TARGET = {8: 0.30, 4: 0.18}  # of fp32 bytes
COS_TARGET = {8: 0.99, 4: 0.97}  # on ViT teachers
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field", "immunohistochemistry", "coins")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output folder (default: benchmarks/results)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto (default): cuda when available")
    p.add_argument("--teachers", nargs="+", default=None,
                   help=f"registered families ({', '.join(n for n in TEACHERS.list() if ships_weights(n))}: shipped weights) "
                   f"or timm model names (random weights). Default: GPU {GPU_TEACHERS}; CPU {CPU_TEACHERS}")
    p.add_argument("--bits", nargs="+", type=int, default=[16, 8, 4], choices=(16, 8, 4),
                   help="bit widths, 16 = not quantized (default: 16 8 4)")
    p.add_argument("--offload", nargs="+", default=["off", "on"], choices=("off", "on"),
                   help="block offloading off / on (default: both)")
    p.add_argument("--img", type=int, default=224, help="input size in px; ViTs are built at this size (default: 224)")
    p.add_argument("--batch", type=int, default=None, help="images per forward (default: GPU 32, CPU 2)")
    p.add_argument("--fidelity-images", type=int, default=None, help="images for the cosine (default: the batch, at least 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed forwards per variant (default: GPU 3, CPU 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed forwards per variant (default: GPU 10, CPU 2)")
    p.add_argument("--shipped-vit", default=None, metavar="FAMILY",
                   help="also benchmark this family's shipped real ViT weights (e.g. dinov2), if registered and "
                        "installed; else a row says it was skipped")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget: no new variant starts once spent (default: CPU 600, GPU none)")
    return p


# ------------------------------------------------------------------------------ environment
def _env(device: torch.device) -> Dict:
    return environment(device, REPO, modules=("bitsandbytes", "timm"))


# ------------------------------------------------------------------------------ memory
def _proc_status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class _Memory:
    """Peak memory of one forward over a baseline taken before the variant was built."""

    def __init__(self, device: torch.device):
        self.device = device

    def mark(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return (_proc_status_kib("VmRSS") or 0) * 1024

    def peak_of(self, fn: Callable[[], None], base: int) -> Optional[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        if not _reset_peak_rss():
            return None
        fn()
        hwm = _proc_status_kib("VmHWM")
        return None if hwm is None else (hwm * 1024 - base) / 2**20


# ------------------------------------------------------------------------------ teachers
def _config(name: str, img: int) -> TeacherConfig:
    if name in TEACHERS.list() and ships_weights(name):
        return TeacherConfig(name=name, family=name, input_size=img)  # shipped weights
    return TeacherConfig(name=name, family="timm", model=name, weights="none", input_size=img)


def _images(n: int, img: int) -> torch.Tensor:
    try:
        from skimage import data as skdata

        from lowres_kd.data import EvalTransform

        photos = [EvalTransform(img)(getattr(skdata, p)())[None] for p in PHOTOS]
    except Exception:  # scikit-image missing: noise images, said in the metadata
        photos = [torch.rand(1, 3, img, img, generator=torch.Generator().manual_seed(i)) for i in range(len(PHOTOS))]
    return torch.cat([photos[i % len(photos)] for i in range(n)])


def _is_vit(teacher) -> bool:
    return getattr(teacher, "is_token_model", False)


def _quantiles(ms: List[float]) -> Dict[str, float]:
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
    return {"median_ms": statistics.median(ms), "p20_ms": q[1], "p80_ms": q[7], "repeats": len(ms)}


def _time(fn, device, warmup, repeats) -> List[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _free(device):
    """Free the last variant (offloaded and nf4 teachers hold reference cycles, so collect them)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_teacher(name: str, args, device: torch.device, env: Dict, deadline: Optional[float]) -> List[Dict]:
    torch.manual_seed(0)
    fp32 = build_teacher(_config(name, args.img)).freeze()
    vit = _is_vit(fp32)
    fp32_bytes = tensor_bytes(fp32)
    images = _images(args.batch, args.img)
    fid_images = _images(args.fidelity_images, args.img)
    memory = _Memory(device)

    ref_teacher = copy.deepcopy(fp32).to(device)  # the fidelity reference runs on the device, in fp32
    with torch.no_grad():
        ref = ref_teacher(fid_images.to(device))
    ref = Features(ref.global_.float().cpu(), ref.dense.float().cpu())
    del ref_teacher
    _free(device)

    variants = []
    if device.type == "cuda":
        variants.append(("bf16", 16, False, True))
    for bits in args.bits:
        for off in args.offload:
            variants.append((f"{bits}bit" + ("+offload" if off == "on" else ""), bits, off == "on",
                             device.type == "cpu" and bits == 16 and off == "off"))
    rows = []
    for variant, bits, offload, baseline in variants:
        row = {**env, "teacher": name, "family": fp32.spec.family, "vit": vit, "img": args.img, "batch": args.batch,
               "variant": variant, "bits": bits, "offload": offload, "baseline": baseline,
               "fp32_weight_bytes": fp32_bytes, "error": None}
        if deadline is not None and time.perf_counter() > deadline:
            row["error"] = "skipped: --max-seconds spent"
            rows.append(row)
            continue
        try:
            base = memory.mark()
            t = copy.deepcopy(fp32)
            dtype = torch.float32
            if variant == "bf16":
                t = t.to(device, torch.bfloat16)
                dtype = torch.bfloat16
                report = None
            else:
                report = quantize_teacher(t, bits, device=device)
            off = enable_offload(t, device) if offload else None
            x = images.to(device, dtype)
            row["weight_bytes"] = tensor_bytes(t)
            row["weights_vs_fp32"] = row["weight_bytes"] / fp32_bytes
            row["device_weight_bytes"] = off.stats.resident_bytes if off else row["weight_bytes"]
            row["n_quantized"] = report.n_quantized if report else 0
            row["unquantized_bytes"] = report.unquantized_bytes if report else row["weight_bytes"]
            row["offload_blocks"] = off.stats.n_blocks if off else None

            def forward(teacher=t, images=x):
                with torch.no_grad():
                    teacher(images)

            ms = _time(forward, device, args.warmup, args.repeats)
            row.update(_quantiles(ms))
            row["images_per_s"] = args.batch / (row["median_ms"] / 1e3)
            if off:
                off.reset_stats()
            row["peak_mib"] = memory.peak_of(forward, base)
            row["offload_peak_block_bytes"] = off.stats.max_resident_block_bytes if off else None
            row["offload_max_resident_blocks"] = off.stats.max_resident if off else None
            fid = teacher_fidelity(ref, t, fid_images.to(dtype))
            row.update({k: fid.as_dict()[k] for k in ("cos_global", "cos_dense", "rel_err_global", "rel_err_dense", "cos_min")})
            del t, off, forward
        except Exception as exc:  # e.g. out of memory, bitsandbytes missing: record it, keep going
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        _free(device)
        rows.append(row)
        print(f"{name:<24} {variant:<14} " + (f"ERROR {row['error'][:100]}" if row["error"] else
              f"{row['weight_bytes'] / 2**20:8.1f} MiB ({row['weights_vs_fp32']:.3f}x fp32)  "
              f"{row['images_per_s']:8.2f} img/s  peak {_fmt(row['peak_mib'], '.0f')} MiB  "
              f"cos {row['cos_global']:.4f}/{row['cos_dense']:.4f}"), flush=True)
    _add_ratios_and_targets(rows)
    return rows


def shipped_vit_unavailable(family: str) -> Optional[str]:
    """None when ``family`` is a registered family with shipped weights, else why not."""
    if family not in TEACHERS.list():
        return f"family {family!r} is not registered"
    if not ships_weights(family):
        return f"family {family!r} has no shipped weights (weights: shipped not supported yet)"
    return None


def shipped_vit_rows(family: str, args, device: torch.device, env: Dict, deadline: Optional[float]) -> List[Dict]:
    """HOOK: the shipped real ViT teacher (module docstring). Its rows, or one row saying why not."""
    why = shipped_vit_unavailable(family)
    if why is None:
        try:
            return [{**r, "shipped_vit": True} for r in bench_teacher(family, args, device, env, deadline)]
        except Exception as exc:  # e.g. the weights package is not installed on this machine
            why = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    print(f"shipped ViT {family}: skipped ({why})", flush=True)
    return [{**env, "teacher": family, "family": family, "vit": True, "img": args.img, "batch": args.batch,
             "variant": "shipped", "shipped_vit": True, "bits": 16, "offload": False, "baseline": False, "fp32_weight_bytes": None,
             "error": f"skipped: shipped ViT not available ({why})", "speed_vs_baseline": None, "peak_vs_baseline": None,
             "weights_vs_baseline": None, "meets_weight_target": None, "meets_cos_target": None}]


def _add_ratios_and_targets(rows: List[Dict]) -> None:
    base = next((r for r in rows if r["baseline"] and not r["error"]), None)
    for r in rows:
        ok = not r["error"]
        r["speed_vs_baseline"] = r["images_per_s"] / base["images_per_s"] if ok and base else None
        r["peak_vs_baseline"] = (r["peak_mib"] / base["peak_mib"] if ok and base and r.get("peak_mib") is not None
                                 and base.get("peak_mib") else None)
        r["weights_vs_baseline"] = r["weight_bytes"] / base["weight_bytes"] if ok and base else None
        bits = r["bits"] if r["variant"] != "bf16" else None
        r["meets_weight_target"] = (r["weights_vs_fp32"] <= WEIGHT_TARGET[bits]) if ok and bits in WEIGHT_TARGET else None
        r["meets_cos_target"] = (r["cos_min"] >= COS_TARGET[bits]) if ok and bits in COS_TARGET and r["vit"] else None


# ------------------------------------------------------------------------------ writing
def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _yes(x):
    return "-" if x is None else ("yes" if x else "**no**")


def write_markdown(path: Path, env: Dict, rows: List[Dict], note: str):
    lines = [f"# Low-memory teachers ({env['device_name']})", "",
             f"torch {env['torch']}, bitsandbytes {env['bitsandbytes']}, timm {env['timm']}, CUDA {env['cuda']}, "
             f"{env['threads']} threads, git {env['git_sha']}", "", note, "",
             "| teacher | variant | weights MiB | x fp32 | on-device MiB | peak MiB | img/s | speed x base | "
             "cos global | cos dense | rel err dense | weight target | cos target | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = (r["error"] or "").replace("|", "/").replace("\n", " ")[:80]
        mib = (lambda k: _fmt(r[k] / 2**20, ".1f") if r.get(k) is not None else "-")
        lines.append(
            f"| {r['teacher']} | {r['variant']}{' (baseline)' if r['baseline'] else ''} | {mib('weight_bytes')} | "
            f"{_fmt(r.get('weights_vs_fp32'), '.3f')} | {mib('device_weight_bytes')} | {_fmt(r.get('peak_mib'), '.0f')} | "
            f"{_fmt(r.get('images_per_s'))} | {_fmt(r.get('speed_vs_baseline'))} | {_fmt(r.get('cos_global'), '.4f')} | "
            f"{_fmt(r.get('cos_dense'), '.4f')} | {_fmt(r.get('rel_err_dense'), '.3f')} | "
            f"{_yes(r.get('meets_weight_target'))} | {_yes(r.get('meets_cos_target'))} | {err} |")
    lines += ["", "Targets: int8 weights <= 0.3x and nf4 <= 0.18x of fp32 bytes (every teacher; CNN teachers are mostly "
              "convolutions, which stay as stored); cosine vs fp32 >= 0.99 (int8) and >= 0.97 (nf4) on ViT teachers. "
              "Offload rows: on-device MiB is what stays on the device between forwards; during a forward about two "
              "blocks more are staged."]
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, env: Dict, rows: List[Dict], note: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r["error"]]
    teachers = list(dict.fromkeys(r["teacher"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    panels = [("weights_vs_fp32", "weight bytes / fp32"), ("speed_vs_baseline", "images/s / baseline"),
              ("cos_min", "min cosine vs fp32")]
    fig, axes = plt.subplots(1, 3, figsize=(max(9.0, 2.2 * len(teachers) * 1.5), 4))
    width = 0.8 / max(1, len(variants))
    for ax, (key, label) in zip(axes, panels):
        for i, v in enumerate(variants):
            vals = []
            for t in teachers:
                r = next((r for r in ok if r["teacher"] == t and r["variant"] == v), None)
                vals.append(r[key] if r and r.get(key) is not None else 0.0)
            ax.bar([x + (i - (len(variants) - 1) / 2) * width for x in range(len(teachers))], vals, width, label=v)
        ax.set_xticks(range(len(teachers)), [t.replace("_patch16_224", "") for t in teachers])
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.set_title(label, fontsize=9)
        if key == "weights_vs_fp32":
            for y in WEIGHT_TARGET.values():
                ax.axhline(y, color="k", lw=0.7, ls="--")
        if key == "cos_min":
            ax.set_ylim(0.9, 1.001)
            for y in COS_TARGET.values():
                ax.axhline(y, color="k", lw=0.7, ls="--")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"low-memory teachers, {env['device_name']} ({note[:90]})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = _parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    cpu = device.type == "cpu"
    args.teachers = args.teachers or (CPU_TEACHERS if cpu else GPU_TEACHERS)
    args.batch = args.batch or (2 if cpu else 32)
    args.fidelity_images = args.fidelity_images or max(4, args.batch)
    args.warmup = (1 if cpu else 3) if args.warmup is None else args.warmup
    args.repeats = (2 if cpu else 10) if args.repeats is None else args.repeats
    max_seconds = args.max_seconds if args.max_seconds is not None else (600.0 if cpu else None)
    env = _env(device)
    note = ("baseline: plain fp32 teacher (the 16bit row); CPU peak = rise of peak RSS, approximate"
            if cpu else "baseline: plain bf16 teacher; peak = max_memory_allocated during one forward")
    print(note, flush=True)
    t0 = time.perf_counter()
    deadline = t0 + max_seconds if max_seconds is not None else None
    rows: List[Dict] = []
    for name in args.teachers:
        rows += bench_teacher(name, args, device, env, deadline)
    if args.shipped_vit:
        rows += shipped_vit_rows(args.shipped_vit, args, device, env, deadline)
    result = {"meta": {**env, "note": note, "img": args.img, "batch": args.batch, "warmup": args.warmup,
                       "repeats": args.repeats, "max_seconds": max_seconds, "seconds": time.perf_counter() - t0,
                       "weight_target": WEIGHT_TARGET, "cos_target": COS_TARGET},
              "rows": rows}
    write_results(args.out, "teachers", env, result, lambda path: write_markdown(path, env, rows, note),
                  lambda path: write_plot(path, env, rows, note))
    return result


if __name__ == "__main__":
    main()
