"""The OpenAI-compatible server (core.serve) against the official `openai` client, on the tiny model.

Live-server tests carry the integration marker (they start uvicorn on a loopback port); the request checks that
need no server stay in the fast tier.
"""

import json
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from core.errors import GarageError
from core.serve import ApiError, base_name, check_exposure, parse_request
from tests.helpers.net import free_port
from tests.helpers.runs import make_run

PROMPT = "What is your name?"
MSGS = [{"role": "user", "content": PROMPT}]


# ---------------------------------------------------------------- no server needed

def _bad(body) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse_request(json.dumps(body).encode())
    assert e.value.status == 400
    return e.value


def test_parse_request_refuses_by_name_and_ignores_unknown_fields():
    ok = parse_request(json.dumps({"model": "m", "messages": MSGS, "frequency_penalty": 0.3, "user": "x",
                                   "n": 1, "max_completion_tokens": 5}).encode())
    assert ok.max_completion_tokens == 5 and ok.n == 1
    assert _bad({"model": "m", "messages": []}).param == "messages"
    assert _bad({"model": "m", "messages": MSGS, "max_tokens": 10**9}).param == "max_tokens"
    assert _bad({"model": "m", "messages": MSGS, "max_completion_tokens": 10**9}).param == "max_completion_tokens"
    assert _bad({"model": "m", "messages": "hello"}).param == "messages"
    assert _bad({"model": "m", "messages": MSGS, "temperature": "hot"}).param == "temperature"
    assert _bad({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}).param == "messages.0.role"
    assert _bad({"model": "m", "messages": MSGS, "n": 2}).param == "n"
    assert _bad({"model": "m", "messages": MSGS, "tools": [{"type": "function"}]}).param == "tools"
    assert _bad({"model": "m", "messages": MSGS, "stop": ["a"] * 5}).param == "stop"
    assert _bad({"model": "m", "messages": [{"role": "user", "content": "x" * 200_001}]}).param == "messages"
    assert _bad([1, 2]).code == "invalid_json"
    with pytest.raises(ApiError) as e:
        parse_request(b"{not json")
    assert e.value.code == "invalid_json"


def test_visible_text_holds_back_a_possible_stop_string():
    from core.serve import _visible

    assert _visible("Hello wor", ["world"]) == ("Hello ", False)
    assert _visible("Hello world!", ["world"]) == ("Hello ", True)
    assert _visible("Hello", []) == ("Hello", False)
    assert _visible("abcab", ["abd", "bx"]) == ("abc", False)


def test_the_base_name_shows_no_local_path(tmp_path):
    assert base_name("builtin:smollm2-135m") == "builtin:smollm2-135m"
    assert base_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_name(str(tmp_path / "my-model")) == "my-model"


def test_beyond_loopback_needs_a_key(capsys, monkeypatch):
    from core.__main__ import main

    check_exposure("127.0.0.1", None)
    check_exposure("::1", None)
    check_exposure("0.0.0.0", "k")
    with pytest.raises(GarageError, match="needs an API key"):
        check_exposure("0.0.0.0", None)
    monkeypatch.delenv("LORA_GARAGE_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "needs an API key" in capsys.readouterr().err
    assert main(["serve", "--api-key"]) == 2      # asked for a key, none in the environment (stdin is no tty)
    assert "LORA_GARAGE_API_KEY" in capsys.readouterr().err


def test_cli_refuses_runs_of_two_bases_by_name(garage_home, tiny_model_dir, tiny_model_dir_llama3, capsys):
    from core.__main__ import main

    make_run(garage_home, tiny_model_dir, "alpha")
    make_run(garage_home, tiny_model_dir_llama3, "other")
    assert main(["serve", "--runs", "alpha", "other"]) == 2
    err = capsys.readouterr().err
    assert "run other was trained on" in err and "this server holds" in err and "--runs other" in err


def test_every_serve_command_in_the_docs_parses():
    import argparse
    import re
    import shlex

    from core.commands import serve as serve_command

    page = (Path(__file__).resolve().parent.parent / "docs" / "serve.md").read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", page, flags=re.S)
    lines = [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip().startswith("python -m core serve")]
    lines += re.findall(r"`(python -m core serve[^`]*)`", page)
    parser = argparse.ArgumentParser(exit_on_error=False)
    serve_command.add_arguments(parser)
    checked = 0
    for line in lines:
        args = shlex.split(line)[4:]
        if "[" in line or "--help" in args:     # the synopsis, and --help (it exits)
            continue
        parser.parse_args([a if a != "X" else "some-run" for a in args])
        checked += 1
    assert checked >= 3, lines


# ---------------------------------------------------------------- a live server on loopback

@pytest.fixture
def runs_home(garage_home, tiny_model_dir):
    make_run(garage_home, tiny_model_dir, "alpha", seed=1, checkpoints={2: True})
    make_run(garage_home, tiny_model_dir, "beta", seed=2)
    return garage_home


@pytest.fixture
def serve(runs_home, tiny_model_dir, monkeypatch):
    """serve(**Server kwargs) -> (running server, openai client, load_base call counter); stopped after the test."""
    from openai import OpenAI

    from core import models
    from core.serve import Running, Server

    loads = []
    real = models.load_base
    monkeypatch.setattr(models, "load_base", lambda *a, **k: loads.append(a) or real(*a, **k))
    started = []

    def start(api_key=None, **kw):
        server = Server(str(tiny_model_dir), device="cpu", api_key=api_key, **kw)
        running = Running(server, "127.0.0.1", free_port()).start()
        started.append(running)
        client = OpenAI(base_url=running.url, api_key=api_key or "none", timeout=60, max_retries=0)
        return running, client, loads

    yield start
    for r in started:
        r.stop()


def _create(client, model, stream=False, **kw):
    kw = {"temperature": 0, "max_tokens": 12, **kw}
    if not stream:
        r = client.chat.completions.create(model=model, messages=MSGS, **kw)
        return r.choices[0].message.content, r
    chunks = list(client.chat.completions.create(model=model, messages=MSGS, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def _reference_base(model_dir, max_new_tokens=12) -> str:
    """The base's greedy answer, straight from transformers: the base's own chat template, no adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos[1])
    new = [t for t in out[0, len(ids):].tolist()]
    new = new[:next((i for i, t in enumerate(new) if t in eos), len(new))]
    return tok.decode(new, skip_special_tokens=True)


def _cli_answer(run, max_new_tokens=12) -> str:
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "core", "chat", run, "--prompt", PROMPT, "--temperature", "0",
                           "--max-new-tokens", str(max_new_tokens)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout[:-1]   # the command ends the reply with one newline


@pytest.mark.integration
def test_models_and_answers_match_the_chat_command_and_the_base_loads_once(serve, tiny_model_dir):
    running, client, loads = serve()
    base = tiny_model_dir.name
    assert {m.id for m in client.models.list()} == {base, "alpha", "beta"}
    with_ck = httpx.get(f"{running.url}/models", params={"checkpoints": "true"}, timeout=10).json()
    assert "alpha@checkpoint-2" in {m["id"] for m in with_ck["data"]}
    assert client.models.retrieve("alpha").id == "alpha"

    answers = {}
    for model in (base, "alpha", "beta"):
        text, resp = _create(client, model)
        streamed, chunks = _create(client, model, stream=True)
        assert text == streamed and text, model
        assert resp.model == model and resp.choices[0].finish_reason in ("stop", "length")
        u = resp.usage
        assert u.prompt_tokens > 5 and 0 < u.completion_tokens <= 12 and u.total_tokens == u.prompt_tokens + u.completion_tokens
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason is not None
        answers[model] = text
    assert answers[base] == _reference_base(tiny_model_dir)
    assert answers["alpha"] == _cli_answer("alpha")
    assert answers["beta"] == _cli_answer("beta")
    assert len(set(answers.values())) == 3           # each adapter answers in its own way, the base in its own
    assert _create(client, "alpha@checkpoint-2")[0] == answers["alpha"]   # make_run saves the same weights there
    assert _create(client, base)[0] == answers[base]   # the base again, after adapters were used
    assert len(loads) == 1
    health = httpx.get(running.url.replace("/v1", "/health"), timeout=10).json()
    assert health["base_loads"] == 1 and set(health["adapters_loaded"]) == {"alpha", "beta", "alpha-step2"}
    mem = health["memory"]
    assert mem["base_bytes"] > 0 and all(0 < b < mem["base_bytes"] for b in mem["adapters"].values())


@pytest.mark.integration
def test_parameters_stop_seed_usage_and_the_adapter_lru(serve, tiny_model_dir):
    running, client, loads = serve(max_adapters=1)
    full, _ = _create(client, "alpha", max_tokens=12)
    assert len(full) > 4
    cut = full[2:5]
    text, resp = _create(client, "alpha", stop=[cut])
    assert text == full[:full.index(cut)] and resp.choices[0].finish_reason == "stop"
    assert _create(client, "alpha", stream=True, stop=cut)[0] == text
    one, resp = _create(client, "alpha", max_completion_tokens=1)
    assert resp.usage.completion_tokens == 1 and resp.choices[0].finish_reason == "length"
    # sampling with a seed repeats itself
    a = _create(client, "beta", temperature=1.0, top_p=0.95, seed=7)[0]
    assert _create(client, "beta", temperature=1.0, top_p=0.95, seed=7)[0] == a
    # the usage chunk OpenAI streams when asked
    _, chunks = _create(client, "beta", stream=True, stream_options={"include_usage": True})
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].choices == []
    # one adapter kept: alpha left when beta came, and comes back with the same answer
    health = httpx.get(running.url.replace("/v1", "/health"), timeout=10).json()
    assert health["adapters_loaded"] == ["beta"]
    assert _create(client, "alpha")[0] == full
    assert len(loads) == 1


@pytest.mark.integration
def test_bad_requests_get_openai_errors_and_the_server_stays_up(serve, garage_home, tiny_model_dir_llama3):
    import openai

    running, client, _ = serve()
    make_run(garage_home, tiny_model_dir_llama3, "other")

    def error_of(exc_type, **kw):
        with pytest.raises(exc_type) as e:
            client.chat.completions.create(**{"model": "alpha", "messages": MSGS, **kw})
        body = e.value.body
        assert set(body) == {"message", "type", "param", "code"}, body   # the client unwraps {"error": ...}
        return body

    assert error_of(openai.NotFoundError, model="no-such-model")["code"] == "model_not_found"
    assert error_of(openai.NotFoundError, model="../../etc/passwd")["code"] == "model_not_found"
    assert error_of(openai.NotFoundError, model="alpha@checkpoint-99")["code"] == "model_not_found"
    assert error_of(openai.BadRequestError, messages=[])["param"] == "messages"
    assert error_of(openai.BadRequestError, max_tokens=10**9)["param"] == "max_tokens"
    assert error_of(openai.BadRequestError, temperature="hot")["param"] == "temperature"
    assert error_of(openai.BadRequestError, n=2)["param"] == "n"
    assert error_of(openai.BadRequestError, tools=[{"type": "function", "function": {"name": "f"}}])["param"] == "tools"
    other = error_of(openai.BadRequestError, model="other")["message"]
    assert "run other was trained on tiny-llama3" in other and f"this server holds {running.server.catalogue.name}" in other
    assert "not in" not in error_of(openai.BadRequestError, messages=[{"role": "assistant", "content": "hi"}])["message"]

    url = f"{running.url}/chat/completions"
    big = httpx.post(url, content=b"x" * (5 << 20), headers={"Content-Type": "application/json"}, timeout=30)
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    for raw in (b"{nope", b"[]", json.dumps({"model": "alpha", "messages": "hi"}).encode()):
        r = httpx.post(url, content=raw, headers={"Content-Type": "application/json"}, timeout=10)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert "Traceback" not in r.text
    assert httpx.get(f"{running.url}/files/etc", timeout=10).json()["error"]["code"] == "not_found"
    # unknown parameters are ignored, and the server still answers
    ok = client.chat.completions.create(model="alpha", messages=MSGS, max_tokens=3, temperature=0,
                                        extra_body={"frequency_penalty": 0.5, "whatever": [1]})
    assert ok.choices[0].message.content is not None


@pytest.mark.integration
def test_an_api_key_is_required_when_set(serve):
    import openai
    from openai import OpenAI

    running, client, _ = serve(api_key="s3cret")
    assert client.chat.completions.create(model="alpha", messages=MSGS, max_tokens=2).choices
    wrong = OpenAI(base_url=running.url, api_key="guess", timeout=30, max_retries=0)
    for call in (lambda: wrong.models.list(), lambda: wrong.chat.completions.create(model="alpha", messages=MSGS)):
        with pytest.raises(openai.AuthenticationError) as e:
            call()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.get(running.url.replace("/v1", "/health"), timeout=10).status_code == 401


def _wait_idle(server, seconds=60):
    deadline = time.monotonic() + seconds
    while server.pending:
        assert time.monotonic() < deadline, list(server.recent)
        time.sleep(0.05)


@pytest.mark.integration
def test_the_queue_is_bounded_with_429_and_retry_after(serve):
    running, client, _ = serve(max_queue=1)
    gate = threading.Event()
    running.server.executor.submit(gate.wait, 60)     # hold the generation thread: requests wait behind it
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(
        client.chat.completions.create(model="alpha", messages=MSGS, max_tokens=2)))
    waiting.start()
    deadline = time.monotonic() + 30
    while running.server.pending < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    busy = httpx.post(f"{running.url}/chat/completions", json={"model": "beta", "messages": MSGS}, timeout=10)
    assert busy.status_code == 429 and int(busy.headers["retry-after"]) > 0
    assert busy.json()["error"]["type"] == "rate_limit_error"
    gate.set()
    waiting.join(60)
    assert answers and answers[0].choices[0].message.content is not None


@pytest.mark.integration
def test_a_client_that_leaves_stops_its_generation(serve):
    running, client, _ = serve()
    server = running.server
    # mid-stream: read a few chunks of a long answer, then drop the connection
    body = {"model": "alpha", "messages": MSGS, "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{running.url}/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert sum(next(lines).startswith("data: ") for _ in range(5)) >= 3
    _wait_idle(server)
    dropped = server.recent[-1]
    assert dropped["outcome"] == "cancelled" and dropped["chunks"] < 200, dropped
    # while waiting in the queue: the request is never answered for nobody
    gate = threading.Event()
    server.executor.submit(gate.wait, 60)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{running.url}/chat/completions", json={**body, "stream": False}, timeout=1.5)
    time.sleep(1.5)                                  # the server polls for a gone client every 0.5 s
    gate.set()
    _wait_idle(server)
    assert server.recent[-1]["outcome"] == "cancelled" and server.recent[-1]["chunks"] == 0
    # and the next request is served
    assert client.chat.completions.create(model="beta", messages=MSGS, max_tokens=2).choices[0].message.content is not None


@pytest.mark.integration
def test_the_apps_serve_switch_starts_and_stops_the_cli_server(runs_home):
    from ui import serve_panel

    with pytest.raises(Exception, match="out of range"):
        serve_panel.start(80)
    port = free_port()
    shown = serve_panel.start(port)
    assert shown["polling"] and "Starting" in shown["status"]
    try:
        deadline = time.monotonic() + 600  # a busy 2-core machine took over 4 minutes to import and load
        while (shown := serve_panel.poll())["polling"]:
            assert time.monotonic() < deadline, serve_panel.CHILD.log_tail()
            time.sleep(0.5)
        assert "Serving" in shown["status"] and "`alpha`" in shown["status"] and "`beta`" in shown["status"], shown
        assert f"http://127.0.0.1:{port}/v1" in shown["snippet"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"model": "beta", "messages": MSGS, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    finally:
        assert serve_panel.stop().startswith("Stopped")
    assert "stopped" in serve_panel.poll()["status"].lower()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)


@pytest.mark.integration
def test_serving_on_a_gpu_while_a_run_trains_there_is_refused_by_name(serve, monkeypatch):
    import openai

    import core.runs.runner

    running, client, _ = serve()
    monkeypatch.setattr(core.runs.runner, "running", lambda: "r9")
    monkeypatch.setattr(running.server.session, "device", "cuda")   # as the Chat page: GPU chat waits for training
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="alpha", messages=MSGS, max_tokens=2)
    assert e.value.status_code == 503 and "r9" in e.value.body["message"] and e.value.body["code"] == "busy"
    assert int(e.value.response.headers["retry-after"]) > 0
    monkeypatch.setattr(running.server.session, "device", "cpu")
    assert client.chat.completions.create(model="alpha", messages=MSGS, max_tokens=2).choices[0].message.content is not None
    # a prompt longer than the model's context: a 400 naming the limit, not a crash
    with pytest.raises(openai.BadRequestError, match="more than this model can take"):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "word " * 600}],
                                       max_tokens=2)
