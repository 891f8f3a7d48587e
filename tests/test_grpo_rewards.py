"""GRPO's reward presets on hand-written completions, the prompt data it reads (and refuses), and a user's reward
file: loaded, checked, failing with its row and name, refused by a shared app. No model, no training."""

import json
import os

import pytest

from core.config import RunConfig, format_pattern, require_reward
from core.data import prompts
from core.errors import ConfigError, DatasetError, RunError
from core.runs import access
from core.train import rewards as R


# ---------------------------------------------------------------- presets

@pytest.mark.parametrize("completion,want,expected", [
    ("<answer>12</answer>", "12", 1.0),
    ("<answer> 12.0 </answer>", 12, 1.0),                 # numbers as numbers
    ("<answer>1,200</answer>", "1200", 1.0),
    ("so the total is 7", "7", 1.0),                      # no tags: the last number
    ("3 apples and then 5", "3", 0.0),                    # the last number is 5
    ("<answer>13</answer> not 12", "12", 0.0),            # the tags win over a later number
    ("<answer>12 apples</answer>", "12", 1.0),            # a number inside text in the tags
    ("", "12", 0.0),                                      # empty output
    ("no number here", "12", 0.0),                        # tags missing, no number
    ("<answer>Paris.</answer>", "paris", 1.0),            # text: no case, no final full stop
    ("<answer>Lyon</answer>", "Paris", 0.0),
    ("<answer>-3</answer>", "-3.0", 1.0),
])
def test_answer_reward(completion, want, expected):
    assert R.answer_reward(completion, want) == expected


def test_format_reward_full_partial_none():
    pattern = format_pattern("answer-tags")
    assert R.format_reward("<answer>4</answer>", pattern) == 1.0
    assert R.format_reward("  <answer>4</answer>\n", pattern) == 1.0     # surrounding space is not extra text
    assert R.format_reward("The sum is <answer>4</answer>.", pattern) == 0.5
    assert R.format_reward("4", pattern) == 0.0
    assert R.format_reward("", pattern) == 0.0
    think = format_pattern("think-answer")
    assert R.format_reward("<think>2+2</think>\n<answer>4</answer>", think) == 1.0
    assert R.format_reward("<answer>4</answer>", think) == 0.0
    assert R.format_reward(r"x=4", r"x=\d") == 1.0                       # a user's own regex


def test_contains_not_contains_length():
    assert R.contains_reward("Hello THERE friend", ["hello", "there", "bye", "x"]) == 0.5
    assert R.contains_reward("", ["a"]) == 0.0
    assert R.not_contains_reward("As an AI language model", ["as an ai", "sorry"]) == 0.5
    assert R.length_reward(10, 5, 20) == 1.0
    assert R.length_reward(5, 5, 20) == 1.0
    assert R.length_reward(0, 8, 8) == 0.75       # 8 short of the range; the fall spans 2 x 16 tokens
    assert R.length_reward(100, 0, 10) == 0.0
    assert 0.0 < R.length_reward(25, 5, 20) < 1.0


def test_build_orders_and_weights_and_trl_names():
    cfg = RunConfig()
    cfg.rewards.format_weight, cfg.rewards.answer_weight, cfg.rewards.length_weight = 1.0, 2.0, 0.5
    cfg.rewards.format_regex, cfg.rewards.length_min, cfg.rewards.length_max = "answer-tags", 5, 20
    built = R.build(cfg)
    assert [(r.name, r.weight) for r in built] == [("format", 1.0), ("answer", 2.0), ("length", 0.5)]
    assert [r.__name__ for r in built] == ["format", "answer", "length"]  # TRL's metric names
    # TRL's call: lists, the dataset's columns as lists, extra keyword arguments it adds
    out = built[1](prompts=["p", "p"], completions=["<answer>4</answer>", "5"], completion_ids=[[1, 2], [3]],
                   answer=["4", "4"], row=[1, 1], trainer_state=object(), log_extra=print)
    assert out == [1.0, 0.0]
    total = R.score_all(built, "q", "<answer>4</answer>", 3, {"answer": 4})
    assert total["rewards"] == {"format": 1.0, "answer": 1.0, "length": 0.9375}  # 2 tokens short of 5
    assert total["total"] == pytest.approx(1.0 + 2.0 + 0.5 * 0.9375)


def test_a_grpo_run_needs_a_reward():
    cfg = RunConfig()
    cfg.train.objective = "grpo"
    cfg.validate()  # the form may be half filled in
    with pytest.raises(ConfigError, match="rewards: GRPO needs at least one reward"):
        require_reward(cfg)
    cfg.rewards.format_weight = 1.0
    require_reward(cfg)


@pytest.mark.parametrize("field,value,message", [
    ("train.grpo_generations", 1, "2 to 64"),
    ("train.grpo_temperature", 0.0, r"\(0, 5\]"),
    ("train.grpo_beta", -0.1, r"\[0, 10\]"),
    ("rewards.format_regex", "<answer>(", "not a valid regular expression"),
])
def test_grpo_settings_are_bounded(field, value, message):
    cfg = RunConfig()
    cfg.train.objective = "grpo"
    cfg.rewards.format_weight = 1.0
    section, name = field.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


# ---------------------------------------------------------------- data

def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prompt_shapes_and_reward_columns(tmp_path):
    text = _write(tmp_path / "t.jsonl", [{"question": "2+2?", "answer": 4, "id": "a1", "meta": {"x": 1}}])
    (row,) = prompts.read_prompts(text)
    assert row.turns == [{"role": "user", "content": "2+2?"}]
    assert row.columns == {"answer": 4, "id": "a1"}  # scalar columns by their own name; a nested one is not passed
    msgs = _write(tmp_path / "m.jsonl", [{"messages": [{"role": "system", "content": "S"},
                                                        {"role": "user", "content": "hi"}], "solution": "x"}])
    (row,) = prompts.read_prompts(msgs)
    assert [t["role"] for t in row.turns] == ["system", "user"] and row.columns == {"solution": "x"}
    share = _write(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "yo"}]}])
    assert [t["role"] for t in next(prompts.read_prompts(share)).turns] == ["user"]
    trl = _write(tmp_path / "trl.jsonl", [{"prompt": [{"role": "user", "content": "q"}], "answer": "1"}])
    assert next(prompts.read_prompts(trl)).turns == [{"role": "user", "content": "q"}]
    mapped = _write(tmp_path / "g.jsonl", [{"prompt": "q", "gold": "7"}])
    assert next(prompts.read_prompts(mapped, columns={"answer": "gold"})).columns == {"answer": "7"}


@pytest.mark.parametrize("rows,objective_named", [
    ([{"prompt": "q", "chosen": "a", "rejected": "b"}], "dpo"),
    ([{"prompt": "q", "response": "a"}], "sft"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}], "sft"),
])
def test_sft_and_preference_files_are_refused_naming_the_objective(tmp_path, rows, objective_named):
    path = _write(tmp_path / "d.jsonl", rows)
    with pytest.raises(DatasetError) as e:
        list(prompts.read_prompts(path))
    assert f"train.objective={objective_named}" in e.value.hint


def test_prompt_files_given_to_sft_or_dpo_point_to_grpo(tmp_path):
    from core.data import sft

    only = _write(tmp_path / "p.jsonl", [{"prompt": "what is 2+2?"}])
    user_last = _write(tmp_path / "u.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    for source in (only, user_last):
        for objective in ("sft", "dpo"):
            cfg = RunConfig()
            cfg.data.source, cfg.train.objective = source, objective
            with pytest.raises(DatasetError) as e:
                sft.check_fit(cfg)
            assert "grpo" in e.value.hint, (source, objective, e.value.hint)


def test_answer_column_missing_is_refused_with_the_fix(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": "q", "answer": "1"}, {"prompt": "r"}])
    cfg = RunConfig()
    cfg.data.source, cfg.train.objective, cfg.rewards.answer_weight = path, "grpo", 1.0
    with pytest.raises(DatasetError, match="row 2: the answer reward reads column 'answer'") as e:
        prompts.check_fit(cfg)
    assert "rewards.answer_column" in e.value.hint


def test_prepare_renders_with_the_generation_prompt_and_holds_out(tmp_path):
    from tests.helpers.tiny import tiny_tokenizer

    path = _write(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "answer": str(i)} for i in range(10)])
    cfg = RunConfig()
    cfg.data.source, cfg.train.objective, cfg.data.val_fraction = path, "grpo", 0.2
    cfg.rewards.answer_weight = 1.0
    prepared = prompts.prepare(cfg, tiny_tokenizer())
    assert len(prepared.train) == 8 and len(prepared.eval) == 2
    row = prepared.train[0]
    assert row["prompt"].endswith("<|im_start|>assistant\n") and row["prompt_text"].startswith("q")
    assert set(row) == {"prompt", "prompt_ids", "prompt_text", "row", "answer"}
    assert prepared.stats.format == "prompts (text, grpo)"
    assert "the rewards see" in prompts.preview_text(prepared.samples, 1)


# ---------------------------------------------------------------- a user's reward file

def _reward_file(tmp_path, body: str):
    path = tmp_path / "my_reward.py"
    path.write_text(body)
    return path


def test_user_reward_file_gets_prompt_completion_and_columns(tmp_path):
    path = _reward_file(tmp_path, "def reward(prompt, completion, **columns):\n"
                                  "    return float(completion == columns['answer']) + len(prompt) / 100\n")
    fn = R.load_file(str(path), 2.0)
    assert fn.name == "file:my_reward" and fn.weight == 2.0
    out = fn(prompts=["<tpl>q</tpl>"], completions=["4"], completion_ids=[[1]], answer=["4"], prompt_text=["q"],
             row=[3])
    assert out == [1.01]  # the prompt it sees is the user's text, not the rendered template


def test_user_reward_that_raises_fails_naming_row_and_function(tmp_path):
    path = _reward_file(tmp_path, "def reward(prompt, completion, **columns):\n    return 1 / 0\n")
    fn = R.load_file(str(path), 1.0)
    with pytest.raises(RunError, match=r"reward function file:my_reward raised ZeroDivisionError.*row 5"):
        fn(prompts=["p"], completions=["c"], row=[5], prompt_text=["p"])
    bad = R.load_file(str(_reward_file(tmp_path, "def reward(prompt, completion, **c):\n    return 'yes'\n")), 1.0)
    with pytest.raises(RunError, match="returned 'yes' on row 1, not a finite number"):
        bad(prompts=["p"], completions=["c"], row=[1])


@pytest.mark.parametrize("body,message", [
    ("x = 1\n", "has no function named reward"),
    ("def reward(completion):\n    return 1.0\n", "does not take"),
    ("import no_such_module_here\n", "raised ModuleNotFoundError"),
])
def test_bad_reward_files_are_refused(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        R.load_file(str(_reward_file(tmp_path, body)), 1.0)


def test_reward_file_refused_by_a_shared_app(tmp_path, monkeypatch):
    from core.runs import runner

    path = _reward_file(tmp_path, "def reward(prompt, completion, **columns):\n    return 1.0\n")
    data = _write(tmp_path / "d.jsonl", [{"prompt": "q"}])
    cfg = RunConfig()
    cfg.data.source, cfg.train.objective, cfg.rewards.file = data, "grpo", str(path)
    monkeypatch.delenv(access.SHARED_ENV, raising=False)
    access.check_config(cfg)  # on loopback: allowed
    monkeypatch.setenv(access.SHARED_ENV, "1")
    with pytest.raises(ConfigError, match="rewards.file: a reward file is Python code"):
        runner.admit(cfg)
    assert os.environ[access.SHARED_ENV] == "1"
