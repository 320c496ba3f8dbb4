"""Any timm image model as a teacher (or the student's base): ViTs, ConvNeXts, ResNets, ...

``TimmFamily`` is what a timm-backed family fixes (default model and input size, the timm
architectures it accepts, an optional checkpoint converter); the ``timm`` family takes any model,
``dinov2``, ``clip`` and ``sam`` (one file each) are ``TimmFamily`` entries with their defaults.

Weights: ``hub`` downloads through timm (online, or from the local Hugging Face cache), a path
loads a local safetensors or ``weights_only`` .pt state dict, ``none`` keeps the random init,
``shipped`` loads a family's ``ShippedWeights`` (weights inside an installed package, one model).
Files are read by ``weights.load_state_dict`` (never by timm's loader: timm 1.0.x before the
``weights_only`` default unpickled .pt files unrestricted), then passed through the timm model
module's own ``checkpoint_filter_fn``, as ``timm.create_model(pretrained=True)`` would: it converts
original-format checkpoints (facebook DINOv2, OpenAI/open_clip CLIP towers, SAM) and resamples
position embeddings saved at another input size. A file must then fit exactly (classifier keys
aside): a missing or unexpected key is an error, not a silently random layer.

Features: a model whose ``forward_features`` gives tokens (N, L, C) gives global = the class token
(or the mean of patch tokens when it has none) and dense = the patch tokens on their grid
(``num_prefix_tokens`` class/register tokens dropped); one that gives a map (N, C, h, w) gives the
pooled map and the map. ``layer: k`` takes block k's output as the dense map (same forward pass).
"""
from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import timm
import torch
from torch import nn

from ..schema import TeacherConfig
from .base import TEACHERS, Features, Teacher, TeacherSpec, no_shipped_weights, small_random, student_base
from .weights import load_state_dict

LORA_LEAVES = ("qkv", "proj", "fc1", "fc2")
StateFilter = Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ShippedWeights:
    """Real weights for one timm model of a family that ship inside an installed package.

    ``load(net)`` returns a state dict for the built model ``net`` (at its input size); it then goes
    through the same ``load_checkpoint`` as a file. ``model`` is what ``model: ""`` means with
    ``weights: shipped``; ``what`` names the weights in messages and docs.
    """

    model: str
    what: str
    load: Callable[[nn.Module], Dict[str, torch.Tensor]]


@dataclass(frozen=True)
class TimmFamily:
    """A registered family backed by timm.

    ``model`` / ``input_size``: what a recipe's ``model: ""`` / ``input_size: 0`` mean (input size
    0: the timm model's own pretrained size); ``models``: fnmatch patterns of the timm
    architectures the family accepts; ``adapt_state(state, net)``: a conversion applied after
    timm's own checkpoint filter, for what that filter leaves undone; ``shipped``: the one model
    whose weights ship in a package (``weights: shipped``), if any.
    """

    name: str
    model: str = ""
    input_size: int = 0
    models: Tuple[str, ...] = ("*",)
    adapt_state: Optional[StateFilter] = None
    shipped: Optional[ShippedWeights] = None

    def default_model(self, cfg: TeacherConfig) -> str:
        """The timm model a recipe entry means: its ``model``, else the shipped model for
        ``weights: shipped``, else the family's default."""
        if cfg.model:
            return cfg.model
        return self.shipped.model if self.shipped is not None and cfg.weights == "shipped" else self.model

    def build(self, cfg: TeacherConfig) -> "TimmTeacher":
        model = self.default_model(cfg)
        if not model:
            raise ValueError(f"teacher {cfg.name!r}: the {self.name} teacher family needs 'model' "
                             "(a timm model name, e.g. vit_small_patch16_224)")
        if not any(fnmatch.fnmatch(model.split(".")[0], p) for p in self.models):
            known = timm.list_models(list(self.models))
            raise ValueError(f"teacher {cfg.name!r}: the {self.name} family takes timm models matching "
                             f"{' or '.join(self.models)} ({', '.join(known)}), not {model!r}")
        return TimmTeacher(model, cfg.weights, cfg.input_size or self.input_size, cfg.layer, family=self, name=cfg.name)


TIMM = TimmFamily("timm")


def hub_state(model: str, family: str, name: str) -> Dict[str, torch.Tensor]:
    """The pretrained weights of a timm model through timm's own download (cache first)."""
    try:
        source = timm.create_model(model, pretrained=True, num_classes=0)
    except (OSError, RuntimeError) as exc:  # offline (HF_HUB_OFFLINE), no network, no such weights
        hub_id = timm.models.get_pretrained_cfg_value(model, "hf_hub_id") or f"timm/{model}"
        raise RuntimeError(
            f"teacher {name!r} (family {family!r}): 'weights: hub' could not fetch timm model {model!r} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Offline, download the "
            f"checkpoint on a connected machine (https://huggingface.co/{hub_id}, "
            f"model.safetensors) and pass the file: 'weights: /path/to/model.safetensors'") from exc
    return source.state_dict()


def load_checkpoint(net: nn.Module, state: Dict[str, torch.Tensor], source: str, adapt: Optional[StateFilter] = None):
    """Load ``state`` into timm model ``net`` through its module's ``checkpoint_filter_fn`` (and
    ``adapt``); everything but the classifier must fit."""
    filter_fn = getattr(sys.modules[type(net).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, net)
    if adapt is not None:
        state = adapt(state, net)
    own = net.state_dict()
    classifiers = net.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    state = {k: v for k, v in state.items() if k in own or not k.startswith(tuple(c + "." for c in classifiers))}
    what = f"{source} does not fit timm model {net.pretrained_cfg.get('architecture')!r}"
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{what}: {exc}") from None
    if missing or unexpected:
        raise ValueError(f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}")


class TimmTeacher(Teacher):
    def __init__(self, model: str, weights: str = "none", input_size: int = 0, layer="last",
                 family: TimmFamily = TIMM, name: str = ""):
        super().__init__()
        shipped = family.shipped
        if weights == "shipped" and shipped is None:
            raise ValueError(f"teacher {name!r}: no weights ship with the {family.name} family; use 'hub' "
                             "(online), a local .safetensors / .pt file, or 'none'")
        if weights == "shipped" and model != shipped.model:
            raise ValueError(f"teacher {name!r}: the {family.name} family ships weights for model {shipped.model!r} "
                             f"only ({shipped.what}), not {model!r}; for {model!r} use 'hub' (online) or a local "
                             ".safetensors / .pt file")
        kwargs = {"num_classes": 0}
        if input_size:
            kwargs["img_size"] = input_size
        try:
            self.net = timm.create_model(model, **kwargs)
        except TypeError:  # models without img_size (CNNs) take any size
            kwargs.pop("img_size", None)
            self.net = timm.create_model(model, **kwargs)
        if weights == "shipped":
            load_checkpoint(self.net, shipped.load(self.net), shipped.what, family.adapt_state)
        elif weights != "none":
            state = hub_state(model, family.name, name) if weights == "hub" else load_state_dict(weights)
            load_checkpoint(self.net, state, "the hub weights" if weights == "hub" else weights, family.adapt_state)
        cfg = self.net.pretrained_cfg
        self.layer = layer
        self.spec = TeacherSpec(family=family.name, input_size=input_size or cfg["input_size"][-1],
                                mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), extra={"model": model})
        self.describe_dims()

    @property
    def is_token_model(self) -> bool:
        return hasattr(self.net, "patch_embed") and hasattr(self.net, "num_prefix_tokens")

    def _tokens_to_features(self, tokens: torch.Tensor, size) -> Features:
        patches = tokens[:, getattr(self.net, "num_prefix_tokens", 0):]
        embed = self.net.patch_embed
        h, w = embed.dynamic_feat_size(size) if hasattr(embed, "dynamic_feat_size") else embed.grid_size
        dense = patches.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        global_ = tokens[:, 0] if getattr(self.net, "cls_token", None) is not None else patches.mean(1)
        return Features(global_, dense)

    def forward_features(self, x):
        if self.layer == "last":
            out, dense = self.net.forward_features(x), None
        else:
            out, (dense,) = self.net.forward_intermediates(x, indices=[int(self.layer)], output_fmt="NCHW")
        # decided by what timm returns, not by attributes: samvit has a patch_embed but gives a map
        feats = self._tokens_to_features(out, x.shape[-2:]) if out.dim() == 3 else Features(out.mean((2, 3)), out)
        return feats if dense is None else Features(feats.global_, dense)

    def student_features(self, x):
        return self.forward_features(x)

    def lora_targets(self):
        return ["net." + n for n, m in self.net.named_modules() if isinstance(m, nn.Linear)
                and n.split(".")[-1] in LORA_LEAVES and n.startswith(("blocks", "stages", "layers"))]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.net.set_grad_checkpointing(enable)

    def set_input_size(self, size: int) -> None:
        """timm's own ``set_input_size``: the patch grid and a resampled position table."""
        if self.is_token_model and tuple(self.net.patch_embed.img_size) != (size, size):
            if not hasattr(self.net, "set_input_size"):
                raise ValueError(f"teacher family {self.spec.family!r}: {type(self.net).__name__} cannot change its "
                                 f"input size (fixed at {self.net.patch_embed.img_size[0]} px)")
            self.net.set_input_size(img_size=(size, size))


@TEACHERS.register("timm")
@small_random(model="vit_tiny_patch16_224", input_size=32)
@student_base
@no_shipped_weights
def timm_teacher(cfg: TeacherConfig) -> Teacher:
    return TIMM.build(cfg)
