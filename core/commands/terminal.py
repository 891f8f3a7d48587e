"""Progress on a terminal for the CLI: one line redrawn in place (a bar when the total is known), on stderr, and
only when stderr is a terminal and the output is not --json, so pipes and scripts read clean output."""

from __future__ import annotations

import sys
import time

WIDTH = 24


class Bar:
    """report(message, done=None, total=None): the same callback shape the UI's status line takes."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.open = False  # a line is drawn without its newline yet

    def __call__(self, message: str, done: int | None = None, total: int | None = None) -> None:
        elapsed = f"{time.monotonic() - self.t0:4.0f} s"
        if total:
            filled = int(WIDTH * min(done or 0, total) / total)
            line = f"[{'#' * filled}{'.' * (WIDTH - filled)}] {done:,}/{total:,} {message} {elapsed}"
        else:
            line = f"{message} {elapsed}"
        self.stream.write(f"\r\033[K{line}")
        self.open = True
        if total and done is not None and done >= total:
            self.done()
        self.stream.flush()

    def done(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


def bar(json_output: bool = False, stream=None) -> Bar | None:
    """A Bar when progress may be drawn (stderr is a terminal and the output is not JSON), else None."""
    stream = stream or sys.stderr
    if json_output or not stream.isatty():
        return None
    return Bar(stream)
