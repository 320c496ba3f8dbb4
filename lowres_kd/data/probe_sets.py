"""One entry of ``probe.data`` -> a labelled split: a built-in set's name or a folder.

Built-in: ``fashion_mnist`` and ``digits`` (classification, ``labelled.load_labelled``) and
``pasted`` (segmentation, ``pasted.make_pasted_set``). A folder is a segmentation set when it
holds ``images/`` and ``masks/``, a classification set otherwise (``folders``). The split's
``kind`` (``classification`` / ``segmentation``) says which probes use it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from ..errors import UserError
from ..schema import ProbeConfig
from .folders import is_segmentation_folder, load_class_folder, load_segmentation_folder
from .labelled import LABELLED_SETS, LabelledSplit, SegmentationSplit, load_labelled
from .pasted import make_pasted_set

PROBE_SETS = (*LABELLED_SETS, "pasted")

Split = Union[LabelledSplit, SegmentationSplit]


def load_probe_set(spec: str, probe: ProbeConfig, size: int, seed: int) -> Split:
    """The split ``spec`` names, sized by the recipe's ``probe`` section; folder images at ``size``."""
    if spec in LABELLED_SETS:
        split = load_labelled(spec, n_train=probe.train_per_class * 10, n_test=probe.test_per_class * 10, seed=seed)
        if split.name != spec:  # a fallback: kept apart from the set it stands in for, if both are asked
            split.name = f"{split.name} (for {spec})"
        return split
    if spec == "pasted":
        return make_pasted_set(probe.segmentation_train, probe.segmentation_test, size, seed)
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise UserError(f"probe.data: {spec!r} is neither a built-in set ({', '.join(PROBE_SETS)}) nor a folder")
    if is_segmentation_folder(root):
        split = load_segmentation_folder(root, size, probe.segmentation_train, probe.segmentation_test,
                                         probe.val_fraction, seed)
    else:
        split = load_class_folder(root, size, probe.train_per_class, probe.test_per_class, probe.val_fraction, seed)
    split.name = spec  # as given: two folders of one name stay apart (in the rows and the feature cache)
    return split
