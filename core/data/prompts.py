"""Prompts for GRPO (train.objective=grpo): read the common shapes, render each prompt with the model's chat
template (the generation prompt added), and keep the columns the reward functions read.

Shapes (auto-detected per row):
    text         {"prompt": str} (question / instruction / problem / query are accepted for prompt; an optional
                 "system")
    messages     {"messages": [{role, content}...]} ending on a user turn (TRL's {"prompt": [turns]} too)
    sharegpt     {"conversations": [{from, value}...]} ending on a human turn

Every other column whose value is a number, text or true/false is passed to the rewards by its own name
(`answer`, `solution`, ...); `data.columns` maps a reward column to the file's, e.g. {answer: gold}. A row becomes
{"prompt": the rendered text, "prompt_ids", "prompt_text": the last user turn, "row": its number, + columns}.

A file that holds replies is SFT data (or preference pairs): it is refused, naming the objective that fits.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Callable, Iterator

from core.data.formats import (CONVERSATION_KEYS, PREFERENCE_KEYS, PROMPT_KEYS, RESPONSE_KEYS, SYSTEM_KEYS,
                               parse_turns)
from core.data.prepared import DataStats, Prepared, hold_out
from core.data.read import Where, estimate_total, iter_records, kind_of
from core.data.tokenize import Renderer, encode
from core.errors import DatasetError

ROW, PROMPT_TEXT = "row", "prompt_text"  # as core.train.rewards reads them
ANSWER_KEYS = ("answer", "solution", "ground_truth", "target_answer", "final_answer")
ACCEPTED = ("a prompt text column (prompt, question, instruction, problem or query), or messages / ShareGPT "
            "conversations ending on a user turn; optional columns such as answer or solution go to the rewards")
_SAMPLES = 5


@dataclass
class PromptRow:
    turns: list[dict]          # system / user / earlier turns, ending on a user turn
    columns: dict              # the reward columns, by name
    row: int


class PromptRows(list):
    """Rendered prompts: each {"prompt", "prompt_ids", "prompt_text", "row", + reward columns}."""

    def length(self, i: int) -> int:
        return len(self[i]["prompt_ids"])

    def total_tokens(self) -> int:
        return sum(len(r["prompt_ids"]) for r in self)

    def trained_tokens(self) -> int:
        return 0  # GRPO trains on the completions it samples, not on tokens of the file

    def subset(self, idx: list[int]) -> "PromptRows":
        return PromptRows(self[i] for i in idx)


@dataclass
class PromptSample:
    prompt: str                # the rendered prompt, as the model sees it
    columns: dict = field(default_factory=dict)
    length: int = 0


# ---------------------------------------------------------------- reading

def read_prompts(source: str, split: str = "train", subset: str = "", columns: dict | None = None,
                 limit: int = 0, found: dict | None = None) -> Iterator[PromptRow]:
    """The prompts of `source`; a row that is not a prompt raises DatasetError naming the row and the fix."""
    mapping = {str(k): str(v) for k, v in (columns or {}).items()}
    n = 0
    for record, where in iter_records(source, split, subset):
        if not isinstance(record, dict):
            raise where.error(f"a row must be an object, got {kind_of(record)}", f"each row needs {ACCEPTED}")
        n += 1
        row = _prompt_row(record, where, mapping, n)
        if found is not None and "shape" not in found:
            found["shape"], found["columns"] = row[1], sorted(row[0].columns)
        yield row[0]
        if limit and n >= limit:
            return


def _prompt_row(record: dict, where: Where, mapping: dict, n: int) -> tuple[PromptRow, str]:
    keys = {str(k).lower(): k for k in record}
    if any(k in keys for k in PREFERENCE_KEYS):
        raise where.error("this is a file of preference pairs (chosen / rejected), and train.objective is grpo",
                          "train the pairs with train.objective=dpo (or orpo); GRPO takes prompts only (a prompt "
                          "column or messages ending on a user turn), with optional answer columns for the rewards")
    used = {mapping[k] for k in ("prompt", "messages", "system") if k in mapping}
    conv_key = mapping.get("messages") or next((keys[k] for k in CONVERSATION_KEYS if k in keys
                                                and isinstance(record[keys[k]], list)), None)
    prompt_key = mapping.get("prompt") or next((keys[k] for k in PROMPT_KEYS if k in keys), None)
    if conv_key is None and prompt_key is not None and isinstance(record.get(prompt_key), list):
        conv_key, prompt_key = prompt_key, None  # TRL's conversational prompt: a list of turns
    if conv_key is not None:
        turns = record.get(conv_key)
        first = next((t for t in turns if isinstance(t, dict)), {}) if isinstance(turns, list) else {}
        shape = "sharegpt" if "from" in first else "messages"
        conv = parse_turns(turns, shape, conv_key, where)
        if not conv or conv[-1]["role"] != "user":
            last = conv[-1]["role"] if conv else "nothing"
            raise where.error(f"the conversation in {conv_key!r} ends on {last}, not on a user turn: with its "
                              "replies, this is data for supervised fine-tuning",
                              "train it with train.objective=sft; for GRPO give conversations that end on the user's "
                              "turn (the model writes the reply, and the rewards score it)")
        used.add(conv_key)
    elif prompt_key is not None:
        text = record.get(prompt_key)
        if not isinstance(text, str) or not text.strip():
            raise where.error(f"the prompt column {prompt_key!r} is {kind_of(text)}, not text",
                              "give every row a prompt text")
        conv = [{"role": "user", "content": text}]
        used.add(prompt_key)
    else:
        raise where.error(f"no prompt column: columns found: {_cols(record)}",
                          f"GRPO takes {ACCEPTED}; or name yours with data.columns, e.g. {{prompt: your_column}}")
    system_key = mapping.get("system") or next((keys[k] for k in SYSTEM_KEYS if k in keys), None)
    if system_key and isinstance(record.get(system_key), str) and record[system_key].strip() \
            and conv[0]["role"] != "system":
        conv.insert(0, {"role": "system", "content": record[system_key]})
        used.add(system_key)
    reward_cols = {name: record[col] for name, col in mapping.items() if name not in ("prompt", "messages", "system")}
    for name, col in mapping.items():
        if name not in ("prompt", "messages", "system") and col not in record:
            raise where.error(f"column {col!r} (given for {name}) is not in the data; columns found: "
                              f"{_cols(record)}", "fix data.columns to use one of the columns found")
    used |= set(mapping.values())
    replies = [str(k) for k in record if str(k).lower() in RESPONSE_KEYS and str(k).lower() not in ANSWER_KEYS
               and k not in used]
    if replies:
        raise where.error(f"the rows have a reply column ({replies[0]!r}) beside the prompt: this is data for "
                          "supervised fine-tuning",
                          f"train it with train.objective=sft; or, when {replies[0]!r} holds the checkable answer the "
                          f"rewards compare against, map it: data.columns {{answer: {replies[0]}}}")
    for k, v in record.items():
        if k not in used and not str(k).startswith("_") and (v is None or isinstance(v, (str, int, float, bool))):
            reward_cols.setdefault(str(k), v)
    return PromptRow(conv, reward_cols, where.row or where.line or n), "messages" if conv_key else "text"


def _cols(record: dict) -> str:
    names = [str(k) for k in record if not str(k).startswith("_")]
    return ", ".join(names[:30]) + (" ..." if len(names) > 30 else "") if names else "(none)"


# ---------------------------------------------------------------- prepare

def render(rows: list[PromptRow], tokenizer, renderer: Renderer) -> list[dict]:
    """Each prompt rendered with the generation prompt and tokenised (the template holds the special tokens)."""
    texts = []
    for r in rows:
        messages, tools, _ = renderer.for_template(r.turns)
        where = Where(file="", row=r.row)
        texts.append(_render(renderer, messages, tools, where))
    encs = encode(tokenizer, texts)
    out = []
    for r, text, enc in zip(rows, texts, encs):
        user = next((t["content"] for t in reversed(r.turns) if t["role"] == "user"), "")
        out.append({**r.columns, "prompt": text, "prompt_ids": list(enc.ids), PROMPT_TEXT: user, ROW: r.row})
    return out


def _render(renderer: Renderer, messages, tools, where: Where) -> str:
    try:
        return renderer.render(messages, add_generation_prompt=True, tools=tools)
    except Exception as e:  # noqa: BLE001 - a template can raise anything (raise_exception, TypeError ...)
        raise where.error(f"the model's chat template rejected this prompt: {type(e).__name__}: {str(e)[:200]}",
                          "the template may need alternating user/assistant turns or no system turn") from e


def prepare(cfg, tokenizer, progress: Callable[[int, int], None] | None = None) -> Prepared:
    """core.data.sft.prepare for train.objective grpo: a Prepared whose rows are PromptRows. Prompts longer than
    data.max_len are left out (a cut prompt would ask a different question), and said."""
    data = cfg.data
    renderer = Renderer(tokenizer, data.system)
    total = estimate_total(data.source)
    found: dict = {}
    needed = _needed(cfg)
    rows = _checked(read_prompts(data.source, data.split, data.subset, data.columns, data.limit, found), needed,
                    data.source)
    built = PromptRows()
    lengths, dropped, samples = [], 0, []
    for start in range(0, len(rows), 256):
        for r in render(rows[start:start + 256], tokenizer, renderer):
            lengths.append(len(r["prompt_ids"]))
            if len(r["prompt_ids"]) > data.max_len:
                dropped += 1
                continue
            built.append(r)
            if len(samples) < _SAMPLES:
                samples.append(PromptSample(r["prompt"], _reward_view(r), len(r["prompt_ids"])))
        if progress:
            progress(min(start + 256, len(rows)), total or len(rows))
    if not built:
        raise DatasetError(f"no prompt of {data.source} is left: all {dropped} are longer than "
                           f"data.max_len={data.max_len} tokens", "raise data.max_len")
    train, eval_rows, warnings = built, None, []
    if data.val_source.strip():
        val = _checked(read_prompts(data.val_source, data.split, data.subset, data.columns), needed, data.val_source)
        eval_rows = PromptRows(r for r in render(val, tokenizer, renderer) if len(r["prompt_ids"]) <= data.max_len)
    elif data.val_fraction > 0:
        train, eval_rows = hold_out(built, data.val_fraction, cfg.train.seed, "prompts", warnings)
    if dropped:
        warnings.append(f"{dropped} prompts are longer than data.max_len={data.max_len} tokens and were left out "
                        "(raise data.max_len to keep them)")
    stats = DataStats(rows=len(lengths), format=f"prompts ({found.get('shape', 'text')}, grpo)",
                      columns={"reward columns": ", ".join(found.get("columns", [])) or "(none)"},
                      source=data.source, template_is_default=renderer.is_default, lengths=lengths,
                      max_len=data.max_len, truncated=0, dropped=dropped, trained_tokens=0,
                      total_tokens=train.total_tokens(), eval_rows=len(eval_rows or []), train_rows=len(train),
                      train_on="sampled completions", warnings=warnings)
    return Prepared(train=train, eval=eval_rows or None, stats=stats, samples=samples)


def _checked(rows: Iterator[PromptRow], needed: list[str], source: str) -> list[PromptRow]:
    out = []
    for r in rows:
        missing = [c for c in needed if r.columns.get(c) in (None, "")]
        if missing:
            raise DatasetError(f"row {r.row}: the answer reward reads column {missing[0]!r}, which this row does not "
                               f"have (its columns: {', '.join(sorted(r.columns)) or 'none'})",
                               f"set rewards.answer_column to the column holding the answer, or map it with "
                               f"data.columns {{{missing[0]}: your_column}}", file=source)
        out.append(r)
    return out


def _reward_view(row: dict) -> dict:
    view = {k: v for k, v in row.items() if k not in ("prompt", "prompt_ids", ROW, PROMPT_TEXT)}
    return {"prompt": row[PROMPT_TEXT], **view}  # as a reward file receives them


def check_fit(cfg, rows: int = 8) -> None:
    """The first rows read as GRPO prompts (Start's check before a run folder exists)."""
    _checked(read_prompts(cfg.data.source, cfg.data.split, cfg.data.subset, cfg.data.columns, limit=rows),
             _needed(cfg), cfg.data.source)


def _needed(cfg) -> list[str]:
    return [cfg.rewards.answer_column] if cfg.rewards.answer_weight else []


# ---------------------------------------------------------------- previews

def is_prompts(samples) -> bool:
    return isinstance(samples, list) and bool(samples) and isinstance(samples[0], PromptSample)


def preview_html(samples: list[PromptSample], n: int) -> str:
    pre = '<pre style="white-space:pre-wrap;word-break:break-word;margin:2px 0 6px 0">'
    parts = ['<div class="lg-preview">']
    for i, s in enumerate(samples[:n], 1):
        cols = "; ".join(f"{html.escape(str(k))} = {html.escape(repr(v))}" for k, v in s.columns.items())
        parts.append(f'<div class="lg-example"><div class="lg-example-title">prompt {i} ({s.length} tokens, as the '
                     f'model sees it; the model writes the reply)</div>{pre}{html.escape(s.prompt)}</pre>'
                     f'<div>the rewards see: {cols or "(no columns)"}</div></div>')
    parts.append("</div>")
    return "\n".join(parts)


def preview_text(samples: list[PromptSample], n: int) -> str:
    out = []
    for i, s in enumerate(samples[:n], 1):
        cols = ", ".join(f"{k}={v!r}" for k, v in s.columns.items())
        out.append(f"--- prompt {i} ({s.length} tokens) ---\n{s.prompt}\n[the rewards see: {cols or '(no columns)'}]")
    return "\n".join(out)
