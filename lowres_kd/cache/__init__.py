"""Teacher feature cache (DESIGN §3): ``build`` writes it, ``store`` reads it back."""
from .build import build_cache, prepare_targets
from .store import MANIFEST, StaleCacheError, TargetCache, cache_manifest, decode, encode, expected_manifest

__all__ = ["MANIFEST", "StaleCacheError", "TargetCache", "build_cache", "cache_manifest", "decode", "encode",
           "expected_manifest", "prepare_targets"]
