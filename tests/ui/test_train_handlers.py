"""Handler-level tests: the functions behind each Train page control, called directly (no browser)."""

import json

import gradio as gr
import pytest

from core import config as C
from core import presets
from core.runs import runner
from ui import plots, train_form, train_tab
from tests.helpers.forms import form_values

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


@pytest.fixture
def llama8b(tmp_path):
    d = tmp_path / "llama-8b-config-only"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA_8B))
    return str(d)


def test_start_validates_first_and_names_the_field():
    names, values = form_values(C.apply_overrides(presets.load("cpu-demo"), ["lora.r=0"]))
    with pytest.raises(gr.Error, match="lora.r"):
        train_tab.start(names, values)


def test_second_start_is_refused_server_side_naming_the_running_run():
    lock = runner.acquire_lock("someone-elses-run")
    try:
        names, values = form_values(presets.load("cpu-demo"))
        with pytest.raises(gr.Error, match="busy: run someone-elses-run is training"):
            train_tab.start(names, values)
    finally:
        lock.close()


def test_vram_panel_shows_three_methods_and_a_verdict():
    names, values = form_values(presets.load("cpu-demo"))
    r = train_tab.vram_update("8 GB", names, values)
    for label in ("Full fine-tune", "LoRA (16-bit base)", "QLoRA (4-bit base)"):
        assert label in r.panel
    assert "fits" in r.verdict and r.suggestions == []
    assert "ETA" in r.eta and "40 steps" in r.eta


def test_vram_panel_grows_with_batch_size():
    cfg = presets.load("cpu-demo")
    small = train_tab.vram_update("8 GB", *form_values(cfg)).panel
    big = train_tab.vram_update("8 GB", *form_values(C.apply_overrides(cfg, ["train.batch_size=32"]))).panel
    assert small != big


def test_make_it_fit_suggestions_apply_to_the_form(llama8b):
    cfg = C.apply_overrides(presets.load("gpu-24gb-lora"), [f"model.source={llama8b}"])
    names, values = form_values(cfg)
    r = train_tab.vram_update("12 GB", names, values)
    verdict, suggestions = r.verdict, r.suggestions
    assert "does not fit" in verdict
    assert suggestions, "an 8B model fits 12 GB with QLoRA + checkpointing + batch 1"
    new_values = train_tab.apply_suggestion(0, suggestions, names, values)
    applied = train_form.to_config(names, new_values)
    for dotted, value in suggestions[0].changes.items():
        section, key = dotted.split(".")
        assert getattr(getattr(applied, section), key) == value
    assert "does not fit" not in train_tab.vram_update("12 GB", names, new_values).verdict
    assert len(train_tab.suggestion_buttons(suggestions)) == train_tab.N_SUGGESTIONS


def test_model_info_for_config_only_and_missing_model(llama8b, tmp_path):
    assert "LlamaForCausalLM" in train_tab.model_info_md(llama8b)
    assert "8,030 M parameters" in train_tab.model_info_md(llama8b)
    msg = train_tab.model_info_md(str(tmp_path / "nope"))
    assert "Fix" in msg and "not found" in msg


def test_inspect_dataset_good_and_bad(tiny_model_dir, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"instruction": f"say {i}", "output": f"{i}"}) for i in range(5)))
    cfg = C.apply_overrides(C.RunConfig(), [f"model.source={tiny_model_dir}", f"data.source={good}"])
    r = train_tab.inspect_page(*form_values(cfg))
    assert "5 rows" in r.summary and "alpaca" in r.summary
    assert r.histogram["visible"] is True and r.histogram["value"]["rows"].sum() == 5
    assert "lg-" in r.preview or "<span" in r.preview

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    cfg = C.apply_overrides(cfg, [f"data.source={bad}"])
    md = train_tab.inspect_page(*form_values(cfg)).summary
    assert "bad.jsonl" in md and "line 2" in md and "Fix" in md and "Traceback" not in md


def test_inspect_results_outlive_a_reload_until_the_file_changes(tiny_model_dir, tmp_path, garage_home):
    """Issue 24: Inspect's results were lost on reload while the run was not. They are kept under the data key
    (model, data settings, objective) and shown again for the same settings, not for others, and not once the
    file has changed."""
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"instruction": f"say {i}", "output": f"{i}"}) for i in range(5)))
    cfg = C.apply_overrides(C.RunConfig(), [f"model.source={tiny_model_dir}", f"data.source={good}"])
    names, values = form_values(cfg)
    assert train_tab.stored_inspection(names, values) is None  # nothing inspected yet
    r = train_tab.inspect_page(names, values)
    kept = train_tab.stored_inspection(names, values)  # what a reloaded page shows
    assert (kept.summary, kept.preview, kept.data_key, kept.tokens, kept.rows, kept.rejected) == (
        r.summary, r.preview, r.data_key, r.tokens, r.rows, None)
    assert kept.histogram["visible"] is True and kept.histogram["value"].equals(r.histogram["value"])
    assert kept.histogram["color_map"] == r.histogram["color_map"] == {"fits": train_tab.HIST_COLORS["fits"]}
    assert list((garage_home / "inspections").glob("*.json"))

    dpo = C.apply_overrides(cfg, ["train.objective=dpo"])  # the objective reads the file otherwise: not this one
    assert train_tab.data_key(dpo) != r.data_key and train_tab.stored_inspection(*form_values(dpo)) is None
    good.write_text(good.read_text() + "\n" + json.dumps({"instruction": "more", "output": "rows"}))
    assert train_tab.stored_inspection(names, values) is None  # the file changed: inspect it again

    bad = tmp_path / "bad.jsonl"  # a refusal is kept too, with its words
    bad.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    names, values = form_values(C.apply_overrides(cfg, [f"data.source={bad}"]))
    refused = train_tab.inspect_page(names, values)
    again = train_tab.stored_inspection(names, values)
    assert again.rejected == refused.rejected and "line 2" in again.rejected and again.histogram == plots.hidden()


def test_presets_apply_and_save(garage_home):
    names, values = form_values(presets.load("cpu-demo"))
    header, new_values = train_tab.apply_preset("gpu-8gb-qlora", names, values)
    assert "gpu-8gb-qlora" in header
    cfg = train_form.to_config(names, new_values)
    assert cfg.quant.method == "qlora" and cfg.model.source == "builtin:smollm2-135m"
    assert "Saved" in train_tab.save_preset("mine", names, new_values)
    assert presets.load("mine").quant.method == "qlora"
    assert "lg-badge-bad" in train_tab.save_preset("../evil", names, new_values)


def test_upload_is_kept_in_the_home(tmp_path, garage_home):
    f = tmp_path / "up.csv"
    f.write_text("prompt,completion\na,b\n")
    kept = train_tab.keep_upload(str(f))
    assert kept.startswith(str(garage_home)) and open(kept).read() == f.read_text()


def test_the_upload_box_empties_when_the_dataset_box_no_longer_holds_its_file(tmp_path, garage_home):
    """Issue 24: after a new dataset path was typed, the upload box still showed the old file."""
    import gradio as gr

    f = tmp_path / "up.csv"
    f.write_text("prompt,completion\na,b\n")
    kept = train_tab.keep_upload(str(f))
    assert train_tab.upload_follows(kept, str(f)) == gr.skip()  # the upload's own copy: the box stays
    assert train_tab.upload_follows(str(tmp_path / "other.jsonl"), str(f)) is None  # typed over: emptied
    assert train_tab.upload_follows(str(f), str(f)) is None  # the same name elsewhere is not the kept copy
    assert train_tab.upload_follows("builtin:demo-identity", None) == gr.skip()  # nothing uploaded


def test_stop_without_a_run_and_attach_with_none():
    assert train_tab.stop(None) == "No run to stop."
    assert train_tab.attach() is None


def test_attach_shows_the_newest_run_when_none_is_training(garage_home, tiny_model_dir):
    from tests.helpers.runs import make_run

    make_run(garage_home, tiny_model_dir, run_id="older")
    make_run(garage_home, tiny_model_dir, run_id="newer", seed=2)
    assert train_tab.attach() == "newer"


def test_inspect_lists_placeholders_and_fills_them_from_the_boxes(tiny_model_dir, tmp_path):
    data = tmp_path / "identity.jsonl"
    data.write_text(json.dumps({"instruction": "Who are you?", "output": "I am {{name}} by {{author}}.", "id": 1}) + "\n")
    cfg = C.apply_overrides(C.RunConfig(), [f"model.source={tiny_model_dir}", f"data.source={data}"])
    names, values = form_values(cfg)
    names, values = names + ["data.fill"], values + [{}]
    r = train_tab.inspect_page(names, values)
    md, preview, found, boxes = r.summary, r.preview, r.placeholders, r.fill_boxes
    assert found == ["name", "author"] and "columns not used for training: id" in md
    assert "`{{name}}` in 1 rows: **not filled**" in md and "{{name}}" in preview
    assert [b["visible"] for b in boxes] == [True, True, False, False] and boxes[1]["label"] == "fill {{author}}"
    fill = train_tab.fill_from_boxes(found, "Garage", "  ", "", "")
    assert fill == {"name": "Garage"}
    r = train_tab.inspect_page(names, values[:-1] + [fill])
    md, preview, boxes = r.summary, r.preview, r.fill_boxes
    assert "`{{name}}` in 1 rows: filled with “Garage”" in md and "I am Garage by {{author}}." in preview
    assert boxes[0]["value"] == "Garage"


def test_inspect_says_how_tool_calls_are_rendered_and_refuses_preference_pairs(tiny_model_dir, tmp_path):
    from tests.helpers.data import PREFERENCE, SHAREGPT_TOOLS

    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(SHAREGPT_TOOLS) + "\n")
    cfg = C.apply_overrides(C.RunConfig(), [f"model.source={tiny_model_dir}", f"data.source={data}"])
    md = train_tab.inspect_page(*form_values(cfg)).summary
    assert "format **sharegpt**" in md and "tool calls rendered as plain text" in md
    data.write_text(json.dumps(PREFERENCE[0]) + "\n")
    md = train_tab.inspect_page(*form_values(cfg)).summary
    assert "preference pairs (chosen / rejected), and train.objective is sft" in md and "train.objective=dpo" in md and "Fix" in md
