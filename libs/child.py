"""``python -m libs.child MODULE [ARGS...]``: run MODULE as ``python -m MODULE`` would, dying with the launcher.

``tollgate up`` starts every service through this. It asks Linux to SIGTERM the process when the launcher
dies (PR_SET_PDEATHSIG), so no service outlives a launcher killed without cleaning up. That used to be a
``preexec_fn`` of the launcher's ``Popen``; but a preexec_fn makes Python fork() instead of vfork(), and fork()
runs the pthread_atfork handlers gRPC registers, which deadlocked the launcher's spawn once it had used gRPC
for health checks (seen: the HTTP edge, started last, never started). Arming it here, in the child's own
interpreter, keeps the launcher's spawn free of fork handlers.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

LAUNCHER_PID_ENV = "TOLLGATE_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    launcher = int(os.environ.get(LAUNCHER_PID_ENV, "0") or 0)
    if launcher and os.getppid() != launcher:
        sys.exit(0)  # the launcher died before the signal was armed: nothing to serve for


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m libs.child MODULE [ARGS...]")
    die_with_parent()
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
