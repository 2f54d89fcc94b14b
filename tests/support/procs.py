"""Start tollgate services as real processes and wait until they report SERVING."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from ops.launcher import wait_serving

ROOT = Path(__file__).resolve().parents[2]


class ServiceProcess:
    """``python -m services.<name>`` with the given environment."""

    def __init__(self, name: str, port: int, env: Mapping[str, str], log_dir: Path):
        self.name = name
        self.address = f"127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}.log"
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", f"services.{name}"], cwd=ROOT, env=full_env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 30.0) -> ServiceProcess:
        try:
            wait_serving(self.address, timeout_s, self.proc)
        except Exception:
            print(self.log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
            raise
        return self

    def stop(self, timeout_s: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
