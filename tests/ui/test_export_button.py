"""The Train page's "Export to GGUF / Ollama" button: shown from the run folder's truth (an ended run with its final
adapter), and its click opens the Train page's own export panel on that run, its folder filled."""

import shutil
import time

import gradio as gr
import pytest

from core import config as C
from core.runs import folder as runs
from tests.helpers.runs import make_run
from ui import export_panel, run_view, runs_tab, train_tab


def _visible(update) -> bool:
    return bool(update.get("visible"))


def test_a_completed_run_shows_the_button_and_its_click_opens_the_export_panel(garage_home, tiny_model_dir):
    make_run(garage_home, tiny_model_dir, run_id="done-run")
    make_run(garage_home, tiny_model_dir, run_id="other-run", seed=2)
    r = run_view.refresh("done-run", {})
    assert _visible(r["export_btn"]) and _visible(r["chat_btn"])
    assert not _visible(r["resume_btn"])

    named = train_tab.open_export("done-run")
    assert set(named) == {"accordion", "folder", "adapter"}
    assert named["adapter"]["value"] == "final adapter" and named["adapter"]["choices"] == ["final adapter"]
    assert isinstance(named["accordion"], gr.Accordion) and named["accordion"].open is True
    assert named["accordion"].visible is True
    assert named["folder"] == export_panel.default_folder("done-run")
    assert named["folder"] == str(garage_home / "exports" / "done-run-gguf")


def test_a_running_run_hides_the_button_even_with_an_old_adapter(garage_home, tiny_model_dir):
    run_dir = make_run(garage_home, tiny_model_dir, run_id="again")
    # resumed: training again while the previous adapter/ is still there (it is replaced at the end)
    runs.write_status(run_dir, state="running", pid=None, ended_at=None)
    r = run_view.refresh("again", {})
    assert runs.read_status(run_dir)["state"] == "running"
    assert not _visible(r["export_btn"]) and r["keep"]
    with pytest.raises(gr.Error, match="is still running: export it once it has ended"):
        train_tab.open_export("again")


def test_a_failed_run_without_an_adapter_hides_the_button():
    cfg = C.RunConfig()
    cfg.output.run_name = "broke"
    run_dir = runs.create(cfg)
    runs.write_status(run_dir, state="failed", error={"message": "out of memory", "hint": "smaller batch"})
    r = run_view.refresh("broke", {})
    assert not _visible(r["export_btn"]) and not _visible(r["chat_btn"])
    with pytest.raises(gr.Error, match="no final adapter"):
        train_tab.open_export("broke")


def test_stopped_with_its_adapter_shows_it_and_the_folder_on_disk_decides_each_refresh(garage_home, tiny_model_dir):
    run_dir = make_run(garage_home, tiny_model_dir, run_id="halted")
    runs.write_status(run_dir, state="stopped")  # stopping saves the adapter
    r = run_view.refresh("halted", {})
    assert _visible(r["export_btn"])
    shutil.rmtree(run_dir / "adapter")  # deleted by hand: the next refresh says so
    r = run_view.refresh("halted", r["cache"])
    assert not _visible(r["export_btn"])
    with pytest.raises(gr.Error):
        train_tab.open_export("halted")


def test_no_run_hides_the_button_and_the_click_says_so():
    assert not _visible(run_view.refresh(None, {})["export_btn"])
    with pytest.raises(gr.Error, match="No run"):
        train_tab.open_export(None)


def test_relisting_the_runs_page_sends_no_picker_value_it_keeps(garage_home, tiny_model_dir):
    """The Runs tab re-lists on select: a picker value sent back as it was read would redraw its chart for nothing
    (and undo a pick another handler made meanwhile)."""
    make_run(garage_home, tiny_model_dir, run_id="a")
    _, pick, compare = runs_tab.relist("a", ["a"])
    assert "value" not in pick and "value" not in compare and pick["choices"] == ["a"]
    _, pick, compare = runs_tab.relist("gone", ["gone"])
    assert pick["value"] == "a" and compare["value"] == ["a"]


def test_the_panel_follows_its_run_and_closes_saying_why_on_one_it_cannot_export(garage_home, tiny_model_dir):
    """Issue 24: the export panel stayed open and switched to a failed run, with the last export's result on it."""
    make_run(garage_home, tiny_model_dir, run_id="good")
    cfg = C.RunConfig()
    cfg.output.run_name = "broke"
    runs.write_status(runs.create(cfg), state="failed", error={"message": "no rows", "hint": "longer max_len"})

    ok = export_panel.follow("good")
    assert ok["status"] == "" and ok["table"].empty and list(ok["table"].columns) == export_panel.COLUMNS
    assert ok["accordion"].label == export_panel.TITLE and ok["folder"] == export_panel.default_folder("good")
    bad = export_panel.follow("broke")
    assert bad["accordion"].open is False and bad["accordion"].label.endswith("not for this run")
    assert "broke has no final adapter" in bad["status"] and "failed before saving one" in bad["status"]
    assert bad["table"].empty
    # Export pressed on the stale panel: refused with the same words, before any work
    with pytest.raises(gr.Error, match="failed before saving one"):
        list(export_panel.export("broke", "final adapter", str(garage_home / "x"), ["q8_0"], True))
    assert not (garage_home / "x").exists()
    assert "still running" in run_view.why_not_export(_running(garage_home, tiny_model_dir))


def _running(home, model_dir) -> str:
    run_dir = make_run(home, model_dir, run_id="busy", seed=3)
    runs.write_status(run_dir, state="running", pid=None, ended_at=None)
    return "busy"


def test_the_export_shows_each_phase_while_it_runs_and_clears_it_at_the_end(garage_home, tiny_model_dir, monkeypatch):
    """Issue 24: the export showed a spinner and a seconds counter for 3 minutes (gr.Progress's text is not drawn
    for a progress of None). Each phase core reports is yielded to the panel's status line, k of n included."""
    from core.gguf import export as gguf_export

    make_run(garage_home, tiny_model_dir, run_id="good")
    said = ["step 1/4: merging the adapter into the 16-bit base", "parity q8_0: prompt 2 of 3 on llama.cpp"]

    def fake_export(run_id, out_dir, quants, checkpoint, say, parity):
        for line in said:
            say(line)
            time.sleep(0.5)  # a phase that takes a while (progress.stream shows only the newest of a burst)
        return {"files": {"q8_0": {"file": "good-q8_0.gguf", "bytes": 1e6, "bits_per_weight": 8.5}}, "parity": [],
                "times_s": {"merge": 1.0}, "notes": []}

    monkeypatch.setattr(gguf_export, "export_gguf", fake_export)
    steps = list(export_panel.export("good", "final adapter", str(garage_home / "out"), ["q8_0"], True))
    lines = [phase for phase, _, _ in steps[:-1]]
    assert all(any(s in line for line in lines) for s in said), lines
    assert steps[-1][0] == "" and "good-q8_0.gguf" in steps[-1][1]  # the phase line goes when the result comes

    def broken(run_id, out_dir, quants, checkpoint, say, parity):
        say("step 2/4: converting")
        raise gguf_export.GarageError("the converter failed", "read its log")

    monkeypatch.setattr(gguf_export, "export_gguf", broken)
    gen, seen = export_panel.export("good", "final adapter", str(garage_home / "out2"), ["q8_0"], True), []
    with pytest.raises(gr.Error, match="the converter failed"):
        for step in gen:
            seen.append(step)
    assert seen[-1][0] == ""  # no phase left on screen after the refusal
