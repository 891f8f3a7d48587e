"""Chat with an adapter on the tiny model: adapter on/off, streaming, stop, switching, refusal, compare, CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import BusyError, ConfigError, GarageError, ModelError
from tests.helpers.runs import make_run

MSGS = [{"role": "user", "content": "What is your name?"}]
GREEDY = {"max_new_tokens": 12, "temperature": 0}


@pytest.fixture
def session():
    from core.chat import ChatSession

    return ChatSession(device="cpu")


def _logits(session, adapter):
    """Next-token logits for MSGS through the session's model: with `adapter`, or with adapters disabled (None)."""
    import torch

    from core.chat import GenSettings

    ids = torch.tensor([session.encode(MSGS, GenSettings(**GREEDY))])
    with torch.no_grad():
        if adapter is None:
            with session.model.disable_adapter():
                return session.model(input_ids=ids).logits
        session.model.set_adapter(adapter)
        return session.model(input_ids=ids).logits


def _last(gen):
    out = None
    for out in gen:
        pass
    return out


def test_adapter_changes_logits_and_disabling_gives_the_base(session, garage_home, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from core.chat import GenSettings

    make_run(garage_home, tiny_model_dir)
    name = session.load_run("r1")
    on, off = _logits(session, name), _logits(session, None)
    assert (on - off).abs().max() > 1e-3
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([session.encode(MSGS, GenSettings(**GREEDY))])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, off, atol=1e-6)


def test_stream_is_incremental_and_stop_ends_it_early(session, garage_home, tiny_model_dir):
    make_run(garage_home, tiny_model_dir)
    name = session.load_run("r1")
    chunks = list(session.stream(MSGS, {"max_new_tokens": 24, "temperature": 0}, adapter=name))
    assert len(chunks) > 1 and chunks[-1] and len(chunks[-1]) > len(chunks[0])
    assert session.last_stats["new_tokens"][0] > 1 and session.last_stats["ttft_s"] is not None

    stopped = []
    for text in session.stream(MSGS, {"max_new_tokens": 500, "temperature": 1.0, "seed": 0}, adapter=name):
        stopped.append(text)
        session.stop()   # what the UI's Stop button does, here after the first token
    assert session.last_stats["new_tokens"][0] < 20

    # a consumer that walks away (Gradio cancel) stops the worker and frees the session at once
    gen = session.stream(MSGS, {"max_new_tokens": 500}, adapter=name)
    next(gen)
    gen.close()
    assert _last(session.stream(MSGS, GREEDY, adapter=name)) is not None


def test_a_failing_generation_raises_in_the_consumer(session, garage_home, tiny_model_dir, monkeypatch):
    make_run(garage_home, tiny_model_dir)
    name = session.load_run("r1")

    def boom(**kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(session.model, "generate", boom)
    with pytest.raises(RuntimeError, match="kernel exploded"):
        list(session.stream(MSGS, GREEDY, adapter=name))


def test_teacher_forced_scores_in_one_batch_equal_each_row_alone(session, garage_home, tiny_model_dir):
    """forced_compare batches rows whose replies start at different places and computes logits only from the
    batch's first label on: each row's summed loss, on each side, equals ChatSession.loss on the row alone (full
    logits), including a row labelled from its second token and a row with no label."""
    from core.chat import GenSettings

    make_run(garage_home, tiny_model_dir)
    name = session.load_run("r1")
    enc = [session.encode([{"role": "user", "content": q}], GenSettings())
           for q in ["Hi", "What is the capital of France? Tell me in a few words, please.", "Name a colour."]]
    rows = [(ids + ids[:k], [-100] * len(ids) + ids[:k]) for ids, k in zip(enc, (3, 6, 1))]
    rows += [(enc[2], [-100] + enc[2][1:]), (enc[0], [-100] * len(enc[0]))]
    got = session.forced_compare(rows, name)
    for (ids, labels), row in zip(rows, got):
        for side, adapter in (("base", None), ("adapter", name)):
            want, n = session.loss(ids, labels, adapter)
            assert row["n"] == n and row[side] == pytest.approx(want, rel=1e-5, abs=1e-5), (side, ids, row)
    assert got[-1] == {"base": 0.0, "adapter": 0.0, "kl": 0.0, "n": 0} and got[0]["kl"] > 0


def test_two_adapters_and_a_checkpoint_switch_without_reloading_the_base(session, garage_home, tiny_model_dir):
    import torch

    make_run(garage_home, tiny_model_dir, "r1", seed=1, checkpoints={5: True, 10: False})
    make_run(garage_home, tiny_model_dir, "r2", seed=2)
    a = session.load_run("r1")
    base = session.base
    first = _logits(session, a)
    b = session.load_run("r2")
    c = session.load_run("r1", checkpoint=5)
    assert session.base is base and session.info()["adapters"] == [a, b, c] == ["r1", "r2", "r1-step5"]
    assert (_logits(session, b) - first).abs().max() > 1e-3
    assert torch.equal(_logits(session, a), first)   # switching back is exact: nothing was merged or reloaded
    with pytest.raises(GarageError):
        session.load_run("r1", checkpoint=10)        # not marked COMPLETE
    # the run is resumed and saves a new final adapter: loading it again picks up the new weights
    import shutil

    shutil.rmtree(garage_home / "runs" / "r1")
    make_run(garage_home, tiny_model_dir, "r1", seed=3)
    assert session.load_run("r1") == a and session.base is base
    assert (_logits(session, a) - first).abs().max() > 1e-3


def test_a_plain_base_does_not_keep_the_last_runs_system_prompt(session, garage_home, tiny_model_dir):
    """A run trained with data.system chats with it; loading the plain base afterwards (kept in memory, as the
    same source) renders with the template's own default again, as a fresh session does."""
    from core.chat import ChatSession, GenSettings

    make_run(garage_home, tiny_model_dir, data={"system": "You are Garage."})
    settings = GenSettings(**GREEDY)
    session.load_run("r1")
    assert "You are Garage." in session.tokenizer.decode(session.encode(MSGS, settings))
    base = session.base
    session.load_base(str(tiny_model_dir))
    assert session.base is base  # kept: only the run's settings are let go
    fresh = ChatSession(device="cpu")
    fresh.load_base(str(tiny_model_dir))
    assert session.encode(MSGS, settings) == fresh.encode(MSGS, settings)
    assert "You are Garage." not in session.tokenizer.decode(session.encode(MSGS, settings))


def test_an_adapter_for_another_base_is_refused(session, garage_home, tiny_model_dir, tiny_model_dir_llama3):
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.runs import folder as runs

    make_run(garage_home, tiny_model_dir, "r1")
    other = make_run(garage_home, tiny_model_dir_llama3, "other")
    session.load_run("r1")
    with pytest.raises(ModelError, match="trained on"):
        session.attach(runs.adapter_path(other), "other", trained_on=str(tiny_model_dir_llama3))
    # same claimed base, different shape (hidden 32 instead of 64): caught by the layer shapes
    small = LlamaForCausalLM(LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    liar = make_run(garage_home, tiny_model_dir, "liar", model=small)
    with pytest.raises(ModelError, match="expects size"):
        session.attach(runs.adapter_path(liar), "liar", trained_on=str(tiny_model_dir))
    assert session.info()["adapters"] == ["r1"]
    # loading the run itself brings its own base instead
    session.load_run("other")
    assert session.source == str(tiny_model_dir_llama3) and session.info()["adapters"] == ["other"]


@pytest.mark.parametrize("dora", [False, True])
def test_compare_gives_the_base_and_the_adapter_answer(session, garage_home, tiny_model_dir, dora):
    import torch

    # one thread: MKL may use fewer threads on a busy machine, which changes float sums; on a random tiny model
    # that can flip a near-tied greedy choice between the two generations this test compares (seen in CI)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_run(garage_home, tiny_model_dir, dora=dora)
        name = session.load_run("r1")
        pairs = list(session.compare(MSGS, GREEDY, adapter=name))
        assert len(pairs) > 1
        base, adapted = pairs[-1]
        # batched (LoRA) or one after the other (DoRA): the same answers as asking each alone
        assert base == _last(session.stream(MSGS, GREEDY, adapter=None))
        assert adapted == _last(session.stream(MSGS, GREEDY, adapter=name))
        assert base != adapted
    finally:
        torch.set_num_threads(threads)


def test_limits_give_messages_not_crashes(session, garage_home, tiny_model_dir, monkeypatch):
    make_run(garage_home, tiny_model_dir)
    name = session.load_run("r1")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        list(session.stream(MSGS, {"max_new_tokens": 5000}, adapter=name))
    with pytest.raises(GarageError, match="more than this model can take"):   # the tiny model's context is 512 tokens
        list(session.stream([{"role": "user", "content": "word " * 600}], GREEDY, adapter=name))
    with pytest.raises(GarageError, match="user message"):
        list(session.stream([{"role": "assistant", "content": "hi"}], GREEDY))
    import core.runs.runner

    monkeypatch.setattr(core.runs.runner, "running", lambda: "r9")
    monkeypatch.setattr(session, "device", "cuda")   # CPU chat is allowed during training, GPU chat is not
    with pytest.raises(BusyError, match="r9"):
        list(session.stream(MSGS, GREEDY, adapter=name))


def test_4bit_chat_on_cpu(session, garage_home, tiny_model_dir):
    make_run(garage_home, tiny_model_dir, quant="qlora")
    name = session.load_run("r1", quant="4bit")
    assert "4bit" in type(session.base.model.layers[0].self_attn.q_proj.base_layer).__name__.lower()
    assert _last(session.stream(MSGS, {"max_new_tokens": 4, "temperature": 0}, adapter=name)) is not None


@pytest.mark.integration
def test_cli_one_shot_prompt_with_compare(garage_home, tiny_model_dir):
    make_run(garage_home, tiny_model_dir)
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "core", "chat", "latest", "--prompt", "What is your name?",
                           "--compare", "--max-new-tokens", "8", "--temperature", "0"],
                          cwd=root, env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("base: ") and any(line.startswith("adapter: ") for line in lines[1:])


def test_cli_chat_names_a_missing_run(capsys):
    from core.__main__ import main

    assert main(["chat", "no-such-run", "--prompt", "hi"]) == 2
    assert "error:" in capsys.readouterr().err


def test_a_slow_reader_still_gets_the_final_text():
    """The streamer lets a slow reader skip to the newest state; it must not skip the final one. Here generation
    is all done before the reader looks: the queue holds every state, then the end marker (seen in CI as a reply
    one token short under load)."""
    import torch

    from core.chat import _RowsStreamer

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(ord("a") + i) for i in ids)

    streamer = _RowsStreamer(Tok(), rows=2, eos={99})
    streamer.put(torch.tensor([[7, 7, 7]]))  # the prompt, ignored
    for step in ([0, 3], [1, 99], [2, 4]):
        streamer.put(torch.tensor(step))
    streamer.end()
    seen = list(streamer)
    assert seen[-1] == ("abc", "d")  # row 2 ended at its end-of-turn token
    fast = _RowsStreamer(Tok(), rows=1, eos=set())
    fast.put(torch.tensor([[7]]))
    fast.put(torch.tensor([0]))
    it = iter(fast)
    assert next(it) == ("a",)  # a reader keeping up sees each state
    fast.put(torch.tensor([1]))
    fast.end()
    assert list(it)[-1] == ("ab",)


@pytest.fixture(scope="module")
def neox_tokenizer(tmp_path_factory):
    """The tiny NeoX's tokenizer: no <|im_end|> token, so the fallback's end marker is several plain tokens."""
    from core import models
    from core.data import tokenize as data_tokenize
    from tests.helpers.tiny_neox import build_tiny_neox

    tok = models.load_tokenizer(build_tiny_neox(tmp_path_factory.mktemp("tiny-neox")))
    assert data_tokenize.stop_strings(tok) == ["<|im_end|>"]
    return tok


def _streamed(tok, ids: list[int]) -> tuple[list[str], str]:
    """Every text a reader sees while `ids` are generated (the token limit falls after the last), and the final."""
    import torch

    from core.chat import _RowsStreamer

    streamer = _RowsStreamer(tok, 1, {tok.eos_token_id}, ["<|im_end|>"])
    streamer.put(torch.tensor([[1, 2]]))  # the prompt comes first and is skipped
    seen = []
    for t in ids:
        streamer.put(torch.tensor([t]))
        seen.append(streamer.texts[0])
    streamer.end()
    return seen, streamer.texts[0]


def test_no_part_of_a_text_end_marker_reaches_the_reader(neox_tokenizer):
    """The marker is several tokens: whichever token the limit cuts at, neither a streamed state nor the final
    reply holds a piece of it (seen as a new user: 'I am a<|im_end'). A tail that only looks like the start of
    the marker is held back until the next tokens tell, then shown."""
    tok = neox_tokenizer
    reply = "I am a"
    ids = tok(reply + "<|im_end|><|im_start|>user", add_special_tokens=False)["input_ids"]
    reply_tokens = len(tok(reply, add_special_tokens=False)["input_ids"])
    assert len(ids) - reply_tokens > 3  # the marker really is split over several tokens
    for k in range(1, len(ids) + 1):  # the token limit after k tokens
        seen, final = _streamed(tok, ids[:k])
        assert all(reply.startswith(text) for text in seen + [final]), (k, seen, final)
        if k > reply_tokens:
            assert final == reply, (k, final)
    legit = "Use <| and <|im here."
    seen, final = _streamed(tok, tok(legit, add_special_tokens=False)["input_ids"])
    assert final == legit and all(legit.startswith(text) for text in seen)
    marker = "<|im_end|>"
    assert not any(text.endswith(marker[:n]) for text in seen for n in range(1, len(marker)))  # held, then shown


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value is a thread's own on Linux only")
def test_a_cpu_reply_gives_way_to_a_training_run_in_its_own_thread_only(monkeypatch):
    import threading
    from core import chat
    from core.runs import runner

    seen = {}

    def reply_thread(name, device):
        me = threading.get_native_id()
        seen[name] = (chat.yield_to_training(device), os.getpriority(os.PRIO_PROCESS, me))

    def in_thread(name, device):
        t = threading.Thread(target=reply_thread, args=(name, device))
        t.start()
        t.join()

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    monkeypatch.setattr(runner, "running", lambda: None)
    in_thread("idle", "cpu")
    monkeypatch.setattr(runner, "running", lambda: "r1")
    in_thread("training", "cpu")
    in_thread("gpu", "cuda")
    assert seen["idle"] == (None, before)  # nothing trains: the reply keeps its priority
    assert seen["training"] == ("r1", min(19, before + chat.CHAT_NICE_WHILE_TRAINING))
    assert seen["gpu"] == (None, before)  # a GPU reply takes no CPU from the run
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # the caller's thread untouched
