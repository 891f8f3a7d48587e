"""`python -m core doctor`, with the GPU reading faked both ways: the report must not depend on this host's GPU."""

import json

import pytest

from core import hardware
from core.__main__ import main
from core.units import GiB

NO_GPU = hardware.HardwareReading(gpus=[], nvml_error="no NVIDIA GPU found (NVML: driver not loaded)",
                                  ram_total=16 * GiB, ram_available=12 * GiB, cpu_count=8)
ONE_GPU = hardware.HardwareReading(
    gpus=[hardware.GpuReading(index=0, name="NVIDIA GeForce RTX 4090", total=24 * GiB, free=20 * GiB,
                              used=4 * GiB, driver="550.54")],
    ram_total=64 * GiB, ram_available=48 * GiB, cpu_count=16)


@pytest.fixture
def reading(monkeypatch):
    def use(r):
        monkeypatch.setattr(hardware, "read", lambda: r)

    return use


def test_doctor_without_a_gpu_says_so(reading, capsys):
    reading(NO_GPU)
    assert main(["doctor"]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert "no NVIDIA GPU found (NVML: driver not loaded); training runs on the CPU" in out.out
    assert "12.0 GB available of 16.0 GB, 8 CPU cores" in out.out
    assert "torch" in out.out and "bitsandbytes" in out.out and "home" in out.out


def test_doctor_with_a_gpu_shows_it(reading, capsys):
    reading(ONE_GPU)
    assert main(["doctor"]) == 0
    assert "NVIDIA GeForce RTX 4090  20.0 GB free of 24.0 GB  driver 550.54" in capsys.readouterr().out


def test_doctor_json(reading, capsys):
    import torch

    reading(ONE_GPU)
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"]["cuda"] is torch.cuda.is_available()
    assert report["hardware"]["gpus"] == [{"index": 0, "name": "NVIDIA GeForce RTX 4090", "total_gb": 24.0,
                                           "free_gb": 20.0, "driver": "550.54"}]
    assert report["bitsandbytes"]["ok"] is True, report["bitsandbytes"]
