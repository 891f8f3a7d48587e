import json
import math
from pathlib import Path

import pytest

from core import events as ev
from core import config as C
from core import presets
from ui import plots, runs_tab, train_form, train_tab


def _m(step, loss, **kw):
    return {"type": "metrics", "step": step, "loss": loss, **kw}


def test_loss_frame_has_raw_smoothed_and_eval():
    events = [_m(1, 4.0), _m(2, 2.0), {"type": "eval", "step": 2, "eval_loss": 2.5}, _m(3, float("nan"))]
    df = plots.loss_frame(events)
    assert set(df.series) == {"loss", "smoothed", "eval loss"}
    assert list(df[df.series == "loss"].value) == [4.0, 2.0]  # NaN is not drawn
    assert df[df.series == "smoothed"].value.iloc[-1] == pytest.approx(0.8 * 4.0 + 0.2 * 2.0)


def test_resume_supersedes_steps_after_the_checkpoint():
    events = [_m(1, 3.0), _m(2, 2.0), _m(3, 1.5), {"type": "resume", "step": 2}, _m(3, 1.4)]
    df = plots.loss_frame(events)
    assert list(df[df.series == "loss"].step) == [1, 2, 3]
    assert list(df[df.series == "loss"].value) == [3.0, 2.0, 1.4]


def test_memory_frame_draws_the_estimate_line():
    events = [_m(1, 1.0, mem={"rss": 2**30}), _m(5, 1.0, mem={"rss": 2 * 2**30})]
    df = plots.memory_frame(events, estimate_bytes=3 * 2**30)
    assert list(df[df.series == "estimate"].value) == [3.0, 3.0]
    assert list(df[df.series == "process RSS (CPU)"].value) == [1.0, 2.0]


def test_an_empty_chart_still_types_its_series_as_names():
    """An untyped empty frame reaches the browser with a numeric series column; the chart built on it then has a
    numeric colour scale and draws no line once the real series arrive."""
    import gradio as gr

    plot = gr.LinePlot(plots._frame([]), x="step", y="value", color="series")
    sent = plot.postprocess(plots._frame([]))
    assert sent.datatypes == {"step": "quantitative", "value": "quantitative", "series": "nominal"}
    hist = gr.BarPlot(train_tab._empty_hist(), x="tokens", y="rows", color="length")
    assert hist.postprocess(train_tab._empty_hist()).datatypes["length"] == "nominal"


def test_a_live_chart_is_never_emptied_and_rebuilds_by_color_map_when_its_series_change():
    """Gradio keeps the colour domain a chart was built with and rebuilds when its color_map changes; a chart given
    None loses its element while its resize observer lives on (the offsetWidth-of-null page error). So a new
    series (eval loss at the end) comes with a new color_map in the same refresh, and an empty chart is hidden."""
    import gradio as gr

    sent = {}
    early = plots.loss_frame([_m(1, 4.0), _m(2, 2.0)])
    late = plots.loss_frame([_m(1, 4.0), _m(2, 2.0), {"type": "eval", "step": 2, "eval_loss": 2.5}])
    assert plots.live_value(plots._frame([]), "loss", sent) == plots.hidden()  # nothing to draw yet
    assert plots.live_value(plots._frame([]), "loss", sent) == gr.skip()
    first = plots.live_value(early, "loss", sent)
    assert first["value"] is early and first["visible"] is True and set(first["color_map"]) == {"loss", "smoothed"}
    assert plots.live_value(early, "loss", sent) is early  # same series: the data is swapped in place
    rebuilt = plots.live_value(late, "loss", sent)
    assert rebuilt["value"] is late and set(rebuilt["color_map"]) == {"loss", "smoothed", "eval loss"}
    assert plots.live_value(late, "loss", sent) is late
    assert plots.live_value(plots._frame([]), "loss", sent) == plots.hidden()  # a new run: hidden


def test_one_shot_fills_never_send_none():
    import gradio as gr

    handler = plots.refill(lambda rid: ("md", plots.loss_frame([_m(1, 4.0), _m(2, 2.0)]), "yaml"), chart_at=1, n=3)
    md, chart, yaml_text = handler("r1")
    assert (md, yaml_text) == ("md", "yaml") and chart["visible"] is True and chart["color_map"]
    assert plots.refill(lambda ids: None)(["a"]) == plots.hidden()


def test_a_final_eval_after_the_last_step_redraws_the_loss_chart_in_one_refresh():
    from core.runs import folder as runs
    from ui import run_view

    cfg = C.RunConfig()
    cfg.output.run_name = "r1"
    run_dir = runs.create(cfg)
    runs.write_status(run_dir, state="completed")
    log = ev.EventLog(run_dir)
    for k in (1, 2):
        log.write(_m(k, 3.0 / k, lr=1e-4, grad_norm=1.0, tokens_per_s=10.0))
    r = run_view.refresh("r1", {})
    assert set(r) == set(run_view.FIELDS) | {"keep"}  # a value for every output, named
    assert set(r["loss"]["value"].series) == {"loss", "smoothed"} and not r["keep"]
    log.write({"type": "eval", "step": 2, "eval_loss": 2.5})  # the final eval lands after the last metrics
    r = run_view.refresh("r1", r["cache"])
    assert set(r["loss"]["value"].series) == {"loss", "smoothed", "eval loss"} and not r["keep"]
    assert set(r["loss"]["color_map"]) == {"loss", "smoothed", "eval loss"}  # rebuilt with the new domain
    assert set(r["lr"].series) == {"learning rate"}  # the other charts: data swapped in place
    assert all(r[k] is not None for k in run_view.CHARTS)


def test_thin_keeps_at_most_about_the_chart_points_the_same_ones_as_the_run_grows_and_the_last():
    points = list(range(1, 2001))
    kept = plots.thin(points, most=500)
    assert len(kept) <= 501 and kept[0] == 1 and kept[-1] == 2000
    assert set(plots.thin(points[:1900], most=500)[:-1]) <= set(kept)  # same stride: the same points, not new ones
    assert plots.thin(points[:400], most=500) == points[:400]  # short runs: every point


def test_a_long_run_refreshes_thinned_and_a_tick_with_nothing_new_sends_no_chart(monkeypatch):
    from core.runs import folder as runs
    from ui import run_view
    import gradio as gr

    cfg = C.RunConfig()
    cfg.output.run_name = "long"
    run_dir = runs.create(cfg)
    runs.write_status(run_dir, state="running", step=3000, total_steps=5000)
    log = ev.EventLog(run_dir)
    for k in range(1, 3001):
        log.write(_m(k, 3.0 / k, lr=1e-4, grad_norm=1.0, tokens_per_s=10.0, eta_s=100.0))
        if k == 2000:  # a resume from step 1500: the steps after it come again
            log.write({"type": "resume", "step": 1500})
    r = run_view.refresh("long", {})
    loss = r["loss"]["value"]
    raw = loss[loss.series == "loss"]
    assert len(raw) <= plots.CHART_POINTS + 1 and raw.step.iloc[-1] == 3000
    assert raw.step.is_monotonic_increasing  # the resumed steps replaced the superseded ones, none drawn twice
    assert "step 3000 / 5000" in r["progress"] and "ETA" in r["progress"]
    again = run_view.refresh("long", r["cache"])
    assert all(again[k] == gr.skip() for k in run_view.CHARTS + ("samples", "log"))  # nothing new: nothing sent
    assert "step 3000 / 5000" in again["progress"]  # the status and progress are read every tick

    # a step written now: pages ticking within FEED_S share the read before it; the next read draws it
    log.write(_m(3001, 0.001, lr=1e-4, grad_norm=1.0, tokens_per_s=10.0, eta_s=99.0))
    other_page = run_view.refresh("long", {})
    assert other_page["loss"]["value"] is r["loss"]["value"]  # one build of the charts served both pages
    monkeypatch.setattr(run_view, "FEED_S", 0.0)
    later = run_view.refresh("long", again["cache"])
    assert later["loss"].step.max() == 3001  # the new step, its chart's data swapped in place


def test_overlay_has_one_series_per_run():
    df = plots.overlay_frame({"a": [_m(1, 2.0)], "b": [_m(1, 3.0), _m(2, 1.0)]})
    assert set(df.series) == {"a", "b"} and len(df) == 3


def test_form_round_trip_through_values():
    cfg = C.apply_overrides(presets.load("gpu-8gb-qlora"), ["data.columns={prompt: q, response: a}"])
    names = ["model.source", "data.source", "data.columns"] + [n for g in train_form.GROUPS.values() for n, _ in g]
    values = train_form.values_of(names, cfg)
    again = train_form.to_config(names, values)
    for n in names:
        section, key = n.split(".")
        assert getattr(getattr(again, section), key) == getattr(getattr(cfg, section), key), n


def test_form_numbers_from_the_browser_become_ints():
    cfg = train_form.to_config(["lora.r", "train.lr"], [16.0, 0.001])
    assert cfg.lora.r == 16 and isinstance(cfg.lora.r, int)


def test_empty_number_names_the_field():
    with pytest.raises(C.ConfigError) as e:
        train_form.to_config(["train.batch_size"], [None])
    assert e.value.field == "train.batch_size"


def test_bad_column_mapping_names_the_field():
    with pytest.raises(C.ConfigError) as e:
        train_form.to_config(["data.columns"], ["[1, 2]"])
    assert e.value.field == "data.columns"


def test_histogram_splits_at_the_cutoff():
    df = train_tab.histogram([10, 20, 300, 400], cutoff=256)
    assert df[df.length == "over the cutoff"].rows.sum() == 2
    assert df[df.length == "fits"].rows.sum() == 2


def test_cli_command_repeats_the_settings():
    cfg = C.apply_overrides(C.RunConfig(), ["lora.r=32", "train.lr=1e-4"])
    cmd = runs_tab.cli_command(cfg)
    assert cmd.startswith("python -m core train") and "--set lora.r=32" in cmd and "train.lr=0.0001" in cmd
    again = C.apply_overrides(C.RunConfig(), [s.split(" ", 1)[1] for s in cmd.split(" --set")[1:]])
    assert again.lora.r == 32 and math.isclose(again.train.lr, 1e-4)


def test_the_vram_panel_plans_several_devices(monkeypatch):
    """train.devices=2 on a machine without GPUs: two CPU processes, each holding a replica in RAM; with two GPUs
    the rows are per GPU under the planned strategy."""
    from core import hardware
    from core.estimate import vram
    from ui import vram_panel

    cfg = C.RunConfig()
    cfg.train.devices, cfg.train.batch_size, cfg.train.grad_accum = "2", 2, 4
    monkeypatch.setattr(hardware, "read", lambda: hardware.HardwareReading(ram_total=64 * 2**30,
                                                                           ram_available=32 * 2**30, cpu_count=2))
    plans = vram_panel.plans(cfg, hardware.read())
    text = vram_panel.plan_html(plans["run"])
    assert "per process x 2" in text and "effective batch 8 = batch 2 x grad_accum 2 x 2" in text
    shape = vram.shape_from_config(json.loads(
        (Path(C.__file__).parent / "builtin_models" / "smollm2-135m-config.json").read_text()))
    one = vram.estimate(shape, vram.settings_from_config(cfg, device="cpu"))
    assert f"{2 * one.total_bytes / 2**30:.2f} GB" in vram_panel.cpu_verdict_text(cfg, shape, "lora", hardware.read(),
                                                                                 plans["run"])
    gpu = hardware.GpuReading(index=0, name="RTX 3090", total=24 * 2**30, free=24 * 2**30, used=0)
    monkeypatch.setattr(hardware, "read", lambda: hardware.HardwareReading(gpus=[gpu, gpu]))
    plans = vram_panel.plans(cfg, hardware.read())
    ests = vram_panel.estimates(cfg, shape, "cuda", plans)
    single = vram.estimate(shape, vram.settings_from_config(cfg, method="lora", device="cuda"))
    assert ests["lora"].total_bytes == vram.per_gpu(single, "ddp", 2).total_bytes > single.total_bytes
    assert "per GPU x 2" in vram_panel.plan_html(plans["run"])


def test_a_short_run_gets_an_x_axis_of_whole_steps_and_a_longer_one_is_rebuilt_with_vegas_own():
    """Steps are integers: over a few steps vega ticked half steps whose labels ran together ("7.58.0"). A short
    run's axis spans MIN_X_SPAN steps (whole-step ticks at any chart width up to 1360 px); once the run outgrows it
    the chart is rebuilt once with vega's own domain, and the data is swapped in place around that."""
    sent = {}
    short = plots.loss_frame([_m(s, 4.0 / s) for s in range(3, 11)])
    first = plots.live_value(short, "loss", sent)
    assert first["x_lim"] == [3, 3 + plots.MIN_X_SPAN]
    # d3's tick step for the widest chart (1360 px: 34 ticks) over that span is whole steps
    assert plots.MIN_X_SPAN / 34 >= 0.71
    same = plots.loss_frame([_m(s, 4.0 / s) for s in range(3, 20)])
    assert plots.live_value(same, "loss", sent) is same
    long = plots.loss_frame([_m(s, 4.0 / s) for s in range(3, 40)])
    rebuilt = plots.live_value(long, "loss", sent)
    assert rebuilt["value"] is long and rebuilt["x_lim"] is None
    assert plots.live_value(long, "loss", sent) is long
    assert plots.chart_update(long)["x_lim"] is None and plots.chart_update(short)["x_lim"] == [3, 28]


def test_a_chart_is_hidden_by_a_class_never_unmounted():
    """Gradio 6's plot keeps one ResizeObserver per rebuild and never disconnects them; a chart dropped from the page
    (visible=False, a value of None) then raised 'offsetWidth of null' once per extra observer. Hidden charts keep
    their element: only a CSS class (in the page's CSS) hides them, and a chart shown again takes it off."""
    from ui import layout

    gone = plots.hidden()
    assert "visible" not in gone and "value" not in gone and gone["elem_classes"] == [plots.GONE]
    assert f".{plots.GONE} " in layout.CSS and "display:none" in layout.CSS.split(f".{plots.GONE} ")[1].split("}")[0]
    shown = plots.chart_update(plots.loss_frame([_m(1, 4.0), _m(2, 2.0)]))
    assert shown["elem_classes"] == [] and shown["visible"] is True


def test_grpo_frames_and_the_runs_page_curve():
    """A GRPO run's charts: the reward total, its spread and each function; length and cut share (as %); KL and
    entropy; the Runs page draws the mean reward beside the loss, named as such."""
    from core.config import RunConfig
    from ui import runs_tab

    events = [{"type": "metrics", "step": 1, "loss": 0.0, "reward": 0.5, "reward_std": 0.1,
               "rewards": {"format": 0.25, "answer": 0.25}, "completion_len": 12.0, "clipped_ratio": 0.5,
               "entropy": 2.0},
              {"type": "metrics", "step": 2, "loss": 0.0, "reward": 0.9, "reward_std": 0.2,
               "rewards": {"format": 0.5, "answer": 0.4}, "completion_len": 8.0, "clipped_ratio": 0.0, "kl": 0.01,
               "entropy": 1.0}]
    reward = plots.reward_frame(events)
    assert sorted(set(reward["series"])) == ["answer", "format", "total", "total std"]
    assert reward[(reward["series"] == "total")]["value"].tolist() == [0.5, 0.9]
    length = plots.completion_frame(events)
    assert length[length["series"] == "cut at the limit (%)"]["value"].tolist() == [50.0, 0.0]
    policy = plots.policy_frame(events)
    assert policy[policy["series"] == "KL to the reference"]["step"].tolist() == [2]
    cfg = RunConfig()
    assert set(runs_tab.curve_frame(cfg, events)["series"]) <= {"loss", "smoothed"}
    cfg.train.objective = "grpo"
    grpo = runs_tab.curve_frame(cfg, events)
    assert grpo[grpo["series"] == "reward (GRPO, mean)"]["value"].tolist() == [0.5, 0.9]
    assert "loss" in set(grpo["series"])


def test_measured_peak_comes_from_a_run_of_the_same_objective():
    """The memory verdict's 'Measured on run ...' line: a GRPO run holds batch x generations sequences a step, so
    its peak is not shown for an SFT plan on the same model and method (a browser check saw exactly that)."""
    from core.runs import folder as runs
    from ui import vram_panel

    def run_with_peak(objective: str, peak: int):
        cfg = C.RunConfig()
        cfg.train.objective = objective
        run_dir = runs.create(cfg)
        log = ev.EventLog(run_dir)
        log.write({ev.T: 1.0, **_m(1, 1.0, mem={ev.MEM_RSS: peak})})
        log.close()
        (run_dir / "estimate.json").write_text(json.dumps({"total_bytes": 2 * 2**30}))
        return run_dir.name

    grpo = run_with_peak("grpo", 3 * 2**30)
    plan = C.RunConfig()
    assert vram_panel.measured_text(plan) == ""
    plan.train.objective = "grpo"
    assert f"run {grpo}:" in vram_panel.measured_text(plan)
    sft = run_with_peak("sft", 2**30)
    plan.train.objective = "sft"
    assert f"run {sft}:" in vram_panel.measured_text(plan)
    plan.train.objective = "grpo"
    assert f"run {grpo}:" in vram_panel.measured_text(plan)  # the newer SFT run does not hide it


def test_the_runs_list_reads_a_runs_events_again_only_when_they_changed(monkeypatch):
    from core.runs import folder as runs

    cfg = C.RunConfig()
    cfg.output.run_name = "listed"
    run_dir = runs.create(cfg)
    runs.write_status(run_dir, state="completed")
    log = ev.EventLog(run_dir)
    log.write(_m(1, 2.5))
    reads, real_read = [], ev.read
    monkeypatch.setattr(ev, "read", lambda d, offset=0: reads.append(str(d)) or real_read(d, offset))
    assert runs_tab.table().set_index("run").loc["listed", "loss"] == "2.5000"
    assert runs_tab.table().set_index("run").loc["listed", "loss"] == "2.5000"
    assert reads == [str(run_dir)]  # twenty pages relisting: one read of an unchanged run
    log.write(_m(2, 1.25))
    assert runs_tab.table().set_index("run").loc["listed", "loss"] == "1.2500"  # a new event: read again
