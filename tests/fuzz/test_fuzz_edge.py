"""Hostile HTTP against a running edge: every route and method of the Starlette app, over loopback HTTP.

The edge (uvicorn, port 0) runs in front of a real router (``services.router.server.build``: real PostgreSQL
and Redis, real ratelimit and cache services), whose inference service calls the fake provider over real
OpenAI HTTP; all of it in this module's event loop, started once. Each example is one request on one
keep-alive httpx connection.

Pass criterion for every example: no 5xx (a 504 only when the example itself asked for a deadline under a
second), and every error is an OpenAI-style JSON body ``{"error": {"message", "type", "param", "code"}}``.
After each test the edge and the router behind it still answer ``/healthz`` and ``/v1/models``.

The cases come from ``create_app(...).routes``: a new route is fuzzed without anyone listing it, a route
that takes a body needs a body strategy in :data:`BODY_STRATEGIES` (a test fails until it has one), and
:func:`test_every_fuzzed_route_reached_its_handler` fails when a route's examples never got past routing.
"""

from __future__ import annotations

import asyncio
import json
import string
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
import uvicorn
from google.rpc import error_details_pb2
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import Route
from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import router_pb2, router_pb2_grpc

from libs.errors import InvalidArgument
from libs.grpc_errors import status_proto_from_rpc
from libs.grpc_server import GrpcServer, ServiceBinding
from services.cache.server import build as build_cache
from services.cache.settings import CacheSettings
from services.edge import openai_format as fmt
from services.edge.app import create_app
from services.edge.server import uvicorn_config
from services.edge.settings import EdgeSettings
from services.ratelimit.server import build as build_ratelimit
from services.ratelimit.settings import RateLimitSettings
from services.router.control.bootstrap import DefaultModel, apply_migrations, bootstrap
from services.router.control.plane import ControlPlane
from services.router.db import create_pool
from services.router.server import build as build_router
from services.router.settings import RouterSettings
from tests.support import infra
from tests.support.fuzz import FUZZ_EXAMPLES, fuzz_settings
from tests.support.inference import inference_replica
from tools.fake_provider import FakeProvider

pytestmark = [pytest.mark.fuzz, pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.timeout(120 + FUZZ_EXAMPLES // 5)]

MODEL = "fuzz-m"
# The edge under test refuses bodies over this (the default is 16 MiB): oversized examples stay cheap.
BODY_LIMIT = 64 * 1024
CHAT = "/v1/chat/completions"
BuildFn = Callable[[Any], Awaitable[tuple[Sequence[ServiceBinding], Callable[[], Awaitable[None]]]]]


@dataclass
class Stack:
    url: str
    client: httpx.AsyncClient
    key: str
    router: router_pb2_grpc.RouterServiceStub


async def _serve(stack: AsyncExitStack, settings: Any, build: BuildFn) -> str:
    bindings, close = await build(settings)
    server = GrpcServer(settings, bindings)
    port = await server.start()
    stack.push_async_callback(close)
    stack.push_async_callback(server.stop, 0)  # LIFO: the server stops before its backends close
    return f"127.0.0.1:{port}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    db_name = infra.unique_name("tollgate_fuzz_edge")
    database_url = await infra.create_database(db_name)
    prefix = f"tgtest:{infra.unique_name('fuzzedge')}:"
    async with AsyncExitStack() as es:
        es.push_async_callback(infra.drop_database, db_name)
        es.push_async_callback(infra.delete_redis_prefix, infra.REDIS_URL, prefix)
        provider = await es.enter_async_context(FakeProvider())
        inference = await es.enter_async_context(inference_replica(provider, MODEL))
        await apply_migrations(database_url)  # first: the ratelimit service reads its limits from the database
        ratelimit = await _serve(es, RateLimitSettings(port=0, database_url=database_url, redis_url=infra.REDIS_URL,
                                                         redis_prefix=prefix), build_ratelimit)
        cache = await _serve(es, CacheSettings(port=0, semantic_enabled=False, redis_url=infra.REDIS_URL,
                                                 redis_prefix=prefix), build_cache)
        pool = await create_pool(database_url)
        try:
            await bootstrap(pool, [DefaultModel(MODEL, "fake", inference, 8192, "cheap", 100, 200, 50)])
            control = ControlPlane(pool)
            [listing] = await control.list_keys("", "")
            p = listing.record.principal
            member = await control.create_key("fuzz", org_id=p.org_id, team_id=p.team_id, name="fuzz",
                                              role="member", allowed_models=[], expires_at=None)
        finally:
            await pool.close()
        router = await _serve(es, RouterSettings(
            port=0, database_url=database_url, cache_target=cache, ratelimit_target=ratelimit,
            retrieval_target=f"127.0.0.1:{infra.free_port()}",  # the edge never asks for retrieval
            data_dir=str(tmp_path_factory.mktemp("router")), redis_url=infra.REDIS_URL, redis_prefix=prefix),
            build_router)
        settings = EdgeSettings(host="127.0.0.1", port=0, router_target=router, max_body_bytes=BODY_LIMIT)
        web = uvicorn.Server(uvicorn_config(settings))  # the production configuration (serve() keeps this loop)
        serving = asyncio.create_task(web.serve())

        async def stop_edge() -> None:
            web.should_exit = True
            await serving

        es.push_async_callback(stop_edge)
        while not web.started:
            assert not serving.done(), "the edge did not start"
            await asyncio.sleep(0.01)
        port = web.servers[0].sockets[0].getsockname()[1]
        client = await es.enter_async_context(httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30))
        channel = grpc.aio.insecure_channel(router)
        es.push_async_callback(channel.close)
        yield Stack(f"http://127.0.0.1:{port}", client, member.secret, router_pb2_grpc.RouterServiceStub(channel))


# --- the routes --------------------------------------------------------------------------------

APP: Starlette = create_app(EdgeSettings())
ROUTES: list[Route] = [r for r in APP.routes if isinstance(r, Route)]
OTHER_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


@dataclass(frozen=True)
class Case:
    route: Route | None  # None: any route (with a method it does not serve)
    method: str | None  # None: a method the route does not serve

    @property
    def id(self) -> str:
        return f"{self.method} {self.route.path}" if self.route else "other methods on every route"


CASES = [Case(r, m) for r in ROUTES for m in sorted(r.methods or ())] + [Case(None, None)]


@dataclass
class Seen:
    examples: Counter[str] = field(default_factory=Counter)
    reached: Counter[str] = field(default_factory=Counter)  # got past routing (not unknown_url / 405)
    statuses: dict[str, Counter[int]] = field(default_factory=dict)


SEEN = Seen()


# --- strategies -----------------------------------------------------------------------------------

# Unusual characters: lone surrogates, NUL and other controls, line/paragraph separators, a BOM, astral.
ODD_CHARS = ["\ud800", "\udfff", "\x00", "\x01", "\x1b", "\x7f", "\n", "\r", "\t", "\u2028", "\ufeff", "\U0001f600",
             "\u0085", "\\", '"']
texts = st.text(st.characters() | st.sampled_from(ODD_CHARS), max_size=40)
# Raw JSON tokens json.dumps cannot write, spliced in where a marker string stands.
RAW_TOKENS = ["1e309", "-1e309", "NaN", "Infinity", "-Infinity", "1" + "0" * 400, "-" + "9" * 400, "1e-400", "-0",
              "1E+2", "0.0000001", '"\\ud800"', '"\\udfff\\ud800"', '"\\ud83d\\ude00"', '"\\u0000"',
              str(2**64), str(2**32), str(-(2**63)), "1.5e308", "3.4e39"]
raw = st.sampled_from([f"@@raw{i}@@" for i in range(len(RAW_TOKENS))])
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**31, max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | texts | raw)
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=5) | st.dictionaries(texts, kids, max_size=5),
                           max_leaves=25)


def encode(value: Any, *, ascii_only: bool) -> bytes:
    """JSON bytes with the raw tokens spliced in; lone surrogates escaped (ascii) or as CESU bytes."""
    text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)
    for i, token in enumerate(RAW_TOKENS):
        text = text.replace(f'"@@raw{i}@@"', token)
    return text.encode("utf-8", "surrogatepass")


def _valid_message() -> st.SearchStrategy[dict[str, Any]]:
    content = (st.text(string.ascii_letters + " ", min_size=1, max_size=30)
               | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                 "text": st.text(string.ascii_letters + " ", max_size=20)}),
                          min_size=1, max_size=3))
    return st.fixed_dictionaries({"role": st.just("user"), "content": content},
                                 optional={"name": st.text(string.ascii_letters, min_size=1, max_size=10)})


# Fields of a valid request, each with valid values (so an unmutated request is answered 200).
VALID_OPTIONAL: dict[str, st.SearchStrategy[Any]] = {
    "temperature": st.sampled_from([0, 0.0, 0.5, 1, 2]),
    "top_p": st.sampled_from([0.1, 0.9, 1]),
    "max_tokens": st.integers(1, 16),
    "max_completion_tokens": st.integers(1, 16),
    "stop": st.sampled_from(["END", ["a", "b"], []]),
    "seed": st.integers(0, 2**63),
    "n": st.just(1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": st.text(string.ascii_letters, max_size=20),
    "fallback_models": st.just([MODEL]),
    "metadata": st.dictionaries(st.text(string.ascii_letters, min_size=1, max_size=8),
                                st.text(string.ascii_letters, max_size=8), max_size=3),
    "tollgate_cache": st.sampled_from(["no-cache", "no-store", ["no-cache", "no-store"], ""]),
    "frequency_penalty": st.just(0),
    "response_format": st.just({"type": "text"}),
}
# Where a mutation may land: top-level fields and fields of the first message.
MUTABLE = [*VALID_OPTIONAL, "model", "messages", "tools", "functions", "messages.0", "messages.0.role",
           "messages.0.content", "messages.0.name", "messages.0.content.0", "stream_options.include_usage"]
hostile_values = (json_values | raw | texts
                  | st.sampled_from([10**400, -(10**400), 2**64, -1, 0, 1.5, True, "", " ", "x" * 300,
                                     ["x"] * 300, [{"role": "user", "content": "x"}] * 257, ["s"] * 9,
                                     [MODEL] * 5, {str(i): "v" for i in range(33)}, {"k" * 65: "v"},
                                     {"k": "v" * 257}, {"k": "a\x00b"}, "a\x00b", "a\x1bb", "\ud800"]))


# Fields the edge forwards to the router, where a poisoned value must be refused (not crash a conversion).
FORWARDED = ["model", "temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "n", "user",
             "messages.0.content", "messages.0.name", "messages.0.role", "stop", "fallback_models", "metadata",
             "stream", "tollgate_cache", "stream_options.include_usage", "messages.0.content.0.text"]
poison = st.one_of(raw, st.sampled_from(["\ud800", "a\udfffb", "\x00", "a\x1bb", "\u2028", 10**400, -(10**400), 2**64,
                                         1e308, -1.0, [], {}, ["\ud800"], {"k": "\ud800"}, {"\ud800": "v"},
                                         ["x\x00"], {"k": 1e308}]))


@st.composite
def chat_bodies(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A chat body and whether it is valid: valid, near-valid (fields mutated to hostile values, or one forwarded
    field poisoned with a raw token / surrogate / control character / huge number), or arbitrary JSON."""
    kind = draw(st.sampled_from(["valid"] * 2 + ["mutated"] * 3 + ["poisoned"] * 2 + ["json"]))
    if kind == "json":
        return encode(draw(json_values), ascii_only=draw(st.booleans())), False
    data: dict[str, Any] = {"model": MODEL, "messages": draw(st.lists(_valid_message(), min_size=1, max_size=3))}
    for name in draw(st.lists(st.sampled_from(list(VALID_OPTIONAL)), max_size=5, unique=True)):
        data[name] = draw(VALID_OPTIONAL[name])
    if kind == "mutated":
        for where in draw(st.lists(st.sampled_from(MUTABLE), min_size=1, max_size=3, unique=True)):
            _mutate(data, where.split("."), draw(hostile_values) if draw(st.integers(0, 5)) else _DELETE)
    elif kind == "poisoned":
        _mutate(data, draw(st.sampled_from(FORWARDED)).split("."), draw(poison))
    return encode(data, ascii_only=draw(st.booleans())), kind == "valid"


_DELETE = object()


def _mutate(data: Any, path: list[str], value: Any) -> None:
    for step in path[:-1]:
        data = data[int(step)] if isinstance(data, list) and step.isdigit() else (
            data.get(step) if isinstance(data, dict) else None)
        if not isinstance(data, dict | list):
            return
    last = path[-1]
    if isinstance(data, list):
        if last.isdigit() and int(last) < len(data):
            if value is _DELETE:
                del data[int(last)]
            else:
                data[int(last)] = value
    elif value is _DELETE:
        data.pop(last, None)
    else:
        data[last] = value


def _deep(n: int, kind: str) -> bytes:
    if kind == "arrays":
        return b"[" * n + b"]" * n
    if kind == "objects":
        return b'{"a":' * n + b"1" + b"}" * n
    if kind == "in-field":
        return b'{"model":"' + MODEL.encode() + b'","messages":' + b"[" * n + b"]" * n + b"}"
    return b"[" * n  # unbalanced


bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=200),  # mostly invalid UTF-8 / not JSON
    st.builds(_deep, st.sampled_from([64, 129, 1_000, 100_000]), st.sampled_from(["arrays", "objects", "in-field",
                                                                                    "open"])),
    st.integers(1, 3000).map(lambda n: b'{"model":"m","pad":"' + b"x" * (BODY_LIMIT + n) + b'"}'),  # oversized
    json_values.map(lambda v: encode(v, ascii_only=True)),
)
# Mostly JSON (so most bodies get parsed), sometimes a type the edge must refuse with 415 (or reads as JSON:
# text/plain and form-urlencoded, what curl -d sends).
CONTENT_TYPES = [None] * 10 + ["application/json"] * 30 + [
    "application/json; charset=utf-8", 'application/json; charset="UTF-8"', "APPLICATION/JSON",
    "application/json; charset=latin-1", "text/plain", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", "", "application/jsonx", "*/*"]
# Header values h11 lets a client send: no NUL and no whitespace but inner spaces; controls and obs-text are in.
header_values = st.text(st.characters(min_codepoint=0x01, max_codepoint=0xFF,
                                      exclude_characters="\t\n\x0b\x0c\r \x85\xa0\x1c\x1d\x1e\x1f"),
                        min_size=1, max_size=60).map(lambda s: s.encode("latin-1"))
header_names = st.text(string.ascii_lowercase + string.digits + "-", min_size=1, max_size=20).filter(
    lambda n: n not in ("content-length", "transfer-encoding", "host", "connection", "upgrade", "expect"))


@st.composite
def auth_headers(draw: st.DrawFn, key: str) -> dict[str, bytes]:
    choice = draw(st.sampled_from(["key"] * 20 + ["none", "unknown", "basic", "empty", "long", "odd", "lower"]))
    values = {"key": f"Bearer {key}", "unknown": "Bearer tg-not-a-key", "basic": f"Basic {key}", "empty": "Bearer",
              "long": "Bearer tg-" + "a" * 5000, "lower": f"bearer {key}"}
    if choice == "none":
        return {}
    if choice == "odd":
        return {"authorization": draw(header_values)}
    return {"authorization": values[choice].encode()}


@st.composite
def requests(draw: st.DrawFn, case: Case, key: str) -> tuple[str, str, dict[str, bytes], bytes, bool, bool]:
    """(method, path, headers, body, body is a valid chat request, example asked for a sub-second deadline)."""
    route = case.route or draw(st.sampled_from(ROUTES))
    method = case.method or draw(st.sampled_from([m for m in OTHER_METHODS if m not in (route.methods or ())]))
    params = {}
    for name in route.param_convertors:
        value = draw(st.sampled_from([MODEL, "auto", "nope"]) | texts)
        params[name] = urllib.parse.quote(value.encode("utf-8", "surrogatepass"), safe="/")
    path = route.path_format.format(**params)
    if draw(st.integers(0, 9)) == 0:
        path += "?" + urllib.parse.urlencode({"q": draw(texts).encode("utf-8", "surrogatepass")})
    headers = draw(auth_headers(key))
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type is not None:
        headers["content-type"] = content_type.encode()
    if draw(st.integers(0, 19)) == 0:
        headers["content-encoding"] = draw(st.sampled_from([b"gzip", b"identity", b"br", b"x"]))
    short_deadline = False
    if draw(st.integers(0, 4)) == 0:
        timeout = draw(st.sampled_from(["nan", "inf", "-inf", "-1", "0", "abc", "1e400", "30", "0.000001", "0.2"])
                       | st.floats().map(str) | header_values.map(lambda b: b.decode("latin-1")))
        headers["x-request-timeout"] = timeout.encode("latin-1")
        with suppress(ValueError):
            short_deadline = 0 < float(timeout) < 1
    if draw(st.integers(0, 9)) == 0:
        headers[fmt.CACHE_HEADER] = draw(st.sampled_from([b"no-cache", b"no-store, no-cache", b"sometimes"])
                                         | header_values)
    odd_headers = draw(st.integers(1, 2)) if draw(st.integers(0, 7)) == 0 else 0
    for _ in range(odd_headers):
        headers[draw(header_names)] = draw(header_values)
    body_strategy = BODY_STRATEGIES.get((route.path, method))
    valid = False
    if body_strategy is not None and draw(st.integers(0, 5)):
        body, valid = draw(body_strategy)
    else:
        body = draw(bodies) if draw(st.booleans()) or method in ("POST", "PUT", "PATCH") else b""
    plain = (headers.get("authorization") == f"Bearer {key}".encode() and content_type in (None, "application/json")
             and "content-encoding" not in headers and "x-request-timeout" not in headers
             and fmt.CACHE_HEADER not in headers and not odd_headers)
    return method, path, headers, body, valid and plain, short_deadline


# Routes that take a body: (path, method) -> a strategy of (body, valid). A new one must be added here.
BODY_STRATEGIES: dict[tuple[str, str], st.SearchStrategy[tuple[bytes, bool]]] = {(CHAT, "POST"): chat_bodies()}
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


# --- checks ---------------------------------------------------------------------------------------

def check_response(case: Case, method: str, response: httpx.Response, *, valid: bool, short_deadline: bool) -> None:
    where = f"{method} {response.request.url.raw_path!r} -> {response.status_code}: {response.content[:300]!r}"
    status = response.status_code
    if status >= 500:
        assert short_deadline and status == 504, f"5xx for a client's input: {where}"
    if valid:
        assert status == 200, f"a valid request was refused: {where}"
    SEEN.statuses.setdefault(case.id, Counter())[status] += 1
    assert response.headers.get("x-request-id"), f"no x-request-id: {where}"
    if status < 400:
        SEEN.reached[case.id] += 1
        if status == 200 and method == "POST" and response.headers.get("content-type", "").startswith(
                "text/event-stream"):
            frames = [f for f in response.text.split("\n\n") if f]
            assert frames and (frames[-1] == "data: [DONE]" or '"error"' in frames[-1]), where
        return
    if method == "HEAD":  # no body to check
        SEEN.reached[case.id] += status != 404
        return
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"the error is not JSON: {where}") from None
    assert isinstance(body, dict) and set(body) == {"error"}, where
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code", "request_id"}, where
    assert error["request_id"] == response.headers.get("x-request-id") and error["request_id"], where
    assert isinstance(error["message"], str) and error["message"], where
    assert error["type"] in ("invalid_request_error", "authentication_error", "permission_error",
                             "rate_limit_error", "server_error"), where
    assert error["param"] is None or isinstance(error["param"], str), where
    assert error["code"] is None or isinstance(error["code"], str), where
    if status == 400 and error["code"] == "invalid_value":
        assert error["param"], f"a field violation names no param: {where}"
    if error["code"] not in ("unknown_url", "method_not_allowed"):
        SEEN.reached[case.id] += 1


async def still_serving(s: Stack) -> None:
    health = await s.client.get("/healthz")
    assert health.status_code == 200, health.text
    models = await s.client.get("/v1/models", headers={"authorization": f"Bearer {s.key}"})
    assert models.status_code == 200 and MODEL in {m["id"] for m in models.json()["data"]}, models.text


# --- the fuzz tests -------------------------------------------------------------------------------

@pytest_asyncio.fixture(loop_scope="module")
async def checked(stack: Stack) -> AsyncIterator[Stack]:
    """The stack, and after the test's examples: the edge and the router behind it still answer."""
    yield stack
    await still_serving(stack)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@fuzz_settings()
@given(data=st.data())
async def test_fuzz_route(checked: Stack, case: Case, data: st.DataObject) -> None:
    method, path, headers, body, valid, short_deadline = data.draw(requests(case, checked.key), label="request")
    response = await checked.client.request(method, path, headers={k.encode(): v for k, v in headers.items()},
                                            content=body)
    SEEN.examples[case.id] += 1
    check_response(case, method, response, valid=valid, short_deadline=short_deadline)


async def test_still_serving_after_the_fuzzing(stack: Stack) -> None:
    await still_serving(stack)


async def test_every_route_has_a_fuzz_case_and_a_body_strategy() -> None:
    assert len(ROUTES) == len(APP.routes), "a route that is not a starlette Route (Mount, WebSocket) is not fuzzed"
    assert {(r.path, m) for r in ROUTES for m in r.methods or ()} <= {(c.route.path, c.method) for c in CASES
                                                                       if c.route is not None}
    missing = [(r.path, m) for r in ROUTES for m in r.methods or () if m in BODY_METHODS
               and (r.path, m) not in BODY_STRATEGIES]
    assert not missing, f"routes that take a body but have no body strategy here: {missing}"
    assert {(CHAT, "POST"), ("/v1/models", "GET"), ("/healthz", "GET")} <= {(r.path, m) for r in ROUTES
                                                                           for m in r.methods or ()}


async def test_every_fuzzed_route_reached_its_handler() -> None:
    # Runs after the fuzz tests (file order): each case that ran got past routing in some of its examples,
    # and the chat route answered some valid requests with 200 (the router and the provider were reached).
    ran = [c for c in CASES if SEEN.examples[c.id]]
    if not ran:
        pytest.skip("no fuzz case ran in this session")
    for case in ran:
        assert SEEN.examples[case.id] >= min(FUZZ_EXAMPLES, 100), (case.id, SEEN.examples[case.id])
        if case.route is not None:
            assert SEEN.reached[case.id], f"{case.id}: no example got past routing: {SEEN.statuses[case.id]}"
    chat = f"POST {CHAT}"
    if SEEN.examples[chat]:
        assert SEEN.statuses[chat][200] >= min(10, FUZZ_EXAMPLES // 20), SEEN.statuses[chat]
    print({case: dict(statuses) for case, statuses in SEEN.statuses.items()})


# --- the edge's limits agree with the router's ------------------------------------------------------

def _at_limit(field_name: str) -> dict[str, Any]:
    one = {"role": "user", "content": "x"}
    base: dict[str, Any] = {"model": MODEL, "messages": [one]}
    at: dict[str, dict[str, Any]] = {
        "messages": {"messages": [one] * fmt.MAX_MESSAGES},
        "messages_chars": {"messages": [{"role": "user", "content": "x" * (fmt.MAX_MESSAGE_CHARS // 2)}] * 2},
        "message_name": {"messages": [{**one, "name": "n" * fmt.MAX_MESSAGE_NAME_CHARS}]},
        "stop": {"stop": [f"s{i}" for i in range(fmt.MAX_STOP)]},
        "stop_chars": {"stop": ["s" * fmt.MAX_STOP_CHARS]},
        "model": {"model": "m" * fmt.MAX_MODEL_NAME_CHARS},
        "fallback_models": {"fallback_models": [MODEL] * fmt.MAX_FALLBACK_MODELS},
        "user": {"user": "u" * fmt.MAX_USER_CHARS},
        "metadata": {"metadata": {f"k{i}": "v" for i in range(fmt.LIMITS["metadata_entries"])}},
        "metadata_key": {"metadata": {"k" * fmt.LIMITS["metadata_key_chars"]: "v"}},
        "metadata_value": {"metadata": {"k": "v" * fmt.LIMITS["metadata_value_chars"]}},
    }
    return {**base, **at[field_name]}


def _one_more(field_name: str, body: dict[str, Any]) -> dict[str, Any]:
    """The body with one more of what ``field_name`` limits (a message, a character, an entry)."""
    out: dict[str, Any] = json.loads(json.dumps(body))
    if field_name == "messages":
        out["messages"].append(out["messages"][0])
    elif field_name == "messages_chars":
        out["messages"][0]["content"] += "x"
    elif field_name == "message_name":
        out["messages"][0]["name"] += "n"
    elif field_name == "stop":
        out["stop"].append("one-more")
    elif field_name == "stop_chars":
        out["stop"][0] += "s"
    elif field_name == "model":
        out["model"] += "m"
    elif field_name == "fallback_models":
        out["fallback_models"].append(MODEL)
    elif field_name == "user":
        out["user"] += "u"
    elif field_name == "metadata":
        out["metadata"]["one-more"] = "v"
    elif field_name == "metadata_key":
        out["metadata"] = {"k" * (fmt.LIMITS["metadata_key_chars"] + 1): "v"}
    else:
        out["metadata"]["k"] += "v"
    return out


def _as_input(body: dict[str, Any]) -> router_pb2.GenerationInput:
    """What the edge would send for ``body``, built without the edge's checks (to ask the router directly)."""
    inp = router_pb2.GenerationInput(model=body["model"], fallback_models=body.get("fallback_models", []),
                                     user_id=body.get("user", ""), labels=body.get("metadata", {}))
    for m in body["messages"]:
        inp.messages.add(role=common_pb2.MESSAGE_ROLE_USER, content=m["content"], name=m.get("name", ""))
    inp.params.stop.extend(body.get("stop", []))
    return inp


# (limit, the OpenAI parameter the edge names, the router's field (a prefix of it))
LIMIT_FIELDS = [
    ("messages", "messages", "input.messages"), ("messages_chars", "messages", "input.messages"),
    ("message_name", "messages[0].name", "input.messages[0].name"), ("stop", "stop", "input.params.stop"),
    ("stop_chars", "stop[0]", "input.params.stop[0]"), ("model", "model", "input.model"),
    ("fallback_models", "fallback_models", "input.fallback_models"), ("user", "user", "input.user_id"),
    ("metadata", "metadata", "input.labels"), ("metadata_key", "metadata['" + "k" * 64 + "']", "input.labels"),
    ("metadata_value", "metadata['k']", "input.labels")]


async def _router_violations(s: Stack, inp: router_pb2.GenerationInput) -> set[str]:
    """The fields the router's validation names for ``inp`` (with temperature 5, so it always refuses and
    nothing is generated)."""
    inp.params.temperature = 5
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await s.router.Generate(router_pb2.GenerateRequest(input=inp), timeout=10,
                                metadata=(("authorization", f"Bearer {s.key}"),))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    status = status_proto_from_rpc(info.value)
    assert status is not None
    fields = set()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields |= {v.field for v in bad.field_violations}
    assert "input.params.temperature" in fields
    return fields


@pytest.mark.parametrize(("limit", "param", "router_field"), LIMIT_FIELDS, ids=[f[0] for f in LIMIT_FIELDS])
async def test_the_edge_refuses_past_the_routers_limits_and_the_router_agrees(
        stack: Stack, limit: str, param: str, router_field: str) -> None:
    at_limit, over = _at_limit(limit), _one_more(limit, _at_limit(limit))
    fmt.chat_request(json.dumps(at_limit).encode())  # the edge takes the request at the limit...
    assert not {f for f in await _router_violations(stack, _as_input(at_limit)) if f.startswith(router_field)}
    # ...and so does the router; one more, and the router refuses it...
    assert {f for f in await _router_violations(stack, _as_input(over)) if f.startswith(router_field)}
    with pytest.raises(InvalidArgument) as refused:  # ...and so does the edge, naming the OpenAI parameter
        fmt.chat_request(json.dumps(over).encode())
    assert fmt.error_reply(refused.value).body["error"]["param"] == param


async def test_router_field_violations_come_back_as_400_naming_the_openai_param(stack: Stack) -> None:
    auth = {"authorization": f"Bearer {stack.key}"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"temperature": 5}, "temperature"), ({"max_tokens": 10**6}, "max_tokens"), ({"messages": []}, "messages"),
        ({"model": ""}, "model"), ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role")]
    for fields, param in cases:
        response = await stack.client.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                      **fields}, headers=auth)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param, response.text
        assert response.json()["error"]["code"] == "invalid_value"
    await still_serving(stack)
