"""The Train page's "Export to GGUF / Ollama" button: shown from the run folder's truth (an ended run with its final
adapter), and its click opens the Train page's own export panel on that run, its folder filled."""

import shutil

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
    with pytest.raises(gr.Error, match="no final adapter"):
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
