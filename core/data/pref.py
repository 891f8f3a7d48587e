"""Preference pairs (chosen / rejected) for DPO and ORPO: read the three common shapes, render them with the
model's chat template, tokenise, check and preview them exactly as the trainer will see them.

Shapes (auto-detected per file):
    strings      {"prompt": str, "chosen": str, "rejected": str} (+ optional "system"; question / instruction
                 are accepted for prompt)
    sharegpt     {"conversations": [{from, value}...], "chosen": {from, value}, "rejected": {from, value}}
                 (LLaMA-Factory's shape; role/content objects work too)
    messages     {"chosen": [{role, content}...], "rejected": [{role, content}...]} holding the whole dialogue,
                 the shared turns being the prompt (UltraFeedback); or TRL's {"prompt": [turns], "chosen":
                 [reply turn], "rejected": [reply turn]}. The sides may be named chosen_messages /
                 rejected_messages instead (a newer pair format), read the same way.

data.system applies as in SFT (core.data.tokenize.Renderer.for_template): a pair whose prompt has no system turn
gets it; a pair with its own keeps it.

A pair becomes {"prompt_ids", "chosen_ids", "rejected_ids"}: the prompt rendered with the generation prompt,
each reply the rest of the rendered dialogue (its end-of-turn token included). Those are the columns TRL's
preference collator takes, so what the preview shows is what trains.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Callable

from core.data.prepared import DataStats, Prepared, hold_out
from core.data.formats import PROMPT_KEYS, SYSTEM_KEYS, parse_turns
from core.data.read import Where, estimate_total, iter_records, kind_of
from core.data.tokenize import Renderer, encode, segments
from core.errors import DatasetError

SHAPES = ("strings", "sharegpt", "messages")
SIDE_KEYS = (("chosen", "rejected"), ("chosen_messages", "rejected_messages"))
KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")
_SAMPLES = 5
ACCEPTED = ("prompt / chosen / rejected text columns; conversations + chosen + rejected objects (ShareGPT); "
            "chosen and rejected message lists holding the whole dialogue (UltraFeedback; the columns may be named "
            "chosen_messages / rejected_messages)")


@dataclass
class Pair:
    prompt: list[dict]      # the turns before the reply (system / user / earlier assistant turns)
    chosen: str
    rejected: str


class PairRows(list):
    """Token rows of pairs: each {"prompt_ids", "chosen_ids", "rejected_ids"}. length(i) is the longer side."""

    def length(self, i: int) -> int:
        row = self[i]
        return len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))

    def total_tokens(self) -> int:
        return sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in self)

    def trained_tokens(self) -> int:
        return sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in self)

    def subset(self, indices) -> "PairRows":
        return PairRows(self[i] for i in indices)


@dataclass
class PairSample:
    """One pair for the preview: (text, trained) runs of the prompt and of each reply, and the token lengths."""
    prompt: list = field(default_factory=list)
    chosen: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    chosen_len: int = 0     # prompt + chosen tokens, before cutting
    rejected_len: int = 0
    max_len: int = 0


# ---------------------------------------------------------------- shapes

def side_keys(record: dict) -> tuple[str, str]:
    """The columns that hold the two replies: chosen / rejected, else chosen_messages / rejected_messages."""
    return next((keys for keys in SIDE_KEYS if any(k in record for k in keys)), SIDE_KEYS[0])


def detect_shape(record: dict, where: Where) -> str:
    keys = side_keys(record)
    chosen, rejected = (record.get(k) for k in keys)
    if chosen is None or rejected is None:
        missing = keys[0] if chosen is None else keys[1]
        raise where.error(f"a preference pair needs {missing!r}; columns found: {', '.join(map(str, record))}",
                          f"give every row chosen and rejected ({ACCEPTED}); prompts without replies train "
                          "with train.objective=grpo, single replies with sft")
    if isinstance(chosen, list) or isinstance(rejected, list) or keys != SIDE_KEYS[0]:
        return "messages"
    if isinstance(chosen, dict) or isinstance(rejected, dict):
        return "sharegpt"
    return "strings"


def to_pair(record: dict, shape: str, where: Where) -> Pair:
    """The record as a Pair. Raises DatasetError naming the row: empty sides, a pair whose two replies are the
    same, a prompt with no user turn."""
    system = next((record[k] for k in SYSTEM_KEYS if isinstance(record.get(k), str) and record[k].strip()), "")
    keys = side_keys(record)
    if shape == "strings":
        key = next((k for k in PROMPT_KEYS if k in record), None)
        if key is None:
            raise where.error(f"no prompt column; columns found: {', '.join(map(str, record))}",
                              f"name it prompt (or {', '.join(PROMPT_KEYS[1:4])})")
        prompt = [{"role": "user", "content": _side(record, key, where)}]
        chosen, rejected = _side(record, "chosen", where), _side(record, "rejected", where)
    elif shape == "sharegpt":
        conv_key = next((k for k in ("conversations", "messages", "conversation") if k in record), None)
        if conv_key is None:
            raise where.error("chosen / rejected are single turns but there is no conversations column",
                              "put the dialogue before the reply in conversations: [{from: human, value: ...}]")
        fmt = "sharegpt" if _is_sharegpt(record[conv_key]) else "messages"
        prompt = parse_turns(record[conv_key], fmt, conv_key, where)
        chosen, rejected = _reply(record, "chosen", where), _reply(record, "rejected", where)
    else:
        prompt, chosen, rejected = _split_dialogues(record, keys, where)
    if system and not (prompt and prompt[0]["role"] == "system"):
        prompt.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "user" for m in prompt):
        raise where.error("the prompt has no user turn", "every pair needs the user's message before the replies")
    if chosen.strip() == rejected.strip():
        raise where.error("chosen and rejected are the same reply: the pair teaches nothing",
                          "give that row a different (worse) rejected reply, or remove the row")
    return Pair(prompt, chosen, rejected)


def _side(record: dict, key: str, where: Where) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise where.error(f"{key!r} must be text, got {kind_of(value)}", "fix that row")
    if not value.strip():
        raise where.error(f"{key!r} is empty", f"every pair needs a {key} reply; write one or remove that row")
    return value


def _is_sharegpt(turns) -> bool:
    return isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]


def _reply(record: dict, key: str, where: Where) -> str:
    value = record.get(key)
    if isinstance(value, str):
        return _side(record, key, where)
    if not isinstance(value, dict):
        raise where.error(f"{key!r} must be one reply ({{from: gpt, value: ...}}), got {kind_of(value)}", "fix that row")
    fmt = "sharegpt" if "from" in value else "messages"
    turn = parse_turns([value], fmt, key, where)[0]
    if turn["role"] != "assistant":
        raise where.error(f"{key!r} is a {turn['role']} turn", "chosen and rejected are the assistant's replies")
    if not turn["content"].strip():
        raise where.error(f"{key!r} is empty", f"every pair needs a {key} reply; write one or remove that row")
    return turn["content"]


def _split_dialogues(record: dict, keys: tuple[str, str], where: Where) -> tuple[list[dict], str, str]:
    """UltraFeedback: chosen and rejected (under `keys`) hold the whole dialogue; the prompt is what they share.
    TRL's conversational shape: prompt holds the turns, chosen / rejected the reply alone."""
    sides = {}
    for key in keys:
        value = record.get(key)
        if not isinstance(value, list) or not value:
            raise where.error(f"{key!r} must be a non-empty list of messages, got {kind_of(value)}",
                              "write it as [{role: user, content: ...}, {role: assistant, content: ...}]")
        sides[key] = parse_turns(value, "sharegpt" if _is_sharegpt(value) else "messages", key, where)
    if isinstance(record.get("prompt"), list):
        prompt = parse_turns(record["prompt"], "sharegpt" if _is_sharegpt(record["prompt"]) else "messages", "prompt", where)
        ends = {k: v for k, v in sides.items()}
    else:
        prompt, ends = [], {}
        for key, turns in sides.items():
            if turns[-1]["role"] != "assistant":
                raise where.error(f"{key!r} does not end with an assistant reply", "the last message is the reply")
            ends[key] = turns[-1:]
        prompt = sides[keys[0]][:-1]
        if [(m["role"], m["content"]) for m in sides[keys[1]][:-1]] != [(m["role"], m["content"]) for m in prompt]:
            raise where.error(f"{keys[0]} and {keys[1]} start with different dialogues",
                              "both lists must hold the same turns before their last (assistant) reply")
    out = []
    for key in keys:
        turns = ends[key]
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise where.error(f"{key!r} must be one assistant reply", "put earlier turns in the prompt")
        if not turns[0]["content"].strip():
            raise where.error(f"{key!r} is empty", f"every pair needs a {key} reply; write one or remove that row")
        out.append(turns[0]["content"])
    return prompt, out[0], out[1]


def columns_of(record: dict, shape: str) -> dict:
    """Which column gives the prompt, the system prompt and each reply, for the summary. Whole dialogues have no
    prompt column: the prompt is the turns the two sides share."""
    chosen, rejected = side_keys(record)
    if shape == "strings":
        prompt = next((k for k in PROMPT_KEYS if k in record), None)
    elif shape == "sharegpt":
        prompt = next((k for k in ("conversations", "messages", "conversation") if k in record), None)
    else:
        prompt = "prompt" if isinstance(record.get("prompt"), list) else None
    system = next((k for k in SYSTEM_KEYS if k in record), None)
    return {**({"prompt": prompt} if prompt else {}), **({"system": system} if system else {}), "chosen": chosen,
            "rejected": rejected}


def read_pairs(source: str, split: str = "train", subset: str = "", limit: int = 0, found: dict | None = None):
    """Yields (Pair, Where) of a source; the shape is taken from the first row and held for the others. `found`
    gets the shape and columns_of the first row."""
    shape, n = None, 0
    for record, where in iter_records(source, split, subset):
        if shape is None:
            shape = detect_shape(record, where)
            if found is not None:
                found.update(shape=shape, columns=columns_of(record, shape))
        yield to_pair(record, shape, where), where
        n += 1
        if limit and n >= limit:
            return


# ---------------------------------------------------------------- tokenising

@dataclass
class _Built:
    rows: PairRows = field(default_factory=PairRows)
    lengths: list = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    samples: list = field(default_factory=list)
    shape: str = ""


def tokenise(pairs, tokenizer, renderer: Renderer, data, progress: Callable | None = None, total: int = 0) -> _Built:
    built = _Built()
    for n, (pair, where) in enumerate(pairs, 1):
        prompt, tools, _ = renderer.for_template(pair.prompt)  # data.system and the rest, as SFT renders a row
        prompt_text = renderer._guarded(lambda: renderer.render(prompt, add_generation_prompt=True, tools=tools), where)
        texts = [prompt_text]
        for reply in (pair.chosen, pair.rejected):
            full = renderer._guarded(lambda: renderer.render(prompt + [{"role": "assistant", "content": reply}],
                                                             tools=tools), where)
            if not full.startswith(prompt_text):
                raise where.error("the chat template renders the prompt differently once a reply follows, so the "
                                  "reply's tokens cannot be told apart", "use a model whose template appends replies")
            texts.append(full)
        enc_p, enc_c, enc_r = encode(tokenizer, texts)
        p = _prefix_tokens(enc_p.ids, enc_c.ids, enc_r.ids)
        if p >= data.max_len:
            raise where.error(f"the prompt is {p} tokens, not shorter than the cutoff data.max_len={data.max_len}: "
                              f"no room is left for the replies",
                              f"raise data.max_len above {p} (plus the replies), or shorten or remove that row")
        chosen, rejected = enc_c.ids[p:], enc_r.ids[p:]
        lengths = (p + len(chosen), p + len(rejected))
        built.lengths.append(max(lengths))
        if max(lengths) > data.max_len:
            if data.overlong == "drop":
                built.dropped += 1
                continue
            built.truncated += 1
            chosen, rejected = chosen[: data.max_len - p], rejected[: data.max_len - p]
        built.rows.append({"prompt_ids": enc_c.ids[:p], "chosen_ids": chosen, "rejected_ids": rejected})
        if len(built.samples) < _SAMPLES:
            built.samples.append(_sample(texts, (enc_c, enc_r), p, lengths, data.max_len))
        if progress and n % 256 == 0:
            progress(n, max(total, n))
    return built


def _prefix_tokens(prompt: list[int], chosen: list[int], rejected: list[int]) -> int:
    """Tokens the two replies share with the prompt (a merge across the boundary moves it back a token)."""
    n = 0
    for a, b, c in zip(prompt, chosen, rejected):
        if not a == b == c:
            break
        n += 1
    return n


def _sample(texts, encs, p: int, lengths, max_len: int) -> PairSample:
    sample = PairSample(chosen_len=lengths[0], rejected_len=lengths[1], max_len=max_len)
    for i, enc in enumerate(encs):
        keep = min(len(enc.ids), max_len)
        mask = bytearray(p) + bytearray(b"\x01" * (len(enc.ids) - p))
        runs = segments(texts[i + 1], enc.offsets, mask, keep)
        if i == 0:
            sample.prompt = [r for r in runs if not r[1]]
        setattr(sample, ("chosen", "rejected")[i], [r for r in runs if r[1]])
    return sample


def prepare(cfg, tokenizer, progress: Callable[[int, int], None] | None = None):
    """core.data.sft.prepare for train.objective dpo / orpo: a Prepared whose rows are PairRows."""
    data = cfg.data
    renderer = Renderer(tokenizer, data.system)
    total = estimate_total(data.source)
    found: dict = {}
    built = tokenise(read_pairs(data.source, data.split, data.subset, data.limit, found), tokenizer, renderer, data,
                     progress, total)
    if not built.rows:
        raise DatasetError(f"no preference pair of {data.source} is left (data.overlong=drop removed "
                           f"{built.dropped} over data.max_len={data.max_len})",
                           "raise data.max_len or set data.overlong=truncate")
    train, eval_rows, warnings = built.rows, None, []
    if data.val_source.strip():
        eval_rows = tokenise(read_pairs(data.val_source, data.split, data.subset), tokenizer, renderer, data).rows
    elif data.val_fraction > 0:
        train, eval_rows = hold_out(built.rows, data.val_fraction, cfg.train.seed, "pairs", warnings)
    if built.truncated:
        warnings.append(f"{built.truncated} pairs are longer than data.max_len={data.max_len}: their replies are cut "
                        "(the end-of-turn token is lost with them)")
    if progress:
        progress(len(built.lengths), len(built.lengths))
    stats = DataStats(rows=len(built.lengths), format=f"preference pairs ({cfg.train.objective})",
                      columns=found.get("columns", {}), source=data.source,
                      template_is_default=renderer.is_default, lengths=built.lengths, max_len=data.max_len,
                      truncated=built.truncated, dropped=built.dropped, trained_tokens=train.trained_tokens(),
                      total_tokens=train.total_tokens(), eval_rows=len(eval_rows or []), train_rows=len(train),
                      train_on="replies", warnings=warnings)
    return Prepared(train=train, eval=eval_rows or None, stats=stats, samples=built.samples)


# ---------------------------------------------------------------- previews

def is_pairs(samples) -> bool:
    return isinstance(samples, list) and bool(samples) and isinstance(samples[0], PairSample)


def _runs_html(runs, trained_style: str, masked_style: str) -> str:
    return "".join(f'<span class="{"lg-trained" if t else "lg-masked"}" '
                   f'style="{trained_style if t else masked_style}">{html.escape(text)}</span>' for text, t in runs)


def preview_html(samples: list[PairSample], n: int, trained_style: str, masked_style: str) -> str:
    parts = ['<div class="lg-preview">',
             f'<div class="lg-legend"><span class="lg-trained" style="{trained_style}">reply (compared)</span> '
             f'<span class="lg-masked" style="{masked_style}">prompt (no loss)</span></div>']
    pre = '<pre style="white-space:pre-wrap;word-break:break-word;margin:2px 0 6px 0">'
    for i, s in enumerate(samples[:n], 1):
        parts.append(f'<div class="lg-example"><div class="lg-example-title">pair {i}</div>'
                     f'<div>prompt</div>{pre}{_runs_html(s.prompt, trained_style, masked_style)}</pre>')
        for side, runs, length in (("chosen", s.chosen, s.chosen_len), ("rejected", s.rejected, s.rejected_len)):
            over = " (over the cutoff: cut)" if length > s.max_len else ""
            parts.append(f'<div>{side}: {length} / {s.max_len} tokens{over}</div>'
                         f'{pre}{_runs_html(runs, trained_style, masked_style)}</pre>')
        parts.append("</div>")
    parts.append("</div>")
    return "\n".join(parts)


def preview_text(samples: list[PairSample], n: int) -> str:
    out = []
    for i, s in enumerate(samples[:n], 1):
        out.append(f"--- pair {i} ---\n{''.join(t for t, _ in s.prompt)}")
        for side, runs, length in (("chosen", s.chosen, s.chosen_len), ("rejected", s.rejected, s.rejected_len)):
            out.append(f"[{side}: {length} / {s.max_len} tokens] ⟦{''.join(t for t, _ in runs)}⟧")
    return "\n".join(out)
