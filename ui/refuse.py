"""A refusal of ordinary input is a message, not a crash: the toast the user reads, and one line in the app's log.

Gradio prints the traceback of every gr.Error a handler raises; for a refusal (a GarageError, or a request the
user must change) that traceback says nothing the message does not, and buries real crashes in the log.
"""

from __future__ import annotations

import sys

import gradio as gr

from core.errors import GarageError


def refusal(what: GarageError | str) -> gr.Error:
    """The gr.Error to raise for a refusal: the message (with its fix, once) in the toast, one line in the log."""
    text = str(what)
    print("refused: " + " | ".join(line.strip() for line in text.splitlines() if line.strip()), file=sys.stderr,
          flush=True)
    return gr.Error(text, print_exception=False)
