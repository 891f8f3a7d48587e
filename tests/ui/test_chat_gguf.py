"""Handler-level tests for the Chat page's GGUF pane: a run's exported GGUF answers in the left window through
llama.cpp's runtime (its own process), beside the adapter; without llama-cpp-python or without an export the page
says in one line what to do, and a failing GGUF is an error message, never an empty bubble."""

import os
import signal

import gradio as gr
import pytest

from core.gguf import chat as gguf_chat
from tests.helpers.gguf import fake_export, home_with_export, needs_llama_cpp
from ui import chat_tab

pytestmark = pytest.mark.integration

GREEDY = ("", 12, 0.0, 1.0, 1.0, 0)


def _send(prompt, left, right, run_id, mode, gguf, gen=GREEDY):
    """What Send does: start_turn, then (on success) reply; -> the list of (left, right) states shown."""
    message, left, right = chat_tab.start_turn(prompt, left, right, run_id, mode)
    return [(left, right)] + list(chat_tab.reply(message, left, right, run_id, "final adapter", None, mode, *gen,
                                                 gguf=gguf))


@pytest.fixture
def gguf_run(garage_home, tiny_model_dir, exported_r1):
    path = home_with_export(garage_home, tiny_model_dir, exported_r1)
    yield "r1", str(path)
    chat_tab.GGUF.close()


@needs_llama_cpp
def test_the_runs_gguf_is_offered_and_answers_in_the_left_window(gguf_run):
    run_id, path = gguf_run
    assert chat_tab.GGUF_MODE in chat_tab.modes()
    pick = chat_tab.on_run(run_id)
    assert pick.gguf["choices"] == [("GGUF: r1-q8_0.gguf", path)] and pick.gguf["value"] == path
    assert pick.gguf["visible"] and chat_tab.GGUF_MODE in pick.gguf_note
    in_mode = chat_tab.gguf_note(run_id, chat_tab.GGUF_MODE)  # once chosen, the note stops asking to choose it
    assert "Choose" not in in_mode and "left window answers with the exported GGUF" in in_mode
    assert chat_tab.left_label(chat_tab.GGUF_MODE, path) == "GGUF in llama.cpp: r1-q8_0.gguf"
    assert chat_tab.left_label(chat_tab.MODES[0], path) == chat_tab.LEFT

    updates = _send("Who are you?", [], [], run_id, chat_tab.GGUF_MODE, path)
    assert len(updates) >= 4       # streamed into both windows, not one final answer
    left, right = updates[-1]
    assert [m["role"] for m in left] == [m["role"] for m in right] == ["user", "assistant"]
    alone = gguf_chat.GgufChat()
    try:
        want = list(alone.stream(path, [{"role": "user", "content": "Who are you?"}],
                                 chat_tab._settings(*GREEDY)))[-1]
    finally:
        alone.close()
    assert left[-1]["content"] == (want if want.strip() else chat_tab.EMPTY_REPLY)
    assert right[-1]["content"].strip()                          # the adapter answered beside it
    assert chat_tab.GGUF.path is not None and chat_tab.GGUF.child.proc.poll() is None   # kept open for the next one

    # a second turn goes on from each window's own history
    *_, (left2, right2) = _send("And then?", left, right, run_id, chat_tab.GGUF_MODE, path)
    assert len(left2) == len(right2) == 4 and left2[-1]["content"].strip()


@needs_llama_cpp
def test_moving_to_another_run_or_gguf_ends_the_child(gguf_run, garage_home, tiny_model_dir):
    from tests.helpers.runs import make_run

    run_id, path = gguf_run
    _send("hi", [], [], run_id, chat_tab.GGUF_MODE, path)
    proc = chat_tab.GGUF.child.proc
    chat_tab.on_run(run_id)                       # the same run (the page refreshed): kept
    assert proc.poll() is None
    chat_tab.on_gguf(path)
    assert proc.poll() is None
    make_run(garage_home, tiny_model_dir, run_id="r2")
    pick = chat_tab.on_run("r2")
    proc.wait(timeout=30)
    assert chat_tab.GGUF.child is None and not pick.gguf["visible"] and "Runs page" in pick.gguf_note


@needs_llama_cpp
def test_a_failing_gguf_is_an_error_message(gguf_run, garage_home, tiny_model_dir, monkeypatch):
    from tests.helpers.runs import make_run

    run_id, path = gguf_run
    with pytest.raises(gr.Error, match="pick one of this run's GGUF exports"):
        _send("hi", [], [], run_id, chat_tab.GGUF_MODE, "/etc/passwd")   # a path from the browser is checked
    make_run(garage_home, tiny_model_dir, run_id="r2")
    with pytest.raises(gr.Error, match="run r2 has no GGUF export.*Runs page"):
        _send("hi", [], [], "r2", chat_tab.GGUF_MODE, None)
    _send("hi", [], [], run_id, chat_tab.GGUF_MODE, path)
    os.kill(chat_tab.GGUF.child.proc.pid, signal.SIGSEGV)   # llama.cpp dies (as its AMX kernels once did)
    chat_tab.GGUF.child.proc.wait()
    monkeypatch.setattr(chat_tab.GGUF, "open", lambda p: None)   # keep the dead child, to see what the page says
    with pytest.raises(gr.Error, match=r"llama.cpp's runtime ended \(killed by SIGSEGV\)"):
        _send("hi", [], [], run_id, chat_tab.GGUF_MODE, path)
    monkeypatch.delattr(chat_tab.GGUF, "open")   # the instance attribute: open() is the class's again
    *_, (left, _) = _send("hi", [], [], run_id, chat_tab.GGUF_MODE, path)   # the next message starts a new one
    assert left[-1]["content"].strip()


def test_without_llama_cpp_or_an_export_the_page_says_what_to_do(garage_home, tiny_model_dir, monkeypatch):
    from tests.helpers.runs import make_run

    make_run(garage_home, tiny_model_dir, run_id="r1")
    make_run(garage_home, tiny_model_dir, run_id="r2")
    fake_export(garage_home, "r1-gguf", "r1", {"q8_0": "r1-q8_0.gguf"}, 1000)
    monkeypatch.setattr(gguf_chat, "runtime_installed", lambda: False)
    assert chat_tab.GGUF_MODE not in chat_tab.modes()          # no control that cannot work
    pick = chat_tab.on_run("r1")
    assert not pick.gguf["visible"] and pick.gguf["choices"] == []
    note = pick.gguf_note
    assert "r1-q8_0.gguf" in note and "pip install llama-cpp-python==0.3.36" in note
    assert "Run it in Ollama / llama.cpp / LM Studio" in note and "\n" not in note
    assert "pip install llama-cpp-python" in chat_tab.on_run("r2").gguf_note
    monkeypatch.setattr(gguf_chat, "runtime_installed", lambda: True)
    pick = chat_tab.on_run("r2")
    assert not pick.gguf["visible"] and "Runs page (Export to GGUF panel)" in pick.gguf_note
    assert chat_tab.on_run("r1").gguf["choices"] == [("GGUF: r1-q8_0.gguf",
                                                       str(garage_home / "exports" / "r1-gguf" / "r1-q8_0.gguf"))]
    assert chat_tab.gguf_note(None) == ""
