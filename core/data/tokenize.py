"""Chat template rendering, the loss mask, and compact storage of tokenised rows.

The loss mask comes from the rendered text, not from {% generation %} tags (most templates, SmolLM2's included,
have none): for each assistant turn we render the conversation up to that turn with the generation prompt, and
up to and including it; where the two renders part is where the assistant text starts, and the end of the
second render (minus trailing whitespace) is where its end-of-turn token ends. This works for templates that
inject a default system prompt, since every prefix gets the same one. Where a turn renders differently once
later turns follow (reasoning templates), its text is found in the full render instead. The full text is then
tokenised once, and a token is trained when it holds any character of an assistant span, so token merges at a
boundary cannot shift the mask by a token.
"""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Sequence

from core.data.read import Where
from core.errors import DatasetError

# The fallback for models without a chat template: plain ChatML. Assistant turns end with the model's own
# end-of-sequence token as well, so a base model learns to stop. fallback_template() puts the tokenizer's BOS in
# front where the tokenizer itself would (rows are tokenised without adding special tokens).
FALLBACK_END = "<|im_end|>"
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% if message['role'] == 'assistant' and eos_token and eos_token != '<|im_end|>' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_template(tokenizer) -> tuple[str, bool]:
    """(template, is_default): the model's own template, or the fallback (fallback_template) when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # some tokenizers ship named templates; "default" is the chat one
        template = template.get("default") or next(iter(template.values()), None)
    if isinstance(template, str) and template.strip():
        return template, False
    return fallback_template(tokenizer), True


def fallback_template(tokenizer) -> str:
    """ChatML, with the BOS token first for tokenizers that start every text with it (Llama 2, Gemma)."""
    return ("{{ bos_token }}" if _adds_bos(tokenizer) else "") + DEFAULT_CHAT_TEMPLATE


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or bos == getattr(tokenizer, "eos_token_id", None):
        return False  # GPT-2 / GPT-NeoX style: one <|endoftext|> for both, never put in front of a text
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot say gets no BOS, as before
        return False
    return ids[:1] == [bos]


def stop_strings(tokenizer) -> list[str]:
    """End-of-turn markers of the fallback that this vocabulary has no token for: written out as several plain
    tokens, they can only be caught as text (generation stops on them, and they are cut from the reply)."""
    template, is_default = chat_template(tokenizer)
    if not is_default:
        return []
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return [] if FALLBACK_END in vocab else [FALLBACK_END]


def fallback_notice(tokenizer) -> str | None:
    """What to tell a user wherever a model without a chat template is used; None when it has its own."""
    if not chat_template(tokenizer)[1]:
        return None
    how = ("its vocabulary has no <|im_end|> token, so the marker is plain text and replies are cut at it"
           if stop_strings(tokenizer) else "<|im_end|> is a token of its vocabulary")
    return ("this model has no chat template of its own: LoRA Garage formats chats in ChatML "
            "(<|im_start|>role ... <|im_end|>, then the end-of-text token after each reply; " + how + "). "
            "A trained adapter learns this format and is saved with it; the base model alone never saw it and "
            "may ramble until the token limit")


NO_SYSTEM = "none"  # data.system value that removes the template's default system prompt


def with_system(conv: list[dict], system: str) -> list[dict]:
    """A conversation with data.system applied: rows that bring their own system turn keep it; the others get
    `system` as theirs (NO_SYSTEM: an empty one, which stops a template from adding its default)."""
    if not system or not conv or conv[0].get("role") in ("system", "text"):
        return conv
    return [{"role": "system", "content": "" if system == NO_SYSTEM else system}] + list(conv)


def template_system(renderer: "Renderer") -> str | None:
    """What the chat template adds as a system prompt to a conversation that has none, as rendered text (None
    when it adds nothing). Found by rendering one probe turn three ways: alone, after an empty system turn, and
    after a marked one; the default is what stands where the mark stands."""
    user = [{"role": "user", "content": "PROBE-USER-7f3a"}]
    mark = "PROBE-SYSTEM-7f3a"
    try:
        alone = renderer.render(user)
        empty = renderer.render([{"role": "system", "content": ""}] + user)
        marked = renderer.render([{"role": "system", "content": mark}] + user)
    except Exception as e:  # noqa: BLE001 - a template that refuses a system turn: it then adds none either
        if "system" in str(e).lower():
            return None
        raise
    if alone == empty or mark not in marked:
        return None
    before, after = marked.split(mark, 1)
    if alone.startswith(before) and alone.endswith(after) and len(alone) >= len(before) + len(after):
        added = alone[len(before):len(alone) - len(after)]
        return added or None
    return None


class Renderer:
    """Renders conversations with a tokenizer's chat template and finds the assistant spans.

    Tool use goes through the template's own tool support where it has one (the conversation's tool schemas
    as `tools`, assistant `tool_calls`, `role: tool` results); otherwise through the plain-text rendering in
    plain_tools(). Reasoning goes to the template's thinking field where it has one, else it is dropped.
    `used` records which of these happened, for the stats."""

    def __init__(self, tokenizer, system: str = ""):
        self.template, self.is_default = chat_template(tokenizer)
        self.system = system or ""  # data.system: "" = the template's default, NO_SYSTEM, or the text to use
        self.kwargs = {k: v for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()
                       if isinstance(v, str)}
        self.kwargs.setdefault("eos_token", getattr(tokenizer, "eos_token", None) or "")
        self._compiled = _compile(self.template)
        self._tokenizer = tokenizer
        self.eos = getattr(tokenizer, "eos_token", None) or ""
        self.tool_support = supports_tools(self.template)
        self.thinking_field = thinking_field(self.template)
        self.used: dict = {}

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None) -> str:
        if self._compiled is not None:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=tools, documents=None, **self.kwargs)
        return self._tokenizer.apply_chat_template(messages, tools=tools, chat_template=self.template,
                                                   tokenize=False, add_generation_prompt=add_generation_prompt)

    def for_template(self, conv: list[dict]) -> tuple[list[dict], list | None, list[bool]]:
        """(messages as the template takes them, tools for its `tools` variable, trained flag per message)."""
        tools = getattr(conv, "tools", None)
        conv = with_system(conv, self.system)
        has_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in conv)
        if has_tools:
            self.used["tools"] = "template" if self.tool_support else "plain text"
        messages = []
        for m in conv:
            m = dict(m)
            if m.pop("train", True) is False:
                self.used["loss_weight_zero"] = self.used.get("loss_weight_zero", 0) + 1
                m["_masked"] = True
            reasoning = m.pop("reasoning_content", "")
            if reasoning:
                if self.thinking_field:
                    m[self.thinking_field] = reasoning
                    self.used["reasoning"] = self.thinking_field
                else:
                    self.used["reasoning"] = "dropped"
            messages.append(m)
        if has_tools and not self.tool_support:
            messages, tools = plain_tools(messages, tools), None
        trained = [m["role"] == "assistant" and not m.pop("_masked", False) for m in messages]
        return messages, tools, trained

    def text(self, conv: list[dict], where: Where) -> str:
        """The whole conversation rendered (train_on=all)."""
        messages, tools, _ = self.for_template(conv)
        return self._guarded(lambda: self.render(messages, tools=tools), where)

    def spans(self, conv: list[dict], where: Where) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the (start, end) character span of every trained assistant turn."""
        messages, tools, trained = self.for_template(conv)
        return self._guarded(lambda: self._spans(messages, tools, trained, where), where)

    def _spans(self, conv, tools, trained, where) -> tuple[str, list[tuple[int, int]]]:
        full = self.render(conv, tools=tools)
        spans, cursor = [], 0
        for i, message in enumerate(conv):
            if message["role"] != "assistant":
                cursor = _advance(full, _anchor(message), cursor)
                continue
            before = self.render(conv[:i], add_generation_prompt=True, tools=tools)
            after = full if i == len(conv) - 1 else self.render(conv[: i + 1], tools=tools)
            start, end = _common_prefix(before, after), len(after.rstrip())
            if not (full.startswith(after) and cursor <= start < end):
                start, end = self._search_span(full, _anchor(message), cursor, where)
            if trained[i]:
                spans.append((start, end))
            cursor = end
        return full, spans

    def _guarded(self, fn, where: Where):
        try:
            return fn()
        except DatasetError:
            raise
        except Exception as e:  # noqa: BLE001 - a template can raise anything (raise_exception, TypeError ...)
            raise where.error(f"the model's chat template rejected this row: {type(e).__name__}: {str(e)[:200]}",
                              "the template may need alternating user/assistant turns or no system turn")

    def _search_span(self, full: str, content: str, cursor: int, where: Where) -> tuple[int, int]:
        """For a turn that renders differently once later turns follow (reasoning templates drop old thoughts):
        find its text after the previous turn, and extend the span over the end-of-turn token after it."""
        content = content.strip()
        start = full.find(content, cursor)
        if start < 0 or not content:
            raise where.error("the chat template changes the text of this row, so we cannot tell which "
                              "tokens are the assistant's", "set data.train_on=all to train on every token")
        end = start + len(content)
        rest = full[end:].lstrip(" \t")
        for token in sorted(self._end_tokens(), key=len, reverse=True):
            if rest.startswith(token):
                return start, len(full) - len(rest) + len(token)
        return start, end

    def _end_tokens(self) -> list[str]:
        tokens = set(getattr(self._tokenizer, "all_special_tokens", None) or [])
        return [t for t in tokens | {self.eos} if t]


def _anchor(message: dict) -> str:
    """Text that must appear in the render for this message: its content, else its first tool call's name."""
    content = message.get("content") or ""
    if content.strip():
        return content
    calls = message.get("tool_calls") or []
    return calls[0]["function"]["name"] if calls else ""


# ---------------------------------------------------------------- tools and thinking, by template

def supports_tools(template: str) -> bool:
    """Does the template read the `tools` variable and render assistant tool calls?"""
    try:
        import jinja2  # heavy
        from jinja2 import meta  # heavy

        variables = meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except Exception:  # noqa: BLE001 - an unparsable template fails later, with the row named
        return False
    return "tools" in variables and "tool_calls" in template


def thinking_field(template: str) -> str | None:
    """The message field a template renders reasoning from (Qwen3 and DeepSeek: reasoning_content; gpt-oss:
    thinking), or None."""
    if "reasoning_content" in template:
        return "reasoning_content"
    if re.search(r"""(message|m)(\.thinking\b|\[['"]thinking['"]\])""", template):
        return "thinking"
    return None


PLAIN_TOOLS_HEADER = ("You can call these tools (JSON schemas):\n<tools>\n{tools}\n</tools>\n"
                      'To call a tool, reply with <tool_call>{{"name": ..., "arguments": {{...}}}}</tool_call>; '
                      "its result comes back inside <tool_response></tool_response>.")


def plain_tools(messages: list[dict], tools: list | None) -> list[dict]:
    """Tool use as plain text, for templates without tool support (the Hermes / Qwen convention, written out):
    the tool schemas go into the system turn inside <tools>, each assistant tool call is appended to its reply
    as <tool_call>{"name", "arguments"}</tool_call>, and consecutive tool results become one user turn of
    <tool_response> blocks (so user / assistant turns still alternate)."""
    out = []
    if tools:
        header = PLAIN_TOOLS_HEADER.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0]["role"] == "system":
            first = dict(messages[0])
            first["content"] = f"{first['content']}\n\n{header}" if first["content"].strip() else header
            messages = [first] + messages[1:]
        else:
            messages = [{"role": "system", "content": header}] + messages
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        calls = m.pop("tool_calls", None)
        if calls:
            text = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments":
                             c["function"]["arguments"]}, ensure_ascii=False) + "\n</tool_call>" for c in calls)
            m["content"] = f"{m['content']}\n{text}" if m["content"].strip() else text
        out.append(m)
    for m in out:
        m.pop("_tool_results", None)
    return out


def _compile(template: str):
    """transformers' sandboxed, cached template compile; None makes us use apply_chat_template instead."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template  # heavy

        return _compile_jinja_template(template)
    except Exception:  # noqa: BLE001 - a private helper: if it moved, the public path still works
        return None


def _advance(full: str, content: str, cursor: int) -> int:
    """Move past a message's text if it appears after the cursor (never beyond where it really is)."""
    content = content.strip()
    pos = full.find(content, cursor) if content else -1
    return pos + len(content) if pos >= 0 else cursor


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on the longest equal prefix
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ---------------------------------------------------------------- tokenising and masking

def encode(tokenizer, texts: list[str]) -> list:
    """One encoding per text (with .ids, .offsets and .char_to_token), from one batch call to the fast
    tokenizer. The template already holds every special token, so none are added."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        return backend.encode_batch(texts, add_special_tokens=False)
    out = []
    for text in texts:  # slow tokenizers have no offsets: cut at newlines so pieces map back to characters
        ids, offsets, pos = [], [], 0
        for piece in text.splitlines(keepends=True):
            piece_ids = tokenizer.encode(piece, add_special_tokens=False)
            ids += piece_ids
            offsets += [(pos, pos + len(piece))] * len(piece_ids)
            pos += len(piece)
        out.append(OffsetEncoding(ids, offsets))
    return out


class OffsetEncoding:
    """The part of tokenizers.Encoding we use, built from ids and character offsets."""

    def __init__(self, ids: list[int], offsets: list[tuple[int, int]]):
        self.ids, self.offsets = ids, offsets

    def char_to_token(self, char: int) -> int | None:
        return next((t for t, (a, b) in enumerate(self.offsets) if a <= char < b), None)


def loss_mask(encoding, spans: list[tuple[int, int]], n: int) -> bytearray:
    """1 for the n tokens that hold any character of an assistant span, else 0. A token that straddles the
    start (" Hello" after a template's trailing space) is trained: the model has to produce its assistant
    part. Looks up only the two ends of each span, so it costs nothing per token."""
    mask = bytearray(n)
    for start, end in spans:
        first, last = _token_at(encoding, start, forward=True), _token_at(encoding, end - 1, forward=False)
        if first is not None and last is not None and first <= last:
            mask[first:last + 1] = b"\x01" * (last + 1 - first)
    return mask


def _token_at(encoding, char: int, forward: bool) -> int | None:
    token = encoding.char_to_token(char)
    if token is not None:
        return token
    # The character is in no token (whitespace trimmed from offsets): take the nearest token on that side.
    offsets = encoding.offsets
    if forward:
        return next((t for t, (_, b) in enumerate(offsets) if b > char), None)
    return next((t for t in range(len(offsets) - 1, -1, -1) if offsets[t][0] <= char), None)


def segments(text: str, offsets, mask, n: int) -> list[tuple[str, bool]]:
    """The text of the first n tokens as (piece, trained) runs, for previews."""
    if n == 0:
        return []
    out, run_start = [], 0
    for t in range(1, n):
        if mask[t] != mask[t - 1]:
            out.append((text[run_start:offsets[t][0]], bool(mask[t - 1])))
            run_start = offsets[t][0]
    end = len(text) if n == len(offsets) else offsets[n - 1][1]
    out.append((text[run_start:end], bool(mask[n - 1])))
    return [(piece, trained) for piece, trained in out if piece]


# ---------------------------------------------------------------- compact rows

class TokenRows(Sequence):
    """Tokenised rows in flat arrays: ~5 bytes a token, where lists of Python ints take ~40. Indexing gives
    {"input_ids": [...], "labels": [...]} (labels -100 where masked), so it reads like a list of dicts."""

    def __init__(self):
        self._ids = array("i")
        self._mask = bytearray()
        self._starts = array("q", [0])

    def append(self, ids, mask) -> None:
        self._ids.extend(ids)
        self._mask.extend(mask)
        self._starts.append(len(self._ids))

    def __len__(self) -> int:
        return len(self._starts) - 1

    def length(self, i: int) -> int:
        return self._starts[i + 1] - self._starts[i]

    def trained(self, i: int) -> int:
        return self._mask.count(1, self._starts[i], self._starts[i + 1])

    def first_trained(self, i: int) -> int:
        return self._mask[self._starts[i]] if self.length(i) else 0

    def parts(self, i: int) -> tuple[list[int], list[int]]:
        a, b = self._starts[i], self._starts[i + 1]
        ids = self._ids[a:b].tolist()
        return ids, [t if m else -100 for t, m in zip(ids, self._mask[a:b])]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        ids, labels = self.parts(i)
        return {"input_ids": ids, "labels": labels}

    def subset(self, indices) -> "TokenRows":
        out = TokenRows()
        for i in indices:
            a, b = self._starts[i], self._starts[i + 1]
            out.append(self._ids[a:b], self._mask[a:b])
        return out

    def total_tokens(self) -> int:
        return len(self._ids)

    def trained_tokens(self) -> int:
        return self._mask.count(1)


class PackedRows(Sequence):
    """Several rows per sequence. position_ids restart at 0 for each packed row, so attention code that reads
    them (flash-attention varlen, or a block mask built from them) can keep rows apart. The first label of each
    row is masked: it would be predicted from the end of the previous, unrelated row."""

    def __init__(self, rows: TokenRows, bins: list[list[int]]):
        self.rows, self.bins = rows, bins

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        ids, labels, positions = [], [], []
        for r in self.bins[i]:
            row_ids, row_labels = self.rows.parts(r)
            if row_labels:
                row_labels[0] = -100
            ids += row_ids
            labels += row_labels
            positions += range(len(row_ids))
        return {"input_ids": ids, "labels": labels, "position_ids": positions}

    def total_tokens(self) -> int:
        return self.rows.total_tokens()

    def trained_tokens(self) -> int:
        return self.rows.trained_tokens() - sum(self.rows.first_trained(r) for r in range(len(self.rows)))


def pack(rows: TokenRows, max_len: int) -> PackedRows:
    """Greedy, in order: add rows to the current sequence while it stays within max_len."""
    bins, current, used = [], [], 0
    for i in range(len(rows)):
        n = rows.length(i)
        if current and used + n > max_len:
            bins.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        bins.append(current)
    return PackedRows(rows, bins)


class Chunker:
    """Raw text: documents joined into one stream (with EOS between them) and cut into max_len blocks."""

    def __init__(self, max_len: int):
        self.max_len, self.rows, self._buf = max_len, TokenRows(), array("i")

    def add(self, ids) -> None:
        self._buf.extend(ids)
        while len(self._buf) >= self.max_len:
            block = self._buf[: self.max_len]
            self.rows.append(block, b"\x01" * len(block))
            del self._buf[: self.max_len]

    def finish(self) -> TokenRows:
        if len(self._buf) >= 2:  # one token alone has nothing to predict
            self.rows.append(self._buf, b"\x01" * len(self._buf))
        self._buf = array("i")
        return self.rows
