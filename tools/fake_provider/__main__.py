"""``python -m tools.fake_provider --port 50060``: the fake LLM provider as a process."""

from __future__ import annotations

import argparse

import uvicorn

from tools.fake_provider.app import DEFAULT_MODELS, create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.fake_provider", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50060)
    parser.add_argument("--api-key", default=None, help="require this key (Bearer / x-api-key); default: any")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="names listed by GET /v1/models")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    app = create_app(api_key=args.api_key, models=models)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                timeout_graceful_shutdown=2)


main()
