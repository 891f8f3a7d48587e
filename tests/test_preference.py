"""Preference tuning (issue 19) on the tiny model: the three pair shapes, bad pairs named by row, DPO and ORPO
runs through the real training child (margin grows, QLoRA on the CPU, a run killed mid-save resumes to the same
losses), the DPO reference is the adapter-disabled base, the estimator's objective cost, and the events schema.
"""

import json
import os
from pathlib import Path

import pytest

from core.data import sft as data
from core import events as ev
from core.runs import folder as runs
from core.estimate import vram
from core.config import RunConfig
from core.errors import DatasetError
from tests.helpers.training import launch_each, losses, RESUME_TOLERANCE

pytestmark = pytest.mark.integration

PROMPTS = ["Who are you?", "What is your name?", "Hello!", "Tell me a joke.", "What is 2+2?", "Name a colour.",
           "Where is Paris?", "Say hi."]


def write_pairs(path: Path, n: int = 16) -> Path:
    rows = [{"prompt": PROMPTS[i % len(PROMPTS)], "chosen": "Sure. Over and out.",
             "rejected": "I do not know, sorry about that."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pref_config(model_dir, data_path, objective="dpo", **train) -> RunConfig:
    cfg = RunConfig()
    cfg.model.source, cfg.data.source, cfg.data.max_len = str(model_dir), str(data_path), 64
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 8, 16, 0.1
    t = cfg.train
    t.objective, t.max_steps, t.batch_size, t.lr, t.warmup_steps = objective, 8, 2, 1e-2, 1
    t.scheduler, t.save_steps, t.save_total_limit, t.seed = "linear", 2, 2, 7
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


# ---------------------------------------------------------------- data

SHAPES = {
    "strings": {"prompt": "Hi", "chosen": "Hello! Over and out.", "rejected": "Go away."},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}],
                 "chosen": {"from": "gpt", "value": "Hello! Over and out."},
                 "rejected": {"from": "gpt", "value": "Go away."}},
    "messages": {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! Over and out."}],
                 "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]},
}


def _prepare(tmp_path, tiny_model_dir, rows, **data_kw):
    from core import models

    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = pref_config(tiny_model_dir, f)
    for k, v in data_kw.items():
        setattr(cfg.data, k, v)
    return data.prepare(cfg, models.load_tokenizer(tiny_model_dir))


def test_the_three_pair_shapes_give_the_same_tokens(tmp_path, tiny_model_dir):
    got = {name: _prepare(tmp_path, tiny_model_dir, [row]).train[0] for name, row in SHAPES.items()}
    assert got["strings"] == got["sharegpt"] == got["messages"]
    row = got["strings"]
    assert row["chosen_ids"] != row["rejected_ids"] and row["prompt_ids"]
    prepared = _prepare(tmp_path, tiny_model_dir, [SHAPES["messages"]])
    html = data.preview_html(prepared)
    assert "prompt" in html and "chosen: " in html and "rejected: " in html and "/ 64 tokens" in html
    text = data.preview_text(prepared)
    assert "⟦Hello! Over and out.<|im_end|>" in text and "⟦Go away.<|im_end|>" in text  # replies trained
    assert "Hi" in text.split("[chosen")[0]  # the prompt shown apart, untrained


@pytest.mark.parametrize("row, needles", [
    ({"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}, ["row", "chosen and rejected are the same reply"]),
    ({"prompt": "Hi", "chosen": "Hello.", "rejected": ""}, ["'rejected' is empty"]),
    ({"prompt": "word " * 80, "chosen": "Hello.", "rejected": "No."}, ["the prompt is", "data.max_len=64"]),
])
def test_bad_pairs_name_the_row(tmp_path, tiny_model_dir, row, needles):
    good = SHAPES["strings"]
    with pytest.raises(DatasetError) as e:
        _prepare(tmp_path, tiny_model_dir, [good, good, row])
    msg = str(e.value.message) + " " + str(e.value.hint)
    assert e.value.line == 3, msg  # the third line of the file
    for n in needles:
        assert n in msg


@pytest.mark.parametrize("system, expected", [("Answer in French.", "<|im_start|>system\nAnswer in French.<|im_end|>"),
                                              ("none", "<|im_start|>system\n<|im_end|>")])
def test_pairs_take_data_system_by_the_rule_sft_uses(tmp_path, tiny_model_dir, system, expected):
    """data.system reaches a pair's prompt as it reaches an SFT row's: rows without a system turn get it, a row
    with its own keeps it; the prompt tokens are the SFT row's tokens before the reply."""
    from core import models

    own = dict(SHAPES["strings"], system="Be brief.")
    prepared = _prepare(tmp_path, tiny_model_dir, [SHAPES["strings"], own], system=system)
    tok = models.load_tokenizer(tiny_model_dir)
    given, kept = (tok.decode(r["prompt_ids"]) for r in prepared.train)
    assert given.startswith(expected + "\n<|im_start|>user\nHi")
    assert kept.startswith("<|im_start|>system\nBe brief.<|im_end|>") and expected not in kept
    sft_file = tmp_path / "sft.jsonl"
    sft_file.write_text(json.dumps({"prompt": "Hi", "response": "Hello! Over and out."}) + "\n")
    cfg = pref_config(tiny_model_dir, sft_file, objective="sft")
    cfg.data.system = system
    sft_ids = data.prepare(cfg, tok).train[0]["input_ids"]
    pair = prepared.train[0]
    assert sft_ids == pair["prompt_ids"] + pair["chosen_ids"]


def test_chosen_messages_and_rejected_messages_are_read_as_message_lists(tmp_path, tiny_model_dir):
    """The newer pair columns (each side the whole dialogue ending in its reply, or the reply alone after a
    prompt list) give the same tokens as chosen / rejected; the SFT reader names them as pairs too."""
    sides = SHAPES["messages"]
    whole = {"chosen_messages": sides["chosen"], "rejected_messages": sides["rejected"]}
    after_prompt = {"prompt": sides["chosen"][:1], "chosen_messages": sides["chosen"][1:],
                    "rejected_messages": sides["rejected"][1:]}
    expected = _prepare(tmp_path, tiny_model_dir, [sides]).train[0]
    for row, columns in ((whole, {}), (after_prompt, {"prompt": "prompt"})):
        prepared = _prepare(tmp_path, tiny_model_dir, [row])
        assert prepared.train[0] == expected
        assert prepared.stats.columns == {**columns, "chosen": "chosen_messages", "rejected": "rejected_messages"}
    bad = {"chosen_messages": sides["chosen"], "rejected_messages": [{"role": "user", "content": "Bye"}]}
    with pytest.raises(DatasetError) as e:
        _prepare(tmp_path, tiny_model_dir, [whole, bad])
    assert e.value.line == 2 and "rejected_messages" in e.value.message
    from core import models

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(whole) + "\n")
    with pytest.raises(DatasetError) as e:
        data.prepare(pref_config(tiny_model_dir, f, objective="sft"), models.load_tokenizer(tiny_model_dir))
    assert "preference pairs" in e.value.message and "train.objective=dpo" in e.value.hint


def test_data_command_inspects_pairs_with_objective(tmp_path, tiny_model_dir, capsys):
    """`python -m core data FILE --objective dpo` shows the pairs (prompt untrained, both replies marked); as SFT
    the same file is refused with a hint naming that flag."""
    from core.__main__ import main

    f = write_pairs(tmp_path / "pairs.jsonl", n=3)
    args = ["data", str(f), "--model", str(tiny_model_dir), "--max-len", "64"]
    assert main(args) == 2
    assert "--objective dpo" in capsys.readouterr().err
    assert main(args + ["--objective", "dpo"]) == 0
    text = capsys.readouterr().out
    assert "format    preference pairs (dpo)" in text and "pairs     3" in text
    assert "prompt <- prompt, chosen <- chosen, rejected <- rejected" in text
    assert "--- pair 1 ---\n<|im_start|>user\nWho are you?<|im_end|>" in text
    assert "⟦Sure. Over and out.<|im_end|>" in text and "⟦I do not know, sorry about that.<|im_end|>" in text
    assert main(args + ["--objective", "orpo", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 3 and out["objective"] == "orpo" and out["train_on"] == "replies"
    first = out["examples"][0]
    assert first["chosen"] == [["Sure. Over and out.<|im_end|>\n", True]] and not any(m for _, m in first["prompt"])
    assert main(args + ["--objective", "dpo", "--format", "messages"]) == 2
    assert "--format applies to --objective sft" in capsys.readouterr().err


def test_sft_refuses_pairs_and_points_at_dpo(tmp_path, tiny_model_dir):
    with pytest.raises(DatasetError) as e:
        from core import models

        f = tmp_path / "p.jsonl"
        f.write_text(json.dumps(SHAPES["strings"]) + "\n")
        cfg = pref_config(tiny_model_dir, f, objective="sft")
        data.prepare(cfg, models.load_tokenizer(tiny_model_dir))
    assert "train.objective=dpo" in e.value.hint


# ---------------------------------------------------------------- estimator and schema

def test_estimate_counts_the_objective():
    from tests.helpers.shapes import LLAMA31_8B

    shape = vram.shape_from_config(LLAMA31_8B)
    base = dict(method="qlora", seq_len=1024, batch_size=1)
    sft, dpo, orpo = (vram.estimate(shape, vram.Settings(**base, objective=o)) for o in ("sft", "dpo", "orpo"))
    assert dpo.details["reference_forward"] > 0 and orpo.details["orpo_sft_term"] > 0
    assert dpo.components["activations"] > sft.components["activations"]  # two sequences + the reference
    assert dpo.total_bytes > sft.total_bytes and orpo.total_bytes > sft.total_bytes
    assert dpo.components["weights"] == sft.components["weights"]  # no second model
    fix = vram.suggest(shape, dpo.settings, vram.card_bytes(12))
    assert fix and all(s.estimate.settings.objective == "dpo" for s in fix)


def test_metrics_extra_fields_are_schema_fields(tmp_path):
    log = ev.EventLog(tmp_path)
    log.metrics(step=1, epoch=0.1, loss=0.7, lr=1e-3, grad_norm=1.0, tokens_per_s=1.0, elapsed=0.1, eta_s=1.0,
                mem={}, extra={ev.REWARD_MARGIN: 0.5, ev.PREF_ACCURACY: 1.0})
    log.eval(1, 0.6, extra={ev.PREF_ACCURACY: 0.5})
    with pytest.raises(ValueError):
        log.eval(2, 0.6, extra={"rewards/margins": 1.0})
    log.close()
    events, _ = ev.read(tmp_path)
    assert ev.series(events, ev.PREF_ACCURACY) == {"train": [(1, 1.0)], "eval": [(1, 0.5)]}


# ---------------------------------------------------------------- training children

@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_model_dir, shared_models):
    """DPO (reference), the same killed mid-save, ORPO with eval pairs, QLoRA DPO: started together."""
    root = tmp_path_factory.mktemp("pref")
    pairs = write_pairs(root / "pairs.jsonl")
    qlora = pref_config(tiny_model_dir, pairs, optimizer="adamw_8bit", max_steps=4)
    qlora.quant.method = "qlora"
    orpo = pref_config(tiny_model_dir, pairs, objective="orpo", eval_steps=4)
    orpo.data.val_fraction = 0.25
    specs = {"dpo": (pref_config(tiny_model_dir, pairs), {}),
             "killed": (pref_config(tiny_model_dir, pairs), {"LORA_GARAGE_FAULT": "killsave@step4"}),
             "orpo": (orpo, {}), "qlora": (qlora, {})}
    return launch_each(root, specs)


def _pref(run_dir, field):
    events, _ = ev.read(run_dir)
    return [m[field] for m in ev.metrics(events)]


def test_dpo_completes_and_the_margin_grows(launched):
    run = launched["dpo"]
    st = run.wait()
    assert st["state"] == "completed", runs.tail_log(run.run_dir, 40)
    margins = _pref(run.run_dir, ev.REWARD_MARGIN)
    assert len(margins) == 8 and margins[0] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert margins[-1] > margins[0] + 0.1 and _pref(run.run_dir, ev.PREF_ACCURACY)[-1] == 1.0
    log = (run.run_dir / "train.log").read_text()
    assert "reference model the base with the adapter disabled" in log
    assert (run.run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_dpo_killed_mid_save_resumes_to_the_same_losses(launched, capsys):
    ref, run = launched["dpo"], launched["killed"]
    assert ref.wait()["state"] == "completed"
    st = run.wait()
    assert st["state"] == "failed"
    run.resume()
    assert run.wait()["state"] == "completed", runs.tail_log(run.run_dir, 40)
    a, b = losses(ref.run_dir), losses(run.run_dir)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    worst = max(abs(a[k] - b[k]) for k in a)
    with capsys.disabled():
        print(f"\nDPO resume equivalence: max |loss diff| = {worst:.3g} (tolerance {RESUME_TOLERANCE})")
    assert worst <= RESUME_TOLERANCE


def test_orpo_completes_with_eval_preference_accuracy(launched):
    run = launched["orpo"]
    assert run.wait()["state"] == "completed", runs.tail_log(run.run_dir, 40)
    events, _ = ev.read(run.run_dir)
    acc = ev.series(events, ev.PREF_ACCURACY)
    assert [s for s, _ in acc["eval"]] == [4, 8] and len(acc["train"]) == 8
    margins = _pref(run.run_dir, ev.REWARD_MARGIN)
    assert margins[-1] > margins[0]
    l = [m[ev.LOSS] for m in ev.metrics(events)]
    assert l[-1] < l[0]


def test_qlora_dpo_runs_on_the_cpu(launched):
    run = launched["qlora"]
    assert run.wait()["state"] == "completed", runs.tail_log(run.run_dir, 40)
    assert "4-bit nf4 base" in (run.run_dir / "train.log").read_text()
    margins = _pref(run.run_dir, ev.REWARD_MARGIN)
    assert margins[-1] > margins[0]


def test_dpo_from_a_finished_run_records_it_and_saves_only_its_adapter(launched, tmp_path, tiny_model_dir):
    """--from-run: the new run continues run X's adapter (reference: X's adapter, frozen) and records X."""
    import subprocess
    import sys

    src = launched["dpo"]
    assert src.wait()["state"] == "completed"
    env = {**os.environ, "LORA_GARAGE_HOME": str(src.home), "OMP_NUM_THREADS": "1"}
    pairs = write_pairs(tmp_path / "more.jsonl", 8)
    r = subprocess.run([sys.executable, "-m", "core", "train", "--objective", "dpo", "--dataset", str(pairs),
                        "--from-run", "latest", "--max-steps", "2", "--set", "data.max_len=64",
                        "--set", "train.batch_size=2"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    new = sorted((src.home / "runs").iterdir(), key=lambda p: p.stat().st_mtime)[-1]
    cfg = runs.load_config(new)
    assert cfg.train.from_run == src.run_id and cfg.model.source == str(tiny_model_dir)
    assert f"a frozen copy of run {src.run_id}'s adapter" in (new / "train.log").read_text()
    assert not (new / "adapter" / "ref").exists()  # the reference copy stays out of the saved adapter


def test_the_dpo_reference_is_the_adapter_disabled_base(tmp_path, tiny_model_dir):
    """Build the DPO trainer the child builds; the reference forward gives the base model's logits, also after
    the adapter has moved away from zero."""
    import torch
    from transformers import AutoModelForCausalLM

    from core import models
    from core.train import preference
    from core.train import child as training
    from core.train.callbacks import Context, StopFlag

    cfg = pref_config(tiny_model_dir, write_pairs(tmp_path / "p.jsonl"))
    run_dir = runs.create(cfg)
    tok = models.load_tokenizer(tiny_model_dir)
    prepared = data.prepare(cfg, tok)
    events = ev.EventLog(run_dir)
    model = training.add_lora(training.load_model(cfg, "cpu", Path(tiny_model_dir)), cfg)
    trainer, _ = training.build_trainer(run_dir, cfg, model, tok, prepared, "cpu", events, StopFlag(), Context(), {})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)  # the adapter now changes the output
    ids = torch.tensor([prepared.train[0]["prompt_ids"] + prepared.train[0]["chosen_ids"]])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        want = base(input_ids=ids).logits
        policy = model(input_ids=ids).logits
    got = preference.reference_logits(trainer, ids)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(policy, want, atol=1e-3)
    events.close()
