"""What a prepared dataset is, whatever the objective: the rows to train on, the held-out rows, the stats shown
before a run (core.events' "data" event), and the seeded hold-out both SFT and preference data use."""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field


@dataclass
class DataStats:
    rows: int                      # rows read (before dropping and splitting)
    format: str
    columns: dict                  # our role -> the file's column name
    source: str
    template_is_default: bool      # True when the model had no chat template and we used ChatML
    lengths: list[int]             # token length of each row before cutting
    max_len: int
    truncated: int
    dropped: int
    trained_tokens: int            # tokens carrying loss, per epoch (after cutting), training split
    total_tokens: int              # all tokens per epoch (after cutting), training split
    eval_rows: int = 0
    train_rows: int = 0            # sequences in Prepared.train (after packing / chunking)
    train_on: str = "assistant"
    packing: bool = False
    warnings: list[str] = field(default_factory=list)
    ignored_columns: list[str] = field(default_factory=list)  # columns of the file no role uses
    placeholders: dict = field(default_factory=dict)          # {{name}} -> rows holding it
    filled: dict = field(default_factory=dict)                # the data.fill values that were used
    tools: str = ""                # how tool calls were rendered: "" (none in the data), "template", "plain text"
    reasoning: str = ""            # where reasoning went: "" (none), the template's field name, or "dropped"
    loss_weight_zero: int = 0      # assistant turns with loss_weight 0 (masked)
    notes: list[str] = field(default_factory=list)  # how the file was read: columns left out, placeholders,
                                                    # tool and reasoning rendering (also in warnings)

    def tokens(self) -> dict:
        """Token lengths against the cutoff, for the CLI and the UI."""
        lengths = sorted(self.lengths) or [0]
        return {
            "min": lengths[0], "median": int(statistics.median(lengths)), "mean": round(statistics.fmean(lengths), 1),
            "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))], "max": lengths[-1],
            "max_len": self.max_len, "over_max_len": sum(1 for n in self.lengths if n > self.max_len),
            "truncated": self.truncated, "dropped": self.dropped,
            "share_truncated": round(self.truncated / self.rows, 4) if self.rows else 0.0,
            "trained": self.trained_tokens, "total": self.total_tokens,
        }

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens": self.tokens()}


@dataclass
class Prepared:
    train: Sequence[dict]          # each {"input_ids", "labels"} (+ "position_ids" when packed); lists of ints
    eval: Sequence[dict] | None
    stats: DataStats
    samples: list = field(default_factory=list)  # first rows as [(text, trained)] runs, for previews


def hold_out(rows, fraction: float, seed: int, what: str, warnings: list[str]):
    """(train, eval) rows: a seeded hold-out of `fraction` (see _split); with too few rows, all train, said."""
    train_idx, eval_idx = _split(len(rows), fraction, seed)
    if not eval_idx:
        warnings.append(f"too few {what} to hold any out for evaluation")
        return rows, None
    return rows.subset(train_idx), rows.subset(eval_idx)


def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random hold-out of round(n * fraction) rows (at least 1, never all)."""
    k = min(max(1, round(n * fraction)), n - 1) if fraction > 0 else 0
    if k <= 0:
        return list(range(n)), []
    held = set(random.Random(seed).sample(range(n), k))
    return [i for i in range(n) if i not in held], sorted(held)
