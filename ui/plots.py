"""Turn run events (dicts from events.jsonl) into the long-format DataFrames that gr.LinePlot draws."""

from __future__ import annotations

import pandas as pd

from core import runs

SMOOTHING = 0.8  # exponential moving average weight, like TensorBoard's default slider

_DTYPES = {"step": "int64", "value": "float64", "series": "string"}


def _frame(rows: list[tuple]) -> pd.DataFrame:
    """Long format, typed even when empty (an empty object column would reach the chart as a number)."""
    return pd.DataFrame(rows or None, columns=list(_DTYPES)).astype(_DTYPES)


def live_value(frame: pd.DataFrame, key: str, sent: dict) -> pd.DataFrame | None:
    """What to send a chart that is refreshed in place (the live run view). Gradio 6's LinePlot fixes its colour
    domain to the series present when it builds the chart and afterwards only swaps the data, so a series that
    appears later (eval loss at the end, the estimate line) would draw nothing. It builds the chart afresh when its
    value goes from None to data. So when the set of series changes, this sends None once (and records that in
    `sent`, the caller's per-chart memory) and the frame on the next refresh. An empty frame is sent as None."""
    names = tuple(sorted(set(frame["series"])))
    before = sent.get(key)
    if before and names != before:
        sent[key] = None
        return None
    sent[key] = names or None
    return frame if names else None


def clear_then(fn, chart_at: int | None = None, n: int = 1):
    """An event handler for a one-shot fill: it first sends None to the chart (output `chart_at` of `n`; None = the
    only output) and then fn's result, so the chart rebuilds with the new series (see live_value). Both updates
    belong to one event, and Gradio runs one event per listener at a time, so a quick second event cannot slip
    its data in between."""
    import gradio as gr

    def handler(*args):
        yield None if chart_at is None else tuple(None if i == chart_at else gr.skip() for i in range(n))
        yield fn(*args)

    return handler


def ema(values: list[float], weight: float = SMOOTHING) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def metrics(events: list[dict]) -> list[dict]:
    """One curve per run: after a resume, the steps it superseded are dropped (core.runs decides)."""
    return [e for e in runs.metrics(events) if e.get("step") is not None]


def loss_frame(events: list[dict]) -> pd.DataFrame:
    m = [e for e in metrics(events) if _finite(e.get("loss"))]
    rows = [(e["step"], e["loss"], "loss") for e in m]
    rows += [(e["step"], s, "smoothed") for e, s in zip(m, ema([e["loss"] for e in m]))]
    rows += [(e["step"], e["eval_loss"], "eval loss") for e in events
             if e.get("type") == "eval" and _finite(e.get("eval_loss"))]
    return _frame(rows)


def series_frame(events: list[dict], key: str, label: str) -> pd.DataFrame:
    return _frame([(e["step"], e[key], label) for e in metrics(events) if _finite(e.get(key))])


def memory_frame(events: list[dict], estimate_bytes: int | None) -> pd.DataFrame:
    """Measured memory (GPU peak reserved on CUDA, process RSS on CPU) in GB, with the estimate as a flat line."""
    rows = []
    for e in metrics(events):
        mem = e.get("mem") or {}
        for key, label in (("peak_reserved", "GPU peak reserved"), ("reserved", "GPU reserved"),
                           ("nvml_used", "GPU used (nvml)"), ("rss", "process RSS (CPU)")):
            if _finite(mem.get(key)):
                rows.append((e["step"], mem[key] / 2**30, label))
    if estimate_bytes and rows:
        steps = sorted({r[0] for r in rows})
        rows += [(steps[0], estimate_bytes / 2**30, "estimate"), (steps[-1], estimate_bytes / 2**30, "estimate")]
    return _frame(rows)


def overlay_frame(named_events: dict[str, list[dict]], smoothed: bool = True) -> pd.DataFrame:
    """Loss curves of several runs on one chart, one series per run."""
    rows = []
    for name, events in named_events.items():
        m = [e for e in metrics(events) if _finite(e.get("loss"))]
        values = ema([e["loss"] for e in m]) if smoothed else [e["loss"] for e in m]
        rows += [(e["step"], v, name) for e, v in zip(m, values)]
    return _frame(rows)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
