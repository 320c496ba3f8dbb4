"""One small registry used for teachers, normalisers, losses and probes.

Adding an item is one decorated function or class in its own file; lookups never fall back
silently: an unknown name raises with the closest registered names.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Dict, List


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable:
        """Decorator: ``@TEACHERS.register("mobilenet_v2")``; the default name is the object's."""

        def wrap(obj):
            key = name or obj.__name__
            if key in self._items:
                raise KeyError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            return obj

        return wrap

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint} (registered: {', '.join(sorted(self._items))})")
        return self._items[name]

    def build(self, name: str, **kwargs) -> Any:
        return self.get(name)(**kwargs)

    def list(self, pattern: str = "*") -> List[str]:
        return sorted(k for k in self._items if fnmatch.fnmatch(k, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"
