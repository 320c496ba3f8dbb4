"""The command line re-runs itself once with glibc keeping freed memory; in-process calls do not."""
import os
import platform
import subprocess
import sys

import pytest

from lowres_kd.malloc import KEEP_FREED, OPT_OUT, keep_freed_env

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's")
def test_settings_are_added_once_and_the_users_win():
    env = keep_freed_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", **KEEP_FREED}
    assert keep_freed_env(env) is None  # already set: no second re-run
    assert keep_freed_env({"MALLOC_MMAP_THRESHOLD_": "65536"}) is None  # the user's own choice stays
    assert keep_freed_env({OPT_OUT: "1"}) is None
    assert keep_freed_env({OPT_OUT: "0"}) is not None


PROBE = """
import os, sys
import lowres_kd.commands as commands
commands.run = lambda args: print(os.getpid(), os.environ.get("MALLOC_MMAP_THRESHOLD_"), args.command) or 0
from lowres_kd.cli import main
print("started", os.getpid())
sys.argv = ["lowres-kd", "list"]
sys.exit(main({argv}))
"""


def run_probe(argv: str, **env):
    base = {k: v for k, v in os.environ.items() if k not in KEEP_FREED and k != OPT_OUT}
    done = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                          env={**base, **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's")
def test_the_command_line_reruns_itself_in_place_with_the_setting():
    out = run_probe("None")
    # started twice in one process (execve keeps the PID), then the command ran once with the setting
    pid = out[1]
    assert out == ["started", pid, "started", pid, pid, KEEP_FREED["MALLOC_MMAP_THRESHOLD_"], "list"]


def test_in_process_calls_and_the_opt_out_run_as_they_are():
    pid_in, *rest = run_probe("['list']")[1:]
    assert rest == [pid_in, "None", "list"]
    pid_out, *rest = run_probe("None", **{OPT_OUT: "1"})[1:]
    assert rest == [pid_out, "None", "list"]
