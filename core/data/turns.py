"""One turn at a time: content parts, tool calls, tool schemas, per-turn loss weights and {{placeholders}}.

What comes out is the shape Hugging Face chat templates read: an assistant turn may carry
`tool_calls: [{"type": "function", "function": {"name", "arguments": {...}}}]` and `reasoning_content`, a tool
result is `{"role": "tool", "content": ...}`, and the conversation's tool schemas travel on the Conversation
(`conv.tools`, OpenAI form `{"type": "function", "function": {...}}`), to be passed as `tools=` to the template.
An assistant turn with loss_weight 0 carries `"train": False`; the renderer strips it before the template.
"""

from __future__ import annotations

import json
import re

from core.data.read import Where, kind_of

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
TEXT_PART_KEYS = ("text", "value", "content")
REASONING_TYPES = ("reasoning", "thinking", "think")
TOOL_CALL_TYPES = ("tool_call", "function_call")


class Conversation(list):
    """A list of messages that also carries the conversation's tool schemas and the placeholders it held."""

    def __init__(self, messages=(), tools=None, placeholders=None):
        super().__init__(messages)
        self.tools: list[dict] | None = tools or None
        self.placeholders: dict[str, None] = dict.fromkeys(placeholders or ())  # an ordered set: first seen first


# ---------------------------------------------------------------- content

def content_of(value, turn: int, key: str, where: Where) -> tuple[str, str, list[dict]]:
    """(text, reasoning, tool calls) of a turn's content: a string, or a list of typed parts. Text parts
    ({"type": "text", "text" | "value": ...}) are joined; reasoning parts become the reasoning; anything that
    is not text (images, audio, files) is refused, naming its type."""
    if value is None:
        return "", "", []
    if isinstance(value, str):
        return value, "", []
    if not isinstance(value, list):
        raise where.error(f"turn {turn}: {key!r} must be text or a list of content parts, got {kind_of(value)}",
                          "fix that turn")
    text, reasoning, calls = [], [], []
    for n, part in enumerate(value, 1):
        if isinstance(part, str):
            text.append(part)
            continue
        if not isinstance(part, dict):
            raise where.error(f"turn {turn}: content part {n} must be an object, got {kind_of(part)}",
                              'write parts like {"type": "text", "text": "..."}')
        kind = str(part.get("type", "text")).lower()
        body = next((part[k] for k in TEXT_PART_KEYS if isinstance(part.get(k), str)), None)
        if kind in TOOL_CALL_TYPES:
            calls += tool_calls(part.get("value", part.get(kind, part.get("function"))), turn, where)
        elif body is None:
            raise where.error(f"turn {turn}: content part {n} has type {kind!r}, which is not text: this app "
                              "trains text models only", f"remove the {kind!r} parts (or those rows) from the file")
        elif kind in REASONING_TYPES:
            reasoning.append(body)
        elif kind == "text":
            text.append(body)
        else:
            raise where.error(f"turn {turn}: content part {n} has type {kind!r}, which is not text: this app "
                              "trains text models only", f"remove the {kind!r} parts (or those rows) from the file")
    return "".join(text), "\n".join(reasoning), calls


def loss_weight(turn: dict, n: int, where: Where) -> bool | None:
    """None when the turn has no loss_weight; else whether it is trained (only 0 and 1 are meaningful)."""
    if "loss_weight" not in turn or turn["loss_weight"] is None:
        return None
    w = turn["loss_weight"]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w not in (0, 1):
        raise where.error(f"turn {n}: loss_weight must be 0 (no loss) or 1 (trained), got {w!r}",
                          "set loss_weight to 0 or 1 on that turn (weights in between are not supported)")
    return w == 1


# ---------------------------------------------------------------- tool calls and tool schemas

def _json(value, what: str, where: Where, hint: str):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as e:
        raise where.error(f"{what} is not valid JSON ({str(e)[:80]}): {value[:60]!r}", hint)


def tool_calls(value, turn: int, where: Where) -> list[dict]:
    """A tool call, or a list of them, as {"name", "arguments"} (ShareGPT function_call text is JSON) or in the
    OpenAI form {"type": "function", "function": {"name", "arguments"}}; arguments may be a JSON string."""
    hint = 'write a tool call as {"name": "get_weather", "arguments": {"city": "Paris"}}'
    value = _json(value, f"turn {turn}: the tool call", where, hint)
    calls = value if isinstance(value, list) else [value]
    out = []
    for call in calls:
        if not isinstance(call, dict):
            raise where.error(f"turn {turn}: a tool call must be an object, got {kind_of(call)}", hint)
        fn = call.get("function") if isinstance(call.get("function"), dict) else call
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise where.error(f"turn {turn}: a tool call has no function name", hint)
        args = _json(fn.get("arguments", fn.get("parameters", {})), f"turn {turn}: the arguments of {name!r}",
                     where, hint)
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise where.error(f"turn {turn}: the arguments of {name!r} must be an object, got {kind_of(args)}", hint)
        item = {"type": "function", "function": {"name": name, "arguments": args}}
        if isinstance(call.get("id"), str):
            item["id"] = call["id"]
        out.append(item)
    return out


def tools_list(value, column: str, where: Where) -> list[dict] | None:
    """The tool schemas of a row (a list, or a JSON string of one), each in the OpenAI form."""
    hint = 'write tools as a list of {"name": ..., "description": ..., "parameters": {JSON schema}}'
    if value in (None, "", []):
        return None
    value = _json(value, f"{column!r}", where, hint)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise where.error(f"{column!r} must be a list of tool schemas, got {kind_of(value)}", hint)
    out = []
    for tool in value:
        fn = tool.get("function") if isinstance(tool, dict) and isinstance(tool.get("function"), dict) else tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise where.error(f"{column!r}: every tool needs a name; found {str(tool)[:60]}", hint)
        out.append({"type": "function", "function": fn})
    return out or None


# ---------------------------------------------------------------- placeholders

def fill_placeholders(conv: Conversation, fill: dict) -> Conversation:
    """Replace {{name}} with fill[name] in every text of the conversation; record every name seen."""
    def sub(text: str) -> str:
        def one(m):
            conv.placeholders[m.group(1)] = None
            return fill.get(m.group(1), m.group(0))
        return PLACEHOLDER.sub(one, text) if "{{" in text else text

    for m in conv:
        for key in ("content", "reasoning_content"):
            if isinstance(m.get(key), str):
                m[key] = sub(m[key])
    return conv
