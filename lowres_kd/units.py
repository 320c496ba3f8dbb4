"""Byte sizes as people write them: ``12GiB``, ``8 GB``, ``512MiB``, ``1e9``."""
from __future__ import annotations

import re

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(text) -> int:
    """``'12GiB'`` -> 12884901888; GB is 10^9 and GiB 2^30, as on GPU spec sheets and in nvidia-smi."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = _SIZE.match(str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"{text!r} is not a size; write e.g. 12GiB, 8GB, 512MiB (units: {', '.join(u for u in UNITS if u)})")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"
