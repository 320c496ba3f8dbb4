"""Where two nested dicts differ, leaf by leaf: what a stale cache or a changed resume reports."""
from __future__ import annotations

from typing import List


def dict_differences(found, expected, prefix: str = "", names=("cache", "recipe")) -> List[str]:
    """Every leaf where two nested dicts differ, as 'a.b: <found> has X, <expected> has Y' lines."""
    out = []
    if isinstance(found, dict) and isinstance(expected, dict):
        for key in sorted(set(found) | set(expected)):
            where = f"{prefix}.{key}" if prefix else key
            if key not in found:
                out.append(f"{where}: missing in the {names[0]} ({names[1]}: {expected[key]!r})")
            elif key not in expected:
                out.append(f"{where}: in the {names[0]} but not in the {names[1]} ({found[key]!r})")
            else:
                out += dict_differences(found[key], expected[key], where, names)
    elif found != expected:
        out.append(f"{prefix}: {names[0]} has {found!r}, {names[1]} has {expected!r}")
    return out
