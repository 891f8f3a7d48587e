"""Row formats: detect which one a record is in, and turn it into chat messages.

Every format becomes a list of {"role": system|user|assistant|tool, "content": str} (a Conversation, which also
carries the tool schemas; assistant turns may carry tool_calls and reasoning_content: see data_turns.py); raw
text becomes [{"role": "text", "content": ...}]. The column mapping maps our role names to the file's column names
(e.g. {"prompt": "question", "response": "answer"}); it is shown to the user and can be overridden
(data.columns). We never guess: columns we cannot place are an error listing what we found and what we accept.
"""

from __future__ import annotations

import json

from core.data.read import Where, kind_of
from core.data.turns import Conversation, content_of, fill_placeholders, loss_weight, tool_calls, tools_list
from core.errors import DatasetError

FORMATS = ("messages", "sharegpt", "alpaca", "pairs", "text")
CONVERSATION_KEYS = ("messages", "conversations", "conversation", "chat", "dialog", "dialogue", "turns")
PROMPT_KEYS = ("prompt", "question", "instruction", "query", "input", "user", "human", "problem", "request")
RESPONSE_KEYS = ("completion", "response", "answer", "output", "assistant", "gpt", "target", "solution", "reply")
CONTEXT_KEYS = ("context", "input", "passage", "document")
SYSTEM_KEYS = ("system", "system_prompt")
TOOLS_KEYS = ("tools", "functions")
TEXT_KEYS = ("text", "content", "body")
ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user", "assistant": "assistant",
         "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
         # tool use: ShareGPT's function_call is an assistant turn that calls a tool; observation (ShareGPT),
         # tool (OpenAI), function (OpenAI's older name) and ipython (Llama 3) are tool results.
         "function_call": "assistant", "tool_call": "assistant", "observation": "tool", "tool": "tool",
         "function": "tool", "ipython": "tool"}
# Columns that change what a row means: training it as plain chat without them would be silently wrong.
PREFERENCE_KEYS = ("chosen", "rejected", "chosen_messages", "rejected_messages")
LABEL_KEYS = ("label", "kto_tag")
MEDIA_KEYS = ("images", "image", "videos", "video", "audios", "audio")
# data.columns keys: our role names, plus the names people naturally write for them.
ROLE_ALIASES = {"instruction": "prompt", "question": "prompt", "query": "prompt", "input": "context",
                "output": "response", "completion": "response", "answer": "response",
                "conversations": "messages"}
FORMAT_ROLES = {
    "messages": ("messages", "system", "tools"), "sharegpt": ("messages", "system", "tools"),
    "alpaca": ("prompt", "response", "context", "system", "history"),
    "pairs": ("prompt", "response", "context", "system"),
    "text": ("text",),
}
ACCEPTED = ("messages or conversations: a list of {role, content} (system/user/assistant/tool, with tool_calls; "
            "optional tools column); ShareGPT conversations: a list of {from, value} (human/gpt/system/"
            "function_call/observation; optional tools column); "
            "Alpaca: instruction, input, output (optional system, history); "
            "pairs: prompt/completion, question/answer, instruction/response, input/output (optional context, system); "
            "raw text: a text column")


def detect(record: dict, where: Where, format: str = "auto", columns: dict | None = None) -> tuple[str, dict]:
    """(format, mapping) for a record; `format`/`columns` override what we would detect."""
    mapping = _normalise_columns(columns or {})
    check_meaning(record, mapping, where)
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
                               "roles: messages, prompt, response, context, system, history, tools, text")
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
    if any(k in keys for k in PROMPT_KEYS):
        raise where.error(f"the rows have a prompt but no reply; columns found: {_cols(record)}",
                          "give each row its reply (a response / output / answer column) for supervised "
                          "fine-tuning, or train prompts alone with train.objective=grpo (the model writes "
                          "replies, and rewards score them)")
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
        found["system"] = first(SYSTEM_KEYS)
        found["tools"] = first(TOOLS_KEYS)
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


# ---------------------------------------------------------------- columns we do not use

def ignored_columns(record: dict, mapping: dict) -> list[str]:
    """The record's columns that no role maps to (listed to the user: nothing is dropped in silence)."""
    used = set(mapping.values())
    return [str(k) for k in record if k not in used and not str(k).startswith("_")]


def check_meaning(record: dict, mapping: dict, where: Where) -> None:
    """Refuse a row whose unused columns change what it means: preference pairs, KTO good/bad labels, and
    images / video / audio (this app trains text models)."""
    used = set(mapping.values())
    keys = {str(k).lower(): k for k in record if k not in used}
    chose = any(str(c).lower() in PREFERENCE_KEYS for c in used)  # the user mapped one side: their choice
    if any(k in keys for k in PREFERENCE_KEYS) and not chose:
        raise where.error(f"this is a file of preference pairs (chosen / rejected), and train.objective is sft; "
                          f"columns found: {_cols(record)}",
                          "train the pairs with train.objective=dpo (or orpo): the flag --objective dpo of "
                          "python -m core train and python -m core data, or objective on the Train page's "
                          "Preference panel; for supervised fine-tuning "
                          "give one reply per prompt, or map the preferred reply "
                          "yourself (data.columns {prompt: prompt, response: chosen}; the rejected replies are "
                          "then left out)")
    for k in LABEL_KEYS:
        if k in keys and isinstance(record[keys[k]], bool):
            raise where.error(f"column {keys[k]!r} marks each row good (true) or bad (false), as KTO files do: "
                              "trained as plain chat, the replies labelled false would be learnt as good ones",
                              f"keep only the rows with {keys[k]}=true and remove the {keys[k]!r} column (KTO "
                              "training is not built yet in this version)")
    for k in MEDIA_KEYS:
        if k in keys and record[keys[k]] not in (None, "", [], {}):
            raise where.error(f"column {keys[k]!r} holds {k}: this app trains text models only, and the "
                              f"<{k.rstrip('s')}> markers would be trained as literal text",
                              f"remove the {keys[k]!r} column (and the <{k.rstrip('s')}> markers) to train on "
                              "the text alone, or use a tool that trains vision / audio models")


# ---------------------------------------------------------------- normalising one record

def normalise(record: dict, format: str, mapping: dict, where: Where, fill: dict | None = None) -> list[dict]:
    """The record as chat messages (a Conversation) or one text item; {{placeholders}} replaced from `fill`.
    Raises DatasetError naming the row."""
    if format == "text":
        text = _text(record, mapping["text"], where, required=False)
        return [{"role": "text", "content": text, "eos": bool(record.get("_eos", True))}] if text.strip() else []
    if format in ("messages", "sharegpt"):
        conv = Conversation(parse_turns(record.get(mapping["messages"]), format, mapping["messages"], where),
                            tools=tools_list(record.get(mapping["tools"]), mapping["tools"], where)
                            if "tools" in mapping else None)
        system = _text(record, mapping["system"], where, required=False) if "system" in mapping else ""
        if system.strip() and not (conv and conv[0]["role"] == "system"):
            conv.insert(0, {"role": "system", "content": system})
    else:
        conv = Conversation(_pair(record, format, mapping, where))
    _check_conversation(conv, where)
    return fill_placeholders(conv, fill or {})


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


def parse_turns(turns, format: str, column: str, where: Where) -> list[dict]:
    if not isinstance(turns, list):
        raise where.error(f"{column!r} must be a list of turns, got {kind_of(turns)}",
                          "write it as [{\"role\": \"user\", \"content\": ...}, ...]")
    role_key, content_key = ("from", "value") if format == "sharegpt" else ("role", "content")
    conv = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise where.error(f"turn {i} must be an object, got {kind_of(turn)}", f"each turn needs {role_key} and {content_key}")
        raw_role = turn.get(role_key)
        name = raw_role.strip().lower() if isinstance(raw_role, str) else None
        role = ROLES.get(name) if name else None
        if role is None:
            raise where.error(f"turn {i} has unknown role {raw_role!r}",
                              f"use one of: {', '.join(ROLES)} (in the {role_key!r} key)")
        if name in ("function_call", "tool_call"):  # ShareGPT: the turn's text is the call, as JSON
            text, reasoning, calls = "", "", tool_calls(turn.get(content_key), i, where)
        elif role == "tool" and isinstance(turn.get(content_key), (dict, list)) and not _is_parts(turn[content_key]):
            text, reasoning, calls = json.dumps(turn[content_key], ensure_ascii=False), "", []  # a JSON result
        else:
            text, reasoning, calls = content_of(turn.get(content_key), i, content_key, where)
            if role == "assistant" and turn.get("tool_calls"):
                calls += tool_calls(turn["tool_calls"], i, where)
        reasoning = reasoning or _reasoning_key(turn, i, where)
        message = {"role": role, "content": text}
        if role == "tool":
            message.update({k: turn[k] for k in ("name", "tool_call_id") if isinstance(turn.get(k), str)})
        elif role == "assistant":
            if reasoning:
                message["reasoning_content"] = reasoning
            if loss_weight(turn, i, where) is False:
                message["train"] = False
        if calls and role != "assistant":
            raise where.error(f"turn {i} is a {role} turn with tool calls", "only assistant turns call tools")
        if calls and conv and conv[-1]["role"] == "assistant" and not conv[-1].get("tool_calls") \
                and name in ("function_call", "tool_call"):
            conv[-1]["tool_calls"] = calls  # ShareGPT writes "text, then the call" as two turns: one reply
            continue
        if calls:
            message["tool_calls"] = calls
        conv.append(message)
    return conv


def _is_parts(value) -> bool:
    return isinstance(value, list) and all(isinstance(p, dict) and "type" in p for p in value)


def _reasoning_key(turn: dict, n: int, where: Where) -> str:
    for key in ("reasoning_content", "reasoning", "thinking"):
        value = turn.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise where.error(f"turn {n}: {key!r} must be text, got {kind_of(value)}", "fix that turn")
        return value
    return ""


def _check_conversation(conv: list[dict], where: Where) -> None:
    roles = [m["role"] for m in conv]
    if "assistant" not in roles:
        raise where.error("the conversation has no assistant turn, so there is nothing to learn",
                          "every row needs at least one assistant reply; a file of prompts without replies "
                          "trains with train.objective=grpo (the model writes replies, and rewards score them)")
    first = next(r for r in roles if r != "system")
    if first == "assistant":
        raise where.error("the conversation starts with an assistant turn",
                          "start each conversation with a user turn (after an optional system turn)")
    for i, m in enumerate(conv, 1):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise where.error("an assistant turn is empty", "remove the empty reply or fill it in")
        if m["role"] == "tool" and not any(p.get("tool_calls") for p in conv[:i - 1] if p["role"] == "assistant"):
            raise where.error(f"turn {i} is a tool result (observation), but no tool call comes before it",
                              "put the assistant's tool call (function_call / tool_calls) before its result")
    if all(m.get("train") is False for m in conv if m["role"] == "assistant"):
        raise where.error("every assistant turn has loss_weight 0, so there is nothing to learn",
                          "give at least one assistant turn loss_weight 1, or remove the row")
