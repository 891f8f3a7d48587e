"""Row formats: detect which one a record is in, and turn it into chat messages.

Every format becomes a list of {"role": system|user|assistant, "content": str}; raw text becomes
[{"role": "text", "content": ...}]. The column mapping maps our role names to the file's column names
(e.g. {"prompt": "question", "response": "answer"}); it is shown to the user and can be overridden
(data.columns). We never guess: columns we cannot place are an error listing what we found and what we accept.
"""

from __future__ import annotations

from core.data_read import Where, kind_of
from core.errors import DatasetError

FORMATS = ("messages", "sharegpt", "alpaca", "pairs", "text")
CONVERSATION_KEYS = ("messages", "conversations", "conversation", "chat", "dialog", "dialogue", "turns")
PROMPT_KEYS = ("prompt", "question", "instruction", "query", "input", "user", "human", "problem", "request")
RESPONSE_KEYS = ("completion", "response", "answer", "output", "assistant", "gpt", "target", "solution", "reply")
CONTEXT_KEYS = ("context", "input", "passage", "document")
SYSTEM_KEYS = ("system", "system_prompt")
TEXT_KEYS = ("text", "content", "body")
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "model": "assistant", "chatgpt": "assistant"}
# data.columns keys: our role names, plus the names people naturally write for them.
ROLE_ALIASES = {"instruction": "prompt", "question": "prompt", "query": "prompt", "input": "context",
                "output": "response", "completion": "response", "answer": "response",
                "conversations": "messages"}
FORMAT_ROLES = {
    "messages": ("messages",), "sharegpt": ("messages",),
    "alpaca": ("prompt", "response", "context", "system", "history"),
    "pairs": ("prompt", "response", "context", "system"),
    "text": ("text",),
}
ACCEPTED = ("messages or conversations: a list of {role, content} (system/user/assistant); "
            "ShareGPT conversations: a list of {from, value} (human/gpt/system); "
            "Alpaca: instruction, input, output (optional system, history); "
            "pairs: prompt/completion, question/answer, instruction/response, input/output (optional context, system); "
            "raw text: a text column")


def detect(record: dict, where: Where, format: str = "auto", columns: dict | None = None) -> tuple[str, dict]:
    """(format, mapping) for a record; `format`/`columns` override what we would detect."""
    mapping = _normalise_columns(columns or {})
    for role, col in mapping.items():
        if col not in record:
            raise where.error(f"column {col!r} (given for {role}) is not in the data; columns found: "
                              f"{_cols(record)}", "fix data.columns to use one of the columns found")
    if format == "auto":
        format = _format_from_roles(mapping, record) or _guess_format(record, where)
    if format not in FORMATS:
        raise DatasetError(f"unknown format {format!r}", f"use auto or one of {', '.join(FORMATS)}")
    allowed = FORMAT_ROLES[format]
    extra = [r for r in mapping if r not in allowed]
    if extra:
        raise DatasetError(f"data.columns has {', '.join(extra)}, which the {format} format does not use",
                           f"{format} uses: {', '.join(allowed)}")
    found = _detect_columns(record, format)
    found.update(mapping)
    missing = [r for r in _required(format) if r not in found]
    if missing:
        raise where.error(f"the {format} format needs a column for {', '.join(missing)}; columns found: "
                          f"{_cols(record)}", f"set data.columns, e.g. {{{missing[0]}: your_column}}; we accept {ACCEPTED}")
    if format in ("messages", "sharegpt"):
        _check_turn_keys(record[found["messages"]], format, where)
    return format, found


def _normalise_columns(columns: dict) -> dict:
    out = {}
    for role, col in columns.items():
        role = ROLE_ALIASES.get(str(role).strip().lower(), str(role).strip().lower())
        if role not in {r for roles in FORMAT_ROLES.values() for r in roles}:
            raise DatasetError(f"data.columns: unknown role {role!r}",
                               "roles: messages, prompt, response, context, system, history, text")
        out[role] = str(col)
    return out


def _format_from_roles(mapping: dict, record: dict) -> str | None:
    if "messages" in mapping:
        turns = record.get(mapping["messages"])
        first = turns[0] if isinstance(turns, list) and turns else None
        return "sharegpt" if isinstance(first, dict) and "from" in first else "messages"
    if "text" in mapping:
        return "text"
    if "prompt" in mapping or "response" in mapping:
        return "pairs"
    return None


def _guess_format(record: dict, where: Where) -> str:
    keys = {k.lower(): k for k in record}
    for key in CONVERSATION_KEYS:
        turns = record.get(keys.get(key, ""))
        if isinstance(turns, list):
            first = next((t for t in turns if isinstance(t, dict)), None)
            if first is not None and "from" in first and "value" in first:
                return "sharegpt"
            return "messages"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if any(k in keys for k in PROMPT_KEYS) and any(k in keys for k in RESPONSE_KEYS):
        return "pairs"
    if any(k in keys for k in TEXT_KEYS) and len([k for k in keys if not k.startswith("_")]) == 1:
        return "text"
    if "text" in keys:
        return "text"
    raise where.error(f"cannot tell the format from the columns found: {_cols(record)}",
                      f"name your columns the way one of these formats does, or set data.columns "
                      f"(e.g. {{prompt: your_question_column, response: your_answer_column}}; on the command line "
                      f"--column prompt=... --column response=...). We accept {ACCEPTED}")


def _detect_columns(record: dict, format: str) -> dict:
    keys = {k.lower(): k for k in record}

    def first(candidates, exclude=()):
        return next((keys[c] for c in candidates if c in keys and keys[c] not in exclude), None)

    found = {}
    if format in ("messages", "sharegpt"):
        found["messages"] = first(CONVERSATION_KEYS)
    elif format == "text":
        found["text"] = first(TEXT_KEYS)
    else:
        if format == "alpaca":
            found["prompt"], found["response"] = keys.get("instruction"), keys.get("output")
        else:
            found["prompt"] = first(PROMPT_KEYS)
            found["response"] = first(RESPONSE_KEYS, exclude=(found["prompt"],))
        found["context"] = first(CONTEXT_KEYS, exclude=(found["prompt"], found["response"]))
        found["system"] = first(SYSTEM_KEYS)
        if format == "alpaca":
            found["history"] = keys.get("history")
    return {role: col for role, col in found.items() if col is not None}


def _required(format: str) -> tuple:
    return {"messages": ("messages",), "sharegpt": ("messages",), "text": ("text",)}.get(format, ("prompt", "response"))


def _check_turn_keys(turns, format: str, where: Where) -> None:
    first = next((t for t in turns if isinstance(t, dict)), None) if isinstance(turns, list) else None
    if first is None:
        return  # normalise() reports the exact problem
    want = ("from", "value") if format == "sharegpt" else ("role", "content")
    if not all(k in first for k in want):
        raise where.error(f"{format} turns need the keys {' and '.join(want)}; a turn has {_cols(first)}",
                          "set data.format to the format your turns are in (messages: role/content; "
                          "sharegpt: from/value)")


def _cols(record: dict) -> str:
    names = [str(k) for k in record if not str(k).startswith("_")]
    return ", ".join(names[:30]) + (" ..." if len(names) > 30 else "") if names else "(none)"


# ---------------------------------------------------------------- normalising one record

def normalise(record: dict, format: str, mapping: dict, where: Where) -> list[dict]:
    """The record as chat messages (or one text item). Raises DatasetError naming the row."""
    if format == "text":
        text = _text(record, mapping["text"], where, required=False)
        return [{"role": "text", "content": text, "eos": bool(record.get("_eos", True))}] if text.strip() else []
    if format in ("messages", "sharegpt"):
        conv = _turns(record.get(mapping["messages"]), format, mapping["messages"], where)
    else:
        conv = _pair(record, format, mapping, where)
    _check_conversation(conv, where)
    return conv


def _pair(record: dict, format: str, mapping: dict, where: Where) -> list[dict]:
    prompt = _text(record, mapping["prompt"], where)
    response = _text(record, mapping["response"], where)
    context = _text(record, mapping["context"], where, required=False) if "context" in mapping else ""
    system = _text(record, mapping["system"], where, required=False) if "system" in mapping else ""
    # Alpaca puts the input after the instruction; reading-comprehension pairs put the passage first.
    if context.strip():
        prompt = f"{prompt}\n\n{context}" if format == "alpaca" else f"{context}\n\n{prompt}"
    conv = [{"role": "system", "content": system}] if system.strip() else []
    for turn in _history(record.get(mapping.get("history", ""), None), where):
        conv += turn
    return conv + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _history(history, where: Where) -> list[list[dict]]:
    if history in (None, "", []):
        return []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        raise where.error("history must be a list of [instruction, response] pairs",
                          "write history as [[\"question\", \"answer\"], ...]")
    turns = []
    for q, a in history:
        if not isinstance(q, str) or not isinstance(a, str):
            raise where.error("history entries must be text", "write history as [[\"question\", \"answer\"], ...]")
        turns.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    return turns


def _text(record: dict, column: str, where: Where, required: bool = True) -> str:
    value = record.get(column)
    if value is None:
        if required:
            raise where.error(f"{column!r} is null or missing", f"every row needs text in {column!r}")
        return ""
    if not isinstance(value, str):
        raise where.error(f"{column!r} must be text, got {kind_of(value)} ({str(value)[:40]})",
                          "put the value in quotes, or fix that row")
    if required and not value.strip():
        raise where.error(f"{column!r} is empty", f"every row needs text in {column!r}; remove or fix that row")
    return value


def _turns(turns, format: str, column: str, where: Where) -> list[dict]:
    if not isinstance(turns, list):
        raise where.error(f"{column!r} must be a list of turns, got {kind_of(turns)}",
                          "write it as [{\"role\": \"user\", \"content\": ...}, ...]")
    role_key, content_key = ("from", "value") if format == "sharegpt" else ("role", "content")
    conv = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise where.error(f"turn {i} must be an object, got {kind_of(turn)}", f"each turn needs {role_key} and {content_key}")
        raw_role = turn.get(role_key)
        role = ROLES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise where.error(f"turn {i} has unknown role {raw_role!r}",
                              f"use one of: {', '.join(ROLES)} (in the {role_key!r} key)")
        conv.append({"role": role, "content": _content(turn.get(content_key), i, content_key, where)})
    return conv


def _content(value, turn: int, key: str, where: Where) -> str:
    if isinstance(value, str):
        return value
    # OpenAI-style content parts: keep the text parts, refuse anything else (images, audio) clearly.
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
        raise where.error(f"turn {turn} has non-text content parts", "only text content can be trained here")
    raise where.error(f"turn {turn}: {key!r} must be text, got {kind_of(value)}", "fix that turn")


def _check_conversation(conv: list[dict], where: Where) -> None:
    roles = [m["role"] for m in conv]
    if "assistant" not in roles:
        raise where.error("the conversation has no assistant turn, so there is nothing to learn",
                          "every row needs at least one assistant reply")
    first = next(r for r in roles if r != "system")
    if first == "assistant":
        raise where.error("the conversation starts with an assistant turn",
                          "start each conversation with a user turn (after an optional system turn)")
    if any(not m["content"].strip() for m in conv if m["role"] == "assistant"):
        raise where.error("an assistant turn is empty", "remove the empty reply or fill it in")
