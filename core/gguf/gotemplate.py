"""A small renderer for the subset of Go's text/template that our Modelfile TEMPLATEs use, so the export can check
that Ollama will build the same prompt as the jinja template we trained with, without Go or Ollama installed.

Supported, with Go's semantics: text; {{- and -}} trimming; "string" literals with Go escapes; $var := pipeline;
range $i, $m := .Messages; if / else if / else / end; .Field and $var.Field; the functions eq, ne, not, and, or,
len, slice (one or two indices). Anything else raises ValueError naming it, so a template outside the subset is
never silently rendered differently.
"""

from __future__ import annotations

import json
import re

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|:=|\(|\)|,|[$.\w][\w.$]*|\S')


def render(template: str, data: dict) -> str:
    nodes, rest = _parse(_lex(template), 0, ())
    out: list[str] = []
    _exec(nodes, {"$": data}, data, out)
    return "".join(out)


def _lex(template: str) -> list:
    items, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        if items and items[-1][0] == "trim_next":
            items.pop()
            text = text.lstrip(" \t\r\n")
        items.append(("text", text))
        items.append(("action", _TOKEN.findall(m.group(2).strip())))
        if m.group(3):
            items.append(("trim_next", None))
        pos = m.end()
    text = template[pos:]
    if items and items[-1][0] == "trim_next":
        items.pop()
        text = text.lstrip(" \t\r\n")
    items.append(("text", text))
    return items


def _parse(items: list, i: int, stop: tuple) -> tuple[list, int]:
    nodes = []
    while i < len(items):
        kind, val = items[i]
        if kind == "text":
            if val:
                nodes.append(("text", val))
            i += 1
            continue
        head = val[0] if val else ""
        if head in stop:
            return nodes, i
        if head == "range":
            if val[2:4] == [",", val[3]] and val[4] == ":=":   # range $i, $m := pipeline
                names, pipe = (val[1], val[3]), val[5:]
            else:
                raise ValueError(f"unsupported range form: {' '.join(val)}")
            body, i = _parse(items, i + 1, ("end",))
            nodes.append(("range", names, pipe, body))
            i += 1
        elif head == "if":
            branches, i = [], i
            cond = val[1:]
            while True:
                body, i = _parse(items, i + 1, ("else", "end"))
                branches.append((cond, body))
                tok = items[i][1]
                if tok[0] == "end":
                    break
                cond = tok[2:] if tok[1:2] == ["if"] else None
                if cond is None:
                    body, i = _parse(items, i + 1, ("end",))
                    branches.append((None, body))
                    break
            nodes.append(("if", branches))
            i += 1
        elif len(val) > 1 and val[1] == ":=":
            nodes.append(("set", val[0], val[2:]))
            i += 1
        elif head in ("end", "else"):
            raise ValueError(f"unexpected {{{{ {head} }}}}")
        else:
            nodes.append(("out", val))
            i += 1
    if stop:
        raise ValueError(f"missing {{{{ {stop[0]} }}}}")
    return nodes, i


def _exec(nodes: list, env: dict, dot, out: list) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            value = _eval(node[1], env, dot)
            out.append("" if value is None else str(value))
        elif node[0] == "set":
            env[node[1]] = _eval(node[2], env, dot)
        elif node[0] == "range":
            for idx, item in enumerate(_eval(node[2], env, dot) or []):
                inner = dict(env, **{node[1][0]: idx, node[1][1]: item})
                _exec(node[3], inner, item, out)
        elif node[0] == "if":
            for cond, body in node[1]:
                if cond is None or _truth(_eval(cond, env, dot)):
                    _exec(body, env, dot, out)
                    break


def _truth(v) -> bool:
    return bool(v) and v != 0


def _eval(tokens: list, env: dict, dot):
    value, rest = _call(tokens, env, dot)
    if rest:
        raise ValueError(f"unexpected {' '.join(rest)}")
    return value


def _call(tokens: list, env: dict, dot):
    """A command: a function with arguments, or a single operand."""
    head = tokens[0]
    funcs = {"eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truth(a),
             "and": lambda *a: next((x for x in a if not _truth(x)), a[-1]),
             "or": lambda *a: next((x for x in a if _truth(x)), a[-1]), "len": len,
             "slice": lambda s, *ix: s[ix[0]:] if len(ix) == 1 else s[ix[0]:ix[1]]}
    if head in funcs:
        args, rest = [], tokens[1:]
        while rest and rest[0] != ")":
            arg, rest = _operand(rest, env, dot)
            args.append(arg)
        return funcs[head](*args), rest
    return _operand(tokens, env, dot)


def _operand(tokens: list, env: dict, dot):
    tok, rest = tokens[0], tokens[1:]
    if tok == "(":
        value, rest = _call(rest, env, dot)
        if not rest or rest[0] != ")":
            raise ValueError("missing )")
        return value, rest[1:]
    if tok.startswith('"'):
        return json.loads(tok), rest
    if re.fullmatch(r"-?\d+", tok):
        return int(tok), rest
    if tok.startswith("$"):
        name, _, path = tok.partition(".")
        base = env["$"] if name == "$" else env[name]
        return _field(base, path), rest
    if tok.startswith("."):
        return _field(dot, tok[1:]), rest
    raise ValueError(f"unsupported Go template token {tok!r}")


def _field(obj, path: str):
    for part in filter(None, path.split(".")):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part)
    return obj
