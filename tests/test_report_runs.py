"""The report card made by the training child at the end of real tiny runs: a learning rate of 1e-9 trains nothing and
is reported "no effect"; the normal run is not."""

import json
import time

import pytest

from tests.helpers.training import Launch, tiny_config, write_dataset

pytestmark = pytest.mark.integration


def test_lr_zero_is_reported_no_effect_and_a_normal_run_is_not(tmp_path, tiny_model_dir):
    data = write_dataset(tmp_path / "names.jsonl", n=16)
    found = {}
    for name, lr in (("zero", 1e-9), ("normal", 1e-2)):  # lr 0 is refused by validation
        cfg = tiny_config(tiny_model_dir, data, max_steps=6, lr=lr, save_steps=100)
        cfg.data.val_fraction = 0.25
        run = Launch(tmp_path / f"home-{name}", cfg)
        status = run.wait(600)
        assert status["state"] == "completed", status
        path = run.run_dir / "report.json"
        # the child marks the run completed, then writes the report (report.pending meanwhile) and exits
        deadline = time.time() + 600
        while (run.run_dir / "report.pending").exists() and time.time() < deadline:
            time.sleep(0.5)
        assert path.is_file(), "the training child writes report.json after saving the adapter"
        found[name] = json.loads(path.read_text())
        assert not (run.run_dir / "report.pending").exists()
    zero, normal = found["zero"], found["normal"]
    assert zero["verdict"]["task"] == "no effect" and "No effect" in zero["verdict"]["text"]
    assert zero["health"]["no_effect"]["flag"] and "train.lr" in zero["health"]["no_effect"]["fix"]
    assert zero["health"]["update_norm"]["max"] < 1e-6
    assert normal["verdict"]["task"] != "no effect" and not normal["health"]["no_effect"]["flag"]
    assert normal["health"]["update_norm"]["max"] > 1e-4 and normal["drift"]["kl"] > 0
    assert normal["task"]["loss"]["split"] == "eval split" and normal["task"]["loss"]["held_out"]
