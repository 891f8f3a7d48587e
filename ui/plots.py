"""Turn run events (dicts from events.jsonl) into the long-format DataFrames that gr.LinePlot draws."""

from __future__ import annotations

import numpy as np
import pandas as pd

from core import events as ev
from core.units import GiB

SMOOTHING = 0.8  # exponential moving average weight, like TensorBoard's default slider

_DTYPES = {"step": "int64", "value": "float64", "series": "string"}


def _frame(rows: list[tuple]) -> pd.DataFrame:
    """Long format, typed even when empty (an empty object column would reach the chart as a number). Built by
    column: from rows with an astype to pandas' "string" (pyarrow) dtype it cost the run view most of its tick."""
    if not rows:
        return pd.DataFrame(None, columns=list(_DTYPES)).astype(_DTYPES)
    steps, values, series = zip(*rows)
    return pd.DataFrame({"step": np.fromiter(steps, dtype="int64", count=len(rows)),
                         "value": np.fromiter(values, dtype="float64", count=len(rows)),
                         "series": pd.array(series, dtype=object)})


# colours by series: a chart is rebuilt (its colour domain taken afresh) when its color_map changes
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")


def colours(names) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(sorted(names))}


def _drawable(frame: pd.DataFrame) -> tuple[str, ...]:
    # fewer than two steps draw nothing useful: vega warns of an infinite extent with no point and labels the
    # axis 1.000000 with one, so a chart waits for its second step
    return tuple(sorted(str(s) for s in frame["series"].unique())) if frame["step"].nunique() >= 2 else ()


# A chart is at most about 1,400 px wide: beyond this many points a series draws nothing more, and each point is sent
# to every open page on every tick. TensorBoard samples its scalar charts the same way (1,000 points a series by
# default) and smooths what it kept.
CHART_POINTS = 500


def thin(points: list, most: int = CHART_POINTS) -> list:
    """At most about `most` of `points` (a run's metrics curve), every k-th with k a power of two, and always the
    last: the points kept stay the same as the run grows (until k doubles), so a live chart does not shimmer."""
    stride = 1
    while len(points) > most * stride:
        stride *= 2
    if stride == 1:
        return points
    kept = points[::stride]
    if kept[-1] is not points[-1]:
        kept.append(points[-1])
    return kept


# Steps are integers, but vega picks its x ticks for the chart's width (about one per 40 px): over a short run it
# ticks half steps, and their labels run together ("7.58.0"). Gradio's LinePlot takes no tick step, so a short run's
# axis is widened to MIN_X_SPAN steps, over which even a 1360 px chart (34 ticks) ticks whole steps (d3 picks a step
# of 1 once span / ticks >= 0.71); a run longer than that keeps vega's own axis.
MIN_X_SPAN = 25


def x_lim(frame: pd.DataFrame) -> list[int] | None:
    """The x axis a chart of `frame` needs for whole-step ticks: [first step, first + MIN_X_SPAN] while the steps
    span less than that, else None (vega's own domain)."""
    if frame.empty:
        return None
    low, high = int(frame["step"].min()), int(frame["step"].max())
    return [low, low + MIN_X_SPAN] if high - low < MIN_X_SPAN else None


def _shape(frame: pd.DataFrame) -> tuple:
    """What a chart is built with: its series (the colour domain) and its x axis."""
    return _drawable(frame), x_lim(frame)


GONE = "lg-gone"  # the page's CSS: display none


def hidden():
    """A chart hidden without unmounting it: Gradio 6's plot adds a ResizeObserver at each rebuild (a tab switch
    rebuilds it) and never disconnects the old ones; when the element is dropped (visible=False, or a value of None)
    the first observer sets the width it remembers to 0 and each later one then reads offsetWidth of the dropped
    element: one "Cannot read properties of null (reading 'offsetWidth')" page error per extra observer (reproduced
    in chromium: 4 errors after two tab switches and visible=False, 0 with this class). Hidden by a CSS class, the
    element stays, and a chart shown again by chart_update draws its lines."""
    import gradio as gr  # heavy

    return gr.update(elem_classes=[GONE])


def chart_update(frame: pd.DataFrame):
    """What to send a chart for `frame`, never None once it may have been drawn. Gradio 6's LinePlot keeps the
    colour domain it was built with and rebuilds when its color_map changes, so each series set gets its own
    color_map (a series that appears later, such as eval loss at the end, is drawn). A chart with nothing to
    draw is hidden, not emptied: a chart given None drops its element while its resize observer lives on, and
    if the chart was last laid out while hidden (another tab, a closed column: width 0) that observer reads
    offsetWidth of null ("Cannot read properties of null (reading 'offsetWidth')" in the page)."""
    import gradio as gr  # heavy

    names = _drawable(frame)
    if not names:
        return hidden()
    return gr.update(value=frame, color_map=colours(names), x_lim=x_lim(frame), visible=True, elem_classes=[])


def live_value(frame: pd.DataFrame, key: str, sent: dict):
    """What to send a chart refreshed in place (the live run view): the frame alone while its series and x axis stay
    the same (the data is swapped in place), chart_update's rebuild when they change (a new series; a run that
    outgrows MIN_X_SPAN), gr.skip() while it stays empty. `sent` is the caller's per-chart memory of what the chart
    was last built with."""
    import gradio as gr  # heavy

    shape = _shape(frame)
    if key in sent and tuple(sent[key]) == shape:
        return frame if shape[0] else gr.skip()
    sent[key] = shape
    return chart_update(frame)


def refill(fn, chart_at: int | None = None, n: int = 1):
    """An event handler for a one-shot fill: fn's result, with its chart output (number `chart_at` of `n`; None =
    the only output) sent through chart_update."""

    def handler(*args):
        out = fn(*args)
        if chart_at is None:
            return chart_update(out if out is not None else _frame([]))
        out = list(out)
        out[chart_at] = chart_update(out[chart_at] if out[chart_at] is not None else _frame([]))
        return tuple(out)

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


def reward_frame(events: list[dict]) -> pd.DataFrame:
    """GRPO: the mean reward of each step's completions (the weighted total), the mean of each reward function, and
    the total's spread (std) within the step."""
    rows = []
    for e in ev.metrics(events):
        step = e[ev.STEP]
        if _finite(e.get(ev.REWARD)):
            rows.append((step, e[ev.REWARD], "total"))
        if _finite(e.get(ev.REWARD_STD)):
            rows.append((step, e[ev.REWARD_STD], "total std"))
        for name, v in (e.get(ev.REWARDS) or {}).items():
            if _finite(v):
                rows.append((step, v, name))
    return _frame(rows)


def completion_frame(events: list[dict]) -> pd.DataFrame:
    """GRPO: the completions' mean length in tokens, and the share cut at train.grpo_max_completion (as % so both
    read on one axis)."""
    rows = []
    for e in ev.metrics(events):
        if _finite(e.get(ev.COMPLETION_LEN)):
            rows.append((e[ev.STEP], e[ev.COMPLETION_LEN], "mean length (tokens)"))
        if _finite(e.get(ev.CLIPPED_RATIO)):
            rows.append((e[ev.STEP], 100 * e[ev.CLIPPED_RATIO], "cut at the limit (%)"))
    return _frame(rows)


def policy_frame(events: list[dict]) -> pd.DataFrame:
    """GRPO: the KL to the reference (grpo_beta > 0) and the entropy of the sampled tokens, where TRL logs them."""
    rows = []
    for e in ev.metrics(events):
        for key, label in ((ev.KL, "KL to the reference"), (ev.ENTROPY, "entropy (nats)")):
            if _finite(e.get(key)):
                rows.append((e[ev.STEP], e[key], label))
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
