"""Marks that render in every browser, emoji font or not: words in coloured badges (CSS) and an inline-SVG brand
mark. Pass and fail differ by word and by colour, so neither a missing font nor colour blindness hides which is
which."""

from __future__ import annotations

import html

# state -> badge colour class: one place for the run status colours the Train and Runs pages show
STATE_KIND = {"queued": "wait", "running": "busy", "stopping": "wait", "stopped": "wait", "completed": "ok",
              "failed": "bad"}


def badge(text: str, kind: str) -> str:
    """A small coloured label; kind is ok | bad | warn | busy | wait."""
    return f"<span class='lg-badge lg-badge-{kind}'>{html.escape(text)}</span>"


PASS = badge("pass", "ok")
FAIL = badge("fail", "bad")
ERROR = badge("error", "bad")
REJECTED = badge("rejected", "bad")
NOTE = badge("note", "warn")
YES = badge("yes", "ok")


def state(name: str) -> str:
    return badge(name, STATE_KIND.get(name, "wait"))


# a wrench in a rounded square, drawn with paths: no font needed
BRAND = ("<svg class='lg-logo' viewBox='0 0 24 24' width='20' height='20' aria-hidden='true'>"
         "<rect x='1' y='1' width='22' height='22' rx='5' fill='#4e79a7'/>"
         "<path d='M15.5 5.5a3.5 3.5 0 0 0-3.3 4.6l-5.6 5.6a1.3 1.3 0 0 0 1.8 1.8l5.6-5.6a3.5 3.5 0 0 0 4.5-4.4"
         "l-2 2-1.8-.5-.5-1.8 2-2a3.5 3.5 0 0 0-.7-.3z' fill='#fff'/></svg>")

CSS = """
.lg-badge {display:inline-block; padding:0 .45em; border-radius:4px; font-size:.85em; font-weight:700;
           line-height:1.5; color:#fff; vertical-align:baseline}
.lg-badge-ok {background:#1a7f37} .lg-badge-bad {background:#cf222e} .lg-badge-warn {background:#9a6700}
.lg-badge-busy {background:#0969da} .lg-badge-wait {background:#6e7781}
.lg-bad {color:#cf222e; font-weight:600}
.lg-logo {vertical-align:-4px; margin-right:.35em}
"""
