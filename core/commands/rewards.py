"""`python -m core rewards`: try a GRPO run's rewards before training. The model (the base, or --from-run's adapter)
samples a few completions for the first prompts of the data, at the run's temperature and completion length, and
each is scored by every reward of the run, so a reward that never fires, or always does, shows before an hour of
training. The user's reward file is imported here, in this process (the app runs this command as a child); a shared
app refuses it (core.runs.access)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading

import yaml

from core.chat import ChatSession
from core.commands import terminal
from core.commands.train import build_config
from core.config import require_reward, validate
from core.data import sft as data
from core.errors import GarageError
from core.runs import access
from core.train import rewards as reward_fns  # the rewards; a user's file is imported only when try_rewards runs

PROMPTS, SAMPLES = 3, 2


def add_arguments(p) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="a YAML config (any subset of the sections), as for train")
    p.add_argument("--preset", metavar="NAME", help="a preset, as for train (e.g. cpu-grpo-demo)")
    p.add_argument("--model", metavar="SOURCE", help="model.source")
    p.add_argument("--dataset", metavar="SOURCE", help="data.source: prompts, with the columns the rewards read")
    p.add_argument("--from-run", metavar="RUN", help="sample from this run's adapter instead of the base")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. --set "
                   "rewards.format_weight=1 (repeatable)")
    p.add_argument("--prompts", type=int, default=PROMPTS, metavar="N", help=f"the first N prompts (default {PROMPTS})")
    p.add_argument("--samples", type=int, default=SAMPLES, metavar="K",
                   help=f"completions sampled per prompt (default {SAMPLES})")
    p.add_argument("--json", action="store_true", help="print one JSON object: the prompts, completions and rewards")


def run(args) -> int:
    for name in ("method", "max_steps", "objective"):
        setattr(args, name, None)
    cfg = build_config(args)
    cfg.train.objective = "grpo"
    validate(cfg)
    require_reward(cfg)
    progress = json_progress if args.json else terminal.bar(False)
    result = try_rewards(cfg, max(1, args.prompts), max(1, args.samples), progress=progress)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['model']}: {len(result['items'])} completions at temperature {result['temperature']}, up to "
          f"{result['max_tokens']} tokens; rewards {', '.join(result['weights'])}")
    for it in result["items"]:
        parts = ", ".join(f"{k} {v:g}" for k, v in it["rewards"].items())
        print(f"\n? {it['prompt']}\n  [{it['reward']:.2f}: {parts}] {it['completion']!r}")
    return 0


def json_progress(message: str, done: int | None = None, total: int | None = None) -> None:
    """--json: progress as one JSON object a line on stderr (what run_child reads back)."""
    print(json.dumps({"progress": message, "done": done, "total": total}), file=sys.stderr, flush=True)


def run_child(cfg, prompts: int = PROMPTS, samples: int = SAMPLES, progress=None, timeout_s: float = 1800) -> dict:
    """try_rewards in a child process (`python -m core rewards --config ... --json`), as the app runs it: the user's
    reward file is imported there, never in the app. `progress(message, done, total)` hears the child's phases.
    A refusal or failure in the child raises GarageError with the child's own message and fix."""
    say = progress or (lambda message, done=None, total=None: None)
    with tempfile.TemporaryDirectory(prefix="lg-rewards-") as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
        argv = [sys.executable, "-m", "core", "rewards", "--config", path, "--json", "--prompts", str(prompts),
                "--samples", str(samples)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        other: list[str] = []
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            for line in proc.stderr:
                try:
                    item = json.loads(line)
                except ValueError:
                    other.append(line.rstrip())
                    continue
                if isinstance(item, dict) and "progress" in item:
                    say(item["progress"], item.get("done"), item.get("total"))
                else:
                    other.append(line.rstrip())
            out = proc.stdout.read()
            code = proc.wait()
        finally:
            timer.cancel()
    if code != 0:
        message = next((x[len("error: "):] for x in other if x.startswith("error: ")), None)
        hint = next((x[len("fix:"):].strip() for x in other if x.startswith("fix:")), None)
        if message is None:
            tail = "\n".join(other[-5:]) or f"exit code {code}"
            raise GarageError(f"trying the rewards failed: {tail}", "run python -m core rewards --config FILE to "
                              "see the whole output")
        raise GarageError(message, hint)
    return json.loads(out)


def try_rewards(cfg, prompts: int, samples: int, progress=None) -> dict:
    """{"model", "temperature", "max_tokens", "weights", "items": [{prompt, completion, rewards, reward}]}: `samples`
    completions for each of the first `prompts` prompts, scored by the run's rewards."""
    say = progress or (lambda message, done=None, total=None: None)
    rewards = reward_fns.build(cfg, allow_file=not access.shared())
    session = ChatSession()
    say("Loading the model", None, None)
    if cfg.train.from_run:
        adapter, model = session.load_run(cfg.train.from_run), f"run {cfg.train.from_run}'s adapter"
    else:
        session.load_base(cfg.model.source, trust_remote_code=cfg.model.trust_remote_code)
        adapter, model = None, f"the base {cfg.model.source}"
    rows = list(data.prepare(cfg, session.tokenizer, progress=lambda d, t: say("Reading the prompts", d, t)).train)
    rows = rows[:prompts]
    t = cfg.train
    step = f"Sampling {samples} completions for each of {len(rows)} prompts"
    say(step, 0, len(rows) * samples)
    out = session.answer_batch([list(r["prompt_ids"]) for r in rows for _ in range(samples)], adapter,
                               t.grpo_max_completion, progress=lambda d, n: say(step, d, n), with_ids=True,
                               temperature=t.grpo_temperature)
    items = []
    for k, (text, ids) in enumerate(out):
        r = rows[k // samples]
        scored = reward_fns.score_prompt_row(rewards, r, text, len(ids))
        items.append({"prompt": r[reward_fns.PROMPT_TEXT], "completion": text, "tokens": len(ids),
                      "rewards": scored["rewards"], "reward": scored["total"]})
    if progress and hasattr(progress, "done"):
        progress.done()
    return {"model": model, "temperature": t.grpo_temperature, "max_tokens": t.grpo_max_completion,
            "weights": {r.name: r.weight for r in rewards}, "items": items}
