"""lowres-kd: knowledge inheritance from several vision teachers into one student, on one small GPU."""
__version__ = "0.1.0"


def load(run_or_checkpoint, device="cpu"):
    """Load a trained run as an ``nn.Module`` in eval mode (see ``lowres_kd.api.load``)."""
    from .api import load as _load  # torch and timm load on first use, not on `import lowres_kd`

    return _load(run_or_checkpoint, device)


__all__ = ["load", "__version__"]
