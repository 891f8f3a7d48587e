"""The one device picker (core.hardware.pick_device: cuda, then mps, then cpu; train.device overrides) and what
an Apple Silicon Mac changes, with MPS faked on this Linux machine: torch.backends.mps.is_available patched, and
for the names, the chip read from sysctl patched. Nothing here runs a kernel on an Apple GPU."""

import json
import subprocess
import sys

import pytest
import torch

from core import hardware, models
from core import events as ev
from core.__main__ import main
from core.config import RunConfig
from core.errors import ConfigError
from core.runs import folder as runs
from core.train import child
from core.units import GiB

MAC = hardware.HardwareReading(gpus=[], nvml_error="no NVIDIA GPU found (the NVIDIA driver is not installed)",
                               ram_total=16 * GiB, ram_available=9 * GiB, cpu_count=10, apple_gpu="Apple M2 Pro")


@pytest.fixture
def fake_mps(monkeypatch):
    """A machine whose torch sees an Apple GPU and no CUDA one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(hardware, "apple_gpu", lambda: "Apple M2 Pro")
    monkeypatch.setattr(models, "_BNB_MPS", {})  # probe again under the fake


def test_the_picker_prefers_cuda_then_mps_then_cpu_and_obeys_train_device(monkeypatch, fake_mps):
    assert hardware.pick_device() == "mps"
    assert hardware.pick_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="train.device") as e:
        hardware.pick_device("cuda")
    assert "no CUDA GPU" in e.value.message
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert hardware.pick_device() == "cuda" and hardware.pick_device("mps") == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert hardware.pick_device() == "cpu"
    with pytest.raises(ConfigError, match="train.device"):
        hardware.pick_device("mps")


def test_train_device_is_a_validated_setting():
    cfg = RunConfig()
    cfg.train.device = "tpu"
    with pytest.raises(ConfigError, match="train.device"):
        cfg.validate()


def test_training_picks_mps_and_says_so(fake_mps, tmp_path):
    cfg = RunConfig()
    run_dir = runs.create(cfg)
    events = ev.EventLog(run_dir)
    try:
        assert child.pick_device(events, cfg.train.device, cfg) == "mps"
    finally:
        events.close()
    said, _ = ev.read(run_dir)
    assert any(e.get("message") == "training on MPS (Apple M2 Pro GPU)" for e in said)


def test_mps_halves_follow_the_macos_version(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True)
    assert models.dtype_for("mps") == torch.bfloat16 and models.dtype_for("mps", "fp16") == torch.float16
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: False)
    assert models.dtype_for("mps") == torch.float16 and models.dtype_for("mps", "bf16") == torch.float16
    assert models.dtype_for("mps", "fp32") == torch.float32


def test_qlora_and_8bit_on_mps_are_refused_by_name_pointing_at_lora(fake_mps):
    # this bitsandbytes cannot run its 4-bit op on a faked Apple GPU (there is none): the probe says why
    support = models.bnb_mps_support()
    assert support["qlora"] and support["8bit"] and support["optim8bit"]
    with pytest.raises(ConfigError) as e:
        models.check_device_support("mps", "qlora")
    assert e.value.field == "quant.method"
    assert "QLoRA (4-bit) does not run on the Apple GPU (mps)" in e.value.message
    assert "quant.method=lora" in e.value.hint
    with pytest.raises(ConfigError, match="8-bit loading"):
        models.check_device_support("mps", "8bit")
    with pytest.raises(ConfigError, match="8-bit optimizers") as e:
        models.check_device_support("mps", "lora", "adamw_8bit")
    assert "train.optimizer=adamw" in e.value.hint
    models.check_device_support("mps", "lora")      # LoRA is fine
    models.check_device_support("cuda", "qlora")    # and the check is only about mps


def test_qlora_on_mps_is_allowed_where_bitsandbytes_runs_it(monkeypatch, fake_mps):
    monkeypatch.setattr(models, "_BNB_MPS", {"qlora": None, "8bit": "no int8 kernel", "optim8bit": None})
    models.check_device_support("mps", "qlora")
    with pytest.raises(ConfigError, match="no int8 kernel"):
        models.check_device_support("mps", "8bit")


def test_a_qlora_run_on_mps_fails_at_once_with_the_refusal(fake_mps, tiny_model_dir, tmp_path):
    cfg = RunConfig()
    cfg.model.source = str(tiny_model_dir)
    cfg.data.source = "builtin:demo-identity"
    cfg.quant.method = "qlora"
    run_dir = runs.create(cfg)
    assert child.main(run_dir) == 1
    st = runs.read_status(run_dir)
    assert st["state"] == "failed" and st["error"]["kind"] == "config"
    assert "QLoRA (4-bit) does not run on the Apple GPU" in st["error"]["message"]
    assert "quant.method=lora" in st["error"]["hint"]


def test_the_estimator_checks_mps_against_the_macs_ram_less_a_margin(monkeypatch, capsys):
    def estimate(ram_total):
        monkeypatch.setattr(hardware, "read", lambda: hardware.HardwareReading(
            gpus=[], nvml_error="no NVIDIA GPU found", ram_total=ram_total, ram_available=1 * GiB, apple_gpu="Apple M1"))
        assert main(["estimate", "--model", "builtin:smollm2-135m", "--device", "mps", "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    first = estimate(16 * GiB)
    need = first["total_bytes"]
    usable = int(16 * GiB * (1 - hardware.MPS_RAM_MARGIN))
    assert first["device"] == "mps" and first["margin_bytes"] == usable - need and first["fits"]
    # the same estimate against two Macs: RAM (less the margin) just above and just below it decides
    above = estimate(int(need / (1 - hardware.MPS_RAM_MARGIN)) + 64 * 2**20)
    below = estimate(int(need / (1 - hardware.MPS_RAM_MARGIN)) - 64 * 2**20)
    assert above["total_bytes"] == below["total_bytes"] == need
    assert above["fits"] and not below["fits"]
    # the free RAM (1 GB here) is not what an Apple GPU is held against; --cpu is
    assert main(["estimate", "--model", "builtin:smollm2-135m", "--cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["margin_bytes"] < usable - need  # 1 GB free vs 12 GB usable
    assert main(["estimate", "--model", "builtin:smollm2-135m", "--device", "mps"]) == 0
    text = capsys.readouterr().out
    assert "MPS: Apple M1" in text and "less 25% for macOS and apps" in text


def test_doctor_and_the_hardware_bar_name_the_apple_gpu(monkeypatch, fake_mps, capsys):
    from ui import hardware_bar

    monkeypatch.setattr(hardware, "read", lambda: MAC)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "MPS: MPS (Apple M2 Pro GPU) (no CUDA device)" in out
    assert "training, chat and eval use MPS (Apple M2 Pro GPU)" in out
    assert "Apple M2 Pro GPU (MPS): shares the 16.0 GB of RAM" in out
    bar = hardware_bar.render()
    assert "Apple M2 Pro GPU" in bar and "CPU only" not in bar


def test_the_apple_chip_is_read_from_sysctl_on_an_arm64_mac(monkeypatch):
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="Apple M3 Max\n", stderr="")

    hardware.reset()
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(hardware.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(hardware.subprocess, "run", run)
    try:
        assert hardware.apple_gpu() == "Apple M3 Max" and hardware.apple_gpu() == "Apple M3 Max"
        assert calls == [["sysctl", "-n", "machdep.cpu.brand_string"]]  # read once
        assert hardware.HardwareReading(apple_gpu=hardware.apple_gpu(), ram_total=8 * GiB).summary() == \
            "Apple M3 Max GPU (MPS, shares the 8.0 GB of RAM)"
    finally:
        hardware.reset()
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")  # an Intel Mac: no Apple GPU
    assert hardware.apple_gpu() is None
    hardware.reset()


def test_a_cpu_run_beside_a_busy_program_trains_on_the_cores_left_free(monkeypatch, tmp_path):
    """One core's worth of other work on 2 cores: the child trains on 1 thread and says so; a thread count the user
    set (OMP_NUM_THREADS) stands; a quiet machine keeps every core."""
    from core.estimate import eta

    before = torch.get_num_threads()
    events = ev.EventLog(tmp_path)
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        monkeypatch.setattr(eta, "others_now", lambda max_age_s=None: 1.0)
        child.share_the_cores(events)
        assert torch.get_num_threads() == 2  # the user's choice
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(eta, "others_now", lambda max_age_s=None: 0.3)
        child.share_the_cores(events)
        assert torch.get_num_threads() == 2  # quiet enough
        monkeypatch.setattr(eta, "others_now", lambda max_age_s=None: 1.0)
        child.share_the_cores(events)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
        events.close()
    said = [e[ev.MESSAGE] for e in ev.logs(ev.read(tmp_path)[0])]
    assert said == ["this machine is busy: other programs keep about 1.0 cores' worth of work running, so training "
                    "uses 1 of its 2 cores (threads that share a core with another program hold the others back); "
                    "set OMP_NUM_THREADS to choose"]
    assert [eta.cpu_threads(x, 8) for x in (0, 0.4, 0.6, 3.2, 7.9, 20)] == [8, 8, 7, 5, 1, 1]
