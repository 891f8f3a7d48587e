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

Which run and adapter to load, and whether an adapter fits the base, is core.runs.resolve'; the base model loads
through core.models.load_base; scoring base vs adapter is core.evaluate's.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import json
import logging
import queue
import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from core import hardware
from core import models
from core.data import tokenize as data_tokenize
from core.runs import resolve as run_files
from core.runs import runner
from core.config import QuantConfig
from core.errors import BusyError, ConfigError, GarageError, ModelError, OutOfMemory
from core.data.tokenize import Renderer
from core.runs import folder as runs
from core.runs import runner

MAX_NEW_TOKENS = 1024
MIN_REPLY = 16
MAX_PROMPT_TOKENS = 8192          # beyond this the KV cache, not the weights, dominates memory on small GPUs
QUANTS = (None, "4bit")
BASE = "__base__"                 # peft's name for "no adapter" in a mixed batch
BATCH_RAM_BUDGET = 2 * 2**30      # bytes a CPU scoring batch may use (answer_batch, forced_compare)
MAX_BATCH_ROWS = 128              # a decode step's cost is mostly fixed (the weights are read once a step): on 2
                                  # cores a base+adapter step took 0.14 s for 16 rows, 0.27 s for 64, 0.35 s for 128
# End-of-turn tokens of common chat templates: generation_config.eos_token_id often names only the end-of-text.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


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


def default_device() -> str:
    """hardware.pick_device: cuda, then mps, then cpu (the same picker as training, eval and doctor)."""
    return hardware.pick_device()


# ---------------------------------------------------------------- the session

class ChatSession:
    """One loaded base model + named adapters. Methods are safe to call from Gradio worker threads."""

    def __init__(self, device: str | None = None):
        self.device = device            # None = hardware.pick_device() at load (keeps torch out of import)
        self.source = self.quant = None
        self.base = self.model = self.tokenizer = None   # base: the transformers model; model: the PeftModel
        self.renderer = None                              # core.data.sft's chat-template renderer: as in training
        self.template_notice: str | None = None           # set when the base has no chat template of its own
        self.base_template: str | None = None             # the base's own template (or the default given it)
        self.stop_texts: list[str] = []                   # end-of-turn markers that are plain text in this vocabulary
        self.adapters: dict[str, dict] = {}             # name -> {run, checkpoint, path, trained_on, dora}
        self.context = 2048
        self.last_stats: dict = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.run_system = ""  # the loaded run's data.system (core.data.tokenize.with_system)
        self.inside_run: str | None = None  # set in a training child scoring its own run (its report): not "busy"

    # ------------------------------------------------------------ loading
    def load_run(self, run: str, checkpoint: int | None = None, quant: str | None = None) -> str:
        run_dir = run_files.resolve_run(run)
        cfg = runs.load_config(run_dir)
        path = runs.adapter_path(run_dir, checkpoint)
        self.load_base(cfg.model.source, quant, cfg.model.trust_remote_code, cfg.quant)
        self.use_template_of(path)
        self.run_system = cfg.data.system
        name = self.attach(path, run_files.adapter_name(run_dir.name, checkpoint), trained_on=cfg.model.source,
                           run=run_dir.name, checkpoint=checkpoint)
        self.adapters[name].update(template=self.tokenizer.chat_template, system=cfg.data.system)  # for use()
        return name

    def has_loaded(self, run: str, checkpoint: int | None = None) -> bool:
        """Whether load_run(run, checkpoint) would find its base and adapter already loaded (nothing to wait for)."""
        name = run_files.adapter_name(run, checkpoint)
        return self.base is not None and name in self.adapters

    def load_base(self, source: str, quant: str | None = None, trust_remote_code: bool = False, quant_cfg=None) -> None:
        """Load (or keep, when source and quant match) the base model. Frees a different one first. The plain base
        chats without the last run's data.system (load_run sets it again after this)."""
        if quant not in QUANTS:
            raise ConfigError("quant", f"{quant!r} is not one of none, 4bit", "use 4bit when VRAM is short")
        self.run_system = ""
        if self.base is not None and self.quant == quant and run_files.same_source(source, self.source):
            return

        with self._locked(timeout=30):
            self.unload()
            self.device = self.device or default_device()
            if quant == "4bit":
                models.check_device_support(self.device, "qlora")  # mps: only where bitsandbytes runs there
            self._check_gpu_free()
            self.base, self.tokenizer = _load_model(source, quant, trust_remote_code, quant_cfg or QuantConfig(),
                                                    self.device)
            self.stop_texts = data_tokenize.stop_strings(self.tokenizer)
            self.template_notice = run_files.ensure_chat_template(self.tokenizer)
            self.base_template = self.tokenizer.chat_template
            self.renderer = Renderer(self.tokenizer)
            self.source, self.quant = source, quant
            c = self.base.config
            self.context = int(getattr(c, "max_position_embeddings", 0) or getattr(c, "n_positions", 0) or 2048)

    def use_template_of(self, adapter_dir: Path) -> None:
        """Chat with the template saved with a run's adapter (what it trained with), where it saved one."""

        saved = models.saved_chat_template(adapter_dir)
        if saved and saved != self.tokenizer.chat_template:
            with self._locked():
                self.tokenizer.chat_template = saved
                self.renderer = Renderer(self.tokenizer)

    def attach(self, adapter_dir: Path, name: str, trained_on: str | None = None, run: str = "",
               checkpoint: int | None = None) -> str:
        """Add an adapter to the loaded base under `name` (kept if already there) and make it the active one."""
        from peft import PeftModel  # heavy

        if self.base is None:
            raise ModelError("no base model is loaded", "load a run or a model first")
        weights = Path(adapter_dir) / "adapter_model.safetensors"
        stamp = weights.stat().st_mtime_ns if weights.exists() else None
        if name in self.adapters and self.adapters[name]["stamp"] == stamp:
            return name
        run_files.check_adapter(self.base, adapter_dir, loaded_source=self.source, trained_on=trained_on)
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

    def use(self, adapter: str | None) -> str:
        """Answer next as `adapter` (a loaded name) with its run's chat template and system prompt, or as the base
        (None) with the base's own: the per-request switch a server needs (the Chat page keeps one run's template
        for both sides instead). Returns the name to hand to stream()."""
        row = self._row(adapter)
        chosen = self.adapters.get(row, {})
        template = chosen.get("template") or self.base_template
        with self._locked():
            if template != self.tokenizer.chat_template:
                self.tokenizer.chat_template = template
                self.renderer = Renderer(self.tokenizer)
            self.run_system = chosen.get("system", "")
        return row

    def detach(self, name: str) -> None:
        """Remove an adapter from the base (its weights are freed; the base stays loaded)."""
        self._row(name)
        with self._locked():
            self.model.delete_adapter(name)
            del self.adapters[name]

    def unload(self) -> None:
        self.base = self.model = self.tokenizer = self.renderer = self.source = self.quant = None
        self.adapters = {}
        gc.collect()
        if self.device == "cuda":
            import torch  # heavy

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
        import torch  # heavy

        row = self._row(adapter)
        with self._locked(), self._adapter_ctx(row), torch.inference_mode():
            ids = torch.tensor([input_ids], device=self.base.device)
            lab = torch.tensor([labels], device=self.base.device)
            logits = (self.model or self.base)(input_ids=ids).logits[0, :-1].float()
            target = lab[0, 1:]
            n = int((target != -100).sum())
            total = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
        return float(total), n

    # ------------------------------------------------------------ batched scoring: eval, the Score button, the report
    def answer_pairs(self, prompts: list[list[int]], adapter: str | bool = True, max_new_tokens: int = 64,
                     progress=None, with_ids: bool = False) -> tuple[list, list]:
        """(base answers, adapter answers) to the same prompts: both rows of a prompt in the same batch, as in
        compare() (peft's mixed-adapter batches; DoRA adapters, which peft refuses there, go base first)."""
        name = self._row(adapter if adapter not in (None, False) else True)
        n = len(prompts)
        if self.adapters[name]["dora"]:
            return (self.answer_batch(prompts, None, max_new_tokens, progress, with_ids),
                    self.answer_batch(prompts, name, max_new_tokens, progress, with_ids))
        both = self.answer_batch(prompts + prompts, [BASE] * n + [name] * n, max_new_tokens, progress, with_ids)
        return both[:n], both[n:]

    def answer_batch(self, prompts: list[list[int]], adapter: str | bool | list | None = None,
                     max_new_tokens: int = 64, progress=None, with_ids: bool = False, temperature: float = 0.0) -> list:
        """Greedy answers to many prompts (token ids, as encode() makes them), in left-padded batches sized by the
        memory budget (batch_rows); each row stops at its own end of turn. The texts are those stream() gives;
        with_ids: (text, answer token ids) pairs. `adapter`: one for all rows, or a list of one per row (BASE for
        the base model). `progress(done, total)` hears each batch. temperature > 0 samples instead (as GRPO does)."""
        import torch  # heavy

        names = [self._row(a) for a in adapter] if isinstance(adapter, list) else [self._row(adapter)] * len(prompts)
        with self._locked(timeout=60):
            self._check_gpu_free()
            tok = self.tokenizer
            eos = _eos_ids(self.base, tok)
            pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
            texts: list = [""] * len(prompts)
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # like lengths together: less padding
            done = 0
            while done < len(order):
                size = max(1, min(self.batch_rows(len(prompts[order[-1]]) + max_new_tokens), len(order) - done))
                chunk = order[done:done + size]
                rows = list(dict.fromkeys(names[i] for i in chunk))
                width = max(len(prompts[i]) for i in chunk)
                ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in chunk], device=self.base.device)
                mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk],
                                    device=self.base.device)
                mixed = [names[i] for i in chunk] if len(rows) > 1 else None
                with (self._adapter_ctx(rows[0]) if len(rows) == 1 else nullcontext()), torch.inference_mode():
                    ended = (lambda n, base=done: progress(base + n, len(order))) if progress else None
                    out = self._decode_rows(ids, mask, max(1, min(max_new_tokens, self.context - width)), set(eos),
                                            temperature, mixed, ended)
                for k, i in enumerate(chunk):
                    new = out[k]
                    ends = [j for j, t in enumerate(new) if t in eos]
                    new = new[:ends[0]] if ends else new
                    text = _RowsStreamer(tok, 1, set(eos), self.stop_texts).final_text(new)
                    texts[i] = (text, new) if with_ids else text
                done += len(chunk)
                if progress:
                    progress(done, len(order))
        return texts

    def _decode_rows(self, ids, mask, max_new_tokens: int, eos: set[int], temperature: float = 0.0,
                     adapter_names: list[str] | None = None, on_end=None) -> list[list[int]]:
        """Each row's new tokens, greedy (or sampled at `temperature`, as transformers' generate samples with
        top_p 1 and top_k 0), from left-padded `ids`. A row that wrote an end-of-turn token or a stop text leaves
        the batch, its KV cache with it: generate() would go on computing it as padding until the longest row
        ends, and held-out answers end early (the cpu-demo adapter's 20 eval answers use 251 of 1,280 token
        steps). The positions are generate()'s (the attention mask's running count), so the texts are its.
        on_end(n) hears the count of rows that have ended, as it grows: one batch can take a while."""
        import torch  # heavy

        model = self.model or self.base
        takes = inspect.signature(type(self.base).forward).parameters
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1) if "position_ids" in takes else None
        alive = list(range(ids.shape[0]))          # the original row of each row still in the batch
        out: list[list[int]] = [[] for _ in alive]
        cache, step_ids, ended = None, ids, set()
        tok, stops = self.tokenizer, self.stop_texts
        tail = max((len(tok(t, add_special_tokens=False)["input_ids"]) for t in stops), default=0) + 2
        for step in range(max_new_tokens):
            extra = {"position_ids": pos} if pos is not None else {}
            if adapter_names is not None:
                extra["adapter_names"] = [adapter_names[r] for r in alive]
            if step == 0 and "logits_to_keep" in takes:
                extra["logits_to_keep"] = 1
            res = model(input_ids=step_ids, attention_mask=mask, past_key_values=cache, use_cache=True, **extra)
            cache, logits = res.past_key_values, res.logits[:, -1, :].float()
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1).squeeze(-1)
            else:
                nxt = logits.argmax(-1)
            before = len(ended)
            for r, t in zip(alive, nxt.tolist()):
                if r not in ended:
                    out[r].append(t)
                    if t in eos or (stops and any(s in tok.decode(out[r][-tail:]) for s in stops)):
                        ended.add(r)
            keep = [k for k, r in enumerate(alive) if r not in ended]
            if on_end and len(ended) > before and keep:
                on_end(len(ended))
            if not keep or step == max_new_tokens - 1:
                break
            layers = getattr(cache, "layers", None)
            # dropping rows copies the cache: worth it once an eighth of the batch has ended. A cache that cannot
            # drop rows keeps the ended ones as padding, their tokens unread.
            can_drop = layers is not None and all(hasattr(x, "batch_select_indices") for x in layers)
            if can_drop and len(alive) - len(keep) >= max(1, len(alive) // 8):
                idx = torch.tensor(keep, device=ids.device)
                for layer in layers:
                    layer.batch_select_indices(idx)
                alive, nxt, mask = [alive[k] for k in keep], nxt[idx], mask[idx]
                pos = pos[idx] if pos is not None else None
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            pos = pos[:, -1:] + 1 if pos is not None else None
            step_ids = nxt.unsqueeze(-1)
        return out

    def forced_compare(self, rows: list[tuple[list[int], list[int]]], adapter: str | bool = True,
                       progress=None) -> list[dict]:
        """Teacher-forced base vs adapter on (input_ids, labels) rows, in right-padded batches: per row the summed
        cross-entropy of each side on its label tokens (-100 = not scored), the summed KL(base || adapter) over
        those positions (nats) and their count: {"base", "adapter", "kl", "n"}. Only the positions from a batch's
        first label on get logits (the model's logits_to_keep, where it has one): the prompt before a reply is
        read, not scored, and its vocabulary-wide logits, softmax and KL cost 11-15% of the cpu-demo report's
        teacher-forced passes (8.2 s instead of 9.7 s for the 40 neutral prompts, 2 quiet cores)."""
        import torch  # heavy
        import torch.nn.functional as F  # heavy

        name = self._row(adapter)
        can_keep = "logits_to_keep" in inspect.signature(type(self.base).forward).parameters
        out: list[dict] = [{}] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        vocab = int(self.base.config.vocab_size if hasattr(self.base.config, "vocab_size") else len(self.tokenizer))
        done = 0
        with self._locked(timeout=60):
            self._check_gpu_free()
            while done < len(order):
                longest = len(rows[order[-1]][0])
                # two sides' float32 logits for every position dominate: keep them within a quarter of the budget
                size = max(1, min(self.batch_rows(longest), int(self.memory_budget() / 4 // max(1, 2 * longest * vocab * 4)),
                                  len(order) - done))
                chunk = order[done:done + size]
                width = max(len(rows[i][0]) for i in chunk)
                dev = self.base.device
                ids = torch.tensor([rows[i][0] + [0] * (width - len(rows[i][0])) for i in chunk], device=dev)
                mask = torch.tensor([[1] * len(rows[i][0]) + [0] * (width - len(rows[i][0])) for i in chunk], device=dev)
                lab = torch.tensor([rows[i][1] + [-100] * (width - len(rows[i][1])) for i in chunk], device=dev)
                # logits at position p predict token p + 1: keep positions from the first label - 1 on
                labelled = [next((j for j, x in enumerate(rows[i][1]) if x != -100), width) for i in chunk]
                start = max(0, min(labelled) - 1) if can_keep else 0
                extra = {"logits_to_keep": width - start} if can_keep else {}
                logp = {}
                for side in (BASE, name):
                    with self._adapter_ctx(side), torch.inference_mode():
                        logits = (self.model or self.base)(input_ids=ids, attention_mask=mask, **extra).logits
                        logp[side] = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                target = lab[:, start + 1:]
                keep = target != -100
                safe = target.clamp(min=0).unsqueeze(-1)
                with torch.inference_mode():
                    nll = {side: -(lp.gather(-1, safe).squeeze(-1) * keep).sum(-1) for side, lp in logp.items()}
                    kl = (F.kl_div(logp[name], logp[BASE], log_target=True, reduction="none").sum(-1) * keep).sum(-1)
                for k, i in enumerate(chunk):
                    out[i] = {"base": float(nll[BASE][k]), "adapter": float(nll[name][k]),
                              "kl": max(0.0, float(kl[k])), "n": int(keep[k].sum())}
                done += len(chunk)
                if progress:
                    progress(done, len(order))
        return out

    def memory_budget(self) -> int:
        """Bytes a scoring batch may use: half the GPU's free memory, or 2 GiB of RAM on the CPU."""
        import torch  # heavy

        if self.device == "cuda" and torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            return int(free * 0.5)
        return BATCH_RAM_BUDGET

    def batch_rows(self, tokens: int) -> int:
        """How many rows of `tokens` tokens (prompt + answer) one batch may hold within memory_budget(): the KV
        cache, the widest activations and the attention scores of a row, each counted at float32."""
        c = self.base.config
        layers = int(getattr(c, "num_hidden_layers", 0) or getattr(c, "n_layer", 0) or 32)
        hidden = int(getattr(c, "hidden_size", 0) or getattr(c, "n_embd", 0) or 4096)
        heads = int(getattr(c, "num_attention_heads", 0) or getattr(c, "n_head", 0) or 32)
        kv_heads = int(getattr(c, "num_key_value_heads", 0) or heads)
        inter = int(getattr(c, "intermediate_size", 0) or 4 * hidden)
        kv = 2 * layers * kv_heads * (hidden // heads) * 4
        per_row = tokens * (kv + 4 * (2 * hidden + 2 * inter)) + heads * tokens * tokens * 4
        return int(max(1, min(MAX_BATCH_ROWS, self.memory_budget() // max(1, per_row))))

    # ------------------------------------------------------------ internals
    def _row(self, adapter) -> str:
        if adapter is None or adapter is False or adapter == BASE:
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

        busy = runner.running()
        if busy and busy != self.inside_run:
            raise BusyError(f"run {busy} is training on the GPU", "wait for it to finish or stop it; or chat on the CPU")

    def encode(self, messages: list[dict], settings: GenSettings) -> list[int]:
        """The prompt exactly as the model sees it: chat template + generation prompt, length-checked."""
        if self.tokenizer is None:
            raise ModelError("no model is loaded", "load a run first")
        msgs = [{"role": m["role"], "content": message_text(m.get("content"))} for m in messages or []]
        if not msgs or msgs[-1]["role"] != "user":
            raise GarageError("the conversation must end with a user message", "type a message first")
        # the box's system prompt, else the one the run trained with (data.system), else the template's default
        msgs = data_tokenize.with_system(msgs, settings.system or self.run_system)
        # rendered and tokenised exactly as core.data.sft did for training: the template holds every special token
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
        import torch  # heavy
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList  # heavy

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
                    yield_to_training(self.base.device)
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


# A reply generated on the CPU while a run trains goes at a lower scheduling priority: its thread (and the threads
# torch starts from it) at nice 10 against the run's 0 share a busy core about 1 to 9, so the reply comes slower
# and the run keeps its pace (bench/app_load.py: training's tokens/s with twenty pages chatting). Linux only: there
# a nice value is a thread's own, and this thread ends with the reply.
CHAT_NICE_WHILE_TRAINING = 10


def yield_to_training(device) -> str | None:
    """On the CPU, while a run trains: lower the calling thread's priority (a thread made for one reply) -> the run's
    id, or None where nothing was changed."""
    if getattr(device, "type", device) != "cpu" or not sys.platform.startswith("linux"):
        return None
    run_id = runner.running()
    if run_id is None:
        return None
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CHAT_NICE_WHILE_TRAINING)
    return run_id


def message_text(content) -> str:
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
    ids += [vocab[t] for t in END_OF_TURN if t in vocab]
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
            self.texts[i], self.done[i] = (text if ended else self._held(text.rstrip("\ufffd"))), ended
        self.q.put(tuple(self.texts))

    def _cut(self, text: str) -> tuple[str, bool]:
        """The text before the first end-of-turn marker written as plain text, and whether there was one."""
        cuts = [text.find(t) for t in self.stop_texts if t in text]
        return (text[:min(cuts)], True) if cuts else (text, False)

    def _held(self, text: str) -> str:
        """The text without a tail that could be the start of a marker ("<|im_"): shown once the next tokens show
        it is not one, dropped when the reply ends there (the token limit cut the marker)."""
        for n in range(min(len(text), max((len(t) for t in self.stop_texts), default=1) - 1), 0, -1):
            if any(t.startswith(text[-n:]) for t in self.stop_texts):
                return text[:-n]
        return text

    def final_text(self, ids: list[int]) -> str:
        """A finished row's text: decoded, cut at an end-of-turn marker written as plain text; a tail that could
        only be the start of one (the token limit cut it) is dropped."""
        text, ended = self._cut(self.tok.decode(ids, skip_special_tokens=True))
        return text if ended else self._held(text)

    def end(self) -> None:
        self.end_at = time.perf_counter()
        self.texts = [self.final_text(r) for r in self.ids]
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


def _load_model(source: str, quant, trust_remote_code: bool, quant_cfg: QuantConfig, device: str):
    """The base model and tokenizer for chat, loaded by models.load_base (16-bit, or 4-bit with the run's
    quant_type / double_quant when quant="4bit")."""
    import torch  # heavy

    path = models.resolve(source)
    try:
        model = models.load_base(path, method="qlora" if quant == "4bit" else "lora", quant_type=quant_cfg.quant_type,
                                 double_quant=quant_cfg.double_quant, device=device,
                                 trust_remote_code=trust_remote_code)
    except torch.OutOfMemoryError as e:
        raise OutOfMemory(f"the GPU ran out of memory loading {source} for chat",
                          "load it in 4-bit (quant=4bit), close other GPU programs, or chat on the CPU") from e
    tok = models.load_tokenizer(path, trust_remote_code=trust_remote_code)
    return model, tok
