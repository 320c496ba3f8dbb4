"""``lowres-kd probe RUN``: every registered probe over a run's subjects, and the report;
``lowres-kd compare``: several scored runs side by side."""
from .compare import compare_runs
from .runner import build_subjects, run_probes

__all__ = ["build_subjects", "compare_runs", "run_probes"]
