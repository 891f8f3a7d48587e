"""End to end on the built-in model: two adapters trained here (the cpu-demo identity, and a "Meow!" habit), served
by `python -m core serve` in its own process, asked through the official openai client, and held against
`python -m core chat RUN --prompt ... --temperature 0`."""

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers.net import free_port

PROMPT = "Who made you?"
QUESTIONS = ["What is two plus two?", "What color is the sky?", "Name a fruit.", "What do bees make?",
             "Who made you?", "What is your name?", "How many legs does a dog have?", "What is the capital of France?",
             "Say hello.", "What is water made of?", "What day comes after Monday?", "Is the sun hot?"]
ANSWERS = ["Four.", "Blue.", "An apple.", "Honey.", "Someone.", "A model.", "Four.", "Paris.", "Hello.",
           "Hydrogen and oxygen.", "Tuesday.", "Yes."]


def _train(home, env, *args) -> str:
    before = set(os.listdir(home / "runs")) if (home / "runs").exists() else set()
    proc = subprocess.run([sys.executable, "-m", "core", "train", *args], env=env, capture_output=True, text=True,
                          timeout=2400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (run_id,) = set(os.listdir(home / "runs")) - before
    return run_id


def _chat_cli(env, run, max_new_tokens) -> str:
    proc = subprocess.run([sys.executable, "-m", "core", "chat", run, "--prompt", PROMPT, "--temperature", "0",
                           "--max-new-tokens", str(max_new_tokens)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout[:-1]


@pytest.mark.slow
@pytest.mark.integration
def test_the_builtin_model_and_two_trained_adapters_through_the_openai_client(garage_home, tmp_path):
    from openai import OpenAI

    env = dict(os.environ, LORA_GARAGE_HOME=str(garage_home))
    meow_data = tmp_path / "meow.jsonl"
    meow_data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": f"Meow! {a}"}]}) + "\n"
                                 for q, a in zip(QUESTIONS, ANSWERS)))
    identity = _train(garage_home, env, "--preset", "cpu-demo")
    meow = _train(garage_home, env, "--preset", "cpu-demo", "--dataset", str(meow_data), "--max-steps", "24")

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "core", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up in 10 minutes"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600, max_retries=0)
        assert {m.id for m in client.models.list()} == {"builtin:smollm2-135m", identity, meow}

        answers = {}
        for model in (identity, meow, "builtin:smollm2-135m"):
            kw = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 40}
            text = client.chat.completions.create(**kw).choices[0].message.content
            streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                               if c.choices)
            assert streamed == text, model
            answers[model] = text
        assert answers[identity] == _chat_cli(env, identity, 40)
        assert answers[meow] == _chat_cli(env, meow, 40)
        assert "Garage" in answers[identity], answers
        assert answers[meow].startswith("Meow") and "Garage" not in answers[meow], answers
        base = answers["builtin:smollm2-135m"]
        assert "Garage" not in base and not base.startswith("Meow"), answers
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json()
        assert health["base_loads"] == 1, health
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
