"""core.runs.resolve: which run ("latest"), which adapter, whether a run has one, and whether it fits a base."""

import json

import pytest

from core.runs import resolve as run_files
from core.runs import folder as runs
from core.errors import GarageError, ModelError
from tests.helpers.runs import make_run


def test_latest_is_the_newest_completed_run(garage_home, tiny_model_dir):
    with pytest.raises(GarageError, match="no completed run yet"):
        run_files.resolve_run("latest")
    make_run(garage_home, tiny_model_dir, run_id="old")
    new = make_run(garage_home, tiny_model_dir, run_id="new", seed=2)
    status = json.loads((new / "status.json").read_text())
    (new / "status.json").write_text(json.dumps({**status, "ended_at": "2025-01-02T00:00:00"}))
    failed = make_run(garage_home, tiny_model_dir, run_id="failed", seed=3)
    (failed / "status.json").write_text(json.dumps({**status, "state": "failed", "ended_at": "2025-02-01T00:00:00"}))
    assert run_files.resolve_run("latest").name == "new"
    assert run_files.resolve_run("old") == runs.get("old")


def test_adapter_names_and_what_a_run_has(garage_home, tiny_model_dir):
    assert run_files.adapter_name("my.run v2") == "my_run_v2"  # peft refuses "." in a module key
    assert run_files.adapter_name("r1", 5) == "r1-step5"
    run = make_run(garage_home, tiny_model_dir, checkpoints={3: True})
    assert run_files.has_adapter(run) and run_files.chattable(run)
    (run / "adapter" / "adapter_config.json").unlink()
    assert not run_files.has_adapter(run) and run_files.chattable(run)  # checkpoint 3 is marked COMPLETE
    (run / "checkpoints" / "checkpoint-3" / "COMPLETE").unlink()
    assert not run_files.chattable(run)


def test_an_adapter_for_another_base_is_refused(garage_home, tiny_model_dir, tiny_model_dir_llama3):
    from transformers import AutoModelForCausalLM

    run = make_run(garage_home, tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    run_files.check_adapter(base, run / "adapter", loaded_source=str(tiny_model_dir), trained_on=str(tiny_model_dir))
    with pytest.raises(ModelError, match="trained on"):
        run_files.check_adapter(base, run / "adapter", loaded_source=str(tiny_model_dir),
                                trained_on=str(tiny_model_dir_llama3))
    with pytest.raises(ModelError, match="not a PEFT adapter"):
        run_files.check_adapter(base, run, loaded_source=str(tiny_model_dir), trained_on=None)


def test_adapter_choices_list_the_final_adapter_and_each_complete_checkpoint(garage_home, tiny_model_dir):
    run = make_run(garage_home, tiny_model_dir, checkpoints={5: True, 10: False, 20: True})
    assert runs.adapter_choices(run) == ["final adapter", "checkpoint 5", "checkpoint 20"]
    assert [runs.checkpoint_of(c) for c in runs.adapter_choices(run)] == [None, 5, 20]
    assert runs.checkpoint_of(None) is None and runs.checkpoint_of("20") == 20
    assert runs.adapter_path(run, runs.checkpoint_of("checkpoint 20")) == run / "checkpoints" / "checkpoint-20"
    with pytest.raises(GarageError, match="names no adapter"):
        runs.checkpoint_of("best one")
