"""Start refuses data that does not fit the objective before any run folder exists, with Inspect's words; a
preset switch resets what the preset does not name."""

import json

import pytest

from core import config as C
from core import paths, presets
from core.data import sft as data
from core.errors import DatasetError
from core.runs import folder as runs
from core.runs import runner
from tests.helpers.forms import form_values
from ui import train_form, train_tab


def _sft_file(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(4)))
    return path


def test_start_refuses_dpo_on_an_sft_file_before_a_run_folder_exists(tmp_path):
    cfg = presets.load("cpu-dpo-demo")
    cfg.data.source = str(_sft_file(tmp_path))
    with pytest.raises(DatasetError) as start_err:
        runner.start(cfg)
    assert "a preference pair needs 'chosen'" in str(start_err.value)
    assert runs.list_runs() == [] and not list(paths.runs_dir().glob("*"))
    with pytest.raises(DatasetError) as prepare_err:  # the words Inspect and the child give (core.data.sft.prepare)
        list(data.data_pref.read_pairs(cfg.data.source))
    assert str(start_err.value) == str(prepare_err.value)


def test_start_refuses_pairs_for_sft_before_a_run_folder_exists():
    cfg = presets.load("cpu-dpo-demo")
    cfg.train.objective = "sft"
    with pytest.raises(DatasetError, match="train.objective=dpo"):
        runner.start(cfg)
    assert runs.list_runs() == []


def test_a_fitting_file_passes_the_check(tmp_path):
    cfg = presets.load("cpu-demo")
    data.check_fit(cfg)  # the built-in demo rows read as SFT
    cfg.data.source = str(_sft_file(tmp_path))
    data.check_fit(cfg)


def test_a_preset_resets_the_fields_it_does_not_name():
    dpo = {f"{s}.{k}": v for s, vals in presets.load("cpu-dpo-demo").to_dict().items() for k, v in vals.items()}
    back = {f: (now, default) for f, now, default in presets.resets("cpu-demo", dpo)}
    assert back["train.objective"] == ("dpo", "sft")
    assert "model.source" not in back  # named by cpu-demo: set, not reset
    assert presets.load("cpu-demo").train.objective == C.RunConfig().train.objective == "sft"


def test_the_train_page_switch_from_dpo_back_to_cpu_demo_resets_the_objective_and_says_so():
    names, values = form_values(presets.load("cpu-dpo-demo"))
    header, new_values = train_tab.apply_preset("cpu-demo", names, values)
    assert train_form.to_config(names, new_values).train.objective == "sft"
    assert "resets every other field to its default" in header and "`train.objective` dpo → sft" in header
