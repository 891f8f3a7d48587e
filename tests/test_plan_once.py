"""The run's own plan (core.train.distributed.machine_plan: devices, strategy with the fits checks, per-rank
grad_accum) is made once per run start in the training child and once per VRAM panel update, and both show the
same strategy."""

import signal

import pytest

from core import hardware
from core.runs import folder as runs
from core.train import distributed
from tests.helpers.training import tiny_config, write_dataset


def _count_planning(monkeypatch) -> dict:
    """Count NVML reads (hardware.read) and plans (distributed.plan) from here on."""
    counts = {"read": 0, "plan": 0}
    real_read, real_plan = hardware.read, distributed.plan

    def read():
        counts["read"] += 1
        return real_read()

    def plan(*a, **k):
        counts["plan"] += 1
        return real_plan(*a, **k)

    monkeypatch.setattr(hardware, "read", read)
    monkeypatch.setattr(distributed, "plan", plan)
    return counts


@pytest.fixture
def keep_signals():
    """The child installs its Stop handlers (SIGTERM, SIGINT) in this process: put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_a_run_start_plans_once_with_one_nvml_read(tmp_path, tiny_model_dir, monkeypatch, keep_signals):
    from core.train import child

    cfg = tiny_config(tiny_model_dir, write_dataset(tmp_path / "d.jsonl", n=4), max_steps=1, save_steps=100)
    run_dir = runs.create(cfg)
    counts = _count_planning(monkeypatch)
    fds = []
    real_hold = child.procs.hold_lock
    monkeypatch.setattr(child.procs, "hold_lock", lambda *a, **k: fds.append(real_hold(*a, **k)) or fds[-1])
    try:
        assert child.main(run_dir) == 0, runs.read_status(run_dir)
    finally:
        for lock in fds:  # the lock goes with the process; this one is pytest's
            lock.close()
    assert runs.read_status(run_dir)["state"] == "completed"
    assert counts == {"read": 1, "plan": 1}


def test_the_vram_panel_shows_the_strategy_the_run_picks(tmp_path, monkeypatch):
    """Two 20 GB cards and a 16-bit LoRA of an 8B model that fits neither alone: the run shards it (FSDP), so the
    panel's per-GPU rows and its plan line say FSDP too, from one NVML read per update."""
    import json

    from core.estimate import vram
    from tests.helpers.forms import form_values
    from tests.helpers.shapes import LLAMA31_8B
    from ui import train_tab

    model = tmp_path / "llama-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA31_8B))
    cfg = tiny_config(model, write_dataset(tmp_path / "d.jsonl", n=4))
    cfg.quant.method, cfg.train.grad_checkpointing, cfg.data.max_len = "lora", True, 4096
    card = hardware.GpuReading(index=0, name="NVIDIA GeForce RTX 4080", total=20 * 2**30, free=20 * 2**30,
                               used=0)
    monkeypatch.setattr(hardware, "read", lambda: hardware.HardwareReading(gpus=[card, card]))
    run_plan = distributed.machine_plan(cfg)  # what the training child decides on this machine
    assert run_plan.strategy == "fsdp"

    counts = _count_planning(monkeypatch)
    names, values = form_values(cfg)
    view = train_tab.vram_update("detected", names, values)
    assert "strategy fsdp" in view.panel and "strategy ddp" not in view.panel
    one = vram.estimate(vram.shape_from_config(LLAMA31_8B), vram.settings_from_config(cfg, device="cuda"))
    per_gpu = vram.per_gpu(one, "fsdp", 2).total_bytes
    assert f"{per_gpu / 2**30:.2f} GB" in view.panel
    assert counts["read"] == 1
    from ui import vram_panel
    assert vram_panel.plans(cfg, hardware.read())["qlora"].strategy == "ddp"  # auto shards only a 16-bit LoRA
