"""Datasets: take what the user has, and show exactly what the model will be trained on.

    convs, fmt, columns = load_rows("my.jsonl")        # chat messages, the detected format, the column mapping
    prepared = prepare(cfg, tokenizer, progress=cb)     # token ids + labels (-100 = no loss), stats, samples
    html = preview_html(prepared)                       # trained vs masked tokens, styled

Reading lives in data_read.py, formats in data_formats.py, templates/masks/token storage in data_tokenize.py.
Rows are streamed and tokenised in batches, and kept as flat arrays, so a large file needs memory for its
tokens, not for Python objects per row.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

from core.data.formats import FORMATS, check_meaning, detect, ignored_columns, normalise
from core.data.read import BUILTIN_DATA, Where, estimate_total, is_hub_id, iter_records
from core.data.tokenize import (DEFAULT_CHAT_TEMPLATE, Chunker, Renderer, TokenRows, chat_template, encode,
                                 loss_mask, pack, segments)
from core.data.prepared import DataStats, Prepared, hold_out
from core.errors import DatasetError
from core.data import pref as data_pref
from core.data import prompts as data_prompts

__all__ = ["DataStats", "Prepared", "RowReader", "FORMATS", "DEFAULT_CHAT_TEMPLATE", "chat_template", "load_rows", "prepare",
           "preview_html", "preview_text", "demo_eval_set", "score_answer"]

DEMO_ID = "builtin:demo-identity"
PREFERENCE_DEMO_ID = "builtin:demo-preference"  # DPO / ORPO demo: replies end with a sign-off (cpu-dpo-demo)
DEMO_EVAL_FILES = {DEMO_ID: "demo_identity_eval.jsonl", PREFERENCE_DEMO_ID: "demo_preference_eval.jsonl"}
_BATCH = 512        # rows per tokenizer call: big enough to amortise, small enough to stream
_SAMPLES = 5        # rendered examples kept for previews
_MEDIA_MARKER = re.compile(r"<(image|video|audio)>")


# ---------------------------------------------------------------- reading

class RowReader:
    """Iterates (conversation, where) over a source; `format` and `columns` are known after the first row."""

    def __init__(self, source: str, format: str = "auto", columns: dict | None = None, split: str = "train",
                 subset: str = "", limit: int = 0, fill: dict | None = None):
        self.source, self.want_format, self.want_columns = source, format or "auto", dict(columns or {})
        self.split, self.subset, self.limit, self.fill = split, subset, limit, dict(fill or {})
        self.format: str | None = None
        self.columns: dict = {}
        self.ignored: dict[str, None] = {}       # ordered set of unused columns, over all rows
        self.placeholders: dict[str, int] = {}   # {{name}} -> rows holding it
        self.media_markers = 0                   # rows with <image> / <video> / <audio> in their text

    def __iter__(self) -> Iterator[tuple[list[dict], Where]]:
        count = 0
        for record, where in iter_records(self.source, self.split, self.subset):
            if self.format is None:
                self.format, self.columns = detect(record, where, self.want_format, self.want_columns)
            else:
                check_meaning(record, self.columns, where)
            self.ignored.update(dict.fromkeys(ignored_columns(record, self.columns)))
            conv = normalise(record, self.format, self.columns, where, self.fill)
            if not conv:
                continue
            for name in getattr(conv, "placeholders", ()):
                self.placeholders[name] = self.placeholders.get(name, 0) + 1
            if any(_MEDIA_MARKER.search(m["content"]) for m in conv):
                self.media_markers += 1
            yield conv, where
            count += 1
            if self.limit and count >= self.limit:
                return


def load_rows(source: str, format: str = "auto", columns: dict | None = None, split: str = "train",
              subset: str = "", limit: int = 0, fill: dict | None = None) -> tuple[list[list[dict]], str, dict]:
    """(conversations, detected format, column mapping). Raw text rows are [{"role": "text", "content": ...}];
    conversations are Conversations (lists that also carry .tools and .placeholders)."""
    reader = RowReader(source, format, columns, split, subset, limit, fill)
    rows = [conv for conv, _ in reader]
    return rows, reader.format or "", reader.columns


# ---------------------------------------------------------------- tokenising

@dataclass
class _Built:
    rows: TokenRows
    lengths: list[int]
    truncated: int = 0
    dropped_long: int = 0
    dropped_no_target: int = 0
    samples: list = field(default_factory=list)


def _batches(reader: RowReader, size: int) -> Iterator[list[tuple[list[dict], Where]]]:
    batch = []
    for item in reader:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _tokenise(reader: RowReader, tokenizer, renderer: Renderer, data, progress: Callable | None) -> _Built:
    built, chunker = _Built(TokenRows(), []), Chunker(data.max_len)
    total = estimate_total(reader.source)
    total = min(total, data.limit) if data.limit and total else total
    done = 0
    for batch in _batches(reader, _BATCH):
        if reader.format == "text":
            _add_text(batch, tokenizer, chunker, built, data.max_len)
        else:
            _add_chat(batch, tokenizer, renderer, built, data)
        done += len(batch)
        if progress:
            progress(done, max(total, done))
    if reader.format == "text":
        built.rows = chunker.finish()
    if progress:
        progress(done, done)
    return built


def _add_chat(batch, tokenizer, renderer: Renderer, built: _Built, data) -> None:
    if data.train_on == "all":
        rendered = [(renderer.text(conv, where), []) for conv, where in batch]
    else:
        rendered = [renderer.spans(conv, where) for conv, where in batch]
    for (text, spans), enc in zip(rendered, encode(tokenizer, [t for t, _ in rendered])):
        ids = enc.ids
        mask = bytearray(b"\x01" * len(ids)) if data.train_on == "all" else loss_mask(enc, spans, len(ids))
        built.lengths.append(len(ids))
        keep = len(ids)
        if keep > data.max_len:
            if data.overlong == "drop":
                built.dropped_long += 1
                continue
            built.truncated += 1
            keep = data.max_len
        if 1 not in mask[:keep]:  # the cut removed every assistant token: the row would teach nothing
            built.dropped_no_target += 1
            continue
        built.rows.append(ids[:keep], mask[:keep])
        if len(built.samples) < _SAMPLES:
            built.samples.append(segments(text, enc.offsets, mask, keep))


def _add_text(batch, tokenizer, chunker: Chunker, built: _Built, max_len: int) -> None:
    eos = getattr(tokenizer, "eos_token_id", None)
    texts = [conv[0]["content"] for conv, _ in batch]
    for conv, enc in zip((c for c, _ in batch), encode(tokenizer, texts)):
        ids = enc.ids
        if conv[0].get("eos", True) and eos is not None:
            ids.append(eos)
        built.lengths.append(len(ids))
        chunker.add(ids)
        if len(built.samples) < _SAMPLES and ids:
            offsets = enc.offsets or [(0, 0)]
            n = min(len(offsets), max_len)
            built.samples.append([(conv[0]["content"][: offsets[n - 1][1]], True)])


# ---------------------------------------------------------------- prepare: the runner's entry point

def check_fit(cfg, rows: int = 8) -> None:
    """Read the first rows of cfg.data as train.objective will (no tokenizer, no model): a file that does not fit
    the objective, such as SFT rows for DPO or pairs for SFT, raises here the DatasetError that Inspect and the
    training child give, so Start refuses it before a run folder exists. A hub dataset is left to the child (it
    may need a download)."""
    data = cfg.data
    if is_hub_id(data.source):
        return
    if cfg.train.objective == "grpo":
        data_prompts.check_fit(cfg, rows)
        return
    if cfg.train.objective != "sft":
        for _ in data_pref.read_pairs(data.source, data.split, data.subset, limit=rows):
            pass
        return
    for _ in RowReader(data.source, data.format, data.columns, data.split, data.subset, rows, data.fill):
        pass


def prepare(cfg, tokenizer, progress: Callable[[int, int], None] | None = None) -> Prepared:
    """Read, normalise, render, tokenise, mask, cut, split and (optionally) pack `cfg.data`. For train.objective
    dpo / orpo the rows are chosen / rejected pairs (core.data.pref)."""
    if cfg.train.objective == "grpo":
        return data_prompts.prepare(cfg, tokenizer, progress)
    if cfg.train.objective != "sft":
        return data_pref.prepare(cfg, tokenizer, progress)
    data = cfg.data
    renderer = Renderer(tokenizer, data.system)
    reader = RowReader(data.source, data.format, data.columns, data.split, data.subset, data.limit, data.fill)
    built = _tokenise(reader, tokenizer, renderer, data, progress)
    _check_something_left(built, data)

    train, eval_rows, warnings = built.rows, None, _warnings(built, data)
    if data.val_source.strip():
        val_reader = RowReader(data.val_source, data.format, data.columns, data.split, data.subset, fill=data.fill)
        eval_rows = _tokenise(val_reader, tokenizer, renderer, data, None).rows
        if not len(eval_rows):
            eval_rows = None
            warnings.append(f"no row of {data.val_source} fits max_len={data.max_len}: no evaluation data")
    elif data.val_fraction > 0:
        train, eval_rows = hold_out(built.rows, data.val_fraction, cfg.train.seed, "rows", warnings)
    packed = data.packing and reader.format != "text"  # raw text is already cut into full-length blocks
    train_seq = pack(train, data.max_len) if packed else train
    stats = DataStats(
        rows=len(built.lengths), format=reader.format or "", columns=reader.columns, source=data.source,
        template_is_default=renderer.is_default and reader.format != "text", lengths=built.lengths,
        max_len=data.max_len, truncated=built.truncated, dropped=built.dropped_long + built.dropped_no_target,
        trained_tokens=train_seq.trained_tokens(), total_tokens=train_seq.total_tokens(),
        eval_rows=len(eval_rows) if eval_rows is not None else 0, train_rows=len(train_seq),
        train_on="all" if reader.format == "text" else data.train_on, packing=packed, warnings=warnings,
        ignored_columns=list(reader.ignored), placeholders=dict(reader.placeholders),
        filled={k: v for k, v in data.fill.items() if k in reader.placeholders},
        tools=renderer.used.get("tools", ""), reasoning=renderer.used.get("reasoning", ""),
        loss_weight_zero=renderer.used.get("loss_weight_zero", 0))
    stats.notes = _data_notes(reader, stats)
    stats.warnings += [n for n in stats.notes if not n.startswith(_INFO)]
    return Prepared(train=train_seq, eval=eval_rows, stats=stats, samples=built.samples)


def _check_something_left(built: _Built, data) -> None:
    if len(built.rows):
        return
    src = data.source
    if built.dropped_long and built.dropped_long == len(built.lengths):
        raise DatasetError(f"every row is longer than max_len={data.max_len} tokens (the shortest has "
                           f"{min(built.lengths)}), so nothing is left to train on",
                           f"raise data.max_len to at least {min(built.lengths)}, or set data.overlong=truncate",
                           file=src)
    if built.dropped_no_target:
        raise DatasetError(f"after cutting rows to max_len={data.max_len} tokens, no row has any assistant tokens "
                           "left to train on", "raise data.max_len, or shorten the prompts", file=src)
    raise DatasetError("no rows to train on", "check the file and data.limit", file=src)


def _warnings(built: _Built, data) -> list[str]:
    out = []
    if built.truncated:
        out.append(f"{built.truncated} rows are longer than {data.max_len} tokens and were cut")
    if built.dropped_long:
        out.append(f"{built.dropped_long} rows are longer than {data.max_len} tokens and were dropped")
    if built.dropped_no_target:
        out.append(f"{built.dropped_no_target} rows had no assistant tokens left within {data.max_len} tokens "
                   "and were dropped")
    return out


_INFO = ("tool calls rendered with", "reasoning goes to", "assistant turns with loss_weight 0")


def _data_notes(reader: RowReader, stats: DataStats) -> list[str]:
    """What the user must know about how the file was read (the UI shows these; the CLI shows the warnings
    among them, the lines not starting with an _INFO prefix)."""
    out = []
    if stats.tools == "template":
        out.append("tool calls rendered with the model's own chat template (its tool support)")
    if stats.reasoning not in ("", "dropped"):
        out.append(f"reasoning goes to the chat template's {stats.reasoning!r} field")
    if stats.loss_weight_zero:
        out.append(f"assistant turns with loss_weight 0 are masked (no loss): {stats.loss_weight_zero}")
    if stats.ignored_columns:
        out.append(f"columns not used for training: {', '.join(stats.ignored_columns)}")
    unfilled = [n for n in stats.placeholders if n not in stats.filled]
    if unfilled:
        out.append("placeholders not filled, trained as literal text: "
                   + ", ".join(f"{{{{{n}}}}} ({stats.placeholders[n]} rows)" for n in unfilled)
                   + " (fill them with data.fill, e.g. --set data.fill." + unfilled[0] + "=...)")
    if stats.tools == "plain text":
        out.append("tool calls rendered as plain text (<tool_call> / <tool_response> tags): the model's chat "
                   "template has no tool support")
    if stats.reasoning == "dropped":
        out.append("reasoning parts dropped: the model's chat template has no thinking field")
    if reader.media_markers:
        out.append(f"{reader.media_markers} rows contain <image> / <video> / <audio> markers, trained as literal "
                   "text (this app trains text models)")
    return out


# ---------------------------------------------------------------- previews

# the one place the trained / masked colours are set: inline, so the preview HTML carries its own colours
# wherever it is shown (the page's stylesheet has no rule for these classes)
_TRAINED_STYLE = "background:#c6f6c6;color:#0b3d0b;border-radius:2px"
_MASKED_STYLE = "color:#8a8a8a"


def _samples(obj) -> list:
    """Preview runs from a Prepared, a list of runs, or raw conversations (from load_rows, before any
    tokenizer is chosen: then the assistant turns are marked as trained, without the template around them)."""
    items = obj.samples if isinstance(obj, Prepared) else list(obj or [])
    return [_conversation_runs(item) if item and isinstance(item[0], dict) else item for item in items]


def _conversation_runs(conv: list[dict]) -> list[tuple[str, bool]]:
    runs = []
    for m in conv:
        trained = m["role"] in ("assistant", "text") and m.get("train", True) is not False
        calls = "".join(f"\n[tool call] {c['function']['name']}({json.dumps(c['function']['arguments'])})"
                        for c in m.get("tool_calls") or [])
        runs += [(f"{m['role']}: ", False), (m["content"] + calls, trained), ("\n", False)]
    return runs


def preview_html(prepared_or_samples, n: int = 3) -> str:
    """The first n rows as the model sees them: trained tokens highlighted, masked ones greyed out."""

    pairs = prepared_or_samples.samples if isinstance(prepared_or_samples, Prepared) else prepared_or_samples
    if data_pref.is_pairs(pairs):
        return data_pref.preview_html(pairs, n, _TRAINED_STYLE, _MASKED_STYLE)
    if data_prompts.is_prompts(pairs):
        return data_prompts.preview_html(pairs, n)
    parts = ['<div class="lg-preview">',
             f'<div class="lg-legend"><span class="lg-trained" style="{_TRAINED_STYLE}">trained (loss)</span> '
             f'<span class="lg-masked" style="{_MASKED_STYLE}">masked (no loss)</span></div>']
    for i, runs in enumerate(_samples(prepared_or_samples)[:n], 1):
        body = "".join(
            f'<span class="{"lg-trained" if trained else "lg-masked"}" '
            f'style="{_TRAINED_STYLE if trained else _MASKED_STYLE}">{html.escape(text)}</span>'
            for text, trained in runs)
        parts.append(f'<div class="lg-example"><div class="lg-example-title">example {i}</div>'
                     f'<pre style="white-space:pre-wrap;word-break:break-word">{body}</pre></div>')
    parts.append("</div>")
    return "\n".join(parts)


def preview_text(prepared_or_samples, n: int = 2) -> str:
    """Plain-text preview for the CLI: trained text inside ⟦ ⟧, everything else is masked."""

    pairs = prepared_or_samples.samples if isinstance(prepared_or_samples, Prepared) else prepared_or_samples
    if data_pref.is_pairs(pairs):
        return data_pref.preview_text(pairs, n)
    if data_prompts.is_prompts(pairs):
        return data_prompts.preview_text(pairs, n)
    out = []
    for i, runs in enumerate(_samples(prepared_or_samples)[:n], 1):
        body = "".join(f"⟦{text}⟧" if trained else text for text, trained in runs)
        out.append(f"--- example {i} ---\n{body}")
    return "\n".join(out)


# ---------------------------------------------------------------- the built-in demo's eval set

def demo_eval_set(source: str) -> list[dict] | None:
    """Held-out prompts for the built-in demos: [{"messages": [...], "expected": str}]; None for others."""
    name = DEMO_EVAL_FILES.get((source or "").strip())
    if name is None:
        return None
    lines = (BUILTIN_DATA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", (text or "").lower()).split())


def score_answer(source: str, answer: str, expected: str) -> bool:
    """Does the answer contain the expected text (case, punctuation and spacing ignored)? `expected` may
    list alternatives separated by |."""
    said = f" {_norm(answer)} "
    return any(f" {_norm(alt)} " in said for alt in (expected or "").split("|") if _norm(alt))
