"""What a run logs as it trains: ``log.csv``, one row per logged step, every loss term a column;
optionally the same scalars as TensorBoard events (``train.log: [csv, tensorboard]``)."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import List, Sequence

from ..errors import UserError


class CsvLog:
    """CSV of step records, appended per row; on resume, rows after the checkpoint are dropped."""

    def __init__(self, path: Path, keep_until: int = 0):
        self.path = Path(path)
        rows: List[dict] = []
        if self.path.is_file() and keep_until > 0:
            with self.path.open() as f:
                rows = [row for row in csv.DictReader(f) if int(row["step"]) <= keep_until]
        self.fields: List[str] = list(rows[0].keys()) if rows else []
        self._rewrite(rows)

    def _rewrite(self, rows: List[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            if self.fields:
                writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)

    def write(self, row: dict) -> None:
        if any(key not in self.fields for key in row):  # a new column: rewrite with the wider header
            with self.path.open() as f:
                rows = list(csv.DictReader(f)) if self.fields else []
            self.fields += [k for k in row if k not in self.fields]
            self._rewrite(rows)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)

    def close(self) -> None:
        pass


def tensorboard_tag(key: str) -> str:
    """A log column's TensorBoard tag: loss terms under ``loss/`` (``loss/total``,
    ``loss/<teacher>/<kind>``), everything else under ``train/``."""
    if key == "loss":
        return "loss/total"
    return f"loss/{key}" if "/" in key else f"train/{key}"


def summary_writer_class():
    """torch's SummaryWriter; a missing ``tensorboard`` package is a UserError, raised when the
    run starts rather than at its first logged step."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional (tensorboard extra): only for train.log tensorboard
    except ImportError as exc:
        raise UserError("train.log: tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or pip install 'lowres-kd[tensorboard]'); or drop it from train.log") from exc
    return SummaryWriter


class TensorBoardLog:
    """The same step records as scalars in ``<run dir>/tensorboard``. On resume, events written
    after the checkpoint's step are purged, as the CSV drops its rows."""

    def __init__(self, log_dir: Path, keep_until: int = 0):
        self.writer = summary_writer_class()(log_dir=str(log_dir), purge_step=keep_until + 1 if keep_until else None)

    def write(self, row: dict) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tensorboard_tag(key), value, step)

    def close(self) -> None:
        self.writer.close()


class RunLogs:
    """Every sink ``train.log`` names, written together (log.csv always)."""

    def __init__(self, run_dir: Path, sinks: Sequence[str], keep_until: int = 0):
        run_dir = Path(run_dir)
        self.sinks = [CsvLog(run_dir / "log.csv", keep_until)]
        if "tensorboard" in sinks:
            self.sinks.append(TensorBoardLog(run_dir / "tensorboard", keep_until))

    def write(self, row: dict) -> None:
        for sink in self.sinks:
            sink.write(row)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
