"""The page's API called with what no browser form would send (negative, huge, wrong type, path traversal, null):
every call ends in a result or a clear error, nothing of /etc comes back, and the app stays up.

The real app runs on a free localhost port (loopback only). Errors are judged from both sides: the client sees a
message, and the app's log shows no exception escaping our handlers other than gr.Error. Gradio refuses some
payloads itself before any handler runs (a file field given a number, a slider given null); with show_error=False
the client sees only Gradio's generic message for those, so they are accepted when the log shows the refusal came
from Gradio's own input checks and no frame of ours ran."""

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.net import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
BAD_VALUES = [None, -1, 10**12, "../../../../etc/passwd", [1, 2], {"a": 1}]
GENERIC = "has not enabled verbose error reporting"
OURS = re.compile(r'File "' + re.escape(str(ROOT)) + r'/(ui|core)/')


def _alive(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture
def app(tmp_path, garage_home):
    port = free_port()
    log_path = tmp_path / "app.log"
    env = dict(os.environ, LORA_GARAGE_HOME=str(garage_home), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):  # a bounded wait for start-up (the app prints its URL when it listens)
        if proc.poll() is not None:
            pytest.fail(f"app exited:\n{log_path.read_text()}")
        if f"127.0.0.1:{port}" in log_path.read_text() and _alive(url):
            break
        try:
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
    else:
        pytest.fail(f"app did not answer:\n{log_path.read_text()}")
    yield url, proc, log_path
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)


def _endpoints(info: dict) -> dict:
    """Named endpoints, one per handler: Gradio names the same function wired to many widgets _vram, _vram_1 ..."""
    seen, out = set(), {}
    for name, ep in info["named_endpoints"].items():
        key = (re.sub(r"_\d+$", "", name), tuple(p["label"] for p in ep["parameters"]))
        if key not in seen:
            seen.add(key)
            out[name] = len(ep["parameters"])
    return out


def _escaped_exceptions(log: str) -> list[str]:
    """Tracebacks in the app log whose last exception came out of our code and was not a gr.Error."""
    chains = re.split(r"\n(?=Traceback \(most recent call last\):)", log)
    merged, current = [], ""
    for chunk in chains:
        current += chunk
        if "During handling of the above exception" in chunk or "was the direct cause of" in chunk:
            continue
        merged.append(current)
        current = ""
    bad = []
    for chain in merged:
        last = re.split(r"Traceback \(most recent call last\):", chain)[-1]
        exc_lines = [line for line in last.splitlines() if line and not line.startswith(" ")]
        final = exc_lines[-1] if exc_lines else ""
        if OURS.search(last) and not final.startswith("gradio.exceptions.Error"):
            bad.append(last[-1500:])
    return bad


def test_every_endpoint_refuses_nonsense_clearly_and_the_app_lives(app):
    from gradio_client import Client

    url, proc, log_path = app
    client = Client(url, verbose=False)
    endpoints = _endpoints(client.view_api(return_format="dict", print_info=False))
    assert len(endpoints) > 20  # the Train, Chat and Runs pages' handlers
    generic, leaked = [], []
    for name, n in endpoints.items():
        for bad in BAD_VALUES if n else [None]:
            try:
                result = client.submit(*([bad] * n), api_name=name).result(timeout=120)
            except Exception as e:  # noqa: BLE001 - the error is what this test looks at
                message = str(e)
                assert message.strip(), f"{name}({bad!r}): an empty error"
                if GENERIC in message:
                    generic.append(f"{name}({bad!r})")
                continue
            if "root:x:0:0" in str(result):
                leaked.append(f"{name}({bad!r})")
        assert proc.poll() is None and _alive(url), f"the app died after {name}"
    assert not leaked, f"the contents of /etc/passwd came back from: {leaked}"
    escaped = _escaped_exceptions(log_path.read_text())
    assert not escaped, f"{len(escaped)} exceptions escaped our handlers (generic errors: {generic}):\n\n" + \
        "\n\n".join(escaped[:3])
    assert proc.poll() is None and _alive(url)
