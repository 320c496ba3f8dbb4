"""Which training engine a recipe gets, and the DeepSpeed config it writes: one rule shared by
the trainer and the planner."""
from __future__ import annotations

import importlib.util


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def resolve_engine_name(recipe, device_type: str) -> str:
    """``engine: auto`` is DeepSpeed on CUDA when it is installed, else the plain torch engine
    (DeepSpeed runs on CPU too, but compiles its ops on first use: ask for it by name). A
    quantized adapter-mode base gets the torch engine: DeepSpeed would cast and partition its
    bitsandbytes weights (``config`` refuses ``engine: deepspeed`` with one)."""
    if recipe.engine != "auto":
        return recipe.engine
    quantized_base = recipe.student_base_bits < 16
    return "deepspeed" if device_type == "cuda" and deepspeed_installed() and not quantized_base else "torch"


BUCKET = 2**24  # elements per ZeRO communication bucket


def checks_overflow(recipe, bf16: bool) -> bool:
    """Whether DeepSpeed itself finds non-finite gradients and skips the step (ZeRO 1-3, bf16)."""
    return recipe.deepspeed.zero_stage >= 1 or bf16


def deepspeed_config(recipe, bf16: bool, cuda: bool) -> dict:
    t, o, ds = recipe.train, recipe.optim, recipe.deepspeed
    # buckets of 2^24 elements (32 MiB in bf16), not DeepSpeed's 5e8 (954 MiB), which a small card cannot spare
    zero = {"stage": ds.zero_stage, "reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET,
            "stage3_prefetch_bucket_size": BUCKET}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": cuda}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": cuda}
    config = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": o.grad_clip if checks_overflow(recipe, bf16) else 0.0,  # else: clipped by the engine
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # bitsandbytes AdamW8bit under ZeRO
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer != "none":
        config["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "weight_decay": o.weight_decay}}
    return config
