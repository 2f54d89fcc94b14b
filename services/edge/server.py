"""Edge process: the Starlette app on uvicorn (uvloop event loop, httptools parser).

uvicorn handles SIGTERM/SIGINT: it stops accepting, lets in-flight requests finish for
``TOLLGATE_EDGE_GRACE_PERIOD_S``, then runs the app's lifespan shutdown, which closes the
router channel.
"""

from __future__ import annotations

import uvicorn

from libs.settings import load_settings
from libs.telemetry import configure_logging
from services.edge.app import create_app
from services.edge.settings import EdgeSettings


def uvicorn_config(settings: EdgeSettings) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port,
        loop="uvloop", http="httptools", ws="none", interface="asgi3", lifespan="on",
        # Our logging configuration (libs.telemetry), no access log: nothing is logged per request.
        log_config=None, access_log=False, log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.grace_period_s), timeout_keep_alive=settings.keep_alive_s,
        server_header=False, proxy_headers=False,
    )


def main() -> None:
    settings = load_settings(EdgeSettings)
    configure_logging(settings.log_level, "edge")
    uvicorn.Server(uvicorn_config(settings)).run()
