"""Turn run events (dicts from events.jsonl) into the long-format DataFrames that gr.LinePlot draws."""

from __future__ import annotations

import pandas as pd

from core import events as ev
from core.units import GiB

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
    # fewer than two steps draw nothing useful: vega warns of an infinite extent with no point and labels the
    # axis 1.000000 with one, so a chart waits for its second step
    names = tuple(sorted(set(frame["series"]))) if frame["step"].nunique() >= 2 else ()
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
    import gradio as gr  # heavy

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


def loss_frame(events: list[dict]) -> pd.DataFrame:
    m = [e for e in ev.metrics(events) if _finite(e.get(ev.LOSS))]
    rows = [(e[ev.STEP], e[ev.LOSS], "loss") for e in m]
    rows += [(e[ev.STEP], s, "smoothed") for e, s in zip(m, ema([e[ev.LOSS] for e in m]))]
    rows += [(e[ev.STEP], e[ev.EVAL_LOSS], "eval loss") for e in ev.of_type(events, ev.EVAL)
             if _finite(e.get(ev.EVAL_LOSS))]
    rows += recovery_marks(events, [r[1] for r in rows])
    return _frame(rows)


def recovery_marks(events: list[dict], values: list[float]) -> list[tuple]:
    """Each recovery from out of memory as a vertical mark across the chart's values at the step that ran out,
    one series per recovery (a line through two points: a LinePlot draws no lone point)."""
    if not values:
        return []
    low, high = min(values), max(values)
    return [row for r in ev.recoveries(events) if r.get(ev.AT_STEP) is not None
            for row in ((r[ev.AT_STEP], low, f"recovered at step {r[ev.AT_STEP]}"),
                        (r[ev.AT_STEP], high, f"recovered at step {r[ev.AT_STEP]}"))]


def series_frame(events: list[dict], key: str, label: str) -> pd.DataFrame:
    """One metrics field (an ev.* name) as a labelled series."""
    return _frame([(e[ev.STEP], e[key], label) for e in ev.metrics(events) if _finite(e.get(key))])


PREFERENCE_LABELS = {ev.REWARD_CHOSEN: "chosen", ev.REWARD_REJECTED: "rejected", ev.REWARD_MARGIN: "margin"}


def rewards_frame(events: list[dict]) -> pd.DataFrame:
    """DPO / ORPO: the rewards of the chosen and rejected replies and their margin (training; eval dashed by
    name: "eval margin")."""
    rows = []
    for key, label in PREFERENCE_LABELS.items():
        parts = ev.series(events, key)
        rows += [(step, v, label) for step, v in parts["train"] if _finite(v)]
        if key == ev.REWARD_MARGIN:
            rows += [(step, v, "eval margin") for step, v in parts["eval"] if _finite(v)]
    return _frame(rows)


def accuracy_frame(events: list[dict]) -> pd.DataFrame:
    """DPO / ORPO: share of pairs whose chosen reply out-scores the rejected one, train and eval."""
    parts = ev.series(events, ev.PREF_ACCURACY)
    return _frame([(step, v, name) for name in ("train", "eval") for step, v in parts[name] if _finite(v)])


def memory_frame(events: list[dict], estimate_bytes: int | None) -> pd.DataFrame:
    """Measured memory in GB (on CUDA the GPU process peak and torch's peak reserved, on the CPU the process
    RSS: core.events.MEM_SERIES; in a multi-process run the other ranks' too) with the estimate as a flat line
    across the measured steps."""
    rows = [(step, value / GiB, ev.MEM_SERIES[key]) for step, key, value in ev.memory_points(events)]
    # several processes: each other rank's peak too, against the same per-GPU (per-process) estimate
    rows += [(step, value / GiB, f"rank {r}: {ev.MEM_SERIES[key]}") for step, r, key, value in
             ev.rank_memory_points(events)]
    if estimate_bytes and rows:
        steps = sorted({r[0] for r in rows})
        rows += [(steps[0], estimate_bytes / GiB, "estimate"), (steps[-1], estimate_bytes / GiB, "estimate")]
    return _frame(rows)


def overlay_frame(named_events: dict[str, list[dict]], smoothed: bool = True) -> pd.DataFrame:
    """Loss curves of several runs on one chart, one series per run."""
    rows = []
    for name, events in named_events.items():
        m = [e for e in ev.metrics(events) if _finite(e.get(ev.LOSS))]
        values = ema([e[ev.LOSS] for e in m]) if smoothed else [e[ev.LOSS] for e in m]
        rows += [(e[ev.STEP], v, name) for e, v in zip(m, values)]
    return _frame(rows)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
