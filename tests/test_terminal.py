"""core.commands.terminal: the CLI's progress line is drawn on a terminal only, never into a pipe or --json output."""

import io

from core.commands import terminal


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_no_bar_when_piped_or_json():
    assert terminal.bar(stream=io.StringIO()) is None
    assert terminal.bar(json_output=True, stream=Tty()) is None


def test_bar_draws_counts_and_ends_the_line():
    out = Tty()
    bar = terminal.bar(stream=out)
    bar("loading the model")
    bar("prompts scored", 1, 4)
    bar("prompts scored", 4, 4)
    text = out.getvalue()
    assert "loading the model" in text and "[######" in text and "1/4" in text and "4/4" in text
    assert text.endswith("\n")
