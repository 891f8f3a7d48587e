"""Hardware readings: this machine (no NVIDIA GPU), NVML failing in each way it does, and a fake NVML with two
GPUs. read() must never raise and must initialise NVML only once."""

import os
import sys
import types

import pytest

from core import hardware

GIB = 1024 ** 3


@pytest.fixture(autouse=True)
def fresh_nvml():
    hardware.reset()
    yield
    hardware.reset()


class NVMLError(Exception):
    pass


def fake_pynvml(gpus=None, init_error=None, v2=True, broken_gpu=None):
    """A stand-in for the pynvml module. gpus: list of dicts (name, total, used, reserved, util, temp, procs)."""
    gpus = gpus or []
    m = types.SimpleNamespace(NVMLError=NVMLError, NVML_TEMPERATURE_GPU=0, nvmlMemory_v2=0x02000028, calls={"init": 0})

    def init():
        m.calls["init"] += 1
        if init_error:
            raise init_error

    def memory(handle, version=None):
        g = gpus[handle]
        if version and not v2:
            raise NVMLError("Function Not Found")
        if version:   # v2: the driver's reservation is separate from `used`
            return types.SimpleNamespace(total=g["total"], used=g["used"], free=g["total"] - g["used"] - g["reserved"])
        return types.SimpleNamespace(total=g["total"], used=g["used"] + g["reserved"],
                                     free=g["total"] - g["used"] - g["reserved"])

    def util(handle):
        if gpus[handle].get("util") is None:
            raise NVMLError("Not Supported")
        return types.SimpleNamespace(gpu=gpus[handle]["util"], memory=0)

    def temp(handle, sensor):
        if gpus[handle].get("temp") is None:
            raise NVMLError("Not Supported")
        return gpus[handle]["temp"]

    def name(handle):
        if handle == broken_gpu:
            raise NVMLError("GPU is lost")
        return gpus[handle]["name"]

    def procs(handle):
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=mem) for pid, mem in gpus[handle].get("procs", [])]

    m.nvmlInit = init
    m.nvmlSystemGetDriverVersion = lambda: b"550.54"
    m.nvmlDeviceGetCount = lambda: len(gpus)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetName = name
    m.nvmlDeviceGetMemoryInfo = memory
    m.nvmlDeviceGetUtilizationRates = util
    m.nvmlDeviceGetTemperature = temp
    m.nvmlDeviceGetComputeRunningProcesses = procs
    m.nvmlDeviceGetGraphicsRunningProcesses = lambda h: []
    return m


RTX4090 = dict(name="NVIDIA GeForce RTX 4090", total=24 * GIB, used=int(3.1 * GIB), reserved=GIB // 2, util=12, temp=45,
               procs=[(os.getpid(), GIB), (4242, 2 * GIB)])


def test_this_machine_has_no_gpu_and_says_so():
    r = hardware.read()
    assert r.gpus == [] and r.nvml_error.startswith("no NVIDIA GPU")
    assert r.summary().startswith("CPU only (no NVIDIA GPU")
    assert r.ram_total > 0 and 0 < r.ram_available <= r.ram_total and r.cpu_count >= 1
    assert hardware.read().nvml_error == r.nvml_error                    # cached, still no exception


@pytest.mark.parametrize("error,words", [
    (NVMLError("NVML Shared Library Not Found"), "driver is not installed"),
    (NVMLError("Driver Not Loaded"), "driver is not loaded"),
    (RuntimeError("something odd"), "NVML: something odd"),
])
def test_nvml_failures_become_a_reading(monkeypatch, error, words):
    fake = fake_pynvml(init_error=error)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    r = hardware.read()
    assert r.gpus == [] and words in r.nvml_error and "no NVIDIA GPU" in r.summary()
    hardware.read()
    assert fake.calls["init"] == 1                                        # a failure is remembered, not retried


def test_missing_package_is_a_reading(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)                     # import pynvml -> ImportError
    assert "nvidia-ml-py" in hardware.read().nvml_error


def test_fake_gpus_are_read(monkeypatch):
    other = dict(RTX4090, name="NVIDIA RTX A4000", total=16 * GIB, used=0, util=None, temp=None, procs=[])
    fake = fake_pynvml([RTX4090, other])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    r = hardware.read()
    assert r.nvml_error is None and len(r.gpus) == 2
    g = r.gpus[0]
    assert (g.name, g.total, g.used) == (RTX4090["name"], 24 * GIB, int(3.1 * GIB))
    assert (g.util, g.temp, g.driver) == (12, 45, "550.54")
    assert g.free == 24 * GIB - int(3.1 * GIB) - GIB // 2                # v2: reserved memory is not "used"
    assert g.other_procs_used == 2 * GIB                                 # our own process is not "other"
    assert r.gpus[1].util is None and r.gpus[1].temp is None and r.gpus[1].other_procs_used == 0
    assert r.summary().split(" | ")[0] == "NVIDIA GeForce RTX 4090 · 3.1 / 24.0 GB used · 12% · 45°C"
    for _ in range(3):
        hardware.read()
    assert fake.calls["init"] == 1                                       # nvmlInit once, handles cached


def test_old_driver_without_v2_memory_info(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([RTX4090], v2=False))
    g = hardware.read().gpus[0]
    assert g.used == int(3.1 * GIB) + GIB // 2                           # v1 counts the reservation as used


def test_one_broken_gpu_does_not_hide_the_others(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([RTX4090, RTX4090], broken_gpu=0))
    r = hardware.read()
    assert len(r.gpus) == 1 and r.gpus[0].index == 1 and "GPU 0" in r.nvml_error


def test_reading_serialises():
    d = hardware.read().to_dict()
    assert set(d) >= {"gpus", "nvml_error", "ram_total", "ram_available", "cpu_count", "cpu_percent"}
