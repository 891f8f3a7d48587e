"""A Start is admitted once: runner.admit validates the settings, checks what a shared app may read and the bounds
that need the model and the data, for the Start button and every way of `python -m core train` alike."""

import pytest

from core.__main__ import main as cli
from core.config import RunConfig
from core.errors import ConfigError
from core.estimate import limits
from core.runs import access, runner
from core.runs import folder as runs
from tests.helpers.forms import form_values
from tests.helpers.training import tiny_config, write_dataset
from ui import train_tab


@pytest.fixture
def counted(monkeypatch):
    """{check: calls} for the three checks; runs start no process (the spawn and the training are stubbed)."""
    calls = {"validate": 0, "access": 0, "limits": 0}

    def counting(name, real):
        def wrapper(*a, **k):
            calls[name] += 1
            return real(*a, **k)
        return wrapper

    monkeypatch.setattr(RunConfig, "validate", counting("validate", RunConfig.validate))
    monkeypatch.setattr(access, "check_config", counting("access", access.check_config))
    monkeypatch.setattr(limits, "check", counting("limits", limits.check))
    monkeypatch.setattr(runner, "_spawn", lambda run_dir, fd: None)
    return calls


def test_the_start_button_admits_once(counted, tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, write_dataset(tmp_path / "d.jsonl"))
    names, values = form_values(cfg)
    assert train_tab.start(names, values)
    assert counted == {"validate": 1, "access": 1, "limits": 1}


def test_train_detach_admits_once(counted, tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "d.jsonl")
    assert cli(["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--detach"]) == 0
    assert counted == {"validate": 1, "access": 1, "limits": 1}


def test_train_in_the_foreground_admits_once(counted, tiny_model_dir, tmp_path, monkeypatch):
    from core.train import child  # heavy

    monkeypatch.setattr(child, "main", lambda run_dir, **lock: 0)
    data = write_dataset(tmp_path / "d.jsonl")
    cli(["train", "--model", str(tiny_model_dir), "--dataset", str(data)])
    assert counted == {"validate": 1, "access": 1, "limits": 1}


def test_a_setting_beyond_the_model_is_refused_before_a_run_folder_exists(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, write_dataset(tmp_path / "d.jsonl"))
    cfg.lora.r = 100000
    with pytest.raises(ConfigError, match="lora.r"):
        runner.start(cfg)
    assert runs.list_runs() == []
