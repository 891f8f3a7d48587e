"""Chat with an exported GGUF (issue 18): a run's exports are listed, and llama.cpp (in its child process) streams a
reply whose deltas join to the text its one-shot greedy generate gives, on the prompt the adapter's chat builds.

The q8_0 export of the tiny model's run is made once per session (llama.cpp's converter fetched into a shared tools
folder, as in test_gguf_export.py) and copied into each test's home."""

import os
import shutil
import signal

import pytest

from core.chat import GenSettings
from core.errors import GarageError
from tests.helpers.gguf import fake_export, home_with_export, needs_llama_cpp

pytestmark = pytest.mark.integration

MSGS = [{"role": "user", "content": "What is your name?"}]
GREEDY = GenSettings(max_new_tokens=24, temperature=0, repetition_penalty=1.0)


def test_a_runs_exports_are_listed_newest_first(garage_home):
    from core.gguf import chat as gguf_chat

    assert gguf_chat.list_exports("r1") == []          # no exports folder yet
    fake_export(garage_home, "r1-gguf", "r1", {"q8_0": "r1-q8_0.gguf", "f16": "r1-f16.gguf"}, 1000)
    fake_export(garage_home, "later", "r1", {"q4_k_m": "r1-q4_k_m.gguf"}, 2000)
    fake_export(garage_home, "r2-gguf", "r2", {"q8_0": "r2-q8_0.gguf"}, 3000)      # another run's
    fake_export(garage_home, "gone", "r1", {"q8_0": "gone.gguf"}, 4000)
    (garage_home / "exports" / "gone" / "gone.gguf").unlink()                        # a file deleted since
    (garage_home / "exports" / "junk").mkdir()
    (garage_home / "exports" / "junk" / "export.json").write_text("{not json")       # not one of ours
    found = gguf_chat.list_exports("r1")
    assert [e.file for e in found] == ["r1-q4_k_m.gguf", "r1-q8_0.gguf", "r1-f16.gguf"]
    assert found[0].quant == "q4_k_m" and found[0].path == garage_home / "exports" / "later" / "r1-q4_k_m.gguf"
    assert found[1].bits_per_weight == 8.5 and {e.run for e in found} == {"r1"}
    assert gguf_chat.list_exports(None) == []


def test_greedy_and_sampled_settings_map_onto_llama_cpp():
    from core.gguf import chat as gguf_chat

    greedy = gguf_chat.sampler(GREEDY)
    assert greedy.pop("seed") >= 0 and greedy == {"temperature": 0.0, "top_p": 1.0, "top_k": 1, "repeat_penalty": 1.0}
    s = GenSettings(temperature=0.7, top_p=0.8, repetition_penalty=1.1, seed=5)
    assert gguf_chat.sampler(s) == {"temperature": 0.7, "top_p": 0.8, "top_k": 50, "repeat_penalty": 1.1, "seed": 5}
    unseeded = GenSettings(temperature=0.7)
    assert len({gguf_chat.sampler(unseeded)["seed"] for _ in range(5)}) > 1   # a fresh seed per reply


@needs_llama_cpp
def test_a_streamed_reply_joins_to_the_one_shot_greedy_text(garage_home, tiny_model_dir, exported_r1):
    from core.gguf import chat as gguf_chat
    from core.chat import ChatSession

    gguf = home_with_export(garage_home, tiny_model_dir, exported_r1)
    found = gguf_chat.list_exports("r1")
    assert [(e.quant, e.path) for e in found] == [("q8_0", gguf)]
    chat = gguf_chat.GgufChat()
    try:
        states = list(chat.stream(gguf, MSGS, GREEDY))
        assert len(states) >= 2 and all(b.startswith(a) for a, b in zip(states, states[1:]))  # it grows, streamed
        ids = chat.encode(MSGS, GREEDY)
        one_shot = chat.child.ask("generate", ids=ids, max_tokens=GREEDY.max_new_tokens)
        # llama-cpp-python's one-shot create_completion (0.3.36) goes on past max_tokens while a UTF-8 character is
        # open, and the tiny model's random weights write many partial characters: so the same number of tokens
        # is asked of the stream; the deltas then join to the one-shot text exactly (greedy: no seed plays a part)
        answers = list(chat.child.stream(ids=ids, max_tokens=one_shot["tokens"], stop=[], **gguf_chat.sampler(GREEDY)))
        assert answers[-1]["done"] and answers[-1]["tokens"] == one_shot["tokens"]
        assert "".join(a.get("delta", "") for a in answers) == one_shot["text"]
        assert one_shot["text"].startswith(states[-1])    # the page's reply: the same, held to its 24 tokens
        assert chat.last["stopped"] == (one_shot["stopped"] and one_shot["tokens"] < GREEDY.max_new_tokens)
        # the prompt is token for token the one the adapter's chat builds (the run's template, system handling)
        session = ChatSession(device="cpu")
        session.load_run("r1")
        for system in ("", "You are terse."):
            s = GenSettings(system=system)
            assert chat.encode(MSGS, s) == session.encode(MSGS, s)
        pid = chat.child.proc.pid
        list(chat.stream(gguf, MSGS, GREEDY))
        assert chat.child.proc.pid == pid           # the open GGUF is kept between replies
    finally:
        chat.close()
    assert chat.child is None


@needs_llama_cpp
def test_stop_and_a_closed_reader_leave_the_child_ready(garage_home, tiny_model_dir, exported_r1):
    from core.gguf import chat as gguf_chat

    gguf = home_with_export(garage_home, tiny_model_dir, exported_r1)
    chat = gguf_chat.GgufChat()
    long = GenSettings(max_new_tokens=400, temperature=1.5, top_p=1.0, seed=3)
    try:
        replies = chat.stream(gguf, MSGS, long)
        first = next(replies)
        replies.close()                       # the page went away mid-reply: the child cancels and is in step
        assert first and chat.child.ask("tokenize", text="hi", add_bos=False)["ids"]
        states = []
        for text in chat.stream(gguf, MSGS, long):
            states.append(text)
            chat.stop()                       # the Stop button
        assert len(states) == 1
        again = list(chat.stream(gguf, MSGS, GREEDY))   # the next reply is whole and greedy again
        assert again == list(chat.stream(gguf, MSGS, GREEDY)) and again[-1]
    finally:
        chat.close()


@needs_llama_cpp
def test_picking_another_gguf_closes_the_first_and_a_crash_is_a_message(garage_home, tiny_model_dir, exported_r1):
    from core.gguf import chat as gguf_chat

    gguf = home_with_export(garage_home, tiny_model_dir, exported_r1)
    other = gguf.with_name("copy.gguf")
    shutil.copyfile(gguf, other)
    chat = gguf_chat.GgufChat()
    try:
        chat.open(gguf)
        first = chat.child.proc
        chat.open(other)
        assert first.poll() is not None and chat.path == other      # one llama.cpp child at a time
        os.kill(chat.child.proc.pid, signal.SIGSEGV)               # as llama.cpp's AMX kernels once did
        chat.child.proc.wait()
        with pytest.raises(GarageError, match=r"ended \(killed by SIGSEGV\) during 'stream' on copy.gguf"):
            list(chat.child.stream(ids=[1, 2, 3], max_tokens=8, stop=[], **gguf_chat.sampler(GREEDY)))
        states = list(chat.stream(other, MSGS, GREEDY))            # the next reply starts a new child
        assert states and chat.child.proc.poll() is None
    finally:
        chat.close()
