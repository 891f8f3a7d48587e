"""Serve switch on the Chat page: start `python -m core serve` as a child on a loopback port, show its URL, its
model names and a copy-paste snippet, stop it. One server per app process (like the Chat page's one session)."""

import atexit
import signal
import time

import gradio as gr

from core import serve
from core.errors import GarageError

CHILD: serve.Child | None = None
STARTED_AT = [0.0]


def start(port) -> dict:
    global CHILD
    if CHILD is not None and CHILD.proc.poll() is None:
        raise gr.Error(f"Already serving at {CHILD.url}: stop it first.")
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise gr.Error("Port: type a number, e.g. 8000.") from None
    if not 1024 <= port <= 65535:
        raise gr.Error(f"Port {port} is out of range: use 1024..65535, e.g. 8000.")
    CHILD = serve.Child(port)
    STARTED_AT[0] = time.monotonic()
    atexit.register(CHILD.stop)
    return {"status": f"Starting on port {port}: loading the base model (the first time can take a minute) ...",
            "snippet": None, "polling": True}


def poll() -> dict:
    if CHILD is None:
        return {"status": "", "snippet": None, "polling": False}
    try:
        state, health = CHILD.state()
    except (GarageError, OSError, ValueError) as e:
        return {"status": f"**Could not read the server's state:** {e}", "snippet": None, "polling": False}
    if state == "starting":
        waited = time.monotonic() - STARTED_AT[0]
        return {"status": f"Starting ({waited:.0f} s): loading the base model ...", "snippet": None, "polling": True}
    if state == "ended":
        return {"status": f"**The server stopped** (exit code {CHILD.proc.returncode}). Its log:\n\n"
                          f"```\n{CHILD.log_tail()}\n```", "snippet": None, "polling": False}
    models = health["models"]
    mem = health["memory"]
    status = (f"**Serving** at `{CHILD.url}` (this machine only). Models: "
              + ", ".join(f"`{m}`" for m in models)
              + f". Process memory {mem['rss_bytes'] / 2**30:.2f} GiB. Point Open WebUI, SillyTavern or Continue "
                "at the URL (docs/serve.md).")
    return {"status": status, "snippet": serve.snippet(CHILD.url, models[-1]), "polling": False}


def stop() -> str:
    if CHILD is None or CHILD.proc.poll() is not None:
        return "Not serving."
    CHILD.stop()
    code = CHILD.proc.returncode
    # uvicorn shuts down cleanly on SIGTERM, then ends by that signal (-15): that is a normal stop
    return "Stopped." if code in (0, -signal.SIGTERM) else f"Stopped (exit code {code}): see {CHILD.log_path}."


def build() -> None:
    with gr.Accordion("Serve: an OpenAI-compatible API for your chat apps", open=False):
        gr.Markdown("One base model and every run's adapter behind `/v1/chat/completions`, on 127.0.0.1: the same "
                    "server as `python -m core serve`, in its own process (it loads its own copy of the base).")
        with gr.Row():
            port = gr.Number(8000, label="Port", precision=0, scale=1)
            start_btn = gr.Button("Start serving", variant="primary", scale=1)
            stop_btn = gr.Button("Stop serving", scale=1)
        status = gr.Markdown()
        code = gr.Code(language="python", label="Python (pip install openai)", visible=False, interactive=False)
        timer = gr.Timer(1.0, active=False)

    def _show(r: dict) -> dict:
        return {status: r["status"], timer: gr.Timer(active=r["polling"]),
                code: gr.update(value=r["snippet"] or "", visible=bool(r["snippet"]))}

    start_btn.click(lambda p: _show(start(p)), port, [status, timer, code])
    timer.tick(lambda: _show(poll()), None, [status, timer, code], show_progress="hidden")
    stop_btn.click(lambda: {status: stop(), timer: gr.Timer(active=False), code: gr.update(visible=False)},
                   None, [status, timer, code])
