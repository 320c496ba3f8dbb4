"""One run directory, one trainer: an exclusive ``flock`` on ``<run>/.lock``, held for the run.

The kernel releases the lock when its process dies (a crash, SIGKILL), so a lock left behind is
taken over by the next trainer without any pid guessing; the file also records the owner's pid
and host, for the message a second trainer gets.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirectoryInUse(RuntimeError):
    pass


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._file = None
        self.took_over = None  # the record of a previous owner that died holding the directory

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = _parse(f.read())
            f.close()
            raise RunDirectoryInUse(
                f"{self.path.parent} is in use by pid {owner.get('pid', '?')} on {owner.get('host', '?')} "
                f"(lock file {self.path}); wait for it, or use another output_dir") from None
        f.seek(0)
        previous = _parse(f.read())
        self.took_over = previous if previous.get("pid") else None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()  # an empty record: released cleanly, nothing to take over
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _parse(text: str) -> dict:
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
