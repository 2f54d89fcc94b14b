"""``tollgate up`` keeps the mesh serving when one part dies: the launcher restarts it (ops/launcher.py,
ops/cli.py), and stops every process it started when asked to."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import psutil
import pytest
import redis

from ops.launcher import (
    REPO_ROOT,
    LocalPostgres,
    LocalRedis,
    RestartPolicy,
    Supervisor,
    free_port,
    grpc_serving,
    http_healthy,
)

SERVICES = ("router", "cache", "ratelimit", "retrieval", "inference")


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"{what} not within {timeout_s} s")
        time.sleep(0.1)
    return time.monotonic() - start


def the_child(launcher: psutil.Process, module: str) -> psutil.Process:
    return next(p for p in launcher.children(recursive=True) if module in " ".join(p.cmdline()))


@pytest.mark.slow
def test_tollgate_up_restarts_a_killed_service_while_the_others_keep_serving(
        tmp_path: Path, clean_env: None, redis_url: str, redis_prefix: str, database_url: str) -> None:
    ports = {name: free_port() for name in (*SERVICES, "edge", "fake_provider")}
    env = {**os.environ, "TOLLGATE_DATA_DIR": str(tmp_path), "TOLLGATE_REDIS_URL": redis_url,
           "TOLLGATE_REDIS_PREFIX": redis_prefix, "TOLLGATE_DATABASE_URL": database_url,
           "TOLLGATE_INFERENCE_ENGINE": "openai", "TOLLGATE_INFERENCE_MODELS": "restart-small",
           **{f"TOLLGATE_{name.upper()}_PORT": str(port) for name, port in ports.items()}}
    out, err = tmp_path / "up.out", tmp_path / "up.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        up = subprocess.Popen([sys.executable, "-c", "from ops.cli import main; main(['up'])"], cwd=REPO_ROOT,
                              env=env, stdout=o, stderr=e)
    launcher = psutil.Process(up.pid)
    started: set[int] = set()
    try:
        edge = f"http://127.0.0.1:{ports['edge']}/healthz"
        wait_for(lambda: "tollgate is serving" in out.read_text() or up.poll() is not None, 120, "the mesh")
        assert up.poll() is None, err.read_text()
        started |= {p.pid for p in launcher.children(recursive=True)}
        cache = the_child(launcher, "services.cache")
        cache.send_signal(signal.SIGKILL)
        cache.wait(5)

        others = [f"127.0.0.1:{ports[n]}" for n in SERVICES if n != "cache"]
        back = f"127.0.0.1:{ports['cache']}"
        deadline = time.monotonic() + 15
        while not grpc_serving(back):
            assert all(grpc_serving(a) for a in others), "a service stopped serving while cache was down"
            assert http_healthy(edge), "the edge stopped serving while cache was down"
            assert time.monotonic() < deadline, f"cache did not come back: {err.read_text()}"
            time.sleep(0.1)
        assert "tollgate: cache exited with -9 (SIGKILL); restarting in 0.5 s" in err.read_text()
        restarted = the_child(launcher, "services.cache")
        assert restarted.pid != cache.pid
        started |= {p.pid for p in launcher.children(recursive=True)}

        # The router too: it comes back (without bootstrapping again), and the edge serves through it.
        router = the_child(launcher, "services.router")
        router.send_signal(signal.SIGKILL)
        router.wait(5)
        wait_for(lambda: grpc_serving(f"127.0.0.1:{ports['router']}") and http_healthy(edge), 30, "the router")
        assert all(grpc_serving(f"127.0.0.1:{ports[n]}") for n in ("cache", "ratelimit", "retrieval", "inference"))
        assert not (tmp_path / "bootstrap-admin.key").exists()
        assert "bootstrap" not in (tmp_path / "logs" / "router.log").read_text().rsplit("restarting in", 1)[1]
        started |= {p.pid for p in launcher.children(recursive=True)}
        assert up.poll() is None
    finally:
        started |= {p.pid for p in launcher.children(recursive=True)} if up.poll() is None else set()
        up.send_signal(signal.SIGTERM)
        code = up.wait(60)
    assert code == 0, err.read_text()
    assert "tollgate: stopped." in out.read_text()
    leftover = [pid for pid in started if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert leftover == []


def test_private_redis_is_restarted_on_its_port_with_its_data(tmp_path: Path) -> None:
    local = LocalRedis(tmp_path / "redis")
    url = local.start()
    lines: list[str] = []
    try:
        sup = Supervisor([local], RestartPolicy(initial_backoff_s=0.1), report=lines.append)
        redis.Redis.from_url(url).set("kept", "1")
        time.sleep(1.2)  # appendfsync everysec
        assert local.proc is not None
        first = local.proc.pid
        local.proc.kill()
        local.proc.wait(5)
        wait_for(lambda: (sup.tick(), local.healthy())[1], 10, "redis back")
        assert local.proc.pid != first and local.url == url
        assert redis.Redis.from_url(url).get("kept") == b"1"
        assert lines[0] == "tollgate: redis exited with -9 (SIGKILL); restarting in 0.1 s"
    finally:
        local.stop()
    assert local.proc.poll() is not None


def test_private_postgres_is_restarted_on_the_same_socket(tmp_path: Path) -> None:
    local = LocalPostgres(tmp_path / "pg")
    url = local.start()
    lines: list[str] = []
    try:
        sup = Supervisor([local], RestartPolicy(initial_backoff_s=0.1), report=lines.append)
        postmaster = local.server.get_postmaster_info().process  # type: ignore[attr-defined]
        postmaster.kill()
        postmaster.wait(5)
        wait_for(lambda: (sup.tick(), local.exit_code() is None and local.url == url)[1], 30, "postgres back")

        async def ping() -> int:
            conn = await asyncpg.connect(url)
            try:
                return int(await conn.fetchval("SELECT 1"))
            finally:
                await conn.close()

        assert asyncio.run(ping()) == 1
        assert lines[0] == "tollgate: postgres exited with an unknown code; restarting in 0.1 s"
    finally:
        local.stop()
