"""The HTTP routes: OpenAI JSON in, RouterService over one long-lived gRPC channel, OpenAI JSON / SSE out.

No business logic: authentication, validation of values, limits, caching and routing are the
router's; the edge refuses what cannot be a request (malformed or oversized, see
:mod:`services.edge.openai_format`) and bodies over ``max_body_bytes`` before reading them all. This
module moves bytes between the two protocols (via :mod:`services.edge.openai_format`) and ties
the gRPC call's life to the HTTP client's: a client that disconnects cancels the call, so the
router settles the request as cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tollgate.router.v1 import router_pb2, router_pb2_grpc

from libs.clients import CLIENT_IP_METADATA, REQUEST_ID_METADATA, open_channel
from libs.errors import TollgateError, Unauthenticated
from libs.grpc_errors import domain_error_from_rpc
from services.edge import openai_format as fmt
from services.edge.settings import EdgeSettings

log = logging.getLogger(__name__)

_JSON = "application/json"
_ROUTER_SERVICE = "tollgate.router.v1.RouterService"
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
# A tollgate key is about 50 characters: anything much longer is not one (and could pass gRPC's metadata limit).
MAX_AUTHORIZATION_CHARS = 1024


def _error_response(reply: fmt.ErrorReply) -> Response:
    """The error as JSON; one without a request id (refused at the edge) gets a new one."""
    if reply.request_id is None:
        reply = reply.with_request_id(fmt.new_request_id())
    return Response(fmt.dumps(reply.body), status_code=reply.status, headers=reply.headers, media_type=_JSON)


def _metadata_request_id(metadata: Any) -> str | None:
    for name, value in metadata or ():
        if name == REQUEST_ID_METADATA and isinstance(value, str) and value:
            return value
    return None


def _rpc_error(err: grpc.aio.AioRpcError, request_id: str | None = None) -> fmt.ErrorReply:
    """The router's error, naming the router's request id (its trailer), else ``request_id``, else a new one
    (no router answered: unreachable, or the edge's deadline passed first)."""
    rid = _metadata_request_id(err.trailing_metadata()) or request_id or fmt.new_request_id()
    return fmt.error_reply(domain_error_from_rpc(err), err.code().name).with_request_id(rid)


class RequestIds:
    """ASGI middleware: every HTTP response carries ``x-request-id`` (routes that know the router's id set
    it; anything else gets a new one), and a well-formed client ``x-request-id`` comes back as
    ``x-client-request-id``."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        theirs = next((v for k, v in scope["headers"] if k == fmt.REQUEST_ID_HEADER.encode()), None)
        echo = fmt.client_request_id(theirs.decode("latin-1")) if theirs is not None else None

        async def send_with_ids(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(k.lower() == fmt.REQUEST_ID_HEADER.encode() for k, _ in headers):
                    headers.append((fmt.REQUEST_ID_HEADER.encode(), fmt.new_request_id().encode()))
                if echo is not None:
                    headers.append((fmt.CLIENT_REQUEST_ID_HEADER.encode(), echo.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_ids)


class _TooLarge(Exception):
    pass


class _GrpcStreamResponse(StreamingResponse):
    """A StreamingResponse that cancels its gRPC call however the response ends (done, error, disconnect)."""

    def __init__(self, content: AsyncIterator[bytes], call: grpc.aio.UnaryStreamCall[Any, Any], request_id: str):
        super().__init__(content, media_type="text/event-stream",
                         headers={**_SSE_HEADERS, fmt.REQUEST_ID_HEADER: request_id})
        self._call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._call.cancel()  # a no-op when the call has finished


async def _cancel_on_disconnect(receive: Receive, call: grpc.aio.Call) -> None:
    """Wait for the client to go away (the body has been read), then cancel the call."""
    while (await receive())["type"] != "http.disconnect":
        pass
    call.cancel()


class Edge:
    """The routes and the router channel they share (opened at start-up, closed at shutdown)."""

    def __init__(self, settings: EdgeSettings, channel_factory: Callable[[str], grpc.aio.Channel] = open_channel):
        self.settings = settings
        self._channel_factory = channel_factory
        self._channel: grpc.aio.Channel | None = None
        self._router: router_pb2_grpc.RouterServiceStub | None = None
        self._health: health_pb2_grpc.HealthStub | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        channel = self._channel_factory(self.settings.router_target)
        channel.get_state(try_to_connect=True)  # connect now, not on the first request
        self._channel = channel
        self._router = router_pb2_grpc.RouterServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        log.info("edge: routing to %s", self.settings.router_target)
        try:
            yield
        finally:
            self._router = self._health = self._channel = None
            await channel.close()
            log.info("edge: router channel closed")

    @property
    def router(self) -> router_pb2_grpc.RouterServiceStub:
        assert self._router is not None, "the app's lifespan has not started"
        return self._router

    # --- helpers ------------------------------------------------------------------

    async def _body(self, request: Request) -> bytes:
        """The body, refused (``_TooLarge``) as soon as it passes the limit: a declared Content-Length over it
        is refused before a byte is read, a chunked body once the bytes read so far pass it. What is left
        unread is drained and dropped by uvicorn, so the client still gets its 413."""
        limit = self.settings.max_body_bytes
        length = request.headers.get("content-length")
        # len() first: int() of a long digit string is slow, and refused past 4300 digits.
        if length is not None and length.isascii() and length.isdigit() and (len(length) > 18 or int(length) > limit):
            raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _TooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self) -> Response:
        return _error_response(fmt.error_body(413, f"the request body exceeds {self.settings.max_body_bytes} bytes",
                                              "invalid_request_error", code="request_too_large"))

    @staticmethod
    def _metadata(request: Request) -> tuple[tuple[str, str], ...]:
        # The caller's address, for the router's client-IP limits (it trusts this only from its trusted
        # proxies); set from the connection, never copied from a header the caller could forge.
        client = ((CLIENT_IP_METADATA, request.client.host),) if request.client is not None else ()
        auth = request.headers.get("authorization")
        if auth is None:
            return client
        # gRPC metadata must be printable ASCII, and the router accepts at most 8 KiB of it.
        if not (auth.isascii() and auth.isprintable()) or len(auth) > MAX_AUTHORIZATION_CHARS:
            raise Unauthenticated("the Authorization header is malformed")
        return (("authorization", auth), *client)

    def _timeout(self, request: Request) -> float:
        return fmt.request_timeout(request.headers.get("x-request-timeout"),
                                   default_s=self.settings.default_timeout_s, max_s=self.settings.max_timeout_s)

    # --- routes -------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        unsupported = fmt.unsupported_media(request.headers.get("content-type"),
                                            request.headers.get("content-encoding"))
        if unsupported is not None:
            return _error_response(unsupported)
        try:
            body = await self._body(request)
            call = fmt.chat_request(body, cache_header=request.headers.get(fmt.CACHE_HEADER))
            metadata = self._metadata(request)
            timeout = self._timeout(request)
        except _TooLarge:
            return self._too_large()
        except ClientDisconnect:  # gone while sending the body: nobody to answer
            return Response(status_code=499)
        except TollgateError as exc:
            return _error_response(fmt.error_reply(exc))
        if call.stream:
            return await self._stream(request, call, metadata, timeout)
        unary = self.router.Generate(router_pb2.GenerateRequest(input=call.input), metadata=metadata,
                                     timeout=timeout)
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request.receive, unary))
        try:
            resp = await unary
        except grpc.aio.AioRpcError as err:
            return _error_response(_rpc_error(err))
        except asyncio.CancelledError:
            if watcher.done():  # the client went away and the call was cancelled: nobody to answer
                return Response(status_code=499)
            raise
        finally:
            watcher.cancel()
        return Response(fmt.dumps(fmt.completion(resp, int(time.time()))), media_type=_JSON,
                        headers={fmt.REQUEST_ID_HEADER: resp.summary.request_id})

    async def _stream(self, request: Request, call: fmt.ChatCall, metadata: tuple[tuple[str, str], ...],
                      timeout_s: float) -> Response:
        stream = self.router.GenerateStream(router_pb2.GenerateStreamRequest(input=call.input), metadata=metadata,
                                            timeout=timeout_s)
        # Errors before the first event (auth, validation, limits) are plain HTTP errors.
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request.receive, stream))
        try:
            first = await stream.read()
        except grpc.aio.AioRpcError as err:
            return _error_response(_rpc_error(err))
        except asyncio.CancelledError:
            stream.cancel()
            if watcher.done():  # the client went away
                return Response(status_code=499)
            raise
        except BaseException:
            stream.cancel()
            raise
        finally:
            watcher.cancel()
        # The router sends its id as initial metadata before the first event.
        rid = _metadata_request_id(await stream.initial_metadata()) or fmt.new_request_id()
        if first is grpc.aio.EOF:  # the router always ends with a summary; this is a bug somewhere
            log.error("edge: the router's stream ended without a summary (request %s)", rid)
            return _error_response(fmt.error_reply(TollgateError("empty stream"), "INTERNAL").with_request_id(rid))
        encoder = fmt.ChunkEncoder("chatcmpl-" + rid, call.input.model, int(time.time()))
        return _GrpcStreamResponse(self._events(stream, first, encoder, call.include_usage, rid), stream, rid)

    @staticmethod
    async def _events(stream: grpc.aio.UnaryStreamCall[Any, router_pb2.GenerateStreamResponse],
                      first: router_pb2.GenerateStreamResponse, encoder: fmt.ChunkEncoder,
                      include_usage: bool, request_id: str) -> AsyncIterator[bytes]:
        event: Any = first
        try:
            while event is not grpc.aio.EOF:
                if event.WhichOneof("event") == "delta":
                    yield encoder.delta(event.delta)
                else:
                    yield encoder.finish(event.summary, include_usage=include_usage)
                event = await stream.read()
        except grpc.aio.AioRpcError as err:
            # The response has started: the error goes in the stream, then it closes (no [DONE]).
            yield _rpc_error(err, request_id).sse()

    async def _list_models(self, request: Request) -> router_pb2.ListAvailableModelsResponse | Response:
        try:
            metadata, timeout = self._metadata(request), self._timeout(request)
            resp: router_pb2.ListAvailableModelsResponse = await self.router.ListAvailableModels(
                router_pb2.ListAvailableModelsRequest(), metadata=metadata, timeout=timeout)
        except TollgateError as exc:
            return _error_response(fmt.error_reply(exc))
        except grpc.aio.AioRpcError as err:
            return _error_response(_rpc_error(err))
        return resp

    async def models(self, request: Request) -> Response:
        resp = await self._list_models(request)
        if isinstance(resp, Response):
            return resp
        return Response(fmt.dumps(fmt.models_list(resp)), media_type=_JSON)

    async def model(self, request: Request) -> Response:
        resp = await self._list_models(request)
        if isinstance(resp, Response):
            return resp
        wanted = request.path_params["model"]
        for m in resp.models:
            if m.name == wanted:
                return Response(fmt.dumps(fmt.model_object(m)), media_type=_JSON)
        return _error_response(fmt.error_body(404, f"The model {wanted!r} does not exist or you do not have "
                                                   "access to it.", "invalid_request_error", param="model",
                                              code="model_not_found"))

    async def healthz(self, _request: Request) -> Response:
        assert self._health is not None
        try:
            resp = await self._health.Check(health_pb2.HealthCheckRequest(service=_ROUTER_SERVICE),
                                            timeout=self.settings.health_timeout_s)
            serving = resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            serving = False
        if serving:
            return Response(b'{"status":"serving"}', media_type=_JSON)
        return Response(b'{"status":"router not serving"}', status_code=503, media_type=_JSON)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        reply = fmt.error_body(404, f"Unknown request URL: {request.method} {request.url.path}.",
                               "invalid_request_error", code="unknown_url")
    elif exc.status_code == 405:
        reply = fmt.error_body(405, f"Method {request.method} is not allowed on {request.url.path}.",
                               "invalid_request_error", code="method_not_allowed")
    else:
        reply = fmt.error_body(exc.status_code, str(exc.detail), "invalid_request_error")
    return _error_response(reply)


async def _unexpected(_request: Request, _exc: Exception) -> Response:
    # Starlette re-raises the exception after this response is sent, and uvicorn logs it with its traceback.
    return _error_response(fmt.error_reply(TollgateError("unexpected"), "INTERNAL"))


def create_app(settings: EdgeSettings, *, edge: Edge | None = None) -> Starlette:
    edge = edge or Edge(settings)
    return Starlette(
        routes=[
            Route("/v1/chat/completions", edge.chat_completions, methods=["POST"]),
            Route("/v1/models", edge.models, methods=["GET"]),
            Route("/v1/models/{model:path}", edge.model, methods=["GET"]),
            Route("/healthz", edge.healthz, methods=["GET"]),
        ],
        middleware=[Middleware(RequestIds)],
        exception_handlers={HTTPException: _http_error, Exception: _unexpected},
        lifespan=edge.lifespan,
    )
