"""Upper bounds on settings, where a value cannot be meant.

config.validate() checks each setting on its own (lower bounds, choices). These checks need the model's shape or
the dataset's size: a LoRA rank above the layer width adds nothing a full update would not, a batch above the
row count is the whole dataset in one step, a cutoff above the model's context trains positions it never saw.
The Start button and `python -m core train` call check() before a run folder is made, so a typo costs no run.
"""

from __future__ import annotations

from core.config import RunConfig
from core.errors import ConfigError
from core import models
from core.data.read import estimate_total
from core.estimate import vram

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def check(cfg: RunConfig, model_config: dict | None = None) -> None:
    """ConfigError for the first setting that cannot be meant. Reads the model's config.json (ModelError when
    the model cannot be found: checked here, before anything is created) and counts the dataset's lines."""

    if model_config is None:
        model_config = models.read_config(cfg.model.source)
    shape = vram.shape_from_config(model_config)
    check_shape(cfg, shape.hidden, context_length(model_config))
    check_rows(cfg, _row_guess(cfg))


def check_shape(cfg: RunConfig, hidden: int, context: int | None) -> None:
    r = cfg.lora.r
    if r > hidden:
        raise ConfigError("lora.r", f"rank {r} is above this model's layer width ({hidden}); a rank that high "
                          "is a full-size update at many times the cost",
                          f"use 8, 16 or 32 (at most {hidden} for this model)")
    if context and cfg.data.max_len > context:
        raise ConfigError("data.max_len", f"{cfg.data.max_len} tokens is above this model's context of {context}",
                          f"set data.max_len to {context} or less")


def check_rows(cfg: RunConfig, rows: int) -> None:
    """rows: the training rows (0 = unknown, e.g. a hub dataset: nothing to compare with)."""
    if rows and cfg.train.batch_size > rows:
        raise ConfigError("train.batch_size", f"{cfg.train.batch_size} is more than the {rows} rows of the dataset",
                          f"use a batch of {min(rows, 8)} or less (train.grad_accum raises the effective batch)")


def context_length(model_config: dict) -> int | None:
    for cfg in (model_config, model_config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            value = cfg.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _row_guess(cfg: RunConfig) -> int:
    """An upper bound on the training rows without reading them all: lines of a .jsonl / .csv file (what the
    data reader's progress bar uses), or data.limit when it is smaller. 0 when unknown."""

    rows = estimate_total(cfg.data.source)
    if cfg.data.limit:
        rows = min(rows, cfg.data.limit) if rows else 0
    return rows
