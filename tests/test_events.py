"""The event schema end to end: the real training callback writes events.jsonl through core.events, and the
real readers (the Train page's charts, the Runs table, the CLI) draw from it. On the CPU, and on CUDA with a faked
memory source (torch.cuda counters and NVML readings patched, the real hardware.GpuProcessMemory reading them)."""

import io
import json
from contextlib import redirect_stdout

import pytest

from core import events as ev
from core.runs import folder as runs
from tests.helpers.training import tiny_config, write_dataset

GiB = 2**30


def _train(tmp_path, model_dir, *, device_for_estimate: str, memory=None, context_bytes=None):
    """Four real optimizer steps of the tiny model with GarageCallback, eval at steps 2 and 4."""
    from core import models
    from core.data import sft as data
    from core.train import child as training
    from core.train.callbacks import Context, StopFlag

    cfg = tiny_config(model_dir, write_dataset(tmp_path / "d.jsonl"), max_steps=4, save_steps=1000, eval_steps=2)
    cfg.data.val_fraction = 0.25
    cfg.output.run_name = "contract"
    run_dir = runs.create(cfg)
    runs.write_status(run_dir, state="running")
    log = ev.EventLog(run_dir)
    tok = models.load_tokenizer(model_dir)
    prepared = data.prepare(cfg, tok)
    model = training.add_lora(training.load_model(cfg, "cpu"), cfg)
    training.write_estimate(run_dir, cfg, model_dir, log, device_for_estimate, context_bytes)
    trainer, _ = training.build_trainer(run_dir, cfg, model, tok, prepared, "cpu", log, StopFlag(), Context(), {},
                                        memory=memory)
    trainer.train()
    log.close()
    runs.write_status(run_dir, state="completed")
    return run_dir


class FakeCuda:
    """torch.cuda's counters and NVML's per-process reading, growing a step at a time."""

    def __init__(self, monkeypatch):
        import torch

        from core import hardware

        self.calls = 0
        self.context = 600 * 2**20
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: self._grow(2 * GiB))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 2 * GiB)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: GiB + 512 * 2**20)
        monkeypatch.setattr(hardware, "_create_cuda_context", lambda: None)
        monkeypatch.setattr(hardware, "_torch_device_handle", lambda pynvml: "gpu0")
        monkeypatch.setattr(hardware, "nvml_device_used", lambda handle: 5 * GiB)  # other processes too
        self.process = [self.context]  # what NVML says this process holds, readings in order
        monkeypatch.setattr(hardware, "nvml_process_used", lambda handle, pid: self.process.pop(0)
                            if len(self.process) > 1 else self.process[0])
        import pynvml

        monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)

    def _grow(self, base: int) -> int:
        self.calls += 1
        return base + min(self.calls, 4) * 100 * 2**20


@pytest.mark.integration
def test_the_real_callback_on_cuda_feeds_the_charts_and_the_runs_table(tmp_path, tiny_model_dir, monkeypatch):
    from core import hardware
    from ui import plots, run_view, runs_tab

    fake = FakeCuda(monkeypatch)
    memory = hardware.GpuProcessMemory(every_s=0.0)
    assert memory.context_bytes == fake.context
    fake.process = [3 * GiB + 200 * 2**20]  # NVML from the first step on: above torch's reserve + context
    run_dir = _train(tmp_path, tiny_model_dir, device_for_estimate="cuda", memory=memory.reading,
                     context_bytes=memory.context_bytes)

    events, _ = ev.read(run_dir)
    m = ev.metrics(events)
    assert [e[ev.STEP] for e in m] == [1, 2, 3, 4]
    for e in m:
        mem = e[ev.MEM]
        assert mem[ev.MEM_GPU_PROCESS] == 3 * GiB + 200 * 2**20
        assert mem[ev.MEM_GPU_PEAK] >= mem[ev.MEM_GPU_PROCESS]
        assert mem[ev.MEM_GPU_PEAK] >= mem[ev.MEM_TORCH_PEAK_RESERVED] + fake.context
        assert mem[ev.MEM_TORCH_PEAK_ALLOCATED] == GiB + 512 * 2**20
    peak = m[-1][ev.MEM][ev.MEM_GPU_PEAK]
    assert peak == max(3 * GiB + 200 * 2**20, 2 * GiB + 400 * 2**20 + fake.context)

    # estimate.json: the measured context replaces the assumed one in what the peak is held against
    body = json.loads((run_dir / "estimate.json").read_text())
    assert body["measured_context_bytes"] == fake.context
    est = runs.estimate_bytes(run_dir)
    assert est == body["total_bytes"] - body["details"]["cuda_context"] + fake.context

    # the Train page's memory chart: both measured series and the estimate line, in GB
    frame = plots.memory_frame(events, est)
    assert set(frame.series) == {"GPU peak (process, NVML)", "torch peak reserved", "estimate"}
    gpu = frame[frame.series == "GPU peak (process, NVML)"]
    assert list(gpu.step) == [1, 2, 3, 4] and gpu.value.iloc[-1] == pytest.approx(peak / GiB)
    assert frame[frame.series == "estimate"].value.iloc[0] == pytest.approx(est / GiB)
    # ... and the other charts from the same events
    assert set(plots.loss_frame(events).series) == {"loss", "smoothed", "eval loss"}
    assert (plots.series_frame(events, ev.TOKENS_PER_S, "tokens/s").value > 0).all()
    view = run_view.refresh("contract", {})
    assert "step 4 / 4" in view["progress"] and not view["keep"]
    mem = view["mem"]  # the first fill of a chart: an update carrying the frame and its colours
    assert mem["visible"] and set(mem["value"].series) == set(frame.series)

    # the Runs table: peak vs estimate with the error, torch's peak beside it
    row = runs_tab.table().set_index("run").loc["contract"]
    torch_peak = max(e[ev.MEM][ev.MEM_TORCH_PEAK_RESERVED] for e in m)
    assert row["peak mem / estimate"] == (f"{peak / GiB:.2f} GB / {est / GiB:.2f} GB "
                                          f"({100 * (peak - est) / est:+.0f}%) · torch {torch_peak / GiB:.2f} GB")
    assert row["loss"] == f"{m[-1][ev.LOSS]:.4f}"

    # the CLI
    from core.__main__ import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["runs", "show", "contract"]) == 0
    assert f"peak memory: {peak / GiB:.2f} GB GPU peak (process, NVML)" in out.getvalue()


@pytest.mark.integration
def test_the_real_callback_on_the_cpu_reports_rss_against_the_ram_estimate(tmp_path, tiny_model_dir):
    from ui import plots, runs_tab

    run_dir = _train(tmp_path, tiny_model_dir, device_for_estimate="cpu")
    events, _ = ev.read(run_dir)
    rss = [e[ev.MEM][ev.MEM_RSS] for e in ev.metrics(events)]
    assert len(rss) == 4 and min(rss) > 50 * 2**20
    assert "measured_context_bytes" not in json.loads((run_dir / "estimate.json").read_text())
    est = runs.estimate_bytes(run_dir)
    frame = plots.memory_frame(events, est)
    assert set(frame.series) == {"process RSS (CPU)", "estimate"}
    assert ev.peak_memory(events) == (max(rss), ev.MEM_RSS)
    cell = runs_tab.table().set_index("run").loc["contract", "peak mem / estimate"]
    assert cell == f"{max(rss) / GiB:.2f} GB / {est / GiB:.2f} GB ({100 * (max(rss) - est) / est:+.0f}%)"


def test_the_writer_refuses_what_the_readers_would_not_understand(tmp_path):
    log = ev.EventLog(tmp_path)
    with pytest.raises(ValueError, match="unknown log level"):
        log.log("loud", "x")
    log.log("info", "the fallback", topic=ev.TOPIC_TEMPLATE)
    log.close()
    events, _ = ev.read(tmp_path)
    assert ev.template_notice(events) == "the fallback" and ev.peak_memory(events) is None


def test_read_tails_from_an_offset_and_waits_for_whole_lines(tmp_path):
    run_dir = tmp_path
    log = ev.EventLog(run_dir)
    log.write({"type": "metrics", "step": 1, "loss": 2.0})
    events, off = ev.read(run_dir)
    assert [e["step"] for e in events] == [1] and events[0]["t"] > 0
    with open(run_dir / "events.jsonl", "a") as fh:  # a writer caught mid-line
        fh.write('{"type": "metrics", "st')
    events, off2 = ev.read(run_dir, off)
    assert events == [] and off2 == off
    with open(run_dir / "events.jsonl", "a") as fh:
        fh.write('ep": 2}\nnot json\n')
    events, off3 = ev.read(run_dir, off2)
    assert events[0]["step"] == 2
    assert events[1]["type"] == "log" and events[1]["level"] == "warning"  # reported, not dropped silently
    assert ev.read(run_dir, off3) == ([], off3)
    log.close()


def test_metrics_drops_steps_superseded_by_a_resume():
    events = [{"type": "metrics", "step": s, "loss": 10 - s} for s in (1, 2, 3, 4, 5)]
    events += [{"type": "resume", "step": 2}, {"type": "log", "message": "x"}]
    events += [{"type": "metrics", "step": s, "loss": 20 - s} for s in (3, 4)]
    assert [(m["step"], m["loss"]) for m in ev.metrics(events)] == [(1, 9), (2, 8), (3, 17), (4, 16)]
