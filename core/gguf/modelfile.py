"""An Ollama Modelfile written from the model's own chat template (the one the run trained with), never from a
table of model names.

How: the jinja template is rendered for a few probe conversations with marker contents, and the text around the
markers gives, per role, what comes before and after a message's content, what the generation prompt adds, the
end-of-turn marker after an assistant reply, and a default system prompt where the template inserts one when the
conversation has none. From those pieces we write a Go TEMPLATE over .Messages, and then check it: our Go-template
renderer (core.gguf.gotemplate) must give the same text as the jinja template for four conversations (with and without
a system message, one and several turns). Ollama adds a Modelfile's SYSTEM as the first message when a chat has
none, so the default system prompt goes to SYSTEM and the TEMPLATE only renders messages.

The BOS token is left out of TEMPLATE: llama.cpp and Ollama add it themselves when the GGUF says so
(tokenizer.ggml.add_bos_token), and the export's parity check verifies the prompt tokens end to end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from core.gguf import gotemplate

_S, _U1, _A1, _U2 = "QxSYSTEMxQ", "QxUSER1xQ", "QxASSISTANT1xQ", "QxUSER2xQ"

CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "cheese"},
     {"role": "assistant", "content": "fromage"}, {"role": "user", "content": "bread"}],
]


class TemplateNotExpressible(ValueError):
    """The jinja template does something the per-role Go TEMPLATE cannot say (the message says what)."""


@dataclass
class Pieces:
    bos: str                      # text the template puts first (the BOS token), left to the runtime
    prefix: dict                  # role -> text before the content
    suffix: dict                  # role -> text after the content (assistant: the end-of-turn marker)
    generation: str               # what add_generation_prompt adds after the last user turn
    default_system: str = ""      # the template's own system prompt when a chat has none
    stops: list = field(default_factory=list)


def probe(render, bos_token: str = "", eos_token: str = "") -> Pieces:
    """`render(messages, add_generation_prompt) -> str` is the run's jinja template (data_tokenize.Renderer.render)."""
    s, u1, a1, u2 = ({"role": r, "content": c} for r, c in
                     (("system", _S), ("user", _U1), ("assistant", _A1), ("user", _U2)))
    full = render([s, u1, a1, u2], True)
    su, sug, sua = render([s, u1], False), render([s, u1], True), render([s, u1, a1], False)
    for marker in (_S, _U1, _A1, _U2):
        if full.count(marker) != 1:
            raise TemplateNotExpressible(f"the template does not render each message's content once ({marker})")
    i_s, i_u1, i_a1, i_u2 = (full.index(m) for m in (_S, _U1, _A1, _U2))
    head = full[:i_s]
    bos = bos_token if bos_token and head.startswith(bos_token) else ""
    between_su, between_ua = full[i_s + len(_S):i_u1], full[i_u1 + len(_U1):i_a1]
    between_au, tail = full[i_a1 + len(_A1):i_u2], full[i_u2 + len(_U2):]
    s_user = su[su.index(_U1) + len(_U1):]
    generation = sug[len(su):] if sug.startswith(su) else None
    s_asst = sua[sua.index(_A1) + len(_A1):]
    if generation is None or tail != s_user + generation:
        raise TemplateNotExpressible("the generation prompt is not text added after the last user turn")
    if not between_au.startswith(s_asst) or not between_ua.startswith(s_user):
        raise TemplateNotExpressible("a turn's closing text differs between the middle and the end of a chat")
    p_user, p_asst = between_au[len(s_asst):], between_ua[len(s_user):]
    if not between_su.endswith(p_user):
        raise TemplateNotExpressible("the user turn opens differently after a system message")
    pieces = Pieces(bos=bos, prefix={"system": head[len(bos):], "user": p_user, "assistant": p_asst},
                    suffix={"system": between_su[:len(between_su) - len(p_user)], "user": s_user,
                            "assistant": s_asst}, generation=generation)
    alone = render([u1], True)
    before = alone[:alone.index(_U1)]
    if before != bos + p_user:
        start, end = bos + pieces.prefix["system"], pieces.suffix["system"] + p_user
        if not (before.startswith(start) and before.endswith(end) and len(before) >= len(start) + len(end)):
            raise TemplateNotExpressible("without a system message the template adds text that is not a system turn")
        pieces.default_system = before[len(start):len(before) - len(end)]
    pieces.stops = list(dict.fromkeys(x for x in (s_asst.strip(), eos_token) if x))
    return pieces


def go_template(p: Pieces) -> str:
    q = lambda s: "{{ " + json.dumps(s, ensure_ascii=False) + " }}" if s else ""  # noqa: E731
    roles = []
    for n, role in enumerate(("system", "user", "assistant")):
        opener = "{{- if" if n == 0 else "{{- else if"
        after = (q(p.suffix[role]) + "{{ if $last }}" + q(p.generation) + "{{ end }}" if role == "user" else
                 "{{ if not $last }}" + q(p.suffix[role]) + "{{ end }}" if role == "assistant" else q(p.suffix[role]))
        roles.append(f'{opener} eq $m.Role "{role}" }}}}{q(p.prefix[role])}{{{{ $m.Content }}}}{after}')
    text = ("{{- range $i, $m := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
            + "\n".join(roles) + "\n{{- end }}\n{{- end }}")
    for piece in [p.generation, *p.prefix.values(), *p.suffix.values()]:
        if "{{" in piece or "}}" in piece:
            raise TemplateNotExpressible("the template's text contains {{ or }}, which a Go template cannot quote here")
    return text


def render_go(template: str, messages: list[dict], system: str = "") -> str:
    """What Ollama renders for a chat: SYSTEM first when the chat has no system message."""
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}] + messages
    return gotemplate.render(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


def check(template: str, pieces: Pieces, render) -> list[dict]:
    """Each check conversation rendered by jinja and by the Go TEMPLATE (BOS left out of both)."""
    rows = []
    for conv in CHECK_CONVERSATIONS:
        want = render(conv, True)
        want = want[len(pieces.bos):] if pieces.bos and want.startswith(pieces.bos) else want
        got = render_go(template, conv, pieces.default_system)
        rows.append({"turns": len(conv), "system": conv[0]["role"] == "system", "same": got == want,
                     **({} if got == want else {"jinja": want, "go": got})})
    return rows


def system_prompt(run_system: str, pieces: Pieces | None) -> str:
    """SYSTEM for the run: the run's own data.system where it set one (what its rows without a system message
    were trained with), nothing for "none", else the template's default."""
    if run_system.strip().lower() == "none":
        return ""
    return run_system or (pieces.default_system if pieces else "")


def write(gguf_name: str, template: str | None, pieces: Pieces | None, settings, system: str = "") -> str:
    """The Modelfile text. `settings` is a chat.GenSettings (the defaults we chat with); `system` from
    system_prompt()."""
    lines = [f"FROM ./{gguf_name}", ""]
    if template is not None:
        for text in (template, system):
            if '"""' in text:
                raise TemplateNotExpressible('the template or the system prompt contains """, which a Modelfile '
                                             'cannot quote')
        lines += [f'TEMPLATE """{template}"""', ""]
        if system:
            lines += [f'SYSTEM """{system}"""', ""]
        lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in pieces.stops]
    lines += [f"PARAMETER temperature {settings.temperature}", f"PARAMETER top_p {settings.top_p}",
              f"PARAMETER repeat_penalty {settings.repetition_penalty}",
              f"PARAMETER num_predict {settings.max_new_tokens}", ""]
    return "\n".join(lines)
