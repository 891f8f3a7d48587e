"""GRPO runs through the real training child (issue 30) on a tiny model whose own lm_head lets a LoRA move what it
samples: a reward is learned at a real learning rate and not at 1e-9; a reward file that raises fails the run
naming the row and the function; beta > 0 logs a KL to the adapter-disabled base; a run killed mid-save resumes
to the same losses and rewards; QLoRA GRPO runs on the CPU; the lm_head target is refused before any run; the
adapter chats (with what it learned) and exports like any other.
"""

import os
from pathlib import Path

import pytest

from core import events as ev
from core.config import validate
from core.errors import ConfigError
from core.runs import access
from core.runs import folder as runs
from tests.helpers.grpo import E_SHARE, RAISES_ON_ROW_7, grpo_config, write_prompts, write_reward
from tests.helpers.training import launch_each, RESUME_TOLERANCE

pytestmark = pytest.mark.integration

@pytest.fixture(scope="session")
def untied_model_dir(tmp_path_factory) -> Path:
    from tests.helpers.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-untied"), tie=False)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, untied_model_dir, shared_models):
    """Started together: a learning run, the same at lr 1e-9, one killed mid-save, a raising reward file, beta > 0,
    and QLoRA."""
    root = tmp_path_factory.mktemp("grpo")
    prompts = write_prompts(root / "prompts.jsonl")
    e_share = write_reward(root / "e_share.py", E_SHARE)
    raises = write_reward(root / "raises.py", RAISES_ON_ROW_7)
    qlora = grpo_config(untied_model_dir, prompts, e_share, max_steps=3, save_steps=3)
    qlora.quant.method = "qlora"
    specs = {"learn": (grpo_config(untied_model_dir, prompts, e_share), {}),
             "still": (grpo_config(untied_model_dir, prompts, e_share, lr=1e-9), {}),
             "killed": (grpo_config(untied_model_dir, prompts, e_share), {"LORA_GARAGE_FAULT": "killsave@step8"}),
             "raises": (grpo_config(untied_model_dir, prompts, raises, max_steps=40), {}),
             "beta": (grpo_config(untied_model_dir, prompts, e_share, grpo_beta=0.1, max_steps=4), {}),
             "qlora": (qlora, {})}
    return launch_each(root, specs)


def _field(run_dir, name) -> dict[int, float]:
    events, _ = ev.read(run_dir)
    return {m[ev.STEP]: m[name] for m in ev.metrics(events) if m.get(name) is not None}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_a_real_learning_rate_raises_the_reward_and_1e9_does_not(launched, capsys):
    learn, still = launched["learn"], launched["still"]
    for run in (learn, still):
        assert run.wait(600)["state"] == "completed", runs.tail_log(run.run_dir, 40)
    a, b = _field(learn.run_dir, ev.REWARD), _field(still.run_dir, ev.REWARD)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    first, last = _mean(a[s] for s in (1, 2, 3)), _mean(a[s] for s in (10, 11, 12))
    flat_first, flat_last = _mean(b[s] for s in (1, 2, 3)), _mean(b[s] for s in (10, 11, 12))
    with capsys.disabled():
        print(f"\nGRPO e-share reward, steps 1-3 -> 10-12: lr 5e-2 {first:.3f} -> {last:.3f}; "
              f"lr 1e-9 {flat_first:.3f} -> {flat_last:.3f}")
    # measured here: 0.078 -> 0.167 against 0.048 -> 0.059; the policy settles on its best completion (entropy
    # 4.4 -> 0.03) while at 1e-9 it samples as widely as at the start
    assert last > first + 0.05 and last > flat_last + 0.05
    assert abs(flat_last - flat_first) < 0.04
    entropy, flat_entropy = _field(learn.run_dir, ev.ENTROPY), _field(still.run_dir, ev.ENTROPY)
    assert entropy[12] < 0.25 * entropy[1] and flat_entropy[12] > 0.75 * flat_entropy[1]
    events, _ = ev.read(learn.run_dir)
    m = ev.metrics(events)[-1]
    assert m[ev.REWARDS] == {"file:e_share": pytest.approx(m[ev.REWARD], abs=1e-6)}
    assert 0 < m[ev.COMPLETION_LEN] <= 8 and 0 <= m[ev.CLIPPED_RATIO] <= 1 and ev.REWARD_STD in m
    shown = [e for e in events if e["type"] == "completions"]
    assert [e[ev.STEP] for e in shown] == [4, 8, 12]
    item = shown[-1]["items"][0]
    assert item[ev.REWARDS]["file:e_share"] == pytest.approx(item[ev.REWARD], abs=1e-4)
    assert isinstance(item[ev.COMPLETION], str) and item[ev.PROMPT]
    assert (learn.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "rewards file:e_share x1" in (learn.run_dir / "train.log").read_text()


def test_a_reward_file_that_raises_fails_the_run_naming_row_and_function(launched):
    run = launched["raises"]
    st = run.wait(600)
    assert st["state"] == "failed"
    message = st["error"]["message"]
    assert "file:raises" in message and "ValueError" in message and "row 8" in message, message  # answer 7 is on line 8


def test_beta_above_zero_logs_a_kl_to_the_base(launched):
    run = launched["beta"]
    assert run.wait(600)["state"] == "completed", runs.tail_log(run.run_dir, 40)
    kl = _field(run.run_dir, ev.KL)
    assert sorted(kl) == [1, 2, 3, 4]
    assert kl[1] == pytest.approx(0.0, abs=1e-6)  # the adapter's B is zero before the first update
    assert all(v >= -1e-6 for v in kl.values()) and kl[4] > 0
    assert "reference the base with the adapter disabled" in (run.run_dir / "train.log").read_text()


def test_grpo_killed_mid_save_resumes_to_the_same_losses_and_rewards(launched, capsys):
    ref, run = launched["learn"], launched["killed"]
    assert ref.wait(600)["state"] == "completed"
    assert run.wait(600)["state"] == "failed"
    run.resume()
    assert run.wait(600)["state"] == "completed", runs.tail_log(run.run_dir, 40)
    worst = 0.0
    for name in (ev.LOSS, ev.REWARD):
        a, b = _field(ref.run_dir, name), _field(run.run_dir, name)
        assert sorted(a) == sorted(b) == list(range(1, 13)), name
        worst = max(worst, max(abs(a[k] - b[k]) for k in a))
    with capsys.disabled():
        print(f"\nGRPO resume equivalence: max |loss or reward diff| = {worst:.3g} (tolerance {RESUME_TOLERANCE})")
    assert worst <= RESUME_TOLERANCE


def test_qlora_grpo_runs_on_the_cpu(launched):
    run = launched["qlora"]
    assert run.wait(600)["state"] == "completed", runs.tail_log(run.run_dir, 40)
    assert "4-bit nf4 base" in (run.run_dir / "train.log").read_text()
    assert sorted(_field(run.run_dir, ev.REWARD)) == [1, 2, 3]


def test_lm_head_is_refused_for_grpo_before_a_run(tmp_path):
    cfg = grpo_config(tmp_path, write_prompts(tmp_path / "p.jsonl"), write_reward(tmp_path / "r.py", E_SHARE))
    cfg.lora.targets = "q_proj,v_proj,lm_head"
    with pytest.raises(ConfigError, match="remove lm_head from lora.targets"):
        validate(cfg)


def test_eval_scores_a_grpo_run_with_its_own_rewards(launched):
    from core.evaluate import evaluate
    from core.errors import GarageError
    from ui.chat_tab import reward_table

    run = launched["learn"]
    assert run.wait(600)["state"] == "completed"
    with run.environ():
        r = evaluate(run.run_id, limit=6)
        with pytest.raises(GarageError, match="no reward the app can run"):
            evaluate(run.run_id, limit=2, user_code=False)  # the app never imports the user's file
    assert r["metric"] == "reward" and r["n"] == 6 and list(r["rewards"]) == ["file:e_share"]
    for row in r["rows"]:
        for side in ("base", "adapter"):
            text = row[side]
            assert row[f"{side}_reward"] == pytest.approx(text.count("e") / max(1, len(text)))
    assert r["adapter"] > r["base"]
    assert r["base"] == pytest.approx(sum(x["base_reward"] for x in r["rows"]) / 6)
    table = reward_table(r)
    assert "file:e_share x1" in table and f"{r['adapter']:.2f}" in table


def test_the_report_of_a_grpo_run_scores_its_rewards(launched):
    from core import report
    from ui.report_view import details_html

    run = launched["learn"]
    assert run.wait(600)["state"] == "completed"
    with run.environ():
        rep = report.get(run.run_id)  # made by the child at the end of the run, or now
    rw = rep["task"]["rewards"]
    assert rw["n"] > 0 and rw["adapter"] > rw["base"] and "loss" not in rep["task"]
    assert rep["task"]["answers"][0]["base_reward"] >= 0
    gain = rw["adapter"] - rw["base"]
    assert rep["verdict"]["task"] == ("learned" if gain >= report.THRESHOLDS["learned_reward_gain"] else "unclear")
    assert f"mean reward {rw['base']:.2f} -> {rw['adapter']:.2f}" in rep["verdict"]["text"]
    lines = "\n".join(report.outline(rep))
    assert "file:e_share x1: mean" in lines and "adapter [" in lines
    assert "file:e_share x1: mean" in details_html(rep)


def test_a_grpo_adapter_chats_and_exports_like_any_other(launched, tmp_path):
    """Chat loads the GRPO run's adapter beside the base and answers with what it learned (more of the letter e than
    the base, greedy); the merged export gives the same logits as base + adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from core import export
    from core.chat import ChatSession

    run = launched["learn"]
    assert run.wait(600)["state"] == "completed"
    ask = [{"role": "user", "content": "Say something."}]
    greedy = {"max_new_tokens": 16, "temperature": 0}
    share = lambda text: text.count("e") / max(1, len(text))  # noqa: E731 - the run's own reward (E_SHARE)
    with run.environ():
        session = ChatSession(device="cpu")
        name = session.load_run(run.run_id)
        *_, adapter_reply = session.stream(ask, greedy, adapter=name)
        *_, base_reply = session.stream(ask, greedy, adapter=None)
        merged = export.merge(run.run_id, tmp_path / "merged")
    assert adapter_reply and share(adapter_reply) > share(base_reply), (adapter_reply, base_reply)
    base_dir = runs.load_config(run.run_dir).model.source
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
        b = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run.run_dir / "adapter")(
            input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-4


def test_try_rewards_samples_and_scores_in_a_child(tmp_path, untied_model_dir):
    """`python -m core rewards` (the app's Try rewards): completions of the base for the first prompts, each scored
    by every reward; the user's file runs in the child; a raising reward and a shared app are refused by name."""
    from core.commands.rewards import run_child
    from core.errors import GarageError

    prompts = write_prompts(tmp_path / "p.jsonl")
    cfg = grpo_config(untied_model_dir, prompts, write_reward(tmp_path / "e_share.py", E_SHARE))
    cfg.rewards.length_weight, cfg.rewards.length_min, cfg.rewards.length_max = 0.5, 1, 4
    heard = []
    r = run_child(cfg, prompts=2, samples=3, progress=lambda m, d=None, t=None: heard.append(m))
    assert r["weights"] == {"length": 0.5, "file:e_share": 1.0} and len(r["items"]) == 6
    assert [it["prompt"] for it in r["items"]] == ["Who are you 0?"] * 3 + ["Say a word 1?"] * 3
    for it in r["items"]:
        text = it["completion"]
        assert it["rewards"]["file:e_share"] == pytest.approx(text.count("e") / max(1, len(text)))
        assert 0 < it["tokens"] <= 8
        assert it["reward"] == pytest.approx(0.5 * it["rewards"]["length"] + it["rewards"]["file:e_share"])
    assert any(m.startswith("Sampling 3 completions") for m in heard)
    cfg.rewards.file = str(write_reward(tmp_path / "raises.py", RAISES_ON_ROW_7))
    with pytest.raises(GarageError, match="file:raises raised ValueError"):
        run_child(cfg, prompts=9, samples=1)
    os.environ[access.SHARED_ENV] = "1"
    try:
        with pytest.raises(GarageError, match="this app is shared beyond this computer"):
            run_child(cfg, prompts=1, samples=1)
    finally:
        os.environ.pop(access.SHARED_ENV)
