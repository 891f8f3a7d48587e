"""GRPO test data shared by the training tests and the browser test: prompts with answers, reward files, a config."""

import json
from pathlib import Path

from core.config import RunConfig

WORDS = ["Who are you", "Say a word", "Hello there", "Tell me more", "What is this", "Name a thing", "Go on",
         "Write something", "Give me a line", "Talk to me"]


def write_prompts(path: Path, n: int = 40) -> Path:
    rows = [{"prompt": f"{WORDS[i % len(WORDS)]} {i}?", "answer": str(i)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_reward(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


# the share of the completion's letters that are "e": an easy, dense signal a tiny model can climb
E_SHARE = ("def reward(prompt, completion, **columns):\n"
           "    return completion.count('e') / max(1, len(completion))\n")
RAISES_ON_ROW_7 = ("def reward(prompt, completion, **columns):\n"
                   "    if columns['answer'] == '7':\n"
                   "        raise ValueError('no sevens here')\n"
                   "    return 0.0\n")


def grpo_config(model_dir, prompts, reward_file, **train) -> RunConfig:
    cfg = RunConfig()
    cfg.model.source, cfg.data.source, cfg.data.max_len = str(model_dir), str(prompts), 64
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 8, 16, 0.0
    cfg.rewards.file = str(reward_file)
    t = cfg.train
    t.objective, t.max_steps, t.batch_size, t.lr, t.warmup_steps = "grpo", 12, 2, 5e-2, 0
    t.scheduler, t.save_steps, t.save_total_limit, t.seed = "constant", 4, 3, 7
    t.grpo_generations, t.grpo_max_completion = 8, 8
    for k, v in train.items():
        setattr(t, k, v)
    return cfg
