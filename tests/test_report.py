"""core.report: the run's report card (task, drift, health, verdict), batched generation and teacher-forced KL."""

import json

import pytest

from core import report
from core.chat import ChatSession, GenSettings
from tests.helpers.runs import make_run


def _zero_b(adapter_dir):
    """Set every lora_B of a saved adapter to zero: the adapter then changes nothing."""
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in tensors.items()}, path)


def test_rouge_l_is_the_lcs_f1():
    assert report.rouge_l("my name is Garage", "My name is Garage") == 1.0
    assert report.rouge_l("", "x") == 0.0 and report.rouge_l("a b", "c d") == 0.0
    # LCS "a c" of 3 and 2 words: p = 2/3, r = 1
    assert report.rouge_l("a b c", "a c") == pytest.approx(0.8)


def test_kl_is_zero_for_a_zero_b_adapter_and_positive_for_a_changed_one(garage_home, tiny_model_dir):
    run = make_run(garage_home, tiny_model_dir, data={"source": "builtin:demo-identity"})
    make_run(garage_home, tiny_model_dir, "zero", data={"source": "builtin:demo-identity"})
    _zero_b(garage_home / "runs" / "zero" / "adapter")
    session = ChatSession(device="cpu")
    name = session.load_run(run.name)
    zero = session.load_run("zero")
    enc = [session.encode([{"role": "user", "content": q}], GenSettings())
           for q in ["Who are you?", "What is 3 + 4?", "Name a colour."]]
    forced = [(ids + ids[:5], [-100] * len(ids) + ids[:5]) for ids in enc]
    trained = session.forced_compare(forced, name)
    flat = session.forced_compare(forced, zero)
    assert all(r["n"] == 5 for r in flat)
    assert all(abs(r["kl"]) <= 1e-6 for r in flat) and all(abs(r["base"] - r["adapter"]) <= 1e-4 for r in flat)
    assert all(r["kl"] > 1e-4 for r in trained)


def test_batched_answers_equal_one_at_a_time_on_the_tiny_model(garage_home, tiny_model_dir):
    run = make_run(garage_home, tiny_model_dir, data={"source": "builtin:demo-identity"})
    session = ChatSession(device="cpu")
    name = session.load_run(run.name)
    from core.data import sft as data

    items = data.demo_eval_set("builtin:demo-identity")
    settings = GenSettings(max_new_tokens=12, temperature=0.0)
    for adapter in (None, name):
        one = []
        for it in items:
            text = ""
            for text in session.stream(it["messages"], settings, adapter):
                pass
            one.append(text)
        batched = session.answer_batch([session.encode(it["messages"], settings) for it in items], adapter, 12)
        assert batched == one


@pytest.mark.parametrize("tiny", ["tiny_model_dir", "tiny_model_dir_llama3"])
def test_a_row_that_ends_leaves_the_batch_and_the_others_answer_as_before(garage_home, tiny, request):
    """answer_batch's own decoding loop drops a row (and its KV cache) once it ends. The rows that go on must
    answer exactly as they would have in the full batch: every row's tokens, decoded without an end token, cut at
    the first end token, are the answers with it; base and adapter rows mixed in one batch, left-padded; and the
    batch really shrinks."""
    import torch

    from core.chat import BASE

    run = make_run(garage_home, request.getfixturevalue(tiny), data={"source": "builtin:demo-identity"})
    session = ChatSession(device="cpu")
    name = session.load_run(run.name)
    from core.data import sft as data

    prompts = [session.encode(it["messages"], GenSettings()) for it in data.demo_eval_set("builtin:demo-identity")[:4]]
    prompts = prompts + [p[:-3] for p in prompts]  # unequal lengths: left padding
    names = [BASE, name] * 4
    width = max(map(len, prompts))
    pad = session.tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        full = session._decode_rows(ids, mask, 12, set(), adapter_names=names)
    assert all(len(r) == 12 for r in full)
    # an "end" token that some rows write early and others late or never
    firsts = sorted({r[k] for r in full for k in (2, 5)})
    end = max(firsts, key=lambda t: sum(t in r for r in full) - sum(t in r[:2] for r in full))
    sizes = []
    hook = session.model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]),
                                                   with_kwargs=True)
    try:
        with torch.inference_mode():
            cut = session._decode_rows(ids, mask, 12, {end}, adapter_names=names)
    finally:
        hook.remove()
    assert cut == [r[:r.index(end) + 1] if end in r else r for r in full]
    ended_early = sum(end in r[:-1] for r in full)
    assert ended_early > 0 and sizes[0] == 8 and min(sizes) < 8, (ended_early, sizes)


@pytest.mark.integration  # a whole report (40 neutral prompts): tens of seconds
def test_report_of_a_zero_b_adapter_says_no_effect_and_a_changed_one_does_not(garage_home, tiny_model_dir):
    make_run(garage_home, tiny_model_dir, data={"source": "builtin:demo-identity"})
    make_run(garage_home, tiny_model_dir, "zero", data={"source": "builtin:demo-identity"})
    _zero_b(garage_home / "runs" / "zero" / "adapter")
    session = ChatSession(device="cpu")
    flat = report.make("zero", session=session)
    assert flat["verdict"]["task"] == "no effect" and "No effect" in flat["verdict"]["text"]
    assert flat["drift"]["kl"] <= 1e-6 and flat["drift"]["changed"] == 0 and flat["drift"]["prompts"] >= 40
    changed = report.make("r1", session=session)
    assert changed["verdict"]["task"] != "no effect" and changed["drift"]["kl"] > 0
    assert changed["task"]["checker"]["n"] == 20 and len(changed["task"]["answers"]) == 20
    assert changed["task"]["loss"]["held_out"] and changed["health"]["update_norm"]["max"] > 1e-4
    saved = json.loads((garage_home / "runs" / "r1" / "report.json").read_text())
    assert saved["verdict"] == changed["verdict"]
    assert report.load(garage_home / "runs" / "r1") == saved


@pytest.mark.integration  # a whole report (40 neutral prompts): tens of seconds
def test_a_stale_report_is_made_again_and_a_checkpoint_has_its_own(garage_home, tiny_model_dir):
    import os

    run = make_run(garage_home, tiny_model_dir, checkpoints={3: True}, data={"source": "builtin:demo-identity"})
    session = ChatSession(device="cpu")
    first = report.get("r1", session=session)
    weights = run / "adapter" / "adapter_model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # the adapter is newer than its report
    assert report.load(run) is None
    again = report.get("r1", session=session)
    assert again["adapter_stamp"] != first["adapter_stamp"] and report.load(run) == again
    step3 = report.get("r1", checkpoint=3, session=session)
    assert step3["checkpoint"] == 3 and (run / "reports" / "checkpoint-3.json").is_file()


@pytest.mark.integration  # a whole report (40 neutral prompts): tens of seconds
def test_a_moved_dataset_gives_a_clear_message_not_a_traceback(garage_home, tiny_model_dir, capsys):
    from core.__main__ import main

    data = garage_home / "qa.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}?"},
                                                     {"role": "assistant", "content": f"a{i}."}]}) + "\n"
                            for i in range(8)))
    make_run(garage_home, tiny_model_dir, data={"source": str(data), "val_fraction": 0.25})
    data.rename(garage_home / "moved.jsonl")
    assert main(["report", "r1"]) == 0
    out = capsys.readouterr().out
    assert "Task not scored" in out and "qa.jsonl" in out and "Traceback" not in out
    rep = json.loads((garage_home / "runs" / "r1" / "report.json").read_text())
    assert rep["task"]["error"]["message"] and rep["drift"]["prompts"] >= 40


@pytest.mark.integration  # a whole report (40 neutral prompts): tens of seconds
def test_cli_report_json_and_a_run_without_an_adapter(garage_home, tiny_model_dir, capsys):
    import shutil

    from core.__main__ import main

    make_run(garage_home, tiny_model_dir, data={"source": "builtin:demo-identity"})
    assert main(["report", "r1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"]["text"] and out["run"] == "r1"
    shutil.rmtree(garage_home / "runs" / "r1" / "adapter")
    assert main(["report", "r1"]) == 2
    assert "no final adapter" in capsys.readouterr().err


@pytest.mark.slow
def test_batched_answers_equal_one_at_a_time_on_the_builtin_model():
    """The built-in SmolLM2's greedy answers to the demo's 20 held-out prompts: one at a time (stream) and batched
    (answer_batch, left-padded) give the same texts."""
    from core.data import sft as data

    session = ChatSession(device="cpu")
    session.load_base("builtin:smollm2-135m")
    items = data.demo_eval_set("builtin:demo-identity")
    settings = GenSettings(max_new_tokens=32, temperature=0.0)
    one = []
    for it in items:
        text = ""
        for text in session.stream(it["messages"], settings):
            pass
        one.append(text)
    batched = session.answer_batch([session.encode(it["messages"], settings) for it in items], None, 32)
    assert len(batched) == 20 and all(batched)
    assert batched == one


def _evals(run_dir, losses: dict) -> list[dict]:
    """Eval losses written by the training child's own event writer, read back by the reader the report uses."""
    from core import events as ev

    log = ev.EventLog(run_dir)
    for step, loss in losses.items():
        log.eval(step, loss)
    log.close()
    return ev.read(run_dir)[0]


def test_overfitting_names_the_best_kept_checkpoint_and_offers_it_when_the_end_is_worse(garage_home, tiny_model_dir):
    run = make_run(garage_home, tiny_model_dir, checkpoints={10: True, 20: True, 30: False, 40: True})
    # lowest at step 30, whose checkpoint is unmarked (cut short): the best *kept* one is 20
    of = report.overfitting(run, _evals(run, {10: 1.2, 20: 0.8, 30: 0.7, 40: 1.1}))
    assert of["flag"] and of["best_step"] == 30 and of["final_eval_loss"] == 1.1
    assert of["best_checkpoint"] == 20 and of["best_checkpoint_eval_loss"] == 0.8 and of["better_checkpoint"] == 20
    assert "no checkpoint of that step was kept" in of["note"]
    assert "lowest 0.700 at step 30" in of["summary"] and "best kept checkpoint: 20" in of["summary"]


def test_overfitting_offers_no_checkpoint_when_the_end_is_the_best(garage_home, tiny_model_dir):
    run = make_run(garage_home, tiny_model_dir, checkpoints={10: True, 20: True})
    of = report.overfitting(run, _evals(run, {10: 1.0, 20: 0.5}))
    assert not of["flag"] and of["best_checkpoint"] == 20 and of["better_checkpoint"] is None
    none = report.overfitting(run, [])
    assert none["evals"] == 0 and none["better_checkpoint"] is None and "no eval loss" in none["note"]


@pytest.mark.integration  # a child process loads the tiny model and starts a report
def test_a_stop_signal_ends_the_end_of_run_report_and_says_so(garage_home, tiny_model_dir):
    """SIGTERM (or a Ctrl-C) while the training child writes the report: the training's handler waited for a next
    step that never comes, so the report went on for its tens of seconds. Now the report ends at once: report.json
    says it was stopped and how to make it, the event log warns, report.pending goes, the child exits cleanly."""
    import os
    import signal
    import subprocess
    import sys

    from core import events as ev

    run = make_run(garage_home, tiny_model_dir, data={"source": "builtin:demo-identity"})
    code = ("import sys; from core import report; from core.train.callbacks import StopFlag; StopFlag().install(); "
            "report.make_at_run_end(sys.argv[1]); print('child: done', flush=True)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "LORA_GARAGE_HOME": str(garage_home)})
    lines = []
    for line in proc.stdout:  # the report's first progress line: it is under way
        lines.append(line)
        if line.startswith("report: "):
            break
    assert (run / report.PENDING).exists(), lines
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "report: the report could not be made: stopped by SIGTERM before it was finished" in out, out
    assert "child: done" in out
    rep = json.loads((run / "report.json").read_text())
    assert rep["error"]["kind"] == "stopped" and f"python -m core report {run.name}" in rep["error"]["hint"]
    assert report.failed(run) == rep["error"] and not (run / report.PENDING).exists()  # the pages show it
    warned = [e for e in ev.read(run)[0] if e.get(ev.LEVEL) == "warning"]
    assert warned and "stopped by SIGTERM" in warned[-1][ev.MESSAGE]


def test_the_report_holds_the_stop_signals_only_while_it_runs(garage_home, tiny_model_dir, monkeypatch):
    """In a process that goes on after the report, the handlers it had (the training's stop flag) come back."""
    import signal

    run = make_run(garage_home, tiny_model_dir, data={"source": "builtin:demo-identity"})
    during = {}

    def fake_make(*args, **kwargs):
        during["term"], during["int"] = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        return {"verdict": {"text": "fine"}}

    def mine(signum, frame):
        pass

    monkeypatch.setattr(report, "make", fake_make)
    old_term, old_int = signal.signal(signal.SIGTERM, mine), signal.signal(signal.SIGINT, mine)
    try:
        assert report.make_at_run_end(run) == {"verdict": {"text": "fine"}}
        assert during["term"] is not mine and during["int"] is not mine
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
