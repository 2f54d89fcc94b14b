"""The ``tollgate`` command: ``up`` serves the mesh, ``demo`` runs a scripted tour through it."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

from ops.launcher import LauncherSettings, Mesh, MeshFailed, Supervisor, free_port

# Prices a fresh deployment starts with (nano-USD per million tokens); admins change them with SetPrice.
# Self-hosted: a nominal amortized hardware cost. HTTP provider: like a small hosted model.
_PRICES = {"vllm": (10_000_000, 30_000_000, 5_000_000), "http": (150_000_000, 600_000_000, 75_000_000)}


def default_models(s: LauncherSettings) -> list[dict[str, object]]:
    """The model the mesh serves, with its price: what the router bootstraps (TOLLGATE_ROUTER_BOOTSTRAP_MODELS_JSON,
    the fields of its control.bootstrap.DefaultModel)."""
    kind = "vllm" if s.inference_engine == "vllm" else "http"
    inp, out, cached = _PRICES[kind]
    return [{"name": s.served_model_name, "provider": s.inference_engine,
             "inference_target": ",".join(s.inference_targets),
             "context_window": 2048 if kind == "vllm" else 8192, "cost_tier": "cheap",
             "input_per_mtok": inp, "output_per_mtok": out, "cached_input_per_mtok": cached}]


def start_mesh(settings: LauncherSettings) -> tuple[Mesh, str | None]:
    """Start the mesh; its router bootstraps itself (schema, default org, team, model and price) before it
    serves. Returns the mesh and the admin key the router created (None if one existed)."""
    mesh = Mesh(settings)
    try:
        mesh.start(bootstrap_models=default_models(settings))
        return mesh, mesh.take_bootstrap_key()
    except BaseException:
        mesh.stop()
        mesh.bootstrap_key_file.unlink(missing_ok=True)  # a secret no one will read stays on no disk
        raise


def _stop_requested() -> list[str]:
    """A list that gets the signal's name on SIGINT or SIGTERM. Installed explicitly: a shell starts
    background jobs with SIGINT ignored, and Python would then never raise KeyboardInterrupt."""
    received: list[str] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signal.Signals(signum).name))
    return received


def cmd_up(_: argparse.Namespace) -> int:
    settings = LauncherSettings()
    print(f"tollgate: starting the mesh (data in {settings.data_dir.resolve()}) …", flush=True)
    mesh, admin_key = start_mesh(settings)
    try:
        print(f"\ntollgate is serving. Router: {mesh.router_address}")
        print(f"  services : router {settings.router_port}, cache {settings.cache_port}, "
              f"ratelimit {settings.ratelimit_port}, retrieval {settings.retrieval_port}, "
              f"inference {', '.join(map(str, settings.inference_ports))}, edge {settings.edge_port}")
        print(f"  edge     : {mesh.edge_url}/v1  (OpenAI-compatible HTTP)")
        for name, private in (("redis", mesh.redis), ("postgres", mesh.postgres)):
            where = f"private, under {settings.data_dir / name}" if private else "external"
            print(f"  {name:<9}: {where}")
        if settings.inference_engine == "vllm":
            print(f"  model    : {settings.served_model_name} on vLLM in-process (CPU build)")
        elif not settings.provider_base_url:
            print(f"  model    : {settings.served_model_name} via the bundled fake provider")
        print(f"  logs     : {settings.data_dir / 'logs'}")
        if admin_key:
            print(f"\n  Bootstrap admin key (shown once, stored only as a hash):\n    {admin_key}\n")
        print(f"  try: grpcurl -plaintext {mesh.router_address} list")
        print(f"       curl {mesh.edge_url}/v1/models -H 'authorization: Bearer <key>'")
        print("  A part that exits is restarted (backoff 0.5 s to 30 s); Ctrl-C stops everything.", flush=True)
        stop = _stop_requested()
        supervisor = Supervisor(mesh.supervised())
        while not stop:
            try:
                supervisor.tick()
            except MeshFailed as exc:
                print(f"tollgate: {exc}; stopping the mesh", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.2)
        print(f"\ntollgate: {stop[0]} received, stopping …", flush=True)
        return 0
    finally:
        mesh.stop()
        print("tollgate: stopped.", flush=True)


def cmd_demo(_: argparse.Namespace) -> int:
    from ops.demo import run_demo

    with tempfile.TemporaryDirectory(prefix="tollgate-demo-") as tmp:
        env_ports = {name: free_port() for name in ("router", "cache", "ratelimit", "retrieval", "inference", "edge")}
        settings = LauncherSettings(data_dir=Path(tmp), redis_url="", database_url="",
                                    fake_provider_port=free_port()).model_copy(
            update={f"{name}_port": port for name, port in env_ports.items()})
        print("tollgate demo: starting a private mesh …", flush=True)
        mesh, admin_key = start_mesh(settings)
        try:
            assert admin_key is not None
            return asyncio.run(run_demo(mesh.router_address, admin_key, settings.served_model_name))
        finally:
            mesh.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tollgate", description="cost-aware LLM gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="serve the whole mesh on this machine").set_defaults(func=cmd_up)
    sub.add_parser("demo", help="start a private mesh, send scripted requests, stop").set_defaults(func=cmd_demo)
    from ops.admin_cli import register as register_admin_commands

    register_admin_commands(sub)
    args = parser.parse_args(argv)
    sys.exit(args.func(args))
