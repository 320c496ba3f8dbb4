"""One run directory, one trainer: a lock file holding the owner's pid and host.

A second trainer on a directory in use is refused with the owner's pid; a lock left by a process
that no longer runs (a crash, SIGKILL) is taken over, so ``--resume`` after a kill just works.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirectoryInUse(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False
        self.took_over = None  # the stale owner's record, when one was replaced

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner and owner.get("pid") != os.getpid() and owner.get("host") == socket.gethostname() \
                        and _alive(int(owner["pid"])):
                    raise RunDirectoryInUse(
                        f"{self.path.parent} is in use by pid {owner['pid']} on {owner['host']} "
                        f"(lock file {self.path}); wait for it, or use another output_dir") from None
                if owner and owner.get("host") not in (None, socket.gethostname()):
                    raise RunDirectoryInUse(
                        f"{self.path.parent} is locked by pid {owner.get('pid')} on another host "
                        f"{owner.get('host')!r}; remove {self.path} if that run is gone") from None
                self.took_over = owner
                self.path.unlink(missing_ok=True)  # stale: its process is dead
                continue
            with os.fdopen(fd, "w") as f:
                f.write(record)
            self.held = True
            return self
        raise RunDirectoryInUse(f"could not take the lock {self.path}")

    def _owner(self):
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # unreadable or half-written by a killed process: stale

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
