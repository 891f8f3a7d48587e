"""Chat with a trained adapter: load a base model once, attach adapters by name, stream replies, compare with the base.

One ChatSession per app process. It holds one base model at a time (keyed by source + quant: asking for another
base frees the first) with any number of adapters attached by peft; switching adapters never reloads the base.

Generation runs in a worker thread that feeds a streamer; the caller iterates over the text so far. A
threading.Event checked by a StoppingCriteria stops it (session.stop()); an exception in the worker is re-raised
in the caller. One generation at a time per session: peft's active / disabled adapter is model-wide state.

compare() runs base and adapter as ONE batch of two rows with peft's mixed-adapter batches
(adapter_names=["__base__", name]), so both answers grow together at about the cost of one (CPU and GPU alike).
peft refuses DoRA adapters in mixed batches, so for those compare runs the base first, then the adapter.
The streamer is our own small batch-aware one: transformers' TextIteratorStreamer only takes batch size 1.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import queue
import re
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from core import models
from core.errors import BusyError, ConfigError, GarageError, ModelError, OutOfMemory

MAX_NEW_TOKENS = 1024
MIN_REPLY = 16
MAX_PROMPT_TOKENS = 8192          # beyond this the KV cache, not the weights, dominates memory on small GPUs
QUANTS = (None, "4bit")
BASE = "__base__"                 # peft's name for "no adapter" in a mixed batch
# End-of-turn tokens of common chat templates: generation_config.eos_token_id often names only the end-of-text.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


@dataclass
class GenSettings:
    max_new_tokens: int = 256
    temperature: float = 0.7      # 0 = greedy
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int | None = None       # None = a different answer each time when sampling
    system: str = ""              # system prompt, put first unless the messages already start with one

    @classmethod
    def of(cls, s: "GenSettings | dict | None") -> "GenSettings":
        if isinstance(s, GenSettings):
            out = dataclasses.replace(s)
        else:
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = set(s or {}) - names
            if unknown:
                raise ConfigError(sorted(unknown)[0], "unknown generation setting", f"use one of: {', '.join(sorted(names))}")
            out = cls(**(s or {}))
        return out.validate()

    def validate(self) -> "GenSettings":
        # sliders hand over floats (256.0) and text boxes strings: store the types generate() expects
        self.max_new_tokens, self.temperature, self.top_p = int(self.max_new_tokens), float(self.temperature), float(self.top_p)
        self.repetition_penalty = float(self.repetition_penalty)
        self.seed = None if self.seed in (None, "") else int(self.seed)
        self.system = str(self.system or "")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ConfigError("max_new_tokens", f"must be 1..{MAX_NEW_TOKENS}, got {self.max_new_tokens}", "use 256")
        if not 0 <= self.temperature <= 5:
            raise ConfigError("temperature", f"must be 0..5, got {self.temperature}", "0 = greedy; 0.7 is a common choice")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p}", "use 0.9, or 1 to turn it off")
        if not 0.5 <= self.repetition_penalty <= 3:
            raise ConfigError("repetition_penalty", f"must be 0.5..3, got {self.repetition_penalty}", "1.0 = off; 1.1 is mild")
        return self


# ---------------------------------------------------------------- runs and their adapters

def resolve_run(run: str) -> Path:
    """A run folder from a run id, or "latest" = the most recently finished completed run."""
    from core import runs

    if run != "latest":
        return runs.get(run)
    done = [r for r in runs.list_runs() if r.get("state") == "completed"]
    if not done:
        raise GarageError("there is no completed run yet", "train one first: python -m core train --preset cpu-demo")
    newest = max(done, key=lambda r: (str(r.get("ended_at") or ""), str(r.get("started_at") or "")))
    return runs.get(newest["id"])


def adapter_name(run_id: str, checkpoint: int | None = None) -> str:
    # peft uses the name as a module key, where "." is not allowed
    name = re.sub(r"[^A-Za-z0-9_-]", "_", run_id)
    return f"{name}-step{int(checkpoint)}" if checkpoint is not None else name


def check_adapter(base_model, adapter_dir: Path, *, loaded_source: str, trained_on: str | None) -> None:
    """Refuse an adapter made for another base: by the run's model.source, then by every adapted layer's shape."""
    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise ModelError(f"{adapter_dir} is not a PEFT adapter (adapter_config.json + adapter_model.safetensors)",
                         "pick a finished run or a checkpoint marked COMPLETE")
    claimed = trained_on or json.loads(cfg_file.read_text()).get("base_model_name_or_path") or ""
    if claimed and not same_source(claimed, loaded_source):
        raise ModelError(f"this adapter was trained on {claimed}, but the loaded base model is {loaded_source}",
                         "load the run itself (it brings its own base model), or pick an adapter trained on this base")
    from safetensors import safe_open

    modules = dict(base_model.named_modules())
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
            if not m:
                continue
            mod = modules.get(m.group(1))
            if mod is None:
                raise ModelError(f"the adapter changes layer {m.group(1)}, which the loaded base model does not have",
                                 "this adapter belongs to a different base model; load its own run")
            shape = f.get_slice(key).get_shape()
            want = getattr(mod, "in_features", None) if m.group(2) == "A" else getattr(mod, "out_features", None)
            got = shape[1] if m.group(2) == "A" else shape[0]
            if want is not None and got != want:
                raise ModelError(f"the adapter's {m.group(1)} expects size {got}, the loaded base model has {want}",
                                 "this adapter belongs to a different base model; load its own run")


def same_source(a: str, b: str) -> bool:
    if a.strip() == b.strip():
        return True
    try:
        return models.resolve(a, allow_download=False).resolve() == models.resolve(b, allow_download=False).resolve()
    except ModelError:
        return False  # one of them is not on this machine, so it cannot be the loaded one


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def ensure_chat_template(tokenizer, adapter_dir: Path | None = None) -> str | None:
    """Give the tokenizer the template the run trained with: the one saved with the adapter, else the model's
    own, else the fallback (so an exported model chats the same way). Returns the fallback notice for a model
    without a template of its own (data_tokenize.fallback_notice), None when it has one."""
    from core import data_tokenize

    notice = data_tokenize.fallback_notice(tokenizer)
    saved = models.saved_chat_template(adapter_dir) if adapter_dir is not None else None
    tokenizer.chat_template = saved or data_tokenize.chat_template(tokenizer)[0]
    return notice


# ---------------------------------------------------------------- the session

class ChatSession:
    """One loaded base model + named adapters. Methods are safe to call from Gradio worker threads."""

    def __init__(self, device: str | None = None):
        self.device = device            # None = cuda when available, decided at load (keeps torch out of import)
        self.source = self.quant = None
        self.base = self.model = self.tokenizer = None   # base: the transformers model; model: the PeftModel
        self.renderer = None                              # core.data's chat-template renderer: as in training
        self.template_notice: str | None = None           # set when the base has no chat template of its own
        self.stop_texts: list[str] = []                   # end-of-turn markers that are plain text in this vocabulary
        self.adapters: dict[str, dict] = {}             # name -> {run, checkpoint, path, trained_on, dora}
        self.context = 2048
        self.last_stats: dict = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # ------------------------------------------------------------ loading
    def render(self, messages: list[dict], system: str = "") -> str:
        """The prompt text the model sees (for a "show prompt" view in the UI)."""
        return self.tokenizer.decode(self.encode(messages, GenSettings(system=system)))

    def load(self, target: str, checkpoint: int | None = None, quant: str | None = None) -> str | None:
        """A run id ("latest" too) -> its base + adapter, returns the adapter name; a model source -> base only."""
        from core.paths import runs_dir

        if target == "latest" or ("/" not in target and (runs_dir() / target / "config.yaml").is_file()):
            return self.load_run(target, checkpoint, quant)
        self.load_base(target, quant)
        return None

    def load_run(self, run: str, checkpoint: int | None = None, quant: str | None = None) -> str:
        from core import runs

        run_dir = resolve_run(run)
        cfg = runs.load_config(run_dir)
        path = runs.adapter_path(run_dir, checkpoint)
        self.load_base(cfg.model.source, quant, cfg.model.trust_remote_code, cfg.quant)
        self.use_template_of(path)
        return self.attach(path, adapter_name(run_dir.name, checkpoint), trained_on=cfg.model.source,
                           run=run_dir.name, checkpoint=checkpoint)

    def load_base(self, source: str, quant: str | None = None, trust_remote_code: bool = False, quant_cfg=None) -> None:
        """Load (or keep, when source and quant match) the base model. Frees a different one first."""
        if quant not in QUANTS:
            raise ConfigError("quant", f"{quant!r} is not one of none, 4bit", "use 4bit when VRAM is short")
        if self.base is not None and self.quant == quant and same_source(source, self.source):
            return
        from core import data_tokenize
        from core.data_tokenize import Renderer

        with self._locked(timeout=30):
            self.unload()
            self.device = self.device or default_device()
            self._check_gpu_free()
            self.base, self.tokenizer = _load_model(source, quant, trust_remote_code, quant_cfg, self.device)
            self.stop_texts = data_tokenize.stop_strings(self.tokenizer)
            self.template_notice = ensure_chat_template(self.tokenizer)
            self.renderer = Renderer(self.tokenizer)
            self.source, self.quant = source, quant
            c = self.base.config
            self.context = int(getattr(c, "max_position_embeddings", 0) or getattr(c, "n_positions", 0) or 2048)

    def use_template_of(self, adapter_dir: Path) -> None:
        """Chat with the template saved with a run's adapter (what it trained with), where it saved one."""
        from core.data_tokenize import Renderer

        saved = models.saved_chat_template(adapter_dir)
        if saved and saved != self.tokenizer.chat_template:
            with self._locked():
                self.tokenizer.chat_template = saved
                self.renderer = Renderer(self.tokenizer)

    def attach(self, adapter_dir: Path, name: str, trained_on: str | None = None, run: str = "",
               checkpoint: int | None = None) -> str:
        """Add an adapter to the loaded base under `name` (kept if already there) and make it the active one."""
        from peft import PeftModel

        if self.base is None:
            raise ModelError("no base model is loaded", "load a run or a model first")
        weights = Path(adapter_dir) / "adapter_model.safetensors"
        stamp = weights.stat().st_mtime_ns if weights.exists() else None
        if name in self.adapters and self.adapters[name]["stamp"] == stamp:
            return name
        check_adapter(self.base, adapter_dir, loaded_source=self.source, trained_on=trained_on)
        with self._locked():
            if name in self.adapters:   # the run was resumed and saved a new adapter since: swap the weights
                self.model.delete_adapter(name)
                del self.adapters[name]
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.base, str(adapter_dir), adapter_name=name)
            else:
                self.model.load_adapter(str(adapter_dir), adapter_name=name)
            self.model.set_adapter(name)
            self.model.eval()
        dora = bool(json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("use_dora"))
        self.adapters[name] = {"run": run, "checkpoint": checkpoint, "path": str(adapter_dir),
                               "trained_on": trained_on or "", "dora": dora, "stamp": stamp}
        return name

    def unload(self) -> None:
        self.base = self.model = self.tokenizer = self.renderer = self.source = self.quant = None
        self.adapters = {}
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def info(self) -> dict:
        return {"source": self.source, "quant": self.quant, "device": self.device, "context": self.context,
                "adapters": list(self.adapters), "template_notice": self.template_notice}

    # ------------------------------------------------------------ generation
    def stop(self) -> None:
        """Stop the reply being generated (the UI's Stop button). Safe from any thread."""
        self._stop.set()

    def stream(self, messages: list[dict], settings=None, adapter: str | bool | None = None) -> Iterator[str]:
        """Yield the reply so far. adapter: a name, True = the last attached one, None/False = the base model."""
        for texts in self._generate(messages, settings, [self._row(adapter)]):
            yield texts[0]

    def generate(self, messages: list[dict], settings=None, adapter: str | bool | None = True) -> Iterator[str]:
        """docs/interfaces.md's name: stream() with the last attached adapter by default."""
        return self.stream(messages, settings, adapter)

    def compare(self, messages: list[dict], settings=None, adapter: str | bool = True) -> Iterator[tuple[str, str]]:
        """Yield (base_text, adapter_text) as both grow, for the same prompt and settings."""
        name = self._row(adapter if adapter not in (None, False) else True)
        if not self.adapters[name]["dora"]:
            yield from self._generate(messages, settings, [BASE, name])
            return
        base = ""
        for base in self.stream(messages, settings, None):
            yield base, ""
        for text in self._generate(messages, settings, [name], keep_stop=True):
            yield base, text[0]

    def loss(self, input_ids: list[int], labels: list[int], adapter: str | bool | None = None) -> tuple[float, int]:
        """(summed loss over label tokens, label token count) for one example, with or without an adapter."""
        import torch

        row = self._row(adapter)
        with self._locked(), self._adapter_ctx(row), torch.inference_mode():
            ids = torch.tensor([input_ids], device=self.base.device)
            lab = torch.tensor([labels], device=self.base.device)
            logits = (self.model or self.base)(input_ids=ids).logits[0, :-1].float()
            target = lab[0, 1:]
            n = int((target != -100).sum())
            total = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
        return float(total), n

    # ------------------------------------------------------------ internals
    def _row(self, adapter) -> str:
        if adapter is None or adapter is False:
            return BASE
        if self.base is None:
            raise ModelError("no model is loaded", "load a run first")
        if adapter is True:
            if not self.adapters:
                raise ModelError("no adapter is loaded", "load a run (or one of its checkpoints) first")
            return list(self.adapters)[-1]
        if adapter not in self.adapters:
            raise ModelError(f"adapter {adapter!r} is not loaded", f"loaded: {', '.join(self.adapters) or 'none'}")
        return adapter

    def _adapter_ctx(self, row: str):
        if self.model is None:
            return nullcontext()
        if row == BASE:
            return self.model.disable_adapter()
        self.model.set_adapter(row)
        return nullcontext()

    @contextmanager
    def _locked(self, timeout: float = 10):
        # a plain Lock, not an RLock: Gradio may resume a generator (which holds it) on another thread
        if not self._lock.acquire(timeout=timeout):
            raise BusyError("another reply is still being generated", "press Stop or wait for it to finish")
        try:
            yield
        finally:
            self._lock.release()

    def _check_gpu_free(self) -> None:
        if self.device == "cpu":
            return
        from core import runner

        busy = runner.running()
        if busy:
            raise BusyError(f"run {busy} is training on the GPU", "wait for it to finish or stop it; or chat on the CPU")

    def encode(self, messages: list[dict], settings: GenSettings) -> list[int]:
        """The prompt exactly as the model sees it: chat template + generation prompt, length-checked."""
        if self.tokenizer is None:
            raise ModelError("no model is loaded", "load a run first")
        msgs = [{"role": m["role"], "content": _text(m.get("content"))} for m in messages or []]
        if not msgs or msgs[-1]["role"] != "user":
            raise GarageError("the conversation must end with a user message", "type a message first")
        if settings.system and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": settings.system})
        # rendered and tokenised exactly as core.data did for training: the template holds every special token
        text = self.renderer.render(msgs, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        # the reply needs room too: at least MIN_REPLY tokens; longer replies are cut to what the context has left
        room = min(self.context - MIN_REPLY, MAX_PROMPT_TOKENS)
        if len(ids) > room:
            raise GarageError(f"the conversation is {len(ids)} tokens, more than this model can take "
                              f"(prompt limit here: {max(room, 0)}, model context: {self.context})",
                              "clear the chat or shorten the message")
        return ids

    def _generate(self, messages, settings, rows: list[str], keep_stop: bool = False) -> Iterator[tuple[str, ...]]:
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        s = GenSettings.of(settings)
        with self._locked():
            self._check_gpu_free()
            ids = self.encode(messages, s)
            if not keep_stop:
                self._stop.clear()
            stop = self._stop

            class StopOnEvent(StoppingCriteria):
                def __call__(self, input_ids, scores, **kwargs):
                    return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

            tok = self.tokenizer
            eos = _eos_ids(self.base, tok)
            sampling = s.temperature > 0
            budget = min(s.max_new_tokens, self.context - len(ids))
            gen = GenerationConfig(max_new_tokens=budget, do_sample=sampling, eos_token_id=eos,
                                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos[0],
                                   repetition_penalty=float(s.repetition_penalty), stop_strings=self.stop_texts or None,
                                   **({"temperature": float(s.temperature), "top_p": float(s.top_p)} if sampling else {}))
            batch = torch.tensor([ids] * len(rows), device=self.base.device)
            kwargs = {"adapter_names": rows} if len(rows) > 1 else {}
            ctx = self._adapter_ctx(rows[0]) if len(rows) == 1 else nullcontext()
            streamer = _RowsStreamer(tok, len(rows), set(eos), self.stop_texts)
            errors: list[BaseException] = []

            def work():
                try:
                    if s.seed is not None:
                        torch.manual_seed(int(s.seed))
                    with ctx, torch.inference_mode():
                        (self.model or self.base).generate(
                            input_ids=batch, attention_mask=torch.ones_like(batch), generation_config=gen,
                            streamer=streamer, stopping_criteria=StoppingCriteriaList([StopOnEvent()]),
                            tokenizer=tok if self.stop_texts else None, **kwargs)
                except BaseException as e:  # noqa: BLE001 - handed to the consumer below, re-raised there
                    errors.append(e)
                finally:
                    streamer.end()

            t0 = time.perf_counter()
            worker = threading.Thread(target=work, name="garage-generate", daemon=True)
            worker.start()
            finished = False
            try:
                for texts in streamer:
                    yield texts
                finished = True
            finally:
                if not finished:   # the consumer went away (Gradio cancel): do not generate for nobody
                    stop.set()
                worker.join()
                if errors and not finished:   # nobody left to raise to: at least leave a trace
                    logging.getLogger(__name__).error("generation failed after the reader left", exc_info=errors[0])
            if errors:
                if isinstance(errors[0], torch.OutOfMemoryError):
                    raise OutOfMemory("the GPU ran out of memory while answering",
                                      "lower max new tokens, clear the chat, or load the model in 4-bit") from errors[0]
                raise errors[0]
            self.last_stats = streamer.stats(t0, len(ids))


def _text(content) -> str:
    """Message content as text; Gradio may hand a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def _eos_ids(model, tok) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    vocab = tok.get_vocab()
    ids += [vocab[t] for t in _END_OF_TURN if t in vocab]
    return list(dict.fromkeys(ids))


class _RowsStreamer:
    """Streamer for a batch of rows: collects each row's tokens until its end-of-turn, hands out the texts so far.
    A slow consumer skips intermediate states (each one is the full text), so it never lags behind."""

    def __init__(self, tokenizer, rows: int, eos: set[int], stop_texts: list[str] | None = None):
        self.tok, self.eos, self.stop_texts = tokenizer, eos, list(stop_texts or [])
        self.ids = [[] for _ in range(rows)]
        self.done = [False] * rows
        self.texts = [""] * rows
        self.q: queue.Queue = queue.Queue()
        self.prompt_seen = False
        self.first_at = self.end_at = None
        self.steps = 0

    def put(self, value) -> None:
        if not self.prompt_seen:   # generate() hands over the prompt first
            self.prompt_seen = True
            return
        self.first_at = self.first_at or time.perf_counter()
        self.steps += 1
        for i, tid in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            if tid in self.eos:
                self.done[i] = True
                continue
            self.ids[i].append(tid)
            # hold back a trailing half-decoded character (byte-level BPE splits UTF-8 across tokens)
            text, ended = self._cut(self.tok.decode(self.ids[i], skip_special_tokens=True))
            self.texts[i], self.done[i] = (text if ended else text.rstrip("\ufffd")), ended
        self.q.put(tuple(self.texts))

    def _cut(self, text: str) -> tuple[str, bool]:
        """The text before the first end-of-turn marker written as plain text, and whether there was one."""
        cuts = [text.find(t) for t in self.stop_texts if t in text]
        return (text[:min(cuts)], True) if cuts else (text, False)

    def end(self) -> None:
        self.end_at = time.perf_counter()
        self.texts = [self._cut(self.tok.decode(r, skip_special_tokens=True))[0] for r in self.ids]
        self.q.put(tuple(self.texts))
        self.q.put(None)

    def __iter__(self):
        while True:
            latest, item = None, self.q.get()
            while item is not None:   # skip to the newest state, but never past the end marker
                latest = item
                if self.q.empty():
                    break
                item = self.q.get_nowait()
            if latest is not None:
                yield latest          # with the end marker right behind it, this is the final text
            if item is None:
                return

    def stats(self, t0: float, prompt_tokens: int) -> dict:
        end = self.end_at or time.perf_counter()
        decode = end - self.first_at if self.first_at else 0.0
        return {"prompt_tokens": prompt_tokens, "new_tokens": [len(r) for r in self.ids], "steps": self.steps,
                "ttft_s": round(self.first_at - t0, 4) if self.first_at else None, "seconds": round(end - t0, 4),
                "tokens_per_s": round((self.steps - 1) / decode, 2) if self.steps > 1 and decode > 0 else None}


def _load_model(source: str, quant, trust_remote_code: bool, quant_cfg, device: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = models.resolve(source)
    models.check_safetensors(path)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    models.drop_gguf_quantization(config)  # as training does: the folder holds plain floats
    dtype = torch.float32
    if device == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    kwargs = {"config": config, "dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True,
              "device_map": {"": 0 if device == "cuda" else "cpu"}}
    if quant == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=getattr(quant_cfg, "quant_type", "nf4"),
            bnb_4bit_use_double_quant=getattr(quant_cfg, "double_quant", True), bnb_4bit_compute_dtype=dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except torch.OutOfMemoryError as e:
        raise OutOfMemory(f"the GPU ran out of memory loading {source} for chat",
                          "load it in 4-bit (quant=4bit), close other GPU programs, or chat on the CPU") from e
    model.eval()
    tok = models.load_tokenizer(path, trust_remote_code=trust_remote_code)
    return model, tok


# ---------------------------------------------------------------- evaluation

def evaluate(run_id: str, checkpoint: int | None = None, session: ChatSession | None = None,
             quant: str | None = None, max_new_tokens: int = 64, limit: int = 200) -> dict:
    """Score base vs adapter on the run's held-out data: the dataset's checker if it has one (accuracy),
    else perplexity on the eval split (or, with none, on the first training rows: said in "split")."""
    from core import data, runs

    session = session or ChatSession()
    run_dir = resolve_run(run_id)
    name = session.load_run(run_dir.name, checkpoint, quant)
    cfg = runs.load_config(run_dir)
    items = data.demo_eval_set(cfg.data.source)
    if items:
        settings = GenSettings(max_new_tokens=max_new_tokens, temperature=0.0)
        rows = []
        for item in items[:limit]:
            base = adapted = ""
            for base, adapted in session.compare(item["messages"], settings, adapter=name):
                pass
            rows.append({"prompt": _text(item["messages"][-1]["content"]), "expected": item["expected"],
                         "base": base, "adapter": adapted,
                         "base_ok": bool(data.score_answer(cfg.data.source, base, item["expected"])),
                         "adapter_ok": bool(data.score_answer(cfg.data.source, adapted, item["expected"]))})
        n = len(rows)
        return {"metric": "accuracy", "higher_is_better": True, "split": "eval", "n": n, "rows": rows,
                "base": sum(r["base_ok"] for r in rows) / n, "adapter": sum(r["adapter_ok"] for r in rows) / n}
    prepared = data.prepare(cfg, session.tokenizer)
    split = "eval" if prepared.eval else "train (the run has no held-out split)"
    # packed training sequences hold several examples: score the unpacked rows, one example each
    examples = (prepared.eval or getattr(prepared.train, "rows", prepared.train))[:limit]
    if not examples:
        raise GarageError("the run's dataset has no rows to evaluate on", "check data.source of the run")
    rows, totals = [], {BASE: [0.0, 0], name: [0.0, 0]}
    for ex in examples:
        row = {}
        for key in (BASE, name):
            loss, n = session.loss(ex["input_ids"], ex["labels"], None if key == BASE else name)
            totals[key][0] += loss
            totals[key][1] += n
            row["base_loss" if key == BASE else "adapter_loss"] = loss / max(n, 1)
        rows.append(row)
    base_loss, ad_loss = (totals[k][0] / max(totals[k][1], 1) for k in (BASE, name))
    return {"metric": "perplexity", "higher_is_better": False, "split": split, "n": len(rows), "rows": rows,
            "base": math.exp(base_loss), "adapter": math.exp(ad_loss), "base_loss": base_loss, "adapter_loss": ad_loss}
