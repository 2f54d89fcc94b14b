"""Edge process: the Starlette app on uvicorn (uvloop event loop, httptools parser).

uvicorn handles SIGTERM/SIGINT: it stops accepting, lets in-flight requests finish for
``TOLLGATE_EDGE_GRACE_PERIOD_S``, then runs the app's lifespan shutdown, which closes the
router channel.
"""

from __future__ import annotations

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from libs.settings import load_settings
from libs.telemetry import configure_logging
from services.edge import openai_format as fmt
from services.edge.app import create_app
from services.edge.settings import EdgeSettings


class EdgeHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, except that a request it cannot parse (a control character in a header,
    a malformed request line) gets an OpenAI-style JSON error like every other error, not plain text."""

    def send_400_response(self, msg: str) -> None:
        request_id = fmt.new_request_id()
        body = fmt.dumps(fmt.error_body(400, "the HTTP request is malformed and could not be parsed",
                                        "invalid_request_error", code="invalid_http_request")
                         .with_request_id(request_id).body)
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                 b"x-request-id: " + request_id.encode() + b"\r\n",
                 b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def uvicorn_config(settings: EdgeSettings) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port,
        loop="uvloop", http=EdgeHttpProtocol, ws="none", interface="asgi3", lifespan="on",
        # Our logging configuration (libs.telemetry), no access log: nothing is logged per request.
        log_config=None, access_log=False, log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.grace_period_s), timeout_keep_alive=settings.keep_alive_s,
        server_header=False, proxy_headers=False,
    )


def main() -> None:
    settings = load_settings(EdgeSettings)
    configure_logging(settings.log_level, "edge")
    uvicorn.Server(uvicorn_config(settings)).run()
