"""Issue 16, handler level: histogram bins in length order, text datasets in chunks, the template's system prompt
explained and settable, Start refusing what Inspect refused, Resume only where it can act, the log's end without
library noise, progress reported while work runs, and no emoji a user must read."""

import json
import re

import gradio as gr
import pytest

from core import config as C
from core import events as ev
from core.runs import folder as runs
from core.data.tokenize import NO_SYSTEM, Renderer, template_system, with_system
from tests.helpers.forms import form_values
from ui import progress, run_view, train_tab

EMOJI = re.compile("[\u2600-\u27bf\U0001f300-\U0001faff\u2b00-\u2bff\ufe0f]")


def test_histogram_bins_are_in_length_order_not_text_order():
    lengths = [40, 50, 350, 360, 700, 1000]
    df = train_tab.histogram(lengths, cutoff=512, bins=20)
    starts = list(df["start"])
    assert starts == sorted(starts)
    labels = list(dict.fromkeys(df["tokens"]))
    assert labels != sorted(labels)  # as text, "1000-1049" would come before "350-399": the order is numeric
    assert set(df[df["start"] > 512]["length"]) == {train_tab.OVER}
    text = train_tab.histogram(lengths, cutoff=512, text=True)
    assert train_tab.OVER not in set(text["length"]) and train_tab.SPLIT in set(text["length"])


def test_inspect_sends_the_bin_order_to_the_chart(tiny_model_dir, tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(json.dumps({"instruction": "word " * n, "output": "ok"}) for n in (3, 40, 90, 200)))
    cfg = C.apply_overrides(C.RunConfig(), [f"model.source={tiny_model_dir}", f"data.source={f}", "data.max_len=128"])
    r = train_tab.inspect_page(*form_values(cfg))
    order = r.histogram["sort"]
    assert order == list(dict.fromkeys(r.histogram["value"]["tokens"]))
    assert [int(x.split("-")[0]) for x in order] == sorted(int(x.split("-")[0]) for x in order)


def test_text_dataset_says_it_is_cut_into_chunks(tiny_model_dir, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("\n\n".join(f"Paragraph {i}. " + "some words here " * 30 for i in range(30)))
    cfg = C.apply_overrides(C.RunConfig(), [f"model.source={tiny_model_dir}", f"data.source={f}", "data.max_len=64"])
    md = train_tab.inspect_page(*form_values(cfg)).summary
    assert "training chunks" in md and "nothing is cut off" in md
    assert "over the" not in md


def test_progress_is_reported_during_inspect(tiny_model_dir, tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(50)))
    cfg = C.apply_overrides(C.RunConfig(), [f"model.source={tiny_model_dir}", f"data.source={f}"])
    heard = []
    train_tab.inspect_page(*form_values(cfg), report=lambda *a: heard.append(a))
    assert heard[0][0] == "Loading the tokenizer"
    counts = [a for a in heard if a[0] == "Tokenising rows"]
    assert counts and counts[-1][1] == counts[-1][2] == 50


def test_progress_stream_shows_each_report_and_returns_or_raises():
    def work(report):
        report("step one", 1, 3)
        report("step two", 2, 3)
        return "done"

    gen = progress.stream(work, lambda line: {"status": line})
    seen = []
    try:
        while True:
            seen.append(next(gen)["status"])
    except StopIteration as stop:
        result = stop.value
    assert result == "done"
    assert any("step two" in s and "2 / 3" in s for s in seen)

    def broken(report):
        raise ValueError("bad file")

    with pytest.raises(ValueError, match="bad file"):
        list(progress.stream(broken, lambda line: {}))


def test_start_refuses_a_dataset_inspect_rejected(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    cfg = C.apply_overrides(C.RunConfig(), [f"model.source={tiny_model_dir}", f"data.source={bad}", "train.max_steps=2"])
    r = train_tab.inspect_page(*form_values(cfg))
    assert r.rejected and "line 2" in r.rejected
    with pytest.raises(gr.Error, match="Inspect refused this dataset: .*line 2"):
        train_tab.start(*form_values(cfg), {"key": r.data_key, "message": r.rejected})
    assert not list(runs.list_runs())  # refused before a run folder exists


def test_template_system_prompt_is_found_replaced_and_removed(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDefault helper.<|im_end|>\n"
                         "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}")
    r = Renderer(tok)
    assert template_system(r) == "Default helper."
    user = [{"role": "user", "content": "hi"}]
    assert "Default helper." in r.render(user)
    assert "You are Garage." in Renderer(tok, "You are Garage.").render(
        Renderer(tok, "You are Garage.").for_template(user)[0])
    assert "Default helper." not in r.render(with_system(user, NO_SYSTEM))
    own = [{"role": "system", "content": "mine"}] + user
    assert with_system(own, "other") == own  # a row's own system turn is data: kept
    cfg = C.apply_overrides(C.RunConfig(), [f"model.source={tiny_model_dir}"])
    assert "Default helper." in train_tab.system_note_md(cfg, tok)
    assert "none" in train_tab.system_note_md(C.apply_overrides(cfg, ["data.system=none"]), tok)
    assert template_system(Renderer(AutoTokenizer.from_pretrained(tiny_model_dir))) is None


def test_resume_shows_only_where_it_can_continue(tmp_path):
    run_dir = runs.create(C.RunConfig())
    assert run_view.resume_button(run_dir, {"state": "completed"})["visible"] is False
    assert run_view.resume_button(run_dir, {"state": "failed"})["visible"] is False  # no checkpoint
    ck = runs.checkpoints_dir(run_dir) / "checkpoint-3"
    ck.mkdir(parents=True)
    (ck / runs.COMPLETE).write_text("")
    up = run_view.resume_button(run_dir, {"state": "stopped"})
    assert up["visible"] is True and "continue training from step 3" in up["value"]


def test_log_view_shows_the_end_without_library_noise(tmp_path):
    run_dir = runs.create(C.RunConfig())
    (run_dir / "train.log").write_text(
        "WARNING: no CUDA GPU found\n"
        "/x/site-packages/transformers/modeling_utils.py:3303: FutureWarning: `a` is deprecated\n"
        "  warnings.warn(\n"
        "Loading weights:   0%|          | 0/272 [00:00<?, ?it/s]\rLoading weights: 100%|###| 272/272 [00:00<00:00, 1.5it/s]\n"
        + "".join(f"step {i}/100  loss 1.0 " + "x" * 300 + "\n" for i in range(1, 101)))
    view = runs.tail_log(run_dir, lines=60, hide_noise=True)
    assert "step 100/100" in view and "FutureWarning" not in view and "it/s" not in view
    assert "x" * 300 in view  # long lines whole
    assert "lines of library warnings" in view
    assert "FutureWarning" in (run_dir / "train.log").read_text()  # still in the file


def test_run_status_icons_and_marks_need_no_emoji_font():
    for state in ("queued", "running", "stopping", "stopped", "completed", "failed"):
        text = run_view.status_md("r1", {"state": state})
        assert not EMOJI.search(text) and state in text
    from ui import hardware_bar, marks

    assert not EMOJI.search(hardware_bar.render())
    assert "pass" in marks.PASS and "fail" in marks.FAIL and marks.PASS != marks.FAIL


def test_one_eta_on_both_lines_during_a_run(monkeypatch):
    run_dir = runs.create(C.RunConfig())
    runs.update_status(run_dir, None, state="running", step=2, total_steps=10)
    log = ev.EventLog(run_dir)
    for step in (1, 2):
        log.metrics(step=step, epoch=0.1, loss=1.0, lr=1e-4, grad_norm=1.0, tokens_per_s=100.0, elapsed=step * 60.0,
                    eta_s=(10 - step) * 60.0, mem={})
    log.close()
    status = runs.read_status(run_dir, reconcile=False)
    events = ev.read(run_dir)[0]
    # no process behind this hand-made run: read its status as written, at one fixed moment for both lines
    monkeypatch.setattr(runs, "read_status", lambda d, reconcile=True: status)
    monkeypatch.setattr("core.estimate.eta.time.time", lambda: events[-1][ev.T] + 30)
    bar = run_view.progress_html(status, events)
    line = train_tab.running_eta_md(run_dir.name)
    shown_bar = re.search(r"ETA (\d+ min \d+ s)", bar).group(1)
    assert shown_bar in line


def test_after_a_restart_the_form_shows_the_running_runs_settings(monkeypatch):
    cfg = C.apply_overrides(C.RunConfig(), ["train.max_steps=7", "lora.r=4", "data.system=You are Garage."])
    run_dir = runs.create(cfg)
    names, _ = form_values(C.RunConfig())
    from core.runs import runner

    monkeypatch.setattr(runner, "running", lambda: run_dir.name)
    values = dict(zip(names, train_tab.running_form(names, run_dir.name)))
    assert values["train.max_steps"] == 7 and values["lora.r"] == 4 and values["data.system"] == "You are Garage."
    monkeypatch.setattr(runner, "running", lambda: None)
    assert train_tab.running_form(names, run_dir.name) is None  # ended: the form keeps what the user has


def test_epochs_eta_comes_from_what_inspect_counted(tiny_model_dir, tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(30)))
    cfg = C.apply_overrides(C.RunConfig(), [f"model.source={tiny_model_dir}", f"data.source={f}",
                                            "train.max_steps=-1", "train.epochs=2", "train.batch_size=4"])
    names, values = form_values(cfg)
    assert "inspect the dataset" in train_tab.vram_update("detected", names, values).eta
    r = train_tab.inspect_page(names, values)
    seen = {"key": r.data_key, "tokens": r.tokens, "rows": r.rows}
    line = train_tab.vram_update("detected", names, values, seen).eta
    assert "2 epochs (15 steps)" in line and "a guess" in line
    other = C.apply_overrides(cfg, ["data.max_len=64"])  # other data settings: Inspect's counts do not apply
    assert "inspect the dataset" in train_tab.vram_update("detected", *form_values(other), seen).eta
