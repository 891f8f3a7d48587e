"""Score a run's adapter against its base model on the run's held-out data.

Where the dataset has a checker (the built-in demo data: core.data.sft.score_answer), both answer each held-out prompt
greedily (in batches) and the metric is accuracy; a GRPO run is scored by its own reward functions on held-out prompts
(reward_scores); otherwise it is perplexity on the eval split (or, with none, on the first training rows, said in
"split"). Both sides run in one ChatSession, so the base model loads once.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

from core.runs import resolve as run_files
from core.chat import ChatSession, GenSettings, message_text
from core.errors import GarageError
from core.data import sft as data
from core.data.tokenize import PackedRows
from core.runs import folder as runs
from core.train import rewards as reward_fns

def evaluate(run_id: str, checkpoint: int | None = None, session: ChatSession | None = None,
             quant: str | None = None, max_new_tokens: int = 64, limit: int = 200,
             progress: Callable[[str, int | None, int | None], None] | None = None, user_code: bool = True) -> dict:
    """Score base vs adapter on the run's held-out data: the dataset's checker if it has one (accuracy), the run's
    rewards for a GRPO run (metric "reward"), else perplexity on the eval split (or, with none, on the first
    training rows: said in "split"). `progress(message, done, total)` hears loading and each prompt or example
    scored (k of n). user_code=False (the app) leaves a GRPO run's reward file out, and says so in "note"."""

    say = progress or (lambda message, done=None, total=None: None)
    session = session or ChatSession()
    run_dir = run_files.resolve_run(run_id)
    say("Loading the base model and the adapter", None, None)
    name = session.load_run(run_dir.name, checkpoint, quant)
    cfg = runs.load_config(run_dir)
    if cfg.train.objective == "grpo":
        return reward_scores(session, name, cfg, limit, say, user_code)
    items = data.demo_eval_set(cfg.data.source)
    if items:
        settings = GenSettings(max_new_tokens=max_new_tokens, temperature=0.0)
        items = items[:limit]
        # every prompt in left-padded batches, base and adapter rows side by side (core.chat.answer_pairs)
        prompts = [session.encode(item["messages"], settings) for item in items]
        say("Scoring prompts: base and adapter answer each", 0, len(items))
        base_all, adapted_all = session.answer_pairs(
            prompts, name, max_new_tokens,
            progress=lambda done, total: say("Scoring prompts: base and adapter answer each", done // 2, total // 2))
        rows = []
        for item, base, adapted in zip(items, base_all, adapted_all):
            rows.append({"prompt": message_text(item["messages"][-1]["content"]), "expected": item["expected"],
                         "base": base, "adapter": adapted,
                         "base_ok": bool(data.score_answer(cfg.data.source, base, item["expected"])),
                         "adapter_ok": bool(data.score_answer(cfg.data.source, adapted, item["expected"]))})
        n = len(rows)
        say("Scoring prompts: base and adapter answer each", n, n)
        return {"metric": "accuracy", "higher_is_better": True, "split": "eval", "n": n, "rows": rows,
                "base": sum(r["base_ok"] for r in rows) / n, "adapter": sum(r["adapter_ok"] for r in rows) / n}
    prepared = data.prepare(cfg, session.tokenizer, progress=lambda done, total: say("Tokenising", done, total))
    split = "eval" if prepared.eval else "train (the run has no held-out split)"
    # packed training sequences hold several examples: score the unpacked rows, one example each
    train = prepared.train.rows if isinstance(prepared.train, PackedRows) else prepared.train
    examples = (prepared.eval or train)[:limit]
    if not examples:
        raise GarageError("the run's dataset has no rows to evaluate on", "check data.source of the run")
    # teacher-forced in right-padded batches, base and adapter on each (core.chat.forced_compare)
    scored = session.forced_compare([(list(ex["input_ids"]), list(ex["labels"])) for ex in examples], name,
                                    progress=lambda done, total: say("Scoring examples: loss of base and adapter",
                                                                     done, total))
    rows = [{"base_loss": r["base"] / max(r["n"], 1), "adapter_loss": r["adapter"] / max(r["n"], 1)} for r in scored]
    tokens = max(sum(r["n"] for r in scored), 1)
    base_loss, ad_loss = (sum(r[k] for r in scored) / tokens for k in ("base", "adapter"))
    return {"metric": "perplexity", "higher_is_better": False, "split": split, "n": len(rows), "rows": rows,
            "base": math.exp(base_loss), "adapter": math.exp(ad_loss), "base_loss": base_loss, "adapter_loss": ad_loss}


def reward_scores(session: ChatSession, name: str, cfg, limit: int, say, user_code: bool = True) -> dict:
    """A GRPO run's rewards (core.train.rewards) on held-out prompts, base vs adapter, each answering greedily up to
    train.grpo_max_completion tokens: the mean weighted total ("base", "adapter"), per reward its mean and the share
    of prompts at full marks (1 or more), and the share of totals above zero. The prompts are the eval split, else
    the first training prompts (said in "split")."""
    note = ""
    if cfg.rewards.file.strip() and not user_code:
        cfg = copy.deepcopy(cfg)
        note = (f"the reward file {Path(cfg.rewards.file).name} is your own code and runs only in a training run or "
                f"on the command line (python -m core eval RUN), not in the app: scored without it")
        cfg.rewards.file = ""
    rewards = reward_fns.build(cfg)
    if not rewards:
        raise GarageError("this GRPO run has no reward the app can run", "score it on the command line: "
                          "python -m core eval RUN")
    prepared = data.prepare(cfg, session.tokenizer, progress=lambda done, total: say("Reading the prompts", done, total))
    split = "eval" if prepared.eval else "train (the run held no prompts out: set data.val_fraction or data.val_source)"
    rows = list(prepared.eval or prepared.train)[:limit]
    if not rows:
        raise GarageError("the run's dataset has no prompts to score", "check data.source of the run")
    step = "Answering held-out prompts: base and adapter"
    say(step, 0, len(rows))
    # with the generated token ids: the length reward counts them, as training counts completion_ids
    base_all, adapted_all = session.answer_pairs([list(r["prompt_ids"]) for r in rows], name,
                                                 cfg.train.grpo_max_completion, with_ids=True,
                                                 progress=lambda done, total: say(step, done // 2, total // 2))
    out_rows = []
    for r, (base, base_ids), (adapted, adapted_ids) in zip(rows, base_all, adapted_all):
        sides = {"base": reward_fns.score_prompt_row(rewards, r, base, len(base_ids)),
                 "adapter": reward_fns.score_prompt_row(rewards, r, adapted, len(adapted_ids))}
        out_rows.append({"prompt": r[reward_fns.PROMPT_TEXT], "base": base, "adapter": adapted,
                         "base_reward": sides["base"]["total"], "adapter_reward": sides["adapter"]["total"],
                         "base_rewards": sides["base"]["rewards"], "adapter_rewards": sides["adapter"]["rewards"]})
    n = len(out_rows)
    say(step, n, n)
    per = {rw.name: {side: {"mean": sum(x[f"{side}_rewards"][rw.name] for x in out_rows) / n,
                            "full": sum(x[f"{side}_rewards"][rw.name] >= 1.0 for x in out_rows) / n}
                     for side in ("base", "adapter")} for rw in rewards}
    return {"metric": "reward", "higher_is_better": True, "split": split, "n": n, "rows": out_rows,
            "base": sum(x["base_reward"] for x in out_rows) / n,
            "adapter": sum(x["adapter_reward"] for x in out_rows) / n,
            "above_zero": {side: sum(x[f"{side}_reward"] > 0 for x in out_rows) / n for side in ("base", "adapter")},
            "rewards": per, "weights": {rw.name: rw.weight for rw in rewards}, "note": note}
