"""The knowledge-inheritance trainer: one device-agnostic loop (CPU; CUDA with bf16 autocast).

Features and the recipe flags that control them:

- teachers from the registry, frozen, under ``no_grad`` (``teachers: [...]``); the base
  teacher's targets come from the student with the adapter disabled (``student.mode: adapter``)
- calibration pass fitting one normaliser per teacher and feature kind (``space.normalizer``,
  ``space.calibration_images``)
- loss ``sum_t w_t (lambda_g d_g + lambda_d d_d)`` (``loss.*``, ``teachers[*].weight``), the
  head's last linear fused with it (``loss.kernels``), teacher dropping (``loss.teacher_drop``)
- one loop, two engines (``engine``): plain PyTorch or DeepSpeed ZeRO 0-3 with CPU offload
  (``deepspeed.*``); AdamW or 8-bit AdamW (``optim.name``), linear warmup + cosine decay
  (``optim.*``), gradient accumulation (``train.grad_accum``), clipping (``optim.grad_clip``)
- any world size: ``torchrun`` / the DeepSpeed launcher start one process per GPU, each takes
  its slice of every global batch of ``world_size * train.batch_size`` images
- ``memory: auto``: the planner picks batch, accumulation, checkpointing, bits and offload
- non-finite losses skip the step; ``train.max_bad_steps`` in a row stop the run
- tqdm progress; ``log.csv`` with every loss term, lr, images/s and peak memory per step
- atomic safetensors checkpoints every ``train.checkpoint_every`` steps, ``train.keep_last``
  kept, exact ``--resume`` (model, optimizer, RNG, data position); final export to ``model/``
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as torch_dist
from lowres_kd_kernels import FusedLinearDistill
from torch import nn
from tqdm import tqdm

from ..build import build_model, build_student_and_teachers, training_images
from ..cache import TargetCache, cache_manifest
from ..data import (BadImageReport, Indexed, NotEnoughImages, ResumableSampler, collate_indexed, make_train_loader,
                    start_epoch)
from ..device import peak_memory_gib, resolve_device
from ..dict_diff import dict_differences
from ..errors import UserError
from ..heads import dense_rows
from ..rundir import checkpoint as ckpt
from ..rundir.lock import RunLock
from ..schema import Recipe
from ..targets import TeacherTargets
from ..teachers import Features, TeacherSpec
from .distributed import DistEnv
from .engines import build_engine
from .logs import RunLogs, summary_writer_class


class NonFiniteLossError(RuntimeError):
    pass


class TrainingOutOfMemory(RuntimeError):
    pass


class ResumeMismatch(UserError, ValueError):
    pass


class NothingToResume(UserError, FileNotFoundError):
    pass


# what may change between a run and its resume: bookkeeping, memory settings, the run's length, and
# where the run lies (a moved or copied run folder resumes: the objective is compared, not the path)
RESUMABLE_CHANGES = ("output_dir", "train.steps", "train.checkpoint_every", "train.keep_last", "train.log_every", "train.log",
                     "train.max_bad_steps", "train.device", "train.batch_size", "train.grad_accum",
                     "student.grad_checkpointing", "data.num_workers", "probe", "plan", "memory")


def out_of_memory_advice(recipe: Recipe, device: torch.device) -> str:
    """What to change after an out-of-memory step: the cheapest fixes, then the planner."""
    t, s = recipe.train, recipe.student
    tips = []
    if t.batch_size > 1:
        tips.append(f"--set train.batch_size={max(1, t.batch_size // 2)} --set train.grad_accum={t.grad_accum * 2} "
                    f"(same effective batch)")
    if not s.grad_checkpointing:
        tips.append("--set student.grad_checkpointing=true")
    tips.append(f"a smaller data.image_size (now {recipe.data.image_size})")
    if recipe.memory != "auto":
        tips.append("--set memory=auto (the planner picks batch, checkpointing, bits and offload; "
                    "`lowres-kd plan RECIPE --gpu-mem SIZE` shows its table)")
    return f"out of memory on {device} at train.batch_size={t.batch_size}; try: " + "; or ".join(tips)


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warmup to optim.lr, then cosine decay to lr * min_lr_ratio at train.steps."""
    o, total = recipe.optim, recipe.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Trainer:
    """``Trainer(recipe).setup(); trainer.train()``; see the module docstring for features.

    A ``memory: auto`` recipe needs its ``plan`` (the planner's choice for this device):
    ``lowres_kd.launch.trainer_for(recipe)`` makes one and passes it here.
    """

    def __init__(self, recipe: Recipe, resume: bool = False, progress: bool = True, plan=None):
        if recipe.memory == "auto" and plan is None:
            raise ValueError("memory: auto: the recipe must be planned first; build the trainer with "
                             "lowres_kd.launch.trainer_for(recipe) (as `lowres-kd train` does)")
        self.recipe = plan.apply(recipe) if plan is not None else recipe
        self.plan = plan
        self.dist = DistEnv.from_env()
        self.resume = resume
        self.progress = progress
        self.run_dir = recipe.run_dir
        self.step = 0
        self.bad_steps = 0  # non-finite losses in a row
        self.skipped_steps = 0  # in the whole run
        self.epoch = 0
        self.batches_done = 0  # in the current epoch

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        """Take the run directory's lock, build everything, then calibrate or resume."""
        self.lock = RunLock(self.run_dir).acquire() if self.dist.is_main else None  # one lock per run, not per rank
        if self.lock is not None and self.lock.took_over:
            tqdm.write(f"took over a stale lock of pid {self.lock.took_over.get('pid')} in {self.run_dir}")
        try:
            return self._setup()
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _setup(self) -> "Trainer":
        self.device = resolve_device(self.recipe.train.device, self.dist.local_rank)
        if "tensorboard" in self.recipe.train.log:
            summary_writer_class()  # a missing package stops the run here, before any teacher loads
        if self.plan is not None:
            tqdm.write("memory: auto: " + (", ".join(f"{k}={v}" for k, v in self.plan.changes.items()) or "no changes"))
        torch.manual_seed(self.recipe.train.seed)
        from_cache = self.recipe.teachers_from == "cache"
        self.cache = TargetCache(self.recipe.cache_dir) if from_cache else None
        self._setup_data()
        self._setup_model()
        if from_cache:  # the cache's specs built the heads: now check that all of it matches
            self.cache = TargetCache(self.recipe.cache_dir,
                                     expected=cache_manifest(self.recipe, self.source.names(), self.model.specs))
        self._setup_optimizer()
        if self.resume:
            self._resume_from_newest_readable()
        else:
            if ckpt.latest_checkpoint(self.run_dir) is not None:
                raise FileExistsError(f"{self.run_dir} already holds checkpoints: pass --resume to continue, or remove it")
            if self.cache is not None:
                self.cache.load_normalizers(self.model)
            if self.targets.entries:  # the live teachers (all, or those with cache: false)
                self.targets.calibrate()
        self._share_normalisers()
        self.targets.check_fidelity(self.run_dir)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.json").write_text(json.dumps(self.recipe.to_dict(), indent=1))
            run = {"engine": self.engine.describe(), "world_size": self.dist.world_size,
                   "plan": self.plan.as_dict() if self.plan is not None else None}
            (self.run_dir / "run.json").write_text(json.dumps(run, indent=1))
        tqdm.write(f"engine: {self.engine.describe()}")
        return self

    def _setup_data(self) -> None:
        d, seed = self.recipe.data, self.recipe.train.seed
        self.source, self.dataset, self.calibration = training_images(self.recipe)
        bs, world = self.recipe.train.batch_size, self.dist.world_size
        if len(self.dataset) < bs * world:
            raise NotEnoughImages(f"data.source {d.source!r} has {len(self.dataset)} images, fewer than one global "
                                  f"batch: train.batch_size={bs} x world size {world}; lower train.batch_size")
        self.sampler = ResumableSampler(len(self.dataset), seed=seed).shard(self.dist.rank, world, bs)
        self.loader = make_train_loader(Indexed(self.dataset), bs, self.sampler, num_workers=d.num_workers,
                                        collate=collate_indexed)
        self.bad_images = BadImageReport(epoch=0)

    def _setup_model(self) -> None:
        r = self.recipe
        live = [t.name for t in r.live_teachers]
        student, self.teachers = build_student_and_teachers(r, names=live)
        cached = self.cache.specs() if self.cache is not None else {}
        specs = {}
        for t in r.teachers:
            if t.name in live or r.inside_student(t):
                specs[t.name] = student.body.spec if r.inside_student(t) else self.teachers[t.name].spec
            elif t.name in cached:
                specs[t.name] = TeacherSpec.from_dict(cached[t.name])
            else:
                raise FileNotFoundError(f"teacher {t.name!r} is not in the cache at {r.cache_dir}; rebuild it "
                                        f"(lowres-kd cache RECIPE) or set its cache: false to run it live")
        self.model = build_model(r, student, specs, self.device)
        self.targets = TeacherTargets(r, self.model, self.teachers, self.device, self.calibration, bf16=self.bf16,
                                      progress=self.progress, is_main=self.dist.is_main, run_dir=self.run_dir,
                                      names=live).prepare()
        lo = r.loss
        self.loss_fn = FusedLinearDistill(alpha=lo.alpha, beta=lo.beta, distance=lo.distance, backend=lo.kernels)

    @property
    def bf16(self) -> bool:
        """Mixed precision (``train.bf16``), on CUDA only: autocast, bf16 teachers, DeepSpeed's bf16."""
        return self.device.type == "cuda" and self.recipe.train.bf16

    def _setup_optimizer(self) -> None:
        self.engine = build_engine(self.recipe, self.model, self.device, self.dist, self.bf16)

    def _share_normalisers(self) -> None:
        """Every rank uses rank 0's fitted normalisers (the ones the checkpoint keeps): a fit on the
        same images can still differ in the last bits between devices."""
        if self.dist.world_size == 1 or not self.dist.active:
            return
        for norms in (self.model.norm_global, self.model.norm_dense):
            for buffer in norms.buffers():
                torch_dist.broadcast(buffer, src=0)

    # ------------------------------------------------------------------ loss
    def _targets(self, images: torch.Tensor, indices: Optional[torch.Tensor]) -> Dict[str, Features]:
        """Normalised targets: the cached teachers' from the cache (teachers_from: cache), the
        others' from the teachers, live."""
        cached = self.cache.targets(self.epoch, indices, self.device) if self.cache is not None else {}
        return {**cached, **self.targets.normalised(images)}

    def _loss_step(self, images: torch.Tensor, indices: Optional[torch.Tensor] = None):
        """Total loss and its per-teacher terms for one micro-batch (DESIGN §2.3)."""
        r, lo = self.recipe, self.recipe.loss
        targets = self._targets(images, indices)
        feats = self.model.student(images)
        terms, per_teacher = {}, []
        for t in r.teachers:
            heads, target = self.model.heads[t.name], targets[t.name]
            g = self._head_loss(heads.global_, feats.global_, target.global_)
            d = self._head_loss(heads.dense, feats.dense, dense_rows(target.dense, heads.grid), grid=heads.grid)
            terms[f"{t.name}/global"], terms[f"{t.name}/dense"] = g.detach(), d.detach()
            per_teacher.append(lo.global_weight * g + lo.dense_weight * d)
        losses = torch.stack(per_teacher)
        weights = torch.tensor([r.teacher_weight(t) for t in r.teachers], device=losses.device)
        if lo.teacher_drop > 0:
            keep = torch.rand(len(weights), device=losses.device) >= lo.teacher_drop
            keep[losses.detach().argmax()] = True  # the teacher furthest away is never dropped
            weights = weights * keep
            terms["dropped"] = (~keep).sum().float()
        for t, value in zip(r.teachers, losses.detach()):
            terms[t.name] = value
        return (weights * losses).sum(), terms

    def _head_loss(self, head: nn.Module, x: torch.Tensor, target: torch.Tensor, grid=None) -> torch.Tensor:
        return head(x, target, self.loss_fn, grid=grid)

    # ------------------------------------------------------------------ loop
    def _batches(self):
        """Endless micro-batches; tracks (epoch, batches_done) for exact resume."""
        while True:
            start_epoch(self.loader, self.epoch, self.batches_done)
            if self.cache is not None:  # crops repeat every cache.epochs epochs, as cached
                self.dataset.set_epoch(self.epoch % self.cache.epochs)
            started_at, yielded = self.batches_done, 0
            for images, skipped, indices in self.loader:
                self.batches_done += 1
                self.bad_images.update(len(images), skipped)
                # a batch of only unreadable images is skipped by every rank at once: ranks stay in step
                if self.dist.all_true(len(images) > 0, self.device):
                    yielded += 1
                    yield images, indices
            if self.bad_images.count:
                report = self.bad_images.format()
                tqdm.write(f"bad images (rank {self.dist.rank}): " + report)
                if self.dist.is_main:
                    with (self.run_dir / "bad_images.log").open("a") as f:
                        f.write(report + "\n")
            if not yielded and started_at == 0:  # a whole epoch without one readable batch: it would never end
                raise NotEnoughImages(
                    f"data.source {self.recipe.data.source!r}: epoch {self.epoch} gave no batch with a readable image "
                    f"({self.bad_images.ok} of {self.bad_images.ok + self.bad_images.count} readable; listed in "
                    f"{self.run_dir / 'bad_images.log'})")
            self.epoch += 1
            self.batches_done = 0
            self.bad_images.reset(self.epoch)

    def train(self) -> dict:
        """Run to ``train.steps``, checkpointing on the way; the lock is released at the end,
        also when the run stops with an error (the logs are flushed and closed first)."""
        log = self._open_log() if self.dist.is_main else None
        try:
            return self._train(log)
        finally:
            if log is not None:
                log.close()
            self._release()

    def _train(self, log: Optional[RunLogs]) -> dict:
        r = self.recipe
        t = r.train
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16)
        main = self.dist.is_main
        batches = self._batches()
        self.model.train()
        bar = tqdm(total=t.steps, initial=self.step, desc=f"train {r.name}", disable=not self.progress or not main)
        last = {}
        while self.step < t.steps:
            started = time.perf_counter()
            lr = lr_at(self.step, r)
            self.engine.set_lr(lr)
            total, sums, n_images, finite = 0.0, {}, 0, True
            for _ in range(t.grad_accum):  # every micro-batch runs, also after a non-finite one: ranks stay in step
                images, indices = next(batches)
                images = images.to(self.device)
                try:
                    with autocast:
                        loss, terms = self.engine.forward(self._loss_step, images, indices)
                    micro_finite = bool(torch.isfinite(loss))
                    finite &= micro_finite
                    self.engine.backward(loss, micro_finite)
                except torch.cuda.OutOfMemoryError as exc:
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    raise TrainingOutOfMemory(
                        f"step {self.step}: {out_of_memory_advice(r, self.device)}. The last checkpoint is "
                        f"intact: {ckpt.latest_checkpoint(self.run_dir)}; resume with --resume and the new settings."
                    ) from exc
                total += loss.detach() / t.grad_accum
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v / t.grad_accum
                n_images += len(images) * self.dist.world_size
            grad_norm = self.engine.step(finite)
            if grad_norm is None:
                self._skip_step(log, lr, "non-finite loss" if not self.dist.all_true(finite, self.device)
                                else "non-finite gradients")
                continue
            self.bad_steps = 0
            sums["grad_norm"] = grad_norm
            self.step += 1
            elapsed = time.perf_counter() - started
            logged = {"loss": total, **sums}  # one collective for every number of the step
            means = self.dist.mean(torch.stack([torch.as_tensor(v, device=self.device).float() for v in logged.values()]))
            last = {"step": self.step, "lr": lr, **dict(zip(logged, means.tolist())),
                    "images_per_s": n_images / elapsed, "peak_mem_gib": peak_memory_gib(self.device),
                    "bad_images": self.bad_images.count, "skipped_steps": self.skipped_steps}
            if main and (self.step % t.log_every == 0 or self.step == t.steps):
                log.write(last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", ips=f"{last['images_per_s']:.1f}")
            bar.update(1)
            if self.step % t.checkpoint_every == 0 and self.step < t.steps:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        self.export()
        return last

    def _skip_step(self, log: Optional[RunLogs], lr: float, why: str) -> None:
        """No optimizer update; counted, logged as a NaN row; too many in a row stop the run."""
        self.bad_steps += 1
        self.skipped_steps += 1
        tqdm.write(f"step {self.step}: {why}, step skipped ({self.bad_steps} in a row)")
        if log is not None:
            log.write({"step": self.step + 1, "lr": lr, "loss": float("nan"), "skipped_steps": self.skipped_steps})
        max_bad = self.recipe.train.max_bad_steps
        if self.bad_steps >= max_bad:
            raise NonFiniteLossError(
                f"{self.bad_steps} non-finite steps in a row (train.max_bad_steps={max_bad}); "
                f"the last checkpoint is intact: {ckpt.latest_checkpoint(self.run_dir)}")
        self.step += 1

    # ------------------------------------------------------------------ state
    def _open_log(self) -> RunLogs:
        return RunLogs(self.run_dir, self.recipe.train.log, keep_until=self.step)

    def _meta(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "images_done": self.batches_done * self.global_batch,
                "bad_steps": self.bad_steps,
                "skipped_steps": self.skipped_steps,
                "bad_images": self.bad_images.state_dict(), "recipe": self.recipe.to_dict(),
                "specs": {n: s.to_dict() for n, s in self.model.specs.items()},
                "cache": self.cache.identity if self.cache is not None else None}

    def _rng(self) -> Dict[str, torch.Tensor]:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    @property
    def global_batch(self) -> int:
        return self.recipe.train.batch_size * self.dist.world_size

    def save_checkpoint(self) -> Path:
        """Every rank writes its engine state into one staging directory; rank 0 adds the model,
        RNG and ``state.json`` and renames it into place (atomic for the whole run)."""
        path = self.run_dir / "checkpoints" / f"step_{self.step:07d}"
        staging = ckpt.staging_dir(path)
        if self.dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.dist.barrier()
        error = None
        try:
            engine_meta = self.engine.save(staging)
            model = self.engine.model_state()
        except Exception as exc:  # e.g. a full disk on one rank: agree before anyone waits
            error = exc
        if self.dist.all_true(error is None, self.device) and self.dist.is_main:
            try:
                meta = {**self._meta(), "optimizer": engine_meta, "engine": self.engine.name,
                        "world_size": self.dist.world_size, "zero_stage": self.recipe.deepspeed.zero_stage}
                ckpt.write_dir(path, {"model": model, "rng": self._rng()}, meta, staging=staging)
                ckpt.rotate(self.run_dir, self.recipe.train.keep_last)
            except Exception as exc:
                error = exc
        if not self.dist.all_true(error is None, self.device):  # the previous checkpoint stays the newest
            if self.dist.is_main:
                shutil.rmtree(staging, ignore_errors=True)
            raise error or RuntimeError(f"writing {path} failed on another rank; the previous checkpoint is intact")
        return path

    def export(self) -> Path:
        """The final model alone (no optimizer): what ``lowres_kd.load(run_dir)`` reads."""
        model = self.engine.model_state()
        path = self.run_dir / "model"
        if self.dist.is_main:
            ckpt.write_dir(path, {"model": model}, self._meta())
        self.dist.barrier()
        return path

    def _resume_from_newest_readable(self) -> None:
        """Newest intact checkpoint first; one whose files cannot be read (a power cut before the
        disk caught up) is reported and the next older one is tried."""
        found = ckpt.step_checkpoints(self.run_dir)
        if not found:
            raise NothingToResume(f"--resume: no intact checkpoint under {self.run_dir / 'checkpoints'}; "
                                  f"train without --resume to start the run")
        failures = []
        for path in reversed(found):
            try:
                self._load_checkpoint(path)
                return
            except ValueError as exc:
                if isinstance(exc, ResumeMismatch):
                    raise
                failures.append(f"{path.name}: {exc}")
                tqdm.write(f"skipping unreadable checkpoint {path}: {exc}")
        raise NothingToResume(f"--resume: no readable checkpoint under {self.run_dir / 'checkpoints'} "
                              f"({'; '.join(failures)}); remove the folder to start again")

    def _check_resumable(self, meta: dict, path: Path) -> None:
        """Refuse a resume whose recipe changes the objective or the data, naming the keys."""
        diffs = dict_differences(meta["recipe"], self.recipe.to_dict(), names=("checkpoint", "recipe"))
        blocking = [d for d in diffs if not d.split(":")[0].startswith(RESUMABLE_CHANGES)]
        if blocking:
            raise ResumeMismatch(f"cannot resume {path} with this recipe: " + "; ".join(blocking)
                                 + f". Only these may change: {', '.join(RESUMABLE_CHANGES)}")
        images_done, bs = meta["images_done"], self.global_batch
        if self.cache is not None and meta.get("cache") not in (None, self.cache.identity):
            raise ResumeMismatch(f"cannot resume {path}: the teacher cache at {self.cache.root} was rebuilt since "
                                 f"(its normalisers or PCA basis differ from the ones this run trained on); "
                                 f"start a new run, or rebuild the cache as it was")
        if meta.get("engine", self.engine.name) != self.engine.name:
            raise ResumeMismatch(f"cannot resume {path}: it was written by the {meta['engine']} engine, this run uses "
                                 f"{self.engine.name}; set engine: {meta['engine']}")
        partitioned = self.engine.name == "deepspeed" and meta.get("zero_stage", 0) >= 1
        then = (meta.get("world_size", 1), meta.get("zero_stage", 0))
        if partitioned and then != (self.dist.world_size, self.recipe.deepspeed.zero_stage):
            raise ResumeMismatch(f"cannot resume {path}: its DeepSpeed state is partitioned for world size {then[0]} "
                                 f"at ZeRO-{then[1]}; this run has world size {self.dist.world_size} at ZeRO-"
                                 f"{self.recipe.deepspeed.zero_stage}")
        if images_done % bs:
            raise ResumeMismatch(f"cannot resume {path}: {images_done} images of epoch {meta['epoch']} are done, not a "
                                 f"multiple of train.batch_size={self.recipe.train.batch_size} x world size "
                                 f"{self.dist.world_size}; pick a batch size that divides it")
        if diffs:
            tqdm.write("resuming with changed settings: " + "; ".join(diffs))

    def _load_checkpoint(self, path: Path) -> None:
        tensors, meta = ckpt.read_dir(path, ["model", "rng"], required=("model", "rng"))
        ckpt.verify(path, meta)  # the engine's files too
        missing = [k for k in ("recipe", "step", "epoch", "images_done", "bad_steps", "skipped_steps", "bad_images")
                   if k not in meta]
        if missing or not isinstance(meta.get("recipe"), dict):
            raise ckpt.BadCheckpoint(f"{path / ckpt.COMPLETE} lacks {', '.join(missing) or 'a recipe'}")
        self._check_resumable(meta, path)
        try:
            self.engine.load(path, tensors["model"], meta)
        except (RuntimeError, EOFError, OSError, KeyError) as exc:  # truncated or missing engine files
            raise ValueError(f"{path}: the {self.engine.name} engine's state cannot be read ({exc})") from exc
        torch.set_rng_state(tensors["rng"]["cpu"])
        if "cuda" in tensors["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng"]["cuda"], self.device)
        self.step, self.epoch = meta["step"], meta["epoch"]
        self.batches_done = meta["images_done"] // self.global_batch
        self.bad_steps, self.skipped_steps = meta["bad_steps"], meta["skipped_steps"]
        self.bad_images.load_state_dict(meta["bad_images"])
        tqdm.write(f"resumed from {path} at step {self.step}")
