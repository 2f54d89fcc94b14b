"""Processes for ``make bench-gateway``: the fake upstream (nginx), the LiteLLM proxy, and the load tool (wrk).

Everything listens on loopback ports picked at start; everything started here is stopped by ``stop()``
(callers use ``try/finally``). Nothing here imports tollgate's services: it is the neutral ground both
gateways are measured on.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ops.launcher import REPO_ROOT, free_port

LITELLM_VENV = REPO_ROOT / ".tollgate" / "bench" / "litellm-venv"
LITELLM_VERSION = "1.106.2"
LITELLM_CONSTRAINTS = Path(__file__).with_name("litellm-constraints.txt")
UPSTREAM_MODEL = "bench-upstream"
# The same answer and usage in both upstream bodies (JSON for LiteLLM, SSE for tollgate's engine).
ANSWER_PARTS = ["The ", "gateway ", "answered ", "this ", "from ", "a ", "fixed ", "upstream."]
USAGE = {"prompt_tokens": 14, "completion_tokens": len(ANSWER_PARTS), "total_tokens": 14 + len(ANSWER_PARTS)}
_CREATED = 1700000000


class HarnessError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------- tools


def ensure_tools() -> None:
    """nginx and wrk from Debian when missing (needs root and apt); says what it does."""
    missing = [name for name in ("nginx", "wrk") if shutil.which(name) is None]
    if not missing:
        return
    apt = shutil.which("apt-get")
    if apt is None:
        raise HarnessError(f"{' and '.join(missing)} not found and apt-get is unavailable: install nginx "
                           "(or nginx-light) and wrk with your package manager, then re-run")
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if prefix and shutil.which("sudo") is None:
        raise HarnessError(f"{' and '.join(missing)} not found; as root run: apt-get install -y nginx-light wrk")
    install = [*prefix, apt, "install", "-y", "--no-install-recommends", "nginx-light", "wrk"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"bench-gateway: {' and '.join(missing)} missing; running: {' '.join(install)}", flush=True)
    if subprocess.run(install, env=env).returncode != 0:
        print("bench-gateway: install failed; running apt-get update and retrying", flush=True)
        subprocess.run([*prefix, apt, "update"], env=env, check=False)
        if subprocess.run(install, env=env).returncode != 0:
            raise HarnessError(f"could not install {' and '.join(missing)} with: {' '.join(install)}")
    still = [name for name in ("nginx", "wrk") if shutil.which(name) is None]
    if still:
        raise HarnessError(f"{' and '.join(still)} still not on PATH after apt-get install")


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def nginx_version() -> str:
    return tool_version(["nginx", "-v"]).removeprefix("nginx version: ")


def wrk_version() -> str:
    m = re.search(r"wrk (\S+)", tool_version(["wrk", "-v"]))
    return m.group(1) if m else "unknown"


def ensure_litellm(venv: Path = LITELLM_VENV) -> Path:
    """A venv with ``litellm[proxy]`` (created once, reused); returns its ``litellm`` executable."""
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    venv.parent.mkdir(parents=True, exist_ok=True)
    print(f"bench-gateway: installing litellm[proxy] into {venv} (once) …", flush=True)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # Pinned, dependencies included: the baseline must not move with an upstream release.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(LITELLM_CONSTRAINTS)]
    subprocess.run([*pip, "pip"], check=True)
    if subprocess.run([*pip, f"litellm[proxy]=={LITELLM_VERSION}"]).returncode != 0 or not exe.exists():
        raise HarnessError(f"pip install 'litellm[proxy]' into {venv} failed (see above)")
    return exe


def litellm_version(venv: Path = LITELLM_VENV) -> str:
    """The installed package's version (``litellm --version`` prints banners around it)."""
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or "unknown"


# --------------------------------------------------------------------------------------------- process


def _stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float = 15.0) -> None:
    """SIGTERM the process group we created (uvicorn workers, nginx's worker), then SIGKILL if needed."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    # Children that outlived their parent in the same group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def http_request(url: str, body: dict[str, object] | None = None, headers: dict[str, str] | None = None,
                 timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None,
              body: dict[str, object] | None = None, headers: dict[str, str] | None = None,
              log: Path | None = None) -> None:
    """Until ``url`` answers 200 (GET, or POST with ``body``)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise HarnessError(f"process for {url} exited with {proc.returncode}\n{tail}")
        try:
            status, _, payload = http_request(url, body, headers, timeout=5)
            if status == 200:
                return
            last = f"HTTP {status}: {payload[:200]!r}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise HarnessError(f"{url} did not answer 200 within {timeout_s:.0f}s (last: {last})\n{tail}")


# ----------------------------------------------------------------------------------------------- nginx


def completion_json() -> str:
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": _CREATED, "model": UPSTREAM_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(ANSWER_PARTS)},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": USAGE,
    }, separators=(",", ":"))


def completion_sse() -> str:
    def chunk(delta: dict[str, object], finish: str | None = None, usage: dict[str, int] | None = None,
              no_choices: bool = False) -> str:
        body: dict[str, object] = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": _CREATED,
                                   "model": UPSTREAM_MODEL,
                                   "choices": [] if no_choices else [{"index": 0, "delta": delta,
                                                                      "finish_reason": finish}]}
        if usage is not None:
            body["usage"] = usage
        return "data: " + json.dumps(body, separators=(",", ":")) + "\n\n"

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": part}) for part in ANSWER_PARTS]
    events.append(chunk({}, finish="stop"))
    events.append(chunk({}, usage=USAGE, no_choices=True))
    events.append("data: [DONE]\n\n")
    return "".join(events)


def _nginx_quote(text: str) -> str:
    """A single-quoted nginx string; nginx turns ``\\n`` back into a newline when it reads the config."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


@dataclass
class Nginx:
    """The fake upstream. One worker process (the upstream should cost little CPU on a 2-core machine),
    no access log, keep-alive without a request cap so both gateways reuse their pooled connections.

    POST {base}/sse/v1/chat/completions  -> the SSE stream tollgate's OpenAI-style engine asks for;
    POST {base}/json/v1/chat/completions -> the non-streaming chat.completion LiteLLM asks for.
    nginx cannot read the request body, so the path picks the shape."""

    root: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def sse_base_url(self) -> str:
        return f"{self.base}/sse/v1"

    @property
    def json_base_url(self) -> str:
        return f"{self.base}/json/v1"

    def config(self) -> str:
        r = self.root
        return f"""# written by tests/bench/gateway_harness.py
daemon off;
master_process on;
worker_processes 1;
pid {r}/nginx.pid;
error_log {r}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {r}/body;
    proxy_temp_path {r}/proxy;
    fastcgi_temp_path {r}/fastcgi;
    uwsgi_temp_path {r}/uwsgi;
    scgi_temp_path {r}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server_tokens off;
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        location = /sse/v1/chat/completions {{
            default_type text/event-stream;
            add_header Cache-Control no-cache;
            return 200 {_nginx_quote(completion_sse())};
        }}
        location = /json/v1/chat/completions {{
            default_type application/json;
            return 200 {_nginx_quote(completion_json())};
        }}
        location = /json/v1/models {{
            default_type application/json;
            return 200 '{{"object":"list","data":[{{"id":"{UPSTREAM_MODEL}","object":"model","owned_by":"bench"}}]}}';
        }}
        location / {{ return 404; }}
    }}
}}
"""

    def start(self) -> Nginx:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        conf = self.root / "nginx.conf"
        conf.write_text(self.config())
        cmd = ["nginx", "-p", str(self.root), "-c", str(conf), "-e", str(self.root / "error.log")]
        check = subprocess.run([*cmd, "-t"], capture_output=True, text=True)
        if check.returncode != 0:
            raise HarnessError(f"nginx rejected its config:\n{check.stderr}")
        log = open(self.root / "stdout.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{self.base}/json/v1/models", 10, self.proc, log=self.root / "error.log")
        self.verify()
        return self

    def verify(self) -> None:
        """Both bodies parse, carry the same text and usage, with the right content types."""
        req: dict[str, object] = {"model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": "hi"}]}
        status, headers, body = http_request(f"{self.json_base_url}/chat/completions", req)
        lower = {k.lower(): v for k, v in headers.items()}
        parsed = json.loads(body)
        assert status == 200 and lower["content-type"].startswith("application/json"), (status, headers)
        assert parsed["choices"][0]["message"]["content"] == "".join(ANSWER_PARTS) and parsed["usage"] == USAGE
        status, headers, body = http_request(f"{self.sse_base_url}/chat/completions", {**req, "stream": True})
        lower = {k.lower(): v for k, v in headers.items()}
        assert status == 200 and lower["content-type"].startswith("text/event-stream"), (status, headers)
        datas = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
        assert datas[-1] == "[DONE]"
        chunks = [json.loads(d) for d in datas[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == "".join(ANSWER_PARTS) and chunks[-1]["usage"] == USAGE

    def stop(self) -> None:
        _stop_process(self.proc)


# --------------------------------------------------------------------------------------------- LiteLLM


@dataclass
class LiteLLM:
    """The LiteLLM proxy as the issue measured it: 2 uvicorn workers, no database, no cache; one model pointing
    at the nginx JSON path. A master key is set so it authenticates the bearer token, as tollgate does."""

    root: Path
    upstream_base_url: str
    model: str
    master_key: str = "sk-bench-litellm-master-key"
    workers: int = 2
    port: int = 0
    exe: Path = LITELLM_VENV / "bin" / "litellm"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        return (
            "model_list:\n"
            f"  - model_name: {self.model}\n"
            "    litellm_params:\n"
            f"      model: openai/{UPSTREAM_MODEL}\n"
            f"      api_base: {self.upstream_base_url}\n"
            "      api_key: sk-dummy-upstream\n"
            "litellm_settings:\n"
            "  telemetry: false\n"
            "  drop_params: true\n"
            "general_settings:\n"
            f"  master_key: {self.master_key}\n"
        )

    def start(self, timeout_s: float = 600.0) -> LiteLLM:
        self.launch()
        return self.wait(timeout_s)

    def launch(self) -> None:
        """Start the proxy without waiting (importing litellm takes 10-40 s per process on a busy 2-core machine)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        cfg = self.root / "litellm.yaml"
        cfg.write_text(self.config())
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "DATABASE_URL", "REDIS_"))}
        env.update({"PATH": f"{self.exe.parent}:{env.get('PATH', '')}", "LITELLM_TELEMETRY": "False",
                    "LITELLM_LOG": "ERROR", "DISABLE_ADMIN_UI": "True", "LITELLM_MODE": "PRODUCTION",
                    "PYTHONUNBUFFERED": "1", "HOME": str(self.root)})
        log_path = self.root / "litellm.log"
        log = open(log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [str(self.exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(self.port),
             "--num_workers", str(self.workers),
             # uvicorn kills a worker that is not ready within 5 s; importing litellm alone takes 10-40 s on a
             # busy 2-core machine, so the workers would be restarted forever. Start-up only: no effect on serving.
             "--timeout_worker_healthcheck", "600"],
            cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout_s: float = 600.0) -> LiteLLM:
        log_path = self.root / "litellm.log"
        body = {"model": self.model, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 16}
        wait_http(f"{self.base}/v1/chat/completions", timeout_s, self.proc, body=body,
                  headers={"authorization": f"Bearer {self.master_key}"}, log=log_path)
        return self

    def stop(self) -> None:
        _stop_process(self.proc, timeout_s=20)


# ------------------------------------------------------------------------------------------------- wrk

# Miss-path prompts: random words, so no two prompts are near-duplicates (the semantic cache tier, on by default,
# would answer "question 17" from "question 16"). Shared by the wrk script and the gRPC load clients.
_WORD_TEXT = (
    "apple river mountain engine violin harbor pepper glacier lantern orbit copper meadow falcon puzzle canyon "
    "velvet thunder anchor blossom compass desert ember forest garnet horizon island jungle kettle lemon marble "
    "nectar oyster prairie quartz rocket saddle tunnel umbrella valley walnut yacht zebra bicycle cathedral "
    "dolphin elevator fountain guitar hammock igloo jacket kingdom ladder magnet notebook octopus parrot quiver "
    "raccoon satellite telescope unicorn volcano waterfall xylophone yogurt zeppelin acrobat biscuit cactus "
    "dragon eclipse feather goblet harvest iceberg jigsaw kayak lobster mosaic nebula orchard pyramid quill "
    "reef sapphire tornado utensil vineyard wizard yarn zodiac algebra ballet chemistry democracy economy "
    "festival geometry history irrigation journalism knitting literature medicine navigation opera philosophy "
    "quantum robotics sculpture theology urbanism vaccine weather archery baking carpentry diving embroidery "
    "fencing gardening hiking juggling karate lacrosse mining nursing origami painting quilting rowing sailing "
    "tailoring upholstery volleyball welding borrow climb deliver explain forgive gather imagine juggle "
    "measure negotiate observe predict recycle translate whisper ancient brittle curious distant fragile "
    "generous humble invisible jovial luminous mysterious nimble obscure polite rapid serene tangled vivid"
)
WORDS = _WORD_TEXT.split()

WRK_SCRIPT = r"""
-- tests/bench/gateway_harness.py: the same request shape for every target.
-- args: mode ("miss": a unique prompt per request, "hit": one fixed prompt), bearer key, model, run tag.
local threads = {}
local thread_count = 0
local words = {WORDS}

function setup(thread)
  thread_count = thread_count + 1
  thread:set("tid", thread_count)
  table.insert(threads, thread)
end

local function body(prompt)
  return '{"model":"' .. model .. '","messages":[{"role":"user","content":"' .. prompt ..
         '"}],"max_tokens":16,"temperature":0}'
end

function init(args)
  mode, key, model, tag = args[1], args[2], args[3], args[4]
  counter = 0
  local seed = tid * 7919
  for i = 1, #tag do seed = (seed * 31 + string.byte(tag, i)) % 2147483647 end
  math.randomseed(seed)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. key
  if mode == "hit" then
    wrk.body = body("What does a gateway do? " .. tag)
    fixed = wrk.format()
  end
end

function request()
  if fixed then return fixed end
  counter = counter + 1
  local t = {}
  for k = 1, 10 do t[k] = words[math.random(#words)] end
  return wrk.format(nil, nil, nil, body(table.concat(t, " ") .. " (" .. tag .. " " .. tid .. " " .. counter .. ")"))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f,"connect_errors":%d,"read_errors":%d,"write_errors":%d,' ..
    '"status_errors":%d,"timeouts":%d}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
""".replace("{WORDS}", ", ".join(f'"{w}"' for w in WORDS))


def random_prompt(rng: random.Random, suffix: str) -> str:
    """A miss-path prompt as the wrk script builds it: ten random words and a unique suffix."""
    return " ".join(rng.choice(WORDS) for _ in range(10)) + f" ({suffix})"


@dataclass
class WrkResult:
    target: str
    connections: int
    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    per_s: float
    errors: dict[str, int] = field(default_factory=dict)
    command: str = ""

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def write_wrk_script(folder: Path) -> Path:
    path = folder / "bench.lua"
    path.write_text(WRK_SCRIPT)
    return path


def run_wrk(target: str, url: str, script: Path, *, connections: int, duration_s: float, mode: str, key: str,
            model: str, tag: str, timeout_s: float = 10.0) -> WrkResult:
    threads = min(connections, 2)
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s", f"--timeout={timeout_s:g}s",
           "-s", str(script), url, "--", mode, key, model, tag]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if out.returncode != 0 or line is None:
        raise HarnessError(f"wrk failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    errors = {k: int(data[k]) for k in ("connect_errors", "read_errors", "write_errors", "status_errors",
                                        "timeouts") if data[k]}
    duration = data["duration_us"] / 1e6
    shown = [c if c != key else "<key>" for c in cmd]
    return WrkResult(target=target, connections=connections, requests=int(data["requests"]), duration_s=duration,
                     p50_ms=data["p50_us"] / 1000, p99_ms=data["p99_us"] / 1000,
                     per_s=(data["requests"] - data["status_errors"]) / duration if duration else 0.0,
                     errors=errors, command=" ".join(shown))


def temp_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="tollgate-bench-gateway-"))
