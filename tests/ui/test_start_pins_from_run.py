"""Start on the Train page pins train.from_run=latest to the run id, as `python -m core train --from-run latest`
does (one function for both): a run recorded as "latest" would continue another adapter on resume."""

import json

import gradio as gr
import pytest

from core import config as C
from core.runs import folder as runs
from core.runs import runner
from tests.helpers.forms import form_values
from ui import train_tab


def _finished(model: str) -> str:
    cfg = C.RunConfig()
    cfg.model.source, cfg.lora.r = model, 4
    run_dir = runs.create(cfg)
    runs.update_status(run_dir, None, state="completed", ended_at="2026-01-01T00:00:00")
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    return run_dir.name


def test_start_records_the_run_id_of_latest_and_its_lora_shape(monkeypatch):
    src = _finished(C.RunConfig().model.source)
    started = []
    monkeypatch.setattr(runner, "start", lambda cfg: started.append(cfg) or "new-run")
    cfg = C.RunConfig()
    cfg.train.objective, cfg.train.from_run, cfg.lora.r = "dpo", "latest", 16
    names, values = form_values(cfg)
    assert train_tab.start(names, values) == "new-run"
    assert started[0].train.from_run == src and started[0].lora.r == 4


def test_start_refuses_a_source_run_trained_on_another_model(monkeypatch, tmp_path):
    a, b = tmp_path / "model-a", tmp_path / "model-b"  # two local models (the built-in would be converted first)
    for m in (a, b):
        m.mkdir()
        (m / "config.json").write_text("{}")
    src = _finished(str(a))
    monkeypatch.setattr(runner, "start", lambda cfg: pytest.fail("started"))
    cfg = C.RunConfig()
    cfg.model.source, cfg.train.objective, cfg.train.from_run = str(b), "dpo", "latest"
    names, values = form_values(cfg)
    with pytest.raises(gr.Error, match=f"run {src} trained on {a}, not {b}"):
        train_tab.start(names, values)


def test_the_cli_pins_it_the_same_way():
    import argparse

    from core.commands import train as train_cmd

    src = _finished(C.RunConfig().model.source)
    p = argparse.ArgumentParser()
    train_cmd.add_arguments(p)
    cfg = train_cmd.build_config(p.parse_args(["--objective", "dpo", "--from-run", "latest"]))
    assert cfg.train.from_run == src and cfg.lora.r == 4
