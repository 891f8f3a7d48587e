"""The run folder contract (core/runs/folder.py): no torch, no child processes."""

import json
import os

import pytest

from core.runs import folder as runs
from core.config import RunConfig
from core.errors import RunError


def _cfg(**train) -> RunConfig:
    cfg = RunConfig()
    cfg.model.source = "/models/tiny"
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_create_writes_config_status_and_events():
    run_dir = runs.create(_cfg(max_steps=7))
    assert run_dir.parent == runs.runs_dir()
    assert runs.load_config(run_dir).train.max_steps == 7
    st = runs.read_status(run_dir)
    assert st["state"] == "queued" and st["total_steps"] == 7 and st["error"] is None
    assert (run_dir / "events.jsonl").read_text() == ""
    assert runs.get(run_dir.name) == run_dir.resolve()
    assert [r["id"] for r in runs.list_runs()] == [run_dir.name]


def test_two_runs_never_share_a_folder_and_a_taken_name_is_refused():
    a, b = runs.create(_cfg()), runs.create(_cfg())
    assert a != b
    cfg = _cfg()
    cfg.output.run_name = "mine"
    runs.create(cfg)
    with pytest.raises(RunError, match="already exists"):
        runs.create(cfg)


@pytest.mark.parametrize("bad", ["../etc", "..", "a/b", "/etc/passwd", "", ".hidden", "x" * 200, "a\nb"])
def test_get_refuses_names_that_escape_or_are_not_ids(bad):
    with pytest.raises(RunError):
        runs.get(bad)


def test_get_refuses_a_symlink_pointing_outside(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.yaml").write_text("{}")
    (runs.runs_dir() / "sneaky").symlink_to(outside, target_is_directory=True)
    with pytest.raises(RunError, match="outside"):
        runs.get("sneaky")


def test_write_status_merges_fields_and_update_status_checks_the_state():
    run_dir = runs.create(_cfg())
    runs.write_status(run_dir, state="running", pid=123)
    runs.write_status(run_dir, step=5, durable=False)
    st = runs.read_status(run_dir, reconcile=False)
    assert (st["state"], st["pid"], st["step"]) == ("running", 123, 5)
    assert runs.update_status(run_dir, ("queued",), state="failed") is None  # not queued: untouched
    assert runs.update_status(run_dir, ("running",), state="stopping")["state"] == "stopping"
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]  # the atomic write left no temp file
    with pytest.raises(ValueError):
        runs.write_status(run_dir, state="exploded")


def _checkpoint(run_dir, step, complete=True):
    d = runs.checkpoints_dir(run_dir) / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    if complete:
        (d / runs.COMPLETE).write_text(json.dumps({"step": step}))
    return d


def test_only_marked_checkpoints_count_and_partial_ones_are_set_aside():
    run_dir = runs.create(_cfg())
    assert runs.latest_checkpoint(run_dir) is None
    _checkpoint(run_dir, 2)
    _checkpoint(run_dir, 10)
    _checkpoint(run_dir, 12, complete=False)
    assert [p.name for p in runs.checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-10"]  # numeric order
    assert runs.latest_checkpoint(run_dir).name == "checkpoint-10"
    moved = runs.set_aside_partial(run_dir)
    assert [p.name for p in moved] == ["partial-checkpoint-12"]
    _checkpoint(run_dir, 12, complete=False)  # cut short again at the same step: both are kept
    assert [p.name for p in runs.set_aside_partial(run_dir)] == ["partial-checkpoint-12-2"]
    assert runs.latest_checkpoint(run_dir).name == "checkpoint-10"


def test_adapter_path_final_or_checkpoint():
    run_dir = runs.create(_cfg())
    with pytest.raises(RunError, match="no final adapter"):
        runs.adapter_path(run_dir)
    _checkpoint(run_dir, 4)
    _checkpoint(run_dir, 6, complete=False)
    assert runs.adapter_path(run_dir, 4).name == "checkpoint-4"
    assert runs.adapter_path(run_dir, "checkpoint-4").name == "checkpoint-4"
    with pytest.raises(RunError, match="complete checkpoints: 4"):
        runs.adapter_path(run_dir, 6)
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    assert runs.adapter_path(run_dir) == run_dir / "adapter"


def test_fingerprint_names_what_changed(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 64}')
    (model / "model.safetensors").write_bytes(b"x" * 10)
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": []}\n')
    cfg = _cfg()
    cfg.data.source = str(data)
    before = runs.fingerprint(cfg, model, "abc")
    assert runs.compare_fingerprints(before, runs.fingerprint(cfg, model, "abc")) == []
    cfg.lora.r = 32
    data.write_text('{"messages": [1]}\n')
    problems = runs.compare_fingerprints(before, runs.fingerprint(cfg, model))  # no tokens: not compared
    assert any(p.startswith("the LoRA shape changed (r: 16 -> 32)") for p in problems)
    assert any(p.startswith("the dataset changed (files_sha256") for p in problems)
    (model / "config.json").write_text('{"hidden_size": 128}')
    assert any("base model changed" in p for p in runs.compare_fingerprints(before, runs.fingerprint(cfg, model)))


def test_tail_log_and_delete():
    run_dir = runs.create(_cfg())
    (run_dir / "train.log").write_text("".join(f"line {i}\n" for i in range(100)))
    assert runs.tail_log(run_dir, 2) == "line 98\nline 99"
    runs.delete(run_dir)
    assert not os.path.exists(run_dir)


def test_estimate_bytes_reads_the_launch_estimate(tmp_path):
    assert runs.estimate_bytes(tmp_path) is None
    (tmp_path / "estimate.json").write_text('{"total_bytes": 2048}')
    assert runs.estimate_bytes(tmp_path) == 2048
    (tmp_path / "estimate.json").write_text("{not json")
    assert runs.estimate_bytes(tmp_path) is None
