"""Chat with a run's exported GGUF in llama.cpp's runtime, beside its adapter (the Chat page's GGUF pane).

The GGUF runs in a child process (core.gguf.tools.LlamaChild): llama.cpp is never loaded into the app, and a crash
in its C++ is a GarageError, not a dead app. One GGUF is open at a time per GgufChat; opening another closes the
first. The prompt is the GGUF's own embedded chat template, rendered as llama-cpp-python renders it
(core.gguf.tools.render_embedded) and tokenised by the GGUF, with the system prompt chosen as the adapter's chat chooses
it (the box's, else the run's data.system, else the template's default). The generation settings are the chat's
GenSettings, mapped onto llama.cpp's sampler.
"""

from __future__ import annotations

import json
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from core import paths
from core.errors import BusyError, GarageError, ModelError
from core.chat import GenSettings
from core.chat import MIN_REPLY, message_text
from core.data import tokenize as data_tokenize
from core.gguf import read as gguf_read
from core.gguf import tools as gguf_tools
from core.runs import folder as runs

CONTEXT = 4096   # llama.cpp's context for chat: the model's own when it is shorter
TOP_K = 50       # what transformers samples with by default (the adapter pane), where llama.cpp's default is 40


@dataclass
class Export:
    """One GGUF file of an export folder (<home>/exports/<name>/export.json beside it)."""
    run: str
    quant: str
    path: Path
    bytes: int
    bits_per_weight: float
    made: float        # the file's mtime

    @property
    def file(self) -> str:
        return self.path.name


def exports_dir() -> Path:
    return paths.home() / "exports"


def list_exports(run_id: str | None) -> list[Export]:
    """The GGUF files exported from `run_id` under <home>/exports/*/, newest first (files since deleted are left
    out; a folder whose export.json cannot be read is not an export of ours and is passed over)."""
    if not run_id or not exports_dir().is_dir():
        return []
    found = []
    for info_path in exports_dir().glob("*/export.json"):
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or info.get("run") != run_id:
            continue
        for quant, f in (info.get("files") or {}).items():
            path = info_path.parent / str(f.get("file", ""))
            if path.suffix == ".gguf" and path.is_file():
                found.append(Export(run=run_id, quant=quant, path=path, bytes=int(f.get("bytes") or path.stat().st_size),
                                    bits_per_weight=float(f.get("bits_per_weight") or 0), made=path.stat().st_mtime))
    return sorted(found, key=lambda e: (e.made, e.file), reverse=True)


def runtime_installed() -> bool:
    """Whether llama-cpp-python is importable (checked without importing it here)."""

    return gguf_tools.quantizer_installed()


def sampler(settings) -> dict:
    """GenSettings as llama.cpp's create_completion arguments. Temperature 0 is greedy (top-1); sampling keeps
    transformers' top-k of 50 and no min-p, as the adapter pane samples. No seed: a fresh one per reply."""
    greedy = settings.temperature <= 0
    seed = settings.seed if settings.seed is not None else random.randrange(2 ** 31)
    return {"temperature": 0.0 if greedy else settings.temperature, "top_p": 1.0 if greedy else settings.top_p,
            "top_k": 1 if greedy else TOP_K, "repeat_penalty": settings.repetition_penalty, "seed": int(seed)}


class GgufChat:
    """One open GGUF (a LlamaChild) and its chat template. Methods are safe to call from Gradio worker threads."""

    def __init__(self):
        self.path: Path | None = None
        self.run: str | None = None      # the run the open GGUF was exported from (export.json)
        self.child = None
        self.n_ctx = CONTEXT
        self.stops: list[str] = []
        self.run_system = ""
        self.last: dict = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # ------------------------------------------------------------ opening
    def open(self, path: Path) -> None:
        """Start llama.cpp on `path` (kept when it is the one open and its child lives); closes any other first."""
        path = Path(path)
        if self.child is not None and self.path == path and self.child.proc.poll() is None:
            return
        self._close()
        if not path.is_file():
            raise ModelError(f"the GGUF file {path} is gone", "export the run again (Runs page, Export panel)")

        meta = gguf_read.metadata(path)
        arch = meta.get("general.architecture", "")
        self.n_ctx = min(CONTEXT, int(meta.get(f"{arch}.context_length") or CONTEXT))
        info = _export_info(path)
        self.stops = list((info.get("modelfile") or {}).get("stops") or [])
        self.run_system = _run_system(info.get("run"))
        child = gguf_tools.LlamaChild(path, n_ctx=self.n_ctx)
        try:
            child.meta()   # the model loads: a file llama.cpp cannot load fails here, and its child ends
        except GarageError:
            child.close()
            raise
        self.child, self.path, self.run = child, path, info.get("run")

    def close(self) -> None:
        """Stop a reply in progress, then end the child (the page picked another GGUF or another run)."""
        self._stop.set()
        with self._locked(timeout=30):
            self._close()

    def _close(self) -> None:
        if self.child is not None:
            self.child.close()
        self.child = self.path = self.run = None

    # ------------------------------------------------------------ chatting
    def stop(self) -> None:
        """Stop the reply being generated (the page's Stop button). Safe from any thread."""
        self._stop.set()

    def encode(self, messages: list[dict], settings) -> list[int]:
        """The prompt as the GGUF sees it: its embedded template, rendered and tokenised by it, length-checked."""

        msgs = [{"role": m["role"], "content": message_text(m.get("content"))} for m in messages or []]
        if not msgs or msgs[-1]["role"] != "user":
            raise GarageError("the conversation must end with a user message", "type a message first")
        msgs = data_tokenize.with_system(msgs, settings.system or self.run_system)
        try:
            ids = self.child.prompt_ids(msgs)   # as the export's parity check rendered and checked it
        except GarageError:
            raise                   # the child's own message (it ended, or refused)
        except Exception as e:      # jinja's own errors, and the template's raise_exception
            raise ModelError(f"the chat template embedded in {self.path.name} could not render this conversation: "
                             f"{e}", "clear the chat; if it persists, export the run again") from e
        if len(ids) > self.n_ctx - MIN_REPLY:
            raise GarageError(f"the conversation is {len(ids)} tokens, more than llama.cpp's context here can take "
                              f"(prompt limit: {self.n_ctx - MIN_REPLY}, context: {self.n_ctx})",
                              "clear the chat or shorten the message")
        return ids

    def stream(self, path: Path, messages: list[dict], settings=None) -> Iterator[str]:
        """Yield the reply so far from the GGUF at `path` (opened, or kept open), as llama.cpp writes it."""

        s = GenSettings.of(settings)
        with self._locked():
            self._stop.clear()
            self.open(path)
            ids = self.encode(messages, s)
            fields = {"ids": ids, "max_tokens": min(s.max_new_tokens, self.n_ctx - len(ids)), "stop": self.stops,
                      **sampler(s)}
            text, stopped = "", False
            answers = self.child.stream(**fields)
            try:
                for answer in answers:
                    if answer.get("done"):
                        stopped = answer["stopped"]
                        break
                    text += answer["delta"]
                    yield text
                    if self._stop.is_set():
                        break
            finally:
                answers.close()   # mid-reply (Stop, a closed page): the child cancels and reads on to its end
            self.last = {"prompt_tokens": len(ids), "stopped": stopped, "file": self.path.name}

    def _locked(self, timeout: float = 10):
        return _Locked(self._lock, timeout)


class _Locked:
    # a plain Lock, not an RLock: Gradio may resume a generator (which holds it) on another thread
    def __init__(self, lock: threading.Lock, timeout: float):
        self.lock, self.timeout = lock, timeout

    def __enter__(self):
        if not self.lock.acquire(timeout=self.timeout):
            raise BusyError("the GGUF is still answering", "press Stop or wait for it to finish")

    def __exit__(self, *exc):
        self.lock.release()


def _export_info(gguf: Path) -> dict:
    try:
        return json.loads((gguf.parent / "export.json").read_text())
    except (OSError, ValueError):
        return {}   # a GGUF without our export.json: no run system prompt, no extra stops


def _run_system(run_id: str | None) -> str:
    """The run's data.system (what its rows trained with when they had no system turn); "" when the run is gone."""

    if not run_id:
        return ""
    try:
        return runs.load_config(runs.get(run_id)).data.system
    except (GarageError, OSError):
        return ""
