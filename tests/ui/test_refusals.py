"""A refusal is a message: one toast with its fix said once, one line in the app log, no traceback."""

import gradio as gr
import pytest

from core import config as C
from core.runs import folder as runs
from ui import chat_tab, export_panel, train_tab
from ui.refuse import refusal
from tests.helpers.forms import form_values
from core.errors import RunError


def test_a_refusal_is_logged_as_one_line_and_gradio_prints_no_traceback(capsys):
    err = refusal(RunError("run r1 has no final adapter", "train the run to the end"))
    assert isinstance(err, gr.Error) and err.print_exception is False
    assert capsys.readouterr().err == "refused: run r1 has no final adapter | fix: train the run to the end\n"


def test_the_export_toast_says_its_fix_once(capsys):
    run_dir = runs.create(C.RunConfig())
    runs.write_status(run_dir, state="failed")
    with pytest.raises(gr.Error) as e:
        list(export_panel.export(run_dir.name, "final adapter", "/tmp/nowhere-honest", ["q8_0"], False))
    text = str(e.value.message).lower()
    assert text.count("fix") == 1 and "failed before saving one" in text and "start it again" in text


def test_handlers_refuse_without_a_traceback():
    with pytest.raises(gr.Error) as e:
        train_tab.resume(None)
    assert e.value.print_exception is False


def test_a_bad_field_is_flagged_when_it_changes_by_config_validate():
    names, values = form_values(C.RunConfig())
    assert train_tab.form_check_md(names, values) == ""
    values[names.index("train.lr")] = -1
    text = train_tab.form_check_md(names, values)
    assert "learning rate must be &gt; 0, got -1" in text and "Fix:" in text


class _Session:
    def __init__(self, loaded: bool):
        self.loaded = loaded

    def has_loaded(self, run, checkpoint=None):
        return self.loaded

    def load_run(self, run, checkpoint=None):
        self.loaded = True
        return "name"

    def stream(self, msgs, settings, adapter=None):
        yield "hello"


@pytest.mark.parametrize("loaded", [False, True])
def test_loading_the_model_shows_only_while_it_loads(monkeypatch, loaded):
    monkeypatch.setattr(chat_tab, "SESSION", _Session(loaded))
    right = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    shown = [r[-1]["content"] for _, r in chat_tab.reply("hi", [], right, "r1", chat_tab.FINAL, chat_tab.FINAL,
                                                          chat_tab.MODES[1])]
    assert (chat_tab.LOADING in shown) is (not loaded)
    assert shown[-1] == "hello"
