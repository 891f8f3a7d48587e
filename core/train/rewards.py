"""GRPO's reward functions: the presets (format, answer, contains, not_contains, length) and a user's own Python
file, each with its weight from the `rewards` config section (core.config.RewardsConfig).

A reward scores one completion; `build(cfg)` gives the list TRL's GRPOTrainer calls (each with a `__name__`, which
names its chart series) and their weights. Every preset is a plain function of text, so the presets are checked on
hand-written completions, and the same functions score `eval` and the report on held-out prompts.

A user's file (rewards.file) is imported only in the training child (and in the `try-rewards` child process the
Train page starts), never in the app: it is the user's own code. An exception in it fails the run naming the row
and the function.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.config import RunConfig, format_pattern
from core.errors import ConfigError, RunError

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")
ROW = "row"                 # the data row number, a column every GRPO row carries (to name it in errors)
PROMPT_TEXT = "prompt_text"  # the user's own prompt text (the last user turn), what a user's reward sees
PRESETS = ("format", "answer", "contains", "not_contains", "length")
FILE_REWARD = "file"


# ---------------------------------------------------------------- the presets, on text

def format_reward(completion: str, pattern: str) -> float:
    """1 when the whole completion (stripped) matches, 0.5 when the pattern is found inside it, else 0."""
    text = completion.strip()
    if re.fullmatch(pattern, text, re.S):
        return 1.0
    return 0.5 if re.search(pattern, text, re.S) else 0.0


def extract_answer(completion: str) -> str | None:
    """The text in the last <answer></answer> pair, else the completion's last number, else None."""
    tags = ANSWER_TAG.findall(completion)
    if tags:
        return tags[-1].strip()
    numbers = NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def as_number(text) -> float | None:
    """`text` as a number ("1,200" -> 1200.0, "$3.50" -> 3.5, "-7" -> -7.0), or None when it is not one."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(text) else None
    cleaned = str(text).strip().strip("$%").replace(",", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def same_answer(got: str | None, want) -> bool:
    """Numbers compared as numbers (12 == 12.0 == "12"); other text compared without case, spaces or a final
    full stop. An answer that holds a number inside text ("12 apples") is compared by its last number."""
    if got is None or want is None:
        return False
    w = as_number(want)
    if w is not None:
        g = as_number(got)
        if g is None:
            numbers = NUMBER.findall(got)
            g = as_number(numbers[-1]) if numbers else None
        return g is not None and math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-9)
    norm = lambda s: " ".join(str(s).casefold().split()).rstrip(".")  # noqa: E731
    return norm(got) == norm(want)


def answer_reward(completion: str, want) -> float:
    return 1.0 if same_answer(extract_answer(completion), want) else 0.0


def contains_reward(completion: str, phrases: list[str]) -> float:
    """The share of the phrases the completion holds (case-insensitive)."""
    phrases = [p for p in phrases if p.strip()]
    text = completion.casefold()
    return sum(p.casefold() in text for p in phrases) / len(phrases) if phrases else 0.0


def not_contains_reward(completion: str, phrases: list[str]) -> float:
    return 1.0 - contains_reward(completion, phrases)


def length_reward(n_tokens: int, low: int, high: int) -> float:
    """1 inside [low, high]; outside, falling linearly to 0 at a distance of twice the range (at least 16 tokens)."""
    if low <= n_tokens <= high:
        return 1.0
    distance = low - n_tokens if n_tokens < low else n_tokens - high
    return max(0.0, 1.0 - distance / (2 * max(high - low, 16)))


# ---------------------------------------------------------------- the functions TRL calls

@dataclass
class Reward:
    """One reward of a run: `score(prompt_text, completion, n_tokens, columns) -> float` per completion."""
    name: str
    weight: float
    score: Callable[[str, str, int, dict], float]

    def __post_init__(self):
        self.__name__ = self.name  # TRL names a reward's metrics (rewards/<name>/mean) after its __name__

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        """TRL's reward-function call: lists, one entry per completion; the dataset's columns come as lists."""
        columns = {k: v for k, v in kwargs.items() if isinstance(v, list) and len(v) == len(completions)}
        texts = columns.get(PROMPT_TEXT, prompts)
        out = []
        for i, completion in enumerate(completions):
            row = {k: v[i] for k, v in columns.items()}
            n = len(completion_ids[i]) if completion_ids is not None else len(completion.split())
            out.append(self.checked(texts[i], completion, n, row))
        return out

    def checked(self, prompt: str, completion: str, n_tokens: int, row: dict) -> float:
        """The score, as a float; a failing or non-numeric reward raises RunError naming the row and function."""
        where = f"row {row[ROW]}" if ROW in row else "a prompt"
        try:
            value = self.score(prompt, completion, n_tokens, row)
        except Exception as e:  # noqa: BLE001 - the user's code can raise anything; the run fails naming it
            raise RunError(f"the reward function {self.name} raised {type(e).__name__}: {e} (on {where}, "
                           f"prompt {prompt[:80]!r})", "fix the function, then resume or start the run again") from e
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RunError(f"the reward function {self.name} returned {value!r} on {where}, not a finite number",
                           "return a float such as 1.0 or 0.0 for every completion")
        return float(value)


def build(cfg: RunConfig, allow_file: bool = True) -> list[Reward]:
    """The run's rewards with a non-zero weight, in a fixed order (presets, then the file's)."""
    r = cfg.rewards
    out = []
    if r.format_weight:
        pattern = format_pattern(r.format_regex)
        out.append(Reward("format", r.format_weight, lambda p, c, n, row: format_reward(c, pattern)))
    if r.answer_weight:
        column = r.answer_column
        out.append(Reward("answer", r.answer_weight, lambda p, c, n, row: answer_reward(c, row.get(column))))
    if r.contains_weight:
        out.append(Reward("contains", r.contains_weight, lambda p, c, n, row: contains_reward(c, r.contains)))
    if r.not_contains_weight:
        out.append(Reward("not_contains", r.not_contains_weight,
                          lambda p, c, n, row: not_contains_reward(c, r.not_contains)))
    if r.length_weight:
        out.append(Reward("length", r.length_weight, lambda p, c, n, row: length_reward(n, r.length_min, r.length_max)))
    if r.file.strip() and r.file_weight:
        if not allow_file:
            raise ConfigError("rewards.file", "a reward file is the user's own code, and this app is shared beyond "
                              "this computer (--host is not loopback)",
                              "run the app on 127.0.0.1 to use rewards.file, or use the preset rewards")
        out.append(load_file(r.file, r.file_weight))
    return out


def load_file(path: str, weight: float) -> Reward:
    """The `reward` function of a user's Python file. Only the training child (or try-rewards' child) calls this."""
    file = Path(path).expanduser()
    spec = importlib.util.spec_from_file_location(f"garage_user_reward_{abs(hash(str(file)))}", file)
    if spec is None or spec.loader is None:
        raise ConfigError("rewards.file", f"{file} cannot be imported as Python", "give a .py file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file: name the error and where it came from
        raise ConfigError("rewards.file", f"importing {file.name} raised {type(e).__name__}: {e}",
                          "fix the file so that it imports, then start again") from e
    fn = getattr(module, "reward", None)
    if not callable(fn):
        raise ConfigError("rewards.file", f"{file.name} has no function named reward",
                          "define def reward(prompt, completion, **columns) -> float")
    params = list(inspect.signature(fn).parameters.values())
    if len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) < 2 or \
            not any(p.kind == p.VAR_KEYWORD for p in params):
        raise ConfigError("rewards.file", f"{file.name}'s reward{inspect.signature(fn)} does not take "
                          "(prompt, completion, **columns)", "define def reward(prompt, completion, **columns) -> float")
    hidden = {ROW, PROMPT_TEXT}

    def score(prompt, completion, n, row):
        return fn(prompt, completion, **{k: v for k, v in row.items() if k not in hidden})

    return Reward(f"{FILE_REWARD}:{file.stem}", weight, score)


def score_prompt_row(rewards: list[Reward], row: dict, completion: str, n_tokens: int) -> dict:
    """score_all for a prepared prompt row (core.data.prompts): the user's prompt text and the row's reward columns,
    as the training child hands them to the rewards."""
    columns = {k: v for k, v in row.items() if k not in ("prompt", "prompt_ids")}
    return score_all(rewards, row[PROMPT_TEXT], completion, n_tokens, columns)


def score_all(rewards: list[Reward], prompt: str, completion: str, n_tokens: int, row: dict) -> dict:
    """{name: value} for one completion, and "total" the weighted sum (as TRL sums them)."""
    parts = {r.name: r.checked(prompt, completion, n_tokens, row) for r in rewards}
    parts_total = sum(r.weight * parts[r.name] for r in rewards)
    return {"rewards": parts, "total": parts_total}
