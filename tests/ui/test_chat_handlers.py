"""Handler-level tests for the Chat page, on a finished tiny-model run."""

import gradio as gr
import pytest

from ui import chat_tab


@pytest.fixture
def tiny_run(garage_home, tiny_model_dir):
    from tests.helpers.runs import make_run

    make_run(garage_home, tiny_model_dir, run_id="tiny-run", checkpoints={3: True, 5: False},
             data={"source": "builtin:demo-identity"})
    return "tiny-run"


def _send(prompt, left, right, run_id, ck_a, ck_b, mode, *gen):
    """What Send does: start_turn, then (on success) reply; -> the list of (left, right) states shown."""
    message, left, right = chat_tab.start_turn(prompt, left, right, run_id, mode)
    return [(left, right)] + list(chat_tab.reply(message, left, right, run_id, ck_a, ck_b, mode, *gen))


def test_runs_checkpoints_and_eval_prompts_are_listed(tiny_run):
    assert chat_tab.run_choices() == [tiny_run]
    assert chat_tab.default_run() == tiny_run
    assert chat_tab.checkpoint_choices(tiny_run) == ["final adapter", "checkpoint 3"]  # unmarked 5 is not offered
    pick = chat_tab.on_run(tiny_run)
    assert pick.note == ""  # the tiny model has a chat template of its own
    assert pick.ck_a["value"] == "final adapter" and pick.ck_b["value"] == "checkpoint 3"
    assert pick.examples["visible"] and len(pick.examples["choices"]) >= 10


def test_the_message_shows_before_any_model_loads(tiny_run):
    chat_tab.SESSION.unload()
    message, left, right = chat_tab.start_turn("  Who are you? ", [], [], tiny_run, chat_tab.MODES[0])
    assert message == "Who are you?" and chat_tab.SESSION.base is None  # nothing loaded yet
    turn = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": ""}]
    assert left == right == turn
    _, left, right = chat_tab.start_turn("hi", [], [], tiny_run, chat_tab.MODES[1])
    assert left == [] and right[-1] == {"role": "assistant", "content": ""}  # adapter only: the right window
    assert chat_tab.undo_turn(turn, "Who are you?") == []  # a failed reply gives the message back


def test_side_by_side_streams_and_never_shows_a_blank_bubble(tiny_run):
    gen = ("", 12, 0.0, 1.0, 1.0, 0)
    updates = _send("Who are you?", [], [], tiny_run, "final adapter", None, chat_tab.MODES[0], *gen)
    assert len(updates) >= 3  # streamed, not one final answer
    left, right = updates[-1]
    assert [m["role"] for m in left] == [m["role"] for m in right] == ["user", "assistant"]
    assert left[-1]["content"].strip() and right[-1]["content"].strip()
    assert left[-1]["content"] != right[-1]["content"]  # the adapter changes the answer


def test_checkpoint_a_vs_b_and_adapter_only(tiny_run):
    gen = ("", 6, 0.0, 1.0, 1.0, 0)
    *_, (left, right) = _send("hi", [], [], tiny_run, "checkpoint 3", "final adapter", chat_tab.MODES[2], *gen)
    assert left[-1]["role"] == right[-1]["role"] == "assistant"
    *_, (left, right) = _send("hi", [], [], tiny_run, "final adapter", None, chat_tab.MODES[1], *gen)
    assert left == [] and right[-1]["content"]


def test_user_errors_are_messages():
    with pytest.raises(gr.Error, match="Type a message"):
        chat_tab.start_turn("  ", [], [], "x", chat_tab.MODES[0])
    with pytest.raises(gr.Error, match="No trained run"):
        chat_tab.start_turn("hi", [], [], None, chat_tab.MODES[0])


def test_chat_replies_queue_one_at_a_time_from_either_trigger():
    """Several browsers: one chat reply runs at a time (the others wait in Gradio's queue, which shows each its
    position, rather than fail on a busy model), from either trigger (Send or Enter) sharing the one slot.
    bench/app_load.py measures it under 20 clients."""
    from ui.layout import build_app

    replies = [f for f in build_app().fns.values() if f.name == "_reply"]
    assert len(replies) == 2 and {(f.concurrency_limit, f.concurrency_id) for f in replies} == {(1, "chat-reply")}
