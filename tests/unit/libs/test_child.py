"""Services started by the launcher die with it, even when it is SIGKILLed (libs/child.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-m", "libs.child", "http.server", "0", "--bind", "127.0.0.1"],
                             env={**os.environ, "TOLLGATE_LAUNCHER_PID": str(os.getpid())},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(60)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_child_dies_when_its_launcher_is_killed() -> None:
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout is not None
        child = int(launcher.stdout.readline())
        time.sleep(1.0)  # the child is up and serving
        assert _alive(child)
        launcher.send_signal(signal.SIGKILL)  # no chance to clean up
        launcher.wait(5)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        launcher.kill()


def test_it_runs_the_module_like_python_dash_m() -> None:
    out = subprocess.run([sys.executable, "-m", "libs.child", "json.tool", "--compact"], cwd=REPO,
                         input='{"a": [1, 2]}', capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == '{"a":[1,2]}'
