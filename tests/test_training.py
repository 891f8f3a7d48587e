"""Real training child processes on the tiny model (CPU): LoRA and QLoRA learn, the adapter reloads with the
same logits, a run killed mid-save resumes to the same losses, SIGTERM stops cleanly, one run at a time.

The runs are started together at module start (each in its own LoRA Garage home) so their process start-up
(~10 s of imports each on a small CPU) overlaps; each test then waits for the runs it checks.
"""

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from core import events as ev
from core.runs import runner
from core.runs import folder as runs
from core.config import RunConfig
from core.errors import BusyError
from tests.helpers.training import ONE_THREAD, Launch, RESUME_TOLERANCE, check_adapter_reloads, losses, tiny_config, write_dataset

pytestmark = pytest.mark.integration

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


E2E_TEST = "test_cpu_demo_preset_end_to_end"


@pytest.fixture(scope="module")
def launched(request, tmp_path_factory, tiny_model_dir, shared_models):
    """Every run of this module, started at once: reference LoRA, the same run killed in the middle of saving
    checkpoint-4, QLoRA, a long run to stop, three injected faults, and (when selected) the cpu-demo preset."""
    root = tmp_path_factory.mktemp("training")
    data = write_dataset(root / "identity.jsonl")
    base_sha = sha256(tiny_model_dir / "model.safetensors")
    e2e = None
    if any(item.name == E2E_TEST for item in request.session.items):
        e2e = start_cpu_demo(root / "home-e2e", shared_models)

    def cfg(**train):
        return tiny_config(tiny_model_dir, data, **train)

    probe = {"LORA_GARAGE_TEST_PROBE": "1"}
    qlora = cfg(max_steps=8, optimizer="adamw_8bit", grad_checkpointing=True, eval_steps=4,
                sample_prompts=["Who are you?"])
    qlora.quant.method, qlora.quant.quant_type, qlora.quant.double_quant = "qlora", "nf4", True
    qlora.data.val_fraction = 0.25  # 4 of 16 rows held out: eval events at steps 4 and 8
    specs = {
        "lora": (cfg(), probe),
        "killed": (cfg(), {"LORA_GARAGE_FAULT": "killsave@step4"}),
        "qlora": (qlora, probe),
        "long": (cfg(max_steps=100_000, save_steps=50_000, lr=1e-4), {}),
        "oom": (cfg(max_steps=6, oom_recovery="off"), {"LORA_GARAGE_FAULT": "oom@step3"}),
        "nan": (cfg(max_steps=10, save_steps=1, nan_patience=2), {"LORA_GARAGE_FAULT": "nan@step3"}),
        "disk": (cfg(max_steps=6), {"LORA_GARAGE_FAULT": "disk@step4"}),
    }
    launched = {name: Launch(root / f"home-{name}", c, env) for name, (c, env) in specs.items()}
    yield {"runs": launched, "base_sha": base_sha, "e2e": e2e}
    for run in launched.values():  # nothing may outlive the module, whatever failed
        with run.environ():
            if runs.read_status(run.run_dir)["state"] in runs.ACTIVE:
                runner.stop(run.run_id, grace_s=5)
    if e2e is not None and e2e["proc"].poll() is None:
        e2e["proc"].kill()
        e2e["proc"].wait()


def start_cpu_demo(home: Path, shared_models: Path) -> dict:
    """`python -m core train --preset cpu-demo` in the foreground of its own process, as a user would type it.
    Its home shares the session's converted built-in model (converted once, ~70 s)."""
    import subprocess
    import sys

    home.mkdir()
    (home / "models").symlink_to(shared_models, target_is_directory=True)
    out = open(home / "cli.out", "wb")
    cmd = [sys.executable, "-m", "core", "train", "--preset", "cpu-demo", "--max-steps", "10"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "LORA_GARAGE_HOME": str(home), "OMP_NUM_THREADS": ONE_THREAD})
    return {"proc": proc, "home": home, "out": home / "cli.out", "t0": time.time()}


def test_sigterm_stops_cleanly_and_a_second_start_is_refused(launched):
    # first in the module: the long run would otherwise train (and take CPU from the others) until stopped
    long = launched["runs"]["long"]
    run_id, run_dir = long.run_id, long.run_dir
    deadline = time.time() + 300
    while len(losses(run_dir)) < 2:
        assert time.time() < deadline and runs.read_status(run_dir)["state"] in runs.ACTIVE, runs.tail_log(run_dir)
        time.sleep(0.3)
    with long.environ():
        assert runner.running() == run_id
        with pytest.raises(BusyError, match=f"busy: run {run_id} is training"):
            runner.start(runs.load_config(run_dir))
        assert runner.stop(run_id, grace_s=60) == "stopped"
        st = runs.read_status(run_dir)
        assert runner.running() is None
    assert st["error"] is None and st["ended_at"]
    ckpt = runs.latest_checkpoint(run_dir)
    assert ckpt is not None and runs.checkpoint_step(ckpt) == st["step"] >= 2
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    events, _ = ev.read(run_dir)
    assert any("stop requested" in e.get("message", "") for e in events)


def test_a_run_killed_mid_save_resumes_to_the_same_losses(launched, capsys):
    ref = launched["runs"]["lora"]
    run = launched["runs"]["killed"]
    st = run.wait()
    # the child died with no word (SIGKILL in the middle of saving checkpoint-4): the runner says so
    assert st["state"] == "failed" and st["error"]["kind"] == "crash", st
    assert "SIGKILL" in st["error"]["message"]
    partial = runs.checkpoints_dir(run.run_dir) / "checkpoint-4"
    assert partial.is_dir() and not (partial / runs.COMPLETE).exists()
    assert runs.latest_checkpoint(run.run_dir).name == "checkpoint-2"

    run.resume()
    st = run.wait()
    assert st["state"] == "completed", runs.tail_log(run.run_dir, 40)
    names = sorted(p.name for p in runs.checkpoints_dir(run.run_dir).iterdir())
    assert names == ["checkpoint-10", "checkpoint-8", "partial-checkpoint-4"]  # set aside, never loaded
    assert "set aside an incomplete checkpoint" in (run.run_dir / "train.log").read_text()

    assert ref.wait()["state"] == "completed"
    want, got = losses(ref.run_dir), losses(run.run_dir)
    assert list(got) == list(want) == list(range(1, 11))
    worst = max(abs(want[s] - got[s]) for s in want)
    with capsys.disabled():
        print(f"\nresume equivalence: max |loss diff| over 10 steps = {worst:.3g} (tolerance {RESUME_TOLERANCE})")
    assert worst <= RESUME_TOLERANCE, (want, got)


def test_lora_learns_and_the_adapter_reloads_with_the_same_logits(launched, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    run = launched["runs"]["lora"]
    st = run.wait()
    assert st["state"] == "completed", runs.tail_log(run.run_dir, 40)
    assert (st["step"], st["total_steps"], st["error"]) == (10, 10, None)
    curve = losses(run.run_dir)
    assert list(curve) == list(range(1, 11))
    assert curve[10] < 0.88 * curve[1], curve  # an easy dataset: the loss must fall clearly
    events, _ = ev.read(run.run_dir)
    m = ev.metrics(events)[-1]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed", "eta_s", "mem", "t"} <= set(m)
    assert m["tokens_per_s"] > 0 and m["mem"]["rss"] > 0 and m["eta_s"] == 0
    assert any(e["type"] == "log" and e["level"] == "warning" and "CPU" in e["message"] for e in events)
    assert json.loads((run.run_dir / "estimate.json").read_text())["total_bytes"] > 0
    # the last save_total_limit=2 checkpoints, each marked COMPLETE
    assert [p.name for p in runs.checkpoints(run.run_dir)] == ["checkpoint-8", "checkpoint-10"]
    assert sorted(p.name for p in runs.checkpoints_dir(run.run_dir).iterdir()) == ["checkpoint-10", "checkpoint-8"]

    assert sha256(tiny_model_dir / "model.safetensors") == launched["base_sha"]  # base weights on disk untouched
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = check_adapter_reloads(run.run_dir, base)
    merged_base = {k.replace("base_model.model.", "").replace("base_layer.", ""): v
                   for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(merged_base[k], v) for k, v in original.items())  # base weights unchanged in memory


def test_qlora_learns_and_the_adapter_reloads_with_the_same_logits(launched):
    from core.train import child as training

    run = launched["runs"]["qlora"]
    st = run.wait()
    assert st["state"] == "completed", runs.tail_log(run.run_dir, 40)
    curve = losses(run.run_dir)
    assert curve[8] < 0.9 * curve[1], curve
    log = (run.run_dir / "train.log").read_text()
    assert "4-bit nf4 base + double quant" in log and "activation checkpointing on" in log
    assert "gradients flow: all 28 trainable tensors" in log  # the preflight ran before the first update
    assert "silently incorrect" not in log and "kernels-community" not in log
    events, _ = ev.read(run.run_dir)
    assert [e["step"] for e in events if e["type"] == "eval"] == [4, 8]
    assert all(e["eval_loss"] > 0 for e in events if e["type"] == "eval")
    samples = [e for e in events if e["type"] == "sample"]
    assert [e["step"] for e in samples] == [2, 4, 6, 8] and all(e["prompt"] == "Who are you?" for e in samples)
    assert all(isinstance(e["text"], str) for e in samples)
    cfg = runs.load_config(run.run_dir)
    base = training.load_model(cfg, "cpu")  # the same 4-bit quantization of the same weights
    assert any(type(mod).__name__ == "Linear4bit" for mod in base.modules())
    check_adapter_reloads(run.run_dir, base)


# ---------------------------------------------------------------- injected faults (LORA_GARAGE_FAULT)

def test_out_of_memory_fails_naming_the_phase_and_smaller_settings(launched):
    run = launched["runs"]["oom"]
    st = run.wait()
    assert st["state"] == "failed", runs.tail_log(run.run_dir, 40)
    err = st["error"]
    assert err["kind"] == "oom" and err["message"] == "out of GPU memory during train at step 3"
    for tip in ("train.batch_size=1 with train.grad_accum=4", "train.grad_checkpointing=true",
                "quant.method=qlora", "train.optimizer=adamw_8bit"):
        assert tip in err["hint"]
    assert "OutOfMemoryError" in (run.run_dir / "train.log").read_text()  # the traceback is kept
    assert runs.latest_checkpoint(run.run_dir).name == "checkpoint-2"
    assert not (run.run_dir / "adapter").exists()  # never a final adapter after a failure
    assert "no recovery: train.oom_recovery=off" in (run.run_dir / "train.log").read_text()
    assert not ev.recoveries(ev.read(run.run_dir)[0])  # train.oom_recovery=off: as before recovery existed


def test_nan_loss_stops_after_patience_and_keeps_the_last_good_checkpoint(launched):
    import math

    run = launched["runs"]["nan"]
    st = run.wait()
    assert st["state"] == "failed", runs.tail_log(run.run_dir, 40)
    err = st["error"]
    assert err["kind"] == "nan" and "NaN/inf for 2 steps in a row (steps 3-4)" in err["message"]
    assert "the last good checkpoint is checkpoint-2" in err["hint"] and "train.lr" in err["hint"]
    assert [p.name for p in runs.checkpoints(run.run_dir)] == ["checkpoint-1", "checkpoint-2"]
    curve = losses(run.run_dir)
    assert math.isfinite(curve[2]) and math.isnan(curve[3]) and math.isnan(curve[4]) and 5 not in curve
    events, _ = ev.read(run.run_dir)
    assert sum("update skipped" in e.get("message", "") for e in events) == 2
    assert not (run.run_dir / "adapter").exists()


def test_disk_full_while_saving_keeps_the_previous_checkpoint(launched):
    run = launched["runs"]["disk"]
    st = run.wait()
    assert st["state"] == "failed", runs.tail_log(run.run_dir, 40)
    err = st["error"]
    assert err["kind"] == "disk" and "disk filled up during save at step 4" in err["message"]
    assert "checkpoint-2 is intact" in err["message"] and "MB" in err["hint"]
    assert runs.latest_checkpoint(run.run_dir).name == "checkpoint-2"
    assert sorted(p.name for p in runs.checkpoints_dir(run.run_dir).iterdir()) == ["checkpoint-2", "partial-checkpoint-4"]


def test_free_space_is_checked_before_training(monkeypatch, tmp_path):
    import shutil
    from collections import namedtuple

    import torch

    from core.train import child as training
    from core.errors import DiskFull

    model = torch.nn.Linear(1000, 1000)  # 1M trainable parameters: ~12 MB per checkpoint with Adam
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 20 * 2**20))
    with pytest.raises(DiskFull, match="only 20 MB free") as e:
        training.check_disk(tmp_path, model, RunConfig())
    assert "save_total_limit" in e.value.hint
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 10**10))
    training.check_disk(tmp_path, model, RunConfig())


def test_oom_hints_per_phase():
    from core.train import child as training
    from core.train.callbacks import Context

    cfg = RunConfig()
    ctx = Context()
    ctx.phase = "load"
    err = training.oom_error(ctx, cfg, gpu=True)
    assert err.message == "out of GPU memory during load" and "quant.method=qlora" in err.hint
    cfg.quant.method, cfg.train.grad_checkpointing, cfg.train.optimizer = "qlora", True, "adamw_8bit"
    cfg.data.max_len, ctx.phase, ctx.step = 2048, "first step", 1
    err = training.oom_error(ctx, cfg, gpu=True)
    assert err.message == "out of GPU memory during first step at step 1"
    assert "data.max_len=1024" in err.hint and "quant.method" not in err.hint


# ---------------------------------------------------------------- the golden path, end to end

@pytest.mark.slow
def test_cpu_demo_preset_end_to_end(launched, capsys):
    """python -m core train --preset cpu-demo --max-steps 10 on the built-in SmolLM2-135M: the proof."""
    e2e = launched["e2e"]
    assert e2e is not None
    try:
        code = e2e["proc"].wait(timeout=900)
    finally:
        seconds = time.time() - e2e["t0"]
    out = e2e["out"].read_text(errors="replace")
    assert code == 0, out[-4000:]
    run_dir = next((e2e["home"] / "runs").iterdir())
    st = runs.read_status(run_dir, reconcile=False)
    assert st["state"] == "completed" and st["step"] == 10
    curve = losses(run_dir)
    assert list(curve) == list(range(1, 11)) and curve[10] < curve[1], curve
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "completed in" in out and "final loss" in out
    with capsys.disabled():
        print(f"\ncpu-demo (10 steps) through the CLI: {seconds:.0f} s incl. start-up, "
              f"loss {curve[1]:.3f} -> {curve[10]:.3f}")
