"""Serve one base model and every run's adapter behind an OpenAI-compatible API (FastAPI + uvicorn).

    GET  /v1/models              the base (named after its source) and one model per run with a final adapter
    GET  /v1/models/{id}         one of them; RUN@checkpoint-N is accepted here and in requests
    POST /v1/chat/completions    with or without stream: true (server-sent events ending with [DONE])
    GET  /health                 base, loads, memory (resident, base and per-adapter bytes), queue, recent requests

Every answer goes through core.chat.ChatSession, as the Chat page's do: the run's saved chat template, its
system prompt default and its stop markers. The base loads once; adapters load by name on first use (peft
load_adapter) up to max_adapters, least recently used first out. Requests are answered one at a time on one
generation thread (peft's active adapter is model-wide state); up to max_queue wait, beyond that 429 with
Retry-After. A client that goes away (mid-stream or while waiting) has its generation stopped or never started.

A run trained on another base is refused by name ("run X was trained on Y; this server holds Z"): serve it with
a second server (--base Y on another port). The API never takes a path: models are run ids, checked by
core.runs.folder.get.
"""

import asyncio
import hmac
import ipaddress
import json
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
import httpx
import subprocess
import sys
import uvicorn
from core.chat import MAX_NEW_TOKENS, ChatSession, GenSettings, message_text
from core.errors import BusyError, GarageError, RunError
from core.runs import folder as runs
from core.runs import portable
from core.runs import resolve as run_files
from core.paths import home

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20          # 1 MiB: far above any chat a small model can take (its context is a few k tokens)
MAX_MESSAGES = 256
MAX_CHARS = 200_000               # all message text together; the model's context refuses long prompts anyway
MAX_STOPS, MAX_STOP_CHARS = 4, 100
DEFAULT_MAX_TOKENS = 512          # when a client sends none (Open WebUI often does not)
API_KEY_ENV = "LORA_GARAGE_API_KEY"
OWNER = "lora-garage"
_CKPT = re.compile(r"^(?P<run>[^@]+)@checkpoint-(?P<step>\d+)$")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def garage_message(e: GarageError) -> str:
    return f"{e.message} (fix: {e.hint})" if e.hint else e.message


# ---------------------------------------------------------------- the request body

class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part] | None = None


class ChatRequest(BaseModel):
    """The fields honoured; any other field is ignored, as OpenAI-compatible servers do."""
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=300)
    messages: list[_Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    tools: list | None = None
    functions: list | None = None


def parse_request(raw: bytes) -> ChatRequest:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ApiError(400, f"{where}: {err['msg']}", param=where, code="invalid_value") from None
    if req.n not in (None, 1):
        raise ApiError(400, f"n={req.n} is not supported: this server gives one choice per request (n=1)",
                       param="n", code="unsupported_parameter")
    for name in ("tools", "functions"):
        if getattr(req, name):
            raise ApiError(400, f"{name} (function calling) is not supported by this server", param=name,
                           code="unsupported_parameter")
    limit = req.max_completion_tokens or req.max_tokens
    if limit is not None and limit > MAX_NEW_TOKENS:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise ApiError(400, f"{param} is {limit}, more than this server's limit of {MAX_NEW_TOKENS}",
                       param=param, code="invalid_value")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop takes up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters",
                       param="stop", code="invalid_value")
    if sum(len(message_text([p.model_dump() for p in m.content] if isinstance(m.content, list) else m.content))
           for m in req.messages) > MAX_CHARS:
        raise ApiError(400, f"the messages hold more than {MAX_CHARS} characters", param="messages",
                       code="context_length_exceeded")
    return req


def _settings(req: ChatRequest) -> GenSettings:
    s = {"max_new_tokens": req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS,
         "temperature": 1.0 if req.temperature is None else req.temperature,
         "top_p": 1.0 if req.top_p is None else req.top_p, "seed": req.seed}
    return GenSettings.of(s)


def _messages(req: ChatRequest) -> list[dict]:
    out = []
    for m in req.messages:
        content = [p.model_dump() for p in m.content] if isinstance(m.content, list) else m.content
        out.append({"role": "system" if m.role == "developer" else m.role, "content": message_text(content)})
    return out


# ---------------------------------------------------------------- the models on offer

@dataclass
class Target:
    """What a model name means: the base (run None), or a run's final adapter or checkpoint."""
    model: str
    run: str | None = None
    checkpoint: int | None = None


class Catalogue:
    """Model names <-> runs. Read from the run folders at each call, so a run that finishes while the server is up
    appears without a restart."""

    def __init__(self, base: str, only: list[str] | None = None):
        self.base, self.only = base, list(only or [])
        self.name = base_name(base)

    def runs(self) -> tuple[list[str], dict[str, str]]:
        """(run ids served, {run id: the base it was trained on} for those refused)."""
        served, foreign = [], {}
        for r in runs.list_runs():
            if not r.get("has_adapter") or (self.only and r["id"] not in self.only):
                continue
            if run_files.same_source(r["model"], self.base):
                served.append(r["id"])
            else:
                foreign[r["id"]] = r["model"]
        return sorted(served), foreign

    def resolve(self, model: str) -> Target:
        if model == self.name:
            return Target(model)
        m = _CKPT.match(model)
        run_id, step = (m["run"], int(m["step"])) if m else (model, None)
        if self.only and run_id not in self.only:
            raise self._unknown(model)
        try:
            run_dir = runs.get(run_id)    # checks the name: a run id, never a path
        except RunError:
            raise self._unknown(model) from None
        trained_on = runs.load_config(run_dir).model.source
        if not run_files.same_source(trained_on, self.base):
            raise ApiError(400, f"run {run_id} was trained on {base_name(trained_on)}; this server holds {self.name} "
                                f"(serve it with a second server: python -m core serve --runs {run_id} "
                                f"--port ANOTHER_PORT)", param="model", code="model_not_served")
        try:
            runs.adapter_path(run_dir, step)
        except GarageError as e:
            raise ApiError(404, garage_message(e), param="model", code="model_not_found") from None
        return Target(model, run_id, step)

    def _unknown(self, model: str) -> ApiError:
        served, _ = self.runs()
        names = ", ".join([self.name, *served][:12])
        return ApiError(404, f"the model {model!r} does not exist here; models: {names}", param="model",
                        code="model_not_found")


def base_name(source: str) -> str:
    """The base's model name: its source (builtin:..., a hub id), or a local folder's name only: the API shows
    no path of this machine."""
    path = Path(source).expanduser()
    return path.name if path.is_absolute() or path.is_dir() else source


# ---------------------------------------------------------------- one request's life

@dataclass
class Job:
    target: Target
    messages: list[dict]
    settings: GenSettings
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, *item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _visible(text: str, stops: list[str]) -> tuple[str, bool]:
    """(the text a client may see now, whether a stop string ended it). Holds back a tail that could still grow
    into a stop string, so a stream never shows part of one."""
    cuts = [text.find(s) for s in stops if s in text]
    if cuts:
        return text[:min(cuts)], True
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - hold], False


class Server:
    """The loaded base, its adapters and the request queue. build_app(server) puts the HTTP face on it."""

    def __init__(self, base: str, runs_only: list[str] | None = None, quant: str | None = None,
                 max_adapters: int = 8, max_queue: int = 8, api_key: str | None = None, device: str | None = None,
                 trust_remote_code: bool = False):
        if max_adapters < 1:
            raise GarageError(f"max_adapters must be at least 1, got {max_adapters}", "use the default, 8")
        if max_queue < 1:
            raise GarageError(f"max_queue must be at least 1, got {max_queue}", "use the default, 8")
        self.catalogue = Catalogue(base, runs_only)
        self.session = ChatSession(device)
        self.base, self.quant, self.trust_remote_code = base, quant, trust_remote_code
        self.max_adapters, self.max_queue, self.api_key = max_adapters, max_queue, api_key or None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="garage-serve")
        self.pending = 0                      # requests waiting or answering; touched on the event loop only
        self.base_loads = 0
        self._base_obj = None
        self._lru: OrderedDict[str, None] = OrderedDict()
        self.recent: deque[dict] = deque(maxlen=20)

    # ------------------------------------------------------------ model state (generation thread only)
    def load(self) -> None:
        """Load the base (once; the CLI calls it before listening, so the first request does not wait for it)."""
        self.session.load_base(self.base, self.quant, self.trust_remote_code)
        self._count_load()

    def _count_load(self) -> None:
        if self.session.base is not self._base_obj:
            self._base_obj = self.session.base
            self.base_loads += 1

    def _prepare(self, t: Target) -> str | None:
        if self.session.base is None:
            self.load()
        if t.run is None:
            self.session.use(None)
            return None
        name = self.session.load_run(t.run, t.checkpoint, self.quant)
        self._count_load()
        self._lru.pop(name, None)
        self._lru[name] = None
        while len(self._lru) > self.max_adapters:
            old, _ = self._lru.popitem(last=False)
            self.session.detach(old)
        return self.session.use(name)

    def answer(self, job: Job) -> None:
        """Run one request on the generation thread, handing ("text", visible) items and a final ("done", ...) or
        ("error", exception) to the request's event-loop queue."""
        record = {"model": job.target.model, "chunks": 0, "outcome": "cancelled", "at": time.time()}
        self.recent.append(record)
        if job.cancelled.is_set():    # the client left while waiting: nothing to do
            return
        try:
            adapter = self._prepare(job.target)
            shown, stopped, text = "", False, ""
            for text in self.session.stream(job.messages, job.settings, adapter=adapter):
                if job.cancelled.is_set():
                    return                      # leaving the generator stops the generation (ChatSession's own path)
                if not stopped:
                    visible, stopped = _visible(text, job.stops)
                    if stopped:
                        self.session.stop()     # this thread's own generation: end it at the next token
                    if len(visible) > len(shown) and visible.startswith(shown):
                        shown = visible
                        record["chunks"] += 1
                        job.put("text", shown)
            stats = self.session.last_stats
            new = stats["new_tokens"][0]
            budget = min(job.settings.max_new_tokens, self.session.context - stats["prompt_tokens"])
            finish = "length" if new >= budget and not stopped else "stop"
            final = shown if stopped else text     # the last text is the whole reply: nothing held back now
            record["outcome"], record["tokens"] = "done", new
            job.put("done", final, {"prompt_tokens": stats["prompt_tokens"], "completion_tokens": new,
                                    "total_tokens": stats["prompt_tokens"] + new}, finish)
        except Exception as e:  # noqa: BLE001 - handed to the request, which answers it in OpenAI's shape
            record["outcome"] = f"error: {type(e).__name__}"
            job.put("error", e)

    # ------------------------------------------------------------ reporting
    def memory(self) -> dict:
        out = {"rss_bytes": psutil.Process().memory_info().rss, "base_bytes": None, "adapters": {}}
        base = self.session.base
        if base is not None:
            names = list(self.session.adapters)   # a copy: the generation thread may load one meanwhile
            model = self.session.model or base
            for n, p in model.named_parameters():
                size = p.numel() * p.element_size()
                name = next((a for a in names if f".{a}." in n), None)
                if name:
                    out["adapters"][name] = out["adapters"].get(name, 0) + size
                else:
                    out["base_bytes"] = (out["base_bytes"] or 0) + size
        return out

    def health(self) -> dict:
        return {"status": "ok", "base": self.catalogue.name, "quant": self.quant, "device": self.session.device,
                "base_loads": self.base_loads, "adapters_loaded": list(self.session.adapters),
                "max_adapters": self.max_adapters, "queue": self.pending, "max_queue": self.max_queue,
                "memory": self.memory(), "recent": list(self.recent)}


# ---------------------------------------------------------------- the HTTP face

def build_app(server: Server):
    app = FastAPI(title="LoRA Garage", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_req, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_req, e: HTTPException):
        code = "not_found" if e.status_code == 404 else "method_not_allowed" if e.status_code == 405 else None
        return JSONResponse(ApiError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crash(_req, e: Exception):
        log.error("request failed", exc_info=e)   # the trace stays in the server's log, never in the answer
        return JSONResponse(ApiError(500, f"internal error ({type(e).__name__})", kind="server_error").body(),
                            status_code=500)

    def check_key(request: Request) -> None:
        if server.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), server.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": OWNER}

    @app.get("/v1/models")
    async def list_models(request: Request, checkpoints: bool = False):
        check_key(request)
        served, _ = server.catalogue.runs()
        names = [server.catalogue.name, *served]
        if checkpoints:
            for r in served:
                names += [f"{r}@{p.name}" for p in runs.checkpoints(runs.get(r))]
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{model:path}")
    async def get_model(request: Request, model: str):
        check_key(request)
        return model_card(server.catalogue.resolve(model).model)

    @app.get("/health")
    async def health(request: Request):
        check_key(request)
        return await asyncio.get_running_loop().run_in_executor(None, server.health)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        req = parse_request(await _read_body(request))
        target = server.catalogue.resolve(req.model)
        try:
            settings = _settings(req)
        except GarageError as e:
            raise ApiError(400, garage_message(e), param=getattr(e, "field", None), code="invalid_value") from None
        if server.pending >= server.max_queue:
            raise ApiError(429, f"the server is busy: {server.pending} requests are waiting or being answered",
                           code="queue_full", kind="rate_limit_error", headers={"Retry-After": "5"})
        loop = asyncio.get_running_loop()
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        job = Job(target, _messages(req), settings, stops, loop)
        server.pending += 1
        fut = loop.run_in_executor(server.executor, server.answer, job)
        fut.add_done_callback(lambda _f: setattr(server, "pending", server.pending - 1))
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        try:
            first = await _next(job, request)        # an error before the first token is a plain error answer
        except BaseException:
            job.cancelled.set()
            raise
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_events(job, request, first, rid, created, target.model, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        item = first
        try:
            while item[0] == "text":
                item = await _next(job, request)
        finally:
            if item[0] == "text":
                job.cancelled.set()
        _, text, usage_block, finish = item
        return {"id": rid, "object": "chat.completion", "created": created, "model": target.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish, "logprobs": None}], "usage": usage_block}

    return app


async def _read_body(request) -> bytes:
    """The body, refused past MAX_BODY_BYTES before it is all read (Content-Length first, then as it streams)."""
    too_big = ApiError(413, f"the request body is larger than {MAX_BODY_BYTES // 1024} KiB", code="body_too_large")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _next(job: Job, request) -> tuple:
    """The job's next item; an error item is raised as an ApiError. Gives up (and cancels) if the client left."""
    while True:
        try:
            item = await asyncio.wait_for(job.queue.get(), timeout=0.5)
            break
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                raise ApiError(499, "the client closed the connection", code="client_closed") from None
    if item[0] == "error":
        raise _as_api_error(item[1])
    return item


def _as_api_error(e: BaseException) -> ApiError:
    if isinstance(e, BusyError):
        return ApiError(503, garage_message(e), code="busy", kind="server_error", headers={"Retry-After": "30"})
    if isinstance(e, GarageError):
        return ApiError(400, garage_message(e), param=getattr(e, "field", None), code="invalid_request")
    log.error("generation failed", exc_info=e)
    return ApiError(500, f"generation failed ({type(e).__name__}: {e})", kind="server_error")


async def _events(job: Job, request, first: tuple, rid: str, created: int, model: str, include_usage: bool):
    """OpenAI's chunk stream: a role chunk, content deltas, a finish chunk, optionally a usage chunk, [DONE]."""
    def chunk(delta: dict, finish=None, usage=None) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    sent, item = "", first
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            text = item[1]
            if text.startswith(sent) and len(text) > len(sent):
                yield chunk({"content": text[len(sent):]})
                sent = text
            if item[0] == "done":
                break
            item = await _next(job, request)
        yield chunk({}, finish=item[3])
        if include_usage:
            yield chunk({}, usage=item[2])
        yield "data: [DONE]\n\n"
    except ApiError as e:
        if e.status != 499:
            yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        job.cancelled.set()    # a no-op after the end; after a disconnect (task cancelled here) it stops the job


# ---------------------------------------------------------------- running it

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise GarageError(f"serving on {host} (beyond this machine) needs an API key",
                          f"set {API_KEY_ENV} in the environment and pass --api-key, or serve on 127.0.0.1")


class Running:
    """A uvicorn server on its own thread (tests, the bench and the app's Serve switch); stop() ends it."""

    def __init__(self, server: Server, host: str, port: int):
        check_exposure(host, server.api_key)
        self.server, self.host, self.port = server, host, port
        config = uvicorn.Config(build_app(server), host=host, port=port, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=5)
        self.uv = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uv.run, name="garage-serve-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 30) -> "Running":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.uv.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise GarageError(f"the API server did not start on {self.host}:{self.port}",
                                  "is the port taken? pick another with --port")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout)
        self.server.session.stop()
        self.server.executor.shutdown(wait=False, cancel_futures=True)


def snippet(url: str, model: str, key_env: bool = False) -> str:
    """The copy-paste client snippet the CLI and the app show."""
    key = f'os.environ["{API_KEY_ENV}"]' if key_env else '"not-needed"'
    return ("from openai import OpenAI\n"
            + ("import os\n" if key_env else "")
            + f'client = OpenAI(base_url="{url}", api_key={key})\n'
            f'reply = client.chat.completions.create(model="{model}", '
            f'messages=[{{"role": "user", "content": "Hello!"}}])\n'
            f"print(reply.choices[0].message.content)")


# ---------------------------------------------------------------- as a child process (the app's Serve switch)

class Child:
    """`python -m core serve --port PORT` in its own process group (argument list, never a shell); its output goes
    to $LORA_GARAGE_HOME/serve.log. The app starts one and reads /health to know when it answers."""

    def __init__(self, port: int):
        self.port, self.log_path = int(port), home() / "serve.log"
        self.url = f"http://127.0.0.1:{self.port}/v1"
        with open(self.log_path, "w") as log_file:
            self.proc = subprocess.Popen([sys.executable, "-m", "core", "serve", "--port", str(self.port)],
                                         stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         **portable.detached())

    def state(self) -> tuple[str, dict | None]:
        """("starting" | "serving" | "ended", /health's answer when serving)."""

        if self.proc.poll() is not None:
            return "ended", None
        try:
            r = httpx.get(self.url.replace("/v1", "/health"), timeout=2)
        except httpx.TransportError:
            return "starting", None
        if r.status_code != 200:
            return "starting", None
        models = httpx.get(f"{self.url}/models", timeout=5).json()["data"]
        return "serving", {**r.json(), "models": [m["id"] for m in models]}

    def log_tail(self, chars: int = 2000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(ln for ln in text[-chars:].splitlines() if "Loading weights" not in ln)

    def stop(self, grace: float = 10) -> None:
        if self.proc.poll() is None:
            portable.end_tree(self.proc.pid, grace_s=grace)  # SIGTERM / CTRL_BREAK_EVENT, then the whole tree killed
            self.proc.wait(grace)
